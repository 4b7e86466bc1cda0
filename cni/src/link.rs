//! The seam between network policy and the kernel: the few link, address
//! and route operations the bridge plugin needs, in one namespace.
//!
//! [`crate::rtnl::Rtnl`] speaks rtnetlink; tests drive the policy in
//! [`crate::bridge`] against an in-memory fake.

use std::net::IpAddr;
use std::os::fd::BorrowedFd;

use ipnet::IpNet;

/// A failed kernel operation, naming what was attempted.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct NetError {
    /// What we asked for, e.g. `create veth veth1a2b3c4d`.
    pub op: String,
    /// The errno the kernel answered.
    #[source]
    pub source: std::io::Error,
}

impl NetError {
    /// Wraps an OS error with the operation it failed.
    pub fn new(op: impl Into<String>, source: std::io::Error) -> Self {
        Self {
            op: op.into(),
            source,
        }
    }

    /// The errno, when the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// What the plugin needs to know of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// ifindex.
    pub index: u32,
    /// Device name.
    pub name: String,
    /// MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// ifindex of the bridge it is enslaved to.
    pub master: Option<u32>,
    /// `IFLA_IFALIAS`; ours carry the attachment they belong to.
    pub alias: Option<String>,
    /// Link kind (`bridge`, `veth`, ...), when it has one.
    pub kind: Option<String>,
    /// Administratively up.
    pub up: bool,
}

/// A veth pair whose peer is born inside the container's namespace.
#[derive(Debug)]
pub struct VethSpec<'a> {
    /// Host-side name.
    pub host_name: &'a str,
    /// Name of the end inside the container (CNI_IFNAME).
    pub peer_name: &'a str,
    /// The container's network namespace.
    pub peer_netns: BorrowedFd<'a>,
    /// MTU of both ends.
    pub mtu: Option<u32>,
    /// MAC for the container end (runtimeConfig `mac`).
    pub peer_mac: Option<[u8; 6]>,
    /// Alias for the host end: which attachment owns it.
    pub alias: &'a str,
    /// Bridge to enslave the host end to.
    pub master: u32,
}

/// Link, address and route operations in one network namespace.
pub trait Links {
    /// The link called `name`, if any.
    fn link(&mut self, name: &str) -> Result<Option<Link>, NetError>;
    /// Every link.
    fn links(&mut self) -> Result<Vec<Link>, NetError>;
    /// Creates a bridge; `Ok(false)` if one by that name already existed.
    fn create_bridge(&mut self, name: &str, mtu: Option<u32>) -> Result<bool, NetError>;
    /// Sets the link up, optionally toggling promiscuous mode.
    fn set_up(&mut self, index: u32, promisc: Option<bool>) -> Result<(), NetError>;
    /// Sets the link down and renames it (so its name is free at once).
    fn set_down_and_rename(&mut self, index: u32, name: &str) -> Result<(), NetError>;
    /// Creates the veth pair; the host end is up and enslaved. Returns
    /// the host end.
    fn create_veth(&mut self, spec: &VethSpec<'_>) -> Result<Link, NetError>;
    /// Lets frames leave the bridge port they came in on.
    fn set_hairpin(&mut self, index: u32) -> Result<(), NetError>;
    /// Deletes the link (a veth takes its peer with it).
    fn delete_link(&mut self, index: u32) -> Result<(), NetError>;
    /// Addresses on the link.
    fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, NetError>;
    /// Adds an address without duplicate address detection; present is fine.
    fn add_address(&mut self, index: u32, address: IpNet) -> Result<(), NetError>;
    /// Removes an address.
    fn delete_address(&mut self, index: u32, address: IpNet) -> Result<(), NetError>;
    /// Main-table routes out of the link: (destination, gateway).
    fn routes(&mut self, index: u32) -> Result<Vec<(IpNet, Option<IpAddr>)>, NetError>;
    /// Adds a route out of the link; present is fine.
    fn add_route(&mut self, index: u32, dst: IpNet, gw: Option<IpAddr>) -> Result<(), NetError>;
    /// Adds the addresses, sets the link up, then adds the routes; an
    /// implementation may send them as one batch.
    fn bring_up(
        &mut self,
        index: u32,
        addresses: &[IpNet],
        routes: &[(IpNet, Option<IpAddr>)],
    ) -> Result<(), NetError> {
        for address in addresses {
            self.add_address(index, *address)?;
        }
        self.set_up(index, None)?;
        for (dst, gw) in routes {
            self.add_route(index, *dst, *gw)?;
        }
        Ok(())
    }
}

/// `aa:bb:cc:dd:ee:ff` for a MAC's bytes.
pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case); `None` if malformed.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut out {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_junk() {
        let mac = parse_mac("0A:58:0a:01:00:02").unwrap();
        assert_eq!(format_mac(&mac), "0a:58:0a:01:00:02");
        for bad in [
            "",
            "0a:58",
            "0a:58:0a:01:00:02:03",
            "zz:58:0a:01:00:02",
            "a:58:0a:01:00:02",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
