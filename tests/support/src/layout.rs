//! OCI image layouts (image-spec 1.0) holding one single-layer image.
//!
//! Output is byte-for-byte reproducible: entries sorted, times zero, owners
//! root, a fixed gzip header and level. Tests can then compare digests across
//! runs and hosts, and a registry push of the same rootfs is a no-op.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::{Compression, GzBuilder};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

/// Media types from the OCI image spec.
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The index.json annotation that `skopeo oci:DIR:TAG` and umoci match on.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Every timestamp in the image: the epoch, so nothing depends on "now".
const EPOCH: &str = "1970-01-01T00:00:00Z";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What [`write`] stored, for tests to compare with what a CRI reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The reference as given, e.g. `localhost:5000/busybox:1`.
    pub reference: String,
    /// The tag written as the ref.name annotation, e.g. `1`.
    pub tag: String,
    /// `sha256:...` of the manifest: the image's identity in a registry.
    pub manifest_digest: String,
    pub manifest_size: u64,
    /// `sha256:...` of the config: the image ID kubelet and crictl show.
    pub config_digest: String,
    /// Digests of the compressed layer blobs, base first.
    pub layer_digests: Vec<String>,
    /// Digests of the uncompressed layer tars (the config's rootfs.diff_ids).
    pub diff_ids: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Serialize)]
struct Manifest<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    config: &'a Descriptor,
    layers: &'a [Descriptor],
}

#[derive(Debug, Serialize)]
struct ImageConfig<'a> {
    created: &'a str,
    architecture: &'a str,
    os: &'a str,
    config: &'a RunConfig,
    rootfs: RootFs<'a>,
    history: Vec<History<'a>>,
}

/// The runtime part of an image config (`config.config`): what a container
/// made from the image runs, and as whom. [`RunConfig::default`] is the
/// busybox image's: `sh` as root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    pub user: String,
    pub env: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stop_signal: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            user: String::new(),
            env: vec![PATH_ENV.to_owned()],
            entrypoint: Vec::new(),
            cmd: vec!["sh".to_owned()],
            working_dir: String::new(),
            stop_signal: String::new(),
        }
    }
}

#[derive(Debug, Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    diff_ids: &'a [String],
}

#[derive(Debug, Serialize)]
struct History<'a> {
    created: &'a str,
    created_by: &'a str,
}

/// Writes an OCI image layout at `dir` holding `rootfs` as one gzip layer,
/// tagged with the tag part of `reference` (`latest` if it has none).
///
/// An existing layout at `dir` is kept: its other tags stay, an entry with
/// the same tag is replaced.
pub fn write(dir: &Path, reference: &str, rootfs: &Path) -> Result<ImageInfo, Error> {
    write_with(dir, reference, rootfs, &RunConfig::default())
}

