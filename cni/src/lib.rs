//! `bosun-cni`: a CNI 1.1 plugin for bridge networking with host-local
//! style IPAM built in, IP masquerade, host ports and bandwidth limits.
//!
//! Pure policy is unit-tested without root: netconf parsing ([`netconf`]),
//! the `CNI_*` environment ([`env`]), results and errors ([`result`],
//! [`error`]), IP allocation over a small [`ipam::Store`] trait ([`ipam`]),
//! what a bridge attachment consists of over the [`link::Links`] trait
//! ([`bridge`]), and the nftables rules ([`nat`]). The kernel sits behind
//! those traits: rtnetlink ([`rtnl`]), nftables ([`nat::Nft`]), the file
//! store ([`store`]); [`plugin`] wires the verbs together.

pub mod bridge;
pub mod env;
pub mod error;
pub mod ipam;
pub mod link;
pub mod nat;
pub mod netconf;
pub mod netns;
pub mod plugin;
pub mod result;
pub mod rtnl;
pub mod shaping;
pub mod store;

pub use error::CniError;

/// FNV-1a over the parts (each followed by a NUL): a stable, short name
/// for things the kernel limits in length (chains, files). Not a defence
/// against anyone; collisions only need to be unlikely among one node's
/// attachments.
pub fn short_hash<S: AsRef<str>>(parts: &[S]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.as_ref().bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}
