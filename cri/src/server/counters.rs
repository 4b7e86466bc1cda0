//! The kernel counters CRI stats and metrics are built from: a container's
//! cgroup (v1 or v2), the processes in it, and its pod's network namespace.
//!
//! The cgroup files are read here rather than through libcgroups'
//! managers: those scan mountinfo again for every controller on each call
//! and fail as a whole when one controller's file is missing, where a
//! scrape of many containers wants the mounts resolved once and every
//! counter that exists. A counter that cannot be read is `None`, never 0.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// v1 controllers whose counters are read.
const V1_CONTROLLERS: [&str; 6] = ["cpu", "cpuacct", "memory", "blkio", "pids", "hugetlb"];

/// cgroup v1 `cpuacct.stat` counts in USER_HZ ticks, 100 per second on Linux.
const NS_PER_TICK: u64 = 10_000_000;

/// Above this a memory limit means "no limit" (v1 writes 2^63 rounded
/// down to a page; cAdvisor draws the same line).
const UNLIMITED: u64 = 1 << 62;

/// Where the node's cgroup controllers are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// One mount per controller (or per co-mounted group such as
    /// `cpu,cpuacct`), as on a v1 or hybrid host.
    V1(HashMap<String, PathBuf>),
    /// The unified mount.
    V2(PathBuf),
}

impl Hierarchy {
    /// This host's, read from mountinfo once.
    pub fn host() -> &'static Hierarchy {
        static HOST: OnceLock<Hierarchy> = OnceLock::new();
        HOST.get_or_init(|| {
            let mounts = procfs::process::Process::myself()
                .and_then(|p| p.mountinfo())
                .map(|m| m.0)
                .unwrap_or_default();
            Hierarchy::from_mounts(mounts.iter().map(|m| {
                (
                    m.fs_type.as_str(),
                    m.mount_point.as_path(),
                    m.super_options.keys().map(String::as_str).collect(),
                )
            }))
        })
    }

    /// From (filesystem type, mount point, super options) of each mount:
    /// v1 when any v1 controller is mounted (a hybrid host keeps its
    /// containers there), else the cgroup2 mount.
    pub fn from_mounts<'a>(
        mounts: impl Iterator<Item = (&'a str, &'a Path, Vec<&'a str>)>,
    ) -> Self {
        let mut v1 = HashMap::new();
        let mut unified = None;
        for (fs_type, mount_point, options) in mounts {
            match fs_type {
                "cgroup" => {
                    for controller in options.into_iter().filter(|o| V1_CONTROLLERS.contains(o)) {
                        v1.entry(controller.to_owned())
                            .or_insert_with(|| mount_point.to_owned());
                    }
                }
                "cgroup2" if unified.is_none() => unified = Some(mount_point.to_owned()),
                _ => {}
            }
        }
        if v1.is_empty() {
            Hierarchy::V2(unified.unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup")))
        } else {
            Hierarchy::V1(v1)
        }
    }
}

/// CPU time, in nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cpu {
    pub usage_ns: u64,
    pub user_ns: Option<u64>,
    pub system_ns: Option<u64>,
    pub periods: Option<u64>,
    pub throttled_periods: Option<u64>,
    pub throttled_ns: Option<u64>,
}

/// Memory, in bytes; fault and OOM counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    pub usage: u64,
    /// Usage minus inactive file pages: what the kubelet evicts on.
    pub working_set: u64,
    pub max_usage: Option<u64>,
    pub failcnt: Option<u64>,
    pub cache: Option<u64>,
    pub rss: Option<u64>,
    pub mapped_file: Option<u64>,
    pub swap: Option<u64>,
    pub kernel: Option<u64>,
    /// Faults of this cgroup alone (v1) and with its descendants.
    pub pgfault: Option<u64>,
    pub pgmajfault: Option<u64>,
    pub pgfault_hierarchy: Option<u64>,
    pub pgmajfault_hierarchy: Option<u64>,
    pub oom_kills: Option<u64>,
}

