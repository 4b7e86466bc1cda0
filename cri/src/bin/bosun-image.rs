//! bosun-image: the operator's view of Bosun's image store, in the spirit
//! of `crictl images`/`ctr images`: pull, list, inspect, remove, import,
//! export, garbage-collect. It works on the store directly (`--root`), so
//! it holds the store's lock while it runs.

use std::collections::HashMap;
use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use bosun_cri::image::reference::Reference;
use bosun_cri::image::registry::{AuthConfig, Endpoint, Platform, PullProgress, RegistryConfig};
use bosun_cri::image::service::{Image, ImageService};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Where the image store lives when `--root` is not given.
const DEFAULT_ROOT: &str = "/var/lib/bosun/images";

#[derive(Debug, Parser)]
#[command(
    name = "bosun-image",
    version,
    about = "bosun-image: pull, list, inspect, remove, import and export images in Bosun's image store"
)]
struct Cli {
    /// Root directory of the image store
    #[arg(long, global = true, default_value = DEFAULT_ROOT, env = "BOSUN_IMAGE_ROOT")]
    root: PathBuf,
    /// Debug logging (RUST_LOG overrides)
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pull an image from a registry and unpack it
    Pull(PullArgs),
    /// List images
    #[command(alias = "ls")]
    Images(ImagesArgs),
    /// Show an image's status and details as JSON
    Inspect {
        /// Image tag, repo digest or ID
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove images (every name of each goes)
    #[command(alias = "rmi")]
    Rm {
        /// Image tag, repo digest or ID
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Import an OCI layout directory or a docker-archive tarball
    Import(ImportArgs),
    /// Export an image to an OCI layout directory or a docker-archive tarball
    Export(ExportArgs),
    /// Remove blobs and snapshots no image uses
    Gc,
    /// Show the image filesystem's usage as JSON
    Fsinfo,
}

#[derive(Debug, Args)]
struct PullArgs {
    /// Image reference, e.g. docker.io/library/busybox:1.36
    image: String,
    /// Registry credentials
    #[arg(long, value_name = "USER:PASS")]
    creds: Option<String>,
    /// OAuth2 refresh token (Docker's identity token) for the registry's token server
    #[arg(
        long = "identity-token",
        value_name = "TOKEN",
        conflicts_with = "creds"
    )]
    identity_token: Option<String>,
    /// Platform to pick from a multi-platform image (os/arch[/variant])
    #[arg(long)]
    platform: Option<String>,
    /// Registry endpoints as JSON (inline or a file):
    /// {"host": {"docker.io": [{"host": "mirror:5000", "plain_http": true}]}}
    #[arg(long, value_name = "JSON|FILE")]
    hosts: Option<String>,
    /// Reach this registry over plain HTTP (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registry: Vec<String>,
    /// Extra CA certificate (PEM) trusted for the image's registry (repeatable)
    #[arg(long = "ca-file")]
    ca_file: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct ImagesArgs {
    /// Only the image this tag, digest or ID names
    image: Option<String>,
    /// Only show image IDs
    #[arg(short, long)]
    quiet: bool,
    /// Show digests
    #[arg(long)]
    digests: bool,
    /// Show full IDs and digests
    #[arg(long = "no-trunc")]
    no_trunc: bool,
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// OCI layout directory or docker-archive tarball
    source: PathBuf,
    /// Repository for bare tags in an OCI layout (e.g. example.com/app)
    #[arg(long)]
    name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Oci,
    DockerArchive,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Image tag, repo digest or ID
    image: String,
    /// Target: a directory (OCI layout) or a .tar file (docker-archive)
    target: PathBuf,
    /// Default: docker-archive for a *.tar target, else oci
    #[arg(long)]
    format: Option<Format>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let pull_on_tty = matches!(cli.command, Command::Pull(_)) && std::io::stderr().is_terminal();
    init_logging(
        cli.verbose,
        matches!(cli.command, Command::Pull(_)) && !pull_on_tty,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow!("start async runtime: {e}")),
    };
    match runtime.block_on(run(cli, pull_on_tty)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => fail(&e),
    }
}

