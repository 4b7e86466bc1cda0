//! Podman (Debian's 4.3, with conmon) driving the runtime under test:
//! run, exit codes, detached + exec + kill + rm, stop, ps, logs, a tty,
//! and memory / pids limits.
//!
//! Needs root. The runtime is `bosun-runc`, or `$BOSUN_TEST_RUNTIME` (e.g.
//! `/usr/sbin/runc`, which every test here must pass with too).
//!
//! Each test gets its own podman: private `--root`, `--runroot`, `--tmpdir`,
//! `CONTAINERS_CONF`, registries and storage config, runtime state dir
//! (`--runtime-flag root=`) and cgroup parent, all removed at the end even
//! when the test fails. The image is built locally (busybox) as an OCI
//! layout and pulled with podman's `oci:` transport: no network.
//!
//! Known podman 4.3 side effects outside the private dirs: pulling creates
//! the blob-info cache `/var/lib/containers/cache` (not configurable here),
//! and the exit command conmon runs after a `--rm` container
//! (`podman container cleanup`) drops `--runtime-flag`, so it calls
//! `<runtime> delete --force <id>` against the runtime's default root.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use bosun_testsupport::{host, layout, privileged, rootfs};

use common::{
    check, ensure_contains, in_pty, run, section, tail, wait_for, CgroupParent, Output,
    TracedRuntime, COMMAND_TIMEOUT, FORK_20, POLL_TIMEOUT, PRINT_MEMORY_LIMIT, PRINT_PIDS_LIMIT,
};

const PODMAN: &str = "podman";
const IMAGE_REF: &str = "localhost/bosun-busybox:latest";

