//! A minimal root filesystem made of Debian's statically linked busybox.
//!
//! A static binary needs no libraries, so the rootfs stays ~2 MB, builds in
//! milliseconds without network, and behaves the same on every Debian host.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::Error;

/// Where Debian's `busybox-static` package installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets tests rely on; linked even if `busybox --list` forgot one.
pub const REQUIRED_APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "sleep", "true", "false", "id", "ps", "top", "hostname", "env",
    "mount", "grep", "wc", "head", "nc", "ping", "ip", "wget", "touch", "mkdir", "rm", "kill",
    "printf", "stat", "seq", "dd", "yes", "test", "[", "uname", "whoami",
];

/// uid/gid of the unprivileged user tests switch to.
pub const BOSUN_UID: u32 = 1000;
/// Supplementary group of `bosun`, for tests of additional gids.
pub const EXTRA_GID: u32 = 2000;

const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
bosun:x:1000:1000:bosun:/home/bosun:/bin/sh
";

// Both names for 65534: Debian calls it nogroup, busybox-based images nobody.
const GROUP: &str = "\
root:x:0:
nobody:x:65534:
nogroup:x:65534:
bosun:x:1000:
extra:x:2000:bosun
";

/// Directories every rootfs gets, with the mode set explicitly so the
/// result does not depend on the caller's umask.
const DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("home", 0o755),
    ("home/bosun", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("var", 0o755),
];

/// Populates `dest` with busybox from [`BUSYBOX`], its applet links and a
/// small `/etc`. Safe to call again on the same directory.
pub fn busybox(dest: &Path) -> Result<(), Error> {
    busybox_from(Path::new(BUSYBOX), dest)
}

/// Like [`busybox`] but with a busybox binary from `src`, for hosts that keep
/// it elsewhere. The binary must be statically linked.
pub fn busybox_from(src: &Path, dest: &Path) -> Result<(), Error> {
    check_static(src)?;
    for (dir, mode) in DIRS {
        let path = dest.join(dir);
        fs::create_dir_all(&path).map_err(Error::io("create directory", &path))?;
        set_mode(&path, *mode)?;
    }
    // Owned by bosun so a test running as uid 1000 can write its home; only
    // root can chown, and unprivileged callers do not run containers anyway.
    if crate::privileged::is_root() {
        let home = dest.join("home/bosun");
        std::os::unix::fs::chown(&home, Some(BOSUN_UID), Some(BOSUN_UID))
            .map_err(Error::io("chown", &home))?;
    }

    let bin = dest.join("bin/busybox");
    // Remove first: fs::copy follows a symlink at the destination, and a
    // stale link could point back into the host.
    remove_if_present(&bin)?;
    fs::copy(src, &bin).map_err(Error::io("copy busybox to", &bin))?;
    set_mode(&bin, 0o755)?;

    for applet in applets(src)? {
        link_applet(dest, &applet)?;
    }

    write_file(&dest.join("etc/passwd"), PASSWD, 0o644)?;
    write_file(&dest.join("etc/group"), GROUP, 0o644)?;
    // Absent so the runtime's hostname is the only one a test can observe.
    remove_if_present(&dest.join("etc/hostname"))?;
    Ok(())
}