/// One line on stderr, exit 1.
fn fail(e: &anyhow::Error) -> ExitCode {
    // Ours carry their causes in the message already; the HTTP client's do
    // not ("error sending request" hides the TLS failure): add each cause
    // the message does not show yet.
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line = format!("{line}: {cause}");
        }
    }
    eprintln!("bosun-image: {}", line.replace('\n', " "));
    ExitCode::FAILURE
}

/// Pulls log progress lines at info when there is no progress bar; every
/// other command only warns unless asked.
fn init_logging(verbose: bool, info: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (verbose, info) {
        (true, _) => "debug",
        (false, true) => "info",
        (false, false) => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Ok(false): some of the work failed and was reported.
async fn run(cli: Cli, progress_bar: bool) -> Result<bool> {
    let config = match &cli.command {
        Command::Pull(args) => registry_config(args)?,
        _ => RegistryConfig::default(),
    };
    let _lock = lock_store(&cli.root)?;
    let service = ImageService::new(&cli.root, config)?;
    match cli.command {
        Command::Pull(args) => pull(&service, &args, progress_bar).await?,
        Command::Images(args) => images(&service, &args)?,
        Command::Inspect { images } => inspect(&service, &images)?,
        Command::Rm { images } => return remove(&service, &images).await,
        Command::Import(args) => import(&service, &args).await?,
        Command::Export(args) => export(&service, &args).await?,
        Command::Gc => {
            let report = service.gc().await?;
            println!(
                "removed {} blobs and {} snapshots",
                report.blobs, report.snapshots
            );
        }
        Command::Fsinfo => {
            let usage: Vec<_> = service
                .image_fs_info()?
                .into_iter()
                .map(|u| {
                    serde_json::json!({
                        "timestamp": u.timestamp_ns,
                        "mountpoint": u.mountpoint,
                        "usedBytes": u.used_bytes,
                        "inodesUsed": u.inodes_used,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&usage)?);
        }
    }
    Ok(true)
}

/// The store assumes one owner (opening it sweeps temp files a writer
/// would still be using): an exclusive lock on `<root>/lock` for as long
/// as this process works on it.
fn lock_store(root: &Path) -> Result<File> {
    use rustix::fs::{flock, FlockOperation};
    std::fs::create_dir_all(root).map_err(|e| anyhow!("create {}: {e}", root.display()))?;
    let path = root.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow!("open {}: {e}", path.display()))?;
    flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        anyhow!(
            "image store {} is in use by another process ({e})",
            root.display()
        )
    })?;
    Ok(file)
}

fn registry_config(args: &PullArgs) -> Result<RegistryConfig> {
    let mut config = RegistryConfig::default();
    if let Some(hosts) = &args.hosts {
        let json = if hosts.trim_start().starts_with('{') {
            hosts.clone()
        } else {
            std::fs::read_to_string(hosts).map_err(|e| anyhow!("read hosts file {hosts}: {e}"))?
        };
        config = config.with_hosts_json(&json)?;
    }
    if let Some(platform) = &args.platform {
        config.platform = parse_platform(platform)?;
    }
    for host in &args.insecure_registry {
        let endpoints = config.hosts.entry(host.clone()).or_default();
        if endpoints.is_empty() {
            endpoints.push(Endpoint::https(host));
        }
        for e in endpoints.iter_mut() {
            e.plain_http = true;
        }
        // A mirror endpoint with that name, configured for another registry.
        for e in config.hosts.values_mut().flatten() {
            if e.host == *host {
                e.plain_http = true;
            }
        }
    }
    if !args.ca_file.is_empty() {
        let domain = Reference::parse(&args.image)?.domain().to_owned();
        let mut endpoints = config.endpoints(&domain);
        for e in &mut endpoints {
            e.ca_files.extend(args.ca_file.iter().cloned());
        }
        config.hosts.insert(domain, endpoints);
    }
    Ok(config)
}

fn parse_platform(s: &str) -> Result<Platform> {
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
            os: (*os).to_owned(),
            architecture: (*arch).to_owned(),
            variant: parts
                .get(2)
                .filter(|v| !v.is_empty())
                .map(|v| (*v).to_owned()),
        }),
        _ => bail!("platform {s:?}: expected os/arch[/variant], e.g. linux/arm64/v8"),
    }
}

