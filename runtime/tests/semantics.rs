//! OCI runtime-spec semantics of `bosun-runc`, each proven by running a real
//! busybox container: lifecycle hooks, namespaces (also joined by path),
//! cgroup v1 resources, seccomp, capabilities, no_new_privs, rlimits,
//! oom_score_adj, sysctls, mounts and propagation, masked/readonly paths,
//! readonly rootfs, user/groups/umask, hostname/domainname, console socket,
//! pid file, preserved fds, exit codes and state transitions, plus a replay
//! of a CLI sequence that once left a killed container "running".
//!
//! Needs root (skips without it, fails under `CI`). Every test has a private
//! `--root`, bundle and unique id, captures the container's output through
//! files, and force-deletes its container (and any host namespace, process
//! or mount it made) on drop, also when it fails.
//!
//! Set `BOSUN_TEST_RUNTIME=/usr/sbin/runc` to run the same tests with runc,
//! to check that a test itself is right.

#![allow(clippy::unwrap_used)]

#[path = "semantics/harness.rs"]
mod harness;

use std::fs;
use std::io::{IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bosun_testsupport::host::poll;
use bosun_testsupport::Bundle;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde_json::{json, Value};

use harness::{
    ns_id, v1_controller, HelperProcess, HostMount, NetNs, Test, COMMAND_TIMEOUT, POLL_TIMEOUT,
};

/// The capabilities of `runc spec` (and of [`Bundle::busybox`]).
const DEFAULT_CAPS: &[&str] = &["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

/// Appends a mount to `config.mounts`.
fn add_mount(b: &mut Bundle, mount: Value) {
    b.config["mounts"].as_array_mut().unwrap().push(mount);
}

/// A writable tmpfs at /tmp (the rootfs is read-only in the default spec).
fn add_tmp(b: &mut Bundle) {
    add_mount(
        b,
        json!({ "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777"] }),
    );
}

/// A bind of host `src` at `dst` with `options` ("bind"/"rbind", ro/rw, propagation).
fn add_bind(b: &mut Bundle, src: &Path, dst: &str, options: &[&str]) {
    add_mount(
        b,
        json!({ "destination": dst, "type": "bind", "source": src, "options": options }),
    );
}

/// Sets the bounding, effective, permitted and ambient sets to `caps`.
fn set_caps(b: &mut Bundle, caps: &[&str]) {
    for set in ["bounding", "effective", "permitted", "ambient"] {
        b.config["process"]["capabilities"][set] = json!(caps);
    }
}

/// The `/proc/<pid>/status` mask of a capability list.
fn cap_mask(caps: &[&str]) -> String {
    let bit = |name: &str| match name {
        "CAP_CHOWN" => 0,
        "CAP_DAC_OVERRIDE" => 1,
        "CAP_FOWNER" => 3,
        "CAP_KILL" => 5,
        "CAP_NET_BIND_SERVICE" => 10,
        "CAP_MKNOD" => 27,
        "CAP_AUDIT_WRITE" => 29,
        other => panic!("cap_mask: add {other}"),
    };
    format!("{:016x}", caps.iter().fold(0u64, |m, c| m | 1 << bit(c)))
}

// ---------------------------------------------------------------- hooks --

/// A hook running host `/bin/sh` that logs `$0 $# $1 $HOOK_VAR` to
/// `dir/order` and saves the state it gets on stdin to `dir/<phase>.json`.
fn hook(phase: &str, dir: &str) -> Value {
    json!({
        "path": "/bin/sh",
        "args": ["sh", "-c",
                 format!("echo \"$0 $# $1 $HOOK_VAR\" >> {dir}/order; cat > {dir}/$0.json"),
                 phase, "arg1"],
        "env": [format!("HOOK_VAR=v-{phase}"), "PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
    })
}

/// Every hook phase, in the order and at the step the runtime spec says,
/// with the args, env and the state on stdin it says. Collects every
/// deviation and reports them together.
#[test]
fn hooks_run_in_spec_order_with_args_env_and_state() {
    let Some(t) = Test::new("hooks") else { return };
    let log = t.host_dir("hooklog");
    let host = log.to_str().unwrap();
    // startContainer runs in the container: its path and log resolve there.
    let mut b = t.bundle(&["sh", "-c", "echo container-ran >> /hooklog/order"]);
    add_bind(&mut b, &log, "/hooklog", &["rbind", "rw"]);
    b.config["hooks"] = json!({
        "prestart": [hook("prestart", host)],
        "createRuntime": [hook("createRuntime", host)],
        "createContainer": [hook("createContainer", host)],
        "startContainer": [hook("startContainer", "/hooklog")],
        "poststart": [hook("poststart", host)],
        "poststop": [hook("poststop", host)],
    });
    b.config["annotations"] = json!({ "org.bosun.test": "hooks" });
    let bundle_dir = b.dir().to_str().unwrap().to_owned();
    let order = || fs::read_to_string(log.join("order")).unwrap_or_default();
    let mut wrong: Vec<String> = Vec::new();
    let state_of = |phase: &str, wrong: &mut Vec<String>| -> Value {
        let text = fs::read_to_string(log.join(format!("{phase}.json"))).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or_else(|e| {
            wrong.push(format!("{phase}: no JSON state on stdin ({e}): {text:?}"));
            Value::Null
        })
    };
    let check = |ok: bool, what: String, wrong: &mut Vec<String>| {
        if !ok {
            wrong.push(what);
        }
    };
    let line = |phase: &str| format!("{phase} 1 arg1 v-{phase}\n");
    let create_phases = ["prestart", "createRuntime", "createContainer"];

    t.create(&b);
    let pid = t.state()["pid"].as_i64().unwrap();
    let after_create = order();
    check(
        after_create == create_phases.map(line).concat(),
        format!(
            "after create, want exactly prestart, createRuntime, createContainer:\n{after_create}"
        ),
        &mut wrong,
    );
    for phase in create_phases {
        let s = state_of(phase, &mut wrong);
        check(
            s["id"] == t.id.as_str() && s["bundle"] == bundle_dir.as_str(),
            format!("{phase}: id/bundle: {s}"),
            &mut wrong,
        );
        check(
            s["status"] == "creating",
            format!("{phase}: status: {s}"),
            &mut wrong,
        );
        check(
            s["ociVersion"].is_string(),
            format!("{phase}: ociVersion: {s}"),
            &mut wrong,
        );
    }
    // Runtime-namespace hooks after the namespaces exist: the host pid.
    for phase in ["prestart", "createRuntime"] {
        let s = state_of(phase, &mut wrong);
        check(
            s["pid"] == pid,
            format!("{phase}: pid {pid}: {s}"),
            &mut wrong,
        );
    }

    t.rt(&["start", &t.id]).ok();
    // poststart must be done when start returns; the container may still run.
    let after_start = order();
    check(
        after_start
            .starts_with(&[create_phases.map(line).concat(), line("startContainer")].concat())
            && after_start.contains(&line("poststart")),
        format!("after start, want startContainer then poststart:\n{after_start}"),
        &mut wrong,
    );
    // startContainer runs in the container's namespaces: status "created",
    // and the pid as the container sees it (1 in its own pid namespace).
    let s = state_of("startContainer", &mut wrong);
    check(
        s["id"] == t.id.as_str()
            && s["bundle"] == bundle_dir.as_str()
            && s["ociVersion"].is_string(),
        format!("startContainer: id/bundle/ociVersion: {s}"),
        &mut wrong,
    );
    check(
        s["annotations"]["org.bosun.test"] == "hooks",
        format!("startContainer: annotations: {s}"),
        &mut wrong,
    );
    check(
        s["status"] == "created" && s["pid"] == 1,
        format!("startContainer: status/pid: {s}"),
        &mut wrong,
    );
    let s = state_of("poststart", &mut wrong);
    check(
        s["pid"] == pid,
        format!("poststart: pid {pid}: {s}"),
        &mut wrong,
    );
    check(
        s["status"] == "running" || s["status"] == "created",
        format!("poststart: status: {s}"),
        &mut wrong,
    );

    t.wait_status("stopped", POLL_TIMEOUT);
    check(
        !order().contains("poststop"),
        format!("poststop before delete:\n{}", order()),
        &mut wrong,
    );
    t.rt(&["delete", &t.id]).ok();
    let all = order();
    check(
        all.contains("container-ran\n"),
        format!("process ran:\n{all}"),
        &mut wrong,
    );
    check(
        all.ends_with(&line("poststop")),
        format!("poststop last:\n{all}"),
        &mut wrong,
    );
    let s = state_of("poststop", &mut wrong);
    check(
        s["status"] == "stopped" && s["id"] == t.id.as_str(),
        format!("poststop: {s}"),
        &mut wrong,
    );
    assert!(
        wrong.is_empty(),
        "hooks deviate from the spec:\n- {}",
        wrong.join("\n- ")
    );
}

/// A failing createRuntime hook, or one running past its `timeout`, fails
/// `create` and leaves no container behind.
#[test]
fn failing_or_hung_create_hook_fails_create() {
    let Some(t) = Test::new("hookfail") else {
        return;
    };
    let mut b = t.bundle(&["true"]);
    for hook in [
        json!({ "path": "/bin/sh", "args": ["sh", "-c", "exit 3"] }),
        json!({ "path": "/bin/sleep", "args": ["sleep", "20"], "timeout": 1 }),
    ] {
        b.config["hooks"] = json!({ "createRuntime": [hook] });
        b.write().unwrap();
        let started = Instant::now();
        let out = t.rt(&["create", "--bundle", b.dir().to_str().unwrap(), &t.id]);
        assert_ne!(out.code(), 0, "{hook}: {out}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{hook}: the timeout was not enforced: {out}"
        );
        let state = t.rt(&["state", &t.id]);
        assert_eq!(state.code(), 1, "{hook}: container left: {state}");
        assert!(
            t.leftover_cgroups().is_empty(),
            "{hook}: {:?}",
            t.leftover_cgroups()
        );
    }
}

/// A failing startContainer hook stops the container before its process
/// runs, and `start` reports it (runc 1.1 exits 0 there, printing the error
/// on the container's stderr; the runtime spec says the runtime MUST
/// generate an error).
#[test]
fn failing_start_container_hook_fails_start() {
    let Some(t) = Test::new("starthookfail") else {
        return;
    };
    let log = t.host_dir("ran");
    let mut b = t.bundle(&["sh", "-c", "echo ran > /ran/ran"]);
    add_bind(&mut b, &log, "/ran", &["rbind", "rw"]);
    b.config["hooks"] = json!({ "startContainer": [
        { "path": "/bin/sh", "args": ["sh", "-c", "exit 3"] },
    ] });
    t.create(&b);
    let out = t.rt(&["start", &t.id]);
    if std::env::var_os(harness::RUNTIME_ENV).is_none() {
        assert_ne!(out.code(), 0, "{out}");
        assert!(out.stderr.contains("startContainer hook"), "{out}");
    }
    t.wait_status("stopped", POLL_TIMEOUT);
    assert!(!log.join("ran").exists(), "the process ran: {out}");
}

// ----------------------------------------------------------- namespaces --

/// The container joins a named network namespace and another process's UTS
/// and IPC namespaces by path, as a pod sandbox's containers do.
#[test]
fn joins_network_uts_and_ipc_namespaces_by_path() {
    let Some(t) = Test::new("nsjoin") else { return };
    let netns = NetNs::add(&format!("{}-net", &t.id[..t.id.len().min(20)]));
    // An address only this namespace has, to recognise it from inside.
    netns.ip(&["addr", "add", "10.199.77.1/32", "dev", "lo"]);
    // A "sandbox" process holding a UTS namespace (with its own hostname) and
    // an IPC namespace.
    let holder = HelperProcess(
        Command::new("unshare")
            .args([
                "--uts",
                "--ipc",
                "sh",
                "-c",
                "hostname sem-joined && exec sleep 1000",
            ])
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn unshare"),
    );
    let pid = holder.0.id();
    let ready = poll(POLL_TIMEOUT, || {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "sleep").then_some(())
    });
    assert!(ready.is_some(), "namespace holder did not start");
    let uts = format!("/proc/{pid}/ns/uts");
    let ipc = format!("/proc/{pid}/ns/ipc");

    let mut b = t.bundle(&[
        "sh",
        "-c",
        "for n in net uts ipc; do readlink /proc/self/ns/$n; done; hostname; \
         grep -o -m1 10.199.77.1 /proc/net/fib_trie",
    ]);
    b.add_namespace_path("network", netns.path().to_str().unwrap())
        .add_namespace_path("uts", &uts)
        .add_namespace_path("ipc", &ipc);
    // Setting a hostname would rename the joined namespace: leave it alone.
    b.config.as_object_mut().unwrap().remove("hostname");
    let out = t.run(&b).ok();
    let expected = format!(
        "{}\n{}\n{}\nsem-joined\n10.199.77.1\n",
        ns_id("net", &netns.path()),
        ns_id("uts", Path::new(&uts)),
        ns_id("ipc", Path::new(&ipc)),
    );
    assert_eq!(out.stdout, expected, "{out}");
    // Joined, not created: the host's own namespaces differ.
    assert_ne!(
        ns_id("uts", Path::new("/proc/self/ns/uts")),
        ns_id("uts", Path::new(&uts))
    );
}

/// New namespaces are created where the spec lists them and not otherwise.
#[test]
fn creates_listed_namespaces_and_shares_the_rest() {
    let Some(t) = Test::new("nsnew") else { return };
    let mut b = t.bundle(&[
        "sh",
        "-c",
        "for n in pid net ipc uts mnt cgroup; do readlink /proc/self/ns/$n; done; echo pid=$$",
    ]);
    b.remove_namespace("ipc");
    b.config["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "type": "cgroup" }));
    let out = t.run(&b).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let host = |kind: &str| ns_id(kind, Path::new(&format!("/proc/self/ns/{kind}")));
    assert_eq!(lines.len(), 7, "{out}");
    assert_ne!(lines[0], host("pid"), "pid namespace is new");
    assert_ne!(lines[1], host("net"), "network namespace is new");
    assert_eq!(
        lines[2],
        host("ipc"),
        "ipc is not listed: shared with the host"
    );
    assert_ne!(lines[3], host("uts"), "uts namespace is new");
    assert_ne!(lines[4], host("mnt"), "mount namespace is new");
    assert_ne!(lines[5], host("cgroup"), "cgroup namespace is new");
    assert_eq!(lines[6], "pid=1", "init is pid 1 in its pid namespace");
}

// -------------------------------------------------------------- cgroups --

/// memory.limit is visible and enforced: going beyond it gets the process
/// OOM-killed, and `run` reports 128+SIGKILL.
#[test]
fn memory_limit_is_visible_and_enforced() {
    let Some(t) = Test::new("memory") else { return };
    let mut b = t.bundle(&[
        "sh",
        "-c",
        // busybox tail buffers a newline-free stream without bound.
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes; exec tail /dev/zero",
    ]);
    b.set_memory_limit(32 << 20);
    let out = t.run(&b).code_is(137);
    assert_eq!(out.stdout, "33554432\n", "{out}");
}

#[test]
fn cpu_shares_and_quota_are_visible() {
    let Some(t) = Test::new("cpu") else { return };
    let mut b = t.bundle(&[
        "sh",
        "-c",
        "cd /sys/fs/cgroup/cpu && cat cpu.shares cpu.cfs_quota_us cpu.cfs_period_us",
    ]);
    b.config["linux"]["resources"]["cpu"] =
        json!({ "shares": 512, "quota": 50000, "period": 100000 });
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, "512\n50000\n100000\n", "{out}");
}

#[test]
fn cpuset_is_visible_and_pins_the_process() {
    let Some(t) = Test::new("cpuset") else { return };
    let mut b = t.bundle(&[
        "sh",
        "-c",
        "cat /sys/fs/cgroup/cpuset/cpuset.cpus /sys/fs/cgroup/cpuset/cpuset.mems; \
         grep Cpus_allowed_list /proc/self/status",
    ]);
    b.config["linux"]["resources"]["cpu"] = json!({ "cpus": "0", "mems": "0" });
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, "0\n0\nCpus_allowed_list:\t0\n", "{out}");
}

