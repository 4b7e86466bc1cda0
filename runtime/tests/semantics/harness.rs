//! Harness for `semantics.rs`: one private runtime root, bundle and output
//! directory per test, runtime commands with deadlines whose stdout/stderr go
//! to files (never pipes: a created container keeps the runtime's stdio open),
//! and guards that clean up containers, network namespaces, helper processes
//! and host mounts even when the test panics. Host inspection and cleanup
//! (cgroups, mounts, ids, polling) is [`bosun_testsupport::host`], shared
//! with the other runtime tests.

// Not every test uses every helper.
#![allow(dead_code)]

use std::fmt;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bosun_testsupport::host::{self, kill_group, poll, unmount_under};
use bosun_testsupport::{privileged, Bundle};
use serde_json::Value;

/// Deadline for one runtime command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for a polled condition (a status, a file appearing).
pub const POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// Env var naming another runtime to run the same tests with, e.g.
/// `BOSUN_TEST_RUNTIME=/usr/sbin/runc` to check that a test itself is right.
pub const RUNTIME_ENV: &str = "BOSUN_TEST_RUNTIME";

/// The runtime under test: `$BOSUN_TEST_RUNTIME`, else our `bosun-runc`.
pub fn runtime_binary() -> PathBuf {
    match std::env::var_os(RUNTIME_ENV) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_bosun-runc")),
    }
}

/// What a finished runtime command printed and returned.
#[derive(Debug)]
pub struct Out {
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// The file stdout went to; a detached container keeps writing to it.
    pub stdout_path: PathBuf,
}

impl Out {
    /// The exit code, or 128+signal when killed by a signal.
    pub fn code(&self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        self.status
            .code()
            .or_else(|| self.status.signal().map(|s| 128 + s))
            .unwrap_or(-1)
    }

    /// Panics (showing everything) unless the command exited 0.
    #[track_caller]
    pub fn ok(self) -> Out {
        assert_eq!(self.code(), 0, "command failed: {self}");
        self
    }

    /// Panics unless the command exited with `code`.
    #[track_caller]
    pub fn code_is(self, code: i32) -> Out {
        assert_eq!(self.code(), code, "unexpected exit code: {self}");
        self
    }

    /// What the stdout file holds now (a detached container may add to it).
    pub fn stdout_now(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.cmdline, self.status, self.stdout, self.stderr
        )
    }
}

/// One test's private world: runtime root, bundle, outputs, container id.
/// Dropping it force-deletes the container and removes its cgroups.
pub struct Test {
    pub id: String,
    runtime: PathBuf,
    dir: tempfile::TempDir,
    next_output: AtomicU32,
}

impl Test {
    /// `None` (after printing why) when not root, so the test can return.
    pub fn new(name: &str) -> Option<Test> {
        if !privileged::require_root(name) {
            return None;
        }
        let id = host::unique_id(&format!("sem-{name}"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("{id}."))
            .tempdir()
            .expect("create test directory");
        fs::create_dir(dir.path().join("out")).expect("create output directory");
        Some(Test {
            id,
            runtime: runtime_binary(),
            dir,
            next_output: AtomicU32::new(0),
        })
    }

    /// The test's private directory (for host-side files and mounts).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The `--root` state directory.
    pub fn state_root(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A host directory `name` inside the test dir, created empty.
    pub fn host_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        fs::create_dir_all(&dir).expect("create host dir");
        dir
    }

    /// A busybox bundle at `<dir>/bundle` running `args`, in the cgroup
    /// `/<id>` (absolute, so runc and bosun-runc put it in the same place).
    pub fn bundle(&self, args: &[&str]) -> Bundle {
        let mut b = Bundle::busybox(&self.dir.path().join("bundle"), args).expect("make bundle");
        b.set_cgroups_path(&format!("/{}", self.id));
        b
    }

    /// `runtime --root <state> args...`, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.runtime);
        cmd.arg("--root").arg(self.state_root()).args(args);
        cmd
    }

    /// Runs `runtime --root <state> args...` with stdin from /dev/null.
    pub fn rt(&self, args: &[&str]) -> Out {
        self.spawn_wait(self.command(args), COMMAND_TIMEOUT)
    }

    /// Runs any command (stdin /dev/null), stdout/stderr to fresh files,
    /// killing its process group after `timeout`.
    pub fn spawn_wait(&self, cmd: Command, timeout: Duration) -> Out {
        self.spawn(cmd).wait(timeout)
    }

