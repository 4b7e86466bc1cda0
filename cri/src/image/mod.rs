//! The image service: references, registry pulls, the content store and
//! layer snapshots, and the CRI ImageService semantics over them.

pub mod export;
pub mod import;
pub mod reference;
pub mod registry;
pub mod service;
pub mod store;
pub mod unpack;