#[test]
fn pids_limit_is_visible_and_enforced() {
    let Some(t) = Test::new("pids") else { return };
    let mut b = t.bundle(&[
        "sh",
        "-c",
        "cat /sys/fs/cgroup/pids/pids.max; \
         i=0; while [ $i -lt 20 ]; do sleep 1000 & i=$((i+1)); done; echo started $i",
    ]);
    b.set_pids_limit(10);
    let out = t.run(&b);
    assert!(out.stdout.starts_with("10\n"), "{out}");
    assert!(
        !out.stdout.contains("started 20"),
        "20 forks under pids.max 10: {out}"
    );
    assert!(
        out.stderr.contains("fork"),
        "a fork must have failed: {out}"
    );
}

/// hugepageLimits: visible in the v1 hugetlb controller when this host has
/// it; otherwise (here: hugetlb lives only on the cgroup2 side of a hybrid
/// host) the runtime must refuse clearly instead of silently dropping it.
#[test]
fn hugetlb_limit_is_visible_or_refused_clearly() {
    let Some(t) = Test::new("hugetlb") else {
        return;
    };
    let mut b = t.bundle(&["cat", "/sys/fs/cgroup/hugetlb/hugetlb.2MB.limit_in_bytes"]);
    b.config["linux"]["resources"]["hugepageLimits"] =
        json!([{ "pageSize": "2MB", "limit": 4194304 }]);
    let out = t.run(&b);
    if v1_controller("hugetlb").is_some() {
        assert_eq!(out.code(), 0, "{out}");
        assert_eq!(out.stdout, "4194304\n", "{out}");
    } else {
        assert_ne!(
            out.code(),
            0,
            "no v1 hugetlb here, yet the limit was accepted: {out}"
        );
        assert!(
            out.stderr.contains("hugetlb"),
            "the error must name hugetlb: {out}"
        );
        assert_eq!(out.stdout, "", "the process must not run: {out}");
    }
}

