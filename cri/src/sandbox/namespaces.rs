//! A pod's namespaces, held without a process where the kernel allows it.
//!
//! Net, IPC and UTS namespaces are *pinned*: a throw-away thread
//! `unshare`s them and bind-mounts `/proc/thread-self/ns/<kind>` onto
//! `<root>/<sandbox-id>/<kind>`, exactly as `ip netns add` does. The bind
//! mount keeps the namespace alive with no process in it, survives a
//! `kill -9` of the daemon (it lives in the host's mount table, and the
//! paths are derived from the sandbox ID, so a restarted daemon finds them
//! again), and containers join it by path. `<root>` is made a shared mount
//! point so that unmounting also removes the copies containers' mount
//! namespaces made of it; otherwise those copies would keep the namespace
//! alive after teardown.
//!
//! A PID namespace cannot be held that way: once its init (PID 1) exits
//! the namespace is dead, and a process that `setns`es into it can no
//! longer fork (`ENOMEM`), so a pinned file alone cannot give later
//! containers a shared PID namespace (checked in `cri/tests/sandbox.rs`).
//! For `NamespaceMode::POD` PIDs we therefore start a minimal infra
//! process ([`spawn_infra`]): PID 1 of a new PID namespace that only reaps
//! orphans, with its namespace also pinned so teardown can tell it from an
//! unrelated process that reused its PID after a restart.
//!
//! Measured here (2 cores, kernel 6.18, debug build, `cargo test
//! -p bosun-cri --test sandbox measure -- --ignored --nocapture`), medians
//! of 20 over three runs, net+ipc+uts: pinning, loopback up included,
//! 1.1–1.4 ms to create and 0.4–0.6 ms to remove (three unmounts, unlinks);
//! an infra process in the same new namespaces 0.7–0.8 ms to start plus
//! 0.5–0.8 ms to bring its loopback up, and 0.1–0.2 ms to kill and reap.
//! So creation costs the same (the kernel builds the namespaces either
//! way), removal differs by a few tenths of a millisecond, and both vanish
//! next to a CNI ADD (tens of ms). What decides is state: pinned files need
//! no process per pod — no PID, no memory, nothing to reap, nothing to
//! re-adopt or mistake for a recycled PID after a daemon restart — so the
//! infra process is used only where the kernel requires a live PID 1.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bosun_cni::link::Links;
use bosun_cni::rtnl::Rtnl;
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// A failed namespace operation, naming the path or step.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    /// A syscall or file operation on `path` failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted, e.g. `bind-mount namespace onto`.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Bringing loopback up in the new network namespace failed.
    #[error("set lo up in {path}: {source}")]
    Loopback {
        /// The pinned netns.
        path: PathBuf,
        /// The netlink error.
        #[source]
        source: bosun_cni::link::NetError,
    },
    /// A helper thread panicked (a bug, reported rather than propagated).
    #[error("namespace helper thread for {0} panicked")]
    Thread(PathBuf),
}

fn io_err(op: &'static str, path: &Path, source: impl Into<io::Error>) -> NsError {
    NsError::Io {
        op,
        path: path.to_owned(),
        source: source.into(),
    }
}

/// The namespaces that can be pinned as files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NsKind {
    /// Network.
    Net,
    /// System V IPC and POSIX message queues.
    Ipc,
    /// Hostname and domain name.
    Uts,
}

impl NsKind {
    /// The name under `/proc/<pid>/ns/`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Net => "net",
            Self::Ipc => "ipc",
            Self::Uts => "uts",
        }
    }

    /// The `CLONE_NEW*` flag.
    pub fn flag(self) -> CloneFlags {
        match self {
            Self::Net => CloneFlags::CLONE_NEWNET,
            Self::Ipc => CloneFlags::CLONE_NEWIPC,
            Self::Uts => CloneFlags::CLONE_NEWUTS,
        }
    }
}

/// File name of the pinned PID namespace of an infra process.
const PID_FILE: &str = "pid";

/// A sandbox's pinned namespaces: one file per kind in `dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedNamespaces {
    /// `<root>/<sandbox-id>`.
    pub dir: PathBuf,
    /// Which kinds are pinned there.
    pub kinds: Vec<NsKind>,
}

impl PinnedNamespaces {
    /// The file holding `kind`, if it is one of ours.
    pub fn path(&self, kind: NsKind) -> Option<PathBuf> {
        self.kinds
            .contains(&kind)
            .then(|| self.dir.join(kind.name()))
    }
}

