//! The harness of the daemon tests: `bosun-cri` started inside a "node"
//! network namespace the test makes (the CNI bridge of our `bosun-cni`
//! lives there), all state under a temp dir, the busybox test image
//! imported before it starts, a CRI gRPC channel to its socket, and the
//! configs the kubelet would send.

#![allow(dead_code)] // each test crate uses its own part of this

use std::collections::HashMap;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bosun_testsupport::host;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use super::bins;

pub const IMAGE: &str = "localhost/bosun/busybox:e2e";

pub fn bin_dir() -> Result<PathBuf> {
    bins::workspace_bin_dir(&[("bosun-cni", "bosun-cni"), ("bosun-runtime", "bosun-runc")])
}

/// A named network namespace, removed (with its processes) on drop.
pub struct NodeNs(pub String);

impl NodeNs {
    pub fn new() -> Result<Self> {
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

    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
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

    pub fn exec(&self, argv: &[&str]) -> Result<String> {
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
pub struct Daemon {
    pub node: NodeNs,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub bins: PathBuf,
}

impl Daemon {
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("cri.sock")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub async fn new(subnet: &str) -> Result<Self> {
        Self::with_config(subnet, "").await
    }

    /// Like [`Self::new`], with `extra` top-level TOML keys in the
    /// daemon's config (`registry_hosts`, `seccomp_profile_root`, ...).
    pub async fn with_config(subnet: &str, extra: &str) -> Result<Self> {
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
{extra}
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
    pub async fn import_image(&self) -> Result<()> {
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

    pub fn start(&mut self) -> Result<()> {
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

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub async fn channel(&self) -> Result<Channel> {
        Ok(bosun_cri::client::connect(&self.socket()).await?)
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

pub fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
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
pub fn kubelet_namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

pub fn container_config(name: &str, script: &str) -> cri::ContainerConfig {
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

/// RunPodSandbox with the default handler; the sandbox ID.
pub async fn run_pod(
    rt: &mut RuntimeServiceClient<Channel>,
    config: &cri::PodSandboxConfig,
) -> Result<String> {
    Ok(rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id)
}

pub async fn wait_state(
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

/// A TCP connection to `addr` from inside the node netns, where the
/// daemon's loopback streaming address lives.
pub fn node_connect(node: &NodeNs, addr: String) -> Result<tokio::net::TcpStream> {
    let netns = fs::File::open(Path::new("/run/netns").join(&node.0))?;
    // setns affects only this thread; the socket stays in the node netns.
    let stream = std::thread::spawn(move || -> Result<std::net::TcpStream> {
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(std::net::TcpStream::connect(addr)?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect thread panicked"))??;
    stream.set_nonblocking(true)?;
    Ok(tokio::net::TcpStream::from_std(stream)?)
}
