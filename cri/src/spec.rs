//! The OCI runtime spec (config.json) for a CRI container, built from its
//! `ContainerConfig`, its sandbox and its image the way containerd's CRI
//! plugin builds it (`container_create_linux.go`, `opts/spec_linux.go`), since
//! the kubelet relies on those semantics.
//!
//! Everything here is a pure function of its inputs except a few reads: the
//! image's /etc/passwd and /etc/group (confined to the rootfs, see
//! [`resolve_user`]), `stat` of CRI device paths, and a Localhost seccomp
//! profile file.

mod caps;
mod host;
mod seccomp;
mod user;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use k8s_cri::v1::{
    security_profile::ProfileType, ContainerConfig, Device, LinuxContainerResources,
    LinuxContainerSecurityContext, MountPropagation, NamespaceMode, PodSandboxConfig,
    SecurityProfile, SupplementalGroupsPolicy,
};
use nix::sys::stat::SFlag;
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDevice,
    LinuxDeviceBuilder, LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxHugepageLimitBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxResources, LinuxResourcesBuilder, LinuxSeccomp, Mount, MountBuilder,
    Process, RootBuilder, Spec, UserBuilder,
};
use oci_spec::OciSpecError;

pub use caps::{capability_sets, CapabilitySets, DEFAULT_CAPABILITIES};
pub use seccomp::default_seccomp_profile;
pub use user::{resolve_user, ResolvedUser};

/// PATH for images that do not set one (containerd's `defaultUnixEnv`).
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Annotations containerd puts on every container spec; tools (and NRI
/// plugins) find the pod of a container through them.
pub mod annotations {
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    pub const CONTAINER_TYPE_CONTAINER: &str = "container";
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
    pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
    pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
    pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
    pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
}

/// Why a container's spec cannot be built. Each names the CRI field (or
/// file) and the value at fault.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("{field} {value:?} is not supported")]
    Unsupported { field: &'static str, value: String },
    #[error("container {container:?} has no command: CRI command and args and the image's Entrypoint and Cmd are all empty")]
    NoCommand { container: String },
    #[error("read {path} in the image rootfs: {source}")]
    ReadImageFile { path: PathBuf, source: io::Error },
    #[error("device {path}: {source}")]
    Device { path: String, source: io::Error },
    #[error("read seccomp profile {path}: {source}")]
    ReadSeccompProfile { path: PathBuf, source: io::Error },
    #[error("parse seccomp profile {path}: {source}")]
    ParseSeccompProfile {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("build OCI spec: {0}")]
    Oci(#[from] OciSpecError),
}

/// What the container shares with its pod sandbox.
#[derive(Debug, Clone, Copy)]
pub struct SandboxContext<'a> {
    pub id: &'a str,
    pub config: &'a PodSandboxConfig,
    /// Pinned namespace files of the sandbox; `None` means the sandbox uses
    /// the host's namespace (host network / host IPC).
    pub netns: Option<&'a Path>,
    pub ipcns: Option<&'a Path>,
    pub utsns: Option<&'a Path>,
    /// The sandbox's pid namespace (e.g. `/proc/<infra pid>/ns/pid`), for
    /// containers in pid mode POD.
    pub pidns: Option<&'a Path>,
    /// The target container's pid namespace, for pid mode TARGET.
    pub target_pidns: Option<&'a Path>,
    /// Files the sandbox prepared, bind-mounted unless the CRI config
    /// mounts something at the same place.
    pub hostname_file: Option<&'a Path>,
    pub resolv_conf: Option<&'a Path>,
    pub hosts_file: Option<&'a Path>,
    /// The sandbox's /dev/shm (a tmpfs shared by the pod's containers).
    pub shm: Option<&'a Path>,
}

/// The unpacked image.
#[derive(Debug, Clone, Copy)]
pub struct ImageContext<'a> {
    pub config: &'a ImageConfiguration,
    /// The container's prepared root filesystem (becomes `root.path`).
    pub rootfs: &'a Path,
}

