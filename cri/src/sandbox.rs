//! Pod sandboxes: the namespaces, files and network a pod's containers
//! share.
//!
//! [`setup`] turns a CRI `PodSandboxConfig` into a [`SandboxState`]: it pins
//! new net/ipc/uts namespaces unless the pod uses the host's
//! ([`namespaces`]), sets the hostname and namespaced sysctls inside them,
//! writes `hostname`/`resolv.conf`/`hosts` and mounts a `/dev/shm` tmpfs
//! ([`files`]), starts an infra process when the pod shares one PID
//! namespace, and attaches the pod network with CNI ADD ([`cni`]). If any
//! step fails, everything done so far is undone. [`stop`] (StopPodSandbox)
//! and [`teardown`] (RemovePodSandbox) undo it; both are idempotent and
//! work from a [`SandboxState`] reloaded from JSON after a restart, or
//! from one whose setup was cut short, since every path in it derives from
//! the sandbox ID alone.
//!
//! All of this blocks (plugins are processes, namespaces need throw-away
//! threads); the daemon calls it from a blocking task.

pub mod cni;
pub mod files;
pub mod namespaces;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_cri::v1::{NamespaceMode, PodSandboxConfig};
use serde::{Deserialize, Serialize};

use self::cni::{Cni, CniOpError, PodNetwork};
use self::files::{FilesError, SandboxFiles};
use self::namespaces::{Infra, NsError, NsKind, PinnedNamespaces};

/// Where namespaces are pinned unless configured otherwise.
pub const DEFAULT_NS_ROOT: &str = "/run/bosun/ns";

/// Node-wide settings for sandboxes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Pinned namespaces go to `<ns_root>/<id>/`.
    pub ns_root: PathBuf,
    /// Sandbox files go to `<state_root>/sandboxes/<id>/`.
    pub state_root: PathBuf,
    /// The pod network.
    pub cni: Cni,
    /// Copied into pods that bring no DNS config.
    pub host_resolv_conf: PathBuf,
}

impl Settings {
    /// Settings using the host's `/etc/resolv.conf`.
    pub fn new(ns_root: PathBuf, state_root: PathBuf, cni: Cni) -> Self {
        Self {
            ns_root,
            state_root,
            cni,
            host_resolv_conf: PathBuf::from("/etc/resolv.conf"),
        }
    }
}

/// What RunPodSandbox asks for.
#[derive(Debug, Clone, Copy)]
pub struct SandboxRequest<'a> {
    /// The sandbox ID the daemon chose.
    pub id: &'a str,
    /// The CRI config.
    pub config: &'a PodSandboxConfig,
    /// Node-wide settings.
    pub settings: &'a Settings,
}

/// Whose PID namespace the pod's containers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PidMode {
    /// The host's (hostPID).
    Host,
    /// One per pod, held by an infra process (shareProcessNamespace).
    Pod,
    /// Each container its own, or a target container's: nothing for the
    /// sandbox to hold.
    Container,
}

/// Everything a sandbox consists of, for the daemon to persist and hand
/// back to [`stop`] / [`teardown`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxState {
    /// Sandbox ID.
    pub id: String,
    /// Hostname (empty: unset).
    pub hostname: String,
    /// The cgroup parent containers are placed under.
    pub cgroup_parent: String,
    /// Pinned namespaces; a kind missing here is the host's.
    pub namespaces: PinnedNamespaces,
    /// PID namespace mode.
    pub pid_mode: PidMode,
    /// The infra process, for [`PidMode::Pod`].
    pub infra: Option<Infra>,
    /// `hostname`, `resolv.conf`, `hosts`, `shm`.
    pub files: SandboxFiles,
    /// The CNI attachment; `None` with host networking.
    pub network: Option<PodNetwork>,
    /// Pod IPs, IPv4 first.
    pub pod_ips: Vec<IpAddr>,
}

impl SandboxState {
    /// The pinned file of `kind`, or `None` when the pod uses the host's.
    pub fn ns_path(&self, kind: NsKind) -> Option<PathBuf> {
        self.namespaces.path(kind)
    }

    /// The shared PID namespace containers join, for [`PidMode::Pod`].
    pub fn pid_ns_path(&self) -> Option<&Path> {
        self.infra.as_ref().map(|i| i.pid_ns.as_path())
    }

