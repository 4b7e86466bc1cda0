#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::AsFd;
use std::rc::Rc;

use serde_json::json;

use super::*;
use crate::link::format_mac;
use crate::netconf;

/// One namespace's links, addresses and routes, in memory.
#[derive(Default)]
struct NsState {
    links: Vec<Link>,
    addresses: Vec<(u32, IpNet)>,
    routes: Vec<(u32, IpNet, Option<IpAddr>)>,
    fail_routes: bool,
}

/// [`Links`] over an [`NsState`]; a veth's peer lands in `peer`.
#[derive(Clone, Default)]
struct Fake {
    ns: Rc<RefCell<NsState>>,
    peer: Option<Rc<RefCell<NsState>>>,
}

static NEXT_INDEX: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(10);

fn insert(ns: &RefCell<NsState>, name: &str, kind: &str) -> u32 {
    let index = NEXT_INDEX.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ns.borrow_mut().links.push(Link {
        index,
        name: name.to_owned(),
        mac: format_mac(&[2, 0, 0, 0, 0, index as u8]),
        master: None,
        alias: None,
        kind: Some(kind.to_owned()),
        up: false,
    });
    index
}

fn enodev() -> NetError {
    NetError::new("fake", std::io::Error::from_raw_os_error(nix::libc::ENODEV))
}

impl Fake {
    fn edit(&self, index: u32, f: impl FnOnce(&mut Link)) -> Result<(), NetError> {
        let mut ns = self.ns.borrow_mut();
        let link = ns
            .links
            .iter_mut()
            .find(|l| l.index == index)
            .ok_or_else(enodev)?;
        f(link);
        Ok(())
    }
}

impl Links for Fake {
    fn link(&mut self, name: &str) -> Result<Option<Link>, NetError> {
        Ok(self
            .ns
            .borrow()
            .links
            .iter()
            .find(|l| l.name == name)
            .cloned())
    }
    fn links(&mut self) -> Result<Vec<Link>, NetError> {
        Ok(self.ns.borrow().links.clone())
    }
    fn create_bridge(&mut self, name: &str, _mtu: Option<u32>) -> Result<bool, NetError> {
        if self.link(name)?.is_some() {
            return Ok(false);
        }
        insert(&self.ns, name, "bridge");
        Ok(true)
    }
    fn set_up(&mut self, index: u32, _promisc: Option<bool>) -> Result<(), NetError> {
        self.edit(index, |l| l.up = true)
    }
    fn set_down_and_rename(&mut self, index: u32, name: &str) -> Result<(), NetError> {
        self.edit(index, |l| {
            l.up = false;
            l.name = name.to_owned();
        })
    }
    fn create_veth(&mut self, spec: &VethSpec<'_>) -> Result<Link, NetError> {
        let peer = self.peer.clone().ok_or_else(enodev)?;
        if peer.borrow().links.iter().any(|l| l.name == spec.peer_name) {
            let err = std::io::Error::from_raw_os_error(nix::libc::EEXIST);
            return Err(NetError::new("create veth", err));
        }
        let index = insert(&self.ns, spec.host_name, "veth");
        self.edit(index, |l| {
            l.master = Some(spec.master);
            l.alias = Some(spec.alias.to_owned());
            l.up = true;
        })?;
        insert(&peer, spec.peer_name, "veth");
        self.link(spec.host_name)?.ok_or_else(enodev)
    }
    fn set_hairpin(&mut self, index: u32) -> Result<(), NetError> {
        self.edit(index, |_| {})
    }
    fn delete_link(&mut self, index: u32) -> Result<(), NetError> {
        let mut ns = self.ns.borrow_mut();
        ns.links.retain(|l| l.index != index);
        ns.addresses.retain(|(i, _)| *i != index);
        ns.routes.retain(|r| r.0 != index);
        Ok(())
    }
    fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, NetError> {
        let ns = self.ns.borrow();
        Ok(ns
            .addresses
            .iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, a)| *a)
            .collect())
    }
    fn add_address(&mut self, index: u32, address: IpNet) -> Result<(), NetError> {
        let mut ns = self.ns.borrow_mut();
        if !ns.addresses.contains(&(index, address)) {
            ns.addresses.push((index, address));
        }
        Ok(())
    }
    fn delete_address(&mut self, index: u32, address: IpNet) -> Result<(), NetError> {
        self.ns
            .borrow_mut()
            .addresses
            .retain(|a| *a != (index, address));
        Ok(())
    }
    fn routes(&mut self, index: u32) -> Result<Vec<(IpNet, Option<IpAddr>)>, NetError> {
        let ns = self.ns.borrow();
        Ok(ns
            .routes
            .iter()
            .filter(|r| r.0 == index)
            .map(|r| (r.1, r.2))
            .collect())
    }
    fn add_route(&mut self, index: u32, dst: IpNet, gw: Option<IpAddr>) -> Result<(), NetError> {
        let mut ns = self.ns.borrow_mut();
        if ns.fail_routes {
            let err = std::io::Error::from_raw_os_error(nix::libc::ENETUNREACH);
            return Err(NetError::new("add route", err));
        }
        ns.routes.push((index, dst, gw));
        Ok(())
    }
}

