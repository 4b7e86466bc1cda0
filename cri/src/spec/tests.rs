#![allow(clippy::unwrap_used)]

use std::fs;

use k8s_cri::v1::{
    Capability as CriCapability, ContainerMetadata, ImageSpec, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount as CriMount,
    NamespaceOption, PodSandboxMetadata, UserNamespace,
};
use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};
use serde_json::{json, Value};

use super::*;

struct Fixture {
    rootfs: tempfile::TempDir,
    sandbox: PodSandboxConfig,
    image: ImageConfiguration,
    host: Host,
}

impl Fixture {
    fn new() -> Self {
        let rootfs = tempfile::tempdir().unwrap();
        fs::create_dir_all(rootfs.path().join("etc")).unwrap();
        fs::write(
            rootfs.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            rootfs.path().join("etc/group"),
            "root:x:0:\napp:x:1000:\nwheel:x:10:app\n",
        )
        .unwrap();
        let sandbox = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web-0".into(),
                uid: "uid-1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: "web-0".into(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: "/kubepods/besteffort/poduid-1".into(),
                sysctls: [(
                    "net.ipv4.ip_unprivileged_port_start".to_owned(),
                    "0".to_owned(),
                )]
                .into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        Fixture {
            rootfs,
            sandbox,
            image: image_config(
                Some(vec!["/entry"]),
                Some(vec!["serve"]),
                &["PATH=/app/bin", "LANG=C"],
                "",
                "",
            ),
            host: Host {
                hostname: "node-1".into(),
                cgroup_v2: false,
                systemd_cgroup: false,
                swap_limit: true,
                min_oom_score_adj: -500,
                bounding_caps: (1 << 41) - 1,
                seccomp_profile_root: PathBuf::from("/var/lib/kubelet/seccomp"),
            },
        }
    }

    fn context(&self) -> SandboxContext<'_> {
        SandboxContext {
            id: "sb-1",
            config: &self.sandbox,
            netns: Some(Path::new("/run/netns/sb-1")),
            ipcns: Some(Path::new("/run/bosun/ns/sb-1/ipc")),
            utsns: Some(Path::new("/run/bosun/ns/sb-1/uts")),
            pidns: Some(Path::new("/proc/42/ns/pid")),
            target_pidns: None,
            hostname_file: Some(Path::new("/var/lib/bosun/sb-1/hostname")),
            resolv_conf: Some(Path::new("/var/lib/bosun/sb-1/resolv.conf")),
            hosts_file: None,
            shm: Some(Path::new("/run/bosun/sb-1/shm")),
        }
    }

    fn build(&self, config: &ContainerConfig) -> Result<Spec, SpecError> {
        container_spec(
            "c-1",
            &self.context(),
            config,
            &ImageContext {
                config: &self.image,
                rootfs: self.rootfs.path(),
            },
            &self.host,
        )
    }

    fn json(&self, config: &ContainerConfig) -> Value {
        serde_json::to_value(self.build(config).unwrap()).unwrap()
    }

    fn err(&self, config: &ContainerConfig) -> String {
        self.build(config).unwrap_err().to_string()
    }
}

fn image_config(
    entrypoint: Option<Vec<&str>>,
    cmd: Option<Vec<&str>>,
    env: &[&str],
    user: &str,
    workdir: &str,
) -> ImageConfiguration {
    let owned = |v: Vec<&str>| v.into_iter().map(str::to_owned).collect::<Vec<_>>();
    let mut config = ConfigBuilder::default()
        .env(owned(env.to_vec()))
        .user(user)
        .working_dir(workdir)
        .build()
        .unwrap();
    config.set_entrypoint(entrypoint.map(owned));
    config.set_cmd(cmd.map(owned));
    ImageConfigurationBuilder::default()
        .config(config)
        .build()
        .unwrap()
}

fn container() -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "web".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: "sha256:abc".into(),
            user_specified_image: "registry.local/web:1".into(),
            ..Default::default()
        }),
        linux: Some(LinuxContainerConfig::default()),
        ..Default::default()
    }
}