/// Facts about this node that shape the spec.
#[derive(Debug, Clone)]
pub struct Host {
    /// The node's hostname, for `HOSTNAME` when the sandbox sets none.
    pub hostname: String,
    pub cgroup_v2: bool,
    /// cgroupsPath as `slice:prefix:name` (systemd driver) instead of a path.
    pub systemd_cgroup: bool,
    /// Whether the memory controller limits swap (memsw / memory.swap.max).
    pub swap_limit: bool,
    /// The lowest oom_score_adj this process may give a child: its own value
    /// when CAP_SYS_RESOURCE is missing, -1000 otherwise.
    pub min_oom_score_adj: i32,
    /// This process's bounding set (CapBnd), by capability number: what
    /// "ALL" and privileged containers get.
    pub bounding_caps: u64,
    /// Where Localhost seccomp profiles must live (kubelet's
    /// `/var/lib/kubelet/seccomp`).
    pub seccomp_profile_root: PathBuf,
}

/// Prefix of systemd scope names for our containers (containerd uses
/// "cri-containerd").
const SYSTEMD_SCOPE_PREFIX: &str = "bosun";

/// Builds the OCI runtime spec for `config` in `sandbox`.
pub fn container_spec(
    container_id: &str,
    sandbox: &SandboxContext,
    config: &ContainerConfig,
    image: &ImageContext,
    host: &Host,
) -> Result<Spec, SpecError> {
    let default_sc = LinuxContainerSecurityContext::default();
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .unwrap_or(&default_sc);
    let resources = config.linux.as_ref().and_then(|l| l.resources.as_ref());
    let image_config = image.config.config().clone().unwrap_or_default();
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let sandbox_privileged = sandbox
        .config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .is_some_and(|s| s.privileged);
    if sc.privileged && !sandbox_privileged {
        return Err(SpecError::Invalid {
            field: "privileged",
            value: "true".to_owned(),
            reason: format!("sandbox {} is not privileged", sandbox.id),
        });
    }
    let ns = Namespaces::from_security_context(sc)?;

    let caps = capability_sets(sc.capabilities.as_ref(), sc.privileged, host.bounding_caps)?;
    let mut process = Process::default();
    process.set_args(Some(process_args(&name, config, &image_config)?));
    process.set_env(Some(process_env(config, sandbox, &image_config, host)));
    process.set_cwd(working_dir(config, &image_config)?);
    process.set_terminal(Some(config.tty));
    process.set_user(process_user(sc, &image_config, image.rootfs)?);
    process.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(oci_caps(&caps.granted)?)
            .permitted(oci_caps(&caps.granted)?)
            .effective(oci_caps(&caps.granted)?)
            .inheritable(oci_caps(&caps.ambient)?)
            .ambient(oci_caps(&caps.ambient)?)
            .build()?,
    ));
    // Absent rather than false when off, as containerd writes it:
    // libcontainer reads an explicit false as "set", loads seccomp only
    // after dropping capabilities, and then fails without CAP_SYS_ADMIN.
    process.set_no_new_privileges(sc.no_new_privs.then_some(true));
    process.set_oom_score_adj(oom_score_adj(resources, host)?);
    // Like containerd: no rlimits, so the container inherits the runtime's.
    process.set_rlimits(None);
    process.set_apparmor_profile(None);
    process.set_selinux_label(None);

    let (mounts, rootfs_propagation) = mounts(config, sandbox, sc, &ns)?;

    let mut linux_resources = match resources {
        Some(r) => linux_resources(r, host)?,
        None => LinuxResourcesBuilder::default().build()?,
    };
    let (devices, device_rules) = if sc.privileged {
        // containerd also creates every host device node; we only allow
        // access, so privileged containers see the devices they are given.
        (
            Vec::new(),
            vec![LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .access("rwm")
                .build()?],
        )
    } else {
        devices(&config.devices)?
    };
    linux_resources.set_devices(Some(device_rules));

    let mut linux = LinuxBuilder::default()
        .namespaces(ns.linux_namespaces(sandbox, host, sc.privileged)?)
        .resources(linux_resources)
        .devices(devices)
        .masked_paths(if sc.privileged {
            Vec::new()
        } else {
            sc.masked_paths.clone()
        })
        .readonly_paths(if sc.privileged {
            Vec::new()
        } else {
            sc.readonly_paths.clone()
        })
        .build()?;
    linux.set_seccomp(seccomp_profile(sc, &caps.granted, host)?);
    linux.set_rootfs_propagation(rootfs_propagation.map(str::to_owned));
    linux.set_cgroups_path(cgroups_path(container_id, sandbox.config, host));
    let sysctls = sandbox
        .config
        .linux
        .as_ref()
        .map(|l| l.sysctls.clone())
        .unwrap_or_default();
    linux.set_sysctl((!sysctls.is_empty()).then_some(sysctls));

    let mut spec = Spec::default();
    spec.set_root(Some(
        RootBuilder::default()
            .path(image.rootfs)
            .readonly(sc.readonly_rootfs)
            .build()?,
    ));
    spec.set_mounts(Some(mounts));
    spec.set_process(Some(process));
    // Setting a hostname needs a UTS namespace of the container's own;
    // with the host's it would rename the node.
    spec.set_hostname(
        (!ns.host_network() && sandbox.utsns.is_some()).then(|| sandbox.config.hostname.clone()),
    );
    spec.set_hooks(None);
    spec.set_annotations(Some(spec_annotations(&name, sandbox, config)));
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// CRI command and args against the image's Entrypoint and Cmd, exactly as
/// containerd (and Docker before it): a CRI command replaces the
/// Entrypoint and drops Cmd; CRI args alone replace Cmd.
fn process_args(
    container: &str,
    config: &ContainerConfig,
    image: &oci_spec::image::Config,
) -> Result<Vec<String>, SpecError> {
    let mut command = config.command.clone();
    let mut args = config.args.clone();
    if command.is_empty() {
        if args.is_empty() {
            args = image.cmd().clone().unwrap_or_default();
        }
        let entrypoint = image.entrypoint().clone().unwrap_or_default();
        // Docker writes [""] to mean "Entrypoint reset".
        if entrypoint != [""] {
            command = entrypoint;
        }
    }
    command.extend(args);
    if command.is_empty() {
        return Err(SpecError::NoCommand {
            container: container.to_owned(),
        });
    }
    Ok(command)
}

