//! containerd (Debian's 1.6, `ctr` + containerd-shim-runc-v2) driving the
//! runtime under test through `ctr run --runc-binary`: exit codes, detached
//! + exec + kill + delete, a tty, and memory / pids limits.
//!
//! Needs root. The runtime is `bosun-runc`, or `$BOSUN_TEST_RUNTIME` (e.g.
//! `/usr/sbin/runc`, which every test here must pass with too).
//!
//! Each test starts its own containerd: private config, root, state, socket,
//! runtime root (`--runc-root`), FIFO dir and cgroup parent; CRI and other
//! unneeded plugins off. A guard deletes tasks and containers, stops the
//! daemon and removes everything, also when the test fails. The image is
//! built locally (busybox) as an OCI layout and `ctr images import`ed.
//!
//! Known containerd 1.6 side effect outside the private dirs: the shim's
//! socket lives in `/run/containerd/s/<hash>` (hard-coded; the hash covers
//! our socket path, so it cannot collide with a system containerd's).

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bosun_testsupport::{host, layout, privileged, rootfs, Bundle};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::{
    check, ensure_contains, in_pty, run, section, tail, wait_deadline, wait_for, CgroupParent,
    Output, TracedRuntime, CLEANUP_TIMEOUT, COMMAND_TIMEOUT, FORK_20, POLL_TIMEOUT,
    PRINT_MEMORY_LIMIT, PRINT_PIDS_LIMIT,
};

const CONTAINERD: &str = "containerd";
const CTR: &str = "ctr";
const NAMESPACE: &str = "bosun";
const IMAGE_BASE: &str = "bosun.test/busybox";
const IMAGE_REF: &str = "bosun.test/busybox:latest";
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Plugins a `ctr run` does not need. `opt` would create /opt/containerd;
/// CRI would start its own machinery and want CNI.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
];

/// ctr's default spec has no /sys/fs/cgroup mount (docker and CRI add one);
/// this is the one `runc spec` has, so limits can be read inside.
const CGROUP_MOUNT: &str =
    "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:noexec:nodev:relatime";

/// One private containerd daemon for one test.
struct Containerd {
    id: String,
    runtime: TracedRuntime,
    daemon: Child,
    cgroup: CgroupParent,
    /// Declared last: dropped (deleted) after everything above.
    dir: tempfile::TempDir,
}

