//! Shared harness for the real-client tests (`podman.rs`, `containerd.rs`):
//! which runtime binary is under test, client commands with deadlines, a
//! pseudo-terminal for `-t`, polling, and guards that clean up on failure.
//! Host inspection and cleanup (cgroups, mounts, ids) is
//! [`bosun_testsupport::host`], shared with the other runtime tests.
//!
//! Every client runs with private state under one temporary directory per
//! test; nothing here touches the host's container stores.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bosun_testsupport::host;

/// Deadline for one client command (a run, an exec, a kill ...).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline for a state we poll for (container stopped, log line seen).
pub const POLL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a cleanup step may take before we give up on it.
pub const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Env var naming the OCI runtime to test instead of our `bosun-runc`,
/// e.g. `/usr/sbin/runc` to check that a test itself is right.
pub const RUNTIME_ENV: &str = "BOSUN_TEST_RUNTIME";
/// Set to `0` to hand clients the runtime itself instead of the tracing
/// wrapper (see [`TracedRuntime`]).
pub const TRACE_ENV: &str = "BOSUN_TEST_TRACE_RUNTIME";

/// A shell loop starting 20 background sleeps, then reporting how many it
/// started. Under a pids limit of 10 the shell's fork fails part way.
pub const FORK_20: &str =
    "i=0; while [ $i -lt 20 ]; do sleep 1000 & i=$((i+1)); done; echo started $i";
/// Prints the container's memory limit: cgroup v1 file, else v2.
pub const PRINT_MEMORY_LIMIT: &str = "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null \
     || cat /sys/fs/cgroup/memory.max";
/// Prints the container's pids limit: cgroup v1 file, else v2.
pub const PRINT_PIDS_LIMIT: &str =
    "cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max";

/// The runtime under test: `$BOSUN_TEST_RUNTIME`, else our `bosun-runc`.
pub fn runtime_binary() -> PathBuf {
    match std::env::var_os(RUNTIME_ENV) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_bosun-runc")),
    }
}

/// The private directory of one test, `$TMPDIR/<id>`. Named by the unique
/// id alone, lowercase: podman derives image names from `oci:` paths.
pub fn test_dir(id: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(id)
        .rand_bytes(0)
        .tempdir()
        .with_context(|| format!("create test directory {id}"))
}

/// What a finished client command printed and returned.
#[derive(Debug)]
pub struct Output {
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The exit code, or -1 when killed by a signal.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// `self` if the command exited 0, else an error showing all of it.
    pub fn ok(self) -> Result<Output> {
        if self.status.success() {
            Ok(self)
        } else {
            bail!("command failed: {self}")
        }
    }

