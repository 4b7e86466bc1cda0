//! The bridge network config ("netconf") as the reference `bridge` plugin with
//! `host-local` IPAM takes it, so existing `/etc/cni/net.d` files keep working.
//!
//! [`parse`] decodes and validates in one step: every rejection is a
//! [`CniError`] naming the field and value, because a runtime only shows the
//! user our error JSON. Unknown fields are ignored, as the spec requires.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::CniError;

/// The `cniVersion`s whose netconf and result formats we speak.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Bridge name used when the netconf does not give one (as the reference
/// plugin does).
pub const DEFAULT_BRIDGE: &str = "cni0";

/// Linux interface names are at most 15 bytes (IFNAMSIZ minus the NUL).
const MAX_IFNAME_LEN: usize = 15;

/// The smallest MTU IPv4 allows; anything lower cannot carry a packet.
const MIN_MTU: u32 = 68;

/// A bridge netconf. Field names follow the reference plugins' JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// Spec version the runtime speaks; must be in [`SUPPORTED_VERSIONS`].
    #[serde(default)]
    pub cni_version: String,
    /// Network name; also names the IPAM data directory.
    #[serde(default)]
    pub name: String,
    /// Plugin type (binary name), e.g. `bosun-cni` or `bridge`.
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// Bridge device on the host side.
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// Give the bridge the gateway address.
    #[serde(default)]
    pub is_gateway: bool,
    /// Route the container's default route via the gateway (implies isGateway).
    #[serde(default)]
    pub is_default_gateway: bool,
    /// Replace an existing bridge address instead of failing.
    #[serde(default)]
    pub force_address: bool,
    /// Masquerade traffic leaving the pod subnet.
    #[serde(default)]
    pub ip_masq: bool,
    /// MTU for the bridge and veth pair; the kernel default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Let traffic hairpin back out the port it came in on.
    #[serde(default)]
    pub hairpin_mode: bool,
    /// Put the bridge in promiscuous mode.
    #[serde(default)]
    pub promisc_mode: bool,
    /// Built-in IPAM settings (host-local semantics).
    #[serde(default)]
    pub ipam: IpamConf,
    /// Per-invocation settings filled in by the runtime from capabilities.
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    /// Result of the previous plugin in a chain; passed through as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    /// Capabilities this plugin asks the runtime for (e.g. `portMappings`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capabilities: BTreeMap<String, bool>,
    /// GC only: the attachments the runtime still knows; everything else
    /// this network holds is garbage.
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<AttachmentKey>>,
    /// Typed, validated view filled in by [`parse`].
    #[serde(skip)]
    resolved: Resolved,
}

/// One (container ID, ifname) pair, as GC's `cni.dev/valid-attachments`
/// lists them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttachmentKey {
    /// Container ID the runtime gave on ADD.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name inside the container.
    pub ifname: String,
}

/// The IPAM block. Either `ranges` or the legacy single-range `subnet` form;
/// [`parse`] folds the latter into `ranges`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConf {
    /// IPAM type; informational, since the allocator is built in.
    #[serde(rename = "type", default)]
    pub ipam_type: String,
    /// Range sets: the container gets one address from each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<Vec<RangeConf>>,
    /// Legacy single-range form (`subnet`, `rangeStart`, `rangeEnd`,
    /// `gateway` directly in `ipam`); an empty subnet means absent.
    #[serde(flatten)]
    pub legacy: RangeConf,
    /// Routes to install in the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConf>,
    /// Where allocations are stored; `/var/lib/cni/networks` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
}

/// One range of a range set, as written in the netconf.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RangeConf {
    /// CIDR the range lives in.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subnet: String,
    /// First address to hand out; the first usable one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_start: Option<String>,
    /// Last address to hand out; the last usable one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<String>,
    /// Gateway; the first usable address when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// A route as written in the netconf.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteConf {
    /// Destination CIDR.
    #[serde(default)]
    pub dst: String,
    /// Next hop; the range's gateway when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// Settings the runtime injects for capabilities the plugin declared.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// `portMappings` capability.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mappings: Vec<PortMapping>,
    /// `ips` capability: addresses (optionally with prefix) the container asks for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// `mac` capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `bandwidth` capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
}

