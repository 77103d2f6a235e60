//! De-duplication runs on disk: the ids a tenant remembered, moved out of
//! memory at a snapshot into one immutable file each (written once, deleted
//! whole), so that memory holds only the ids since the last snapshot and a
//! filter per run (docs/durability.md, "de-duplication runs").
//!
//! A file: a 44-byte header (magic, run id, ids, latest event second, filter
//! length, CRC-32 of the header and the filter), the sorted 128-bit keys, then
//! the filter (bincode). The keys are read only to confirm a filter's "maybe",
//! through a fence every 1 024 keys kept in memory: one read of at most 16 KiB.
//! Owns: the format, writing (fsync, rename, fsync of the directory, before any
//! snapshot lists the run), reading back, and deleting runs no snapshot lists.
//! Must not: decide what is a duplicate (`domain::dedup` does).

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::domain::dedup::{build_filter, Run, RunKeys, RunMeta, SealedIds};

const MAGIC: &[u8; 8] = b"TLYRUN01";
const HEADER_BYTES: u64 = 44;
const FENCE_EVERY: usize = 1024;
/// The largest filter read back (a run of about 2^31 ids).
const FILTER_BYTES_MAX: u64 = 1 << 33;

/// The directory of a tenant's runs.
pub fn runs_dir(data_dir: &Path, tenant: &str) -> PathBuf {
    data_dir.join("dedup").join(tenant)
}

fn run_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.run"))
}

fn header(meta: &RunMeta, filter_len: u64) -> [u8; 40] {
    let mut header = [0u8; 40];
    header[0..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&meta.id.to_le_bytes());
    header[16..24].copy_from_slice(&meta.ids.to_le_bytes());
    header[24..32].copy_from_slice(&meta.max_second.to_le_bytes());
    header[32..40].copy_from_slice(&filter_len.to_le_bytes());
    header
}

/// Writes `set` as a run file in `dir`, durable before it returns.
pub fn write_run(dir: &Path, set: &SealedIds) -> Result<Run, String> {
    let filter = build_filter(&set.keys).ok_or("the run's filter cannot be built")?;
    let filter_bytes = bincode::serialize(&filter).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let header = header(&set.meta, filter_bytes.len() as u64);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(&filter_bytes);
    let path = run_path(dir, set.meta.id);
    let temporary = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::io::BufWriter::with_capacity(1 << 20, File::create(&temporary)?);
        file.write_all(&header)?;
        file.write_all(&crc.clone().finalize().to_le_bytes())?;
        for key in &set.keys {
            file.write_all(&key.to_le_bytes())?;
        }
        file.write_all(&filter_bytes)?;
        file.into_inner()?.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("{}: {e}", path.display()))?;
    let keys = FileKeys::open(&path, set.meta.ids, Some(&set.keys))?;
    Ok(Run::new(set.meta, filter, Arc::new(keys)))
}

/// Reads back the run `meta` lists: its header must agree and its header and
/// filter must pass the checksum.
pub fn read_run(dir: &Path, meta: &RunMeta) -> Result<Run, String> {
    let path = run_path(dir, meta.id);
    let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut head = [0u8; HEADER_BYTES as usize];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| format!("{}: header: {e}", path.display()))?;
    let filter_len = u64::from_le_bytes(head[32..40].try_into().map_err(|_| "header")?);
    if &head[0..8] != MAGIC || head[0..40] != header(meta, filter_len) {
        return Err(format!(
            "{}: header does not match its snapshot",
            path.display()
        ));
    }
    if filter_len > FILTER_BYTES_MAX {
        return Err(format!("{}: filter of {filter_len} bytes", path.display()));
    }
    let mut filter_bytes = vec![0u8; filter_len as usize];
    file.read_exact_at(&mut filter_bytes, HEADER_BYTES + meta.ids * 16)
        .map_err(|e| format!("{}: filter: {e}", path.display()))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[0..40]);
    crc.update(&filter_bytes);
    if crc.finalize().to_le_bytes() != head[40..44] {
        return Err(format!("{}: checksum does not match", path.display()));
    }
    let filter: xorf::BinaryFuse16 = bincode::deserialize(&filter_bytes)
        .map_err(|e| format!("{}: filter: {e}", path.display()))?;
    let keys = FileKeys::open(&path, meta.ids, None)?;
    Ok(Run::new(*meta, filter, Arc::new(keys)))
}

