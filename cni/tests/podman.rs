//! `bosun-cni` under a real runtime: Debian's podman 4.3 with its CNI
//! network backend (libcni inside podman), a conflist naming our plugin in
//! a test-private network config dir.
//!
//! Each test gets its own podman: private `CONTAINERS_CONF` (CNI backend,
//! `cni_plugin_dirs` = cargo's output dir + /usr/lib/cni,
//! `network_config_dir`), storage, registries, `--root`/`--runroot`/
//! `--tmpdir`, runtime state dir and cgroup parent; the image is busybox,
//! built locally as an OCI layout and pulled with `oci:` (no network).
//! Podman runs inside a "node" network namespace the test makes, so the
//! bridge, the nftables rules and the host ports live there; podman makes
//! each container's namespace itself. Everything is removed on drop, also
//! when a test fails.
//!
//! Known side effects outside the private dirs (podman 4.3 has no knob for
//! them): the blob-info cache `/var/lib/containers/cache`, libcni's result
//! cache `/var/lib/cni/results/<network>-<container>-eth0` (removed by
//! DEL) and the container namespaces' mount points under `/run/netns`
//! (removed on container cleanup).

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{self, File};
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bosun_testsupport::{host, layout, rootfs};
use ipnet::IpNet;
use serde_json::{json, Value};

use common::Netns;

