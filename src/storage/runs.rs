//! De-duplication runs on disk: the ids a tenant remembered, moved out of
//! memory at a snapshot into one immutable file each (written once, deleted
//! whole), so that memory holds only the ids since the last snapshot and a
//! filter per run (docs/durability.md, "de-duplication runs").
//!
//! A file: a 44-byte header (magic, run id, ids, latest event second, filter
//! length, CRC-32 of the header and the filter), the sorted 128-bit keys, then
//! a trailer (bincode: the `RunFilter` and a fence, the first key of every
//! 256, 1 bit an id), so that reading a run back is one read. Files of the
//! first format, `TLYRUN01`, hold one BinaryFuse16 instead and a fence every
//! 1 024 keys is read from the keys; they are still read. The keys are read
//! only to confirm a filter's "maybe", through the fences kept in memory (one
//! read of at most 4 KiB), and in order by a merge.
//! Owns: the format, writing (fsync, rename, fsync of the directory, before any
//! snapshot lists the run), merging runs into one (`<id>.merge` until the
//! caller commits it), reading back, and deleting runs no snapshot lists.
//! Must not: decide what is a duplicate (`domain::dedup` does).

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::domain::dedup::{
    MergePlan, Run, RunFilter, RunFilterBuilder, RunKeys, RunMeta, SealedIds,
};

const MAGIC: &[u8; 8] = b"TLYRUN02";
/// The first format: one BinaryFuse16 for the whole run (`RunFilter::Legacy`).
const MAGIC_SINGLE_FILTER: &[u8; 8] = b"TLYRUN01";
const HEADER_BYTES: u64 = 44;
const FENCE_EVERY: usize = 256;
/// Fences of the first format, read from the keys.
const FENCE_EVERY_SINGLE_FILTER: usize = 1024;

/// What follows the keys.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Trailer {
    filter: RunFilter,
    fences: Vec<u128>,
}
/// The largest filter read back (a run of about 2^31 ids).
const FILTER_BYTES_MAX: u64 = 1 << 33;

/// The directory of a tenant's runs.
pub fn runs_dir(data_dir: &Path, tenant: &str) -> PathBuf {
    data_dir.join("dedup").join(tenant)
}

fn run_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.run"))
}

fn merge_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.merge"))
}

fn header(magic: &[u8; 8], meta: &RunMeta, filter_len: u64) -> [u8; 40] {
    let mut header = [0u8; 40];
    header[0..8].copy_from_slice(magic);
    header[8..16].copy_from_slice(&meta.id.to_le_bytes());
    header[16..24].copy_from_slice(&meta.ids.to_le_bytes());
    header[24..32].copy_from_slice(&meta.max_second.to_le_bytes());
    header[32..40].copy_from_slice(&filter_len.to_le_bytes());
    header
}

/// Writes `set` as a run file in `dir`, durable before it returns.
pub fn write_run(dir: &Path, set: &SealedIds) -> Result<Run, String> {
    let keys = set.sorted_keys();
    let trailer = Trailer {
        filter: RunFilter::build(&keys),
        fences: keys.iter().step_by(FENCE_EVERY).copied().collect(),
    };
    let filter_bytes = bincode::serialize(&trailer).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let header = header(MAGIC, &set.meta, filter_bytes.len() as u64);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(&filter_bytes);
    let path = run_path(dir, set.meta.id);
    let temporary = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::io::BufWriter::with_capacity(1 << 20, File::create(&temporary)?);
        file.write_all(&header)?;
        file.write_all(&crc.clone().finalize().to_le_bytes())?;
        for key in &keys {
            file.write_all(&key.to_le_bytes())?;
        }
        file.write_all(&filter_bytes)?;
        file.into_inner()?.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("{}: {e}", path.display()))?;
    let keys = FileKeys::open(&path, set.meta.ids, trailer.fences, FENCE_EVERY)?;
    Ok(Run::new(set.meta, trailer.filter, Arc::new(keys)))
}

