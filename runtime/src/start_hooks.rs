//! startContainer hooks with the state the runtime spec gives them, and the
//! start signal that reports their failure.
//!
//! libcontainer's init runs startContainer hooks right after the start
//! signal, with the state it snapshotted at clone time ("creating", no pid).
//! runc runs them in init too, after the start signal and before exec, with
//! status "created" and init's pid as the container sees it. We do the same
//! from inside init through our [`Executor`]: its `validate` is the last call
//! init makes into our code before libcontainer waits for the start signal.
//! There we hand that wait to a thread of ours and leave libcontainer's own
//! wait on a socket whose only connection never sends anything. On the start
//! signal the thread runs the hooks with the spec's state, then either
//! answers `start` with the error and exits, or execs the user process,
//! which ends libcontainer's waiting thread with it. The connection to
//! `start` is close-on-exec, so `start` learns the outcome either way.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use libcontainer::container::{Container, ContainerStatus, State};
use libcontainer::notify_socket::NOTIFY_FILE;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use oci_spec::runtime::Spec;

use crate::error::chain;
use crate::Error;

/// The request libcontainer's own start signal sends.
const START: &[u8] = b"start container";
/// libcontainer's notify listener has the lowest free descriptor when it is
/// made; bosun-runc holds only a handful then.
const FD_SCAN_LIMIT: RawFd = 1024;

/// The executor of every container we create: libcontainer's default one,
/// plus the startContainer hooks as described above.
#[derive(Clone)]
pub struct StartHooks {
    id: String,
    /// The user's bundle, as libcontainer records it (canonical).
    bundle: PathBuf,
    /// Descriptors from 3 on that the user process keeps (`--preserve-fds`).
    preserved: RawFd,
}

impl StartHooks {
    pub fn new(id: &str, bundle: &std::path::Path, preserved: RawFd) -> Self {
        StartHooks {
            id: id.to_string(),
            bundle: std::fs::canonicalize(bundle).unwrap_or_else(|_| bundle.to_path_buf()),
            preserved,
        }
    }

    /// Takes over the wait for the start signal; see the module docs.
    fn take_over_start(&self, spec: &Spec) -> Result<(), String> {
        let notify = (3 + self.preserved..FD_SCAN_LIMIT)
            .find(|&fd| is_notify_listener(fd))
            .ok_or("libcontainer's notify socket not found")?;
        let real = fcntl(notify, FcntlArg::F_DUPFD_CLOEXEC(3)).map_err(|e| e.to_string())?;
        // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; we own it.
        let real = UnixListener::from(unsafe { OwnedFd::from_raw_fd(real) });
        let hold = dead_end(notify).map_err(|e| format!("replacing the notify socket: {e}"))?;
        let state = {
            let pid = nix::unistd::getpid().as_raw();
            let mut s = State::new(
                &self.id,
                ContainerStatus::Created,
                Some(pid),
                self.bundle.clone(),
            );
            s.annotations = spec.annotations().clone();
            s
        };
        let spec = spec.clone();
        std::thread::Builder::new()
            .name("start-hooks".into())
            .spawn(move || serve(real, hold, spec, state))
            .map(drop)
            .map_err(|e| format!("starting the startContainer hooks thread: {e}"))
    }
}

impl Executor for StartHooks {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)?;
        let has_hooks = spec
            .hooks()
            .as_ref()
            .and_then(|h| h.start_container().as_ref())
            .is_some_and(|h| !h.is_empty());
        if has_hooks {
            self.take_over_start(spec)
                .map_err(ExecutorValidationError::ArgValidationError)?;
        }
        Ok(())
    }
}

/// Whether `fd` is libcontainer's notify listener: a listening unix socket
/// bound (relative to the container dir) as "notify.sock".
fn is_notify_listener(fd: RawFd) -> bool {
    let Ok(addr) = socket::getsockname::<UnixAddr>(fd) else {
        return false;
    };
    if addr.path() != Some(std::path::Path::new(NOTIFY_FILE)) {
        return false;
    }
    // SAFETY: getsockname just succeeded on `fd`, and init runs one thread
    // here, so it stays open while borrowed.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    socket::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false)
}

