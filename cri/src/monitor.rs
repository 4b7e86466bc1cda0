//! The per-container monitor: a small process (`bosun-cri-monitor`) that
//! creates one container through the OCI runtime, owns its stdio, writes its
//! output to the CRI log file and records how it exited — and keeps doing so
//! while `bosun-cri` restarts. This module is the daemon's side of it; the
//! monitor process itself is [`supervise`].
//!
//! # Command line
//!
//! ```text
//! bosun-cri-monitor --id <cid> --bundle <dir> --runtime <oci runtime>
//!     --runtime-root <dir> --log-path <file> --state-dir <dir>
//!     [--tty] [--stdin [--stdin-once]] [--systemd-cgroup] [--sync-fd <fd>]
//! ```
//!
//! It forks: the process that was started exits 0 at once (so the caller
//! can reap it), the monitor goes on in its own session with stdio on
//! `/dev/null`, as a child subreaper so the container process becomes its
//! child when `runtime create` exits. It does not start the container:
//! the daemon runs `runtime start` once [`spawn`] returned.
//!
//! # Sync protocol (`--sync-fd`)
//!
//! The monitor writes one JSON line to the inherited fd and closes it, once
//! `create` finished: `{"created":{"pid":<container pid>,"monitorPid":<pid>}}`
//! or `{"failed":{"message":"<the runtime's error>"}}`. EOF without a line
//! means the monitor died. [`spawn`] does all of this.
//!
//! # State directory
//!
//! - `monitor.pid`: the monitor's pid, written before the sync line.
//! - `pid`: the container's pid, written by the runtime (`--pid-file`).
//! - `runtime.log`: the runtime's own log (`--log`, JSON), kept for debugging.
//! - `ctl.sock`: the control socket, mode 0600, gone once the monitor exits.
//! - `attach.sock`: the attach socket, mode 0600, gone once the monitor exits.
//! - `exit.json`: how the container ended ([`ExitInfo`]), written atomically
//!   right before the monitor exits; also on create failure.
//!
//! `startedAt` is not recorded here: the daemon knows when its `runtime
//! start` returned, which is the moment the CRI means.
//!
//! # Control protocol (`ctl.sock`)
//!
//! One command per connection, one line each way: the client sends
//! `reopen-log\n` or `resize <rows> <cols>\n`; the monitor answers `ok\n` or
//! `error: <reason>\n` and closes. `reopen-log` answers only after every
//! line read so far is in the old file; later lines go to the new one, and a
//! line is never split across the two.
//!
//! # Attach protocol (`attach.sock`)
//!
//! Any number of clients. A client's first byte is `1` if it sends stdin,
//! `0` if it only wants output; with `1`, everything after it goes to the
//! container's stdin (the pipe, or the terminal) and EOF ends its input —
//! which closes the container's stdin if it was created with
//! `--stdin-once` (a terminal gets ^D instead). The monitor sends every
//! piece of output as `[stream: u8][length: u32 big-endian][bytes]`,
//! stream 1 for stdout (and the terminal), 2 for stderr, and closes the
//! connection once the container exited and its output is out. A client
//! that falls 4 MiB behind is dropped.
pub mod crilog;
mod oom;
pub mod supervise;

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};

/// The monitor's pid, in the state directory.
pub const MONITOR_PID_FILE: &str = "monitor.pid";
/// The container's pid, written by the runtime.
pub const CONTAINER_PID_FILE: &str = "pid";
/// The control socket.
pub const CONTROL_SOCKET: &str = "ctl.sock";
/// The attach socket.
pub const ATTACH_SOCKET: &str = "attach.sock";
/// How the container exited.
pub const EXIT_FILE: &str = "exit.json";
/// The runtime's own log.
pub const RUNTIME_LOG: &str = "runtime.log";

/// How long a control command may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("malformed {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("create container {id}: {message}")]
    CreateFailed { id: String, message: String },
    #[error("monitor for container {id} ended without reporting on create: {detail}")]
    NoReport { id: String, detail: String },
    #[error("container {id} not created within {after:?}; monitor killed")]
    Timeout { id: String, after: Duration },
    #[error("monitor control {path}: {message}")]
    Control { path: PathBuf, message: String },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MonitorError {
    let path = path.to_owned();
    move |source| MonitorError::Io {
        action,
        path,
        source,
    }
}

/// Why a container stopped, in the CRI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    Completed,
    Error,
    #[serde(rename = "OOMKilled")]
    OomKilled,
    CreateFailed,
}

