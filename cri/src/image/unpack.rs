//! Layer unpacking into overlayfs-ready snapshots.
//!
//! Each layer becomes its own directory `snapshots/<chain-id hex>`, holding
//! exactly that layer's diff in overlayfs's on-disk form: a whiteout
//! `.wh.x` becomes a 0:0 character device `x`, an opaque marker
//! `.wh..wh..opq` becomes `trusted.overlay.opaque=y` on its directory. A
//! container's rootfs is then an overlay mount with the image's snapshots as
//! lowerdirs, top layer first — the layout containerd's overlayfs
//! snapshotter uses. Keyed by chain ID, a snapshot is shared by every image
//! that has the same layers below it.
//!
//! Applying a diff into its own empty directory (rather than onto a merged
//! copy of the layers below) means no entry can ever touch a lower layer,
//! so the layers of an image unpack in parallel ([`unpack_image`],
//! [`unpack_stack`]): each is staged into a temp dir on its own, recording
//! the directories it creates implicitly; once the layers below are in
//! place a cheap second step ([`Staged::commit`]) gives those directories
//! the attributes they have below and renames the layer into place, bottom
//! up, so a snapshot never appears before it is final.
//!
//! Path safety: names with `..` are rejected, absolute names are taken
//! relative to the snapshot, and every parent directory is opened with
//! `openat2(RESOLVE_BENEATH)`, so a symlink (absolute, or relative and
//! climbing out) can never be followed out of the snapshot; the final
//! component is created with `*at` calls that do not follow it. A layer that
//! tries fails with [`UnpackError::PathEscape`]. Work happens in a temp
//! directory renamed into place only when the whole layer applied and its
//! diff ID matched; on any error the temp directory is removed (and a crash
//! leaves only temp dirs, which the store sweeps).

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::future::BoxFuture;
use futures_util::StreamExt as _;

use rustix::fs::{
    AtFlags, Dev, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags,
};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use super::store::{finish, temp_name};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry {entry:?} escapes the snapshot: {reason}")]
    PathEscape { entry: String, reason: String },
    #[error("layer entry {entry:?}: {action}: {source}")]
    Entry {
        entry: String,
        action: &'static str,
        source: io::Error,
    },
    #[error("layer entry {entry:?}: unsupported entry type {kind}")]
    UnsupportedEntry { entry: String, kind: String },
    #[error("layer entry {entry:?}: hardlink target {target:?} is not in this layer")]
    HardlinkTarget { entry: String, target: String },
    #[error("layer tar stream: {0}")]
    Tar(io::Error),
    #[error("layer content has diff ID {actual}, the image config says {expected}")]
    DiffIdMismatch { expected: String, actual: String },
    #[error("unpack task failed: {0}")]
    Task(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> UnpackError {
    let path = path.to_owned();
    move |source| UnpackError::Io {
        action,
        path,
        source,
    }
}

/// Chain IDs of a layer stack (image-spec): the first is its diff ID, each
/// next is `sha256(parent_chain_id + " " + diff_id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.clone(),
            Some(parent) => finish(Sha256::new_with_prefix(format!("{parent} {diff_id}"))),
        };
        out.push(next);
    }
    out
}

/// The snapshot directory of a chain ID.
pub fn snapshot_path(snapshots: &Path, chain_id: &str) -> PathBuf {
    snapshots.join(chain_id.strip_prefix("sha256:").unwrap_or(chain_id))
}

/// What an unpack produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    pub path: PathBuf,
    /// False when the snapshot already existed (shared with another image).
    pub created: bool,
}

/// Unpacks one layer blob (gzip, zstd or plain tar, by magic) into the
/// snapshot of `chain_id`, unless it exists already: [`stage_layer`], then
/// [`Staged::commit`] onto `lowers` (the snapshots below, top first).
pub fn unpack_layer(
    snapshots: &Path,
    chain_id: &str,
    expected_diff_id: &str,
    lowers: &[PathBuf],
    blob: impl Read,
) -> Result<Unpacked, UnpackError> {
    match stage_layer(snapshots, chain_id, expected_diff_id, blob)? {
        Some(staged) => staged.commit(lowers),
        None => Ok(Unpacked {
            path: snapshot_path(snapshots, chain_id),
            created: false,
        }),
    }
}

/// A layer applied into its own temp dir and verified, not yet in place.
/// Dropping it removes the temp dir.
#[derive(Debug)]
pub struct Staged {
    /// Empty once renamed into place.
    temp: PathBuf,
    dest: PathBuf,
    /// Directories the layer created implicitly (a child without its own
    /// parent entry), as components below the layer root.
    implicit: Vec<Vec<String>>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.temp.as_os_str().is_empty() {
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.temp) {
            tracing::warn!(path = %self.temp.display(), error = %e, "cannot remove unpack temp dir");
        }
    }
}

/// Applies a layer blob into a new temp dir under `snapshots` and checks
/// its diff ID; `None` when the snapshot of `chain_id` exists already. Needs
/// nothing of the layers below, so the layers of an image stage in parallel.
pub fn stage_layer(
    snapshots: &Path,
    chain_id: &str,
    expected_diff_id: &str,
    blob: impl Read,
) -> Result<Option<Staged>, UnpackError> {
    let dest = snapshot_path(snapshots, chain_id);
    if dest.is_dir() {
        return Ok(None);
    }
    let temp = snapshots.join(temp_name("unpack"));
    fs::create_dir(&temp).map_err(io_err("create directory", &temp))?;
    let mut staged = Staged {
        temp,
        dest,
        implicit: Vec::new(),
    };
    let applied = apply_into(&staged.temp, blob)?;
    if applied.diff_id != expected_diff_id {
        return Err(UnpackError::DiffIdMismatch {
            expected: expected_diff_id.to_owned(),
            actual: applied.diff_id,
        });
    }
    staged.implicit = applied.implicit_dirs;
    Ok(Some(staged))
}

impl Staged {
    /// Gives the implicitly created directories the mode, owner and mtime
    /// the same path has in the nearest of `lowers` (the snapshots below,
    /// top first, all in place), so the merged view keeps the lower
    /// directory's attributes; then renames the layer into place.
    pub fn commit(mut self, lowers: &[PathBuf]) -> Result<Unpacked, UnpackError> {
        let dest = self.dest.clone();
        // Another pull unpacked the same layer first: same content, keep theirs.
        if dest.is_dir() {
            return Ok(Unpacked {
                path: dest,
                created: false,
            });
        }
        fix_implicit_dirs(&self.temp, lowers, &self.implicit)?;
        match fs::rename(&self.temp, &dest) {
            Ok(()) => {
                self.temp = PathBuf::new();
                Ok(Unpacked {
                    path: dest,
                    created: true,
                })
            }
            Err(e) if dest.is_dir() => {
                tracing::debug!(error = %e, dest = %dest.display(), "snapshot appeared concurrently");
                Ok(Unpacked {
                    path: dest,
                    created: false,
                })
            }
            Err(e) => Err(io_err("rename into place", &dest)(e)),
        }
    }
}