/// PATH default, HOSTNAME, then the image's env, then the CRI envs; a later
/// value for a key replaces the earlier one in place.
fn process_env(
    config: &ContainerConfig,
    sandbox: &SandboxContext,
    image: &oci_spec::image::Config,
    host: &Host,
) -> Vec<String> {
    let hostname = if sandbox.config.hostname.is_empty() {
        &host.hostname
    } else {
        &sandbox.config.hostname
    };
    let mut env = vec![DEFAULT_PATH_ENV.to_owned()];
    let overrides = std::iter::once(format!("HOSTNAME={hostname}"))
        .chain(image.env().iter().flatten().cloned())
        .chain(
            config
                .envs
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value)),
        );
    for entry in overrides {
        let key = entry.split_once('=').map_or(entry.as_str(), |(k, _)| k);
        match env
            .iter_mut()
            .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
        {
            Some(slot) => *slot = entry,
            None => env.push(entry),
        }
    }
    env
}

fn working_dir(
    config: &ContainerConfig,
    image: &oci_spec::image::Config,
) -> Result<PathBuf, SpecError> {
    let (field, dir) = if !config.working_dir.is_empty() {
        ("working_dir", config.working_dir.as_str())
    } else {
        match image.working_dir().as_deref() {
            Some(dir) if !dir.is_empty() => ("image WorkingDir", dir),
            _ => return Ok(PathBuf::from("/")),
        }
    };
    if !dir.starts_with('/') {
        return Err(SpecError::Invalid {
            field,
            value: dir.to_owned(),
            reason: "must be an absolute path".to_owned(),
        });
    }
    Ok(PathBuf::from(dir))
}

