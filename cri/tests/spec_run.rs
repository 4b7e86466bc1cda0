//! Privileged: a spec from `bosun_cri::spec::container_spec` for a typical
//! pod container (non-root user, RuntimeDefault seccomp, no_new_privs,
//! negative oom_score_adj, sandbox hostname file and UTS namespace) runs
//! under our OCI runtime.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{ensure, Context, Result};
use bosun_cri::spec::{container_spec, Host, ImageContext, SandboxContext};
use bosun_testsupport::{host, privileged, rootfs};
use k8s_cri::v1::{
    security_profile::ProfileType, ContainerConfig, ContainerMetadata, Int64Value,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, SecurityProfile,
};

/// `<target>/<triple>/debug/bosun-runc`, built if missing.
fn bosun_runc() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no grandparent dir")?;
    let runc = dir.join("bosun-runc");
    if !runc.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "bosun-runtime"])
            .status()?;
        ensure!(status.success(), "cargo build -p bosun-runtime failed");
    }
    Ok(runc)
}

/// A process holding a fresh UTS namespace, as a sandbox's pinned one;
/// killed on drop.
struct UtsHolder(Child);

impl Drop for UtsHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn typical_pod_container_runs() -> Result<()> {
    if !privileged::require_root("spec_run") {
        return Ok(());
    }
    let runc = bosun_runc()?;
    let dir = tempfile::tempdir()?;
    let bundle = dir.path().join("bundle");
    let rootfs_dir = bundle.join("rootfs");
    rootfs::busybox(&rootfs_dir)?;
    let hostname_file = dir.path().join("hostname");
    std::fs::write(&hostname_file, "web-0\n")?;

    let holder = UtsHolder(
        Command::new("unshare")
            // Like a sandbox's holder, it names its UTS namespace; runtimes
            // joining a namespace by path leave its hostname alone.
            .args(["--uts", "sh", "-c", "hostname web-0 && exec sleep 60"])
            .stdin(Stdio::null())
            .spawn()
            .context("spawn unshare")?,
    );
    let utsns = PathBuf::from(format!("/proc/{}/ns/uts", holder.0.id()));
    // Wait until unshare has exec'd sleep inside the new namespace.
    let host_uts = std::fs::read_link("/proc/self/ns/uts")?;
    host::poll(std::time::Duration::from_secs(5), || {
        std::fs::read_link(&utsns).ok().filter(|ns| *ns != host_uts)
    })
    .context("holder never entered a new UTS namespace")?;

    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "web-0".into(),
            namespace: "default".into(),
            uid: "uid-1".into(),
            attempt: 0,
        }),
        hostname: "web-0".into(),
        ..Default::default()
    };
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "web".into(),
            attempt: 0,
        }),
        command: vec!["/bin/sh".into(), "-c".into()],
        args: vec!["id -u; id -G; cat /etc/hostname; hostname".into()],
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                // Below what this process may set without CAP_SYS_RESOURCE:
                // must be clamped or the runtime fails.
                oom_score_adj: -998,
                ..Default::default()
            }),
            security_context: Some(LinuxContainerSecurityContext {
                run_as_user: Some(Int64Value { value: 1000 }),
                no_new_privs: true,
                seccomp: Some(SecurityProfile {
                    profile_type: ProfileType::RuntimeDefault as i32,
                    localhost_ref: String::new(),
                }),
                masked_paths: vec!["/proc/kcore".into()],
                readonly_paths: vec!["/proc/sys".into()],
                // POD network with no sandbox netns path: the host's network
                // but the holder's UTS namespace, so the hostname is ours.
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    };
    let image = oci_spec::image::ImageConfiguration::default();
    let context = SandboxContext {
        id: "sb-1",
        config: &sandbox,
        netns: None,
        ipcns: None,
        utsns: Some(&utsns),
        pidns: None,
        target_pidns: None,
        hostname_file: Some(&hostname_file),
        resolv_conf: None,
        hosts_file: None,
        shm: None,
    };
    let host_facts = Host::detect(false, PathBuf::from("/var/lib/kubelet/seccomp"));
    let spec = container_spec(
        "spec-run",
        &context,
        &config,
        &ImageContext {
            config: &image,
            rootfs: &rootfs_dir,
        },
        &host_facts,
    )?;
    spec.save(bundle.join("config.json"))?;

    let id = host::unique_id("spec-run");
    let out = Command::new(&runc)
        .arg("--root")
        .arg(dir.path().join("state"))
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .output()
        .context("run bosun-runc")?;
    drop(holder);
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "bosun-runc run failed ({}): stdout {stdout:?} stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    // uid 1000 (bosun), primary gid 1000 plus its /etc/group membership 2000.
    assert_eq!(lines, ["1000", "1000 2000", "web-0", "web-0"], "{stdout}");
    Ok(())
}
