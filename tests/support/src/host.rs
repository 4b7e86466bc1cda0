//! Looking at the host around a privileged test, and cleaning it up: which
//! cgroup hierarchies are mounted and what a container left in them, which
//! mounts and processes still mention a test's paths, bounded polling, and
//! names no other test uses.
//!
//! Shared by bosun-runtime's `cli`, `semantics`, `podman` and `containerd`
//! tests. Inspection returns [`std::io::Result`] so a test can insist on an
//! answer; the cleanup helpers ([`unmount_under`], [`kill_group`]) keep going
//! past errors by design and only report them on stderr, since they run in
//! `Drop` where there is nobody left to return an error to.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// The kernel's table of our mount namespace.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";
/// How often [`poll`] asks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// One line of `/proc/<pid>/mountinfo` (see proc(5)), octal escapes undone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The directory of the mounted file system that forms this mount's root.
    pub root: PathBuf,
    /// Where it is mounted, relative to our root.
    pub mount_point: PathBuf,
    /// The file system type, e.g. `cgroup`, `cgroup2`, `tmpfs`.
    pub fs_type: String,
    /// The mount source (device, or whatever the mounter passed).
    pub source: String,
}

impl MountEntry {
    /// A cgroup v1 hierarchy (`cgroup`) or the v2 unified one (`cgroup2`).
    pub fn is_cgroup(&self) -> bool {
        self.is_cgroup_v1() || self.fs_type == "cgroup2"
    }

    /// A cgroup v1 hierarchy (`/sys/fs/cgroup/memory`, ...).
    pub fn is_cgroup_v1(&self) -> bool {
        self.fs_type == "cgroup"
    }
}

/// Parses one mountinfo line; `None` if it lacks the fields proc(5) names
/// (id, parent, major:minor, root, mount point, options, optional fields,
/// `-`, type, source, super options).
pub fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    // The optional fields (zero or more) end with a lone "-" after field 5.
    let sep = 6 + fields.get(6..)?.iter().position(|f| *f == "-")?;
    Some(MountEntry {
        root: PathBuf::from(unescape_mountinfo(fields[3])),
        mount_point: PathBuf::from(unescape_mountinfo(fields[4])),
        fs_type: (*fields.get(sep + 1)?).to_owned(),
        source: unescape_mountinfo(fields.get(sep + 2).copied().unwrap_or_default()),
    })
}

/// Every well-formed entry of a mountinfo text, in order.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\134` for `\`).
pub fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match escape {
            Some(digits) => {
                let code = digits.iter().fold(0u32, |n, d| n * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(code).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts of our mount namespace, from [`MOUNTINFO`].
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&fs::read_to_string(MOUNTINFO)?))
}

/// Mount points of every cgroup hierarchy, v1 (`cgroup`) and v2 (`cgroup2`).
pub fn cgroup_mounts() -> io::Result<Vec<PathBuf>> {
    mount_points_where(MountEntry::is_cgroup)
}

/// Mount points of the cgroup v1 hierarchies only.
pub fn cgroup_v1_mounts() -> io::Result<Vec<PathBuf>> {
    mount_points_where(MountEntry::is_cgroup_v1)
}

/// Mount points of our mounts that `keep` accepts.
fn mount_points_where(keep: fn(&MountEntry) -> bool) -> io::Result<Vec<PathBuf>> {
    Ok(mounts()?
        .into_iter()
        .filter(keep)
        .map(|m| m.mount_point)
        .collect())
}

/// The directories `<hierarchy>/<cgroup>` that exist, for each of
/// `hierarchies` (mount points from [`cgroup_mounts`] or
/// [`cgroup_v1_mounts`]). `cgroup` is relative, e.g. a container id.
pub fn existing_cgroup_dirs(hierarchies: &[PathBuf], cgroup: &str) -> Vec<PathBuf> {
    hierarchies
        .iter()
        .map(|mount| mount.join(cgroup))
        .filter(|dir| dir.exists())
        .collect()
}