/// blockIO.weight: on this kernel (no CFQ) the v1 file is blkio.bfq.weight.
#[test]
fn blkio_weight_is_visible() {
    let Some(t) = Test::new("blkio") else { return };
    if v1_controller("blkio").is_none() {
        eprintln!("skipping blkio: no v1 blkio controller");
        return;
    }
    let mut b = t.bundle(&[
        "sh",
        "-c",
        "cat /sys/fs/cgroup/blkio/blkio.weight 2>/dev/null \
         || cat /sys/fs/cgroup/blkio/blkio.bfq.weight",
    ]);
    b.config["linux"]["resources"]["blockIO"] = json!({ "weight": 300 });
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, "300\n", "{out}");
}

/// Device cgroup rules: an allowed device opens, a device not allowed gives
/// EPERM (an allowed but driverless one gives ENXIO instead); linux.devices
/// nodes are created with their mode.
#[test]
fn device_rules_allow_and_deny() {
    let Some(t) = Test::new("devices") else {
        return;
    };
    let mut b = t.bundle(&[
        "sh",
        "-c",
        "ls -l /dev/semnull | cut -c1-10; echo x > /dev/semnull && echo null-ok; \
         mknod /dev/d240 c 240 0 && mknod /dev/d241 c 241 0 || exit 9; \
         cat /dev/d240; cat /dev/d241; exit 0",
    ]);
    let mut caps = DEFAULT_CAPS.to_vec();
    caps.push("CAP_MKNOD");
    set_caps(&mut b, &caps);
    b.config["linux"]["resources"]["devices"] = json!([
        { "allow": false, "access": "rwm" },
        { "allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm" },
        { "allow": true, "type": "c", "major": 241, "minor": 0, "access": "rw" },
    ]);
    b.config["linux"]["devices"] = json!([{
        "path": "/dev/semnull", "type": "c", "major": 1, "minor": 3,
        "fileMode": 0o666, "uid": 0, "gid": 0,
    }]);
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, "crw-rw-rw-\nnull-ok\n", "{out}");
    assert!(
        out.stderr.contains("/dev/d240': Operation not permitted"),
        "device 240:0 is not allowed: {out}"
    );
    assert!(
        out.stderr.contains("/dev/d241': No such device or address"),
        "device 241:0 is allowed (and has no driver): {out}"
    );
}

