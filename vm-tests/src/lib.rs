//! Boots Debian's kernel under QEMU (TCG) with an initramfs of our making and
//! returns what the guest printed on its serial console.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no kernel: {0}")]
    NoKernel(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{cmd} failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("guest did not power off within {0:?}; console so far:\n{1}")]
    Timeout(Duration, String),
    #[error(transparent)]
    Support(#[from] bosun_testsupport::Error),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VmError + 'a {
    move |source| VmError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Whether QEMU and a Debian kernel are installed (`scripts/setup.sh` installs both).
pub fn available() -> bool {
    which("qemu-system-x86_64") && kernel().is_ok()
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// The newest `/boot/vmlinuz-*`.
pub fn kernel() -> Result<PathBuf, VmError> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map_err(|e| VmError::NoKernel(format!("/boot: {e}")))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| VmError::NoKernel("no /boot/vmlinuz-* (install linux-image-amd64)".into()))
}

/// A directory that becomes the guest's root: busybox, binaries, files, init.
pub struct Initramfs {
    dir: PathBuf,
}

impl Initramfs {
    /// A busybox userland in `dir` (created), with `/init` switching to a
    /// tmpfs root and running `/stage2` there.
    pub fn new(dir: &Path) -> Result<Self, VmError> {
        bosun_testsupport::rootfs::busybox(dir)?;
        let init = "#!/bin/sh\n\
            mount -t proc proc /proc\n\
            mount -t devtmpfs dev /dev\n\
            mkdir -p /newroot\n\
            mount -t tmpfs -o size=400m tmpfs /newroot\n\
            for d in /*; do case $d in /proc|/dev|/newroot|/sys) ;; *) cp -a $d /newroot/ ;; esac; done\n\
            mkdir -p /newroot/proc /newroot/dev /newroot/sys\n\
            umount /proc\n\
            exec switch_root /newroot /stage2\n";
        let s = Self {
            dir: dir.to_path_buf(),
        };
        s.add_file("init", init.as_bytes(), 0o755)?;
        Ok(s)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `content` at `rel` (relative to the guest root) with `mode`.
    pub fn add_file(&self, rel: &str, content: &[u8], mode: u32) -> Result<(), VmError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join(rel.trim_start_matches('/'));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        std::fs::write(&path, content).map_err(io("writing", &path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(io("chmod", &path))
    }

    /// Copies a host binary to `rel`, with every shared library `ldd` names
    /// at its host path.
    pub fn add_binary(&self, host: &Path, rel: &str) -> Result<(), VmError> {
        let content = std::fs::read(host).map_err(io("reading", host))?;
        self.add_file(rel, &content, 0o755)?;
        let out = Command::new("ldd")
            .arg(host)
            .output()
            .map_err(io("running ldd on", host))?;
        for lib in ldd_paths(&String::from_utf8_lossy(&out.stdout)) {
            let content = std::fs::read(&lib).map_err(io("reading", &lib))?;
            self.add_file(&lib.to_string_lossy(), &content, 0o755)?;
        }
        Ok(())
    }

    /// Packs the tree as a newc cpio archive (what the kernel unpacks).
    pub fn pack(&self, out: &Path) -> Result<(), VmError> {
        let file = std::fs::File::create(out).map_err(io("creating", out))?;
        let status = Command::new("sh")
            .arg("-c")
            .arg("find . -print | cpio -o -H newc --quiet")
            .current_dir(&self.dir)
            .stdout(file)
            .status()
            .map_err(io("running cpio in", &self.dir))?;
        if !status.success() {
            return Err(VmError::Command {
                cmd: "cpio".into(),
                detail: status.to_string(),
            });
        }
        Ok(())
    }
}

/// Library paths in `ldd` output (`libc.so.6 => /lib/.. (0x..)`, `/lib64/ld-..`).
pub fn ldd_paths(out: &str) -> Vec<PathBuf> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Boots `initrd` and returns the console output once the guest powers off.
pub fn boot(initrd: &Path, memory_mb: u32, timeout: Duration) -> Result<String, VmError> {
    let kernel = kernel()?;
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", &memory_mb.to_string(), "-smp", "1"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("starting", Path::new("qemu-system-x86_64")))?;
    let mut stdout = child.stdout.take().ok_or_else(|| VmError::Command {
        cmd: "qemu".into(),
        detail: "no stdout".into(),
    })?;
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                let out = reader.join().unwrap_or_default();
                return Err(VmError::Timeout(timeout, out));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                return Err(VmError::Command {
                    cmd: "qemu".into(),
                    detail: e.to_string(),
                })
            }
        }
    }
    Ok(reader.join().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parsed() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f6d)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f6d)\n\
                   \tnot a dynamic executable\n";
        assert_eq!(
            ldd_paths(out),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}
