//! CRI metrics (ListMetricDescriptors, ListPodSandboxMetrics): cAdvisor's
//! `container_*` families, which the kubelet serves on /metrics/cadvisor
//! when it takes pod and container stats from the runtime.
//!
//! Every metric carries CRI-O's labels `id`, `image`, `namespace`, `pod`
//! and `container`, then its family's own. Container families come from
//! the container's cgroup, processes and writable layer; the network
//! families are per pod (its namespace's links, `container="POD"`). The
//! CRI carries values as unsigned integers, so `_seconds` families count
//! whole seconds, as they do with CRI-O.

use std::path::Path;

use bosun_cni::rtnl::{LinkCounters, Rtnl};
use k8s_cri::v1 as cri;
use k8s_cri::v1::MetricType::{Counter, Gauge};

use super::counters::{self, Cgroup, Cpu, DeviceIo, Hierarchy, Hugetlb, Limits, Memory};
use super::counters::{Pressure, Processes};
use super::state::{ContainerRecord, Phase, SandboxRecord};
use super::stats;
use crate::sandbox::namespaces::{self, NsKind};

/// Labels every metric starts with.
const BASE_LABELS: [&str; 5] = ["id", "image", "namespace", "pod", "container"];

const NS_PER_S: u64 = 1_000_000_000;
const US_PER_S: u64 = 1_000_000;

/// One metric family: its descriptor and type.
struct Family {
    name: &'static str,
    help: &'static str,
    /// Labels after [`BASE_LABELS`].
    labels: &'static [&'static str],
    kind: cri::MetricType,
}

const fn family(
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    kind: cri::MetricType,
) -> Family {
    Family {
        name,
        help,
        labels,
        kind,
    }
}

const CPU_USER: Family = family(
    "container_cpu_user_seconds_total",
    "Cumulative user CPU time consumed in seconds.",
    &[],
    Counter,
);
const CPU_SYSTEM: Family = family(
    "container_cpu_system_seconds_total",
    "Cumulative system CPU time consumed in seconds.",
    &[],
    Counter,
);
const CPU_USAGE: Family = family(
    "container_cpu_usage_seconds_total",
    "Cumulative CPU time consumed in seconds.",
    &["cpu"],
    Counter,
);
const CFS_PERIODS: Family = family(
    "container_cpu_cfs_periods_total",
    "Number of elapsed enforcement period intervals.",
    &[],
    Counter,
);
const CFS_THROTTLED_PERIODS: Family = family(
    "container_cpu_cfs_throttled_periods_total",
    "Number of throttled period intervals.",
    &[],
    Counter,
);
const CFS_THROTTLED_SECONDS: Family = family(
    "container_cpu_cfs_throttled_seconds_total",
    "Total time duration the container has been throttled.",
    &[],
    Counter,
);
const MEMORY_CACHE: Family = family(
    "container_memory_cache",
    "Number of bytes of page cache memory.",
    &[],
    Gauge,
);
const MEMORY_RSS: Family = family("container_memory_rss", "Size of RSS in bytes.", &[], Gauge);
const MEMORY_KERNEL: Family = family(
    "container_memory_kernel_usage",
    "Size of kernel memory allocated in bytes.",
    &[],
    Gauge,
);
const MEMORY_MAPPED_FILE: Family = family(
    "container_memory_mapped_file",
    "Size of memory mapped files in bytes.",
    &[],
    Gauge,
);
const MEMORY_SWAP: Family = family(
    "container_memory_swap",
    "Container swap usage in bytes.",
    &[],
    Gauge,
);
const MEMORY_FAILCNT: Family = family(
    "container_memory_failcnt",
    "Number of memory usage hits limits.",
    &[],
    Counter,
);
const MEMORY_USAGE: Family = family(
    "container_memory_usage_bytes",
    "Current memory usage in bytes, including all memory regardless of when it was accessed.",
    &[],
    Gauge,
);
const MEMORY_MAX_USAGE: Family = family(
    "container_memory_max_usage_bytes",
    "Maximum memory usage recorded in bytes.",
    &[],
    Gauge,
);
const MEMORY_WORKING_SET: Family = family(
    "container_memory_working_set_bytes",
    "Current working set in bytes.",
    &[],
    Gauge,
);
const MEMORY_FAILURES: Family = family(
    "container_memory_failures_total",
    "Cumulative count of memory allocation failures.",
    &["failure_type", "scope"],
    Counter,
);
const OOM_EVENTS: Family = family(
    "container_oom_events_total",
    "Count of out of memory events observed for the container.",
    &[],
    Counter,
);
const HUGETLB_USAGE: Family = family(
    "container_hugetlb_usage_bytes",
    "Current hugepage usage.",
    &["pagesize"],
    Gauge,
);
const HUGETLB_MAX_USAGE: Family = family(
    "container_hugetlb_max_usage_bytes",
    "Maximum hugepage usages recorded.",
    &["pagesize"],
    Gauge,
);
const FS_INODES_FREE: Family = family(
    "container_fs_inodes_free",
    "Number of available inodes.",
    &[],
    Gauge,
);
const FS_INODES_TOTAL: Family =
    family("container_fs_inodes_total", "Number of inodes.", &[], Gauge);
