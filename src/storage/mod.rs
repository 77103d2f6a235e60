//! Durable storage behind one small trait, so that the engine (sled 0.34.7 today)
//! can be replaced and faults injected in tests.
//! Owns: spaces of sorted keys (the write-ahead log, snapshots, the quarantine),
//! the envelope every value is stored in, group commit (`commit`), snapshots and
//! recovery (`snapshot`, `recovery`).
//! Must not: retry a failed flush (a failure poisons the store; the node restarts
//! cleanly instead), or be called from the actor threads for anything slow.

pub mod commit;
pub mod envelope;
pub mod outbox;
pub mod recovery;
pub mod runs;
pub mod snapshot;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A space of sorted keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    /// Accepted batches, keyed by LSN (big-endian u64).
    Wal,
    /// Snapshot parts and manifests, keyed by snapshot id then part.
    Snapshot,
    /// Quarantined events, keyed by tenant id, a 0 byte, then qid (big-endian).
    Quarantine,
    /// Alert rules set through the API, keyed by tenant id, a 0 byte, rule id.
    Rules,
    /// Experiments, keyed by tenant id, a 0 byte, experiment id.
    Experiments,
    /// Alert and signal records, keyed by tenant, topic and seq (`outbox`).
    Outbox,
    /// Small facts about the store itself (the log floor).
    Meta,
    /// The audit trail, keyed by seq (big-endian u64; `audit`).
    Audit,
    /// The windows' history in chunks of a minute, keyed by tenant, metric,
    /// first second and the snapshot that wrote it (`snapshot::history_key`).
    History,
}

impl Space {
    fn tree_name(self) -> &'static str {
        match self {
            Space::Wal => "wal",
            Space::Snapshot => "snapshot",
            Space::Quarantine => "quarantine",
            Space::Rules => "rules",
            Space::Experiments => "experiments",
            Space::Outbox => "outbox",
            Space::Meta => "meta",
            Space::Audit => "audit",
            Space::History => "history",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        space: Space,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Remove {
        space: Space,
        key: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    #[error("storage failed: {0}")]
    Io(String),
    #[error("storage failed earlier; the node must restart")]
    Poisoned,
}

/// The storage engine. Writes are not durable until `flush` returns Ok.
pub trait Store: Send + Sync + 'static {
    fn apply(&self, ops: &[Op]) -> Result<(), StorageError>;
    fn flush(&self) -> Result<(), StorageError>;
    /// Visits the entries with key ≥ `from`, in key order, while `visit` says true.
    fn scan(
        &self,
        space: Space,
        from: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError>;
    fn last_key(&self, space: Space) -> Result<Option<Vec<u8>>, StorageError>;
}

pub type SharedStore = Arc<dyn Store>;

/// sled 0.34.7, one tree per space.
pub struct SledStore {
    db: sled::Db,
    trees: [sled::Tree; 9],
}

fn io(error: sled::Error) -> StorageError {
    StorageError::Io(error.to_string())
}

impl SledStore {
    /// Opens with sled's default cache (1 GiB).
    pub fn open(path: &Path) -> Result<SledStore, StorageError> {
        SledStore::open_with_cache(path, 1 << 30)
    }

    /// Opens with a page cache of at most `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<SledStore, StorageError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .segment_size(segment_bytes(path))
            .open()
            .map_err(io)?;
        let trees = [
            db.open_tree(Space::Wal.tree_name()).map_err(io)?,
            db.open_tree(Space::Snapshot.tree_name()).map_err(io)?,
            db.open_tree(Space::Quarantine.tree_name()).map_err(io)?,
            db.open_tree(Space::Rules.tree_name()).map_err(io)?,
            db.open_tree(Space::Experiments.tree_name()).map_err(io)?,
            db.open_tree(Space::Outbox.tree_name()).map_err(io)?,
            db.open_tree(Space::Meta.tree_name()).map_err(io)?,
            db.open_tree(Space::Audit.tree_name()).map_err(io)?,
            db.open_tree(Space::History.tree_name()).map_err(io)?,
        ];
        Ok(SledStore { db, trees })
    }

    fn tree(&self, space: Space) -> &sled::Tree {
        match space {
            Space::Wal => &self.trees[0],
            Space::Snapshot => &self.trees[1],
            Space::Quarantine => &self.trees[2],
            Space::Rules => &self.trees[3],
            Space::Experiments => &self.trees[4],
            Space::Outbox => &self.trees[5],
            Space::Meta => &self.trees[6],
            Space::Audit => &self.trees[7],
            Space::History => &self.trees[8],
        }
    }
}

impl Store for SledStore {
    fn apply(&self, ops: &[Op]) -> Result<(), StorageError> {
        for op in ops {
            match op {
                Op::Put { space, key, value } => {
                    self.tree(*space)
                        .insert(key, value.as_slice())
                        .map_err(io)?;
                }
                Op::Remove { space, key } => {
                    self.tree(*space).remove(key).map_err(io)?;
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        // one flush of the db covers every tree
        self.db.flush().map(|_| ()).map_err(io)
    }

    fn scan(
        &self,
        space: Space,
        from: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        for entry in self.tree(space).range(from..) {
            let (key, value) = entry.map_err(io)?;
            if !visit(&key, &value) {
                break;
            }
        }
        Ok(())
    }

    fn last_key(&self, space: Space) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .tree(space)
            .last()
            .map_err(io)?
            .map(|(key, _)| key.to_vec()))
    }
}

/// sled's log segment in a new store. sled writes a value (or a tree page)
/// larger than a quarter of a segment to a file of its own under `blobs/`:
/// with sled's default (512 KiB) that was every log record of a batch of
/// 1 000 events and every page of the log's tree, a file created and deleted
/// per batch on the commit thread, whose cost grew over the first minutes as
/// the filesystem skipped recently deleted inodes (docs/BENCHMARKS.md,
/// "blob files"). At 16 MiB (sled's largest) a record or page up to 4 MiB
/// stays in the log.
const SEGMENT_BYTES_NEW: usize = 16 << 20;
/// sled's default, for a store whose `conf` does not say.
const SEGMENT_BYTES_SLED_DEFAULT: usize = 512 << 10;

/// The segment size to open the store in `path` with: the one it was made
/// with (sled refuses any other), else `SEGMENT_BYTES_NEW`.
fn segment_bytes(path: &Path) -> usize {
    let Ok(conf) = std::fs::read(path.join("conf")) else {
        return SEGMENT_BYTES_NEW;
    };
    // sled's `conf`: lines of `key: value`, then a checksum
    conf.split(|byte| *byte == b'\n')
        .find_map(|line| {
            let value = line.strip_prefix(b"segment_size: ")?;
            std::str::from_utf8(value).ok()?.trim().parse().ok()
        })
        .unwrap_or(SEGMENT_BYTES_SLED_DEFAULT)
}

/// A store that starts failing on command: for tests of storage failure.
pub struct FaultyStore {
    inner: SharedStore,
    /// Flushes that still succeed; `u64::MAX` = never fail.
    flushes_left: AtomicU64,
    failing: AtomicBool,
}

impl FaultyStore {
    pub fn new(inner: SharedStore) -> FaultyStore {
        FaultyStore {
            inner,
            flushes_left: AtomicU64::new(u64::MAX),
            failing: AtomicBool::new(false),
        }
    }

