//! Shared harness for the real-client tests (`podman.rs`, `containerd.rs`):
//! which runtime binary is under test, client commands with deadlines, a
//! pseudo-terminal for `-t`, polling, and guards that clean up on failure.
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
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

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

/// A name no other test (or earlier run) uses: `bosun-<what>-<pid>-<n><t>`,
/// short enough for unix socket paths and container names.
pub fn unique_id(what: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_micros())
        .unwrap_or_default();
    format!("bosun-{what}-{}-{n}{t:06}", std::process::id())
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
            kill_group(&mut child);
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
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(POLL_INTERVAL);
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
        for mount in cgroup_mounts() {
            let dir = mount.join(&self.name);
            if dir.exists() {
                // Exiting tasks can keep a cgroup busy for a moment.
                let removed = wait_for("cgroup removal", Duration::from_secs(5), || {
                    Ok(remove_cgroup_tree(&dir).ok())
                });
                if let Err(e) = removed {
                    errors.push(format!("{}: {e}", dir.display()));
                }
            }
        }
        if !errors.is_empty() {
            eprintln!("cleanup: cannot remove cgroups: {}", errors.join("; "));
        }
    }
}

/// Unmounts (lazily) everything mounted at or below `dir`, deepest first,
/// so a test directory can be deleted even after a client left mounts.
pub fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape_mountinfo(point)))
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for point in points {
        if let Err(e) = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("cleanup: umount {}: {e}", point.display());
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
    loop {
        if let Some(status) = child.try_wait().context("wait for child")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILLs the process group `child` leads and reaps `child`.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
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

/// Mount points of cgroup (v1) and cgroup2 file systems.
fn cgroup_mounts() -> Vec<PathBuf> {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let fstype = *fields.get(sep + 1)?;
            let point = fields.get(4)?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| PathBuf::from(unescape_mountinfo(point)))
        })
        .collect()
}

/// Removes a cgroup directory and its child cgroups, children first.
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match escape {
            Some(digits) => {
                let code = digits.iter().fold(0u32, |n, d| n * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(code).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
