//! The six verbs, wiring policy ([`bridge`], [`ipam`], [`nat`]) to the
//! kernel ([`Rtnl`], [`Nft`]) and the store.
//!
//! Locking: the network's store lock is held while addresses and records
//! change, not while links are built, so parallel ADDs overlap their
//! netlink work.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::net::IpAddr;
use std::os::fd::AsFd;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::bridge::{self, AddParams};
use crate::env::{Command, Env, Target};
use crate::error::{code, CniError};
use crate::ipam::{self, Store};
use crate::link::{parse_mac, Links, NetError};
use crate::nat::{self, Firewall, HostPort, NatError, Nft};
use crate::netconf::{self, AttachmentKey, NetConf, SUPPORTED_VERSIONS};
use crate::result::CniResult;
use crate::rtnl::Rtnl;
use crate::shaping;
use crate::store::{network_dir, FileStore};
use crate::{netns, short_hash};

/// The newest spec version; VERSION answers in it when asked without one.
pub const SPEC_VERSION: &str = "1.1.0";

/// What an ADD builds, written beside the allocations before it builds
/// it: DEL and GC find the links and host ports by it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    container_id: String,
    ifname: String,
    host_veth: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    host_ports: Vec<HostPort>,
    /// The ifb device of egress shaping, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ifb: Option<String>,
}

fn record_key(id: &str, ifname: &str) -> String {
    format!("{:016x}", short_hash(&[id, ifname]))
}

impl From<NetError> for CniError {
    fn from(err: NetError) -> Self {
        CniError::io(err.to_string())
    }
}

impl From<bridge::BridgeError> for CniError {
    fn from(err: bridge::BridgeError) -> Self {
        match err {
            bridge::BridgeError::Net(net) => net.into(),
            other => CniError::invalid_config(other.to_string()),
        }
    }
}

impl From<NatError> for CniError {
    fn from(err: NatError) -> Self {
        CniError::io(err.to_string())
    }
}

/// Runs one invocation: `stdin` is the netconf. `Ok(Some(json))` is printed
/// on stdout; DEL and GC succeed silently. Links retired by DEL are handed
/// back in `reap` for the caller to delete after answering.
pub fn run(
    env: &Env,
    stdin: &[u8],
    reap: &mut Vec<(Rtnl, u32)>,
) -> Result<Option<Value>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(version(stdin)));
    }
    let conf = netconf::parse(stdin)?;
    if !matches!(
        conf.ipam.ipam_type.as_str(),
        "" | "host-local" | "bosun-cni"
    ) {
        return Err(CniError::unsupported_field(format!(
            "ipam.type {:?}: bosun-cni has host-local IPAM built in; leave type empty or \"host-local\"",
            conf.ipam.ipam_type
        )));
    }
    let target = env.target.as_ref();
    match (env.command, target) {
        (Command::Add, Some(t)) => add(&conf, t).map(|r| Some(r.to_json(&conf.cni_version))),
        (Command::Del, Some(t)) => del(&conf, t, reap).map(|()| None),
        (Command::Check, Some(t)) => check(&conf, t).map(|()| None),
        (Command::Status, _) => status(&conf).map(|()| None),
        (Command::Gc, _) => gc(&conf).map(|()| None),
        _ => Err(CniError::invalid_environment(
            "CNI_CONTAINERID, CNI_IFNAME and CNI_NETNS are required",
        )),
    }
}

fn version(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| SPEC_VERSION.to_owned());
    json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS})
}

fn open_store(conf: &NetConf) -> Result<FileStore, CniError> {
    Ok(FileStore::open(network_dir(
        conf.ipam.data_dir.as_deref(),
        &conf.name,
    ))?)
}

fn open_netns(path: &str) -> Result<File, CniError> {
    File::open(path)
        .map_err(|e| CniError::unknown_container(format!("network namespace {path}: {e}")))
}

/// A host veth name the kernel will not have: `veth` + 8 random hex digits,
/// as the reference plugin names them.
fn random_name(prefix: &str) -> Result<String, CniError> {
    let mut bytes = [0u8; 4];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| CniError::io(format!("read /dev/urandom: {e}")))?;
    Ok(format!("{prefix}{:08x}", u32::from_ne_bytes(bytes)))
}

