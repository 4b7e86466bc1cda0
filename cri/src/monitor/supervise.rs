//! The monitor process, `bosun-cri-monitor` (see [`super`] for its command
//! line, protocols and state files). Single-threaded: after `create` it
//! polls the container's output, the control socket and a SIGCHLD signalfd.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use chrono::Utc;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{dup2, fork, pipe2, setsid, ForkResult, Pid};

use super::crilog::{self, LineSplitter, Stream};
use super::{
    oom, ExitInfo, ExitReason, SyncMessage, ATTACH_SOCKET, CONTAINER_PID_FILE, CONTROL_SOCKET,
    EXIT_FILE, MONITOR_PID_FILE, RUNTIME_LOG,
};

/// The monitor's command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "bosun-cri-monitor",
    about = "Creates one container, logs its output in the CRI format and records its exit"
)]
pub struct Args {
    /// Container id, as given to the runtime.
    #[arg(long)]
    pub id: String,
    /// OCI bundle directory.
    #[arg(long)]
    pub bundle: PathBuf,
    /// OCI runtime binary.
    #[arg(long)]
    pub runtime: PathBuf,
    /// The runtime's `--root`.
    #[arg(long)]
    pub runtime_root: PathBuf,
    /// CRI log file of the container.
    #[arg(long)]
    pub log_path: PathBuf,
    /// Directory for pid files, the control socket and exit.json.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The container has a terminal (`process.terminal`).
    #[arg(long)]
    pub tty: bool,
    /// Keep the container's stdin open.
    #[arg(long)]
    pub stdin: bool,
    /// Close the container's stdin when the first attached client that
    /// sent stdin detaches.
    #[arg(long)]
    pub stdin_once: bool,
    /// Pass `--systemd-cgroup` to the runtime.
    #[arg(long)]
    pub systemd_cgroup: bool,
    /// Inherited fd to report the outcome of create on (one JSON line).
    #[arg(long)]
    pub sync_fd: Option<RawFd>,
}

/// Output is read in pieces this big (a full pipe buffer).
const READ_SIZE: usize = 64 * 1024;
/// How long a control client may take to send its command.
const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// Output an attached client has not taken yet; beyond it the client is
/// dropped rather than slowing down logging.
const ATTACH_BACKLOG: usize = 4 << 20;
/// How long attached clients get to take the last output at exit.
const ATTACH_DRAIN: Duration = Duration::from_secs(1);

