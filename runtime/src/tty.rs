//! Foreground `run -t` / `exec -t` without `--console-socket`: like runc, we
//! take the pty master from the container ourselves and relay it to our own
//! terminal until the process exits.

use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::cmsg_space;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::sys::termios::{self, SetArg, Termios};

#[derive(Debug, thiserror::Error)]
pub enum TtyError {
    #[error("console socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("receiving the pty master: {0}")]
    Receive(String),
}

/// A listening console socket in a private directory.
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    pub fn bind(dir: &Path) -> Result<Self, TtyError> {
        let path = dir.join("console.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| TtyError::Socket {
            path: path.clone(),
            source,
        })?;
        Ok(Self { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the container to send its pty master (SCM_RIGHTS).
    pub fn receive_master(&self) -> Result<OwnedFd, TtyError> {
        let (stream, _) = self.listener.accept().map_err(|source| TtyError::Socket {
            path: self.path.clone(),
            source,
        })?;
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .map_err(|e| TtyError::Receive(e.to_string()))?;
        let cmsgs = msg.cmsgs().map_err(|e| TtyError::Receive(e.to_string()))?;
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(fds) = c {
                if let Some(&fd) = fds.first() {
                    // SAFETY: the kernel just installed this descriptor for us
                    // via SCM_RIGHTS; nothing else owns it.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(TtyError::Receive("no file descriptor in message".into()))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Puts our stdin in raw mode while relaying; restores it on drop.
struct RawMode(Option<Termios>);

impl RawMode {
    fn enter() -> Self {
        let stdin = std::io::stdin();
        match termios::tcgetattr(stdin.as_fd()) {
            Ok(orig) => {
                let mut raw = orig.clone();
                termios::cfmakeraw(&mut raw);
                let _ = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw);
                Self(Some(orig))
            }
            Err(_) => Self(None),
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(orig) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, orig);
        }
    }
}

/// Relays stdin → master and master → stdout until the pty closes (every
/// holder of the slave has exited).
pub fn relay(master: OwnedFd) {
    let _raw = RawMode::enter();
    let mut master = std::fs::File::from(master);
    let stdin = std::io::stdin();
    let mut stdin_open = true;
    let mut buf = [0u8; 8192];
    loop {
        let mut fds = vec![PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        if stdin_open {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            return;
        }
        let master_ev = fds[0].revents().unwrap_or(PollFlags::empty());
        let stdin_ev = fds.get(1).and_then(|f| f.revents());
        drop(fds);
        if master_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                }
            }
        }
        if let Some(ev) = stdin_ev {
            if ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
                match stdin.lock().read(&mut buf) {
                    Ok(0) | Err(_) => stdin_open = false,
                    Ok(n) => {
                        let _ = master.write_all(&buf[..n]);
                    }
                }
            }
        }
    }
}
