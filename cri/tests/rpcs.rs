//! Every CRI RPC `daemon.rs` does not reach, over gRPC against the real
//! `bosun-cri` in a node network namespace (see `node/`): runtime config,
//! listing filters, resources, log reopening, stats, the event stream,
//! the ImageService with pulls from a local docker-registry mapped through
//! the daemon's registry config, 20 pods at once, and bad requests, each
//! answered with a gRPC code and a message that says what is wrong.
//!
//! Each test makes its own daemon and ends by checking that nothing is
//! left: no mounts, namespace pins, IPs, monitors or runtime containers.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use bosun_testsupport::host;
use bosun_testsupport::privileged::require_root;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;
use tonic::Code;

mod bins;
mod common;
mod node;

use node::*;

type Rt = RuntimeServiceClient<Channel>;

const WHAT: &str = "bosun-cri RPCs end to end";

/// Asserts that `result` failed with `code` and a message naming each of
/// `needles`.
fn refused<T: std::fmt::Debug>(
    result: std::result::Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needles: &[&str],
) -> Result<()> {
    let status = match result {
        Ok(answer) => bail!("expected {code:?}, got {:?}", answer.into_inner()),
        Err(status) => status,
    };
    eprintln!("refused: {:?}: {}", status.code(), status.message());
    ensure!(
        status.code() == code,
        "expected {code:?}, got {:?}: {}",
        status.code(),
        status.message()
    );
    for needle in needles {
        ensure!(
            status.message().contains(needle),
            "message {:?} does not name {needle:?}",
            status.message()
        );
    }
    Ok(())
}

async fn create(
    rt: &mut Rt,
    pod: &str,
    sandbox: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> std::result::Result<String, tonic::Status> {
    Ok(rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        })
        .await?
        .into_inner()
        .container_id)
}

