//! bosun-cri: the CRI server and its parts.
//!
//! - [`image`]: pulls from OCI registries into a crash-safe content store
//!   and overlayfs-ready layer snapshots, with CRI ImageService semantics;
//! - [`sandbox`]: a pod's pinned namespaces, files and CNI attachment;
//! - [`spec`]: the OCI runtime spec of a CRI container;
//! - [`monitor`]: the per-container monitor that owns stdio and logs;
//! - [`server`]: the `bosun-cri` daemon serving CRI v1 over gRPC;
//! - [`client`]: a channel to a CRI socket, for clients.

pub mod client;
pub mod image;
pub mod monitor;
pub mod sandbox;
pub mod server;
pub mod spec;