// ------------------------------------------------------ process security --

/// SCMP_ACT_ERRNO denies mkdir with EPERM (the default errno) and symlink
/// with its errnoRet; everything else is allowed.
#[test]
fn seccomp_denies_listed_syscalls_only() {
    let Some(t) = Test::new("seccomp") else {
        return;
    };
    let mut b = t.bundle(&[
        "sh",
        "-c",
        "mkdir /tmp/d; ln -s x /tmp/l; touch /tmp/f && echo touch-ok; echo still-works",
    ]);
    add_tmp(&mut b);
    b.config["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            { "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO" },
            { "names": ["symlink", "symlinkat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13 },
        ],
    });
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, "touch-ok\nstill-works\n", "{out}");
    assert!(
        out.stderr.contains("Operation not permitted"),
        "mkdir: EPERM: {out}"
    );
    assert!(
        out.stderr.contains("Permission denied"),
        "symlink: EACCES: {out}"
    );
}

/// An exec'd process is under the container's filter too (libcontainer
/// alone would leave it unfiltered), with the container's user, capability
/// sets and no_new_privs — none of the setup capabilities left over.
#[test]
fn exec_runs_under_the_containers_seccomp_filter_user_and_caps() {
    let Some(t) = Test::new("execsec") else {
        return;
    };
    let mut b = t.bundle(&["sleep", "1000"]);
    add_tmp(&mut b);
    set_caps(&mut b, DEFAULT_CAPS);
    b.config["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    b.config["process"]["noNewPrivileges"] = json!(false);
    b.config["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{ "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO" }],
    });
    t.create(&b);
    t.rt(&["start", &t.id]).ok();
    let mask = cap_mask(DEFAULT_CAPS);
    let script = "grep -E '^(Seccomp|NoNewPrivs|Cap(Eff|Prm|Bnd|Amb)):' /proc/self/status; id -u";
    let want = "NoNewPrivs:\t0\nSeccomp:\t2\n1000\n";
    for tty in [false, true] {
        let options: &[&str] = if tty { &["-t"] } else { &[] };
        let out = t.exec_with(options, &["sh", "-c", script]).ok();
        let got: String = out.stdout.replace('\r', "");
        let caps: Vec<&str> = got.lines().filter(|l| l.starts_with("Cap")).collect();
        assert_eq!(
            caps,
            [
                "CapPrm:\t0000000000000000".to_owned(),
                "CapEff:\t0000000000000000".to_owned(),
                format!("CapBnd:\t{mask}"),
                "CapAmb:\t0000000000000000".to_owned(),
            ],
            "tty {tty}: {out}"
        );
        let rest: String = got
            .lines()
            .filter(|l| !l.starts_with("Cap"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(rest, want, "tty {tty}: {out}");
    }
    let out = t.exec(&["mkdir", "/tmp/d"]);
    assert_ne!(out.code(), 0, "{out}");
    assert!(out.stderr.contains("Operation not permitted"), "{out}");
    // As root with the container's capabilities, still filtered.
    let out = t
        .exec_with(
            &["--user", "0:0"],
            &["sh", "-c", "grep -E '^(Seccomp|CapEff):' /proc/self/status"],
        )
        .ok();
    assert_eq!(
        out.stdout,
        format!("CapEff:\t{mask}\nSeccomp:\t2\n"),
        "{out}"
    );
}

/// Without CAP_CHOWN chown fails; with it, it works. CapEff/CapBnd are
/// exactly the configured sets.
#[test]
fn capabilities_are_exactly_the_configured_sets() {
    let Some(t) = Test::new("caps") else { return };
    let script = "grep -E '^Cap(Eff|Bnd)' /proc/self/status; touch /tmp/f; \
                  chown 1000 /tmp/f && stat -c %u /tmp/f";
    let mut without = DEFAULT_CAPS.to_vec();
    without.push("CAP_DAC_OVERRIDE");
    let mut b = t.bundle(&["sh", "-c", script]);
    add_tmp(&mut b);
    set_caps(&mut b, &without);
    let out = t.run(&b);
    let mask = cap_mask(&without);
    assert_eq!(
        out.stdout,
        format!("CapEff:\t{mask}\nCapBnd:\t{mask}\n"),
        "{out}"
    );
    assert!(
        out.stderr.contains("Operation not permitted"),
        "chown without CAP_CHOWN: {out}"
    );
    assert_ne!(out.code(), 0, "{out}");

    let mut with = without.clone();
    with.push("CAP_CHOWN");
    set_caps(&mut b, &with);
    let out = t.run(&b).ok();
    let mask = cap_mask(&with);
    assert_eq!(
        out.stdout,
        format!("CapEff:\t{mask}\nCapBnd:\t{mask}\n1000\n"),
        "{out}"
    );
}

#[test]
fn no_new_privileges_follows_the_config() {
    let Some(t) = Test::new("nnp") else { return };
    let mut b = t.bundle(&["grep", "NoNewPrivs", "/proc/self/status"]);
    b.config["process"]["noNewPrivileges"] = json!(true);
    assert_eq!(t.run(&b).ok().stdout, "NoNewPrivs:\t1\n");
    b.config["process"]["noNewPrivileges"] = json!(false);
    assert_eq!(t.run(&b).ok().stdout, "NoNewPrivs:\t0\n");
}

#[test]
fn rlimits_are_applied() {
    let Some(t) = Test::new("rlimits") else {
        return;
    };
    let mut b = t.bundle(&["sh", "-c", "ulimit -n; ulimit -Hn"]);
    b.config["process"]["rlimits"] = json!([{ "type": "RLIMIT_NOFILE", "soft": 512, "hard": 512 }]);
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, "512\n512\n", "{out}");
}

#[test]
fn oom_score_adj_is_applied() {
    let Some(t) = Test::new("oomadj") else { return };
    let mut b = t.bundle(&["cat", "/proc/self/oom_score_adj"]);
    b.config["process"]["oomScoreAdj"] = json!(500);
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, "500\n", "{out}");
}

