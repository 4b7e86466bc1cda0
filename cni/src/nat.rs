//! IP masquerade and host ports, as nftables rules in our own table
//! `inet bosun-cni`.
//!
//! Why not per-container iptables chains as the reference plugins add: each
//! `iptables` call takes the xtables lock and rewrites the whole table
//! (tens of ms under load). Here masquerade is one chain per network,
//! installed once; host ports are elements of verdict maps, so a pod with
//! port mappings costs one `nft -f` and a pod without none. Everything is
//! idempotent: chains are flushed and refilled in the same transaction.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnet::IpNet;
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// Our table (family `inet`, so one table serves IPv4 and IPv6).
pub const TABLE: &str = "bosun-cni";

/// A failure to program or read nftables.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// `nft` could not be run at all.
    #[error("run nft: {0}")]
    Spawn(#[source] io::Error),
    /// `nft` rejected the rules.
    #[error("nft rejected the rules: {0}")]
    Rejected(String),
    /// Asking the kernel about our chains failed.
    #[error("query nftables over netlink: {0}")]
    Query(#[source] io::Error),
}

/// One host port forwarded to one pod address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostPort {
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// Only traffic to this node address; all local addresses when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
    /// Port on the node.
    pub host_port: u16,
    /// The pod's address.
    pub pod_ip: IpAddr,
    /// Port in the pod.
    pub pod_port: u16,
}

impl HostPort {
    fn map(&self) -> &'static str {
        match (self.pod_ip.is_ipv4(), self.host_ip.is_some()) {
            (true, false) => "hp4",
            (true, true) => "hp4ip",
            (false, false) => "hp6",
            (false, true) => "hp6ip",
        }
    }

    fn element(&self) -> String {
        let key = match self.host_ip {
            Some(ip) => format!("{ip} . {} . {}", self.protocol, self.host_port),
            None => format!("{} . {}", self.protocol, self.host_port),
        };
        format!("{key} : {} . {}", self.pod_ip, self.pod_port)
    }

    /// `tcp/8080` or `tcp/192.0.2.1:8080`, for messages.
    pub fn describe(&self) -> String {
        match self.host_ip {
            Some(ip) => format!("{}/{ip}:{}", self.protocol, self.host_port),
            None => format!("{}/{}", self.protocol, self.host_port),
        }
    }
}

/// The name of a network's chain: it changes when the network's subnets or
/// its masquerade setting change, so a stale chain is never mistaken for the
/// current one.
pub fn network_chain(network: &str, subnets: &[IpNet], masquerade: bool) -> String {
    let mut parts = vec![network.to_owned(), masquerade.to_string()];
    parts.extend(subnets.iter().map(ToString::to_string));
    format!("net-{:012x}", crate::short_hash(&parts) & 0xffff_ffff_ffff)
}

/// The table, its maps and the host-port chains; safe to apply any number
/// of times, also concurrently.
fn base_script() -> String {
    let mut s = String::new();
    let _ = writeln!(s, "add table inet {TABLE}");
    for (map, key, value) in [
        ("hp4", "inet_proto . inet_service", "ipv4_addr"),
        (
            "hp4ip",
            "ipv4_addr . inet_proto . inet_service",
            "ipv4_addr",
        ),
        ("hp6", "inet_proto . inet_service", "ipv6_addr"),
        (
            "hp6ip",
            "ipv6_addr . inet_proto . inet_service",
            "ipv6_addr",
        ),
    ] {
        let _ = writeln!(
            s,
            "add map inet {TABLE} {map} {{ type {key} : {value} . inet_service; }}"
        );
    }
    let _ = writeln!(s, "add chain inet {TABLE} hostports");
    for (chain, hook, priority) in [
        ("prerouting", "prerouting", "dstnat"),
        ("output", "output", "-100"),
        ("postrouting", "postrouting", "srcnat"),
    ] {
        let _ = writeln!(
            s,
            "add chain inet {TABLE} {chain} {{ type nat hook {hook} priority {priority}; policy accept; }}"
        );
    }
    for chain in ["hostports", "prerouting", "output", "postrouting"] {
        let _ = writeln!(s, "flush chain inet {TABLE} {chain}");
    }
    let l4 = "meta l4proto { tcp, udp, sctp }";
    for (family, map) in [
        ("ip", "hp4ip"),
        ("ip", "hp4"),
        ("ip6", "hp6ip"),
        ("ip6", "hp6"),
    ] {
        let key = if map.ends_with("ip") {
            format!("{family} daddr . meta l4proto . th dport")
        } else {
            "meta l4proto . th dport".to_owned()
        };
        let _ = writeln!(
            s,
            "add rule inet {TABLE} hostports {l4} dnat {family} to {key} map @{map}"
        );
    }
    let _ = writeln!(
        s,
        "add rule inet {TABLE} prerouting fib daddr type local jump hostports"
    );
    let _ = writeln!(
        s,
        "add rule inet {TABLE} output fib daddr type local jump hostports"
    );
    // The node itself reaching a host port on 127.0.0.1: the reply must come
    // back to a routable source.
    let _ = writeln!(
        s,
        "add rule inet {TABLE} postrouting ct status dnat ip saddr 127.0.0.0/8 masquerade"
    );
    s
}