/// The applets `src --list` reports, plus [`REQUIRED_APPLETS`], sorted.
pub fn applets(src: &Path) -> Result<Vec<String>, Error> {
    let out = Command::new(src)
        .arg("--list")
        .output()
        .map_err(Error::io("run", src))?;
    if !out.status.success() {
        return Err(Error::Command {
            program: format!("{} --list", src.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let listed = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<String> = listed
        .lines()
        .map(str::trim)
        .chain(REQUIRED_APPLETS.iter().copied())
        .filter(|name| is_plain_name(name) && *name != "busybox")
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Rejects anything that could escape `bin/` when joined.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

fn link_applet(dest: &Path, applet: &str) -> Result<(), Error> {
    let link = dest.join("bin").join(applet);
    match fs::read_link(&link) {
        Ok(target) if target == Path::new("busybox") => return Ok(()),
        _ => remove_if_present(&link)?,
    }
    symlink("busybox", &link).map_err(Error::io("create symlink", &link))
}

/// A dynamically linked busybox would fail inside the container with a
/// baffling "no such file or directory"; refuse it here with a hint instead.
fn check_static(src: &Path) -> Result<(), Error> {
    let mut file = fs::File::open(src).map_err(Error::io("open", src))?;
    let mut elf = Vec::new();
    // Program headers sit near the start; 64 KiB is plenty.
    file.by_ref()
        .take(64 * 1024)
        .read_to_end(&mut elf)
        .map_err(Error::io("read", src))?;
    let unusable = |reason: &str| Error::Busybox {
        path: src.to_owned(),
        reason: reason.to_owned(),
    };
    if has_interpreter(&elf).ok_or_else(|| unusable("not a 64-bit little-endian ELF file"))? {
        return Err(unusable(
            "it is dynamically linked (install Debian's busybox-static)",
        ));
    }
    Ok(())
}

/// Whether an ELF64 LE image has a PT_INTERP program header; `None` if the
/// bytes are not such an ELF file.
fn has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let phoff = usize::try_from(u64::from_le_bytes(elf.get(0x20..0x28)?.try_into().ok()?)).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?);
        if p_type == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), Error> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(Error::io("chmod", path))
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    remove_if_present(path)?;
    fs::write(path, contents).map_err(Error::io("write", path))?;
    set_mode(path, mode)
}

/// Removes a file or symlink (never a directory) if one is there.
fn remove_if_present(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn builds_busybox_rootfs_twice() {
        let dir = tempfile::tempdir().unwrap();
        busybox(dir.path()).unwrap();
        busybox(dir.path()).unwrap(); // idempotent

        let root = dir.path();
        assert!(fs::metadata(root.join("bin/busybox")).unwrap().len() > 100_000);
        for applet in REQUIRED_APPLETS {
            let target = fs::read_link(root.join("bin").join(applet)).unwrap();
            assert_eq!(target, Path::new("busybox"), "{applet}");
        }
        let tmp = fs::metadata(root.join("tmp")).unwrap();
        assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777);
        assert!(!root.join("etc/hostname").exists());
        let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(passwd.contains("bosun:x:1000:1000:"));
        let group = fs::read_to_string(root.join("etc/group")).unwrap();
        assert!(group.contains("extra:x:2000:bosun"));
    }

    #[test]
    fn replaces_stale_links_and_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("bin")).unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        symlink("/nonexistent", dir.path().join("bin/sh")).unwrap();
        symlink("/nonexistent", dir.path().join("bin/busybox")).unwrap();
        fs::write(dir.path().join("etc/hostname"), "old\n").unwrap();
        busybox(dir.path()).unwrap();
        let sh = fs::read_link(dir.path().join("bin/sh")).unwrap();
        assert_eq!(sh, Path::new("busybox"));
        assert!(fs::symlink_metadata(dir.path().join("bin/busybox"))
            .unwrap()
            .is_file());
        assert!(!dir.path().join("etc/hostname").exists());
    }

    #[test]
    fn refuses_dynamic_binaries() {
        // /bin/ls is dynamically linked on Debian.
        let dir = tempfile::tempdir().unwrap();
        let err = busybox_from(Path::new("/bin/ls"), dir.path()).unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err}");
        let err = busybox_from(Path::new("/etc/passwd"), dir.path()).unwrap_err();
        assert!(err.to_string().contains("/etc/passwd"), "{err}");
    }

    #[test]
    fn applet_names_cannot_escape_bin() {
        assert!(!is_plain_name("../x"));
        assert!(!is_plain_name(".."));
        assert!(!is_plain_name(""));
        assert!(is_plain_name("["));
    }
}