/// Entry point of `bosun-cri-monitor`.
pub fn main(args: &Args) -> ExitCode {
    // Claimed before forking so a bad fd is reported to whoever started us.
    let sync = match args.sync_fd.map(sync_pipe).transpose() {
        Ok(sync) => sync,
        Err(e) => {
            eprintln!("bosun-cri-monitor: --sync-fd: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = detach() {
        eprintln!("bosun-cri-monitor: detach: {e}");
        return ExitCode::FAILURE;
    }
    let state = &args.state_dir;
    let _ = write_atomic(
        &state.join(MONITOR_PID_FILE),
        format!("{}\n", std::process::id()).as_bytes(),
    );
    match create(args) {
        Ok(mut monitor) => {
            report(
                sync,
                &SyncMessage::Created {
                    pid: monitor.pid.as_raw(),
                    monitor_pid: Pid::this().as_raw(),
                },
            );
            let status = monitor.run();
            let info = monitor.finish(status);
            let _ = fs::remove_file(state.join(CONTROL_SOCKET));
            let _ = fs::remove_file(state.join(ATTACH_SOCKET));
            let _ = write_exit(state, &info);
            ExitCode::SUCCESS
        }
        Err(message) => {
            let _ = fs::remove_file(state.join(CONTROL_SOCKET));
            let _ = fs::remove_file(state.join(ATTACH_SOCKET));
            let info = ExitInfo {
                exit_code: -1,
                signal: None,
                finished_at: Utc::now(),
                oom_killed: false,
                reason: ExitReason::CreateFailed,
                message: Some(message.clone()),
            };
            let _ = write_exit(state, &info);
            report(sync, &SyncMessage::Failed { message });
            ExitCode::FAILURE
        }
    }
}

/// Takes ownership of the inherited sync fd, closing it on exec so neither
/// the runtime nor the container keeps the daemon's pipe open.
fn sync_pipe(fd: RawFd) -> nix::Result<File> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    // SAFETY: fcntl just proved the fd open; it was passed to us for this
    // purpose alone and nothing else in this process refers to it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Forks into a new session with stdio on /dev/null; the original process
/// exits 0 here, so the monitor outlives whoever started it.
fn detach() -> io::Result<()> {
    // SAFETY: no thread has been started yet, so the child may run any code.
    if let ForkResult::Parent { .. } = unsafe { fork() }? {
        std::process::exit(0);
    }
    setsid()?;
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..=2 {
        dup2(null.as_raw_fd(), fd)?;
    }
    Ok(())
}

fn report(sync: Option<File>, message: &SyncMessage) {
    if let (Some(mut pipe), Ok(mut line)) = (sync, serde_json::to_vec(message)) {
        line.push(b'\n');
        // The daemon may be gone; it will find exit.json instead.
        let _ = pipe.write_all(&line);
    }
}

fn write_exit(state: &Path, info: &ExitInfo) -> io::Result<()> {
    let mut text = serde_json::to_vec(info)?;
    text.push(b'\n');
    write_atomic(&state.join(EXIT_FILE), &text)
}

/// Write temp, fsync, rename: readers see the old file or the whole new one.
fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

/// One stream of container output: a pipe end, or the pty master.
struct Output {
    file: File,
    splitter: LineSplitter,
    open: bool,
    /// Its number in the attach protocol.
    channel: u8,
}

impl Output {
    fn new(fd: OwnedFd, stream: Stream) -> io::Result<Self> {
        let channel = match stream {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        };
        // Non-blocking, so draining after the container exits cannot hang on
        // a pipe that a leftover process still holds.
        let flags = OFlag::from_bits_retain(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok(Self {
            file: File::from(fd),
            splitter: LineSplitter::new(stream),
            open: true,
            channel,
        })
    }
}

/// The container log file, reopened on request.
struct LogFile {
    path: PathBuf,
    file: File,
}

impl LogFile {
    fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// Writes whole records in one call, so a reader never sees half a line
    /// from us and a reopen never falls inside one.
    fn write(&mut self, records: &[u8]) {
        if !records.is_empty() {
            // Nobody to tell (our stderr is /dev/null); a full disk loses
            // output as it would for any logger.
            let _ = self.file.write_all(records);
        }
    }

    fn reopen(&mut self) -> Result<(), String> {
        let fresh = Self::open(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        *self = fresh;
        Ok(())
    }
}

/// A created container and everything the monitor holds for it.
struct Monitor {
    pid: Pid,
    log: LogFile,
    outputs: Vec<Output>,
    /// The pty master is `outputs[0]`.
    tty: bool,
    control: UnixListener,
    attach: UnixListener,
    clients: Vec<Attached>,
    /// Where attached clients' input goes (non-blocking): the stdin pipe,
    /// or the pty master. Held even with nobody attached, so the container
    /// does not see EOF.
    stdin: Option<File>,
    stdin_once: bool,
    /// Input not yet taken by the container.
    stdin_pending: Vec<u8>,
    /// Close `stdin` once `stdin_pending` is written.
    stdin_closing: bool,
    /// The OOM kill counter file and its value at create.
    oom: Option<(PathBuf, u64)>,
    buf: Vec<u8>,
    records: Vec<u8>,
}

/// Runs `runtime create` and sets up everything but the SIGCHLD loop. On
/// failure returns the runtime's message; nothing is left running.
fn create(args: &Args) -> Result<Monitor, String> {
    let state = &args.state_dir;
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| format!("become subreaper: {e}"))?;
    let log = LogFile::open(&args.log_path)
        .map_err(|e| format!("open log {}: {e}", args.log_path.display()))?;
    let control = bind_private(&state.join(CONTROL_SOCKET))?;
    let attach = bind_private(&state.join(ATTACH_SOCKET))?;

    let mut cmd = Command::new(&args.runtime);
    cmd.arg("--root").arg(&args.runtime_root);
    if args.systemd_cgroup {
        cmd.arg("--systemd-cgroup");
    }
    // The runtime's own messages go to its log, not into the container's.
    cmd.arg("--log")
        .arg(state.join(RUNTIME_LOG))
        .arg("--log-format")
        .arg("json")
        .arg("create")
        .arg("--bundle")
        .arg(&args.bundle)
        .arg("--pid-file")
        .arg(state.join(CONTAINER_PID_FILE));

    let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("create pipe: {e}"));
    let mut stdin_keep = None;
    let (status, outputs, runtime_stderr) = if args.tty {
        let socket_path = state.join("console.sock");
        let console = bind_private(&socket_path)?;
        cmd.arg("--console-socket").arg(&socket_path);
        let (err_read, err_write) = pipe()?;
        let err_copy = err_write
            .try_clone()
            .map_err(|e| format!("dup pipe: {e}"))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(err_copy))
            .stderr(Stdio::from(err_write));
        let (status, master) = run_with_console(cmd.arg(&args.id), &console)?;
        let _ = fs::remove_file(&socket_path);
        let master = match master {
            Some(fd) => Some(Output::new(fd, Stream::Stdout).map_err(|e| e.to_string())?),
            None => None,
        };
        (status, master.into_iter().collect(), err_read)
    } else {
        let (out_read, out_write) = pipe()?;
        let (err_read, err_write) = pipe()?;
        if args.stdin {
            let (in_read, in_write) = pipe()?;
            cmd.stdin(Stdio::from(in_read));
            stdin_keep = Some(in_write);
        } else {
            cmd.stdin(Stdio::null());
        }
        cmd.stdout(Stdio::from(out_write))
            .stderr(Stdio::from(err_write))
            .arg(&args.id);
        let status = cmd
            .status()
            .map_err(|e| format!("run {}: {e}", args.runtime.display()));
        // Our copies of the write ends must go, or we never see EOF.
        drop(cmd);
        let status = status?;
        let stderr = err_read.try_clone().map_err(|e| format!("dup pipe: {e}"))?;
        let outputs = vec![
            Output::new(out_read, Stream::Stdout).map_err(|e| e.to_string())?,
            Output::new(err_read, Stream::Stderr).map_err(|e| e.to_string())?,
        ];
        (status, outputs, stderr)
    };

    if !status.success() {
        return Err(runtime_error(state, runtime_stderr, status));
    }
    let pid = match container_pid(state) {
        Ok(pid) => pid,
        Err(message) => {
            delete_container(args);
            return Err(message);
        }
    };
    if args.tty && outputs.is_empty() {
        delete_container(args);
        return Err("the runtime never sent the pty master to the console socket".into());
    }
    let stdin = match (args.stdin, args.tty) {
        (false, _) => None,
        // The master is non-blocking already (see Output::new).
        (true, true) => Some(
            outputs[0]
                .file
                .try_clone()
                .map_err(|e| format!("dup pty: {e}"))?,
        ),
        (true, false) => stdin_keep.map(nonblocking).transpose()?,
    };
    let oom = oom::counter_file(pid.as_raw())
        .and_then(|file| Some((oom::read_kills(&file)?, file)))
        .map(|(count, file)| (file, count));
    Ok(Monitor {
        pid,
        log,
        outputs,
        tty: args.tty,
        control,
        attach,
        clients: Vec::new(),
        stdin,
        stdin_once: args.stdin_once,
        stdin_pending: Vec::new(),
        stdin_closing: false,
        oom,
        buf: vec![0; READ_SIZE],
        records: Vec::new(),
    })
}

fn nonblocking(fd: OwnedFd) -> Result<File, String> {
    let set = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).and_then(|flags| {
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags))
    });
    set.map_err(|e| format!("make stdin non-blocking: {e}"))?;
    Ok(File::from(fd))
}

