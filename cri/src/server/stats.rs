//! Container and sandbox statistics from the cgroup files the runtime set
//! up, and the writable layer's disk usage.
//!
//! cgroup v1 (this host: hybrid) and v2 are read; with the systemd driver
//! (`slice:prefix:name` paths) the slice is resolved as systemd names it.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;

use super::rootfs;
use super::state::{ContainerRecord, Phase, SandboxRecord};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
}

fn value(v: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value: v })
}

/// The cgroup path (relative to a hierarchy) from a bundle's config.json;
/// without one, runc and bosun-runc both use `/<id>`.
fn cgroup_path(bundle: &Path, id: &str) -> Option<String> {
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

/// Reads `key value` lines (memory.stat, cpu.stat).
fn keyed(file: &Path) -> HashMap<String, u64> {
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

fn number(file: &Path) -> Option<u64> {
    fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// CPU and memory of one cgroup.
fn usage(relative: &str) -> (Option<cri::CpuUsage>, Option<cri::MemoryUsage>) {
    let root = Path::new(CGROUP_ROOT);
    let timestamp = now_ns();
    let v2 = root.join("cgroup.controllers").exists();
    let (cpu_ns, mem_usage, stat) = if v2 {
        let dir = root.join(relative);
        let cpu = keyed(&dir.join("cpu.stat"))
            .get("usage_usec")
            .map(|u| u * 1000);
        (
            cpu,
            number(&dir.join("memory.current")),
            keyed(&dir.join("memory.stat")),
        )
    } else {
        let cpu_dir = ["cpu,cpuacct", "cpuacct"]
            .iter()
            .map(|c| root.join(c).join(relative))
            .find(|d| d.exists())
            .unwrap_or_else(|| PathBuf::from("/nonexistent"));
        let mem_dir = root.join("memory").join(relative);
        (
            number(&cpu_dir.join("cpuacct.usage")),
            number(&mem_dir.join("memory.usage_in_bytes")),
            keyed(&mem_dir.join("memory.stat")),
        )
    };
    let cpu = cpu_ns.map(|ns| cri::CpuUsage {
        timestamp,
        usage_core_nano_seconds: value(ns),
        usage_nano_cores: None,
    });
    let memory = mem_usage.map(|usage| {
        let inactive = stat
            .get(if v2 {
                "inactive_file"
            } else {
                "total_inactive_file"
            })
            .copied()
            .unwrap_or(0);
        cri::MemoryUsage {
            timestamp,
            working_set_bytes: value(usage.saturating_sub(inactive)),
            available_bytes: None,
            usage_bytes: value(usage),
            rss_bytes: stat
                .get(if v2 { "anon" } else { "total_rss" })
                .copied()
                .and_then(value),
            page_faults: stat
                .get(if v2 { "pgfault" } else { "total_pgfault" })
                .copied()
                .and_then(value),
            major_page_faults: stat
                .get(if v2 { "pgmajfault" } else { "total_pgmajfault" })
                .copied()
                .and_then(value),
        }
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
            network: None,
            process: None,
            containers: containers
                .iter()
                .filter(|c| c.phase == Phase::Running)
                .map(container)
                .collect(),
        }),
        windows: None,
    }
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

    #[test]
    fn keyed_files_parse() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.stat");
        fs::write(&file, "total_inactive_file 4096\ntotal_rss 8192\nbad\n").unwrap();
        let map = keyed(&file);
        assert_eq!(map["total_inactive_file"], 4096);
        assert_eq!(map.len(), 2);
    }
}
