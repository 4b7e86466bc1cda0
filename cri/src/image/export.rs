//! Exporting stored images: to an OCI image layout directory (what skopeo,
//! umoci and `ctr import` read) or a docker-archive tarball (`docker load`).
//!
//! - OCI layout: the image's own manifest, config and layer blobs, byte for
//!   byte, so the manifest digest and image ID stay what they were. Each
//!   name becomes an `index.json` entry with the tag as
//!   `org.opencontainers.image.ref.name` (as skopeo and containerd write it)
//!   and the full name as `io.containerd.image.name`. An existing layout is
//!   added to; an entry with the same name is replaced. Where two names
//!   share a tag, the second gets its full name as ref.name.
//! - docker-archive: `manifest.json`, the config as `<hex>.json` and each
//!   layer uncompressed as `<diff-id hex>.tar`, as `docker save` and skopeo
//!   write it; layers are checked against their diff IDs on the way.
//!
//! Output appears whole or not at all: blobs and `index.json` are written to
//! temp names and renamed, the archive is renamed into place when complete.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::import::{CONTAINERD_NAME, REF_NAME};
use super::reference::{Digest, Reference, ReferenceError};
use super::registry::MEDIA_OCI_MANIFEST;
use super::store::{finish, temp_name, ContentStore, ImageRecord, StoreError};
use super::unpack;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("image {id}: {detail}")]
    Invalid { id: String, detail: String },
    #[error(transparent)]
    Reference(#[from] ReferenceError),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ExportError {
    let path = path.to_owned();
    move |source| ExportError::Io {
        action,
        path,
        source,
    }
}

fn digest(record: &ImageRecord, s: &str) -> Result<Digest, ExportError> {
    s.parse().map_err(|e: ReferenceError| ExportError::Invalid {
        id: record.id.clone(),
        detail: e.to_string(),
    })
}

/// Writes `record` into the OCI layout at `dir` (created if missing) under
/// each of `names` (none: one untagged entry).
pub fn export_oci_layout(
    store: &ContentStore,
    record: &ImageRecord,
    names: &[Reference],
    dir: &Path,
) -> Result<(), ExportError> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io_err("create directory", &blobs))?;
    let marker = dir.join("oci-layout");
    if !marker.exists() {
        write_replacing(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    }
    let manifest_digest = digest(record, &record.manifest_digest)?;
    let mut wanted = vec![manifest_digest.clone(), digest(record, &record.id)?];
    for layer in &record.layers {
        wanted.push(digest(record, &layer.digest)?);
    }
    for d in &wanted {
        let dest = blobs.join(d.hex());
        // Content-addressed: a blob already there under its name is ours.
        if dest.is_file() {
            continue;
        }
        let temp = blobs.join(temp_name(d.hex()));
        let copied = fs::copy(store.blob_path(d), &temp)
            .and_then(|_| File::open(&temp)?.sync_all())
            .and_then(|()| fs::rename(&temp, &dest));
        if let Err(e) = copied {
            let _ = fs::remove_file(&temp);
            return Err(io_err("copy blob to", &dest)(e));
        }
    }

    let manifest = store.read_blob(&manifest_digest)?;
    let media_type = serde_json::from_slice::<serde_json::Value>(&manifest)
        .ok()
        .and_then(|m| m.get("mediaType")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| MEDIA_OCI_MANIFEST.to_owned());
    let descriptor = serde_json::json!({
        "mediaType": media_type,
        "digest": manifest_digest.to_string(),
        "size": manifest.len(),
    });

    let index_path = dir.join("index.json");
    let mut index = match fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| {
            io_err("parse", &index_path)(io::Error::new(io::ErrorKind::InvalidData, e))
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            serde_json::json!({"schemaVersion": 2, "mediaType": super::registry::MEDIA_OCI_INDEX, "manifests": []})
        }
        Err(e) => return Err(io_err("read", &index_path)(e)),
    };
    let mut entries: Vec<serde_json::Value> = index
        .get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    let annotation = |e: &serde_json::Value, key: &str| -> Option<String> {
        e["annotations"][key].as_str().map(str::to_owned)
    };
    for name in names {
        let full = name.to_string();
        let tag = name.tag().unwrap_or("latest").to_owned();
        // Replace this name's entry (or a bare tag without a full name, as
        // skopeo would); keep everything else.
        entries.retain(|e| match annotation(e, CONTAINERD_NAME) {
            Some(other) => other != full,
            None => annotation(e, REF_NAME).as_deref() != Some(tag.as_str()),
        });
        // The tag alone, unless another name holds it here already: then the
        // full name, so that every ref.name stays unique.
        let ref_name = if entries
            .iter()
            .any(|e| annotation(e, REF_NAME).as_deref() == Some(tag.as_str()))
        {
            full.clone()
        } else {
            tag
        };
        let mut entry = descriptor.clone();
        entry["annotations"] = serde_json::json!({REF_NAME: ref_name, CONTAINERD_NAME: full});
        entries.push(entry);
    }
    if names.is_empty() {
        entries.push(descriptor);
    }
    index["manifests"] = serde_json::Value::Array(entries);
    let bytes = serde_json::to_vec(&index).map_err(|e| ExportError::Invalid {
        id: record.id.clone(),
        detail: e.to_string(),
    })?;
    write_replacing(&index_path, &bytes)?;
    tracing::info!(id = %record.id, dir = %dir.display(), "exported OCI layout");
    Ok(())
}

