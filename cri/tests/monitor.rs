//! The per-container monitor (`bosun-cri-monitor`) with real containers:
//! CRI log records, exit and OOM recording, log reopening, surviving the
//! daemon, create failures and terminals. Every scenario runs with our
//! `bosun-runc` and with Debian's `runc`, to show the monitor speaks plain
//! OCI. Privileged; skips without root unless CI is set.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bosun_cri::monitor::crilog::{self, Stream, Tag};
use bosun_cri::monitor::{self, ExitInfo, ExitReason, MonitorError, MonitorHandle, SpawnOptions};
use bosun_testsupport::{host, Bundle};

/// Debian's runc, the reference the monitor must also work with.
const RUNC: &str = "/usr/sbin/runc";
/// Overrides where `bosun-runc` is found.
const BOSUN_RUNC_ENV: &str = "BOSUN_RUNC";
/// Set in the helper process of `survives_daemon_kill` (see [`helper`]).
const HELPER_ENV: &str = "BOSUN_MONITOR_HELPER";
/// Parent cgroup of every test container.
const CGROUP_PARENT: &str = "bosun-monitor-test";
const TIMEOUT: Duration = Duration::from_secs(30);

fn gate() -> bool {
    bosun_testsupport::privileged::require_root("monitor tests")
}