const FS_LIMIT: Family = family(
    "container_fs_limit_bytes",
    "Number of bytes that can be consumed by the container on this filesystem.",
    &[],
    Gauge,
);
const FS_USAGE: Family = family(
    "container_fs_usage_bytes",
    "Number of bytes that are consumed by the container on this filesystem.",
    &[],
    Gauge,
);
const FS_READS_BYTES: Family = family(
    "container_fs_reads_bytes_total",
    "Cumulative count of bytes read.",
    &["device"],
    Counter,
);
const FS_READS: Family = family(
    "container_fs_reads_total",
    "Cumulative count of reads completed.",
    &["device"],
    Counter,
);
const FS_WRITES_BYTES: Family = family(
    "container_fs_writes_bytes_total",
    "Cumulative count of bytes written.",
    &["device"],
    Counter,
);
const FS_WRITES: Family = family(
    "container_fs_writes_total",
    "Cumulative count of writes completed.",
    &["device"],
    Counter,
);
const BLKIO_DEVICE_USAGE: Family = family(
    "container_blkio_device_usage_total",
    "Blkio device bytes usage.",
    &["device", "major", "minor", "operation"],
    Counter,
);
const NET_RX_BYTES: Family = family(
    "container_network_receive_bytes_total",
    "Cumulative count of bytes received.",
    &["interface"],
    Counter,
);
const NET_RX_PACKETS: Family = family(
    "container_network_receive_packets_total",
    "Cumulative count of packets received.",
    &["interface"],
    Counter,
);
const NET_RX_DROPPED: Family = family(
    "container_network_receive_packets_dropped_total",
    "Cumulative count of packets dropped while receiving.",
    &["interface"],
    Counter,
);
const NET_RX_ERRORS: Family = family(
    "container_network_receive_errors_total",
    "Cumulative count of errors encountered while receiving.",
    &["interface"],
    Counter,
);
const NET_TX_BYTES: Family = family(
    "container_network_transmit_bytes_total",
    "Cumulative count of bytes transmitted.",
    &["interface"],
    Counter,
);
const NET_TX_PACKETS: Family = family(
    "container_network_transmit_packets_total",
    "Cumulative count of packets transmitted.",
    &["interface"],
    Counter,
);
const NET_TX_DROPPED: Family = family(
    "container_network_transmit_packets_dropped_total",
    "Cumulative count of packets dropped while transmitting.",
    &["interface"],
    Counter,
);
const NET_TX_ERRORS: Family = family(
    "container_network_transmit_errors_total",
    "Cumulative count of errors encountered while transmitting.",
    &["interface"],
    Counter,
);
const FILE_DESCRIPTORS: Family = family(
    "container_file_descriptors",
    "Number of open file descriptors for the container.",
    &[],
    Gauge,
);
const PROCESSES: Family = family(
    "container_processes",
    "Number of processes running inside the container.",
    &[],
    Gauge,
);
const SOCKETS: Family = family(
    "container_sockets",
    "Number of open sockets for the container.",
    &[],
    Gauge,
);
const THREADS: Family = family(
    "container_threads",
    "Number of threads running inside the container.",
    &[],
    Gauge,
);
const THREADS_MAX: Family = family(
    "container_threads_max",
    "Maximum number of threads allowed inside the container, infinity if value is zero.",
    &[],
    Gauge,
);
const ULIMITS_SOFT: Family = family(
    "container_ulimits_soft",
    "Soft ulimit values for the container root process.",
    &["ulimit"],
    Gauge,
);
const LAST_SEEN: Family = family(
    "container_last_seen",
    "Last time a container was seen by the exporter.",
    &[],
    Gauge,
);
const START_TIME: Family = family(
    "container_start_time_seconds",
    "Start time of the container since unix epoch in seconds.",
    &[],
    Gauge,
);
const SPEC_CPU_PERIOD: Family = family(
    "container_spec_cpu_period",
    "CPU period of the container.",
    &[],
    Gauge,
);
const SPEC_CPU_QUOTA: Family = family(
    "container_spec_cpu_quota",
    "CPU quota of the container.",
    &[],
    Gauge,
);
const SPEC_CPU_SHARES: Family = family(
    "container_spec_cpu_shares",
    "CPU share of the container.",
    &[],
    Gauge,
);
const SPEC_MEMORY_LIMIT: Family = family(
    "container_spec_memory_limit_bytes",
    "Memory limit for the container, 0 if unlimited.",
    &[],
    Gauge,
);
const SPEC_MEMORY_SWAP_LIMIT: Family = family(
    "container_spec_memory_swap_limit_bytes",
    "Memory swap limit for the container, 0 if unlimited.",
    &[],
    Gauge,
);
const SPEC_MEMORY_RESERVATION: Family = family(
    "container_spec_memory_reservation_limit_bytes",
    "Memory reservation limit for the container, 0 if none.",
    &[],
    Gauge,
);
const PRESSURE_CPU_WAITING: Family = family(
    "container_pressure_cpu_waiting_seconds_total",
    "Total time duration tasks in the container have waited due to CPU congestion.",
    &[],
    Counter,
);
const PRESSURE_CPU_STALLED: Family = family(
    "container_pressure_cpu_stalled_seconds_total",
    "Total time duration no tasks in the container could make progress due to CPU congestion.",
    &[],
    Counter,
);
const PRESSURE_MEMORY_WAITING: Family = family(
    "container_pressure_memory_waiting_seconds_total",
    "Total time duration tasks in the container have waited due to memory congestion.",
    &[],
    Counter,
);
const PRESSURE_MEMORY_STALLED: Family = family(
    "container_pressure_memory_stalled_seconds_total",
    "Total time duration no tasks in the container could make progress due to memory congestion.",
    &[],
    Counter,
);
const PRESSURE_IO_WAITING: Family = family(
    "container_pressure_io_waiting_seconds_total",
    "Total time duration tasks in the container have waited due to IO congestion.",
    &[],
    Counter,
);
const PRESSURE_IO_STALLED: Family = family(
    "container_pressure_io_stalled_seconds_total",
    "Total time duration no tasks in the container could make progress due to IO congestion.",
    &[],
    Counter,
);