/// Block I/O on one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceIo {
    pub major: u64,
    pub minor: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub reads: u64,
    pub writes: u64,
}

/// Hugepage usage of one page size (`2MB`, `1GB`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hugetlb {
    pub pagesize: String,
    pub usage: u64,
    pub max_usage: Option<u64>,
}

/// Pressure stall totals (v2), in microseconds: `some` is time at least
/// one task waited, `full` time all of them were stalled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pressure {
    pub cpu: Option<(u64, Option<u64>)>,
    pub memory: Option<(u64, Option<u64>)>,
    pub io: Option<(u64, Option<u64>)>,
}

/// The limits in force, as the cgroup holds them; `None` where unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub cpu_period: Option<u64>,
    pub cpu_quota: Option<u64>,
    pub cpu_shares: Option<u64>,
    pub memory: Option<u64>,
    pub memory_swap: Option<u64>,
    pub memory_reservation: Option<u64>,
    pub pids: Option<u64>,
}

/// One cgroup, relative to each hierarchy's root.
pub struct Cgroup<'a> {
    hierarchy: &'a Hierarchy,
    relative: PathBuf,
}

impl<'a> Cgroup<'a> {
    /// The cgroup at `relative` (a leading `/` is ignored).
    pub fn new(hierarchy: &'a Hierarchy, relative: &str) -> Self {
        Self {
            hierarchy,
            relative: PathBuf::from(relative.trim_start_matches('/')),
        }
    }

    fn dir(&self, controller: &str) -> Option<PathBuf> {
        match self.hierarchy {
            Hierarchy::V1(mounts) => mounts.get(controller).map(|m| m.join(&self.relative)),
            Hierarchy::V2(root) => Some(root.join(&self.relative)),
        }
    }

    fn v2(&self) -> bool {
        matches!(self.hierarchy, Hierarchy::V2(_))
    }

    fn text(&self, controller: &str, file: &str) -> Option<String> {
        fs::read_to_string(self.dir(controller)?.join(file)).ok()
    }

    /// A single number; `max` (v2's "no limit") and -1 read as `None`.
    fn number(&self, controller: &str, file: &str) -> Option<u64> {
        self.text(controller, file)?.trim().parse().ok()
    }

    fn keyed(&self, controller: &str, file: &str) -> HashMap<String, u64> {
        self.text(controller, file)
            .map(|t| keyed(&t))
            .unwrap_or_default()
    }