/// Creates and starts a container; returns once it runs.
async fn start(
    rt: &mut Rt,
    pod: &str,
    sandbox: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> Result<String> {
    let id = create(rt, pod, sandbox, config).await?;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await?;
    wait_state(rt, &id, cri::ContainerState::ContainerRunning).await?;
    Ok(id)
}

async fn remove_pod(rt: &mut Rt, pod: &str) -> Result<()> {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await?;
    Ok(())
}

fn dir_entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// IPs the CNI plugin's host-local IPAM has handed out.
fn allocated_ips(daemon: &Daemon) -> Vec<String> {
    dir_entries(&daemon.dir.path().join("ipam/e2e"))
        .into_iter()
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect()
}

/// Nothing of any pod or container is left: no mounts under the daemon's
/// dirs (the namespace pin root stays a shared mount point, as /run/netns
/// does), no pinned namespaces, container state or layers, no IPs, no
/// bridge ports, no monitor processes, nothing the runtime knows.
fn assert_clean(daemon: &Daemon) -> Result<()> {
    let dir = daemon.dir.path();
    let pin_root = dir.join("state/ns");
    let mounts: Vec<String> = host::mounts()?
        .iter()
        .filter(|m| m.mount_point.starts_with(dir) && m.mount_point != pin_root)
        .map(|m| m.mount_point.display().to_string())
        .collect();
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
    for sub in ["state/ns", "state/c", "root/layers", "root/containers"] {
        let left = dir_entries(&dir.join(sub));
        ensure!(left.is_empty(), "{sub} not empty: {left:?}");
    }
    let ips = allocated_ips(daemon);
    ensure!(ips.is_empty(), "IPs still allocated: {ips:?}");
    let ports = daemon
        .node
        .exec(&["ip", "-o", "link", "show", "master", "bcri0"])?;
    ensure!(ports.trim().is_empty(), "bridge ports left: {ports}");
    let monitors = host::processes_with(&dir.join("state/c").display().to_string())?;
    ensure!(monitors.is_empty(), "monitor processes left: {monitors:?}");
    let listed = Command::new(daemon.bins.join("bosun-runc"))
        .arg("--root")
        .arg(dir.join("state/runtime/bosun-runc"))
        .args(["list", "-q"])
        .output()?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    ensure!(
        listed.trim().is_empty(),
        "runtime containers left: {listed}"
    );
    Ok(())
}

fn pod_filter(f: impl FnOnce(&mut cri::PodSandboxFilter)) -> cri::ListPodSandboxRequest {
    let mut filter = cri::PodSandboxFilter::default();
    f(&mut filter);
    cri::ListPodSandboxRequest {
        filter: Some(filter),
    }
}

fn container_filter(f: impl FnOnce(&mut cri::ContainerFilter)) -> cri::ListContainersRequest {
    let mut filter = cri::ContainerFilter::default();
    f(&mut filter);
    cri::ListContainersRequest {
        filter: Some(filter),
    }
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn pod_ids(rt: &mut Rt, request: cri::ListPodSandboxRequest) -> Result<Vec<String>> {
    let mut ids: Vec<String> = rt
        .list_pod_sandbox(request)
        .await?
        .into_inner()
        .items
        .into_iter()
        .map(|p| p.id)
        .collect();
    ids.sort();
    Ok(ids)
}

async fn container_ids(rt: &mut Rt, request: cri::ListContainersRequest) -> Result<Vec<String>> {
    let mut ids: Vec<String> = rt
        .list_containers(request)
        .await?
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort();
    Ok(ids)
}

fn sorted(ids: &[&String]) -> Vec<String> {
    let mut ids: Vec<String> = ids.iter().map(|s| (*s).clone()).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_config_listing_filters_and_checkpoint() -> Result<()> {
    if !require_root(WHAT) {
        return Ok(());
    }
    let daemon = Daemon::new("10.240.0.0/24").await?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);

    let config = rt
        .runtime_config(cri::RuntimeConfigRequest {})
        .await?
        .into_inner();
    assert_eq!(
        config.linux.context("no linux config")?.cgroup_driver,
        cri::CgroupDriver::Cgroupfs as i32
    );
    rt.update_runtime_config(cri::UpdateRuntimeConfigRequest {
        runtime_config: Some(cri::RuntimeConfig {
            network_config: Some(cri::NetworkConfig {
                pod_cidr: "10.240.0.0/24".into(),
            }),
        }),
    })
    .await?;
    let log = daemon.log();
    assert!(
        log.contains("kubelet reported the pod CIDR") && log.contains("10.240.0.0/24"),
        "{log}"
    );

    let logs = daemon.dir.path().join("pod-logs");
    let mut alpha_config = pod_config("alpha", &logs);
    alpha_config.labels = labels(&[("app", "alpha"), ("tier", "front")]);
    let mut beta_config = pod_config("beta", &logs);
    beta_config.labels = labels(&[("app", "beta"), ("tier", "front")]);
    let alpha = run_pod(&mut rt, &alpha_config).await?;
    let beta = run_pod(&mut rt, &beta_config).await?;

    let ready = cri::PodSandboxStateValue {
        state: cri::PodSandboxState::SandboxReady as i32,
    };
    let not_ready = cri::PodSandboxStateValue {
        state: cri::PodSandboxState::SandboxNotready as i32,
    };
    let both = sorted(&[&alpha, &beta]);
    assert_eq!(pod_ids(&mut rt, pod_filter(|_| ())).await?, both);
    assert_eq!(
        pod_ids(&mut rt, pod_filter(|f| f.id = alpha[..12].into())).await?,
        vec![alpha.clone()]
    );
    assert_eq!(
        pod_ids(&mut rt, pod_filter(|f| f.state = Some(ready))).await?,
        both
    );
    assert_eq!(
        pod_ids(
            &mut rt,
            pod_filter(|f| f.label_selector = labels(&[("tier", "front")]))
        )
        .await?,
        both
    );
    assert_eq!(
        pod_ids(
            &mut rt,
            pod_filter(|f| f.label_selector = labels(&[("tier", "front"), ("app", "beta")]))
        )
        .await?,
        vec![beta.clone()]
    );
    assert!(pod_ids(
        &mut rt,
        pod_filter(|f| f.label_selector = labels(&[("tier", "back")]))
    )
    .await?
    .is_empty());
    let listed = rt
        .list_pod_sandbox(pod_filter(|f| f.id = beta.clone()))
        .await?
        .into_inner()
        .items;
    assert_eq!(
        listed[0].metadata.as_ref().map(|m| m.name.as_str()),
        Some("beta")
    );
    assert_eq!(listed[0].runtime_handler, "bosun-runc");

    // Containers in alpha: one running, one only created.
    let one = start(
        &mut rt,
        &alpha,
        &alpha_config,
        container_config("one", "exec sleep 1000"),
    )
    .await?;
    let two = create(
        &mut rt,
        &alpha,
        &alpha_config,
        container_config("two", "exit 0"),
    )
    .await?;
    let running = Some(cri::ContainerStateValue {
        state: cri::ContainerState::ContainerRunning as i32,
    });
    let created = Some(cri::ContainerStateValue {
        state: cri::ContainerState::ContainerCreated as i32,
    });
    let exited = Some(cri::ContainerStateValue {
        state: cri::ContainerState::ContainerExited as i32,
    });
    let pair = sorted(&[&one, &two]);
    assert_eq!(
        container_ids(&mut rt, container_filter(|_| ())).await?,
        pair
    );
    assert_eq!(
        container_ids(
            &mut rt,
            container_filter(|f| f.pod_sandbox_id = alpha.clone())
        )
        .await?,
        pair
    );
    assert!(container_ids(
        &mut rt,
        container_filter(|f| f.pod_sandbox_id = beta.clone())
    )
    .await?
    .is_empty());
    assert_eq!(
        container_ids(&mut rt, container_filter(|f| f.state = running)).await?,
        vec![one.clone()]
    );
    assert_eq!(
        container_ids(&mut rt, container_filter(|f| f.state = created)).await?,
        vec![two.clone()]
    );
    assert_eq!(
        container_ids(&mut rt, container_filter(|f| f.id = two[..12].into())).await?,
        vec![two.clone()]
    );
    assert_eq!(
        container_ids(
            &mut rt,
            container_filter(|f| f.label_selector = labels(&[("container", "one")]))
        )
        .await?,
        vec![one.clone()]
    );
    // Filters combine: alpha's running container is not in beta.
    assert!(container_ids(
        &mut rt,
        container_filter(|f| {
            f.pod_sandbox_id = beta.clone();
            f.state = running;
        })
    )
    .await?
    .is_empty());

    // Stopping beta and `one` moves them between the state filters.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: beta.clone(),
    })
    .await?;
    assert_eq!(
        pod_ids(&mut rt, pod_filter(|f| f.state = Some(not_ready))).await?,
        vec![beta.clone()]
    );
    assert_eq!(
        pod_ids(&mut rt, pod_filter(|f| f.state = Some(ready))).await?,
        vec![alpha.clone()]
    );
    assert!(pod_ids(
        &mut rt,
        pod_filter(|f| {
            f.id = alpha.clone();
            f.state = Some(not_ready);
        })
    )
    .await?
    .is_empty());
    rt.stop_container(cri::StopContainerRequest {
        container_id: one.clone(),
        timeout: 0,
    })
    .await?;
    assert_eq!(
        container_ids(&mut rt, container_filter(|f| f.state = exited)).await?,
        vec![one.clone()]
    );
    assert!(
        container_ids(&mut rt, container_filter(|f| f.state = running))
            .await?
            .is_empty()
    );

    // Checkpointing is not offered (as containerd 1.6).
    refused(
        rt.checkpoint_container(cri::CheckpointContainerRequest {
            container_id: one.clone(),
            location: "/tmp/checkpoint.tar".into(),
            timeout: 10,
        })
        .await,
        Code::Unimplemented,
        &["checkpoint", "not supported"],
    )?;

    for pod in [&alpha, &beta] {
        remove_pod(&mut rt, pod).await?;
    }
    assert!(pod_ids(&mut rt, pod_filter(|_| ())).await?.is_empty());
    assert_clean(&daemon)
}

/// A cgroup parent for a test's pods, removed from every hierarchy on
/// drop (the kubelet owns pod cgroups; the runtime removes only its own).
struct CgroupParent(String);

impl CgroupParent {
    fn new() -> Self {
        Self(format!("/{}", host::unique_id("bosun-rpcs")))
    }

    fn dir(&self, hierarchy: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup")
            .join(hierarchy)
            .join(self.0.trim_start_matches('/'))
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        for hierarchy in host::cgroup_mounts().unwrap_or_default() {
            let dir = hierarchy.join(self.0.trim_start_matches('/'));
            let _ = host::remove_cgroup_tree_within(&dir, Duration::from_secs(5));
        }
    }
}