    /// Both streams, for checks that do not care which one a line went to.
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.cmdline, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` with stdin from /dev/null, capturing its output, and kills its
/// whole process group if it takes longer than `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let cmdline = render(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawn `{cmdline}`"))?;
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = match wait_deadline(&mut child, deadline)? {
        Some(status) => status,
        None => {
            host::kill_group(&mut child);
            let out = finish(stdout, stderr);
            bail!(
                "`{cmdline}` still running after {timeout:?}; killed it\n\
                 --- stdout ---\n{}--- stderr ---\n{}",
                out.0,
                out.1
            );
        }
    };
    let (stdout, stderr) = finish(stdout, stderr);
    Ok(Output {
        cmdline,
        status,
        stdout,
        stderr,
    })
}

/// Wraps `program args...` so it runs on the slave side of a fresh
/// pseudo-terminal (util-linux `script`), as a user's `-t` would need.
/// Output then has `\r\n` line ends; `script -e` passes the exit code on.
pub fn in_pty(program: &Path, args: &[String]) -> Command {
    let mut line = shell_quote(&program.to_string_lossy());
    for arg in args {
        line.push(' ');
        line.push_str(&shell_quote(arg));
    }
    let mut cmd = Command::new("script");
    cmd.args(["--quiet", "--return", "--command"])
        .arg(line)
        .arg("/dev/null");
    cmd
}

/// Calls `probe` until it returns `Some`, at most `timeout` long.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    // An error from `probe` ends the wait at once.
    match host::poll_every(POLL_INTERVAL, timeout, || probe().transpose()) {
        Some(result) => result,
        None => bail!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Fails unless `haystack` contains `needle`, showing both.
pub fn ensure_contains(haystack: &str, needle: &str, what: &str) -> Result<()> {
    if haystack.contains(needle) {
        Ok(())
    } else {
        bail!("{what}: expected {needle:?} in:\n{haystack}")
    }
}

/// The runtime binary clients are given. Unless `BOSUN_TEST_TRACE_RUNTIME=0`
/// it is a two-line shell wrapper, named like the runtime (podman picks
/// behaviour by that name), that appends its argv to a trace file and then
/// `exec`s the runtime: same pid, fds and environment, so clients see no
/// difference, and a failing test can show exactly how it was called.
#[derive(Debug)]
pub struct TracedRuntime {
    /// What to pass to the client (`--runtime`, `--runc-binary`).
    pub path: PathBuf,
    /// The runtime that really runs.
    pub real: PathBuf,
    trace: Option<PathBuf>,
}

impl TracedRuntime {
    /// Sets up the runtime under test for a client, inside `dir`.
    pub fn new(dir: &Path) -> Result<TracedRuntime> {
        let real = runtime_binary();
        if !real.is_file() {
            bail!(
                "runtime under test {} does not exist (set {RUNTIME_ENV})",
                real.display()
            );
        }
        if std::env::var(TRACE_ENV).is_ok_and(|v| v == "0") {
            return Ok(TracedRuntime {
                path: real.clone(),
                real,
                trace: None,
            });
        }
        let name = real.file_name().context("runtime path has no file name")?;
        let bin = dir.join("runtime-bin");
        fs::create_dir_all(&bin).with_context(|| format!("create {}", bin.display()))?;
        let path = bin.join(name);
        let trace = dir.join("runtime-calls.log");
        let script = format!(
            "#!/bin/sh\n\
             {{ printf '%s' \"$$\"; for a in \"$@\"; do printf ' %s' \"$a\"; done; echo; }} >> {}\n\
             exec {} \"$@\"\n",
            shell_quote(&trace.to_string_lossy()),
            shell_quote(&real.to_string_lossy()),
        );
        fs::write(&path, script).with_context(|| format!("write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", path.display()))?;
        Ok(TracedRuntime {
            path,
            real,
            trace: Some(trace),
        })
    }

    /// Every runtime call so far, one `pid argv...` line each.
    pub fn calls(&self) -> String {
        match &self.trace {
            Some(trace) => fs::read_to_string(trace).unwrap_or_default(),
            None => format!("(tracing off: {TRACE_ENV}=0)\n"),
        }
    }
}

/// A cgroup parent (`/bosun-...`) for one test's containers. Dropping it
/// removes that directory tree from every mounted cgroup hierarchy.
#[derive(Debug)]
pub struct CgroupParent {
    name: String,
}

impl CgroupParent {
    pub fn new(id: &str) -> CgroupParent {
        CgroupParent {
            name: id.to_owned(),
        }
    }

    /// The absolute cgroup path, as podman's `--cgroup-parent` or a spec's
    /// `cgroupsPath` prefix wants it.
    pub fn path(&self) -> String {
        format!("/{}", self.name)
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let mut errors = Vec::new();
        let hierarchies = host::cgroup_mounts().unwrap_or_else(|e| {
            errors.push(format!("list cgroup mounts: {e}"));
            Vec::new()
        });
        for dir in host::existing_cgroup_dirs(&hierarchies, &self.name) {
            // Exiting tasks can keep a cgroup busy for a moment.
            if let Err(e) = host::remove_cgroup_tree_within(&dir, Duration::from_secs(5)) {
                errors.push(format!("{}: {e}", dir.display()));
            }
        }
        if !errors.is_empty() {
            eprintln!("cleanup: cannot remove cgroups: {}", errors.join("; "));
        }
    }
}

/// Prints what a failed scenario needs for diagnosis, then panics with the
/// error chain.
pub fn check(result: Result<()>, diagnostics: impl FnOnce() -> String) {
    if let Err(e) = result {
        panic!("{e:?}\n\n===== diagnostics =====\n{}", diagnostics());
    }
}

/// Appends a titled section to a diagnostics text.
pub fn section(out: &mut String, title: &str, body: &str) {
    let _ = writeln!(out, "----- {title} -----\n{}", body.trim_end());
}

/// The last `lines` lines of a file, or why it could not be read.
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Waits for `child` until `deadline`; `None` if it is still running then.
pub fn wait_deadline(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    host::wait_deadline(child, deadline).context("wait for child")
}

/// Reads a pipe to its end on a thread; the receiver gets the text.
fn collect(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

/// The collected stdout and stderr. A daemon the command left behind may
/// still hold a pipe open: give up on it after a few seconds.
fn finish(stdout: mpsc::Receiver<String>, stderr: mpsc::Receiver<String>) -> (String, String) {
    let grace = Duration::from_secs(5);
    let get = |rx: mpsc::Receiver<String>| {
        rx.recv_timeout(grace)
            .unwrap_or_else(|_| "(output still held open by a leftover process)\n".to_owned())
    };
    (get(stdout), get(stderr))
}

/// The command as a shell line, for messages.
fn render(cmd: &Command) -> String {
    let mut line = shell_quote(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&shell_quote(&arg.to_string_lossy()));
    }
    line
}

/// `s` quoted for sh when it needs it.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
