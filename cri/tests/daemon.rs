//! `bosun-cri` end to end, spoken to over its unix socket with the CRI v1
//! gRPC client — the wire protocol the kubelet and crictl use.
//!
//! The daemon runs inside a "node" network namespace the test makes, so the
//! CNI bridge (our `bosun-cni`) lives there; pods get pinned namespaces of
//! their own; all state sits under a temp dir. The image is imported into
//! the daemon's store before it starts (no registry needed here; pulls are
//! covered by `registry.rs`).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashMap;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bosun_testsupport::host;
use bosun_testsupport::privileged::require_root;
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio_tungstenite::tungstenite;
use tonic::transport::{Channel, Endpoint, Uri};

const IMAGE: &str = "localhost/bosun/busybox:e2e";

mod bins;

fn bin_dir() -> Result<PathBuf> {
    bins::workspace_bin_dir(&[("bosun-cni", "bosun-cni"), ("bosun-runtime", "bosun-runc")])
}

/// A named network namespace, removed (with its processes) on drop.
struct NodeNs(String);

impl NodeNs {
    fn new() -> Result<Self> {
        let name: String = host::unique_id("bcri").chars().take(30).collect();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()?
            .success();
        ensure!(ok, "ip netns add {name}");
        let ns = Self(name);
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let file = fs::File::open(Path::new("/run/netns").join(&self.0))?;
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

    fn exec(&self, argv: &[&str]) -> Result<String> {
        let out = self.command(argv[0])?.args(&argv[1..]).output()?;
        ensure!(
            out.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The daemon under test, its dirs and a way to restart it.
struct Daemon {
    node: NodeNs,
    dir: tempfile::TempDir,
    child: Option<Child>,
    bins: PathBuf,
}

impl Daemon {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("cri.sock")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    async fn new(subnet: &str) -> Result<Self> {
        let bins = bin_dir()?;
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        let net_d = root.join("net.d");
        fs::create_dir_all(&net_d)?;
        fs::write(
            net_d.join("10-bosun.conflist"),
            serde_json::json!({
                "cniVersion": "1.1.0",
                "name": "e2e",
                "plugins": [{
                    "type": "bosun-cni", "bridge": "bcri0", "isGateway": true,
                    "isDefaultGateway": true, "ipMasq": true, "hairpinMode": true,
                    "capabilities": {"portMappings": true},
                    "ipam": {"type": "host-local", "dataDir": root.join("ipam"),
                             "ranges": [[{"subnet": subnet}]]}
                }]
            })
            .to_string(),
        )?;
        let config = format!(
            r#"
root = "{root}/root"
state = "{root}/state"
socket = "{root}/cri.sock"
image_root = "{root}/images"
cni_conf_dir = "{root}/net.d"
cni_bin_dirs = ["{bins}"]
monitor = "{monitor}"
default_runtime = "bosun-runc"
[runtimes.bosun-runc]
path = "{bins}/bosun-runc"
root = "{root}/state/runtime/bosun-runc"
[runtimes.runc]
path = "/usr/sbin/runc"
root = "{root}/state/runtime/runc"
"#,
            root = root.display(),
            bins = bins.display(),
            monitor = env!("CARGO_BIN_EXE_bosun-cri-monitor"),
        );
        fs::write(root.join("config.toml"), config)?;
        let mut daemon = Self {
            node: NodeNs::new()?,
            dir,
            child: None,
            bins,
        };
        daemon.import_image().await?;
        daemon.start()?;
        Ok(daemon)
    }

    /// Puts the busybox test image into the daemon's store.
    async fn import_image(&self) -> Result<()> {
        let work = self.dir.path().join("image-build");
        let rootfs = work.join("rootfs");
        fs::create_dir_all(&rootfs)?;
        bosun_testsupport::rootfs::busybox(&rootfs)?;
        let layout = work.join("layout");
        bosun_testsupport::layout::write(&layout, IMAGE, &rootfs)?;
        let images = bosun_cri::image::service::ImageService::new(
            &self.dir.path().join("images"),
            Default::default(),
        )?;
        images
            .import_oci_layout(&layout, Some("localhost/bosun/busybox"))
            .await?;
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        let _ = fs::remove_file(self.socket());
        let log = fs::File::create(self.dir.path().join("daemon.log"))?;
        let mut command = self.node.command(env!("CARGO_BIN_EXE_bosun-cri"))?;
        command
            .arg("--config")
            .arg(self.config_path())
            .arg("--log-level")
            .arg("debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(command.spawn()?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket().exists() {
            ensure!(
                Instant::now() < deadline,
                "daemon did not come up: {}",
                self.log()
            );
            if let Some(Some(status)) = self.child.as_mut().map(|c| c.try_wait()).transpose()? {
                bail!("daemon exited {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    async fn channel(&self) -> Result<Channel> {
        let socket = self.socket();
        Ok(Endpoint::try_from("http://[::]:50051")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await?)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Best effort: stop whatever the test left (it failed), then the daemon.
        self.kill9();
        for handler in ["bosun-runc", "runc"] {
            let root = self.dir.path().join("state/runtime").join(handler);
            let runtime = if handler == "runc" {
                PathBuf::from("/usr/sbin/runc")
            } else {
                self.bins.join("bosun-runc")
            };
            if let Ok(out) = Command::new(&runtime)
                .arg("--root")
                .arg(&root)
                .args(["list", "-q"])
                .output()
            {
                for id in String::from_utf8_lossy(&out.stdout).lines() {
                    let _ = Command::new(&runtime)
                        .arg("--root")
                        .arg(&root)
                        .args(["delete", "--force", id])
                        .status();
                }
            }
        }
        if let Ok(mounts) = host::mounts() {
            let mut ours: Vec<PathBuf> = mounts
                .iter()
                .map(|m| m.mount_point.clone())
                .filter(|p| p.starts_with(self.dir.path()))
                .collect();
            ours.sort();
            for point in ours.iter().rev() {
                let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: HashMap::from([("app".to_owned(), name.to_owned())]),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What the kubelet sends for a pod without hostNetwork or
/// shareProcessNamespace: each container has its own PID namespace.
fn kubelet_namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn container_config(name: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}/0.log"),
        labels: HashMap::from([("container".to_owned(), name.to_owned())]),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn wait_state(
    client: &mut RuntimeServiceClient<Channel>,
    id: &str,
    state: cri::ContainerState,
) -> Result<cri::ContainerStatus> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = client
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .context("no status")?;
        if status.state == state as i32 {
            return Ok(status);
        }
        ensure!(
            Instant::now() < deadline,
            "container {id} stuck in {:?}",
            status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_lifecycle_over_grpc_survives_a_daemon_kill() -> Result<()> {
    if !require_root("bosun-cri end to end") {
        return Ok(());
    }
    let mut daemon = Daemon::new("10.231.0.0/24").await?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let mut img = ImageServiceClient::new(daemon.channel().await?);

    let version = rt
        .version(cri::VersionRequest::default())
        .await?
        .into_inner();
    assert_eq!(version.runtime_name, "bosun");
    assert_eq!(version.runtime_api_version, "v1");
    let status = rt.status(cri::StatusRequest::default()).await?.into_inner();
    let conditions = status.status.context("no status")?.conditions;
    assert!(conditions.iter().all(|c| c.status), "{conditions:?}");
    let images = img
        .list_images(cri::ListImagesRequest::default())
        .await?
        .into_inner()
        .images;
    assert!(
        images
            .iter()
            .any(|i| i.repo_tags.iter().any(|t| t.ends_with("busybox:e2e"))),
        "{images:?}"
    );

    let logs = daemon.dir.path().join("pod-logs");
    let sandbox_config = pod_config("web", &logs);
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?
        .into_inner()
        .pod_sandbox_id;
    let pod_status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("no pod status")?;
    let ip = pod_status.network.context("no network")?.ip;
    assert!(ip.starts_with("10.231.0."), "pod IP {ip}");
    assert_eq!(pod_status.state, cri::PodSandboxState::SandboxReady as i32);

    // As uid 1000 with extra groups: ExecSync must run as that too.
    let mut app = container_config("app", "echo hello from app; echo oops >&2; exec sleep 1000");
    if let Some(sc) = app.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
        sc.run_as_user = Some(cri::Int64Value { value: 1000 });
        sc.supplemental_groups = vec![1234, 5678];
    }
    let created = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(app),
            sandbox_config: Some(sandbox_config.clone()),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?
        .into_inner()
        .container_id;
    wait_state(&mut rt, &created, cri::ContainerState::ContainerCreated).await?;
    rt.start_container(cri::StartContainerRequest {
        container_id: created.clone(),
    })
    .await?;
    let running = wait_state(&mut rt, &created, cri::ContainerState::ContainerRunning).await?;
    assert!(running.image_ref.contains("sha256:"), "{running:?}");
    assert!(!running.image_id.is_empty());

    // Logs in the CRI format, at the path the kubelet asked for.
    let log_path = logs.join("app/0.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("oops") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(log.contains(" stdout F hello from app"), "{log}");
    assert!(log.contains(" stderr F oops"), "{log}");

    // ExecSync sees the pod's hostname, DNS and address.
    let exec = |cmd: &[&str]| cri::ExecSyncRequest {
        container_id: created.clone(),
        cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
        timeout: 10,
    };
    let out = rt.exec_sync(exec(&["hostname"])).await?.into_inner();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "web");
    let out = rt
        .exec_sync(exec(&["cat", "/etc/resolv.conf"]))
        .await?
        .into_inner();
    let resolv = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        resolv.contains("nameserver 10.96.0.10") && resolv.contains("ndots:5"),
        "{resolv}"
    );
    let out = rt
        .exec_sync(exec(&["ip", "-o", "addr", "show", "eth0"]))
        .await?
        .into_inner();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&ip));
    let out = rt
        .exec_sync(exec(&["sh", "-c", "exit 7"]))
        .await?
        .into_inner();
    assert_eq!(out.exit_code, 7);
    // The container's user and groups, not the runtime's default (root).
    let out = rt
        .exec_sync(exec(&["sh", "-c", "id -u; id -G"]))
        .await?
        .into_inner();
    let ids = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(ids.starts_with("1000\n"), "{ids}");
    assert!(ids.contains(" 1234") && ids.contains(" 5678"), "{ids}");
    // A timed-out command is killed, not left running in the container.
    let timed_out = rt
        .exec_sync(cri::ExecSyncRequest {
            timeout: 1,
            ..exec(&["sleep", "31"])
        })
        .await
        .expect_err("sleep 31 outlived a 1 s timeout");
    assert_eq!(timed_out.code(), tonic::Code::DeadlineExceeded);
    // Not even as a zombie: only the container's own `sleep 1000` is left.
    let out = rt
        .exec_sync(exec(&["ps", "-o", "comm"]))
        .await?
        .into_inner();
    let ps = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        ps.lines().filter(|l| l.trim() == "sleep").count(),
        1,
        "{ps}"
    );

    let listed = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                label_selector: HashMap::from([("container".to_owned(), "app".to_owned())]),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers;
    assert_eq!(listed.len(), 1);
    let stats = rt
        .container_stats(cri::ContainerStatsRequest {
            container_id: created.clone(),
        })
        .await?
        .into_inner()
        .stats
        .context("no stats")?;
    assert!(stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .is_some_and(|w| w.value > 0));

    // A second container that exits by itself.
    let quick = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("quick", "exit 3")),
            sandbox_config: Some(sandbox_config.clone()),
        })
        .await?
        .into_inner()
        .container_id;

    // kill -9 the daemon: the container keeps running; the quick one
    // runs and exits while the daemon is down.
    daemon.kill9();
    let start_quick = Command::new(daemon.bins.join("bosun-runc"))
        .arg("--root")
        .arg(daemon.dir.path().join("state/runtime/bosun-runc"))
        .args(["start", &quick])
        .status()?;
    ensure!(start_quick.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.start()?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let again = wait_state(&mut rt, &created, cri::ContainerState::ContainerRunning).await?;
    assert_eq!(again.started_at, running.started_at);
    let exited = wait_state(&mut rt, &quick, cri::ContainerState::ContainerExited).await?;
    assert_eq!(exited.exit_code, 3);
    assert_eq!(exited.reason, "Error");

    // Stop: sleep is PID 1 of its own namespace and ignores SIGTERM, so
    // SIGKILL follows after the timeout.
    rt.stop_container(cri::StopContainerRequest {
        container_id: created.clone(),
        timeout: 1,
    })
    .await?;
    let stopped = wait_state(&mut rt, &created, cri::ContainerState::ContainerExited).await?;
    assert_eq!(stopped.exit_code, 137, "{stopped:?}");
    for id in [&created, &quick] {
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: id.to_string(),
        })
        .await?;
    }
    // Unknown IDs: success, as the CRI asks.
    rt.stop_container(cri::StopContainerRequest {
        container_id: "nope".into(),
        timeout: 0,
    })
    .await?;
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: "nope".into(),
    })
    .await?;
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    let gone = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);