/// A network's chain. A pod reaching a pod through a host port (its own
/// included: hairpin) is always masqueraded, so replies return through the
/// node, as the reference portmap plugin does. With `masquerade` (ipMasq),
/// pod traffic leaving the pod subnets (but not multicast) also leaves with
/// the node's address.
pub fn network_script(chain: &str, subnets: &[IpNet], masquerade: bool) -> String {
    let mut s = base_script();
    let _ = writeln!(
        s,
        "add chain inet {TABLE} {chain} {{ type nat hook postrouting priority srcnat; policy accept; }}"
    );
    let _ = writeln!(s, "flush chain inet {TABLE} {chain}");
    for subnet in subnets {
        let (family, multicast) = match subnet {
            IpNet::V4(_) => ("ip", "224.0.0.0/4"),
            IpNet::V6(_) => ("ip6", "ff00::/8"),
        };
        let net = subnet.trunc();
        let _ = writeln!(
            s,
            "add rule inet {TABLE} {chain} {family} saddr {net} {family} daddr {net} ct status dnat masquerade"
        );
        if masquerade {
            let _ = writeln!(
                s,
                "add rule inet {TABLE} {chain} {family} saddr {net} {family} daddr != {net} {family} daddr != {multicast} masquerade"
            );
        }
    }
    s
}

/// Adds a pod's host ports; fails if another pod holds one of them.
pub fn add_ports_script(ports: &[HostPort]) -> String {
    let mut s = base_script();
    for port in ports {
        let _ = writeln!(
            s,
            "add element inet {TABLE} {} {{ {} }}",
            port.map(),
            port.element()
        );
    }
    s
}

/// Removes a pod's host ports. Adding each element first makes a missing
/// one harmless, and makes the transaction fail (deleting nothing) if the
/// port now belongs to someone else.
pub fn delete_ports_script(ports: &[HostPort]) -> String {
    let mut s = String::new();
    for port in ports {
        let element = format!("{} {{ {} }}", port.map(), port.element());
        let _ = writeln!(s, "add element inet {TABLE} {element}");
        let _ = writeln!(s, "delete element inet {TABLE} {element}");
    }
    s
}

/// The kernel side of this module.
pub trait Firewall {
    /// Whether chain `chain` of our table exists.
    fn chain_exists(&mut self, chain: &str) -> Result<bool, NatError>;
    /// Applies an nft script as one transaction.
    fn apply(&mut self, script: &str) -> Result<(), NatError>;
}

/// nftables through the `nft` binary (for changes) and a netlink query
/// (for the existence check, which runs on every ADD and must not fork).
#[derive(Debug, Default)]
pub struct Nft;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFPROTO_INET: u8 = 1;
const NLMSG_ERROR: u16 = 2;

fn push_attr(buf: &mut Vec<u8>, kind: u16, value: &str) {
    let len = 4 + value.len() + 1;
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value.as_bytes());
    buf.push(0);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// One NFT_MSG_GETCHAIN request: the answer is the chain or ENOENT.
fn getchain_request(chain: &str) -> Vec<u8> {
    let mut buf = vec![0u8; 16];
    buf.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]);
    push_attr(&mut buf, NFTA_CHAIN_TABLE, TABLE);
    push_attr(&mut buf, NFTA_CHAIN_NAME, chain);
    let len = buf.len() as u32;
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
    buf[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN).to_ne_bytes());
    let flags: u16 = 1 | 4; // NLM_F_REQUEST | NLM_F_ACK
    buf[6..8].copy_from_slice(&flags.to_ne_bytes());
    buf[8..12].copy_from_slice(&1u32.to_ne_bytes());
    buf
}

/// Reads the answers to [`getchain_request`].
fn parse_getchain_reply(bytes: &[u8], found: &mut bool) -> io::Result<bool> {
    let mut offset = 0;
    while offset + 16 <= bytes.len() {
        let word = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at..at + 4]);
            b
        };
        let len = u32::from_ne_bytes(word(offset)) as usize;
        let kind = u16::from_ne_bytes([bytes[offset + 4], bytes[offset + 5]]);
        if len < 16 || offset + len > bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated nfnetlink reply",
            ));
        }
        if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN {
            *found = true;
        } else if kind == NLMSG_ERROR && len >= 20 {
            let code = i32::from_ne_bytes(word(offset + 16));
            return match -code {
                0 => Ok(true),
                nix::libc::ENOENT => {
                    *found = false;
                    Ok(true)
                }
                errno => Err(io::Error::from_raw_os_error(errno)),
            };
        }
        offset += len.next_multiple_of(4);
    }
    Ok(false)
}