/// Every family served, in descriptor order.
const FAMILIES: [&Family; 56] = [
    &CPU_USER,
    &CPU_SYSTEM,
    &CPU_USAGE,
    &CFS_PERIODS,
    &CFS_THROTTLED_PERIODS,
    &CFS_THROTTLED_SECONDS,
    &MEMORY_CACHE,
    &MEMORY_RSS,
    &MEMORY_KERNEL,
    &MEMORY_MAPPED_FILE,
    &MEMORY_SWAP,
    &MEMORY_FAILCNT,
    &MEMORY_USAGE,
    &MEMORY_MAX_USAGE,
    &MEMORY_WORKING_SET,
    &MEMORY_FAILURES,
    &OOM_EVENTS,
    &HUGETLB_USAGE,
    &HUGETLB_MAX_USAGE,
    &FS_INODES_FREE,
    &FS_INODES_TOTAL,
    &FS_LIMIT,
    &FS_USAGE,
    &FS_READS_BYTES,
    &FS_READS,
    &FS_WRITES_BYTES,
    &FS_WRITES,
    &BLKIO_DEVICE_USAGE,
    &NET_RX_BYTES,
    &NET_RX_PACKETS,
    &NET_RX_DROPPED,
    &NET_RX_ERRORS,
    &NET_TX_BYTES,
    &NET_TX_PACKETS,
    &NET_TX_DROPPED,
    &NET_TX_ERRORS,
    &FILE_DESCRIPTORS,
    &PROCESSES,
    &SOCKETS,
    &THREADS,
    &THREADS_MAX,
    &ULIMITS_SOFT,
    &LAST_SEEN,
    &START_TIME,
    &SPEC_CPU_PERIOD,
    &SPEC_CPU_QUOTA,
    &SPEC_CPU_SHARES,
    &SPEC_MEMORY_LIMIT,
    &SPEC_MEMORY_SWAP_LIMIT,
    &SPEC_MEMORY_RESERVATION,
    &PRESSURE_CPU_WAITING,
    &PRESSURE_CPU_STALLED,
    &PRESSURE_MEMORY_WAITING,
    &PRESSURE_MEMORY_STALLED,
    &PRESSURE_IO_WAITING,
    &PRESSURE_IO_STALLED,
];