fn auth(creds: Option<&str>) -> Result<Option<AuthConfig>> {
    let Some(creds) = creds else { return Ok(None) };
    let (user, pass) = creds
        .split_once(':')
        .ok_or_else(|| anyhow!("--creds: expected USER:PASS"))?;
    Ok(Some(AuthConfig {
        username: user.to_owned(),
        password: pass.to_owned(),
        ..AuthConfig::default()
    }))
}

async fn pull(service: &ImageService, args: &PullArgs, progress_bar: bool) -> Result<()> {
    let mut auth = auth(args.creds.as_deref())?;
    if let Some(token) = &args.identity_token {
        auth = Some(AuthConfig {
            identity_token: token.clone(),
            ..AuthConfig::default()
        });
    }
    let bar = progress_bar.then(|| {
        let events = service.subscribe_progress();
        tokio::spawn(show_progress(events, args.image.clone()))
    });
    let result = service.pull_image(&args.image, auth.as_ref()).await;
    if let Some(bar) = bar {
        bar.abort();
        // The bar's task clears the line when dropped.
        let _ = bar.await;
    }
    println!("{}", result?);
    Ok(())
}

/// One bar over the bytes still to fetch; the message says how many layers
/// are unpacked.
async fn show_progress(mut events: tokio::sync::broadcast::Receiver<PullProgress>, image: String) {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    // Length unknown until the manifest is in; `wide_bar` takes what the
    // terminal has left, so the line never wraps.
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{prefix} {msg} [{wide_bar}] {bytes}/{total_bytes}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(image);
    bar.set_message("resolving");
    let _clear = ClearOnDrop(bar.clone());
    // Bytes per layer still to fetch; config and manifests are not counted.
    let mut done: HashMap<String, u64> = HashMap::new();
    loop {
        match events.recv().await {
            Ok(PullProgress::Resolved { layers, .. }) => {
                done = layers
                    .iter()
                    .filter(|l| !l.present)
                    .map(|l| (l.digest.clone(), 0))
                    .collect();
                let missing: u64 = layers.iter().filter(|l| !l.present).map(|l| l.size).sum();
                bar.set_length(missing);
                bar.set_message(format!("0/{} layers", layers.len()));
            }
            Ok(PullProgress::Downloading {
                digest, done: d, ..
            }) => {
                if let Some(n) = done.get_mut(&digest) {
                    *n = d;
                    bar.set_position(done.values().sum());
                }
            }
            Ok(PullProgress::LayerReady { index, of, .. }) => {
                bar.set_message(format!("{}/{of} layers", index + 1));
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
}

struct ClearOnDrop(indicatif::ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// `name:tag` → (name, tag); the tag follows the last ':' after the last '/'.
fn split_tag(tagged: &str) -> (&str, &str) {
    let slash = tagged.rfind('/').map_or(0, |i| i + 1);
    match tagged[slash..].rfind(':') {
        Some(i) => (&tagged[..slash + i], &tagged[slash + i + 1..]),
        None => (tagged, "<none>"),
    }
}

fn short(digest: &str, no_trunc: bool) -> String {
    if no_trunc {
        return digest.to_owned();
    }
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    hex.chars().take(13).collect()
}

/// Decimal units with three significant digits, as crictl shows sizes.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let mut s = format!("{v:.digits$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_owned();
    }
    format!("{s}{}", UNITS[unit])
}

/// Rows of `images`: one per tag; an untagged image shows `<none>`.
fn image_rows(images: &[Image], digests: bool, no_trunc: bool) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for image in images {
        let digest_for = |repo: &str| -> String {
            image
                .repo_digests
                .iter()
                .find(|d| d.split_once('@').is_some_and(|(r, _)| r == repo))
                .or(image.repo_digests.first())
                .and_then(|d| d.split_once('@'))
                .map_or_else(|| "<none>".to_owned(), |(_, d)| short(d, no_trunc))
        };
        let mut names: Vec<(String, String)> = image
            .repo_tags
            .iter()
            .map(|t| {
                let (repo, tag) = split_tag(t);
                (repo.to_owned(), tag.to_owned())
            })
            .collect();
        if names.is_empty() {
            let repo = image
                .repo_digests
                .first()
                .and_then(|d| d.split_once('@'))
                .map_or("<none>", |(r, _)| r);
            names.push((repo.to_owned(), "<none>".to_owned()));
        }
        for (repo, tag) in names {
            let mut row = vec![repo.clone(), tag];
            if digests {
                row.push(digest_for(&repo));
            }
            row.push(short(&image.id, no_trunc));
            row.push(human_size(image.size));
            rows.push(row);
        }
    }
    rows
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        println!("{out}");
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn images(service: &ImageService, args: &ImagesArgs) -> Result<()> {
    let mut list = service.list_images(args.image.as_deref())?;
    list.sort_by(|a, b| a.repo_tags.cmp(&b.repo_tags).then(a.id.cmp(&b.id)));
    if args.quiet {
        for image in &list {
            println!("{}", image.id);
        }
        return Ok(());
    }
    let rows = image_rows(&list, args.digests, args.no_trunc);
    if args.digests {
        print_table(&["IMAGE", "TAG", "DIGEST", "IMAGE ID", "SIZE"], &rows);
    } else {
        print_table(&["IMAGE", "TAG", "IMAGE ID", "SIZE"], &rows);
    }
    Ok(())
}

fn inspect(service: &ImageService, images: &[String]) -> Result<()> {
    let mut out = Vec::new();
    for name in images {
        let status = service
            .image_status(name)?
            .ok_or_else(|| anyhow!("no such image: {name}"))?;
        let store = service.store();
        let record = store
            .get_image(&status.id)?
            .ok_or_else(|| anyhow!("no such image: {name}"))?;
        let config: serde_json::Value =
            serde_json::from_slice(&store.read_blob(&record.id.parse()?)?)?;
        let layers: Vec<_> = record
            .layers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "digest": l.digest, "size": l.size, "mediaType": l.media_type,
                    "diffID": l.diff_id, "chainID": l.chain_id,
                    "snapshot": bosun_cri::image::unpack::snapshot_path(store.snapshots_dir(), &l.chain_id),
                })
            })
            .collect();
        out.push(serde_json::json!({
            "status": {
                "id": status.id,
                "repoTags": status.repo_tags,
                "repoDigests": status.repo_digests,
                "size": status.size,
                "uid": status.uid.map(|uid| serde_json::json!({"value": uid})),
                "username": status.username,
            },
            "info": {
                "manifestDigest": record.manifest_digest,
                "indexDigest": record.index_digest,
                "layers": layers,
                "imageSpec": config,
            },
        }));
    }
    let value = if out.len() == 1 {
        out.remove(0)
    } else {
        serde_json::Value::Array(out)
    };
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// Like `crictl rmi`: an unknown image is an error, the others still go.
async fn remove(service: &ImageService, images: &[String]) -> Result<bool> {
    let mut ok = true;
    for name in images {
        let result = match service.image_status(name) {
            Ok(Some(_)) => service.remove_image(name).await.map_err(Into::into),
            Ok(None) => Err(anyhow!("no such image: {name}")),
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(()) => println!("Deleted: {name}"),
            Err(e) => {
                fail(&e);
                ok = false;
            }
        }
    }
    Ok(ok)
}

