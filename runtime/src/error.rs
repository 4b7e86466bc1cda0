//! Errors of the runtime. Messages follow runc's where tools match on them
//! ("container does not exist", "container not running", ...) and otherwise name
//! the container, path or value that failed.

use std::path::PathBuf;

use libcontainer::error::LibcontainerError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("container does not exist")]
    NotFound { id: String },
    #[error("container with given ID already exists")]
    Exists { id: String },
    #[error("container not running")]
    NotRunning { id: String },
    #[error("cannot delete container {id} that is not stopped: {status}")]
    NotStopped { id: String, status: String },
    #[error("container {id} is {status}, cannot {op}")]
    WrongStatus {
        id: String,
        status: String,
        op: &'static str,
    },
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
    #[error(transparent)]
    Resources(#[from] crate::resources::ResourcesError),
    #[error(transparent)]
    Tty(#[from] crate::tty::TtyError),
    #[error(transparent)]
    Propagation(#[from] crate::propagation::PropagationError),
    #[error("starting container {id}: {msg}")]
    StartFailed { id: String, msg: String },
    #[error("{op} container {id}: {}", runc_wording(&chain(source.as_ref())))]
    Libcontainer {
        op: &'static str,
        id: String,
        source: Box<LibcontainerError>,
    },
    #[error("{op} container {id}: {}", chain(source.as_ref()))]
    Cgroup {
        op: &'static str,
        id: String,
        source: Box<libcgroups::common::AnyManagerError>,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        source: nix::Error,
    },
}

impl Error {
    pub fn lib(op: &'static str, id: &str, source: LibcontainerError) -> Self {
        Error::Libcontainer {
            op,
            id: id.to_string(),
            source: Box::new(source),
        }
    }

    pub fn cgroup(op: &'static str, id: &str, source: libcgroups::common::AnyManagerError) -> Self {
        Error::Cgroup {
            op,
            id: id.to_string(),
            source: Box::new(source),
        }
    }

    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// Joins an error and its sources into one line, as Go's wrapped errors read,
/// skipping links that only repeat the next one.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![err.to_string()];
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if parts.last().is_none_or(|last| !last.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    parts.join(": ")
}

/// Rewords libcontainer's exec failures the way runc says them: podman maps
/// "executable file not found" / "no such file or directory" to exit 127 and
/// "permission denied" to 126.
pub fn runc_wording(msg: &str) -> String {
    let msg = msg.replace(
        "failed to create container: exec process failed with error error in executing process : ",
        "unable to start container process: ",
    );
    let msg = msg.as_str();
    let Some(start) = msg.find("executable '") else {
        return msg.to_string();
    };
    let rest = &msg[start + "executable '".len()..];
    let Some(end) = rest.find('\'') else {
        return msg.to_string();
    };
    let (name, tail) = (&rest[..end], &rest[end..]);
    let head = &msg[..start];
    if tail.starts_with("' not found") {
        if name.contains('/') {
            format!("{head}exec: \"{name}\": stat {name}: no such file or directory")
        } else {
            format!("{head}exec: \"{name}\": executable file not found in $PATH")
        }
    } else if tail.contains("does not have correct permissions") {
        format!("{head}exec: \"{name}\": permission denied")
    } else {
        msg.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_joins_sources() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }

    #[test]
    fn not_found_worded_as_runc() {
        assert_eq!(
            runc_wording("failed: executable 'foo' not found in $PATH"),
            "failed: exec: \"foo\": executable file not found in $PATH"
        );
        assert_eq!(
            runc_wording("failed: executable '/x' not found in $PATH"),
            "failed: exec: \"/x\": stat /x: no such file or directory"
        );
        assert_eq!(
            runc_wording("e: executable '/etc/passwd' at path '\"/etc/passwd\"' does not have correct permissions"),
            "e: exec: \"/etc/passwd\": permission denied"
        );
        assert_eq!(runc_wording("other"), "other");
        assert_eq!(
            runc_wording("creating container c: failed to create container: exec process failed with error error in executing process : executable 'x' not found in $PATH"),
            "creating container c: unable to start container process: exec: \"x\": executable file not found in $PATH"
        );
    }

    #[test]
    fn runc_messages_kept() {
        let e = Error::NotFound { id: "x".into() };
        assert_eq!(e.to_string(), "container does not exist");
        let e = Error::NotStopped {
            id: "x".into(),
            status: "running".into(),
        };
        assert_eq!(
            e.to_string(),
            "cannot delete container x that is not stopped: running"
        );
    }
}
