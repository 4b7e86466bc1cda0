//! The `bosun-image` binary against a local docker-registry: pull (plain
//! HTTP and TLS with credentials), images, inspect, export/import round
//! trips through fresh stores, rm, gc, fsinfo, and one-line errors with
//! exit code 1. Needs root (unpacking sets owners and device nodes); skips
//! without it unless CI is set.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use common::*;

fn bosun_image(root: &Path, args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_bosun-image"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .context("run bosun-image")
}

/// Runs and expects success; returns stdout.
fn ok(root: &Path, args: &[&str]) -> Result<String> {
    let out = bosun_image(root, args)?;
    ensure!(
        out.status.success(),
        "bosun-image {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs and expects exit 1 with exactly one `bosun-image:` error line;
/// returns it.
fn fails(root: &Path, args: &[&str]) -> Result<String> {
    let out = bosun_image(root, args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1),
        "bosun-image {args:?}: {:?} {stderr}",
        out.status
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("bosun-image: "))
        .collect();
    ensure!(errors.len() == 1, "{args:?}: {stderr}");
    Ok(errors[0].to_owned())
}

#[test]
fn pull_list_inspect_export_import_rm() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let (layout, info) = busybox_layout(work.path())?;
    let registry = Registry::start(false)?;
    registry.push(&layout, "1", "bosun/busybox")?;
    let host = registry.host();
    let image = format!("{host}/bosun/busybox:1");
    let root = work.path().join("store");

    // Without --insecure-registry the client speaks TLS to a plain server.
    fails(&root, &["pull", &image])?;
    let out = bosun_image(&root, &["pull", "--insecure-registry", &host, &image])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8(out.stdout)?.trim() == info.config_digest);
    // Not a terminal: plain progress lines instead of a bar.
    let log = String::from_utf8(out.stderr)?;
    ensure!(
        log.contains("layer ready") && log.contains("pulled"),
        "{log}"
    );
    // The same through a hosts file.
    let hosts = work.path().join("hosts.json");
    std::fs::write(
        &hosts,
        format!(r#"{{"host": {{"{host}": [{{"host": "{host}", "plain_http": true}}]}}}}"#),
    )?;
    let again = ok(&root, &["pull", "--hosts", hosts.to_str().unwrap(), &image])?;
    ensure!(again.trim() == info.config_digest);

    let hex = info.config_digest.trim_start_matches("sha256:");
    let table = ok(&root, &["images"])?;
    let lines: Vec<&str> = table.lines().collect();
    ensure!(lines.len() == 2, "{table}");
    let header: Vec<&str> = lines[0]
        .split("   ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    ensure!(header == ["IMAGE", "TAG", "IMAGE ID", "SIZE"], "{table}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    ensure!(
        row[..3] == [format!("{host}/bosun/busybox").as_str(), "1", &hex[..13]],
        "{table}"
    );
    ensure!(row[3].ends_with("MB"), "{table}");
    ensure!(ok(&root, &["ls", "-q"])?.trim() == info.config_digest);
    let table = ok(&root, &["images", "--digests"])?;
    let manifest_hex = info.manifest_digest.trim_start_matches("sha256:");
    ensure!(table.lines().next().unwrap().contains("DIGEST"), "{table}");
    ensure!(table.contains(&manifest_hex[..13]), "{table}");
    ensure!(ok(&root, &["images", "-q", "nothing:here"])?.is_empty());

    let inspected: serde_json::Value = serde_json::from_str(&ok(&root, &["inspect", hex])?)?;
    ensure!(inspected["status"]["id"] == info.config_digest.as_str());
    ensure!(inspected["status"]["repoTags"][0] == image.as_str());
    ensure!(inspected["info"]["manifestDigest"] == info.manifest_digest.as_str());
    ensure!(inspected["info"]["layers"][0]["diffID"] == info.diff_ids[0].as_str());
    ensure!(inspected["info"]["imageSpec"]["os"] == "linux");

    // Export both ways; skopeo reads them; fresh stores import the same ID.
    let oci = work.path().join("oci");
    ok(&root, &["export", &image, oci.to_str().unwrap()])?;
    let skopeo = Command::new("skopeo")
        .args(["--insecure-policy", "inspect"])
        .arg(format!("oci:{}:1", oci.display()))
        .output()?;
    ensure!(
        skopeo.status.success(),
        "{}",
        String::from_utf8_lossy(&skopeo.stderr)
    );
    let skopeo: serde_json::Value = serde_json::from_slice(&skopeo.stdout)?;
    ensure!(
        skopeo["Digest"] == info.manifest_digest.as_str(),
        "{skopeo}"
    );
    let archive = work.path().join("busybox.tar");
    ok(&root, &["export", &image, archive.to_str().unwrap()])?;
    for (source, name) in [(&oci, "fresh-oci"), (&archive, "fresh-archive")] {
        let fresh = work.path().join(name);
        let out = ok(&fresh, &["import", source.to_str().unwrap()])?;
        ensure!(
            out.trim() == format!("{} {image}", info.config_digest),
            "{out}"
        );
        ensure!(ok(&fresh, &["images", "-q"])?.trim() == info.config_digest);
    }
    // A layout with bare tags needs --name; a docker-archive refuses it.
    let fresh = work.path().join("fresh-layout");
    let err = fails(&fresh, &["import", layout.to_str().unwrap()])?;
    ensure!(err.contains("give the image a name"), "{err}");
    let out = ok(
        &fresh,
        &[
            "import",
            layout.to_str().unwrap(),
            "--name",
            "example.com/bb",
        ],
    )?;
    ensure!(
        out.trim() == format!("{} example.com/bb:1", info.config_digest),
        "{out}"
    );
    fails(
        &fresh,
        &["import", archive.to_str().unwrap(), "--name", "x"],
    )?;
    let err = fails(
        &fresh,
        &[
            "export",
            "example.com/bb:1",
            oci.join("oci-layout").to_str().unwrap(),
            "--format",
            "oci",
        ],
    )?;
    ensure!(err.contains("directory"), "{err}");

    let usage: serde_json::Value = serde_json::from_str(&ok(&root, &["fsinfo"])?)?;
    ensure!(
        usage[0]["usedBytes"].as_u64().unwrap_or(0) > 1_000_000,
        "{usage}"
    );
    ensure!(ok(&root, &["gc"])?.trim() == "removed 0 blobs and 0 snapshots");

    // rm: an unknown image is an error (one line, exit 1); the known one goes.
    let out = bosun_image(&root, &["rm", "nothing:here", &image])?;
    ensure!(out.status.code() == Some(1));
    ensure!(String::from_utf8(out.stdout)?.trim() == format!("Deleted: {image}"));
    let stderr = String::from_utf8(out.stderr)?;
    ensure!(
        stderr.trim() == "bosun-image: no such image: nothing:here",
        "{stderr}"
    );
    ensure!(ok(&root, &["images", "-q"])?.is_empty());
    for sub in ["blobs/sha256", "images", "snapshots"] {
        ensure!(
            std::fs::read_dir(root.join(sub))?.count() == 0,
            "{sub} not empty"
        );
    }
    Ok(())
}

#[test]
fn tls_registry_with_credentials() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let (layout, info) = busybox_layout(work.path())?;
    let registry = Registry::start(true)?;
    registry.push(&layout, "1", "secure/busybox")?;
    let image = format!("{}/secure/busybox:1", registry.host());
    let root = work.path().join("store");
    let ca = registry.ca.clone().context("ca")?;
    let ca = ca.to_str().unwrap();

    let err = fails(
        &root,
        &[
            "pull",
            "--ca-file",
            ca,
            "--creds",
            &format!("{USER}:wrong"),
            &image,
        ],
    )?;
    ensure!(err.contains("authentication failed"), "{err}");
    let err = fails(
        &root,
        &["pull", "--creds", &format!("{USER}:{PASSWORD}"), &image],
    )?;
    ensure!(err.to_lowercase().contains("certificate"), "{err}");
    let id = ok(
        &root,
        &[
            "pull",
            "--ca-file",
            ca,
            "--creds",
            &format!("{USER}:{PASSWORD}"),
            &image,
        ],
    )?;
    ensure!(id.trim() == info.config_digest);
    Ok(())
}