/// ListMetricDescriptors' answer.
pub fn descriptors() -> Vec<cri::MetricDescriptor> {
    FAMILIES
        .iter()
        .map(|f| cri::MetricDescriptor {
            name: f.name.to_owned(),
            help: f.help.to_owned(),
            label_keys: BASE_LABELS
                .iter()
                .chain(f.labels)
                .map(|l| (*l).to_owned())
                .collect(),
        })
        .collect()
}

/// Collects metrics that share base label values and a timestamp.
struct Emitter {
    base: [String; 5],
    timestamp: i64,
    out: Vec<cri::Metric>,
}

impl Emitter {
    fn new(base: [String; 5], timestamp: i64) -> Self {
        Self {
            base,
            timestamp,
            out: Vec::new(),
        }
    }

    fn emit(&mut self, family: &Family, labels: &[&str], value: u64) {
        debug_assert_eq!(labels.len(), family.labels.len(), "{}", family.name);
        let mut label_values = self.base.to_vec();
        label_values.extend(labels.iter().map(|l| (*l).to_owned()));
        self.out.push(cri::Metric {
            name: family.name.to_owned(),
            timestamp: self.timestamp,
            metric_type: family.kind as i32,
            label_values,
            value: Some(cri::UInt64Value { value }),
        });
    }

    fn emit_some(&mut self, family: &Family, labels: &[&str], value: Option<u64>) {
        if let Some(value) = value {
            self.emit(family, labels, value);
        }
    }
}

/// The writable layer's filesystem: what the container uses of it and
/// what the filesystem holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Filesystem {
    pub usage_bytes: u64,
    pub limit_bytes: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
}

/// Everything read for one container, at one moment.
#[derive(Debug, Clone, Default)]
struct Sample {
    pub cpu: Option<Cpu>,
    pub memory: Option<Memory>,
    /// Devices with their names (`sda`, or `major:minor` when unnamed).
    pub io: Vec<(String, DeviceIo)>,
    pub hugetlb: Vec<Hugetlb>,
    pub pressure: Option<Pressure>,
    pub limits: Limits,
    pub processes: Processes,
    pub filesystem: Option<Filesystem>,
    /// Seconds since the epoch.
    pub started_at: u64,
    pub now: u64,
}

