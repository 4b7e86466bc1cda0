//! CRI RPC latency: `bosun-cri` beside containerd (Debian's 1.6, its CRI
//! plugin), driven by one CRI v1 gRPC client with identical requests, in the
//! same run.
//!
//! Setup (not timed):
//! - a "node" network namespace (`ip netns add`; daemons join it with
//!   setns, as `tests/daemon.rs` does) in which both daemons run, so their
//!   CNI bridges live there; removed on drop;
//! - Debian's docker-registry (the tests' helper) on the node namespace's
//!   127.0.0.1, where the daemons pull from, with the busybox test image
//!   and a pause image made from it (entrypoint `/bin/sleep infinity`:
//!   containerd runs the sandbox image's entrypoint + cmd as the sandbox
//!   process);
//! - the same CNI network for both: a conflist with one `bosun-cni` plugin
//!   (bridge, host-local IPAM, ipMasq, portMappings), cniVersion 1.0.0
//!   (containerd 1.6's libcni knows no 1.1.0), one plugin dir (bosun-cni and
//!   Debian's `loopback`, which containerd runs for every pod's `lo`). Each
//!   daemon gets its own copy with its own bridge, subnet and IPAM dir: two
//!   IPAM stores handing out one subnet would give two pods one address;
//! - persistent dirs (roots: images, snapshots, records, containerd's
//!   metadata db, overlay upper dirs) under /var/tmp, state dirs (sockets,
//!   bundles, runtime state, netns pins) on a tmpfs the bench mounts under
//!   /run, as /run is on a node (on this VM it is not);
//! - containerd on its own root, state and socket: config version 2, CRI on,
//!   `sandbox_image` = the pause image, the local registry as a plain-HTTP
//!   mirror, runc (Debian's) through `io.containerd.runc.v2`, cgroupfs,
//!   `restrict_oom_score_adj` (root here lacks CAP_SYS_RESOURCE, and the
//!   sandbox's -998 would fail);
//! - bosun-cri on its own root, state and socket, runtime `bosun-runc`
//!   (release binaries beside this bench);
//! - both images pulled on both daemons with PullImage, so no pull is timed.
//!
//! One iteration, per daemon (the order alternates each iteration): a new
//! pod (kubelet-like: DNS config, cgroup parent, pod network, own PID
//! namespace per container), RunPodSandbox, CreateContainer (busybox,
//! `sleep 3600`, best-effort resources, the kubelet's masked and read-only
//! paths), StartContainer, then, after ContainerStatus (running) and
//! PodSandboxStatus (untimed), StopContainer with timeout
//! 0, RemoveContainer, StopPodSandbox, RemovePodSandbox. Timed: each RPC on
//! the client, request sent → response; "pod + container from scratch" =
//! RunPodSandbox sent → StartContainer answered (the container is running
//! then; checked). StopContainer timeout 0 = SIGKILL at once on both (with
//! a grace period, `sleep` as PID 1 of its namespace ignores SIGTERM, so
//! both would just wait it out), then wait until the exit is seen.
//!
//! Environment: `BENCH_ITERS` (20), `BENCH_WARMUP` (2), `BENCH_DAEMONS`
//! (comma list, default `bosun-cri,containerd`), `BOSUN_CRI` (path of
//! bosun-cri, for before/after comparisons; default: the binary cargo
//! built for this bench).
//!
//! After the run both daemons are stopped and the bench reports anything
//! left: processes naming its dirs (monitors, shims), mounts, the pods'
//! netns files (containerd's `/run/netns/cni-*`, from PodSandboxStatus),
//! container cgroups. Needs root; without it the bench says
//! so and exits 0. It never fails: a daemon that fails is reported and left
//! out. Ctrl-C stops the measuring and still cleans up.

#![allow(clippy::unwrap_used)] // a bench harness; failures are reported

#[path = "../tests/bins/mod.rs"]
mod bins;
#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::fs::{self, File};
use std::future::Future;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bosun_testsupport::host;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

const MAX_FAILURES: usize = 3;
const RPC_TIMEOUT: Duration = Duration::from_secs(60);
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
];

/// What is timed, in the order of the table.
const RPCS: [&str; 8] = [
    "RunPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "StopPodSandbox",
    "RemovePodSandbox",
    "pod + container from scratch",
];
const RUN: usize = 0;
const START: usize = 2;
const SCRATCH: usize = 7;

