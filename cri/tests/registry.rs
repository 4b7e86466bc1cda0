//! The image service against a real registry: Debian's docker-registry on
//! 127.0.0.1 (plain HTTP, or TLS with a test CA and htpasswd basic auth),
//! images pushed with skopeo. Needs root (device nodes, ownership, trusted
//! xattrs while unpacking); skips without it unless CI is set.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bosun_cri::image::registry::{AuthConfig, Endpoint, Platform, RegistryConfig, RegistryError};
use bosun_cri::image::service::{ImageService, ServiceError};
use bosun_cri::image::store::StoreError;
use bosun_cri::image::unpack::UnpackError;
use common::*;
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// Writes OCI layouts with hand-made (possibly hostile) layers, given as
/// plain tars and stored gzipped, and hand-made indexes.
struct LayoutBuilder {
    layout: PathBuf,
    blobs: PathBuf,
}

impl LayoutBuilder {
    fn new(dir: &Path) -> Result<LayoutBuilder> {
        let layout = dir.to_owned();
        let blobs = layout.join("blobs/sha256");
        fs::create_dir_all(&blobs)?;
        fs::write(
            layout.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        Ok(LayoutBuilder { layout, blobs })
    }

    fn put(&self, bytes: &[u8]) -> Result<(String, usize)> {
        let digest = sha(bytes);
        fs::write(self.blobs.join(digest.trim_start_matches("sha256:")), bytes)?;
        Ok((digest, bytes.len()))
    }

    /// Writes config and manifest; returns the manifest descriptor and the
    /// config digest (the image ID).
    fn image(&self, layers: &[Vec<u8>], arch: &str) -> Result<(serde_json::Value, String)> {
        let mut descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        for tar in layers {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar)?;
            let (digest, size) = self.put(&gz.finish()?)?;
            descriptors.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}));
            diff_ids.push(sha(tar));
        }
        let (os, arch, variant) = match arch.split_once('/') {
            Some((a, v)) => ("linux", a, Some(v)),
            None => ("linux", arch, None),
        };
        let config = serde_json::json!({
            "architecture": arch, "os": os, "variant": variant, "config": {"Cmd": ["sh"], "User": "nobody"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids}});
        let (config_digest, config_size) = self.put(&serde_json::to_vec(&config)?)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": descriptors});
        let (digest, size) = self.put(&serde_json::to_vec(&manifest)?)?;
        let mut platform = serde_json::json!({"os": os, "architecture": arch});
        if let Some(v) = variant {
            platform["variant"] = v.into();
        }
        Ok((
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
                "size": size, "platform": platform}),
            config_digest,
        ))
    }

    /// Writes an image index over manifest descriptors; returns its descriptor.
    fn index(&self, manifests: &[serde_json::Value]) -> Result<serde_json::Value> {
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests});
        let (digest, size) = self.put(&serde_json::to_vec(&index)?)?;
        Ok(serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": size}))
    }

    /// Points the layout's `tag` at a descriptor (the only entry).
    fn tag(&self, descriptor: &serde_json::Value, tag: &str) -> Result<()> {
        let mut entry = descriptor.clone();
        entry["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        if let Some(map) = entry.as_object_mut() {
            map.remove("platform");
        }
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [entry]});
        fs::write(self.layout.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(())
    }
}

/// A one-image layout tagged `tag`.
fn custom_layout(dir: &Path, tag: &str, layers: &[Vec<u8>], arch: &str) -> Result<PathBuf> {
    let builder = LayoutBuilder::new(&dir.join("custom"))?;
    let (manifest, _) = builder.image(layers, arch)?;
    builder.tag(&manifest, tag)?;
    Ok(builder.layout)
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
/// blob requests with 500, then passes everything through, each response
/// slowed to 16 KiB per `delay` if given.
fn proxy(
    upstream: u16,
    failures: usize,
    delay: Option<Duration>,
) -> Result<(u16, Arc<AtomicUsize>)> {
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
                std::thread::spawn(move || -> std::io::Result<()> {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = back.read(&mut buf)?;
                        if n == 0 {
                            return client_back.shutdown(std::net::Shutdown::Write);
                        }
                        client_back.write_all(&buf[..n])?;
                        if let Some(delay) = delay {
                            std::thread::sleep(delay);
                        }
                    }
                });
                std::io::copy(&mut client, &mut server)?;
                Ok(())
            });
        }
    });
    Ok((port, failed))
}

