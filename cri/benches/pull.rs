//! Pull benchmark: `bosun-image pull` beside containerd (`ctr images pull`)
//! and `skopeo copy` + `umoci unpack`, all pulling the same images from the
//! same local registry and unpacking them onto the same filesystem
//! (`/var/tmp`).
//!
//! Setup (not timed): Debian's docker-registry on a free 127.0.0.1 port
//! (the test suite's helper, `tests/common`), two images pushed with skopeo:
//! - `busybox`: the test suite's busybox image (one gzip layer, ~1 MB
//!   compressed, ~2 MB unpacked);
//! - `big`: four gzip layers built here, ~30 MB unpacked: 8 MB of random
//!   bytes (incompressible), 12 MB of word-like text (compressible), 2000
//!   small files in 20 directories, 6 MB of repetitive blocks with noise.
//!
//! And a private containerd 1.6 (Debian's) on its own socket, root and state
//! dirs, with a minimal config (CRI and unused snapshotters disabled).
//!
//! One iteration, for each tool and each image: make the store cold, pull
//! (cold), pull again (warm). Timed: spawn of the client → its exit.
//! - bosun-image (the release binary beside this bench, so process start
//!   counts as it does for the others): `bosun-image --root R pull
//!   --insecure-registry HOST REF`. Cold: R removed. Warm: the image is
//!   there; the pull resolves the manifest and finds every layer unpacked.
//! - containerd: `ctr --debug -a SOCK -n bench images pull --plain-http
//!   REF` (fetch, then unpack into the overlayfs snapshotter; `--debug`
//!   turns off ctr's progress display, which otherwise waits for its next
//!   100 ms tick after the fetch). Cold: a new daemon on empty root and
//!   state dirs (untimed; `ctr images rm --sync` left layer blobs of the
//!   4-layer image behind), warmed up with `ctr images ls` and `ctr content
//!   ls`. Warm: the image is there.
//! - skopeo+umoci: `skopeo copy docker://REF oci:DIR:TAG` then `umoci unpack
//!   --image DIR:TAG BUNDLE`. Cold: DIR and BUNDLE removed. Warm: skopeo
//!   copies into the existing layout (blobs present) and, umoci having no
//!   notion of "already unpacked", the existing bundle is kept (no unpack).
//!
//! Tools run in the same process, interleaved round-robin (the order rotates
//! every iteration), so drift hits all alike. Medians over the measured
//! iterations; ratio = tool / bosun-image. CPU: user+sys of the client
//! processes (from the bench's children times, 10 ms ticks) plus, for
//! containerd, of the daemon (from /proc/PID/stat) — the registry's CPU is
//! not counted for anyone.
//!
//! Environment: `BENCH_ITERS` (10), `BENCH_WARMUP` (1), `BENCH_TOOLS` (comma
//! list, default `bosun-image,containerd,skopeo+umoci`), `BOSUN_IMAGE`
//! (path of bosun-image; default: the binary cargo built for this bench).
//!
//! Needs root (unpacking sets owners, containerd mounts); without it the
//! bench prints why and exits 0. It never fails: a tool that is missing or
//! fails is reported and left out.

#![allow(clippy::unwrap_used)] // a bench harness; failures are reported

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};

const BASE: &str = "/var/tmp/bosun-bench-pull";
const MAX_FAILURES: usize = 3;
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
];

fn main() {
    if !rustix::process::geteuid().is_root() {
        println!("pull bench: skipped: needs root (unpacking sets owners; containerd mounts)");
        return;
    }
    if let Err(e) = run() {
        // A benchmark reports; it never fails CI.
        println!("pull bench: aborted: {e:#}");
    }
    // Only if empty: another run may be using it.
    let _ = fs::remove_dir(BASE);
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    wall: Duration,
    cpu: Duration,
}

struct BenchImage {
    key: &'static str,
    reference: String,
    tag: &'static str,
    /// Compressed bytes (config + layers) and layer count, for the table.
    bytes: u64,
    layers: usize,
}

enum Kind {
    Bosun { bin: PathBuf },
    Containerd { daemon: Child, sock: PathBuf },
    SkopeoUmoci,
}

struct Tool {
    name: &'static str,
    kind: Kind,
    dir: PathBuf,
    log: PathBuf,
    /// (image key, "cold"|"warm") → samples.
    samples: BTreeMap<(&'static str, &'static str), Vec<Sample>>,
    failures: Vec<String>,
    out: Option<String>,
}

