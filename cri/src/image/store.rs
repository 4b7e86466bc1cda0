//! Content-addressed blob store and image records, crash-safe by
//! construction.
//!
//! Layout under the root:
//! - `blobs/sha256/<hex>`: verified blobs. A blob is streamed into a dot-named
//!   temp file in the same directory, hashed and counted on the way, fsynced,
//!   and renamed to its digest only once digest and size match. A blob name
//!   therefore always holds exactly its content; a killed write leaves only a
//!   dot file, which [`ContentStore::open`] sweeps.
//! - `images/<config hex>.json`: one record per image ID, written the same
//!   way (temp, fsync, rename, fsync the directory).
//! - `snapshots/`: unpacked layers, owned by [`super::unpack`].

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::reference::{hex, Digest};

/// Prefix of every temp name; names starting with it are never content.
const TEMP_PREFIX: &str = ".tmp-";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("blob {expected}: content has digest {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob {digest}: only sha256 content is stored")]
    UnsupportedAlgorithm { digest: Digest },
    #[error("image record {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl StoreError {
    pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.to_owned();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    }

    /// Whether the content itself was wrong (as opposed to the local disk).
    pub fn is_verification(&self) -> bool {
        matches!(
            self,
            StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. }
        )
    }
}

/// One layer of an image as the record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the blob as the registry serves it (often compressed).
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: String,
    /// Chain ID: the key of this layer's snapshot.
    pub chain_id: String,
}

/// An image: its ID is the config digest, as kubelet and crictl show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    /// The platform manifest's digest.
    pub manifest_digest: String,
    /// The index (manifest list) the manifest was selected from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<String>,
    pub layers: Vec<LayerRecord>,
    /// Compressed size of config and layers, what CRI reports as the size.
    pub size: u64,
    /// `config.User` of the image config ("" when unset).
    #[serde(default)]
    pub user: String,
}

#[derive(Debug)]
pub struct ContentStore {
    root: PathBuf,
    blobs: PathBuf,
    images: PathBuf,
    snapshots: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A per-process unique temp name in a store directory.
pub(crate) fn temp_name(what: &str) -> String {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{TEMP_PREFIX}{what}-{}-{n}", std::process::id())
}

impl ContentStore {
    /// Opens (creating) a store at `root` and removes what a killed writer
    /// left behind. Only one process may own a store at a time.
    pub fn open(root: &Path) -> Result<ContentStore, StoreError> {
        let store = ContentStore {
            root: root.to_owned(),
            blobs: root.join("blobs/sha256"),
            images: root.join("images"),
            snapshots: root.join("snapshots"),
        };
        for dir in [&store.blobs, &store.images, &store.snapshots] {
            fs::create_dir_all(dir).map_err(StoreError::io("create directory", dir))?;
            store.sweep_temps(dir)?;
        }
        Ok(store)
    }

    fn sweep_temps(&self, dir: &Path) -> Result<(), StoreError> {
        for entry in fs::read_dir(dir).map_err(StoreError::io("read directory", dir))? {
            let entry = entry.map_err(StoreError::io("read directory", dir))?;
            if !entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                continue;
            }
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing leftover of an interrupted write");
            let removed = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
            removed.map_err(StoreError::io("remove leftover", &path))?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where unpacked layers live (see [`super::unpack`]).
    pub fn snapshots_dir(&self) -> &Path {
        &self.snapshots
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        digest.algorithm() == "sha256" && self.blob_path(digest).is_file()
    }

    /// Starts writing the blob `digest`; `size` when known (descriptors
    /// always carry it) makes the writer refuse extra bytes early.
    pub fn writer(&self, digest: &Digest, size: Option<u64>) -> Result<BlobWriter, StoreError> {
        if digest.algorithm() != "sha256" {
            return Err(StoreError::UnsupportedAlgorithm {
                digest: digest.clone(),
            });
        }
        let temp = self.blobs.join(temp_name(digest.hex()));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(StoreError::io("create", &temp))?;
        Ok(BlobWriter {
            file: Some(file),
            temp,
            dest: self.blob_path(digest),
            dir: self.blobs.clone(),
            expected: digest.clone(),
            size,
            hash: Sha256::new(),
            written: 0,
        })
    }

    /// Stores `bytes` as the blob `digest` (verified like any other write).
    pub fn put_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        let mut writer = self.writer(digest, Some(bytes.len() as u64))?;
        writer.write_chunk(bytes)?;
        writer.commit()
    }

