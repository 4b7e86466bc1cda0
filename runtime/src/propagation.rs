//! Mount propagation that libcontainer 0.7 drops: it passes MS_SHARED/MS_SLAVE/
//! MS_PRIVATE/MS_UNBINDABLE in the same mount(2) call as MS_BIND, where the
//! kernel ignores them. runc makes a second, propagation-only call; so do we,
//! after create (the init process is still waiting for `start`), from a child
//! that enters the container's mount namespace.

use std::path::PathBuf;

use nix::mount::MsFlags;
use oci_spec::runtime::Spec;

/// The propagation-only mount(2) calls a spec's mounts ask for, in order;
/// one per option, since the kernel takes one propagation type per call.
pub fn fixes(spec: &Spec) -> Vec<(PathBuf, MsFlags)> {
    let mut out = Vec::new();
    for m in spec.mounts().iter().flatten() {
        for o in m.options().iter().flatten() {
            let flags = match o.as_str() {
                "shared" => MsFlags::MS_SHARED,
                "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
                "slave" => MsFlags::MS_SLAVE,
                "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
                "private" => MsFlags::MS_PRIVATE,
                "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
                "unbindable" => MsFlags::MS_UNBINDABLE,
                "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
                _ => continue,
            };
            out.push((m.destination().clone(), flags));
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum PropagationError {
    #[error("setting mount propagation of {dest}: {reason}")]
    Apply { dest: String, reason: String },
    #[error("setting mount propagation: {0}")]
    Child(String),
}

/// Applies `fixes` inside the mount namespace of `pid`.
pub fn apply(pid: i32, fixes: &[(PathBuf, MsFlags)]) -> Result<(), PropagationError> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    use std::io::{Read, Write};

    if fixes.is_empty() {
        return Ok(());
    }
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))
        .map_err(|e| PropagationError::Child(format!("opening mount namespace of {pid}: {e}")))?;
    let (mut rx, mut tx) =
        std::io::pipe().map_err(|e| PropagationError::Child(format!("pipe: {e}")))?;
    // SAFETY: this process is single-threaded here (libcontainer's create has
    // returned and we start no threads), so the child may allocate freely.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(rx);
            let result = (|| -> Result<(), String> {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS)
                    .map_err(|e| format!("entering mount namespace: {e}"))?;
                for (dest, flags) in fixes {
                    nix::mount::mount(None::<&str>, dest, None::<&str>, *flags, None::<&str>)
                        .map_err(|e| format!("{}\0{e}", dest.display()))?;
                }
                Ok(())
            })();
            let code = match result {
                Ok(()) => 0,
                Err(msg) => {
                    let _ = tx.write_all(msg.as_bytes());
                    1
                }
            };
            // SAFETY: leave the forked child without running the parent's
            // atexit handlers or destructors.
            unsafe { nix::libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(tx);
            let mut msg = String::new();
            let _ = rx.read_to_string(&mut msg);
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, 0)) => Ok(()),
                _ => Err(match msg.split_once('\0') {
                    Some((dest, reason)) => PropagationError::Apply {
                        dest: dest.to_string(),
                        reason: reason.to_string(),
                    },
                    None => PropagationError::Child(msg),
                }),
            }
        }
        Err(e) => Err(PropagationError::Child(format!("fork: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_propagation_options_count() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/a", "type": "bind", "source": "/x", "options": ["rbind", "rshared"]},
                {"destination": "/b", "type": "bind", "source": "/y", "options": ["bind", "ro"]},
                {"destination": "/c", "type": "bind", "source": "/z", "options": ["bind", "slave", "unbindable"]}
            ]
        }))
        .unwrap_or_default();
        let f = fixes(&spec);
        assert_eq!(
            f,
            vec![
                (PathBuf::from("/a"), MsFlags::MS_SHARED | MsFlags::MS_REC),
                (PathBuf::from("/c"), MsFlags::MS_SLAVE),
                (PathBuf::from("/c"), MsFlags::MS_UNBINDABLE),
            ]
        );
    }
}