fn host_ports(conf: &NetConf, assigned: &[ipam::Assigned]) -> Vec<HostPort> {
    let mut out = Vec::new();
    for mapping in &conf.runtime_config.port_mappings {
        let host_ip: Option<IpAddr> = mapping
            .host_ip
            .as_deref()
            .filter(|h| !h.is_empty())
            .and_then(|h| h.parse().ok());
        for a in assigned {
            let pod_ip = a.address.addr();
            if host_ip.is_some_and(|h| h.is_ipv4() != pod_ip.is_ipv4()) {
                continue;
            }
            out.push(HostPort {
                protocol: mapping.protocol.to_ascii_lowercase(),
                host_ip,
                host_port: mapping.host_port,
                pod_ip,
                pod_port: mapping.container_port,
            });
        }
    }
    out
}

fn pod_subnets(conf: &NetConf) -> Vec<IpNet> {
    conf.range_sets()
        .iter()
        .flat_map(|set| set.ranges.iter().map(|r| r.subnet))
        .collect()
}

fn add(conf: &NetConf, target: &Target) -> Result<CniResult, CniError> {
    let netns_path = target.netns.as_deref().unwrap_or_default();
    let netns = open_netns(netns_path)?;
    let mut requested = conf.requested_ips().to_vec();
    requested.extend(&target.requested_ips);
    let key = record_key(&target.container_id, &target.ifname);
    let host_veth = random_name("veth")?;
    let alias = bridge::alias(&conf.name, &target.container_id, &target.ifname);
    if let Some(limits) = &conf.runtime_config.bandwidth {
        shaping::plan(&host_veth, &alias, limits)
            .map_err(|e| CniError::invalid_config(e.to_string()))?;
    }

    // Reserve addresses and write down what we are about to build, so a
    // kill at any later point is something GC can undo. Everything the
    // record holds is known now: one write serves DEL, GC and a killed ADD.
    let (assigned, record) = {
        let mut store = open_store(conf)?;
        let assigned = ipam::allocate(
            &mut store,
            conf.range_sets(),
            &target.container_id,
            &target.ifname,
            &requested,
        )?;
        let record = Record {
            container_id: target.container_id.clone(),
            ifname: target.ifname.clone(),
            host_veth: host_veth.clone(),
            host_ports: host_ports(conf, &assigned),
            ifb: conf
                .runtime_config
                .bandwidth
                .as_ref()
                .filter(|b| b.egress_rate.is_some())
                .map(|_| shaping::ifb_name(&host_veth)),
        };
        store.put_record(&key, &to_json(&record))?;
        (assigned, record)
    };

    match build(conf, target, &netns, netns_path, &assigned, &record) {
        Ok(result) => Ok(result),
        Err(err) => {
            let mut store = open_store(conf)?;
            ipam::release(&mut store, &target.container_id, &target.ifname)?;
            store.remove_record(&key)?;
            Err(err)
        }
    }
}

fn to_json(record: &Record) -> String {
    serde_json::to_string(record).unwrap_or_default()
}

fn build(
    conf: &NetConf,
    target: &Target,
    netns: &File,
    netns_path: &str,
    assigned: &[ipam::Assigned],
    record: &Record,
) -> Result<CniResult, CniError> {
    let has_v6 = assigned.iter().any(|a| a.address.addr().is_ipv6());
    let mut host = Rtnl::open()?;
    let mut pod = netns::within(netns, || -> Result<Rtnl, CniError> {
        if has_v6 {
            // Interfaces created from now on take IPv6 addresses even where
            // the namespace was made with IPv6 off by default.
            netns::set_sysctl("ipv6/conf/default/disable_ipv6", "0")
                .map_err(|e| CniError::io(e.to_string()))?;
        }
        Ok(Rtnl::open()?)
    })
    .map_err(|e| CniError::io(format!("enter network namespace {netns_path}: {e}")))??;

    let mac = conf.runtime_config.mac.as_deref().and_then(parse_mac);
    let result = bridge::add(
        &mut host,
        &mut pod,
        &AddParams {
            conf,
            container_id: &target.container_id,
            ifname: &target.ifname,
            netns_path,
            netns: netns.as_fd(),
            assigned,
            host_veth: &record.host_veth,
            mac,
        },
    )?;
    let finish = || -> Result<(), CniError> {
        node_sysctls(conf, assigned, !record.host_ports.is_empty())?;
        let mut nft = Nft;
        if conf.ip_masq || !record.host_ports.is_empty() {
            let subnets = pod_subnets(conf);
            let chain = nat::network_chain(&conf.name, &subnets, conf.ip_masq);
            if !nft.chain_exists(&chain)? {
                nft.apply(&nat::network_script(&chain, &subnets, conf.ip_masq))?;
            }
        }
        if !record.host_ports.is_empty() {
            nft.apply(&nat::add_ports_script(&record.host_ports))
                .map_err(|e| port_conflict(&record.host_ports, e))?;
        }
        if let Some(limits) = &conf.runtime_config.bandwidth {
            let alias = bridge::alias(&conf.name, &target.container_id, &target.ifname);
            shaping::apply(&record.host_veth, &alias, limits)
                .map_err(|e| CniError::io(e.to_string()))?;
        }
        Ok(())
    };
    if let Err(err) = finish() {
        for name in std::iter::once(&record.host_veth).chain(&record.ifb) {
            if let Ok(Some(link)) = host.link(name) {
                let _ = host.delete_link(link.index);
            }
        }
        if !record.host_ports.is_empty() {
            let _ = Nft.apply(&nat::delete_ports_script(&record.host_ports));
        }
        return Err(err);
    }
    Ok(result)
}