/// A container's metrics from `sample`.
fn container_metrics(base: [String; 5], timestamp: i64, sample: &Sample) -> Vec<cri::Metric> {
    let mut e = Emitter::new(base, timestamp);
    e.emit(&LAST_SEEN, &[], sample.now);
    e.emit(&START_TIME, &[], sample.started_at);

    if let Some(cpu) = &sample.cpu {
        e.emit_some(&CPU_USER, &[], cpu.user_ns.map(|ns| ns / NS_PER_S));
        e.emit_some(&CPU_SYSTEM, &[], cpu.system_ns.map(|ns| ns / NS_PER_S));
        e.emit(&CPU_USAGE, &["total"], cpu.usage_ns / NS_PER_S);
        e.emit_some(&CFS_PERIODS, &[], cpu.periods);
        e.emit_some(&CFS_THROTTLED_PERIODS, &[], cpu.throttled_periods);
        e.emit_some(
            &CFS_THROTTLED_SECONDS,
            &[],
            cpu.throttled_ns.map(|ns| ns / NS_PER_S),
        );
    }

    if let Some(m) = &sample.memory {
        e.emit_some(&MEMORY_CACHE, &[], m.cache);
        e.emit_some(&MEMORY_RSS, &[], m.rss);
        e.emit_some(&MEMORY_KERNEL, &[], m.kernel);
        e.emit_some(&MEMORY_MAPPED_FILE, &[], m.mapped_file);
        e.emit_some(&MEMORY_SWAP, &[], m.swap);
        e.emit_some(&MEMORY_FAILCNT, &[], m.failcnt);
        e.emit(&MEMORY_USAGE, &[], m.usage);
        e.emit_some(&MEMORY_MAX_USAGE, &[], m.max_usage);
        e.emit(&MEMORY_WORKING_SET, &[], m.working_set);
        for (kind, scope, value) in [
            ("pgfault", "container", m.pgfault),
            ("pgfault", "hierarchy", m.pgfault_hierarchy),
            ("pgmajfault", "container", m.pgmajfault),
            ("pgmajfault", "hierarchy", m.pgmajfault_hierarchy),
        ] {
            e.emit_some(&MEMORY_FAILURES, &[kind, scope], value);
        }
        e.emit_some(&OOM_EVENTS, &[], m.oom_kills);
    }

    for page in &sample.hugetlb {
        e.emit(&HUGETLB_USAGE, &[&page.pagesize], page.usage);
        e.emit_some(&HUGETLB_MAX_USAGE, &[&page.pagesize], page.max_usage);
    }

    if let Some(fs) = &sample.filesystem {
        e.emit(&FS_USAGE, &[], fs.usage_bytes);
        e.emit(&FS_LIMIT, &[], fs.limit_bytes);
        e.emit(&FS_INODES_TOTAL, &[], fs.inodes_total);
        e.emit(&FS_INODES_FREE, &[], fs.inodes_free);
    }

    for (device, io) in &sample.io {
        e.emit(&FS_READS_BYTES, &[device], io.read_bytes);
        e.emit(&FS_READS, &[device], io.reads);
        e.emit(&FS_WRITES_BYTES, &[device], io.write_bytes);
        e.emit(&FS_WRITES, &[device], io.writes);
        let (major, minor) = (io.major.to_string(), io.minor.to_string());
        for (operation, bytes) in [("Read", io.read_bytes), ("Write", io.write_bytes)] {
            e.emit(
                &BLKIO_DEVICE_USAGE,
                &[device, &major, &minor, operation],
                bytes,
            );
        }
    }

    let p = &sample.processes;
    e.emit(&PROCESSES, &[], p.count);
    e.emit(&THREADS, &[], p.threads);
    e.emit(&FILE_DESCRIPTORS, &[], p.fds);
    e.emit(&SOCKETS, &[], p.sockets);
    e.emit(&THREADS_MAX, &[], sample.limits.pids.unwrap_or(0));
    e.emit_some(&ULIMITS_SOFT, &["max_open_files"], p.open_files_soft);

    let limits = &sample.limits;
    e.emit_some(&SPEC_CPU_PERIOD, &[], limits.cpu_period);
    e.emit_some(&SPEC_CPU_QUOTA, &[], limits.cpu_quota);
    e.emit_some(&SPEC_CPU_SHARES, &[], limits.cpu_shares);
    e.emit(&SPEC_MEMORY_LIMIT, &[], limits.memory.unwrap_or(0));
    e.emit(
        &SPEC_MEMORY_SWAP_LIMIT,
        &[],
        limits.memory_swap.unwrap_or(0),
    );
    e.emit(
        &SPEC_MEMORY_RESERVATION,
        &[],
        limits.memory_reservation.unwrap_or(0),
    );

    if let Some(pressure) = &sample.pressure {
        for (totals, waiting, stalled) in [
            (pressure.cpu, &PRESSURE_CPU_WAITING, &PRESSURE_CPU_STALLED),
            (
                pressure.memory,
                &PRESSURE_MEMORY_WAITING,
                &PRESSURE_MEMORY_STALLED,
            ),
            (pressure.io, &PRESSURE_IO_WAITING, &PRESSURE_IO_STALLED),
        ] {
            if let Some((some, full)) = totals {
                e.emit(waiting, &[], some / US_PER_S);
                e.emit_some(stalled, &[], full.map(|us| us / US_PER_S));
            }
        }
    }
    e.out
}

