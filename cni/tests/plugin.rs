//! The plugin binary in real network namespaces: a "node" namespace holds
//! the bridge, pods sit beside it, and a second "host" reaches the node
//! over a veth. Nothing touches the host's own namespace.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::thread;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{eventually, invoke, invoke_ok, netconf, plugin, privileged, Call, Netns};
use serde_json::{json, Value};

/// A node namespace, a private IPAM dir and a netconf for them.
struct Node {
    ns: Netns,
    dir: tempfile::TempDir,
    conf: Value,
}

impl Node {
    fn new(tag: &str, subnet: &str) -> Result<Self> {
        let ns = Netns::new(tag)?;
        let dir = tempfile::tempdir()?;
        let conf = netconf("testnet", "bcbr0", subnet, dir.path());
        Ok(Self { ns, dir, conf })
    }

    fn add(&self, id: &str, pod: &Netns) -> Result<Value> {
        invoke_ok(&self.ns, &plugin(), &Call::new("ADD", id, pod), &self.conf)
    }

    fn call(
        &self,
        command: &str,
        id: &str,
        pod: &Netns,
        conf: &Value,
    ) -> Result<common::Invocation> {
        invoke(&self.ns, &plugin(), &Call::new(command, id, pod), conf)
    }

    fn ipam_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("testnet")
    }

    /// IPs the IPAM store holds.
    fn allocated(&self) -> Vec<String> {
        std::fs::read_dir(self.ipam_dir())
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Links in the node other than lo and the bridge.
    fn stray_links(&self) -> Result<Vec<String>> {
        let out = self.ns.exec(&["ip", "-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            .filter(|n| n != "lo" && n != "bcbr0" && !n.starts_with("uplink"))
            .collect())
    }
}

fn ip_of(result: &Value, index: usize) -> String {
    result["ips"][index]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .unwrap_or_default()
        .to_owned()
}

/// `busybox nc -l` in `pod` answering one connection with `reply`.
fn serve_once(pod: &Netns, port: u16, reply: &str) -> Result<std::process::Child> {
    let mut command = pod.command("busybox")?;
    command
        .args(["nc", "-l", "-p", &port.to_string(), "-e", "echo", reply])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let child = command.spawn()?;
    // Give the listener a moment to bind.
    let bound = eventually(|| {
        pod.exec(&["busybox", "netstat", "-ltn"])
            .is_ok_and(|o| o.contains(&format!(":{port} ")))
    });
    ensure!(bound, "listener on port {port} did not come up");
    Ok(child)
}

/// A veth between `node` (`uplink0`, `<net>.1/24`) and another host
/// (`peer`, `<net>.2/24`): the node's uplink.
fn uplink(node: &Netns, other: &Netns, peer: &str, net: &str) -> Result<()> {
    node.exec(&[
        "ip",
        "link",
        "add",
        "uplink0",
        "type",
        "veth",
        "peer",
        "name",
        peer,
        "netns",
        other.name(),
    ])?;
    node.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{net}.1/24"),
        "dev",
        "uplink0",
    ])?;
    node.exec(&["ip", "link", "set", "uplink0", "up"])?;
    other.exec(&["ip", "addr", "add", &format!("{net}.2/24"), "dev", peer])?;
    other.exec(&["ip", "link", "set", peer, "up"])?;
    Ok(())
}