impl Firewall for Nft {
    fn chain_exists(&mut self, chain: &str) -> Result<bool, NatError> {
        let query = || -> io::Result<bool> {
            let mut socket = Socket::new(NETLINK_NETFILTER)?;
            socket.bind_auto()?;
            socket.connect(&SocketAddr::new(0, 0))?;
            socket.send(&getchain_request(chain), 0)?;
            let mut found = false;
            loop {
                let (bytes, _) = socket.recv_from_full()?;
                if parse_getchain_reply(&bytes, &mut found)? {
                    return Ok(found);
                }
            }
        };
        query().map_err(NatError::Query)
    }

    fn apply(&mut self, script: &str) -> Result<(), NatError> {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(NatError::Spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(NatError::Spawn)?;
        }
        let output = child.wait_with_output().map_err(NatError::Spawn)?;
        if output.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            Err(NatError::Rejected(
                stderr
                    .lines()
                    .find(|l| l.contains("Error"))
                    .unwrap_or(stderr.trim())
                    .to_owned(),
            ))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn port(host_ip: Option<&str>, pod_ip: &str) -> HostPort {
        HostPort {
            protocol: "tcp".into(),
            host_ip: host_ip.map(|h| h.parse().unwrap()),
            host_port: 8080,
            pod_ip: pod_ip.parse().unwrap(),
            pod_port: 80,
        }
    }

    #[test]
    fn network_chain_name_follows_subnets_and_masquerade() {
        let subnet: Vec<IpNet> = vec!["10.1.0.0/24".parse().unwrap()];
        let a = network_chain("net", &subnet, true);
        let b = network_chain("net", &["10.2.0.0/24".parse().unwrap()], true);
        assert_ne!(a, b);
        assert_ne!(a, network_chain("net", &subnet, false));
        assert!(a.starts_with("net-") && a.len() == 16, "{a}");
        assert_eq!(a, network_chain("net", &subnet, true));
    }

    #[test]
    fn network_script_is_idempotent_and_covers_both_families() {
        let subnets: Vec<IpNet> =
            vec!["10.1.0.7/24".parse().unwrap(), "fd00::/64".parse().unwrap()];
        let hairpin_only = network_script("masq-x", &subnets, false);
        assert!(hairpin_only
            .contains("ip saddr 10.1.0.0/24 ip daddr 10.1.0.0/24 ct status dnat masquerade"));
        assert!(!hairpin_only.contains("daddr != 10.1.0.0/24"));
        let script = network_script("masq-x", &subnets, true);
        assert!(script.contains("flush chain inet bosun-cni masq-x"));
        assert!(script.contains(
            "ip saddr 10.1.0.0/24 ip daddr != 10.1.0.0/24 ip daddr != 224.0.0.0/4 masquerade"
        ));
        assert!(script.contains("ip6 saddr fd00::/64 ip6 daddr != fd00::/64"));
        assert!(!script.contains("add rule inet bosun-cni masq-x\n"));
    }

    #[test]
    fn host_ports_pick_the_map_by_family_and_host_ip() {
        let script = add_ports_script(&[
            port(None, "10.1.0.5"),
            port(Some("192.0.2.1"), "10.1.0.5"),
            port(None, "fd00::5"),
        ]);
        assert!(script.contains("add element inet bosun-cni hp4 { tcp . 8080 : 10.1.0.5 . 80 }"));
        assert!(script.contains(
            "add element inet bosun-cni hp4ip { 192.0.2.1 . tcp . 8080 : 10.1.0.5 . 80 }"
        ));
        assert!(script.contains("add element inet bosun-cni hp6 { tcp . 8080 : fd00::5 . 80 }"));
        let delete = delete_ports_script(&[port(None, "10.1.0.5")]);
        assert_eq!(
            delete,
            "add element inet bosun-cni hp4 { tcp . 8080 : 10.1.0.5 . 80 }\n\
             delete element inet bosun-cni hp4 { tcp . 8080 : 10.1.0.5 . 80 }\n"
        );
    }

    #[test]
    fn getchain_request_is_well_formed() {
        let req = getchain_request("masq-abc");
        assert_eq!(req.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes([req[0], req[1], req[2], req[3]]) as usize,
            req.len()
        );
        assert!(req.windows(9).any(|w| w == b"bosun-cni"));
    }

    #[test]
    fn getchain_reply_parsing() {
        let mut error = vec![0u8; 36];
        error[0..4].copy_from_slice(&36u32.to_ne_bytes());
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error[16..20].copy_from_slice(&(-nix::libc::ENOENT).to_ne_bytes());
        let mut found = true;
        assert!(parse_getchain_reply(&error, &mut found).unwrap());
        assert!(!found);
        let mut chain = vec![0u8; 20];
        chain[0..4].copy_from_slice(&20u32.to_ne_bytes());
        chain[4..6]
            .copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN).to_ne_bytes());
        assert!(!parse_getchain_reply(&chain, &mut found).unwrap());
        assert!(found);
        error[16..20].copy_from_slice(&0i32.to_ne_bytes());
        assert!(parse_getchain_reply(&error, &mut found).unwrap());
        assert!(found);
    }
}