fn fix_implicit_dirs(
    root: &Path,
    lowers: &[PathBuf],
    implicit: &[Vec<String>],
) -> Result<(), UnpackError> {
    if implicit.is_empty() || lowers.is_empty() {
        return Ok(());
    }
    let open_path = |path: &Path| {
        rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let root_fd = open_path(root).map_err(|e| io_err("open", root)(e.into()))?;
    let lower_fds: Vec<OwnedFd> = lowers.iter().filter_map(|l| open_path(l).ok()).collect();
    let as_root = rustix::process::geteuid().is_root();
    for comps in implicit {
        let path = comps.join("/");
        let Some(st) = lower_fds.iter().find_map(|lower| {
            let fd = rustix::fs::openat2(
                lower,
                path.as_str(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            )
            .ok()?;
            rustix::fs::fstat(&fd).ok()
        }) else {
            continue;
        };
        // Resolved the way the applier did when it created the directory.
        let dir = rustix::fs::openat2(
            &root_fd,
            path.as_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| entry_err(&path, "open implicit directory", e.into()))?;
        // Owner first: chown clears set-id bits.
        if as_root {
            rustix::fs::fchown(
                &dir,
                Some(rustix::fs::Uid::from_raw(st.st_uid)),
                Some(rustix::fs::Gid::from_raw(st.st_gid)),
            )
            .map_err(|e| entry_err(&path, "chown implicit directory", e.into()))?;
        }
        rustix::fs::fchmod(&dir, Mode::from_raw_mode(st.st_mode & 0o7777))
            .map_err(|e| entry_err(&path, "chmod implicit directory", e.into()))?;
        set_times(&dir, ".", u64::try_from(st.st_mtime).unwrap_or(0))
            .map_err(|e| entry_err(&path, "set mtime", e))?;
    }
    Ok(())
}

/// Why a stopped layer's read fails; never reported (the first error is).
const STOPPED: &str = "unpack stopped: another layer of the image failed";

/// A blob reader that fails once the unpack it belongs to is stopped, so
/// the other layers of a failed image stop early.
struct Stoppable<R> {
    inner: R,
    stop: Arc<AtomicBool>,
}

impl<R: Read> Read for Stoppable<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(io::Error::other(STOPPED));
        }
        self.inner.read(buf)
    }
}

/// The first failure of an image's unpack: recorded once, it stops the rest.
struct Failure<E> {
    first: Mutex<Option<E>>,
    stop: Arc<AtomicBool>,
    notify: tokio::sync::Notify,
}

impl<E> Failure<E> {
    fn new() -> Self {
        Failure {
            first: Mutex::new(None),
            stop: Arc::new(AtomicBool::new(false)),
            notify: tokio::sync::Notify::new(),
        }
    }

    /// Records `e` unless an earlier failure was (errors of layers stopped
    /// by it come later and are dropped), and stops the others.
    fn fail(&self, e: E) {
        let mut first = self.first.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(e);
        }
        drop(first);
        self.stop.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn take(&self) -> Option<E> {
        self.first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// Stops the staging tasks when a pull is dropped mid-way (they cannot be
/// cancelled: they notice at their next read).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Unpacks an image's layers (bottom first) whose blobs come from `open`
/// (e.g. a download, then the stored blob): up to `parallel` layers are
/// opened and staged at once ([`stage_layer`], on blocking threads), and
/// each is committed onto the layers below as soon as they are in place, so
/// snapshots appear bottom-up. `ready` hears of each layer in place, in
/// order. The first failure (an `open` error, or `unpack_err` of an unpack
/// error) stops the layers in flight, and this returns only once their temp
/// dirs are gone; layers already committed stay (valid snapshots, shared).
pub async fn unpack_image<'a, E, R>(
    snapshots: &Path,
    chain_ids: &[String],
    diff_ids: &[String],
    parallel: usize,
    open: Vec<BoxFuture<'a, Result<R, E>>>,
    unpack_err: impl Fn(usize, UnpackError) -> E + Sync,
    mut ready: impl FnMut(usize, &Unpacked),
) -> Result<Vec<Unpacked>, E>
where
    R: Read + Send + 'static,
    E: Send,
{
    let failure = Failure::new();
    let _stop_on_drop = StopOnDrop(failure.stop.clone());
    // Each staging task holds a sender: `recv` is `None` once all are done.
    let (alive, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    let mut jobs: Vec<BoxFuture<'_, Option<Option<Staged>>>> = Vec::with_capacity(open.len());
    for (i, blob) in open.into_iter().enumerate() {
        let (Some(chain), Some(diff)) = (chain_ids.get(i), diff_ids.get(i)) else {
            break;
        };
        let (chain, diff) = (chain.clone(), diff.clone());
        let snapshots = snapshots.to_owned();
        let alive = alive.clone();
        let (failure, unpack_err) = (&failure, &unpack_err);
        jobs.push(Box::pin(async move {
            let blob = match blob.await {
                Ok(blob) => blob,
                Err(e) => {
                    failure.fail(e);
                    return None;
                }
            };
            if failure.stopped() {
                return None;
            }
            let stop = failure.stop.clone();
            let task = tokio::task::spawn_blocking(move || {
                let staged =
                    stage_layer(&snapshots, &chain, &diff, Stoppable { inner: blob, stop });
                // Dropped in this order wherever the output ends up: a
                // staged layer nobody takes is removed before the sender goes.
                (staged, alive)
            });
            match task.await {
                Ok((Ok(staged), _alive)) => Some(staged),
                Ok((Err(e), _alive)) => {
                    failure.fail(unpack_err(i, e));
                    None
                }
                Err(e) => {
                    failure.fail(unpack_err(i, UnpackError::Task(e.to_string())));
                    None
                }
            }
        }));
    }
    drop(alive);
    let total = jobs.len();
    // `buffered` yields in order: the commit of a layer waits for the
    // layers below while the ones above keep staging.
    let mut staged = futures_util::stream::iter(jobs).buffered(parallel.max(1));
    let mut done: Vec<Unpacked> = Vec::with_capacity(total);
    while done.len() < total {
        let next = tokio::select! {
            next = staged.next() => next,
            () = failure.notify.notified() => None,
        };
        let (Some(Some(layer)), false) = (next, failure.stopped()) else {
            break;
        };
        let i = done.len();
        let unpacked = match layer {
            None => Unpacked {
                path: snapshot_path(snapshots, &chain_ids[i]),
                created: false,
            },
            Some(layer) => {
                let lowers: Vec<PathBuf> = done.iter().rev().map(|u| u.path.clone()).collect();
                match tokio::task::spawn_blocking(move || layer.commit(&lowers)).await {
                    Ok(Ok(unpacked)) => unpacked,
                    Ok(Err(e)) => {
                        failure.fail(unpack_err(i, e));
                        break;
                    }
                    Err(e) => {
                        failure.fail(unpack_err(i, UnpackError::Task(e.to_string())));
                        break;
                    }
                }
            }
        };
        ready(i, &unpacked);
        done.push(unpacked);
    }
    if done.len() == total {
        return Ok(done);
    }
    failure.stop.store(true, Ordering::Relaxed);
    // Staged layers waiting in the stream are removed as it drops; then
    // wait for the staging tasks still running to notice and clean up.
    drop(staged);
    while all_done.recv().await.is_some() {}
    Err(failure.take().unwrap_or_else(|| {
        unpack_err(
            done.len(),
            UnpackError::Task("stopped without an error".to_owned()),
        )
    }))
}

/// [`unpack_image`] for blobs at hand, without a runtime: up to `parallel`
/// layers staged on scoped threads, then committed bottom-up. When a layer
/// fails to stage nothing is committed. The error names the layer by index.
pub fn unpack_stack<R: Read + Send>(
    snapshots: &Path,
    chain_ids: &[String],
    diff_ids: &[String],
    blobs: Vec<R>,
    parallel: usize,
) -> Result<Vec<Unpacked>, (usize, UnpackError)> {
    let failure = Failure::new();
    let queue = Mutex::new(
        blobs
            .into_iter()
            .enumerate()
            .zip(chain_ids.iter().zip(diff_ids)),
    );
    let staged: Mutex<Vec<(usize, Option<Staged>)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..parallel.clamp(1, chain_ids.len().max(1)) {
            scope.spawn(|| loop {
                let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                let Some(((i, blob), (chain, diff))) = next else {
                    break;
                };
                if failure.stopped() {
                    break;
                }
                let stop = failure.stop.clone();
                match stage_layer(snapshots, chain, diff, Stoppable { inner: blob, stop }) {
                    Ok(layer) => staged
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((i, layer)),
                    Err(e) => failure.fail((i, e)),
                }
            });
        }
    });
    // Dropping the staged layers removes their temp dirs.
    let mut staged = staged.into_inner().unwrap_or_else(PoisonError::into_inner);
    if let Some(e) = failure.take() {
        return Err(e);
    }
    staged.sort_by_key(|(i, _)| *i);
    let mut done: Vec<Unpacked> = Vec::with_capacity(staged.len());
    for (i, layer) in staged {
        let unpacked = match layer {
            Some(layer) => {
                let lowers: Vec<PathBuf> = done.iter().rev().map(|u| u.path.clone()).collect();
                layer.commit(&lowers).map_err(|e| (i, e))?
            }
            None => Unpacked {
                path: snapshot_path(snapshots, &chain_ids[i]),
                created: false,
            },
        };
        done.push(unpacked);
    }
    Ok(done)
}