fn port_conflict(ports: &[HostPort], err: NatError) -> CniError {
    match &err {
        NatError::Rejected(text) if text.contains("File exists") => CniError::new(
            code::HOST_PORT_TAKEN,
            "host port already mapped to another container",
            ports
                .iter()
                .map(HostPort::describe)
                .collect::<Vec<_>>()
                .join(", "),
        ),
        _ => err.into(),
    }
}

/// Forwarding for gateway mode, and route_localnet on the bridge so the
/// node can reach host ports via 127.0.0.1.
fn node_sysctls(
    conf: &NetConf,
    assigned: &[ipam::Assigned],
    host_ports: bool,
) -> Result<(), CniError> {
    let set = |key: &str| netns::set_sysctl(key, "1").map_err(|e| CniError::io(e.to_string()));
    if conf.is_gateway || conf.is_default_gateway {
        if assigned.iter().any(|a| a.address.addr().is_ipv4()) {
            set("ipv4/ip_forward")?;
        }
        if assigned.iter().any(|a| a.address.addr().is_ipv6()) {
            set("ipv6/conf/all/forwarding")?;
        }
    }
    if host_ports {
        set(&format!("ipv4/conf/{}/route_localnet", conf.bridge))?;
    }
    Ok(())
}

fn del(conf: &NetConf, target: &Target, reap: &mut Vec<(Rtnl, u32)>) -> Result<(), CniError> {
    let key = record_key(&target.container_id, &target.ifname);
    let mut store = open_store(conf)?;
    let record: Option<Record> = store
        .record(&key)?
        .and_then(|text| serde_json::from_str(&text).ok());
    if let Some(record) = &record {
        remove_host_ports(&record.host_ports)?;
    }
    // The pod's end first: renaming it frees CNI_IFNAME for a new ADD. If
    // the namespace is gone, so is the pair, unless someone else holds it:
    // then the host end is found by name and alias.
    let netns = target.netns.as_deref().and_then(|p| File::open(p).ok());
    let retired_name = random_name("bsnd")?;
    match netns {
        Some(netns) => {
            let mut pod = netns::within(&netns, Rtnl::open)
                .map_err(|e| CniError::io(format!("enter network namespace: {e}")))??;
            if let Some(index) = bridge::retire(&mut pod, &target.ifname, &retired_name)? {
                reap.push((pod, index));
            }
        }
        None => {
            if let Some(record) = &record {
                let mut host = Rtnl::open()?;
                let ours = bridge::alias(&conf.name, &target.container_id, &target.ifname);
                let found = host.link(&record.host_veth)?;
                if found.is_some_and(|l| l.alias.as_deref() == Some(ours.as_str())) {
                    if let Some(index) =
                        bridge::retire(&mut host, &record.host_veth, &retired_name)?
                    {
                        reap.push((host, index));
                    }
                }
            }
        }
    }
    ipam::release(&mut store, &target.container_id, &target.ifname)?;
    store.remove_record(&key)?;
    // Egress shaping's ifb outlives the veth; the tbf on the veth does not.
    if let Some(ifb) = record.as_ref().and_then(|r| r.ifb.as_deref()) {
        let mut host = Rtnl::open()?;
        if let Some(link) = host.link(ifb)? {
            host.delete_link(link.index)?;
        }
    }
    Ok(())
}