    /// Stores content whose digest is not known in advance (a file from a
    /// local archive): hashed into a temp file, named by what it hashed to.
    pub fn ingest(&self, mut reader: impl Read) -> Result<(Digest, u64), StoreError> {
        let temp = self.blobs.join(temp_name("ingest"));
        let result = (|| {
            let mut file = File::options()
                .write(true)
                .create_new(true)
                .open(&temp)
                .map_err(StoreError::io("create", &temp))?;
            let mut hash = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = reader
                    .read(&mut buf)
                    .map_err(StoreError::io("read into", &temp))?;
                if n == 0 {
                    break;
                }
                file.write_all(&buf[..n])
                    .map_err(StoreError::io("write", &temp))?;
                hash.update(&buf[..n]);
                size += n as u64;
            }
            file.sync_all().map_err(StoreError::io("sync", &temp))?;
            let digest = Digest::sha256(&hash.finalize());
            let dest = self.blob_path(&digest);
            fs::rename(&temp, &dest).map_err(StoreError::io("rename into place", &dest))?;
            sync_dir(&self.blobs)?;
            Ok((digest, size))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        fs::read(&path).map_err(StoreError::io("read blob", &path))
    }

    pub fn open_blob(&self, digest: &Digest) -> Result<File, StoreError> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(StoreError::io("open blob", &path))
    }

    /// Every stored blob (temp files are not blobs).
    pub fn list_blobs(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out = Vec::new();
        for entry in
            fs::read_dir(&self.blobs).map_err(StoreError::io("read directory", &self.blobs))?
        {
            let entry = entry.map_err(StoreError::io("read directory", &self.blobs))?;
            if let Ok(digest) = format!("sha256:{}", entry.file_name().to_string_lossy()).parse() {
                out.push(digest);
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn remove_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.blob_path(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StoreError::io("remove blob", &path)(e))
            }
            _ => Ok(()),
        }
    }

    fn record_path(&self, id: &str) -> PathBuf {
        let hex = id.strip_prefix("sha256:").unwrap_or(id);
        self.images.join(format!("{hex}.json"))
    }

    /// Writes (replacing) the record of `record.id`, atomically.
    pub fn put_image(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let path = self.record_path(&record.id);
        let bytes = serde_json::to_vec_pretty(record).map_err(|source| StoreError::Json {
            path: path.clone(),
            source,
        })?;
        write_atomic(&self.images, &path, &bytes)
    }

    pub fn get_image(&self, id: &str) -> Result<Option<ImageRecord>, StoreError> {
        let path = self.record_path(id);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Json { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("read", &path)(e)),
        }
    }

    /// All image records, sorted by ID.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let mut out = Vec::new();
        for entry in
            fs::read_dir(&self.images).map_err(StoreError::io("read directory", &self.images))?
        {
            let entry = entry.map_err(StoreError::io("read directory", &self.images))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(hex) = name
                .strip_suffix(".json")
                .filter(|_| !name.starts_with('.'))
            {
                if let Some(record) = self.get_image(hex)? {
                    out.push(record);
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    pub fn remove_image(&self, id: &str) -> Result<(), StoreError> {
        let path = self.record_path(id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StoreError::io("remove", &path)(e))
            }
            _ => sync_dir(&self.images),
        }
    }
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new
/// content, never a mix: temp file in the same dir, fsync, rename, fsync dir.
pub(crate) fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let temp = dir.join(temp_name("record"));
    let written = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(StoreError::io("write", &temp)(e));
    }
    fs::rename(&temp, path).map_err(StoreError::io("rename into place", path))?;
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("sync directory", dir))
}