fn conf(extra: serde_json::Value) -> NetConf {
    let mut value = json!({
        "cniVersion": "1.1.0", "name": "net", "type": "bosun-cni", "bridge": "br0",
        "isGateway": true, "isDefaultGateway": true,
        "ipam": {"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]],
                 "routes": [{"dst": "192.0.2.0/24"}]}
    });
    if let (Some(base), Some(more)) = (value.as_object_mut(), extra.as_object()) {
        for (k, v) in more {
            base.insert(k.clone(), v.clone());
        }
    }
    netconf::parse(value.to_string().as_bytes()).unwrap()
}

fn assigned() -> Vec<Assigned> {
    vec![
        Assigned {
            address: "10.1.0.2/24".parse().unwrap(),
            gateway: Some("10.1.0.1".parse().unwrap()),
            range_set: 0,
        },
        Assigned {
            address: "fd00::2/64".parse().unwrap(),
            gateway: Some("fd00::1".parse().unwrap()),
            range_set: 1,
        },
    ]
}

fn pair() -> (Fake, Fake) {
    let pod = Fake::default();
    let host = Fake {
        ns: Rc::default(),
        peer: Some(pod.ns.clone()),
    };
    (host, pod)
}

fn run_add(host: &mut Fake, pod: &mut Fake, conf: &NetConf) -> Result<CniResult, BridgeError> {
    // Any fd will do: the fake never enters it.
    let netns = File::open("/dev/null").unwrap();
    add(
        host,
        pod,
        &AddParams {
            conf,
            container_id: "c1",
            ifname: "eth0",
            netns_path: "/run/netns/p",
            netns: netns.as_fd(),
            assigned: &assigned(),
            host_veth: "veth00000001",
            mac: None,
        },
    )
}

#[test]
fn add_builds_bridge_veth_addresses_and_routes() {
    let (mut host, mut pod) = pair();
    let conf = conf(json!({}));
    let result = run_add(&mut host, &mut pod, &conf).unwrap();

    let bridge = host.link("br0").unwrap().unwrap();
    assert!(bridge.up);
    let gateways = host.addresses(bridge.index).unwrap();
    assert!(gateways.contains(&"10.1.0.1/24".parse().unwrap()));
    assert!(gateways.contains(&"fd00::1/64".parse().unwrap()));
    let veth = host.link("veth00000001").unwrap().unwrap();
    assert_eq!(veth.master, Some(bridge.index));
    assert_eq!(veth.alias.as_deref(), Some("bosun-cni/net/c1/eth0"));

    let eth0 = pod.link("eth0").unwrap().unwrap();
    assert!(eth0.up);
    assert_eq!(pod.addresses(eth0.index).unwrap().len(), 2);
    let names: Vec<&str> = result.interfaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["br0", "veth00000001", "eth0"]);
    assert_eq!(
        result.interfaces[2].sandbox.as_deref(),
        Some("/run/netns/p")
    );
    assert!(result.ips.iter().all(|ip| ip.interface == Some(2)));
    let routes: Vec<String> = result
        .routes
        .iter()
        .map(|r| format!("{} {:?}", r.dst, r.gw))
        .collect();
    assert_eq!(
        routes,
        [
            "0.0.0.0/0 Some(10.1.0.1)",
            "::/0 Some(fd00::1)",
            "192.0.2.0/24 Some(10.1.0.1)"
        ]
    );
    assert!(check(&mut host, &mut pod, &conf, "eth0", &result)
        .unwrap()
        .is_empty());
}

