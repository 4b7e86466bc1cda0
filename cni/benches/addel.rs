//! CNI ADD/DEL latency benchmark: `bosun-cni` beside the reference plugins
//! `bridge` with `host-local` (containernetworking-plugins, Debian's 1.1.1
//! in /usr/lib/cni).
//!
//! Everything happens in network namespaces the bench makes with
//! `ip netns add` (names `addel-<pid>-…`): one "node" namespace that holds
//! the bridges and the NAT rules, and one fresh namespace per pod. The host's
//! own namespace, links and addresses are never touched. Pod namespaces are
//! made (and loopback set up) before the ADD, unmeasured, and all deleted
//! at the end: a namespace's deletion leaves work to a kernel thread, under
//! the RTNL lock every ADD and DEL needs, that would slow down whichever
//! plugin came next. Every namespace is deleted on drop, so on error and on
//! Ctrl-C as well; namespaces left by a run that was killed are deleted by
//! the next one.
//!
//! Each plugin is invoked as a runtime invokes it: its binary is spawned
//! with `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME=eth0`,
//! `CNI_PATH` and `PATH` in an otherwise empty environment, the netconf on
//! stdin, and enters the node namespace in `pre_exec` (`setns`), through the
//! same fork + `pre_exec` path for both plugins, so their spawn cost is the
//! same. One call is timed from spawn until it has exited and its stdout and
//! stderr reached EOF (`wait_with_output`), which is when a runtime has its
//! answer.
//!
//! The two plugins get equivalent netconfs, `cniVersion` 1.0.0 (the newest
//! the reference speaks): a bridge with `isGateway: true` and
//! `ipMasq: true`, host-local IPAM with a /16 range and a private `dataDir`
//! in a temporary directory; each plugin its own network name, bridge and
//! subnet. A second variant without `ipMasq` (variant `noMasq`; leave it out
//! with `BENCH_VARIANTS=masq`) shows what NAT costs each (the reference
//! adds per-container iptables chains, bosun-cni one nftables chain per
//! network).
//!
//! Sequential: `BENCH_WARMUP` unmeasured plus `BENCH_ITERS` measured
//! iterations; in each, every network (plugin × variant) gets ADD of a
//! fresh pod, then DEL of it. The order of the networks rotates every
//! iteration, so that the two plugins take turns going first and noise hits
//! both alike.
//!
//! Parallel: `BENCH_ROUNDS` rounds; in each, for every network in turn
//! (order rotating per round), `BENCH_PARALLEL` ADDs into as many fresh pods
//! are released at once (one thread each, behind a barrier), then, when all
//! have finished, as many DELs. Reported per call (p50/p90 over every call
//! of every round) and for the burst ("all": first spawn → last exit,
//! p50/p90 over the rounds).
//!
//! DEL and the link's deletion: bosun-cni's DEL takes the pod's interface
//! out of service (addresses gone, down, renamed) and answers; a detached
//! child of it finishes the kernel's veth deletion (an RCU grace period,
//! ~20 ms), while the reference deletes the veth before it answers. So that
//! background deletions cannot pile up unmeasured, after every DEL the bench
//! polls the pod namespace over rtnetlink (every 100 µs) until no link but
//! `lo` is left before it goes on, and reports that as a separate row,
//! `DEL+gone` (DEL's spawn → link gone and every process the DEL left
//! behind exited), for both plugins. The bench makes itself a child
//! subreaper, so bosun-cni's detached child becomes the bench's when the
//! plugin exits, and is waited for (and reaped, not left a zombie).
//!
//! Correctness, in passing: every ADD and DEL must exit 0; every ADD must
//! return a result of version 1.0.0 with an IP in its network's subnet that
//! is really on the pod's `eth0`, and a parallel burst's IPs must be
//! distinct; every DEL must leave the pod with only `lo`. Anything else
//! fails the bench (exit status 1) with the plugin's output.
//!
//! Environment: `BENCH_ITERS` (100), `BENCH_WARMUP` (3), `BENCH_PARALLEL`
//! (20), `BENCH_ROUNDS` (5), `BENCH_VARIANTS` (`masq,noMasq`), `BOSUN_CNI`
//! (path of bosun-cni; default: the binary cargo built beside this bench),
//! `BENCH_REFERENCE` (directory of the reference plugins, `/usr/lib/cni`).
//!
//! Needs root; without it the bench prints why and exits 0.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bosun_cni::link::Links;
use bosun_cni::rtnl::Rtnl;
use ipnet::IpNet;
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use serde_json::{json, Value};