fn security(config: &mut ContainerConfig) -> &mut LinuxContainerSecurityContext {
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
}

fn resources(config: &mut ContainerConfig) -> &mut LinuxContainerResources {
    config
        .linux
        .get_or_insert_with(Default::default)
        .resources
        .get_or_insert_with(Default::default)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn mount<'a>(spec: &'a Value, dest: &str) -> Option<&'a Value> {
    spec["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == dest)
}

fn namespaces(spec: &Value) -> Vec<(String, Option<String>)> {
    spec["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["type"].as_str().unwrap().to_owned(),
                n["path"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

#[test]
fn args_follow_containerd_rules() {
    let mut f = Fixture::new();
    let mut c = container();
    assert_eq!(f.json(&c)["process"]["args"], json!(["/entry", "serve"]));
    c.args = vec!["--port".into(), "80".into()];
    assert_eq!(
        f.json(&c)["process"]["args"],
        json!(["/entry", "--port", "80"])
    );
    c.command = vec!["/bin/sh".into()];
    assert_eq!(
        f.json(&c)["process"]["args"],
        json!(["/bin/sh", "--port", "80"])
    );
    c.args.clear();
    // A command drops the image's Cmd too.
    assert_eq!(f.json(&c)["process"]["args"], json!(["/bin/sh"]));

    f.image = image_config(Some(vec![""]), Some(vec!["run"]), &[], "", "");
    assert_eq!(f.json(&container())["process"]["args"], json!(["run"]));
    f.image = image_config(None, None, &[], "", "");
    let err = f.err(&container());
    assert!(
        err.contains("\"web\"") && err.contains("no command"),
        "{err}"
    );
}

#[test]
fn env_layers_override_by_key() {
    let f = Fixture::new();
    let mut c = container();
    c.envs = vec![
        KeyValue {
            key: "LANG".into(),
            value: "en_US.UTF-8".into(),
        },
        KeyValue {
            key: "EXTRA".into(),
            value: "a=b".into(),
        },
    ];
    assert_eq!(
        strings(&f.json(&c)["process"]["env"]),
        [
            "PATH=/app/bin",
            "HOSTNAME=web-0",
            "LANG=en_US.UTF-8",
            "EXTRA=a=b"
        ]
    );
    let mut f = Fixture::new();
    f.image = image_config(Some(vec!["/x"]), None, &[], "", "");
    f.sandbox.hostname.clear();
    assert_eq!(
        strings(&f.json(&container())["process"]["env"]),
        [DEFAULT_PATH_ENV, "HOSTNAME=node-1"]
    );
}

#[test]
fn cwd_terminal_and_root() {
    let mut f = Fixture::new();
    let mut c = container();
    let spec = f.json(&c);
    assert_eq!(spec["process"]["cwd"], "/");
    assert_eq!(spec["process"]["terminal"], false);
    assert_eq!(spec["root"]["path"], f.rootfs.path().to_str().unwrap());
    assert_eq!(spec["root"]["readonly"], false);
    assert!(spec["process"].get("rlimits").is_none());

    f.image = image_config(Some(vec!["/x"]), None, &[], "", "/srv");
    assert_eq!(f.json(&c)["process"]["cwd"], "/srv");
    c.working_dir = "/data".into();
    c.tty = true;
    security(&mut c).readonly_rootfs = true;
    let spec = f.json(&c);
    assert_eq!(spec["process"]["cwd"], "/data");
    assert_eq!(spec["process"]["terminal"], true);
    assert_eq!(spec["root"]["readonly"], true);
    c.working_dir = "data".into();
    let err = f.err(&c);
    assert!(err.contains("working_dir \"data\""), "{err}");
}

#[test]
fn user_from_cri_or_image() {
    let mut f = Fixture::new();
    let mut c = container();
    let user = |spec: &Value| spec["process"]["user"].clone();
    assert_eq!(
        user(&f.json(&c)),
        json!({"uid": 0, "gid": 0, "additionalGids": [0]})
    );
    f.image = image_config(Some(vec!["/x"]), None, &[], "app", "");
    assert_eq!(
        user(&f.json(&c)),
        json!({"uid": 1000, "gid": 1000, "additionalGids": [1000, 10]})
    );
    let sc = security(&mut c);
    sc.run_as_user = Some(Int64Value { value: 1000 });
    sc.run_as_group = Some(Int64Value { value: 3000 });
    sc.supplemental_groups = vec![4000, 10];
    assert_eq!(
        user(&f.json(&c)),
        json!({"uid": 1000, "gid": 3000, "additionalGids": [3000, 10, 4000]})
    );
    security(&mut c).supplemental_groups_policy = SupplementalGroupsPolicy::Strict as i32;
    assert_eq!(
        user(&f.json(&c)),
        json!({"uid": 1000, "gid": 3000, "additionalGids": [3000, 4000, 10]})
    );

    let mut c = container();
    security(&mut c).run_as_username = "root".into();
    assert_eq!(user(&f.json(&c))["uid"], 0);
    security(&mut c).run_as_username = "ghost".into();
    assert!(f.err(&c).contains("\"ghost\""));

    let mut c = container();
    security(&mut c).run_as_group = Some(Int64Value { value: 5 });
    let err = f.err(&c);
    assert!(err.contains("run_as_group \"5\""), "{err}");
    security(&mut c).run_as_user = Some(Int64Value { value: -1 });
    let err = f.err(&c);
    assert!(err.contains("run_as_user \"-1\""), "{err}");
}

#[test]
fn default_mounts_and_sandbox_files() {
    let f = Fixture::new();
    let spec = f.json(&container());
    let dests: Vec<&str> = spec["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["destination"].as_str().unwrap())
        .collect();
    assert_eq!(
        dests,
        [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/mqueue",
            "/sys",
            "/sys/fs/cgroup",
            "/etc/hostname",
            "/etc/resolv.conf",
            "/dev/shm",
        ]
    );
    assert!(strings(&mount(&spec, "/sys").unwrap()["options"]).contains(&"ro".to_owned()));
    let shm = mount(&spec, "/dev/shm").unwrap();
    assert_eq!(shm["source"], "/run/bosun/sb-1/shm");
    assert_eq!(strings(&shm["options"]), ["rbind", "rprivate", "rw"]);
    let hostname = mount(&spec, "/etc/hostname").unwrap();
    assert_eq!(hostname["source"], "/var/lib/bosun/sb-1/hostname");
    assert_eq!(hostname["type"], "bind");
    assert_eq!(spec["hostname"], "web-0");

    // Host IPC: the host's /dev/shm; readonly rootfs: sandbox files ro.
    let mut c = container();
    let sc = security(&mut c);
    sc.readonly_rootfs = true;
    sc.namespace_options = Some(NamespaceOption {
        ipc: NamespaceMode::Node as i32,
        ..Default::default()
    });
    let spec = f.json(&c);
    assert_eq!(mount(&spec, "/dev/shm").unwrap()["source"], "/dev/shm");
    assert!(
        strings(&mount(&spec, "/etc/resolv.conf").unwrap()["options"]).contains(&"ro".to_owned())
    );
}

#[test]
fn cri_mounts_with_propagation() {
    let f = Fixture::new();
    let mut c = container();
    let m = |container_path: &str, host_path: &str, propagation: MountPropagation| CriMount {
        container_path: container_path.into(),
        host_path: host_path.into(),
        propagation: propagation as i32,
        ..Default::default()
    };
    c.mounts = vec![
        m(
            "/data/cache/",
            "/host/cache",
            MountPropagation::PropagationHostToContainer,
        ),
        CriMount {
            readonly: true,
            recursive_read_only: true,
            ..m("/data", "/host/data", MountPropagation::PropagationPrivate)
        },
        m(
            "/etc/hosts",
            "/host/hosts",
            MountPropagation::PropagationPrivate,
        ),
        CriMount {
            selinux_relabel: true,
            ..m(
                "/dev/shm",
                "/host/shm",
                MountPropagation::PropagationPrivate,
            )
        },
    ];
    let spec = f.json(&c);
    let binds: Vec<(&str, &str)> = spec["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["type"] == "bind")
        .map(|m| {
            (
                m["destination"].as_str().unwrap(),
                m["source"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        binds,
        [
            ("/data", "/host/data"),
            ("/etc/hostname", "/var/lib/bosun/sb-1/hostname"),
            ("/etc/resolv.conf", "/var/lib/bosun/sb-1/resolv.conf"),
            ("/data/cache", "/host/cache"),
            ("/etc/hosts", "/host/hosts"),
            ("/dev/shm", "/host/shm"),
        ]
    );
    assert_eq!(
        strings(&mount(&spec, "/data").unwrap()["options"]),
        ["rbind", "rprivate", "ro", "rro"]
    );
    assert_eq!(
        strings(&mount(&spec, "/data/cache").unwrap()["options"]),
        ["rbind", "rslave", "rw"]
    );
    assert_eq!(spec["linux"]["rootfsPropagation"], "rslave");

    c.mounts.push(m(
        "/shared",
        "/host/shared",
        MountPropagation::PropagationBidirectional,
    ));
    assert_eq!(f.json(&c)["linux"]["rootfsPropagation"], "rshared");

    // A /dev bind replaces every default mount under /dev.
    let mut c = container();
    c.mounts = vec![m("/dev", "/dev", MountPropagation::PropagationPrivate)];
    let spec = f.json(&c);
    assert!(mount(&spec, "/dev/pts").is_none());
    assert!(mount(&spec, "/dev/mqueue").is_none());
    assert_eq!(mount(&spec, "/dev").unwrap()["type"], "bind");

    for (bad, field) in [
        (
            m("data", "/x", MountPropagation::PropagationPrivate),
            "mounts.container_path \"data\"",
        ),
        (
            m("/data", "x", MountPropagation::PropagationPrivate),
            "mounts.host_path \"x\"",
        ),
        (
            CriMount {
                propagation: 9,
                ..m("/d", "/x", MountPropagation::PropagationPrivate)
            },
            "mounts.propagation \"9\"",
        ),
        (
            CriMount {
                recursive_read_only: true,
                ..m("/d", "/x", MountPropagation::PropagationPrivate)
            },
            "mounts.recursive_read_only \"/d\"",
        ),
    ] {
        let mut c = container();
        c.mounts = vec![bad];
        let err = f.err(&c);
        assert!(err.contains(field), "{field}: {err}");
    }

    // An image volume has no host path; it is unsupported, not invalid.
    let mut c = container();
    c.mounts = vec![CriMount {
        image: Some(k8s_cri::v1::ImageSpec {
            image: "busybox".into(),
            ..Default::default()
        }),
        ..m("/mnt/image", "", MountPropagation::PropagationPrivate)
    }];
    assert!(matches!(
        f.build(&c),
        Err(SpecError::Unsupported {
            field: "mounts.image",
            ..
        })
    ));
}

#[test]
fn devices_and_cgroup_rules() {
    let f = Fixture::new();
    let mut c = container();
    c.devices = vec![Device {
        container_path: "/dev/mynull".into(),
        host_path: "/dev/null".into(),
        permissions: "rw".into(),
    }];
    let spec = f.json(&c);
    let dev = &spec["linux"]["devices"][0];
    assert_eq!(dev["path"], "/dev/mynull");
    assert_eq!(
        (
            dev["type"].as_str(),
            dev["major"].as_i64(),
            dev["minor"].as_i64()
        ),
        (Some("c"), Some(1), Some(3))
    );
    assert_eq!(
        spec["linux"]["resources"]["devices"],
        json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rw"}
        ])
    );

    c.devices[0].permissions = "rwx".into();
    assert!(f.err(&c).contains("devices.permissions \"rwx\""));
    c.devices[0].permissions = "r".into();
    c.devices[0].host_path = "/etc/passwd".into();
    assert!(f.err(&c).contains("devices.host_path \"/etc/passwd\""));
    c.devices[0].host_path = "/dev/definitely-missing".into();
    assert!(f.err(&c).contains("/dev/definitely-missing"));
    c.devices[0].container_path = "dev/x".into();
    assert!(f.err(&c).contains("devices.container_path \"dev/x\""));
}

#[test]
fn resources_and_oom_clamp() {
    let mut f = Fixture::new();
    let mut c = container();
    // No resources: no oom_score_adj, empty limits.
    assert!(f.json(&c)["process"].get("oomScoreAdj").is_none());
    let r = resources(&mut c);
    r.cpu_shares = 512;
    r.cpu_quota = 50_000;
    r.cpu_period = 100_000;
    r.cpuset_cpus = "0-1".into();
    r.memory_limit_in_bytes = 64 << 20;
    r.oom_score_adj = -998;
    r.hugepage_limits = vec![k8s_cri::v1::HugepageLimit {
        page_size: "2MB".into(),
        limit: 4 << 20,
    }];
    let spec = f.json(&c);
    let res = &spec["linux"]["resources"];
    assert_eq!(
        res["cpu"],
        json!({"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1"})
    );
    assert_eq!(res["memory"], json!({"limit": 67108864, "swap": 67108864}));
    assert_eq!(
        res["hugepageLimits"],
        json!([{"pageSize": "2MB", "limit": 4194304}])
    );
    assert_eq!(spec["process"]["oomScoreAdj"], -500);

    resources(&mut c).oom_score_adj = 900;
    resources(&mut c).memory_swap_limit_in_bytes = 128 << 20;
    let spec = f.json(&c);
    assert_eq!(spec["process"]["oomScoreAdj"], 900);
    assert_eq!(spec["linux"]["resources"]["memory"]["swap"], 128 << 20);
    f.host.swap_limit = false;
    assert!(f.json(&c)["linux"]["resources"]["memory"]
        .get("swap")
        .is_none());

    resources(&mut c).oom_score_adj = 1001;
    assert!(f.err(&c).contains("oom_score_adj \"1001\""));
    resources(&mut c).oom_score_adj = 0;
    resources(&mut c).cpu_shares = -2;
    assert!(f.err(&c).contains("cpu_shares \"-2\""));
    resources(&mut c).cpu_shares = 0;

    resources(&mut c).unified = [("memory.high".to_owned(), "1G".to_owned())].into();
    assert!(f.err(&c).contains("unified"));
    f.host.cgroup_v2 = true;
    let spec = f.json(&c);
    assert_eq!(spec["linux"]["resources"]["unified"]["memory.high"], "1G");
    assert!(namespaces(&spec).contains(&("cgroup".to_owned(), None)));
}

#[test]
fn capabilities_privileged_and_nnp() {
    let mut f = Fixture::new();
    let mut c = container();
    let spec = f.json(&c);
    let caps = &spec["process"]["capabilities"];
    assert_eq!(strings(&caps["bounding"]).len(), 14);
    assert_eq!(strings(&caps["effective"]).len(), 14);
    assert!(strings(&caps["ambient"]).is_empty());
    // Off is absent (libcontainer mistakes an explicit false for "set").
    assert!(spec["process"].get("noNewPrivileges").is_none());
    assert!(
        spec["linux"].get("maskedPaths").is_none()
            || strings(&spec["linux"]["maskedPaths"]).is_empty()
    );

    let sc = security(&mut c);
    sc.no_new_privs = true;
    sc.capabilities = Some(CriCapability {
        add_capabilities: vec!["SYS_ADMIN".into()],
        drop_capabilities: vec!["NET_RAW".into()],
        add_ambient_capabilities: vec![],
    });
    sc.masked_paths = vec!["/proc/kcore".into()];
    sc.readonly_paths = vec!["/proc/sys".into()];
    let spec = f.json(&c);
    let bounding = strings(&spec["process"]["capabilities"]["bounding"]);
    assert!(bounding.contains(&"CAP_SYS_ADMIN".to_owned()));
    assert!(!bounding.contains(&"CAP_NET_RAW".to_owned()));
    assert_eq!(spec["process"]["noNewPrivileges"], true);
    assert_eq!(spec["linux"]["maskedPaths"], json!(["/proc/kcore"]));
    assert_eq!(spec["linux"]["readonlyPaths"], json!(["/proc/sys"]));

    security(&mut c)
        .capabilities
        .as_mut()
        .unwrap()
        .add_capabilities = vec!["BOGUS".into()];
    assert!(f.err(&c).contains("add_capabilities \"BOGUS\""));

    // Privileged needs a privileged sandbox.
    let mut c = container();
    let sc = security(&mut c);
    sc.privileged = true;
    sc.masked_paths = vec!["/proc/kcore".into()];
    sc.seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    assert!(f.err(&c).contains("sandbox sb-1 is not privileged"));
    f.sandbox.linux.as_mut().unwrap().security_context = Some(LinuxSandboxSecurityContext {
        privileged: true,
        ..Default::default()
    });
    let spec = f.json(&c);
    assert_eq!(
        strings(&spec["process"]["capabilities"]["bounding"]).len(),
        41
    );
    assert!(strings(&spec["linux"]["maskedPaths"]).is_empty());
    assert!(spec["linux"].get("seccomp").is_none());
    assert!(strings(&mount(&spec, "/sys").unwrap()["options"]).contains(&"rw".to_owned()));
    assert_eq!(
        spec["linux"]["resources"]["devices"],
        json!([{"allow": true, "access": "rwm"}])
    );
}

#[test]
fn seccomp_profiles() {
    let mut f = Fixture::new();
    let mut c = container();
    assert!(f.json(&c)["linux"].get("seccomp").is_none());
    security(&mut c).seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    let spec = f.json(&c);
    assert_eq!(spec["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");

    let profiles = tempfile::tempdir().unwrap();
    fs::write(
        profiles.path().join("audit.json"),
        r#"{"defaultAction":"SCMP_ACT_LOG"}"#,
    )
    .unwrap();
    f.host.seccomp_profile_root = profiles.path().to_owned();
    let localhost = |reference: &str| SecurityProfile {
        profile_type: ProfileType::Localhost as i32,
        localhost_ref: reference.to_owned(),
    };
    security(&mut c).seccomp = Some(localhost(
        profiles.path().join("audit.json").to_str().unwrap(),
    ));
    assert_eq!(
        f.json(&c)["linux"]["seccomp"]["defaultAction"],
        "SCMP_ACT_LOG"
    );
    security(&mut c).seccomp = Some(localhost("missing.json"));
    assert!(f.err(&c).contains("missing.json"));
    security(&mut c).seccomp = Some(localhost("../../etc/passwd"));
    assert!(f
        .err(&c)
        .contains("seccomp localhost profile \"../../etc/passwd\""));
    security(&mut c).seccomp = Some(SecurityProfile {
        profile_type: ProfileType::Unconfined as i32,
        localhost_ref: String::new(),
    });
    assert!(f.json(&c)["linux"].get("seccomp").is_none());

    // The deprecated string field.
    #[allow(deprecated)]
    {
        security(&mut c).seccomp = None;
        security(&mut c).seccomp_profile_path = "runtime/default".into();
        assert!(f.json(&c)["linux"].get("seccomp").is_some());
        security(&mut c).seccomp_profile_path = "localhost/audit.json".into();
        assert_eq!(
            f.json(&c)["linux"]["seccomp"]["defaultAction"],
            "SCMP_ACT_LOG"
        );
        security(&mut c).seccomp_profile_path = "apparmor/x".into();
        assert!(f.err(&c).contains("seccomp_profile_path \"apparmor/x\""));
    }
}

#[test]
fn namespace_modes() {
    let mut f = Fixture::new();
    let mut c = container();
    let own = |t: &str| (t.to_owned(), None::<String>);
    let joined = |t: &str, p: &str| (t.to_owned(), Some(p.to_owned()));
    assert_eq!(
        namespaces(&f.json(&c)),
        [
            own("mount"),
            joined("network", "/run/netns/sb-1"),
            joined("uts", "/run/bosun/ns/sb-1/uts"),
            joined("ipc", "/run/bosun/ns/sb-1/ipc"),
            joined("pid", "/proc/42/ns/pid"),
        ]
    );
    let opts = |network: NamespaceMode, pid: NamespaceMode, ipc: NamespaceMode| {
        Some(NamespaceOption {
            network: network as i32,
            pid: pid as i32,
            ipc: ipc as i32,
            ..Default::default()
        })
    };
    security(&mut c).namespace_options = opts(
        NamespaceMode::Node,
        NamespaceMode::Container,
        NamespaceMode::Node,
    );
    let spec = f.json(&c);
    assert_eq!(namespaces(&spec), [own("mount"), own("pid")]);
    assert!(spec.get("hostname").is_none());

    security(&mut c).namespace_options =
        opts(NamespaceMode::Pod, NamespaceMode::Node, NamespaceMode::Pod);
    assert!(!namespaces(&f.json(&c)).iter().any(|(t, _)| t == "pid"));

    security(&mut c).namespace_options = opts(
        NamespaceMode::Pod,
        NamespaceMode::Target,
        NamespaceMode::Pod,
    );
    assert!(f.err(&c).contains("namespace_options.pid \"TARGET\""));
    security(&mut c).namespace_options = opts(
        NamespaceMode::Container,
        NamespaceMode::Pod,
        NamespaceMode::Pod,
    );
    assert!(f
        .err(&c)
        .contains("namespace_options.network \"CONTAINER\" is not supported"));
    let mut userns = opts(NamespaceMode::Pod, NamespaceMode::Pod, NamespaceMode::Pod);
    userns.as_mut().unwrap().userns_options = Some(UserNamespace::default());
    security(&mut c).namespace_options = userns;
    assert!(f.err(&c).contains("userns_options.mode \"POD\""));

    // Host network sandbox: no paths, so the host's namespaces.
    f.sandbox.hostname = "node-1".into();
    let c = container();
    let ctx = SandboxContext {
        netns: None,
        utsns: None,
        ..f.context()
    };
    let spec = container_spec(
        "c-1",
        &ctx,
        &c,
        &ImageContext {
            config: &f.image,
            rootfs: f.rootfs.path(),
        },
        &f.host,
    )
    .unwrap();
    let spec = serde_json::to_value(spec).unwrap();
    assert!(!namespaces(&spec)
        .iter()
        .any(|(t, _)| t == "network" || t == "uts"));
    assert!(spec.get("hostname").is_none());
}

#[test]
fn cgroups_path_sysctls_and_annotations() {
    let mut f = Fixture::new();
    let mut c = container();
    c.annotations = [
        ("team".to_owned(), "web".to_owned()),
        (annotations::SANDBOX_ID.to_owned(), "forged".to_owned()),
    ]
    .into();
    let spec = f.json(&c);
    assert_eq!(
        spec["linux"]["cgroupsPath"],
        "/kubepods/besteffort/poduid-1/c-1"
    );
    assert_eq!(
        spec["linux"]["sysctl"],
        json!({"net.ipv4.ip_unprivileged_port_start": "0"})
    );
    assert_eq!(
        spec["annotations"],
        json!({
            "team": "web",
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "sb-1",
            "io.kubernetes.cri.sandbox-namespace": "default",
            "io.kubernetes.cri.sandbox-uid": "uid-1",
            "io.kubernetes.cri.sandbox-name": "web-0",
            "io.kubernetes.cri.container-name": "web",
            "io.kubernetes.cri.image-name": "registry.local/web:1",
        })
    );
    f.host.systemd_cgroup = true;
    f.sandbox.linux.as_mut().unwrap().cgroup_parent = "kubepods-besteffort-poduid_1.slice".into();
    assert_eq!(
        f.json(&c)["linux"]["cgroupsPath"],
        "kubepods-besteffort-poduid_1.slice:bosun:c-1"
    );
    f.sandbox.linux.as_mut().unwrap().cgroup_parent.clear();
    assert!(f.json(&c)["linux"].get("cgroupsPath").is_none());
}

#[test]
fn clean_path_like_go() {
    assert_eq!(clean_path("/a//b/./c/"), "/a/b/c");
    assert_eq!(clean_path("/../a/../../b"), "/b");
    assert_eq!(clean_path("/"), "/");
}
