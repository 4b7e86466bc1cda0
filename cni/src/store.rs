//! The on-disk IPAM store, in host-local's layout so a node can switch
//! between the reference plugin and ours without losing allocations:
//!
//! ```text
//! /var/lib/cni/networks/<network>/
//!     lock                    flock'ed for a whole allocation
//!     10.22.0.5               "<containerID>\r\n<ifname>"
//!     last_reserved_ip.0      round-robin position of range set 0
//!     attachment.<hash>       ours: what one ADD built (JSON)
//! ```
//!
//! Every write goes to a temporary file renamed into place, so a killed
//! plugin leaves either the old state or the new, never a half-written
//! allocation; stale temporaries are removed on the next open.
//!
//! Nothing is fsynced (host-local does not either): an allocation matters
//! only while its pod lives, and no pod outlives a power cut — after one,
//! the runtime's GC releases whatever the disk kept. An fsync costs 0.3 ms
//! on an idle disk and several ms on a busy one, per address.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::ipam::{Allocation, Store, StoreError};

/// Where host-local keeps its per-network directories.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";
/// Attachment records; never parse as an IP, so allocations ignore them.
const RECORD_PREFIX: &str = "attachment.";
const TEMP_SUFFIX: &str = ".tmp";
/// host-local separates container ID and ifname with CRLF; we match it.
const LINE_BREAK: &str = "\r\n";

/// The directory holding a network's allocations: `dataDir` (or the default)
/// joined with the network name (validated by `netconf::parse`).
pub fn network_dir(data_dir: Option<&str>, network: &str) -> PathBuf {
    Path::new(data_dir.unwrap_or(DEFAULT_DATA_DIR)).join(network)
}

/// A locked view of one network's allocation directory. The exclusive lock
/// is held from [`FileStore::open`] until drop, so open it around a whole
/// ADD or DEL and never for longer.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl FileStore {
    /// Creates `dir` if needed, waits for its exclusive lock and removes
    /// temporaries a crashed writer left behind.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let lock = take_lock(&dir.join(LOCK_FILE))?;
        let store = Self { dir, _lock: lock };
        store.remove_stale_temporaries()?;
        Ok(store)
    }

    /// The directory this store manages.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ip_path(&self, ip: IpAddr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    fn last_reserved_path(&self, range_set: usize) -> PathBuf {
        self.dir.join(format!("{LAST_RESERVED_PREFIX}{range_set}"))
    }

    /// Only our own temporaries are touched: names starting with '.' and
    /// ending in `.tmp` can never be an IP or host-local's files.
    fn remove_stale_temporaries(&self) -> Result<(), StoreError> {
        for name in self.file_names()? {
            if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) {
                remove_if_present(&self.dir.join(name))?;
            }
        }
        Ok(())
    }

    fn file_names(&self) -> Result<Vec<String>, StoreError> {
        let entries = fs::read_dir(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.dir, e))?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Write temp, rename: the rename is the commit point.
    fn write_atomically(&self, path: &Path, contents: &str) -> Result<(), StoreError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = self.dir.join(format!(".{name}{TEMP_SUFFIX}"));
        let mut file = File::create(&temp).map_err(|e| io_err(&temp, e))?;
        file.write_all(contents.as_bytes())
            .map_err(|e| io_err(&temp, e))?;
        fs::rename(&temp, path).map_err(|e| io_err(path, e))
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{RECORD_PREFIX}{key}"))
    }

    /// Stores the attachment record `key` (what an ADD built, for DEL, CHECK
    /// and GC).
    pub fn put_record(&self, key: &str, contents: &str) -> Result<(), StoreError> {
        self.write_atomically(&self.record_path(key), contents)
    }

    /// The record `key`, if present.
    pub fn record(&self, key: &str) -> Result<Option<String>, StoreError> {
        let path = self.record_path(key);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    /// Removes the record `key`; absent is fine.
    pub fn remove_record(&self, key: &str) -> Result<(), StoreError> {
        remove_if_present(&self.record_path(key)).map(drop)
    }

    /// Every record as (key, contents).
    pub fn records(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut out = Vec::new();
        for name in self.file_names()? {
            if let Some(key) = name.strip_prefix(RECORD_PREFIX) {
                if let Some(text) = self.record(key)? {
                    out.push((key.to_owned(), text));
                }
            }
        }
        Ok(out)
    }

    fn read_allocation(&self, ip: IpAddr) -> Result<Option<Allocation>, StoreError> {
        let path = self.ip_path(ip);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path, e)),
        };
        Ok(Some(parse_allocation(ip, &text)))
    }
}