/// Namespaced sysctls are set inside the container's own namespaces and
/// leave the host's values alone.
#[test]
fn sysctls_apply_inside_own_namespaces() {
    let Some(t) = Test::new("sysctl") else { return };
    let host_forward = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let host_rmid = fs::read_to_string("/proc/sys/kernel/shm_rmid_forced").unwrap();
    let mut b = t.bundle(&[
        "cat",
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/kernel/shm_rmid_forced",
    ]);
    let (forward, rmid) = (flip(&host_forward), flip(&host_rmid));
    b.config["linux"]["sysctl"] = json!({
        "net.ipv4.ip_forward": forward,
        "kernel.shm_rmid_forced": rmid,
    });
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, format!("{forward}\n{rmid}\n"), "{out}");
    assert_eq!(
        fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_forward
    );
    assert_eq!(
        fs::read_to_string("/proc/sys/kernel/shm_rmid_forced").unwrap(),
        host_rmid
    );
}

/// "1" for a host "0" and vice versa, so the container's value is observable.
fn flip(host: &str) -> &'static str {
    if host.trim() == "0" {
        "1"
    } else {
        "0"
    }
}

// --------------------------------------------------------------- mounts --

/// A read-only bind shows the host's files and refuses writes; a read-write
/// bind writes through to the host.
#[test]
fn bind_mounts_honour_ro_and_rw() {
    let Some(t) = Test::new("bindro") else { return };
    let ro = t.host_dir("ro");
    fs::write(ro.join("file"), "from-host\n").unwrap();
    let rw = t.host_dir("rw");
    let mut b = t.bundle(&[
        "sh",
        "-c",
        "cat /ro/file; touch /ro/new; echo written > /rw/out && echo rw-ok",
    ]);
    add_bind(&mut b, &ro, "/ro", &["bind", "ro"]);
    add_bind(&mut b, &rw, "/rw", &["rbind", "rw"]);
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, "from-host\nrw-ok\n", "{out}");
    assert!(out.stderr.contains("Read-only file system"), "{out}");
    assert!(!ro.join("new").exists());
    assert_eq!(fs::read_to_string(rw.join("out")).unwrap(), "written\n");
}

/// `rbind` carries submounts along; `bind` does not.
#[test]
fn rbind_carries_submounts_and_bind_does_not() {
    let Some(t) = Test::new("rbind") else { return };
    let src = t.host_dir("src");
    let sub = HostMount::tmpfs(&src.join("sub"));
    fs::write(sub.0.join("inner"), "submount\n").unwrap();
    let mut b = t.bundle(&["sh", "-c", "cat /rb/sub/inner; ls /nb/sub | wc -l"]);
    add_bind(&mut b, &src, "/rb", &["rbind", "ro"]);
    add_bind(&mut b, &src, "/nb", &["bind", "ro"]);
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, "submount\n0\n", "{out}");
}

/// tmpfs options reach the mount: size=1m caps what fits.
#[test]
fn tmpfs_mount_with_size_option() {
    let Some(t) = Test::new("tmpfs") else { return };
    let mut b = t.bundle(&[
        "sh",
        "-c",
        "grep ' /scratch ' /proc/mounts | grep -o 'size=[0-9]*k'; \
         dd if=/dev/zero of=/scratch/f bs=1024 count=2048 2>&1 | grep -o 'No space left on device'",
    ]);
    add_mount(
        &mut b,
        json!({ "destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "nodev", "size=1m", "mode=1777"] }),
    );
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, "size=1024k\nNo space left on device\n", "{out}");
}

/// Propagation options of bind mounts: `rslave` makes the mount a slave of
/// the shared host mount (and a host mount made after start shows up in
/// it), `rshared` makes it shared (a peer too), `rprivate` cuts it off.
#[test]
fn bind_mount_propagation_options() {
    let Some(t) = Test::new("propagation") else {
        return;
    };
    let shared = HostMount::tmpfs(&t.path().join("shared"));
    shared.make_shared();
    let mut b = t.bundle(&["sleep", "1000"]);
    add_bind(&mut b, &shared.0, "/slave", &["rbind", "rslave"]);
    add_bind(&mut b, &shared.0, "/peer", &["rbind", "rshared"]);
    add_bind(&mut b, &shared.0, "/private", &["rbind", "rprivate"]);
    t.create(&b);
    t.rt(&["start", &t.id]).ok();
    let info = t.sh("grep -E ' /(slave|peer|private) ' /proc/self/mountinfo");
    let tags = |dst: &str| -> String {
        // Optional fields between the mount options and "-".
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(dst))
            .unwrap_or_else(|| panic!("no {dst} in:\n{info}"));
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-").unwrap();
        fields[6..sep]
            .iter()
            .map(|f| f.split(':').next().unwrap())
            .collect::<Vec<_>>()
            .join(",")
    };
    let got = [tags("/slave"), tags("/peer"), tags("/private")];
    assert_eq!(
        got,
        ["master", "shared,master", ""],
        "propagation of /slave (rslave), /peer (rshared), /private (rprivate):\n{info}"
    );
    // Host -> container after start, into the slave and the peer.
    let late = HostMount::tmpfs(&shared.0.join("late"));
    fs::write(late.0.join("f"), "late-mount\n").unwrap();
    assert_eq!(t.sh("cat /slave/late/f"), "late-mount\n");
    assert_eq!(t.sh("cat /peer/late/f"), "late-mount\n");
    // Same tmpfs, so the directory is there, but not the mount on it.
    assert_eq!(
        t.sh("ls /private/late | wc -l"),
        "0\n",
        "rprivate receives no mounts"
    );
}

/// linux.rootfsPropagation takes the values runc takes, the recursive ones
/// too: containerd's CRI sets "rslave" / "rshared" for pods whose volumes
/// use HostToContainer / Bidirectional mount propagation.
#[test]
fn rootfs_propagation_values_are_accepted() {
    let Some(t) = Test::new("rootfsprop") else {
        return;
    };
    let mut b = t.bundle(&["true"]);
    let mut refused = Vec::new();
    for value in [
        "shared", "slave", "private", "rshared", "rslave", "rprivate",
    ] {
        b.config["linux"]["rootfsPropagation"] = json!(value);
        let out = t.run(&b);
        if out.code() != 0 {
            refused.push(format!("{value:?}: {}", out.stderr.trim()));
            t.rt(&["delete", "--force", &t.id]);
        }
    }
    assert!(
        refused.is_empty(),
        "rootfsPropagation refused:\n{}",
        refused.join("\n")
    );
}