impl Containerd {
    /// Starts containerd, waits until it answers, imports the busybox image.
    fn start() -> Result<Containerd> {
        let id = host::unique_id("bosun-ctd");
        let dir = common::test_dir(&id)?;
        let runtime = TracedRuntime::new(dir.path())?;
        let config = dir.path().join("config.toml");
        fs::write(&config, config_toml(dir.path())).context("write containerd config")?;
        let log = File::create(dir.path().join("containerd.log")).context("create log")?;
        let daemon = Command::new(CONTAINERD)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup log")?)
            .stderr(log)
            .spawn()
            .context("start containerd")?;
        let mut containerd = Containerd {
            cgroup: CgroupParent::new(&id),
            id,
            runtime,
            daemon,
            dir,
        };
        containerd.wait_ready()?;
        containerd.import_busybox()?;
        Ok(containerd)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.daemon.try_wait().context("wait for containerd")? {
                bail!(
                    "containerd exited with {status}:\n{}",
                    tail(&self.path("containerd.log"), 30)
                );
            }
            let probe = run(self.ctr().arg("version"), Duration::from_secs(5));
            if probe.is_ok_and(|out| out.status.success()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd not answering after {START_TIMEOUT:?}:\n{}",
                    tail(&self.path("containerd.log"), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Busybox rootfs → OCI layout → tar → `ctr images import`.
    fn import_busybox(&self) -> Result<()> {
        let rootfs = self.path("image-rootfs");
        rootfs::busybox(&rootfs)?;
        let layout = self.path("image-layout");
        layout::write(&layout, IMAGE_REF, &rootfs)?;
        let tar = self.path("image.tar");
        let mut pack = Command::new("tar");
        pack.arg("-C").arg(&layout).arg("-cf").arg(&tar).arg(".");
        run(&mut pack, COMMAND_TIMEOUT)?.ok()?;
        // The layout's index names the image by tag only ("latest");
        // --base-name gives it the repository.
        self.ctr_ok(&[
            "images",
            "import",
            "--base-name",
            IMAGE_BASE,
            &path_str(&tar),
        ])?;
        let images = self.ctr_ok(&["images", "ls", "--quiet"])?;
        ensure!(
            images.stdout.lines().any(|l| l == IMAGE_REF),
            "imported image not listed as {IMAGE_REF}: {images}"
        );
        Ok(())
    }

    /// `ctr --address SOCK --namespace NS`.
    fn ctr(&self) -> Command {
        let mut cmd = Command::new(CTR);
        cmd.arg("--address")
            .arg(self.path("containerd.sock"))
            .args(["--namespace", NAMESPACE]);
        cmd
    }

    /// `ctr <args>`, whatever its exit code.
    fn ctr_run(&self, args: &[&str]) -> Result<Output> {
        run(self.ctr().args(args), COMMAND_TIMEOUT)
    }

    /// `ctr <args>`, which must succeed.
    fn ctr_ok(&self, args: &[&str]) -> Result<Output> {
        self.ctr_run(args)?.ok()
    }

    /// Flags for every `ctr run` here: the runtime, and its state root kept
    /// private (the shim appends the namespace: `<root>/bosun/<id>`).
    fn runtime_args(&self) -> Vec<String> {
        vec![
            "--runc-binary".into(),
            path_str(&self.runtime.path),
            "--runc-root".into(),
            path_str(&self.path("runc-root")),
        ]
    }

    /// Where ctr makes the stdio FIFOs (default /run/containerd/fifo).
    fn fifo_args(&self) -> [String; 2] {
        ["--fifo-dir".into(), path_str(&self.path("fifo"))]
    }

    /// The argv after `ctr ...` for `run [flags] IMAGE ID cmd...`.
    fn run_argv(&self, flags: &[&str], container: &str, cmd: &[&str]) -> Vec<String> {
        let mut argv = vec!["run".to_owned()];
        argv.extend(self.runtime_args());
        argv.extend(self.fifo_args());
        argv.push("--cgroup".into());
        argv.push(format!("{}/{container}", self.cgroup.path()));
        argv.extend(flags.iter().map(|s| (*s).to_owned()));
        argv.push(IMAGE_REF.into());
        argv.push(container.into());
        argv.extend(cmd.iter().map(|s| (*s).to_owned()));
        argv
    }

    /// `ctr run [flags] IMAGE ID cmd...`, whatever its exit code.
    fn run_container(&self, flags: &[&str], container: &str, cmd: &[&str]) -> Result<Output> {
        run(
            self.ctr().args(self.run_argv(flags, container, cmd)),
            COMMAND_TIMEOUT,
        )
    }

    /// `ctr task exec --exec-id EXEC ID cmd...`, whatever its exit code.
    fn exec(&self, container: &str, exec_id: &str, cmd: &[&str]) -> Result<Output> {
        let mut command = self.ctr();
        command
            .args(["task", "exec", "--exec-id", exec_id])
            .args(self.fifo_args())
            .arg(container)
            .args(cmd);
        run(&mut command, COMMAND_TIMEOUT)
    }

    /// A container id unique to this test.
    fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.id)
    }

    /// The STATUS column of `ctr task ls` for `container`, if listed.
    fn task_status(&self, container: &str) -> Result<Option<String>> {
        let tasks = self.ctr_ok(&["task", "ls"])?;
        Ok(tasks.stdout.lines().find_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.first() == Some(&container)).then(|| cols.last().unwrap().to_string())
        }))
    }

    fn diagnostics(&self) -> String {
        let mut out = String::new();
        section(
            &mut out,
            &format!("runtime calls ({})", self.runtime.real.display()),
            &self.runtime.calls(),
        );
        match self.ctr_run(&["task", "ls"]) {
            Ok(tasks) => section(&mut out, "ctr task ls", &tasks.combined()),
            Err(e) => section(&mut out, "ctr task ls", &format!("{e:?}")),
        }
        // Debug level: includes what the shim logged and the runtime's
        // `--log` (log.json) error lines the shim forwarded.
        section(
            &mut out,
            "containerd.log (tail)",
            &tail(&self.path("containerd.log"), 60),
        );
        out
    }

    /// Deletes every task and container, then stops the daemon.
    fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut note = |what: &str, result: Result<Output>| match result {
            Ok(out) if !out.status.success() => errors.push(format!("{what}: {out}")),
            Err(e) => errors.push(format!("{what}: {e:?}")),
            Ok(_) => {}
        };
        let list = |args: &[&str]| -> Vec<String> {
            self.ctr_run(args)
                .map(|out| out.stdout.lines().map(str::to_owned).collect())
                .unwrap_or_default()
        };
        for task in list(&["task", "ls", "--quiet"]) {
            let mut delete = self.ctr();
            delete.args(["task", "delete", "--force", &task]);
            note("ctr task delete --force", run(&mut delete, CLEANUP_TIMEOUT));
        }
        for container in list(&["containers", "ls", "--quiet"]) {
            let mut delete = self.ctr();
            delete.args(["containers", "delete", &container]);
            note("ctr containers delete", run(&mut delete, CLEANUP_TIMEOUT));
        }
        if let Err(e) = stop_daemon(&mut self.daemon) {
            errors.push(format!("stop containerd: {e:?}"));
        }
        errors
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for error in self.teardown() {
            eprintln!("cleanup: {error}");
        }
        // State a crashed or killed shim left behind.
        let root = self.path("runc-root").join(NAMESPACE);
        if let Ok(entries) = fs::read_dir(&root) {
            for entry in entries.flatten() {
                let mut delete = Command::new(&self.runtime.real);
                delete
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "--force"])
                    .arg(entry.file_name());
                if let Err(e) = run(&mut delete, CLEANUP_TIMEOUT) {
                    eprintln!("cleanup: {e:?}");
                }
            }
        }
        host::unmount_under(self.dir.path());
    }
}