/// Files from old host-local versions hold only the container ID; they are
/// kept (never handed out again) with an empty ifname.
fn parse_allocation(ip: IpAddr, text: &str) -> Allocation {
    let (id, ifname) = text.split_once(LINE_BREAK).unwrap_or((text, ""));
    Allocation {
        ip,
        container_id: id.trim().to_owned(),
        ifname: ifname.trim().to_owned(),
    }
}

/// Blocks until the lock is ours; EINTR (a signal during the wait) retries.
fn take_lock(path: &Path) -> Result<Flock<File>, StoreError> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(lock) => return Ok(lock),
            Err((back, Errno::EINTR)) => file = back,
            Err((_, source)) => {
                return Err(StoreError::Lock {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

fn remove_if_present(path: &Path) -> Result<bool, StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path, e)),
    }
}

fn io_err(path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Store for FileStore {
    fn is_allocated(&self, ip: IpAddr) -> Result<bool, StoreError> {
        let path = self.ip_path(ip);
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    /// The check-then-rename is race free because the caller holds the lock.
    fn reserve(&mut self, ip: IpAddr, id: &str, ifname: &str) -> Result<bool, StoreError> {
        if self.is_allocated(ip)? {
            return Ok(false);
        }
        let contents = format!("{}{LINE_BREAK}{ifname}", id.trim());
        self.write_atomically(&self.ip_path(ip), &contents)?;
        Ok(true)
    }

    /// The position is only a hint: unreadable contents restart round-robin
    /// at the range start rather than failing the ADD.
    fn last_reserved(&self, range_set: usize) -> Result<Option<IpAddr>, StoreError> {
        let path = self.last_reserved_path(range_set);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text.trim().parse().ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    fn set_last_reserved(&mut self, range_set: usize, ip: IpAddr) -> Result<(), StoreError> {
        self.write_atomically(&self.last_reserved_path(range_set), &ip.to_string())
    }

    fn release_by_id(&mut self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, StoreError> {
        let mut freed = Vec::new();
        for alloc in self.allocations()? {
            if alloc.container_id == id.trim()
                && alloc.ifname == ifname
                && remove_if_present(&self.ip_path(alloc.ip))?
            {
                freed.push(alloc.ip);
            }
        }
        Ok(freed)
    }

    fn allocations(&self) -> Result<Vec<Allocation>, StoreError> {
        let mut out = Vec::new();
        for name in self.file_names()? {
            let Ok(ip) = name.parse::<IpAddr>() else {
                continue;
            };
            out.extend(self.read_allocation(ip)?);
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::ipam;
    use crate::netconf::{self, RangeSet};
    use serde_json::json;
    use std::collections::BTreeSet;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sets(subnet: &str) -> Vec<RangeSet> {
        let conf = json!({
            "cniVersion": "1.1.0", "name": "t", "type": "bosun-cni",
            "ipam": {"subnet": subnet}
        });
        netconf::parse(conf.to_string().as_bytes())
            .unwrap()
            .range_sets()
            .to_vec()
    }

    #[test]
    fn network_dir_defaults_like_host_local() {
        assert_eq!(
            network_dir(None, "pods"),
            PathBuf::from("/var/lib/cni/networks/pods")
        );
        assert_eq!(
            network_dir(Some("/run/ipam"), "pods"),
            PathBuf::from("/run/ipam/pods")
        );
    }

    #[test]
    fn reserve_writes_host_local_file_format() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("net");
        let mut store = FileStore::open(&dir).unwrap();
        assert!(store.reserve(ip("10.0.0.5"), "c1", "eth0").unwrap());
        assert!(!store.reserve(ip("10.0.0.5"), "c2", "eth0").unwrap());
        assert!(store.reserve(ip("fd00::5"), "c1", "eth1").unwrap());
        assert_eq!(
            fs::read_to_string(dir.join("10.0.0.5")).unwrap(),
            "c1\r\neth0"
        );
        assert!(store.is_allocated(ip("fd00::5")).unwrap());
        assert!(!store.is_allocated(ip("10.0.0.6")).unwrap());
        assert!(dir.join("lock").exists());
        let names: Vec<String> = store
            .allocations()
            .unwrap()
            .into_iter()
            .map(|a| a.ifname)
            .collect();
        assert_eq!(names, vec!["eth0", "eth1"]);
    }

    #[test]
    fn last_reserved_survives_reopen_and_tolerates_garbage() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let mut store = FileStore::open(tmp.path()).unwrap();
            assert_eq!(store.last_reserved(0).unwrap(), None);
            store.set_last_reserved(0, ip("10.0.0.9")).unwrap();
        }
        assert_eq!(
            fs::read_to_string(tmp.path().join("last_reserved_ip.0")).unwrap(),
            "10.0.0.9"
        );
        let store = FileStore::open(tmp.path()).unwrap();
        assert_eq!(store.last_reserved(0).unwrap(), Some(ip("10.0.0.9")));
        fs::write(tmp.path().join("last_reserved_ip.1"), "not an ip").unwrap();
        assert_eq!(store.last_reserved(1).unwrap(), None);
    }

    #[test]
    fn release_by_id_matches_id_and_ifname_only() {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = FileStore::open(tmp.path()).unwrap();
        store.reserve(ip("10.0.0.2"), "c1", "eth0").unwrap();
        store.reserve(ip("10.0.0.3"), "c1", "net1").unwrap();
        store.reserve(ip("10.0.0.4"), "c2", "eth0").unwrap();
        assert_eq!(
            store.release_by_id("c1", "eth0").unwrap(),
            vec![ip("10.0.0.2")]
        );
        assert_eq!(
            store.release_by_id("c1", "eth0").unwrap(),
            Vec::<IpAddr>::new()
        );
        let left: Vec<IpAddr> = store
            .allocations()
            .unwrap()
            .into_iter()
            .map(|a| a.ip)
            .collect();
        assert_eq!(left, vec![ip("10.0.0.3"), ip("10.0.0.4")]);
    }

    #[test]
    fn crash_leftovers_are_cleaned_and_never_count_as_allocations() {
        let tmp = tempfile::tempdir().unwrap();
        // A writer died between create and rename, and an old host-local file.
        fs::write(tmp.path().join(".10.0.0.7.tmp"), "c9\r\n").unwrap();
        fs::write(tmp.path().join("10.0.0.8"), "legacy-id").unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        assert!(!tmp.path().join(".10.0.0.7.tmp").exists());
        assert!(!store.is_allocated(ip("10.0.0.7")).unwrap());
        assert_eq!(
            store.allocations().unwrap(),
            vec![Allocation {
                ip: ip("10.0.0.8"),
                container_id: "legacy-id".into(),
                ifname: String::new(),
            }]
        );
    }

    #[test]
    fn continues_round_robin_from_a_host_local_directory() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("10.0.0.2"), "old\r\neth0").unwrap();
        fs::write(tmp.path().join("last_reserved_ip.0"), "10.0.0.2").unwrap();
        let sets = sets("10.0.0.0/24");
        let mut store = FileStore::open(tmp.path()).unwrap();
        let got = ipam::allocate(&mut store, &sets, "new", "eth0", &[]).unwrap();
        assert_eq!(got[0].address.to_string(), "10.0.0.3/24");
    }

    #[test]
    fn allocation_persists_and_re_add_is_idempotent_across_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let sets = sets("10.0.0.0/24");
        let first = ipam::allocate(
            &mut FileStore::open(tmp.path()).unwrap(),
            &sets,
            "c",
            "eth0",
            &[],
        )
        .unwrap();
        let again = ipam::allocate(
            &mut FileStore::open(tmp.path()).unwrap(),
            &sets,
            "c",
            "eth0",
            &[],
        )
        .unwrap();
        assert_eq!(first, again);
        ipam::release(&mut FileStore::open(tmp.path()).unwrap(), "c", "eth0").unwrap();
        assert!(FileStore::open(tmp.path())
            .unwrap()
            .allocations()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn lock_is_exclusive_while_store_is_open() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        let other = File::open(tmp.path().join(LOCK_FILE)).unwrap();
        let (other, err) = Flock::lock(other, FlockArg::LockExclusiveNonblock).unwrap_err();
        assert_eq!(err, Errno::EWOULDBLOCK);
        drop(store);
        Flock::lock(other, FlockArg::LockExclusiveNonblock).unwrap();
    }

    #[test]
    fn concurrent_allocators_get_distinct_addresses() {
        const PER_THREAD: usize = 25;
        let tmp = tempfile::tempdir().unwrap();
        let sets = sets("10.0.0.0/24");
        let got: Vec<IpAddr> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..2)
                .map(|t| {
                    let (dir, sets) = (tmp.path(), &sets);
                    scope.spawn(move || {
                        (0..PER_THREAD)
                            .map(|n| {
                                let mut store = FileStore::open(dir).unwrap();
                                let id = format!("t{t}-c{n}");
                                ipam::allocate(&mut store, sets, &id, "eth0", &[]).unwrap()[0]
                                    .address
                                    .addr()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        let distinct: BTreeSet<IpAddr> = got.iter().copied().collect();
        assert_eq!(distinct.len(), 2 * PER_THREAD);
        let store = FileStore::open(tmp.path()).unwrap();
        assert_eq!(store.allocations().unwrap().len(), 2 * PER_THREAD);
    }
}