/// Runs `f` on a thread that entered `ns` (setns affects only that thread);
/// sockets made there stay bound to `ns`.
fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = std::fs::File::open(ns.path())?;
    thread::scope(|scope| {
        scope
            .spawn(move || -> Result<T> {
                nix::sched::setns(
                    std::os::fd::AsFd::as_fd(&file),
                    nix::sched::CloneFlags::CLONE_NEWNET,
                )?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    })
}

fn fetch(from: &Netns, host: &str, port: u16) -> Result<String> {
    from.exec(&["busybox", "nc", "-w", "3", host, &port.to_string()])
}

#[test]
fn two_pods_reach_each_other_and_the_gateway_dual_stack() -> Result<()> {
    if !privileged("CNI namespaces") {
        return Ok(());
    }
    let mut node = Node::new("ds", "10.201.0.0/24")?;
    node.conf["ipam"]["ranges"] =
        json!([[{"subnet": "10.201.0.0/24"}], [{"subnet": "fd01:201::/64"}]]);
    let (a, b) = (Netns::new("pa")?, Netns::new("pb")?);
    let ra = node.add("pod-a", &a)?;
    let rb = node.add("pod-b", &b)?;
    assert_eq!(ra["interfaces"][2]["name"], "eth0");
    assert_eq!(
        ra["interfaces"][2]["sandbox"],
        a.path().display().to_string()
    );
    assert_eq!(ra["ips"][0]["gateway"], "10.201.0.1");
    assert_ne!(ip_of(&ra, 0), ip_of(&rb, 0));
    for (from, to) in [
        (&a, ip_of(&rb, 0)),
        (&b, ip_of(&ra, 0)),
        (&a, "10.201.0.1".into()),
    ] {
        from.exec(&["busybox", "ping", "-c", "1", "-W", "2", &to])
            .with_context(|| format!("ping {to}"))?;
    }
    for (from, to) in [(&a, ip_of(&rb, 1)), (&b, "fd01:201::1".into())] {
        from.exec(&["busybox", "ping", "-6", "-c", "1", "-W", "2", &to])
            .with_context(|| format!("ping6 {to}"))?;
    }
    let routes = a.exec(&["ip", "route"])?;
    assert!(
        routes.contains("default via 10.201.0.1 dev eth0"),
        "{routes}"
    );
    assert_eq!(
        node.ns
            .exec(&["sysctl", "-n", "net.ipv4.ip_forward"])?
            .trim(),
        "1"
    );
    Ok(())
}

#[test]
fn host_port_is_reachable_from_another_host_the_node_and_other_pods() -> Result<()> {
    if !privileged("CNI namespaces") {
        return Ok(());
    }
    let node = Node::new("hp", "10.202.0.0/24")?;
    let other_host = Netns::new("h2")?;
    // The node's uplink to the other host: 192.168.202.1 <-> .2.
    uplink(&node.ns, &other_host, "uplink1", "192.168.202")?;

    let (web, client) = (Netns::new("web")?, Netns::new("cli")?);
    let mut conf = node.conf.clone();
    // With br_netfilter loaded (as on most nodes), a pod reaching its own
    // host port is DNATed back out of the bridge port it came in on: that
    // needs hairpin mode, as with the reference bridge plugin.
    conf["hairpinMode"] = json!(true);
    conf["runtimeConfig"] = json!({"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 8053, "containerPort": 53, "protocol": "udp"},
        {"hostPort": 8081, "containerPort": 81, "protocol": "tcp", "hostIP": "192.168.202.1"}
    ]});
    invoke_ok(&node.ns, &plugin(), &Call::new("ADD", "web", &web), &conf)?;
    node.add("client", &client)?;

    let cases: [(&Netns, &str, &str); 5] = [
        (&other_host, "192.168.202.1", "from another host"),
        (&node.ns, "192.168.202.1", "from the node, its own address"),
        (&node.ns, "127.0.0.1", "from the node, localhost"),
        (&client, "192.168.202.1", "from another pod"),
        (&web, "192.168.202.1", "from the pod itself (hairpin)"),
    ];
    for (from, address, what) in cases {
        let mut server = serve_once(&web, 80, "hello")?;
        let got = fetch(from, address, 8080).with_context(|| what.to_owned())?;
        let _ = server.kill();
        let _ = server.wait();
        assert_eq!(got.trim(), "hello", "{what}");
    }
    // A second container asking for the same host port is refused by name.
    let thief = Netns::new("thf")?;
    let out = invoke(
        &node.ns,
        &plugin(),
        &Call::new("ADD", "thief", &thief),
        &conf,
    )?;
    assert!(!out.success);
    assert_eq!(out.json["code"], 103, "{}", out.stdout);
    assert!(out.stdout.contains("tcp/8080"), "{}", out.stdout);
    assert_eq!(node.allocated().len(), 2, "the refused ADD released its IP");

    // UDP: a datagram to the host port lands in the pod (busybox's nc has
    // no UDP, so the test's own threads bind and send inside the namespaces).
    let receiver = in_netns(&web, || std::net::UdpSocket::bind("0.0.0.0:53"))??;
    receiver.set_read_timeout(Some(Duration::from_secs(3)))?;
    in_netns(&other_host, || {
        std::net::UdpSocket::bind("0.0.0.0:0")?.send_to(b"hello-udp", "192.168.202.1:8053")
    })??;
    let mut buf = [0u8; 64];
    let (len, _) = receiver
        .recv_from(&mut buf)
        .context("UDP datagram did not arrive")?;
    assert_eq!(&buf[..len], b"hello-udp");

    // A mapping bound to one host IP answers there and nowhere else.
    let mut server = serve_once(&web, 81, "bound")?;
    let got = fetch(&other_host, "192.168.202.1", 8081)?;
    assert_eq!(got.trim(), "bound");
    let _ = server.kill();
    let _ = server.wait();
    let mut server = serve_once(&web, 81, "bound")?;
    assert!(
        fetch(&node.ns, "127.0.0.1", 8081).is_err(),
        "a hostIP mapping must not answer on other addresses"
    );
    let _ = server.kill();
    let _ = server.wait();

    // DEL removes the forwarding: the port no longer answers.
    invoke_ok(&node.ns, &plugin(), &Call::new("DEL", "web", &web), &conf)?;
    let maps = node
        .ns
        .exec(&["nft", "list", "map", "inet", "bosun-cni", "hp4"])?;
    assert!(!maps.contains("8080"), "{maps}");
    Ok(())
}