/// Like [`write`], with `run` as the image's runtime config.
pub fn write_with(
    dir: &Path,
    reference: &str,
    rootfs: &Path,
    run: &RunConfig,
) -> Result<ImageInfo, Error> {
    let tag = tag_of(reference)?;
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(Error::io("create directory", &blobs))?;
    write_bytes(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;

    let (layer, diff_id) = write_layer(&blobs, rootfs)?;
    let diff_ids = vec![diff_id];
    let config = ImageConfig {
        created: EPOCH,
        architecture: oci_arch(),
        os: "linux",
        config: run,
        rootfs: RootFs {
            kind: "layers",
            diff_ids: &diff_ids,
        },
        history: vec![History {
            created: EPOCH,
            created_by: "bosun-testimage layout",
        }],
    };
    let config = write_json_blob(&blobs, MEDIA_TYPE_CONFIG, &config)?;
    let layers = vec![layer];
    let manifest = Manifest {
        schema_version: 2,
        media_type: MEDIA_TYPE_MANIFEST,
        config: &config,
        layers: &layers,
    };
    let mut manifest = write_json_blob(&blobs, MEDIA_TYPE_MANIFEST, &manifest)?;
    manifest
        .annotations
        .insert(REF_NAME.to_owned(), tag.clone());
    update_index(&dir.join("index.json"), &manifest, &tag)?;

    Ok(ImageInfo {
        reference: reference.to_owned(),
        tag,
        manifest_digest: manifest.digest,
        manifest_size: manifest.size,
        config_digest: config.digest,
        layer_digests: layers.into_iter().map(|l| l.digest).collect(),
        diff_ids,
    })
}

/// The tag of a reference: after the last `:` of the last path component,
/// ignoring any `@digest`; `latest` when there is none.
pub fn tag_of(reference: &str) -> Result<String, Error> {
    let name = reference.split('@').next().unwrap_or_default();
    let last = name.rsplit('/').next().unwrap_or_default();
    let invalid = |reason: &str| Error::Reference {
        reference: reference.to_owned(),
        reason: reason.to_owned(),
    };
    if last.is_empty() {
        return Err(invalid("no image name"));
    }
    let tag = match last.split_once(':') {
        Some((_, tag)) => tag,
        None => "latest",
    };
    // The tag grammar from the distribution spec.
    let valid = !tag.is_empty()
        && tag.len() <= 128
        && tag.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphanumeric() || c == '_' || (i > 0 && (c == '.' || c == '-'))
        });
    if !valid {
        return Err(invalid("tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
    }
    Ok(tag.to_owned())
}

/// The OCI name of the architecture this binary (and so busybox) runs on.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn update_index(path: &Path, manifest: &Descriptor, tag: &str) -> Result<(), Error> {
    let mut index = match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            action: "parse",
            path: path.to_owned(),
            source,
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Index {
            schema_version: 2,
            media_type: None,
            manifests: Vec::new(),
        },
        Err(e) => return Err(Error::io("read", path)(e)),
    };
    index.media_type = Some(MEDIA_TYPE_INDEX.to_owned());
    index
        .manifests
        .retain(|m| m.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
    index.manifests.push(manifest.clone());
    let bytes = serde_json::to_vec(&index).map_err(|source| Error::Json {
        action: "encode",
        path: path.to_owned(),
        source,
    })?;
    write_bytes(path, &bytes)
}

fn write_json_blob<T: Serialize>(
    blobs: &Path,
    media_type: &str,
    value: &T,
) -> Result<Descriptor, Error> {
    let bytes = serde_json::to_vec(value).map_err(|source| Error::Json {
        action: "encode",
        path: blobs.to_owned(),
        source,
    })?;
    let digest = hex(&Sha256::digest(&bytes));
    write_bytes(&blobs.join(&digest), &bytes)?;
    Ok(Descriptor {
        media_type: media_type.to_owned(),
        digest: format!("sha256:{digest}"),
        size: bytes.len() as u64,
        annotations: BTreeMap::new(),
    })
}

/// Streams the rootfs through tar and gzip into a blob, hashing both the
/// tar (diff_id) and the gzip (blob digest) on the way.
fn write_layer(blobs: &Path, rootfs: &Path) -> Result<(Descriptor, String), Error> {
    let tmp = blobs.join(format!(".layer-{}.tmp", std::process::id()));
    let written = write_layer_to(&tmp, rootfs);
    let (diff_hash, blob_hash, size) = match written {
        Ok(done) => done,
        Err(e) => {
            // Best effort: a leftover temp file is harmless, the error is not.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let digest = hex(&blob_hash);
    let blob = blobs.join(&digest);
    fs::rename(&tmp, &blob).map_err(Error::io("rename into place", &blob))?;
    let layer = Descriptor {
        media_type: MEDIA_TYPE_LAYER_GZIP.to_owned(),
        digest: format!("sha256:{digest}"),
        size,
        annotations: BTreeMap::new(),
    };
    Ok((layer, format!("sha256:{}", hex(&diff_hash))))
}

/// Writes the gzipped tar of `rootfs` to `tmp`; returns the tar's hash, the
/// gzip's hash and the gzip's size.
fn write_layer_to(tmp: &Path, rootfs: &Path) -> Result<(Vec<u8>, Vec<u8>, u64), Error> {
    let file = File::create(tmp).map_err(Error::io("create", tmp))?;
    // Fixed header (no mtime, OS "unknown") and level: same input, same bytes.
    let gz = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(HashWriter::new(BufWriter::new(file)), Compression::new(6));
    let mut tar = tar::Builder::new(HashWriter::new(gz));
    append_tree(&mut tar, rootfs, Path::new(""))?;
    let finish = || -> io::Result<_> {
        let (gz, diff_hash, _) = tar.into_inner()?.into_parts();
        let (mut file, blob_hash, size) = gz.finish()?.into_parts();
        file.flush()?;
        Ok((diff_hash, blob_hash, size))
    };
    finish().map_err(Error::io("write", tmp))
}

/// Appends the children of `root/rel` in byte order of their names,
/// recursing into directories after their own entry.
fn append_tree<W: Write>(tar: &mut tar::Builder<W>, root: &Path, rel: &Path) -> Result<(), Error> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .map_err(Error::io("read directory", &dir))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(Error::io("read directory", &dir))?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).map_err(Error::io("stat", &path))?;
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(meta.permissions().mode() & 0o7777);
        let added = if meta.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            tar.append_data(&mut header, &rel, io::empty())
        } else if meta.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.size());
            let file = File::open(&path).map_err(Error::io("open", &path))?;
            tar.append_data(&mut header, &rel, file)
        } else if meta.file_type().is_symlink() {
            let target = fs::read_link(&path).map_err(Error::io("read symlink", &path))?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            tar.append_link(&mut header, &rel, &target)
        } else {
            return Err(Error::UnsupportedFile { path });
        };
        added.map_err(Error::io("add to layer", &path))?;
        if meta.is_dir() {
            append_tree(tar, root, &rel)?;
        }
    }
    Ok(())
}

