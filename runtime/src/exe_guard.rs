//! CVE-2019-5736 defence: a process in the container could reopen
//! /proc/<pid>/exe of a runtime process that shares its namespaces and write
//! to our binary. Commands that fork container processes first re-execute
//! themselves from a read-only view of the binary, as crun does: a detached
//! read-only bind mount of it (open_tree + mount_setattr), executed with
//! execveat. The mount is never attached to any tree, so nothing propagates,
//! and no byte is copied. Kernels without that API get a sealed memfd copy.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;

#[derive(Debug, thiserror::Error)]
pub enum ExeGuardError {
    #[error("re-executing from a read-only view of the binary: {0}")]
    Reexec(String),
}

/// Whether we already run from a read-only mount (our re-exec, or a binary
/// installed on a read-only filesystem).
fn running_read_only() -> bool {
    nix::sys::statvfs::statvfs("/proc/self/exe")
        .is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

/// Returns only when already protected; otherwise re-executes this process.
pub fn ensure_read_only_exe() -> Result<(), ExeGuardError> {
    if running_read_only() || pentacle::is_sealed() {
        return Ok(());
    }
    match read_only_clone() {
        Ok(tree) => {
            let err = reexec(&tree);
            Err(ExeGuardError::Reexec(format!("execveat: {err}")))
        }
        // No open_tree/mount_setattr (Linux < 5.12): copy into a sealed memfd.
        Err(nix::errno::Errno::ENOSYS) => pentacle::ensure_sealed()
            .map_err(|e| ExeGuardError::Reexec(format!("sealed copy: {e}"))),
        Err(e) => Err(ExeGuardError::Reexec(format!("read-only bind mount: {e}"))),
    }
}

/// A detached, read-only bind mount of our executable.
fn read_only_clone() -> Result<OwnedFd, nix::errno::Errno> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const MOUNT_ATTR_RDONLY: u64 = 1;
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let path = c"/proc/self/exe";
    // SAFETY: open_tree(2) with a valid path; it returns a new descriptor we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    let fd = nix::errno::Errno::result(fd)?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr(2) on our descriptor with a correctly sized struct.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    nix::errno::Errno::result(r)?;
    Ok(tree)
}

/// execveat(tree, "", argv, environ, AT_EMPTY_PATH); returns only on failure.
fn reexec(tree: &OwnedFd) -> nix::errno::Errno {
    let args: Vec<CString> = std::env::args_os()
        .filter_map(|a| CString::new(a.into_encoded_bytes()).ok())
        .collect();
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let args: Vec<&CStr> = args.iter().map(CString::as_c_str).collect();
    let env: Vec<&CStr> = env.iter().map(CString::as_c_str).collect();
    match nix::unistd::execveat(
        Some(tree.as_raw_fd()),
        c"",
        &args,
        &env,
        nix::fcntl::AtFlags::AT_EMPTY_PATH,
    ) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}