    /// PIDs of the processes in it.
    pub fn procs(&self) -> Vec<i32> {
        let controller = if self.v2() { "" } else { "pids" };
        let text = self
            .text(controller, "cgroup.procs")
            .or_else(|| self.text("memory", "cgroup.procs"))
            .unwrap_or_default();
        text.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    pub fn cpu(&self) -> Option<Cpu> {
        if self.v2() {
            let stat = self.keyed("cpu", "cpu.stat");
            let us = |k: &str| stat.get(k).map(|v| v * 1000);
            return Some(Cpu {
                usage_ns: us("usage_usec")?,
                user_ns: us("user_usec"),
                system_ns: us("system_usec"),
                periods: stat.get("nr_periods").copied(),
                throttled_periods: stat.get("nr_throttled").copied(),
                throttled_ns: us("throttled_usec"),
            });
        }
        let usage_ns = self.number("cpuacct", "cpuacct.usage")?;
        let ticks = self.keyed("cpuacct", "cpuacct.stat");
        let split = |file: &str, key: &str| {
            self.number("cpuacct", file)
                .or_else(|| ticks.get(key).map(|t| t * NS_PER_TICK))
        };
        let throttling = self.keyed("cpu", "cpu.stat");
        Some(Cpu {
            usage_ns,
            user_ns: split("cpuacct.usage_user", "user"),
            system_ns: split("cpuacct.usage_sys", "system"),
            periods: throttling.get("nr_periods").copied(),
            throttled_periods: throttling.get("nr_throttled").copied(),
            throttled_ns: throttling.get("throttled_time").copied(),
        })
    }

    pub fn memory(&self) -> Option<Memory> {
        let v2 = self.v2();
        let usage = self.number(
            "memory",
            if v2 {
                "memory.current"
            } else {
                "memory.usage_in_bytes"
            },
        )?;
        let stat = self.keyed("memory", "memory.stat");
        let get = |k: &str| stat.get(k).copied();
        if v2 {
            let events = self.keyed("memory", "memory.events");
            let kernel = get("kernel")
                .or_else(|| Some(get("kernel_stack")? + get("slab")? + get("sock").unwrap_or(0)));
            return Some(Memory {
                usage,
                working_set: usage.saturating_sub(get("inactive_file").unwrap_or(0)),
                max_usage: self.number("memory", "memory.peak"),
                failcnt: events.get("max").copied(),
                cache: get("file"),
                rss: get("anon"),
                mapped_file: get("file_mapped"),
                swap: self.number("memory", "memory.swap.current"),
                kernel,
                // v2's memory.stat already counts descendants.
                pgfault: get("pgfault"),
                pgmajfault: get("pgmajfault"),
                pgfault_hierarchy: get("pgfault"),
                pgmajfault_hierarchy: get("pgmajfault"),
                oom_kills: events.get("oom_kill").copied(),
            });
        }
        let swap = get("total_swap").or_else(|| {
            self.number("memory", "memory.memsw.usage_in_bytes")
                .map(|memsw| memsw.saturating_sub(usage))
        });
        Some(Memory {
            usage,
            working_set: usage.saturating_sub(get("total_inactive_file").unwrap_or(0)),
            max_usage: self.number("memory", "memory.max_usage_in_bytes"),
            failcnt: self.number("memory", "memory.failcnt"),
            cache: get("total_cache"),
            rss: get("total_rss"),
            mapped_file: get("total_mapped_file"),
            swap,
            kernel: self.number("memory", "memory.kmem.usage_in_bytes"),
            pgfault: get("pgfault"),
            pgmajfault: get("pgmajfault"),
            pgfault_hierarchy: get("total_pgfault"),
            pgmajfault_hierarchy: get("total_pgmajfault"),
            oom_kills: self
                .keyed("memory", "memory.oom_control")
                .get("oom_kill")
                .copied(),
        })
    }

    /// Per-device I/O; v1 reads the throttle counters (kept whatever the
    /// I/O scheduler), falling back to BFQ's.
    pub fn io(&self) -> Vec<DeviceIo> {
        if self.v2() {
            return self
                .text("io", "io.stat")
                .map(|t| parse_io_stat(&t))
                .unwrap_or_default();
        }
        for prefix in ["blkio.throttle.", "blkio.bfq."] {
            let bytes = self.text("blkio", &format!("{prefix}io_service_bytes_recursive"));
            let ops = self.text("blkio", &format!("{prefix}io_serviced_recursive"));
            let devices = parse_blkio(bytes.as_deref().unwrap_or(""), ops.as_deref().unwrap_or(""));
            if !devices.is_empty() {
                return devices;
            }
        }
        Vec::new()
    }

    pub fn hugetlb(&self) -> Vec<Hugetlb> {
        let Some(dir) = self.dir("hugetlb") else {
            return Vec::new();
        };
        let (usage, max) = if self.v2() {
            ("current", None)
        } else {
            ("usage_in_bytes", Some("max_usage_in_bytes"))
        };
        let mut sizes: Vec<String> = fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter_map(|name| {
                        let size = name
                            .strip_prefix("hugetlb.")?
                            .strip_suffix(&format!(".{usage}"))?;
                        (!size.contains('.')).then(|| size.to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        sizes.sort();
        sizes
            .into_iter()
            .filter_map(|pagesize| {
                Some(Hugetlb {
                    usage: self.number("hugetlb", &format!("hugetlb.{pagesize}.{usage}"))?,
                    max_usage: max
                        .and_then(|m| self.number("hugetlb", &format!("hugetlb.{pagesize}.{m}"))),
                    pagesize,
                })
            })
            .collect()
    }

    /// v2 only: v1 keeps no per-cgroup pressure.
    pub fn pressure(&self) -> Option<Pressure> {
        if !self.v2() {
            return None;
        }
        let read = |file: &str| self.text("", file).and_then(|t| parse_pressure(&t));
        Some(Pressure {
            cpu: read("cpu.pressure"),
            memory: read("memory.pressure"),
            io: read("io.pressure"),
        })
    }

    pub fn limits(&self) -> Limits {
        let bytes = |v: Option<u64>| v.filter(|&v| v < UNLIMITED);
        if self.v2() {
            let max = self.text("cpu", "cpu.max").unwrap_or_default();
            let mut fields = max.split_whitespace();
            let quota = fields.next().and_then(|q| q.parse().ok());
            let period = fields.next().and_then(|p| p.parse().ok());
            return Limits {
                cpu_period: period,
                cpu_quota: quota,
                cpu_shares: self.number("cpu", "cpu.weight").map(weight_to_shares),
                memory: bytes(self.number("memory", "memory.max")),
                memory_swap: bytes(self.number("memory", "memory.swap.max")),
                memory_reservation: bytes(self.number("memory", "memory.low")).filter(|&v| v > 0),
                pids: self.number("pids", "pids.max"),
            };
        }
        Limits {
            cpu_period: self.number("cpu", "cpu.cfs_period_us"),
            // -1 (no quota) does not parse as u64.
            cpu_quota: self.number("cpu", "cpu.cfs_quota_us"),
            cpu_shares: self.number("cpu", "cpu.shares"),
            memory: bytes(self.number("memory", "memory.limit_in_bytes")),
            memory_swap: bytes(self.number("memory", "memory.memsw.limit_in_bytes")),
            memory_reservation: bytes(self.number("memory", "memory.soft_limit_in_bytes")),
            pids: self.number("pids", "pids.max"),
        }
    }
}

/// `key value` lines (memory.stat, cpu.stat, memory.events).
fn keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The inverse of runc's shares → `cpu.weight` conversion.
fn weight_to_shares(weight: u64) -> u64 {
    2 + (weight.saturating_sub(1) * 262_142) / 9_999
}

/// v1 `blkio.*_recursive` files: `8:0 Read 4096` lines (and a `Total`).
fn parse_blkio(bytes: &str, ops: &str) -> Vec<DeviceIo> {
    let mut devices: Vec<DeviceIo> = Vec::new();
    for (text, is_bytes) in [(bytes, true), (ops, false)] {
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(device), Some(op), Some(value)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let (Some((major, minor)), Ok(value)) = (parse_device(device), value.parse::<u64>())
            else {
                continue;
            };
            let index = match devices
                .iter()
                .position(|d| d.major == major && d.minor == minor)
            {
                Some(i) => i,
                None => {
                    devices.push(DeviceIo {
                        major,
                        minor,
                        ..Default::default()
                    });
                    devices.len() - 1
                }
            };
            let device = &mut devices[index];
            match (op, is_bytes) {
                ("Read", true) => device.read_bytes = value,
                ("Write", true) => device.write_bytes = value,
                ("Read", false) => device.reads = value,
                ("Write", false) => device.writes = value,
                _ => {}
            }
        }
    }
    devices
}

/// v2 `io.stat`: `8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0`.
fn parse_io_stat(text: &str) -> Vec<DeviceIo> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (major, minor) = parse_device(fields.next()?)?;
            let values: HashMap<&str, u64> = fields
                .filter_map(|f| {
                    let (k, v) = f.split_once('=')?;
                    Some((k, v.parse().ok()?))
                })
                .collect();
            let get = |k: &str| values.get(k).copied().unwrap_or(0);
            Some(DeviceIo {
                major,
                minor,
                read_bytes: get("rbytes"),
                write_bytes: get("wbytes"),
                reads: get("rios"),
                writes: get("wios"),
            })
        })
        .collect()
}