impl Drop for Tool {
    fn drop(&mut self) {
        if let Kind::Containerd { daemon, .. } = &mut self.kind {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

impl Tool {
    fn command(&self, program: &Path) -> Result<Command> {
        let mut cmd = Command::new(program);
        let log = File::create(&self.log).with_context(|| format!("create {:?}", self.log))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        Ok(cmd)
    }

    /// Runs to completion; the error carries the tail of its output.
    fn invoke(&self, program: &str, args: &[&str]) -> Result<()> {
        let mut cmd = self.command(Path::new(program))?;
        cmd.args(args);
        if let Kind::Bosun { .. } = self.kind {
            cmd.env("RUST_LOG", "warn");
        }
        let status = cmd.status().with_context(|| format!("spawn {program}"))?;
        if !status.success() {
            let out = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = out
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" | ");
            bail!("`{program} {}` {status}: {tail}", args.join(" "));
        }
        Ok(())
    }

    fn ctr(&self, args: &[&str]) -> Result<()> {
        let Kind::Containerd { sock, .. } = &self.kind else {
            bail!("not containerd")
        };
        let sock = sock.to_string_lossy().into_owned();
        // --debug: otherwise `ctr pull` shows progress and, once the fetch
        // is done, waits for its next 100 ms UI tick (measured here: warm
        // pulls 125 ms plain, 24 ms with --debug). That is ctr's UI, not
        // containerd's pull.
        let mut full = vec!["--debug", "-a", sock.as_str(), "-n", "bench"];
        full.extend_from_slice(args);
        self.invoke("ctr", &full)
    }

    fn daemon_ticks(&self) -> u64 {
        match &self.kind {
            Kind::Containerd { daemon, .. } => {
                proc_ticks(&format!("/proc/{}/stat", daemon.id()), 11).unwrap_or(0)
            }
            _ => 0,
        }
    }

    fn restart_containerd(&mut self) -> Result<()> {
        if let Kind::Containerd { daemon, .. } = &mut self.kind {
            daemon.kill()?;
            daemon.wait()?;
        }
        remove_all(&self.dir.join("root"))?;
        remove_all(&self.dir.join("state"))?;
        self.kind = start_containerd(&self.dir)?;
        wait_containerd(self)
    }

    fn make_cold(&mut self, image: &BenchImage) -> Result<()> {
        match &self.kind {
            Kind::Bosun { .. } => remove_all(&self.dir.join(image.key)),
            Kind::Containerd { .. } => {
                // `ctr images rm --sync` left layer blobs of the 4-layer
                // image in the content store here, so cold is a new daemon
                // on empty dirs (untimed), warmed up by two API calls.
                self.restart_containerd()?;
                self.ctr(&["images", "ls"])?;
                self.ctr(&["content", "ls"])
            }
            Kind::SkopeoUmoci => {
                remove_all(&self.dir.join(format!("{}-layout", image.key)))?;
                remove_all(&self.dir.join(format!("{}-bundle", image.key)))
            }
        }
    }

    fn pull(&self, image: &BenchImage, host: &str) -> Result<Sample> {
        let ticks0 = children_ticks()? + self.daemon_ticks();
        let t0 = Instant::now();
        match &self.kind {
            Kind::Bosun { bin } => {
                let root = self.dir.join(image.key);
                let root = root.to_string_lossy();
                self.invoke(
                    &bin.to_string_lossy(),
                    &[
                        "--root",
                        &root,
                        "pull",
                        "--insecure-registry",
                        host,
                        &image.reference,
                    ],
                )?;
            }
            Kind::Containerd { .. } => {
                self.ctr(&["images", "pull", "--plain-http", &image.reference])?;
            }
            Kind::SkopeoUmoci => {
                let layout = self.dir.join(format!("{}-layout", image.key));
                let bundle = self.dir.join(format!("{}-bundle", image.key));
                let at = format!("{}:{}", layout.display(), image.tag);
                self.invoke(
                    "skopeo",
                    &[
                        "copy",
                        "--quiet",
                        "--insecure-policy",
                        "--src-tls-verify=false",
                        &format!("docker://{}", image.reference),
                        &format!("oci:{at}"),
                    ],
                )?;
                if !bundle.exists() {
                    self.invoke(
                        "umoci",
                        &["unpack", "--image", &at, &bundle.to_string_lossy()],
                    )?;
                }
            }
        }
        let wall = t0.elapsed();
        let ticks = (children_ticks()? + self.daemon_ticks()).saturating_sub(ticks0);
        Ok(Sample {
            wall,
            // USER_HZ is 100 on Linux.
            cpu: Duration::from_millis(ticks * 10),
        })
    }
}

fn remove_all(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
    }
}

/// Two consecutive clock-tick fields of a /proc stat line, summed; `first`
/// counts from the field after the command name (state = 0).
fn proc_ticks(path: &str, first: usize) -> Result<u64> {
    let stat = fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let a: u64 = fields.get(first).context("stat field")?.parse()?;
    let b: u64 = fields.get(first + 1).context("stat field")?.parse()?;
    Ok(a + b)
}

/// cutime + cstime of this process: CPU of every waited-for child.
fn children_ticks() -> Result<u64> {
    proc_ticks("/proc/self/stat", 13)
}

fn env_usize(key: &str, default: usize) -> Result<usize> {
    match std::env::var(key) {
        Ok(v) => v.parse().with_context(|| format!("{key}={v:?}")),
        Err(_) => Ok(default),
    }
}

fn run() -> Result<()> {
    let iters = env_usize("BENCH_ITERS", 10)?;
    let warmup = env_usize("BENCH_WARMUP", 1)?;
    let wanted = std::env::var("BENCH_TOOLS")
        .unwrap_or_else(|_| "bosun-image,containerd,skopeo+umoci".to_owned());
    let bosun = std::env::var_os("BOSUN_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bosun-image")));

    fs::create_dir_all(BASE)?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", std::process::id()))
        .tempdir_in(BASE)?;
    let work = dir.path();

    eprintln!("pull bench: building images and starting a registry");
    let registry = common::Registry::start(false)?;
    let host = registry.host();
    let (busybox_layout, info) = common::busybox_layout(&work.join("busybox-src"))?;
    registry.push(&busybox_layout, "1", "bench/busybox")?;
    let busybox_bytes = fs::metadata(
        busybox_layout
            .join("blobs/sha256")
            .join(info.layer_digests[0].trim_start_matches("sha256:")),
    )?
    .len();
    let big_layout = work.join("big-src");
    let (big_bytes, big_layers) = build_big_image(&big_layout)?;
    registry.push(&big_layout, "1", "bench/big")?;
    let images = [
        BenchImage {
            key: "busybox",
            reference: format!("{host}/bench/busybox:1"),
            tag: "1",
            bytes: busybox_bytes,
            layers: 1,
        },
        BenchImage {
            key: "big",
            reference: format!("{host}/bench/big:1"),
            tag: "1",
            bytes: big_bytes,
            layers: big_layers,
        },
    ];

    let mut tools = Vec::new();
    let mut skipped = Vec::new();
    for name in wanted.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let tool_dir = work.join(name);
        fs::create_dir_all(&tool_dir)?;
        let log = tool_dir.join("last.log");
        let kind = match name {
            "bosun-image" if bosun.is_file() => Kind::Bosun { bin: bosun.clone() },
            "bosun-image" => {
                skipped.push((name, format!("{} not found", bosun.display())));
                continue;
            }
            "containerd" => match start_containerd(&tool_dir) {
                Ok(kind) => kind,
                Err(e) => {
                    skipped.push((name, format!("{e:#}")));
                    continue;
                }
            },
            "skopeo+umoci" => Kind::SkopeoUmoci,
            other => {
                skipped.push(("?", format!("unknown tool {other:?}")));
                continue;
            }
        };
        let name: &'static str = match name {
            "bosun-image" => "bosun-image",
            "containerd" => "containerd",
            _ => "skopeo+umoci",
        };
        tools.push(Tool {
            name,
            kind,
            dir: tool_dir,
            log,
            samples: BTreeMap::new(),
            failures: Vec::new(),
            out: None,
        });
    }
    if let Some(t) = tools.iter_mut().find(|t| t.name == "containerd") {
        if let Err(e) = wait_containerd(t) {
            t.out = Some(format!("{e:#}"));
        }
    }

    eprintln!(
        "pull bench: {iters} iterations (+{warmup} warm-up), tools: {}",
        tools.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
    );
    let n = tools.len();
    for it in 0..warmup + iters {
        let measured = it >= warmup;
        for k in 0..n {
            let tool = &mut tools[(it + k) % n];
            if tool.out.is_some() {
                continue;
            }
            for image in &images {
                let result = tool
                    .make_cold(image)
                    .and_then(|()| tool.pull(image, &host))
                    .and_then(|cold| Ok((cold, tool.pull(image, &host)?)));
                match result {
                    Ok((cold, warm)) if measured => {
                        tool.samples
                            .entry((image.key, "cold"))
                            .or_default()
                            .push(cold);
                        tool.samples
                            .entry((image.key, "warm"))
                            .or_default()
                            .push(warm);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let msg = format!("{e:#}");
                        eprintln!("pull bench: {} {}: {msg}", tool.name, image.key);
                        tool.failures.push(msg.clone());
                        if tool.failures.len() >= MAX_FAILURES {
                            tool.out = Some(format!("failed {MAX_FAILURES} times; last: {msg}"));
                        }
                    }
                }
            }
        }
        eprint!(".");
    }
    eprintln!();
    report(&tools, &skipped, &images, iters);
    Ok(())
}

