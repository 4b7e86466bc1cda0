//! Container lifecycle benchmark: `bosun-runc` beside `runc` and `crun`.
//!
//! One iteration for runtime R runs a `/bin/true` container from a busybox
//! bundle through its whole life:
//!
//! ```text
//! R --root <R's private root> create --bundle <bundle> <id>
//! R --root <R's private root> start <id>
//! (wait until every process the runtime left behind has exited: see below)
//! R --root <R's private root> delete <id>
//! ```
//!
//! The runtimes run in the same process, interleaved round-robin per
//! iteration (the order rotates every iteration), so that a noisy neighbour or
//! a frequency change hits all of them alike.
//!
//! Waiting for the container: the bench makes itself a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`), so the container's init process, orphaned when
//! `create` exits, is reparented to the bench. After `start` the bench reaps
//! children until none is left: that is exactly "the container has exited",
//! with no `state` polling (which would add runtime CPU and a polling delay),
//! and the runtime's in-container setup (runc's `runc init`, youki's init
//! process, crun's forked child — everything that ran in that process before
//! it exec'd `/bin/true`) is counted in the CPU time, as it should be.
//!
//! Measured per iteration:
//! - wall: `create` spawned → `delete` exited and every child reaped;
//! - cpu: user+sys of every process reaped in the iteration (the CLI
//!   invocations with their waited-for descendants, plus the orphaned
//!   container process), from `wait4` rusage; `cpu-cli` counts the three CLI
//!   invocations only;
//! - peak RSS: the largest `ru_maxrss` of the three CLI invocations.
//!
//! crun 1.8 refuses to run on a cgroup v1 "hybrid" host (cgroup2 mounted at
//! /sys/fs/cgroup/unified). For crun only, the bench makes one private mount
//! namespace at start in which that mount is detached, and every crun
//! invocation `setns()`es into it before exec. Every runtime is spawned
//! through the same fork + `pre_exec` path, so their spawn cost is the same.
//!
//! Environment: `BENCH_ITERS` (30), `BENCH_WARMUP` (3), `BOSUN_RUNC` (path of
//! bosun-runc; default: the binary cargo built beside this bench),
//! `BENCH_RUNTIMES` (comma list, default `bosun-runc,runc,crun`),
//! `BENCH_BUSYBOX` (static busybox, default `/bin/busybox`). The bundle is
//! the test suite's (`bosun_testsupport::bundle::spec`, runc spec defaults).
//!
//! Needs root; without it the bench prints why and exits 0. It never fails:
//! a runtime that is missing or fails is reported and left out.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bosun_testsupport::{bundle, rootfs};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// Where per-run state lives: `<BASE>/<pid>/{bundle,roots/<runtime>,logs}`.
const BASE: &str = "/run/bosun-bench";
/// How long the container may take to exit after `start`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// A runtime that fails this many measured iterations is left out.
const MAX_FAILURES: usize = 3;
const UNIFIED: &str = "/sys/fs/cgroup/unified";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("lifecycle bench: skipped: needs root (it creates real containers)");
        return;
    }
    if let Err(e) = run() {
        // A benchmark reports; it never fails CI.
        println!("lifecycle bench: aborted: {e:#}");
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    cpu: Duration,
    maxrss_kb: i64,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    wall: Duration,
    cpu: Duration,
    cpu_cli: Duration,
    rss_kb: i64,
    /// Wall time of each step: create, start, wait for exit, delete.
    steps: [Duration; 4],
}

struct Runtime {
    name: String,
    bin: PathBuf,
    root: PathBuf,
    log: PathBuf,
    /// Mount namespace to enter before exec (crun on a hybrid host).
    mntns: Option<Arc<OwnedFd>>,
    samples: Vec<Sample>,
    failures: Vec<String>,
    /// Container ids that may exist in `root` and must be deleted.
    live: BTreeSet<String>,
    /// Why it is left out, if it is.
    out: Option<String>,
}

