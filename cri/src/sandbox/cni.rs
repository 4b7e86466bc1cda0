//! Pod network setup through CNI plugins, the way libcni (and so
//! containerd) does it: the lexically first config in the conf dir wins,
//! plugins of a list run in order on ADD with `prevResult` chaining and in
//! reverse on DEL, each gets the `runtimeConfig` entries for the
//! capabilities it declares, and every ADD result is cached on disk so a
//! DEL after a daemon restart still has it (and the config it was made
//! with, should the conf dir have changed since).
//!
//! Everything here blocks: the daemon calls it from a blocking task.

use std::fs;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bosun_cni::netconf::{AttachmentKey, Bandwidth, PortMapping};
use bosun_cni::result::CniResult;
use k8s_cri::v1::{PodSandboxConfig, Protocol};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::files::write_atomic;

/// The interface name every pod gets, as with containerd.
pub const DEFAULT_IFNAME: &str = "eth0";

/// Reason of the NetworkReady condition when the network is not usable,
/// as containerd and the kubelet spell it.
pub const NOT_READY_REASON: &str = "NetworkPluginNotReady";

/// A failed CNI operation, naming the file, plugin or verb.
#[derive(Debug, thiserror::Error)]
pub enum CniOpError {
    /// The conf dir could not be listed.
    #[error("read cni config dir {dir}: {source}")]
    ConfDir {
        /// The directory.
        dir: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The chosen config file is unreadable or invalid.
    #[error("cni config {path}: {reason}")]
    InvalidConf {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No config file in the conf dir.
    #[error("no network config found in {0}")]
    NoConfig(PathBuf),
    /// The plugin binary is in none of the bin dirs.
    #[error("failed to find plugin {plugin:?} in path {dirs:?}")]
    PluginNotFound {
        /// The plugin `type`.
        plugin: String,
        /// The bin dirs searched.
        dirs: Vec<PathBuf>,
    },
    /// The plugin could not be run or talked to.
    #[error("plugin {plugin} {verb}: {op}: {source}")]
    Exec {
        /// The plugin `type`.
        plugin: String,
        /// CNI_COMMAND.
        verb: &'static str,
        /// What failed (spawn, write stdin...).
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The plugin ran longer than allowed and was killed.
    #[error("plugin {plugin} {verb} timed out after {after:?}")]
    Timeout {
        /// The plugin `type`.
        plugin: String,
        /// CNI_COMMAND.
        verb: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The plugin reported an error.
    #[error("plugin {plugin} {verb} failed with code {code}: {msg}{}", details_suffix(.details))]
    Plugin {
        /// The plugin `type`.
        plugin: String,
        /// CNI_COMMAND.
        verb: &'static str,
        /// CNI error code.
        code: u64,
        /// Its message.
        msg: String,
        /// Its details (may be empty).
        details: String,
    },
    /// The plugin succeeded but printed something that is not a result.
    #[error("plugin {plugin} {verb}: bad result: {reason}")]
    BadResult {
        /// The plugin `type`.
        plugin: String,
        /// CNI_COMMAND.
        verb: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The result cache could not be read or written.
    #[error("cni result cache {path}: {reason}")]
    Cache {
        /// The cache file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// ADD failed and so did undoing the plugins that had run.
    #[error("{error}; cleaning up after it also failed: {cleanup}")]
    AddRolledBack {
        /// Why ADD failed.
        error: Box<CniOpError>,
        /// Why the DEL of the partial attachment failed.
        cleanup: Box<CniOpError>,
    },
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(" ({details})")
    }
}

/// A network config list; a single `.conf` becomes a list of one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkList {
    /// Spec version of the list.
    #[serde(default)]
    pub cni_version: String,
    /// Network name.
    #[serde(default)]
    pub name: String,
    /// Skip CHECK for this network.
    #[serde(default)]
    pub disable_check: bool,
    /// Skip GC for this network.
    #[serde(default, rename = "disableGC")]
    pub disable_gc: bool,
    /// The plugins' configs, in order; each has a string `type`.
    #[serde(default)]
    pub plugins: Vec<Value>,
}

impl NetworkList {
    /// Parses a config file's bytes; `list` is true for `.conflist`.
    pub fn parse(bytes: &[u8], list: bool) -> Result<Self, String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let parsed: Self = if list {
            serde_json::from_value(value).map_err(|e| e.to_string())?
        } else {
            let name = value["name"].as_str().unwrap_or_default().to_owned();
            let cni_version = value["cniVersion"].as_str().unwrap_or_default().to_owned();
            Self {
                cni_version,
                name,
                disable_check: false,
                disable_gc: false,
                plugins: vec![value],
            }
        };
        if parsed.name.is_empty() {
            return Err("network has no name".into());
        }
        if parsed.plugins.is_empty() {
            return Err("network list has no plugins".into());
        }
        if let Some(i) = parsed.plugins.iter().position(|p| plugin_type(p).is_none()) {
            return Err(format!("plugin {i} has no type"));
        }
        Ok(parsed)
    }
}

fn plugin_type(plugin: &Value) -> Option<&str> {
    plugin["type"].as_str().filter(|t| !t.is_empty())
}

/// The config file that wins in `dir`: the lexically first `*.conf`,
/// `*.conflist` or `*.json`. `Ok(None)` when there is none (or no dir).
pub fn config_file(dir: &Path) -> Result<Option<PathBuf>, CniOpError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CniOpError::ConfDir {
                dir: dir.to_owned(),
                source,
            })
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conf" | "conflist" | "json")
            ) && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// Loads the winning config of `dir`, if any.
pub fn load_network(dir: &Path) -> Result<Option<NetworkList>, CniOpError> {
    let Some(path) = config_file(dir)? else {
        return Ok(None);
    };
    let bytes = fs::read(&path).map_err(|e| CniOpError::InvalidConf {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let list = path.extension().is_some_and(|e| e == "conflist");
    NetworkList::parse(&bytes, list)
        .map(Some)
        .map_err(|reason| CniOpError::InvalidConf { path, reason })
}

/// One pod's attachment: what identifies it to the plugins, and the
/// capability arguments handed to them. Serialisable so a restarted daemon
/// can DEL it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodNetwork {
    /// CNI_CONTAINERID: the sandbox ID.
    pub sandbox_id: String,
    /// CNI_NETNS: the pinned network namespace.
    pub netns: PathBuf,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_ARGS as (key, value) pairs.
    pub args: Vec<(String, String)>,
    /// Capability arguments by capability name (`portMappings`, ...).
    pub capabilities: Map<String, Value>,
}

impl PodNetwork {
    /// The attachment of sandbox `id` in `netns` for a CRI pod config.
    pub fn for_pod(id: &str, netns: &Path, config: &PodSandboxConfig) -> Self {
        Self {
            sandbox_id: id.to_owned(),
            netns: netns.to_owned(),
            ifname: DEFAULT_IFNAME.to_owned(),
            args: cni_args(id, config),
            capabilities: capability_args(config),
        }
    }

    /// CNI_ARGS rendered `K=V;K=V`.
    pub fn args_string(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// CNI_ARGS as containerd sets them.
pub fn cni_args(id: &str, config: &PodSandboxConfig) -> Vec<(String, String)> {
    let meta = config.metadata.clone().unwrap_or_default();
    [
        ("IgnoreUnknown", "1".to_owned()),
        ("K8S_POD_NAMESPACE", meta.namespace),
        ("K8S_POD_NAME", meta.name),
        ("K8S_POD_INFRA_CONTAINER_ID", id.to_owned()),
        ("K8S_POD_UID", meta.uid),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The capability arguments containerd passes: `portMappings` (only those
/// with a host port), `bandwidth` (from the kubernetes.io/*-bandwidth
/// annotations), `dns` and `cgroupPath`.
pub fn capability_args(config: &PodSandboxConfig) -> Map<String, Value> {
    let mut caps = Map::new();
    let ports: Vec<PortMapping> = config
        .port_mappings
        .iter()
        .filter(|p| p.host_port > 0)
        .filter_map(|p| {
            Some(PortMapping {
                host_port: u16::try_from(p.host_port).ok()?,
                container_port: u16::try_from(p.container_port).ok()?,
                protocol: match Protocol::try_from(p.protocol) {
                    Ok(Protocol::Udp) => "udp",
                    Ok(Protocol::Sctp) => "sctp",
                    _ => "tcp",
                }
                .to_owned(),
                host_ip: Some(p.host_ip.clone()).filter(|ip| !ip.is_empty()),
            })
        })
        .collect();
    if !ports.is_empty() {
        caps.insert("portMappings".into(), json!(ports));
    }
    let rate = |key: &str| config.annotations.get(key).and_then(|q| parse_quantity(q));
    let (ingress, egress) = (
        rate("kubernetes.io/ingress-bandwidth"),
        rate("kubernetes.io/egress-bandwidth"),
    );
    if ingress.is_some() || egress.is_some() {
        // Bursts as containerd sets them: effectively unlimited.
        let burst = u64::from(u32::MAX);
        let bandwidth = Bandwidth {
            ingress_rate: ingress,
            ingress_burst: ingress.map(|_| burst),
            egress_rate: egress,
            egress_burst: egress.map(|_| burst),
        };
        caps.insert("bandwidth".into(), json!(bandwidth));
    }
    if let Some(dns) = &config.dns_config {
        caps.insert(
            "dns".into(),
            json!({"servers": dns.servers, "searches": dns.searches, "options": dns.options}),
        );
    }
    if let Some(parent) = config.linux.as_ref().map(|l| &l.cgroup_parent) {
        if !parent.is_empty() {
            caps.insert("cgroupPath".into(), json!(parent));
        }
    }
    caps
}

/// A Kubernetes quantity such as `10M`, `1Gi` or `500k` as a number.
fn parse_quantity(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(multiplier)
}

/// One plugin's stdin: its config with the list's name and version, the
/// previous result, and `runtimeConfig` for the capabilities it declares
/// (as libcni builds it).
pub fn plugin_config(
    list: &NetworkList,
    plugin: &Value,
    prev_result: Option<&Value>,
    capabilities: &Map<String, Value>,
) -> Value {
    let mut conf = plugin.clone();
    let Some(obj) = conf.as_object_mut() else {
        return conf;
    };
    obj.insert("name".into(), json!(list.name));
    obj.insert("cniVersion".into(), json!(list.cni_version));
    if let Some(prev) = prev_result {
        obj.insert("prevResult".into(), prev.clone());
    }
    let declared = plugin["capabilities"].as_object();
    let runtime: Map<String, Value> = capabilities
        .iter()
        .filter(|(name, _)| {
            declared
                .and_then(|d| d.get(name.as_str()))
                .and_then(Value::as_bool)
                == Some(true)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !runtime.is_empty() {
        obj.insert("runtimeConfig".into(), Value::Object(runtime));
    }
    conf
}

/// `a.b.c` as numbers, for version gates; unparsable parts count as 0.
fn version(text: &str) -> (u32, u32, u32) {
    let mut parts = text.split('.').map(|p| p.parse().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// The pod's IPs from a final ADD result: addresses on the container's
/// `ifname` (or on no interface in particular), IPv4 first, then IPv6.
pub fn pod_ips(result: &CniResult, ifname: &str) -> Vec<IpAddr> {
    let on_pod = |index: Option<usize>| match index.and_then(|i| result.interfaces.get(i)) {
        Some(iface) => iface.sandbox.is_some() && iface.name == ifname,
        None => true,
    };
    let mut ips: Vec<IpAddr> = result
        .ips
        .iter()
        .filter(|ip| on_pod(ip.interface))
        .map(|ip| ip.address.addr())
        .collect();
    ips.sort_by_key(|ip| ip.is_ipv6());
    ips
}

/// The NetworkReady condition for the CRI Status call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkStatus {
    /// Whether pods can get networks now.
    pub ready: bool,
    /// `NetworkPluginNotReady` when not ready, else empty.
    pub reason: String,
    /// Why not, else empty.
    pub message: String,
}

/// A cached ADD, in the spirit of libcni's `cniCacheV1` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheRecord {
    kind: String,
    container_id: String,
    if_name: String,
    network_name: String,
    netns: PathBuf,
    cni_args: Vec<(String, String)>,
    capability_args: Map<String, Value>,
    /// The list the attachment was made with; DEL uses it.
    config: NetworkList,
    result: Value,
}

const CACHE_KIND: &str = "cniCacheV1";

/// Node-wide CNI settings: where configs, plugins and the result cache are.
#[derive(Debug, Clone)]
pub struct Cni {
    /// Config dir, e.g. `/etc/cni/net.d`.
    pub conf_dir: PathBuf,
    /// Plugin dirs (CNI_PATH), e.g. `/opt/cni/bin`.
    pub bin_dirs: Vec<PathBuf>,
    /// Result cache dir, `<state>/cni`.
    pub cache_dir: PathBuf,
    /// Longest a plugin may run before it is killed.
    pub timeout: Duration,
    /// Network namespace the plugins run in; `None` is the daemon's own.
    /// Tests point it at a "node" namespace they made, so bridges and
    /// host-port rules never land in the real host's namespace.
    pub plugin_netns: Option<PathBuf>,
}

/// The outcome of a successful ADD.
#[derive(Debug, Clone)]
pub struct Added {
    /// Network name.
    pub network: String,
    /// The final result.
    pub result: CniResult,
}

impl Cni {
    /// Settings with a one-minute plugin timeout and no plugin netns.
    pub fn new(conf_dir: PathBuf, bin_dirs: Vec<PathBuf>, cache_dir: PathBuf) -> Self {
        Self {
            conf_dir,
            bin_dirs,
            cache_dir,
            timeout: Duration::from_secs(60),
            plugin_netns: None,
        }
    }

    /// The network config pods get now.
    pub fn network(&self) -> Result<NetworkList, CniOpError> {
        load_network(&self.conf_dir)?.ok_or_else(|| CniOpError::NoConfig(self.conf_dir.clone()))
    }

    /// `<cache>/<network>-<sandbox>-<ifname>.json`.
    pub fn cache_path(&self, network: &str, pod: &PodNetwork) -> PathBuf {
        self.cache_dir
            .join(format!("{network}-{}-{}.json", pod.sandbox_id, pod.ifname))
    }

    /// ADD of every plugin in order, chaining results; caches the final
    /// result. On failure the plugins that ran are DELeted again, so an
    /// error leaves nothing behind.
    pub fn add(&self, pod: &PodNetwork) -> Result<Added, CniOpError> {
        let list = self.network()?;
        let mut prev: Option<Value> = None;
        for (i, plugin) in list.plugins.iter().enumerate() {
            let stdin = plugin_config(&list, plugin, prev.as_ref(), &pod.capabilities);
            match self.exec(plugin, "ADD", Some(pod), &stdin) {
                Ok(out) => prev = Some(out),
                Err(error) => {
                    // A plugin that could not even be started changed nothing.
                    let ran = match error {
                        CniOpError::PluginNotFound { .. } | CniOpError::Exec { .. } => i,
                        _ => i + 1,
                    };
                    return Err(
                        match self.del_plugins(&list, &list.plugins[..ran], pod, None) {
                            Ok(()) => error,
                            Err(cleanup) => CniOpError::AddRolledBack {
                                error: Box::new(error),
                                cleanup: Box::new(cleanup),
                            },
                        },
                    );
                }
            }
        }
        let raw = prev.unwrap_or_else(|| json!({}));
        let bad = |reason: String| CniOpError::BadResult {
            plugin: list.name.clone(),
            verb: "ADD",
            reason,
        };
        let result = CniResult::from_json(&raw).map_err(|e| bad(e.to_string()))?;
        let record = CacheRecord {
            kind: CACHE_KIND.into(),
            container_id: pod.sandbox_id.clone(),
            if_name: pod.ifname.clone(),
            network_name: list.name.clone(),
            netns: pod.netns.clone(),
            cni_args: pod.args.clone(),
            capability_args: pod.capabilities.clone(),
            config: list.clone(),
            result: raw,
        };
        let path = self.cache_path(&list.name, pod);
        let cached = serde_json::to_vec_pretty(&record)
            .map_err(io::Error::other)
            .and_then(|bytes| write_atomic(&path, &bytes));
        if let Err(e) = cached {
            let error = CniOpError::Cache {
                path,
                reason: e.to_string(),
            };
            return Err(
                match self.del_plugins(&list, &list.plugins, pod, Some(&record.result)) {
                    Ok(()) => error,
                    Err(cleanup) => CniOpError::AddRolledBack {
                        error: Box::new(error),
                        cleanup: Box::new(cleanup),
                    },
                },
            );
        }
        Ok(Added {
            network: list.name,
            result,
        })
    }

    /// The cached ADD of `pod`, whatever network it was made in.
    fn cached(&self, pod: &PodNetwork) -> Result<Option<(PathBuf, CacheRecord)>, CniOpError> {
        let suffix = format!("-{}-{}.json", pod.sandbox_id, pod.ifname);
        let entries = match fs::read_dir(&self.cache_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(CniOpError::Cache {
                    path: self.cache_dir.clone(),
                    reason: e.to_string(),
                })
            }
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let matches = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&suffix));
            if !matches {
                continue;
            }
            let record: CacheRecord = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                .map_err(|reason| CniOpError::Cache {
                    path: path.clone(),
                    reason,
                })?;
            if record.container_id == pod.sandbox_id && record.if_name == pod.ifname {
                return Ok(Some((path, record)));
            }
        }
        Ok(None)
    }

    /// Whether an ADD result for `pod` is cached (a DEL is still owed).
    pub fn has_cached(&self, pod: &PodNetwork) -> Result<bool, CniOpError> {
        Ok(self.cached(pod)?.is_some())
    }

    /// DEL of every plugin in reverse order, with the cached result as
    /// `prevResult` and the cached config; without a cache, the current
    /// config (a DEL after an ADD that died before caching). Removes the
    /// cache once the plugins agree. No config at all: nothing to undo.
    pub fn del(&self, pod: &PodNetwork) -> Result<(), CniOpError> {
        let (list, prev, cache, pod) = match self.cached(pod)? {
            Some((path, record)) => {
                let cached_pod = PodNetwork {
                    sandbox_id: record.container_id.clone(),
                    netns: pod.netns.clone(),
                    ifname: record.if_name.clone(),
                    args: record.cni_args.clone(),
                    capabilities: record.capability_args.clone(),
                };
                (record.config, Some(record.result), Some(path), cached_pod)
            }
            None => match load_network(&self.conf_dir)? {
                Some(list) => (list, None, None, pod.clone()),
                None => {
                    tracing::warn!(sandbox = %pod.sandbox_id, "no cni config and no cached result: nothing to delete");
                    return Ok(());
                }
            },
        };
        self.del_plugins(&list, &list.plugins, &pod, prev.as_ref())?;
        if let Some(path) = cache {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(CniOpError::Cache {
                        path,
                        reason: e.to_string(),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn del_plugins(
        &self,
        list: &NetworkList,
        plugins: &[Value],
        pod: &PodNetwork,
        prev: Option<&Value>,
    ) -> Result<(), CniOpError> {
        // 0.3.x does not know prevResult on DEL.
        let prev = prev.filter(|_| version(&list.cni_version) >= (0, 4, 0));
        for plugin in plugins.iter().rev() {
            let stdin = plugin_config(list, plugin, prev, &pod.capabilities);
            self.exec(plugin, "DEL", Some(pod), &stdin)?;
        }
        Ok(())
    }

    /// CHECK of every plugin against the cached result.
    pub fn check(&self, pod: &PodNetwork) -> Result<(), CniOpError> {
        let Some((path, record)) = self.cached(pod)? else {
            return Err(CniOpError::Cache {
                path: self.cache_dir.clone(),
                reason: format!("no cached result for sandbox {}", pod.sandbox_id),
            });
        };
        let list = &record.config;
        if list.disable_check || version(&list.cni_version) < (0, 4, 0) {
            return Ok(());
        }
        tracing::debug!(cache = %path.display(), "cni check");
        for plugin in &list.plugins {
            let stdin = plugin_config(list, plugin, Some(&record.result), &pod.capabilities);
            self.exec(plugin, "CHECK", Some(pod), &stdin)?;
        }
        Ok(())
    }

    /// The NetworkReady condition: a config must exist, its plugins must be
    /// installed, and those speaking 1.1 must answer STATUS.
    pub fn status(&self) -> NetworkStatus {
        let not_ready = |message: String| NetworkStatus {
            ready: false,
            reason: NOT_READY_REASON.into(),
            message,
        };
        let list = match load_network(&self.conf_dir) {
            Ok(Some(list)) => list,
            Ok(None) => {
                return not_ready(format!(
                    "cni plugin not initialized: no network config found in {}",
                    self.conf_dir.display()
                ))
            }
            Err(e) => return not_ready(e.to_string()),
        };
        for plugin in &list.plugins {
            let outcome = if version(&list.cni_version) >= (1, 1, 0) {
                let stdin = plugin_config(&list, plugin, None, &Map::new());
                self.exec(plugin, "STATUS", None, &stdin).map(|_| ())
            } else {
                self.find_plugin(plugin).map(|_| ())
            };
            if let Err(e) = outcome {
                return not_ready(e.to_string());
            }
        }
        NetworkStatus {
            ready: true,
            reason: String::new(),
            message: String::new(),
        }
    }

    /// GC: every plugin (1.1 and later) forgets attachments not in `valid`,
    /// and cached results of this network not in `valid` are dropped.
    pub fn gc(&self, valid: &[AttachmentKey]) -> Result<(), CniOpError> {
        let list = self.network()?;
        if !list.disable_gc && version(&list.cni_version) >= (1, 1, 0) {
            for plugin in &list.plugins {
                let mut stdin = plugin_config(&list, plugin, None, &Map::new());
                stdin["cni.dev/valid-attachments"] = json!(valid);
                self.exec(plugin, "GC", None, &stdin)?;
            }
        }
        let Ok(entries) = fs::read_dir(&self.cache_dir) else {
            return Ok(());
        };
        for path in entries.filter_map(Result::ok).map(|e| e.path()) {
            let Ok(record) = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<CacheRecord>(&b).map_err(|e| e.to_string()))
            else {
                continue;
            };
            let key = AttachmentKey {
                container_id: record.container_id,
                ifname: record.if_name,
            };
            if record.network_name == list.name && !valid.contains(&key) {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(())
    }

    fn find_plugin(&self, plugin: &Value) -> Result<PathBuf, CniOpError> {
        let name = plugin_type(plugin).unwrap_or_default();
        self.bin_dirs
            .iter()
            .map(|dir| dir.join(name))
            .find(|path| {
                !name.contains('/')
                    && fs::metadata(path)
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .ok_or_else(|| CniOpError::PluginNotFound {
                plugin: name.to_owned(),
                dirs: self.bin_dirs.clone(),
            })
    }

    /// Runs one plugin verb; the parsed stdout on success (`Null` if empty).
    fn exec(
        &self,
        plugin: &Value,
        verb: &'static str,
        pod: Option<&PodNetwork>,
        stdin: &Value,
    ) -> Result<Value, CniOpError> {
        let path = self.find_plugin(plugin)?;
        let name = plugin_type(plugin).unwrap_or_default().to_owned();
        let exec_err = |op: &'static str, source: io::Error| CniOpError::Exec {
            plugin: name.clone(),
            verb,
            op,
            source,
        };
        let cni_path = std::env::join_paths(&self.bin_dirs)
            .map_err(|e| exec_err("join CNI_PATH", io::Error::other(e)))?;
        let mut command = Command::new(&path);
        command
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .env("CNI_COMMAND", verb)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(pod) = pod {
            command
                .env("CNI_CONTAINERID", &pod.sandbox_id)
                .env("CNI_NETNS", &pod.netns)
                .env("CNI_IFNAME", &pod.ifname)
                .env("CNI_ARGS", pod.args_string());
        }
        if let Some(netns) = &self.plugin_netns {
            let file = fs::File::open(netns).map_err(|e| exec_err("open plugin netns", e))?;
            // SAFETY: setns is async-signal-safe; the hook calls nothing else.
            unsafe {
                command.pre_exec(move || {
                    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(io::Error::from)
                });
            }
        }
        let input = serde_json::to_vec(stdin).map_err(|e| exec_err("encode config", e.into()))?;
        let (status, stdout, stderr) = self.run(command, &input, &name, verb, exec_err)?;
        let parsed: Option<Value> = serde_json::from_slice(&stdout).ok();
        if !status.success() {
            let error = parsed.unwrap_or(Value::Null);
            let stderr = String::from_utf8_lossy(&stderr).trim().to_owned();
            return Err(CniOpError::Plugin {
                plugin: name,
                verb,
                code: error["code"].as_u64().unwrap_or(0),
                msg: error["msg"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{status}: {stderr}")),
                details: error["details"].as_str().unwrap_or_default().to_owned(),
            });
        }
        if stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        parsed.ok_or_else(|| CniOpError::BadResult {
            plugin: name,
            verb,
            reason: format!("not JSON: {}", String::from_utf8_lossy(&stdout)),
        })
    }

    /// Spawns `command`, feeds it `input` and collects its output, killing
    /// it when the timeout passes.
    fn run(
        &self,
        mut command: Command,
        input: &[u8],
        name: &str,
        verb: &'static str,
        exec_err: impl Fn(&'static str, io::Error) -> CniOpError,
    ) -> Result<(std::process::ExitStatus, Vec<u8>, Vec<u8>), CniOpError> {
        let mut child = command.spawn().map_err(|e| exec_err("spawn", e))?;
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut buf);
                }
                buf
            })
        };
        let stdout = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let stderr = drain(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        if let Some(mut pipe) = child.stdin.take() {
            // A plugin may exit without reading its config: EPIPE is its answer.
            match pipe.write_all(input) {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(exec_err("write config", e));
                }
                _ => {}
            }
        }
        let status = match wait_until(&mut child, Instant::now() + self.timeout) {
            Ok(Some(status)) => status,
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CniOpError::Timeout {
                    plugin: name.to_owned(),
                    verb,
                    after: self.timeout,
                });
            }
            Err(e) => return Err(exec_err("wait", e)),
        };
        let join = |h: std::thread::JoinHandle<Vec<u8>>| h.join().unwrap_or_default();
        Ok((status, join(stdout), join(stderr)))
    }
}

/// Waits for `child` until `deadline`; `Ok(None)` if it still runs then.
/// Sleeps on a pidfd so the exit is seen at once. Polling with a growing
/// pause (kept for kernels before 5.3) saw a ~2 ms ADD up to 4 ms late:
/// RunPodSandbox took 5.0 ms at p50 with it, 4.2 ms without (`benches/cri.rs`).
fn wait_until(
    child: &mut std::process::Child,
    deadline: Instant,
) -> io::Result<Option<std::process::ExitStatus>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use rustix::process::{pidfd_open, Pid, PidfdFlags};
    // Our unreaped child: its pid cannot be reused before we wait for it.
    let pidfd = i32::try_from(child.id())
        .ok()
        .and_then(Pid::from_raw)
        .and_then(|pid| pidfd_open(pid, PidfdFlags::empty()).ok());
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        match &pidfd {
            Some(fd) => {
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
                match poll(&mut fds, timeout) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            None => {
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
    }
}

/// For the daemon's GC: the attachment keys of sandboxes it still knows.
pub fn attachment_keys<'a>(sandbox_ids: impl IntoIterator<Item = &'a str>) -> Vec<AttachmentKey> {
    sandbox_ids
        .into_iter()
        .map(|id| AttachmentKey {
            container_id: id.to_owned(),
            ifname: DEFAULT_IFNAME.to_owned(),
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use k8s_cri::v1::{DnsConfig, LinuxPodSandboxConfig, PodSandboxMetadata};

    fn pod_config() -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web".into(),
                uid: "u-1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            port_mappings: vec![
                k8s_cri::v1::PortMapping {
                    protocol: Protocol::Tcp as i32,
                    container_port: 80,
                    host_port: 8080,
                    host_ip: "".into(),
                },
                k8s_cri::v1::PortMapping {
                    protocol: Protocol::Udp as i32,
                    container_port: 53,
                    host_port: 5353,
                    host_ip: "127.0.0.1".into(),
                },
                // No host port: not handed to CNI.
                k8s_cri::v1::PortMapping {
                    protocol: Protocol::Tcp as i32,
                    container_port: 9000,
                    host_port: 0,
                    host_ip: "".into(),
                },
            ],
            annotations: [(
                "kubernetes.io/egress-bandwidth".to_owned(),
                "10M".to_owned(),
            )]
            .into_iter()
            .collect(),
            dns_config: Some(DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: "/kubepods/pod-u-1".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn write(dir: &Path, name: &str, body: &str) {
        fs::write(dir.join(name), body).unwrap();
    }

    #[test]
    fn lexically_first_config_wins_and_a_conf_becomes_a_list() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_network(dir.path()).unwrap(), None);
        assert_eq!(load_network(&dir.path().join("absent")).unwrap(), None);
        write(dir.path(), "README", "not a config");
        write(
            dir.path(),
            "20-b.conflist",
            r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"x"},{"type":"y"}]}"#,
        );
        write(
            dir.path(),
            "10-a.conf",
            r#"{"cniVersion":"0.4.0","name":"a","type":"bridge"}"#,
        );
        let list = load_network(dir.path()).unwrap().unwrap();
        assert_eq!(list.name, "a");
        assert_eq!(list.cni_version, "0.4.0");
        assert_eq!(list.plugins.len(), 1);
        assert_eq!(list.plugins[0]["type"], "bridge");
        fs::remove_file(dir.path().join("10-a.conf")).unwrap();
        let list = load_network(dir.path()).unwrap().unwrap();
        assert_eq!(list.name, "b");
        assert_eq!(list.plugins.len(), 2);
        // The first file decides, even when it is broken.
        write(dir.path(), "05-bad.json", r#"{"name":"c"}"#);
        let err = load_network(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("05-bad.json") && err.contains("no type"),
            "{err}"
        );
    }

    #[test]
    fn invalid_lists_are_rejected_by_reason() {
        assert!(NetworkList::parse(b"{", true).is_err());
        let no_name = NetworkList::parse(br#"{"plugins":[{"type":"x"}]}"#, true);
        assert_eq!(no_name.unwrap_err(), "network has no name");
        let empty = NetworkList::parse(br#"{"name":"n","plugins":[]}"#, true);
        assert_eq!(empty.unwrap_err(), "network list has no plugins");
    }

    #[test]
    fn cni_args_are_containerds() {
        let pod = PodNetwork::for_pod("sb1", Path::new("/run/ns/sb1/net"), &pod_config());
        assert_eq!(
            pod.args_string(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;\
             K8S_POD_INFRA_CONTAINER_ID=sb1;K8S_POD_UID=u-1"
        );
        assert_eq!(pod.ifname, "eth0");
    }

    #[test]
    fn capability_args_cover_ports_bandwidth_dns_and_cgroup() {
        let caps = capability_args(&pod_config());
        assert_eq!(
            caps["portMappings"],
            json!([
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}
            ])
        );
        assert_eq!(
            caps["bandwidth"],
            json!({"egressRate": 10_000_000, "egressBurst": u32::MAX})
        );
        assert_eq!(caps["dns"]["servers"], json!(["10.96.0.10"]));
        assert_eq!(caps["cgroupPath"], "/kubepods/pod-u-1");
        assert!(capability_args(&PodSandboxConfig::default()).is_empty());
        assert_eq!(parse_quantity("1Mi"), Some(1 << 20));
        assert_eq!(parse_quantity("5x"), None);
    }

    #[test]
    fn runtime_config_only_carries_declared_capabilities() {
        let list = NetworkList::parse(
            br#"{"cniVersion":"1.0.0","name":"net","plugins":[
                {"type":"bridge","capabilities":{"portMappings":true,"dns":false}},
                {"type":"tuning"}]}"#,
            true,
        )
        .unwrap();
        let caps = capability_args(&pod_config());
        let prev = json!({"ips": []});
        let first = plugin_config(&list, &list.plugins[0], Some(&prev), &caps);
        assert_eq!(first["name"], "net");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert_eq!(first["prevResult"], prev);
        assert_eq!(
            first["runtimeConfig"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["portMappings"]
        );
        let second = plugin_config(&list, &list.plugins[1], None, &caps);
        assert!(second.get("runtimeConfig").is_none());
        assert!(second.get("prevResult").is_none());
    }

    #[test]
    fn pod_ips_come_from_the_pod_interface_v4_first() {
        let result = CniResult::from_json(&json!({
            "interfaces": [
                {"name": "cni0", "mac": "02:00:00:00:00:01"},
                {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/ns/x/net"}
            ],
            "ips": [
                {"address": "fd00::5/64", "interface": 1},
                {"address": "10.0.0.1/24", "interface": 0},
                {"address": "10.0.0.5/24", "interface": 1}
            ]
        }))
        .unwrap();
        let ips: Vec<String> = pod_ips(&result, "eth0")
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ips, ["10.0.0.5", "fd00::5"]);
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version("1.1.0") >= (1, 1, 0));
        assert!(version("0.10.0") > (0, 4, 0));
        assert!(version("0.3.1") < (0, 4, 0));
        assert_eq!(version(""), (0, 0, 0));
    }

    fn fake_plugin(dir: &Path, name: &str, script: &str) {
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn fake_cni(root: &Path, conf: &str) -> Cni {
        let (conf_dir, bin) = (root.join("net.d"), root.join("bin"));
        fs::create_dir_all(&conf_dir).unwrap();
        fs::create_dir_all(&bin).unwrap();
        write(&conf_dir, "10-net.conflist", conf);
        Cni::new(conf_dir, vec![bin], root.join("cache"))
    }

    #[test]
    fn plugin_errors_carry_code_msg_and_details_and_add_undoes_earlier_plugins() {
        let root = tempfile::tempdir().unwrap();
        let cni = fake_cni(
            root.path(),
            r#"{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"ok"},{"type":"bad"}]}"#,
        );
        let log = root.path().join("log");
        let bin = &cni.bin_dirs[0];
        fake_plugin(
            bin,
            "ok",
            &format!(
                "cat >/dev/null; echo \"ok $CNI_COMMAND\" >> {}; \
                 [ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[]}}'; exit 0",
                log.display()
            ),
        );
        fake_plugin(
            bin,
            "bad",
            r#"cat >/dev/null; [ "$CNI_COMMAND" = DEL ] && exit 0; echo '{"cniVersion":"1.0.0","code":7,"msg":"invalid network config","details":"subnet x"}'; exit 1"#,
        );
        let pod = PodNetwork::for_pod("sb", Path::new("/nonexistent"), &pod_config());
        let err = cni.add(&pod).unwrap_err().to_string();
        assert_eq!(
            err,
            "plugin bad ADD failed with code 7: invalid network config (subnet x)"
        );
        // The failed plugin and the one before it were DELeted, in reverse.
        assert_eq!(fs::read_to_string(&log).unwrap(), "ok ADD\nok DEL\n");
        assert!(!cni.has_cached(&pod).unwrap());
    }

    #[test]
    fn add_caches_the_result_and_del_uses_it_even_after_the_config_is_gone() {
        let root = tempfile::tempdir().unwrap();
        let cni = fake_cni(
            root.path(),
            r#"{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"p"}]}"#,
        );
        let seen = root.path().join("seen");
        fake_plugin(
            &cni.bin_dirs[0],
            "p",
            &format!(
                "cat > {}.$CNI_COMMAND; [ \"$CNI_COMMAND\" = ADD ] && \
                 echo '{{\"cniVersion\":\"1.0.0\",\"interfaces\":[{{\"name\":\"eth0\",\"sandbox\":\"/x\"}}],\"ips\":[{{\"address\":\"10.9.0.2/24\",\"interface\":0}}]}}'; exit 0",
                seen.display()
            ),
        );
        let pod = PodNetwork::for_pod("sb", Path::new("/x"), &pod_config());
        let added = cni.add(&pod).unwrap();
        assert_eq!(added.network, "net");
        assert_eq!(pod_ips(&added.result, "eth0")[0].to_string(), "10.9.0.2");
        assert!(cni.cache_path("net", &pod).is_file());
        fs::remove_dir_all(&cni.conf_dir).unwrap();
        cni.del(&pod).unwrap();
        let del: Value =
            serde_json::from_slice(&fs::read(format!("{}.DEL", seen.display())).unwrap()).unwrap();
        assert_eq!(del["prevResult"]["ips"][0]["address"], "10.9.0.2/24");
        assert!(!cni.has_cached(&pod).unwrap());
        // Nothing cached and no config: nothing left to do.
        cni.del(&pod).unwrap();
    }

    #[test]
    fn slow_plugins_are_killed_at_the_timeout() {
        let root = tempfile::tempdir().unwrap();
        let mut cni = fake_cni(
            root.path(),
            r#"{"cniVersion":"1.1.0","name":"net","plugins":[{"type":"slow"}]}"#,
        );
        fake_plugin(&cni.bin_dirs[0], "slow", "exec sleep 10");
        cni.timeout = Duration::from_millis(200);
        let started = Instant::now();
        let err = cni.status().message;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err.contains("timed out"), "{err}");
    }

    #[test]
    fn status_needs_a_config_and_installed_plugins() {
        let root = tempfile::tempdir().unwrap();
        let cni = Cni::new(root.path().join("none"), vec![], root.path().join("cache"));
        let status = cni.status();
        assert!(!status.ready);
        assert_eq!(status.reason, NOT_READY_REASON);
        assert!(
            status.message.contains("no network config"),
            "{}",
            status.message
        );
        let cni = fake_cni(
            root.path(),
            r#"{"cniVersion":"1.1.0","name":"net","plugins":[{"type":"missing"}]}"#,
        );
        let status = cni.status();
        assert!(!status.ready);
        assert!(status.message.contains("\"missing\""), "{}", status.message);
        fake_plugin(
            &cni.bin_dirs[0],
            "missing",
            r#"cat >/dev/null; [ "$CNI_COMMAND" = STATUS ] && echo '{"code":50,"msg":"plugin not available"}' && exit 1; exit 0"#,
        );
        let status = cni.status();
        assert!(!status.ready);
        assert!(status.message.contains("code 50"), "{}", status.message);
    }
}
