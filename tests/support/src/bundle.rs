//! OCI runtime bundles (rootfs + config.json) for runtime and CRI tests.
//!
//! The config starts as what `runc spec` (runc 1.1) writes, so a test that
//! passes with our runtime can be rerun with runc unchanged.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::{rootfs, Error};

/// A bundle directory and its config, kept in memory until [`Bundle::write`].
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    /// The config.json contents; tests may edit it freely.
    pub config: Value,
}

impl Bundle {
    /// Creates `dir/rootfs` with busybox and a default config running `args`.
    /// Does not write config.json: tweak `config`, then call [`Bundle::write`].
    pub fn busybox(dir: &Path, args: &[&str]) -> Result<Bundle, Error> {
        rootfs::busybox(&dir.join("rootfs"))?;
        Ok(Bundle {
            dir: dir.to_owned(),
            config: spec(args),
        })
    }

    /// The bundle directory, as passed to `runtime create --bundle`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The root filesystem directory inside the bundle.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Writes `dir/config.json` (pretty-printed, so failures are readable).
    pub fn write(&self) -> Result<(), Error> {
        let path = self.dir.join("config.json");
        let mut text = serde_json::to_vec_pretty(&self.config).map_err(|source| Error::Json {
            action: "encode",
            path: path.clone(),
            source,
        })?;
        text.push(b'\n');
        fs::write(&path, text).map_err(Error::io("write", &path))
    }

    /// Sets `process.args`.
    pub fn set_args(&mut self, args: &[&str]) -> &mut Self {
        self.config["process"]["args"] = json!(args);
        self
    }

    /// Sets `process.terminal`.
    pub fn set_terminal(&mut self, terminal: bool) -> &mut Self {
        self.config["process"]["terminal"] = json!(terminal);
        self
    }

    /// Sets `key=value` in `process.env`, replacing an existing `key`.
    pub fn set_env_var(&mut self, key: &str, value: &str) -> &mut Self {
        let entry = format!("{key}={value}");
        let prefix = format!("{key}=");
        edit_array(&mut self.config["process"]["env"], |env| {
            match env
                .iter_mut()
                .find(|e| e.as_str().is_some_and(|s| s.starts_with(&prefix)))
            {
                Some(existing) => *existing = json!(entry),
                None => env.push(json!(entry)),
            }
        });
        self
    }

    /// Sets `root.readonly`.
    pub fn set_readonly_rootfs(&mut self, readonly: bool) -> &mut Self {
        self.config["root"]["readonly"] = json!(readonly);
        self
    }

    /// Sets `linux.cgroupsPath` (a path, or `slice:prefix:name` for systemd).
    pub fn set_cgroups_path(&mut self, path: &str) -> &mut Self {
        self.config["linux"]["cgroupsPath"] = json!(path);
        self
    }

    /// Sets `linux.resources.memory.limit` in bytes.
    pub fn set_memory_limit(&mut self, bytes: i64) -> &mut Self {
        self.config["linux"]["resources"]["memory"]["limit"] = json!(bytes);
        self
    }

    /// Sets `linux.resources.pids.limit`.
    pub fn set_pids_limit(&mut self, limit: i64) -> &mut Self {
        self.config["linux"]["resources"]["pids"]["limit"] = json!(limit);
        self
    }

    /// Joins an existing namespace: sets `path` on the namespace of type
    /// `kind` ("network", "ipc", ...), adding the entry if it is missing.
    pub fn add_namespace_path(&mut self, kind: &str, path: &str) -> &mut Self {
        edit_array(
            &mut self.config["linux"]["namespaces"],
            |namespaces| match namespaces.iter_mut().find(|ns| ns["type"] == kind) {
                Some(ns) => ns["path"] = json!(path),
                None => namespaces.push(json!({ "type": kind, "path": path })),
            },
        );
        self
    }

    /// Drops the namespace of type `kind`, so the container shares the host's.
    pub fn remove_namespace(&mut self, kind: &str) -> &mut Self {
        edit_array(&mut self.config["linux"]["namespaces"], |namespaces| {
            namespaces.retain(|ns| ns["type"] != kind);
        });
        self
    }
}

/// Edits the array at `slot`, replacing anything there that is not an array.
fn edit_array(slot: &mut Value, edit: impl FnOnce(&mut Vec<Value>)) {
    let mut items = match slot.take() {
        Value::Array(items) => items,
        _ => Vec::new(),
    };
    edit(&mut items);
    *slot = Value::Array(items);
}