impl Runtime {
    fn command(&self, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--root").arg(&self.root).args(args);
        let log = File::create(&self.log).with_context(|| format!("create {:?}", self.log))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            // Own process group: a Ctrl-C at the terminal reaches only the
            // bench, which then cleans up instead of leaving containers.
            .process_group(0);
        let ns = self.mntns.clone();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes the setns(2) system call, which is async-signal-safe; it
        // allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = &ns {
                    setns(fd.as_fd(), CloneFlags::CLONE_NEWNS)?;
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs one runtime command to completion; error includes its stderr.
    fn invoke(&self, args: &[&str]) -> Result<Usage> {
        let child = self
            .command(args)?
            .spawn()
            .with_context(|| format!("spawn {}", self.bin.display()))?;
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        let (status, usage) = wait4_blocking(pid)?;
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            let mut out = String::new();
            if let Ok(mut f) = File::open(&self.log) {
                let _ = f.read_to_string(&mut out);
            }
            let out = out.trim();
            let out: String = out.chars().take(2000).collect();
            bail!(
                "`{} {}` {}: {}",
                self.name,
                args.join(" "),
                describe_status(status),
                if out.is_empty() { "(no output)" } else { &out }
            );
        }
        Ok(usage)
    }

    fn iteration(&mut self, bundle: &Path, id: &str) -> Result<Sample> {
        let bundle = bundle.to_str().context("bundle path is not UTF-8")?;
        let t0 = Instant::now();
        self.live.insert(id.to_owned());
        let create = self.invoke(&["create", "--bundle", bundle, id])?;
        let t1 = Instant::now();
        let started = self.invoke(&["start", id])?;
        let t2 = Instant::now();
        let orphans = reap_all(EXIT_TIMEOUT)
            .with_context(|| format!("{}: waiting for container {id} to exit", self.name))?;
        let t3 = Instant::now();
        let delete = self.invoke(&["delete", id])?;
        self.live.remove(id);
        // Anything the delete left behind is part of its cost too.
        let late = reap_all(EXIT_TIMEOUT)?;
        let t4 = Instant::now();
        let wall = t4 - t0;
        let cli = [create, started, delete];
        let cpu_cli: Duration = cli.iter().map(|u| u.cpu).sum();
        Ok(Sample {
            wall,
            cpu: cpu_cli + orphans.cpu + late.cpu,
            cpu_cli,
            rss_kb: cli.iter().map(|u| u.maxrss_kb).max().unwrap_or(0),
            steps: [t1 - t0, t2 - t1, t3 - t2, t4 - t3],
        })
    }

    /// Best-effort removal of every container this runtime may still have.
    fn cleanup(&mut self) {
        let ids: Vec<String> = self.live.iter().cloned().collect();
        for id in ids {
            match self.invoke(&["delete", "--force", &id]) {
                Ok(_) => {
                    self.live.remove(&id);
                }
                Err(e) => {
                    // Already gone (create failed early) is fine.
                    if !self.root.join(&id).exists() {
                        self.live.remove(&id);
                    } else {
                        eprintln!("lifecycle bench: cleanup: {e:#}");
                    }
                }
            }
        }
        let _ = reap_all(Duration::from_secs(2));
    }
}

/// Everything the bench created on disk, removed (after the containers) on drop.
struct Bench {
    dir: PathBuf,
    runtimes: Vec<Runtime>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for rt in &mut self.runtimes {
            rt.cleanup();
        }
        let left: Vec<String> = self
            .runtimes
            .iter()
            .flat_map(|rt| rt.live.iter().map(move |id| format!("{}:{id}", rt.name)))
            .collect();
        if left.is_empty() {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                eprintln!("lifecycle bench: cleanup: remove {:?}: {e}", self.dir);
            }
            // Only if empty: another run may be using it.
            let _ = fs::remove_dir(BASE);
        } else {
            eprintln!(
                "lifecycle bench: could not delete containers {left:?}; keeping {:?}",
                self.dir
            );
        }
    }
}

