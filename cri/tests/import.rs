//! Importing local images: the busybox test layout as an OCI layout and,
//! converted by skopeo, as a docker-archive; a hostile docker-archive.
//! Privileged (ownership while unpacking); skips without root unless CI is set.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use bosun_cri::image::import::ImportError;
use bosun_cri::image::registry::RegistryConfig;
use bosun_cri::image::service::{ImageService, ServiceError};
use bosun_cri::image::unpack::UnpackError;

fn gate() -> bool {
    bosun_testsupport::privileged::require_root("image import")
}

fn skopeo(args: &[&str]) -> Result<()> {
    let out = Command::new("skopeo")
        .args(["--insecure-policy"])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("skopeo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn store_is_empty(service: &ImageService) -> Result<()> {
    let root = service.store().root();
    for sub in ["blobs/sha256", "images", "snapshots"] {
        let n = fs::read_dir(root.join(sub))?.count();
        ensure!(n == 0, "{sub} has {n} entries");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_oci_layout_and_docker_archive() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let rootfs = work.path().join("rootfs");
    bosun_testsupport::rootfs::busybox(&rootfs)?;
    let layout = work.path().join("layout");
    let info = bosun_testsupport::layout::write(&layout, "busybox:1", &rootfs)?;
    let service = ImageService::new(&work.path().join("store"), RegistryConfig::default())?;

    let ids = service
        .import_oci_layout(&layout, Some("example.com/busybox"))
        .await?;
    ensure!(ids == vec![info.config_digest.clone()], "{ids:?}");
    let status = service
        .image_status("example.com/busybox:1")?
        .context("status")?;
    ensure!(status.repo_digests == vec![format!("example.com/busybox@{}", info.manifest_digest)]);

    // The same image through a docker-archive: same ID (same config), and
    // the archive's uncompressed layer unpacks to the same snapshot.
    let archive = work.path().join("busybox.tar");
    skopeo(&[
        "copy",
        "--quiet",
        &format!("oci:{}:1", layout.display()),
        &format!(
            "docker-archive:{}:example.com/archived:2",
            archive.display()
        ),
    ])?;
    let ids = service.import_docker_archive(&archive).await?;
    ensure!(ids == vec![info.config_digest.clone()], "{ids:?}");
    let status = service
        .image_status("example.com/archived:2")?
        .context("status")?;
    ensure!(
        status.repo_tags.len() == 2,
        "both names on one image: {status:?}"
    );
    ensure!(fs::read_dir(service.store().snapshots_dir())?.count() == 1);
    let snapshot = service
        .store()
        .snapshots_dir()
        .join(info.diff_ids[0].trim_start_matches("sha256:"));
    ensure!(snapshot.join("bin/busybox").is_file());

    service.remove_image(&info.config_digest).await?;
    store_is_empty(&service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_docker_archive_leaves_nothing() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    // A layer with a `..` entry, in a hand-made docker-archive.
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    let name = b"../../escaped";
    h.as_gnu_mut().context("gnu")?.name[..name.len()].copy_from_slice(name);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    layer.append(&h, &b"x"[..])?;
    let layer = layer.into_inner()?;
    let diff_id = format!("sha256:{}", sha_hex(&layer));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}}))?;
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": "config.json", "RepoTags": ["example.com/evil:1"], "Layers": ["l/layer.tar"]}]))?;
    let archive = work.path().join("evil.tar");
    let mut out = tar::Builder::new(fs::File::create(&archive)?);
    for (name, data) in [
        ("config.json", &config),
        ("l/layer.tar", &layer),
        ("manifest.json", &manifest),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        out.append_data(&mut h, name, &data[..])?;
    }
    out.finish()?;

    let service = ImageService::new(&work.path().join("store"), RegistryConfig::default())?;
    match service.import_docker_archive(&archive).await {
        Err(ServiceError::Import(e))
            if matches!(
                *e,
                ImportError::Unpack {
                    source: UnpackError::PathEscape { .. },
                    ..
                }
            ) => {}
        other => bail!("expected a path escape, got {other:?}"),
    }
    ensure!(!Path::new(&work.path().join("escaped")).exists());
    store_is_empty(&service)
}