/// Replaces `path` atomically so a reader never sees half a document.
fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string()
        .push(format!(".{}.tmp", std::process::id()));
    fs::write(&tmp, bytes).map_err(Error::io("write", &tmp))?;
    fs::rename(&tmp, path).map_err(Error::io("rename into place", path))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A writer that hashes and counts what passes through it.
struct HashWriter<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> HashWriter<W> {
    fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hash: Sha256::new(),
            len: 0,
        }
    }

    fn into_parts(self) -> (W, Vec<u8>, u64) {
        (self.inner, self.hash.finalize().to_vec(), self.len)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::symlink;

    /// A small tree with a nested dir, a symlink and odd modes.
    fn sample_tree(root: &Path, reverse: bool) {
        fs::create_dir_all(root).unwrap();
        let mut steps: Vec<Box<dyn Fn()>> = vec![
            Box::new(|| fs::create_dir_all(root.join("b/c")).unwrap()),
            Box::new(|| fs::write(root.join("a.txt"), "alpha\n").unwrap()),
            Box::new(|| fs::write(root.join("z.txt"), "zulu\n").unwrap()),
            Box::new(|| symlink("a.txt", root.join("link")).unwrap()),
        ];
        if reverse {
            steps.reverse();
        }
        for step in steps {
            step();
        }
        fs::write(root.join("b/c/deep"), "deep\n").unwrap();
        fs::set_permissions(root.join("z.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn blob_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn same_tree_gives_identical_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let (r1, r2) = (tmp.path().join("r1"), tmp.path().join("r2"));
        sample_tree(&r1, false);
        // Different creation order and mtimes must not matter.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        sample_tree(&r2, true);
        let (l1, l2) = (tmp.path().join("l1"), tmp.path().join("l2"));
        let a = write(&l1, "test:1", &r1).unwrap();
        let b = write(&l2, "test:1", &r2).unwrap();
        assert_eq!(a, b);
        assert_eq!(blob_names(&l1), blob_names(&l2));
        for name in blob_names(&l1) {
            let blob = format!("blobs/sha256/{name}");
            assert_eq!(
                fs::read(l1.join(&blob)).unwrap(),
                fs::read(l2.join(&blob)).unwrap()
            );
        }
        assert_eq!(
            fs::read(l1.join("index.json")).unwrap(),
            fs::read(l2.join("index.json")).unwrap()
        );
    }

    #[test]
    fn busybox_image_is_reproducible() {
        let tmp = tempfile::tempdir().unwrap();
        let mut digests = Vec::new();
        for run in ["one", "two"] {
            let rootfs = tmp.path().join(run).join("rootfs");
            crate::rootfs::busybox(&rootfs).unwrap();
            let info = write(&tmp.path().join(run).join("layout"), "busybox", &rootfs).unwrap();
            digests.push(info.manifest_digest);
        }
        assert_eq!(digests[0], digests[1]);
    }

    #[test]
    fn layer_is_sorted_and_normalised() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        sample_tree(&root, false);
        let info = write(&tmp.path().join("l"), "x", &root).unwrap();
        let digest = info.layer_digests[0].strip_prefix("sha256:").unwrap();
        let blob = File::open(tmp.path().join("l/blobs/sha256").join(digest)).unwrap();
        let mut raw = Vec::new();
        io::copy(&mut flate2::read::GzDecoder::new(blob), &mut raw).unwrap();
        assert_eq!(
            info.diff_ids[0],
            format!("sha256:{}", hex(&Sha256::digest(&raw)))
        );
        let mut archive = tar::Archive::new(raw.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let h = entry.header();
            assert_eq!(
                (h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()),
                (0, 0, 0)
            );
            seen.push(entry.path().unwrap().display().to_string());
        }
        assert_eq!(seen, ["a.txt", "b", "b/c", "b/c/deep", "link", "z.txt"]);
    }

    #[test]
    fn run_config_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        sample_tree(&root, false);
        let run = RunConfig {
            user: "www-data:1004".to_owned(),
            entrypoint: vec!["/bin/sleep".to_owned(), "infinity".to_owned()],
            cmd: Vec::new(),
            working_dir: "/srv".to_owned(),
            ..RunConfig::default()
        };
        let info = write_with(&tmp.path().join("l"), "x:1", &root, &run).unwrap();
        let hex = info.config_digest.strip_prefix("sha256:").unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&fs::read(tmp.path().join("l/blobs/sha256").join(hex)).unwrap())
                .unwrap();
        assert_eq!(config["config"]["User"], "www-data:1004");
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(["/bin/sleep", "infinity"])
        );
        assert_eq!(config["config"]["WorkingDir"], "/srv");
        assert!(config["config"].get("StopSignal").is_none());
    }

    #[test]
    fn documents_have_expected_shape() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        sample_tree(&root, false);
        let dir = tmp.path().join("l");
        let info = write(&dir, "localhost:5000/test/img:v1", &root).unwrap();
        let read = |digest: &str| -> serde_json::Value {
            let hex = digest.strip_prefix("sha256:").unwrap();
            serde_json::from_slice(&fs::read(dir.join("blobs/sha256").join(hex)).unwrap()).unwrap()
        };
        let config = read(&info.config_digest);
        assert_eq!(config["architecture"], oci_arch());
        assert_eq!(config["os"], "linux");
        assert_eq!(config["config"]["Cmd"], serde_json::json!(["sh"]));
        assert_eq!(config["config"]["User"], "");
        assert_eq!(config["rootfs"]["diff_ids"][0], info.diff_ids[0].as_str());
        let manifest = read(&info.manifest_digest);
        assert_eq!(manifest["config"]["digest"], info.config_digest.as_str());
        assert_eq!(
            manifest["layers"][0]["digest"],
            info.layer_digests[0].as_str()
        );
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["annotations"][REF_NAME], "v1");
        assert_eq!(
            index["manifests"][0]["digest"],
            info.manifest_digest.as_str()
        );
    }

    #[test]
    fn second_tag_is_added_same_tag_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        sample_tree(&root, false);
        let dir = tmp.path().join("l");
        write(&dir, "img:a", &root).unwrap();
        write(&dir, "img:b", &root).unwrap();
        write(&dir, "img:a", &root).unwrap();
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        let tags: Vec<&str> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["annotations"][REF_NAME].as_str().unwrap())
            .collect();
        assert_eq!(tags, ["b", "a"]);
    }

    #[test]
    fn tags_from_references() {
        assert_eq!(tag_of("busybox").unwrap(), "latest");
        assert_eq!(tag_of("busybox:1.36").unwrap(), "1.36");
        assert_eq!(tag_of("localhost:5000/busybox").unwrap(), "latest");
        assert_eq!(tag_of("localhost:5000/a/b:t_1").unwrap(), "t_1");
        assert_eq!(tag_of("busybox:v1@sha256:abcd").unwrap(), "v1");
        assert!(tag_of("").is_err());
        assert!(tag_of("x:").is_err());
        assert!(tag_of("x:-bad").is_err());
    }

    #[test]
    fn unsupported_files_name_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir(&root).unwrap();
        let sock = root.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let err = write(&tmp.path().join("l"), "x", &root).unwrap_err();
        assert!(err.to_string().contains("sock"), "{err}");
    }
}