/// A merge written to `<id>.merge`, not yet a run.
#[derive(Debug)]
pub struct Merged {
    pub meta: RunMeta,
    trailer: Trailer,
}

/// Keys of one input, read in blocks.
struct Cursor<'a> {
    run: &'a Run,
    next: u64,
    keys: Vec<u128>,
    at: usize,
}

impl Cursor<'_> {
    const BLOCK_KEYS: usize = 8192;

    fn peek(&mut self) -> Result<Option<u128>, String> {
        if self.at == self.keys.len() {
            self.keys.clear();
            self.at = 0;
            let count = (self.run.meta.ids - self.next).min(Self::BLOCK_KEYS as u64) as usize;
            if count == 0 {
                return Ok(None);
            }
            self.run.keys().read(self.next, count, &mut self.keys)?;
            if self.keys.len() != count {
                return Err(format!("run {}: short read of its keys", self.run.meta.id));
            }
            self.next += count as u64;
        }
        Ok(Some(self.keys[self.at]))
    }
}

/// Merges `plan`'s runs into `<id>.merge` in `dir` (durable when it returns;
/// `commit_merge` makes it a run): their keys in order, each once, and a new
/// filter, built one part at a time. Reads the inputs through their open
/// files, so a run deleted meanwhile is still read whole. `None` when
/// `cancelled` said stop (the node is stopping); the partial file is removed.
pub fn merge_runs(
    dir: &Path,
    plan: &MergePlan,
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<Merged>, String> {
    let path = merge_path(dir, plan.id);
    let result = write_merge(&path, plan, cancelled);
    if !matches!(result, Ok(Some(_))) {
        let _ = std::fs::remove_file(&path);
    }
    result.map_err(|e| format!("{}: {e}", path.display()))
}

/// Keys a merge writes between writebacks it starts (16 MiB).
const WRITEBACK_KEYS: u64 = 1 << 20;

/// Asks the kernel to start writing `len` bytes of `file` at `offset` to the
/// disk, without waiting: a merge's gigabyte then reaches the disk as it is
/// written rather than in one burst at its fsync (or when the dirty pages
/// pass the kernel's threshold), which the log's flushes queued behind
/// (docs/BENCHMARKS.md, sixth session). A refusal only leaves the pages to
/// the fsync.
fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: the descriptor is open for the whole call (`file` is
        // borrowed); SYNC_FILE_RANGE_WRITE only starts writeback of the range
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

fn write_merge(
    path: &Path,
    plan: &MergePlan,
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<Merged>, String> {
    let io = |e: std::io::Error| e.to_string();
    let ids_max: u64 = plan.inputs.iter().map(|run| run.meta.ids).sum();
    let mut cursors: Vec<Cursor> = plan
        .inputs
        .iter()
        .map(|run| Cursor {
            run,
            next: 0,
            keys: Vec::new(),
            at: 0,
        })
        .collect();
    let file = File::create(path).map_err(io)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, &file);
    out.write_all(&[0u8; HEADER_BYTES as usize]).map_err(io)?;
    let mut builder = RunFilterBuilder::new(ids_max);
    let mut fences = Vec::with_capacity((ids_max as usize).div_ceil(FENCE_EVERY));
    let mut written: u64 = 0;
    let mut writeback_from: u64 = 0;
    let mut last: Option<u128> = None;
    loop {
        // the smallest next key of the inputs (a plain scan: at most MERGE_FANIN)
        let mut smallest: Option<(usize, u128)> = None;
        for (index, cursor) in cursors.iter_mut().enumerate() {
            if let Some(key) = cursor.peek()? {
                if smallest.is_none_or(|(_, best)| key < best) {
                    smallest = Some((index, key));
                }
            }
        }
        let Some((index, key)) = smallest else { break };
        cursors[index].at += 1;
        if last == Some(key) {
            continue;
        }
        last = Some(key);
        if written % FENCE_EVERY as u64 == 0 {
            fences.push(key);
            if written % (64 * FENCE_EVERY as u64) == 0 && cancelled() {
                return Ok(None);
            }
        }
        out.write_all(&key.to_le_bytes()).map_err(io)?;
        builder.push(key);
        written += 1;
        if written % WRITEBACK_KEYS == 0 {
            out.flush().map_err(io)?;
            let end = HEADER_BYTES + written * 16;
            start_writeback(&file, writeback_from, end - writeback_from);
            writeback_from = end;
        }
    }
    let trailer = Trailer {
        filter: builder.finish(),
        fences,
    };
    let filter_bytes = bincode::serialize(&trailer).map_err(|e| e.to_string())?;
    out.write_all(&filter_bytes).map_err(io)?;
    out.flush().map_err(io)?;
    drop(out);
    let meta = RunMeta {
        id: plan.id,
        ids: written,
        max_second: plan.max_second,
    };
    let header = header(MAGIC, &meta, filter_bytes.len() as u64);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(&filter_bytes);
    file.write_all_at(&header, 0).map_err(io)?;
    file.write_all_at(&crc.finalize().to_le_bytes(), 40)
        .map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(Some(Merged { meta, trailer }))
}

/// Hands every key of `runs` to `insert` (a summary filter's), read in order
/// through their open files (so that a run merged or expired meanwhile is
/// still read whole). False when `cancelled` said stop (the node is stopping).
pub fn cover_runs(
    runs: &[Run],
    cancelled: &dyn Fn() -> bool,
    insert: &mut dyn FnMut(u128),
) -> Result<bool, String> {
    const READ_KEYS: usize = 1 << 16;
    let mut keys = Vec::with_capacity(READ_KEYS);
    for run in runs {
        let mut next: u64 = 0;
        while next < run.meta.ids {
            if cancelled() {
                return Ok(false);
            }
            let count = (run.meta.ids - next).min(READ_KEYS as u64) as usize;
            keys.clear();
            run.keys().read(next, count, &mut keys)?;
            if keys.len() != count {
                return Err(format!("run {}: short read of its keys", run.meta.id));
            }
            for key in &keys {
                insert(*key);
            }
            next += count as u64;
        }
    }
    Ok(true)
}

/// Makes a merge a run (rename, fsync of the directory). The caller must
/// hold off snapshots from deleting unlisted runs until the tenant has the run
/// (so that the next snapshot lists it).
pub fn commit_merge(dir: &Path, merged: Merged) -> Result<Run, String> {
    let path = run_path(dir, merged.meta.id);
    let commit = || -> std::io::Result<()> {
        std::fs::rename(merge_path(dir, merged.meta.id), &path)?;
        File::open(dir)?.sync_all()
    };
    commit().map_err(|e| format!("{}: {e}", path.display()))?;
    let keys = FileKeys::open(&path, merged.meta.ids, merged.trailer.fences, FENCE_EVERY)?;
    Ok(Run::new(merged.meta, merged.trailer.filter, Arc::new(keys)))
}

/// Removes merges a stopped or killed node left unfinished (at start, before
/// any merge runs).
pub fn delete_merges(dir: &Path) -> Result<usize, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(format!("{}: {error}", dir.display())),
    };
    let mut deleted = 0;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().ends_with(".merge") {
            std::fs::remove_file(entry.path()).map_err(|e| e.to_string())?;
            deleted += 1;
        }
    }
    Ok(deleted)
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
    let magic = if &head[0..8] == MAGIC_SINGLE_FILTER {
        MAGIC_SINGLE_FILTER
    } else {
        MAGIC
    };
    if head[0..40] != header(magic, meta, filter_len) {
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
    let unreadable = |e: bincode::Error| format!("{}: filter: {e}", path.display());
    if magic == MAGIC_SINGLE_FILTER {
        let filter =
            bincode::deserialize::<xorf::BinaryFuse16>(&filter_bytes).map_err(unreadable)?;
        let fences = read_fences(&file, meta.ids, FENCE_EVERY_SINGLE_FILTER)
            .map_err(|e| format!("{}: keys: {e}", path.display()))?;
        let keys = FileKeys::open(&path, meta.ids, fences, FENCE_EVERY_SINGLE_FILTER)?;
        return Ok(Run::new(*meta, RunFilter::single(filter), Arc::new(keys)));
    }
    let trailer: Trailer = bincode::deserialize(&filter_bytes).map_err(unreadable)?;
    if trailer.fences.len() != (meta.ids as usize).div_ceil(FENCE_EVERY) {
        return Err(format!("{}: fences do not match its ids", path.display()));
    }
    let keys = FileKeys::open(&path, meta.ids, trailer.fences, FENCE_EVERY)?;
    Ok(Run::new(*meta, trailer.filter, Arc::new(keys)))
}