/// containerd's `generateUserString`, then the image's `User`, then root;
/// supplementary groups from the image's /etc/group (unless the policy is
/// Strict) plus the CRI supplemental_groups.
fn process_user(
    sc: &LinuxContainerSecurityContext,
    image: &oci_spec::image::Config,
    rootfs: &Path,
) -> Result<oci_spec::runtime::User, SpecError> {
    let id = |field: &'static str, value: i64| {
        u32::try_from(value).map_err(|_| SpecError::Invalid {
            field,
            value: value.to_string(),
            reason: "not a valid id".to_owned(),
        })
    };
    let mut user = match (&sc.run_as_user, sc.run_as_username.as_str()) {
        (_, name) if !name.is_empty() => name.to_owned(),
        (Some(uid), _) => id("run_as_user", uid.value)?.to_string(),
        (None, _) => String::new(),
    };
    if let Some(gid) = &sc.run_as_group {
        if user.is_empty() {
            return Err(SpecError::Invalid {
                field: "run_as_group",
                value: gid.value.to_string(),
                reason: "set without run_as_user or run_as_username".to_owned(),
            });
        }
        user = format!("{user}:{}", id("run_as_group", gid.value)?);
    }
    if user.is_empty() {
        user = image.user().clone().unwrap_or_default();
    }
    if user.is_empty() {
        user = "0".to_owned();
    }
    let resolved = resolve_user(rootfs, &user)?;
    let mut gids = if sc.supplemental_groups_policy == SupplementalGroupsPolicy::Strict as i32 {
        vec![resolved.gid]
    } else {
        resolved.additional_gids
    };
    for &gid in &sc.supplemental_groups {
        let gid = id("supplemental_groups", gid)?;
        if !gids.contains(&gid) {
            gids.push(gid);
        }
    }
    Ok(UserBuilder::default()
        .uid(resolved.uid)
        .gid(resolved.gid)
        .additional_gids(gids)
        .build()?)
}

fn oci_caps(names: &[String]) -> Result<oci_spec::runtime::Capabilities, SpecError> {
    names
        .iter()
        .map(|name| {
            serde_json::from_value::<Capability>(name.as_str().into()).map_err(|_| {
                SpecError::Unsupported {
                    field: "capability",
                    value: name.clone(),
                }
            })
        })
        .collect()
}

/// The CRI value, raised to what this process may set (containerd's
/// `restrict_oom_score_adj`): lowering below our own value needs
/// CAP_SYS_RESOURCE, and the runtime would fail on it.
fn oom_score_adj(
    resources: Option<&LinuxContainerResources>,
    host: &Host,
) -> Result<Option<i32>, SpecError> {
    let Some(resources) = resources else {
        return Ok(None);
    };
    let adj = resources.oom_score_adj;
    let adj = i32::try_from(adj)
        .ok()
        .filter(|a| (-1000..=1000).contains(a))
        .ok_or_else(|| SpecError::Invalid {
            field: "oom_score_adj",
            value: adj.to_string(),
            reason: "must be within -1000..=1000".to_owned(),
        })?;
    Ok(Some(adj.max(host.min_oom_score_adj)))
}

/// cgroup limits from CRI resources, as containerd's `WithResources`: zero
/// means unset. Also the body of an UpdateContainerResources
/// (`runtime update -r`), hence public.
pub fn linux_resources(
    r: &LinuxContainerResources,
    host: &Host,
) -> Result<LinuxResources, SpecError> {
    let mut out = LinuxResourcesBuilder::default().build()?;
    let non_negative = |field: &'static str, value: i64| {
        u64::try_from(value).map_err(|_| SpecError::Invalid {
            field,
            value: value.to_string(),
            reason: "must not be negative".to_owned(),
        })
    };
    let mut cpu = LinuxCpuBuilder::default();
    if r.cpu_shares != 0 {
        cpu = cpu.shares(non_negative("cpu_shares", r.cpu_shares)?);
    }
    if r.cpu_period != 0 {
        cpu = cpu.period(non_negative("cpu_period", r.cpu_period)?);
    }
    // A negative quota (-1) means unlimited: passed through.
    if r.cpu_quota != 0 {
        cpu = cpu.quota(r.cpu_quota);
    }
    if !r.cpuset_cpus.is_empty() {
        cpu = cpu.cpus(r.cpuset_cpus.clone());
    }
    if !r.cpuset_mems.is_empty() {
        cpu = cpu.mems(r.cpuset_mems.clone());
    }
    out.set_cpu(Some(cpu.build()?));

    let mut memory = LinuxMemoryBuilder::default();
    if r.memory_limit_in_bytes != 0 {
        non_negative("memory_limit_in_bytes", r.memory_limit_in_bytes)?;
        memory = memory.limit(r.memory_limit_in_bytes);
        // Equal limits keep the container from swapping by default.
        if r.memory_swap_limit_in_bytes == 0 && host.swap_limit {
            memory = memory.swap(r.memory_limit_in_bytes);
        }
    }
    if r.memory_swap_limit_in_bytes != 0 && host.swap_limit {
        memory = memory.swap(r.memory_swap_limit_in_bytes);
    }
    out.set_memory(Some(memory.build()?));

    let hugepages = r
        .hugepage_limits
        .iter()
        .map(|h| {
            let limit = i64::try_from(h.limit).map_err(|_| SpecError::Invalid {
                field: "hugepage_limits",
                value: format!("{}={}", h.page_size, h.limit),
                reason: "limit too large".to_owned(),
            })?;
            Ok(LinuxHugepageLimitBuilder::default()
                .page_size(h.page_size.clone())
                .limit(limit)
                .build()?)
        })
        .collect::<Result<Vec<_>, SpecError>>()?;
    if !hugepages.is_empty() {
        out.set_hugepage_limits(Some(hugepages));
    }
    if !r.unified.is_empty() {
        if !host.cgroup_v2 {
            let mut keys: Vec<&String> = r.unified.keys().collect();
            keys.sort();
            return Err(SpecError::Invalid {
                field: "unified",
                value: format!("{keys:?}"),
                reason: "needs cgroup v2, and this node uses cgroup v1".to_owned(),
            });
        }
        out.set_unified(Some(r.unified.clone()));
    }
    Ok(out)
}