/// Removes a cgroup directory and its child cgroups, children first. A
/// directory that is already gone counts as removed.
pub fn remove_cgroup_tree(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// [`remove_cgroup_tree`], retried for up to `timeout`: tasks that just
/// died can keep a cgroup busy for a moment. The error is the last attempt's.
pub fn remove_cgroup_tree_within(dir: &Path, timeout: Duration) -> io::Result<()> {
    let mut last = None;
    let removed = poll(timeout, || match remove_cgroup_tree(dir) {
        Ok(()) => Some(()),
        Err(e) => {
            last = Some(e);
            None
        }
    });
    match (removed, last) {
        (Some(()), _) => Ok(()),
        (None, Some(e)) => Err(e),
        (None, None) => Err(io::Error::from(io::ErrorKind::TimedOut)),
    }
}

/// Mount points at or below `dir`, deepest first (the order to unmount in).
pub fn mount_points_under(mounts: &[MountEntry], dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mounts
        .iter()
        .map(|m| m.mount_point.clone())
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points
}

/// Lazily unmounts (`MNT_DETACH`) everything mounted at or below `dir` in
/// our mount namespace, deepest first, so a test directory can be deleted
/// even after a runtime or client left mounts in it.
///
/// Cleanup only: it never fails, and reports what it could not do on stderr.
pub fn unmount_under(dir: &Path) {
    let mounts = match mounts() {
        Ok(mounts) => mounts,
        Err(e) => {
            eprintln!("cleanup: read {MOUNTINFO}: {e}");
            return;
        }
    };
    for point in mount_points_under(&mounts, dir) {
        if let Err(e) = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("cleanup: umount {}: {e}", point.display());
        }
    }
}

/// How many lines of a mountinfo text mention `needle` anywhere (root,
/// mount point, source, options), as written or with escapes undone.
///
/// Deliberately broader than "mounted under": a bind mount *from* a test's
/// directory counts as well.
pub fn count_mounts_mentioning(mountinfo: &str, needle: &str) -> usize {
    mountinfo
        .lines()
        .filter(|line| line.contains(needle) || unescape_mountinfo(line).contains(needle))
        .count()
}

/// [`count_mounts_mentioning`] for our mount namespace now.
pub fn mounts_mentioning(needle: &str) -> io::Result<usize> {
    Ok(count_mounts_mentioning(
        &fs::read_to_string(MOUNTINFO)?,
        needle,
    ))
}

/// The pids of processes whose command line (arguments joined by NULs)
/// contains `marker`, e.g. a bundle path. Processes that exit while we look
/// are skipped; only failing to list `/proc` is an error.
pub fn processes_with(marker: &str) -> io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(marker) {
                pids.push(pid);
            }
        }
    }
    Ok(pids)
}

/// Calls `probe` every [`POLL_INTERVAL`] until it returns `Some`, at most
/// `timeout` long (it is always called at least once); `None` on timeout.
pub fn poll<T>(timeout: Duration, probe: impl FnMut() -> Option<T>) -> Option<T> {
    poll_every(POLL_INTERVAL, timeout, probe)
}

/// [`poll`] with another interval between calls.
pub fn poll_every<T>(
    interval: Duration,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(interval);
    }
}

/// A name no other test of this process, nor (by the time of day in it) an
/// earlier run that reused our pid, has: `<prefix>-<pid>-<n><micros>`.
/// Short enough for unix socket paths and container names when `prefix` is.
pub fn unique_id(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_micros())
        .unwrap_or_default();
    format!("{prefix}-{}-{n}{micros:06}", std::process::id())
}

