//! bosun-runc on a pure cgroup v2 system: this host is v1 hybrid, so a QEMU
//! guest (Debian's kernel, TCG) runs the containers. Limits must show inside
//! the container and be enforced, and delete must remove the cgroup.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bosun_testsupport::bundle::Bundle;
use bosun_vm_tests::{boot, Initramfs};

const STAGE2: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t cgroup2 none /sys/fs/cgroup
echo "+memory +pids +cpu" > /sys/fs/cgroup/cgroup.subtree_control
echo "BOSUN setup=$(awk '$2 == "/sys/fs/cgroup" {print $3}' /proc/mounts)"
R="/usr/bin/bosun-runc --root /run/bosun"
$R run --bundle /bundles/limits c1 </dev/null
echo "BOSUN limits_exit=$?"
$R run --bundle /bundles/oom c2 </dev/null
echo "BOSUN oom_exit=$?"
$R run -d --bundle /bundles/sleep c3 </dev/null
echo "BOSUN c3_memory_max=$(cat /sys/fs/cgroup/bosun/c3/memory.max)"
$R update --memory 48m --pids-limit 5 c3
echo "BOSUN c3_updated=$(cat /sys/fs/cgroup/bosun/c3/memory.max),$(cat /sys/fs/cgroup/bosun/c3/pids.max)"
echo "BOSUN c3_stats_pids=$($R events --stats c3 | grep -o '"current":[0-9]*' | head -1)"
$R pause c3; echo "BOSUN c3_frozen=$(cat /sys/fs/cgroup/bosun/c3/cgroup.freeze)"
$R resume c3; $R kill c3 KILL; sleep 1; $R delete c3
echo "BOSUN cgroups_left=$(find /sys/fs/cgroup/bosun -mindepth 1 -type d | wc -l)"
echo BOSUN done
poweroff -f
"#;

fn bundle(dir: &std::path::Path, args: &[&str], memory: i64, pids: i64, id: &str) -> Bundle {
    let mut b = Bundle::busybox(dir, args).unwrap();
    b.set_memory_limit(memory).set_pids_limit(pids);
    b.set_cgroups_path(&format!("/bosun/{id}"));
    // With its own cgroup namespace the container sees its cgroup as the root.
    b.config["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "cgroup"}));
    // The guest's rootfs is the whole bundle: point root at an absolute path.
    b.config["root"]["path"] = serde_json::json!(format!(
        "/bundles/{}/rootfs",
        dir.file_name().unwrap().to_str().unwrap()
    ));
    b
}

fn value<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    console
        .lines()
        // SeaBIOS leaves terminal escapes ahead of the first line.
        .filter_map(|l| l.find("BOSUN ").map(|i| &l[i + "BOSUN ".len()..]))
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
}

#[test]
fn limits_on_pure_cgroup_v2() {
    if !bosun_testsupport::privileged::require_root("cgroup v2 VM test") {
        return;
    }
    if !bosun_vm_tests::available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs qemu-system-x86_64 and linux-image-amd64 (scripts/setup.sh installs them)"
        );
        eprintln!("skipping: no qemu-system-x86_64 or /boot/vmlinuz-*");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let fs = Initramfs::new(&root).unwrap();
    fs.add_binary(
        std::path::Path::new(env!("CARGO_BIN_EXE_bosun-runc")),
        "usr/bin/bosun-runc",
    )
    .unwrap();
    fs.add_file("stage2", STAGE2.as_bytes(), 0o755).unwrap();

    let limits = "echo memory.max=$(cat /sys/fs/cgroup/memory.max); \
                  echo pids.max=$(cat /sys/fs/cgroup/pids.max); \
                  ok=0; for i in 1 2 3 4 5 6 7 8 9 10 11 12; do \
                  if (sleep 3 &) 2>/dev/null; then ok=$((ok+1)); fi; done; echo forks=$ok";
    let b = bundle(
        &root.join("bundles/limits"),
        &["sh", "-c", limits],
        64 << 20,
        8,
        "c1",
    );
    b.write().unwrap();
    let b = bundle(
        &root.join("bundles/oom"),
        &["tail", "/dev/zero"],
        32 << 20,
        20,
        "c2",
    );
    b.write().unwrap();
    let b = bundle(
        &root.join("bundles/sleep"),
        &["sleep", "1000"],
        64 << 20,
        20,
        "c3",
    );
    b.write().unwrap();

    let initrd = tmp.path().join("initrd.cpio");
    fs.pack(&initrd).unwrap();
    let console = boot(&initrd, 768, Duration::from_secs(240)).unwrap();
    let shown = || format!("console:\n{console}");

    assert_eq!(value(&console, "setup"), Some("cgroup2"), "{}", shown());
    assert!(console.contains("memory.max=67108864"), "{}", shown());
    assert!(console.contains("pids.max=8"), "{}", shown());
    let forks: u32 = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("forks="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(99);
    assert!(
        forks < 12,
        "pids limit not enforced: {forks} forks; {}",
        shown()
    );
    assert_eq!(value(&console, "limits_exit"), Some("0"), "{}", shown());
    assert_eq!(
        value(&console, "oom_exit"),
        Some("137"),
        "OOM kill; {}",
        shown()
    );
    assert_eq!(
        value(&console, "c3_memory_max"),
        Some("67108864"),
        "{}",
        shown()
    );
    assert_eq!(
        value(&console, "c3_updated"),
        Some("50331648,5"),
        "{}",
        shown()
    );
    assert_eq!(
        value(&console, "c3_stats_pids"),
        Some("\"current\":1"),
        "{}",
        shown()
    );
    assert_eq!(value(&console, "c3_frozen"), Some("1"), "{}", shown());
    assert_eq!(value(&console, "cgroups_left"), Some("0"), "{}", shown());
    assert!(console.contains("BOSUN done"), "{}", shown());
}