/// An attached client (the protocol is in [`super`]).
struct Attached {
    stream: UnixStream,
    /// `None` until its first byte said whether it sends stdin.
    sends_stdin: Option<bool>,
    /// Framed output not yet written to it.
    pending: Vec<u8>,
    /// It sent EOF.
    read_done: bool,
    /// Gone or too slow: removed after this round.
    dead: bool,
}

impl Attached {
    fn interest(&self, take_input: bool) -> PollFlags {
        let mut flags = PollFlags::empty();
        if !self.read_done && take_input {
            flags |= PollFlags::POLLIN;
        }
        if !self.pending.is_empty() {
            flags |= PollFlags::POLLOUT;
        }
        flags
    }

    /// Writes what it can without blocking.
    fn flush(&mut self) {
        while !self.pending.is_empty() && !self.dead {
            match (&self.stream).write(&self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.dead = true,
            }
        }
    }
}

/// Queues one piece of output to every attached client.
fn broadcast(clients: &mut [Attached], channel: u8, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    for client in clients.iter_mut().filter(|c| !c.dead) {
        if client.pending.len() + data.len() > ATTACH_BACKLOG {
            client.dead = true;
            continue;
        }
        client.pending.push(channel);
        client
            .pending
            .extend_from_slice(&(data.len() as u32).to_be_bytes());
        client.pending.extend_from_slice(data);
        client.flush();
    }
}