/// Prefix of every namespace (and container id) the bench makes.
const PREFIX: &str = "addel";
const NETNS_DIR: &str = "/run/netns";
/// What the reference speaks at most.
const CNI_VERSION: &str = "1.0.0";
const IFNAME: &str = "eth0";
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a DEL'd pod's link may take to disappear.
const GONE_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_micros(100);
/// The issue's goal: bosun-cni at most this fraction of the reference.
const GOAL: f64 = 0.3;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        println!("addel bench: skipped: needs root (it creates network namespaces and links)");
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    let result = run();
    eprintln!("addel bench: took {:.1} s", started.elapsed().as_secs_f64());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("addel bench: FAILED: {e:#}");
            eprintln!("addel bench: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Plugin {
    Bosun,
    Reference,
}

impl Plugin {
    fn name(self) -> &'static str {
        match self {
            Plugin::Bosun => "bosun-cni",
            Plugin::Reference => "reference",
        }
    }
}

/// One network: a plugin with one netconf.
struct Net {
    plugin: Plugin,
    /// `masq` or `noMasq`.
    variant: &'static str,
    bin: PathBuf,
    conf: Vec<u8>,
    subnet: IpNet,
    samples: Samples,
}

impl Net {
    fn label(&self) -> String {
        format!("{}/{}", self.plugin.name(), self.variant)
    }
}

#[derive(Default)]
struct Samples {
    seq_add: Vec<Duration>,
    seq_del: Vec<Duration>,
    seq_gone: Vec<Duration>,
    par_add_call: Vec<Duration>,
    par_add_all: Vec<Duration>,
    par_del_call: Vec<Duration>,
    par_del_all: Vec<Duration>,
    par_gone_all: Vec<Duration>,
}

/// A named network namespace (`ip netns add`), deleted on drop; with
/// `kill`, every process still in it is killed first.
struct Netns {
    name: String,
    kill: bool,
}

impl Netns {
    fn add(name: String, kill: bool) -> Result<Self> {
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        Ok(Self { name, kill })
    }

    fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("open {}", self.path().display()))
    }

    /// An rtnetlink socket inside, with loopback set up.
    fn rtnl(&self) -> Result<Rtnl> {
        let file = self.open()?;
        let mut rtnl = bosun_cni::netns::within(&file, Rtnl::open)
            .with_context(|| format!("enter {}", self.name))??;
        let lo = rtnl.link("lo")?.context("no lo")?;
        rtnl.set_up(lo.index, None)?;
        Ok(rtnl)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.kill {
            kill_inside(&self.name);
        }
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .status()
        {
            Ok(s) if s.success() => {}
            other => eprintln!(
                "addel bench: cleanup: ip netns del {}: {other:?}",
                self.name
            ),
        }
    }
}