/// Puts at `fd` a listening socket holding one connection, whose other end
/// (returned) never writes: libcontainer's wait accepts it and reads forever.
/// It refuses any further connection.
fn dead_end(fd: RawFd) -> nix::Result<OwnedFd> {
    let stream = || {
        socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
    };
    let listener = stream()?;
    // An empty address binds to a fresh abstract name.
    socket::bind(listener.as_raw_fd(), &UnixAddr::new_unnamed())?;
    socket::listen(&listener, Backlog::new(1)?)?;
    let addr: UnixAddr = socket::getsockname(listener.as_raw_fd())?;
    let hold = stream()?;
    socket::connect(hold.as_raw_fd(), &addr)?;
    socket::shutdown(listener.as_raw_fd(), socket::Shutdown::Read)?;
    nix::unistd::dup3(listener.as_fd().as_raw_fd(), fd, OFlag::O_CLOEXEC)?;
    Ok(hold)
}

/// The thread in init: waits for the start signal, runs the hooks, execs.
/// `_hold` keeps libcontainer's thread waiting until the exec or exit ends it.
fn serve(listener: UnixListener, _hold: OwnedFd, spec: Spec, state: State) {
    let mut conn = match listener.accept() {
        Ok((conn, _)) => conn,
        Err(e) => fail(None, &format!("waiting for the start signal: {e}")),
    };
    drop(listener);
    // `start` shuts down its side after the request.
    let mut request = Vec::new();
    let _ = conn.read_to_end(&mut request);
    let hooks = spec
        .hooks()
        .as_ref()
        .and_then(|h| h.start_container().as_ref());
    let env: HashMap<String, String> = std::env::vars().collect();
    if let Err(e) = libcontainer::hooks::run_hooks(hooks, Some(&state), None, None, Some(&env)) {
        fail(Some(conn), &format!("startContainer hook: {}", chain(&e)));
    }
    let executed = DefaultExecutor {}.exec(&spec);
    let err = match executed {
        Ok(()) => "executor returned without exec".to_string(),
        Err(e) => chain(&e),
    };
    fail(Some(conn), &err)
}

/// Reports an init failure to `start` and exits as libcontainer's init does.
fn fail(conn: Option<UnixStream>, msg: &str) -> ! {
    tracing::error!("failed to start container process: {msg}");
    if let Some(mut c) = conn {
        let _ = c.write_all(msg.as_bytes());
    }
    std::process::exit(255)
}

/// Sends the start signal to init, marks the container running, and waits
/// for init's answer: nothing once it has read the signal (or, with
/// startContainer hooks, once it exec'd), else why it failed.
pub fn start(c: &mut Container) -> Result<(), Error> {
    let id = c.id().to_string();
    let err = |msg: String| Error::StartFailed {
        id: id.clone(),
        msg,
    };
    // A socket path may not exceed 108 bytes; the container dir's may.
    let dir = std::fs::File::open(&c.root)
        .map_err(|e| err(format!("opening {}: {e}", c.root.display())))?;
    let path = format!("/proc/self/fd/{}/{NOTIFY_FILE}", dir.as_raw_fd());
    let mut conn = UnixStream::connect(&path)
        .and_then(|mut s| {
            s.write_all(START)
                .and(s.shutdown(Shutdown::Write))
                .map(|()| s)
        })
        .map_err(|e| err(format!("sending the start signal: {e}")))?;
    c.set_status(ContainerStatus::Running)
        .save()
        .map_err(|e| Error::lib("starting", &id, e))?;
    let mut answer = String::new();
    // A reset connection is an init gone without a word: nothing to report.
    let _ = conn.read_to_string(&mut answer);
    if answer.is_empty() {
        Ok(())
    } else {
        Err(err(answer))
    }
}