/// CRI devices as device nodes plus the cgroup rules allowing them, after
/// a deny-all rule (the runtime adds its standard devices itself).
fn devices(devices: &[Device]) -> Result<(Vec<LinuxDevice>, Vec<LinuxDeviceCgroup>), SpecError> {
    let mut nodes = Vec::new();
    let mut rules = vec![LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()?];
    for device in devices {
        if !device.container_path.starts_with('/') {
            return Err(SpecError::Invalid {
                field: "devices.container_path",
                value: device.container_path.clone(),
                reason: "must be an absolute path".to_owned(),
            });
        }
        let access = if device.permissions.is_empty() {
            "rwm"
        } else {
            device.permissions.as_str()
        };
        if !access.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
            return Err(SpecError::Invalid {
                field: "devices.permissions",
                value: device.permissions.clone(),
                reason: "only r, w and m are allowed".to_owned(),
            });
        }
        // stat follows symlinks such as /dev/disk/by-id/... to the node.
        let st =
            nix::sys::stat::stat(device.host_path.as_str()).map_err(|e| SpecError::Device {
                path: device.host_path.clone(),
                source: e.into(),
            })?;
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        let typ = match kind {
            SFlag::S_IFCHR => LinuxDeviceType::C,
            SFlag::S_IFBLK => LinuxDeviceType::B,
            _ => {
                return Err(SpecError::Invalid {
                    field: "devices.host_path",
                    value: device.host_path.clone(),
                    reason: "not a character or block device".to_owned(),
                })
            }
        };
        let major = i64::try_from(nix::sys::stat::major(st.st_rdev)).unwrap_or(i64::MAX);
        let minor = i64::try_from(nix::sys::stat::minor(st.st_rdev)).unwrap_or(i64::MAX);
        nodes.push(
            LinuxDeviceBuilder::default()
                .path(&device.container_path)
                .typ(typ)
                .major(major)
                .minor(minor)
                .file_mode(st.st_mode & 0o7777)
                .uid(st.st_uid)
                .gid(st.st_gid)
                .build()?,
        );
        rules.push(
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(typ)
                .major(major)
                .minor(minor)
                .access(access)
                .build()?,
        );
    }
    Ok((nodes, rules))
}

/// The container's namespace modes from its security context.
struct Namespaces {
    network: NamespaceMode,
    pid: NamespaceMode,
    ipc: NamespaceMode,
}