/// ListMetricDescriptors and ListPodSandboxMetrics agree on every label
/// set, and the values are the container's: the limits set above, its
/// memory, processes, writable layer and the pod's eth0.
async fn check_metrics(rt: &mut Rt, web: &str, app: &str, other: &str) -> Result<()> {
    let descriptors: HashMap<String, Vec<String>> = rt
        .list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
        .await?
        .into_inner()
        .descriptors
        .into_iter()
        .map(|d| {
            assert!(!d.help.is_empty(), "{} has no help", d.name);
            (d.name, d.label_keys)
        })
        .collect();
    assert!(descriptors.len() >= 50, "{descriptors:?}");
    assert_eq!(
        descriptors["container_memory_usage_bytes"],
        ["id", "image", "namespace", "pod", "container"]
    );
    let pods = rt
        .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
        .await?
        .into_inner()
        .pod_metrics;
    let mut listed: Vec<&str> = pods.iter().map(|p| p.pod_sandbox_id.as_str()).collect();
    listed.sort();
    let mut expected = [web, other];
    expected.sort();
    assert_eq!(listed, expected);
    for metric in pods.iter().flat_map(|p| {
        p.metrics
            .iter()
            .chain(p.container_metrics.iter().flat_map(|c| &c.metrics))
    }) {
        let keys = descriptors
            .get(&metric.name)
            .with_context(|| format!("{} has no descriptor", metric.name))?;
        assert_eq!(metric.label_values.len(), keys.len(), "{metric:?}");
    }
    let pod = pods
        .iter()
        .find(|p| p.pod_sandbox_id == web)
        .context("web pod")?;
    assert!(
        pod.metrics
            .iter()
            .any(|m| m.name == "container_network_transmit_bytes_total"
                && m.label_values == [web, "", "default", "web", "POD", "eth0"]),
        "{:?}",
        pod.metrics
    );
    let [container] = pod.container_metrics.as_slice() else {
        bail!("expected one container: {:?}", pod.container_metrics);
    };
    assert_eq!(container.container_id, app);
    let value = |name: &str| {
        container
            .metrics
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.value.as_ref())
            .map(|v| v.value)
    };
    assert_eq!(value("container_spec_memory_limit_bytes"), Some(96 << 20));
    assert_eq!(value("container_spec_cpu_quota"), Some(50_000));
    assert_eq!(value("container_spec_cpu_shares"), Some(512));
    assert!(value("container_memory_working_set_bytes").is_some_and(|v| v > 0));
    assert!(value("container_processes").is_some_and(|v| v >= 1));
    assert!(value("container_threads").is_some_and(|v| v >= 1));
    assert!(value("container_fs_usage_bytes").is_some_and(|v| v >= 512 * 1024));
    assert!(value("container_fs_limit_bytes").is_some_and(|v| v > 0));
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let started = value("container_start_time_seconds").context("no start time")?;
    assert!(started <= now && now - started < 120, "{started} vs {now}");
    let usage = container
        .metrics
        .iter()
        .find(|m| m.name == "container_memory_usage_bytes")
        .context("no memory usage")?;
    assert_eq!(
        usage.label_values,
        [app, IMAGE, "default", "web", "app"],
        "{usage:?}"
    );
    assert_eq!(usage.metric_type, cri::MetricType::Gauge as i32);
    Ok(())
}

/// The counters of `line N` output lines in a CRI log file.
fn logged_lines(path: &Path) -> Vec<u64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(" stdout F line ")?.1.parse().ok())
        .collect()
}

