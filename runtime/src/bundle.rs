//! Checks a bundle before anything is created, so that a bad config fails with
//! one line naming the problem and leaves no state dir, cgroup or process.
//! The checks that depend on this process (rlimits, oom_score_adj) are pure
//! functions over what [`Limits`] reports, so they are tested without root.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {}: no such directory", .0.display())]
    NoBundle(PathBuf),
    #[error("JSON specification file {} not found", .0.display())]
    NoConfig(PathBuf),
    #[error("{}: {source}", path.display())]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid OCI runtime config: {msg}", path.display())]
    Parse { path: PathBuf, msg: String },
    #[error("{}: {what} is missing", path.display())]
    Missing { path: PathBuf, what: &'static str },
    #[error("invalid rootfs: {}: no such directory", .0.display())]
    NoRootfs(PathBuf),
    #[error("namespace {kind} path {}: {reason}", path.display())]
    NamespacePath {
        kind: String,
        path: PathBuf,
        reason: String,
    },
    #[error("rlimit {kind}: soft limit {soft} exceeds hard limit {hard}")]
    RlimitOrder { kind: String, soft: u64, hard: u64 },
    #[error("rlimit {kind}: hard limit {want} is above this process's hard limit {have} and raising it needs CAP_SYS_RESOURCE")]
    RlimitAboveHard { kind: String, want: u64, have: u64 },
    #[error("oom_score_adj {want} is below this process's {have} and lowering it needs CAP_SYS_RESOURCE")]
    OomScoreAdj { want: i32, have: i32 },
    #[error("oom_score_adj {0} is out of range [-1000, 1000]")]
    OomScoreRange(i32),
}

/// What this process may set, as the kernel sees it.
pub trait Limits {
    /// Current (soft, hard) limit for an `RLIMIT_*` name, if the name is known.
    fn rlimit(&self, kind: &str) -> Option<(u64, u64)>;
    fn oom_score_adj(&self) -> i32;
    fn has_sys_resource(&self) -> bool;
}

/// The running process's limits, read from the kernel.
pub struct ProcessLimits;

fn resource(kind: &str) -> Option<nix::sys::resource::Resource> {
    use nix::sys::resource::Resource::*;
    Some(match kind {
        "RLIMIT_AS" => RLIMIT_AS,
        "RLIMIT_CORE" => RLIMIT_CORE,
        "RLIMIT_CPU" => RLIMIT_CPU,
        "RLIMIT_DATA" => RLIMIT_DATA,
        "RLIMIT_FSIZE" => RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => RLIMIT_NICE,
        "RLIMIT_NOFILE" => RLIMIT_NOFILE,
        "RLIMIT_NPROC" => RLIMIT_NPROC,
        "RLIMIT_RSS" => RLIMIT_RSS,
        "RLIMIT_RTPRIO" => RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => RLIMIT_STACK,
        _ => return None,
    })
}

impl Limits for ProcessLimits {
    fn rlimit(&self, kind: &str) -> Option<(u64, u64)> {
        nix::sys::resource::getrlimit(resource(kind)?).ok()
    }