impl Namespaces {
    fn from_security_context(sc: &LinuxContainerSecurityContext) -> Result<Self, SpecError> {
        let default = Default::default();
        let opts = sc.namespace_options.as_ref().unwrap_or(&default);
        let mode = |field: &'static str, value: i32| {
            NamespaceMode::try_from(value).map_err(|_| SpecError::Invalid {
                field,
                value: value.to_string(),
                reason: "unknown namespace mode".to_owned(),
            })
        };
        if let Some(userns) = &opts.userns_options {
            if userns.mode != NamespaceMode::Node as i32 {
                return Err(SpecError::Unsupported {
                    field: "namespace_options.userns_options.mode",
                    value: mode("namespace_options.userns_options.mode", userns.mode)?
                        .as_str_name()
                        .to_owned(),
                });
            }
        }
        let ns = Namespaces {
            network: mode("namespace_options.network", opts.network)?,
            pid: mode("namespace_options.pid", opts.pid)?,
            ipc: mode("namespace_options.ipc", opts.ipc)?,
        };
        for (field, m) in [
            ("namespace_options.network", ns.network),
            ("namespace_options.ipc", ns.ipc),
        ] {
            if !matches!(m, NamespaceMode::Pod | NamespaceMode::Node) {
                return Err(SpecError::Unsupported {
                    field,
                    value: m.as_str_name().to_owned(),
                });
            }
        }
        Ok(ns)
    }

    fn host_network(&self) -> bool {
        self.network == NamespaceMode::Node
    }

    /// Joins the sandbox's namespaces (UTS follows the network, as the
    /// sandbox's does); an absent path means the host's, i.e. no entry.
    fn linux_namespaces(
        &self,
        sandbox: &SandboxContext,
        host: &Host,
        privileged: bool,
    ) -> Result<Vec<LinuxNamespace>, SpecError> {
        let entry = |typ, path: Option<&Path>| {
            let mut b = LinuxNamespaceBuilder::default().typ(typ);
            if let Some(path) = path {
                b = b.path(path);
            }
            b.build()
        };
        let mut out = vec![entry(LinuxNamespaceType::Mount, None)?];
        if !self.host_network() {
            if let Some(path) = sandbox.netns {
                out.push(entry(LinuxNamespaceType::Network, Some(path))?);
            }
            if let Some(path) = sandbox.utsns {
                out.push(entry(LinuxNamespaceType::Uts, Some(path))?);
            }
        }
        if self.ipc != NamespaceMode::Node {
            if let Some(path) = sandbox.ipcns {
                out.push(entry(LinuxNamespaceType::Ipc, Some(path))?);
            }
        }
        let missing = |what: &str| SpecError::Invalid {
            field: "namespace_options.pid",
            value: self.pid.as_str_name().to_owned(),
            reason: format!("{what} has no pid namespace"),
        };
        match self.pid {
            NamespaceMode::Node => {}
            NamespaceMode::Container => out.push(entry(LinuxNamespaceType::Pid, None)?),
            NamespaceMode::Pod => {
                let path = sandbox
                    .pidns
                    .ok_or_else(|| missing(&format!("sandbox {}", sandbox.id)))?;
                out.push(entry(LinuxNamespaceType::Pid, Some(path))?);
            }
            NamespaceMode::Target => {
                let path = sandbox
                    .target_pidns
                    .ok_or_else(|| missing("the target container"))?;
                out.push(entry(LinuxNamespaceType::Pid, Some(path))?);
            }
        }
        // A cgroup namespace hides the host's hierarchy (containerd: v2 only,
        // and never for privileged containers, which may manage cgroups).
        if host.cgroup_v2 && !privileged {
            out.push(entry(LinuxNamespaceType::Cgroup, None)?);
        }
        Ok(out)
    }
}

/// A bind mount requested by CRI or added for the sandbox's files.
struct Bind {
    container_path: String,
    host_path: String,
    readonly: bool,
    recursive_read_only: bool,
    propagation: MountPropagation,
}