/// Waits for `child` until `deadline`; `Ok(None)` if it still runs then.
pub fn wait_deadline(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// SIGKILLs the process group `child` leads (it must have been spawned with
/// `process_group(0)`), then kills and reaps `child` itself.
///
/// Cleanup only: errors (the group is already gone) are ignored.
pub fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
30 22 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:15 - cgroup cgroup rw,cpu,cpuacct
36 30 0:32 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
90 22 0:50 / /tmp/my\\040dir/rootfs rw master:3 shared:40 - tmpfs tm\\040pfs rw
91 90 8:1 /tmp/src /tmp/my\\040dir/rootfs/data rw - ext4 /dev/sda1 rw
not a mountinfo line
";

    #[test]
    fn parses_fields_and_optional_fields() {
        let all = parse_mountinfo(SAMPLE);
        assert_eq!(all.len(), 7, "the malformed line is skipped: {all:?}");
        assert_eq!(
            all[4],
            MountEntry {
                root: PathBuf::from("/"),
                mount_point: PathBuf::from("/sys/fs/cgroup/pids"),
                fs_type: "cgroup".to_owned(),
                source: "cgroup".to_owned(),
            }
        );
        // Two optional fields before the separator, escapes undone.
        assert_eq!(all[5].mount_point, Path::new("/tmp/my dir/rootfs"));
        assert_eq!(all[5].fs_type, "tmpfs");
        assert_eq!(all[5].source, "tm pfs");
        assert_eq!(all[6].root, Path::new("/tmp/src"));
    }

    #[test]
    fn rejects_lines_without_separator_or_type() {
        assert_eq!(parse_mountinfo_line(""), None);
        assert_eq!(parse_mountinfo_line("1 2 3:4 / /x rw shared:1"), None);
        assert_eq!(parse_mountinfo_line("1 2 3:4 / /x rw -"), None);
        // A "-" in the root or mount point field is not the separator.
        assert_eq!(parse_mountinfo_line("1 2 3:4 - - rw"), None);
        let entry = parse_mountinfo_line("1 2 3:4 - - rw - proc").unwrap();
        assert_eq!(entry.mount_point, Path::new("-"));
        assert_eq!(entry.fs_type, "proc");
        assert_eq!(entry.source, "");
    }

    #[test]
    fn unescapes_octal_only() {
        assert_eq!(unescape_mountinfo(r"a\040b\011c\134d"), "a b\tc\\d");
        assert_eq!(unescape_mountinfo(r"no\escape\09"), r"no\escape\09");
        assert_eq!(unescape_mountinfo(r"trailing\04"), r"trailing\04");
    }

    #[test]
    fn tells_cgroup_versions_apart() {
        let all = parse_mountinfo(SAMPLE);
        let v1: Vec<_> = all.iter().filter(|m| m.is_cgroup_v1()).collect();
        let any: Vec<_> = all.iter().filter(|m| m.is_cgroup()).collect();
        assert_eq!(v1.len(), 2);
        assert_eq!(any.len(), 3);
        assert!(!all[1].is_cgroup(), "the tmpfs holding them is not one");
    }

    #[test]
    fn mount_points_under_are_deepest_first() {
        let all = parse_mountinfo(SAMPLE);
        assert_eq!(
            mount_points_under(&all, Path::new("/tmp/my dir")),
            [
                PathBuf::from("/tmp/my dir/rootfs/data"),
                PathBuf::from("/tmp/my dir/rootfs"),
            ]
        );
        // Whole components only.
        assert!(mount_points_under(&all, Path::new("/tmp/my")).is_empty());
        assert_eq!(
            mount_points_under(&all, Path::new("/sys/fs/cgroup")).len(),
            4
        );
    }

    #[test]
    fn counts_mounts_mentioning_anywhere() {
        assert_eq!(count_mounts_mentioning(SAMPLE, "/tmp/my dir"), 2);
        assert_eq!(count_mounts_mentioning(SAMPLE, r"/tmp/my\040dir"), 2);
        assert_eq!(count_mounts_mentioning(SAMPLE, "/tmp/src"), 1, "a root");
        assert_eq!(count_mounts_mentioning(SAMPLE, "/nowhere"), 0);
    }

    #[test]
    fn existing_cgroup_dirs_checks_each_hierarchy() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir_all(a.join("ctr")).unwrap();
        fs::create_dir_all(&b).unwrap();
        assert_eq!(
            existing_cgroup_dirs(&[a.clone(), b], "ctr"),
            [a.join("ctr")]
        );
    }

    #[test]
    fn removes_trees_children_first_and_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("top");
        fs::create_dir_all(top.join("x/y")).unwrap();
        fs::create_dir_all(top.join("z")).unwrap();
        remove_cgroup_tree(&top).unwrap();
        assert!(!top.exists());
        remove_cgroup_tree(&top).unwrap();
        remove_cgroup_tree_within(&top, Duration::ZERO).unwrap();
    }

    #[test]
    fn poll_stops_at_a_value_or_the_deadline() {
        let mut calls = 0;
        let found = poll(Duration::from_secs(5), || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(found, Some(3));
        let mut calls = 0;
        let start = Instant::now();
        let none: Option<()> = poll_every(Duration::from_millis(1), Duration::ZERO, || {
            calls += 1;
            None
        });
        assert_eq!((none, calls), (None, 1), "called once even with no time");
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn unique_ids_differ_and_keep_the_prefix() {
        let (a, b) = (unique_id("t"), unique_id("t"));
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("t-{}-", std::process::id())), "{a}");
    }

    #[test]
    fn finds_our_own_process_by_its_command_line() {
        let me = std::env::args().next().unwrap_or_default();
        let pids = processes_with(&me).unwrap();
        assert!(pids.contains(&std::process::id()), "{pids:?}");
    }
}
