//! `bosun-cni` as the first plugin of a chain, driven the way libcni drives
//! a conflist: Debian's reference `tuning` and `portmap` (1.1.1) after it.
//!
//! The driver below does what libcni's `AddNetworkList` / `CheckNetworkList`
//! / `DelNetworkList` do: each plugin's netconf is its conflist entry plus
//! the list's `name` and `cniVersion`, `prevResult` (ADD: the previous
//! plugin's result; CHECK and DEL: the cached result of the whole ADD) and
//! `runtimeConfig` holding only the capabilities that plugin declared.
//! ADD and CHECK run in list order, DEL in reverse; plugins are looked up
//! in CNI_PATH.
//!
//! Everything happens in namespaces the test makes: a "node" namespace
//! holding the bridge, the iptables/nftables rules and the plugins'
//! processes, and a pod namespace beside it. Namespaces, the IPAM dir and
//! tuning's state dir go away on drop, also when the test fails.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use ipnet::IpNet;
use serde_json::{json, Map, Value};

use common::{Call, Netns};

/// The reference plugins speak up to 1.0.0, so the list does too.
const LIST_VERSION: &str = "1.0.0";
const SUBNET: &str = "10.77.0.0/24";
const GATEWAY: &str = "10.77.0.1";
const SUBNET6: &str = "fd77::/64";
const GATEWAY6: &str = "fd77::1";
const BRIDGE: &str = "bcchain0";
const TUNED_MAC: &str = "0e:42:00:00:be:ef";
const TUNED_MTU: u64 = 1400;
const HOST_PORT: u16 = 18080;
const POD_PORT: u16 = 8080;

/// A conflist and the runtime's side of libcni: CNI_PATH and the
/// capability arguments of one attachment.
struct Chain {
    list: Value,
    cni_path: Vec<PathBuf>,
    capability_args: Map<String, Value>,
}

impl Chain {
    fn plugins(&self) -> Vec<Value> {
        self.list["plugins"].as_array().cloned().unwrap_or_default()
    }

    /// libcni's `buildOneConfig` + `injectRuntimeConfig`.
    fn netconf(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.as_object().cloned().unwrap_or_default();
        conf.insert("name".into(), self.list["name"].clone());
        conf.insert("cniVersion".into(), self.list["cniVersion"].clone());
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        let mut runtime_config = Map::new();
        if let Some(caps) = plugin["capabilities"].as_object() {
            for (cap, on) in caps {
                if on.as_bool() == Some(true) {
                    if let Some(arg) = self.capability_args.get(cap) {
                        runtime_config.insert(cap.clone(), arg.clone());
                    }
                }
            }
        }
        if !runtime_config.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime_config));
        }
        Value::Object(conf)
    }

    /// The binary for `type`, searched in CNI_PATH.
    fn binary(&self, plugin: &Value) -> Result<PathBuf> {
        let kind = plugin["type"].as_str().context("plugin without type")?;
        self.cni_path
            .iter()
            .map(|dir| dir.join(kind))
            .find(|p| p.is_file())
            .with_context(|| format!("plugin {kind} not in CNI_PATH {:?}", self.cni_path))
    }

    fn exec(&self, node: &Netns, plugin: &Value, call: &Call<'_>, conf: &Value) -> Result<Value> {
        let out = common::invoke(node, &self.binary(plugin)?, call, conf)?;
        if !out.success {
            bail!(
                "{} of plugin {} failed\nstdin: {conf}\nstdout: {}",
                call.command,
                plugin["type"],
                out.stdout
            );
        }
        Ok(out.json)
    }

    /// `AddNetworkList`: returns the final result (what libcni caches).
    fn add(&self, node: &Netns, pod: &Netns, id: &str) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let conf = self.netconf(&plugin, prev.as_ref());
            let result = self.exec(node, &plugin, &Call::new("ADD", id, pod), &conf)?;
            ensure!(
                result.is_object(),
                "ADD of {} printed no result",
                plugin["type"]
            );
            prev = Some(result);
        }
        prev.context("empty plugin list")
    }

    /// `CheckNetworkList`: every plugin, in order, against the cached
    /// result. Returns the failures `known` forgives, with their error.
    fn check(
        &self,
        node: &Netns,
        pod: &Netns,
        id: &str,
        cached: &Value,
        known: impl Fn(&Value, &Value) -> bool,
    ) -> Result<Vec<(String, Value)>> {
        let mut forgiven = Vec::new();
        for plugin in self.plugins() {
            let conf = self.netconf(&plugin, Some(cached));
            let out = common::invoke(
                node,
                &self.binary(&plugin)?,
                &Call::new("CHECK", id, pod),
                &conf,
            )?;
            if out.success {
                continue;
            }
            ensure!(
                known(&plugin, &out.json),
                "CHECK of plugin {} failed\nstdin: {conf}\nstdout: {}",
                plugin["type"],
                out.stdout
            );
            forgiven.push((plugin["type"].to_string(), out.json));
        }
        Ok(forgiven)
    }

    /// `DelNetworkList`: every plugin in reverse order, with the cached
    /// result (when there is one).
    fn del(&self, node: &Netns, pod: &Netns, id: &str, cached: Option<&Value>) -> Result<()> {
        for plugin in self.plugins().iter().rev() {
            let conf = self.netconf(plugin, cached);
            self.exec(node, plugin, &Call::new("DEL", id, pod), &conf)?;
        }
        Ok(())
    }
}