/// One private podman installation for one test.
struct Podman {
    id: String,
    runtime: TracedRuntime,
    /// Image ID of the busybox image in this podman's store.
    image: String,
    cgroup: CgroupParent,
    /// Declared last: dropped (deleted) after everything above.
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Result<Podman> {
        let id = host::unique_id("bosun-pm");
        let dir = common::test_dir(&id)?;
        let runtime = TracedRuntime::new(dir.path())?;
        let mut podman = Podman {
            cgroup: CgroupParent::new(&id),
            id,
            runtime,
            image: String::new(),
            dir,
        };
        podman.write_config()?;
        podman.image = podman.pull_busybox()?;
        Ok(podman)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Config files that keep podman away from the host's: CONTAINERS_CONF
    /// replaces (not extends) containers.conf, the registries list is empty
    /// so no short name ever goes to the network.
    fn write_config(&self) -> Result<()> {
        let runtime_name = self
            .runtime
            .real
            .file_name()
            .context("runtime has no file name")?
            .to_string_lossy()
            .into_owned();
        // runtime_supports_json: podman passes `--log-format=json --log FILE`
        // only to runtimes named here (default: crun, runc, kata, runsc,
        // youki, krun); list ours so it gets the same flags as runc.
        let containers_conf = format!(
            "[engine]\n\
             cgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\n\
             runtime_supports_json = [\"crun\", \"runc\", \"{runtime_name}\"]\n\
             [network]\n\
             network_backend = \"cni\"\n\
             network_config_dir = \"{}\"\n",
            self.path("cni").display()
        );
        let storage_conf = format!(
            "[storage]\n\
             driver = \"vfs\"\n\
             graphroot = \"{}\"\n\
             runroot = \"{}\"\n",
            self.path("root").display(),
            self.path("runroot").display()
        );
        let files = [
            ("containers.conf", containers_conf),
            ("storage.conf", storage_conf),
            (
                "registries.conf",
                "unqualified-search-registries = []\nshort-name-mode = \"enforcing\"\n".to_owned(),
            ),
        ];
        for (name, text) in files {
            fs::write(self.path(name), text).with_context(|| format!("write {name}"))?;
        }
        fs::create_dir_all(self.path("cni")).context("create cni dir")?;
        Ok(())
    }

    /// Builds the busybox OCI layout and pulls it: returns the image ID.
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

    /// Global flags, before the podman subcommand.
    fn global_args(&self) -> Vec<String> {
        let dir = |name: &str| self.path(name).to_string_lossy().into_owned();
        let mut args: Vec<String> = vec![
            "--root".into(),
            dir("root"),
            "--runroot".into(),
            dir("runroot"),
            "--tmpdir".into(),
            dir("tmp"),
            "--storage-driver".into(),
            "vfs".into(),
            "--cgroup-manager".into(),
            "cgroupfs".into(),
            "--events-backend".into(),
            "file".into(),
            "--runtime".into(),
            self.runtime.path.to_string_lossy().into_owned(),
            // Passed to the runtime as `--root=DIR`: its state stays private.
            "--runtime-flag".into(),
            format!("root={}", dir("runtime-root")),
        ];
        if std::env::var_os("BOSUN_TEST_PODMAN_DEBUG").is_some() {
            // Shows the runtime argv too, but costs ~20 s per container:
            // conmon waits for a syslog that is not there.
            args.extend(["--log-level".into(), "debug".into()]);
        }
        args
    }

    fn envs(&self) -> [(&'static str, PathBuf); 3] {
        [
            ("CONTAINERS_CONF", self.path("containers.conf")),
            ("CONTAINERS_STORAGE_CONF", self.path("storage.conf")),
            ("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf")),
        ]
    }

    /// Flags for every `podman run` here: no network (no CNI needed), this
    /// test's cgroup parent, and rlimits within the hard limit (this root
    /// lacks CAP_SYS_RESOURCE; podman would otherwise ask for 1048576).
    fn run_args(&self) -> Vec<String> {
        [
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--cgroup-parent",
            &self.cgroup.path(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(PODMAN);
        cmd.envs(self.envs()).args(self.global_args());
        cmd
    }

    /// `podman <args>`, whatever its exit code.
    fn podman(&self, args: &[&str]) -> Result<Output> {
        run(self.command().args(args), COMMAND_TIMEOUT)
    }

    /// `podman run --rm [extra] IMAGE cmd...`, whatever its exit code.
    fn run_rm(&self, extra: &[&str], cmd: &[&str]) -> Result<Output> {
        let mut command = self.command();
        command
            .args(["run", "--rm"])
            .args(self.run_args())
            .args(extra)
            .arg(&self.image)
            .args(cmd);
        run(&mut command, COMMAND_TIMEOUT)
    }

    /// `podman run -d --name NAME IMAGE cmd...`.
    fn run_detached(&self, name: &str, cmd: &[&str]) -> Result<()> {
        let mut command = self.command();
        command
            .args(["run", "--detach", "--name", name])
            .args(self.run_args())
            .arg(&self.image)
            .args(cmd);
        run(&mut command, COMMAND_TIMEOUT)?.ok()?;
        Ok(())
    }

    /// A container name unique to this test.
    fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.id)
    }

    /// `podman ps -a` lines (`name status`) for containers named `name`.
    fn ps(&self, name: &str) -> Result<String> {
        let filter = format!("name=^{name}$");
        let out = self
            .podman(&[
                "ps",
                "--all",
                "--filter",
                &filter,
                "--format",
                "{{.Names}} {{.Status}}",
            ])?
            .ok()?;
        Ok(out.stdout)
    }

    fn diagnostics(&self) -> String {
        let mut out = String::new();
        section(
            &mut out,
            &format!("runtime calls ({})", self.runtime.real.display()),
            &self.runtime.calls(),
        );
        // The runtime's own error log (`--log`, JSON) of each container.
        for log in find_files(self.dir.path(), "oci-log") {
            section(&mut out, &log.display().to_string(), &tail(&log, 20));
        }
        match self.podman(&["ps", "--all"]) {
            Ok(ps) => section(&mut out, "podman ps --all", &ps.combined()),
            Err(e) => section(&mut out, "podman ps --all", &format!("{e:?}")),
        }
        out
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        match self.podman(&["rm", "--all", "--force", "--time", "0"]) {
            Ok(out) if !out.status.success() => eprintln!("cleanup: {out}"),
            Err(e) => eprintln!("cleanup: {e:?}"),
            Ok(_) => {}
        }
        delete_runtime_state(&self.runtime.real, &self.path("runtime-root"));
        host::unmount_under(self.dir.path());
    }
}

/// Deletes containers the runtime still has state for in `root` (e.g. the
/// `--rm` ones whose cleanup went to the default root, see the top).
fn delete_runtime_state(runtime: &Path, root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let mut cmd = Command::new(runtime);
        cmd.arg("--root")
            .arg(root)
            .args(["delete", "--force"])
            .arg(entry.file_name());
        if let Err(e) = run(&mut cmd, common::CLEANUP_TIMEOUT) {
            eprintln!("cleanup: {e:?}");
        }
    }
}

/// Files named `name` below `dir`.
fn find_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_file() && entry.file_name() == name => found.push(path),
                _ => {}
            }
        }
    }
    found
}

/// Runs `body` against a fresh private podman; on failure prints the
/// runtime calls and logs. Skips (or fails in CI) without root.
fn scenario(what: &str, body: impl FnOnce(&Podman) -> Result<()>) {
    if !privileged::require_root(&format!("podman: {what}")) {
        return;
    }
    let podman = Podman::new().context("set up a private podman").unwrap();
    check(body(&podman), || podman.diagnostics());
}

#[test]
fn run_reports_exit_code_and_output() {
    scenario("run reports the exit code", |pm| {
        let out = pm.run_rm(&[], &["sh", "-c", "echo out; echo err >&2; exit 7"])?;
        ensure!(out.code() == 7, "podman run must exit 7: {out}");
        ensure!(out.stdout == "out\n", "container stdout: {out}");
        ensure_contains(&out.stderr, "err", "container stderr")?;
        Ok(())
    });
}