/// The config `runc spec` writes (runc 1.1.5, spec 1.0.2-dev), with hostname
/// "bosun", terminal off (tests have no tty) and `process.args = args`.
pub fn spec(args: &[&str]) -> Value {
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "TERM=xterm"
            ],
            "cwd": "/",
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
                "ambient": caps
            },
            "rlimits": [
                { "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }
            ],
            "noNewPrivileges": true
        },
        "root": { "path": "rootfs", "readonly": true },
        "hostname": "bosun",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            {
                "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]
            },
            {
                "destination": "/dev/pts", "type": "devpts", "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]
            },
            {
                "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
            },
            {
                "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"]
            },
            {
                "destination": "/sys", "type": "sysfs", "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"]
            },
            {
                "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]
            }
        ],
        "linux": {
            "resources": {
                "devices": [ { "allow": false, "access": "rwm" } ]
            },
            "namespaces": [
                { "type": "pid" },
                { "type": "network" },
                { "type": "ipc" },
                { "type": "uts" },
                { "type": "mount" }
            ],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/sys/firmware",
                "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger"
            ]
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn spec_has_runc_shape() {
        let c = spec(&["sleep", "1"]);
        assert_eq!(c["ociVersion"], "1.0.2-dev");
        assert_eq!(c["process"]["args"], json!(["sleep", "1"]));
        assert_eq!(c["process"]["terminal"], false);
        assert_eq!(c["process"]["user"], json!({ "uid": 0, "gid": 0 }));
        assert_eq!(c["process"]["cwd"], "/");
        assert_eq!(c["process"]["noNewPrivileges"], true);
        assert_eq!(c["process"]["rlimits"][0]["type"], "RLIMIT_NOFILE");
        for set in ["bounding", "effective", "permitted", "ambient"] {
            assert_eq!(
                c["process"]["capabilities"][set].as_array().unwrap().len(),
                3
            );
        }
        assert_eq!(c["root"], json!({ "path": "rootfs", "readonly": true }));
        assert_eq!(c["hostname"], "bosun");
        let mounts: Vec<&str> = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            mounts,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup"
            ]
        );
        let namespaces: Vec<&str> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(namespaces, ["pid", "network", "ipc", "uts", "mount"]);
        assert_eq!(c["linux"]["maskedPaths"].as_array().unwrap().len(), 10);
        assert_eq!(c["linux"]["readonlyPaths"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn builders_edit_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Bundle::busybox(dir.path(), &["sh"]).unwrap();
        b.set_args(&["echo", "hi"])
            .set_terminal(true)
            .set_env_var("TERM", "dumb")
            .set_env_var("FOO", "bar")
            .set_readonly_rootfs(false)
            .set_cgroups_path("/bosun/test")
            .set_memory_limit(64 << 20)
            .set_pids_limit(10)
            .add_namespace_path("network", "/var/run/netns/x")
            .add_namespace_path("cgroup", "/proc/1/ns/cgroup")
            .remove_namespace("uts");
        let c = &b.config;
        assert_eq!(c["process"]["args"], json!(["echo", "hi"]));
        assert_eq!(c["process"]["terminal"], true);
        assert_eq!(
            c["process"]["env"],
            json!([
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "TERM=dumb",
                "FOO=bar"
            ])
        );
        assert_eq!(c["root"]["readonly"], false);
        assert_eq!(c["linux"]["cgroupsPath"], "/bosun/test");
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(c["linux"]["resources"]["pids"]["limit"], 10);
        assert_eq!(
            c["linux"]["namespaces"],
            json!([
                { "type": "pid" },
                { "type": "network", "path": "/var/run/netns/x" },
                { "type": "ipc" },
                { "type": "mount" },
                { "type": "cgroup", "path": "/proc/1/ns/cgroup" }
            ])
        );
        // The devices rule from runc spec survives adding other resources.
        assert_eq!(c["linux"]["resources"]["devices"][0]["allow"], false);
    }

    #[test]
    fn write_produces_bundle_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let b = Bundle::busybox(dir.path(), &["true"]).unwrap();
        assert!(
            !dir.path().join("config.json").exists(),
            "write is explicit"
        );
        b.write().unwrap();
        let text = fs::read_to_string(dir.path().join("config.json")).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, b.config);
        assert!(text.contains("\n  \"ociVersion\""), "pretty-printed");
        assert_eq!(b.dir(), dir.path());
        assert!(b.rootfs().join("bin/sh").exists());
    }
}