    // Nothing left: no mounts under our dirs (the namespace pin root stays
    // a shared mount point, as /run/netns does), no IPs, no bridge ports.
    let mounts = host::mounts()?;
    let pin_root = daemon.dir.path().join("state/ns");
    let left: Vec<_> = mounts
        .iter()
        .filter(|m| m.mount_point.starts_with(daemon.dir.path()) && m.mount_point != pin_root)
        .map(|m| m.mount_point.display().to_string())
        .collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
    let ipam = daemon.dir.path().join("ipam/e2e");
    let ips = fs::read_dir(&ipam)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("10."))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(ips, 0);
    let ports = daemon
        .node
        .exec(&["ip", "-o", "link", "show", "master", "bcri0"])?;
    assert!(ports.trim().is_empty(), "{ports}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_can_pick_debians_runc_as_its_runtime_handler() -> Result<()> {
    if !require_root("bosun-cri end to end") {
        return Ok(());
    }
    let daemon = Daemon::new("10.232.0.0/24").await?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let logs = daemon.dir.path().join("pod-logs");
    let sandbox_config = pod_config("legacy", &logs);
    let unknown = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: "kata".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    assert!(unknown.message().contains("kata"));

    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: "runc".into(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("c", "echo via runc; exit 0")),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await?;
    let done = wait_state(&mut rt, &id, cri::ContainerState::ContainerExited).await?;
    assert_eq!(done.exit_code, 0);
    assert_eq!(done.reason, "Completed");
    // runc itself knows the container: the CRI layer spoke plain OCI to it.
    let listed = Command::new("/usr/sbin/runc")
        .arg("--root")
        .arg(daemon.dir.path().join("state/runtime/runc"))
        .args(["list", "-q"])
        .output()?;
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&id));
    let log = fs::read_to_string(logs.join("c/0.log"))?;
    assert!(log.contains("stdout F via runc"), "{log}");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await?;
    Ok(())
}