/// The uncompressed tar stream of a layer blob: gzip, zstd or plain, told
/// apart by magic rather than by media type (which registries get wrong).
pub fn decompressed<'a>(blob: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut buffered = BufReader::new(blob);
    let magic = buffered.fill_buf()?;
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?)
    } else {
        Box::new(buffered)
    })
}

/// What [`apply_into`] did.
#[derive(Debug)]
pub struct Applied {
    /// Of the uncompressed tar stream.
    pub diff_id: String,
    /// Directories created for children without their own entry: they
    /// take their attributes from the layers below ([`Staged::commit`]).
    pub implicit_dirs: Vec<Vec<String>>,
}

/// Applies the layer into the (empty) directory `root`.
pub fn apply_into(root: &Path, blob: impl Read) -> Result<Applied, UnpackError> {
    let decompressed = decompressed(blob).map_err(UnpackError::Tar)?;
    let mut hashing = HashReader {
        inner: decompressed,
        hash: Sha256::new(),
    };
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open", root)(e.into()))?;
    let mut applier = Applier {
        root: root_fd,
        implicit_dirs: Vec::new(),
        as_root: rustix::process::geteuid().is_root(),
        dir_times: Vec::new(),
    };
    {
        let mut archive = tar::Archive::new(&mut hashing);
        for entry in archive.entries().map_err(UnpackError::Tar)? {
            let entry = entry.map_err(UnpackError::Tar)?;
            applier.apply(entry)?;
        }
    }
    // Directory mtimes last: creating children changes them.
    applier.set_dir_times()?;
    // The diff ID covers the whole tar stream, including its end padding.
    io::copy(&mut hashing, &mut io::sink()).map_err(UnpackError::Tar)?;
    Ok(Applied {
        diff_id: finish(hashing.hash),
        implicit_dirs: applier.implicit_dirs,
    })
}

struct HashReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// An entry name split into safe components: `.` and empty parts dropped
/// (so absolute names are rooted in the snapshot), `..` refused.
fn components(entry: &str, raw: &[u8]) -> Result<Vec<String>, UnpackError> {
    let text = std::str::from_utf8(raw).map_err(|_| UnpackError::UnsupportedEntry {
        entry: entry.to_owned(),
        kind: "non-UTF-8 name".to_owned(),
    })?;
    let mut out = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(UnpackError::PathEscape {
                    entry: entry.to_owned(),
                    reason: format!("'..' in {text:?}"),
                })
            }
            _ if part.contains('\0') => {
                return Err(UnpackError::PathEscape {
                    entry: entry.to_owned(),
                    reason: "NUL byte in the path".to_owned(),
                })
            }
            _ => out.push(part.to_owned()),
        }
    }
    Ok(out)
}

struct Applier {
    root: OwnedFd,
    implicit_dirs: Vec<Vec<String>>,
    as_root: bool,
    dir_times: Vec<(Vec<String>, u64)>,
}

impl Applier {
    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let comps = components(&name, &raw)?;
        let header = entry.header().clone();
        let kind = header.entry_type();
        let Some((leaf, parents)) = comps.split_last() else {
            // The layer's root itself ("./"): only its attributes apply.
            if kind.is_dir() {
                let xattrs = pax_xattrs(&mut entry, &name)?;
                let fd = self
                    .root
                    .try_clone()
                    .map_err(|e| entry_err(&name, "open", e))?;
                self.set_dir_attrs(&name, &fd, &header, &xattrs)?;
                self.dir_times
                    .push((Vec::new(), header.mtime().unwrap_or(0)));
            }
            return Ok(());
        };
        let parent = self.open_parent(&name, parents)?;