    fn oom_score_adj(&self) -> i32 {
        std::fs::read_to_string("/proc/self/oom_score_adj")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn has_sys_resource(&self) -> bool {
        const CAP_SYS_RESOURCE: u32 = 24;
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
    }
}

/// Loads and checks `bundle/config.json`; returns the parsed spec.
pub fn validate(bundle: &Path, limits: &dyn Limits) -> Result<Spec, BundleError> {
    if !bundle.is_dir() {
        return Err(BundleError::NoBundle(bundle.to_path_buf()));
    }
    let path = bundle.join("config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BundleError::NoConfig(path))
        }
        Err(source) => return Err(BundleError::ReadConfig { path, source }),
    };
    let spec: Spec = serde_json::from_str(&text).map_err(|e| BundleError::Parse {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    check_spec(bundle, &path, &spec, limits)?;
    Ok(spec)
}

fn check_spec(
    bundle: &Path,
    path: &Path,
    spec: &Spec,
    limits: &dyn Limits,
) -> Result<(), BundleError> {
    let root = spec.root().as_ref().ok_or(BundleError::Missing {
        path: path.to_path_buf(),
        what: "root",
    })?;
    let rootfs = crate::state::rootfs_path(bundle, root.path());
    if !rootfs.is_dir() {
        return Err(BundleError::NoRootfs(rootfs));
    }
    let process = spec.process().as_ref().ok_or(BundleError::Missing {
        path: path.to_path_buf(),
        what: "process",
    })?;
    if process.args().as_ref().is_none_or(Vec::is_empty) {
        return Err(BundleError::Missing {
            path: path.to_path_buf(),
            what: "process.args",
        });
    }
    if let Some(rlimits) = process.rlimits() {
        for r in rlimits {
            let kind = serde_json::to_value(r.typ())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            check_rlimit(&kind, r.soft(), r.hard(), limits)?;
        }
    }
    if let Some(adj) = process.oom_score_adj() {
        check_oom_score_adj(adj, limits)?;
    }
    if let Some(namespaces) = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref()) {
        for ns in namespaces {
            if let Some(p) = ns.path() {
                check_namespace_path(ns.typ(), p)?;
            }
        }
    }
    Ok(())
}

pub fn check_rlimit(
    kind: &str,
    soft: u64,
    hard: u64,
    limits: &dyn Limits,
) -> Result<(), BundleError> {
    if soft > hard {
        return Err(BundleError::RlimitOrder {
            kind: kind.to_string(),
            soft,
            hard,
        });
    }
    if let Some((_, have)) = limits.rlimit(kind) {
        if hard > have && !limits.has_sys_resource() {
            return Err(BundleError::RlimitAboveHard {
                kind: kind.to_string(),
                want: hard,
                have,
            });
        }
    }
    Ok(())
}

pub fn check_oom_score_adj(want: i32, limits: &dyn Limits) -> Result<(), BundleError> {
    if !(-1000..=1000).contains(&want) {
        return Err(BundleError::OomScoreRange(want));
    }
    let have = limits.oom_score_adj();
    if want < have && !limits.has_sys_resource() {
        return Err(BundleError::OomScoreAdj { want, have });
    }
    Ok(())
}

fn check_namespace_path(kind: LinuxNamespaceType, path: &Path) -> Result<(), BundleError> {
    let err = |reason: String| BundleError::NamespacePath {
        kind: kind.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    let fs = nix::sys::statfs::statfs(path).map_err(|e| err(e.desc().to_lowercase()))?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC
        && fs.filesystem_type() != nix::sys::statfs::PROC_SUPER_MAGIC
    {
        return Err(err("not a namespace file".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        nofile: (u64, u64),
        oom: i32,
        cap: bool,
    }

    impl Limits for Fake {
        fn rlimit(&self, kind: &str) -> Option<(u64, u64)> {
            (kind == "RLIMIT_NOFILE").then_some(self.nofile)
        }
        fn oom_score_adj(&self) -> i32 {
            self.oom
        }
        fn has_sys_resource(&self) -> bool {
            self.cap
        }
    }

    const NOCAP: Fake = Fake {
        nofile: (1024, 524288),
        oom: 0,
        cap: false,
    };

    #[test]
    fn rlimit_above_hard_needs_cap() {
        assert!(check_rlimit("RLIMIT_NOFILE", 1024, 1024, &NOCAP).is_ok());
        let e = check_rlimit("RLIMIT_NOFILE", 1048576, 1048576, &NOCAP);
        assert_eq!(
            e.map_err(|e| e.to_string()).err().as_deref(),
            Some("rlimit RLIMIT_NOFILE: hard limit 1048576 is above this process's hard limit 524288 and raising it needs CAP_SYS_RESOURCE")
        );
        let with_cap = Fake { cap: true, ..NOCAP };
        assert!(check_rlimit("RLIMIT_NOFILE", 1048576, 1048576, &with_cap).is_ok());
        assert!(matches!(
            check_rlimit("RLIMIT_NOFILE", 10, 5, &NOCAP),
            Err(BundleError::RlimitOrder { .. })
        ));
    }

    #[test]
    fn negative_oom_score_adj_needs_cap() {
        assert!(check_oom_score_adj(500, &NOCAP).is_ok());
        assert!(matches!(
            check_oom_score_adj(-998, &NOCAP),
            Err(BundleError::OomScoreAdj {
                want: -998,
                have: 0
            })
        ));
        assert!(check_oom_score_adj(-998, &Fake { cap: true, ..NOCAP }).is_ok());
        assert!(check_oom_score_adj(2000, &NOCAP).is_err());
    }

    #[test]
    fn missing_bundle_and_config() {
        let dir = std::env::temp_dir().join(format!("bosun-bundle-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        assert!(matches!(
            validate(&dir.join("nope"), &NOCAP),
            Err(BundleError::NoBundle(_))
        ));
        assert!(matches!(
            validate(&dir, &NOCAP),
            Err(BundleError::NoConfig(_))
        ));
        let _ = std::fs::write(dir.join("config.json"), "{bad");
        let e = validate(&dir, &NOCAP)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("invalid OCI runtime config"), "{e}");
        let _ = std::fs::write(
            dir.join("config.json"),
            serde_json::to_string(&crate::spec::default_spec()).unwrap_or_default(),
        );
        assert!(matches!(
            validate(&dir, &NOCAP),
            Err(BundleError::NoRootfs(_))
        ));
        let _ = std::fs::create_dir_all(dir.join("rootfs"));
        assert!(validate(&dir, &NOCAP).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