fn kill_inside(netns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A pod: a fresh network namespace and an rtnetlink socket in it.
struct Pod {
    id: String,
    path: PathBuf,
    rtnl: Rtnl,
    ns: Netns,
}

impl Pod {
    fn new(tag: &str) -> Result<Self> {
        let id = format!("{PREFIX}-{}-{tag}", std::process::id());
        let ns = Netns::add(id.clone(), false)?;
        Ok(Self {
            path: ns.path(),
            rtnl: ns.rtnl()?,
            id,
            ns,
        })
    }

    /// Polls until only `lo` is left; returns when that was seen.
    fn wait_clean(&mut self, deadline: Instant) -> Result<Instant> {
        loop {
            let links = self.rtnl.links()?;
            let seen = Instant::now();
            if links.iter().all(|l| l.name == "lo") {
                return Ok(seen);
            }
            if seen > deadline {
                let names: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
                bail!("{}: links {names:?} still there after DEL", self.id);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Checks an ADD's result: version, an IP in `subnet`, on `eth0`.
    fn verify_add(&mut self, net: &Net, out: &Output) -> Result<IpAddr> {
        let text = String::from_utf8_lossy(&out.stdout);
        let fail = |why: &str| anyhow!("{} ADD {}: {why}; result: {text}", net.label(), self.id);
        let result: Value = serde_json::from_slice(&out.stdout).map_err(|_| fail("not JSON"))?;
        if result["cniVersion"].as_str() != Some(CNI_VERSION) {
            return Err(fail("result is not version 1.0.0"));
        }
        let address: IpNet = result["ips"]
            .as_array()
            .and_then(|ips| ips.first())
            .and_then(|ip| ip["address"].as_str())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| fail("no IP in the result"))?;
        let ip = address.addr();
        if !net.subnet.contains(&ip) {
            return Err(fail(&format!("{ip} is not in {}", net.subnet)));
        }
        let link = self
            .rtnl
            .link(IFNAME)?
            .ok_or_else(|| fail("the pod has no eth0"))?;
        let on_link = self.rtnl.addresses(link.index)?;
        if !on_link.iter().any(|a| a.addr() == ip) {
            return Err(fail(&format!("{ip} is not on eth0 (it has {on_link:?})")));
        }
        Ok(ip)
    }
}

/// One plugin call: when it was spawned, when it was done, what it said.
struct Timed {
    start: Instant,
    end: Instant,
    out: Output,
}

impl Timed {
    fn took(&self) -> Duration {
        self.end - self.start
    }
}

/// Runs `net`'s plugin in the node namespace as a runtime would.
fn call(
    net: &Net,
    node: &Arc<File>,
    cni_path: &str,
    command: &str,
    id: &str,
    netns: &Path,
) -> Result<Timed> {
    let mut cmd = Command::new(&net.bin);
    cmd.env_clear()
        .env("PATH", PATH)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", IFNAME)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group: a Ctrl-C reaches only the bench, which then
        // cleans up.
        .process_group(0);
    let node = Arc::clone(node);
    // SAFETY: the closure runs in the forked child before exec and only
    // makes the setns(2) system call, which is async-signal-safe; it
    // allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            setns(node.as_fd(), CloneFlags::CLONE_NEWNET)?;
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawn {}", net.bin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that does not read it fails, and says so below.
        let _ = stdin.write_all(&net.conf);
    }
    let out = child.wait_with_output().context("wait for the plugin")?;
    let end = Instant::now();
    if !out.status.success() {
        bail!(
            "{} {command} {id} failed ({}): stdout: {} stderr: {}",
            net.label(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Timed { start, end, out })
}

/// Everything the bench made; removed on drop.
struct Bench {
    nets: Vec<Net>,
    node: Option<Netns>,
    node_fd: Arc<File>,
    cni_path: String,
    /// Namespaces of pods done with, deleted only at the end: deleting a
    /// namespace leaves the kernel work (under the RTNL lock) that would
    /// slow down the next calls of whichever plugin comes next.
    done: Vec<Netns>,
    _data: tempfile::TempDir,
}

impl Drop for Bench {
    fn drop(&mut self) {
        // Takes the bridges, the host veths (and so their pod ends) and the
        // NAT rules with it.
        self.node.take();
        self.done.clear();
        let _ = reap_all(Instant::now() + Duration::from_secs(2));
    }
}

impl Bench {
    fn call(&self, net: &Net, command: &str, pod: &Pod) -> Result<Timed> {
        call(
            net,
            &self.node_fd,
            &self.cni_path,
            command,
            &pod.id,
            &pod.path,
        )
    }

    /// ADD then DEL of a fresh pod in `nets[k]`.
    fn sequential(&mut self, k: usize, tag: &str, measured: bool) -> Result<()> {
        let mut pod = Pod::new(tag)?;
        let net = &self.nets[k];
        let add = self.call(net, "ADD", &pod)?;
        pod.verify_add(net, &add.out)?;
        let del = self.call(net, "DEL", &pod)?;
        let gone = settle(std::slice::from_mut(&mut pod))?;
        if measured {
            let s = &mut self.nets[k].samples;
            s.seq_add.push(add.took());
            s.seq_del.push(del.took());
            s.seq_gone.push(gone - del.start);
        }
        self.done.push(pod.ns);
        Ok(())
    }

    /// `n` ADDs at once into fresh pods, then `n` DELs at once.
    fn parallel(&mut self, k: usize, round: usize, n: usize) -> Result<()> {
        let mut pods = (0..n)
            .map(|j| Pod::new(&format!("p{round}-{k}-{j}")))
            .collect::<Result<Vec<_>>>()?;
        let net = &self.nets[k];
        let targets: Vec<(String, PathBuf)> = pods
            .iter()
            .map(|p| (p.id.clone(), p.path.clone()))
            .collect();
        let adds = self.burst(net, "ADD", &targets)?;
        let mut ips = BTreeSet::new();
        for (pod, add) in pods.iter_mut().zip(&adds) {
            let ip = pod.verify_add(net, &add.out)?;
            ensure!(
                ips.insert(ip),
                "{}: {ip} was given to two pods in one burst",
                net.label()
            );
        }
        let dels = self.burst(net, "DEL", &targets)?;
        let gone = settle(&mut pods)?;
        let span = |calls: &[Timed]| {
            let start = calls.iter().map(|t| t.start).min();
            let end = calls.iter().map(|t| t.end).max();
            start.zip(end).map(|(s, e)| e - s).unwrap_or_default()
        };
        let del_start = dels.iter().map(|t| t.start).min();
        let s = &mut self.nets[k].samples;
        s.par_add_call.extend(adds.iter().map(Timed::took));
        s.par_add_all.push(span(&adds));
        s.par_del_call.extend(dels.iter().map(Timed::took));
        s.par_del_all.push(span(&dels));
        if let Some(d) = del_start {
            s.par_gone_all.push(gone - d);
        }
        self.done.extend(pods.into_iter().map(|p| p.ns));
        Ok(())
    }

    /// One thread per target, released together by a barrier.
    fn burst(&self, net: &Net, command: &str, targets: &[(String, PathBuf)]) -> Result<Vec<Timed>> {
        let barrier = Barrier::new(targets.len());
        std::thread::scope(|scope| {
            let handles: Vec<_> = targets
                .iter()
                .map(|(id, path)| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        barrier.wait();
                        call(net, &self.node_fd, &self.cni_path, command, id, path)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow!("{command} thread panicked"))?)
                .collect()
        })
    }
}

fn run() -> Result<()> {
    let iters = env_usize("BENCH_ITERS", 100)?;
    let warmup = env_usize("BENCH_WARMUP", 3)?;
    let parallel = env_usize("BENCH_PARALLEL", 20)?;
    let rounds = env_usize("BENCH_ROUNDS", 5)?;
    let variants = std::env::var("BENCH_VARIANTS").unwrap_or_else(|_| "masq,noMasq".into());
    let variants: Vec<&'static str> = variants
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|v| match v.to_ascii_lowercase().as_str() {
            "masq" => Ok("masq"),
            "nomasq" => Ok("noMasq"),
            _ => Err(anyhow!(
                "BENCH_VARIANTS: unknown variant {v:?} (masq, noMasq)"
            )),
        })
        .collect::<Result<_>>()?;
    ensure!(!variants.is_empty(), "BENCH_VARIANTS is empty");
    install_signal_handlers()?;
    nix::sys::prctl::set_child_subreaper(true).context("prctl(PR_SET_CHILD_SUBREAPER)")?;

    let bosun = locate_bosun()?;
    let reference_dir = std::env::var_os("BENCH_REFERENCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/cni"));
    for plugin in ["bridge", "host-local"] {
        let path = reference_dir.join(plugin);
        ensure!(
            path.is_file(),
            "reference plugin {} is missing (apt-get install containernetworking-plugins, or set BENCH_REFERENCE)",
            path.display()
        );
    }
    clean_stale();

    let data = tempfile::Builder::new()
        .prefix("bosun-cni-addel-")
        .tempdir()
        .context("create temporary directory")?;
    let pid = std::process::id();
    let node = Netns::add(format!("{PREFIX}-{pid}-node"), true)?;
    let node_fd = Arc::new(node.open()?);
    node.rtnl()?;
    let cni_path = format!(
        "{}:{}",
        bosun.parent().unwrap_or(Path::new("/")).display(),
        reference_dir.display()
    );

    let mut nets = Vec::new();
    for (v, &variant) in variants.iter().enumerate() {
        for (p, plugin) in [Plugin::Bosun, Plugin::Reference].into_iter().enumerate() {
            let (bin, kind, short) = match plugin {
                Plugin::Bosun => (bosun.clone(), "bosun-cni", "b"),
                Plugin::Reference => (reference_dir.join("bridge"), "bridge", "r"),
            };
            let name = format!("addel-{}-{variant}", plugin.name());
            let subnet: IpNet = format!("10.{}.0.0/16", 201 + 2 * v + p).parse()?;
            let conf = json!({
                "cniVersion": CNI_VERSION,
                "name": name,
                "type": kind,
                "bridge": format!("addel-{short}{v}"),
                "isGateway": true,
                "ipMasq": variant == "masq",
                "ipam": {
                    "type": "host-local",
                    "dataDir": data.path().join(&name),
                    "ranges": [[{"subnet": subnet.to_string()}]],
                },
            });
            nets.push(Net {
                plugin,
                variant,
                bin,
                conf: serde_json::to_vec(&conf)?,
                subnet,
                samples: Samples::default(),
            });
        }
    }
    let mut bench = Bench {
        nets,
        node: Some(node),
        done: Vec::new(),
        node_fd,
        cni_path,
        _data: data,
    };
    for net in &bench.nets {
        eprintln!(
            "addel bench: {} = {} {}",
            net.label(),
            net.bin.display(),
            String::from_utf8_lossy(&net.conf)
        );
    }

    let n = bench.nets.len();
    eprintln!(
        "addel bench: sequential ADD+DEL, {warmup} warm-up + {iters} iterations, order rotating"
    );
    for i in 0..warmup + iters {
        let measured = i >= warmup;
        for k in 0..n {
            if INTERRUPTED.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            let k = (i + k) % n;
            bench.sequential(k, &format!("s{i}-{k}"), measured)?;
        }
        let done = i + 1 - warmup.min(i + 1);
        if !measured || done % 10 == 0 || done == iters {
            let mut line = if measured {
                format!("  iteration {done}/{iters}:")
            } else {
                format!("  warm-up {}/{warmup}: ok", i + 1)
            };
            for net in bench.nets.iter().filter(|_| measured) {
                let s = &net.samples;
                line.push_str(&format!(
                    " {} add={:.1} del={:.1}",
                    net.label(),
                    p(&s.seq_add, 0.5),
                    p(&s.seq_del, 0.5)
                ));
            }
            eprintln!("{line}");
        }
    }

    if parallel > 0 {
        eprintln!(
            "addel bench: parallel, {rounds} rounds of {parallel} ADDs at once then {parallel} DELs at once"
        );
    }
    for round in 0..if parallel > 0 { rounds } else { 0 } {
        for k in 0..n {
            if INTERRUPTED.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            let k = (round + k) % n;
            bench.parallel(k, round, parallel)?;
        }
        let mut line = format!("  round {}/{rounds}:", round + 1);
        for net in &bench.nets {
            let s = &net.samples;
            line.push_str(&format!(
                " {} add-all={:.1} del-all={:.1}",
                net.label(),
                s.par_add_all.last().map_or(0.0, |d| ms(*d)),
                s.par_del_all.last().map_or(0.0, |d| ms(*d))
            ));
        }
        eprintln!("{line}");
    }

    report(&bench.nets, iters, parallel, rounds);
    Ok(())
}

/// Deletes the namespaces of an earlier run that was killed before it
/// could clean up (its pid is gone), killing what still runs there.
fn clean_stale() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        eprintln!("addel bench: deleting namespace {name} left by killed run {pid}");
        drop(Netns { name, kill: true });
    }
}

