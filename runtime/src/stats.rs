//! `events` output: libcgroups statistics in runc's `types.Event` JSON shape
//! (`{"type":"stats","id":..,"data":{..}}`), one object per line.

use std::collections::BTreeMap;

use libcgroups::stats::{BlkioDeviceStat, MemoryData, Stats};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Event<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: &'a str,
    pub data: Data,
}

#[derive(Debug, Serialize)]
pub struct Data {
    pub cpu: Cpu,
    pub memory: Memory,
    pub pids: Pids,
    pub blkio: Blkio,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub hugetlb: BTreeMap<String, Hugetlb>,
}

#[derive(Debug, Serialize)]
pub struct Cpu {
    pub usage: CpuUsage,
    pub throttling: Throttling,
}

#[derive(Debug, Serialize)]
pub struct CpuUsage {
    pub total: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub percpu: Vec<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub percpu_kernel: Vec<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub percpu_user: Vec<u64>,
    pub kernel: u64,
    pub user: u64,
}

#[derive(Debug, Serialize)]
pub struct Throttling {
    #[serde(skip_serializing_if = "is_zero")]
    pub periods: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub throttled_periods: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub throttled_time: u64,
}

#[derive(Debug, Serialize)]
pub struct Memory {
    #[serde(skip_serializing_if = "is_zero")]
    pub cache: u64,
    pub usage: MemEntry,
    pub swap: MemEntry,
    pub kernel: MemEntry,
    #[serde(rename = "kernelTCP")]
    pub kernel_tcp: MemEntry,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub raw: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct MemEntry {
    pub limit: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub usage: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub max: u64,
    pub failcnt: u64,
}

#[derive(Debug, Serialize)]
pub struct Pids {
    pub current: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub limit: u64,
}

#[derive(Debug, Serialize)]
pub struct Blkio {
    #[serde(
        rename = "ioServiceBytesRecursive",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_bytes: Vec<BlkioEntry>,
    #[serde(rename = "ioServicedRecursive", skip_serializing_if = "Vec::is_empty")]
    pub serviced: Vec<BlkioEntry>,
    #[serde(rename = "ioQueueRecursive", skip_serializing_if = "Vec::is_empty")]
    pub queued: Vec<BlkioEntry>,
    #[serde(
        rename = "ioServiceTimeRecursive",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_time: Vec<BlkioEntry>,
    #[serde(rename = "ioWaitTimeRecursive", skip_serializing_if = "Vec::is_empty")]
    pub wait_time: Vec<BlkioEntry>,
    #[serde(rename = "ioMergedRecursive", skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<BlkioEntry>,
    #[serde(rename = "ioTimeRecursive", skip_serializing_if = "Vec::is_empty")]
    pub time: Vec<BlkioEntry>,
    #[serde(rename = "sectorsRecursive", skip_serializing_if = "Vec::is_empty")]
    pub sectors: Vec<BlkioEntry>,
}

#[derive(Debug, Serialize)]
pub struct BlkioEntry {
    pub major: u64,
    pub minor: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub op: String,
    pub value: u64,
}

#[derive(Debug, Serialize)]
pub struct Hugetlb {
    #[serde(skip_serializing_if = "is_zero")]
    pub usage: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub max: u64,
    pub failcnt: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn mem(d: &MemoryData) -> MemEntry {
    MemEntry {
        limit: d.limit,
        usage: d.usage,
        max: d.max_usage,
        failcnt: d.fail_count,
    }
}

fn blkio(v: &[BlkioDeviceStat]) -> Vec<BlkioEntry> {
    v.iter()
        .map(|s| BlkioEntry {
            major: s.major,
            minor: s.minor,
            op: s.op_type.clone().unwrap_or_default(),
            value: s.value,
        })
        .collect()
}

impl Data {
    pub fn from_stats(s: &Stats) -> Self {
        let u = &s.cpu.usage;
        Data {
            cpu: Cpu {
                usage: CpuUsage {
                    total: u.usage_total,
                    percpu: u.per_core_usage_total.clone(),
                    percpu_kernel: u.per_core_usage_kernel.clone(),
                    percpu_user: u.per_core_usage_user.clone(),
                    kernel: u.usage_kernel,
                    user: u.usage_user,
                },
                throttling: Throttling {
                    periods: s.cpu.throttling.periods,
                    throttled_periods: s.cpu.throttling.throttled_periods,
                    throttled_time: s.cpu.throttling.throttled_time,
                },
            },
            memory: Memory {
                cache: s.memory.cache,
                usage: mem(&s.memory.memory),
                swap: mem(&s.memory.memswap),
                kernel: mem(&s.memory.kernel),
                kernel_tcp: mem(&s.memory.kernel_tcp),
                raw: s
                    .memory
                    .stats
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect(),
            },
            pids: Pids {
                current: s.pids.current,
                limit: s.pids.limit,
            },
            blkio: Blkio {
                service_bytes: blkio(&s.blkio.service_bytes),
                serviced: blkio(&s.blkio.serviced),
                queued: blkio(&s.blkio.queued),
                service_time: blkio(&s.blkio.service_time),
                wait_time: blkio(&s.blkio.wait_time),
                merged: blkio(&s.blkio.merged),
                time: blkio(&s.blkio.time),
                sectors: blkio(&s.blkio.sectors),
            },
            hugetlb: s
                .hugetlb
                .iter()
                .map(|(k, h)| {
                    (
                        k.clone(),
                        Hugetlb {
                            usage: h.usage,
                            max: h.max_usage,
                            failcnt: h.fail_count,
                        },
                    )
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_shape() {
        let mut s = Stats::default();
        s.cpu.usage.usage_total = 17;
        s.memory.memory.limit = 64 << 20;
        s.memory.memory.usage = 4096;
        s.pids.current = 2;
        s.pids.limit = 10;
        let e = Event {
            kind: "stats",
            id: "c1",
            data: Data::from_stats(&s),
        };
        let v = serde_json::to_value(&e).unwrap_or_default();
        assert_eq!(v["type"], "stats");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["data"]["cpu"]["usage"]["total"], 17);
        assert_eq!(v["data"]["memory"]["usage"]["limit"], 64 << 20);
        assert_eq!(v["data"]["pids"]["limit"], 10);
        assert!(v["data"].get("hugetlb").is_none());
    }
}
