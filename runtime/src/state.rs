//! The container state as runc prints it (`state`, `list --format json`), and the
//! `list` table. containerd's shim and podman parse these, so field names, order
//! and the zero pid of a stopped container follow runc exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

/// OCI spec version this runtime reports, as runc 1.1 does.
pub const OCI_VERSION: &str = "1.0.2-dev";

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ContainerState {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    pub pid: i32,
    pub status: String,
    pub bundle: String,
    pub rootfs: String,
    pub created: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<HashMap<String, String>>,
    pub owner: String,
}

/// What we know of one container, taken from libcontainer's state.
#[derive(Debug, Clone)]
pub struct Observed {
    pub id: String,
    pub pid: Option<i32>,
    pub status: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: Option<DateTime<Utc>>,
    pub annotations: Option<HashMap<String, String>>,
    pub owner: String,
}

impl ContainerState {
    pub fn from_observed(o: &Observed) -> Self {
        // runc reports pid 0 once the init process is gone.
        let pid = if o.status == "stopped" {
            0
        } else {
            o.pid.unwrap_or(0)
        };
        Self {
            oci_version: OCI_VERSION.to_string(),
            id: o.id.clone(),
            pid,
            status: o.status.clone(),
            bundle: o.bundle.display().to_string(),
            rootfs: o.rootfs.display().to_string(),
            created: o
                .created
                .map(|c| c.to_rfc3339_opts(SecondsFormat::Nanos, true))
                .unwrap_or_default(),
            annotations: o.annotations.clone().filter(|a| !a.is_empty()),
            owner: o.owner.clone(),
        }
    }
}

/// Resolves the spec's root path against the bundle, as runc does for `rootfs`.
pub fn rootfs_path(bundle: &Path, root: &Path) -> PathBuf {
    if root.is_absolute() {
        root.to_path_buf()
    } else {
        bundle.join(root)
    }
}

/// The `list` table: columns padded like Go's tabwriter (min width 12, padding 3).
pub fn list_table(states: &[ContainerState]) -> String {
    let header = ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"];
    let rows: Vec<[String; 6]> = states
        .iter()
        .map(|s| {
            [
                s.id.clone(),
                s.pid.to_string(),
                s.status.clone(),
                s.bundle.clone(),
                s.created.clone(),
                s.owner.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                let w = (widths[i] + 3).max(12);
                out.push_str(&format!("{c:<w$}"));
            }
        }
        out.push('\n');
    };
    line(&header);
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(status: &str) -> Observed {
        Observed {
            id: "t1".into(),
            pid: Some(4578),
            status: status.into(),
            bundle: "/tmp/rb".into(),
            rootfs: "/tmp/rb/rootfs".into(),
            created: DateTime::parse_from_rfc3339("2026-11-22T13:53:03.949252343Z")
                .ok()
                .map(|d| d.with_timezone(&Utc)),
            annotations: Some(HashMap::new()),
            owner: String::new(),
        }
    }

    #[test]
    fn state_json_matches_runc() {
        let s = ContainerState::from_observed(&observed("created"));
        let json = serde_json::to_string_pretty(&s).unwrap_or_default();
        let want = r#"{
  "ociVersion": "1.0.2-dev",
  "id": "t1",
  "pid": 4578,
  "status": "created",
  "bundle": "/tmp/rb",
  "rootfs": "/tmp/rb/rootfs",
  "created": "2026-11-22T13:53:03.949252343Z",
  "owner": ""
}"#;
        assert_eq!(json, want);
    }

    #[test]
    fn stopped_reports_pid_zero() {
        assert_eq!(ContainerState::from_observed(&observed("stopped")).pid, 0);
    }

    #[test]
    fn relative_and_absolute_rootfs() {
        assert_eq!(
            rootfs_path(Path::new("/b"), Path::new("rootfs")),
            PathBuf::from("/b/rootfs")
        );
        assert_eq!(
            rootfs_path(Path::new("/b"), Path::new("/r")),
            PathBuf::from("/r")
        );
    }

    #[test]
    fn table_like_runc() {
        let mut s = ContainerState::from_observed(&observed("created"));
        s.owner = "root".into();
        let t = list_table(&[s]);
        let want = "ID          PID         STATUS      BUNDLE      CREATED                          OWNER\n\
                    t1          4578        created     /tmp/rb     2026-11-22T13:53:03.949252343Z   root\n";
        assert_eq!(t, want);
        assert_eq!(
            list_table(&[]),
            "ID          PID         STATUS      BUNDLE      CREATED     OWNER\n"
        );
    }
}
