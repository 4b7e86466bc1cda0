//! Our fixtures must be accepted by the reference tools, not just by our own
//! code: skopeo and umoci read the image layout, runc runs the bundle.
//! Each test skips when its tool is not installed (scripts/setup.sh installs them).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use bosun_testsupport::{layout, privileged, rootfs, Bundle};

/// Whether `tool` is on PATH, printing a skip line when it is not.
fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
    if !found {
        eprintln!("skipping: {tool} not installed");
    }
    found
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn busybox_layout(tmp: &Path, reference: &str) -> layout::ImageInfo {
    let root = tmp.join("rootfs");
    rootfs::busybox(&root).unwrap();
    layout::write(&tmp.join("image"), reference, &root).unwrap()
}

#[test]
fn skopeo_inspects_layout() {
    if !have("skopeo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let info = busybox_layout(tmp.path(), "localhost:5000/busybox:test");
    let image = format!("oci:{}:test", tmp.path().join("image").display());
    let out = run(Command::new("skopeo").args(["inspect", &image]));
    let inspected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspected["Digest"], info.manifest_digest.as_str());
    assert_eq!(inspected["Layers"][0], info.layer_digests[0].as_str());
    assert_eq!(inspected["Os"], "linux");

    let out = run(Command::new("skopeo").args(["inspect", "--config", &image]));
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"][0], info.diff_ids[0].as_str());
}

#[test]
fn umoci_unpacks_layout() {
    if !have("umoci") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    busybox_layout(tmp.path(), "busybox:test");
    let image = format!("{}:test", tmp.path().join("image").display());
    let bundle = tmp.path().join("unpacked");
    let mut cmd = Command::new("umoci");
    cmd.arg("unpack");
    if !privileged::is_root() {
        cmd.arg("--rootless");
    }
    run(cmd.arg("--image").arg(&image).arg(&bundle));
    let sh = std::fs::read_link(bundle.join("rootfs/bin/sh")).unwrap();
    assert_eq!(sh, Path::new("busybox"));
    assert!(bundle.join("rootfs/etc/passwd").is_file());
}

#[test]
fn runc_runs_bundle() {
    if !have("runc") || !privileged::require_root("runc_runs_bundle") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut bundle = Bundle::busybox(
        tmp.path(),
        &["sh", "-c", "hostname; id -G bosun; echo $GREETING"],
    )
    .unwrap();
    bundle.set_env_var("GREETING", "hi");
    bundle.write().unwrap();
    let id = format!("bosun-testsupport-{}", std::process::id());
    let out = run(Command::new("runc")
        .args(["run", "--bundle"])
        .arg(bundle.dir())
        .arg(&id));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "bosun\n1000 2000\nhi\n"
    );
}