    /// Works out, without touching anything, what sandbox `id` will consist
    /// of; every path derives from the ID and `settings`.
    pub fn plan(
        id: &str,
        config: &PodSandboxConfig,
        settings: &Settings,
    ) -> Result<Self, SandboxError> {
        validate_id(id)?;
        let linux = config.linux.clone().unwrap_or_default();
        let options = linux
            .security_context
            .and_then(|s| s.namespace_options)
            .unwrap_or_default();
        let host = |mode: i32| mode == NamespaceMode::Node as i32;
        let (host_net, host_ipc) = (host(options.network), host(options.ipc));
        let pid_mode = match NamespaceMode::try_from(options.pid) {
            Ok(NamespaceMode::Node) => PidMode::Host,
            Ok(NamespaceMode::Pod) => PidMode::Pod,
            Ok(NamespaceMode::Container | NamespaceMode::Target) => PidMode::Container,
            Err(_) => {
                return Err(SandboxError::Unsupported {
                    id: id.into(),
                    what: format!("pid namespace mode {}", options.pid),
                })
            }
        };
        // UTS follows the network, as in Kubernetes: hostNetwork pods see
        // the node's hostname.
        let kinds: Vec<NsKind> = [
            (NsKind::Net, !host_net),
            (NsKind::Ipc, !host_ipc),
            (NsKind::Uts, !host_net),
        ]
        .into_iter()
        .filter_map(|(kind, own)| own.then_some(kind))
        .collect();
        let namespaces = PinnedNamespaces {
            dir: settings.ns_root.join(id),
            kinds,
        };
        let network = namespaces
            .path(NsKind::Net)
            .map(|netns| PodNetwork::for_pod(id, &netns, config));
        Ok(Self {
            id: id.into(),
            hostname: config.hostname.clone(),
            cgroup_parent: linux.cgroup_parent,
            namespaces,
            pid_mode,
            infra: None,
            files: SandboxFiles::new(&settings.state_root, id, !host_ipc),
            network,
            pod_ips: Vec::new(),
        })
    }
}

/// Why a sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The ID cannot name files.
    #[error("invalid sandbox id {0:?}: want 1-128 of [A-Za-z0-9_.-], not starting with '.'")]
    InvalidId(String),
    /// The config asks for something not supported.
    #[error("sandbox {id}: {what} is not supported")]
    Unsupported {
        /// Sandbox ID.
        id: String,
        /// What.
        what: String,
    },
    /// A sysctl is not namespaced, or not in a namespace the pod owns, or
    /// could not be written.
    #[error("sandbox {id}: sysctl {key}: {reason}")]
    Sysctl {
        /// Sandbox ID.
        id: String,
        /// The sysctl as given.
        key: String,
        /// Why it failed.
        reason: String,
    },
    /// Pinning or entering namespaces failed.
    #[error("sandbox {id}: {source}")]
    Namespaces {
        /// Sandbox ID.
        id: String,
        /// The error.
        #[source]
        source: NsError,
    },
    /// Writing the sandbox files failed.
    #[error("sandbox {id}: {source}")]
    Files {
        /// Sandbox ID.
        id: String,
        /// The error.
        #[source]
        source: FilesError,
    },
    /// CNI ADD failed.
    #[error("sandbox {id}: network: {source}")]
    Network {
        /// Sandbox ID.
        id: String,
        /// The error.
        #[source]
        source: CniOpError,
    },
    /// Setup failed and undoing it failed too: something may be left.
    #[error("{error}; undoing the setup also failed: {cleanup}")]
    Undo {
        /// Why setup failed.
        error: Box<SandboxError>,
        /// What could not be undone.
        cleanup: TeardownError,
    },
}

/// Teardown went on past failures; these are all of them.
#[derive(Debug, thiserror::Error)]
#[error("teardown of sandbox {id}: {}", .errors.join("; "))]
pub struct TeardownError {
    /// Sandbox ID.
    pub id: String,
    /// Every failure, in the order met.
    pub errors: Vec<String>,
}

fn validate_id(id: &str) -> Result<(), SandboxError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SandboxError::InvalidId(id.into()))
    }
}

/// Which namespace a sysctl lives in and its path under `/proc/sys`;
/// `Err` for sysctls that are not namespaced. Accepts the dotted and the
/// slashed form (`net/ipv4/conf/eth0.100/forwarding`).
pub fn sysctl_target(key: &str) -> Result<(NsKind, PathBuf), String> {
    let path = if key.contains('/') {
        key.to_owned()
    } else {
        key.replace('.', "/")
    };
    if path.split('/').any(|part| part.is_empty() || part == "..") {
        return Err("malformed name".into());
    }
    let kind = if path.starts_with("net/") {
        NsKind::Net
    } else if path.starts_with("kernel/shm")
        || path.starts_with("kernel/msg")
        || path == "kernel/sem"
        || path.starts_with("fs/mqueue/")
    {
        NsKind::Ipc
    } else {
        return Err("not a namespaced sysctl".into());
    };
    Ok((kind, Path::new("/proc/sys").join(path)))
}

