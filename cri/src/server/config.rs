//! The daemon's configuration: a TOML file (containerd-style, every key
//! optional) with command-line flags on top.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// What the parser said (names the key and line).
        message: String,
    },
    /// A value is out of range.
    #[error("config: {0}")]
    Invalid(String),
}

/// Longest state directory: a container's monitor socket under it must
/// stay within the 107 bytes of a unix socket path.
const MAX_STATE_LEN: usize = 28;

/// How the runtime is told about cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// Paths under the cgroup mounts (`/kubepods/pod<uid>/<id>`).
    #[default]
    Cgroupfs,
    /// `slice:prefix:name`, handed to systemd by the runtime.
    Systemd,
}

/// One OCI runtime a pod may select by its `runtime_handler`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeHandler {
    /// The runtime binary (a bare name is looked up beside the daemon,
    /// then in PATH).
    pub path: PathBuf,
    /// Its `--root` state directory.
    pub root: PathBuf,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Persistent data: sandbox and container records, container layers.
    pub root: PathBuf,
    /// Runtime state (tmpfs): sockets, bundles, monitor state, namespaces.
    pub state: PathBuf,
    /// The CRI socket.
    pub socket: PathBuf,
    /// The image store.
    pub image_root: PathBuf,
    /// Where CNI network configurations are read from.
    pub cni_conf_dir: PathBuf,
    /// Where CNI plugins are looked for, in order.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// The handler used when a pod names none.
    pub default_runtime: String,
    /// Runtime handlers by name; a `[runtimes.*]` table replaces the
    /// built-in `bosun-runc` entry.
    pub runtimes: BTreeMap<String, RuntimeHandler>,
    /// Cgroup driver the kubelet must be configured with too.
    pub cgroup_driver: CgroupDriver,
    /// Registry mirrors/endpoints (JSON, see the image service).
    pub registry_hosts: Option<PathBuf>,
    /// The per-container monitor binary; beside the daemon by default.
    pub monitor: Option<PathBuf>,
    /// Address of the streaming server (exec/attach/port-forward).
    pub stream_address: String,
    /// Directory of Localhost seccomp profiles.
    pub seccomp_profile_root: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        let mut runtimes = BTreeMap::new();
        runtimes.insert(
            "bosun-runc".to_owned(),
            RuntimeHandler {
                path: PathBuf::from("bosun-runc"),
                root: PathBuf::from("/run/bosun/runtime/bosun-runc"),
            },
        );
        Config {
            root: PathBuf::from("/var/lib/bosun/cri"),
            state: PathBuf::from("/run/bosun/cri"),
            socket: PathBuf::from("/run/bosun/cri.sock"),
            image_root: PathBuf::from("/var/lib/bosun/images"),
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            cni_bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            default_runtime: "bosun-runc".to_owned(),
            runtimes,
            cgroup_driver: CgroupDriver::Cgroupfs,
            registry_hosts: None,
            monitor: None,
            stream_address: "127.0.0.1:0".to_owned(),
            seccomp_profile_root: PathBuf::from("/var/lib/kubelet/seccomp"),
        }
    }
}

impl Config {
    /// Parses TOML text; `path` is only for messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Checks what the schema cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.runtimes.contains_key(&self.default_runtime) {
            return Err(ConfigError::Invalid(format!(
                "default_runtime {:?} is not one of [runtimes.*]: {:?}",
                self.default_runtime,
                self.runtimes.keys().collect::<Vec<_>>()
            )));
        }
        // `<state>/c/<64-hex id>/m/ctl.sock` must fit a unix socket path.
        if self.state.as_os_str().len() > MAX_STATE_LEN {
            return Err(ConfigError::Invalid(format!(
                "state {} is longer than {MAX_STATE_LEN} bytes (monitor sockets live under it)",
                self.state.display()
            )));
        }
        for (key, path) in [
            ("root", &self.root),
            ("state", &self.state),
            ("image_root", &self.image_root),
            ("socket", &self.socket),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "{key} {} must be an absolute path",
                    path.display()
                )));
            }
        }
        Ok(())
    }

    /// The handler for a pod's `runtime_handler` ("" = the default).
    pub fn handler(&self, name: &str) -> Option<(&str, &RuntimeHandler)> {
        let name = if name.is_empty() {
            self.default_runtime.as_str()
        } else {
            name
        };
        self.runtimes
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v))
    }
}

/// Resolves a binary: absolute as is; a bare name beside `beside` (the
/// daemon's own directory) if there, else in PATH.
pub fn find_binary(name: &Path, beside: Option<&Path>) -> PathBuf {
    if name.is_absolute() || name.components().count() > 1 {
        return name.to_owned();
    }
    if let Some(candidate) = beside.map(|dir| dir.join(name)).filter(|p| p.exists()) {
        return candidate;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| name.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        let config = Config::from_toml("", Path::new("c.toml")).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.handler("").unwrap().0, "bosun-runc");
        assert!(config.handler("nope").is_none());
    }

    #[test]
    fn runtimes_and_driver_are_read() {
        let text = r#"
            default_runtime = "runc"
            cgroup_driver = "systemd"
            cni_bin_dirs = ["/opt/cni/bin"]
            [runtimes.runc]
            path = "/usr/sbin/runc"
            root = "/run/bosun/runtime/runc"
        "#;
        let config = Config::from_toml(text, Path::new("c.toml")).unwrap();
        assert_eq!(config.cgroup_driver, CgroupDriver::Systemd);
        assert_eq!(
            config.handler("").unwrap().1.path,
            PathBuf::from("/usr/sbin/runc")
        );
        // A [runtimes] table replaces the built-in one.
        assert!(config.handler("bosun-runc").is_none());
    }

    #[test]
    fn mistakes_are_named() {
        let err = Config::from_toml("rooot = \"/x\"", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("rooot"), "{err}");
        let err = Config::from_toml("default_runtime = \"kata\"", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("kata"), "{err}");
        let err = Config::from_toml("root = \"relative\"", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
    }

    #[test]
    fn binaries_resolve_beside_then_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tool"), "").unwrap();
        assert_eq!(
            find_binary(Path::new("tool"), Some(dir.path())),
            dir.path().join("tool")
        );
        assert_eq!(
            find_binary(Path::new("/abs/x"), Some(dir.path())),
            PathBuf::from("/abs/x")
        );
        assert_eq!(
            find_binary(Path::new("sh"), None),
            PathBuf::from("/usr/bin/sh")
        );
    }
}
