//! Shared harness for the plugin's privileged tests: network namespaces
//! that delete themselves (and whatever runs in them) on drop, and running
//! a CNI plugin the way a runtime does, from inside a "node" namespace.
//!
//! Nothing here touches the host's own namespace: the bridge, pods and
//! "other hosts" all live in namespaces a test made.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bosun_testsupport::host;
use serde_json::Value;

/// Our plugin, as cargo built it for this test run.
pub fn plugin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bosun-cni"))
}

/// Where Debian keeps the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// True when the test may run; panics under CI without root, so a missing
/// privilege fails loudly instead of passing silently.
pub fn privileged(what: &str) -> bool {
    bosun_testsupport::privileged::require_root(what)
}

/// A named network namespace (`ip netns add`), removed on drop together
/// with every process still inside it.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `bcni-<prefix>-<unique>` with loopback up.
    pub fn new(prefix: &str) -> Result<Self> {
        let name = host::unique_id(&format!("bc{prefix}"));
        let name: String = name.chars().take(30).collect();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The name under /run/netns.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, what CNI_NETNS carries.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A command that will run inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let file = File::open(self.path()).context("open netns")?;
        let mut command = Command::new(program);
        // SAFETY: setns is async-signal-safe; the closure only calls it.
        unsafe {
            command.pre_exec(move || {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        Ok(command)
    }

    /// Runs `argv` inside; fails with its stderr if it fails.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let mut command = self.command(argv[0])?;
        command.args(&argv[1..]);
        let out = run(&mut command)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `argv` inside and reports whether it succeeded.
    pub fn succeeds(&self, argv: &[&str]) -> bool {
        self.command(argv[0])
            .map(|mut c| {
                c.args(&argv[1..])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .unwrap_or(false)
    }

    /// PIDs of processes in this namespace.
    pub fn pids(&self) -> Vec<u32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a command, failing with its stderr.
pub fn run(command: &mut Command) -> Result<Output> {
    let out = command
        .output()
        .with_context(|| format!("spawn {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// One plugin invocation's outcome.
#[derive(Debug)]
pub struct Invocation {
    /// Whether the plugin exited 0.
    pub success: bool,
    /// Its stdout parsed as JSON (`Null` when empty).
    pub json: Value,
    /// Its stdout as text.
    pub stdout: String,
}

/// The CNI_* variables of one call.
#[derive(Debug, Clone, Default)]
pub struct Call<'a> {
    /// CNI_COMMAND.
    pub command: &'a str,
    /// CNI_CONTAINERID.
    pub container_id: &'a str,
    /// CNI_NETNS (empty: unset).
    pub netns: String,
    /// CNI_IFNAME.
    pub ifname: &'a str,
    /// CNI_ARGS.
    pub args: &'a str,
}

impl<'a> Call<'a> {
    /// ADD/DEL/CHECK of `id` in `pod` as eth0.
    pub fn new(command: &'a str, id: &'a str, pod: &Netns) -> Self {
        Self {
            command,
            container_id: id,
            netns: pod.path().display().to_string(),
            ifname: "eth0",
            args: "",
        }
    }
}

/// Runs `plugin` inside `node` as a runtime would: env vars, netconf on
/// stdin, result on stdout.
pub fn invoke(node: &Netns, plugin: &Path, call: &Call<'_>, conf: &Value) -> Result<Invocation> {
    let mut command = node.command(plugin)?;
    command
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", call.command)
        .env(
            "CNI_PATH",
            format!(
                "{}:{REFERENCE_PLUGINS}",
                plugin
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in [
        ("CNI_CONTAINERID", call.container_id),
        ("CNI_NETNS", call.netns.as_str()),
        ("CNI_IFNAME", call.ifname),
        ("CNI_ARGS", call.args),
    ] {
        if !value.is_empty() {
            command.env(key, value);
        }
    }
    let mut child = command.spawn().context("spawn plugin")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(conf.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout)
            .with_context(|| format!("plugin stdout is not JSON: {stdout:?}"))?
    };
    Ok(Invocation {
        success: out.status.success(),
        json,
        stdout,
    })
}

/// Like [`invoke`] but fails unless the plugin succeeded.
pub fn invoke_ok(node: &Netns, plugin: &Path, call: &Call<'_>, conf: &Value) -> Result<Value> {
    let out = invoke(node, plugin, call, conf)?;
    if !out.success {
        bail!(
            "{} {} failed: {}",
            call.command,
            call.container_id,
            out.stdout
        );
    }
    Ok(out.json)
}

/// Polls `probe` for up to 5 s.
pub fn eventually(mut probe: impl FnMut() -> bool) -> bool {
    host::poll(Duration::from_secs(5), || probe().then_some(())).is_some()
}

/// A bridge netconf for `name` on `bridge` with `subnet` and a private
/// IPAM data dir.
pub fn netconf(name: &str, bridge: &str, subnet: &str, data_dir: &Path) -> Value {
    serde_json::json!({
        "cniVersion": "1.1.0",
        "name": name,
        "type": "bosun-cni",
        "bridge": bridge,
        "isGateway": true,
        "isDefaultGateway": true,
        "ipMasq": true,
        "ipam": {
            "type": "host-local",
            "dataDir": data_dir,
            "ranges": [[{"subnet": subnet}]]
        }
    })
}