/// The default filesystems, then the binds (sandbox files and CRI mounts)
/// ordered parents-first; a bind replaces the default at the same place, and
/// a bind at /dev replaces every default under it. Also returns the rootfs
/// propagation the binds need.
fn mounts(
    config: &ContainerConfig,
    sandbox: &SandboxContext,
    sc: &LinuxContainerSecurityContext,
    ns: &Namespaces,
) -> Result<(Vec<Mount>, Option<&'static str>), SpecError> {
    let mut binds = Vec::new();
    let cri_paths: Vec<String> = config
        .mounts
        .iter()
        .map(|m| clean_path(&m.container_path))
        .collect();
    let sandbox_file = |container_path: &str, file: Option<&Path>| {
        file.filter(|_| !cri_paths.iter().any(|p| p == container_path))
            .map(|file| Bind {
                container_path: container_path.to_owned(),
                host_path: file.to_string_lossy().into_owned(),
                readonly: sc.readonly_rootfs,
                recursive_read_only: false,
                propagation: MountPropagation::PropagationPrivate,
            })
    };
    binds.extend(sandbox_file("/etc/hostname", sandbox.hostname_file));
    binds.extend(sandbox_file("/etc/hosts", sandbox.hosts_file));
    binds.extend(sandbox_file("/etc/resolv.conf", sandbox.resolv_conf));
    // Host IPC means the host's /dev/shm too.
    let shm = if ns.ipc == NamespaceMode::Node {
        Some(Path::new("/dev/shm"))
    } else {
        sandbox.shm
    };
    binds.extend(sandbox_file("/dev/shm", shm).map(|b| Bind {
        readonly: false,
        ..b
    }));

    for (m, container_path) in config.mounts.iter().zip(&cri_paths) {
        let invalid = |field: &'static str, value: &str, reason: &str| SpecError::Invalid {
            field,
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        if !m.container_path.starts_with('/') {
            return Err(invalid(
                "mounts.container_path",
                &m.container_path,
                "must be an absolute path",
            ));
        }
        // Before the host path check: an image volume has none.
        if m.image.is_some() {
            return Err(SpecError::Unsupported {
                field: "mounts.image",
                value: m.container_path.clone(),
            });
        }
        if !m.host_path.starts_with('/') {
            return Err(invalid(
                "mounts.host_path",
                &m.host_path,
                "must be an absolute path",
            ));
        }
        if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
            return Err(SpecError::Unsupported {
                field: "mounts.uid_mappings/gid_mappings",
                value: m.container_path.clone(),
            });
        }
        let propagation = MountPropagation::try_from(m.propagation).map_err(|_| {
            invalid(
                "mounts.propagation",
                &m.propagation.to_string(),
                "unknown propagation",
            )
        })?;
        if m.recursive_read_only
            && (!m.readonly || propagation != MountPropagation::PropagationPrivate)
        {
            return Err(invalid(
                "mounts.recursive_read_only",
                &m.container_path,
                "needs readonly and private propagation",
            ));
        }
        binds.push(Bind {
            container_path: container_path.clone(),
            host_path: m.host_path.clone(),
            readonly: m.readonly,
            recursive_read_only: m.recursive_read_only,
            propagation,
        });
    }
    // Parents before children, so a child bind is not hidden by its parent.
    binds.sort_by_key(|b| b.container_path.split('/').count());

    let replaced = |dest: &str| {
        binds.iter().any(|b| {
            b.container_path == dest || (b.container_path == "/dev" && dest.starts_with("/dev/"))
        })
    };
    let mut out = Vec::new();
    for m in default_mounts(sc.privileged)? {
        if !replaced(&m.destination().to_string_lossy()) {
            out.push(m);
        }
    }
    let mut rootfs_propagation = None;
    for b in &binds {
        let propagation = match b.propagation {
            MountPropagation::PropagationPrivate => "rprivate",
            MountPropagation::PropagationHostToContainer => {
                // Host mounts only reach the container if the rootfs is a
                // slave (or shared) mount too.
                rootfs_propagation = rootfs_propagation.or(Some("rslave"));
                "rslave"
            }
            MountPropagation::PropagationBidirectional => {
                rootfs_propagation = Some("rshared");
                "rshared"
            }
        };
        let mut options = vec!["rbind", propagation, if b.readonly { "ro" } else { "rw" }];
        if b.recursive_read_only {
            options.push("rro");
        }
        out.push(
            MountBuilder::default()
                .destination(&b.container_path)
                .typ("bind")
                .source(&b.host_path)
                .options(options.into_iter().map(str::to_owned).collect::<Vec<_>>())
                .build()?,
        );
    }
    Ok((out, rootfs_propagation))
}

