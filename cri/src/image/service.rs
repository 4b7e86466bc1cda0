//! CRI ImageService semantics over the store and the puller, as plain Rust
//! (the gRPC layer will be a thin mapping onto this).
//!
//! - Image ID is the config digest; repo tags are `name:tag`, repo digests
//!   `name@<digest the tag pointed to>` (the index digest for a
//!   multi-platform image), as containerd reports them.
//! - Any of tag, repo digest or ID finds an image; a bare name means
//!   `:latest`. Pulling a tag moves it off the image it was on.
//! - RemoveImage removes the image with all its names; an unknown image is
//!   success. Its unshared blobs and snapshots go with it (garbage
//!   collection runs after every removal).
//! - Identical concurrent pulls share one pull.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use super::export::{self, ExportError};
use super::import::{self, ImportError, Imported};
use super::reference::{Reference, ReferenceError};
use super::registry::{
    AuthConfig, PullProgress, PulledImage, Puller, RegistryConfig, RegistryError,
};
use super::store::{ContentStore, ImageRecord, StoreError};
use super::unpack;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("pull {image}: {source}")]
    Pull {
        image: String,
        source: Arc<RegistryError>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Boxed: import errors carry paths and sources and are rare.
    #[error("import: {0}")]
    Import(Box<ImportError>),
    #[error("export: {0}")]
    Export(Box<ExportError>),
    #[error("image {0:?} not found")]
    NotFound(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An image as CRI's `Image` message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub size: u64,
    /// Set when the config's user is numeric (`1000` or `1000:1000`).
    pub uid: Option<i64>,
    /// Set when the config's user is a name.
    pub username: String,
}

impl Image {
    fn from_record(r: &ImageRecord) -> Image {
        let user = r.user.split(':').next().unwrap_or_default();
        let (uid, username) = match user.parse::<i64>() {
            Ok(uid) => (Some(uid), String::new()),
            Err(_) if user.is_empty() => (None, String::new()),
            Err(_) => (None, user.to_owned()),
        };
        Image {
            id: r.id.clone(),
            repo_tags: r.repo_tags.clone(),
            repo_digests: r.repo_digests.clone(),
            size: r.size,
            uid,
            username,
        }
    }
}

/// CRI's `FilesystemUsage` for the image filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesystemUsage {
    pub timestamp_ns: i64,
    pub mountpoint: PathBuf,
    pub used_bytes: u64,
    pub inodes_used: u64,
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs: usize,
    pub snapshots: usize,
}

type SharedPull = Shared<BoxFuture<'static, Result<String, Arc<RegistryError>>>>;

#[derive(Debug)]
struct Inner {
    store: Arc<ContentStore>,
    puller: Puller,
    /// Pulls under way, by reference and credentials.
    inflight: std::sync::Mutex<HashMap<String, SharedPull>>,
    /// Pulls hold it shared, GC exclusive: GC never sees half a pull.
    gc: tokio::sync::RwLock<()>,
    /// Serialises read-modify-write of image records.
    records: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone)]
pub struct ImageService {
    inner: Arc<Inner>,
}

