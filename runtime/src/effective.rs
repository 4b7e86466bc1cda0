//! The "effective bundle": what runc would do with a config that libcontainer
//! reads differently. libcontainer takes its config only from
//! `<bundle>/config.json`, so when a config needs one of these adjustments we
//! hand it a copy under `<root>/.bundles/<id>/` (rootfs by absolute path) and
//! never touch the user's bundle:
//! - no `linux.cgroupsPath`: runc uses `/<id>` (cgroupfs) or
//!   `system.slice:runc:<id>` (systemd); libcontainer would use `:youki:<id>`.
//! - `linux.rootfsPropagation` "rshared"/"rslave"/"rprivate"/"runbindable":
//!   libcontainer rejects them; its plain forms are already recursive.
//!   containerd's CRI sets "rslave" for HostToContainer volumes.
//! - `process.noNewPrivileges: false`: libcontainer reads an explicit false
//!   as set and loads seccomp only after dropping capabilities, which then
//!   fails; absent means the same to runc and works.
//!
//! `state` and `list` report the user's bundle, recorded beside the copy.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

const DIR: &str = ".bundles";
const ORIGIN: &str = "origin";

/// Adjusts `spec` as described above; returns whether anything changed.
pub fn normalize(spec: &mut Spec, id: &str, systemd: bool) -> bool {
    let mut changed = false;
    if let Some(process) = spec.process_mut() {
        if process.no_new_privileges() == Some(false) {
            process.set_no_new_privileges(None);
            changed = true;
        }
    }
    let Some(linux) = spec.linux_mut() else {
        return changed;
    };
    if linux.cgroups_path().is_none() {
        let path = if systemd {
            format!("system.slice:bosun:{id}")
        } else {
            format!("/{id}")
        };
        linux.set_cgroups_path(Some(PathBuf::from(path)));
        changed = true;
    }
    let plain = match linux.rootfs_propagation().as_deref() {
        Some("rshared") => Some("shared"),
        Some("rslave") => Some("slave"),
        Some("rprivate") => Some("private"),
        // libcontainer maps "unbindable" to slave; keep the closest it has.
        Some("runbindable") => Some("unbindable"),
        _ => None,
    };
    if let Some(p) = plain {
        linux.set_rootfs_propagation(Some(p.to_string()));
        changed = true;
    }
    changed
}

pub fn dir(root: &Path, id: &str) -> PathBuf {
    root.join(DIR).join(id)
}

/// Writes the effective bundle for `spec` (whose rootfs is `rootfs`) and
/// returns its path.
pub fn write(
    root: &Path,
    id: &str,
    bundle: &Path,
    rootfs: &Path,
    spec: &mut Spec,
) -> std::io::Result<PathBuf> {
    let d = dir(root, id);
    std::fs::create_dir_all(&d)?;
    if let Some(r) = spec.root_mut() {
        r.set_path(rootfs.to_path_buf());
    }
    let text = serde_json::to_vec(spec).map_err(std::io::Error::other)?;
    std::fs::write(d.join("config.json"), text)?;
    std::fs::write(d.join(ORIGIN), bundle.as_os_str().as_encoded_bytes())?;
    Ok(d)
}

/// The user's bundle for a container libcontainer knows by `bundle`.
pub fn origin(bundle: &Path) -> Option<PathBuf> {
    if bundle.parent()?.file_name()? != DIR {
        return None;
    }
    std::fs::read_to_string(bundle.join(ORIGIN))
        .ok()
        .map(PathBuf::from)
}

pub fn remove(root: &Path, id: &str) {
    let _ = std::fs::remove_dir_all(dir(root, id));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(linux: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "linux": linux}))
            .unwrap_or_default()
    }

    #[test]
    fn default_cgroup_path_as_runc() {
        let mut s = spec(serde_json::json!({}));
        assert!(normalize(&mut s, "c1", false));
        let path = s.linux().as_ref().and_then(|l| l.cgroups_path().clone());
        assert_eq!(path, Some(PathBuf::from("/c1")));
        let mut s = spec(serde_json::json!({}));
        normalize(&mut s, "c1", true);
        let path = s.linux().as_ref().and_then(|l| l.cgroups_path().clone());
        assert_eq!(path, Some(PathBuf::from("system.slice:bosun:c1")));
    }

    #[test]
    fn explicit_no_new_privileges_false_dropped() {
        let mut s: Spec = serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2",
            "process": {"cwd": "/", "user": {"uid": 0, "gid": 0}, "noNewPrivileges": false},
            "linux": {"cgroupsPath": "/x"}}))
        .unwrap_or_default();
        assert!(normalize(&mut s, "c1", false));
        let nnp = s.process().as_ref().and_then(|p| p.no_new_privileges());
        assert_eq!(nnp, None);
        assert!(!normalize(&mut s, "c1", false));
    }

    #[test]
    fn recursive_propagation_made_plain() {
        let mut s = spec(serde_json::json!({"cgroupsPath": "/x", "rootfsPropagation": "rslave"}));
        assert!(normalize(&mut s, "c1", false));
        let p = s
            .linux()
            .as_ref()
            .and_then(|l| l.rootfs_propagation().clone());
        assert_eq!(p.as_deref(), Some("slave"));
    }

    #[test]
    fn usual_client_config_untouched() {
        let mut s =
            spec(serde_json::json!({"cgroupsPath": "/k8s/pod1/c1", "rootfsPropagation": "slave"}));
        assert!(!normalize(&mut s, "c1", false));
    }

    #[test]
    fn origin_recorded() {
        let root = std::env::temp_dir().join(format!("bosun-eff-{}", std::process::id()));
        let mut s = spec(serde_json::json!({}));
        let d = write(&root, "c1", Path::new("/b"), Path::new("/b/rootfs"), &mut s);
        let d = d.unwrap_or_default();
        assert_eq!(origin(&d), Some(PathBuf::from("/b")));
        assert_eq!(origin(Path::new("/b")), None);
        remove(&root, "c1");
        assert!(!d.exists());
        let _ = std::fs::remove_dir_all(&root);
    }
}