/// Makes `root` a shared mount point (bind-mounting it onto itself first if
/// it is not a mount point), as `ip netns` does for `/run/netns`.
pub fn ensure_shared_root(root: &Path) -> Result<(), NsError> {
    fs::create_dir_all(root).map_err(|e| io_err("create", root, e))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    match mount(None::<&str>, root, None::<&str>, shared, None::<&str>) {
        Ok(()) => Ok(()),
        // EINVAL: not a mount point yet.
        Err(Errno::EINVAL) => {
            mount(
                Some(root),
                root,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| io_err("bind-mount onto itself", root, e))?;
            mount(None::<&str>, root, None::<&str>, shared, None::<&str>)
                .map_err(|e| io_err("make shared", root, e))
        }
        Err(e) => Err(io_err("make shared", root, e)),
    }
}

/// Creates new namespaces of `kinds` and pins them under `<root>/<id>/`;
/// a new network namespace gets loopback up. On failure nothing is left.
pub fn pin(root: &Path, id: &str, kinds: &[NsKind]) -> Result<PinnedNamespaces, NsError> {
    ensure_shared_root(root)?;
    let pinned = PinnedNamespaces {
        dir: root.join(id),
        kinds: kinds.to_vec(),
    };
    let outcome = create_pinned(&pinned);
    if outcome.is_err() {
        let _ = unpin(&pinned.dir);
    }
    outcome.map(|()| pinned)
}

fn create_pinned(pinned: &PinnedNamespaces) -> Result<(), NsError> {
    fs::create_dir_all(&pinned.dir).map_err(|e| io_err("create", &pinned.dir, e))?;
    for kind in &pinned.kinds {
        let file = pinned.dir.join(kind.name());
        File::create(&file).map_err(|e| io_err("create", &file, e))?;
    }
    let flags = pinned
        .kinds
        .iter()
        .fold(CloneFlags::empty(), |f, k| f | k.flag());
    // A fresh thread, because unshare moves the calling thread for good;
    // it ends (and drops the namespaces' last user) once the mounts hold them.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                unshare(flags).map_err(|e| io_err("unshare namespaces for", &pinned.dir, e))?;
                for kind in &pinned.kinds {
                    let source = format!("/proc/thread-self/ns/{}", kind.name());
                    let target = pinned.dir.join(kind.name());
                    mount(
                        Some(source.as_str()),
                        &target,
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    )
                    .map_err(|e| io_err("bind-mount namespace onto", &target, e))?;
                }
                if pinned.kinds.contains(&NsKind::Net) {
                    loopback_up().map_err(|source| NsError::Loopback {
                        path: pinned.dir.join("net"),
                        source,
                    })?;
                }
                Ok(())
            })
            .join()
            .map_err(|_| NsError::Thread(pinned.dir.clone()))?
    })
}

fn loopback_up() -> Result<(), bosun_cni::link::NetError> {
    let mut rtnl = Rtnl::open()?;
    if let Some(lo) = rtnl.link("lo")? {
        rtnl.set_up(lo.index, None)?;
    }
    Ok(())
}

/// Unmounts and deletes every namespace file in `dir`, then `dir`.
/// Idempotent: missing files and directories are fine. Keeps going past a
/// failure and reports every one.
pub fn unpin(dir: &Path) -> Result<(), Vec<NsError>> {
    let mut errors = Vec::new();
    for name in ["net", "ipc", "uts", PID_FILE] {
        let file = dir.join(name);
        if let Err(err) = unmount_and_remove(&file) {
            errors.push(err);
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            errors.push(io_err("remove", dir, e));
        }
        _ => {}
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Lazily unmounts `path` (EINVAL: not mounted, ENOENT: gone — both fine)
/// and unlinks it.
pub(crate) fn unmount_and_remove(path: &Path) -> Result<(), NsError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(io_err("unmount", path, e)),
    }
    let removed = if path.is_dir() {
        fs::remove_dir(path)
    } else {
        fs::remove_file(path)
    };
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", path, e)),
        _ => Ok(()),
    }
}

/// Runs `f` on a throw-away thread that has joined the namespaces in
/// `targets` (file, kind): for work that must happen inside them, such as
/// writing their sysctls or setting the hostname.
pub fn within<T: Send>(
    targets: &[(&Path, NsKind)],
    f: impl FnOnce() -> T + Send,
) -> Result<T, NsError> {
    let label = targets.first().map(|t| t.0).unwrap_or(Path::new("/"));
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                for (path, kind) in targets {
                    let file = File::open(path).map_err(|e| io_err("open namespace", path, e))?;
                    setns(file.as_fd(), kind.flag())
                        .map_err(|e| io_err("join namespace", path, e))?;
                }
                Ok(f())
            })
            .join()
            .map_err(|_| NsError::Thread(label.to_owned()))?
    })
}