/// Writes `record` as a docker-archive tarball at `file`, tagged `names`.
pub fn export_docker_archive(
    store: &ContentStore,
    record: &ImageRecord,
    names: &[Reference],
    file: &Path,
) -> Result<(), ExportError> {
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let base = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = parent.join(format!(".{base}{}", temp_name("archive")));
    let layer_temp = parent.join(format!(".{base}{}", temp_name("layer")));
    let result = write_archive(store, record, names, &temp, &layer_temp)
        .and_then(|()| fs::rename(&temp, file).map_err(io_err("rename into place", file)));
    let _ = fs::remove_file(&layer_temp);
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    } else {
        tracing::info!(id = %record.id, file = %file.display(), "exported docker-archive");
    }
    result
}

fn write_archive(
    store: &ContentStore,
    record: &ImageRecord,
    names: &[Reference],
    temp: &Path,
    layer_temp: &Path,
) -> Result<(), ExportError> {
    let out = File::create(temp).map_err(io_err("create", temp))?;
    let mut tar = tar::Builder::new(BufWriter::new(out));
    let config_digest = digest(record, &record.id)?;
    let config = store.read_blob(&config_digest)?;
    let config_name = format!("{}.json", config_digest.hex());
    append(
        &mut tar,
        &config_name,
        config.len() as u64,
        &config[..],
        temp,
    )?;

    let mut layers = Vec::new();
    let mut written = HashSet::new();
    for layer in &record.layers {
        let diff_id = digest(record, &layer.diff_id)?;
        let name = format!("{}.tar", diff_id.hex());
        layers.push(name.clone());
        if !written.insert(name.clone()) {
            continue;
        }
        // The tar header needs the size first: decompress to a temp file,
        // checking the diff ID on the way.
        let blob = store.open_blob(&digest(record, &layer.digest)?)?;
        let mut reader = unpack::decompressed(blob).map_err(io_err("decompress", temp))?;
        let mut tmp = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(layer_temp)
            .map_err(io_err("create", layer_temp))?;
        let mut hash = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = reader.read(&mut buf).map_err(io_err("decompress", temp))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(io_err("write", layer_temp))?;
            size += n as u64;
        }
        let actual = finish(hash);
        if actual != layer.diff_id {
            return Err(ExportError::Invalid {
                id: record.id.clone(),
                detail: format!(
                    "layer {} has diff ID {actual}, expected {}",
                    layer.digest, layer.diff_id
                ),
            });
        }
        tmp.rewind().map_err(io_err("rewind", layer_temp))?;
        append(&mut tar, &name, size, tmp, temp)?;
    }

    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": names.iter().filter_map(Reference::tagged).collect::<Vec<_>>(),
        "Layers": layers,
    }]);
    let manifest = serde_json::to_vec(&manifest).map_err(|e| ExportError::Invalid {
        id: record.id.clone(),
        detail: e.to_string(),
    })?;
    append(
        &mut tar,
        "manifest.json",
        manifest.len() as u64,
        &manifest[..],
        temp,
    )?;
    let out = tar
        .into_inner()
        .map_err(io_err("write", temp))?
        .into_inner()
        .map_err(|e| io_err("write", temp)(e.into_error()))?;
    out.sync_all().map_err(io_err("sync", temp))
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    size: u64,
    data: impl Read,
    path: &Path,
) -> Result<(), ExportError> {
    let mut header = tar::Header::new_ustar();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mtime(0);
    tar.append_data(&mut header, name, data)
        .map_err(io_err("write", path))
}

/// Temp file beside `path`, fsync, rename: `path` is old or new, never half.
fn write_replacing(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let temp = dir.join(temp_name("export"));
    let written = File::create(&temp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&temp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(io_err("write", path)(e));
    }
    Ok(())
}
