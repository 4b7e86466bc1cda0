//! Gate for tests that need root: skip quietly on a developer's machine,
//! fail loudly in CI, where a skipped privileged test would hide a bug.

/// Returns true if this process runs with euid 0.
///
/// Otherwise, when `CI` is set it panics (CI must run as root, so a missing
/// privilege is a broken setup); without `CI` it prints a skip line and
/// returns false so the test can return early.
pub fn require_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} needs root, and CI must run as root (CI is set, so not skipping)");
    }
    eprintln!("skipping {what}: needs root");
    false
}

/// Whether the effective uid is 0.
pub fn is_root() -> bool {
    // /proc/self/status avoids an FFI dependency for one number; if it is
    // unreadable we assume no privilege, which only ever skips.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_uid(&status))
        == Some(0)
}

/// The effective uid from the `Uid:` line (real, effective, saved, fs).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_effective_uid() {
        let status = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn agrees_with_proc_ownership() {
        use std::os::unix::fs::MetadataExt;
        // /proc/self belongs to the effective uid of the process.
        let owner = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        assert_eq!(is_root(), owner == Some(0));
    }
}