/// maskedPaths read empty (files) or show nothing (directories);
/// readonlyPaths refuse writes with EROFS. Besides runc's defaults that
/// exist on this kernel (/proc/kcore, /proc/sysrq-trigger do not), a masked
/// file and a read-only directory inside a read-write bind mount.
#[test]
fn masked_and_readonly_paths() {
    let Some(t) = Test::new("masked") else { return };
    let data = t.host_dir("data");
    fs::write(data.join("secret"), "do-not-show\n").unwrap();
    fs::create_dir(data.join("frozen")).unwrap();
    let mut b = t.bundle(&[
        "sh",
        "-c",
        "wc -c < /proc/timer_list; ls /sys/firmware | wc -l; wc -c < /data/secret; \
         [ ! -e /proc/kcore ] || wc -c < /proc/kcore; \
         echo 1 > /proc/sys/kernel/shm_rmid_forced; touch /data/frozen/x; \
         touch /data/ok && echo done",
    ]);
    add_bind(&mut b, &data, "/data", &["rbind", "rw"]);
    b.config["linux"]["maskedPaths"]
        .as_array_mut()
        .unwrap()
        .push(json!("/data/secret"));
    b.config["linux"]["readonlyPaths"]
        .as_array_mut()
        .unwrap()
        .push(json!("/data/frozen"));
    let out = t.run(&b).ok();
    let kcore = if Path::new("/proc/kcore").exists() {
        "0\n"
    } else {
        ""
    };
    assert_eq!(out.stdout, format!("0\n0\n0\n{kcore}done\n"), "{out}");
    assert!(
        out.stderr
            .contains("/proc/sys/kernel/shm_rmid_forced: Read-only file system"),
        "{out}"
    );
    assert!(
        out.stderr.contains("/data/frozen/x: Read-only file system"),
        "{out}"
    );
    // On the host these are not empty, and the secret is untouched.
    assert_ne!(fs::read_dir("/sys/firmware").unwrap().count(), 0);
    assert_ne!(
        fs::read_to_string("/proc/timer_list").unwrap_or_default(),
        ""
    );
    assert_eq!(
        fs::read_to_string(data.join("secret")).unwrap(),
        "do-not-show\n"
    );
    assert!(!data.join("frozen/x").exists());
}

#[test]
fn readonly_rootfs_refuses_writes() {
    let Some(t) = Test::new("rorootfs") else {
        return;
    };
    let mut b = t.bundle(&["sh", "-c", "touch /x && echo wrote"]);
    b.set_readonly_rootfs(true);
    let out = t.run(&b);
    assert_ne!(out.code(), 0, "{out}");
    assert!(out.stderr.contains("Read-only file system"), "{out}");
    assert!(!b.rootfs().join("x").exists());
    b.set_readonly_rootfs(false);
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, "wrote\n", "{out}");
    assert!(b.rootfs().join("x").exists());
}

// -------------------------------------------------------- process setup --

#[test]
fn user_additional_gids_and_umask() {
    let Some(t) = Test::new("user") else { return };
    let mut b = t.bundle(&[
        "sh",
        "-c",
        "id; umask; touch /tmp/f; mkdir /tmp/d; stat -c %a /tmp/f /tmp/d",
    ]);
    add_tmp(&mut b);
    b.config["process"]["user"] =
        json!({ "uid": 1000, "gid": 1000, "additionalGids": [2000], "umask": 0o027 });
    let out = t.run(&b).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[0].starts_with("uid=1000(bosun) gid=1000(bosun) groups="),
        "{out}"
    );
    assert!(
        lines[0].contains("2000(extra)"),
        "additional gid 2000: {out}"
    );
    assert_eq!(lines[1..], ["0027", "640", "750"], "{out}");
}

#[test]
fn hostname_and_domainname() {
    let Some(t) = Test::new("uts") else { return };
    let mut b = t.bundle(&["sh", "-c", "hostname; cat /proc/sys/kernel/domainname"]);
    b.config["hostname"] = json!("sem-host");
    b.config["domainname"] = json!("sem.example");
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, "sem-host\nsem.example\n", "{out}");
}

#[test]
fn env_cwd_and_args_reach_the_process() {
    let Some(t) = Test::new("env") else { return };
    let mut b = t.bundle(&[
        "sh",
        "-c",
        "pwd; echo \"$SEM_VAR|$0|$1\"",
        "zero",
        "one two",
    ]);
    b.set_env_var("SEM_VAR", "a b=c");
    b.config["process"]["cwd"] = json!("/etc");
    let out = t.run(&b).ok();
    assert_eq!(out.stdout, "/etc\na b=c|zero|one two\n", "{out}");
}

/// `create --console-socket`: the runtime sends the pty master over the
/// socket (SCM_RIGHTS); after `start` the process's stdio is the pty.
#[test]
fn terminal_via_console_socket() {
    let Some(t) = Test::new("tty") else { return };
    let mut b = t.bundle(&["sh", "-c", "tty; test -t 0 && test -t 1 && echo isatty"]);
    b.set_terminal(true);
    b.write().unwrap();
    let sock = t.path().join("console.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut create = t.spawn(t.command(&[
        "create",
        "--bundle",
        b.dir().to_str().unwrap(),
        "--console-socket",
        sock.to_str().unwrap(),
        &t.id,
    ]));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if create.exited() {
                    panic!(
                        "create exited without connecting:\n{}",
                        create.output_so_far()
                    );
                }
                assert!(Instant::now() < deadline, "no console socket connection");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
    let master = receive_fd(stream.as_raw_fd());
    create.wait(COMMAND_TIMEOUT).ok();
    assert_eq!(t.status(), "created");

    t.rt(&["start", &t.id]).ok();
    let text = read_until_eof(&master, COMMAND_TIMEOUT);
    assert_eq!(text, "/dev/pts/0\r\nisatty\r\n");
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Receives one file descriptor (SCM_RIGHTS) from a connected socket.
fn receive_fd(socket: RawFd) -> OwnedFd {
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(socket, &mut iov, Some(&mut cmsg), MsgFlags::empty())
        .expect("recvmsg on console socket");
    for c in msg.cmsgs().expect("control messages") {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor in our
                // table via SCM_RIGHTS; nothing else owns it.
                return unsafe { OwnedFd::from_raw_fd(fd) };
            }
        }
    }
    panic!("no file descriptor in the console socket message");
}

