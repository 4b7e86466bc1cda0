//! One error type for the whole crate: every variant names the path (or the
//! value) that failed, so a broken test fixture says where to look.

use std::path::PathBuf;

/// What went wrong while building a rootfs, bundle or image layout.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed; `action` is a short verb phrase.
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The host's busybox cannot be put into a container rootfs as is.
    #[error("{path} is not usable as a static busybox: {reason}")]
    Busybox { path: PathBuf, reason: String },

    /// A helper program we ran (e.g. `busybox --list`) failed.
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        program: String,
        status: String,
        stderr: String,
    },

    /// A JSON document could not be encoded or parsed.
    #[error("cannot {action} json {path}")]
    Json {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// The rootfs holds something an image layer here cannot carry.
    #[error(
        "unsupported file type at {path}: only files, directories and symlinks go into a layer"
    )]
    UnsupportedFile { path: PathBuf },

    /// The image reference given to [`crate::layout::write`] is unusable.
    #[error("invalid image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
}

impl Error {
    /// Shorthand for the common case, so call sites stay one line.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}