impl ImageService {
    /// Opens the image store at `root` (e.g. `/var/lib/bosun/images`).
    pub fn new(root: &Path, config: RegistryConfig) -> Result<ImageService, ServiceError> {
        Ok(ImageService {
            inner: Arc::new(Inner {
                store: Arc::new(ContentStore::open(root)?),
                puller: Puller::new(config),
                inflight: std::sync::Mutex::new(HashMap::new()),
                gc: tokio::sync::RwLock::new(()),
                records: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Progress events of every pull from now on (see [`PullProgress`]).
    pub fn subscribe_progress(&self) -> tokio::sync::broadcast::Receiver<PullProgress> {
        self.inner.puller.subscribe()
    }

    pub fn store(&self) -> &ContentStore {
        &self.inner.store
    }

    /// ListImages. A filter (tag, digest reference or ID) narrows the list
    /// to the image it names.
    pub fn list_images(&self, filter: Option<&str>) -> Result<Vec<Image>, ServiceError> {
        match filter.filter(|f| !f.is_empty()) {
            Some(f) => Ok(self.image_status(f)?.into_iter().collect()),
            None => Ok(self
                .inner
                .store
                .list_images()?
                .iter()
                .map(Image::from_record)
                .collect()),
        }
    }

    /// ImageStatus: None when the image is not present (CRI then answers
    /// with an empty image, not an error).
    pub fn image_status(&self, image: &str) -> Result<Option<Image>, ServiceError> {
        Ok(self.find(image)?.as_ref().map(Image::from_record))
    }

    fn find(&self, image: &str) -> Result<Option<ImageRecord>, ServiceError> {
        let store = &self.inner.store;
        let id = image.strip_prefix("sha256:").unwrap_or(image);
        if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            let record = store.get_image(&format!("sha256:{id}"))?;
            // Bare 64 hex chars may also be a repository name: fall through.
            if record.is_some() || image.starts_with("sha256:") {
                return Ok(record);
            }
        }
        let reference = Reference::parse(image)?;
        let records = store.list_images()?;
        let found = match (reference.digest(), reference.tagged()) {
            (Some(digest), _) => {
                let wanted = reference.with_digest(digest);
                records
                    .into_iter()
                    .find(|r| r.repo_digests.contains(&wanted))
            }
            (None, Some(tagged)) => records.into_iter().find(|r| r.repo_tags.contains(&tagged)),
            (None, None) => None,
        };
        Ok(found)
    }

    /// PullImage: returns the image ID. Identical pulls under way are joined.
    pub async fn pull_image(
        &self,
        image: &str,
        auth: Option<&AuthConfig>,
    ) -> Result<String, ServiceError> {
        let reference = Reference::parse(image)?;
        // Exchanged inside the (shared) pull, once per pull.
        let identity = auth
            .and_then(AuthConfig::identity_token_only)
            .map(str::to_owned);
        let credentials = auth
            .filter(|_| identity.is_none())
            .map(AuthConfig::credentials)
            .transpose()
            .map_err(|e| ServiceError::Pull {
                image: reference.to_string(),
                source: Arc::new(e),
            })?
            .unwrap_or(oci_client::secrets::RegistryAuth::Anonymous);
        let key = format!(
            "{reference}\0{}",
            super::store::sha256_digest(format!("{credentials:?}{auth:?}{identity:?}").as_bytes())
        );
        let shared = {
            let mut inflight = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match inflight.get(&key) {
                Some(pull) => {
                    tracing::info!(image = %reference, "joining a pull under way");
                    pull.clone()
                }
                None => {
                    let inner = self.inner.clone();
                    let name = reference.to_string();
                    let reference = reference.clone();
                    let key2 = key.clone();
                    // Spawned, so the pull finishes for the others even if
                    // the caller that started it goes away.
                    let task = tokio::spawn(async move {
                        let result = match identity {
                            Some(token) => {
                                match inner
                                    .puller
                                    .exchange_identity_token(&reference, &token)
                                    .await
                                {
                                    Ok(bearer) => Inner::pull(&inner, &reference, &bearer).await,
                                    Err(e) => Err(e),
                                }
                            }
                            None => Inner::pull(&inner, &reference, &credentials).await,
                        };
                        if result.is_err() {
                            // Leave no garbage: what the failed pull stored
                            // (verified blobs of an image that cannot be
                            // used) is unreferenced and goes now.
                            let service = ImageService {
                                inner: inner.clone(),
                            };
                            if let Err(e) = service.gc().await {
                                tracing::warn!(error = %e, "garbage collection after a failed pull");
                            }
                        }
                        inner
                            .inflight
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .remove(&key2);
                        result.map_err(Arc::new)
                    });
                    let pull = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(Arc::new(RegistryError::Task {
                                reference: name,
                                detail: format!("pull task: {e}"),
                            }))
                        })
                    }
                    .boxed()
                    .shared();
                    inflight.insert(key, pull.clone());
                    pull
                }
            }
        };
        shared.await.map_err(|source| ServiceError::Pull {
            image: reference.to_string(),
            source,
        })
    }

    /// Imports the tagged images of an OCI image layout (bare tags are put
    /// on `name`); returns their IDs. Content is verified and unpacked as
    /// in a pull; on failure nothing of the import is left.
    pub async fn import_oci_layout(
        &self,
        layout: &Path,
        name: Option<&str>,
    ) -> Result<Vec<String>, ServiceError> {
        let (layout, name) = (layout.to_owned(), name.map(str::to_owned));
        self.import(move |store, platform| {
            import::import_oci_layout(store, &layout, name.as_deref(), platform)
        })
        .await
    }

    /// Imports a docker-archive tarball; returns the image IDs.
    pub async fn import_docker_archive(&self, archive: &Path) -> Result<Vec<String>, ServiceError> {
        let archive = archive.to_owned();
        self.import(move |store, platform| import::import_docker_archive(store, &archive, platform))
            .await
    }

    async fn import<F>(&self, work: F) -> Result<Vec<String>, ServiceError>
    where
        F: FnOnce(&ContentStore, &super::registry::Platform) -> Result<Vec<Imported>, ImportError>
            + Send
            + 'static,
    {
        let result = {
            let _shared = self.inner.gc.read().await;
            let inner = self.inner.clone();
            let imported = tokio::task::spawn_blocking(move || {
                work(&inner.store, &inner.puller.config().platform)
            })
            .await
            .map_err(|e| ServiceError::Io {
                action: "run import",
                path: PathBuf::new(),
                source: std::io::Error::other(e.to_string()),
            })?;
            match imported {
                Ok(images) => {
                    let _records = self.inner.records.lock().await;
                    let mut ids = Vec::new();
                    for image in &images {
                        let id = self.inner.record(image.reference.as_ref(), &image.image)?;
                        if !ids.contains(&id) {
                            ids.push(id);
                        }
                    }
                    Ok(ids)
                }
                Err(e) => Err(ServiceError::Import(Box::new(e))),
            }
        };
        // Files of the archive no image uses (and everything of a failed
        // import) are garbage.
        self.gc().await?;
        result
    }

    /// Exports an image (by tag, repo digest or ID) into an OCI layout
    /// directory; returns its ID. By tag it carries that tag, otherwise all
    /// of its tags.
    pub async fn export_oci_layout(&self, image: &str, dir: &Path) -> Result<String, ServiceError> {
        let dir = dir.to_owned();
        self.export(image, move |store, record, names| {
            export::export_oci_layout(store, record, names, &dir)
        })
        .await
    }

    /// Exports an image as a docker-archive tarball; returns its ID.
    pub async fn export_docker_archive(
        &self,
        image: &str,
        file: &Path,
    ) -> Result<String, ServiceError> {
        let file = file.to_owned();
        self.export(image, move |store, record, names| {
            export::export_docker_archive(store, record, names, &file)
        })
        .await
    }

    async fn export<F>(&self, image: &str, work: F) -> Result<String, ServiceError>
    where
        F: FnOnce(&ContentStore, &ImageRecord, &[Reference]) -> Result<(), ExportError>
            + Send
            + 'static,
    {
        // GC must not take blobs from under the copy.
        let _shared = self.inner.gc.read().await;
        let record = self
            .find(image)?
            .ok_or_else(|| ServiceError::NotFound(image.to_owned()))?;
        let by_tag = Reference::parse(image).ok().filter(|r| {
            r.digest().is_none() && r.tagged().is_some_and(|t| record.repo_tags.contains(&t))
        });
        let names = match by_tag {
            Some(r) => vec![r],
            None => record
                .repo_tags
                .iter()
                .map(|t| Reference::parse(t))
                .collect::<Result<_, _>>()?,
        };
        let inner = self.inner.clone();
        let id = record.id.clone();
        tokio::task::spawn_blocking(move || work(&inner.store, &record, &names))
            .await
            .map_err(|e| ServiceError::Io {
                action: "run export",
                path: PathBuf::new(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|e| ServiceError::Export(Box::new(e)))?;
        Ok(id)
    }

    /// RemoveImage: by tag, repo digest or ID; removes every name of the
    /// image. Unknown images are not an error.
    pub async fn remove_image(&self, image: &str) -> Result<(), ServiceError> {
        {
            let _records = self.inner.records.lock().await;
            let Some(record) = self.find(image)? else {
                return Ok(());
            };
            self.inner.store.remove_image(&record.id)?;
            tracing::info!(image, id = %record.id, "removed image");
        }
        self.gc().await?;
        Ok(())
    }

    /// ImageFsInfo: usage of the filesystem tree holding the snapshots.
    pub fn image_fs_info(&self) -> Result<Vec<FilesystemUsage>, ServiceError> {
        let root = self.inner.store.snapshots_dir();
        let mut seen = HashSet::new();
        let (mut bytes, mut inodes) = (0u64, 0u64);
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|source| ServiceError::Io {
                action: "read directory",
                path: dir.clone(),
                source,
            })?;
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                use std::os::unix::fs::MetadataExt;
                if seen.insert((meta.dev(), meta.ino())) {
                    bytes += meta.blocks() * 512;
                    inodes += 1;
                }
                if meta.is_dir() {
                    stack.push(entry.path());
                }
            }
        }
        let timestamp_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Ok(vec![FilesystemUsage {
            timestamp_ns,
            mountpoint: root.to_owned(),
            used_bytes: bytes,
            inodes_used: inodes,
        }])
    }