fn start_containerd(dir: &Path) -> Result<Kind> {
    let sock = dir.join("containerd.sock");
    let disabled: Vec<String> = DISABLED_PLUGINS.iter().map(|p| format!("{p:?}")).collect();
    let config = format!(
        "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [{}]\n[grpc]\n  address = \"{}\"\n[ttrpc]\n  address = \"{}.ttrpc\"\n",
        dir.join("root").display(),
        dir.join("state").display(),
        disabled.join(", "),
        sock.display(),
        sock.display(),
    );
    let config_path = dir.join("config.toml");
    fs::write(&config_path, config)?;
    let log = File::create(dir.join("containerd.log"))?;
    let daemon = Command::new("containerd")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("start containerd")?;
    Ok(Kind::Containerd { daemon, sock })
}

fn wait_containerd(tool: &Tool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tool.ctr(&["version"]).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "containerd not answering: {}",
                fs::read_to_string(tool.dir.join("containerd.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }

    /// Word-like text: compresses about as well as source code or configs.
    fn text(&mut self, n: usize) -> Vec<u8> {
        const WORDS: &str = "container image layer the of snapshot registry pull manifest \
            digest sha256 config { } = return fn let 0x1f error path /usr/lib node pod 0 1 42";
        let words: Vec<&str> = WORDS.split(' ').chain(["\n", "\n    "]).collect();
        let mut out = Vec::with_capacity(n + 16);
        while out.len() < n {
            let w = words[(self.next() % words.len() as u64) as usize];
            out.extend_from_slice(w.as_bytes());
            out.push(b' ');
        }
        out.truncate(n);
        out
    }
}

/// The `big` image as an OCI layout tagged `1`; returns compressed bytes
/// (config + layers) and the layer count.
fn build_big_image(layout: &Path) -> Result<(u64, usize)> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mb = 1 << 20;
    let mut layers: Vec<Vec<(String, Vec<u8>)>> = Vec::new();
    layers.push(
        (0..8)
            .map(|i| (format!("opt/random/blob{i}.bin"), rng.bytes(mb)))
            .collect(),
    );
    layers.push(
        (0..24)
            .map(|i| (format!("usr/share/text/doc{i}.txt"), rng.text(mb / 2)))
            .collect(),
    );
    layers.push(
        (0..2000)
            .map(|i| {
                let data = if i % 2 == 0 {
                    rng.bytes(2048)
                } else {
                    rng.text(2048)
                };
                (format!("var/lib/small/d{:02}/f{i:04}", i % 20), data)
            })
            .collect(),
    );
    layers.push(
        (0..6)
            .map(|i| {
                let block = rng.bytes(4096);
                let mut data = Vec::with_capacity(mb);
                while data.len() < mb {
                    data.extend_from_slice(&block);
                    let noise = rng.bytes(512);
                    data.extend_from_slice(&noise);
                }
                data.truncate(mb);
                (format!("usr/lib/bench/lib{i}.so"), data)
            })
            .collect(),
    );

    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let put = |bytes: &[u8]| -> Result<(String, u64)> {
        let hex = hex(&Sha256::digest(bytes));
        fs::write(blobs.join(&hex), bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len() as u64))
    };
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    let mut total = 0;
    for files in &layers {
        let mut tar = tar::Builder::new(Vec::new());
        let mut dirs = std::collections::BTreeSet::new();
        for (name, _) in files {
            let mut parent = Path::new(name).parent();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                dirs.insert(p.to_owned());
                parent = p.parent();
            }
        }
        for d in &dirs {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(0);
            tar.append_data(&mut h, d, &[][..])?;
        }
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_mtime(0);
            tar.append_data(&mut h, name, &data[..])?;
        }
        let tar = tar.into_inner()?;
        diff_ids.push(format!("sha256:{}", hex(&Sha256::digest(&tar))));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar)?;
        let (digest, size) = put(&gz.finish()?)?;
        total += size;
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let (config_digest, config_size) = put(&serde_json::to_vec(&config)?)?;
    total += config_size;
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": descriptors});
    let (digest, size) = put(&serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
        "annotations": {"org.opencontainers.image.ref.name": "1"}}]});
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok((total, layers.len()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    })
}

