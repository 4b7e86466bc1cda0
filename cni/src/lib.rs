//! Pure foundations of the `bosun-cni` plugin (CNI spec 1.1).
//!
//! What lives here decides without touching the kernel, so it is unit-tested
//! without root: parsing and validating a bridge netconf ([`netconf`]), the
//! spec's error JSON ([`error`]), host-local style IP allocation over a small
//! [`ipam::Store`] trait ([`ipam`]) and the on-disk store with host-local's
//! layout ([`store`]). The plugin binary and the netlink side come later.

pub mod error;
pub mod ipam;
pub mod netconf;
pub mod store;

pub use error::CniError;
