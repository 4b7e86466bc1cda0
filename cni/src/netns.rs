//! Entering the container's network namespace for the few things that must
//! run inside it (opening its rtnetlink socket, writing its sysctls).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use nix::sched::{setns, CloneFlags};

/// Runs `f` with the calling thread inside `target`, then returns to the
/// namespace it came from, even if `f` fails.
///
/// The plugin is single-threaded, so switching the thread switches the
/// process; nothing else runs meanwhile.
pub fn within<T>(target: &File, f: impl FnOnce() -> T) -> io::Result<T> {
    let home = File::open("/proc/thread-self/ns/net")?;
    setns(target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let out = f();
    setns(home.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    Ok(out)
}

/// Writes a sysctl under `/proc/sys/net` of the current namespace, e.g.
/// `ipv4/ip_forward`. Skips the write when the value is already set, which
/// also keeps us working where `/proc/sys` is read-only but already right.
pub fn set_sysctl(key: &str, value: &str) -> io::Result<()> {
    let path = format!("/proc/sys/net/{key}");
    match std::fs::read_to_string(&path) {
        Ok(current) if current.trim() == value => Ok(()),
        _ => std::fs::write(&path, value)
            .map_err(|e| io::Error::new(e.kind(), format!("write {value} to {path}: {e}"))),
    }
}