/// `bosun-runc`: `$BOSUN_RUNC`, else next to this test's target directory
/// (`cargo build -p bosun-runtime` puts it there).
fn bosun_runc() -> PathBuf {
    if let Some(path) = std::env::var_os(BOSUN_RUNC_ENV) {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap();
    // <target>/<triple>/debug/deps/monitor-<hash>
    let path = exe.parent().unwrap().parent().unwrap().join("bosun-runc");
    assert!(
        path.exists(),
        "{} missing: run `cargo build -p bosun-runtime` or set {BOSUN_RUNC_ENV}",
        path.display()
    );
    path
}

/// One container under a monitor, in a private directory; deletes the
/// container, kills the monitor and removes the cgroup on drop.
struct Fixture {
    work: tempfile::TempDir,
    runtime: PathBuf,
    id: String,
    bundle: Bundle,
}

impl Fixture {
    fn new(runtime: &Path, args: &[&str]) -> Result<Self> {
        let work = tempfile::tempdir()?;
        let id = host::unique_id("mon");
        let mut bundle = Bundle::busybox(&work.path().join("bundle"), args)?;
        bundle.set_cgroups_path(&format!("/{CGROUP_PARENT}/{id}"));
        Ok(Self {
            work,
            runtime: runtime.to_owned(),
            id,
            bundle,
        })
    }

    fn state_dir(&self) -> PathBuf {
        self.work.path().join("state")
    }

    fn log_path(&self) -> PathBuf {
        self.work.path().join("ctr.log")
    }

    fn options(&self) -> SpawnOptions {
        SpawnOptions {
            monitor: PathBuf::from(env!("CARGO_BIN_EXE_bosun-cri-monitor")),
            id: self.id.clone(),
            bundle: self.bundle.dir().to_owned(),
            runtime: self.runtime.clone(),
            runtime_root: self.work.path().join("runtime-root"),
            log_path: self.log_path(),
            state_dir: self.state_dir(),
            tty: self.bundle.config["process"]["terminal"] == true,
            stdin: false,
            stdin_once: false,
            systemd_cgroup: false,
            timeout: TIMEOUT,
        }
    }

    fn spawn(&self) -> Result<MonitorHandle, MonitorError> {
        self.bundle.write().unwrap();
        monitor::spawn(&self.options())
    }

    fn runtime_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.runtime);
        cmd.arg("--root")
            .arg(self.work.path().join("runtime-root"))
            .args(args)
            .arg(&self.id)
            .stdin(Stdio::null());
        cmd
    }

    fn start(&self) -> Result<()> {
        let out = self.runtime_cmd(&["start"]).output()?;
        ensure!(
            out.status.success(),
            "start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn wait_exit(&self) -> Result<ExitInfo> {
        host::poll(TIMEOUT, || monitor::read_exit(&self.state_dir()).unwrap())
            .context("no exit.json in time")
    }

    /// The monitor is gone once it recorded the exit.
    fn wait_monitor_gone(&self) -> Result<()> {
        host::poll(TIMEOUT, || {
            (!monitor::is_alive(&self.state_dir())).then_some(())
        })
        .context("monitor still alive")
    }

    fn log(&self) -> Result<Vec<u8>> {
        Ok(fs::read(self.log_path())?)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self
            .runtime_cmd(&["delete", "--force"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let pid_file = self.state_dir().join(monitor::MONITOR_PID_FILE);
        if monitor::is_alive(&self.state_dir()) {
            if let Some(pid) = fs::read_to_string(pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let hierarchies = host::cgroup_mounts().unwrap_or_default();
        let cgroup = format!("{CGROUP_PARENT}/{}", self.id);
        for dir in host::existing_cgroup_dirs(&hierarchies, &cgroup) {
            if let Err(e) = host::remove_cgroup_tree_within(&dir, Duration::from_secs(5)) {
                eprintln!("cleanup: remove {}: {e}", dir.display());
            }
        }
        // Fails while other tests still have containers there; the last wins.
        for parent in host::existing_cgroup_dirs(&hierarchies, CGROUP_PARENT) {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// Lines of one stream, reassembled from the log.
fn lines(log: &[u8], stream: Stream) -> Vec<String> {
    crilog::reassemble(log)
        .unwrap()
        .into_iter()
        .filter(|m| m.stream == stream)
        .map(|m| String::from_utf8(m.line).unwrap())
        .collect()
}

fn tags(log: &[u8]) -> Vec<Tag> {
    log.split_inclusive(|&b| b == b'\n')
        .map(|line| crilog::parse_record(line).unwrap().tag)
        .collect()
}

fn vm_rss_kib(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

/// Runs each scenario once per runtime.
macro_rules! both_runtimes {
    ($($scenario:ident),* $(,)?) => {
        mod bosun_runc {
            $(#[test]
            fn $scenario() -> anyhow::Result<()> {
                if !super::gate() {
                    return Ok(());
                }
                super::$scenario(&super::bosun_runc())
            })*
        }
        mod runc {
            $(#[test]
            fn $scenario() -> anyhow::Result<()> {
                if !super::gate() {
                    return Ok(());
                }
                super::$scenario(std::path::Path::new(super::RUNC))
            })*
        }
    };
}

both_runtimes!(
    logs_streams_and_exit_code,
    splits_long_lines,
    reopen_log_loses_nothing,
    survives_daemon_kill,
    records_oom_kill,
    reports_create_failure,
    captures_tty_output,
    attach_relays_to_every_client,
    attach_drops_a_client_that_falls_behind,
);

fn logs_streams_and_exit_code(runtime: &Path) -> Result<()> {
    let f = Fixture::new(
        runtime,
        &[
            "sh",
            "-c",
            "echo out1; echo err1 >&2; printf 'out2\\n'; sleep 0.3; exit 3",
        ],
    )?;
    let handle = f.spawn()?;
    ensure!(monitor::is_alive(&f.state_dir()));
    f.start()?;
    if let Some(rss) = vm_rss_kib(handle.monitor_pid) {
        eprintln!("monitor RSS while the container runs: {rss} KiB");
    }
    let exit = f.wait_exit()?;
    ensure!(exit.exit_code == 3, "{exit:?}");
    ensure!(exit.reason == ExitReason::Error && !exit.oom_killed && exit.signal.is_none());
    f.wait_monitor_gone()?;
    ensure!(!f.state_dir().join(monitor::CONTROL_SOCKET).exists());
    let log = f.log()?;
    ensure!(
        lines(&log, Stream::Stdout) == ["out1", "out2"],
        "{}",
        String::from_utf8_lossy(&log)
    );
    ensure!(
        lines(&log, Stream::Stderr) == ["err1"],
        "{}",
        String::from_utf8_lossy(&log)
    );
    ensure!(tags(&log).iter().all(|t| *t == Tag::Full));
    Ok(())
}

fn splits_long_lines(runtime: &Path) -> Result<()> {
    let f = Fixture::new(
        runtime,
        &[
            "sh",
            "-c",
            "head -c 40000 /dev/zero | tr '\\0' a; echo; echo short; printf tail",
        ],
    )?;
    f.spawn()?;
    f.start()?;
    ensure!(f.wait_exit()?.reason == ExitReason::Completed);
    let log = f.log()?;
    // 40000 = 16384 + 16384 + 7232; the unterminated last line ends in P.
    use Tag::{Full as F, Partial as P};
    ensure!(tags(&log) == [P, P, F, F, P], "{:?}", tags(&log));
    let records: Vec<usize> = log
        .split_inclusive(|&b| b == b'\n')
        .map(|l| crilog::parse_record(l).unwrap().content.len())
        .collect();
    ensure!(records[..3] == [16384, 16384, 7232], "{records:?}");
    let messages = crilog::reassemble(&log)?;
    ensure!(messages.len() == 3);
    ensure!(messages[0].line == vec![b'a'; 40000] && messages[0].complete);
    ensure!(messages[1].line == b"short" && messages[1].complete);
    ensure!(messages[2].line == b"tail" && !messages[2].complete);
    Ok(())
}

fn reopen_log_loses_nothing(runtime: &Path) -> Result<()> {
    let f = Fixture::new(
        runtime,
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 300 ]; do echo line$i; i=$((i+1)); \
             [ $((i % 10)) = 0 ] && sleep 0.02; done",
        ],
    )?;
    f.spawn()?;
    f.start()?;
    let rotated = f.work.path().join("ctr.log.1");
    host::poll(TIMEOUT, || {
        (fs::read(f.log_path()).ok()?.len() > 1000).then_some(())
    })
    .context("no output")?;
    fs::rename(f.log_path(), &rotated)?;
    monitor::reopen_log(&f.state_dir())?;
    f.wait_exit()?;
    let old = fs::read(&rotated)?;
    let new = f.log()?;
    let (old_lines, new_lines) = (lines(&old, Stream::Stdout), lines(&new, Stream::Stdout));
    ensure!(!new_lines.is_empty(), "nothing after the reopen");
    let all: Vec<String> = old_lines.into_iter().chain(new_lines).collect();
    let want: Vec<String> = (0..300).map(|i| format!("line{i}")).collect();
    ensure!(all == want, "{all:?}");
    ensure!(tags(&old)
        .iter()
        .chain(&tags(&new))
        .all(|t| *t == Tag::Full));
    // Once the monitor is gone, so is its control socket.
    f.wait_monitor_gone()?;
    ensure!(monitor::reopen_log(&f.state_dir()).is_err());
    Ok(())
}

/// The "daemon" of `survives_daemon_kill`: spawns the monitor, reports the
/// handle on stdout, then waits to be killed.
#[test]
fn helper() -> Result<()> {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return Ok(());
    };
    let opts: Vec<&str> = spec.split('|').collect();
    let [monitor, id, bundle, runtime, root, log, state] = opts[..] else {
        bail!("bad {HELPER_ENV}: {spec}");
    };
    let handle = monitor::spawn(&SpawnOptions {
        monitor: monitor.into(),
        id: id.into(),
        bundle: bundle.into(),
        runtime: runtime.into(),
        runtime_root: root.into(),
        log_path: log.into(),
        state_dir: state.into(),
        tty: false,
        stdin: true,
        stdin_once: false,
        systemd_cgroup: false,
        timeout: TIMEOUT,
    })?;
    println!("created {}", handle.container_pid);
    std::thread::sleep(Duration::from_secs(600));
    Ok(())
}

fn survives_daemon_kill(runtime: &Path) -> Result<()> {
    // Runs until the test creates /tmp/done in its rootfs.
    let f = Fixture::new(
        runtime,
        &[
            "sh",
            "-c",
            "echo before; while [ ! -e /tmp/done ]; do sleep 0.05; done; echo after; exit 7",
        ],
    )?;
    f.bundle.write()?;
    let o = f.options();
    let spec = [
        o.monitor.as_os_str(),
        o.id.as_ref(),
        o.bundle.as_os_str(),
        o.runtime.as_os_str(),
        o.runtime_root.as_os_str(),
        o.log_path.as_os_str(),
        o.state_dir.as_os_str(),
    ]
    .map(|s| s.to_string_lossy().into_owned())
    .join("|");
    let mut helper = Command::new(std::env::current_exe()?)
        .args(["--exact", "helper", "--nocapture", "--test-threads", "1"])
        .env(HELPER_ENV, spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdout = BufReader::new(helper.stdout.take().context("stdout")?);
    let deadline = Instant::now() + TIMEOUT;
    let container_pid: i32 = loop {
        let mut line = String::new();
        ensure!(stdout.read_line(&mut line)? > 0, "helper ended early");
        // The harness prints "test helper ... " on the same line.
        if let Some((_, pid)) = line.trim().split_once("created ") {
            break pid.parse()?;
        }
        ensure!(Instant::now() < deadline, "helper never created");
    };
    f.start()?;
    helper.kill()?;
    helper.wait()?;
    std::thread::sleep(Duration::from_millis(200));
    ensure!(
        monitor::is_alive(&f.state_dir()),
        "monitor died with the daemon"
    );
    ensure!(
        Path::new(&format!("/proc/{container_pid}")).exists(),
        "container died"
    );
    ensure!(monitor::read_exit(&f.state_dir())?.is_none());
    fs::write(f.bundle.rootfs().join("tmp/done"), "")?;
    let exit = f.wait_exit()?;
    ensure!(
        exit.exit_code == 7 && exit.reason == ExitReason::Error,
        "{exit:?}"
    );
    ensure!(lines(&f.log()?, Stream::Stdout) == ["before", "after"]);
    Ok(())
}

fn records_oom_kill(runtime: &Path) -> Result<()> {
    // busybox tail keeps a newline-free input in memory until it ends.
    let mut f = Fixture::new(runtime, &["tail", "/dev/zero"])?;
    f.bundle.set_memory_limit(32 << 20);
    f.bundle.config["linux"]["resources"]["memory"]["swap"] = (32 << 20).into();
    f.spawn()?;
    f.start()?;
    let exit = f.wait_exit()?;
    ensure!(
        exit.exit_code == 137
            && exit.signal == Some(9)
            && exit.oom_killed
            && exit.reason == ExitReason::OomKilled,
        "{exit:?}"
    );
    Ok(())
}

fn reports_create_failure(runtime: &Path) -> Result<()> {
    let mut f = Fixture::new(runtime, &["true"])?;
    f.bundle.config["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"destination": "/bogus", "type": "nosuchfs", "source": "none"}));
    let err = f.spawn().expect_err("create should fail");
    let MonitorError::CreateFailed { message, .. } = &err else {
        bail!("unexpected error {err}");
    };
    // The runtime's own words (runc logs them, bosun-runc prints them),
    // not the monitor's "runtime create exited with" fallback.
    ensure!(message.contains("create failed"), "{message:?}");
    let exit = f.wait_exit()?;
    ensure!(exit.reason == ExitReason::CreateFailed, "{exit:?}");
    ensure!(exit.message.as_deref() == Some(message.as_str()));
    f.wait_monitor_gone()?;
    let state = f.runtime_cmd(&["state"]).output()?;
    ensure!(!state.status.success(), "container left behind");
    ensure!(
        host::processes_with(&f.id)?.is_empty(),
        "processes left behind"
    );
    Ok(())
}

fn captures_tty_output(runtime: &Path) -> Result<()> {
    let mut f = Fixture::new(
        runtime,
        &["sh", "-c", "sleep 0.3; stty size; echo tty-err >&2; exit 0"],
    )?;
    f.bundle.set_terminal(true);
    f.spawn()?;
    monitor::resize(&f.state_dir(), 40, 100)?;
    f.start()?;
    let exit = f.wait_exit()?;
    ensure!(exit.reason == ExitReason::Completed, "{exit:?}");
    let log = f.log()?;
    ensure!(
        lines(&log, Stream::Stdout) == ["40 100", "tty-err"],
        "{}",
        String::from_utf8_lossy(&log)
    );
    Ok(())
}

/// Reads attach frames until the monitor closes: (stdout, stderr).
fn read_attached(stream: &mut std::os::unix::net::UnixStream) -> Result<(String, String)> {
    use std::io::Read;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut all = Vec::new();
    stream.read_to_end(&mut all)?;
    let (mut out, mut err) = (String::new(), String::new());
    let mut rest = &all[..];
    while !rest.is_empty() {
        ensure!(rest.len() >= 5, "truncated frame header");
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        ensure!(rest.len() >= 5 + len, "truncated frame");
        let text = String::from_utf8_lossy(&rest[5..5 + len]);
        match rest[0] {
            1 => out += &text,
            2 => err += &text,
            other => bail!("unknown stream {other}"),
        }
        rest = &rest[5 + len..];
    }
    Ok((out, err))
}

fn attach_relays_to_every_client(runtime: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let f = Fixture::new(
        runtime,
        &[
            "sh",
            "-c",
            "read line; echo \"got $line\"; echo err >&2; cat; echo after-eof",
        ],
    )?;
    f.bundle.write()?;
    monitor::spawn(&SpawnOptions {
        stdin: true,
        stdin_once: true,
        ..f.options()
    })?;
    f.start()?;
    let socket = f.state_dir().join(monitor::ATTACH_SOCKET);
    // One client only watches, one types, one never reads at all.
    let mut watcher = UnixStream::connect(&socket)?;
    watcher.write_all(b"0")?;
    let idle = UnixStream::connect(&socket)?;
    (&idle).write_all(b"0")?;
    let mut typist = UnixStream::connect(&socket)?;
    typist.write_all(b"1hello\n")?;
    typist.write_all(b"more\n")?;
    // stdin_once: the typist's EOF is the container's.
    typist.shutdown(std::net::Shutdown::Write)?;
    let expected = (
        "got hello\nmore\nafter-eof\n".to_owned(),
        "err\n".to_owned(),
    );
    ensure!(read_attached(&mut watcher)? == expected);
    ensure!(read_attached(&mut typist)? == expected);
    let exit = f.wait_exit()?;
    ensure!(exit.reason == ExitReason::Completed, "{exit:?}");
    let log = f.log()?;
    ensure!(
        lines(&log, Stream::Stdout) == ["got hello", "more", "after-eof"],
        "{}",
        String::from_utf8_lossy(&log)
    );
    f.wait_monitor_gone()?;
    ensure!(!socket.exists(), "attach socket left behind");
    drop(idle);
    Ok(())
}

fn attach_drops_a_client_that_falls_behind(runtime: &Path) -> Result<()> {
    use std::io::{Read, Write};
    let f = Fixture::new(
        runtime,
        &[
            "sh",
            "-c",
            "read go; head -c 12000000 /dev/zero | tr '\\0' a; echo",
        ],
    )?;
    f.bundle.write()?;
    monitor::spawn(&SpawnOptions {
        stdin: true,
        ..f.options()
    })?;
    f.start()?;
    let socket = f.state_dir().join(monitor::ATTACH_SOCKET);
    let mut idle = std::os::unix::net::UnixStream::connect(&socket)?;
    idle.write_all(b"1go\n")?;
    // It reads nothing while 12 MB go by: the container and its log must
    // not wait for it.
    let exit = f.wait_exit()?;
    ensure!(exit.reason == ExitReason::Completed, "{exit:?}");
    let logged: usize = lines(&f.log()?, Stream::Stdout)
        .iter()
        .map(String::len)
        .sum();
    ensure!(logged == 12_000_000, "logged {logged} bytes");
    idle.set_read_timeout(Some(TIMEOUT))?;
    let mut got = Vec::new();
    idle.read_to_end(&mut got)?;
    ensure!(
        got.len() < 8 << 20,
        "the slow client was sent {} bytes",
        got.len()
    );
    Ok(())
}
