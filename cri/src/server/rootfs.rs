//! A container's root filesystem: an overlay of the image's layer snapshots
//! (read-only, shared) with a writable upper layer of its own.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A failed rootfs operation.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct RootfsError {
    /// What was attempted.
    pub action: &'static str,
    /// Where.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

fn fail<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RootfsError + 'a {
    move |source| RootfsError {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The overlay mount options for `lowers` (top layer first), `upper` and
/// `work`. Pure, so the ordering rule is tested.
pub fn overlay_options(lowers: &[PathBuf], upper: &Path, work: &Path) -> String {
    let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    )
}

/// Mounts the overlay at `target`, creating `layer_dir/{upper,work}` and
/// `target`. `lowers` is top layer first.
pub fn mount_overlay(
    lowers: &[PathBuf],
    layer_dir: &Path,
    target: &Path,
) -> Result<(), RootfsError> {
    let upper = layer_dir.join("upper");
    let work = layer_dir.join("work");
    for dir in [&upper, &work, &target.to_path_buf()] {
        fs::create_dir_all(dir).map_err(fail("create", dir))?;
    }
    let options = overlay_options(lowers, &upper, &work);
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| fail("mount overlay on", target)(e.into()))
}

/// Unmounts `target` (absent or not mounted is fine).
pub fn unmount(target: &Path) -> Result<(), RootfsError> {
    match umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(fail("unmount", target)(e.into())),
    }
}

/// Bytes and inodes used under `dir` (the writable layer), not following
/// symlinks or crossing into other filesystems.
pub fn usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0;
    let mut inodes = 0;
    let mut stack = vec![dir.to_path_buf()];
    let dev = fs::symlink_metadata(dir).map(|m| m.dev()).unwrap_or(0);
    while let Some(path) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        inodes += 1;
        bytes += meta.blocks() * 512;
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(&path) {
                stack.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
            }
        }
    }
    (bytes, inodes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn options_list_lowers_top_first() {
        let options = overlay_options(
            &[PathBuf::from("/s/top"), PathBuf::from("/s/base")],
            Path::new("/c/upper"),
            Path::new("/c/work"),
        );
        assert_eq!(
            options,
            "lowerdir=/s/top:/s/base,upperdir=/c/upper,workdir=/c/work"
        );
    }

    #[test]
    fn usage_counts_files_and_dirs() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), vec![0u8; 10_000]).unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        let (bytes, inodes) = usage(dir.path());
        assert_eq!(inodes, 3);
        assert!(bytes >= 10_000);
    }
}
