//! Bridge-mode policy: what ADD builds, what DEL takes apart and what CHECK
//! compares, over [`Links`] for the node and the container side.

use std::net::IpAddr;
use std::os::fd::BorrowedFd;

use ipnet::IpNet;

use crate::ipam::Assigned;
use crate::link::{Link, Links, NetError, VethSpec};
use crate::netconf::NetConf;
use crate::result::{CniResult, Interface, IpConfig, RouteConfig};

/// Why bridge setup failed.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The kernel refused an operation.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A link with the bridge's name exists but is something else.
    #[error("link {0} exists but is not a bridge")]
    NotABridge(String),
    /// The bridge holds another address in the gateway's subnet.
    #[error("bridge {bridge} already has {existing} in the subnet of gateway {gateway}; set forceAddress to replace it")]
    AddressConflict {
        /// Bridge name.
        bridge: String,
        /// The address found.
        existing: IpNet,
        /// The gateway we wanted.
        gateway: IpNet,
    },
    /// The container already has an interface by that name.
    #[error("container already has an interface named {0}")]
    IfnameTaken(String),
    /// A link we just created is not there.
    #[error("link {0} vanished while being set up")]
    Vanished(String),
}

/// Prefix of the alias on every host-side veth we create; the rest names
/// the attachment, which is how GC finds what a killed ADD left behind.
pub const ALIAS_PREFIX: &str = "bosun-cni";

/// The alias of the host veth of (`network`, `id`, `ifname`).
pub fn alias(network: &str, id: &str, ifname: &str) -> String {
    format!("{ALIAS_PREFIX}/{network}/{id}/{ifname}")
}

/// Splits an alias made by [`alias`] into (network, id, ifname).
pub fn parse_alias(alias: &str) -> Option<(&str, &str, &str)> {
    let rest = alias.strip_prefix(ALIAS_PREFIX)?.strip_prefix('/')?;
    let mut parts = rest.splitn(3, '/');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// Everything ADD needs besides the two namespaces.
#[derive(Debug)]
pub struct AddParams<'a> {
    /// The validated netconf.
    pub conf: &'a NetConf,
    /// CNI_CONTAINERID.
    pub container_id: &'a str,
    /// CNI_IFNAME.
    pub ifname: &'a str,
    /// CNI_NETNS, for the result's `sandbox`.
    pub netns_path: &'a str,
    /// The open netns.
    pub netns: BorrowedFd<'a>,
    /// Addresses from IPAM.
    pub assigned: &'a [Assigned],
    /// Name for the host end of the veth.
    pub host_veth: &'a str,
    /// runtimeConfig `mac`.
    pub mac: Option<[u8; 6]>,
}

/// Makes sure the bridge exists, is up and (in gateway mode) holds the
/// gateway addresses.
pub fn ensure_bridge<L: Links>(
    host: &mut L,
    conf: &NetConf,
    assigned: &[Assigned],
) -> Result<Link, BridgeError> {
    let name = conf.bridge.as_str();
    let bridge = match host.link(name)? {
        Some(link) => link,
        None => {
            host.create_bridge(name, conf.mtu)?;
            host.link(name)?
                .ok_or_else(|| BridgeError::Vanished(name.to_owned()))?
        }
    };
    if bridge.kind.as_deref() != Some("bridge") {
        return Err(BridgeError::NotABridge(name.to_owned()));
    }
    if !bridge.up || conf.promisc_mode {
        host.set_up(bridge.index, conf.promisc_mode.then_some(true))?;
    }
    if conf.is_gateway || conf.is_default_gateway {
        let existing = host.addresses(bridge.index)?;
        for gateway in gateways(assigned) {
            ensure_gateway_address(host, conf, &bridge, &existing, gateway)?;
        }
    }
    Ok(bridge)
}

fn gateways(assigned: &[Assigned]) -> impl Iterator<Item = IpNet> + '_ {
    assigned.iter().filter_map(|a| {
        a.gateway
            .and_then(|gw| IpNet::new(gw, a.address.prefix_len()).ok())
    })
}