        if leaf == OPAQUE_MARKER {
            return set_xattr_at(&parent, None, OPAQUE_XATTR, b"y")
                .map_err(|e| entry_err(&name, "mark directory opaque", e));
        }
        if let Some(hidden) = leaf.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(UnpackError::PathEscape {
                    entry: name,
                    reason: "bad whiteout name".to_owned(),
                });
            }
            remove_existing(&parent, hidden, &name)?;
            return rustix::fs::mknodat(
                &parent,
                hidden,
                FileType::CharacterDevice,
                Mode::empty(),
                rustix::fs::makedev(0, 0),
            )
            .map_err(|e| entry_err(&name, "create whiteout device", e.into()));
        }

        let xattrs = pax_xattrs(&mut entry, &name)?;
        let mode = Mode::from_raw_mode(header.mode().unwrap_or(0o644) & 0o7777);
        let mtime = header.mtime().unwrap_or(0);
        match kind {
            tar::EntryType::Directory => {
                match rustix::fs::statat(&parent, leaf.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    Ok(_) => {
                        remove_existing(&parent, leaf, &name)?;
                        mkdir(&parent, leaf, &name)?;
                    }
                    Err(Errno::NOENT) => mkdir(&parent, leaf, &name)?,
                    Err(e) => return Err(entry_err(&name, "stat", e.into())),
                }
                let fd = open_dir_at(&parent, leaf).map_err(|e| entry_err(&name, "open", e))?;
                self.set_dir_attrs(&name, &fd, &header, &xattrs)?;
                // Its own entry wins over the layers below.
                self.implicit_dirs.retain(|c| *c != comps);
                self.dir_times.push((comps.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_existing(&parent, leaf, &name)?;
                let fd = rustix::fs::openat(
                    &parent,
                    leaf.as_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| entry_err(&name, "create file", e.into()))?;
                let mut file = File::from(fd);
                io::copy(&mut entry, &mut file).map_err(|e| entry_err(&name, "write file", e))?;
                self.chown_fd(&name, &file, &header)?;
                rustix::fs::fchmod(&file, mode).map_err(|e| entry_err(&name, "chmod", e.into()))?;
                for (key, value) in &xattrs {
                    rustix::fs::fsetxattr(&file, key.as_str(), value, XattrFlags::empty())
                        .map_err(|e| entry_err(&name, "set xattr", e.into()))?;
                }
                set_times(&parent, leaf, mtime).map_err(|e| entry_err(&name, "set mtime", e))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| {
                        entry_err(&name, "read link target", io::ErrorKind::InvalidData.into())
                    })?
                    .into_owned();
                remove_existing(&parent, leaf, &name)?;
                // The target is stored as given; it is only ever resolved
                // inside the container's root, never followed here.
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &parent, leaf.as_str())
                    .map_err(|e| entry_err(&name, "create symlink", e.into()))?;
                self.chown_at(&name, &parent, leaf, &header)?;
                for (key, value) in &xattrs {
                    set_xattr_at(&parent, Some(leaf), key, value)
                        .map_err(|e| entry_err(&name, "set xattr", e))?;
                }
                set_times(&parent, leaf, mtime).map_err(|e| entry_err(&name, "set mtime", e))?;
            }
            tar::EntryType::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .ok_or_else(|| {
                        entry_err(&name, "read link target", io::ErrorKind::InvalidData.into())
                    })?
                    .into_owned();
                let target_name = String::from_utf8_lossy(&target_raw).into_owned();
                let target = components(&name, &target_raw)?;
                let Some((target_leaf, target_parents)) = target.split_last() else {
                    return Err(UnpackError::HardlinkTarget {
                        entry: name,
                        target: target_name,
                    });
                };
                let target_parent = match self.resolve_beneath(target_parents) {
                    Ok(fd) => fd,
                    Err(Errno::XDEV) | Err(Errno::LOOP) => {
                        return Err(UnpackError::PathEscape {
                            entry: name,
                            reason: format!("hardlink target {target_name:?} resolves outside"),
                        })
                    }
                    Err(_) => {
                        return Err(UnpackError::HardlinkTarget {
                            entry: name,
                            target: target_name,
                        })
                    }
                };
                if comps == target {
                    return Ok(());
                }
                remove_existing(&parent, leaf, &name)?;
                // No AT_SYMLINK_FOLLOW: a target that is a symlink is linked
                // as the symlink itself, never the file it points to.
                match rustix::fs::linkat(
                    &target_parent,
                    target_leaf.as_str(),
                    &parent,
                    leaf.as_str(),
                    AtFlags::empty(),
                ) {
                    Ok(()) => {}
                    Err(Errno::NOENT) => {
                        return Err(UnpackError::HardlinkTarget {
                            entry: name,
                            target: target_name,
                        })
                    }
                    Err(e) => return Err(entry_err(&name, "create hardlink", e.into())),
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let file_type = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let dev: Dev = rustix::fs::makedev(
                    header.device_major().ok().flatten().unwrap_or(0),
                    header.device_minor().ok().flatten().unwrap_or(0),
                );
                remove_existing(&parent, leaf, &name)?;
                rustix::fs::mknodat(&parent, leaf.as_str(), file_type, mode, dev)
                    .map_err(|e| entry_err(&name, "create device node", e.into()))?;
                self.chown_at(&name, &parent, leaf, &header)?;
                // mknod applied the umask; set the exact mode. The node was
                // just created by us and is not a symlink.
                rustix::fs::chmodat(&parent, leaf.as_str(), mode, AtFlags::empty())
                    .map_err(|e| entry_err(&name, "chmod", e.into()))?;
                for (key, value) in &xattrs {
                    set_xattr_at(&parent, Some(leaf), key, value)
                        .map_err(|e| entry_err(&name, "set xattr", e))?;
                }
                set_times(&parent, leaf, mtime).map_err(|e| entry_err(&name, "set mtime", e))?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(UnpackError::UnsupportedEntry {
                    entry: name,
                    kind: format!("{other:?}"),
                })
            }
        }
        Ok(())
    }

    /// Opens `comps` beneath the snapshot root; symlinks are followed only
    /// while they stay beneath it.
    fn resolve_beneath(&self, comps: &[String]) -> Result<OwnedFd, Errno> {
        if comps.is_empty() {
            return rustix::io::fcntl_dupfd_cloexec(&self.root, 0);
        }
        rustix::fs::openat2(
            &self.root,
            comps.join("/").as_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        )
    }

    /// Opens the parent directory of an entry, creating missing directories
    /// on the way (recorded, to take attributes from the layers below).
    fn open_parent(&mut self, entry: &str, parents: &[String]) -> Result<OwnedFd, UnpackError> {
        let escape = |errno: Errno| match errno {
            Errno::XDEV | Errno::LOOP => UnpackError::PathEscape {
                entry: entry.to_owned(),
                reason: "a parent directory is a symlink that leads outside".to_owned(),
            },
            Errno::NOTDIR => entry_err(entry, "open parent directory", io::Error::from(errno)),
            other => entry_err(entry, "open parent directory", other.into()),
        };
        match self.resolve_beneath(parents) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(escape(e)),
        }
        let mut fd = self.resolve_beneath(&[]).map_err(escape)?;
        for i in 0..parents.len() {
            match self.resolve_beneath(&parents[..=i]) {
                Ok(next) => fd = next,
                Err(Errno::NOENT) => {
                    mkdir(&fd, &parents[i], entry)?;
                    self.implicit_dirs.push(parents[..=i].to_vec());
                    fd = self.resolve_beneath(&parents[..=i]).map_err(escape)?;
                }
                Err(e) => return Err(escape(e)),
            }
        }
        Ok(fd)
    }

    fn set_dir_attrs(
        &self,
        entry: &str,
        fd: &OwnedFd,
        header: &tar::Header,
        xattrs: &[(String, Vec<u8>)],
    ) -> Result<(), UnpackError> {
        // O_PATH fds do not take fchown/fchmod/fsetxattr: reopen for reading.
        let dir = rustix::fs::openat(
            fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| entry_err(entry, "open directory", e.into()))?;
        self.chown_fd(entry, &dir, header)?;
        let mode = Mode::from_raw_mode(header.mode().unwrap_or(0o755) & 0o7777);
        rustix::fs::fchmod(&dir, mode).map_err(|e| entry_err(entry, "chmod", e.into()))?;
        for (key, value) in xattrs {
            rustix::fs::fsetxattr(&dir, key.as_str(), value, XattrFlags::empty())
                .map_err(|e| entry_err(entry, "set xattr", e.into()))?;
        }
        Ok(())
    }

    fn chown_fd(
        &self,
        entry: &str,
        fd: impl AsFd,
        header: &tar::Header,
    ) -> Result<(), UnpackError> {
        if !self.as_root {
            return Ok(());
        }
        let (uid, gid) = owner(header);
        rustix::fs::fchown(fd, Some(uid), Some(gid))
            .map_err(|e| entry_err(entry, "chown", e.into()))
    }

    fn chown_at(
        &self,
        entry: &str,
        parent: &OwnedFd,
        leaf: &str,
        header: &tar::Header,
    ) -> Result<(), UnpackError> {
        if !self.as_root {
            return Ok(());
        }
        let (uid, gid) = owner(header);
        rustix::fs::chownat(
            parent,
            leaf,
            Some(uid),
            Some(gid),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| entry_err(entry, "chown", e.into()))
    }

    fn set_dir_times(&mut self) -> Result<(), UnpackError> {
        for (comps, mtime) in std::mem::take(&mut self.dir_times).into_iter().rev() {
            let shown = comps.join("/");
            let fd = self
                .resolve_beneath(&comps)
                .map_err(|e| entry_err(&shown, "open directory", e.into()))?;
            set_times(&fd, ".", mtime).map_err(|e| entry_err(&shown, "set mtime", e))?;
        }
        Ok(())
    }
}