/// The infra process holding a shared PID namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Infra {
    /// Its PID in the daemon's PID namespace.
    pub pid: i32,
    /// Its PID namespace, pinned: what containers join, and how teardown
    /// recognises the process after a restart.
    pub pid_ns: PathBuf,
}

/// Starts the infra process: PID 1 of a new PID namespace, doing nothing
/// but reaping, with stdio on `/dev/null` and no inherited descriptors.
/// Its PID namespace is pinned at `<dir>/pid`.
pub fn spawn_infra(dir: &Path) -> Result<Infra, NsError> {
    fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
    let devnull = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| io_err("open", Path::new("/dev/null"), e))?;
    let null_fd = std::os::fd::AsRawFd::as_raw_fd(&devnull);
    let mut stack = vec![0u8; 64 * 1024];
    let child = Box::new(move || infra_main(null_fd));
    // SAFETY: without CLONE_VM the child gets a copy of our memory, like
    // fork; `infra_main` only makes async-signal-safe syscalls and never
    // returns into Rust code of the parent's threads. `stack` outlives the
    // call in the parent and is copied into the child.
    let pid = unsafe {
        nix::sched::clone(
            child,
            &mut stack,
            CloneFlags::CLONE_NEWPID,
            Some(Signal::SIGCHLD as i32),
        )
    }
    .map_err(|e| io_err("start infra process in", dir, e))?;
    let infra = Infra {
        pid: pid.as_raw(),
        pid_ns: dir.join(PID_FILE),
    };
    let pinned = File::create(&infra.pid_ns)
        .map_err(|e| io_err("create", &infra.pid_ns, e))
        .and_then(|_| {
            let source = format!("/proc/{}/ns/pid", infra.pid);
            mount(
                Some(source.as_str()),
                &infra.pid_ns,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| io_err("bind-mount pid namespace onto", &infra.pid_ns, e))
        });
    if let Err(err) = pinned {
        let _ = kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
        let _ = unmount_and_remove(&infra.pid_ns);
        return Err(err);
    }
    Ok(infra)
}

/// The body of the infra process (PID 1 of its namespace).
fn infra_main(null_fd: i32) -> isize {
    use nix::libc;
    // SAFETY: plain syscalls on integers; in a fresh clone child with a copy
    // of the parent's memory, nothing else runs in this process.
    unsafe {
        libc::setsid();
        for fd in 0..3 {
            libc::dup2(null_fd, fd);
        }
        // close_range(3, ~0, 0): drop the daemon's sockets and files.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        let mut wanted: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut wanted);
        for sig in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut wanted, sig);
        }
        loop {
            let mut sig = 0;
            if libc::sigwait(&wanted, &mut sig) != 0 {
                continue;
            }
            if sig != libc::SIGCHLD {
                libc::_exit(0);
            }
            while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
        }
    }
}

/// Stops the infra process if it is still the one whose PID namespace is
/// pinned (after a restart its PID may belong to someone else), reaps it
/// when it is our child, and unpins its namespace. Idempotent.
pub fn stop_infra(infra: &Infra) -> Result<(), NsError> {
    let pid = Pid::from_raw(infra.pid);
    let ours = same_file(
        &infra.pid_ns,
        Path::new(&format!("/proc/{}/ns/pid", infra.pid)),
    );
    if ours {
        // Killing PID 1 takes every other process in the namespace with it.
        match kill(pid, Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => return Err(io_err("kill infra process", &infra.pid_ns, e)),
        }
        reap(pid);
    }
    unmount_and_remove(&infra.pid_ns)
}

/// The infra process whose PID namespace is pinned in `dir`, found by
/// scanning `/proc`: for a setup that died between starting it and the
/// daemon persisting its PID.
pub fn find_infra(dir: &Path) -> Option<Infra> {
    let pid_ns = dir.join(PID_FILE);
    fs::metadata(&pid_ns).ok()?;
    fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            // PID 1 of that namespace: the last NSpid entry is 1.
            same_file(&pid_ns, Path::new(&format!("/proc/{pid}/ns/pid")))
                && fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .and_then(|ids| ids.split_whitespace().last())
                        == Some("1")
                })
        })
        .map(|pid| Infra { pid, pid_ns })
}

/// Waits briefly for `pid` if it is our child; a process we did not start
/// (re-parented after a restart) is reaped by its new parent.
fn reap(pid: Pid) {
    for _ in 0..200 {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(5)),
            _ => return,
        }
    }
}

/// Whether two paths name the same namespace (device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