fn consecutive(numbers: &[u64]) -> bool {
    numbers.windows(2).all(|w| w[1] == w[0] + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_log_reopening_stats_and_metrics() -> Result<()> {
    if !require_root(WHAT) {
        return Ok(());
    }
    // Dropped after the daemon (which deletes the containers).
    let parent = CgroupParent::new();
    let daemon = Daemon::new("10.241.0.0/24").await?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let logs = daemon.dir.path().join("pod-logs");
    let mut web_config = pod_config("web", &logs);
    web_config.linux.as_mut().unwrap().cgroup_parent = parent.0.clone();
    let web = run_pod(&mut rt, &web_config).await?;
    let other_config = pod_config("other", &logs);
    let other = run_pod(&mut rt, &other_config).await?;
    let app = start(
        &mut rt,
        &web,
        &web_config,
        container_config(
            "app",
            "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.05; done",
        ),
    )
    .await?;
    let idle = start(
        &mut rt,
        &other,
        &other_config,
        container_config("idle", "exec sleep 1000"),
    )
    .await?;

    // UpdateContainerResources: the runtime applies it to the cgroup and
    // ContainerStatus reports it.
    let resources = cri::LinuxContainerResources {
        memory_limit_in_bytes: 96 << 20,
        cpu_shares: 512,
        cpu_period: 100_000,
        cpu_quota: 50_000,
        ..Default::default()
    };
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: app.clone(),
        linux: Some(resources.clone()),
        windows: None,
        annotations: HashMap::new(),
    })
    .await?;
    let cgroup = |hierarchy: &str, file: &str| -> Result<String> {
        let path = parent.dir(hierarchy).join(&app).join(file);
        Ok(fs::read_to_string(&path)
            .with_context(|| format!("read {}", path.display()))?
            .trim()
            .to_owned())
    };
    assert_eq!(
        cgroup("memory", "memory.limit_in_bytes")?,
        (96u64 << 20).to_string()
    );
    assert_eq!(cgroup("cpu", "cpu.shares")?, "512");
    assert_eq!(cgroup("cpu", "cpu.cfs_quota_us")?, "50000");
    let status = wait_state(&mut rt, &app, cri::ContainerState::ContainerRunning).await?;
    let reported = status
        .resources
        .and_then(|r| r.linux)
        .context("no resources in ContainerStatus")?;
    assert_eq!(reported.memory_limit_in_bytes, 96 << 20);
    assert_eq!(reported.cpu_quota, 50_000);
    // A value the cgroup cannot take is refused and changes nothing.
    refused(
        rt.update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: app.clone(),
            linux: Some(cri::LinuxContainerResources {
                cpu_shares: -3,
                ..resources.clone()
            }),
            windows: None,
            annotations: HashMap::new(),
        })
        .await,
        Code::InvalidArgument,
        &["cpu_shares", "-3"],
    )?;
    assert_eq!(cgroup("cpu", "cpu.shares")?, "512");

    // Stats: the running container uses memory and CPU; its writable
    // layer grows by what it writes.
    let stats = |id: &str| cri::ContainerStatsRequest {
        container_id: id.into(),
    };
    rt.exec_sync(cri::ExecSyncRequest {
        container_id: app.clone(),
        cmd: ["dd", "if=/dev/zero", "of=/filler", "bs=1024", "count=512"]
            .map(String::from)
            .into(),
        timeout: 10,
    })
    .await?;
    let own = rt
        .container_stats(stats(&app))
        .await?
        .into_inner()
        .stats
        .context("no stats")?;
    assert_eq!(
        own.attributes.as_ref().map(|a| a.id.as_str()),
        Some(app.as_str())
    );
    let memory = own.memory.context("no memory stats")?;
    assert!(
        memory.working_set_bytes.is_some_and(|w| w.value > 0),
        "{memory:?}"
    );
    assert!(
        memory.usage_bytes.is_some_and(|w| w.value > 0),
        "{memory:?}"
    );
    let cpu = own.cpu.context("no cpu stats")?;
    assert!(
        cpu.usage_core_nano_seconds.is_some_and(|c| c.value > 0),
        "{cpu:?}"
    );
    let layer = own.writable_layer.context("no writable layer stats")?;
    assert!(
        layer.used_bytes.is_some_and(|u| u.value >= 512 * 1024),
        "{layer:?}"
    );
    assert!(layer.inodes_used.is_some_and(|u| u.value >= 1), "{layer:?}");

    let listed = |filter: cri::ContainerStatsFilter| cri::ListContainerStatsRequest {
        filter: Some(filter),
    };
    let ids = |stats: Vec<cri::ContainerStats>| -> Vec<String> {
        let mut ids: Vec<String> = stats
            .into_iter()
            .filter_map(|s| Some(s.attributes?.id))
            .collect();
        ids.sort();
        ids
    };
    let all = rt
        .list_container_stats(cri::ListContainerStatsRequest { filter: None })
        .await?
        .into_inner()
        .stats;
    assert!(
        all.iter().all(|s| s.memory.is_some() && s.cpu.is_some()),
        "{all:?}"
    );
    assert_eq!(ids(all), sorted(&[&app, &idle]));
    let by_pod = rt
        .list_container_stats(listed(cri::ContainerStatsFilter {
            pod_sandbox_id: other.clone(),
            ..Default::default()
        }))
        .await?
        .into_inner()
        .stats;
    assert_eq!(ids(by_pod), vec![idle.clone()]);
    let by_label = rt
        .list_container_stats(listed(cri::ContainerStatsFilter {
            label_selector: labels(&[("container", "app")]),
            ..Default::default()
        }))
        .await?
        .into_inner()
        .stats;
    assert_eq!(ids(by_label), vec![app.clone()]);
    let by_id = rt
        .list_container_stats(listed(cri::ContainerStatsFilter {
            id: idle[..10].into(),
            ..Default::default()
        }))
        .await?
        .into_inner()
        .stats;
    assert_eq!(ids(by_id), vec![idle.clone()]);

    // Pod stats: the pod's cgroup (it has a parent) and its containers.
    let pod_stats = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: web.clone(),
        })
        .await?
        .into_inner()
        .stats
        .context("no pod stats")?;
    assert_eq!(
        pod_stats.attributes.as_ref().map(|a| a.id.as_str()),
        Some(web.as_str())
    );
    let linux = pod_stats.linux.context("no linux pod stats")?;
    assert!(
        linux
            .memory
            .as_ref()
            .and_then(|m| m.working_set_bytes.as_ref())
            .is_some_and(|w| w.value > 0),
        "{linux:?}"
    );
    assert_eq!(ids(linux.containers), vec![app.clone()]);
    let pod_ids = |stats: Vec<cri::PodSandboxStats>| -> Vec<String> {
        let mut ids: Vec<String> = stats
            .into_iter()
            .filter_map(|s| Some(s.attributes?.id))
            .collect();
        ids.sort();
        ids
    };
    let every = rt
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None })
        .await?
        .into_inner()
        .stats;
    assert_eq!(pod_ids(every), sorted(&[&web, &other]));
    let labelled = rt
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
            filter: Some(cri::PodSandboxStatsFilter {
                label_selector: labels(&[("app", "other")]),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .stats;
    assert_eq!(pod_ids(labelled), vec![other.clone()]);
    let by_id = rt
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
            filter: Some(cri::PodSandboxStatsFilter {
                id: web[..10].into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .stats;
    assert_eq!(pod_ids(by_id), vec![web.clone()]);
    let network = linux.network.context("no network pod stats")?;
    assert_eq!(
        network.default_interface.map(|i| i.name).as_deref(),
        Some("eth0"),
        "{:?}",
        network.interfaces
    );
    let processes = linux.process.and_then(|p| p.process_count).map(|c| c.value);
    assert!(processes.is_some_and(|n| n >= 1), "{processes:?}");

    check_metrics(&mut rt, &web, &app, &other).await?;

    // ReopenContainerLog, as the kubelet rotates: rename, then reopen.
    // Lines before the call are in the renamed file, later ones in a new
    // file at the old path; none lost or split.
    let log = logs.join("app/0.log");
    let rotated = logs.join("app/0.log.20240101-000000");
    let deadline = Instant::now() + Duration::from_secs(10);
    while logged_lines(&log).len() < 3 {
        ensure!(Instant::now() < deadline, "no output in {}", log.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fs::rename(&log, &rotated)?;
    rt.reopen_container_log(cri::ReopenContainerLogRequest {
        container_id: app.clone(),
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while logged_lines(&log).len() < 3 {
        ensure!(Instant::now() < deadline, "nothing logged after reopening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (before, after) = (logged_lines(&rotated), logged_lines(&log));
    assert!(
        consecutive(&before) && consecutive(&after),
        "{before:?} {after:?}"
    );
    assert_eq!(before.first(), Some(&0));
    assert_eq!(after[0], before.last().unwrap() + 1, "{before:?} {after:?}");

    // Once the container exited its log cannot be reopened, and it has no
    // CPU or memory left to report.
    rt.stop_container(cri::StopContainerRequest {
        container_id: app.clone(),
        timeout: 0,
    })
    .await?;
    refused(
        rt.reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: app.clone(),
        })
        .await,
        Code::FailedPrecondition,
        &[&app, "not running"],
    )?;
    let after_exit = rt
        .container_stats(stats(&app))
        .await?
        .into_inner()
        .stats
        .context("no stats")?;
    assert!(after_exit.memory.is_none() && after_exit.cpu.is_none());

    for pod in [&web, &other] {
        remove_pod(&mut rt, pod).await?;
    }
    assert!(
        !parent.dir("memory").join(&app).exists(),
        "container cgroup left"
    );
    assert_clean(&daemon)
}

/// One event, as (subject ID, type).
fn event_kind(event: &cri::ContainerEventResponse) -> (String, cri::ContainerEventType) {
    (
        event.container_id.clone(),
        cri::ContainerEventType::try_from(event.container_event_type)
            .unwrap_or(cri::ContainerEventType::ContainerCreatedEvent),
    )
}

/// Adds events from `stream` to `seen` until `pod`'s deleted event.
async fn events_until_deleted(
    mut stream: tonic::Streaming<cri::ContainerEventResponse>,
    mut seen: Vec<cri::ContainerEventResponse>,
    pod: &str,
) -> Result<Vec<cri::ContainerEventResponse>> {
    use futures_util::StreamExt;
    let deleted = (
        pod.to_owned(),
        cri::ContainerEventType::ContainerDeletedEvent,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.iter().any(|e| event_kind(e) == deleted) {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, stream.next())
            .await
            .context("events stopped coming")?
            .context("event stream ended")??;
        seen.push(event);
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_events_stream_every_lifecycle_step_in_order() -> Result<()> {
    use cri::ContainerEventType::*;
    use futures_util::StreamExt;
    if !require_root(WHAT) {
        return Ok(());
    }
    let daemon = Daemon::new("10.242.0.0/24").await?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    // Subscribed before anything happens; a second subscriber sees the same.
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await?
        .into_inner();
    let second = RuntimeServiceClient::new(daemon.channel().await?)
        .get_container_events(cri::GetEventsRequest {})
        .await?
        .into_inner();

    let logs = daemon.dir.path().join("pod-logs");
    let sandbox = pod_config("events", &logs);
    let pod = run_pod(&mut rt, &sandbox).await?;
    let app = start(
        &mut rt,
        &pod,
        &sandbox,
        container_config("app", "exec sleep 1000"),
    )
    .await?;
    // This one exits at once by itself: its stopped event comes unasked,
    // once, after its started event.
    let quick = create(&mut rt, &pod, &sandbox, container_config("quick", "exit 4")).await?;
    // Asked for its status all the while, as a busy client would: no
    // look at it may fold the exit in before StartContainer is done.
    let poller = {
        let mut rt = rt.clone();
        let quick = quick.clone();
        tokio::spawn(async move {
            loop {
                let _ = rt
                    .container_status(cri::ContainerStatusRequest {
                        container_id: quick.clone(),
                        verbose: false,
                    })
                    .await;
            }
        })
    };
    rt.start_container(cri::StartContainerRequest {
        container_id: quick.clone(),
    })
    .await?;
    poller.abort();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &cri::ContainerEventResponse| {
        event_kind(e) == (quick.clone(), ContainerStoppedEvent)
    }) {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, events.next())
            .await
            .context("no stopped event for a container that exited by itself")?
            .context("event stream ended")??;
        seen.push(event);
    }
    rt.stop_container(cri::StopContainerRequest {
        container_id: app.clone(),
        timeout: 0,
    })
    .await?;
    for id in [&app, &quick] {
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: id.to_string(),
        })
        .await?;
    }
    remove_pod(&mut rt, &pod).await?;
    let seen = events_until_deleted(events, seen, &pod).await?;
    let mirrored = events_until_deleted(second, Vec::new(), &pod).await?;
    let kinds: Vec<_> = seen.iter().map(event_kind).collect();
    assert_eq!(kinds, mirrored.iter().map(event_kind).collect::<Vec<_>>());

    let lifecycle = [
        ContainerCreatedEvent,
        ContainerStartedEvent,
        ContainerStoppedEvent,
        ContainerDeletedEvent,
    ];
    for id in [&pod, &app, &quick] {
        let of: Vec<_> = kinds
            .iter()
            .filter(|(subject, _)| subject == id)
            .map(|(_, kind)| *kind)
            .collect();
        assert_eq!(of, lifecycle, "events of {id}: {kinds:?}");
    }
    assert!(
        seen.windows(2).all(|w| w[0].created_at <= w[1].created_at),
        "events out of time order"
    );
    // Container events carry the pod's status and the container's, in
    // the state the event reports.
    for event in seen.iter().filter(|e| e.container_id != pod) {
        let pod_status = event.pod_sandbox_status.as_ref().context("no pod status")?;
        assert_eq!(pod_status.id, pod);
        let status = &event.containers_statuses[0];
        assert_eq!(status.id, event.container_id);
        let (_, kind) = event_kind(event);
        let state = match kind {
            ContainerCreatedEvent => cri::ContainerState::ContainerCreated,
            ContainerStartedEvent => cri::ContainerState::ContainerRunning,
            ContainerStoppedEvent | ContainerDeletedEvent => cri::ContainerState::ContainerExited,
        };
        assert_eq!(status.state, state as i32, "{kind:?} of {}", status.id);
        if kind == ContainerStoppedEvent {
            let code = if status.id == quick { 4 } else { 137 };
            assert_eq!(status.exit_code, code, "{status:?}");
        }
    }
    assert_clean(&daemon)
}

/// Listens on `port` of the node netns's loopback (where the daemon
/// looks for the registry) and forwards each connection to `target` on
/// the host's loopback (where docker-registry runs). Ends with the test's
/// runtime.
fn forward_into_node(node: &NodeNs, port: u16, target: SocketAddr) -> Result<()> {
    let netns = fs::File::open(Path::new("/run/netns").join(&node.0))?;
    // setns affects only this thread; the socket stays in the node netns.
    let listener = std::thread::spawn(move || -> Result<std::net::TcpListener> {
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(std::net::TcpListener::bind(("127.0.0.1", port))?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("listen thread panicked"))??;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(())
}

/// The registry name pods use; the daemon's registry config maps it to
/// the forwarder in the node netns.
const REGISTRY: &str = "registry.bosun.test";
const REGISTRY_PORT: u16 = 5000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_pulled_listed_and_removed_over_grpc() -> Result<()> {
    if !common::gate() {
        return Ok(());
    }
    let registry = common::Registry::start(false)?;
    // An image of our own (busybox and one more file), so it differs from
    // the imported one.
    let work = tempfile::tempdir()?;
    let rootfs = work.path().join("rootfs");
    bosun_testsupport::rootfs::busybox(&rootfs)?;
    fs::write(rootfs.join("pulled.txt"), "pulled over CRI\n")?;
    let layout = work.path().join("layout");
    let info = bosun_testsupport::layout::write(&layout, "pulled:1", &rootfs)?;
    registry.push(&layout, "1", "bosun/pulled")?;
    let hosts = work.path().join("hosts.json");
    fs::write(
        &hosts,
        serde_json::json!({"host": {REGISTRY: [
            {"host": format!("127.0.0.1:{REGISTRY_PORT}"), "plain_http": true}
        ]}})
        .to_string(),
    )?;
    let daemon = Daemon::with_config(
        "10.243.0.0/24",
        &format!("registry_hosts = \"{}\"", hosts.display()),
    )
    .await?;
    forward_into_node(
        &daemon.node,
        REGISTRY_PORT,
        SocketAddr::from(([127, 0, 0, 1], registry.port)),
    )?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let mut img = ImageServiceClient::new(daemon.channel().await?);
    let spec = |image: &str| {
        Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        })
    };
    let name = format!("{REGISTRY}/bosun/pulled:1");
    let status = |image: &str| cri::ImageStatusRequest {
        image: spec(image),
        verbose: false,
    };

    let absent = img.image_status(status(&name)).await?.into_inner();
    assert!(absent.image.is_none(), "{absent:?}");
    let fs_info = |answer: cri::ImageFsInfoResponse| -> Result<(String, u64, u64)> {
        let usage = answer
            .image_filesystems
            .into_iter()
            .next()
            .context("no image filesystem")?;
        Ok((
            usage.fs_id.context("no fs id")?.mountpoint,
            usage.used_bytes.context("no used bytes")?.value,
            usage.inodes_used.context("no inodes")?.value,
        ))
    };
    let (mountpoint, used_before, inodes_before) = fs_info(
        img.image_fs_info(cri::ImageFsInfoRequest {})
            .await?
            .into_inner(),
    )?;
    assert!(
        Path::new(&mountpoint).starts_with(daemon.dir.path()),
        "image fs {mountpoint}"
    );

    let pulled = img
        .pull_image(cri::PullImageRequest {
            image: spec(&name),
            auth: None,
            sandbox_config: None,
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?
        .into_inner();
    assert_eq!(pulled.image_ref, info.config_digest);
    let image = img
        .image_status(status(&name))
        .await?
        .into_inner()
        .image
        .context("pulled image has no status")?;
    assert_eq!(image.id, info.config_digest);
    assert_eq!(image.repo_tags, vec![name.clone()]);
    let repo_digest = format!("{REGISTRY}/bosun/pulled@{}", info.manifest_digest);
    assert_eq!(image.repo_digests, vec![repo_digest.clone()]);
    assert!(image.size > 0);
    // By ID and by repo digest too.
    for alias in [&info.config_digest, &repo_digest] {
        let by = img.image_status(status(alias)).await?.into_inner().image;
        assert_eq!(
            by.map(|i| i.id),
            Some(info.config_digest.clone()),
            "{alias}"
        );
    }
    let list = |filter: Option<&str>| cri::ListImagesRequest {
        filter: filter.map(|f| cri::ImageFilter { image: spec(f) }),
    };
    let everything = img.list_images(list(None)).await?.into_inner().images;
    assert_eq!(everything.len(), 2, "{everything:?}");
    let only = img
        .list_images(list(Some(&name)))
        .await?
        .into_inner()
        .images;
    assert_eq!(
        only.iter().map(|i| &i.id).collect::<Vec<_>>(),
        [&info.config_digest]
    );
    let (_, used_after, inodes_after) = fs_info(
        img.image_fs_info(cri::ImageFsInfoRequest {})
            .await?
            .into_inner(),
    )?;
    assert!(
        used_after > used_before && inodes_after > inodes_before,
        "{used_before} → {used_after} bytes, {inodes_before} → {inodes_after} inodes"
    );

    // A container from the pulled image sees its file.
    let logs = daemon.dir.path().join("pod-logs");
    let sandbox = pod_config("puller", &logs);
    let pod = run_pod(&mut rt, &sandbox).await?;
    let mut config = container_config("reader", "cat /pulled.txt");
    config.image = spec(&name);
    let reader = create(&mut rt, &pod, &sandbox, config).await?;
    rt.start_container(cri::StartContainerRequest {
        container_id: reader.clone(),
    })
    .await?;
    let done = wait_state(&mut rt, &reader, cri::ContainerState::ContainerExited).await?;
    assert_eq!(done.exit_code, 0, "{done:?}");
    assert_eq!(done.image_id, info.config_digest);
    assert_eq!(done.image_ref, repo_digest);
    let log = fs::read_to_string(logs.join("reader/0.log"))?;
    assert!(log.contains("stdout F pulled over CRI"), "{log}");

    // In use: refused, naming the container; once it is gone: removed.
    refused(
        img.remove_image(cri::RemoveImageRequest { image: spec(&name) })
            .await,
        Code::FailedPrecondition,
        &[&name, "in use", &reader],
    )?;
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: reader.clone(),
    })
    .await?;
    img.remove_image(cri::RemoveImageRequest { image: spec(&name) })
        .await?;
    assert!(img
        .image_status(status(&name))
        .await?
        .into_inner()
        .image
        .is_none());
    assert_eq!(
        img.list_images(list(None)).await?.into_inner().images.len(),
        1
    );
    // Removing what is not there succeeds, as the CRI asks.
    img.remove_image(cri::RemoveImageRequest { image: spec(&name) })
        .await?;

    // Pulls that cannot succeed say why, and leave nothing behind.
    for (missing, needles) in [
        (
            format!("{REGISTRY}/bosun/pulled:nope"),
            vec!["nope", "not found"],
        ),
        (
            format!("{REGISTRY}/bosun/absent:1"),
            vec!["bosun/absent", "not found"],
        ),
    ] {
        refused(
            img.pull_image(cri::PullImageRequest {
                image: spec(&missing),
                auth: None,
                sandbox_config: None,
            })
            .await,
            Code::NotFound,
            &needles,
        )?;
    }
    refused(
        img.pull_image(cri::PullImageRequest {
            image: spec("Bad/Upper:1"),
            auth: None,
            sandbox_config: None,
        })
        .await,
        Code::InvalidArgument,
        &["Bad/Upper:1"],
    )?;
    refused(
        img.pull_image(cri::PullImageRequest {
            image: spec(""),
            auth: None,
            sandbox_config: None,
        })
        .await,
        Code::InvalidArgument,
        &["image is required"],
    )?;
    assert_eq!(
        img.list_images(list(None)).await?.into_inner().images.len(),
        1
    );
    let images = daemon.dir.path().join("images");
    for sub in ["blobs/sha256", "snapshots"] {
        let temps: Vec<String> = dir_entries(&images.join(sub))
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(temps.is_empty(), "{sub}: {temps:?}");
    }
    let (_, used_end, _) = fs_info(
        img.image_fs_info(cri::ImageFsInfoRequest {})
            .await?
            .into_inner(),
    )?;
    assert_eq!(used_end, used_before, "the pulled image's bytes are gone");

    remove_pod(&mut rt, &pod).await?;
    assert_clean(&daemon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_pods_start_survive_a_restart_and_go_in_parallel() -> Result<()> {
    const PODS: usize = 20;
    if !require_root(WHAT) {
        return Ok(());
    }
    let mut daemon = Daemon::new("10.244.0.0/24").await?;
    let channel = daemon.channel().await?;
    let logs = daemon.dir.path().join("pod-logs");
    let began = Instant::now();
    // One channel, one task per pod: RunPodSandbox, Create, Start.
    let tasks: Vec<_> = (0..PODS)
        .map(|i| {
            let mut rt = RuntimeServiceClient::new(channel.clone());
            let sandbox = pod_config(&format!("p{i}"), &logs);
            tokio::spawn(async move {
                let pod = run_pod(&mut rt, &sandbox).await?;
                let container = create(
                    &mut rt,
                    &pod,
                    &sandbox,
                    container_config("c", "exec sleep 1000"),
                )
                .await?;
                rt.start_container(cri::StartContainerRequest {
                    container_id: container.clone(),
                })
                .await?;
                anyhow::Ok((pod, container))
            })
        })
        .collect();
    let mut started = Vec::new();
    for task in tasks {
        started.push(
            task.await?
                .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?,
        );
    }
    eprintln!("{PODS} pods started in {:?}", began.elapsed());

    let mut rt = RuntimeServiceClient::new(channel);
    let check_all_up = |mut rt: Rt| {
        let started = started.clone();
        async move {
            let mut ips = HashMap::new();
            for (pod, container) in &started {
                let status = rt
                    .pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: pod.clone(),
                        verbose: false,
                    })
                    .await?
                    .into_inner()
                    .status
                    .context("no pod status")?;
                ensure!(status.state == cri::PodSandboxState::SandboxReady as i32);
                let ip = status.network.context("no network")?.ip;
                ensure!(ip.starts_with("10.244.0."), "pod IP {ip}");
                ips.insert(ip, pod.clone());
                wait_state(&mut rt, container, cri::ContainerState::ContainerRunning).await?;
            }
            ensure!(ips.len() == PODS, "IPs not distinct: {ips:?}");
            let running = rt
                .list_containers(container_filter(|f| {
                    f.state = Some(cri::ContainerStateValue {
                        state: cri::ContainerState::ContainerRunning as i32,
                    })
                }))
                .await?
                .into_inner()
                .containers;
            ensure!(running.len() == PODS, "{} running", running.len());
            anyhow::Ok(ips)
        }
    };
    let ips = check_all_up(rt.clone()).await?;
    let allocated: HashSet<String> = allocated_ips(&daemon).into_iter().collect();
    assert_eq!(allocated, ips.keys().cloned().collect::<HashSet<_>>());

    // kill -9 with 20 pods up: the restarted daemon has them all, with
    // the same addresses, and tears them down from what it reloaded.
    daemon.kill9();
    daemon.start()?;
    let channel = daemon.channel().await?;
    rt = RuntimeServiceClient::new(channel.clone());
    assert_eq!(check_all_up(rt.clone()).await?, ips);

    let began = Instant::now();
    let tasks: Vec<_> = started
        .iter()
        .map(|(pod, _)| {
            let mut rt = RuntimeServiceClient::new(channel.clone());
            let pod = pod.clone();
            tokio::spawn(async move { remove_pod(&mut rt, &pod).await })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    eprintln!("{PODS} pods stopped and removed in {:?}", began.elapsed());
    assert!(pod_ids(&mut rt, pod_filter(|_| ())).await?.is_empty());
    assert!(container_ids(&mut rt, container_filter(|_| ()))
        .await?
        .is_empty());
    assert_clean(&daemon)
}

/// A container config with `f` applied.
fn with(name: &str, f: impl FnOnce(&mut cri::ContainerConfig)) -> cri::ContainerConfig {
    let mut config = container_config(name, "exec sleep 1000");
    f(&mut config);
    config
}

fn mount(container_path: &str, host_path: &str) -> cri::Mount {
    cri::Mount {
        container_path: container_path.into(),
        host_path: host_path.into(),
        ..Default::default()
    }
}

fn localhost_seccomp(reference: &str) -> impl FnOnce(&mut cri::ContainerConfig) {
    let reference = reference.to_owned();
    move |c| {
        let sc = c.linux.as_mut().unwrap().security_context.as_mut().unwrap();
        sc.seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Localhost as i32,
            localhost_ref: reference,
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_saying_what_is_wrong() -> Result<()> {
    if !require_root(WHAT) {
        return Ok(());
    }
    let profiles = tempfile::tempdir()?;
    fs::write(profiles.path().join("broken.json"), "{ not json")?;
    let daemon = Daemon::with_config(
        "10.245.0.0/24",
        &format!("seccomp_profile_root = \"{}\"", profiles.path().display()),
    )
    .await?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let logs = daemon.dir.path().join("pod-logs");
    let sandbox = pod_config("bad", &logs);

    // Unknown IDs: NotFound naming the ID, wherever an ID must exist.
    let nope = "0123456789abcdef";
    refused(
        rt.container_status(cri::ContainerStatusRequest {
            container_id: nope.into(),
            verbose: false,
        })
        .await,
        Code::NotFound,
        &[nope],
    )?;
    refused(
        rt.start_container(cri::StartContainerRequest {
            container_id: nope.into(),
        })
        .await,
        Code::NotFound,
        &[nope],
    )?;
    refused(
        rt.exec_sync(cri::ExecSyncRequest {
            container_id: nope.into(),
            cmd: vec!["true".into()],
            timeout: 1,
        })
        .await,
        Code::NotFound,
        &[nope],
    )?;
    refused(
        rt.exec(cri::ExecRequest {
            container_id: nope.into(),
            cmd: vec!["sh".into()],
            stdout: true,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        &[nope],
    )?;
    refused(
        rt.attach(cri::AttachRequest {
            container_id: nope.into(),
            stdout: true,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        &[nope],
    )?;
    refused(
        rt.container_stats(cri::ContainerStatsRequest {
            container_id: nope.into(),
        })
        .await,
        Code::NotFound,
        &[nope],
    )?;
    refused(
        rt.update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: nope.into(),
            linux: Some(Default::default()),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        &[nope],
    )?;
    refused(
        rt.reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: nope.into(),
        })
        .await,
        Code::NotFound,
        &[nope],
    )?;
    refused(
        rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: nope.into(),
            verbose: false,
        })
        .await,
        Code::NotFound,
        &[nope],
    )?;
    refused(
        rt.port_forward(cri::PortForwardRequest {
            pod_sandbox_id: nope.into(),
            port: vec![80],
        })
        .await,
        Code::NotFound,
        &[nope],
    )?;
    refused(
        rt.pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: nope.into(),
        })
        .await,
        Code::NotFound,
        &[nope],
    )?;
    refused(
        rt.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: nope.into(),
            config: Some(container_config("c", "true")),
            sandbox_config: Some(sandbox.clone()),
        })
        .await,
        Code::NotFound,
        &[nope],
    )?;
    // An empty ID is a mistake, not a prefix of every ID.
    refused(
        rt.container_status(cri::ContainerStatusRequest::default())
            .await,
        Code::InvalidArgument,
        &["container ID is required"],
    )?;
    refused(
        rt.pod_sandbox_status(cri::PodSandboxStatusRequest::default())
            .await,
        Code::InvalidArgument,
        &["pod sandbox ID is required"],
    )?;
    // Stop and remove of unknown IDs succeed: the kubelet retries them.
    rt.stop_container(cri::StopContainerRequest {
        container_id: nope.into(),
        timeout: 0,
    })
    .await?;
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: nope.into(),
    })
    .await?;
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: nope.into(),
    })
    .await?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: nope.into(),
    })
    .await?;

    // Missing configs and a bad runtime handler.
    refused(
        rt.run_pod_sandbox(cri::RunPodSandboxRequest::default())
            .await,
        Code::InvalidArgument,
        &["config is required"],
    )?;
    refused(
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cri::PodSandboxConfig {
                metadata: None,
                ..sandbox.clone()
            }),
            runtime_handler: String::new(),
        })
        .await,
        Code::InvalidArgument,
        &["metadata"],
    )?;
    refused(
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: "kata".into(),
        })
        .await,
        Code::InvalidArgument,
        &["kata", "bosun-runc"],
    )?;
    ensure!(allocated_ips(&daemon).is_empty(), "a refused pod got an IP");

    let pod = run_pod(&mut rt, &sandbox).await?;
    // The same pod again (name, namespace, UID, attempt) is refused, naming
    // the pod that holds the name; the next attempt is a new pod.
    refused(
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: String::new(),
        })
        .await,
        Code::AlreadyExists,
        &["bad_default_uid-bad_0", &pod],
    )?;
    ensure!(allocated_ips(&daemon).len() == 1, "a refused pod got an IP");
    let mut retry = sandbox.clone();
    retry.metadata.as_mut().unwrap().attempt = 1;
    let pod_retry = run_pod(&mut rt, &retry).await?;
    remove_pod(&mut rt, &pod_retry).await?;

    refused(
        rt.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: None,
            sandbox_config: Some(sandbox.clone()),
        })
        .await,
        Code::InvalidArgument,
        &["config is required"],
    )?;
    refused(
        create(&mut rt, &pod, &sandbox, with("c", |c| c.metadata = None))
            .await
            .map(tonic::Response::new),
        Code::InvalidArgument,
        &["metadata.name"],
    )?;
    refused(
        create(&mut rt, &pod, &sandbox, with("c", |c| c.image = None))
            .await
            .map(tonic::Response::new),
        Code::InvalidArgument,
        &["image"],
    )?;
    let absent = "localhost/bosun/absent:1";
    refused(
        create(
            &mut rt,
            &pod,
            &sandbox,
            with("c", |c| c.image.as_mut().unwrap().image = absent.into()),
        )
        .await
        .map(tonic::Response::new),
        Code::NotFound,
        &[absent, "pull"],
    )?;

    // Mounts: relative paths are refused naming the field; a host path
    // under a regular file cannot exist.
    let file = daemon.dir.path().join("a-file");
    fs::write(&file, "")?;
    let under_file = file.join("sub");
    let under_file = under_file.to_str().unwrap();
    for (bad, needles) in [
        (
            mount("data", "/tmp"),
            vec!["mounts.container_path", "data", "absolute"],
        ),
        (
            mount("/data", "tmp/x"),
            vec!["mounts.host_path", "tmp/x", "absolute"],
        ),
        (mount("/data", under_file), vec![under_file]),
    ] {
        refused(
            create(&mut rt, &pod, &sandbox, with("c", |c| c.mounts = vec![bad]))
                .await
                .map(tonic::Response::new),
            Code::InvalidArgument,
            &needles,
        )?;
    }
    // A host path that does not exist is made as a directory, as
    // containerd and CRI-O do (the kubelet relies on it for hostPath
    // volumes of type "").
    let made = daemon.dir.path().join("made/by/cri");
    let with_made = create(
        &mut rt,
        &pod,
        &sandbox,
        with("made", |c| {
            c.mounts = vec![mount("/data", made.to_str().unwrap())];
            c.command = ["sh", "-c", "echo hi > /data/file"]
                .map(String::from)
                .into();
        }),
    )
    .await?;
    rt.start_container(cri::StartContainerRequest {
        container_id: with_made.clone(),
    })
    .await?;
    let done = wait_state(&mut rt, &with_made, cri::ContainerState::ContainerExited).await?;
    assert_eq!(done.exit_code, 0, "{done:?}");
    assert_eq!(fs::read_to_string(made.join("file"))?, "hi\n");

    // Seccomp Localhost profiles that are missing, not JSON (any absolute
    // path is taken, as containerd and CRI-O do), or relative with `..`.
    let root = profiles.path().display().to_string();
    let missing = format!("{root}/missing.json");
    for (reference, needles) in [
        (missing.clone(), vec![missing.as_str(), "No such file"]),
        (
            "/etc/passwd".to_owned(),
            vec!["/etc/passwd", "parse seccomp profile"],
        ),
        ("../x.json".to_owned(), vec!["../x.json", ".."]),
        (format!("{root}/broken.json"), vec!["broken.json", "parse"]),
    ] {
        refused(
            create(
                &mut rt,
                &pod,
                &sandbox,
                with("c", localhost_seccomp(&reference)),
            )
            .await
            .map(tonic::Response::new),
            Code::InvalidArgument,
            &needles,
        )?;
    }

    // Nothing of the refused containers exists: one container dir, one
    // layer, one record, no mounts but the one container's.
    let dir = daemon.dir.path();
    assert_eq!(dir_entries(&dir.join("state/c")), vec![with_made.clone()]);
    assert_eq!(
        dir_entries(&dir.join("root/layers")),
        vec![with_made.clone()]
    );
    assert_eq!(
        container_ids(&mut rt, container_filter(|_| ())).await?,
        vec![with_made.clone()]
    );
    let stray: Vec<PathBuf> = host::mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| {
            p.starts_with(dir.join("state/c"))
                && !p.starts_with(dir.join("state/c").join(&with_made))
        })
        .collect();
    assert!(stray.is_empty(), "mounts of refused containers: {stray:?}");

    // A second container of the same name in the pod is refused, naming
    // the one that has it; the next attempt is fine.
    let first = start(
        &mut rt,
        &pod,
        &sandbox,
        container_config("dup", "exec sleep 1000"),
    )
    .await?;
    refused(
        create(
            &mut rt,
            &pod,
            &sandbox,
            container_config("dup", "exec sleep 1000"),
        )
        .await
        .map(tonic::Response::new),
        Code::AlreadyExists,
        &["dup_bad_default_uid-bad_0", &first],
    )?;
    let again = start(
        &mut rt,
        &pod,
        &sandbox,
        with("dup", |c| c.metadata.as_mut().unwrap().attempt = 1),
    )
    .await?;

    // Requests that are wrong for the container's state or shape.
    refused(
        rt.start_container(cri::StartContainerRequest {
            container_id: first.clone(),
        })
        .await,
        Code::FailedPrecondition,
        &[&first, "not created"],
    )?;
    refused(
        rt.exec(cri::ExecRequest {
            container_id: first.clone(),
            cmd: Vec::new(),
            stdout: true,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["cmd"],
    )?;
    refused(
        rt.exec_sync(cri::ExecSyncRequest {
            container_id: with_made.clone(),
            cmd: vec!["true".into()],
            timeout: 1,
        })
        .await,
        Code::FailedPrecondition,
        &[&with_made, "not running"],
    )?;

    // Still serving, and the containers that were allowed run.
    rt.version(cri::VersionRequest::default()).await?;
    let out = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: again.clone(),
            cmd: vec!["hostname".into()],
            timeout: 10,
        })
        .await?
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "bad");

    // A stopped pod takes no new containers.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    refused(
        create(&mut rt, &pod, &sandbox, container_config("late", "true"))
            .await
            .map(tonic::Response::new),
        Code::FailedPrecondition,
        &[&pod, "not ready"],
    )?;
    refused(
        rt.port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.clone(),
            port: vec![80],
        })
        .await,
        Code::FailedPrecondition,
        &[&pod, "not ready"],
    )?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    assert_clean(&daemon)
}
