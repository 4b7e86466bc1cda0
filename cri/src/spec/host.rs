//! Detecting the [`Host`] facts from /proc and /sys at server start.

use std::fs;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};

use super::Host;

const CAP_SYS_RESOURCE: u32 = 24;
/// Capabilities 0..=40 (up to CAP_CHECKPOINT_RESTORE), when CapBnd is
/// unreadable.
const FALLBACK_BOUNDING: u64 = (1 << 41) - 1;

impl Host {
    /// Reads this node's facts. Never fails: an unreadable fact falls back
    /// to the conservative value (no swap limit, our own oom_score_adj as the
    /// floor, cgroup v1).
    pub fn detect(systemd_cgroup: bool, seccomp_profile_root: PathBuf) -> Host {
        let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
        let cgroup_v2 =
            statfs("/sys/fs/cgroup").is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC);
        let swap_limit = if cgroup_v2 {
            own_cgroup_v2(&read("/proc/self/cgroup")).is_some_and(|cg| {
                Path::new("/sys/fs/cgroup")
                    .join(cg.trim_start_matches('/'))
                    .join("memory.swap.max")
                    .exists()
            })
        } else {
            Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
        };
        let status = read("/proc/self/status");
        Host {
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            cgroup_v2,
            systemd_cgroup,
            swap_limit,
            min_oom_score_adj: min_oom_score_adj(&status, &read("/proc/self/oom_score_adj")),
            bounding_caps: cap_mask(&status, "CapBnd:").unwrap_or(FALLBACK_BOUNDING),
            seccomp_profile_root,
        }
    }
}

/// -1000 with CAP_SYS_RESOURCE; otherwise the kernel refuses to go below
/// our own value, so that is the floor.
fn min_oom_score_adj(status: &str, own_adj: &str) -> i32 {
    let cap_eff = cap_mask(status, "CapEff:").unwrap_or(0);
    if cap_eff & (1 << CAP_SYS_RESOURCE) != 0 {
        -1000
    } else {
        own_adj.trim().parse().unwrap_or(1000)
    }
}

/// A capability mask line (`CapEff:`, `CapBnd:`) of /proc/self/status.
fn cap_mask(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The "0::/path" line of /proc/self/cgroup.
fn own_cgroup_v2(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_floor_depends_on_cap_sys_resource() {
        let with = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        let without = "Name:\tx\nCapEff:\t000001fffeffffff\n";
        assert_eq!(min_oom_score_adj(with, "0\n"), -1000);
        assert_eq!(min_oom_score_adj(without, "-500\n"), -500);
        assert_eq!(min_oom_score_adj(without, "0\n"), 0);
        // Unknown: assume the strictest floor rather than a failing spec.
        assert_eq!(min_oom_score_adj("", ""), 1000);
    }

    #[test]
    fn bounding_set_from_status() {
        let status = "CapEff:\t0000000000000000\nCapBnd:\t000001fffeffffff\n";
        assert_eq!(cap_mask(status, "CapBnd:"), Some(0x1ff_feff_ffff));
        assert_eq!(cap_mask("Name:\tx\n", "CapBnd:"), None);
    }

    #[test]
    fn own_cgroup_from_proc() {
        let text = "12:memory:/x\n0::/system.slice/bosun.service\n";
        assert_eq!(own_cgroup_v2(text), Some("/system.slice/bosun.service"));
        assert_eq!(own_cgroup_v2("3:cpu:/\n"), None);
    }

    #[test]
    fn detect_reads_this_machine() {
        let host = Host::detect(false, PathBuf::from("/var/lib/kubelet/seccomp"));
        // CAP_CHOWN..CAP_AUDIT_READ at least, on any kernel we run on.
        assert!(
            host.bounding_caps.count_ones() >= 30,
            "{:x}",
            host.bounding_caps
        );
        assert!((-1000..=1000).contains(&host.min_oom_score_adj));
    }
}