/// The contents of `exit.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitInfo {
    /// The exit status, 128 + signal when killed, -1 when never created.
    pub exit_code: i32,
    /// The signal that killed the container process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub finished_at: DateTime<Utc>,
    pub oom_killed: bool,
    pub reason: ExitReason,
    /// The runtime's error when `reason` is `CreateFailed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The line sent over `--sync-fd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SyncMessage {
    #[serde(rename_all = "camelCase")]
    Created {
        pid: i32,
        monitor_pid: i32,
    },
    Failed {
        message: String,
    },
}

/// What [`spawn`] starts.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// The `bosun-cri-monitor` binary.
    pub monitor: PathBuf,
    pub id: String,
    pub bundle: PathBuf,
    /// The OCI runtime binary (`bosun-runc`, `runc`).
    pub runtime: PathBuf,
    pub runtime_root: PathBuf,
    pub log_path: PathBuf,
    /// Created (0700) if missing.
    pub state_dir: PathBuf,
    pub tty: bool,
    /// Keep the container's stdin open (`stdin: true` in the CRI config).
    pub stdin: bool,
    /// Close it after the first attach (`stdin_once`).
    pub stdin_once: bool,
    pub systemd_cgroup: bool,
    /// How long `runtime create` may take.
    pub timeout: Duration,
}

/// A monitor whose container was created (not yet started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorHandle {
    pub monitor_pid: i32,
    pub container_pid: i32,
    pub state_dir: PathBuf,
}