#[test]
fn requested_ip_mac_and_mtu_are_honoured_and_masquerade_reaches_out() -> Result<()> {
    if !privileged("CNI namespaces") {
        return Ok(());
    }
    let node = Node::new("cap", "10.211.0.0/24")?;
    let outside = Netns::new("out")?;
    // The outside host knows no route to the pod subnet: only masquerade
    // lets a pod's packets come back.
    uplink(&node.ns, &outside, "uplink1", "192.168.211")?;

    let pod = Netns::new("pod")?;
    let mut conf = node.conf.clone();
    conf["mtu"] = json!(1400);
    conf["runtimeConfig"] = json!({"ips": ["10.211.0.77/24"], "mac": "0a:58:0a:d3:00:4d"});
    let result = invoke_ok(&node.ns, &plugin(), &Call::new("ADD", "c1", &pod), &conf)?;
    assert_eq!(result["ips"][0]["address"], "10.211.0.77/24");
    assert_eq!(result["interfaces"][2]["mac"], "0a:58:0a:d3:00:4d");
    let link = pod.exec(&["ip", "-o", "link", "show", "eth0"])?;
    assert!(
        link.contains("mtu 1400") && link.contains("0a:58:0a:d3:00:4d"),
        "{link}"
    );
    pod.exec(&["busybox", "ping", "-c", "1", "-W", "2", "192.168.211.2"])
        .context("pod reaches outside through masquerade")?;

    // Without ipMasq the same ping gets no answer.
    let plain_node = Node::new("nom", "10.212.0.0/24")?;
    let mut plain = plain_node.conf.clone();
    plain["ipMasq"] = json!(false);
    uplink(&plain_node.ns, &outside, "uplink2", "192.168.212")?;
    let pod2 = Netns::new("pod2")?;
    invoke_ok(
        &plain_node.ns,
        &plugin(),
        &Call::new("ADD", "c2", &pod2),
        &plain,
    )?;
    assert!(!pod2.succeeds(&["busybox", "ping", "-c", "1", "-W", "1", "192.168.212.2"]));
    Ok(())
}