/// Reads a pty master until the slave side is gone (EIO) or `timeout`.
fn read_until_eof(master: &OwnedFd, timeout: Duration) -> String {
    let mut file = fs::File::from(master.try_clone().unwrap());
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        let ready = nix::poll::poll(&mut fds, PollTimeout::from(100u16)).unwrap_or(0);
        if ready == 0 {
            continue;
        }
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // EIO: every slave fd is closed, the process is done.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => panic!("read pty master: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn pid_file_holds_the_init_pid() {
    let Some(t) = Test::new("pidfile") else {
        return;
    };
    let b = t.bundle(&["sleep", "1000"]);
    b.write().unwrap();
    let pid_file = t.path().join("init.pid");
    t.rt(&[
        "create",
        "--bundle",
        b.dir().to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        &t.id,
    ])
    .ok();
    let written: i64 = read(&pid_file).trim().parse().unwrap();
    assert_eq!(t.state()["pid"], written);
    assert!(Path::new(&format!("/proc/{written}")).exists());
    t.rt(&["start", &t.id]).ok();
    assert_eq!(t.state()["pid"], written, "start keeps the init pid");
    let cmdline = fs::read(format!("/proc/{written}/cmdline")).unwrap();
    assert!(
        cmdline.starts_with(b"sleep\0"),
        "{:?}",
        String::from_utf8_lossy(&cmdline)
    );
}

/// `--preserve-fds 1` hands the runtime's fd 3 to the process, read and
/// write; without it fd 3 is closed in the container.
#[test]
fn preserve_fds_passes_fd_3() {
    let Some(t) = Test::new("fds") else { return };
    let shared = t.path().join("fd3");
    fs::write(&shared, "from-host\n").unwrap();
    let b = t.bundle(&[
        "sh",
        "-c",
        "if [ -e /proc/$$/fd/3 ]; then read line <&3; echo \"got:$line\"; \
         echo from-container >&3; else echo fd3-closed; fi",
    ]);
    b.write().unwrap();
    let run_with_fd3 = |preserve: &str| {
        // The runtime gets fd 3 from a shell redirection, then execs.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("exec \"$@\" 3<>\"$FD3\"")
            .arg("sh")
            .arg(harness::runtime_binary())
            .arg("--root")
            .arg(t.state_root())
            .args(["run", "--preserve-fds", preserve, "--bundle"])
            .arg(b.dir())
            .arg(&t.id)
            .env("FD3", &shared);
        t.spawn_wait(cmd, COMMAND_TIMEOUT)
    };
    let out = run_with_fd3("1").ok();
    assert_eq!(out.stdout, "got:from-host\n", "{out}");
    assert_eq!(read(&shared), "from-host\nfrom-container\n");
    let out = run_with_fd3("0").ok();
    assert_eq!(out.stdout, "fd3-closed\n", "{out}");
}

// ------------------------------------------------ exit codes and states --

#[test]
fn run_foreground_exit_codes() {
    let Some(t) = Test::new("exitcode") else {
        return;
    };
    let mut b = t.bundle(&["sh", "-c", "echo out; echo err >&2; exit 42"]);
    let out = t.run(&b).code_is(42);
    assert_eq!(out.stdout, "out\n", "{out}");
    assert!(out.stderr.contains("err\n"), "{out}");
    assert_eq!(
        t.rt(&["state", &t.id]).code(),
        1,
        "run deletes the container"
    );

    // A process that cannot be executed: run fails, nothing is left.
    b.set_args(&["/nonexistent"]);
    let out = t.run(&b);
    assert_ne!(out.code(), 0, "{out}");
    assert!(out.stderr.contains("/nonexistent"), "{out}");
    assert_eq!(t.rt(&["state", &t.id]).code(), 1, "{out}");

    // Killed from outside: 128 + SIGKILL, and the container is deleted.
    b.set_args(&["sleep", "1000"]);
    b.write().unwrap();
    let run = t.spawn(t.command(&["run", "--bundle", b.dir().to_str().unwrap(), &t.id]));
    let pid = poll(POLL_TIMEOUT, || {
        let out = t.rt(&["state", &t.id]);
        let state: Value = serde_json::from_str(&out.stdout).ok()?;
        (state["status"] == "running").then(|| state["pid"].as_i64())?
    })
    .unwrap_or_else(|| panic!("foreground container never ran:\n{}", run.output_so_far()));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    run.wait(COMMAND_TIMEOUT).code_is(137);
    assert_eq!(
        t.rt(&["state", &t.id]).code(),
        1,
        "run deletes the container"
    );
}

