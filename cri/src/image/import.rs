//! Importing images from local files: an OCI image layout directory, or a
//! docker-archive tarball (`docker save`, `skopeo copy ... docker-archive:`).
//!
//! Content goes through the same verified store writes and the same layer
//! unpacking as a pull, so a hostile archive gets no further than a hostile
//! registry: every blob is checked against its digest and size, every layer
//! against its diff ID, and unpacking is path-safe.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::reference::{Digest, Reference, ReferenceError};
use super::registry::{
    parse_manifest, select_platform, Descriptor, ImageConfig, Platform, PulledImage, RegistryError,
    LAYER_TYPES, MAX_MANIFEST_BYTES, MEDIA_DOCKER_MANIFEST,
};
use super::store::{copy_into, sha256_digest, ContentStore, LayerRecord, StoreError};
use super::unpack::{self, UnpackError};

pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub(crate) const CONTAINERD_NAME: &str = "io.containerd.image.name";
pub(crate) const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("{path}: {source}")]
    Store { path: PathBuf, source: StoreError },
    #[error("{path}: layer {digest}: {source}")]
    Unpack {
        path: PathBuf,
        digest: String,
        source: UnpackError,
    },
    #[error(transparent)]
    Image(#[from] RegistryError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
}

/// One image found in the source, under the name it is to carry (None: an
/// untagged image, known by ID only).
#[derive(Debug, Clone)]
pub struct Imported {
    pub reference: Option<Reference>,
    pub image: PulledImage,
}

#[derive(Debug, Deserialize)]
struct LayoutIndex {
    #[serde(default)]
    manifests: Vec<LayoutEntry>,
}

#[derive(Debug, Deserialize)]
struct LayoutEntry {
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

/// Imports every tagged image of an OCI layout. A ref.name annotation that
/// is a full reference names the image itself; a bare tag (what skopeo and
/// umoci write) is put on `name` (e.g. `example.com/app`), which is then
/// required.
pub fn import_oci_layout(
    store: &ContentStore,
    layout: &Path,
    name: Option<&str>,
    platform: &Platform,
) -> Result<Vec<Imported>, ImportError> {
    let index_path = layout.join("index.json");
    let bytes = std::fs::read(&index_path).map_err(|source| ImportError::Io {
        action: "read",
        path: index_path.clone(),
        source,
    })?;
    let index: LayoutIndex = serde_json::from_slice(&bytes).map_err(|e| ImportError::Invalid {
        path: index_path.clone(),
        detail: e.to_string(),
    })?;
    let mut out = Vec::new();
    for entry in &index.manifests {
        // containerd (and our export) put the full name beside a bare tag.
        let full = entry.annotations.get(CONTAINERD_NAME);
        let Some(tag) = full.or_else(|| entry.annotations.get(REF_NAME)) else {
            tracing::warn!(digest = %entry.digest, "layout entry without a ref.name: skipped");
            continue;
        };
        let reference = if full.is_some() || tag.contains('/') || tag.contains('@') {
            Reference::parse(tag)?
        } else {
            let base = name.ok_or_else(|| ImportError::Invalid {
                path: index_path.clone(),
                detail: format!(
                    "entry tagged {tag:?} is not a full reference: give the image a name"
                ),
            })?;
            Reference::parse(&format!("{base}:{tag}"))?
        };
        let source = LayoutSource { layout };
        let image = import_manifest(
            store,
            &source,
            &reference.to_string(),
            &entry.digest,
            entry.size,
            platform,
        )?;
        out.push(Imported {
            reference: Some(reference),
            image,
        });
    }
    Ok(out)
}

/// Where blobs come from for an import.
trait BlobSource {
    fn path(&self) -> &Path;
    /// Copies a blob into the store, verified against digest and size.
    fn copy(&self, store: &ContentStore, digest: &Digest, size: u64) -> Result<(), ImportError>;
}

struct LayoutSource<'a> {
    layout: &'a Path,
}

impl BlobSource for LayoutSource<'_> {
    fn path(&self) -> &Path {
        self.layout
    }

    fn copy(&self, store: &ContentStore, digest: &Digest, size: u64) -> Result<(), ImportError> {
        if store.has_blob(digest) {
            return Ok(());
        }
        // The digest was parsed, so algorithm and hex are safe path parts.
        let path = self
            .layout
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex());
        let file = File::open(&path).map_err(|source| ImportError::Io {
            action: "open blob",
            path: path.clone(),
            source,
        })?;
        let store_err = |source| ImportError::Store {
            path: path.clone(),
            source,
        };
        let mut writer = store.writer(digest, Some(size)).map_err(store_err)?;
        copy_into(&mut writer, BufReader::new(file)).map_err(store_err)?;
        writer.commit().map_err(store_err)
    }
}