fn main() {
    if !rustix::process::geteuid().is_root() {
        println!("cri bench: skipped: needs root (namespaces, mounts, cgroups, two CRI daemons)");
        return;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            println!("cri bench: aborted: tokio: {e}");
            return;
        }
    };
    if let Err(e) = runtime.block_on(run()) {
        // A benchmark reports; it never fails CI.
        println!("cri bench: aborted: {e:#}");
    }
}

/// A named network namespace, removed on drop.
struct NodeNs(String);

impl NodeNs {
    fn new() -> Result<Self> {
        let name: String = host::unique_id("bcbench").chars().take(30).collect();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()?
            .success();
        ensure!(ok, "ip netns add {name}");
        let ns = Self(name);
        let ok = ns
            .command("ip")?
            .args(["link", "set", "lo", "up"])
            .status()?;
        ensure!(ok.success(), "lo up in {}", ns.0);
        Ok(ns)
    }

    /// A command that joins this namespace (setns before exec: `ip netns
    /// exec` would also remount /sys, hiding the cgroup mounts).
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let file = File::open(Path::new("/run/netns").join(&self.0))?;
        let mut command = Command::new(program);
        // SAFETY: setns is async-signal-safe; the closure only calls it.
        unsafe {
            command.pre_exec(move || {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        Ok(command)
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `/<name>` in every cgroup hierarchy: the bench's cgroup parent; the
/// whole tree is removed on drop.
struct CgroupRoot {
    name: String,
}

impl CgroupRoot {
    fn dirs(&self) -> Vec<PathBuf> {
        let hierarchies = host::cgroup_mounts().unwrap_or_default();
        host::existing_cgroup_dirs(&hierarchies, &self.name)
    }

    /// Cgroups more than two levels down (`<daemon>/<pod>/<container>`):
    /// the runtimes' own, which they should have removed; the pod levels
    /// are the kubelet's job, and this bench's.
    fn leftovers(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    if depth >= 2 {
                        out.push(entry.path());
                    }
                    walk(&entry.path(), depth + 1, out);
                }
            }
        }
        let mut out = Vec::new();
        for dir in self.dirs() {
            walk(&dir, 0, &mut out);
        }
        out
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        for dir in self.dirs() {
            if let Err(e) = host::remove_cgroup_tree_within(&dir, Duration::from_secs(5)) {
                eprintln!("cri bench: remove {}: {e}", dir.display());
            }
        }
    }
}

/// A tmpfs mounted for the daemons' state dirs, as `/run` is on a node
/// (here it is not); unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Result<Self> {
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some("mode=0755,size=256m"),
        )
        .with_context(|| format!("mount tmpfs on {}", dir.display()))?;
        Ok(Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        host::unmount_under(&self.0);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bosun,
    Containerd,
}

/// One CRI daemon under test, its dirs, client and samples.
struct Daemon {
    name: &'static str,
    kind: Kind,
    child: Option<Child>,
    /// Persistent data (root, images, CNI conf, pod logs).
    root: PathBuf,
    /// Runtime state (sockets, bundles, OCI runtime state).
    state: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    /// The OCI runtime and its `--root`, for the clean-up of last resort.
    runtime: PathBuf,
    runtime_roots: Vec<PathBuf>,
    cgroup_parent: String,
    rt: Option<RuntimeServiceClient<Channel>>,
    img: Option<ImageServiceClient<Channel>>,
    samples: Vec<Vec<Duration>>,
    failures: Vec<String>,
    out: Option<String>,
}

