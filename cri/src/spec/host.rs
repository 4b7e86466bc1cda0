//! Detecting the [`Host`] facts from /proc and /sys at server start.

use std::fs;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};

use super::Host;

const CAP_SYS_RESOURCE: u32 = 24;
/// Highest capability known when this was written (CAP_CHECKPOINT_RESTORE).
const FALLBACK_LAST_CAP: u32 = 40;

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
        Host {
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            cgroup_v2,
            systemd_cgroup,
            swap_limit,
            min_oom_score_adj: min_oom_score_adj(
                &read("/proc/self/status"),
                &read("/proc/self/oom_score_adj"),
            ),
            last_cap: read("/proc/sys/kernel/cap_last_cap")
                .trim()
                .parse()
                .unwrap_or(FALLBACK_LAST_CAP),
            seccomp_profile_root,
        }
    }
}

/// -1000 with CAP_SYS_RESOURCE; otherwise the kernel refuses to go below
/// our own value, so that is the floor.
fn min_oom_score_adj(status: &str, own_adj: &str) -> i32 {
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if cap_eff & (1 << CAP_SYS_RESOURCE) != 0 {
        -1000
    } else {
        own_adj.trim().parse().unwrap_or(1000)
    }
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
    fn own_cgroup_from_proc() {
        let text = "12:memory:/x\n0::/system.slice/bosun.service\n";
        assert_eq!(own_cgroup_v2(text), Some("/system.slice/bosun.service"));
        assert_eq!(own_cgroup_v2("3:cpu:/\n"), None);
    }

    #[test]
    fn detect_reads_this_machine() {
        let host = Host::detect(false, PathBuf::from("/var/lib/kubelet/seccomp"));
        assert!(host.last_cap >= 36, "{}", host.last_cap);
        assert!((-1000..=1000).contains(&host.min_oom_score_adj));
    }
}
