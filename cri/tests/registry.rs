//! The image service against a real registry: Debian's docker-registry on
//! 127.0.0.1 (plain HTTP, or TLS with a test CA and htpasswd basic auth),
//! images pushed with skopeo. Needs root (device nodes, ownership, trusted
//! xattrs while unpacking); skips without it unless CI is set.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bosun_cri::image::registry::{AuthConfig, Endpoint, Platform, RegistryConfig, RegistryError};
use bosun_cri::image::service::{ImageService, ServiceError};
use bosun_cri::image::store::StoreError;
use bosun_cri::image::unpack::UnpackError;
use bosun_testsupport::layout::{self, ImageInfo};
use sha2::{Digest, Sha256};

const USER: &str = "bosun";
const PASSWORD: &str = "s3cret-pass";

/// A docker-registry process with its own storage; killed on drop.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// The test CA's certificate, for TLS registries.
    ca: Option<PathBuf>,
}

impl Registry {
    fn start(tls_auth: bool) -> Result<Registry> {
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage)?;
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        let mut ca = None;
        if tls_auth {
            let d = dir.path();
            run(Command::new("openssl").current_dir(d).args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=bosun test CA",
            ]))?;
            run(Command::new("openssl").current_dir(d).args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ]))?;
            fs::write(
                d.join("ext.cnf"),
                "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
            )?;
            run(Command::new("openssl").current_dir(d).args([
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ]))?;
            let htpasswd = run(Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]))?;
            fs::write(d.join("htpasswd"), htpasswd)?;
            // skopeo's --dest-cert-dir wants the CA as *.crt in a directory.
            fs::create_dir_all(d.join("certs"))?;
            fs::copy(d.join("ca.crt"), d.join("certs/ca.crt"))?;
            config.push_str(&format!(
                "  tls:\n    certificate: {0}/server.crt\n    key: {0}/server.key\nauth:\n  htpasswd:\n    realm: bosun-test\n    path: {0}/htpasswd\n",
                d.display()
            ));
            ca = Some(d.join("ca.crt"));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config)?;
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start docker-registry")?;
        let registry = Registry {
            child,
            port,
            dir,
            ca,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(
                Instant::now() < deadline,
                "docker-registry did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes an OCI layout's tag to `repo:tag` here.
    fn push(&self, layout: &Path, tag: &str, repo: &str) -> Result<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--insecure-policy"]);
        match &self.ca {
            Some(_) => {
                cmd.arg("--dest-cert-dir")
                    .arg(self.dir.path().join("certs"))
                    .arg("--dest-creds")
                    .arg(format!("{USER}:{PASSWORD}"));
            }
            None => {
                cmd.arg("--dest-tls-verify=false");
            }
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.host()));
        run(&mut cmd).map(drop)
    }

    /// The data file of a blob in the registry's storage.
    fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            host: self.host(),
            plain_http: self.ca.is_none(),
            ca_files: self.ca.iter().cloned().collect(),
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

fn gate() -> bool {
    bosun_testsupport::privileged::require_root("image pulls from a local docker-registry")
}

/// The busybox test image as an OCI layout (tag `1`).
fn busybox_layout(dir: &Path) -> Result<(PathBuf, ImageInfo)> {
    let rootfs = dir.join("rootfs");
    bosun_testsupport::rootfs::busybox(&rootfs)?;
    let layout = dir.join("layout");
    let info = layout::write(&layout, "busybox:1", &rootfs)?;
    Ok((layout, info))
}

fn config_for(registry: &Registry) -> RegistryConfig {
    RegistryConfig {
        hosts: HashMap::from([(registry.host(), vec![registry.endpoint()])]),
        retries: 2,
        backoff: Duration::from_millis(50),
        ..RegistryConfig::default()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// Writes a one-image OCI layout with hand-made (possibly hostile) layers
/// given as plain tars; they are stored gzipped.
fn custom_layout(dir: &Path, tag: &str, layers: &[Vec<u8>], arch: &str) -> Result<PathBuf> {
    let layout = dir.join("custom");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let put = |bytes: &[u8]| -> Result<(String, usize)> {
        let digest = sha(bytes);
        fs::write(blobs.join(digest.trim_start_matches("sha256:")), bytes)?;
        Ok((digest, bytes.len()))
    };
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar)?;
        let (digest, size) = put(&gz.finish()?)?;
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}));
        diff_ids.push(sha(tar));
    }
    let config = serde_json::json!({
        "architecture": arch, "os": "linux", "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let (config_digest, config_size) = put(&serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": descriptors});
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
            "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(layout)
}

