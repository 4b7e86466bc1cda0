//! The files a sandbox shares with its containers, under
//! `<state>/sandboxes/<id>/`: `hostname`, `resolv.conf`, `hosts`, and a
//! `shm` tmpfs that containers bind-mount as `/dev/shm`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_cri::v1::DnsConfig;
use nix::mount::{mount, MsFlags};
use serde::{Deserialize, Serialize};

use super::namespaces::unmount_and_remove;

/// Size of the per-sandbox `/dev/shm`, as containerd gives it.
pub const SHM_SIZE: &str = "65536k";

/// A failed file operation on a sandbox's files.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct FilesError {
    /// What was attempted.
    pub op: &'static str,
    /// The path.
    pub path: PathBuf,
    /// The error.
    #[source]
    pub source: io::Error,
}

fn err(op: &'static str, path: &Path, source: impl Into<io::Error>) -> FilesError {
    FilesError {
        op,
        path: path.to_owned(),
        source: source.into(),
    }
}

/// Where a sandbox's files are; all paths derive from `dir`, so a
/// restarted daemon (or a half-done setup) finds them again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxFiles {
    /// `<state>/sandboxes/<id>`.
    pub dir: PathBuf,
    /// Whether `shm` is a tmpfs of ours (not with host IPC, where
    /// containers use the host's `/dev/shm`).
    pub own_shm: bool,
}

impl SandboxFiles {
    /// The files of sandbox `id` under `state_root`.
    pub fn new(state_root: &Path, id: &str, own_shm: bool) -> Self {
        Self {
            dir: state_root.join("sandboxes").join(id),
            own_shm,
        }
    }

    /// The `hostname` file.
    pub fn hostname(&self) -> PathBuf {
        self.dir.join("hostname")
    }

    /// The `resolv.conf` file.
    pub fn resolv_conf(&self) -> PathBuf {
        self.dir.join("resolv.conf")
    }

    /// The `hosts` file.
    pub fn hosts(&self) -> PathBuf {
        self.dir.join("hosts")
    }

    /// The sandbox's `/dev/shm`, when it has its own.
    pub fn shm(&self) -> Option<PathBuf> {
        self.own_shm.then(|| self.dir.join("shm"))
    }

    /// Writes `hostname`, `resolv.conf` (from `dns`, else a copy of
    /// `host_resolv`) and a `hosts` without pod IPs, and mounts `shm`.
    pub fn create(
        &self,
        hostname: &str,
        dns: Option<&DnsConfig>,
        host_resolv: &Path,
    ) -> Result<(), FilesError> {
        fs::create_dir_all(&self.dir).map_err(|e| err("create", &self.dir, e))?;
        write_file(&self.hostname(), format!("{hostname}\n").as_bytes())?;
        let resolv = match dns.map(render_resolv_conf).filter(|r| !r.is_empty()) {
            Some(rendered) => rendered.into_bytes(),
            None => match fs::read(host_resolv) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(err("read", host_resolv, e)),
            },
        };
        write_file(&self.resolv_conf(), &resolv)?;
        self.write_hosts(hostname, &[])?;
        if let Some(shm) = self.shm() {
            fs::create_dir_all(&shm).map_err(|e| err("create", &shm, e))?;
            let data = format!("mode=1777,size={SHM_SIZE}");
            mount(
                Some("shm"),
                &shm,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(data.as_str()),
            )
            .map_err(|e| err("mount tmpfs on", &shm, e))?;
        }
        Ok(())
    }

    /// (Re)writes `hosts` for `hostname` and the pod's IPs.
    pub fn write_hosts(&self, hostname: &str, ips: &[IpAddr]) -> Result<(), FilesError> {
        write_file(&self.hosts(), render_hosts(hostname, ips).as_bytes())
    }

    /// Unmounts `shm` and deletes the directory. Idempotent.
    pub fn remove(&self) -> Result<(), FilesError> {
        if let Some(shm) = self.shm() {
            unmount_and_remove(&shm).map_err(|e| err("remove", &shm, io::Error::other(e)))?;
        }
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(err("remove", &self.dir, e)),
            _ => Ok(()),
        }
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), FilesError> {
    write_atomic(path, bytes).map_err(|e| err("write", path, e))
}

/// Writes `path` atomically: a temp file beside it, fsync, rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// `resolv.conf` from a CRI DNSConfig, in containerd's order and form;
/// empty when the config says nothing.
pub fn render_resolv_conf(dns: &DnsConfig) -> String {
    let mut out = String::new();
    if !dns.searches.is_empty() {
        out += &format!("search {}\n", dns.searches.join(" "));
    }
    for server in &dns.servers {
        out += &format!("nameserver {server}\n");
    }
    if !dns.options.is_empty() {
        out += &format!("options {}\n", dns.options.join(" "));
    }
    out
}

/// A `hosts` file: localhost for both families, then the pod's IPs with
/// its hostname.
pub fn render_hosts(hostname: &str, ips: &[IpAddr]) -> String {
    let mut out = String::from(
        "# Kubernetes-managed hosts file.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    if !hostname.is_empty() {
        for ip in ips {
            out += &format!("{ip}\t{hostname}\n");
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_renders_searches_servers_then_options() {
        let dns = DnsConfig {
            servers: vec!["10.96.0.10".into(), "fd00::a".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into(), "edns0".into()],
        };
        assert_eq!(
            render_resolv_conf(&dns),
            "search default.svc.cluster.local svc.cluster.local\n\
             nameserver 10.96.0.10\n\
             nameserver fd00::a\n\
             options ndots:5 edns0\n"
        );
        assert_eq!(render_resolv_conf(&DnsConfig::default()), "");
    }

    #[test]
    fn hosts_lists_localhost_and_the_pod() {
        let ips: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let hosts = render_hosts("web-0", &ips);
        assert!(hosts.contains("127.0.0.1\tlocalhost\n"));
        assert!(hosts.contains("::1\tlocalhost"));
        assert!(
            hosts.ends_with("10.1.0.5\tweb-0\nfd00::5\tweb-0\n"),
            "{hosts}"
        );
        assert!(!render_hosts("", &ips).contains("10.1.0.5"));
    }

    #[test]
    fn files_without_shm_are_created_and_removed_idempotently() {
        let state = tempfile::tempdir().unwrap();
        let host_resolv = state.path().join("host-resolv.conf");
        fs::write(&host_resolv, "nameserver 192.0.2.53\n").unwrap();
        let files = SandboxFiles::new(state.path(), "sb1", false);
        files.create("pod-a", None, &host_resolv).unwrap();
        assert_eq!(fs::read_to_string(files.hostname()).unwrap(), "pod-a\n");
        // No DNSConfig (or an empty one): the host's resolv.conf, as containerd.
        assert_eq!(
            fs::read_to_string(files.resolv_conf()).unwrap(),
            "nameserver 192.0.2.53\n"
        );
        let empty = DnsConfig::default();
        files.create("pod-a", Some(&empty), &host_resolv).unwrap();
        assert_eq!(
            fs::read_to_string(files.resolv_conf()).unwrap(),
            "nameserver 192.0.2.53\n"
        );
        files
            .write_hosts("pod-a", &["10.1.0.9".parse().unwrap()])
            .unwrap();
        assert!(fs::read_to_string(files.hosts())
            .unwrap()
            .contains("10.1.0.9\tpod-a"));
        files.remove().unwrap();
        assert!(!files.dir.exists());
        files.remove().unwrap();
    }
}