#[test]
fn failed_start_maps_to_127_and_126() {
    // Podman picks docker's exit codes by matching the runtime's error text
    // ("not found" → 127, "permission denied" → 126): the runtime's create
    // errors must say what went wrong in words podman knows.
    scenario("run of a missing / non-executable command", |pm| {
        let missing = pm.run_rm(&[], &["/nonexistent"])?;
        ensure!(missing.code() == 127, "missing command: {missing}");
        let not_executable = pm.run_rm(&[], &["/etc/passwd"])?;
        ensure!(
            not_executable.code() == 126,
            "non-executable command: {not_executable}"
        );
        Ok(())
    });
}

#[test]
fn detached_exec_kill_rm() {
    scenario("detached + exec + kill + rm", |pm| {
        let name = pm.name("sleeper");
        pm.run_detached(&name, &["sleep", "1000"])?;
        let ps = pm.ps(&name)?;
        ensure_contains(
            &ps,
            &format!("{name} Up"),
            "podman ps of a running container",
        )?;

        let exec = pm.podman(&["exec", &name, "echo", "hi"])?.ok()?;
        ensure!(exec.stdout == "hi\n", "podman exec output: {exec}");
        let exec = pm.podman(&["exec", &name, "sh", "-c", "exit 3"])?;
        ensure!(exec.code() == 3, "podman exec must report exit 3: {exec}");

        pm.podman(&["kill", &name])?.ok()?;
        let wait = pm.podman(&["wait", &name])?.ok()?;
        ensure!(
            wait.stdout.trim() == "137",
            "exit code after SIGKILL: {wait}"
        );
        let ps = pm.ps(&name)?;
        ensure_contains(&ps, &format!("{name} Exited (137)"), "podman ps after kill")?;

        pm.podman(&["rm", &name])?.ok()?;
        let ps = pm.ps(&name)?;
        ensure!(
            ps.trim().is_empty(),
            "container still listed after rm: {ps}"
        );
        Ok(())
    });
}

#[test]
fn stop_sends_sigterm_and_logs_show_output() {
    scenario("stop + logs", |pm| {
        let name = pm.name("trapper");
        // pid 1 ignores SIGTERM unless it handles it: this shell does.
        let script = "echo ready; trap 'echo got-term; exit 0' TERM; sleep 1000 & wait";
        pm.run_detached(&name, &["sh", "-c", script])?;
        wait_for("\"ready\" in podman logs", POLL_TIMEOUT, || {
            let logs = pm.podman(&["logs", &name])?.ok()?;
            Ok(logs.stdout.contains("ready").then_some(()))
        })?;

        pm.podman(&["stop", "--time", "20", &name])?.ok()?;
        let code = pm
            .podman(&["inspect", "--format", "{{.State.ExitCode}}", &name])?
            .ok()?;
        ensure!(
            code.stdout.trim() == "0",
            "the trap must have exited 0 (137 means SIGTERM never arrived): {code}"
        );
        let logs = pm.podman(&["logs", &name])?.ok()?;
        ensure!(
            logs.stdout == "ready\ngot-term\n",
            "podman logs after stop: {logs}"
        );
        pm.podman(&["rm", &name])?.ok()?;
        Ok(())
    });
}

#[test]
fn tty_gets_a_pseudo_terminal() {
    scenario("run -t", |pm| {
        let mut args = pm.global_args();
        args.extend(["run", "--rm", "--tty"].map(str::to_owned));
        args.extend(pm.run_args());
        args.push(pm.image.clone());
        args.extend(["sh", "-c", "tty; exit 5"].map(str::to_owned));
        let mut cmd = in_pty(Path::new(PODMAN), &args);
        cmd.envs(pm.envs());
        let out = run(&mut cmd, COMMAND_TIMEOUT)?;
        ensure!(out.code() == 5, "podman run -t must exit 5: {out}");
        ensure_contains(&out.stdout, "/dev/pts/0", "tty inside the container")?;
        Ok(())
    });
}

#[test]
fn memory_limit_is_visible_inside() {
    scenario("run --memory", |pm| {
        let out = pm
            .run_rm(&["--memory", "64m"], &["sh", "-c", PRINT_MEMORY_LIMIT])?
            .ok()?;
        ensure!(
            out.stdout.trim() == "67108864",
            "memory limit inside: {out}"
        );
        Ok(())
    });
}

#[test]
fn pids_limit_is_enforced() {
    scenario("run --pids-limit", |pm| {
        let script = format!("{PRINT_PIDS_LIMIT}; {FORK_20}");
        let limited = pm.run_rm(&["--pids-limit", "10"], &["sh", "-c", &script])?;
        ensure!(
            limited.stdout.starts_with("10\n"),
            "pids limit inside: {limited}"
        );
        ensure!(
            !limited.status.success() && !limited.stdout.contains("started 20"),
            "20 processes must not fit under a limit of 10: {limited}"
        );
        ensure_contains(&limited.stderr, "can't fork", "shell error at the limit")?;

        // The same loop fits under a roomier limit: the failure above was
        // the limit, not the loop.
        let roomy = pm
            .run_rm(&["--pids-limit", "100"], &["sh", "-c", &script])?
            .ok()?;
        ensure!(
            roomy.stdout == "100\nstarted 20\n",
            "pids limit 100: {roomy}"
        );
        Ok(())
    });
}