fn parse_device(text: &str) -> Option<(u64, u64)> {
    let (major, minor) = text.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// A PSI file: the `total=` of its `some` line and of its `full` line.
fn parse_pressure(text: &str) -> Option<(u64, Option<u64>)> {
    let total = |kind: &str| {
        text.lines()
            .find(|l| l.starts_with(kind))?
            .split_whitespace()
            .find_map(|f| f.strip_prefix("total="))?
            .parse()
            .ok()
    };
    Some((total("some")?, total("full")))
}

/// The block device's name (`sda`), from sysfs.
pub fn device_name(major: u64, minor: u64) -> Option<String> {
    let uevent = fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent")).ok()?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(str::to_owned)
}

/// What the processes of a cgroup hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Processes {
    pub count: u64,
    pub threads: u64,
    pub fds: u64,
    pub sockets: u64,
    /// The first process's soft `RLIMIT_NOFILE`.
    pub open_files_soft: Option<u64>,
}

/// Counts over `pids`; a process that exits meanwhile is left out.
pub fn processes(pids: &[i32]) -> Processes {
    use procfs::process::{FDTarget, LimitValue, Process};
    let mut out = Processes::default();
    for &pid in pids {
        let Ok(process) = Process::new(pid) else {
            continue;
        };
        let Ok(status) = process.status() else {
            continue;
        };
        out.count += 1;
        out.threads += status.threads;
        if let Ok(fds) = process.fd() {
            for fd in fds.flatten() {
                out.fds += 1;
                if matches!(fd.target, FDTarget::Socket(_)) {
                    out.sockets += 1;
                }
            }
        }
        if out.open_files_soft.is_none() {
            out.open_files_soft =
                process
                    .limits()
                    .ok()
                    .and_then(|l| match l.max_open_files.soft_limit {
                        LimitValue::Value(v) => Some(v),
                        LimitValue::Unlimited => None,
                    });
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            let path = dir.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
    }

    #[test]
    fn hybrid_mounts_resolve_to_v1() {
        let mounts = [
            ("cgroup", Path::new("/sys/fs/cgroup/cpu"), vec!["rw", "cpu"]),
            (
                "cgroup",
                Path::new("/sys/fs/cgroup/cpuacct"),
                vec!["cpuacct"],
            ),
            (
                "cgroup",
                Path::new("/sys/fs/cgroup/net_cls,net_prio"),
                vec!["net_cls", "net_prio"],
            ),
            ("cgroup", Path::new("/sys/fs/cgroup/systemd"), vec!["name"]),
            ("cgroup2", Path::new("/sys/fs/cgroup/unified"), vec![]),
            ("tmpfs", Path::new("/run"), vec![]),
        ];
        let Hierarchy::V1(map) = Hierarchy::from_mounts(mounts.into_iter()) else {
            panic!("expected v1");
        };
        assert_eq!(map["cpu"], Path::new("/sys/fs/cgroup/cpu"));
        assert_eq!(map["cpuacct"], Path::new("/sys/fs/cgroup/cpuacct"));
        assert_eq!(map.len(), 2);

        let comounted = [(
            "cgroup",
            Path::new("/c/cpu,cpuacct"),
            vec!["cpu", "cpuacct"],
        )];
        let Hierarchy::V1(map) = Hierarchy::from_mounts(comounted.into_iter()) else {
            panic!("expected v1");
        };
        assert_eq!(map["cpu"], map["cpuacct"]);

        let unified = [("cgroup2", Path::new("/sys/fs/cgroup"), vec![])];
        assert_eq!(
            Hierarchy::from_mounts(unified.into_iter()),
            Hierarchy::V2(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn v1_counters_and_limits() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        write(
            r,
            &[
                ("cpuacct/pod/c/cpuacct.usage", "3000000000\n"),
                ("cpuacct/pod/c/cpuacct.stat", "user 150\nsystem 50\n"),
                ("cpu/pod/c/cpu.stat", "nr_periods 10\nnr_throttled 4\nthrottled_time 2000\n"),
                ("cpu/pod/c/cpu.cfs_period_us", "100000\n"),
                ("cpu/pod/c/cpu.cfs_quota_us", "-1\n"),
                ("cpu/pod/c/cpu.shares", "1024\n"),
                ("memory/pod/c/memory.usage_in_bytes", "10000\n"),
                ("memory/pod/c/memory.max_usage_in_bytes", "20000\n"),
                ("memory/pod/c/memory.failcnt", "1\n"),
                ("memory/pod/c/memory.limit_in_bytes", "67108864\n"),
                ("memory/pod/c/memory.soft_limit_in_bytes", "9223372036854771712\n"),
                ("memory/pod/c/memory.memsw.usage_in_bytes", "12000\n"),
                (
                    "memory/pod/c/memory.stat",
                    "cache 5\npgfault 7\npgmajfault 1\ntotal_cache 4000\ntotal_rss 3000\n\
                     total_mapped_file 100\ntotal_inactive_file 1000\ntotal_pgfault 9\ntotal_pgmajfault 2\n",
                ),
                ("memory/pod/c/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"),
                ("pids/pod/c/cgroup.procs", "12\n13\n"),
                ("pids/pod/c/pids.max", "max\n"),
                (
                    "blkio/pod/c/blkio.throttle.io_service_bytes_recursive",
                    "8:0 Read 4096\n8:0 Write 8192\n8:0 Total 12288\nTotal 12288\n",
                ),
                ("blkio/pod/c/blkio.throttle.io_serviced_recursive", "8:0 Read 1\n8:0 Write 2\n"),
                ("hugetlb/pod/c/hugetlb.2MB.usage_in_bytes", "2097152\n"),
                ("hugetlb/pod/c/hugetlb.2MB.max_usage_in_bytes", "4194304\n"),
                ("hugetlb/pod/c/hugetlb.2MB.limit_in_bytes", "0\n"),
            ],
        );
        let hierarchy = Hierarchy::V1(
            V1_CONTROLLERS
                .iter()
                .map(|c| (c.to_string(), r.join(c)))
                .collect(),
        );
        let cgroup = Cgroup::new(&hierarchy, "/pod/c");
        assert_eq!(cgroup.procs(), vec![12, 13]);
        assert_eq!(
            cgroup.cpu().unwrap(),
            Cpu {
                usage_ns: 3_000_000_000,
                user_ns: Some(1_500_000_000),
                system_ns: Some(500_000_000),
                periods: Some(10),
                throttled_periods: Some(4),
                throttled_ns: Some(2000),
            }
        );
        let memory = cgroup.memory().unwrap();
        assert_eq!(memory.working_set, 9000);
        assert_eq!(memory.swap, Some(2000));
        assert_eq!(
            (memory.pgfault, memory.pgfault_hierarchy),
            (Some(7), Some(9))
        );
        assert_eq!(memory.oom_kills, Some(3));
        assert_eq!(memory.kernel, None);
        assert_eq!(
            cgroup.io(),
            vec![DeviceIo {
                major: 8,
                minor: 0,
                read_bytes: 4096,
                write_bytes: 8192,
                reads: 1,
                writes: 2
            }]
        );
        assert_eq!(
            cgroup.hugetlb(),
            vec![Hugetlb {
                pagesize: "2MB".into(),
                usage: 2_097_152,
                max_usage: Some(4_194_304)
            }]
        );
        assert_eq!(cgroup.pressure(), None);
        assert_eq!(
            cgroup.limits(),
            Limits {
                cpu_period: Some(100_000),
                cpu_quota: None,
                cpu_shares: Some(1024),
                memory: Some(67_108_864),
                memory_swap: None,
                memory_reservation: None,
                pids: None,
            }
        );
    }

    #[test]
    fn v2_counters_and_limits() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        write(
            r,
            &[
                (
                    "pod/c/cpu.stat",
                    "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\nnr_periods 3\nnr_throttled 1\nthrottled_usec 40\n",
                ),
                ("pod/c/cpu.max", "20000 100000\n"),
                ("pod/c/cpu.weight", "100\n"),
                ("pod/c/memory.current", "5000\n"),
                ("pod/c/memory.peak", "6000\n"),
                ("pod/c/memory.max", "max\n"),
                ("pod/c/memory.swap.max", "67108864\n"),
                ("pod/c/memory.low", "0\n"),
                ("pod/c/memory.swap.current", "0\n"),
                ("pod/c/memory.events", "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n"),
                (
                    "pod/c/memory.stat",
                    "anon 1000\nfile 3000\nkernel 700\nfile_mapped 200\ninactive_file 1500\npgfault 11\npgmajfault 0\n",
                ),
                ("pod/c/io.stat", "259:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n"),
                (
                    "pod/c/cpu.pressure",
                    "some avg10=0.00 avg60=0.00 avg300=0.00 total=1234\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=99\n",
                ),
                ("pod/c/hugetlb.2MB.current", "0\n"),
                ("pod/c/hugetlb.2MB.events", "max 0\n"),
            ],
        );
        let hierarchy = Hierarchy::V2(r.to_owned());
        let cgroup = Cgroup::new(&hierarchy, "pod/c");
        let cpu = cgroup.cpu().unwrap();
        assert_eq!((cpu.usage_ns, cpu.throttled_ns), (2_500_000, Some(40_000)));
        let memory = cgroup.memory().unwrap();
        assert_eq!(memory.working_set, 3500);
        assert_eq!((memory.failcnt, memory.oom_kills), (Some(2), Some(1)));
        assert_eq!(
            (memory.rss, memory.cache, memory.kernel),
            (Some(1000), Some(3000), Some(700))
        );
        assert_eq!(memory.max_usage, Some(6000));
        assert_eq!(cgroup.io()[0].major, 259);
        assert_eq!(cgroup.io()[0].writes, 2);
        assert_eq!(cgroup.hugetlb()[0].max_usage, None);
        let pressure = cgroup.pressure().unwrap();
        assert_eq!(pressure.cpu, Some((1234, Some(99))));
        assert_eq!(pressure.io, None);
        let limits = cgroup.limits();
        assert_eq!(
            (limits.cpu_quota, limits.cpu_period),
            (Some(20_000), Some(100_000))
        );
        // runc writes weight 39 for 1024 shares; back (as cAdvisor) it is 998.
        assert_eq!(weight_to_shares(39), 998);
        assert_eq!(limits.cpu_shares, Some(weight_to_shares(100)));
        assert_eq!(
            (limits.memory, limits.memory_swap),
            (None, Some(67_108_864))
        );
        assert_eq!(limits.memory_reservation, None);
    }

    #[test]
    fn a_missing_cgroup_reads_as_none() {
        let hierarchy = Hierarchy::V2(PathBuf::from("/nonexistent"));
        let cgroup = Cgroup::new(&hierarchy, "gone");
        assert_eq!(cgroup.cpu(), None);
        assert_eq!(cgroup.memory(), None);
        assert!(cgroup.io().is_empty() && cgroup.procs().is_empty());
    }

    #[test]
    fn own_process_is_counted() {
        let counts = processes(&[std::process::id() as i32, i32::MAX]);
        assert_eq!(counts.count, 1);
        assert!(counts.threads >= 1 && counts.fds >= 3);
        assert!(counts.open_files_soft.is_some());
    }
}