/// A pod's network metrics, one set per link but loopback.
fn network_metrics(base: [String; 5], timestamp: i64, links: &[LinkCounters]) -> Vec<cri::Metric> {
    let mut e = Emitter::new(base, timestamp);
    for link in links.iter().filter(|l| l.name != "lo") {
        let name = [link.name.as_str()];
        e.emit(&NET_RX_BYTES, &name, link.rx_bytes);
        e.emit(&NET_RX_PACKETS, &name, link.rx_packets);
        e.emit(&NET_RX_DROPPED, &name, link.rx_dropped);
        e.emit(&NET_RX_ERRORS, &name, link.rx_errors);
        e.emit(&NET_TX_BYTES, &name, link.tx_bytes);
        e.emit(&NET_TX_PACKETS, &name, link.tx_packets);
        e.emit(&NET_TX_DROPPED, &name, link.tx_dropped);
        e.emit(&NET_TX_ERRORS, &name, link.tx_errors);
    }
    e.out
}

/// The counters of the links in the pod's network namespace; none with
/// host networking (those are the node's) or once the pod is stopped.
pub fn pod_links(sandbox: &SandboxRecord) -> Vec<LinkCounters> {
    let Some(netns) = sandbox.state.ns_path(NsKind::Net).filter(|_| sandbox.ready) else {
        return Vec::new();
    };
    // A netlink socket belongs to the namespace it is made in.
    let read = namespaces::within(&[(netns.as_path(), NsKind::Net)], || {
        Rtnl::open().and_then(|mut rtnl| rtnl.link_counters())
    });
    match read {
        Ok(Ok(links)) => links,
        Ok(Err(err)) => {
            tracing::warn!(sandbox = %sandbox.id, "link counters: {err}");
            Vec::new()
        }
        Err(err) => {
            tracing::warn!(sandbox = %sandbox.id, "link counters: {err}");
            Vec::new()
        }
    }
}

/// Reads a running container's sample.
fn sample(record: &ContainerRecord, now: u64) -> Sample {
    let mut sample = Sample {
        filesystem: filesystem(&record.layer_dir),
        started_at: u64::try_from(record.started_at).unwrap_or(0) / NS_PER_S,
        now,
        ..Default::default()
    };
    // Without its bundle's config the cgroup is unknown: no counters,
    // rather than the root cgroup's.
    let Some(path) = stats::cgroup_path(&record.bundle, &record.id) else {
        return sample;
    };
    let cgroup = Cgroup::new(Hierarchy::host(), &path);
    sample.io = cgroup
        .io()
        .into_iter()
        .map(|d| {
            let name = counters::device_name(d.major, d.minor)
                .unwrap_or_else(|| format!("{}:{}", d.major, d.minor));
            (name, d)
        })
        .collect();
    sample.cpu = cgroup.cpu();
    sample.memory = cgroup.memory();
    sample.hugetlb = cgroup.hugetlb();
    sample.pressure = cgroup.pressure();
    sample.limits = cgroup.limits();
    sample.processes = counters::processes(&cgroup.procs());
    sample
}