impl Drop for Daemon {
    /// Last resort after a failed run; after a clean one nothing is left
    /// to do here.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Monitors and shims name our dirs on their command lines.
        for dir in [&self.state, &self.root] {
            for pid in host::processes_with(&dir.to_string_lossy()).unwrap_or_default() {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        for root in &self.runtime_roots {
            let Ok(out) = Command::new(&self.runtime)
                .arg("--root")
                .arg(root)
                .args(["list", "-q"])
                .output()
            else {
                continue;
            };
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = Command::new(&self.runtime)
                    .arg("--root")
                    .arg(root)
                    .args(["delete", "--force", id])
                    .output();
            }
        }
        host::unmount_under(&self.state);
        host::unmount_under(&self.root);
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// Awaits one RPC with a deadline; returns the reply and its wall time.
async fn timed<T>(
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<(T, Duration)> {
    let t0 = Instant::now();
    let reply = tokio::time::timeout(RPC_TIMEOUT, call)
        .await
        .with_context(|| format!("{what}: no answer in {RPC_TIMEOUT:?}"))?
        .map_err(|s| anyhow::anyhow!("{what}: {:?}: {}", s.code(), s.message()))?;
    Ok((reply.into_inner(), t0.elapsed()))
}

async fn channel(socket: &Path) -> Result<Channel> {
    Ok(bosun_cri::client::connect(socket).await?)
}

/// What the bench asks both daemons, built the same way for each.
struct Requests {
    image: String,
}

impl Requests {
    /// Pod `it` as the kubelet sends it for a best-effort pod without
    /// hostNetwork or shareProcessNamespace.
    fn pod(&self, d: &Daemon, it: usize) -> cri::PodSandboxConfig {
        let name = format!("bench-{it}");
        let uid = format!("bench-uid-{it}");
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.clone(),
                uid: uid.clone(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.clone(),
            log_directory: d.root.join("pod-logs").join(&name).display().to_string(),
            dns_config: Some(cri::DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["default.svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            labels: HashMap::from([("app".to_owned(), name)]),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: format!("{}/pod{uid}", d.cgroup_parent),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn container(&self) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "sleep".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            command: vec!["sleep".into(), "3600".into()],
            log_path: "sleep/0.log".into(),
            labels: HashMap::from([("container".to_owned(), "sleep".to_owned())]),
            linux: Some(cri::LinuxContainerConfig {
                // What the kubelet sets for a best-effort container.
                resources: Some(cri::LinuxContainerResources {
                    cpu_shares: 2,
                    oom_score_adj: 1000,
                    ..Default::default()
                }),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(namespaces()),
                    // The kubelet's defaults (procMount: Default).
                    masked_paths: [
                        "/proc/asound",
                        "/proc/acpi",
                        "/proc/kcore",
                        "/proc/keys",
                        "/proc/latency_stats",
                        "/proc/timer_list",
                        "/proc/timer_stats",
                        "/proc/sched_debug",
                        "/proc/scsi",
                        "/sys/firmware",
                    ]
                    .map(String::from)
                    .to_vec(),
                    readonly_paths: [
                        "/proc/bus",
                        "/proc/fs",
                        "/proc/irq",
                        "/proc/sys",
                        "/proc/sysrq-trigger",
                    ]
                    .map(String::from)
                    .to_vec(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }
}

fn namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

impl Daemon {
    fn clients(&self) -> Result<(RuntimeServiceClient<Channel>, ImageServiceClient<Channel>)> {
        Ok((
            self.rt.clone().context("not connected")?,
            self.img.clone().context("not connected")?,
        ))
    }

    /// Waits for the socket, connects, and waits until Status says the
    /// runtime and the network are ready.
    async fn connect(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("exited {status}: {}", tail(&self.log, 10));
                }
            }
            if self.socket.exists() {
                if let Ok(ch) = channel(&self.socket).await {
                    let mut rt = RuntimeServiceClient::new(ch.clone());
                    if let Ok(reply) = rt.status(cri::StatusRequest::default()).await {
                        let ready = reply
                            .into_inner()
                            .status
                            .is_some_and(|s| s.conditions.iter().all(|c| c.status));
                        if ready {
                            self.rt = Some(rt);
                            self.img = Some(ImageServiceClient::new(ch));
                            return Ok(());
                        }
                    }
                }
            }
            ensure!(
                Instant::now() < deadline,
                "not ready after 30 s: {}",
                tail(&self.log, 10)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn pull(&self, image: &str) -> Result<()> {
        let (_, mut img) = self.clients()?;
        timed(
            &format!("PullImage {image}"),
            img.pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
        .await?;
        Ok(())
    }

    /// One pod's life: the durations in [`RPCS`] order, and the pod's
    /// netns paths under /run/netns, if any.
    async fn cycle(&self, requests: &Requests, it: usize) -> Result<(Vec<Duration>, Vec<PathBuf>)> {
        let (mut rt, _) = self.clients()?;
        let pod_config = requests.pod(self, it);
        let t0 = Instant::now();
        let (reply, run) = timed(
            "RunPodSandbox",
            rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_config.clone()),
                runtime_handler: String::new(),
            }),
        )
        .await?;
        let pod = reply.pod_sandbox_id;
        let (reply, create) = timed(
            "CreateContainer",
            rt.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(requests.container()),
                sandbox_config: Some(pod_config),
            }),
        )
        .await?;
        let id = reply.container_id;
        let (_, start) = timed(
            "StartContainer",
            rt.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            }),
        )
        .await?;
        let scratch = t0.elapsed();
        self.expect_state(&id, cri::ContainerState::ContainerRunning)
            .await?;
        // containerd's pod netns (/run/netns/cni-<uuid>), to check at the
        // end that it went; another containerd on the machine may be
        // making others meanwhile.
        let (reply, _) = timed(
            "PodSandboxStatus",
            rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: true,
            }),
        )
        .await?;
        let netns = reply
            .info
            .values()
            .flat_map(|v| v.split('"'))
            .filter(|s| s.starts_with('/') && s.contains("/netns/"))
            .map(PathBuf::from)
            .collect();
        let (_, stop) = timed(
            "StopContainer",
            rt.stop_container(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            }),
        )
        .await?;
        self.expect_state(&id, cri::ContainerState::ContainerExited)
            .await?;
        let (_, remove) = timed(
            "RemoveContainer",
            rt.remove_container(cri::RemoveContainerRequest {
                container_id: id.clone(),
            }),
        )
        .await?;
        let (_, stop_pod) = timed(
            "StopPodSandbox",
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            }),
        )
        .await?;
        let (_, remove_pod) = timed(
            "RemovePodSandbox",
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            }),
        )
        .await?;
        Ok((
            vec![
                run, create, start, stop, remove, stop_pod, remove_pod, scratch,
            ],
            netns,
        ))
    }

    async fn expect_state(&self, id: &str, want: cri::ContainerState) -> Result<()> {
        let (mut rt, _) = self.clients()?;
        let (reply, _) = timed(
            "ContainerStatus",
            rt.container_status(cri::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            }),
        )
        .await?;
        let state = reply.status.map(|s| s.state).unwrap_or(-1);
        ensure!(
            state == want as i32,
            "container {id}: state {state}, expected {want:?}"
        );
        Ok(())
    }

    /// Stops and removes every pod the daemon knows (after a failed
    /// iteration, and at the end).
    async fn remove_all_pods(&self) -> Result<()> {
        let (mut rt, _) = self.clients()?;
        let (reply, _) = timed(
            "ListPodSandbox",
            rt.list_pod_sandbox(cri::ListPodSandboxRequest::default()),
        )
        .await?;
        for pod in reply.items {
            let pod_sandbox_id = pod.id;
            timed(
                "StopPodSandbox",
                rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: pod_sandbox_id.clone(),
                }),
            )
            .await?;
            timed(
                "RemovePodSandbox",
                rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id }),
            )
            .await?;
        }
        Ok(())
    }

    /// Removes its pods, then SIGTERM and wait: the clean way out.
    async fn shut_down(&mut self) {
        if self.rt.is_some() {
            if let Err(e) = self.remove_all_pods().await {
                eprintln!("cri bench: {}: clean-up: {e:#}", self.name);
            }
        }
        self.rt = None;
        self.img = None;
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            if host::wait_deadline(&mut child, deadline)
                .ok()
                .flatten()
                .is_none()
            {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn env_usize(key: &str, default: usize) -> Result<usize> {
    match std::env::var(key) {
        Ok(v) => v.parse().with_context(|| format!("{key}={v:?}")),
        Err(_) => Ok(default),
    }
}

fn first_line(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| format!("{program}: unknown version"))
}

async fn run() -> Result<()> {
    let iters = env_usize("BENCH_ITERS", 20)?;
    let warmup = env_usize("BENCH_WARMUP", 2)?;
    let wanted =
        std::env::var("BENCH_DAEMONS").unwrap_or_else(|_| "bosun-cri,containerd".to_owned());
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ncri bench: interrupted; cleaning up");
                flag.store(true, Ordering::SeqCst);
            }
        });
    }

    // Declared in the order they are needed; dropped in reverse: daemons,
    // registry, node namespace, cgroups, dirs.
    let work = tempfile::Builder::new()
        .prefix("bosun-bench-cri-")
        .tempdir_in("/var/tmp")?;
    // Short: bosun-cri's state dir is limited to 28 bytes (unix socket
    // paths of the monitors live under it).
    let state = tempfile::Builder::new().prefix("bcb-").tempdir_in("/run")?;
    let _tmpfs = Tmpfs::mount(state.path())?;
    let cgroups = CgroupRoot {
        name: format!("bosun-bench-{}", std::process::id()),
    };

    eprintln!("cri bench: building images and starting a registry");
    let node = NodeNs::new()?;
    // The daemons pull from the node namespace's 127.0.0.1, so the registry
    // listens there: started (and pushed to) from a thread inside it.
    let (registry, image, pause) = {
        let ns = File::open(Path::new("/run/netns").join(&node.0))?;
        let work = work.path().to_owned();
        std::thread::spawn(move || -> Result<_> {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            let registry = common::Registry::start(false)?;
            let host = registry.host();
            let (busybox, _) = common::busybox_layout(&work.join("busybox-src"))?;
            registry.push(&busybox, "1", "bench/busybox")?;
            let pause = work.join("pause-src");
            common::run(Command::new("cp").arg("-a").arg(&busybox).arg(&pause))?;
            set_entrypoint(&pause, "1", &["/bin/sleep", "infinity"])?;
            registry.push(&pause, "1", "bench/pause")?;
            Ok((
                registry,
                format!("{host}/bench/busybox:1"),
                format!("{host}/bench/pause:1"),
            ))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("registry thread panicked"))??
    };
    let host = registry.host();

    let bins =
        bins::workspace_bin_dir(&[("bosun-cni", "bosun-cni"), ("bosun-runtime", "bosun-runc")])?;
    let cni_bin = work.path().join("cni-bin");
    fs::create_dir_all(&cni_bin)?;
    std::os::unix::fs::symlink(bins.join("bosun-cni"), cni_bin.join("bosun-cni"))?;
    std::os::unix::fs::symlink("/usr/lib/cni/loopback", cni_bin.join("loopback"))?;

    let mut daemons: Vec<Daemon> = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();
    for (i, name) in wanted
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .enumerate()
    {
        let kind = match name {
            "bosun-cri" => Kind::Bosun,
            "containerd" => Kind::Containerd,
            other => {
                skipped.push((other.to_owned(), "unknown daemon".to_owned()));
                continue;
            }
        };
        let dirs = (
            work.path().join(name),
            state.path().join(&name[..1]),
            format!("/{}/{name}", cgroups.name),
        );
        let subnet = format!("10.{}.0.0/24", 232 + i);
        let started = match kind {
            Kind::Bosun => start_bosun(&node, dirs, &bins, &cni_bin, &subnet, &host),
            Kind::Containerd => start_containerd(&node, dirs, &cni_bin, &subnet, &host, &pause),
        };
        let mut daemon = match started {
            Ok(d) => d,
            Err(e) => {
                skipped.push((name.to_owned(), format!("{e:#}")));
                continue;
            }
        };
        let prepared = async {
            daemon.connect().await?;
            daemon.pull(&image).await?;
            daemon.pull(&pause).await
        }
        .await;
        match prepared {
            Ok(()) => daemons.push(daemon),
            Err(e) => {
                daemon.shut_down().await;
                skipped.push((name.to_owned(), format!("{e:#}")));
            }
        }
    }
    let requests = Requests {
        image: image.clone(),
    };

    eprintln!(
        "cri bench: {iters} iterations (+{warmup} warm-up), daemons: {}",
        daemons
            .iter()
            .map(|d| d.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let n = daemons.len();
    let mut netns_used = Vec::new();
    for it in 0..warmup + iters {
        if interrupted.load(Ordering::SeqCst) {
            break;
        }
        let measured = it >= warmup;
        for k in 0..n {
            let daemon = &mut daemons[(it + k) % n];
            if daemon.out.is_some() {
                continue;
            }
            match daemon.cycle(&requests, it).await {
                Ok((times, netns)) => {
                    netns_used.extend(netns);
                    if measured {
                        for (samples, t) in daemon.samples.iter_mut().zip(times) {
                            samples.push(t);
                        }
                    }
                }
                Err(e) => {
                    let msg = format!("{e:#} [log: {}]", tail(&daemon.log, 3));
                    eprintln!("cri bench: {} iteration {it}: {msg}", daemon.name);
                    daemon.failures.push(msg.clone());
                    if let Err(e) = daemon.remove_all_pods().await {
                        daemon.out = Some(format!("clean-up after a failure failed: {e:#}"));
                    } else if daemon.failures.len() >= MAX_FAILURES {
                        daemon.out = Some(format!("failed {MAX_FAILURES} times; last: {msg}"));
                    }
                }
            }
        }
        eprint!(".");
    }
    eprintln!();

    for daemon in &mut daemons {
        daemon.shut_down().await;
    }
    let leftovers = leftovers(&work, &state, &cgroups, &netns_used);
    report(&daemons, &skipped, iters, &leftovers, &requests);
    Ok(())
}

/// What both daemons left after their pods were removed and they stopped.
fn leftovers(
    work: &tempfile::TempDir,
    state: &tempfile::TempDir,
    cgroups: &CgroupRoot,
    netns_used: &[PathBuf],
) -> Vec<String> {
    let mut left = Vec::new();
    // Shims exit shortly after their last container is deleted.
    let markers = [work.path(), state.path()].map(|p| p.to_string_lossy().into_owned());
    let procs = host::poll(Duration::from_secs(5), || {
        let pids: Vec<u32> = markers
            .iter()
            .flat_map(|m| host::processes_with(m).unwrap_or_default())
            .collect();
        pids.is_empty().then_some(())
    });
    if procs.is_none() {
        for m in &markers {
            for pid in host::processes_with(m).unwrap_or_default() {
                let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                left.push(format!(
                    "process {pid}: {}",
                    String::from_utf8_lossy(&cmd).replace('\0', " ").trim()
                ));
            }
        }
    }
    // Expected: the bench's tmpfs, and bosun-cri's namespace root (a
    // shared bind mount onto itself that it keeps across restarts, as `ip
    // netns` keeps /run/netns); the bench unmounts both.
    let expected = [state.path().to_owned(), state.path().join("b/ns")];
    let mounts = host::mounts().unwrap_or_default();
    for m in &mounts {
        let ours = [work.path(), state.path()].iter().any(|dir| {
            m.mount_point.starts_with(dir) || m.source.contains(&*dir.to_string_lossy())
        });
        if ours && !expected.contains(&m.mount_point) {
            left.push(format!("mount {} ({})", m.mount_point.display(), m.fs_type));
        }
    }
    for ns in netns_used.iter().filter(|ns| ns.exists()) {
        left.push(format!("netns {}", ns.display()));
    }
    for dir in cgroups.leftovers() {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        left.push(format!(
            "cgroup {} ({} processes)",
            dir.display(),
            procs.lines().count()
        ));
    }
    left
}

fn start_bosun(
    node: &NodeNs,
    (root, state, cgroup_parent): (PathBuf, PathBuf, String),
    bins: &Path,
    cni_bin: &Path,
    subnet: &str,
    registry: &str,
) -> Result<Daemon> {
    fs::create_dir_all(&root)?;
    write_conflist(&root, "bcb-bosun0", subnet)?;
    let hosts = root.join("hosts.json");
    fs::write(
        &hosts,
        serde_json::json!({"host": {registry: [{"host": registry, "plain_http": true}]}})
            .to_string(),
    )?;
    let socket = state.join("cri.sock");
    let runtime_root = state.join("runtime");
    let config = format!(
        r#"root = "{root}/root"
state = "{state}"
socket = "{socket}"
image_root = "{root}/images"
cni_conf_dir = "{root}/net.d"
cni_bin_dirs = ["{cni_bin}"]
registry_hosts = "{hosts}"
monitor = "{monitor}"
default_runtime = "bosun-runc"
[runtimes.bosun-runc]
path = "{bins}/bosun-runc"
root = "{runtime_root}"
"#,
        root = root.display(),
        state = state.display(),
        socket = socket.display(),
        cni_bin = cni_bin.display(),
        hosts = hosts.display(),
        monitor = env!("CARGO_BIN_EXE_bosun-cri-monitor"),
        bins = bins.display(),
        runtime_root = runtime_root.display(),
    );
    let config_path = root.join("config.toml");
    fs::write(&config_path, config)?;
    let log = root.join("daemon.log");
    let out = File::create(&log)?;
    let bin = std::env::var_os("BOSUN_CRI")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bosun-cri")));
    let child = node
        .command(bin)?
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Ctrl-C is the bench's to handle: the daemon must outlive it to
        // remove its pods.
        .process_group(0)
        .spawn()
        .context("start bosun-cri")?;
    Ok(Daemon {
        name: "bosun-cri",
        kind: Kind::Bosun,
        child: Some(child),
        root,
        state,
        socket,
        log,
        runtime: bins.join("bosun-runc"),
        runtime_roots: vec![runtime_root],
        cgroup_parent,
        rt: None,
        img: None,
        samples: vec![Vec::new(); RPCS.len()],
        failures: Vec::new(),
        out: None,
    })
}

fn start_containerd(
    node: &NodeNs,
    (root, state, cgroup_parent): (PathBuf, PathBuf, String),
    cni_bin: &Path,
    subnet: &str,
    registry: &str,
    pause: &str,
) -> Result<Daemon> {
    fs::create_dir_all(&root)?;
    fs::create_dir_all(&state)?;
    write_conflist(&root, "bcb-ctrd0", subnet)?;
    let socket = state.join("containerd.sock");
    let runc_root = state.join("runc");
    let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
    let disabled: Vec<String> = DISABLED_PLUGINS.iter().map(|p| format!("{p:?}")).collect();
    let config = format!(
        r#"version = 2
root = "{root}/root"
state = "{state}/state"
disabled_plugins = [{disabled}]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[{cri}]
  sandbox_image = "{pause}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  BinaryName = "/usr/sbin/runc"
  Root = "{runc_root}"
  SystemdCgroup = false
[{cri}.cni]
  bin_dir = "{cni_bin}"
  conf_dir = "{root}/net.d"
  max_conf_num = 1
[{cri}.registry.mirrors."{registry}"]
  endpoint = ["http://{registry}"]
"#,
        root = root.display(),
        state = state.display(),
        disabled = disabled.join(", "),
        socket = socket.display(),
        runc_root = runc_root.display(),
        cni_bin = cni_bin.display(),
    );
    let config_path = root.join("config.toml");
    fs::write(&config_path, config)?;
    let log = root.join("containerd.log");
    let out = File::create(&log)?;
    let child = node
        .command("containerd")?
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // As for bosun-cri: it must outlive a Ctrl-C to remove its pods.
        .process_group(0)
        .spawn()
        .context("start containerd")?;
    Ok(Daemon {
        name: "containerd",
        kind: Kind::Containerd,
        child: Some(child),
        root,
        state,
        socket,
        log,
        runtime: PathBuf::from("/usr/sbin/runc"),
        // The shim runs runc with --root <Root>/<namespace>.
        runtime_roots: vec![runc_root.join("k8s.io"), runc_root],
        cgroup_parent,
        rt: None,
        img: None,
        samples: vec![Vec::new(); RPCS.len()],
        failures: Vec::new(),
        out: None,
    })
}

/// The CNI network, the same for both daemons but for the bridge, subnet
/// and IPAM dir.
fn write_conflist(root: &Path, bridge: &str, subnet: &str) -> Result<()> {
    let net_d = root.join("net.d");
    fs::create_dir_all(&net_d)?;
    fs::write(
        net_d.join("10-bench.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "bench",
            "plugins": [{
                "type": "bosun-cni", "bridge": bridge, "isGateway": true,
                "isDefaultGateway": true, "ipMasq": true, "hairpinMode": true,
                "capabilities": {"portMappings": true},
                "ipam": {"type": "host-local", "dataDir": root.join("ipam"),
                         "ranges": [[{"subnet": subnet}]]}
            }]
        })
        .to_string(),
    )?;
    Ok(())
}

/// Gives the image tagged `tag` in an OCI layout a new entrypoint (and no
/// cmd): a new config blob, a new manifest pointing at it, the index entry
/// repointed.
fn set_entrypoint(layout: &Path, tag: &str, entrypoint: &[&str]) -> Result<()> {
    let blobs = layout.join("blobs/sha256");
    let read = |digest: &str| -> Result<Value> {
        let hex = digest.trim_start_matches("sha256:");
        Ok(serde_json::from_slice(&fs::read(blobs.join(hex))?)?)
    };
    let put = |value: &Value| -> Result<(String, usize)> {
        let bytes = serde_json::to_vec(value)?;
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        fs::write(blobs.join(&hex), &bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len()))
    };
    let index_path = layout.join("index.json");
    let mut index: Value = serde_json::from_slice(&fs::read(&index_path)?)?;
    let entry = index["manifests"]
        .as_array_mut()
        .and_then(|m| {
            m.iter_mut().find(|d| {
                d["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag)
            })
        })
        .context("tag not in index.json")?;
    let mut manifest = read(entry["digest"].as_str().context("digest")?)?;
    let mut config = read(manifest["config"]["digest"].as_str().context("digest")?)?;
    config["config"]["Entrypoint"] = serde_json::json!(entrypoint);
    config["config"]["Cmd"] = Value::Null;
    let (digest, size) = put(&config)?;
    manifest["config"]["digest"] = digest.into();
    manifest["config"]["size"] = size.into();
    let (digest, size) = put(&manifest)?;
    entry["digest"] = digest.into();
    entry["size"] = size.into();
    fs::write(&index_path, serde_json::to_vec(&index)?)?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile, ms (as `cni/benches/addel.rs`).
fn p(samples: &[Duration], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn report(
    daemons: &[Daemon],
    skipped: &[(String, String)],
    iters: usize,
    leftovers: &[String],
    requests: &Requests,
) {
    let bosun = daemons.iter().find(|d| d.kind == Kind::Bosun);
    let ctrd = daemons.iter().find(|d| d.kind == Kind::Containerd);
    // Fewer than asked after Ctrl-C or failures.
    let done = daemons
        .iter()
        .map(|d| d.samples[RUN].len())
        .max()
        .unwrap_or(0);
    println!();
    println!(
        "CRI RPC latency over gRPC, one client, identical requests; {done} of {iters} iterations; \
         ms, client-side wall time; ratio = bosun-cri / containerd"
    );
    println!(
        "bosun-cri {} (bosun-runc, bosun-cri-monitor) vs {} (CRI plugin, io.containerd.runc.v2, {})",
        env!("CARGO_PKG_VERSION"),
        first_line("containerd", "--version"),
        first_line("runc", "--version"),
    );
    println!(
        "image {}; container `sleep 3600`; StopContainer timeout 0",
        requests.image
    );
    println!();
    println!(
        "{:<30} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}",
        "rpc", "bosun p50", "bosun p90", "ctrd p50", "ctrd p90", "p50 ×", "p90 ×"
    );
    let mut lines = Vec::new();
    let empty = Vec::new();
    for (i, rpc) in RPCS.iter().enumerate() {
        let b = bosun.map_or(&empty, |d| &d.samples[i]);
        let c = ctrd.map_or(&empty, |d| &d.samples[i]);
        let (b50, b90, c50, c90) = (p(b, 0.5), p(b, 0.9), p(c, 0.5), p(c, 0.9));
        println!(
            "{rpc:<30} {b50:>9.1} {b90:>9.1} {c50:>9.1} {c90:>9.1} {:>7.2} {:>7.2}",
            b50 / c50,
            b90 / c90
        );
        let key = rpc.replace(" + ", "_").replace(' ', "_");
        lines.push(format!(
            "BENCH rpc={key} bosun_p50_ms={b50:.2} bosun_p90_ms={b90:.2} containerd_p50_ms={c50:.2} containerd_p90_ms={c90:.2} ratio_p50={:.3}",
            b50 / c50
        ));
    }
    for daemon in daemons {
        if let Some(why) = &daemon.out {
            println!("{:<11} left out: {why}", daemon.name);
        } else if !daemon.failures.is_empty() {
            println!(
                "{:<11} {} failed iteration(s); last: {}",
                daemon.name,
                daemon.failures.len(),
                daemon.failures.last().map_or("", String::as_str)
            );
        }
    }
    for (name, why) in skipped {
        println!("{name:<11} left out: {why}");
    }
    if let (Some(b), Some(c)) = (bosun, ctrd) {
        let ratio = |i: usize| p(&b.samples[i], 0.5) / p(&c.samples[i], 0.5);
        let goals = [
            ("from scratch", ratio(SCRATCH), 0.3),
            ("RunPodSandbox", ratio(RUN), 0.3),
            ("StartContainer", ratio(START), 0.5),
        ];
        let list: Vec<String> = goals
            .iter()
            .map(|(what, r, goal)| {
                format!(
                    "{what} {r:.2} (≤ {goal}){}",
                    if *r <= *goal { "" } else { " MISSED" }
                )
            })
            .collect();
        println!();
        println!("issue 5 goals, p50 ratios: {}", list.join(", "));
    }
    println!();
    if leftovers.is_empty() {
        println!(
            "left behind once both daemons stopped: nothing (processes, mounts, cni netns, container cgroups)"
        );
    } else {
        println!("left behind once both daemons stopped:");
        for l in leftovers {
            println!("  {l}");
        }
    }
    println!(
        "from scratch: RunPodSandbox sent → StartContainer answered. StopContainer: SIGKILL at once,"
    );
    println!("answered once the exit is recorded. × = bosun-cri / containerd.");
    for l in lines {
        println!("{l}");
    }
}