fn run() -> Result<()> {
    let iters = env_usize("BENCH_ITERS", 30)?;
    let warmup = env_usize("BENCH_WARMUP", 3)?;
    install_signal_handlers()?;
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes plain integers and touches
    // no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        bail!(
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            std::io::Error::last_os_error()
        );
    }

    let dir = PathBuf::from(BASE).join(std::process::id().to_string());
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("remove stale {dir:?}"))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("create {dir:?}"))?;
    let mut bench = Bench {
        dir: dir.clone(),
        runtimes: Vec::new(),
    };
    fs::create_dir_all(dir.join("roots"))?;
    fs::create_dir_all(dir.join("logs"))?;
    let bundle = dir.join("bundle");
    write_bundle(&bundle)?;

    let wanted = std::env::var("BENCH_RUNTIMES").unwrap_or_else(|_| "bosun-runc,runc,crun".into());
    let mut skipped: Vec<(String, String)> = Vec::new();
    for name in wanted.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match locate(name) {
            Ok(bin) => {
                let mntns = if name == "crun" && is_mountpoint(UNIFIED) {
                    match hybrid_free_mntns() {
                        Ok(ns) => Some(Arc::new(ns)),
                        Err(e) => {
                            skipped.push((name.into(), format!("{e:#}")));
                            continue;
                        }
                    }
                } else {
                    None
                };
                let root = dir.join("roots").join(name);
                fs::create_dir_all(&root)?;
                bench.runtimes.push(Runtime {
                    name: name.into(),
                    bin,
                    root,
                    log: dir.join("logs").join(format!("{name}.log")),
                    mntns,
                    samples: Vec::new(),
                    failures: Vec::new(),
                    live: BTreeSet::new(),
                    out: None,
                });
            }
            Err(e) => skipped.push((name.into(), format!("{e:#}"))),
        }
    }
    for (name, why) in &skipped {
        eprintln!("lifecycle bench: {name}: left out: {why}");
    }
    clean_stale(&bench.runtimes);
    for rt in &bench.runtimes {
        let ns = if rt.mntns.is_some() {
            format!(" (in a private mount ns without {UNIFIED})")
        } else {
            String::new()
        };
        eprintln!("lifecycle bench: {} = {}{ns}", rt.name, rt.bin.display());
    }
    eprintln!(
        "lifecycle bench: /bin/true create+start+delete, {warmup} warm-up + {iters} iterations, round-robin"
    );

    let total = warmup + iters;
    let n = bench.runtimes.len();
    let pid = std::process::id();
    'iterations: for i in 0..total {
        for k in 0..n {
            if INTERRUPTED.load(Ordering::SeqCst) {
                eprintln!("lifecycle bench: interrupted; reporting what was measured");
                break 'iterations;
            }
            let rt = &mut bench.runtimes[(i + k) % n];
            if rt.out.is_some() {
                continue;
            }
            let id = format!("bench-{pid}-{i}");
            match rt.iteration(&bundle, &id) {
                Ok(s) if i >= warmup => rt.samples.push(s),
                Ok(_) => {}
                Err(_) if INTERRUPTED.load(Ordering::SeqCst) => rt.cleanup(),
                Err(e) => {
                    let msg = format!("{e:#}");
                    eprintln!("lifecycle bench: {} iteration {i} failed: {msg}", rt.name);
                    rt.cleanup();
                    rt.failures.push(msg.clone());
                    if i == 0 {
                        rt.out = Some(format!("first iteration failed: {msg}"));
                    } else if rt.failures.len() >= MAX_FAILURES {
                        rt.out = Some(format!("{} failures, last: {msg}", rt.failures.len()));
                    }
                }
            }
        }
        let phase = if i < warmup { "warm-up" } else { "iteration" };
        let num = if i < warmup { i + 1 } else { i + 1 - warmup };
        let of = if i < warmup { warmup } else { iters };
        let mut line = format!("  {phase} {num}/{of}:");
        for rt in &bench.runtimes {
            match (&rt.out, rt.samples.last()) {
                (Some(_), _) => line.push_str(&format!(" {}=out", rt.name)),
                (None, Some(s)) if i >= warmup => {
                    line.push_str(&format!(" {}={:.1}ms", rt.name, ms(s.wall)))
                }
                _ => line.push_str(&format!(" {}=ok", rt.name)),
            }
        }
        eprintln!("{line}");
    }

    report(&bench.runtimes, &skipped);
    Ok(())
}