/// A blob being written. Dropping it without [`BlobWriter::commit`] removes
/// the temp file; a killed process leaves it for the next `open` to sweep.
#[derive(Debug)]
pub struct BlobWriter {
    file: Option<File>,
    temp: PathBuf,
    dest: PathBuf,
    dir: PathBuf,
    expected: Digest,
    size: Option<u64>,
    hash: Sha256,
    written: u64,
}

impl BlobWriter {
    /// Appends a chunk, hashing it. Fails as soon as more than the expected
    /// size arrives, so a hostile server cannot fill the disk.
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        let written = self.written + chunk.len() as u64;
        if let Some(size) = self.size.filter(|&size| written > size) {
            return Err(StoreError::SizeMismatch {
                digest: self.expected.clone(),
                expected: size,
                actual: written,
            });
        }
        let file = self.file.as_mut().ok_or_else(|| StoreError::Io {
            action: "write",
            path: self.temp.clone(),
            source: io::Error::other("writer already finished"),
        })?;
        file.write_all(chunk)
            .map_err(StoreError::io("write", &self.temp))?;
        self.hash.update(chunk);
        self.written = written;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies size and digest, makes the bytes durable and only then
    /// gives the blob its name.
    pub fn commit(mut self) -> Result<(), StoreError> {
        if let Some(size) = self.size.filter(|&size| size != self.written) {
            return Err(StoreError::SizeMismatch {
                digest: self.expected.clone(),
                expected: size,
                actual: self.written,
            });
        }
        let actual = Digest::sha256(&std::mem::take(&mut self.hash).finalize());
        if actual != self.expected {
            return Err(StoreError::DigestMismatch {
                expected: self.expected.clone(),
                actual,
            });
        }
        if let Some(file) = self.file.take() {
            file.sync_all()
                .map_err(StoreError::io("sync", &self.temp))?;
        }
        fs::rename(&self.temp, &self.dest)
            .map_err(StoreError::io("rename into place", &self.dest))?;
        sync_dir(&self.dir)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // After a successful commit the temp name is gone; NotFound is fine.
        let _ = fs::remove_file(&self.temp);
    }
}

/// Hashes and copies a reader into the writer (for local imports and tests).
pub fn copy_into(writer: &mut BlobWriter, mut reader: impl Read) -> Result<(), StoreError> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(StoreError::io("read", &writer.temp.clone()))?;
        if n == 0 {
            return Ok(());
        }
        writer.write_chunk(&buf[..n])?;
    }
}

/// sha256 of `bytes` as a digest.
pub fn sha256_digest(bytes: &[u8]) -> Digest {
    Digest::sha256(&Sha256::digest(bytes))
}