/// A unix socket only root can connect to.
fn bind_private(path: &Path) -> Result<UnixListener, String> {
    let _ = fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("bind {}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    Ok(listener)
}

/// Runs the runtime while accepting the pty master on `console`: the
/// runtime sends it during create and need not wait for us to accept.
fn run_with_console(
    cmd: &mut Command,
    console: &UnixListener,
) -> Result<(ExitStatus, Option<OwnedFd>), String> {
    let mut child = cmd.spawn().map_err(|e| format!("run runtime: {e}"))?;
    console
        .set_nonblocking(true)
        .map_err(|e| format!("console socket: {e}"))?;
    let mut master = None;
    loop {
        if master.is_none() {
            if let Ok((stream, _)) = console.accept() {
                master = Some(receive_fd(&stream)?);
            }
        }
        let exited = child
            .try_wait()
            .map_err(|e| format!("wait for runtime: {e}"))?;
        if let Some(status) = exited {
            if master.is_none() {
                if let Ok((stream, _)) = console.accept() {
                    master = Some(receive_fd(&stream)?);
                }
            }
            return Ok((status, master));
        }
        let mut fds = [PollFd::new(console.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(20u8));
    }
}

/// Receives one fd sent with SCM_RIGHTS.
pub(crate) fn receive_fd(stream: &UnixStream) -> Result<OwnedFd, String> {
    let _ = stream.set_nonblocking(false);
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| format!("receive pty master: {e}"))?;
    for cmsg in msg
        .cmsgs()
        .map_err(|e| format!("receive pty master: {e}"))?
    {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this fd for us via
                // SCM_RIGHTS; nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err("receive pty master: no fd in the message".into())
}

/// The runtime's error: its last error in `runtime.log`, else its stderr.
fn runtime_error(state: &Path, stderr: OwnedFd, status: ExitStatus) -> String {
    let from_log = fs::read_to_string(state.join(RUNTIME_LOG))
        .ok()
        .and_then(|log| {
            log.lines().rev().find_map(|line| {
                let entry: serde_json::Value = serde_json::from_str(line).ok()?;
                matches!(entry["level"].as_str(), Some("error" | "fatal"))
                    .then(|| entry["msg"].as_str().map(str::to_owned))?
            })
        });
    if let Some(message) = from_log {
        return message;
    }
    let mut text = Vec::new();
    if let Ok(mut output) = Output::new(stderr, Stream::Stderr) {
        // Non-blocking: whatever the dead runtime wrote is in the pipe.
        let _ = output.file.read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    if text.is_empty() {
        format!("runtime create exited with {status}")
    } else {
        text
    }
}

/// The container's pid from the runtime's pid file; it must be our child
/// now that the runtime exited, or we could never wait for it.
fn container_pid(state: &Path) -> Result<Pid, String> {
    let path = state.join(CONTAINER_PID_FILE);
    let pid: i32 = fs::read_to_string(&path)
        .map_err(|e| format!("read {}: {e}", path.display()))?
        .trim()
        .parse()
        .map_err(|e| format!("parse {}: {e}", path.display()))?;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let parent = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split(' ').nth(1)?.parse::<i32>().ok());
    if parent != Some(Pid::this().as_raw()) {
        return Err(format!(
            "container process {pid} is not a child of the monitor (parent {parent:?}); \
             the runtime must not hand it to another process"
        ));
    }
    Ok(Pid::from_raw(pid))
}

/// Undoes a create whose result we cannot use.
fn delete_container(args: &Args) {
    let _ = Command::new(&args.runtime)
        .arg("--root")
        .arg(&args.runtime_root)
        .args(["delete", "--force"])
        .arg(&args.id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Monitor {
    /// Relays output and serves the control socket until the container
    /// process exits; returns its wait status.
    fn run(&mut self) -> WaitStatus {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        // Blocked only now: the runtime and container must not inherit the
        // mask, and the container cannot exit before the daemon starts it.
        // Without a signalfd (never seen) we poll for exits instead.
        let signals = mask
            .thread_block()
            .and_then(|()| {
                SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            })
            .ok();
        let timeout = match signals {
            Some(_) => PollTimeout::NONE,
            None => PollTimeout::from(100u8),
        };
        loop {
            if let Some(status) = self.reap() {
                return status;
            }
            let polled: Vec<usize> = (0..self.outputs.len())
                .filter(|&i| self.outputs[i].open)
                .collect();
            let take_input = self.stdin_pending.is_empty();
            let write_stdin = !take_input && self.stdin.is_some();
            // Order: control, attach, outputs, clients, [stdin], [signals].
            let ready: Vec<PollFlags> = {
                let mut fds = Vec::with_capacity(polled.len() + self.clients.len() + 4);
                fds.push(PollFd::new(self.control.as_fd(), PollFlags::POLLIN));
                fds.push(PollFd::new(self.attach.as_fd(), PollFlags::POLLIN));
                fds.extend(
                    polled
                        .iter()
                        .map(|&i| PollFd::new(self.outputs[i].file.as_fd(), PollFlags::POLLIN)),
                );
                fds.extend(
                    self.clients
                        .iter()
                        .map(|c| PollFd::new(c.stream.as_fd(), c.interest(take_input))),
                );
                if let (true, Some(stdin)) = (write_stdin, &self.stdin) {
                    fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLOUT));
                }
                if let Some(signals) = &signals {
                    fds.push(PollFd::new(signals.as_fd(), PollFlags::POLLIN));
                }
                if poll(&mut fds, timeout).is_err() {
                    continue;
                }
                fds.iter()
                    .map(|fd| fd.revents().unwrap_or(PollFlags::empty()))
                    .collect()
            };
            if let Some(signals) = &signals {
                while let Ok(Some(_)) = signals.read_signal() {}
            }
            // Output first: a reopen-log request then finds everything the
            // container wrote before it in the old file.
            for (k, &i) in polled.iter().enumerate() {
                if !ready[k + 2].is_empty() {
                    self.read_once(i);
                }
            }
            let first_client = 2 + polled.len();
            for k in 0..self.clients.len() {
                let flags = ready[first_client + k];
                if flags.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL) {
                    self.clients[k].dead = true;
                }
                if flags.intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
                    self.read_client(k);
                }
                if flags.contains(PollFlags::POLLOUT) {
                    self.clients[k].flush();
                }
            }
            self.clients.retain(|c| !c.dead);
            if write_stdin {
                self.flush_stdin();
            }
            if !ready[0].is_empty() {
                self.serve_control();
            }
            if !ready[1].is_empty() {
                self.accept_client();
            }
        }
    }

    fn accept_client(&mut self) {
        let Ok((stream, _)) = self.attach.accept() else {
            return;
        };
        if stream.set_nonblocking(true).is_ok() {
            self.clients.push(Attached {
                stream,
                sends_stdin: None,
                pending: Vec::new(),
                read_done: false,
                dead: false,
            });
        }
    }

    /// Takes input from client `k`: its first byte says whether it sends
    /// stdin, the rest goes to the container.
    fn read_client(&mut self, k: usize) {
        let client = &mut self.clients[k];
        let input = match (&client.stream).read(&mut self.buf) {
            Ok(0) => {
                client.read_done = true;
                if client.sends_stdin == Some(true) && self.stdin_once {
                    self.close_stdin();
                }
                return;
            }
            Ok(n) => {
                let start = match client.sends_stdin {
                    Some(_) => 0,
                    None => {
                        client.sends_stdin = Some(self.buf[0] == b'1');
                        1
                    }
                };
                (client.sends_stdin == Some(true)).then_some(start..n)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                None
            }
            Err(_) => {
                client.dead = true;
                None
            }
        };
        if let (Some(range), Some(_), false) = (input, &self.stdin, self.stdin_closing) {
            self.stdin_pending.extend_from_slice(&self.buf[range]);
            self.flush_stdin();
        }
    }

    /// The attached client is done with stdin and the container asked for
    /// one attach only: a pipe gets EOF; a terminal gets ^D, its EOF key,
    /// since closing one of the master's fds would not end its input.
    fn close_stdin(&mut self) {
        if self.tty {
            self.stdin_pending.push(0x04);
        } else {
            self.stdin_closing = true;
        }
        self.flush_stdin();
    }

    fn flush_stdin(&mut self) {
        let Some(stdin) = &self.stdin else {
            self.stdin_pending.clear();
            return;
        };
        while !self.stdin_pending.is_empty() {
            match (&*stdin).write(&self.stdin_pending) {
                Ok(n) => {
                    self.stdin_pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The container closed its stdin.
                Err(_) => {
                    self.stdin = None;
                    self.stdin_pending.clear();
                    return;
                }
            }
        }
        if self.stdin_closing {
            self.stdin = None;
        }
    }

    /// Reaps every exited child (orphans get reparented to a subreaper);
    /// returns the container's status once it is among them.
    fn reap(&mut self) -> Option<WaitStatus> {
        let mut found = None;
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return found,
                Ok(status) => {
                    let ended = matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..));
                    if ended && status.pid() == Some(self.pid) {
                        found = Some(status);
                    }
                }
            }
        }
    }

    /// Reads what one output has now and logs it; returns false once there
    /// is nothing more to read (empty, EOF or error).
    fn read_once(&mut self, index: usize) -> bool {
        let output = &mut self.outputs[index];
        let timestamp = crilog::timestamp(Utc::now());
        self.records.clear();
        let more = match output.file.read(&mut self.buf) {
            Ok(0) => {
                output.open = false;
                false
            }
            Ok(n) => {
                output
                    .splitter
                    .push(&self.buf[..n], &timestamp, &mut self.records);
                broadcast(&mut self.clients, output.channel, &self.buf[..n]);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            // EIO: every holder of the pty slave has gone.
            Err(_) => {
                output.open = false;
                false
            }
        };
        if !output.open {
            output.splitter.finish(&timestamp, &mut self.records);
        }
        self.log.write(&self.records);
        more
    }

    fn serve_control(&mut self) {
        let Ok((stream, _)) = self.control.accept() else {
            return;
        };
        let _ = stream.set_read_timeout(Some(CONTROL_READ_TIMEOUT));
        let _ = stream.set_write_timeout(Some(CONTROL_READ_TIMEOUT));
        let mut line = String::new();
        let reply = match BufReader::new((&stream).take(256)).read_line(&mut line) {
            Ok(_) => match self.command(line.trim()) {
                Ok(()) => "ok\n".to_owned(),
                Err(e) => format!("error: {e}\n"),
            },
            Err(e) => format!("error: {e}\n"),
        };
        let _ = (&stream).write_all(reply.as_bytes());
    }

    fn command(&mut self, line: &str) -> Result<(), String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["reopen-log"] => self.log.reopen(),
            ["resize", rows, cols] => {
                let size = |s: &str| s.parse::<u16>().map_err(|_| format!("bad size {s:?}"));
                self.resize(size(rows)?, size(cols)?)
            }
            _ => Err(format!("unknown command {line:?}")),
        }
    }

    fn resize(&self, rows: u16, cols: u16) -> Result<(), String> {
        nix::ioctl_write_ptr_bad!(set_window_size, nix::libc::TIOCSWINSZ, nix::pty::Winsize);
        let master = match (self.tty, self.outputs.first()) {
            (true, Some(master)) => master,
            _ => return Err("the container has no terminal".into()),
        };
        let size = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one Winsize from the pointer, which is
        // valid for the call; the fd is our open pty master.
        unsafe { set_window_size(master.file.as_raw_fd(), &size) }
            .map(drop)
            .map_err(|e| format!("resize terminal: {e}"))
    }

    /// Logs what is left in the outputs and decides how the container ended.
    fn finish(&mut self, status: WaitStatus) -> ExitInfo {
        let finished_at = Utc::now();
        for i in 0..self.outputs.len() {
            while self.outputs[i].open && self.read_once(i) {}
            // Ends a last line without newline even if the pipe stays open
            // in some leftover process.
            if self.outputs[i].open {
                let timestamp = crilog::timestamp(Utc::now());
                self.records.clear();
                self.outputs[i]
                    .splitter
                    .finish(&timestamp, &mut self.records);
                self.log.write(&self.records);
            }
        }
        // The last output to attached clients; then they see EOF.
        let deadline = std::time::Instant::now() + ATTACH_DRAIN;
        for client in self.clients.iter_mut().filter(|c| !c.dead) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let blocking = client.stream.set_nonblocking(false).is_ok()
                && client
                    .stream
                    .set_write_timeout(Some(left.max(Duration::from_millis(1))))
                    .is_ok();
            if blocking {
                let _ = (&client.stream).write_all(&client.pending);
            }
        }
        self.clients.clear();
        let (exit_code, signal) = match status {
            WaitStatus::Signaled(_, signal, _) => (128 + signal as i32, Some(signal as i32)),
            WaitStatus::Exited(_, code) => (code, None),
            _ => (-1, None),
        };
        let oom_killed = self.oom.as_ref().is_some_and(|(file, before)| {
            oom::read_kills(file).is_some_and(|after| after > *before)
        });
        let reason = if oom_killed {
            ExitReason::OomKilled
        } else if exit_code == 0 {
            ExitReason::Completed
        } else {
            ExitReason::Error
        };
        ExitInfo {
            exit_code,
            signal,
            finished_at,
            oom_killed,
            reason,
            message: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn runtime_error_prefers_the_log() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(RUNTIME_LOG),
            "{\"level\":\"info\",\"msg\":\"x\"}\n{\"level\":\"error\",\"msg\":\"bad config\"}\n{\"level\":\"warning\",\"msg\":\"y\"}\n",
        )
        .unwrap();
        let (read, write) = pipe2(OFlag::O_CLOEXEC).unwrap();
        File::from(write).write_all(b"stderr text\n").unwrap();
        let status = Command::new("false").status().unwrap();
        assert_eq!(runtime_error(dir.path(), read, status), "bad config");

        fs::remove_file(dir.path().join(RUNTIME_LOG)).unwrap();
        let (read, write) = pipe2(OFlag::O_CLOEXEC).unwrap();
        File::from(write).write_all(b"stderr text\n").unwrap();
        assert_eq!(runtime_error(dir.path(), read, status), "stderr text");

        let (read, _write) = pipe2(OFlag::O_CLOEXEC).unwrap();
        let message = runtime_error(dir.path(), read, status);
        assert!(message.contains("exit status: 1"), "{message}");
    }

    #[test]
    fn write_atomic_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!dir.path().join("f.tmp").exists());
    }
}