    /// Lets `flushes` more flushes succeed; every later write and flush fails.
    pub fn fail_after_flushes(&self, flushes: u64) {
        self.flushes_left.store(flushes, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StorageError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(StorageError::Io("injected fault".into()))
        } else {
            Ok(())
        }
    }
}

impl Store for FaultyStore {
    fn apply(&self, ops: &[Op]) -> Result<(), StorageError> {
        self.check()?;
        self.inner.apply(ops)
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.check()?;
        let left = self.flushes_left.load(Ordering::SeqCst);
        if left == 0 {
            self.failing.store(true, Ordering::SeqCst);
            return Err(StorageError::Io("injected fault".into()));
        }
        if left != u64::MAX {
            self.flushes_left.store(left - 1, Ordering::SeqCst);
        }
        self.inner.flush()
    }

    fn scan(
        &self,
        space: Space,
        from: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        self.inner.scan(space, from, visit)
    }

    fn last_key(&self, space: Space) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.last_key(space)
    }
}

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
pub fn disk_free_bytes(path: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The key (in `Space::Meta`) of the log floor: every record at or below it has
/// been pruned, so recovery must start from a snapshot that covers it.
pub const WAL_FLOOR_KEY: &[u8] = b"wal_floor";

/// The value stored at exactly `key`, if any.
pub fn read_value(
    store: &dyn Store,
    space: Space,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StorageError> {
    let mut found = None;
    store.scan(space, key, &mut |found_key, value| {
        if found_key == key {
            found = Some(value.to_vec());
        }
        false
    })?;
    Ok(found)
}

/// True when `key` is stored, without copying its value (a snapshot part can
/// be tens of megabytes).
pub fn has_value(store: &dyn Store, space: Space, key: &[u8]) -> Result<bool, StorageError> {
    let mut found = false;
    store.scan(space, key, &mut |found_key, _| {
        found = found_key == key;
        false
    })?;
    Ok(found)
}

/// The log floor (0 when nothing was pruned).
pub fn wal_floor(store: &dyn Store) -> Result<u64, StorageError> {
    Ok(read_value(store, Space::Meta, WAL_FLOOR_KEY)?
        .as_deref()
        .and_then(key_lsn)
        .unwrap_or(0))
}

/// The key of a WAL record.
pub fn lsn_key(lsn: u64) -> [u8; 8] {
    lsn.to_be_bytes()
}

pub fn key_lsn(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

/// The key of a quarantined event.
pub fn quarantine_key(tenant: &str, qid: u64) -> Vec<u8> {
    let mut key = tenant_prefix(tenant);
    key.extend_from_slice(&qid.to_be_bytes());
    key
}

/// The key of a tenant's next qid (not 8 bytes after the prefix, so it is
/// never read as an entry).
pub fn quarantine_next_key(tenant: &str) -> Vec<u8> {
    let mut key = tenant_prefix(tenant);
    key.extend_from_slice(b"next");
    key
}

/// Every per-tenant key starts with the tenant id and a 0 byte (ids never hold
/// one), so one tenant's keys are one contiguous range.
pub fn tenant_prefix(tenant: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(tenant.len() + 17);
    key.extend_from_slice(tenant.as_bytes());
    key.push(0);
    key
}

/// The key of a rule or an experiment of a tenant.
pub fn named_key(tenant: &str, name: &str) -> Vec<u8> {
    let mut key = tenant_prefix(tenant);
    key.extend_from_slice(name.as_bytes());
    key
}

/// Opens the store at `path` again in the same process: sled's flusher
/// thread may hold the file lock a moment after the last handle is dropped
/// (a restarted node is a new process, so only tests reopen like this).
#[cfg(test)]
pub(crate) fn reopen(path: &Path) -> Result<SledStore, StorageError> {
    let mut opened = SledStore::open(path);
    for _ in 0..100 {
        match &opened {
            Err(StorageError::Io(error)) if error.contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20));
                opened = SledStore::open(path);
            }
            _ => break,
        }
    }
    opened
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_keeps_the_segment_size_it_was_made_with() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(segment_bytes(dir.path()), SEGMENT_BYTES_NEW);
        // a store made by an earlier build, with sled's default segment
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            db.insert(b"k", b"v".as_slice()).unwrap();
            db.flush().unwrap();
        }
        assert_eq!(segment_bytes(dir.path()), SEGMENT_BYTES_SLED_DEFAULT);
        assert!(
            reopen(dir.path()).is_ok(),
            "the old store opens with its own segment"
        );
        let fresh = tempfile::tempdir().unwrap();
        drop(SledStore::open(fresh.path()).unwrap());
        assert_eq!(segment_bytes(fresh.path()), SEGMENT_BYTES_NEW);
    }

    #[test]
    fn a_log_record_of_a_large_batch_stays_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        // about what a batch of 1 000 events takes, and a leaf's worth of them
        for lsn in 0..32u64 {
            store
                .apply(&[Op::Put {
                    space: Space::Wal,
                    key: lsn_key(lsn).to_vec(),
                    value: vec![lsn as u8; 140_000],
                }])
                .unwrap();
        }
        store.flush().unwrap();
        let blobs = std::fs::read_dir(dir.path().join("blobs"))
            .map(|entries| entries.count())
            .unwrap_or(0);
        assert_eq!(blobs, 0, "no record went to a file of its own");
        assert_eq!(
            read_value(&store, Space::Wal, &lsn_key(31)).unwrap(),
            Some(vec![31u8; 140_000])
        );
    }

    #[test]
    fn sled_store_keeps_what_it_flushed_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store
                .apply(&[
                    Op::Put {
                        space: Space::Wal,
                        key: lsn_key(2).to_vec(),
                        value: b"b".to_vec(),
                    },
                    Op::Put {
                        space: Space::Wal,
                        key: lsn_key(1).to_vec(),
                        value: b"a".to_vec(),
                    },
                    Op::Put {
                        space: Space::Quarantine,
                        key: quarantine_key("demo", 1),
                        value: b"q".to_vec(),
                    },
                ])
                .unwrap();
            store.flush().unwrap();
        }
        let store = reopen(dir.path()).unwrap();
        let mut seen = Vec::new();
        store
            .scan(Space::Wal, &[], &mut |key, value| {
                seen.push((key_lsn(key).unwrap(), value.to_vec()));
                true
            })
            .unwrap();
        assert_eq!(seen, vec![(1, b"a".to_vec()), (2, b"b".to_vec())]);
        assert_eq!(
            store.last_key(Space::Wal).unwrap(),
            Some(lsn_key(2).to_vec())
        );
        assert_eq!(store.last_key(Space::Snapshot).unwrap(), None);
    }

    #[test]
    fn a_faulty_store_fails_from_the_chosen_flush_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::new(Arc::new(SledStore::open(dir.path()).unwrap()));
        store.fail_after_flushes(1);
        assert!(store.flush().is_ok());
        assert!(store.flush().is_err());
        assert!(store.apply(&[]).is_err());
    }
}