fn invalid(source: &dyn BlobSource, detail: String) -> ImportError {
    ImportError::Invalid {
        path: source.path().to_owned(),
        detail,
    }
}

fn digest_of(source: &dyn BlobSource, s: &str) -> Result<Digest, ImportError> {
    s.parse()
        .map_err(|e: ReferenceError| invalid(source, e.to_string()))
}

/// Manifest (or index) → config → layers, stored and unpacked.
fn import_manifest(
    store: &ContentStore,
    source: &dyn BlobSource,
    name: &str,
    digest: &str,
    size: u64,
    platform: &Platform,
) -> Result<PulledImage, ImportError> {
    if size as usize > MAX_MANIFEST_BYTES {
        return Err(invalid(
            source,
            format!("manifest {digest} larger than 4 MiB"),
        ));
    }
    let top = digest_of(source, digest)?;
    source.copy(store, &top, size)?;
    let read = |d: &Digest| {
        store.read_blob(d).map_err(|e| ImportError::Store {
            path: source.path().to_owned(),
            source: e,
        })
    };
    let manifest = parse_manifest(name, &read(&top)?)?;
    let (manifest_digest, index_digest, manifest, selected) = if manifest.manifests.is_some() {
        let chosen = select_platform(name, &manifest, platform)?;
        let child = digest_of(source, &chosen.digest)?;
        source.copy(store, &child, chosen.size)?;
        let parsed = parse_manifest(name, &read(&child)?)?;
        (child, Some(top), parsed, true)
    } else {
        (top, None, manifest, false)
    };
    let config_desc = manifest
        .config
        .as_ref()
        .ok_or_else(|| invalid(source, format!("{name}: manifest has no config")))?;
    let layers = manifest
        .layers
        .as_deref()
        .ok_or_else(|| invalid(source, format!("{name}: manifest has no layers")))?;
    let config_digest = digest_of(source, &config_desc.digest)?;
    source.copy(store, &config_digest, config_desc.size)?;
    finish_image(
        store,
        source,
        name,
        manifest_digest,
        index_digest,
        config_digest,
        config_desc.size,
        layers,
        selected,
        platform,
    )
}

/// Config checks, then every layer copied, then all unpacked in parallel.
#[allow(clippy::too_many_arguments)]
fn finish_image(
    store: &ContentStore,
    source: &dyn BlobSource,
    name: &str,
    manifest_digest: Digest,
    index_digest: Option<Digest>,
    config_digest: Digest,
    config_size: u64,
    layers: &[Descriptor],
    selected: bool,
    platform: &Platform,
) -> Result<PulledImage, ImportError> {
    let config_bytes = store
        .read_blob(&config_digest)
        .map_err(|e| ImportError::Store {
            path: source.path().to_owned(),
            source: e,
        })?;
    let config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| invalid(source, format!("{name}: config {config_digest}: {e}")))?;
    if !selected && (config.os != platform.os || config.architecture != platform.architecture) {
        return Err(RegistryError::Platform {
            reference: name.to_owned(),
            wanted: platform.to_string(),
            available: format!("{}/{}", config.os, config.architecture),
        }
        .into());
    }
    if config.rootfs.diff_ids.len() != layers.len() {
        return Err(invalid(
            source,
            format!(
                "{name}: {} layers but {} diff_ids",
                layers.len(),
                config.rootfs.diff_ids.len()
            ),
        ));
    }
    let chain_ids = unpack::chain_ids(&config.rootfs.diff_ids);
    let mut digests = Vec::with_capacity(layers.len());
    let mut blobs = Vec::with_capacity(layers.len());
    for layer in layers {
        if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
            return Err(invalid(
                source,
                format!(
                    "{name}: layer {} has unsupported media type {:?}",
                    layer.digest, layer.media_type
                ),
            ));
        }
        let digest = digest_of(source, &layer.digest)?;
        source.copy(store, &digest, layer.size)?;
        blobs.push(store.open_blob(&digest).map_err(|e| ImportError::Store {
            path: source.path().to_owned(),
            source: e,
        })?);
        digests.push(digest);
    }
    // The archive is read in order; the unpacking then runs in parallel.
    let parallel = std::thread::available_parallelism().map_or(1, usize::from);
    unpack::unpack_stack(
        store.snapshots_dir(),
        &chain_ids,
        &config.rootfs.diff_ids,
        blobs,
        parallel,
    )
    .map_err(|(i, e)| ImportError::Unpack {
        path: source.path().to_owned(),
        digest: digests[i].to_string(),
        source: e,
    })?;
    let records = layers
        .iter()
        .zip(&digests)
        .zip(config.rootfs.diff_ids.iter().zip(&chain_ids))
        .map(|((layer, digest), (diff_id, chain))| LayerRecord {
            digest: digest.to_string(),
            size: layer.size,
            media_type: layer.media_type.clone(),
            diff_id: diff_id.clone(),
            chain_id: chain.clone(),
        })
        .collect();
    Ok(PulledImage {
        manifest_digest,
        index_digest,
        config_digest,
        size: config_size + layers.iter().map(|l| l.size).sum::<u64>(),
        layers: records,
        user: config.config.and_then(|c| c.user).unwrap_or_default(),
    })
}