/// Removes host ports; one now held by another pod is left to its owner.
fn remove_host_ports(ports: &[HostPort]) -> Result<(), CniError> {
    if ports.is_empty() {
        return Ok(());
    }
    match Nft.apply(&nat::delete_ports_script(ports)) {
        Ok(()) => Ok(()),
        Err(NatError::Rejected(_)) => {
            for port in ports {
                match Nft.apply(&nat::delete_ports_script(std::slice::from_ref(port))) {
                    Ok(()) | Err(NatError::Rejected(_)) => {}
                    Err(err) => return Err(err.into()),
                }
            }
            Ok(())
        }
        Err(err) => Err(err.into()),
    }
}

fn check(conf: &NetConf, target: &Target) -> Result<(), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::invalid_config("CHECK needs prevResult (the result ADD returned)")
    })?;
    let expected = CniResult::from_json(prev)?;
    let netns_path = target.netns.as_deref().unwrap_or_default();
    let netns = open_netns(netns_path)?;
    let mut host = Rtnl::open()?;
    let mut pod = netns::within(&netns, Rtnl::open)
        .map_err(|e| CniError::io(format!("enter network namespace {netns_path}: {e}")))??;
    let mut drift = bridge::check(&mut host, &mut pod, conf, &target.ifname, &expected)?;

    let store = open_store(conf)?;
    let held: BTreeSet<IpAddr> = store
        .allocations()?
        .into_iter()
        .filter(|a| a.container_id == target.container_id && a.ifname == target.ifname)
        .map(|a| a.ip)
        .collect();
    for ip in &expected.ips {
        if !held.contains(&ip.address.addr()) {
            drift.push(format!(
                "IPAM no longer holds {} for this container",
                ip.address.addr()
            ));
        }
    }
    if conf.ip_masq {
        let chain = nat::network_chain(&conf.name, &pod_subnets(conf), true);
        if !Nft.chain_exists(&chain)? {
            drift.push(format!(
                "masquerade chain inet {} {chain} is missing",
                nat::TABLE
            ));
        }
    }
    if drift.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::CHECK_FAILED,
            "attachment does not match its ADD result",
            drift.join("; "),
        ))
    }
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    let store = open_store(conf)?;
    let full = ipam::exhausted(&store, conf.range_sets())?;
    if full.is_empty() {
        return Ok(());
    }
    let ranges: Vec<String> = full
        .iter()
        .filter_map(|i| conf.range_sets().get(*i))
        .map(|set| {
            set.ranges
                .iter()
                .map(|r| r.subnet.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    Err(CniError::plugin_not_available(format!(
        "no free address in range set {}",
        ranges.join(" and ")
    )))
}

fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid: BTreeSet<AttachmentKey> = conf
        .valid_attachments
        .clone()
        .ok_or_else(|| {
            CniError::invalid_config("GC needs cni.dev/valid-attachments (may be an empty list)")
        })?
        .into_iter()
        .collect();
    let is_valid = |id: &str, ifname: &str| {
        valid.contains(&AttachmentKey {
            container_id: id.to_owned(),
            ifname: ifname.to_owned(),
        })
    };
    let mut store = open_store(conf)?;
    let mut host = Rtnl::open()?;
    for (key, text) in store.records()? {
        let Ok(record) = serde_json::from_str::<Record>(&text) else {
            store.remove_record(&key)?;
            continue;
        };
        if !is_valid(&record.container_id, &record.ifname) {
            remove_host_ports(&record.host_ports)?;
            // The record names the links before they exist, so this also
            // catches an ADD killed before it could label its veth.
            for name in std::iter::once(&record.host_veth).chain(&record.ifb) {
                if let Some(link) = host.link(name)? {
                    delete_if_present(&mut host, link.index)?;
                }
            }
            store.remove_record(&key)?;
        }
    }
    let stale: BTreeSet<(String, String)> = store
        .allocations()?
        .into_iter()
        .filter(|a| !is_valid(&a.container_id, &a.ifname))
        .map(|a| (a.container_id, a.ifname))
        .collect();
    for (id, ifname) in &stale {
        ipam::release(&mut store, id, ifname)?;
    }
    // Links labelled for an attachment that is gone (a record lost or
    // unreadable).
    for link in host.links()? {
        let Some((network, id, ifname)) = link.alias.as_deref().and_then(bridge::parse_alias)
        else {
            continue;
        };
        if network == conf.name && !is_valid(id, ifname) {
            delete_if_present(&mut host, link.index)?;
        }
    }
    Ok(())
}

fn delete_if_present(host: &mut Rtnl, index: u32) -> Result<(), CniError> {
    match host.delete_link(index) {
        Ok(()) => Ok(()),
        Err(err) if err.errno() == Some(nix::libc::ENODEV) => Ok(()),
        Err(err) => Err(err.into()),
    }
}