/// Deletes containers left by an earlier run of the bench that was killed
/// (its pid is gone) before it could clean up, then its directory.
fn clean_stale(runtimes: &[Runtime]) {
    let Ok(entries) = fs::read_dir(BASE) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let dir = entry.path();
        let mut clean = true;
        for rt in runtimes {
            let root = dir.join("roots").join(&rt.name);
            let ids: BTreeSet<String> = fs::read_dir(&root)
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().into_string().ok())
                        .collect()
                })
                .unwrap_or_default();
            if ids.is_empty() {
                continue;
            }
            eprintln!(
                "lifecycle bench: deleting {} containers left by killed run {pid}: {ids:?}",
                rt.name
            );
            let mut stale = Runtime {
                name: rt.name.clone(),
                bin: rt.bin.clone(),
                root,
                log: dir.join("stale.log"),
                mntns: rt.mntns.clone(),
                samples: Vec::new(),
                failures: Vec::new(),
                live: ids,
                out: None,
            };
            stale.cleanup();
            clean &= stale.live.is_empty();
        }
        if clean {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

struct Stats {
    wall50: f64,
    wall90: f64,
    cpu50: f64,
    cli50: f64,
    rss50: f64,
    steps50: [f64; 4],
}

fn stats(samples: &[Sample]) -> Option<Stats> {
    if samples.is_empty() {
        return None;
    }
    let pick = |f: &dyn Fn(&Sample) -> f64, q: f64| -> f64 {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        // Nearest rank.
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    };
    Some(Stats {
        wall50: pick(&|s| ms(s.wall), 0.5),
        wall90: pick(&|s| ms(s.wall), 0.9),
        cpu50: pick(&|s| ms(s.cpu), 0.5),
        cli50: pick(&|s| ms(s.cpu_cli), 0.5),
        rss50: pick(&|s| s.rss_kb as f64 / 1024.0, 0.5),
        steps50: [0, 1, 2, 3].map(|i| pick(&|s| ms(s.steps[i]), 0.5)),
    })
}

fn report(runtimes: &[Runtime], skipped: &[(String, String)]) {
    let base = runtimes
        .iter()
        .find(|rt| rt.name == "bosun-runc" && rt.out.is_none())
        .and_then(|rt| stats(&rt.samples));
    let ratio = |x: f64, b: Option<f64>| match b {
        Some(b) if b > 0.0 => format!("{:.2}", x / b),
        _ => "-".into(),
    };
    println!();
    println!("lifecycle: /bin/true create+start+delete; ratio = runtime / bosun-runc");
    println!(
        "{:<11} {:>5} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6} {:>6} {:>6}",
        "runtime",
        "n",
        "wall p50",
        "wall p90",
        "cpu p50",
        "cli cpu",
        "rss MB",
        "wall×",
        "cpu×",
        "rss×"
    );
    let mut lines = Vec::new();
    for rt in runtimes {
        let st = match (&rt.out, stats(&rt.samples)) {
            (None, Some(st)) => st,
            (why, _) => {
                let why = why.clone().unwrap_or_else(|| "no samples".into());
                println!("{:<11} left out: {why}", rt.name);
                lines.push(format!(
                    "BENCH runtime={} status=failed error={:?}",
                    rt.name, why
                ));
                continue;
            }
        };
        println!(
            "{:<11} {:>5} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.1} {:>6} {:>6} {:>6}",
            rt.name,
            rt.samples.len(),
            st.wall50,
            st.wall90,
            st.cpu50,
            st.cli50,
            st.rss50,
            ratio(st.wall50, base.as_ref().map(|b| b.wall50)),
            ratio(st.cpu50, base.as_ref().map(|b| b.cpu50)),
            ratio(st.rss50, base.as_ref().map(|b| b.rss50)),
        );
        lines.push(format!(
            "BENCH runtime={} status=ok n={} failures={} wall_p50_ms={:.2} wall_p90_ms={:.2} cpu_p50_ms={:.2} cli_cpu_p50_ms={:.2} rss_mb={:.2} create_p50_ms={:.2} start_p50_ms={:.2} exit_p50_ms={:.2} delete_p50_ms={:.2}",
            rt.name,
            rt.samples.len(),
            rt.failures.len(),
            st.wall50,
            st.wall90,
            st.cpu50,
            st.cli50,
            st.rss50,
            st.steps50[0],
            st.steps50[1],
            st.steps50[2],
            st.steps50[3],
        ));
    }
    for (name, why) in skipped {
        println!("{name:<11} left out: {why}");
        lines.push(format!("BENCH runtime={name} status=missing error={why:?}"));
    }
    println!();
    println!(
        "wall per step, p50 ms (exit = after start until the container's processes are reaped):"
    );
    println!(
        "{:<11} {:>9} {:>9} {:>9} {:>9}",
        "runtime", "create", "start", "exit", "delete"
    );
    for rt in runtimes.iter().filter(|rt| rt.out.is_none()) {
        if let Some(st) = stats(&rt.samples) {
            let [c, s, e, d] = st.steps50;
            println!("{:<11} {c:>9.1} {s:>9.1} {e:>9.1} {d:>9.1}", rt.name);
        }
    }
    println!();
    println!("wall: create → delete done and all processes reaped; cpu: user+sys of all runtime");
    println!("processes incl. the container's init stage; cli cpu: the 3 CLI calls only;");
    println!("rss: peak ru_maxrss of the CLI calls. Medians (p50) unless noted, ms.");
    for l in lines {
        println!("{l}");
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn env_usize(key: &str, default: usize) -> Result<usize> {
    match std::env::var(key) {
        Ok(v) => v.trim().parse().with_context(|| format!("{key}={v:?}")),
        Err(_) => Ok(default),
    }
}

fn install_signal_handlers() -> Result<()> {
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { sigaction(sig, &act) }.with_context(|| format!("sigaction {sig}"))?;
    }
    Ok(())
}

/// Finds a runtime binary: bosun-runc from `BOSUN_RUNC` or cargo's build,
/// the others on `PATH`.
fn locate(name: &str) -> Result<PathBuf> {
    let path = if name == "bosun-runc" {
        match std::env::var_os("BOSUN_RUNC") {
            Some(p) => PathBuf::from(p),
            None => match option_env!("CARGO_BIN_EXE_bosun-runc") {
                Some(p) => PathBuf::from(p),
                None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../target/x86_64-unknown-linux-gnu/release/bosun-runc"),
            },
        }
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| anyhow!("`{name}` not found on PATH"))?
    };
    if !path.is_file() {
        bail!(
            "{} does not exist (set BOSUN_RUNC or build it)",
            path.display()
        );
    }
    Ok(path)
}

fn is_mountpoint(path: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(path)))
        .unwrap_or(false)
}