#[derive(Debug, Deserialize)]
struct ArchiveEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Files of a docker-archive, already ingested into the store by name.
struct ArchiveSource<'a> {
    archive: &'a Path,
}

impl BlobSource for ArchiveSource<'_> {
    fn path(&self) -> &Path {
        self.archive
    }

    fn copy(&self, store: &ContentStore, digest: &Digest, _size: u64) -> Result<(), ImportError> {
        // Everything was ingested (and so hashed) up front.
        if store.has_blob(digest) {
            Ok(())
        } else {
            Err(invalid(
                self,
                format!("blob {digest} missing from the archive"),
            ))
        }
    }
}

/// Imports a docker-archive tarball: every image in its `manifest.json`,
/// tagged with its RepoTags. A Docker schema2 manifest is made for each, as
/// a registry would have (it becomes the image's manifest digest).
pub fn import_docker_archive(
    store: &ContentStore,
    archive: &Path,
    platform: &Platform,
) -> Result<Vec<Imported>, ImportError> {
    let io_err = |action| {
        move |source| ImportError::Io {
            action,
            path: archive.to_owned(),
            source,
        }
    };
    let file = File::open(archive).map_err(io_err("open"))?;
    let source = ArchiveSource { archive };
    // One pass: every regular file into the store, named by its digest.
    let mut files: HashMap<String, (Digest, u64)> = HashMap::new();
    let mut links: HashMap<String, String> = HashMap::new();
    let mut manifest_json = None;
    let mut tar = tar::Archive::new(BufReader::new(file));
    for entry in tar.entries().map_err(io_err("read"))? {
        let mut entry = entry.map_err(io_err("read"))?;
        let name = normalise(&String::from_utf8_lossy(&entry.path_bytes()));
        match entry.header().entry_type() {
            tar::EntryType::Regular if name == "manifest.json" => {
                let mut bytes = Vec::new();
                entry
                    .by_ref()
                    .take(MAX_MANIFEST_BYTES as u64 + 1)
                    .read_to_end(&mut bytes)
                    .map_err(io_err("read manifest.json in"))?;
                manifest_json = Some(bytes);
            }
            tar::EntryType::Regular => {
                let stored = store.ingest(&mut entry).map_err(|e| ImportError::Store {
                    path: archive.to_owned(),
                    source: e,
                })?;
                files.insert(name, stored);
            }
            // Older `docker save` links shared layers to their first copy.
            tar::EntryType::Symlink | tar::EntryType::Link => {
                if let Ok(Some(target)) = entry.link_name() {
                    let target = target.to_string_lossy();
                    let resolved = if matches!(entry.header().entry_type(), tar::EntryType::Symlink)
                    {
                        let parent = name.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
                        normalise(&format!("{parent}/{target}"))
                    } else {
                        normalise(&target)
                    };
                    links.insert(name, resolved);
                }
            }
            _ => {}
        }
    }
    let manifest_json =
        manifest_json.ok_or_else(|| invalid(&source, "no manifest.json".to_owned()))?;
    if manifest_json.len() > MAX_MANIFEST_BYTES {
        return Err(invalid(
            &source,
            "manifest.json larger than 4 MiB".to_owned(),
        ));
    }
    let entries: Vec<ArchiveEntry> = serde_json::from_slice(&manifest_json)
        .map_err(|e| invalid(&source, format!("manifest.json: {e}")))?;
    let lookup = |name: &str| -> Result<(Digest, u64), ImportError> {
        let name = normalise(name);
        let name = links.get(&name).cloned().unwrap_or(name);
        files.get(&name).cloned().ok_or_else(|| {
            invalid(
                &source,
                format!("{name:?} is named in manifest.json but not in the archive"),
            )
        })
    };
    let mut out = Vec::new();
    for entry in entries {
        let (config_digest, config_size) = lookup(&entry.config)?;
        let mut layers = Vec::new();
        for layer in &entry.layers {
            let (digest, size) = lookup(layer)?;
            let mut magic = [0u8; 2];
            let mut blob = store.open_blob(&digest).map_err(|e| ImportError::Store {
                path: archive.to_owned(),
                source: e,
            })?;
            let n = blob.read(&mut magic).map_err(io_err("read"))?;
            let media_type = if n == 2 && magic == [0x1f, 0x8b] {
                DOCKER_LAYER_GZIP
            } else {
                DOCKER_LAYER
            };
            layers.push(Descriptor {
                media_type: media_type.to_owned(),
                digest: digest.to_string(),
                size,
                platform: None,
            });
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest.to_string(), "size": config_size},
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": l.media_type, "digest": l.digest, "size": l.size})).collect::<Vec<_>>(),
        });
        let manifest_bytes =
            serde_json::to_vec(&manifest).map_err(|e| invalid(&source, e.to_string()))?;
        let manifest_digest = sha256_digest(&manifest_bytes);
        store
            .put_blob(&manifest_digest, &manifest_bytes)
            .map_err(|e| ImportError::Store {
                path: archive.to_owned(),
                source: e,
            })?;
        let tags = entry.repo_tags.unwrap_or_default();
        let label = tags
            .first()
            .cloned()
            .unwrap_or_else(|| config_digest.to_string());
        let image = finish_image(
            store,
            &source,
            &label,
            manifest_digest,
            None,
            config_digest,
            config_size,
            &layers,
            false,
            platform,
        )?;
        if tags.is_empty() {
            out.push(Imported {
                reference: None,
                image: image.clone(),
            });
        }
        for tag in tags {
            out.push(Imported {
                reference: Some(Reference::parse(&tag)?),
                image: image.clone(),
            });
        }
    }
    Ok(out)
}