/// containerd's default mounts (without /run), plus the cgroup filesystem
/// read-only as Docker does; /sys and cgroups are writable when privileged.
fn default_mounts(privileged: bool) -> Result<Vec<Mount>, SpecError> {
    let sys_mode = if privileged { "rw" } else { "ro" };
    let table: [(&str, &str, &str, &[&str]); 7] = [
        ("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        (
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        (
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        (
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        (
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        ("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev"]),
        (
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime"],
        ),
    ];
    table
        .into_iter()
        .map(|(dest, typ, source, options)| {
            let mut options: Vec<String> = options.iter().map(|o| (*o).to_owned()).collect();
            if dest.starts_with("/sys") {
                options.push(sys_mode.to_owned());
            }
            Ok(MountBuilder::default()
                .destination(dest)
                .typ(typ)
                .source(source)
                .options(options)
                .build()?)
        })
        .collect()
}

/// Lexical cleaning as Go's `filepath.Clean` for absolute paths: no `.`,
/// no `..` (never above `/`), no repeated or trailing slashes.
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// RuntimeDefault, Localhost or Unconfined from the `seccomp` field, or the
/// deprecated `seccomp_profile_path` strings; none for privileged
/// containers, as containerd.
// Older kubelets still send only `seccomp_profile_path`.
#[allow(deprecated)]
fn seccomp_profile(
    sc: &LinuxContainerSecurityContext,
    caps: &[String],
    host: &Host,
) -> Result<Option<LinuxSeccomp>, SpecError> {
    if sc.privileged {
        return Ok(None);
    }
    let localhost = |reference: &str| {
        let path = seccomp::localhost_profile_path(&host.seccomp_profile_root, reference)?;
        seccomp::load_profile(&path).map(Some)
    };
    match &sc.seccomp {
        Some(SecurityProfile {
            profile_type,
            localhost_ref,
        }) => match ProfileType::try_from(*profile_type) {
            Ok(ProfileType::RuntimeDefault) => default_seccomp_profile(caps).map(Some),
            Ok(ProfileType::Unconfined) => Ok(None),
            Ok(ProfileType::Localhost) => localhost(localhost_ref),
            Err(_) => Err(SpecError::Invalid {
                field: "seccomp.profile_type",
                value: profile_type.to_string(),
                reason: "unknown profile type".to_owned(),
            }),
        },
        None => match sc.seccomp_profile_path.as_str() {
            "" | "unconfined" => Ok(None),
            "runtime/default" | "docker/default" => default_seccomp_profile(caps).map(Some),
            path => match path.strip_prefix("localhost/") {
                Some(reference) => localhost(reference),
                None => Err(SpecError::Invalid {
                    field: "seccomp_profile_path",
                    value: path.to_owned(),
                    reason: "expected runtime/default, unconfined or localhost/<path>".to_owned(),
                }),
            },
        },
    }
}

/// cgroupfs: `<parent>/<id>`; systemd: `<parent slice>:bosun:<id>`. None
/// without a parent, leaving the placement to the runtime (as containerd).
fn cgroups_path(container_id: &str, sandbox: &PodSandboxConfig, host: &Host) -> Option<PathBuf> {
    let parent = sandbox.linux.as_ref().map(|l| l.cgroup_parent.as_str())?;
    if parent.is_empty() {
        return None;
    }
    Some(if host.systemd_cgroup {
        let slice = parent.rsplit('/').find(|s| !s.is_empty()).unwrap_or(parent);
        PathBuf::from(format!("{slice}:{SYSTEMD_SCOPE_PREFIX}:{container_id}"))
    } else {
        Path::new(parent).join(container_id)
    })
}

/// The CRI annotations, then containerd's, which win on a clash so a pod
/// cannot disguise which sandbox a container belongs to.
fn spec_annotations(
    name: &str,
    sandbox: &SandboxContext,
    config: &ContainerConfig,
) -> HashMap<String, String> {
    let mut out = config.annotations.clone();
    let meta = sandbox.config.metadata.clone().unwrap_or_default();
    let image = config
        .image
        .as_ref()
        .map(|i| {
            if i.user_specified_image.is_empty() {
                i.image.clone()
            } else {
                i.user_specified_image.clone()
            }
        })
        .unwrap_or_default();
    for (key, value) in [
        (
            annotations::CONTAINER_TYPE,
            annotations::CONTAINER_TYPE_CONTAINER.to_owned(),
        ),
        (annotations::SANDBOX_ID, sandbox.id.to_owned()),
        (annotations::SANDBOX_NAMESPACE, meta.namespace),
        (annotations::SANDBOX_UID, meta.uid),
        (annotations::SANDBOX_NAME, meta.name),
        (annotations::CONTAINER_NAME, name.to_owned()),
        (annotations::IMAGE_NAME, image),
    ] {
        out.insert(key.to_owned(), value);
    }
    out
}

#[cfg(test)]
mod tests;