/// SIGTERM, then SIGKILL if containerd has not exited within 10 s.
fn stop_daemon(daemon: &mut Child) -> Result<()> {
    if daemon.try_wait()?.is_some() {
        return Ok(());
    }
    let pid = Pid::from_raw(i32::try_from(daemon.id())?);
    kill(pid, Signal::SIGTERM).context("SIGTERM containerd")?;
    if wait_deadline(daemon, Instant::now() + Duration::from_secs(10))?.is_none() {
        daemon.kill().context("SIGKILL containerd")?;
        daemon.wait().context("reap containerd")?;
        bail!("containerd ignored SIGTERM for 10 s; killed it");
    }
    Ok(())
}

fn config_toml(dir: &Path) -> String {
    let disabled: Vec<String> = DISABLED_PLUGINS.iter().map(|p| format!("{p:?}")).collect();
    format!(
        "version = 2\n\
         root = \"{root}\"\n\
         state = \"{state}\"\n\
         disabled_plugins = [{disabled}]\n\
         [grpc]\n  address = \"{sock}\"\n\
         [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
         [debug]\n  level = \"debug\"\n",
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = dir.join("containerd.sock").display(),
        disabled = disabled.join(", "),
    )
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Runs `body` against a fresh private containerd; on failure prints the
/// runtime calls and the daemon log. Skips (or fails in CI) without root.
fn scenario(what: &str, body: impl FnOnce(&Containerd) -> Result<()>) {
    if !privileged::require_root(&format!("containerd: {what}")) {
        return;
    }
    let containerd = Containerd::start()
        .context("start a private containerd")
        .unwrap();
    check(body(&containerd), || containerd.diagnostics());
}

#[test]
fn run_reports_exit_code_and_output() {
    scenario("run reports the exit code", |ctd| {
        let id = ctd.name("exit");
        let out = ctd.run_container(&["--rm"], &id, &["sh", "-c", "echo out; exit 7"])?;
        ensure!(out.code() == 7, "ctr run must exit 7: {out}");
        ensure!(out.stdout == "out\n", "container stdout: {out}");
        Ok(())
    });
}

#[test]
fn detached_exec_kill_delete() {
    scenario("detached + exec + kill + delete", |ctd| {
        let id = ctd.name("sleeper");
        ctd.run_container(&["--detach"], &id, &["sleep", "1000"])?
            .ok()?;
        ensure!(
            ctd.task_status(&id)?.as_deref() == Some("RUNNING"),
            "task not RUNNING after ctr run -d"
        );

        let exec = ctd.exec(&id, "e1", &["echo", "hi"])?.ok()?;
        ensure!(exec.stdout == "hi\n", "ctr task exec output: {exec}");
        let exec = ctd.exec(&id, "e2", &["sh", "-c", "exit 3"])?;
        ensure!(exec.code() == 3, "ctr task exec must report exit 3: {exec}");
        let ps = ctd.ctr_ok(&["task", "ps", &id])?;
        ensure!(
            ps.stdout.lines().count() >= 2,
            "ctr task ps lists no process: {ps}"
        );

        ctd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", &id])?;
        wait_for("task STOPPED after SIGKILL", POLL_TIMEOUT, || {
            Ok((ctd.task_status(&id)?.as_deref() == Some("STOPPED")).then_some(()))
        })?;
        let deleted = ctd.ctr_ok(&["task", "delete", &id])?;
        // ctr warns about a non-zero exit: the status made it through.
        ensure_contains(&deleted.combined(), "137", "ctr task delete after SIGKILL")?;
        ctd.ctr_ok(&["containers", "delete", &id])?;
        let containers = ctd.ctr_ok(&["containers", "ls", "--quiet"])?;
        ensure!(
            !containers.stdout.contains(&id),
            "container still listed: {containers}"
        );
        Ok(())
    });
}

#[test]
fn tty_gets_a_pseudo_terminal() {
    scenario("run -t", |ctd| {
        let id = ctd.name("tty");
        let mut args: Vec<String> = ctd
            .ctr()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        args.extend(ctd.run_argv(&["--rm", "--tty"], &id, &["sh", "-c", "tty; exit 5"]));
        let out = run(&mut in_pty(Path::new(CTR), &args), COMMAND_TIMEOUT)?;
        ensure!(out.code() == 5, "ctr run -t must exit 5: {out}");
        ensure_contains(&out.stdout, "/dev/pts/0", "tty inside the container")?;
        Ok(())
    });
}

#[test]
fn memory_limit_is_visible_inside() {
    scenario("run --memory-limit", |ctd| {
        let id = ctd.name("mem");
        let flags = [
            "--rm",
            "--memory-limit",
            "67108864",
            "--mount",
            CGROUP_MOUNT,
        ];
        let out = ctd
            .run_container(&flags, &id, &["sh", "-c", PRINT_MEMORY_LIMIT])?
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
    // ctr has no pids flag: give it a whole spec (`--config`, which then
    // takes only the container id; root and args come from the spec).
    scenario("run --config with linux.resources.pids", |ctd| {
        let script = format!("{PRINT_PIDS_LIMIT}; {FORK_20}");
        let run_with_limit = |limit: i64| -> Result<Output> {
            let id = ctd.name(&format!("pids{limit}"));
            let mut bundle = Bundle::busybox(&ctd.path(&id), &["sh", "-c", &script])?;
            bundle
                .set_pids_limit(limit)
                .set_cgroups_path(&format!("{}/{id}", ctd.cgroup.path()));
            bundle.config["root"]["path"] = path_str(&bundle.rootfs()).into();
            bundle.write()?;
            let config = path_str(&bundle.dir().join("config.json"));
            let mut argv = vec!["run".to_owned(), "--rm".into()];
            argv.extend(ctd.runtime_args());
            argv.extend(ctd.fifo_args());
            argv.extend(["--config".into(), config, id]);
            run(ctd.ctr().args(argv), COMMAND_TIMEOUT)
        };

        let limited = run_with_limit(10)?;
        ensure!(
            limited.stdout.starts_with("10\n"),
            "pids limit inside: {limited}"
        );
        ensure!(
            !limited.status.success() && !limited.stdout.contains("started 20"),
            "20 processes must not fit under a limit of 10: {limited}"
        );
        ensure_contains(
            &limited.combined(),
            "can't fork",
            "shell error at the limit",
        )?;

        // The same loop fits under a roomier limit: the failure above was
        // the limit, not the loop.
        let roomy = run_with_limit(100)?.ok()?;
        ensure!(
            roomy.stdout == "100\nstarted 20\n",
            "pids limit 100: {roomy}"
        );
        Ok(())
    });
}