#[test]
fn a_failed_step_after_the_veth_removes_it() {
    let (mut host, mut pod) = pair();
    pod.ns.borrow_mut().fail_routes = true;
    let err = run_add(&mut host, &mut pod, &conf(json!({}))).unwrap_err();
    assert!(err.to_string().contains("add route"), "{err}");
    assert!(host.link("veth00000001").unwrap().is_none());
}

#[test]
fn existing_ifname_and_non_bridge_link_are_refused() {
    let (mut host, mut pod) = pair();
    insert(&pod.ns, "eth0", "dummy");
    let err = run_add(&mut host, &mut pod, &conf(json!({}))).unwrap_err();
    assert!(matches!(err, BridgeError::IfnameTaken(_)), "{err}");

    let (mut host, mut pod) = pair();
    insert(&host.ns, "br0", "dummy");
    let err = run_add(&mut host, &mut pod, &conf(json!({}))).unwrap_err();
    assert!(matches!(err, BridgeError::NotABridge(_)), "{err}");
}

#[test]
fn foreign_gateway_address_needs_force_address() {
    let (mut host, mut pod) = pair();
    let index = insert(&host.ns, "br0", "bridge");
    host.add_address(index, "10.1.0.254/24".parse().unwrap())
        .unwrap();
    let err = run_add(&mut host, &mut pod, &conf(json!({}))).unwrap_err();
    assert!(err.to_string().contains("forceAddress"), "{err}");

    let (mut host2, mut pod2) = pair();
    let index = insert(&host2.ns, "br0", "bridge");
    host2
        .add_address(index, "10.1.0.254/24".parse().unwrap())
        .unwrap();
    run_add(&mut host2, &mut pod2, &conf(json!({"forceAddress": true}))).unwrap();
    let addresses = host2.addresses(index).unwrap();
    assert!(!addresses.contains(&"10.1.0.254/24".parse().unwrap()));
    assert!(addresses.contains(&"10.1.0.1/24".parse().unwrap()));
}

#[test]
fn check_names_each_drift() {
    let (mut host, mut pod) = pair();
    let conf = conf(json!({}));
    let result = run_add(&mut host, &mut pod, &conf).unwrap();
    let eth0 = pod.link("eth0").unwrap().unwrap();
    pod.delete_address(eth0.index, "10.1.0.2/24".parse().unwrap())
        .unwrap();
    pod.ns.borrow_mut().routes.clear();
    let veth = host.link("veth00000001").unwrap().unwrap();
    host.edit(veth.index, |l| l.master = None).unwrap();
    let drift = check(&mut host, &mut pod, &conf, "eth0", &result)
        .unwrap()
        .join("\n");
    assert!(
        drift.contains("address 10.1.0.2/24 is missing on eth0"),
        "{drift}"
    );
    assert!(
        drift.contains("route 0.0.0.0/0 via 10.1.0.1 is missing"),
        "{drift}"
    );
    assert!(drift.contains("not attached to bridge br0"), "{drift}");

    pod.delete_link(eth0.index).unwrap();
    let drift = check(&mut host, &mut pod, &conf, "eth0", &result).unwrap();
    assert_eq!(
        drift.last().unwrap(),
        "interface eth0 is missing in the container"
    );
}

#[test]
fn retire_strips_downs_and_renames() {
    let (mut host, mut pod) = pair();
    run_add(&mut host, &mut pod, &conf(json!({}))).unwrap();
    let index = retire(&mut pod, "eth0", "bsnd1").unwrap().unwrap();
    assert!(pod.link("eth0").unwrap().is_none());
    let retired = pod.link("bsnd1").unwrap().unwrap();
    assert_eq!(retired.index, index);
    assert!(!retired.up);
    assert!(pod.addresses(index).unwrap().is_empty());
    assert_eq!(retire(&mut pod, "eth0", "bsnd2").unwrap(), None);
}

#[test]
fn alias_round_trips() {
    assert_eq!(
        parse_alias(&alias("net", "c.1", "eth0")),
        Some(("net", "c.1", "eth0"))
    );
    assert_eq!(parse_alias("something else"), None);
}
