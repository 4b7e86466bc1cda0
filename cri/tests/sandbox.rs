//! Privileged tests of the sandbox plumbing with our CNI plugin.
//!
//! The plugins run inside a "node" network namespace the test makes
//! (`Cni::plugin_netns`), so the bridge and host-port rules never touch the
//! host's namespace; the pods' namespaces are pinned under a temp dir. Each
//! test uses its own subnet, bridge name and dirs, so they run in parallel.

use std::fs;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bosun_cri::sandbox::cni::{Cni, NOT_READY_REASON};
use bosun_cri::sandbox::namespaces::{self, NsKind};
use bosun_cri::sandbox::{self, PidMode, SandboxRequest, SandboxState, Settings};
use bosun_testsupport::host;
use bosun_testsupport::privileged::require_root;
use k8s_cri::v1::{
    DnsConfig, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PortMapping,
};
use serde_json::json;

mod bins;

/// Our plugin, from the same target dir (built if missing).
fn plugin_dir() -> Result<PathBuf> {
    bins::workspace_bin_dir(&[("bosun-cni", "bosun-cni")])
}

fn run(command: &mut Command) -> Result<Output> {
    let out = command
        .output()
        .with_context(|| format!("spawn {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn stdout(command: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&run(command)?.stdout)
        .trim()
        .to_owned())
}

/// A named "node" network namespace, deleted (with its processes) on drop.
struct NodeNs {
    name: String,
}

impl NodeNs {
    fn new() -> Result<Self> {
        let name: String = host::unique_id("bsb").chars().take(30).collect();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let node = Self { name };
        run(node.command("ip").args(["link", "set", "lo", "up"]))?;
        Ok(node)
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// One test's world: a node netns, a temp dir with the conf dir, IPAM
/// data, pin root and state root.
struct World {
    node: NodeNs,
    root: tempfile::TempDir,
    settings: Settings,
    network: String,
}

impl World {
    /// `plugin` is the `type` in the conflist; `octet` picks the subnets.
    fn new(plugin: &str, octet: u8) -> Result<Self> {
        let node = NodeNs::new()?;
        let root = tempfile::tempdir()?;
        let conf_dir = root.path().join("net.d");
        fs::create_dir_all(&conf_dir)?;
        let network = format!("podnet{octet}");
        let conf = json!({
            "cniVersion": "1.1.0",
            "name": network,
            "plugins": [{
                "type": plugin,
                "bridge": format!("bsb{octet}"),
                "isGateway": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("10.{octet}.0.0/24")}],
                               [{"subnet": format!("fd00:{octet}::/64")}]],
                    "dataDir": root.path().join("ipam"),
                },
                "capabilities": {"portMappings": true},
            }],
        });
        fs::write(conf_dir.join("10-pods.conflist"), conf.to_string())?;
        let mut cni = Cni::new(conf_dir, vec![plugin_dir()?], root.path().join("state/cni"));
        cni.plugin_netns = Some(node.path());
        cni.timeout = Duration::from_secs(20);
        let mut settings = Settings::new(root.path().join("ns"), root.path().join("state"), cni);
        settings.host_resolv_conf = root.path().join("host-resolv.conf");
        fs::write(&settings.host_resolv_conf, "nameserver 192.0.2.53\n")?;
        Ok(Self {
            node,
            root,
            settings,
            network,
        })
    }

    fn setup(&self, id: &str, config: &PodSandboxConfig) -> Result<SandboxState> {
        Ok(sandbox::setup(&SandboxRequest {
            id,
            config,
            settings: &self.settings,
        })?)
    }

    /// Addresses the IPAM store still hands out.
    fn allocated(&self) -> Vec<String> {
        fs::read_dir(self.root.path().join("ipam").join(&self.network))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.parse::<IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Mount points strictly below the temp root (the pin root's own
    /// shared bind mount aside).
    fn mounts_below(&self) -> Vec<String> {
        let ns_root = self.settings.ns_root.display().to_string();
        let prefix = format!("{}/", self.root.path().display());
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|m| m.starts_with(&prefix) && *m != ns_root)
            .collect()
    }

    fn leftovers(&self) -> Vec<String> {
        let mut left = self.mounts_below();
        for dir in [
            self.settings.ns_root.clone(),
            self.settings.state_root.join("sandboxes"),
            self.settings.cni.cache_dir.clone(),
        ] {
            if let Ok(entries) = fs::read_dir(&dir) {
                left.extend(
                    entries
                        .filter_map(Result::ok)
                        .map(|e| e.path().display().to_string()),
                );
            }
        }
        left.extend(self.allocated());
        left
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // The pin root is a bind mount of itself; the temp dir goes after.
        let _ = nix::mount::umount2(&self.settings.ns_root, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn pod(name: &str, options: NamespaceOption) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("/kubepods/{name}"),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(options),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn nsenter(state: &SandboxState, kind: NsKind, argv: &[&str]) -> Command {
    let mut command = Command::new("nsenter");
    let ns = state.ns_path(kind).unwrap_or_default();
    command
        .arg(format!("--{}={}", kind.name(), ns.display()))
        .args(argv);
    command
}

fn eventually(mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn two_pods_are_networked_and_torn_down_without_leftovers_even_after_a_restart() -> Result<()> {
    if !require_root("sandbox namespaces and CNI") {
        return Ok(());
    }
    let world = World::new("bosun-cni", 232)?;
    let mut a = pod("pod-a", NamespaceOption::default());
    a.port_mappings = vec![PortMapping {
        protocol: 0,
        container_port: 80,
        host_port: 8080,
        host_ip: String::new(),
    }];
    a.dns_config = Some(DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["default.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    if let Some(linux) = a.linux.as_mut() {
        linux.sysctls = [
            (
                "net.ipv4.ip_unprivileged_port_start".to_owned(),
                "0".to_owned(),
            ),
            ("kernel.shmmni".to_owned(), "2048".to_owned()),
        ]
        .into_iter()
        .collect();
    }
    let sa = world.setup("sandbox-a", &a)?;
    let sb = world.setup("sandbox-b", &pod("pod-b", NamespaceOption::default()))?;

    // Dual stack, IPv4 first, distinct.
    for state in [&sa, &sb] {
        assert_eq!(state.pod_ips.len(), 2, "{:?}", state.pod_ips);
        assert!(state.pod_ips[0].is_ipv4() && state.pod_ips[1].is_ipv6());
    }
    assert_ne!(sa.pod_ips, sb.pod_ips);
    let (ip_a, ip_b) = (sa.pod_ips[0].to_string(), sb.pod_ips[0].to_string());
    run(&mut nsenter(
        &sa,
        NsKind::Net,
        &["busybox", "ping", "-c1", "-W2", &ip_b],
    ))?;
    run(&mut nsenter(
        &sb,
        NsKind::Net,
        &["busybox", "ping", "-c1", "-W2", &ip_a],
    ))?;

    // Hostname, sysctls, files.
    let hostname = stdout(&mut nsenter(&sa, NsKind::Uts, &["busybox", "hostname"]))?;
    assert_eq!(hostname, "pod-a");
    let port_start = stdout(&mut nsenter(
        &sa,
        NsKind::Net,
        &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"],
    ))?;
    assert_eq!(port_start, "0");
    let shmmni = stdout(&mut nsenter(
        &sa,
        NsKind::Ipc,
        &["cat", "/proc/sys/kernel/shmmni"],
    ))?;
    assert_eq!(shmmni, "2048");
    let resolv = fs::read_to_string(sa.files.resolv_conf())?;
    assert!(resolv.contains("nameserver 10.96.0.10\n") && resolv.contains("ndots:5"));
    assert_eq!(
        fs::read_to_string(sb.files.resolv_conf())?,
        "nameserver 192.0.2.53\n"
    );
    assert!(fs::read_to_string(sa.files.hosts())?.contains(&format!("{ip_a}\tpod-a")));
    let shm = sa.files.shm().context("own shm")?;
    assert!(world.mounts_below().contains(&shm.display().to_string()));

    // The host port is handed to CNI: reachable from the node namespace.
    let mut server = nsenter(
        &sa,
        NsKind::Net,
        &["busybox", "nc", "-l", "-p", "80", "-e", "echo", "hello"],
    );
    let mut server = server
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    let listening = eventually(|| {
        stdout(&mut nsenter(
            &sa,
            NsKind::Net,
            &["busybox", "netstat", "-ltn"],
        ))
        .is_ok_and(|o| o.contains(":80 "))
    });
    ensure!(listening, "server in pod a did not come up");
    let got = stdout(
        world
            .node
            .command("busybox")
            .args(["nc", "-w", "3", "10.232.0.1", "8080"]),
    );
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(got?, "hello");
    assert_eq!(world.allocated().len(), 4);

    // "Restart": only the persisted JSON survives.
    let saved: Vec<String> = [&sa, &sb]
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    drop((sa, sb));
    for json in &saved {
        let state: SandboxState = serde_json::from_str(json)?;
        sandbox::teardown(&state, &world.settings)?;
        // Twice is fine.
        sandbox::teardown(&state, &world.settings)?;
    }
    assert_eq!(world.leftovers(), Vec::<String>::new());
    let links = stdout(
        world
            .node
            .command("ip")
            .args(["-o", "link", "show", "type", "veth"]),
    )?;
    assert_eq!(links, "", "host veths left in the node namespace");
    Ok(())
}

#[test]
fn a_cni_failure_fails_setup_with_the_reason_and_leaves_nothing() -> Result<()> {
    if !require_root("sandbox namespaces and CNI") {
        return Ok(());
    }
    let missing = World::new("no-such-plugin", 233)?;
    let err = missing
        .setup("sandbox-m", &pod("pod-m", NamespaceOption::default()))
        .expect_err("setup must fail")
        .to_string();
    assert!(err.contains("\"no-such-plugin\""), "{err}");
    assert_eq!(missing.leftovers(), Vec::<String>::new());

    // The plugin's own error (an invalid subnet) comes through verbatim.
    let broken = World::new("bosun-cni", 234)?;
    let conf_file = broken.settings.cni.conf_dir.join("10-pods.conflist");
    let conf = fs::read_to_string(&conf_file)?.replace("10.234.0.0/24", "10.234.0.0/33");
    fs::write(&conf_file, conf)?;
    let err = broken
        .setup("sandbox-x", &pod("pod-x", NamespaceOption::default()))
        .expect_err("setup must fail")
        .to_string();
    assert!(
        err.contains("plugin bosun-cni ADD failed with code"),
        "{err}"
    );
    assert!(err.contains("10.234.0.0/33"), "{err}");
    assert_eq!(broken.leftovers(), Vec::<String>::new());
    Ok(())
}

#[test]
fn network_status_follows_the_conf_dir() -> Result<()> {
    if !require_root("sandbox namespaces and CNI") {
        return Ok(());
    }
    let world = World::new("bosun-cni", 235)?;
    let status = world.settings.cni.status();
    assert!(status.ready, "{status:?}");
    fs::remove_file(world.settings.cni.conf_dir.join("10-pods.conflist"))?;
    let status = world.settings.cni.status();
    assert!(!status.ready);
    assert_eq!(status.reason, NOT_READY_REASON);
    assert!(
        status.message.contains("no network config"),
        "{}",
        status.message
    );
    Ok(())
}

#[test]
fn host_network_pod_with_a_shared_pid_namespace() -> Result<()> {
    if !require_root("sandbox namespaces") {
        return Ok(());
    }
    let world = World::new("no-plugin-needed", 236)?;
    let options = NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Pod as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    };
    let state = world.setup("sandbox-h", &pod("pod-h", options))?;
    assert!(state.network.is_none() && state.pod_ips.is_empty());
    assert_eq!(state.ns_path(NsKind::Net), None);
    assert!(state.ns_path(NsKind::Ipc).is_some());
    assert_eq!(state.pid_mode, PidMode::Pod);
    let infra = state.infra.clone().context("infra process")?;
    let pid_ns = state.pid_ns_path().context("pid ns")?;
    // A process entering the pod's PID namespace sees the infra as PID 1.
    let inside = stdout(
        Command::new("nsenter")
            .arg(format!("--pid={}", pid_ns.display()))
            .args(["busybox", "sh", "-c", "echo $$"]),
    )?;
    let first = inside.lines().next().unwrap_or_default();
    assert!(first.parse::<u32>().is_ok_and(|p| p > 1), "{inside}");

    // A daemon that died before persisting the infra's PID still finds it.
    let mut reloaded: SandboxState = serde_json::from_str(&serde_json::to_string(&state)?)?;
    reloaded.infra = None;
    assert_eq!(
        namespaces::find_infra(&state.namespaces.dir),
        Some(infra.clone())
    );
    sandbox::teardown(&reloaded, &world.settings)?;
    sandbox::teardown(&reloaded, &world.settings)?;
    assert!(!Path::new(&format!("/proc/{}", infra.pid)).exists());
    assert_eq!(world.leftovers(), Vec::<String>::new());
    Ok(())
}

/// Why shared PID namespaces need a live infra process: once its PID 1 is
/// gone, a pinned PID namespace can still be joined, but nothing can be
/// started in it.
#[test]
fn a_pinned_pid_namespace_without_its_init_is_unusable() -> Result<()> {
    if !require_root("pid namespaces") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let infra = namespaces::spawn_infra(dir.path())?;
    let enter = || {
        Command::new("nsenter")
            .arg(format!("--pid={}", infra.pid_ns.display()))
            .arg("true")
            .output()
    };
    assert!(enter()?.status.success());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(infra.pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(infra.pid), None);
    let out = enter()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Cannot allocate memory"), "{stderr}");
    namespaces::stop_infra(&infra)?;
    Ok(())
}

/// Pinning net+ipc+uts vs. an infra process holding them. Not a timed
/// test: run with `--ignored --nocapture` to print the table.
#[test]
#[ignore = "a measurement, not a check: run with --ignored --nocapture to print the table"]
fn measure_pinning_vs_infra() -> Result<()> {
    if !require_root("namespaces") {
        return Ok(());
    }
    const RUNS: usize = 20;
    let root = tempfile::tempdir()?;
    let ns_root = root.path().join("ns");
    namespaces::ensure_shared_root(&ns_root)?;
    let kinds = [NsKind::Net, NsKind::Ipc, NsKind::Uts];
    let (mut pin_up, mut pin_down, mut proc_up, mut proc_down, mut proc_lo) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        let t = Instant::now();
        let pinned = namespaces::pin(&ns_root, &format!("m{i}"), &kinds)?;
        pin_up.push(t.elapsed());
        let t = Instant::now();
        namespaces::unpin(&pinned.dir).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        pin_down.push(t.elapsed());

        let t = Instant::now();
        let (pid, fds) = infra_holding(&kinds)?;
        proc_up.push(t.elapsed());
        // Loopback up, as pinning does it: the same netlink work.
        let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let t = Instant::now();
        namespaces::within(&[(netns.as_path(), NsKind::Net)], || {
            use bosun_cni::link::Links;
            let mut rtnl = bosun_cni::rtnl::Rtnl::open()?;
            let lo = rtnl.link("lo")?.context("no lo")?;
            rtnl.set_up(lo.index, None)?;
            anyhow::Ok(())
        })??;
        proc_lo.push(t.elapsed());
        let t = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
        nix::sys::wait::waitpid(pid, None)?;
        drop(fds);
        proc_down.push(t.elapsed());
    }
    let _ = nix::mount::umount2(&ns_root, nix::mount::MntFlags::MNT_DETACH);
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    println!("net+ipc+uts, median of {RUNS} (ms)   create   remove");
    println!(
        "pinned files (+ lo up)         {:8.3} {:8.3}",
        median(&mut pin_up),
        median(&mut pin_down)
    );
    println!(
        "infra process (fork+unshare)   {:8.3} {:8.3}",
        median(&mut proc_up),
        median(&mut proc_down)
    );
    println!(
        "  + lo up from outside         {:8.3}",
        median(&mut proc_lo)
    );
    Ok(())
}

/// A pause-like process in new namespaces of `kinds`, and its namespace
/// files held open, as a runtime holding an infra container's would.
fn infra_holding(kinds: &[NsKind]) -> Result<(nix::unistd::Pid, Vec<fs::File>)> {
    let flags = kinds
        .iter()
        .fold(nix::sched::CloneFlags::empty(), |f, k| f | k.flag());
    let mut stack = vec![0u8; 64 * 1024];
    let child: nix::sched::CloneCb = Box::new(|| loop {
        // SAFETY: pause only waits for a signal.
        unsafe { nix::libc::pause() };
    });
    // SAFETY: a copy of our memory (no CLONE_VM); the child only pauses.
    let pid = unsafe { nix::sched::clone(child, &mut stack, flags, Some(nix::libc::SIGCHLD)) }?;
    let fds = kinds
        .iter()
        .map(|k| fs::File::open(format!("/proc/{pid}/ns/{}", k.name())))
        .collect::<Result<_, _>>()?;
    Ok((pid, fds))
}