/// Makes a mount namespace, private to the bench, in which the cgroup2 mount
/// of a hybrid host is detached; returns a handle that keeps it alive.
fn hybrid_free_mntns() -> Result<OwnedFd> {
    // A thread can leave the process's mount namespace on its own (this
    // unshares its fs_struct too); the namespace lives on through the fd.
    std::thread::spawn(|| -> Result<OwnedFd> {
        unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .context("make / rprivate")?;
        umount2(UNIFIED, MntFlags::MNT_DETACH).with_context(|| format!("umount {UNIFIED}"))?;
        let ns = File::open("/proc/thread-self/ns/mnt").context("open mount ns")?;
        Ok(OwnedFd::from(ns))
    })
    .join()
    .map_err(|_| anyhow!("mount namespace thread panicked"))?
}

/// Writes the test suite's bundle (`runc spec` defaults, not a terminal)
/// running `/bin/true` in a busybox rootfs.
fn write_bundle(dir: &Path) -> Result<()> {
    let busybox = std::env::var_os("BENCH_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(rootfs::BUSYBOX));
    rootfs::busybox_from(&busybox, &dir.join("rootfs"))
        .with_context(|| format!("busybox rootfs from {}", busybox.display()))?;
    let config = serde_json::to_vec_pretty(&bundle::spec(&["/bin/true"]))?;
    fs::write(dir.join("config.json"), config).context("write config.json")?;
    Ok(())
}

fn rusage_usage(ru: &libc::rusage) -> Usage {
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Usage {
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        maxrss_kb: ru.ru_maxrss,
    }
}

/// `wait4(pid, options)`: `Ok(None)` when `WNOHANG` found nothing ready,
/// `Err` with ECHILD when there is no child to wait for.
fn wait4(pid: i32, options: i32) -> std::io::Result<Option<(i32, i32, Usage)>> {
    loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to live, writable locals of the right type.
        let r = unsafe { libc::wait4(pid, &mut status, options, &mut ru) };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if r == 0 {
            return Ok(None);
        }
        return Ok(Some((r, status, rusage_usage(&ru))));
    }
}

fn wait4_blocking(pid: i32) -> Result<(i32, Usage)> {
    match wait4(pid, 0).with_context(|| format!("wait4({pid})"))? {
        Some((_, status, usage)) => Ok((status, usage)),
        None => bail!("wait4({pid}) returned no child"),
    }
}

/// Reaps every child (as a subreaper: every orphan the runtimes left) until
/// none is left; sums their CPU.
fn reap_all(timeout: Duration) -> Result<Usage> {
    let deadline = Instant::now() + timeout;
    let mut total = Usage::default();
    loop {
        match wait4(-1, libc::WNOHANG) {
            Ok(Some((_, _, u))) => {
                total.cpu += u.cpu;
                total.maxrss_kb = total.maxrss_kb.max(u.maxrss_kb);
            }
            Ok(None) => {
                if Instant::now() > deadline {
                    bail!("processes still running after {timeout:?}");
                }
                if INTERRUPTED.load(Ordering::SeqCst) {
                    bail!("interrupted");
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(total),
            Err(e) => return Err(e).context("wait4(-1)"),
        }
    }
}

fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status:#x}")
    }
}
