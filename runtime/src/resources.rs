//! `update`'s flags (or its `-r` JSON) turned into OCI `LinuxResources`.
//! As in runc, a resources file replaces the flags rather than merging with them.

use oci_spec::runtime::{LinuxBlockIo, LinuxCpu, LinuxMemory, LinuxPids, LinuxResources};

use crate::units::{parse_ram, SizeError};

#[derive(Debug, thiserror::Error)]
pub enum ResourcesError {
    #[error("--{flag}: {source}")]
    Size {
        flag: &'static str,
        source: SizeError,
    },
    #[error("resources file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("resources file {path}: invalid LinuxResources JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("nothing to update: give a resources file (-r) or at least one resource flag")]
    Empty,
}

/// runc's `update` flags, as given on the command line.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct UpdateFlags {
    /// Block IO weight (10-1000)
    #[arg(long = "blkio-weight")]
    pub blkio_weight: Option<u16>,
    /// CPU CFS period in microseconds
    #[arg(long = "cpu-period")]
    pub cpu_period: Option<u64>,
    /// CPU CFS quota in microseconds
    #[arg(long = "cpu-quota")]
    pub cpu_quota: Option<i64>,
    /// CPU shares (relative weight)
    #[arg(long = "cpu-share")]
    pub cpu_share: Option<u64>,
    /// CPU realtime period in microseconds
    #[arg(long = "cpu-rt-period")]
    pub cpu_rt_period: Option<u64>,
    /// CPU realtime runtime in microseconds
    #[arg(long = "cpu-rt-runtime")]
    pub cpu_rt_runtime: Option<i64>,
    /// CPUs to allow (0-3, 0,1)
    #[arg(long = "cpuset-cpus")]
    pub cpuset_cpus: Option<String>,
    /// Memory nodes to allow (0-3, 0,1)
    #[arg(long = "cpuset-mems")]
    pub cpuset_mems: Option<String>,
    /// Memory limit (in bytes, or with a k/m/g suffix)
    #[arg(long)]
    pub memory: Option<String>,
    /// Memory reservation or soft limit
    #[arg(long = "memory-reservation")]
    pub memory_reservation: Option<String>,
    /// Total memory usage (memory + swap); -1 for unlimited swap
    #[arg(long = "memory-swap")]
    pub memory_swap: Option<String>,
    /// Kernel memory limit (deprecated in the kernel; accepted as runc does)
    #[arg(long = "kernel-memory")]
    pub kernel_memory: Option<String>,
    /// Kernel TCP memory limit (deprecated in the kernel; accepted as runc does)
    #[arg(long = "kernel-memory-tcp")]
    pub kernel_memory_tcp: Option<String>,
    /// Maximum number of pids allowed in the container
    #[arg(long = "pids-limit")]
    pub pids_limit: Option<i64>,
}

fn size(flag: &'static str, v: &Option<String>) -> Result<Option<i64>, ResourcesError> {
    v.as_deref()
        .map(parse_ram)
        .transpose()
        .map_err(|source| ResourcesError::Size { flag, source })
}

impl UpdateFlags {
    pub fn to_resources(&self) -> Result<LinuxResources, ResourcesError> {
        let mut r = LinuxResources::default();
        let mut any = false;

        let mut mem = LinuxMemory::default();
        let (limit, reservation, swap, kernel, kernel_tcp) = (
            size("memory", &self.memory)?,
            size("memory-reservation", &self.memory_reservation)?,
            size("memory-swap", &self.memory_swap)?,
            size("kernel-memory", &self.kernel_memory)?,
            size("kernel-memory-tcp", &self.kernel_memory_tcp)?,
        );
        if limit
            .or(reservation)
            .or(swap)
            .or(kernel)
            .or(kernel_tcp)
            .is_some()
        {
            mem.set_limit(limit);
            mem.set_reservation(reservation);
            mem.set_swap(swap);
            mem.set_kernel(kernel);
            mem.set_kernel_tcp(kernel_tcp);
            r.set_memory(Some(mem));
            any = true;
        }

        let mut cpu = LinuxCpu::default();
        let mut cpu_set = false;
        if let Some(v) = self.cpu_share {
            cpu.set_shares(Some(v));
            cpu_set = true;
        }
        if let Some(v) = self.cpu_quota {
            cpu.set_quota(Some(v));
            cpu_set = true;
        }
        if let Some(v) = self.cpu_period {
            cpu.set_period(Some(v));
            cpu_set = true;
        }
        if let Some(v) = self.cpu_rt_runtime {
            cpu.set_realtime_runtime(Some(v));
            cpu_set = true;
        }
        if let Some(v) = self.cpu_rt_period {
            cpu.set_realtime_period(Some(v));
            cpu_set = true;
        }
        if let Some(v) = &self.cpuset_cpus {
            cpu.set_cpus(Some(v.clone()));
            cpu_set = true;
        }
        if let Some(v) = &self.cpuset_mems {
            cpu.set_mems(Some(v.clone()));
            cpu_set = true;
        }
        if cpu_set {
            r.set_cpu(Some(cpu));
            any = true;
        }

        if let Some(limit) = self.pids_limit {
            let mut pids = LinuxPids::default();
            pids.set_limit(limit);
            r.set_pids(Some(pids));
            any = true;
        }
        if let Some(w) = self.blkio_weight {
            let mut bio = LinuxBlockIo::default();
            bio.set_weight(Some(w));
            r.set_block_io(Some(bio));
            any = true;
        }
        if any {
            Ok(r)
        } else {
            Err(ResourcesError::Empty)
        }
    }
}

/// Parses a `-r` resources document (the OCI `LinuxResources` JSON object).
pub fn parse_resources(path: &str, text: &str) -> Result<LinuxResources, ResourcesError> {
    serde_json::from_str(text).map_err(|source| ResourcesError::Json {
        path: path.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_to_resources() {
        let f = UpdateFlags {
            memory: Some("64m".into()),
            pids_limit: Some(10),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            ..Default::default()
        };
        let r = f.to_resources().unwrap_or_default();
        assert_eq!(r.memory().and_then(|m| m.limit()), Some(64 << 20));
        assert_eq!(r.pids().map(|p| p.limit()), Some(10));
        assert_eq!(r.cpu().as_ref().and_then(|c| c.quota()), Some(50_000));
        assert!(r.block_io().is_none());
    }

    #[test]
    fn no_flags_is_an_error() {
        assert!(matches!(
            UpdateFlags::default().to_resources(),
            Err(ResourcesError::Empty)
        ));
    }

    #[test]
    fn bad_size_names_flag() {
        let f = UpdateFlags {
            memory: Some("lots".into()),
            ..Default::default()
        };
        let e = f.to_resources().err().map(|e| e.to_string());
        assert!(e.unwrap_or_default().starts_with("--memory: invalid size"));
    }

    #[test]
    fn resources_file() {
        let r = parse_resources(
            "r.json",
            r#"{"memory":{"limit":1048576},"pids":{"limit":5}}"#,
        );
        let r = r.unwrap_or_default();
        assert_eq!(r.memory().and_then(|m| m.limit()), Some(1048576));
        assert!(parse_resources("r.json", "{").is_err());
    }
}