#[test]
fn del_is_idempotent_and_add_again_works() -> Result<()> {
    if !privileged("CNI namespaces") {
        return Ok(());
    }
    let node = Node::new("da", "10.203.0.0/24")?;
    let pod = Netns::new("pod")?;
    let first = node.add("c1", &pod)?;
    let del = Call::new("DEL", "c1", &pod);
    invoke_ok(&node.ns, &plugin(), &del, &node.conf)?;
    // The name is free at once: ADD into the same namespace right away.
    let second = node.add("c1", &pod)?;
    assert_ne!(ip_of(&first, 0), "");
    pod.exec(&["busybox", "ping", "-c", "1", "-W", "2", "10.203.0.1"])?;
    invoke_ok(&node.ns, &plugin(), &del, &node.conf)?;
    invoke_ok(&node.ns, &plugin(), &del, &node.conf)?;
    // DEL without a namespace (the runtime already removed it) succeeds.
    let mut no_netns = del.clone();
    no_netns.netns = String::new();
    invoke_ok(&node.ns, &plugin(), &no_netns, &node.conf)?;
    assert!(node.allocated().is_empty());
    assert!(
        eventually(|| node.stray_links().is_ok_and(|l| l.is_empty())),
        "veths left: {:?}",
        node.stray_links()
    );
    assert!(eventually(|| pod
        .exec(&["ip", "-o", "link"])
        .is_ok_and(|l| l.lines().count() == 1)));
    drop(second);
    Ok(())
}

#[test]
fn fifty_parallel_adds_get_distinct_addresses() -> Result<()> {
    if !privileged("CNI namespaces") {
        return Ok(());
    }
    let node = Node::new("par", "10.204.0.0/24")?;
    let pods: Vec<Netns> = (0..50)
        .map(|i| Netns::new(&format!("p{i}")))
        .collect::<Result<_>>()?;
    let results: Vec<Result<Value>> = thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let node = &node;
                scope.spawn(move || node.add(&format!("par-{i}"), pod))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked")))
            })
            .collect()
    });
    let mut ips = BTreeSet::new();
    for result in results {
        ips.insert(ip_of(&result?, 0));
    }
    assert_eq!(ips.len(), 50, "{ips:?}");
    assert_eq!(node.allocated().len(), 50);
    let bridge_ports = node
        .ns
        .exec(&["ip", "-o", "link", "show", "master", "bcbr0"])?;
    assert_eq!(bridge_ports.lines().count(), 50);
    // And 50 parallel DELs leave nothing.
    thread::scope(|scope| {
        for (i, pod) in pods.iter().enumerate() {
            let node = &node;
            scope.spawn(move || {
                let id = format!("par-{i}");
                invoke_ok(&node.ns, &plugin(), &Call::new("DEL", &id, pod), &node.conf)
            });
        }
    });
    assert!(node.allocated().is_empty());
    assert!(eventually(|| node
        .stray_links()
        .is_ok_and(|l| l.is_empty())));
    Ok(())
}

#[test]
fn kill_nine_mid_add_then_gc_leaves_nothing() -> Result<()> {
    if !privileged("CNI namespaces") {
        return Ok(());
    }
    let node = Node::new("k9", "10.205.0.0/24")?;
    let mut conf = node.conf.clone();
    conf["runtimeConfig"] = json!({"portMappings": [{"hostPort": 9090, "containerPort": 90}]});
    let keeper = Netns::new("keep")?;
    invoke_ok(
        &node.ns,
        &plugin(),
        &Call::new("ADD", "keeper", &keeper),
        &node.conf,
    )?;

    // Kill ADDs at increasing points of their run, each into its own pod.
    let mut pods = Vec::new();
    for step in 0..12u64 {
        let pod = Netns::new(&format!("k{step}"))?;
        let mut command = node.ns.command(plugin())?;
        command
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("killed-{step}"))
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        let mut child = command.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, conf.to_string().as_bytes())?;
        }
        thread::sleep(Duration::from_micros(250 * step));
        let _ = child.kill();
        let _ = child.wait();
        pods.push(pod);
    }

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keeper", "ifname": "eth0"}]);
    let call = Call {
        command: "GC",
        ..Call::default()
    };
    invoke_ok(&node.ns, &plugin(), &call, &gc)?;

    let allocated = node.allocated();
    assert_eq!(
        allocated.len(),
        1,
        "only the keeper's IP stays: {allocated:?}"
    );
    let ports = node
        .ns
        .exec(&["ip", "-o", "link", "show", "master", "bcbr0"])?;
    assert_eq!(
        ports.lines().count(),
        1,
        "only the keeper's veth stays: {ports}"
    );
    let records = std::fs::read_dir(node.ipam_dir())?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("attachment."))
        .count();
    assert_eq!(records, 1);
    if let Ok(map) = node
        .ns
        .exec(&["nft", "list", "map", "inet", "bosun-cni", "hp4"])
    {
        assert!(!map.contains("9090"), "{map}");
    }
    keeper.exec(&["busybox", "ping", "-c", "1", "-W", "2", "10.205.0.1"])?;
    Ok(())
}