    /// Starts any command (stdin /dev/null) in its own process group,
    /// stdout/stderr to fresh files. Dropping the result kills it.
    pub fn spawn(&self, mut cmd: Command) -> Spawned {
        let n = self.next_output.fetch_add(1, Ordering::Relaxed);
        let stdout_path = self.dir.path().join(format!("out/{n}.stdout"));
        let stderr_path = self.dir.path().join(format!("out/{n}.stderr"));
        let cmdline = render(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("create stdout file"))
            .stderr(File::create(&stderr_path).expect("create stderr file"))
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `{cmdline}`: {e}"));
        Spawned {
            child,
            cmdline,
            stdout_path,
            stderr_path,
            reaped: false,
        }
    }

    /// Writes the bundle and runs it in the foreground (`run`): the
    /// container's output and exit code.
    pub fn run(&self, bundle: &Bundle) -> Out {
        bundle.write().expect("write config.json");
        let dir = bundle.dir().to_string_lossy().into_owned();
        self.rt(&["run", "--bundle", &dir, &self.id])
    }

    /// Writes the bundle and `create`s the container (must succeed). The
    /// container's stdout is the returned `stdout_path`.
    pub fn create(&self, bundle: &Bundle) -> Out {
        bundle.write().expect("write config.json");
        let dir = bundle.dir().to_string_lossy().into_owned();
        self.rt(&["create", "--bundle", &dir, &self.id]).ok()
    }