fn ensure_gateway_address<L: Links>(
    host: &mut L,
    conf: &NetConf,
    bridge: &Link,
    existing: &[IpNet],
    gateway: IpNet,
) -> Result<(), BridgeError> {
    if existing.contains(&gateway) {
        return Ok(());
    }
    for other in existing {
        let same_subnet = other.addr().is_ipv4() == gateway.addr().is_ipv4()
            && !is_link_local(other.addr())
            && other.trunc() == gateway.trunc();
        if same_subnet {
            if !conf.force_address {
                return Err(BridgeError::AddressConflict {
                    bridge: bridge.name.clone(),
                    existing: *other,
                    gateway,
                });
            }
            host.delete_address(bridge.index, *other)?;
        }
    }
    host.add_address(bridge.index, gateway)?;
    Ok(())
}

/// fe80::/10: the kernel's own, never a conflict with a gateway.
fn is_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// The routes the container gets: a default route per family via its
/// gateway when `isDefaultGateway`, then IPAM's routes (via the family's
/// gateway unless the route names one).
pub fn container_routes(conf: &NetConf, assigned: &[Assigned]) -> Vec<RouteConfig> {
    let gateway_for = |v4: bool| {
        assigned
            .iter()
            .find(|a| a.address.addr().is_ipv4() == v4)
            .and_then(|a| a.gateway)
    };
    let mut routes: Vec<RouteConfig> = Vec::new();
    if conf.is_default_gateway {
        for a in assigned {
            if let Some(gw) = a.gateway {
                let dst = if gw.is_ipv4() {
                    IpNet::V4(ipnet::Ipv4Net::default())
                } else {
                    IpNet::V6(ipnet::Ipv6Net::default())
                };
                routes.push(RouteConfig { dst, gw: Some(gw) });
            }
        }
    }
    for route in conf.routes() {
        let gw = route.gw.or_else(|| gateway_for(route.dst.addr().is_ipv4()));
        let candidate = RouteConfig { dst: route.dst, gw };
        if !routes.iter().any(|r| r.dst == candidate.dst) {
            routes.push(candidate);
        }
    }
    routes
}

/// ADD: bridge, veth pair with the peer born in the container, addresses,
/// routes. If a step after the veth exists fails, the veth is deleted again.
pub fn add<H: Links, C: Links>(
    host: &mut H,
    pod: &mut C,
    params: &AddParams<'_>,
) -> Result<CniResult, BridgeError> {
    let conf = params.conf;
    let bridge = ensure_bridge(host, conf, params.assigned)?;
    let alias = alias(&conf.name, params.container_id, params.ifname);
    let created = host.create_veth(&VethSpec {
        host_name: params.host_veth,
        peer_name: params.ifname,
        peer_netns: params.netns,
        mtu: conf.mtu,
        peer_mac: params.mac,
        alias: &alias,
        master: bridge.index,
    });
    // Asking first would cost a round trip on every ADD; a clash shows up
    // as EEXIST here (the host name is random, so it is the pod's).
    let veth = match created {
        Ok(veth) => veth,
        Err(err)
            if err.errno() == Some(nix::libc::EEXIST) && pod.link(params.ifname)?.is_some() =>
        {
            return Err(BridgeError::IfnameTaken(params.ifname.to_owned()))
        }
        Err(err) => return Err(err.into()),
    };
    match configure(host, pod, params, bridge, veth) {
        Ok(result) => Ok(result),
        Err(err) => {
            if let Ok(Some(veth)) = host.link(params.host_veth) {
                let _ = host.delete_link(veth.index);
            }
            Err(err)
        }
    }
}