/// `sha256:` + hex of a finished hasher.
pub(crate) fn finish(hash: Sha256) -> String {
    format!("sha256:{}", hex(&hash.finalize()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn visible(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn stores_verified_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let digest = sha256_digest(b"hello");
        let mut w = store.writer(&digest, Some(5)).unwrap();
        w.write_chunk(b"he").unwrap();
        w.write_chunk(b"llo").unwrap();
        w.commit().unwrap();
        assert!(store.has_blob(&digest));
        assert_eq!(store.read_blob(&digest).unwrap(), b"hello");
        assert_eq!(store.list_blobs().unwrap(), vec![digest]);
    }

    #[test]
    fn wrong_digest_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let digest = sha256_digest(b"hello");
        let mut w = store.writer(&digest, Some(5)).unwrap();
        w.write_chunk(b"jello").unwrap();
        let err = w.commit().unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(err.is_verification());
        assert!(!store.has_blob(&digest));
        assert!(visible(&dir.path().join("blobs/sha256")).is_empty());
    }

    #[test]
    fn short_and_long_content_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let digest = sha256_digest(b"hello");
        let mut w = store.writer(&digest, Some(5)).unwrap();
        w.write_chunk(b"hell").unwrap();
        assert!(matches!(
            w.commit(),
            Err(StoreError::SizeMismatch {
                expected: 5,
                actual: 4,
                ..
            })
        ));
        let mut w = store.writer(&digest, Some(5)).unwrap();
        let err = w.write_chunk(b"hello!").unwrap_err();
        assert!(
            matches!(err, StoreError::SizeMismatch { actual: 6, .. }),
            "{err}"
        );
        drop(w);
        assert!(visible(&dir.path().join("blobs/sha256")).is_empty());
    }

    #[test]
    fn killed_mid_write_leaves_nothing_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let digest = sha256_digest(b"hello world");
        let mut w = store.writer(&digest, Some(11)).unwrap();
        w.write_chunk(b"hello").unwrap();
        // A SIGKILL runs no destructor: forget the writer to get the same
        // on-disk state as a process killed between two chunks.
        std::mem::forget(w);
        assert!(!store.has_blob(&digest));
        assert_eq!(store.list_blobs().unwrap(), vec![]);
        assert_eq!(visible(&dir.path().join("blobs/sha256")).len(), 1);

        // The restarted owner sweeps the leftover, and the next write works.
        let store = ContentStore::open(dir.path()).unwrap();
        assert!(visible(&dir.path().join("blobs/sha256")).is_empty());
        store.put_blob(&digest, b"hello world").unwrap();
        assert_eq!(
            visible(&dir.path().join("blobs/sha256")),
            vec![digest.hex().to_owned()]
        );
    }

    #[test]
    fn killed_mid_write_in_another_process() {
        // The real thing: a child process writing a blob is SIGKILLed.
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let temp = blobs.join(temp_name("abc"));
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("while :; do echo data; done > {}", temp.display()))
            .spawn()
            .unwrap();
        while fs::metadata(&temp).map(|m| m.len()).unwrap_or(0) < 1024 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        assert_eq!(store.list_blobs().unwrap(), vec![]);
        assert!(visible(&blobs).is_empty());
    }

    #[test]
    fn image_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let id = sha256_digest(b"config").to_string();
        let record = ImageRecord {
            id: id.clone(),
            repo_tags: vec!["docker.io/library/busybox:latest".into()],
            repo_digests: vec![],
            manifest_digest: sha256_digest(b"m").to_string(),
            index_digest: None,
            layers: vec![],
            size: 3,
            user: "1000".into(),
        };
        store.put_image(&record).unwrap();
        assert_eq!(store.get_image(&id).unwrap(), Some(record.clone()));
        assert_eq!(store.list_images().unwrap(), vec![record.clone()]);
        let mut changed = record;
        changed.repo_tags.clear();
        store.put_image(&changed).unwrap();
        assert_eq!(store.list_images().unwrap(), vec![changed]);
        assert_eq!(visible(&dir.path().join("images")).len(), 1, "no temp left");
        store.remove_image(&id).unwrap();
        store.remove_image(&id).unwrap();
        assert_eq!(store.list_images().unwrap(), vec![]);
    }

    #[test]
    fn ingest_names_content_by_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let (digest, size) = store.ingest(&b"local file"[..]).unwrap();
        assert_eq!((digest.clone(), size), (sha256_digest(b"local file"), 10));
        assert_eq!(store.read_blob(&digest).unwrap(), b"local file");
        assert_eq!(visible(&dir.path().join("blobs/sha256")).len(), 1);
    }

    #[test]
    fn rejects_other_algorithms() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let d: Digest = format!("sha512:{}", "a".repeat(128)).parse().unwrap();
        assert!(matches!(
            store.writer(&d, None),
            Err(StoreError::UnsupportedAlgorithm { .. })
        ));
    }
}