    /// `state <id>` parsed; panics if the command fails.
    pub fn state(&self) -> Value {
        let out = self.rt(&["state", &self.id]).ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("state is not JSON: {e}\n{out}"))
    }

    /// The container's status word.
    pub fn status(&self) -> String {
        self.state()["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Polls `state` until the status is `want`, at most `timeout`.
    pub fn wait_status(&self, want: &str, timeout: Duration) {
        let mut last = String::new();
        let found = poll(timeout, || {
            last = self.status();
            (last == want).then_some(())
        });
        assert!(
            found.is_some(),
            "container {} did not become {want:?} within {timeout:?} (last {last:?})",
            self.id
        );
    }

    /// `exec <id> args...`, returning its output and exit code.
    pub fn exec(&self, args: &[&str]) -> Out {
        self.exec_with(&[], args)
    }

    /// `exec <options...> <id> args...` (runc takes options before the id;
    /// everything after the id is the command).
    pub fn exec_with(&self, options: &[&str], args: &[&str]) -> Out {
        let mut all = vec!["exec"];
        all.extend_from_slice(options);
        all.push(&self.id);
        all.extend_from_slice(args);
        self.rt(&all)
    }

    /// `exec <id> sh -c script` that must succeed; its stdout.
    #[track_caller]
    pub fn sh(&self, script: &str) -> String {
        self.exec(&["sh", "-c", script]).ok().stdout
    }

    /// Container cgroup directories of this test still present in the
    /// cgroup v1 hierarchies. Panics if the mounts cannot be read, so an
    /// assertion that none are left cannot pass for want of looking.
    pub fn leftover_cgroups(&self) -> Vec<PathBuf> {
        let hierarchies =
            host::cgroup_v1_mounts().unwrap_or_else(|e| panic!("read {}: {e}", host::MOUNTINFO));
        host::existing_cgroup_dirs(&hierarchies, &self.id)
    }
}

/// A command started by [`Test::spawn`].
pub struct Spawned {
    pub child: Child,
    pub cmdline: String,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    reaped: bool,
}

impl Spawned {
    /// Whether it has exited already (then [`Spawned::wait`] returns at once).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// What it has written so far to stdout and stderr.
    pub fn output_so_far(&self) -> String {
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            fs::read_to_string(&self.stdout_path).unwrap_or_default(),
            fs::read_to_string(&self.stderr_path).unwrap_or_default()
        )
    }

    /// Waits for it to exit, at most `timeout`; on timeout kills its process
    /// group and panics showing its output.
    pub fn wait(mut self, timeout: Duration) -> Out {
        let deadline = Instant::now() + timeout;
        // A failing wait counts as a timeout: kill, then show the output.
        let Ok(Some(status)) = host::wait_deadline(&mut self.child, deadline) else {
            kill_group(&mut self.child);
            self.reaped = true;
            panic!(
                "`{}` still running after {timeout:?}; killed it\n{}",
                self.cmdline,
                self.output_so_far()
            );
        };
        self.reaped = true;
        Out {
            cmdline: self.cmdline.clone(),
            status,
            stdout: fs::read_to_string(&self.stdout_path).unwrap_or_default(),
            stderr: fs::read_to_string(&self.stderr_path).unwrap_or_default(),
            stdout_path: self.stdout_path.clone(),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if !self.reaped {
            kill_group(&mut self.child);
        }
    }
}

impl Drop for Test {
    fn drop(&mut self) {
        // Bounded: a hung delete must not hang the whole test run.
        let mut cmd = self.command(&["delete", "--force", &self.id]);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        if let Ok(mut child) = child {
            let deadline = Instant::now() + COMMAND_TIMEOUT;
            if !matches!(host::wait_deadline(&mut child, deadline), Ok(Some(_))) {
                eprintln!("cleanup: delete --force {} timed out", self.id);
                kill_group(&mut child);
            }
        }
        // Not `leftover_cgroups`: no panics in drop.
        let hierarchies = host::cgroup_v1_mounts().unwrap_or_default();
        for dir in host::existing_cgroup_dirs(&hierarchies, &self.id) {
            // Tasks can keep a cgroup busy for a moment after they die.
            if let Err(e) = host::remove_cgroup_tree_within(&dir, Duration::from_secs(2)) {
                eprintln!("cleanup: cannot remove cgroup {}: {e}", dir.display());
            }
        }
        unmount_under(self.dir.path());
    }
}

/// A host helper process (e.g. `unshare ... sleep`) killed on drop.
pub struct HelperProcess(pub Child);

impl Drop for HelperProcess {
    fn drop(&mut self) {
        kill_group(&mut self.0);
    }
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn add(name: &str) -> NetNs {
        let status = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("run ip netns add");
        assert!(status.success(), "ip netns add {name}: {status}");
        NetNs {
            name: name.to_owned(),
        }
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> args...`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let status = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .status()
            .expect("run ip");
        assert!(status.success(), "ip -n {} {args:?}: {status}", self.name);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status()
        {
            Ok(s) if s.success() => {}
            other => eprintln!("cleanup: ip netns delete {}: {other:?}", self.name),
        }
    }
}

/// A host mount made by a test, lazily unmounted on drop.
pub struct HostMount(pub PathBuf);

impl HostMount {
    /// Mounts a fresh tmpfs at `dir` (created if missing).
    pub fn tmpfs(dir: &Path) -> HostMount {
        fs::create_dir_all(dir).expect("create mount point");
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap_or_else(|e| panic!("mount tmpfs at {}: {e}", dir.display()));
        HostMount(dir.to_owned())
    }

    /// Makes this mount shared (a peer group that propagates).
    pub fn make_shared(&self) {
        nix::mount::mount(
            None::<&str>,
            &self.0,
            None::<&str>,
            nix::mount::MsFlags::MS_SHARED,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("make {} shared: {e}", self.0.display()));
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        unmount_under(&self.0);
    }
}

/// Whether the v1 `controller` is mounted (a hierarchy id > 0 in
/// /proc/cgroups and a cgroup mount carrying it).
pub fn v1_controller(controller: &str) -> Option<PathBuf> {
    let cgroups = fs::read_to_string("/proc/cgroups").ok()?;
    let hierarchy = cgroups.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&controller)).then(|| f.get(1).and_then(|h| h.parse::<u32>().ok()))
    })??;
    if hierarchy == 0 {
        return None;
    }
    host::cgroup_v1_mounts().ok()?.into_iter().find(|m| {
        m.file_name()
            .is_some_and(|n| n.to_string_lossy().split(',').any(|c| c == controller))
    })
}

/// A namespace as `readlink /proc/<pid>/ns/<kind>` shows it, `kind:[inode]`,
/// from any file naming it (a /proc ns link or an `ip netns` bind mount).
pub fn ns_id(kind: &str, path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    format!("{kind}:[{}]", meta.ino())
}

/// The command as a shell-like line, for messages.
fn render(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        line.push(' ');
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || "'\"$;&|<>".contains(c)) {
            line.push_str(&format!("'{}'", arg.replace('\'', r"'\''")));
        } else {
            line.push_str(&arg);
        }
    }
    line
}