/// What one exec session sent back.
#[derive(Debug, Default)]
struct ExecOutput {
    stdout: String,
    stderr: String,
    status: String,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens an exec URL with `protocol`, from inside the node netns where
/// the daemon's loopback address lives.
async fn ws_connect(
    node: &NodeNs,
    url: &str,
    protocol: &str,
) -> Result<std::result::Result<Ws, tungstenite::Error>> {
    use tungstenite::client::IntoClientRequest;
    let addr = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .context("URL without host")?
        .to_owned();
    let netns = fs::File::open(Path::new("/run/netns").join(&node.0))?;
    // setns affects only this thread; the socket stays in the node netns.
    let stream = std::thread::spawn(move || -> Result<std::net::TcpStream> {
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(std::net::TcpStream::connect(addr)?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect thread panicked"))??;
    stream.set_nonblocking(true)?;
    let stream = tokio::net::TcpStream::from_std(stream)?;
    let mut request = url.replacen("http://", "ws://", 1).into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse()?);
    Ok(tokio_tungstenite::client_async(request, stream)
        .await
        .map(|(ws, _)| ws))
}

fn frame(channel: u8, data: &[u8]) -> tungstenite::Message {
    tungstenite::Message::binary([&[channel], data].concat())
}

/// Reads frames until the server closes the connection.
async fn ws_collect(ws: &mut Ws) -> Result<ExecOutput> {
    use futures_util::StreamExt;
    let mut out = ExecOutput::default();
    while let Some(message) = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .context("exec output timed out")?
    {
        let tungstenite::Message::Binary(data) = message? else {
            continue;
        };
        let text = String::from_utf8_lossy(&data[1..]).into_owned();
        match data[0] {
            1 => out.stdout += &text,
            2 => out.stderr += &text,
            3 => out.status += &text,
            other => bail!("unexpected channel {other}"),
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_over_websocket() -> Result<()> {
    use futures_util::SinkExt;
    if !require_root("bosun-cri end to end") {
        return Ok(());
    }
    let daemon = Daemon::new("10.233.0.0/24").await?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let logs = daemon.dir.path().join("pod-logs");
    let sandbox_config = pod_config("shell", &logs);
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("sh", "exec sleep 1000")),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await?;
    let exec = |cmd: &[&str], tty: bool| cri::ExecRequest {
        container_id: id.clone(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin: true,
        stdout: true,
        stderr: !tty,
    };

    // v5: stdin, its close, both outputs and a non-zero exit.
    let url = rt
        .exec(exec(
            &["sh", "-c", "read x; echo got $x; echo err >&2; exit 3"],
            false,
        ))
        .await?
        .into_inner()
        .url;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let mut ws = ws_connect(&daemon.node, &url, "v5.channel.k8s.io")
        .await?
        .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?;
    ws.send(frame(0, b"hello\n")).await?;
    ws.send(frame(255, &[0])).await?;
    let out = ws_collect(&mut ws).await?;
    assert_eq!(out.stdout, "got hello\n", "{out:?}");
    assert_eq!(out.stderr, "err\n", "{out:?}");
    let status: serde_json::Value = serde_json::from_str(&out.status)?;
    assert_eq!(status["status"], "Failure", "{status}");
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "3", "{status}");

    // The token worked once; unknown tokens are not found either.
    for url in [url.clone(), url.replace("/exec/", "/exec/0")] {
        match ws_connect(&daemon.node, &url, "v5.channel.k8s.io").await? {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 404),
            other => bail!("{url}: {other:?}"),
        }
    }

    // v4, tty: a resize applies to the pty before the command reads it.
    let url = rt
        .exec(exec(&["sh", "-c", "read x; stty size"], true))
        .await?
        .into_inner()
        .url;
    let mut ws = ws_connect(&daemon.node, &url, "v4.channel.k8s.io")
        .await?
        .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?;
    ws.send(frame(4, br#"{"Width":123,"Height":45}"#)).await?;
    ws.send(frame(0, b"\n")).await?;
    let out = ws_collect(&mut ws).await?;
    assert!(out.stdout.contains("45 123"), "{out:?}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out.status)?["status"],
        "Success",
        "{out:?}"
    );

    // A stopped container has nothing to exec in.
    rt.stop_container(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 0,
    })
    .await?;
    let refused = rt.exec(exec(&["true"], false)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await?;
    Ok(())
}