fn flaky_proxy(upstream: u16, failures: usize) -> Result<(u16, Arc<AtomicUsize>)> {
    proxy(upstream, failures, None)
}

fn via(registry: &Registry, proxy: u16) -> RegistryConfig {
    let mut config = config_for(registry);
    config.hosts.insert(
        registry.host(),
        vec![Endpoint {
            host: format!("127.0.0.1:{proxy}"),
            plain_http: true,
            ca_files: Vec::new(),
        }],
    );
    config
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
    let config = via(&registry, proxy);
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
    let config = via(&registry, proxy);
    let service = ImageService::new(&work.path().join("store2"), config)?;
    let err = registry_error(service.pull_image(&image, None).await.unwrap_err())?;
    ensure!(err.to_string().contains("500"), "{err}");
    assert_store_empty(&service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_platform_index_selects_ours() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let builder = LayoutBuilder::new(&work.path().join("multi"))?;
    let file = |content: &[u8]| hostile_tar(&[(tar::EntryType::Regular, "arch", None, content)]);
    let (arm, _) = builder.image(&[file(b"arm64")?], "arm64")?;
    let (armv7, _) = builder.image(&[file(b"armv7")?], "arm/v7")?;
    let (amd, amd_id) = builder.image(&[file(b"amd64")?], "amd64")?;
    let index = builder.index(&[arm.clone(), amd, armv7.clone()])?;
    builder.tag(&index, "multi")?;
    let registry = Registry::start(false)?;
    registry.push_with(&builder.layout, "multi", "multi/arch", &["--all"])?;

    let service = ImageService::new(&work.path().join("store"), config_for(&registry))?;
    let image = format!("{}/multi/arch:multi", registry.host());
    ensure!(service.pull_image(&image, None).await? == amd_id);
    let status = service.image_status(&image)?.context("status")?;
    let index_digest = index["digest"].as_str().context("digest")?;
    ensure!(
        status.repo_digests == vec![format!("{}/multi/arch@{index_digest}", registry.host())],
        "repo digest is the index's: {status:?}"
    );
    ensure!(status.username == "nobody", "{status:?}");
    let record = service.store().get_image(&amd_id)?.context("record")?;
    let snapshot = service
        .store()
        .snapshots_dir()
        .join(record.layers[0].chain_id.trim_start_matches("sha256:"));
    ensure!(fs::read(snapshot.join("arch"))? == b"amd64");

    // An index without linux/amd64: a clear error naming what it has.
    let only_arm = LayoutBuilder::new(&work.path().join("arm"))?;
    let (arm, _) = only_arm.image(&[file(b"arm64")?], "arm64")?;
    let (armv7, _) = only_arm.image(&[file(b"armv7")?], "arm/v7")?;
    let index = only_arm.index(&[arm, armv7])?;
    only_arm.tag(&index, "arm")?;
    registry.push_with(&only_arm.layout, "arm", "multi/arm", &["--all"])?;
    let other = ImageService::new(&work.path().join("store2"), config_for(&registry))?;
    let err = registry_error(
        other
            .pull_image(&format!("{}/multi/arm:arm", registry.host()), None)
            .await
            .unwrap_err(),
    )?;
    ensure!(matches!(*err, RegistryError::Platform { .. }), "{err}");
    ensure!(
        err.to_string().contains("linux/arm64, linux/arm/v7"),
        "{err}"
    );
    assert_store_empty(&other)
}

/// Two images sharing a base layer, pushed as Docker schema2: the base
/// snapshot is shared, and the snapshots stack into the right overlay view
/// (whiteout hides a lower file, an opaque dir hides lower content).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_schema2_layers_stack_in_overlayfs() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let dir = |name| (tar::EntryType::Directory, name, None, &b""[..]);
    let base = hostile_tar(&[
        dir("etc/"),
        (tar::EntryType::Regular, "etc/keep", None, b"keep"),
        (tar::EntryType::Regular, "etc/gone", None, b"gone"),
        dir("var/"),
        (tar::EntryType::Regular, "var/old", None, b"old"),
    ])?;
    let top = hostile_tar(&[
        dir("etc/"),
        (tar::EntryType::Regular, "etc/.wh.gone", None, b""),
        dir("var/"),
        (tar::EntryType::Regular, "var/.wh..wh..opq", None, b""),
        (tar::EntryType::Regular, "var/new", None, b"new"),
    ])?;
    let one = LayoutBuilder::new(&work.path().join("one"))?;
    let (m, id_two_layers) = one.image(&[base.clone(), top], "amd64")?;
    one.tag(&m, "two")?;
    let two = LayoutBuilder::new(&work.path().join("two"))?;
    let (m, id_base_only) = two.image(&[base], "amd64")?;
    two.tag(&m, "base")?;
    let registry = Registry::start(false)?;
    registry.push_with(&one.layout, "two", "stack/two", &["--format", "v2s2"])?;
    registry.push_with(&two.layout, "base", "stack/base", &["--format", "v2s2"])?;

    let service = ImageService::new(&work.path().join("store"), config_for(&registry))?;
    ensure!(
        service
            .pull_image(&format!("{}/stack/two:two", registry.host()), None)
            .await?
            == id_two_layers
    );
    ensure!(
        service
            .pull_image(&format!("{}/stack/base:base", registry.host()), None)
            .await?
            == id_base_only
    );
    let snapshots = service.store().snapshots_dir();
    ensure!(
        fs::read_dir(snapshots)?.count() == 2,
        "the base snapshot is shared"
    );
    let record = service
        .store()
        .get_image(&id_two_layers)?
        .context("record")?;
    ensure!(record.layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip");
    let lower: Vec<PathBuf> = record
        .layers
        .iter()
        .rev()
        .map(|l| snapshots.join(l.chain_id.trim_start_matches("sha256:")))
        .collect();
    let merged = work.path().join("merged");
    fs::create_dir(&merged)?;
    let lowerdir = lower
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={lowerdir}"))
        .arg(&merged))?;
    let view = (|| -> Result<()> {
        ensure!(fs::read(merged.join("etc/keep"))? == b"keep");
        ensure!(
            !merged.join("etc/gone").exists(),
            "whiteout did not hide etc/gone"
        );
        ensure!(
            !merged.join("var/old").exists(),
            "opaque dir did not hide var/old"
        );
        ensure!(fs::read(merged.join("var/new"))? == b"new");
        Ok(())
    })();
    run(Command::new("umount").arg(&merged))?;
    view?;

    // Removing the two-layer image keeps the shared base snapshot.
    service.remove_image(&id_two_layers).await?;
    ensure!(fs::read_dir(snapshots)?.count() == 1);
    service.remove_image(&id_base_only).await?;
    assert_store_empty(&service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_endpoints_are_tried_in_order() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let (layout, info) = busybox_layout(work.path())?;
    let registry = Registry::start(false)?;
    registry.push(&layout, "1", "bosun/busybox")?;
    // First a port nobody listens on, then the registry itself.
    let dead = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut config = config_for(&registry);
    config.hosts.insert(
        "mirrored.example".into(),
        vec![
            Endpoint {
                host: format!("127.0.0.1:{dead}"),
                plain_http: true,
                ca_files: Vec::new(),
            },
            registry.endpoint(),
        ],
    );
    let service = ImageService::new(&work.path().join("store"), config)?;
    let id = service
        .pull_image("mirrored.example/bosun/busybox:1", None)
        .await?;
    ensure!(id == info.config_digest);
    let status = service
        .image_status("mirrored.example/bosun/busybox:1")?
        .context("status")?;
    ensure!(
        status.repo_tags == vec!["mirrored.example/bosun/busybox:1".to_owned()],
        "named as asked, not as the mirror"
    );
    Ok(())
}

/// Env var that turns this test binary into the pull to be killed.
const CHILD_PULL: &str = "BOSUN_TEST_CHILD_PULL";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pull_leaves_nothing_and_next_pull_completes() -> Result<()> {
    if let Ok(spec) = std::env::var(CHILD_PULL) {
        // Child: pull through the slow proxy until killed.
        let mut parts = spec.split('|');
        let (store, image, proxy_host) = (
            parts.next().context("store")?,
            parts.next().context("image")?,
            parts.next().context("proxy")?,
        );
        let domain = image.split('/').next().context("domain")?;
        let config = RegistryConfig {
            hosts: HashMap::from([(
                domain.to_owned(),
                vec![Endpoint {
                    host: proxy_host.to_owned(),
                    plain_http: true,
                    ca_files: Vec::new(),
                }],
            )]),
            ..RegistryConfig::default()
        };
        let service = ImageService::new(Path::new(store), config)?;
        service.pull_image(image, None).await?;
        bail!("the pull was meant to be killed before it finished");
    }
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let (layout, info) = busybox_layout(work.path())?;
    let registry = Registry::start(false)?;
    registry.push(&layout, "1", "bosun/busybox")?;
    // ~1 MB layer at 16 KiB per 20 ms: over a second to download.
    let (slow, _) = proxy(registry.port, 0, Some(Duration::from_millis(20)))?;
    let store = work.path().join("store");
    let image = format!("{}/bosun/busybox:1", registry.host());
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "killed_pull_leaves_nothing_and_next_pull_completes",
            "--test-threads",
            "1",
        ])
        .env(
            CHILD_PULL,
            format!("{}|{image}|127.0.0.1:{slow}", store.display()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Kill it once part of the layer is on disk.
    let layer_hex = info.layer_digests[0]
        .trim_start_matches("sha256:")
        .to_owned();
    let blobs = store.join("blobs/sha256");
    let deadline = Instant::now() + Duration::from_secs(30);
    let partial = loop {
        let found = fs::read_dir(&blobs).ok().and_then(|entries| {
            entries.flatten().find(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with(".tmp-")
                    && name.contains(&layer_hex)
                    && e.metadata().is_ok_and(|m| m.len() > 64 * 1024)
            })
        });
        if let Some(entry) = found {
            break entry.path();
        }
        ensure!(
            Instant::now() < deadline,
            "the child never started writing the layer"
        );
        ensure!(child.try_wait()?.is_none(), "the child pull ended early");
        std::thread::sleep(Duration::from_millis(10));
    };
    child.kill()?;
    child.wait()?;
    // Killed mid-blob: only a temp file, no blob under the layer's name,
    // no image record, no snapshot.
    ensure!(partial.exists());
    ensure!(!blobs.join(&layer_hex).exists());
    ensure!(fs::read_dir(store.join("images"))?.count() == 0);
    ensure!(fs::read_dir(store.join("snapshots"))?.count() == 0);

    // The restarted service sweeps the leftover and the pull completes.
    let service = ImageService::new(&store, config_for(&registry))?;
    ensure!(!partial.exists(), "leftover not swept");
    ensure!(service.pull_image(&image, None).await? == info.config_digest);
    ensure!(blobs.join(&layer_hex).is_file());
    service.remove_image(&image).await?;
    assert_store_empty(&service)
}

