//! Persistent records of sandboxes and containers: one JSON file each,
//! written temp + rename, loaded back when the daemon starts. They are the
//! daemon's memory across restarts; the kernel and the monitors are the
//! truth it reconciles them with.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A failed record write or read.
#[derive(Debug, thiserror::Error)]
#[error("record {path}: {source}")]
pub struct RecordError {
    /// The file.
    pub path: PathBuf,
    /// What failed.
    #[source]
    pub source: io::Error,
}

/// Anything kept by ID.
pub trait Keyed {
    /// The record's ID (file name).
    fn id(&self) -> &str;
}

/// A directory of records with an in-memory copy.
#[derive(Debug)]
pub struct Records<T> {
    dir: PathBuf,
    items: BTreeMap<String, T>,
}

fn err(path: &Path, source: io::Error) -> RecordError {
    RecordError {
        path: path.to_owned(),
        source,
    }
}

impl<T: Keyed + Serialize + DeserializeOwned + Clone> Records<T> {
    /// Loads every record in `dir` (created if missing). Unreadable records
    /// are skipped with a warning rather than stopping the daemon.
    pub fn load(dir: &Path) -> Result<Self, RecordError> {
        fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
        let mut items = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(|e| err(dir, e))? {
            let path = entry.map_err(|e| err(dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()))
            {
                Ok(item) => {
                    items.insert(item.id().to_owned(), item);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable record")
                }
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            items,
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Stores (or replaces) a record, on disk first.
    pub fn put(&mut self, item: T) -> Result<(), RecordError> {
        let path = self.path(item.id());
        let temp = self.dir.join(format!(".{}.json.tmp", item.id()));
        let bytes = serde_json::to_vec(&item).map_err(|e| err(&path, io::Error::other(e)))?;
        fs::write(&temp, bytes).map_err(|e| err(&temp, e))?;
        fs::rename(&temp, &path).map_err(|e| err(&path, e))?;
        self.items.insert(item.id().to_owned(), item);
        Ok(())
    }

    /// Forgets a record; absent is fine.
    pub fn remove(&mut self, id: &str) -> Result<(), RecordError> {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&path, e)),
        }
        self.items.remove(id);
        Ok(())
    }

    /// The record `id`.
    pub fn get(&self, id: &str) -> Option<&T> {
        self.items.get(id)
    }

    /// Resolves a full ID or a unique prefix of one, as crictl allows.
    pub fn resolve(&self, id_or_prefix: &str) -> Option<&T> {
        if id_or_prefix.is_empty() {
            return None;
        }
        if let Some(item) = self.items.get(id_or_prefix) {
            return Some(item);
        }
        let mut matches = self
            .items
            .range(id_or_prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(id_or_prefix));
        match (matches.next(), matches.next()) {
            (Some((_, item)), None) => Some(item),
            _ => None,
        }
    }

    /// All records.
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.items.values()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Thing {
        id: String,
        n: u32,
    }

    impl Keyed for Thing {
        fn id(&self) -> &str {
            &self.id
        }
    }

    fn thing(id: &str, n: u32) -> Thing {
        Thing { id: id.into(), n }
    }

    #[test]
    fn records_survive_a_reload_and_junk_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut records = Records::<Thing>::load(dir.path()).unwrap();
        records.put(thing("abc1", 1)).unwrap();
        records.put(thing("abd2", 2)).unwrap();
        records.put(thing("abc1", 3)).unwrap();
        fs::write(dir.path().join("broken.json"), "{").unwrap();
        let again = Records::<Thing>::load(dir.path()).unwrap();
        assert_eq!(again.all().count(), 2);
        assert_eq!(again.get("abc1").unwrap().n, 3);
        let mut again = again;
        again.remove("abc1").unwrap();
        again.remove("abc1").unwrap();
        assert!(Records::<Thing>::load(dir.path())
            .unwrap()
            .get("abc1")
            .is_none());
    }

    #[test]
    fn prefixes_resolve_only_when_unique() {
        let dir = tempfile::tempdir().unwrap();
        let mut records = Records::<Thing>::load(dir.path()).unwrap();
        records.put(thing("abc1", 1)).unwrap();
        records.put(thing("abd2", 2)).unwrap();
        assert_eq!(records.resolve("abc").unwrap().n, 1);
        assert_eq!(records.resolve("abd2").unwrap().n, 2);
        assert!(records.resolve("ab").is_none());
        assert!(records.resolve("").is_none());
        assert!(records.resolve("x").is_none());
    }
}