/// `kill KILL` of a container that a foreground `run` waits for: kill
/// reports success, run reports 137 and deletes the container. The two
/// runtime processes race (run deletes the state as soon as init dies), so
/// this repeats the round a few times.
#[test]
fn kill_of_foreground_run_is_clean() {
    let Some(t) = Test::new("killrun") else {
        return;
    };
    let b = t.bundle(&["sleep", "1000"]);
    b.write().unwrap();
    // CPU contention widens the race window (it shows within a few rounds
    // when other tests run alongside; alone, without load, rarely).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let _stop_spinners = Defer(Some(move || {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for s in spinners {
            let _ = s.join();
        }
    }));
    let mut wrong = Vec::new();
    for round in 0..20 {
        let run = t.spawn(t.command(&["run", "--bundle", b.dir().to_str().unwrap(), &t.id]));
        let running = poll(POLL_TIMEOUT, || {
            let out = t.rt(&["state", &t.id]);
            out.stdout.contains("\"running\"").then_some(())
        });
        assert!(
            running.is_some(),
            "container never ran:\n{}",
            run.output_so_far()
        );
        let kill = t.rt(&["kill", &t.id, "KILL"]);
        let run = run.wait(COMMAND_TIMEOUT);
        let state = t.rt(&["state", &t.id]);
        if kill.code() != 0 {
            wrong.push(format!("round {round}: {kill}"));
        }
        if run.code() != 137 {
            wrong.push(format!("round {round}: {run}"));
        }
        if state.code() != 1 {
            wrong.push(format!("round {round}: container left after run: {state}"));
            t.rt(&["delete", "--force", &t.id]);
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// created -> running -> stopped, with the pid and the cgroup coming and
/// going as they should.
#[test]
fn state_transitions_created_running_stopped() {
    let Some(t) = Test::new("states") else { return };
    let ctl = t.host_dir("ctl");
    let mut b = t.bundle(&[
        "sh",
        "-c",
        "echo started; while [ ! -e /ctl/go ]; do sleep 0.05; done; echo done",
    ]);
    add_bind(&mut b, &ctl, "/ctl", &["rbind", "rw"]);
    let created = t.create(&b);
    let s = t.state();
    assert_eq!(s["status"], "created", "{s}");
    assert_eq!(s["id"], t.id.as_str());
    let pid = s["pid"].as_i64().unwrap();
    assert!(
        pid > 0 && Path::new(&format!("/proc/{pid}")).exists(),
        "{s}"
    );
    assert_eq!(
        created.stdout_now(),
        "",
        "the process must not run before start"
    );
    assert!(!t.leftover_cgroups().is_empty(), "created: cgroup exists");

    t.rt(&["start", &t.id]).ok();
    assert_eq!(t.status(), "running");
    assert_eq!(t.state()["pid"], pid);
    assert_eq!(t.rt(&["start", &t.id]).code(), 1, "second start fails");

    fs::write(ctl.join("go"), "").unwrap();
    t.wait_status("stopped", POLL_TIMEOUT);
    assert_eq!(created.stdout_now(), "started\ndone\n");
    t.rt(&["delete", &t.id]).ok();
    assert_eq!(t.rt(&["state", &t.id]).code(), 1);
    let gone = poll(Duration::from_secs(2), || {
        t.leftover_cgroups().is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "delete leaves cgroups: {:?}",
        t.leftover_cgroups()
    );
}

/// A signal that does not end the process leaves a created container
/// created (and startable).
#[test]
fn signal_to_created_container_keeps_it_created() {
    let Some(t) = Test::new("sigcreated") else {
        return;
    };
    t.create(&t.bundle(&["sleep", "1000"]));
    // SIGWINCH is ignored by default: the process lives on.
    t.rt(&["kill", &t.id, "WINCH"]).ok();
    assert_eq!(
        t.status(),
        "created",
        "a harmless signal must not change the status"
    );
    t.rt(&["start", &t.id]).ok();
    assert_eq!(t.status(), "running");
}

/// A signal to a paused container leaves it paused (and resumable).
#[test]
fn signal_to_paused_container_keeps_it_paused() {
    let Some(t) = Test::new("sigpaused") else {
        return;
    };
    let b = t.bundle(&["sleep", "1000"]);
    b.write().unwrap();
    t.rt(&["run", "-d", "--bundle", b.dir().to_str().unwrap(), &t.id])
        .ok();
    t.rt(&["pause", &t.id]).ok();
    // pid 1 of its namespace ignores SIGTERM (no handler), so it lives on.
    t.rt(&["kill", &t.id, "TERM"]).ok();
    assert_eq!(t.status(), "paused", "the process is frozen, not running");
    t.rt(&["resume", &t.id]).ok();
    assert_eq!(t.status(), "running");
}

/// What a CRI stop does to a paused container: SIGTERM, then SIGKILL. The
/// container must end up stopped, not frozen and "running" for ever.
#[test]
fn term_then_kill_stops_a_paused_container() {
    let Some(t) = Test::new("stoppaused") else {
        return;
    };
    let b = t.bundle(&["sleep", "1000"]);
    b.write().unwrap();
    t.rt(&["run", "-d", "--bundle", b.dir().to_str().unwrap(), &t.id])
        .ok();
    t.rt(&["pause", &t.id]).ok();
    t.rt(&["kill", &t.id, "TERM"]).ok();
    t.rt(&["kill", &t.id, "KILL"]).ok();
    t.wait_status("stopped", Duration::from_secs(2));
    t.rt(&["delete", &t.id]).ok();
}

/// The exact CLI sequence after which a `kill KILL` once left a container
/// "running": every step's exit code and message as runc gives them.
#[test]
fn cli_sequence_kill_leaves_stopped() {
    let Some(t) = Test::new("sequence") else {
        return;
    };
    let id = t.id.as_str();
    let b = t.bundle(&["sleep", "1000"]);
    b.write().unwrap();
    let bundle = b.dir().to_str().unwrap();

    t.rt(&["run", "-d", "--bundle", bundle, id]).ok();
    assert_eq!(t.status(), "running");

    t.exec(&["sh", "-c", "exit 3"]).code_is(3);
    let out = t.exec_with(&["-u", "1000:1000"], &["id"]).ok();
    assert!(
        out.stdout.starts_with("uid=1000(bosun) gid=1000(bosun)"),
        "{out}"
    );
    let out = t.exec(&["/nonexist"]).code_is(255);
    assert!(out.stderr.contains("/nonexist"), "{out}");

    t.rt(&["pause", id]).ok();
    assert_eq!(t.status(), "paused");
    let out = t.exec(&["true"]).code_is(255);
    assert!(out.stderr.contains("paused"), "{out}");
    t.rt(&["resume", id]).ok();
    assert_eq!(t.status(), "running");

    let out = t.rt(&["events", "--stats", id]).ok();
    let ev: Value =
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(ev["type"], "stats", "{out}");
    assert_eq!(ev["id"], id, "{out}");
    assert!(
        ev["data"]["pids"]["current"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{out}"
    );
    assert!(
        ev["data"]["memory"]["usage"]["usage"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{out}"
    );

    t.rt(&["update", "--pids-limit", "7", "--memory", "32m", id])
        .ok();
    assert_eq!(
        t.sh("cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/memory/memory.limit_in_bytes"),
        "7\n33554432\n"
    );

    let out = t.rt(&["delete", id]).code_is(1);
    assert!(
        out.stderr.contains(&format!(
            "cannot delete container {id} that is not stopped: running"
        )),
        "{out}"
    );
    let out = t.rt(&["create", "--bundle", bundle, id]).code_is(1);
    assert!(out.stderr.contains("exists"), "{out}");
    assert_eq!(
        t.status(),
        "running",
        "a failed create must not touch the container"
    );

    t.rt(&["kill", id, "KILL"]).ok();
    t.wait_status("stopped", Duration::from_secs(2));
    let out = t.rt(&["kill", id, "KILL"]).code_is(1);
    assert!(out.stderr.contains("container not running"), "{out}");
    t.rt(&["delete", id]).ok();
    let out = t.rt(&["state", id]).code_is(1);
    assert!(out.stderr.contains("container does not exist"), "{out}");
    assert!(
        t.leftover_cgroups().is_empty(),
        "{:?}",
        t.leftover_cgroups()
    );
}

/// Runs a closure when dropped (also when the test panics).
struct Defer<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for Defer<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}