fn filesystem(layer_dir: &Path) -> Option<Filesystem> {
    let stat = nix::sys::statvfs::statvfs(layer_dir).ok()?;
    let (usage_bytes, _) = super::rootfs::usage(&layer_dir.join("upper"));
    let fragment = stat.fragment_size();
    Some(Filesystem {
        usage_bytes,
        limit_bytes: stat.blocks() * fragment,
        inodes_total: stat.files(),
        inodes_free: stat.files_free(),
    })
}

/// One pod's metrics: its network, and each running container's.
pub fn sandbox(record: &SandboxRecord, containers: &[ContainerRecord]) -> cri::PodSandboxMetrics {
    let now = chrono::Utc::now();
    let timestamp = now.timestamp_nanos_opt().unwrap_or_default();
    let seconds = u64::try_from(now.timestamp()).unwrap_or(0);
    let metadata = record.config.metadata.clone().unwrap_or_default();
    let base = |id: &str, image: &str, container: &str| {
        [
            id.to_owned(),
            image.to_owned(),
            metadata.namespace.clone(),
            metadata.name.clone(),
            container.to_owned(),
        ]
    };
    cri::PodSandboxMetrics {
        pod_sandbox_id: record.id.clone(),
        metrics: network_metrics(base(&record.id, "", "POD"), timestamp, &pod_links(record)),
        container_metrics: containers
            .iter()
            .filter(|c| c.phase == Phase::Running)
            .map(|c| {
                let name = c.config.metadata.as_ref().map(|m| m.name.as_str());
                cri::ContainerMetrics {
                    container_id: c.id.clone(),
                    metrics: container_metrics(
                        base(&c.id, &c.image, name.unwrap_or_default()),
                        timestamp,
                        &sample(c, seconds),
                    ),
                }
            })
            .collect(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    fn base() -> [String; 5] {
        ["c1", "busybox", "ns", "pod", "app"].map(String::from)
    }

    /// A sample with every counter present.
    fn full_sample() -> Sample {
        Sample {
            cpu: Some(Cpu {
                usage_ns: 2_500_000_000,
                user_ns: Some(2 * NS_PER_S),
                system_ns: Some(NS_PER_S / 2),
                periods: Some(10),
                throttled_periods: Some(3),
                throttled_ns: Some(NS_PER_S),
            }),
            memory: Some(Memory {
                usage: 4096,
                working_set: 2048,
                max_usage: Some(8192),
                failcnt: Some(0),
                cache: Some(1),
                rss: Some(2),
                mapped_file: Some(3),
                swap: Some(0),
                kernel: Some(4),
                pgfault: Some(5),
                pgmajfault: Some(0),
                pgfault_hierarchy: Some(5),
                pgmajfault_hierarchy: Some(0),
                oom_kills: Some(0),
            }),
            io: vec![(
                "vda".into(),
                DeviceIo {
                    major: 254,
                    minor: 0,
                    read_bytes: 4096,
                    write_bytes: 8192,
                    reads: 1,
                    writes: 2,
                },
            )],
            hugetlb: vec![Hugetlb {
                pagesize: "2MB".into(),
                usage: 0,
                max_usage: Some(0),
            }],
            pressure: Some(Pressure {
                cpu: Some((3_000_000, Some(1_000_000))),
                memory: Some((0, Some(0))),
                io: Some((0, Some(0))),
            }),
            limits: Limits {
                cpu_period: Some(100_000),
                cpu_quota: Some(20_000),
                cpu_shares: Some(1024),
                memory: Some(64 << 20),
                memory_swap: Some(64 << 20),
                memory_reservation: None,
                pids: Some(1024),
            },
            processes: Processes {
                count: 1,
                threads: 1,
                fds: 3,
                sockets: 0,
                open_files_soft: Some(1024),
            },
            filesystem: Some(Filesystem {
                usage_bytes: 8192,
                limit_bytes: 1 << 30,
                inodes_total: 1000,
                inodes_free: 900,
            }),
            started_at: 1_700_000_000,
            now: 1_700_000_100,
        }
    }

    fn links() -> Vec<LinkCounters> {
        ["lo", "eth0"]
            .map(|name| LinkCounters {
                name: name.into(),
                rx_bytes: 100,
                ..Default::default()
            })
            .to_vec()
    }

    #[test]
    fn every_family_is_served_with_its_labels() {
        let descriptors: HashMap<String, usize> = descriptors()
            .into_iter()
            .map(|d| {
                assert!(!d.help.is_empty(), "{} has no help", d.name);
                (d.name, d.label_keys.len())
            })
            .collect();
        assert_eq!(descriptors.len(), FAMILIES.len(), "family names are unique");

        let mut metrics = container_metrics(base(), 1, &full_sample());
        metrics.extend(network_metrics(base(), 1, &links()));
        let mut seen = HashSet::new();
        for metric in &metrics {
            let keys = descriptors[&metric.name];
            assert_eq!(metric.label_values.len(), keys, "{}", metric.name);
            seen.insert(metric.name.as_str());
        }
        let missing: Vec<&str> = FAMILIES
            .iter()
            .map(|f| f.name)
            .filter(|n| !seen.contains(n))
            .collect();
        assert!(missing.is_empty(), "not emitted: {missing:?}");
    }

    #[test]
    fn values_are_converted_to_the_family_units() {
        let metrics = container_metrics(base(), 7, &full_sample());
        let value = |name: &str, labels: &[&str]| {
            metrics
                .iter()
                .find(|m| m.name == name && m.label_values[5..] == *labels)
                .map(|m| m.value.unwrap().value)
        };
        assert_eq!(
            value("container_cpu_usage_seconds_total", &["total"]),
            Some(2)
        );
        assert_eq!(value("container_cpu_system_seconds_total", &[]), Some(0));
        assert_eq!(
            value("container_cpu_cfs_throttled_seconds_total", &[]),
            Some(1)
        );
        assert_eq!(
            value("container_pressure_cpu_waiting_seconds_total", &[]),
            Some(3)
        );
        assert_eq!(
            value("container_spec_memory_reservation_limit_bytes", &[]),
            Some(0)
        );
        assert_eq!(
            value(
                "container_blkio_device_usage_total",
                &["vda", "254", "0", "Write"]
            ),
            Some(8192)
        );
        assert_eq!(value("container_fs_writes_total", &["vda"]), Some(2));
        assert_eq!(
            value("container_memory_failures_total", &["pgfault", "container"]),
            Some(5)
        );
        let usage = metrics
            .iter()
            .find(|m| m.name == "container_cpu_usage_seconds_total")
            .unwrap();
        assert_eq!(usage.metric_type, Counter as i32);
        assert_eq!(usage.timestamp, 7);
        assert_eq!(usage.label_values[..5], base());
    }

    #[test]
    fn missing_counters_are_left_out_not_zeroed() {
        let sample = Sample {
            now: 5,
            ..Default::default()
        };
        let names: HashSet<String> = container_metrics(base(), 1, &sample)
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert!(names.contains("container_last_seen"));
        assert!(!names.contains("container_cpu_usage_seconds_total"));
        assert!(!names.contains("container_memory_usage_bytes"));
        assert!(!names.contains("container_spec_cpu_quota"));
    }

    #[test]
    fn loopback_is_not_reported() {
        let metrics = network_metrics(base(), 1, &links());
        assert_eq!(metrics.len(), 8);
        assert!(metrics.iter().all(|m| m.label_values[5] == "eth0"));
    }
}