fn configure<H: Links, C: Links>(
    host: &mut H,
    pod: &mut C,
    params: &AddParams<'_>,
    bridge: Link,
    veth: Link,
) -> Result<CniResult, BridgeError> {
    if params.conf.hairpin_mode {
        host.set_hairpin(veth.index)?;
    }
    let inner = pod
        .link(params.ifname)?
        .ok_or_else(|| BridgeError::Vanished(params.ifname.to_owned()))?;
    let addresses: Vec<IpNet> = params.assigned.iter().map(|a| a.address).collect();
    let routes = container_routes(params.conf, params.assigned);
    let route_pairs: Vec<(IpNet, Option<IpAddr>)> = routes.iter().map(|r| (r.dst, r.gw)).collect();
    pod.bring_up(inner.index, &addresses, &route_pairs)?;
    Ok(CniResult {
        interfaces: vec![
            Interface {
                name: bridge.name,
                mac: bridge.mac,
                sandbox: None,
            },
            Interface {
                name: veth.name,
                mac: veth.mac,
                sandbox: None,
            },
            Interface {
                name: inner.name,
                mac: inner.mac,
                sandbox: Some(params.netns_path.to_owned()),
            },
        ],
        ips: params
            .assigned
            .iter()
            .map(|a| IpConfig {
                address: a.address,
                gateway: a.gateway,
                interface: Some(2),
            })
            .collect(),
        routes,
    })
}

/// DEL's first half: takes `link` out of service at once — addresses gone,
/// down, renamed to `retired` so its name is free for the next ADD. The
/// kernel's slow part (deleting a veth waits for RCU, ~20 ms) is left to
/// the caller to do off the critical path. Returns the index to delete.
pub fn retire<L: Links>(links: &mut L, name: &str, retired: &str) -> Result<Option<u32>, NetError> {
    let Some(link) = links.link(name)? else {
        return Ok(None);
    };
    for address in links.addresses(link.index)? {
        match links.delete_address(link.index, address) {
            Ok(()) => {}
            // IPv6 addresses can vanish with the link going down; fine.
            Err(err) if err.errno() == Some(nix::libc::EADDRNOTAVAIL) => {}
            Err(err) => return Err(err),
        }
    }
    links.set_down_and_rename(link.index, retired)?;
    Ok(Some(link.index))
}

/// CHECK: compares the kernel with the result ADD returned; each string
/// names one thing that drifted.
pub fn check<H: Links, C: Links>(
    host: &mut H,
    pod: &mut C,
    conf: &NetConf,
    ifname: &str,
    expected: &CniResult,
) -> Result<Vec<String>, NetError> {
    let mut drift = Vec::new();
    let bridge = host.link(&conf.bridge)?;
    match &bridge {
        None => drift.push(format!("bridge {} is missing", conf.bridge)),
        Some(b) if !b.up => drift.push(format!("bridge {} is down", conf.bridge)),
        Some(_) => {}
    }
    let host_veth = expected
        .interfaces
        .iter()
        .find(|i| i.sandbox.is_none() && i.name != conf.bridge);
    if let Some(expected_veth) = host_veth {
        match host.link(&expected_veth.name)? {
            None => drift.push(format!("host veth {} is missing", expected_veth.name)),
            Some(veth) => {
                if bridge.as_ref().map(|b| b.index) != veth.master {
                    drift.push(format!(
                        "host veth {} is not attached to bridge {}",
                        veth.name, conf.bridge
                    ));
                }
                if !veth.up {
                    drift.push(format!("host veth {} is down", veth.name));
                }
            }
        }
    }
    let Some(inner) = pod.link(ifname)? else {
        drift.push(format!("interface {ifname} is missing in the container"));
        return Ok(drift);
    };
    if let Some((_, want)) = expected.container_interface() {
        if !want.mac.is_empty() && !want.mac.eq_ignore_ascii_case(&inner.mac) {
            drift.push(format!(
                "interface {ifname} has MAC {} instead of {}",
                inner.mac, want.mac
            ));
        }
    }
    if !inner.up {
        drift.push(format!("interface {ifname} is down"));
    }
    let addresses = pod.addresses(inner.index)?;
    for ip in &expected.ips {
        if !addresses.contains(&ip.address) {
            drift.push(format!("address {} is missing on {ifname}", ip.address));
        }
    }
    let routes = pod.routes(inner.index)?;
    for route in &expected.routes {
        if !routes
            .iter()
            .any(|(dst, gw)| *dst == route.dst && *gw == route.gw)
        {
            drift.push(format!(
                "route {}{} is missing on {ifname}",
                route.dst,
                route.gw.map(|g| format!(" via {g}")).unwrap_or_default()
            ));
        }
    }
    Ok(drift)
}

#[cfg(test)]
#[path = "bridge/tests.rs"]
mod tests;