/// RunPodSandbox's node side; see the module docs. On failure nothing is
/// left behind (or [`SandboxError::Undo`] says what is).
pub fn setup(request: &SandboxRequest<'_>) -> Result<SandboxState, SandboxError> {
    let mut state = SandboxState::plan(request.id, request.config, request.settings)?;
    let mut attached = false;
    match build(&mut state, request, &mut attached) {
        Ok(()) => Ok(state),
        Err(error) => {
            // A failed ADD cleans up after itself; DEL only what succeeded.
            let network = if attached {
                state.network.as_ref()
            } else {
                None
            };
            match release(&state, request.settings, network, true) {
                Ok(()) => Err(error),
                Err(cleanup) => Err(SandboxError::Undo {
                    error: Box::new(error),
                    cleanup,
                }),
            }
        }
    }
}

fn build(
    state: &mut SandboxState,
    request: &SandboxRequest<'_>,
    attached: &mut bool,
) -> Result<(), SandboxError> {
    let (id, settings, config) = (request.id, request.settings, request.config);
    let ns_err = |source| SandboxError::Namespaces {
        id: id.into(),
        source,
    };
    let files_err = |source| SandboxError::Files {
        id: id.into(),
        source,
    };
    if !state.namespaces.kinds.is_empty() {
        namespaces::pin(&settings.ns_root, id, &state.namespaces.kinds).map_err(ns_err)?;
    }
    if let Some(uts) = state
        .ns_path(NsKind::Uts)
        .filter(|_| !state.hostname.is_empty())
    {
        let hostname = state.hostname.clone();
        namespaces::within(&[(uts.as_path(), NsKind::Uts)], || {
            nix::unistd::sethostname(&hostname)
        })
        .map_err(ns_err)?
        .map_err(|e| {
            ns_err(NsError::Io {
                op: "set hostname in",
                path: uts.clone(),
                source: e.into(),
            })
        })?;
    }
    let mut sysctls: Vec<(&String, &String)> =
        config.linux.iter().flat_map(|l| l.sysctls.iter()).collect();
    sysctls.sort();
    for (key, value) in sysctls {
        set_sysctl(state, key, value)?;
    }
    state
        .files
        .create(
            &state.hostname,
            config.dns_config.as_ref(),
            &settings.host_resolv_conf,
        )
        .map_err(files_err)?;
    if state.pid_mode == PidMode::Pod {
        state.infra = Some(namespaces::spawn_infra(&state.namespaces.dir).map_err(ns_err)?);
    }
    if let Some(pod) = &state.network {
        let added = settings
            .cni
            .add(pod)
            .map_err(|source| SandboxError::Network {
                id: id.into(),
                source,
            })?;
        *attached = true;
        state.pod_ips = cni::pod_ips(&added.result, &pod.ifname);
        state
            .files
            .write_hosts(&state.hostname, &state.pod_ips)
            .map_err(files_err)?;
    }
    Ok(())
}

fn set_sysctl(state: &SandboxState, key: &str, value: &str) -> Result<(), SandboxError> {
    let fail = |reason: String| SandboxError::Sysctl {
        id: state.id.clone(),
        key: key.into(),
        reason,
    };
    let (kind, path) = sysctl_target(key).map_err(fail)?;
    let ns = state.ns_path(kind).ok_or_else(|| {
        fail(format!(
            "the pod uses the host's {} namespace, whose sysctls it may not set",
            kind.name()
        ))
    })?;
    namespaces::within(&[(ns.as_path(), kind)], || std::fs::write(&path, value))
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(format!("write {value:?} to {}: {e}", path.display())))
}

/// StopPodSandbox's node side: CNI DEL, stop the infra process, unpin the
/// namespaces. Idempotent. When DEL fails the network namespace stays
/// pinned, so a retry DELs the same attachment.
pub fn stop(state: &SandboxState, settings: &Settings) -> Result<(), TeardownError> {
    release(state, settings, owed_del(state, settings), false)
}

/// RemovePodSandbox's node side: [`stop`], then the sandbox files.
/// Idempotent, and fine on a half-set-up sandbox or after a restart.
pub fn teardown(state: &SandboxState, settings: &Settings) -> Result<(), TeardownError> {
    release(state, settings, owed_del(state, settings), true)
}

/// The attachment still to DEL: while a result is cached, or while the
/// netns exists (an ADD may have died before caching). Once both are gone
/// an earlier stop finished.
fn owed_del<'a>(state: &'a SandboxState, settings: &Settings) -> Option<&'a PodNetwork> {
    state
        .network
        .as_ref()
        .filter(|pod| settings.cni.has_cached(pod).unwrap_or(true) || pod.netns.exists())
}