fn owner(header: &tar::Header) -> (rustix::fs::Uid, rustix::fs::Gid) {
    let uid = header
        .uid()
        .ok()
        .and_then(|u| u32::try_from(u).ok())
        .unwrap_or(0);
    let gid = header
        .gid()
        .ok()
        .and_then(|g| u32::try_from(g).ok())
        .unwrap_or(0);
    (
        rustix::fs::Uid::from_raw(uid),
        rustix::fs::Gid::from_raw(gid),
    )
}

fn entry_err(entry: &str, action: &'static str, source: io::Error) -> UnpackError {
    UnpackError::Entry {
        entry: entry.to_owned(),
        action,
        source,
    }
}

fn mkdir(parent: &OwnedFd, leaf: &str, entry: &str) -> Result<(), UnpackError> {
    match rustix::fs::mkdirat(parent, leaf, Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(entry_err(entry, "create directory", e.into())),
    }
}

fn open_dir_at(parent: &OwnedFd, leaf: &str) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        parent,
        leaf,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Makes room for a new entry: a later entry for the same name replaces
/// the earlier one (tar semantics). Directories are only replaced when
/// empty, as GNU tar does.
fn remove_existing(parent: &OwnedFd, leaf: &str, entry: &str) -> Result<(), UnpackError> {
    match rustix::fs::statat(parent, leaf, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(entry_err(entry, "stat", e.into())),
        Ok(st) => {
            let flags = if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            rustix::fs::unlinkat(parent, leaf, flags)
                .map_err(|e| entry_err(entry, "replace existing", e.into()))
        }
    }
}

