//! bosun-cri: the CRI server's library. So far the image service: pulling
//! from OCI registries into a crash-safe content store and overlayfs-ready
//! layer snapshots, with CRI ImageService semantics (see `image::service`).

pub mod image;
pub mod monitor;
pub mod sandbox;
pub mod server;
pub mod spec;