/// Deletes the run files in `dir` that `listed` does not name (runs no kept
/// snapshot lists: expired, or written by a snapshot that did not finish).
pub fn delete_unlisted(dir: &Path, listed: &HashSet<u64>) -> Result<usize, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(format!("{}: {error}", dir.display())),
    };
    let mut deleted = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let id = name
            .strip_suffix(".run")
            .or_else(|| name.strip_suffix(".tmp"))
            .and_then(|id| id.parse::<u64>().ok());
        if let Some(id) = id {
            if !listed.contains(&id) || name.ends_with(".tmp") {
                std::fs::remove_file(entry.path()).map_err(|e| e.to_string())?;
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

/// A run's keys in its file, found through fences kept in memory.
#[derive(Debug)]
struct FileKeys {
    file: File,
    ids: u64,
    /// The first key of every block of `FENCE_EVERY` keys.
    fences: Vec<u128>,
}

impl FileKeys {
    fn open(path: &Path, ids: u64, keys: Option<&[u128]>) -> Result<FileKeys, String> {
        let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut fences = Vec::with_capacity((ids as usize).div_ceil(FENCE_EVERY));
        match keys {
            Some(keys) => fences.extend(keys.iter().step_by(FENCE_EVERY).copied()),
            None => {
                let mut key = [0u8; 16];
                for index in (0..ids).step_by(FENCE_EVERY) {
                    file.read_exact_at(&mut key, HEADER_BYTES + index * 16)
                        .map_err(|e| format!("{}: keys: {e}", path.display()))?;
                    fences.push(u128::from_le_bytes(key));
                }
            }
        }
        Ok(FileKeys { file, ids, fences })
    }
}

impl RunKeys for FileKeys {
    fn contains(&self, key: u128) -> Result<bool, String> {
        let block = self.fences.partition_point(|fence| *fence <= key);
        if block == 0 {
            return Ok(false);
        }
        let first = ((block - 1) * FENCE_EVERY) as u64;
        let count = (self.ids - first).min(FENCE_EVERY as u64) as usize;
        let mut bytes = vec![0u8; count * 16];
        self.file
            .read_exact_at(&mut bytes, HEADER_BYTES + first * 16)
            .map_err(|e| e.to_string())?;
        let keys: Vec<u128> = bytes
            .chunks_exact(16)
            .map(|chunk| {
                // chunks_exact yields 16-byte chunks
                u128::from_le_bytes(chunk.try_into().unwrap_or([0; 16]))
            })
            .collect();
        Ok(keys.binary_search(&key).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(id: u64, count: u64) -> SealedIds {
        let mut keys: Vec<u128> = (0..count)
            .map(|n| crate::domain::dedup::id_key(&format!("run-{id}-{n}")))
            .collect();
        keys.sort_unstable();
        SealedIds {
            meta: RunMeta {
                id,
                ids: count,
                max_second: 1_763_805_600,
            },
            keys,
        }
    }

    #[test]
    fn a_run_is_written_read_back_and_answers_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let set = sealed(7, 5_000);
        let written = write_run(dir.path(), &set).unwrap();
        let read = read_run(dir.path(), &set.meta).unwrap();
        for run in [&written, &read] {
            assert_eq!(run.meta, set.meta);
            for key in &set.keys {
                assert!(run.contains(*key).unwrap());
            }
        }
        // ids never written are never reported, whatever the filter says
        let mut false_maybes = 0;
        for n in 0..20_000 {
            let key = crate::domain::dedup::id_key(&format!("other-{n}"));
            assert!(!read.contains(key).unwrap());
            false_maybes += usize::from(read.filter_maybe(key));
        }
        assert!(false_maybes < 20, "{false_maybes}");
    }

    #[test]
    fn a_damaged_or_mismatched_run_is_refused_and_unlisted_runs_go() {
        let dir = tempfile::tempdir().unwrap();
        let set = sealed(3, 100);
        write_run(dir.path(), &set).unwrap();
        let other = RunMeta {
            ids: 99,
            ..set.meta
        };
        assert!(read_run(dir.path(), &other).is_err());
        let path = run_path(dir.path(), 3);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert!(read_run(dir.path(), &set.meta)
            .unwrap_err()
            .contains("checksum"));
        write_run(dir.path(), &sealed(4, 10)).unwrap();
        let listed: HashSet<u64> = [4].into_iter().collect();
        assert_eq!(delete_unlisted(dir.path(), &listed).unwrap(), 1);
        assert!(read_run(dir.path(), &sealed(4, 10).meta).is_ok());
        assert!(!path.exists());
    }
}