fn set_times(parent: &impl AsFd, leaf: &str, mtime: u64) -> io::Result<()> {
    let t = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: t,
        last_modification: t,
    };
    Ok(rustix::fs::utimensat(
        parent,
        leaf,
        &times,
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Sets an xattr on `parent/leaf` (or `parent` itself) without following a
/// symlink leaf. There is no `setxattrat` before Linux 6.13, so a leaf is
/// reached through the directory fd's /proc magic link (resolved by the
/// kernel to that very directory) and `lsetxattr` on the last name.
fn set_xattr_at(parent: &OwnedFd, leaf: Option<&str>, key: &str, value: &[u8]) -> io::Result<()> {
    match leaf {
        None => {
            let dir = rustix::fs::openat(
                parent,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            Ok(rustix::fs::fsetxattr(
                &dir,
                key,
                value,
                XattrFlags::empty(),
            )?)
        }
        Some(leaf) => {
            let fd = std::os::fd::AsRawFd::as_raw_fd(parent);
            let path = format!("/proc/self/fd/{fd}/{leaf}");
            Ok(rustix::fs::lsetxattr(
                path.as_str(),
                key,
                value,
                XattrFlags::empty(),
            )?)
        }
    }
}

/// `SCHILY.xattr.*` PAX records of an entry.
fn pax_xattrs<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    name: &str,
) -> Result<Vec<(String, Vec<u8>)>, UnpackError> {
    let mut out = Vec::new();
    let Some(exts) = entry
        .pax_extensions()
        .map_err(|e| entry_err(name, "read pax header", e))?
    else {
        return Ok(out);
    };
    for ext in exts {
        let ext = ext.map_err(|e| entry_err(name, "read pax header", e))?;
        if let Ok(key) = ext.key() {
            if let Some(attr) = key.strip_prefix(PAX_XATTR_PREFIX) {
                out.push((attr.to_owned(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    /// Builds layers with raw header names, so hostile names (`..`,
    /// absolute) that `tar::Builder`'s path setters refuse can be made.
    #[derive(Default)]
    struct Layer {
        builder: Option<tar::Builder<Vec<u8>>>,
    }

    impl Layer {
        fn new() -> Layer {
            Layer {
                builder: Some(tar::Builder::new(Vec::new())),
            }
        }

        fn add(
            &mut self,
            kind: tar::EntryType,
            name: &str,
            link: Option<&str>,
            data: &[u8],
            mode: u32,
        ) -> &mut Self {
            self.add_owned(kind, name, link, data, mode, 0)
        }

        fn add_owned(
            &mut self,
            kind: tar::EntryType,
            name: &str,
            link: Option<&str>,
            data: &[u8],
            mode: u32,
            uid: u64,
        ) -> &mut Self {
            let mut h = tar::Header::new_gnu();
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(link) = link {
                gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(uid);
            h.set_mtime(1_000_000);
            h.set_cksum();
            self.builder.as_mut().unwrap().append(&h, data).unwrap();
            self
        }

        fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
            self.add(tar::EntryType::Directory, name, None, b"", mode)
        }

        fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
            self.add(tar::EntryType::Regular, name, None, data, 0o640)
        }

        fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
            self.add(tar::EntryType::Symlink, name, Some(target), b"", 0o777)
        }

        fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
            self.add(tar::EntryType::Link, name, Some(target), b"", 0o644)
        }

        fn finish(&mut self) -> Vec<u8> {
            self.builder.take().unwrap().into_inner().unwrap()
        }
    }

    fn diff_id(tar: &[u8]) -> String {
        finish(Sha256::new_with_prefix(tar))
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        snapshots: PathBuf,
        outside: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = dir.path().join("snapshots");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&snapshots).unwrap();
        fs::create_dir_all(&outside).unwrap();
        Fixture {
            _dir: dir,
            snapshots,
            outside,
        }
    }

    fn unpack(fx: &Fixture, tar: &[u8]) -> Result<Unpacked, UnpackError> {
        let id = diff_id(tar);
        unpack_layer(&fx.snapshots, &id, &id, &[], tar)
    }

    /// A failed layer leaves no snapshot, no temp dir, nothing outside.
    fn assert_nothing_left(fx: &Fixture) {
        assert_eq!(
            fs::read_dir(&fx.snapshots).unwrap().count(),
            0,
            "snapshots dir not empty"
        );
        assert_eq!(
            fs::read_dir(&fx.outside).unwrap().count(),
            0,
            "wrote outside"
        );
    }

    fn escape(result: Result<Unpacked, UnpackError>) -> String {
        match result {
            Err(e @ UnpackError::PathEscape { .. }) => e.to_string(),
            other => panic!("expected a path escape, got {other:?}"),
        }
    }

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = "sha256:aa".to_owned();
        let b = "sha256:bb".to_owned();
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(
            ids[1],
            finish(Sha256::new_with_prefix(b"sha256:aa sha256:bb"))
        );
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn applies_files_dirs_links_and_metadata() {
        let fx = fixture();
        let tar = Layer::new()
            .dir("./", 0o755)
            .dir("etc/", 0o750)
            .file("etc/hosts", b"127.0.0.1 localhost\n")
            .symlink("etc/link", "/etc/hosts")
            .hardlink("etc/hard", "etc/hosts")
            .add(tar::EntryType::Fifo, "etc/fifo", None, b"", 0o600)
            .file("etc/hosts", b"replaced\n")
            .finish();
        let out = unpack(&fx, &tar).unwrap();
        assert!(out.created);
        let root = &out.path;
        assert_eq!(root, &snapshot_path(&fx.snapshots, &diff_id(&tar)));
        assert_eq!(fs::read(root.join("etc/hosts")).unwrap(), b"replaced\n");
        let meta = fs::metadata(root.join("etc/hosts")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert_eq!(meta.mtime(), 1_000_000);
        assert_eq!(
            fs::read_link(root.join("etc/link")).unwrap(),
            Path::new("/etc/hosts")
        );
        assert!(fs::symlink_metadata(root.join("etc/fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        let dir = fs::metadata(root.join("etc")).unwrap();
        assert_eq!(dir.permissions().mode() & 0o7777, 0o750);
        assert_eq!(dir.mtime(), 1_000_000, "dir mtime set after its children");
        // The hardlink was made to the first etc/hosts, which was then replaced.
        assert_eq!(
            fs::read(root.join("etc/hard")).unwrap(),
            b"127.0.0.1 localhost\n"
        );

        // Same diff again: the snapshot is shared, not redone.
        assert!(!unpack(&fx, &tar).unwrap().created);
    }

    #[test]
    fn gzip_zstd_and_plain_give_the_same_diff_id() {
        let tar = Layer::new().file("a", b"data").finish();
        let id = diff_id(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        for blob in [&tar, &gz, &zst] {
            let dir = tempfile::tempdir().unwrap();
            assert_eq!(apply_into(dir.path(), &blob[..]).unwrap().diff_id, id);
            assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"data");
        }
    }

    #[test]
    fn diff_id_mismatch_leaves_nothing() {
        let fx = fixture();
        let tar = Layer::new().file("a", b"data").finish();
        let wrong = diff_id(b"other");
        let err = unpack_layer(&fx.snapshots, &wrong, &wrong, &[], &tar[..]).unwrap_err();
        assert!(matches!(err, UnpackError::DiffIdMismatch { .. }), "{err}");
        assert_nothing_left(&fx);
    }

    #[test]
    fn dotdot_entry_is_rejected() {
        let fx = fixture();
        let tar = Layer::new()
            .file("ok", b"x")
            .file("../outside/evil", b"x")
            .finish();
        let msg = escape(unpack(&fx, &tar));
        assert!(msg.contains("'..'"), "{msg}");
        assert_nothing_left(&fx);
        let tar = Layer::new().file("a/../../evil", b"x").finish();
        escape(unpack(&fx, &tar));
        assert_nothing_left(&fx);
    }

    #[test]
    fn absolute_names_are_rooted_inside() {
        let fx = fixture();
        let name = format!("{}/abs", fx.outside.display());
        let tar = Layer::new().file(&name, b"inside").finish();
        let out = unpack(&fx, &tar).unwrap();
        assert_eq!(
            fs::read(out.path.join(name.trim_start_matches('/'))).unwrap(),
            b"inside"
        );
        assert_eq!(fs::read_dir(&fx.outside).unwrap().count(), 0);
    }

    #[test]
    fn write_through_absolute_symlink_is_rejected() {
        let fx = fixture();
        let target = fx.outside.display().to_string();
        let tar = Layer::new()
            .symlink("link", &target)
            .file("link/evil", b"x")
            .finish();
        let msg = escape(unpack(&fx, &tar));
        assert!(msg.contains("link/evil"), "{msg}");
        assert_nothing_left(&fx);
    }

    #[test]
    fn write_through_climbing_relative_symlink_is_rejected() {
        let fx = fixture();
        let tar = Layer::new()
            .dir("a/", 0o755)
            .symlink("a/up", "../../outside")
            .file("a/up/evil", b"x")
            .finish();
        escape(unpack(&fx, &tar));
        assert_nothing_left(&fx);
    }

    #[test]
    fn symlink_staying_inside_may_be_written_through() {
        let fx = fixture();
        let tar = Layer::new()
            .dir("real/", 0o755)
            .symlink("alias", "real")
            .file("alias/f", b"x")
            .finish();
        let out = unpack(&fx, &tar).unwrap();
        assert_eq!(fs::read(out.path.join("real/f")).unwrap(), b"x");
    }

    #[test]
    fn hardlink_to_outside_is_rejected() {
        let fx = fixture();
        fs::write(fx.outside.join("secret"), b"s").unwrap();
        let tar = Layer::new().hardlink("hl", "../outside/secret").finish();
        escape(unpack(&fx, &tar));
        assert_eq!(fs::read_dir(&fx.snapshots).unwrap().count(), 0);

        // Through a symlinked directory pointing out.
        let target = fx.outside.display().to_string();
        let tar = Layer::new()
            .symlink("s", &target)
            .hardlink("hl", "s/secret")
            .finish();
        escape(unpack(&fx, &tar));
        assert_eq!(fs::read_dir(&fx.snapshots).unwrap().count(), 0);

        // An absolute target is looked up inside the layer, where it is not.
        let abs = format!("{}/secret", fx.outside.display());
        let tar = Layer::new().hardlink("hl", &abs).finish();
        let err = unpack(&fx, &tar).unwrap_err();
        assert!(matches!(err, UnpackError::HardlinkTarget { .. }), "{err}");
        assert_eq!(fs::read_dir(&fx.snapshots).unwrap().count(), 0);
        assert_eq!(fs::metadata(fx.outside.join("secret")).unwrap().nlink(), 1);
    }

    #[test]
    fn hardlink_to_symlink_links_the_symlink_itself() {
        let fx = fixture();
        fs::write(fx.outside.join("secret"), b"s").unwrap();
        let target = format!("{}/secret", fx.outside.display());
        let tar = Layer::new()
            .symlink("s", &target)
            .hardlink("hl", "s")
            .finish();
        let out = unpack(&fx, &tar).unwrap();
        assert!(fs::symlink_metadata(out.path.join("hl"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::metadata(fx.outside.join("secret")).unwrap().nlink(), 1);
    }

    #[test]
    fn whiteouts_become_overlay_form() {
        if !bosun_testsupport::privileged::require_root("whiteout device nodes and trusted xattrs")
        {
            return;
        }
        let fx = fixture();
        let tar = Layer::new()
            .dir("etc/", 0o755)
            .file("etc/.wh.passwd", b"")
            .dir("var/", 0o755)
            .file("var/.wh..wh..opq", b"")
            .add(tar::EntryType::Char, "dev-null", None, b"", 0o666)
            .finish();
        let out = unpack(&fx, &tar).unwrap();
        let wh = fs::symlink_metadata(out.path.join("etc/passwd")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert_eq!(wh.rdev(), 0);
        assert!(!out.path.join("etc/.wh.passwd").exists());
        let mut value = [0u8; 4];
        let n =
            rustix::fs::getxattr(out.path.join("var").as_path(), OPAQUE_XATTR, &mut value).unwrap();
        assert_eq!(&value[..n], b"y");
        assert!(!out.path.join("var/.wh..wh..opq").exists());
        let meta = fs::symlink_metadata(out.path.join("dev-null")).unwrap();
        assert!(meta.file_type().is_char_device());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o666);
    }

    #[test]
    fn implicit_parents_copy_lower_attributes() {
        let fx = fixture();
        let lower = fx.snapshots.join("lower");
        fs::create_dir_all(lower.join("tmp")).unwrap();
        fs::set_permissions(lower.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        let tar = Layer::new()
            .file("tmp/x", b"x")
            .file("new/y", b"y")
            .finish();
        let id = diff_id(&tar);
        let out = unpack_layer(&fx.snapshots, &id, &id, &[lower], &tar[..]).unwrap();
        let mode = |p: &str| fs::metadata(out.path.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("new"), 0o755);
    }

    #[test]
    fn truncated_stream_fails_cleanly() {
        let fx = fixture();
        let tar = Layer::new().file("big", &[7u8; 10_000]).finish();
        let id = diff_id(&tar);
        let err = unpack_layer(&fx.snapshots, &id, &id, &[], &tar[..3000]).unwrap_err();
        assert!(
            matches!(err, UnpackError::Entry { .. } | UnpackError::Tar(_)),
            "{err}"
        );
        assert_nothing_left(&fx);
    }

    /// Where the scripted readers of a test meet: how many layers have
    /// started reading, and whether the failing one has failed.
    #[derive(Default)]
    struct Meeting {
        state: std::sync::Mutex<(usize, bool)>,
        changed: std::sync::Condvar,
    }

    impl Meeting {
        fn update(&self, f: impl FnOnce(&mut (usize, bool))) {
            f(&mut self.state.lock().unwrap());
            self.changed.notify_all();
        }

        /// Whether `cond` came true; the timeout only keeps a broken
        /// (sequential) unpack from hanging the test.
        fn wait(&self, cond: impl Fn(&(usize, bool)) -> bool) -> bool {
            let state = self.state.lock().unwrap();
            let (_state, waited) = self
                .changed
                .wait_timeout_while(state, std::time::Duration::from_secs(20), |s| !cond(s))
                .unwrap();
            !waited.timed_out()
        }
    }

    type OnRead = Box<dyn FnMut(usize) -> io::Result<()> + Send>;

    /// A layer blob that runs `on_read(n)` before its n-th read.
    struct Scripted {
        data: io::Cursor<Vec<u8>>,
        reads: usize,
        on_read: OnRead,
    }

    impl Scripted {
        fn new(
            data: Vec<u8>,
            on_read: impl FnMut(usize) -> io::Result<()> + Send + 'static,
        ) -> Self {
            Scripted {
                data: io::Cursor::new(data),
                reads: 0,
                on_read: Box::new(on_read),
            }
        }
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            (self.on_read)(self.reads)?;
            self.data.read(buf)
        }
    }

    type TestResult = Result<Vec<Unpacked>, (usize, UnpackError)>;
    type Opened<R> = BoxFuture<'static, Result<R, (usize, UnpackError)>>;

    async fn unpack_async(fx: &Fixture, tars: &[Vec<u8>], blobs: Vec<Scripted>) -> TestResult {
        unpack_async_opened(
            fx,
            tars,
            blobs
                .into_iter()
                .map(|b| -> Opened<Scripted> { Box::pin(async move { Ok(b) }) })
                .collect(),
        )
        .await
    }

    async fn unpack_async_opened(
        fx: &Fixture,
        tars: &[Vec<u8>],
        open: Vec<Opened<Scripted>>,
    ) -> TestResult {
        let diffs: Vec<String> = tars.iter().map(|t| diff_id(t)).collect();
        unpack_image(
            &fx.snapshots,
            &chain_ids(&diffs),
            &diffs,
            4,
            open,
            |i, e| (i, e),
            |_, _| {},
        )
        .await
    }

    fn unpack_sync(fx: &Fixture, tars: &[Vec<u8>], blobs: Vec<Scripted>) -> TestResult {
        let diffs: Vec<String> = tars.iter().map(|t| diff_id(t)).collect();
        unpack_stack(&fx.snapshots, &chain_ids(&diffs), &diffs, blobs, 4)
    }

    fn big_layer(name: &str) -> Vec<u8> {
        Layer::new()
            .file(name, &vec![7u8; 256 * 1024])
            .file(&format!("{name}.2"), b"x")
            .finish()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upper_layer_staged_first_still_gets_lower_attributes() {
        let as_root = rustix::process::geteuid().is_root();
        let fx = fixture();
        let lower = Layer::new()
            .add_owned(tar::EntryType::Directory, "tmp/", None, b"", 0o1777, 1234)
            .file("tmp/keep", b"k")
            .finish();
        let upper = Layer::new()
            .file("tmp/x", b"x")
            .file("new/y", b"y")
            .finish();
        // The lower blob is only handed over once the upper layer has been
        // read to its end, i.e. applied without any lower snapshot around.
        let (upper_read, lower_go) = tokio::sync::oneshot::channel::<()>();
        let mut upper_read = Some(upper_read);
        let upper_len = upper.len();
        let mut served = 0;
        let upper_blob = Scripted::new(upper.clone(), move |_| Ok(()));
        let upper_blob = OnEnd {
            inner: upper_blob,
            at_end: Box::new(move |n| {
                served += n;
                if served == upper_len {
                    if let Some(tx) = upper_read.take() {
                        let _ = tx.send(());
                    }
                }
            }),
        };
        let lower_blob = Scripted::new(lower.clone(), |_| Ok(()));
        let open: Vec<Opened<Box<dyn Read + Send>>> = vec![
            Box::pin(async move {
                lower_go.await.unwrap();
                Ok(Box::new(lower_blob) as Box<dyn Read + Send>)
            }),
            Box::pin(async move { Ok(Box::new(upper_blob) as Box<dyn Read + Send>) }),
        ];
        let diffs = vec![diff_id(&lower), diff_id(&upper)];
        let out = unpack_image(
            &fx.snapshots,
            &chain_ids(&diffs),
            &diffs,
            2,
            open,
            |i, e| (i, e),
            |_, _| {},
        )
        .await
        .unwrap();
        assert!(out.iter().all(|u| u.created));
        let meta = |p: &str| fs::metadata(out[1].path.join(p)).unwrap();
        assert_eq!(meta("tmp").permissions().mode() & 0o7777, 0o1777);
        assert_eq!(meta("tmp").mtime(), 1_000_000);
        if as_root {
            assert_eq!((meta("tmp").uid(), meta("tmp").gid()), (1234, 1234));
        }
        assert_eq!(meta("new").permissions().mode() & 0o7777, 0o755);
        assert_eq!(fs::read(out[1].path.join("tmp/x")).unwrap(), b"x");
        // Only the two snapshots: no temp dir left.
        assert_eq!(fs::read_dir(&fx.snapshots).unwrap().count(), 2);
    }

    /// Calls `at_end(n)` with the byte count of every read.
    struct OnEnd<R> {
        inner: R,
        at_end: Box<dyn FnMut(usize) + Send>,
    }

    impl<R: Read> Read for OnEnd<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            (self.at_end)(n);
            Ok(n)
        }
    }

    #[test]
    fn explicit_entry_wins_over_implicit_parent() {
        let fx = fixture();
        let lower = Layer::new().dir("d/", 0o700).finish();
        let upper = Layer::new().file("d/f", b"f").dir("d/", 0o750).finish();
        let tars = [lower.clone(), upper.clone()];
        let blobs = tars
            .iter()
            .map(|t| Scripted::new(t.clone(), |_| Ok(())))
            .collect();
        let out = unpack_sync(&fx, &tars, blobs).unwrap();
        let mode = fs::metadata(out[1].path.join("d"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o750);
    }

    /// Three layers: the bottom one fails once both others are mid-stream
    /// (read once, blocked on their next read until the failure).
    fn failing_stack() -> (Vec<Vec<u8>>, Vec<Scripted>) {
        let tars = vec![big_layer("a"), big_layer("b"), big_layer("c")];
        let meeting = Arc::new(Meeting::default());
        let mut blobs = Vec::new();
        let m = meeting.clone();
        blobs.push(Scripted::new(tars[0].clone(), move |_| {
            assert!(m.wait(|s| s.0 == 2), "the other layers never started");
            m.update(|s| s.1 = true);
            Err(io::Error::other("connection reset"))
        }));
        for tar in &tars[1..] {
            let m = meeting.clone();
            blobs.push(Scripted::new(tar.clone(), move |n| {
                match n {
                    1 => m.update(|s| s.0 += 1),
                    2 => assert!(m.wait(|s| s.1), "the bottom layer never failed"),
                    _ => {}
                }
                Ok(())
            }));
        }
        (tars, blobs)
    }

    fn assert_failed_at_bottom(fx: &Fixture, result: TestResult) {
        match result {
            Err((0, UnpackError::Tar(e))) => assert!(e.to_string().contains("reset"), "{e}"),
            other => panic!("expected layer 0's read error, got {other:?}"),
        }
        assert_nothing_left(fx);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failure_while_others_unpack_leaves_nothing() {
        let fx = fixture();
        let (tars, blobs) = failing_stack();
        assert_failed_at_bottom(&fx, unpack_async(&fx, &tars, blobs).await);

        let fx = fixture();
        let (tars, blobs) = failing_stack();
        assert_failed_at_bottom(&fx, unpack_sync(&fx, &tars, blobs));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_failure_stops_the_layers_in_flight() {
        let fx = fixture();
        let tars = vec![big_layer("a"), big_layer("b")];
        let meeting = Arc::new(Meeting::default());
        let m = meeting.clone();
        // Layer 1 is mid-stream when layer 0's download fails.
        let upper = Scripted::new(tars[1].clone(), move |n| {
            match n {
                1 => m.update(|s| s.0 += 1),
                2 => assert!(m.wait(|s| s.1), "the download never failed"),
                _ => {}
            }
            Ok(())
        });
        let m = meeting.clone();
        let open: Vec<Opened<Scripted>> = vec![
            Box::pin(async move {
                let waited = tokio::task::spawn_blocking(move || {
                    let started = m.wait(|s| s.0 == 1);
                    m.update(|s| s.1 = true);
                    started
                });
                assert!(waited.await.unwrap(), "layer 1 never started");
                Err((0, UnpackError::Task("download failed".to_owned())))
            }),
            Box::pin(async move { Ok(upper) }),
        ];
        let result = unpack_async_opened(&fx, &tars, open).await;
        assert!(
            matches!(result, Err((0, UnpackError::Task(_)))),
            "{result:?}"
        );
        assert_nothing_left(&fx);
    }

    /// Every layer's first read waits until all of them have started: only
    /// a parallel unpack gets through (a sequential one times out).
    fn meeting_stack(n: usize) -> (Vec<Vec<u8>>, Vec<Scripted>) {
        let tars: Vec<Vec<u8>> = (0..n).map(|i| big_layer(&format!("f{i}"))).collect();
        let meeting = Arc::new(Meeting::default());
        let blobs = tars
            .iter()
            .map(|tar| {
                let m = meeting.clone();
                Scripted::new(tar.clone(), move |read| {
                    if read == 1 {
                        m.update(|s| s.0 += 1);
                        assert!(
                            m.wait(|s| s.0 == n),
                            "layers were not unpacked concurrently"
                        );
                    }
                    Ok(())
                })
            })
            .collect();
        (tars, blobs)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn layers_unpack_concurrently() {
        let fx = fixture();
        let (tars, blobs) = meeting_stack(3);
        let out = unpack_async(&fx, &tars, blobs).await.unwrap();
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|u| u.created && u.path.is_dir()));

        let fx = fixture();
        let (tars, blobs) = meeting_stack(3);
        let out = unpack_sync(&fx, &tars, blobs).unwrap();
        assert_eq!(fs::read_dir(&fx.snapshots).unwrap().count(), 3);
        assert_eq!(fs::read(out[2].path.join("f2.2")).unwrap(), b"x");

        // Again: every snapshot is there already, nothing is redone.
        let blobs = tars
            .iter()
            .map(|t| Scripted::new(t.clone(), |_| Ok(())))
            .collect();
        let again = unpack_sync(&fx, &tars, blobs).unwrap();
        assert!(again.iter().all(|u| !u.created));
        assert_eq!(
            again,
            out.iter()
                .map(|u| Unpacked {
                    created: false,
                    ..u.clone()
                })
                .collect::<Vec<_>>()
        );
    }
}