fn report(tools: &[Tool], skipped: &[(&str, String)], images: &[BenchImage], iters: usize) {
    println!();
    println!(
        "pull + unpack from a local registry, {iters} iterations; ms, medians (min–max); ratio = tool / bosun-image"
    );
    for image in images {
        println!(
            "{}: {} layer(s), {:.1} MB compressed",
            image.key,
            image.layers,
            image.bytes as f64 / 1e6
        );
    }
    println!();
    println!(
        "{:<8} {:<5} {:<13} {:>9} {:>17} {:>8} {:>7}",
        "image", "store", "tool", "wall", "(min–max)", "cpu", "ratio"
    );
    let mut bosun_cold_busybox = None;
    let mut containerd_cold_busybox = None;
    for image in images {
        for phase in ["cold", "warm"] {
            let base = tools
                .iter()
                .find(|t| t.name == "bosun-image")
                .and_then(|t| t.samples.get(&(image.key, phase)))
                .and_then(|s| median(s.iter().map(|s| s.wall).collect()));
            for tool in tools {
                let Some(samples) = tool.samples.get(&(image.key, phase)) else {
                    continue;
                };
                let walls: Vec<Duration> = samples.iter().map(|s| s.wall).collect();
                let (Some(wall), Some(min), Some(max)) = (
                    median(walls.clone()),
                    walls.iter().min().copied(),
                    walls.iter().max().copied(),
                ) else {
                    continue;
                };
                let cpu = median(samples.iter().map(|s| s.cpu).collect()).unwrap_or_default();
                let ratio = base.map_or_else(
                    || "-".to_owned(),
                    |b| format!("{:.2}", wall.as_secs_f64() / b.as_secs_f64()),
                );
                if image.key == "busybox" && phase == "cold" {
                    match tool.name {
                        "bosun-image" => bosun_cold_busybox = Some(wall),
                        "containerd" => containerd_cold_busybox = Some(wall),
                        _ => {}
                    }
                }
                println!(
                    "{:<8} {:<5} {:<13} {:>9.1} {:>17} {:>8.0} {:>7}",
                    image.key,
                    phase,
                    tool.name,
                    ms(wall),
                    format!("({:.1}–{:.1})", ms(min), ms(max)),
                    ms(cpu),
                    ratio
                );
            }
        }
    }
    for tool in tools {
        if let Some(why) = &tool.out {
            println!("{:<13} left out: {why}", tool.name);
        } else if !tool.failures.is_empty() {
            println!(
                "{:<13} {} failed iteration(s); last: {}",
                tool.name,
                tool.failures.len(),
                tool.failures.last().map_or("", String::as_str)
            );
        }
    }
    for (name, why) in skipped {
        println!("{name:<13} left out: {why}");
    }
    if let (Some(b), Some(c)) = (bosun_cold_busybox, containerd_cold_busybox) {
        println!();
        println!(
            "issue 3 goal: bosun-image cold busybox / containerd cold busybox = {:.2} (goal ≤ 0.5)",
            b.as_secs_f64() / c.as_secs_f64()
        );
    }
    println!();
    println!("cold: empty store; warm: image present (re-pull). wall: client spawn → exit;");
    println!(
        "cpu: user+sys of the client processes (+ the containerd daemon for ctr), 10 ms ticks."
    );
}
