//! Container and sandbox statistics from the cgroup files the runtime set
//! up, and the writable layer's disk usage.
//!
//! cgroup v1 (this host: hybrid) and v2 are read; with the systemd driver
//! (`slice:prefix:name` paths) the slice is resolved as systemd names it.

use std::path::Path;

use k8s_cri::v1 as cri;

use super::counters::{Cgroup, Hierarchy};
use super::metrics;
use super::rootfs;
use super::state::{ContainerRecord, Phase, SandboxRecord};

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
}

fn value(v: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value: v })
}

/// The cgroup path (relative to a hierarchy) from a bundle's config.json;
/// without one, runc and bosun-runc both use `/<id>`.
pub(super) fn cgroup_path(bundle: &Path, id: &str) -> Option<String> {
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).ok()?;
    match spec.linux().as_ref()?.cgroups_path() {
        Some(path) => Some(systemd_to_path(&path.display().to_string())),
        None => Some(id.to_owned()),
    }
}

/// `kubepods.slice:bosun:id` → `kubepods.slice/bosun-id.scope`; a plain path
/// is returned as is (leading `/` trimmed).
fn systemd_to_path(path: &str) -> String {
    let parts: Vec<&str> = path.split(':').collect();
    match parts.as_slice() {
        [slice, prefix, name] => {
            let mut dir = String::new();
            // systemd nests a-b.slice inside a.slice.
            let stem = slice.trim_end_matches(".slice");
            let mut acc = String::new();
            for piece in stem.split('-') {
                if !acc.is_empty() {
                    acc.push('-');
                }
                acc.push_str(piece);
                dir.push_str(&format!("{acc}.slice/"));
            }
            format!("{dir}{prefix}-{name}.scope")
        }
        _ => path.trim_start_matches('/').to_owned(),
    }
}

/// CPU and memory of one cgroup, in the CRI's shape.
fn usage(relative: &str) -> (Option<cri::CpuUsage>, Option<cri::MemoryUsage>) {
    let cgroup = Cgroup::new(Hierarchy::host(), relative);
    let timestamp = now_ns();
    let cpu = cgroup.cpu().map(|cpu| cri::CpuUsage {
        timestamp,
        usage_core_nano_seconds: value(cpu.usage_ns),
        usage_nano_cores: None,
    });
    let memory = cgroup.memory().map(|m| cri::MemoryUsage {
        timestamp,
        working_set_bytes: value(m.working_set),
        available_bytes: None,
        usage_bytes: value(m.usage),
        rss_bytes: m.rss.and_then(value),
        page_faults: m.pgfault_hierarchy.and_then(value),
        major_page_faults: m.pgmajfault_hierarchy.and_then(value),
    });
    (cpu, memory)
}

/// ContainerStats of one container.
pub fn container(record: &ContainerRecord) -> cri::ContainerStats {
    let (cpu, memory) = match (record.phase, cgroup_path(&record.bundle, &record.id)) {
        (Phase::Running, Some(path)) => usage(&path),
        _ => (None, None),
    };
    let (bytes, inodes) = rootfs::usage(&record.layer_dir.join("upper"));
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: record.id.clone(),
            metadata: record.config.metadata.clone(),
            labels: record.config.labels.clone(),
            annotations: record.config.annotations.clone(),
        }),
        cpu,
        memory,
        writable_layer: Some(cri::FilesystemUsage {
            timestamp: now_ns(),
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: record.layer_dir.display().to_string(),
            }),
            used_bytes: value(bytes),
            inodes_used: value(inodes),
        }),
        swap: None,
    }
}

/// PodSandboxStats: the pod cgroup (when it has one) and its containers.
pub fn sandbox(record: &SandboxRecord, containers: &[ContainerRecord]) -> cri::PodSandboxStats {
    let parent = record.state.cgroup_parent.clone();
    let (cpu, memory) = if parent.is_empty() {
        (None, None)
    } else {
        usage(&systemd_to_path(&parent))
    };
    let running: Vec<&ContainerRecord> = containers
        .iter()
        .filter(|c| c.phase == Phase::Running)
        .collect();
    let process_count = running
        .iter()
        .filter_map(|c| cgroup_path(&c.bundle, &c.id))
        .map(|path| Cgroup::new(Hierarchy::host(), &path).procs().len() as u64)
        .sum();
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: record.id.clone(),
            metadata: record.config.metadata.clone(),
            labels: record.config.labels.clone(),
            annotations: record.config.annotations.clone(),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu,
            memory,
            network: network(record),
            process: Some(cri::ProcessUsage {
                timestamp: now_ns(),
                process_count: value(process_count),
            }),
            containers: running.iter().map(|c| container(c)).collect(),
        }),
        windows: None,
    }
}

/// The pod's links; the first that is not loopback is the default one.
fn network(record: &SandboxRecord) -> Option<cri::NetworkUsage> {
    let interfaces: Vec<cri::NetworkInterfaceUsage> = metrics::pod_links(record)
        .into_iter()
        .filter(|l| l.name != "lo")
        .map(|l| cri::NetworkInterfaceUsage {
            name: l.name,
            rx_bytes: value(l.rx_bytes),
            rx_errors: value(l.rx_errors),
            tx_bytes: value(l.tx_bytes),
            tx_errors: value(l.tx_errors),
        })
        .collect();
    Some(cri::NetworkUsage {
        timestamp: now_ns(),
        default_interface: Some(interfaces.first()?.clone()),
        interfaces,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn systemd_paths_nest_slices() {
        assert_eq!(
            systemd_to_path("kubepods-burstable.slice:bosun:abc"),
            "kubepods.slice/kubepods-burstable.slice/bosun-abc.scope"
        );
        assert_eq!(systemd_to_path("/kubepods/pod1/abc"), "kubepods/pod1/abc");
    }
}
