//! bosun-runc's command line as runc's users see it: bad input gets one clear
//! line and runc's exit code, a failed create leaves nothing behind, and the
//! output formats parse as runc's. Privileged: runs real containers.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bosun_testsupport::bundle::Bundle;
use bosun_testsupport::host;
use bosun_testsupport::privileged::require_root;
use serde_json::Value;

const RUNC: &str = env!("CARGO_BIN_EXE_bosun-runc");

/// A private state root, and every container id used in it deleted on drop.
struct Runtime {
    dir: tempfile::TempDir,
}

impl Runtime {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn run(&self, args: &[&str]) -> Output {
        // Containers inherit the runtime's stdio: files, never pipes we'd
        // wait on until the container exits.
        let (out, err) = (
            self.dir.path().join("stdout"),
            self.dir.path().join("stderr"),
        );
        let status = Command::new(RUNC)
            .arg("--root")
            .arg(self.root())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
            .status()
            .unwrap();
        Output {
            status,
            stdout: std::fs::read(&out).unwrap(),
            stderr: std::fs::read(&err).unwrap(),
        }
    }

    /// Runs a command whose own stdout we want (state, list, ps).
    fn output(&self, args: &[&str]) -> Output {
        Command::new(RUNC)
            .arg("--root")
            .arg(self.root())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn bundle(&self, name: &str, args: &[&str]) -> Bundle {
        let b = Bundle::busybox(&self.dir.path().join(name), args).unwrap();
        b.write().unwrap();
        b
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.root()) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().to_string();
                let _ = self.run(&["delete", "--force", &id]);
            }
        }
    }
}