/// The conflist: our bridge plugin (port mappings not declared, so only
/// portmap sees them), tuning with a MAC, an MTU and a sysctl for the
/// container's interface, portmap.
///
/// Dual stack, so portmap maps the hostPort over IPv6 too.
fn conflist(name: &str, dir: &Path) -> Value {
    let mut ours = common::netconf(name, BRIDGE, SUBNET, &dir.join("ipam"));
    ours["ipam"]["ranges"] = json!([[{"subnet": SUBNET}], [{"subnet": SUBNET6}]]);
    let ours_obj = ours.as_object_mut().unwrap();
    ours_obj.remove("name");
    ours_obj.remove("cniVersion");
    json!({
        "cniVersion": LIST_VERSION,
        "name": name,
        "plugins": [
            ours,
            {
                "type": "tuning",
                "mac": TUNED_MAC,
                "mtu": TUNED_MTU,
                "sysctl": {"net.ipv4.conf.eth0.arp_notify": "1"},
                "dataDir": dir.join("tuning"),
            },
            {
                "type": "portmap",
                "capabilities": {"portMappings": true},
                "snat": true,
            },
        ]
    })
}

/// IP allocation files in the network's IPAM dir (host-local layout: one
/// file per address, named by it).
fn allocated_ips(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Names of veth links in `ns`.
fn veths(ns: &Netns) -> Result<Vec<String>> {
    let out = ns.exec(&["ip", "-j", "link", "show", "type", "veth"])?;
    let links: Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })?;
    Ok(links
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// `ip -j link show <ifname>` inside `ns`.
fn link(ns: &Netns, ifname: &str) -> Result<Value> {
    let out = ns.exec(&["ip", "-j", "link", "show", ifname])?;
    let links: Value = serde_json::from_str(&out)?;
    Ok(links[0].clone())
}

/// The result's container interface and the addresses on it.
fn pod_addresses(result: &Value, pod: &Netns) -> Result<(usize, Vec<IpNet>)> {
    let sandbox = pod.path().display().to_string();
    let interfaces = result["interfaces"].as_array().context("no interfaces")?;
    let index = interfaces
        .iter()
        .position(|i| i["name"] == "eth0" && i["sandbox"] == sandbox.as_str())
        .with_context(|| format!("no eth0 in {sandbox} among the interfaces: {result}"))?;
    let mut addresses = Vec::new();
    for ip in result["ips"].as_array().context("no ips")? {
        if ip["interface"] == index {
            addresses.push(ip["address"].as_str().context("address")?.parse()?);
        }
    }
    Ok((index, addresses))
}

/// Connects from the node to `addr:port` and returns what the server said.
fn fetch(node: &Netns, addr: &str, port: u16) -> String {
    node.command("busybox")
        .and_then(|mut c| {
            Ok(c.args(["nc", "-w", "2", addr, &port.to_string()])
                .stdin(std::process::Stdio::null())
                .output()?)
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[test]
fn chain_with_tuning_and_portmap() {
    if !common::privileged("CNI chain with tuning and portmap") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = Netns::new("chn").unwrap();
    let pod = Netns::new("chp").unwrap();
    if let Err(err) = chain_scenario(dir.path(), &node, &pod) {
        let diag = node
            .exec(&[
                "sh",
                "-c",
                "ip addr; iptables-save -t nat; nft list ruleset",
            ])
            .unwrap_or_else(|e| format!("{e:#}"));
        panic!("{err:#}\n--- node namespace ---\n{diag}");
    }
}

fn chain_scenario(dir: &Path, node: &Netns, pod: &Netns) -> Result<()> {
    let name = format!("bchain{}", std::process::id());
    let chain = Chain {
        list: conflist(&name, dir),
        cni_path: vec![
            common::plugin().parent().unwrap().to_owned(),
            PathBuf::from(common::REFERENCE_PLUGINS),
        ],
        capability_args: json!({
            "portMappings": [
                {"hostPort": HOST_PORT, "containerPort": POD_PORT, "protocol": "tcp"}
            ]
        })
        .as_object()
        .cloned()
        .unwrap(),
    };
    let id = "chain-container-1";
    let ipam_dir = dir.join("ipam").join(&name);

    // ADD, in order. The final result is ours, as tuning and portmap
    // passed it on (tuning with the MAC it set).
    let result = chain.add(node, pod, id)?;
    ensure!(
        result["cniVersion"] == LIST_VERSION,
        "final result version: {result}"
    );
    let (index, addresses) = pod_addresses(&result, pod)?;
    let (subnet, subnet6): (IpNet, IpNet) = (SUBNET.parse()?, SUBNET6.parse()?);
    let address = *addresses
        .iter()
        .find(|a| subnet.contains(&a.addr()))
        .with_context(|| format!("no address in {SUBNET} on eth0: {result}"))?;
    let address6 = *addresses
        .iter()
        .find(|a| subnet6.contains(&a.addr()))
        .with_context(|| format!("no address in {SUBNET6} on eth0: {result}"))?;
    ensure!(
        result["interfaces"][index]["mac"] == TUNED_MAC,
        "tuning's MAC not in the chain's result: {result}"
    );
    let names: Vec<&str> = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    ensure!(
        names.contains(&BRIDGE),
        "bridge missing from result: {result}"
    );
    let host_veths = veths(node)?;
    ensure!(
        host_veths.len() == 1 && names.contains(&host_veths[0].as_str()),
        "node veths {host_veths:?} vs result {result}"
    );
    let mut held = allocated_ips(&ipam_dir);
    held.sort();
    let mut want = vec![address.addr().to_string(), address6.addr().to_string()];
    want.sort();
    ensure!(held == want, "IPAM files {held:?}, result {want:?}");

    // tuning acted on the interface our plugin made.
    let eth0 = link(pod, "eth0")?;
    ensure!(eth0["address"] == TUNED_MAC, "eth0 MAC: {eth0}");
    ensure!(eth0["mtu"] == TUNED_MTU, "eth0 MTU: {eth0}");
    let arp_notify = pod.exec(&["cat", "/proc/sys/net/ipv4/conf/eth0/arp_notify"])?;
    ensure!(arp_notify.trim() == "1", "arp_notify = {arp_notify}");
    let addrs = pod.exec(&["ip", "-o", "addr", "show", "eth0"])?;
    ensure!(
        addrs.contains(&address.to_string()) && addrs.contains(&address6.to_string()),
        "eth0 addresses: {addrs}"
    );

    // portmap's DNAT: the node's hostPort, IPv4 and IPv6, reaches a server
    // in the pod.
    let mut server = pod.command("busybox")?;
    server
        .args(["nc", "-ll", "-p", &POD_PORT.to_string(), "-e"])
        .args(["/bin/busybox", "echo", "hello-from-pod"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let mut server = server.spawn()?;
    // Each path is polled: the server needs a moment to listen.
    let paths = [
        (address.addr().to_string(), POD_PORT, "pod IPv4 directly"),
        (GATEWAY.to_owned(), HOST_PORT, "hostPort on the node's IPv4"),
        (
            GATEWAY6.to_owned(),
            HOST_PORT,
            "hostPort on the node's IPv6",
        ),
    ];
    let mut unreachable = Vec::new();
    for (addr, port, what) in &paths {
        let mut reply = String::new();
        if !common::eventually(|| {
            reply = fetch(node, addr, *port);
            reply.contains("hello-from-pod")
        }) {
            unreachable.push(format!("{what} ({addr} port {port}): {reply:?}"));
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    ensure!(
        unreachable.is_empty(),
        "the pod's server was not reached via {unreachable:?}"
    );

    // CHECK of the whole chain against the cached result: ours and
    // tuning's (MAC, MTU, sysctl still as configured) must pass. portmap
    // 1.1.1's CHECK of an IPv4 address also looks in ip6tables
    // (containernetworking/plugins issue 819): for an IPv4-only pod it
    // misses the ip6tables chain it never made, for this dual-stack one
    // the IPv4 rules in its ip6tables chain. That step runs after the
    // iptables one, so exactly this error still says the IPv4 DNAT chain
    // checked out; anything else from portmap fails the test.
    let portmap_bug =
        format!("could not check ipv6 dnat: rule [[-p tcp --dport {HOST_PORT} -s {address} ");
    let forgiven = chain.check(node, pod, id, &result, |plugin, err| {
        plugin["type"] == "portmap"
            && err["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with(&portmap_bug))
    })?;
    if !forgiven.is_empty() {
        eprintln!("CHECK failures of known reference-plugin bugs: {forgiven:?}");
    }

    // DEL, in reverse; then nothing is left: no address held, no veth, no
    // eth0, no portmap DNAT chain for this container.
    chain.del(node, pod, id, Some(&result))?;
    ensure!(
        allocated_ips(&ipam_dir).is_empty(),
        "IPAM files after DEL: {:?}",
        allocated_ips(&ipam_dir)
    );
    ensure!(
        common::eventually(|| veths(node).is_ok_and(|v| v.is_empty())),
        "veths left in the node namespace: {:?}",
        veths(node)
    );
    ensure!(
        !pod.succeeds(&["ip", "link", "show", "eth0"]),
        "eth0 still in the pod"
    );
    for save in ["iptables-save", "ip6tables-save"] {
        let nat = node.exec(&[save, "-t", "nat"])?;
        ensure!(!nat.contains("CNI-DN-"), "portmap chains left: {nat}");
    }
    ensure!(
        fetch(node, GATEWAY, HOST_PORT).is_empty(),
        "hostPort still answers after DEL"
    );

    // A repeated DEL (runtimes retry) succeeds, also without a cached result.
    chain.del(node, pod, id, Some(&result))?;
    chain.del(node, pod, id, None)?;
    Ok(())
}