async fn import(service: &ImageService, args: &ImportArgs) -> Result<()> {
    let meta =
        std::fs::metadata(&args.source).map_err(|e| anyhow!("{}: {e}", args.source.display()))?;
    let ids = if meta.is_dir() {
        service
            .import_oci_layout(&args.source, args.name.as_deref())
            .await?
    } else {
        if args.name.is_some() {
            bail!("--name applies to OCI layouts; a docker-archive names its images");
        }
        service.import_docker_archive(&args.source).await?
    };
    if ids.is_empty() {
        bail!("{}: no tagged images found", args.source.display());
    }
    for id in ids {
        let tags = service
            .image_status(&id)?
            .map(|s| s.repo_tags.join(","))
            .unwrap_or_default();
        println!("{id} {tags}");
    }
    Ok(())
}

async fn export(service: &ImageService, args: &ExportArgs) -> Result<()> {
    let format = args
        .format
        .unwrap_or(if args.target.extension().is_some_and(|e| e == "tar") {
            Format::DockerArchive
        } else {
            Format::Oci
        });
    match format {
        Format::Oci => {
            if args.target.is_file() {
                bail!(
                    "{}: an OCI layout is a directory (use --format docker-archive for a file)",
                    args.target.display()
                );
            }
            service.export_oci_layout(&args.image, &args.target).await?
        }
        Format::DockerArchive => {
            if args.target.is_dir() {
                bail!("{}: a docker-archive is a file", args.target.display());
            }
            service
                .export_docker_archive(&args.image, &args.target)
                .await?
        }
    };
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn sizes_as_crictl_shows_them() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(2_217_936), "2.22MB");
        assert_eq!(human_size(1_000_000), "1MB");
        assert_eq!(human_size(45_600_000), "45.6MB");
        assert_eq!(human_size(123_456_789_012), "123GB");
    }

    #[test]
    fn rows_per_tag_and_untagged() {
        let image = Image {
            id: format!("sha256:{}", "ab".repeat(32)),
            repo_tags: vec![
                "127.0.0.1:5000/a/b:1".into(),
                "docker.io/library/x:latest".into(),
            ],
            repo_digests: vec![format!("127.0.0.1:5000/a/b@sha256:{}", "cd".repeat(32))],
            size: 1_500_000,
            uid: None,
            username: String::new(),
        };
        let rows = image_rows(std::slice::from_ref(&image), true, false);
        assert_eq!(
            rows[0],
            [
                "127.0.0.1:5000/a/b",
                "1",
                "cdcdcdcdcdcdc",
                "ababababababa",
                "1.5MB"
            ]
        );
        assert_eq!(rows[1][0..2], ["docker.io/library/x", "latest"]);
        let untagged = Image {
            repo_tags: vec![],
            ..image
        };
        let rows = image_rows(&[untagged], false, true);
        assert_eq!(rows[0][0..2], ["127.0.0.1:5000/a/b", "<none>"]);
        assert_eq!(rows[0][2], format!("sha256:{}", "ab".repeat(32)));
    }

    #[test]
    fn platforms_and_creds() {
        let p = parse_platform("linux/arm64/v8").unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(parse_platform("linux/amd64").unwrap().variant, None);
        assert!(parse_platform("linux").is_err());
        assert!(parse_platform("/amd64").is_err());
        let a = auth(Some("u:p:q")).unwrap().unwrap();
        assert_eq!((a.username.as_str(), a.password.as_str()), ("u", "p:q"));
        assert!(auth(Some("nopass")).is_err());
    }

    #[test]
    fn insecure_registry_and_ca_files_shape_endpoints() {
        let args = PullArgs {
            image: "reg.example:5000/a:1".into(),
            creds: None,
            identity_token: None,
            platform: None,
            hosts: Some(r#"{"host": {"docker.io": [{"host": "reg.example:5000"}]}}"#.into()),
            insecure_registry: vec!["reg.example:5000".into()],
            ca_file: vec![],
        };
        let config = registry_config(&args).unwrap();
        assert!(config.endpoints("reg.example:5000")[0].plain_http);
        assert!(config.endpoints("docker.io")[0].plain_http);
        let args = PullArgs {
            image: "quay.io/a:1".into(),
            hosts: None,
            insecure_registry: vec![],
            ca_file: vec!["/ca.pem".into()],
            ..args
        };
        let config = registry_config(&args).unwrap();
        assert_eq!(
            config.endpoints("quay.io")[0].ca_files,
            vec![PathBuf::from("/ca.pem")]
        );
    }
}