/// After DELs: waits until every pod has only `lo` left and every process
/// the DELs left behind has exited; returns when both were seen.
fn settle(pods: &mut [Pod]) -> Result<Instant> {
    let deadline = Instant::now() + GONE_TIMEOUT;
    let mut gone = Instant::now();
    for pod in pods {
        gone = gone.max(pod.wait_clean(deadline)?);
    }
    Ok(gone.max(reap_all(deadline)?))
}

/// Reaps the children that became ours as subreaper (bosun-cni's detached
/// link deleters) until none is left; returns when that was seen. Only
/// called when no `Child` of ours is outstanding.
fn reap_all(deadline: Instant) -> Result<Instant> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if Instant::now() > deadline {
                    bail!("a process a DEL left behind is still running");
                }
                std::thread::sleep(POLL);
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::ECHILD) => return Ok(Instant::now()),
            Err(e) => return Err(e).context("waitpid"),
        }
    }
}

/// Finds bosun-cni: `BOSUN_CNI`, else the binary cargo built for this bench.
fn locate_bosun() -> Result<PathBuf> {
    let path = match std::env::var_os("BOSUN_CNI") {
        Some(p) => PathBuf::from(p),
        None => match option_env!("CARGO_BIN_EXE_bosun-cni") {
            Some(p) => PathBuf::from(p),
            // target/<triple>/release/deps/addel-… → target/<triple>/release/bosun-cni
            None => std::env::current_exe()?
                .parent()
                .and_then(Path::parent)
                .map(|dir| dir.join("bosun-cni"))
                .context("no directory above the bench executable")?,
        },
    };
    ensure!(
        path.is_file(),
        "{} does not exist (set BOSUN_CNI or build it)",
        path.display()
    );
    Ok(path)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile in ms; NaN when there are no samples.
fn p(samples: &[Duration], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

struct Row<'a> {
    phase: String,
    variant: &'static str,
    op: &'static str,
    bosun: &'a [Duration],
    reference: &'a [Duration],
    /// Counts for the goal.
    goal: bool,
}

fn report(nets: &[Net], iters: usize, parallel: usize, rounds: usize) {
    let mut rows = Vec::new();
    let mut variants: Vec<&'static str> = Vec::new();
    for net in nets {
        if !variants.contains(&net.variant) {
            variants.push(net.variant);
        }
    }
    let find = |plugin: Plugin, variant: &str| {
        nets.iter()
            .find(|n| n.plugin == plugin && n.variant == variant)
            .map(|n| &n.samples)
    };
    let par = format!("par{parallel}");
    for phase in ["seq", par.as_str()] {
        for &variant in &variants {
            let (Some(b), Some(r)) = (
                find(Plugin::Bosun, variant),
                find(Plugin::Reference, variant),
            ) else {
                continue;
            };
            let goal = variant == "masq";
            let mut row = |op: &'static str, bosun, reference, goal| {
                rows.push(Row {
                    phase: phase.to_owned(),
                    variant,
                    op,
                    bosun,
                    reference,
                    goal,
                })
            };
            if phase == "seq" {
                row("ADD", &b.seq_add, &r.seq_add, goal);
                row("DEL", &b.seq_del, &r.seq_del, goal);
                row("DEL+gone", &b.seq_gone, &r.seq_gone, false);
            } else if parallel > 0 && rounds > 0 {
                row("ADD call", &b.par_add_call, &r.par_add_call, goal);
                row("ADD all", &b.par_add_all, &r.par_add_all, goal);
                row("DEL call", &b.par_del_call, &r.par_del_call, goal);
                row("DEL all", &b.par_del_all, &r.par_del_all, goal);
                row("DEL+gone all", &b.par_gone_all, &r.par_gone_all, false);
            }
        }
    }

    println!();
    println!(
        "addel: CNI ADD/DEL wall time, spawn → exit, ms; bosun-cni vs reference bridge+host-local"
    );
    let par_line = if parallel > 0 && rounds > 0 {
        format!("; par{parallel}: {rounds} rounds of {parallel} at once")
    } else {
        String::new()
    };
    println!("seq: {iters} × (ADD, DEL) one at a time{par_line}");
    println!(
        "{:<6} {:<7} {:<13} {:>5} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}",
        "phase",
        "variant",
        "op",
        "n",
        "bosun p50",
        "bosun p90",
        "ref p50",
        "ref p90",
        "p50 ×",
        "p90 ×"
    );
    let mut lines = Vec::new();
    let mut verdicts = Vec::new();
    for row in &rows {
        let (b50, b90) = (p(row.bosun, 0.5), p(row.bosun, 0.9));
        let (r50, r90) = (p(row.reference, 0.5), p(row.reference, 0.9));
        let ratio50 = b50 / r50;
        println!(
            "{:<6} {:<7} {:<13} {:>5} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7.2} {:>7.2}",
            row.phase,
            row.variant,
            row.op,
            row.bosun.len().min(row.reference.len()),
            b50,
            b90,
            r50,
            r90,
            ratio50,
            b90 / r90
        );
        if row.goal {
            verdicts.push((format!("{} {}", row.phase, row.op), ratio50));
        }
        let op = row.op.to_ascii_lowercase().replace([' ', '+'], "_");
        for (plugin, s) in [("bosun-cni", row.bosun), ("reference", row.reference)] {
            lines.push(format!(
                "BENCH phase={} variant={} op={op} plugin={plugin} n={} p50_ms={:.3} p90_ms={:.3}",
                row.phase,
                row.variant,
                s.len(),
                p(s, 0.5),
                p(s, 0.9)
            ));
        }
        lines.push(format!(
            "BENCH phase={} variant={} op={op} ratio_p50={ratio50:.3}",
            row.phase, row.variant
        ));
    }
    println!();
    println!("call: one plugin invocation; all: a burst, first spawn → last exit (n = rounds);");
    println!(
        "DEL+gone: DEL's spawn → the pod's veth gone from its namespace and every process the"
    );
    println!(
        "DEL left exited (bosun-cni deletes the veth in a detached child after answering, the"
    );
    println!("reference before). × = bosun-cni / reference.");
    if !verdicts.is_empty() {
        let met = verdicts.iter().all(|(_, r)| *r <= GOAL);
        let list: Vec<String> = verdicts
            .iter()
            .map(|(what, r)| format!("{what} {r:.2}{}", if *r <= GOAL { "" } else { " (MISSED)" }))
            .collect();
        println!(
            "goal: bosun-cni ≤ {GOAL:.1}× reference, p50, ipMasq: {} — {}",
            list.join(", "),
            if met { "met" } else { "NOT met" }
        );
        lines.push(format!("BENCH goal={GOAL} met={met}"));
    }
    for l in lines {
        println!("{l}");
    }
}

fn run_ok(command: &mut Command) -> Result<Output> {
    let out = command
        .output()
        .with_context(|| format!("spawn {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn env_usize(key: &str, default: usize) -> Result<usize> {
    match std::env::var(key) {
        Ok(v) => v.trim().parse().with_context(|| format!("{key}={v:?}")),
        Err(_) => Ok(default),
    }
}

fn install_signal_handlers() -> Result<()> {
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { sigaction(sig, &act) }.with_context(|| format!("sigaction {sig}"))?;
    }
    Ok(())
}
