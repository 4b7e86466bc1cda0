//! Test fixtures for Bosun: a busybox rootfs, OCI runtime bundles and OCI
//! image layouts, all built locally from Debian packages (no network) and
//! byte-for-byte reproducible, plus a gate for tests that need root and
//! host inspection and cleanup for them ([`host`]).
//!
//! Used by the runtime, cri and cni tests and by the `bosun-testimage` binary.

pub mod bundle;
pub mod critest;
mod error;
pub mod host;
pub mod layout;
pub mod privileged;
pub mod rootfs;

pub use bundle::Bundle;
pub use error::Error;
pub use layout::ImageInfo;