/// Runs a shell command with a terminal of its own, as a user's shell would
/// (`script` allocates the pty); returns the output and its stdout as text.
fn in_terminal(cmd: &str) -> (Output, String) {
    let o = Command::new("script")
        .args(["-qefc", cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    (o, out)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// Asserts the command failed with `code` and one stderr line containing `want`.
fn assert_fails(o: &Output, code: i32, want: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "want one line, got: {err}");
    assert!(err.contains(want), "want {want:?} in {err:?}");
}

/// Nothing of container `id` (whose bundle is `bundle`) is left on the host:
/// no state dir, no cgroup `/<id>` in any hierarchy (v1 or v2), no mount and
/// no process mentioning the bundle path.
fn assert_nothing_left(rt: &Runtime, id: &str, bundle: &Path) {
    assert!(!rt.root().join(id).exists(), "state dir left");
    let hierarchies = host::cgroup_mounts().unwrap();
    assert!(!hierarchies.is_empty(), "no cgroup hierarchy mounted");
    assert_eq!(
        host::existing_cgroup_dirs(&hierarchies, id),
        Vec::<PathBuf>::new(),
        "cgroups left"
    );
    let marker = bundle.display().to_string();
    assert_eq!(host::mounts_mentioning(&marker).unwrap(), 0, "mounts left");
    assert_eq!(
        host::processes_with(&marker).unwrap(),
        Vec::<u32>::new(),
        "processes left"
    );
}

#[test]
fn bad_bundles_get_one_line_errors() {
    if !require_root("bosun-runc bad bundle tests") {
        return;
    }
    let rt = Runtime::new();
    let missing = rt.dir.path().join("missing");
    let o = rt.run(&["create", "--bundle", missing.to_str().unwrap(), "c1"]);
    assert_fails(&o, 1, "no such directory");

    let empty = rt.dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = rt.run(&["create", "--bundle", empty.to_str().unwrap(), "c1"]);
    assert_fails(&o, 1, "config.json not found");

    std::fs::write(empty.join("config.json"), "{\"ociVersion\": ").unwrap();
    let o = rt.run(&["create", "--bundle", empty.to_str().unwrap(), "c1"]);
    assert_fails(&o, 1, "invalid OCI runtime config");

    let b = rt.bundle("norootfs", &["true"]);
    std::fs::remove_dir_all(b.rootfs()).unwrap();
    let o = rt.run(&["create", "--bundle", b.dir().to_str().unwrap(), "c1"]);
    assert_fails(&o, 1, "invalid rootfs");

    let mut b = rt.bundle("badns", &["true"]);
    b.add_namespace_path("network", "/nonexistent/netns");
    b.write().unwrap();
    let o = rt.run(&["create", "--bundle", b.dir().to_str().unwrap(), "c1"]);
    assert_fails(&o, 1, "namespace net path /nonexistent/netns");

    // A regular file is not a namespace.
    b.add_namespace_path("network", b.dir().join("config.json").to_str().unwrap());
    b.write().unwrap();
    let o = rt.run(&["create", "--bundle", b.dir().to_str().unwrap(), "c1"]);
    assert_fails(&o, 1, "not a namespace file");

    let mut b = rt.bundle("noargs", &["true"]);
    b.config["process"]["args"] = serde_json::json!([]);
    b.write().unwrap();
    let o = rt.run(&["create", "--bundle", b.dir().to_str().unwrap(), "c1"]);
    assert_fails(&o, 1, "process.args is missing");

    assert!(!rt.root().join("c1").exists());
}

#[test]
fn limits_this_process_cannot_grant_are_named() {
    if !require_root("bosun-runc limit tests") {
        return;
    }
    let rt = Runtime::new();
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let has_sys_resource = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap() & (1 << 24) != 0)
        .unwrap();
    let mut b = rt.bundle("rlimit", &["true"]);
    b.config["process"]["rlimits"] =
        serde_json::json!([{"type": "RLIMIT_NOFILE", "soft": hard + 1, "hard": hard + 1}]);
    b.write().unwrap();
    let o = rt.run(&["run", "--bundle", b.dir().to_str().unwrap(), "r1"]);
    if has_sys_resource {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    } else {
        assert_fails(&o, 1, "rlimit RLIMIT_NOFILE: hard limit");
        assert_fails(&o, 1, "CAP_SYS_RESOURCE");
    }

    let mut b = rt.bundle("oom", &["true"]);
    b.config["process"]["oomScoreAdj"] = serde_json::json!(-999);
    b.write().unwrap();
    let o = rt.run(&["run", "--bundle", b.dir().to_str().unwrap(), "o1"]);
    if has_sys_resource {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    } else {
        assert_fails(&o, 1, "oom_score_adj -999 is below");
    }
    assert!(!rt.root().join("r1").exists() && !rt.root().join("o1").exists());
}

#[test]
fn failed_create_leaves_nothing_behind() {
    if !require_root("bosun-runc failed-create cleanup test") {
        return;
    }
    let rt = Runtime::new();
    // Fails after namespaces and cgroups exist: the executable is missing.
    let b = rt.bundle("noexec", &["/no/such/binary"]);
    let o = rt.run(&["create", "--bundle", b.dir().to_str().unwrap(), "late1"]);
    assert_fails(
        &o,
        1,
        "unable to start container process: exec: \\\"/no/such/binary\\\": stat /no/such/binary: no such file or directory",
    );
    assert_nothing_left(&rt, "late1", b.dir());

    // Fails while mounting the rootfs.
    let mut b = rt.bundle("badmount", &["true"]);
    b.config["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"destination": "/mnt", "type": "nosuchfs", "source": "none"}));
    b.write().unwrap();
    let o = rt.run(&["create", "--bundle", b.dir().to_str().unwrap(), "late2"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_nothing_left(&rt, "late2", b.dir());

    // A failing createRuntime hook.
    let mut b = rt.bundle("badhook", &["true"]);
    b.config["hooks"] = serde_json::json!({"createRuntime": [{"path": "/bin/false"}]});
    b.write().unwrap();
    let o = rt.run(&["create", "--bundle", b.dir().to_str().unwrap(), "late3"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_nothing_left(&rt, "late3", b.dir());
}

#[test]
fn ids_and_states_as_runc() {
    if !require_root("bosun-runc id/state tests") {
        return;
    }
    let rt = Runtime::new();
    let b = rt.bundle("sleep", &["sleep", "1000"]);
    let bundle = b.dir().to_str().unwrap();

    assert_fails(
        &rt.output(&["state", "nope"]),
        1,
        "container does not exist",
    );
    assert_fails(&rt.run(&["start", "nope"]), 1, "container does not exist");
    assert_fails(&rt.run(&["kill", "nope"]), 1, "container does not exist");
    assert_fails(&rt.run(&["delete", "nope"]), 1, "container does not exist");
    assert_eq!(
        rt.run(&["delete", "--force", "nope"]).status.code(),
        Some(0)
    );
    assert_fails(
        &rt.run(&["create", "--bundle", bundle, "bad/id"]),
        1,
        "invalid",
    );

    let o = rt.run(&["create", "--bundle", bundle, "s1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_fails(
        &rt.run(&["create", "--bundle", bundle, "s1"]),
        1,
        "container with given ID already exists",
    );

    let state: Value = serde_json::from_slice(&rt.output(&["state", "s1"]).stdout).unwrap();
    assert_eq!(state["status"], "created");
    assert_eq!(state["ociVersion"], "1.0.2-dev");
    assert_eq!(state["bundle"], bundle);
    assert_eq!(state["rootfs"], format!("{bundle}/rootfs"));
    assert!(state["pid"].as_i64().unwrap() > 0);
    assert!(state["created"].as_str().unwrap().ends_with('Z'));

    assert!(rt.run(&["start", "s1"]).status.success());
    let state: Value = serde_json::from_slice(&rt.output(&["state", "s1"]).stdout).unwrap();
    assert_eq!(state["status"], "running");
    let pid = state["pid"].as_i64().unwrap();
    // No cgroupsPath in the config: runc's default, /<id> in each hierarchy.
    assert!(
        Path::new("/sys/fs/cgroup/pids/s1").is_dir() || Path::new("/sys/fs/cgroup/s1").is_dir(),
        "want the cgroup at /s1"
    );

    let list: Value =
        serde_json::from_slice(&rt.output(&["list", "--format", "json"]).stdout).unwrap();
    assert_eq!(list[0]["id"], "s1");
    assert_eq!(list[0]["owner"], "root");
    let table = String::from_utf8(rt.output(&["list"]).stdout).unwrap();
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains("running"));
    assert_eq!(
        String::from_utf8(rt.output(&["list", "-q"]).stdout).unwrap(),
        "s1\n"
    );

    let ps: Value =
        serde_json::from_slice(&rt.output(&["ps", "--format", "json", "s1"]).stdout).unwrap();
    assert_eq!(ps, serde_json::json!([pid]));
    let ps = String::from_utf8(rt.output(&["ps", "s1"]).stdout).unwrap();
    assert!(ps.contains("sleep 1000"), "{ps}");

    assert_fails(
        &rt.run(&["delete", "s1"]),
        1,
        "cannot delete container s1 that is not stopped: running",
    );
    assert!(rt.run(&["kill", "s1", "KILL"]).status.success());
    let mut s = Value::Null;
    let stopped = host::poll(Duration::from_secs(5), || {
        s = serde_json::from_slice(&rt.output(&["state", "s1"]).stdout).unwrap();
        (s["status"] == "stopped").then_some(())
    });
    assert!(stopped.is_some(), "not stopped: {s}");
    assert_eq!(s["pid"], 0);
    assert_fails(&rt.run(&["kill", "s1"]), 1, "container not running");
    assert!(rt.run(&["delete", "s1"]).status.success());
    assert_nothing_left(&rt, "s1", b.dir());
}

#[test]
fn json_log_file_carries_the_error() {
    if !require_root("bosun-runc log tests") {
        return;
    }
    let rt = Runtime::new();
    let log = rt.dir.path().join("log.json");
    let o = rt.run(&[
        "--log",
        log.to_str().unwrap(),
        "--log-format",
        "json",
        "state",
        "ghost",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "error");
    assert_eq!(last["msg"], "container does not exist");
    assert!(last["time"].is_string());
}

#[test]
fn spec_and_features() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(RUNC)
        .args(["spec", "--bundle"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success());
    let spec: oci_spec::runtime::Spec =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        spec.process().as_ref().unwrap().args().as_ref().unwrap()[0],
        "sh"
    );
    let again = Command::new(RUNC)
        .args(["spec", "--bundle"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        again.status.code(),
        Some(1),
        "refuses to overwrite config.json"
    );

    let o = Command::new(RUNC).arg("features").output().unwrap();
    let f: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(f["ociVersionMin"], "1.0.0");
    assert!(f["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .contains(&Value::from("network")));
}

#[test]
fn update_from_resources_file_and_stdin() {
    if !require_root("bosun-runc update test") {
        return;
    }
    let rt = Runtime::new();
    let b = rt.bundle("upd", &["sleep", "1000"]);
    let o = rt.run(&["run", "-d", "--bundle", b.dir().to_str().unwrap(), "u1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let pids_max = || std::fs::read_to_string("/sys/fs/cgroup/pids/u1/pids.max").unwrap();

    let file = rt.dir.path().join("r.json");
    std::fs::write(&file, r#"{"pids": {"limit": 9}}"#).unwrap();
    assert!(rt
        .run(&["update", "-r", file.to_str().unwrap(), "u1"])
        .status
        .success());
    assert_eq!(pids_max().trim(), "9");

    let mut child = Command::new(RUNC)
        .arg("--root")
        .arg(rt.root())
        .args(["update", "-r", "-", "u1"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"pids": {"limit": 11}}"#)
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(pids_max().trim(), "11");

    std::fs::write(&file, "{not json").unwrap();
    assert_fails(
        &rt.run(&["update", "-r", file.to_str().unwrap(), "u1"]),
        1,
        "invalid LinuxResources JSON",
    );
    assert_fails(&rt.run(&["update", "u1"]), 1, "nothing to update");
    assert_fails(
        &rt.run(&["update", "--memory", "lots", "u1"]),
        1,
        "--memory: invalid size",
    );
}

#[test]
fn events_stream_stats_at_the_interval() {
    if !require_root("bosun-runc events test") {
        return;
    }
    let rt = Runtime::new();
    let b = rt.bundle("ev", &["sleep", "1000"]);
    assert!(rt
        .run(&["run", "-d", "--bundle", b.dir().to_str().unwrap(), "e1"])
        .status
        .success());
    let mut child = Command::new(RUNC)
        .arg("--root")
        .arg(rt.root())
        .args(["events", "--interval", "100ms", "e1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    for _ in 0..3 {
        let ev: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(ev["type"], "stats");
        assert_eq!(ev["id"], "e1");
        assert!(ev["data"]["pids"]["current"].as_u64().unwrap() >= 1);
    }
    // The stream ends by itself once the container is gone.
    assert!(rt.run(&["kill", "e1", "KILL"]).status.success());
    let status = child.wait().unwrap();
    assert!(status.success());
}

#[test]
fn systemd_cgroup_without_systemd_is_a_clear_error() {
    if std::path::Path::new("/run/systemd/system").is_dir() {
        eprintln!("skipping: systemd runs here, so --systemd-cgroup is valid");
        return;
    }
    let rt = Runtime::new();
    let o = rt.run(&["--systemd-cgroup", "list"]);
    assert_fails(&o, 1, "systemd is not running");
}

#[test]
fn foreground_run_with_terminal_relays_the_pty() {
    if !require_root("bosun-runc terminal test") {
        return;
    }
    let rt = Runtime::new();
    let mut b = rt.bundle(
        "tty",
        &["sh", "-c", "tty; test -t 0 && echo isatty; exit 4"],
    );
    b.set_terminal(true);
    b.write().unwrap();
    // `script` gives bosun-runc a terminal of its own, as a user's shell would.
    let cmd = format!(
        "{RUNC} --root {} run --bundle {} t1",
        rt.root().display(),
        b.dir().display()
    );
    let (o, out) = in_terminal(&cmd);
    assert!(out.contains("/dev/pts/0"), "{out}");
    assert!(out.contains("isatty"), "{out}");
    assert_eq!(o.status.code(), Some(4), "{out}");
}

#[test]
fn each_container_gets_its_own_session_keyring() {
    if !require_root("bosun-runc keyring test") {
        return;
    }
    let rt = Runtime::new();
    let b = rt.bundle("keys", &["sleep", "1000"]);
    let (own, shared) = (
        format!("keyring-own-{}", std::process::id()),
        format!("keyring-shared-{}", std::process::id()),
    );
    let bundle = b.dir().to_str().unwrap();
    assert!(rt
        .run(&["create", "--bundle", bundle, &own])
        .status
        .success());
    assert!(rt
        .run(&["create", "--no-new-keyring", "--bundle", bundle, &shared])
        .status
        .success());
    let keys = std::fs::read_to_string("/proc/keys").unwrap();
    let named = |id: &str| {
        keys.lines()
            .any(|l| l.contains(" keyring ") && l.contains(&format!(" {id}:")))
    };
    assert!(named(&own), "no keyring named {own}:\n{keys}");
    assert!(!named(&shared), "--no-new-keyring made one:\n{keys}");
}

#[test]
fn foreground_exec_with_tty_relays_the_pty() {
    if !require_root("bosun-runc exec -t test") {
        return;
    }
    let rt = Runtime::new();
    let b = rt.bundle("exectty", &["sleep", "1000"]);
    let o = rt.run(&["run", "-d", "--bundle", b.dir().to_str().unwrap(), "x1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cmd = format!(
        "{RUNC} --root {} exec -t x1 sh -c 'tty; test -t 0 && echo isatty; exit 5'",
        rt.root().display()
    );
    let (o, out) = in_terminal(&cmd);
    assert!(
        out.contains("/dev/pts/0") && out.contains("isatty"),
        "{out}"
    );
    assert_eq!(o.status.code(), Some(5), "{out}");
}

/// CVE-2019-5736: container processes forked by the runtime must not reach a
/// writable runtime binary through /proc/<pid>/exe.
#[test]
fn container_init_sees_only_a_read_only_runtime_binary() {
    if !require_root("bosun-runc binary protection test") {
        return;
    }
    let rt = Runtime::new();
    let b = rt.bundle("guard", &["sleep", "1000"]);
    let o = rt.run(&["create", "--bundle", b.dir().to_str().unwrap(), "g1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let state: Value = serde_json::from_slice(&rt.output(&["state", "g1"]).stdout).unwrap();
    // Until start, init is still our own code: the exposed moment.
    let exe = format!("/proc/{}/exe", state["pid"]);
    let vfs = nix::sys::statvfs::statvfs(exe.as_str()).unwrap();
    assert!(
        vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
        "{exe} is on a writable mount"
    );
    assert_ne!(
        std::fs::canonicalize(&exe).ok(),
        std::fs::canonicalize(RUNC).ok(),
        "init runs the installed binary itself"
    );
}