/// The first key of every `every` keys, read from the keys.
fn read_fences(file: &File, ids: u64, every: usize) -> std::io::Result<Vec<u128>> {
    let mut fences = Vec::with_capacity((ids as usize).div_ceil(every));
    let mut key = [0u8; 16];
    for index in (0..ids).step_by(every) {
        file.read_exact_at(&mut key, HEADER_BYTES + index * 16)?;
        fences.push(u128::from_le_bytes(key));
    }
    Ok(fences)
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
    /// The first key of every block of `every` keys.
    fences: Vec<u128>,
    every: usize,
}

impl FileKeys {
    fn open(path: &Path, ids: u64, fences: Vec<u128>, every: usize) -> Result<FileKeys, String> {
        let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(FileKeys {
            file,
            ids,
            fences,
            every,
        })
    }
}

impl RunKeys for FileKeys {
    fn contains(&self, key: u128) -> Result<bool, String> {
        let block = self.fences.partition_point(|fence| *fence <= key);
        if block == 0 {
            return Ok(false);
        }
        let mut keys = Vec::with_capacity(self.every);
        self.read(((block - 1) * self.every) as u64, self.every, &mut keys)?;
        Ok(keys.binary_search(&key).is_ok())
    }

    fn read(&self, first: u64, count: usize, out: &mut Vec<u128>) -> Result<(), String> {
        let count = (self.ids.saturating_sub(first)).min(count as u64) as usize;
        let mut bytes = vec![0u8; count * 16];
        self.file
            .read_exact_at(&mut bytes, HEADER_BYTES + first * 16)
            .map_err(|e| e.to_string())?;
        out.extend(bytes.chunks_exact(16).map(|chunk| {
            // chunks_exact yields 16-byte chunks
            u128::from_le_bytes(chunk.try_into().unwrap_or([0; 16]))
        }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::dedup::SummaryFilter;

    fn sealed(id: u64, count: u64) -> SealedIds {
        let keys: Vec<u128> = (0..count)
            .map(|n| crate::domain::dedup::id_key(&format!("run-{id}-{n}")))
            .collect();
        SealedIds::new(
            RunMeta {
                id,
                ids: count,
                max_second: 1_763_805_600,
            },
            keys,
        )
    }

    #[test]
    fn a_run_is_written_read_back_and_answers_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let set = sealed(7, 5_000);
        let written = write_run(dir.path(), &set).unwrap();
        let read = read_run(dir.path(), &set.meta).unwrap();
        for run in [&written, &read] {
            assert_eq!(run.meta, set.meta);
            for key in &set.sorted_keys() {
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
        assert!(false_maybes < 80, "{false_maybes}");
    }

    #[test]
    fn a_summary_covers_every_key_of_the_runs_read_from_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let sets: Vec<SealedIds> = (1..=3).map(|id| sealed(id, 70_000 + id * 1_000)).collect();
        let runs: Vec<Run> = sets
            .iter()
            .map(|set| write_run(dir.path(), set).unwrap())
            .collect();
        let ids: u64 = runs.iter().map(|run| run.meta.ids).sum();
        // a stopping node leaves the summary unfinished, and says so
        let summary = SummaryFilter::new(2 * ids);
        let mut insert = |key| summary.insert(key);
        assert!(!cover_runs(&runs, &|| true, &mut insert).unwrap());
        assert!(cover_runs(&runs, &|| false, &mut insert).unwrap());
        for set in &sets {
            assert!(set.sorted_keys().iter().all(|key| summary.maybe(*key)));
        }
        // a run deleted meanwhile is still read whole through its open file;
        // a summary built anew takes plain writes
        std::fs::remove_file(run_path(dir.path(), 2)).unwrap();
        let mut again = SummaryFilter::new(2 * ids);
        assert!(cover_runs(&runs[1..2], &|| false, &mut |key| again
            .insert_unshared(key))
        .unwrap());
        assert!(sets[1].sorted_keys().iter().all(|key| again.maybe(*key)));
    }

    #[test]
    fn merged_runs_hold_every_key_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut all: Vec<u128> = Vec::new();
        let mut inputs = Vec::new();
        for id in 1..=4u64 {
            let mut set = sealed(id, 3_000 + id * 500);
            // a key shared by two inputs is written once
            if id == 2 {
                let mut keys = set.sorted_keys();
                keys.push(inputs_first_key(&inputs));
                let mut meta = set.meta;
                meta.ids += 1;
                set = SealedIds::new(meta, keys);
            }
            all.extend(set.sorted_keys());
            inputs.push(write_run(dir.path(), &set).unwrap());
        }
        all.sort_unstable();
        all.dedup();
        let plan = MergePlan {
            id: 9,
            max_second: 1_763_805_700,
            inputs,
        };
        // a stopping node leaves no merge behind
        assert!(merge_runs(dir.path(), &plan, &|| true).unwrap().is_none());
        assert!(!merge_path(dir.path(), 9).exists());

        let merged = merge_runs(dir.path(), &plan, &|| false).unwrap().unwrap();
        assert_eq!(merged.meta.ids, all.len() as u64);
        // an unfinished merge is never read as a run, and goes at start
        assert!(!run_path(dir.path(), 9).exists());
        let run = commit_merge(dir.path(), merged).unwrap();
        let read = read_run(dir.path(), &run.meta).unwrap();
        let mut keys = Vec::new();
        read.keys().read(0, usize::MAX, &mut keys).unwrap();
        assert_eq!(keys, all);
        for key in &all {
            assert!(run.contains(*key).unwrap() && read.contains(*key).unwrap());
        }
        for n in 0..20_000 {
            let key = crate::domain::dedup::id_key(&format!("other-{n}"));
            assert!(!read.contains(key).unwrap());
        }
        std::fs::write(merge_path(dir.path(), 11), b"partial").unwrap();
        assert_eq!(delete_merges(dir.path()).unwrap(), 1);
    }

    fn inputs_first_key(inputs: &[Run]) -> u128 {
        let mut keys = Vec::new();
        inputs[0].keys().read(0, 1, &mut keys).unwrap();
        keys[0]
    }

    #[test]
    fn a_run_of_the_first_format_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let set = sealed(5, 2_000);
        let mut folded: Vec<u64> = set
            .sorted_keys()
            .iter()
            .map(|key| crate::domain::dedup::fold_key(*key))
            .collect();
        folded.sort_unstable();
        let filter = xorf::BinaryFuse16::try_from(&folded).unwrap();
        let filter_bytes = bincode::serialize(&filter).unwrap();
        let head = header(MAGIC_SINGLE_FILTER, &set.meta, filter_bytes.len() as u64);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(&filter_bytes);
        let mut bytes = head.to_vec();
        bytes.extend(crc.finalize().to_le_bytes());
        for key in &set.sorted_keys() {
            bytes.extend(key.to_le_bytes());
        }
        bytes.extend(&filter_bytes);
        std::fs::write(run_path(dir.path(), 5), bytes).unwrap();
        let run = read_run(dir.path(), &set.meta).unwrap();
        assert!(set
            .sorted_keys()
            .iter()
            .all(|key| run.contains(*key).unwrap()));
        assert!(!run
            .contains(crate::domain::dedup::id_key("absent"))
            .unwrap());
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