const IMAGE_REF: &str = "localhost/bosun-cni-busybox:latest";
const SUBNET: &str = "10.78.0.0/24";
const GATEWAY: &str = "10.78.0.1";
const BRIDGE: &str = "bcpodman0";
/// crun refuses this host's hybrid cgroup layout; runc takes it.
const RUNTIME: &str = "/usr/sbin/runc";
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// What a finished podman command printed.
#[derive(Debug)]
struct Output {
    cmdline: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn ok(self) -> Result<Output> {
        ensure!(self.status.success(), "{self}");
        Ok(self)
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.cmdline, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` with its output in files (a container's conmon may hold a
/// pipe open long after podman exits), killing its process group after
/// `timeout`.
fn run(cmd: &mut Command, out_dir: &Path, timeout: Duration) -> Result<Output> {
    let cmdline = format!("{cmd:?}");
    let (out_path, err_path) = (out_dir.join("cmd.out"), out_dir.join("cmd.err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawn {cmdline}"))?;
    let status = host::wait_deadline(&mut child, Instant::now() + timeout)?;
    let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    let Some(status) = status else {
        host::kill_group(&mut child);
        bail!(
            "{cmdline} still running after {timeout:?}; killed it\n--- stdout ---\n{}--- stderr ---\n{}",
            read(&out_path),
            read(&err_path)
        );
    };
    Ok(Output {
        cmdline,
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    })
}

/// A private podman whose networks are ours, running in `node`.
struct Podman {
    network: String,
    image: String,
    cgroup: String,
    node: Netns,
    /// Declared last: removed after everything above is gone.
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Result<Podman> {
        let id = host::unique_id("bcpm");
        // Lowercase and named by the id alone: podman derives image names
        // from `oci:` paths.
        let dir = tempfile::Builder::new()
            .prefix(&id)
            .rand_bytes(0)
            .tempdir()?;
        let mut podman = Podman {
            network: format!("bosun-{id}"),
            image: String::new(),
            cgroup: format!("/{id}"),
            node: Netns::new("pmn")?,
            dir,
        };
        podman.write_config()?;
        podman.image = podman.pull_busybox()?;
        Ok(podman)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The network's IPAM dir (host-local layout).
    fn ipam_dir(&self) -> PathBuf {
        self.path("ipam").join(&self.network)
    }

    fn write_config(&self) -> Result<()> {
        let plugin_dir = common::plugin().parent().unwrap().to_owned();
        let containers_conf = format!(
            "[engine]\n\
             cgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\n\
             [network]\n\
             network_backend = \"cni\"\n\
             cni_plugin_dirs = [\"{}\", \"{}\"]\n\
             network_config_dir = \"{}\"\n",
            plugin_dir.display(),
            common::REFERENCE_PLUGINS,
            self.path("net.d").display()
        );
        let storage_conf = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            self.path("root").display(),
            self.path("runroot").display()
        );
        fs::write(self.path("containers.conf"), containers_conf)?;
        fs::write(self.path("storage.conf"), storage_conf)?;
        fs::write(
            self.path("registries.conf"),
            "unqualified-search-registries = []\nshort-name-mode = \"enforcing\"\n",
        )?;
        fs::create_dir_all(self.path("net.d"))?;
        fs::create_dir_all(self.path("out"))?;
        // libcni's conflist; our plugin declares portMappings itself, so
        // podman hands `-p` to it (no portmap in the list).
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": self.network,
            "plugins": [{
                "type": "bosun-cni",
                "bridge": BRIDGE,
                "isGateway": true,
                "isDefaultGateway": true,
                "ipMasq": true,
                "capabilities": {"portMappings": true},
                "ipam": {
                    "type": "host-local",
                    "dataDir": self.path("ipam"),
                    "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]]
                }
            }]
        });
        fs::write(
            self.path("net.d")
                .join(format!("{}.conflist", self.network)),
            serde_json::to_string_pretty(&conflist)?,
        )?;
        Ok(())
    }

    fn pull_busybox(&self) -> Result<String> {
        let rootfs = self.path("image-rootfs");
        rootfs::busybox(&rootfs)?;
        let layout = self.path("image-layout");
        let info = layout::write(&layout, IMAGE_REF, &rootfs)?;
        let source = format!("oci:{}:{}", layout.display(), info.tag);
        let out = self.podman(&["pull", "--quiet", &source])?.ok()?;
        let image = out.stdout.lines().last().unwrap_or_default().trim();
        ensure!(!image.is_empty(), "podman pull printed no image ID: {out}");
        Ok(image.to_owned())
    }

    /// `podman <args>` inside the node namespace, whatever its exit code.
    fn podman(&self, args: &[&str]) -> Result<Output> {
        let dir = |name: &str| self.path(name).display().to_string();
        let mut cmd = self.node.command("podman")?;
        cmd.env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.path("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            .args(["--root", &dir("root"), "--runroot", &dir("runroot")])
            .args(["--tmpdir", &dir("tmp"), "--storage-driver", "vfs"])
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .args(["--runtime", RUNTIME])
            .arg("--runtime-flag")
            .arg(format!("root={}", dir("runtime-root")))
            .args(args);
        run(&mut cmd, &self.path("out"), COMMAND_TIMEOUT)
    }

    /// `podman run` flags of every container here: our network, this
    /// test's cgroup parent, rlimits within the hard limit.
    fn run_args(&self) -> Vec<String> {
        [
            "--network",
            &self.network,
            "--cgroup-parent",
            &self.cgroup,
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// `podman run [flags] IMAGE cmd...`.
    fn run(&self, flags: &[&str], cmd: &[&str]) -> Result<Output> {
        let mut args: Vec<&str> = vec!["run"];
        let run_args = self.run_args();
        args.extend(run_args.iter().map(String::as_str));
        args.extend(flags);
        args.push(&self.image);
        args.extend(cmd);
        self.podman(&args)
    }

    /// The container's full ID and its IPv4 on our network, as podman
    /// reports them.
    fn inspect(&self, name: &str) -> Result<(String, IpAddr)> {
        let out = self.podman(&["inspect", name])?.ok()?;
        let inspect: Value = serde_json::from_str(&out.stdout)?;
        let id = inspect[0]["Id"].as_str().context("no Id")?;
        let ip = inspect[0]["NetworkSettings"]["Networks"][&self.network]["IPAddress"]
            .as_str()
            .with_context(|| format!("no IPAddress on {} in {out}", self.network))?;
        Ok((id.to_owned(), ip.parse()?))
    }

    /// libcni's cache of the container's ADD (what podman sent: CNI_ARGS,
    /// capability args, and the result our plugin returned).
    fn libcni_cache(&self, id: &str) -> PathBuf {
        Path::new("/var/lib/cni/results").join(format!("{}-{id}-eth0", self.network))
    }

    /// IP allocation files in the IPAM dir.
    fn allocated(&self) -> Vec<String> {
        fs::read_dir(self.ipam_dir())
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// veth links in the node namespace.
    fn veths(&self) -> Result<usize> {
        let out = self
            .node
            .exec(&["ip", "-j", "link", "show", "type", "veth"])?;
        let links: Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })?;
        Ok(links.as_array().map_or(0, Vec::len))
    }

    /// Asserts the network holds nothing any more: no address, no veth.
    fn ensure_released(&self) -> Result<()> {
        ensure!(
            self.allocated().is_empty(),
            "IPAM still holds {:?}",
            self.allocated()
        );
        ensure!(
            common::eventually(|| self.veths().is_ok_and(|n| n == 0)),
            "veths left in the node namespace: {:?}",
            self.node.exec(&["ip", "-br", "link"])
        );
        Ok(())
    }

    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for args in [&["ps", "--all"][..], &["network", "ls"]] {
            match self.podman(args) {
                Ok(o) => out.push_str(&format!("{o}\n")),
                Err(e) => out.push_str(&format!("podman {args:?}: {e:#}\n")),
            }
        }
        let node = self
            .node
            .exec(&["sh", "-c", "ip addr; nft list ruleset"])
            .unwrap_or_else(|e| format!("{e:#}"));
        out.push_str(&format!("--- node namespace ---\n{node}"));
        out.push_str(&format!(
            "--- IPAM {} ---\n{:?}\n",
            self.ipam_dir().display(),
            self.allocated()
        ));
        out
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Inside the node namespace, so the CNI DELs find the bridge.
        match self.podman(&["rm", "--all", "--force", "--time", "0"]) {
            Ok(out) if !out.status.success() => eprintln!("cleanup: {out}"),
            Err(e) => eprintln!("cleanup: {e:#}"),
            Ok(_) => {}
        }
        // State of `--rm` containers whose cleanup went to runc's default
        // root (conmon's exit command drops --runtime-flag).
        if let Ok(entries) = fs::read_dir(self.path("runtime-root")) {
            for entry in entries.flatten() {
                let mut cmd = Command::new(RUNTIME);
                cmd.arg("--root")
                    .arg(self.path("runtime-root"))
                    .args(["delete", "--force"])
                    .arg(entry.file_name());
                if let Err(e) = run(&mut cmd, &self.path("out"), Duration::from_secs(30)) {
                    eprintln!("cleanup: {e:#}");
                }
            }
        }
        host::unmount_under(self.dir.path());
        if let Ok(hierarchies) = host::cgroup_mounts() {
            for dir in host::existing_cgroup_dirs(&hierarchies, &self.cgroup[1..]) {
                if let Err(e) = host::remove_cgroup_tree_within(&dir, Duration::from_secs(5)) {
                    eprintln!("cleanup: {}: {e}", dir.display());
                }
            }
        }
    }
}

/// Runs `body` against a fresh private podman; prints podman's and the
/// node's state on failure. Fails (never skips) without root under CI.
fn scenario(what: &str, body: impl FnOnce(&Podman) -> Result<()>) {
    if !common::privileged(&format!("podman with bosun-cni: {what}")) {
        return;
    }
    let podman = Podman::new().context("set up a private podman").unwrap();
    if let Err(err) = body(&podman) {
        panic!("{what}: {err:#}\n{}", podman.diagnostics());
    }
}

/// From the node namespace, what a TCP server at `addr:port` says.
fn fetch(node: &Netns, addr: &str, port: u16) -> String {
    node.command("busybox")
        .and_then(|mut c| {
            Ok(c.args(["nc", "-w", "2", addr, &port.to_string()])
                .stdin(Stdio::null())
                .output()?)
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A busybox server answering `text` to every connection on `port`.
fn server(port: u16, text: &str) -> Vec<String> {
    ["nc", "-ll", "-p", &port.to_string(), "-e", "echo", text]
        .map(str::to_owned)
        .to_vec()
}

#[test]
fn run_gets_an_address_and_rm_releases_it() {
    scenario("address from our subnet, released by rm", |pm| {
        let subnet: IpNet = SUBNET.parse()?;
        // A one-shot container sees eth0 with an address of ours.
        let out = pm
            .run(&["--rm"], &["ip", "-o", "-4", "addr", "show", "eth0"])?
            .ok()?;
        let addr: IpNet = out
            .stdout
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .with_context(|| format!("no inet address on eth0: {out}"))?
            .parse()?;
        ensure!(
            subnet.contains(&addr.addr()) && addr.prefix_len() == 24,
            "eth0 has {addr}, not an address of {SUBNET}"
        );
        let route = pm.run(&["--rm"], &["ip", "route"])?.ok()?;
        ensure!(
            route.stdout.contains(&format!("default via {GATEWAY}")),
            "no default route via {GATEWAY}: {route}"
        );
        pm.ensure_released()
            .context("after `podman run --rm` returned")?;

        // A long-running one holds its address until `podman rm`.
        let name = format!("{}-a", pm.network);
        pm.run(&["--detach", "--name", &name], &["sleep", "1000"])?
            .ok()?;
        let (id, ip) = pm.inspect(&name)?;
        ensure!(subnet.contains(&ip), "podman reports {ip}");
        // libcni (in podman) cached our result; podman's CNI_ARGS carried
        // keys we do not know (IgnoreUnknown=1;K8S_POD_NAME=...).
        let cache_path = pm.libcni_cache(&id);
        let cache: Value = serde_json::from_str(
            &fs::read_to_string(&cache_path)
                .with_context(|| format!("read {}", cache_path.display()))?,
        )?;
        ensure!(
            cache["result"]["ips"][0]["address"] == format!("{ip}/24").as_str()
                && cache["result"]["cniVersion"] == "1.0.0",
            "libcni cached another result: {cache}"
        );
        ensure!(
            cache["cniArgs"].to_string().contains("K8S_POD_NAME"),
            "podman's CNI_ARGS: {}",
            cache["cniArgs"]
        );
        ensure!(
            pm.allocated() == [ip.to_string()],
            "IPAM holds {:?}, podman says {ip}",
            pm.allocated()
        );
        ensure!(pm.veths()? == 1, "one veth per container");
        pm.podman(&["rm", "--force", "--time", "0", &name])?.ok()?;
        pm.ensure_released().context("after `podman rm`")?;
        ensure!(
            !cache_path.exists(),
            "libcni cache left after rm: {}",
            cache_path.display()
        );
        Ok(())
    });
}

#[test]
fn containers_reach_each_other() {
    scenario("container to container", |pm| {
        let name = format!("{}-srv", pm.network);
        let cmd = server(8080, "hello-from-server");
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        pm.run(&["--detach", "--name", &name], &cmd)?.ok()?;
        let ip = pm.inspect(&name)?.1.to_string();
        // The client retries while the server starts listening.
        let script = format!(
            "for i in 1 2 3 4 5 6 7 8 9 10; do nc -w 2 {ip} 8080 && exit 0; sleep 0.5; done; exit 1"
        );
        let out = pm.run(&["--rm"], &["sh", "-c", &script])?.ok()?;
        ensure!(
            out.stdout.contains("hello-from-server"),
            "client got: {out}"
        );
        pm.podman(&["rm", "--force", "--time", "0", &name])?.ok()?;
        pm.ensure_released()
    });
}

#[test]
fn host_port_reaches_container() {
    scenario("-p hostPort:containerPort", |pm| {
        let name = format!("{}-web", pm.network);
        let cmd = server(8080, "hello-via-host-port");
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        pm.run(
            &["--detach", "--name", &name, "--publish", "18082:8080"],
            &cmd,
        )?
        .ok()?;
        let (id, _) = pm.inspect(&name)?;
        let cache = fs::read_to_string(pm.libcni_cache(&id))?;
        ensure!(
            cache.contains(r#""portMappings":[{"hostPort":18082,"containerPort":8080"#),
            "podman did not pass portMappings to our plugin: {cache}"
        );
        // The node's own addresses, loopback included (kubelet-style
        // hostPort semantics), reach the container.
        for addr in [GATEWAY, "127.0.0.1"] {
            let mut reply = String::new();
            ensure!(
                common::eventually(|| {
                    reply = fetch(&pm.node, addr, 18082);
                    reply.contains("hello-via-host-port")
                }),
                "{addr}:18082 from the node namespace: {reply:?}"
            );
        }
        pm.podman(&["rm", "--force", "--time", "0", &name])?.ok()?;
        pm.ensure_released()?;
        let rules = pm
            .node
            .exec(&["nft", "list", "table", "inet", "bosun-cni"])?;
        ensure!(!rules.contains("18082"), "host port left behind: {rules}");
        ensure!(
            fetch(&pm.node, GATEWAY, 18082).is_empty(),
            "host port still answers after rm"
        );
        Ok(())
    });
}