#[test]
fn bad_netconfs_get_cni_error_json_and_change_nothing() -> Result<()> {
    if !privileged("CNI namespaces") {
        return Ok(());
    }
    let node = Node::new("bad", "10.206.0.0/24")?;
    let pod = Netns::new("pod")?;
    let base = node.conf.clone();
    let with = |path: &[&str], value: Value| {
        let mut conf = base.clone();
        let mut slot = &mut conf;
        for key in path {
            slot = &mut slot[*key];
        }
        *slot = value;
        conf
    };
    let cases: Vec<(&str, Value, u64, &str)> = vec![
        (
            "unknown cniVersion",
            with(&["cniVersion"], json!("9.9.9")),
            1,
            "9.9.9",
        ),
        (
            "missing range",
            with(&["ipam", "ranges"], json!([])),
            7,
            "ranges",
        ),
        (
            "bad CIDR",
            with(&["ipam", "ranges"], json!([[{"subnet": "10.0.0.0/33"}]])),
            7,
            "10.0.0.0/33",
        ),
        (
            "overlapping ranges",
            with(
                &["ipam", "ranges"],
                json!([[{"subnet": "10.9.0.0/16"}], [{"subnet": "10.9.1.0/24"}]]),
            ),
            7,
            "overlap",
        ),
        (
            "other IPAM",
            with(&["ipam", "type"], json!("dhcp")),
            2,
            "dhcp",
        ),
    ];
    for (what, conf, code, needle) in cases {
        let out = node.call("ADD", "c1", &pod, &conf)?;
        assert!(!out.success, "{what}");
        assert_eq!(out.json["code"], code, "{what}: {}", out.stdout);
        assert!(out.stdout.contains(needle), "{what}: {}", out.stdout);
        assert!(
            out.json["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    // Malformed JSON is decoded by nobody else: write the bytes directly.
    let mut command = node.ns.command(plugin())?;
    command
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "c1")
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = command.spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        std::io::Write::write_all(&mut stdin, b"{\"cniVersion\": \"1.1.0\", ")?;
    }
    let out = child.wait_with_output()?;
    let json: Value = serde_json::from_slice(&out.stdout)?;
    assert!(!out.status.success());
    assert_eq!(json["code"], 6, "{json}");

    // A missing CNI_NETNS on ADD is code 4.
    let mut call = Call::new("ADD", "c1", &pod);
    call.netns = String::new();
    let out = invoke(&node.ns, &plugin(), &call, &base)?;
    assert_eq!(out.json["code"], 4, "{}", out.stdout);

    assert!(node.allocated().is_empty());
    assert!(
        !node.ns.exec(&["ip", "-o", "link"])?.contains("bcbr0"),
        "no bridge was made"
    );
    Ok(())
}

#[test]
fn check_passes_then_names_what_drifted() -> Result<()> {
    if !privileged("CNI namespaces") {
        return Ok(());
    }
    let node = Node::new("chk", "10.207.0.0/24")?;
    let pod = Netns::new("pod")?;
    let result = node.add("c1", &pod)?;
    let mut conf = node.conf.clone();
    conf["prevResult"] = result.clone();
    let ok = node.call("CHECK", "c1", &pod, &conf)?;
    assert!(ok.success, "{}", ok.stdout);

    let address = format!("{}/24", ip_of(&result, 0));
    pod.exec(&["ip", "addr", "del", &address, "dev", "eth0"])?;
    node.ns
        .exec(&["nft", "delete", "table", "inet", "bosun-cni"])?;
    let drift = node.call("CHECK", "c1", &pod, &conf)?;
    assert!(!drift.success);
    assert_eq!(drift.json["code"], 102, "{}", drift.stdout);
    let details = drift.json["details"].as_str().unwrap_or_default();
    assert!(
        details.contains(&format!("address {address} is missing on eth0")),
        "{details}"
    );
    assert!(
        details.contains("route 0.0.0.0/0 via 10.207.0.1 is missing"),
        "{details}"
    );
    assert!(details.contains("masquerade chain"), "{details}");

    let mut no_prev = node.conf.clone();
    no_prev["prevResult"] = Value::Null;
    let out = node.call("CHECK", "c1", &pod, &no_prev)?;
    assert!(out.stdout.contains("prevResult"), "{}", out.stdout);
    Ok(())
}

#[test]
fn status_is_not_ready_when_the_pool_is_exhausted() -> Result<()> {
    if !privileged("CNI namespaces") {
        return Ok(());
    }
    let node = Node::new("st", "10.208.0.0/30")?;
    let status = Call {
        command: "STATUS",
        ..Call::default()
    };
    invoke_ok(&node.ns, &plugin(), &status, &node.conf)?;
    let pod = Netns::new("pod")?;
    node.add("c1", &pod)?;
    let out = invoke(&node.ns, &plugin(), &status, &node.conf)?;
    assert!(!out.success);
    assert_eq!(out.json["code"], 50, "{}", out.stdout);
    assert!(out.stdout.contains("10.208.0.0/30"), "{}", out.stdout);
    let second = Netns::new("pod2")?;
    let out = node.call("ADD", "c2", &second, &node.conf)?;
    assert_eq!(out.json["code"], 100, "{}", out.stdout);
    Ok(())
}

#[test]
fn bandwidth_shapes_both_directions_and_del_removes_the_ifb() -> Result<()> {
    if !privileged("CNI namespaces") {
        return Ok(());
    }
    let node = Node::new("bw", "10.209.0.0/24")?;
    let pod = Netns::new("pod")?;
    let mut conf = node.conf.clone();
    conf["runtimeConfig"] = json!({"bandwidth": {
        "ingressRate": 1_000_000, "ingressBurst": 100_000,
        "egressRate": 2_000_000, "egressBurst": 200_000
    }});
    let result = invoke_ok(&node.ns, &plugin(), &Call::new("ADD", "c1", &pod), &conf)?;
    let veth = result["interfaces"][1]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let ifb = format!("bsnb{}", veth.trim_start_matches("veth"));
    let on_veth = node.ns.exec(&["tc", "qdisc", "show", "dev", &veth])?;
    assert!(
        on_veth.contains("tbf") && on_veth.contains("rate 1Mbit"),
        "{on_veth}"
    );
    let on_ifb = node.ns.exec(&["tc", "qdisc", "show", "dev", &ifb])?;
    assert!(on_ifb.contains("rate 2Mbit"), "{on_ifb}");
    invoke_ok(&node.ns, &plugin(), &Call::new("DEL", "c1", &pod), &conf)?;
    assert!(eventually(|| !node
        .ns
        .succeeds(&["ip", "link", "show", &ifb])));
    Ok(())
}

#[test]
fn version_and_legacy_result_shapes() -> Result<()> {
    if !privileged("CNI namespaces") {
        return Ok(());
    }
    let node = Node::new("ver", "10.210.0.0/24")?;
    let call = Call {
        command: "VERSION",
        ..Call::default()
    };
    let version = invoke_ok(&node.ns, &plugin(), &call, &json!({"cniVersion": "1.0.0"}))?;
    assert_eq!(version["cniVersion"], "1.0.0");
    assert_eq!(
        version["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    let pod = Netns::new("pod")?;
    let mut conf = node.conf.clone();
    conf["cniVersion"] = json!("0.3.1");
    let result = invoke_ok(&node.ns, &plugin(), &Call::new("ADD", "c1", &pod), &conf)?;
    assert_eq!(result["cniVersion"], "0.3.1");
    assert_eq!(result["ips"][0]["version"], "4");
    Ok(())
}