/// `./a//b/` → `a/b`: archive member names as manifest.json spells them.
fn normalise(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn normalises_member_names() {
        assert_eq!(normalise("./a//b/"), "a/b");
        assert_eq!(normalise("x/../y/layer.tar"), "y/layer.tar");
        assert_eq!(normalise("../../etc"), "etc");
    }

    #[test]
    fn imports_the_test_layout() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(rootfs.join("etc/motd"), b"hi").unwrap();
        let layout = dir.path().join("layout");
        let info = bosun_testsupport::layout::write(&layout, "app:1", &rootfs).unwrap();
        let store = ContentStore::open(&dir.path().join("store")).unwrap();
        let platform = Platform::default();

        let err = import_oci_layout(&store, &layout, None, &platform).unwrap_err();
        assert!(err.to_string().contains("give the image a name"), "{err}");

        let imported =
            import_oci_layout(&store, &layout, Some("example.com/app"), &platform).unwrap();
        assert_eq!(imported.len(), 1);
        let image = &imported[0];
        assert_eq!(
            image.reference.as_ref().unwrap().to_string(),
            "example.com/app:1"
        );
        assert_eq!(image.image.config_digest.to_string(), info.config_digest);
        assert_eq!(
            image.image.manifest_digest.to_string(),
            info.manifest_digest
        );
        let snapshot = unpack::snapshot_path(store.snapshots_dir(), &info.diff_ids[0]);
        assert_eq!(std::fs::read(snapshot.join("etc/motd")).unwrap(), b"hi");
    }

    #[test]
    fn layout_blob_with_wrong_content_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::write(rootfs.join("f"), b"data").unwrap();
        let layout = dir.path().join("layout");
        let info = bosun_testsupport::layout::write(&layout, "app:1", &rootfs).unwrap();
        let layer = layout
            .join("blobs/sha256")
            .join(info.layer_digests[0].trim_start_matches("sha256:"));
        let mut bytes = std::fs::read(&layer).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&layer, bytes).unwrap();
        let store = ContentStore::open(&dir.path().join("store")).unwrap();
        let err =
            import_oci_layout(&store, &layout, Some("app"), &Platform::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ImportError::Store {
                    source: StoreError::DigestMismatch { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(store.snapshots_dir()).unwrap().count(), 0);
    }
}