/// Starts a monitor and waits until it created the container. Blocking:
/// call it from a blocking thread in an async daemon. On create failure the
/// error carries the runtime's message and `exit.json` says `CreateFailed`.
pub fn spawn(opts: &SpawnOptions) -> Result<MonitorHandle, MonitorError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&opts.state_dir)
        .map_err(io_error("create state directory", &opts.state_dir))?;
    let (sync_read, sync_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| io_error("create sync pipe for", &opts.monitor)(e.into()))?;
    let sync_fd = sync_write.as_raw_fd();

    let mut cmd = Command::new(&opts.monitor);
    cmd.arg("--id")
        .arg(&opts.id)
        .arg("--bundle")
        .arg(&opts.bundle)
        .arg("--runtime")
        .arg(&opts.runtime)
        .arg("--runtime-root")
        .arg(&opts.runtime_root)
        .arg("--log-path")
        .arg(&opts.log_path)
        .arg("--state-dir")
        .arg(&opts.state_dir)
        .arg("--sync-fd")
        .arg(sync_fd.to_string());
    for (set, flag) in [
        (opts.tty, "--tty"),
        (opts.stdin, "--stdin"),
        (opts.stdin && opts.stdin_once, "--stdin-once"),
        (opts.systemd_cgroup, "--systemd-cgroup"),
    ] {
        if set {
            cmd.arg(flag);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: fcntl is async-signal-safe and touches only the sync pipe's
    // write end, which the child must inherit (it is O_CLOEXEC so that no
    // other process this daemon starts meanwhile holds it open).
    unsafe {
        cmd.pre_exec(move || {
            fcntl(sync_fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io_error("start", &opts.monitor))?;
    drop(sync_write);
    // The started process only forks and exits; stderr has clap's complaint
    // if the arguments were wrong.
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let status = child.wait().map_err(io_error("wait for", &opts.monitor))?;
    if !status.success() {
        return Err(MonitorError::NoReport {
            id: opts.id.clone(),
            detail: format!("{status}: {}", stderr.trim()),
        });
    }

    let line = match read_sync(sync_read, opts.timeout) {
        Ok(line) => line,
        Err(ReadSync::TimedOut) => {
            if let Some(pid) = read_pid(&opts.state_dir.join(MONITOR_PID_FILE)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(MonitorError::Timeout {
                id: opts.id.clone(),
                after: opts.timeout,
            });
        }
        Err(ReadSync::Io(source)) => {
            return Err(io_error("read sync pipe of", &opts.monitor)(source))
        }
    };
    match serde_json::from_slice::<SyncMessage>(&line) {
        Ok(SyncMessage::Created { pid, monitor_pid }) => Ok(MonitorHandle {
            monitor_pid,
            container_pid: pid,
            state_dir: opts.state_dir.clone(),
        }),
        Ok(SyncMessage::Failed { message }) => Err(MonitorError::CreateFailed {
            id: opts.id.clone(),
            message,
        }),
        Err(_) => Err(MonitorError::NoReport {
            id: opts.id.clone(),
            detail: format!("sync pipe said {:?}", String::from_utf8_lossy(&line)),
        }),
    }
}

enum ReadSync {
    TimedOut,
    Io(io::Error),
}

/// Reads the sync pipe until a newline, EOF or `timeout`.
fn read_sync(pipe: std::os::fd::OwnedFd, timeout: Duration) -> Result<Vec<u8>, ReadSync> {
    let deadline = Instant::now() + timeout;
    let mut file = fs::File::from(pipe);
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadSync::TimedOut);
        }
        let wait = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, wait) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(ReadSync::Io(e.into())),
        }
        match file.read(&mut buf) {
            Ok(0) => return Ok(line),
            Ok(n) => {
                line.extend_from_slice(&buf[..n]);
                if line.ends_with(b"\n") {
                    return Ok(line);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadSync::Io(e)),
        }
    }
}

/// How the container exited, once the monitor recorded it.
pub fn read_exit(state_dir: &Path) -> Result<Option<ExitInfo>, MonitorError> {
    let path = state_dir.join(EXIT_FILE);
    match fs::read(&path) {
        Ok(text) => serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| MonitorError::Json { path, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", &path)(e)),
    }
}

/// Whether the monitor of `state_dir` still runs: its pid is alive, not a
/// zombie, and (against pid reuse) its command line names this state dir.
pub fn is_alive(state_dir: &Path) -> bool {
    let Some(pid) = read_pid(&state_dir.join(MONITOR_PID_FILE)) else {
        return false;
    };
    let zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat.rsplit_once(") ")?.1.starts_with('Z')));
    if zombie != Some(false) {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let dir = state_dir.as_os_str().as_encoded_bytes();
    cmdline.split(|&b| b == 0).any(|arg| arg == dir)
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Asks the monitor to reopen the log file (after the kubelet renamed it).
pub fn reopen_log(state_dir: &Path) -> Result<(), MonitorError> {
    control(state_dir, "reopen-log")
}

/// Sets the terminal size of a `--tty` container.
pub fn resize(state_dir: &Path, rows: u16, cols: u16) -> Result<(), MonitorError> {
    control(state_dir, &format!("resize {rows} {cols}"))
}

fn control(state_dir: &Path, command: &str) -> Result<(), MonitorError> {
    let path = state_dir.join(CONTROL_SOCKET);
    let fail = |message: String| MonitorError::Control {
        path: path.clone(),
        message,
    };
    let mut stream = UnixStream::connect(&path).map_err(io_error("connect to", &path))?;
    stream
        .set_read_timeout(Some(CONTROL_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CONTROL_TIMEOUT)))
        .and_then(|()| stream.write_all(format!("{command}\n").as_bytes()))
        .map_err(io_error("send to", &path))?;
    let mut reply = String::new();
    BufReader::new(stream.take(4096))
        .read_line(&mut reply)
        .map_err(io_error("read reply from", &path))?;
    match reply.trim_end() {
        "ok" => Ok(()),
        other => Err(fail(
            other
                .strip_prefix("error: ")
                .unwrap_or(if other.is_empty() { "no reply" } else { other })
                .to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn exit_info_json_shape() {
        let info = ExitInfo {
            exit_code: 137,
            signal: Some(9),
            finished_at: DateTime::parse_from_rfc3339("2024-01-02T03:04:05.123456789Z")
                .unwrap()
                .with_timezone(&Utc),
            oom_killed: true,
            reason: ExitReason::OomKilled,
            message: None,
        };
        let text = serde_json::to_string(&info).unwrap();
        assert_eq!(
            text,
            r#"{"exitCode":137,"signal":9,"finishedAt":"2024-01-02T03:04:05.123456789Z","oomKilled":true,"reason":"OOMKilled"}"#
        );
        assert_eq!(serde_json::from_str::<ExitInfo>(&text).unwrap(), info);
    }

    #[test]
    fn sync_message_json_shape() {
        let created = SyncMessage::Created {
            pid: 5,
            monitor_pid: 4,
        };
        assert_eq!(
            serde_json::to_string(&created).unwrap(),
            r#"{"created":{"pid":5,"monitorPid":4}}"#
        );
        let failed: SyncMessage = serde_json::from_str(r#"{"failed":{"message":"x"}}"#).unwrap();
        assert_eq!(
            failed,
            SyncMessage::Failed {
                message: "x".into()
            }
        );
    }

    #[test]
    fn missing_state_means_no_exit_and_not_alive() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_exit(dir.path()).unwrap(), None);
        assert!(!is_alive(dir.path()));
        // A live pid whose command line does not name the state dir.
        fs::write(dir.path().join(MONITOR_PID_FILE), "1\n").unwrap();
        assert!(!is_alive(dir.path()));
        fs::write(dir.path().join(EXIT_FILE), "{").unwrap();
        assert!(matches!(
            read_exit(dir.path()),
            Err(MonitorError::Json { .. })
        ));
    }

    #[test]
    fn control_without_monitor_fails_with_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = reopen_log(dir.path()).unwrap_err();
        assert!(err.to_string().contains("ctl.sock"), "{err}");
    }
}
