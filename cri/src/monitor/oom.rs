//! Counting OOM kills in a container's memory cgroup, so the monitor can
//! tell an OOM kill from any other SIGKILL: it reads the counter once the
//! container exists and again when it exits.
//!
//! The cgroup is found from `/proc/<pid>/cgroup` of the container process
//! rather than from `linux.cgroupsPath`: that resolves relative paths and
//! systemd slices exactly as the runtime did. cgroup v1 (also the hybrid
//! layout, where memory stays on v1) counts in `memory.oom_control`, v2 in
//! `memory.events`; both have an `oom_kill <n>` line (v1 since Linux 4.13).

use std::fs;
use std::path::{Path, PathBuf};

/// The file holding the `oom_kill` counter of `pid`'s memory cgroup, if
/// the process and a memory hierarchy can be found.
pub fn counter_file(pid: i32) -> Option<PathBuf> {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    counter_path(&cgroups, &mountinfo)
}

/// The current `oom_kill` count in `file`; `None` if it is gone (cgroup
/// removed) or has no such line.
pub fn read_kills(file: &Path) -> Option<u64> {
    let text = fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == "oom_kill").then(|| value.trim().parse().ok())?
    })
}

/// Pure part of [`counter_file`]: `proc_cgroup` is `/proc/<pid>/cgroup`,
/// `mountinfo` our `/proc/self/mountinfo`.
fn counter_path(proc_cgroup: &str, mountinfo: &str) -> Option<PathBuf> {
    let mut v2 = None;
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            let dir = mounted_dir(mountinfo, path, |fs_type, options| {
                fs_type == "cgroup" && options.split(',').any(|o| o == "memory")
            })?;
            return Some(dir.join("memory.oom_control"));
        }
        if controllers.is_empty() {
            v2 = Some(path);
        }
    }
    let dir = mounted_dir(mountinfo, v2?, |fs_type, _| fs_type == "cgroup2")?;
    Some(dir.join("memory.events"))
}

/// Where cgroup `path` of the first hierarchy `matches` accepts (by file
/// system type and super options) is visible in our mount namespace.
fn mounted_dir(
    mountinfo: &str,
    path: &str,
    matches: impl Fn(&str, &str) -> bool,
) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // id parent dev root mount-point options [optional...] - type source super-options
        let (left, right) = line.split_once(" - ")?;
        let mut left = left.split(' ');
        let root = left.nth(3)?;
        let mount_point = left.next()?;
        let mut right = right.split(' ');
        let (fs_type, options) = (right.next()?, right.nth(1).unwrap_or(""));
        if !matches(fs_type, options) {
            return None;
        }
        // A mount of a sub-cgroup (e.g. in a container) shows only what lies
        // below its root.
        let relative = Path::new(path).strip_prefix(root).ok()?;
        Some(Path::new(mount_point).join(relative))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw,nsdelegate
30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw shared:11 - cgroup cgroup rw,cpu,cpuacct
31 25 0:28 / /sys/fs/cgroup/memory rw shared:12 - cgroup cgroup rw,memory
";

    #[test]
    fn hybrid_uses_v1_memory() {
        let cgroups = "4:memory:/bosun/c1\n3:cpu,cpuacct:/bosun/c1\n0::/bosun/c1\n";
        assert_eq!(
            counter_path(cgroups, HYBRID_MOUNTS),
            Some(PathBuf::from(
                "/sys/fs/cgroup/memory/bosun/c1/memory.oom_control"
            ))
        );
    }

    #[test]
    fn unified_uses_memory_events() {
        let mounts = "26 1 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            counter_path("0::/kubepods.slice/c1.scope\n", mounts),
            Some(PathBuf::from(
                "/sys/fs/cgroup/kubepods.slice/c1.scope/memory.events"
            ))
        );
    }

    #[test]
    fn mount_root_is_stripped() {
        let mounts = "31 25 0:28 /bosun /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            counter_path("4:memory:/bosun/c1\n", mounts),
            Some(PathBuf::from("/sys/fs/cgroup/memory/c1/memory.oom_control"))
        );
        // A cgroup outside the mounted subtree is not visible.
        assert_eq!(counter_path("4:memory:/other\n", mounts), None);
    }

    #[test]
    fn no_memory_hierarchy_means_no_counter() {
        let mounts = "30 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(counter_path("3:cpu:/x\n", mounts), None);
    }

    #[test]
    fn reads_oom_kill_counter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v1 = dir.path().join("memory.oom_control");
        fs::write(&v1, "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n").expect("write");
        assert_eq!(read_kills(&v1), Some(2));
        let v2 = dir.path().join("memory.events");
        fs::write(
            &v2,
            "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .expect("write");
        assert_eq!(read_kills(&v2), Some(1));
        assert_eq!(read_kills(&dir.path().join("gone")), None);
    }
}