/// The WWW-Authenticate bearer challenge flow: the registry sends the client
/// to a token server, which wants the basic credentials and issues a JWT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let (layout, info) = busybox_layout(work.path())?;
    let (registry, issued) = token_registry(work.path())?;
    registry.push(&layout, "1", "bearer/busybox")?;
    let image = format!("{}/bearer/busybox:1", registry.host());

    let service = ImageService::new(&work.path().join("store"), config_for(&registry))?;
    let wrong = AuthConfig {
        username: USER.into(),
        password: "nope".into(),
        ..AuthConfig::default()
    };
    let err = registry_error(service.pull_image(&image, Some(&wrong)).await.unwrap_err())?;
    ensure!(matches!(*err, RegistryError::Unauthorized { .. }), "{err}");
    assert_store_empty(&service)?;

    let before = issued.load(Ordering::SeqCst);
    let right = AuthConfig {
        username: USER.into(),
        password: PASSWORD.into(),
        ..AuthConfig::default()
    };
    ensure!(service.pull_image(&image, Some(&right)).await? == info.config_digest);
    ensure!(
        issued.load(Ordering::SeqCst) > before,
        "no token was issued for the pull"
    );

    // CRI's identity_token: an OAuth2 refresh token, exchanged (POST) for
    // an access token. A wrong one is refused and leaves nothing.
    let fresh = ImageService::new(&work.path().join("store2"), config_for(&registry))?;
    let wrong = AuthConfig {
        identity_token: "not-the-token".into(),
        ..AuthConfig::default()
    };
    let err = registry_error(fresh.pull_image(&image, Some(&wrong)).await.unwrap_err())?;
    ensure!(matches!(*err, RegistryError::Unauthorized { .. }), "{err}");
    assert_store_empty(&fresh)?;
    let before = issued.load(Ordering::SeqCst);
    let refresh = AuthConfig {
        identity_token: REFRESH_TOKEN.into(),
        ..AuthConfig::default()
    };
    ensure!(fresh.pull_image(&image, Some(&refresh)).await? == info.config_digest);
    ensure!(issued.load(Ordering::SeqCst) == before + 1);
    Ok(())
}