/// Bearer-token registry: basic credentials go to the token server; an
/// identity token is exchanged there (OAuth2 refresh-token grant).
#[test]
fn token_auth_with_creds_and_identity_token() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let (layout, info) = busybox_layout(work.path())?;
    let (registry, _issued) = token_registry(work.path())?;
    registry.push(&layout, "1", "bearer/busybox")?;
    let host = registry.host();
    let image = format!("{host}/bearer/busybox:1");
    let pull = |root: &str, flag: &str, value: &str| {
        let root = work.path().join(root);
        let args = ["pull", "--insecure-registry", &host, flag, value, &image];
        (root, args.map(str::to_owned))
    };
    for (flag, wrong, right) in [
        (
            "--creds",
            format!("{USER}:nope"),
            format!("{USER}:{PASSWORD}"),
        ),
        (
            "--identity-token",
            "nope".to_owned(),
            REFRESH_TOKEN.to_owned(),
        ),
    ] {
        let (root, args) = pull(flag, flag, &wrong);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = fails(&root, &args)?;
        ensure!(err.contains("authentication failed"), "{flag}: {err}");
        let (root, args) = pull(flag, flag, &right);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ensure!(ok(&root, &args)?.trim() == info.config_digest, "{flag}");
    }
    Ok(())
}

#[test]
fn errors_are_one_line_with_exit_1() -> Result<()> {
    if !gate() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let registry = Registry::start(false)?;
    let host = registry.host();
    let root = work.path().join("store");

    let err = fails(
        &root,
        &[
            "pull",
            "--insecure-registry",
            &host,
            &format!("{host}/no/such:tag"),
        ],
    )?;
    ensure!(err.contains("not found"), "{err}");
    let err = fails(&root, &["pull", "Bad Ref"])?;
    ensure!(err.contains("Bad Ref"), "{err}");
    let err = fails(&root, &["pull", "--platform", "linux", "busybox"])?;
    ensure!(err.contains("os/arch"), "{err}");
    let err = fails(&root, &["pull", "--hosts", "{not json", "busybox"])?;
    ensure!(err.contains("registry config"), "{err}");
    let err = fails(&root, &["inspect", "nothing:here"])?;
    ensure!(err == "bosun-image: no such image: nothing:here", "{err}");
    let err = fails(
        &root,
        &[
            "export",
            "nothing:here",
            work.path().join("x.tar").to_str().unwrap(),
        ],
    )?;
    ensure!(err.contains("not found"), "{err}");
    ensure!(!work.path().join("x.tar").exists());
    let err = fails(
        &root,
        &["import", work.path().join("missing").to_str().unwrap()],
    )?;
    ensure!(err.contains("No such file"), "{err}");

    // Another process owns the store: refused, not shared.
    let lock = std::fs::File::open(root.join("lock"))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
    let err = fails(&root, &["images"])?;
    ensure!(err.contains("in use by another process"), "{err}");
    Ok(())
}