    /// Removes blobs and snapshots no image record refers to.
    pub async fn gc(&self) -> Result<GcReport, ServiceError> {
        let _exclusive = self.inner.gc.write().await;
        let store = &self.inner.store;
        let records = store.list_images()?;
        let mut blobs = HashSet::new();
        let mut snapshots = HashSet::new();
        for r in &records {
            blobs.insert(r.id.clone());
            blobs.insert(r.manifest_digest.clone());
            blobs.extend(r.index_digest.clone());
            for l in &r.layers {
                blobs.insert(l.digest.clone());
                snapshots.insert(unpack::snapshot_path(store.snapshots_dir(), &l.chain_id));
            }
        }
        let mut report = GcReport::default();
        for digest in store.list_blobs()? {
            if !blobs.contains(&digest.to_string()) {
                store.remove_blob(&digest)?;
                report.blobs += 1;
            }
        }
        let dir = store.snapshots_dir();
        let entries = std::fs::read_dir(dir).map_err(|source| ServiceError::Io {
            action: "read directory",
            path: dir.to_owned(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if !snapshots.contains(&path) {
                std::fs::remove_dir_all(&path).map_err(|source| ServiceError::Io {
                    action: "remove snapshot",
                    path: path.clone(),
                    source,
                })?;
                report.snapshots += 1;
            }
        }
        if report != GcReport::default() {
            tracing::info!(
                blobs = report.blobs,
                snapshots = report.snapshots,
                "garbage collected"
            );
        }
        Ok(report)
    }
}

impl Inner {
    async fn pull(
        inner: &Arc<Inner>,
        reference: &Reference,
        credentials: &oci_client::secrets::RegistryAuth,
    ) -> Result<String, RegistryError> {
        let _shared = inner.gc.read().await;
        let pulled = inner
            .puller
            .pull(inner.store.clone(), reference, credentials)
            .await?;
        let _records = inner.records.lock().await;
        inner
            .record(Some(reference), &pulled)
            .map_err(|source| RegistryError::Store {
                reference: reference.to_string(),
                source,
            })
    }

    /// Creates or updates the record of a pulled or imported image and
    /// moves its tag onto it. Call with `records` held.
    fn record(
        &self,
        reference: Option<&Reference>,
        pulled: &PulledImage,
    ) -> Result<String, StoreError> {
        let inner = self;
        let id = pulled.config_digest.to_string();
        let tag = reference.and_then(Reference::tagged);
        let repo_digest = reference.map(|r| {
            r.with_digest(
                pulled
                    .index_digest
                    .as_ref()
                    .unwrap_or(&pulled.manifest_digest),
            )
        });
        // The tag moves: drop it from any other image.
        if let Some(tag) = &tag {
            for mut other in inner.store.list_images()? {
                if other.id != id && other.repo_tags.contains(tag) {
                    other.repo_tags.retain(|t| t != tag);
                    inner.store.put_image(&other)?;
                }
            }
        }
        let mut record = inner.store.get_image(&id)?.unwrap_or_else(|| ImageRecord {
            id: id.clone(),
            repo_tags: Vec::new(),
            repo_digests: Vec::new(),
            manifest_digest: String::new(),
            index_digest: None,
            layers: Vec::new(),
            size: 0,
            user: String::new(),
        });
        record.manifest_digest = pulled.manifest_digest.to_string();
        record.index_digest = pulled.index_digest.as_ref().map(ToString::to_string);
        record.layers = pulled.layers.clone();
        record.size = pulled.size;
        record.user = pulled.user.clone();
        if let Some(tag) = tag {
            if !record.repo_tags.contains(&tag) {
                record.repo_tags.push(tag);
            }
        }
        if let Some(repo_digest) = repo_digest {
            if !record.repo_digests.contains(&repo_digest) {
                record.repo_digests.push(repo_digest);
            }
        }
        inner.store.put_image(&record)?;
        Ok(id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::image::store::{sha256_digest, LayerRecord};

    /// Stores an image's blobs and a fake snapshot per layer, as a pull would.
    fn add_image(
        service: &ImageService,
        config: &[u8],
        layers: &[&[u8]],
        tag: &str,
    ) -> ImageRecord {
        let store = service.store();
        let id = sha256_digest(config);
        store.put_blob(&id, config).unwrap();
        let manifest = [config, b"manifest"].concat();
        let manifest_digest = sha256_digest(&manifest);
        store.put_blob(&manifest_digest, &manifest).unwrap();
        let mut records = Vec::new();
        let mut diff_ids = Vec::new();
        for layer in layers {
            let digest = sha256_digest(layer);
            store.put_blob(&digest, layer).unwrap();
            diff_ids.push(digest.to_string());
        }
        for (layer, chain) in layers.iter().zip(unpack::chain_ids(&diff_ids)) {
            std::fs::create_dir_all(unpack::snapshot_path(store.snapshots_dir(), &chain)).unwrap();
            records.push(LayerRecord {
                digest: sha256_digest(layer).to_string(),
                size: layer.len() as u64,
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                diff_id: sha256_digest(layer).to_string(),
                chain_id: chain,
            });
        }
        let reference = Reference::parse(tag).unwrap();
        let record = ImageRecord {
            id: id.to_string(),
            repo_tags: vec![reference.tagged().unwrap()],
            repo_digests: vec![reference.with_digest(&manifest_digest)],
            manifest_digest: manifest_digest.to_string(),
            index_digest: None,
            layers: records,
            size: 1,
            user: "1000:1000".into(),
        };
        store.put_image(&record).unwrap();
        record
    }

    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[tokio::test]
    async fn status_list_remove_and_gc() {
        let dir = tempfile::tempdir().unwrap();
        let service = ImageService::new(dir.path(), RegistryConfig::default()).unwrap();
        let a = add_image(&service, b"config a", &[b"base", b"a top"], "busybox");
        let b = add_image(&service, b"config b", &[b"base"], "quay.io/x/y:2");

        // Found by tag (normalised), ID (with and without sha256:) and digest.
        let status = service.image_status("busybox:latest").unwrap().unwrap();
        assert_eq!(status.id, a.id);
        assert_eq!(status.uid, Some(1000));
        assert_eq!(status.repo_tags, vec!["docker.io/library/busybox:latest"]);
        assert_eq!(service.image_status(&a.id).unwrap(), Some(status.clone()));
        let bare = a.id.trim_start_matches("sha256:");
        assert_eq!(service.image_status(bare).unwrap(), Some(status.clone()));
        assert_eq!(
            service
                .image_status(&b.repo_digests[0])
                .unwrap()
                .unwrap()
                .id,
            b.id
        );
        assert_eq!(service.image_status("busybox:2").unwrap(), None);
        assert_eq!(
            service
                .image_status(&sha256_digest(b"nope").to_string())
                .unwrap(),
            None
        );
        assert!(service.image_status("Bad Ref").is_err());
        assert_eq!(service.list_images(None).unwrap().len(), 2);
        assert_eq!(service.list_images(Some("quay.io/x/y:2")).unwrap().len(), 1);
        assert_eq!(service.list_images(Some("")).unwrap().len(), 2);

        // Nothing unreferenced yet.
        assert_eq!(service.gc().await.unwrap(), GcReport::default());
        let blobs = dir.path().join("blobs/sha256");
        let snapshots = dir.path().join("snapshots");
        assert_eq!((count(&blobs), count(&snapshots)), (6, 2));

        // Removing a by tag keeps the base layer b shares.
        service.remove_image("busybox").await.unwrap();
        assert_eq!(service.image_status(&a.id).unwrap(), None);
        assert_eq!((count(&blobs), count(&snapshots)), (3, 1));
        assert!(service.store().has_blob(&sha256_digest(b"base")));

        // Unknown: success. Then the last image by ID empties the store.
        service.remove_image("busybox").await.unwrap();
        service.remove_image(&b.id).await.unwrap();
        assert_eq!((count(&blobs), count(&snapshots)), (0, 0));
        assert!(service.list_images(None).unwrap().is_empty());
    }

    #[test]
    fn user_forms() {
        let mut r = ImageRecord {
            id: "sha256:x".into(),
            repo_tags: vec![],
            repo_digests: vec![],
            manifest_digest: String::new(),
            index_digest: None,
            layers: vec![],
            size: 0,
            user: "nobody".into(),
        };
        let image = Image::from_record(&r);
        assert_eq!((image.uid, image.username.as_str()), (None, "nobody"));
        r.user = "0".into();
        assert_eq!(Image::from_record(&r).uid, Some(0));
        r.user = String::new();
        let image = Image::from_record(&r);
        assert_eq!((image.uid, image.username.as_str()), (None, ""));
    }
}