fn sha_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn skopeo_output(args: &[&str]) -> Result<String> {
    let out = Command::new("skopeo")
        .args(["--insecure-policy"])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("skopeo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Export → import into a fresh store gives the same image: as an OCI
/// layout (same manifest digest too, skopeo reads it; a second export adds
/// to the layout) and as a docker-archive (skopeo and our import read it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_round_trips() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let rootfs = work.path().join("rootfs");
    bosun_testsupport::rootfs::busybox(&rootfs)?;
    let layout = work.path().join("layout");
    let info = bosun_testsupport::layout::write(&layout, "busybox:1", &rootfs)?;
    let service = ImageService::new(&work.path().join("store"), RegistryConfig::default())?;
    service
        .import_oci_layout(&layout, Some("example.com/busybox"))
        .await?;

    let out = work.path().join("exported");
    let id = service
        .export_oci_layout("example.com/busybox:1", &out)
        .await?;
    ensure!(id == info.config_digest);
    let inspected: serde_json::Value = serde_json::from_str(&skopeo_output(&[
        "inspect",
        &format!("oci:{}:1", out.display()),
    ])?)?;
    ensure!(
        inspected["Digest"] == info.manifest_digest.as_str(),
        "{inspected}"
    );
    ensure!(inspected["Layers"][0] == info.layer_digests[0].as_str());
    // By ID: every tag of the image; the existing layout is added to.
    service
        .import_oci_layout(&layout, Some("example.com/other"))
        .await?;
    service.export_oci_layout(&id, &out).await?;
    let index: serde_json::Value = serde_json::from_slice(&fs::read(out.join("index.json"))?)?;
    let refs: Vec<&str> = index["manifests"]
        .as_array()
        .context("manifests")?
        .iter()
        .filter_map(|e| e["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .collect();
    // busybox:1 replaced (not duplicated); other:1 named in full beside it.
    ensure!(refs == ["1", "example.com/other:1"], "{index}");

    let fresh = ImageService::new(&work.path().join("fresh"), RegistryConfig::default())?;
    ensure!(fresh.import_oci_layout(&out, None).await? == vec![id.clone()]);
    let status = fresh.image_status(&id)?.context("status")?;
    ensure!(
        status
            .repo_digests
            .iter()
            .any(|d| d.ends_with(&info.manifest_digest)),
        "{status:?}"
    );

    let archive = work.path().join("busybox.tar");
    service
        .export_docker_archive("example.com/busybox:1", &archive)
        .await?;
    let inspected: serde_json::Value = serde_json::from_str(&skopeo_output(&[
        "inspect",
        &format!("docker-archive:{}", archive.display()),
    ])?)?;
    // Layers uncompressed, as `docker save` writes them.
    ensure!(
        inspected["Layers"][0] == info.diff_ids[0].as_str(),
        "{inspected}"
    );
    let fresh = ImageService::new(&work.path().join("fresh2"), RegistryConfig::default())?;
    ensure!(fresh.import_docker_archive(&archive).await? == vec![id.clone()]);
    ensure!(fresh.image_status("example.com/busybox:1")?.is_some());
    // Nothing but the outputs: no temp files beside them.
    let names: Vec<String> = fs::read_dir(work.path())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    ensure!(!names.iter().any(|n| n.starts_with('.')), "{names:?}");

    // An unknown image is an error, and leaves no file.
    let missing = work.path().join("missing.tar");
    let err = service
        .export_docker_archive("example.com/nothing:1", &missing)
        .await
        .unwrap_err();
    ensure!(matches!(err, ServiceError::NotFound(_)), "{err}");
    ensure!(!missing.exists());
    Ok(())
}