fn release(
    state: &SandboxState,
    settings: &Settings,
    del: Option<&PodNetwork>,
    remove_files: bool,
) -> Result<(), TeardownError> {
    let mut errors = Vec::new();
    let mut network_gone = true;
    if let Some(pod) = del {
        if let Err(e) = settings.cni.del(pod) {
            errors.push(format!("network: {e}"));
            network_gone = false;
        }
    }
    let infra = state.infra.clone().or_else(|| {
        (state.pid_mode == PidMode::Pod)
            .then(|| namespaces::find_infra(&state.namespaces.dir))
            .flatten()
    });
    if let Some(infra) = &infra {
        if let Err(e) = namespaces::stop_infra(infra) {
            errors.push(e.to_string());
        }
    }
    if network_gone {
        if let Err(errs) = namespaces::unpin(&state.namespaces.dir) {
            errors.extend(errs.iter().map(ToString::to_string));
        }
    }
    if remove_files {
        if let Err(e) = state.files.remove() {
            errors.push(e.to_string());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(TeardownError {
            id: state.id.clone(),
            errors,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use k8s_cri::v1::{LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceOption};

    fn settings() -> Settings {
        let cni = Cni::new("/c".into(), vec![], "/s/cni".into());
        Settings::new("/run/ns".into(), "/s".into(), cni)
    }

    fn config(network: NamespaceMode, pid: NamespaceMode, ipc: NamespaceMode) -> PodSandboxConfig {
        PodSandboxConfig {
            hostname: "web".into(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: "/kubepods/x".into(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: network as i32,
                        pid: pid as i32,
                        ipc: ipc as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn plan_pins_what_the_pod_does_not_take_from_the_host() {
        use NamespaceMode::{Container, Node, Pod};
        let s = settings();
        let own = SandboxState::plan("sb1", &config(Pod, Container, Pod), &s).unwrap();
        assert_eq!(
            own.namespaces.kinds,
            [NsKind::Net, NsKind::Ipc, NsKind::Uts]
        );
        assert_eq!(
            own.ns_path(NsKind::Net).unwrap(),
            Path::new("/run/ns/sb1/net")
        );
        assert_eq!(
            own.network.as_ref().unwrap().netns,
            Path::new("/run/ns/sb1/net")
        );
        assert_eq!(own.pid_mode, PidMode::Container);
        assert_eq!(own.files.shm().unwrap(), Path::new("/s/sandboxes/sb1/shm"));
        assert_eq!(own.cgroup_parent, "/kubepods/x");

        let host = SandboxState::plan("sb2", &config(Node, Node, Node), &s).unwrap();
        assert!(host.namespaces.kinds.is_empty());
        assert!(host.network.is_none());
        assert_eq!(host.pid_mode, PidMode::Host);
        assert_eq!(host.files.shm(), None);

        let shared = SandboxState::plan("sb3", &config(Node, Pod, Pod), &s).unwrap();
        assert_eq!(shared.namespaces.kinds, [NsKind::Ipc]);
        assert_eq!(shared.pid_mode, PidMode::Pod);

        let back: SandboxState =
            serde_json::from_str(&serde_json::to_string(&own).unwrap()).unwrap();
        assert_eq!(back, own);
    }

    #[test]
    fn ids_must_be_safe_file_names() {
        let s = settings();
        let c = PodSandboxConfig::default();
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(129)] {
            assert!(SandboxState::plan(bad, &c, &s).is_err(), "{bad:?}");
        }
        assert!(SandboxState::plan("0123abc_-.x", &c, &s).is_ok());
    }

    #[test]
    fn sysctls_are_routed_to_their_namespace() {
        assert_eq!(
            sysctl_target("net.ipv4.ip_unprivileged_port_start").unwrap(),
            (
                NsKind::Net,
                PathBuf::from("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            )
        );
        assert_eq!(
            sysctl_target("net/ipv4/conf/eth0.100/forwarding")
                .unwrap()
                .1,
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        assert_eq!(sysctl_target("kernel.shmmax").unwrap().0, NsKind::Ipc);
        assert_eq!(sysctl_target("fs.mqueue.msg_max").unwrap().0, NsKind::Ipc);
        assert_eq!(sysctl_target("kernel.sem").unwrap().0, NsKind::Ipc);
        assert!(sysctl_target("vm.swappiness").is_err());
        assert!(sysctl_target("net/../../etc").is_err());
    }
}