/// One host port forwarded to the container.
///
/// containerd (go-cni) sends these with Go's field names (`HostPort`,
/// ...): its struct has no JSON tags, and Go plugins decode keys
/// case-insensitively, so both spellings are accepted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    /// Port on the host.
    #[serde(alias = "HostPort")]
    pub host_port: u16,
    /// Port in the container.
    #[serde(alias = "ContainerPort")]
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`.
    #[serde(default = "default_protocol", alias = "Protocol")]
    pub protocol: String,
    /// Host address to bind; all when absent.
    #[serde(
        rename = "hostIP",
        alias = "HostIP",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub host_ip: Option<String>,
}

/// Traffic shaping limits (bits per second, bits of burst).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    /// Ingress rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_rate: Option<u64>,
    /// Ingress burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_burst: Option<u64>,
    /// Egress rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_rate: Option<u64>,
    /// Egress burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_burst: Option<u64>,
}

/// A validated range: addresses are parsed and defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// The subnet (host bits cleared).
    pub subnet: IpNet,
    /// First address to hand out.
    pub range_start: IpAddr,
    /// Last address to hand out.
    pub range_end: IpAddr,
    /// Gateway, never handed out. `None` only for single-address subnets.
    pub gateway: Option<IpAddr>,
}

impl Range {
    /// Whether `ip` lies within `range_start..=range_end`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.range_start.is_ipv4()
            && to_u128(ip) >= to_u128(self.range_start)
            && to_u128(ip) <= to_u128(self.range_end)
    }

    /// Whether `ip` may be given to a container: inside the range, a usable
    /// host address of the subnet, and not the gateway.
    pub fn can_assign(&self, ip: IpAddr) -> bool {
        let usable = to_u128(ip) >= to_u128(first_usable(self.subnet))
            && to_u128(ip) <= to_u128(last_usable(self.subnet));
        self.contains(ip) && usable && Some(ip) != self.gateway
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.range_start, self.range_end)
    }
}

/// Validated range set: one family, non-empty. A container gets one address
/// from each set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet {
    /// The ranges, tried in order.
    pub ranges: Vec<Range>,
}

impl RangeSet {
    /// The range holding `ip`, if any.
    pub fn range_for(&self, ip: IpAddr) -> Option<&Range> {
        self.ranges.iter().find(|r| r.contains(ip))
    }
}

impl fmt::Display for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.ranges.iter().map(Range::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

/// A validated route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Destination.
    pub dst: IpNet,
    /// Next hop, if given.
    pub gw: Option<IpAddr>,
}

/// Typed results of validation, so callers never re-parse strings.
#[derive(Debug, Clone, Default, PartialEq)]
struct Resolved {
    range_sets: Vec<RangeSet>,
    routes: Vec<Route>,
    requested_ips: Vec<IpAddr>,
}

impl NetConf {
    /// Validated range sets (empty unless built by [`parse`]).
    pub fn range_sets(&self) -> &[RangeSet] {
        &self.resolved.range_sets
    }

    /// Validated routes (empty unless built by [`parse`]).
    pub fn routes(&self) -> &[Route] {
        &self.resolved.routes
    }

    /// Addresses asked for via `runtimeConfig.ips`, prefixes dropped.
    pub fn requested_ips(&self) -> &[IpAddr] {
        &self.resolved.requested_ips
    }
}

fn default_bridge() -> String {
    DEFAULT_BRIDGE.to_owned()
}

fn default_protocol() -> String {
    "tcp".to_owned()
}

/// Decodes and validates a netconf from stdin bytes.
///
/// Malformed JSON is code 6, an unsupported `cniVersion` code 1, anything
/// else wrong code 7; the details name the field and value.
pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
    let mut conf: NetConf = serde_json::from_slice(bytes)
        .map_err(|e| CniError::decoding(format!("netconf is not valid JSON: {e}")))?;
    check_version(&conf.cni_version)?;
    check_identity(&conf)?;
    check_link_settings(&conf)?;
    normalise_legacy_range(&mut conf.ipam);
    let range_sets = resolve_range_sets(&conf.ipam.ranges)?;
    check_no_overlap(&range_sets)?;
    conf.resolved = Resolved {
        range_sets,
        routes: resolve_routes(&conf.ipam.routes)?,
        requested_ips: resolve_requested_ips(&conf.runtime_config.ips)?,
    };
    check_runtime_config(&conf.runtime_config)?;
    Ok(conf)
}

fn check_version(version: &str) -> Result<(), CniError> {
    if version.is_empty() {
        return Err(CniError::invalid_config("cniVersion is missing"));
    }
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(CniError::incompatible_version(version));
    }
    Ok(())
}

/// The name becomes a directory under the IPAM data dir, so it must be the
/// spec's safe alphabet (this also rules out `..` and `/`).
fn check_identity(conf: &NetConf) -> Result<(), CniError> {
    if conf.name.is_empty() {
        return Err(CniError::invalid_config("name is missing"));
    }
    if !is_valid_network_name(&conf.name) {
        return Err(CniError::invalid_config(format!(
            "name {:?} must start with a letter or digit and contain only letters, digits, '_', '.' and '-'",
            conf.name
        )));
    }
    if conf.plugin_type.is_empty() {
        return Err(CniError::invalid_config("type is missing"));
    }
    Ok(())
}

fn is_valid_network_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn check_link_settings(conf: &NetConf) -> Result<(), CniError> {
    if conf.bridge.is_empty() || conf.bridge.len() > MAX_IFNAME_LEN || conf.bridge.contains('/') {
        return Err(CniError::invalid_config(format!(
            "bridge {:?} is not a valid interface name (1-{MAX_IFNAME_LEN} bytes, no '/')",
            conf.bridge
        )));
    }
    if let Some(mtu) = conf.mtu.filter(|m| *m < MIN_MTU) {
        return Err(CniError::invalid_config(format!(
            "mtu {mtu} is below the minimum of {MIN_MTU}"
        )));
    }
    Ok(())
}

/// host-local accepts `ipam.subnet` (+ rangeStart/rangeEnd/gateway) as a
/// single range; it goes in front of any `ranges`, as host-local does.
fn normalise_legacy_range(ipam: &mut IpamConf) {
    if !ipam.legacy.subnet.is_empty() {
        let legacy = std::mem::take(&mut ipam.legacy);
        ipam.ranges.insert(0, vec![legacy]);
    }
}

fn resolve_range_sets(sets: &[Vec<RangeConf>]) -> Result<Vec<RangeSet>, CniError> {
    if sets.is_empty() {
        return Err(CniError::invalid_config(
            "ipam needs \"ranges\" or \"subnet\"",
        ));
    }
    sets.iter()
        .enumerate()
        .map(|(i, set)| resolve_range_set(i, set))
        .collect()
}

fn resolve_range_set(i: usize, set: &[RangeConf]) -> Result<RangeSet, CniError> {
    if set.is_empty() {
        return Err(CniError::invalid_config(format!(
            "ipam.ranges[{i}] is empty"
        )));
    }
    let ranges = set
        .iter()
        .enumerate()
        .map(|(j, r)| resolve_range(&format!("ipam.ranges[{i}][{j}]"), r))
        .collect::<Result<Vec<_>, _>>()?;
    let v4 = ranges[0].subnet.addr().is_ipv4();
    if let Some((j, r)) = ranges
        .iter()
        .enumerate()
        .find(|(_, r)| r.subnet.addr().is_ipv4() != v4)
    {
        return Err(CniError::invalid_config(format!(
            "ipam.ranges[{i}][{j}].subnet {} mixes IP families in range set {i} (started with {})",
            r.subnet, ranges[0].subnet
        )));
    }
    Ok(RangeSet { ranges })
}

fn resolve_range(at: &str, conf: &RangeConf) -> Result<Range, CniError> {
    let subnet = parse_cidr(&format!("{at}.subnet"), &conf.subnet)?.trunc();
    let range_start = parse_in_subnet(at, "rangeStart", conf.range_start.as_deref(), subnet)?
        .unwrap_or_else(|| first_usable(subnet));
    let range_end = parse_in_subnet(at, "rangeEnd", conf.range_end.as_deref(), subnet)?
        .unwrap_or_else(|| last_usable(subnet));
    if to_u128(range_start) > to_u128(range_end) {
        return Err(CniError::invalid_config(format!(
            "{at}.rangeStart {range_start} is after rangeEnd {range_end}"
        )));
    }
    let gateway = parse_in_subnet(at, "gateway", conf.gateway.as_deref(), subnet)?
        .or_else(|| default_gateway(subnet));
    Ok(Range {
        subnet,
        range_start,
        range_end,
        gateway,
    })
}

fn parse_cidr(field: &str, text: &str) -> Result<IpNet, CniError> {
    if text.is_empty() {
        return Err(CniError::invalid_config(format!("{field} is missing")));
    }
    IpNet::from_str(text)
        .map_err(|_| CniError::invalid_config(format!("{field} {text:?} is not a valid CIDR")))
}

fn parse_ip(field: &str, text: &str) -> Result<IpAddr, CniError> {
    IpAddr::from_str(text).map_err(|_| {
        CniError::invalid_config(format!("{field} {text:?} is not a valid IP address"))
    })
}

fn parse_in_subnet(
    at: &str,
    name: &str,
    text: Option<&str>,
    subnet: IpNet,
) -> Result<Option<IpAddr>, CniError> {
    let Some(text) = text else {
        return Ok(None);
    };
    let field = format!("{at}.{name}");
    let ip = parse_ip(&field, text)?;
    if !subnet.contains(&ip) {
        return Err(CniError::invalid_config(format!(
            "{field} {ip} is outside subnet {subnet}"
        )));
    }
    Ok(Some(ip))
}

/// The default gateway is the first usable address, except in a subnet with
/// a single address, where taking it would leave nothing to hand out.
fn default_gateway(subnet: IpNet) -> Option<IpAddr> {
    let first = first_usable(subnet);
    (first != last_usable(subnet)).then_some(first)
}

/// Range sets are allocated independently, so an address in two ranges could
/// be handed out twice; host-local rejects that and so do we.
fn check_no_overlap(sets: &[RangeSet]) -> Result<(), CniError> {
    let all: Vec<(String, &Range)> = sets
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.ranges
                .iter()
                .enumerate()
                .map(move |(j, r)| (format!("ipam.ranges[{i}][{j}]"), r))
        })
        .collect();
    for (k, (a_at, a)) in all.iter().enumerate() {
        if let Some((b_at, b)) = all[k + 1..].iter().find(|(_, b)| overlaps(a, b)) {
            return Err(CniError::invalid_config(format!(
                "{b_at} ({b}) overlaps {a_at} ({a})"
            )));
        }
    }
    Ok(())
}

fn overlaps(a: &Range, b: &Range) -> bool {
    a.range_start.is_ipv4() == b.range_start.is_ipv4()
        && to_u128(a.range_start) <= to_u128(b.range_end)
        && to_u128(b.range_start) <= to_u128(a.range_end)
}

fn resolve_routes(routes: &[RouteConf]) -> Result<Vec<Route>, CniError> {
    routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let dst = parse_cidr(&format!("ipam.routes[{i}].dst"), &r.dst)?;
            let gw =
                r.gw.as_deref()
                    .map(|g| parse_ip(&format!("ipam.routes[{i}].gw"), g))
                    .transpose()?;
            Ok(Route { dst, gw })
        })
        .collect()
}

/// `runtimeConfig.ips` entries may carry a prefix (`10.1.2.3/24`) or not.
fn resolve_requested_ips(ips: &[String]) -> Result<Vec<IpAddr>, CniError> {
    ips.iter()
        .enumerate()
        .map(|(i, text)| {
            let addr = text.split_once('/').map_or(text.as_str(), |(a, _)| a);
            IpAddr::from_str(addr).map_err(|_| {
                CniError::invalid_config(format!(
                    "runtimeConfig.ips[{i}] {text:?} is not a valid IP address"
                ))
            })
        })
        .collect()
}

fn check_runtime_config(rc: &RuntimeConfig) -> Result<(), CniError> {
    for (i, pm) in rc.port_mappings.iter().enumerate() {
        check_port_mapping(i, pm)?;
    }
    if let Some(mac) = rc
        .mac
        .as_deref()
        .filter(|m| crate::link::parse_mac(m).is_none())
    {
        return Err(CniError::invalid_config(format!(
            "runtimeConfig.mac {mac:?} is not a MAC address like 0a:58:0a:00:00:02"
        )));
    }
    Ok(())
}

fn check_port_mapping(i: usize, pm: &PortMapping) -> Result<(), CniError> {
    let at = format!("runtimeConfig.portMappings[{i}]");
    if pm.host_port == 0 || pm.container_port == 0 {
        return Err(CniError::invalid_config(format!(
            "{at} ports must be 1-65535 (hostPort {}, containerPort {})",
            pm.host_port, pm.container_port
        )));
    }
    let proto = pm.protocol.to_ascii_lowercase();
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(CniError::invalid_config(format!(
            "{at}.protocol {:?} must be tcp, udp or sctp",
            pm.protocol
        )));
    }
    if let Some(host_ip) = pm.host_ip.as_deref().filter(|h| !h.is_empty()) {
        parse_ip(&format!("{at}.hostIP"), host_ip)?;
    }
    Ok(())
}

/// An address as a number, so ranges of either family share one arithmetic.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Inverse of [`to_u128`] for the family of `like`. IPv4 values above
/// `u32::MAX` cannot come from a valid range and yield `None`.
pub fn from_u128(value: u128, like: IpAddr) -> Option<IpAddr> {
    match like {
        IpAddr::V4(_) => u32::try_from(value)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        IpAddr::V6(_) => Some(IpAddr::V6(Ipv6Addr::from(value))),
    }
}

/// Lowest address a container may get: the network address is skipped unless
/// the subnet is a point-to-point /31 (/127) or a single host /32 (/128).
pub fn first_usable(subnet: IpNet) -> IpAddr {
    let network = subnet.network();
    if subnet.max_prefix_len() - subnet.prefix_len() <= 1 {
        return network;
    }
    from_u128(to_u128(network) + 1, network).unwrap_or(network)
}

/// Highest address a container may get: IPv4 skips the broadcast address
/// (except in /31 and /32); IPv6 has no broadcast, so its last address is usable.
pub fn last_usable(subnet: IpNet) -> IpAddr {
    let last = subnet.broadcast();
    let host_bits = subnet.max_prefix_len() - subnet.prefix_len();
    if last.is_ipv6() || host_bits <= 1 {
        return last;
    }
    from_u128(to_u128(last) - 1, last).unwrap_or(last)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::error::code;
    use serde_json::json;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn parse_value(v: Value) -> Result<NetConf, CniError> {
        parse(v.to_string().as_bytes())
    }

    fn base() -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "bosun",
            "type": "bosun-cni",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.22.0.0/16"}]]}
        })
    }

    fn with_ranges(ranges: Value) -> Value {
        let mut v = base();
        v["ipam"]["ranges"] = ranges;
        v
    }

    /// Asserts the error code and that the details mention `needle`.
    fn assert_err(v: Value, want_code: u32, needle: &str) {
        let err = parse_value(v).unwrap_err();
        assert_eq!(err.code, want_code, "{err}");
        assert!(err.details.contains(needle), "{err:?} lacks {needle:?}");
    }

    #[test]
    fn full_bridge_config_parses_with_defaults_filled() {
        let conf = parse_value(json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "bridge",
            "bridge": "cni1",
            "isGateway": true,
            "isDefaultGateway": true,
            "forceAddress": false,
            "ipMasq": true,
            "mtu": 1450,
            "hairpinMode": true,
            "promiscMode": false,
            "someFutureField": {"ignored": true},
            "ipam": {
                "type": "host-local",
                "ranges": [
                    [{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.20", "gateway": "10.1.0.254"}],
                    [{"subnet": "fd00:1::/64"}]
                ],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.1.0.254"}],
                "dataDir": "/run/bosun/ipam"
            },
            "runtimeConfig": {
                "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}],
                "ips": ["10.1.0.15/24"],
                "mac": "0a:58:0a:01:00:0f",
                "bandwidth": {"ingressRate": 1000, "ingressBurst": 10}
            },
            "capabilities": {"portMappings": true, "ips": true},
            "prevResult": {"cniVersion": "1.0.0", "ips": []}
        }))
        .unwrap();
        assert_eq!(conf.bridge, "cni1");
        assert!(conf.is_gateway && conf.is_default_gateway && conf.ip_masq && conf.hairpin_mode);
        assert_eq!(conf.mtu, Some(1450));
        assert_eq!(conf.ipam.data_dir.as_deref(), Some("/run/bosun/ipam"));
        assert_eq!(
            conf.runtime_config.port_mappings[0].host_ip.as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(
            conf.runtime_config.bandwidth.as_ref().unwrap().ingress_rate,
            Some(1000)
        );
        assert_eq!(conf.capabilities.get("ips"), Some(&true));
        assert_eq!(conf.prev_result.as_ref().unwrap()["cniVersion"], "1.0.0");
        assert_eq!(conf.requested_ips(), &[ip("10.1.0.15")]);

        let sets = conf.range_sets();
        assert_eq!(sets.len(), 2);
        assert_eq!(
            sets[0].ranges[0],
            Range {
                subnet: "10.1.0.0/24".parse().unwrap(),
                range_start: ip("10.1.0.10"),
                range_end: ip("10.1.0.20"),
                gateway: Some(ip("10.1.0.254")),
            }
        );
        let v6 = sets[1].ranges[0];
        assert_eq!(v6.range_start, ip("fd00:1::1"));
        assert_eq!(v6.range_end, ip("fd00:1::ffff:ffff:ffff:ffff"));
        assert_eq!(v6.gateway, Some(ip("fd00:1::1")));
        assert_eq!(conf.routes()[1].gw, Some(ip("10.1.0.254")));
    }

    #[test]
    fn minimal_config_gets_reference_defaults() {
        let conf = parse_value(base()).unwrap();
        assert_eq!(conf.bridge, "cni0");
        assert!(!conf.is_gateway && !conf.ip_masq);
        let r = conf.range_sets()[0].ranges[0];
        assert_eq!(r.range_start, ip("10.22.0.1"));
        assert_eq!(r.range_end, ip("10.22.255.254"));
        assert_eq!(r.gateway, Some(ip("10.22.0.1")));
    }

    #[test]
    fn legacy_subnet_form_becomes_first_range_set() {
        let mut v = base();
        v["ipam"] = json!({
            "type": "host-local",
            "subnet": "10.9.8.0/24",
            "rangeStart": "10.9.8.100",
            "gateway": "10.9.8.1",
            "ranges": [[{"subnet": "fd00::/120"}]]
        });
        let conf = parse_value(v).unwrap();
        assert_eq!(conf.ipam.legacy, RangeConf::default());
        assert_eq!(conf.ipam.ranges.len(), 2);
        assert_eq!(conf.ipam.ranges[0][0].subnet, "10.9.8.0/24");
        let r = conf.range_sets()[0].ranges[0];
        assert_eq!(
            (r.range_start, r.range_end),
            (ip("10.9.8.100"), ip("10.9.8.254"))
        );
    }

    #[test]
    fn subnet_with_host_bits_is_truncated() {
        let conf = parse_value(with_ranges(json!([[{"subnet": "10.3.0.7/24"}]]))).unwrap();
        assert_eq!(
            conf.range_sets()[0].ranges[0].subnet.to_string(),
            "10.3.0.0/24"
        );
    }

    #[test]
    fn malformed_json_is_decoding_failure() {
        let err = parse(b"{\"cniVersion\": \"1.0.0\",").unwrap_err();
        assert_eq!(err.code, code::DECODING_FAILURE);
        assert!(
            err.details.starts_with("netconf is not valid JSON"),
            "{err}"
        );
    }

    #[test]
    fn wrong_field_type_is_decoding_failure_naming_the_field() {
        let mut v = base();
        v["mtu"] = json!("big");
        assert_err(v, code::DECODING_FAILURE, "invalid type");
    }

    #[test]
    fn unsupported_version_is_code_1() {
        for version in ["0.2.0", "2.0.0", "1.1"] {
            let mut v = base();
            v["cniVersion"] = json!(version);
            assert_err(v, code::INCOMPATIBLE_CNI_VERSION, version);
        }
    }

    #[test]
    fn every_supported_version_parses() {
        for version in SUPPORTED_VERSIONS {
            let mut v = base();
            v["cniVersion"] = json!(version);
            parse_value(v).unwrap();
        }
    }

    #[test]
    fn missing_identity_fields_are_code_7() {
        for (field, needle) in [
            ("cniVersion", "cniVersion is missing"),
            ("name", "name is missing"),
            ("type", "type is missing"),
        ] {
            let mut v = base();
            v.as_object_mut().unwrap().remove(field);
            assert_err(v, code::INVALID_NETWORK_CONFIG, needle);
        }
    }

    #[test]
    fn unsafe_network_name_is_rejected() {
        for name in ["../etc", "a/b", "-lead", "sp ace"] {
            let mut v = base();
            v["name"] = json!(name);
            assert_err(v, code::INVALID_NETWORK_CONFIG, "name");
        }
    }

    #[test]
    fn bad_bridge_and_mtu_are_rejected() {
        let mut v = base();
        v["bridge"] = json!("a-very-long-bridge-name");
        assert_err(v, code::INVALID_NETWORK_CONFIG, "bridge");
        let mut v = base();
        v["mtu"] = json!(10);
        assert_err(v, code::INVALID_NETWORK_CONFIG, "mtu 10");
    }

    #[test]
    fn missing_ranges_is_code_7() {
        let mut v = base();
        v["ipam"] = json!({"type": "host-local"});
        assert_err(v.clone(), code::INVALID_NETWORK_CONFIG, "ipam needs");
        v.as_object_mut().unwrap().remove("ipam");
        assert_err(v, code::INVALID_NETWORK_CONFIG, "ipam needs");
        assert_err(
            with_ranges(json!([[]])),
            code::INVALID_NETWORK_CONFIG,
            "ipam.ranges[0] is empty",
        );
        assert_err(
            with_ranges(json!([[{}]])),
            code::INVALID_NETWORK_CONFIG,
            "ipam.ranges[0][0].subnet is missing",
        );
    }

    #[test]
    fn bad_cidr_names_the_field() {
        assert_err(
            with_ranges(json!([[{"subnet": "10.0.0.0/24"}], [{"subnet": "10.1.0.0/33"}]])),
            code::INVALID_NETWORK_CONFIG,
            "ipam.ranges[1][0].subnet \"10.1.0.0/33\" is not a valid CIDR",
        );
    }

    #[test]
    fn addresses_outside_subnet_are_rejected() {
        for field in ["rangeStart", "rangeEnd", "gateway"] {
            let mut range = json!({"subnet": "10.0.0.0/24"});
            range[field] = json!("10.0.1.5");
            assert_err(
                with_ranges(json!([[range]])),
                code::INVALID_NETWORK_CONFIG,
                &format!("ipam.ranges[0][0].{field} 10.0.1.5 is outside subnet 10.0.0.0/24"),
            );
        }
    }

    #[test]
    fn unparsable_range_address_is_rejected() {
        assert_err(
            with_ranges(json!([[{"subnet": "10.0.0.0/24", "gateway": "ten"}]])),
            code::INVALID_NETWORK_CONFIG,
            "ipam.ranges[0][0].gateway \"ten\" is not a valid IP address",
        );
    }

    #[test]
    fn start_after_end_is_rejected() {
        assert_err(
            with_ranges(
                json!([[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.50", "rangeEnd": "10.0.0.40"}]]),
            ),
            code::INVALID_NETWORK_CONFIG,
            "rangeStart 10.0.0.50 is after rangeEnd 10.0.0.40",
        );
    }

    #[test]
    fn overlapping_ranges_are_rejected_within_and_across_sets() {
        assert_err(
            with_ranges(json!([[{"subnet": "10.0.0.0/24"}, {"subnet": "10.0.0.128/25"}]])),
            code::INVALID_NETWORK_CONFIG,
            "ipam.ranges[0][1] (10.0.0.129-10.0.0.254) overlaps ipam.ranges[0][0]",
        );
        assert_err(
            with_ranges(
                json!([[{"subnet": "10.0.0.0/24"}], [{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.200"}]]),
            ),
            code::INVALID_NETWORK_CONFIG,
            "ipam.ranges[1][0]",
        );
        // Disjoint slices of one subnet are fine.
        parse_value(with_ranges(json!([[
            {"subnet": "10.0.0.0/24", "rangeEnd": "10.0.0.99"},
            {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.100"}
        ]])))
        .unwrap();
    }

    #[test]
    fn mixed_families_in_one_set_are_rejected() {
        assert_err(
            with_ranges(json!([[{"subnet": "10.0.0.0/24"}, {"subnet": "fd00::/64"}]])),
            code::INVALID_NETWORK_CONFIG,
            "ipam.ranges[0][1].subnet fd00::/64 mixes IP families in range set 0",
        );
    }

    #[test]
    fn port_mappings_in_gos_field_names_parse() {
        // What containerd 1.6 sends: go-cni's untagged struct.
        let mut v = base();
        v["runtimeConfig"] = json!({"portMappings": [
            {"HostPort": 12000, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""}
        ]});
        let conf = parse_value(v).unwrap();
        let pm = &conf.runtime_config.port_mappings[0];
        assert_eq!((pm.host_port, pm.container_port), (12000, 80));
        assert_eq!(pm.protocol, "tcp");
        assert_eq!(pm.host_ip.as_deref(), Some(""));
    }

    #[test]
    fn bad_routes_and_runtime_config_are_rejected() {
        let mut v = base();
        v["ipam"]["routes"] = json!([{"dst": "0.0.0.0/0", "gw": "nope"}]);
        assert_err(
            v,
            code::INVALID_NETWORK_CONFIG,
            "ipam.routes[0].gw \"nope\"",
        );
        let mut v = base();
        v["runtimeConfig"] = json!({"ips": ["10.22.0.5", "bogus/24"]});
        assert_err(
            v,
            code::INVALID_NETWORK_CONFIG,
            "runtimeConfig.ips[1] \"bogus/24\"",
        );
        let mut v = base();
        v["runtimeConfig"] =
            json!({"portMappings": [{"hostPort": 80, "containerPort": 80, "protocol": "icmp"}]});
        assert_err(
            v,
            code::INVALID_NETWORK_CONFIG,
            "runtimeConfig.portMappings[0].protocol \"icmp\"",
        );
        let mut v = base();
        v["runtimeConfig"] = json!({"portMappings": [{"hostPort": 0, "containerPort": 80}]});
        assert_err(v, code::INVALID_NETWORK_CONFIG, "portMappings[0] ports");
        let mut v = base();
        v["runtimeConfig"] = json!({"mac": "zz:00:00:00:00:00"});
        assert_err(v, code::INVALID_NETWORK_CONFIG, "runtimeConfig.mac");
    }

    #[test]
    fn usable_bounds_cover_edge_prefixes() {
        let cases = [
            ("10.0.0.0/24", "10.0.0.1", "10.0.0.254"),
            ("10.0.0.0/30", "10.0.0.1", "10.0.0.2"),
            ("10.0.0.0/31", "10.0.0.0", "10.0.0.1"),
            ("10.0.0.7/32", "10.0.0.7", "10.0.0.7"),
            ("fd00::/126", "fd00::1", "fd00::3"),
            ("fd00::/127", "fd00::", "fd00::1"),
            ("fd00::5/128", "fd00::5", "fd00::5"),
        ];
        for (net, first, last) in cases {
            let net: IpNet = net.parse().unwrap();
            assert_eq!(first_usable(net), ip(first), "{net}");
            assert_eq!(last_usable(net), ip(last), "{net}");
        }
        assert_eq!(default_gateway("10.0.0.7/32".parse().unwrap()), None);
        assert_eq!(
            default_gateway("10.0.0.0/31".parse().unwrap()),
            Some(ip("10.0.0.0"))
        );
    }

    #[test]
    fn serialises_back_to_reference_field_names() {
        let conf = parse_value(base()).unwrap();
        let out = serde_json::to_value(&conf).unwrap();
        assert_eq!(out["type"], "bosun-cni");
        assert_eq!(out["cniVersion"], "1.1.0");
        assert_eq!(out["isGateway"], false);
        assert_eq!(out["ipam"]["ranges"][0][0]["subnet"], "10.22.0.0/16");
    }
}