/// A tar with raw names, so `..` and absolute names can be written.
fn hostile_tar(entries: &[(tar::EntryType, &str, Option<&str>, &[u8])]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (kind, name, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        let gnu = h.as_gnu_mut().context("gnu header")?;
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_mtime(0);
        h.set_cksum();
        builder.append(&h, *data)?;
    }
    Ok(builder.into_inner()?)
}

/// Nothing left in the store: no records, blobs, snapshots or temp files.
fn assert_store_empty(service: &ImageService) -> Result<()> {
    let root = service.store().root();
    ensure!(service.list_images(None)?.is_empty(), "image records left");
    for sub in ["blobs/sha256", "images", "snapshots"] {
        let left: Vec<_> = fs::read_dir(root.join(sub))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        ensure!(left.is_empty(), "{sub} not empty: {left:?}");
    }
    Ok(())
}

fn registry_error(err: ServiceError) -> Result<Arc<RegistryError>> {
    match err {
        ServiceError::Pull { source, .. } => Ok(source),
        other => bail!("expected a pull error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_pull_status_list_remove() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let (layout, info) = busybox_layout(work.path())?;
    let registry = Registry::start(false)?;
    registry.push(&layout, "1", "bosun/busybox")?;
    let service = ImageService::new(&work.path().join("store"), config_for(&registry))?;
    let image = format!("{}/bosun/busybox:1", registry.host());

    let started = Instant::now();
    // Two identical pulls at once share one.
    let (a, b) = tokio::join!(
        service.pull_image(&image, None),
        service.pull_image(&image, None)
    );
    eprintln!(
        "pull+unpack of the busybox test image: {:?}",
        started.elapsed()
    );
    let id = a?;
    ensure!(b? == id);
    ensure!(
        id == info.config_digest,
        "image id {id} is not the config digest"
    );

    let status = service.image_status(&image)?.context("no status")?;
    ensure!(status.repo_tags == vec![image.clone()], "{status:?}");
    let repo_digest = format!("{}/bosun/busybox@{}", registry.host(), info.manifest_digest);
    ensure!(
        status.repo_digests == vec![repo_digest.clone()],
        "{status:?}"
    );
    ensure!(status.uid.is_none() && status.username.is_empty());
    ensure!(status.size > 1_000_000, "size {}", status.size);
    ensure!(service.image_status(&id)?.as_ref() == Some(&status));
    ensure!(service.image_status(&repo_digest)?.as_ref() == Some(&status));
    ensure!(service
        .image_status(&format!("{}/bosun/busybox:2", registry.host()))?
        .is_none());
    ensure!(service.list_images(None)? == vec![status.clone()]);
    ensure!(service.list_images(Some(&id))?.len() == 1);
    ensure!(service.list_images(Some("busybox"))?.is_empty());

    // The snapshot is the layer, keyed by its chain ID (= diff ID for one layer).
    let record = service.store().get_image(&id)?.context("record")?;
    ensure!(record.layers[0].chain_id == info.diff_ids[0]);
    let snapshot = service
        .store()
        .snapshots_dir()
        .join(info.diff_ids[0].trim_start_matches("sha256:"));
    ensure!(snapshot.join("bin/busybox").is_file());
    ensure!(fs::read_to_string(snapshot.join("etc/passwd"))?.contains("bosun:x:1000"));
    let fs_info = service.image_fs_info()?;
    ensure!(
        fs_info[0].used_bytes > 1_000_000 && fs_info[0].inodes_used > 10,
        "{fs_info:?}"
    );

    // Pulling again is a no-op with the same answer.
    ensure!(service.pull_image(&image, None).await? == id);

    // Unknown images are removed successfully; a digest removes every name.
    service.remove_image("127.0.0.1:1/nothing:here").await?;
    service.remove_image(&repo_digest).await?;
    ensure!(service.image_status(&image)?.is_none());
    assert_store_empty(&service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_basic_auth() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let (layout, info) = busybox_layout(work.path())?;
    let registry = Registry::start(true)?;
    registry.push(&layout, "1", "secure/busybox")?;
    let image = format!("{}/secure/busybox:1", registry.host());

    // Wrong password: a clear authentication error, nothing stored.
    let service = ImageService::new(&work.path().join("store"), config_for(&registry))?;
    let wrong = AuthConfig {
        username: USER.into(),
        password: "wrong".into(),
        ..AuthConfig::default()
    };
    let err = registry_error(service.pull_image(&image, Some(&wrong)).await.unwrap_err())?;
    ensure!(matches!(*err, RegistryError::Unauthorized { .. }), "{err}");
    assert_store_empty(&service)?;

    // No credentials at all: refused the same way.
    let err = registry_error(service.pull_image(&image, None).await.unwrap_err())?;
    ensure!(matches!(*err, RegistryError::Unauthorized { .. }), "{err}");

    // Right password, given as CRI's `auth` field.
    use base64::Engine;
    let right = AuthConfig {
        auth: base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}")),
        ..AuthConfig::default()
    };
    ensure!(service.pull_image(&image, Some(&right)).await? == info.config_digest);

    // Without the test CA the TLS handshake fails: no silent downgrade.
    let mut config = config_for(&registry);
    config
        .hosts
        .insert(registry.host(), vec![Endpoint::https(&registry.host())]);
    let untrusting = ImageService::new(&work.path().join("store2"), config)?;
    let err = untrusting
        .pull_image(&image, Some(&right))
        .await
        .unwrap_err();
    ensure!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "{err:?}"
    );
    assert_store_empty(&untrusting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tag_is_not_found() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let registry = Registry::start(false)?;
    let service = ImageService::new(&work.path().join("store"), config_for(&registry))?;
    let image = format!("{}/nothing/here:v1", registry.host());
    let err = registry_error(service.pull_image(&image, None).await.unwrap_err())?;
    ensure!(matches!(*err, RegistryError::NotFound { .. }), "{err}");
    assert_store_empty(&service)
}

/// Pushes busybox, then lets `damage` change the layer blob in the
/// registry's storage; returns the pull's error.
async fn pull_damaged(damage: impl FnOnce(&Path) -> Result<()>) -> Result<Arc<RegistryError>> {
    let work = tempfile::tempdir()?;
    let (layout, info) = busybox_layout(work.path())?;
    let registry = Registry::start(false)?;
    registry.push(&layout, "1", "bosun/busybox")?;
    damage(&registry.blob_data(&info.layer_digests[0]))?;
    let service = ImageService::new(&work.path().join("store"), config_for(&registry))?;
    let image = format!("{}/bosun/busybox:1", registry.host());
    let err = registry_error(service.pull_image(&image, None).await.unwrap_err())?;
    assert_store_empty(&service)?;
    Ok(err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_digest_is_refused() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let err = pull_damaged(|data| {
        let mut bytes = fs::read(data)?;
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        Ok(fs::write(data, bytes)?)
    })
    .await?;
    ensure!(
        matches!(
            &*err,
            RegistryError::Store {
                source: StoreError::DigestMismatch { .. },
                ..
            }
        ),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_blob_is_refused() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let err = pull_damaged(|data| {
        let len = fs::metadata(data)?.len();
        Ok(fs::File::options()
            .write(true)
            .open(data)?
            .set_len(len / 2)?)
    })
    .await?;
    ensure!(err.to_string().contains("bytes"), "{err}");
    Ok(())
}

/// Pushes a one-layer image made of `tar` and returns the pull's error.
async fn pull_hostile(tar: Vec<u8>) -> Result<Arc<RegistryError>> {
    let work = tempfile::tempdir()?;
    let layout = custom_layout(work.path(), "evil", &[tar], "amd64")?;
    let registry = Registry::start(false)?;
    registry.push(&layout, "evil", "hostile/layer")?;
    let service = ImageService::new(&work.path().join("store"), config_for(&registry))?;
    let image = format!("{}/hostile/layer:evil", registry.host());
    let err = registry_error(service.pull_image(&image, None).await.unwrap_err())?;
    assert_store_empty(&service)?;
    Ok(err)
}

fn is_escape(err: &RegistryError) -> bool {
    matches!(
        err,
        RegistryError::Unpack {
            source: UnpackError::PathEscape { .. },
            ..
        }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_with_dotdot_entry_fails() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let tar = hostile_tar(&[
        (tar::EntryType::Regular, "ok", None, b"fine"),
        (
            tar::EntryType::Regular,
            "../../../../tmp/bosun-dotdot-escape",
            None,
            b"x",
        ),
    ])?;
    let err = pull_hostile(tar).await?;
    ensure!(is_escape(&err), "{err}");
    ensure!(!Path::new("/tmp/bosun-dotdot-escape").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_absolute_symlink_fails() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let outside = tempfile::tempdir()?;
    let target = outside.path().display().to_string();
    let tar = hostile_tar(&[
        (tar::EntryType::Symlink, "escape", Some(&target), b""),
        (tar::EntryType::Regular, "escape/owned", None, b"x"),
    ])?;
    let err = pull_hostile(tar).await?;
    ensure!(is_escape(&err), "{err}");
    ensure!(
        fs::read_dir(outside.path())?.next().is_none(),
        "wrote outside"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardlink_to_outside_fails() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let tar = hostile_tar(&[(
        tar::EntryType::Link,
        "passwd",
        Some("../../../../etc/passwd"),
        b"",
    )])?;
    let err = pull_hostile(tar).await?;
    ensure!(is_escape(&err), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_for_another_platform_fails() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let tar = hostile_tar(&[(tar::EntryType::Regular, "hello", None, b"arm")])?;
    let layout = custom_layout(work.path(), "arm", &[tar], "arm64")?;
    let registry = Registry::start(false)?;
    registry.push(&layout, "arm", "other/platform")?;
    let mut config = config_for(&registry);
    config.platform = Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        variant: None,
    };
    let service = ImageService::new(&work.path().join("store"), config)?;
    let image = format!("{}/other/platform:arm", registry.host());
    let err = registry_error(service.pull_image(&image, None).await.unwrap_err())?;
    ensure!(matches!(*err, RegistryError::Platform { .. }), "{err}");
    ensure!(err.to_string().contains("linux/arm64"), "{err}");
    assert_store_empty(&service)
}

/// A proxy in front of the registry that answers the first `failures`
/// blob requests with 500, then passes everything through.
fn flaky_proxy(upstream: u16, failures: usize) -> Result<(u16, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let failed = Arc::new(AtomicUsize::new(0));
    let counter = failed.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let counter = counter.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                // Read the request head to see what is asked for.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte)? == 0 {
                        return Ok(());
                    }
                    head.push(byte[0]);
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if line.contains("/blobs/") && counter.load(Ordering::SeqCst) < failures {
                    counter.fetch_add(1, Ordering::SeqCst);
                    client.write_all(
                        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops!",
                    )?;
                    return Ok(());
                }
                // One request per connection, so every request passes the
                // check above: ask the registry to close after answering.
                head.truncate(head.len() - 2);
                head.extend_from_slice(b"Connection: close\r\n\r\n");
                let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
                server.write_all(&head)?;
                let mut back = server.try_clone()?;
                let mut client_back = client.try_clone()?;
                std::thread::spawn(move || std::io::copy(&mut back, &mut client_back));
                std::io::copy(&mut client, &mut server)?;
                Ok(())
            });
        }
    });
    Ok((port, failed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let (layout, info) = busybox_layout(work.path())?;
    let registry = Registry::start(false)?;
    registry.push(&layout, "1", "bosun/busybox")?;
    let (proxy, failed) = flaky_proxy(registry.port, 2)?;
    // The image is named after the registry; its only endpoint is the proxy.
    let mut config = config_for(&registry);
    config.hosts.insert(
        registry.host(),
        vec![Endpoint {
            host: format!("127.0.0.1:{proxy}"),
            plain_http: true,
            ca_files: Vec::new(),
        }],
    );
    let service = ImageService::new(&work.path().join("store"), config)?;
    let image = format!("{}/bosun/busybox:1", registry.host());
    ensure!(service.pull_image(&image, None).await? == info.config_digest);
    ensure!(
        failed.load(Ordering::SeqCst) == 2,
        "the proxy failed {} requests",
        failed.load(Ordering::SeqCst)
    );

    // More failures than retries: a clear server error, nothing stored.
    let (proxy, _) = flaky_proxy(registry.port, 100)?;
    let mut config = config_for(&registry);
    config.hosts.insert(
        registry.host(),
        vec![Endpoint {
            host: format!("127.0.0.1:{proxy}"),
            plain_http: true,
            ca_files: Vec::new(),
        }],
    );
    let service = ImageService::new(&work.path().join("store2"), config)?;
    let err = registry_error(service.pull_image(&image, None).await.unwrap_err())?;
    ensure!(err.to_string().contains("500"), "{err}");
    assert_store_empty(&service)
}
