//! De-duplication and lateness of one tenant's events (docs/architecture.md,
//! invariant 2).
//!
//! Owns: the ids accepted, kept by event second until an event with that time
//! would be `late` anyway (and at least `horizon_s`), so nothing can be counted
//! twice. Lateness is decided by the windows alone: an event is late when it
//! can count in no window now or later (`counts_in_some_window`), so that it
//! agrees with the today window on every day of every time zone, 23- and
//! 25-hour days included (docs/architecture.md, "invariants"). Ids are kept as 128-bit xxh3 hashes (32 bytes a table entry,
//! 16 in the expiry index) rather than strings.
//! Must not: read the clock or evict an id before its horizon: when the table is
//! full the caller must refuse the batch (`ids_free`), never forget.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::time::{counts_in_some_window, second_of_ms, DayBounds, BUCKET_HISTORY_S};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Admission {
    Accepted,
    Duplicate,
    Late,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DedupError {
    #[error("de-duplication table is full ({ids_max} ids)")]
    Full { ids_max: usize },
    /// A run's keys could not be read to confirm a filter's "maybe": the id
    /// is neither accepted nor called a duplicate.
    #[error("a de-duplication run cannot be read: {0}")]
    Unreadable(String),
}

/// Where a run's keys are kept (a file, in the node): confirms a filter's
/// "maybe", so that a false positive never makes a false duplicate, and hands
/// them out in order for a merge.
pub trait RunKeys: Send + Sync + std::fmt::Debug {
    fn contains(&self, key: u128) -> Result<bool, String>;
    /// Appends up to `count` keys from position `first` (ascending) to `out`.
    fn read(&self, first: u64, count: usize, out: &mut Vec<u128>) -> Result<(), String>;
}

/// What a snapshot records of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunMeta {
    pub id: u64,
    pub ids: u64,
    /// The latest event second of its ids: the run is forgotten whole once an
    /// event at this second can count nowhere.
    pub max_second: i64,
}

/// Ids moved out of the table at a snapshot, waiting to be written as a run:
/// the table itself, frozen, still answered from memory until the run is
/// installed. Sorting its keys and building the run's filter is left to
/// whoever writes the run, off the tenant's thread: done at the seal, they
/// stopped the tenant's ingest for 110 to 150 ms each snapshot at full rate
/// (docs/BENCHMARKS.md, "Soak, seventh session").
#[derive(Debug)]
pub struct SealedIds {
    pub meta: RunMeta,
    table: IdTable,
}

impl SealedIds {
    /// The set of `keys` (any order), for tests.
    #[cfg(test)]
    pub fn new(meta: RunMeta, keys: Vec<u128>) -> SealedIds {
        let mut table = IdTable::default();
        for key in keys {
            table.insert(key, meta.max_second);
        }
        SealedIds { meta, table }
    }

    pub fn contains(&self, key: u128) -> bool {
        self.table.contains_key(&key)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The keys in ascending order: a part holds the keys of one range of
    /// top bits, so the parts sorted one by one, in turn, are sorted whole.
    pub fn sorted_keys(&self) -> Vec<u128> {
        let mut keys = Vec::with_capacity(self.table.len());
        for part in &self.table.parts {
            let start = keys.len();
            keys.extend(part.keys().copied());
            keys[start..].sort_unstable();
        }
        keys
    }
}

/// Filter bits an id: a false positive about once in 1 000 to 2 000 lookups
/// (then confirmed against the run's keys), 2 bytes an id in memory.
const FILTER_BITS_PER_ID: u64 = 16;

/// A run's filter in memory: a split-block Bloom filter (as Parquet's and
/// Impala's), 512-bit blocks of eight words, one bit set in each word per
/// key. A lookup reads one cache line; building one sets bits key by key, in
/// any order, in the filter's own memory (a merge of any size needs nothing
/// more). BinaryFuse16 filters (about 18 bits an id, a false positive once in
/// 65 536) cost 83 ns an id to build against 24 for this one, and their
/// lookups, three reads, were no faster on the memory of this machine
/// (docs/BENCHMARKS.md); runs written with one are still read (`Legacy`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RunFilter {
    Blocks(Vec<Block>),
    Legacy(xorf::BinaryFuse16),
}

/// A filter block: eight words on one cache line (aligned, so that a lookup
/// reads one line rather than two), stored as the eight words.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block(pub [u64; 8]);

/// The block of `key` among `blocks` (from its upper half).
fn block_of(blocks: usize, key: u128) -> usize {
    ((((key >> 64) as u64) as u128 * blocks as u128) >> 64) as usize
}

/// The bit `key` sets in each word of its block (six bits each of its lower
/// half).
fn block_bits(key: u128) -> [u64; 8] {
    let mut bits = key as u64;
    let mut masks = [0u64; 8];
    for mask in masks.iter_mut() {
        *mask = 1u64 << (bits & 63);
        bits >>= 6;
    }
    masks
}

impl RunFilter {
    /// The filter of a run of the first format.
    pub fn single(filter: xorf::BinaryFuse16) -> RunFilter {
        RunFilter::Legacy(filter)
    }

    /// The filter of `keys`.
    pub fn build(keys: &[u128]) -> RunFilter {
        let mut builder = RunFilterBuilder::new(keys.len() as u64);
        for key in keys {
            builder.push(*key);
        }
        builder.finish()
    }

    /// True when the filter cannot rule `key` out.
    pub fn maybe(&self, key: u128) -> bool {
        match self {
            RunFilter::Blocks(blocks) => {
                let Some(block) = blocks.get(block_of(blocks.len(), key)) else {
                    return true;
                };
                let mut all = true;
                for (word, mask) in block.0.iter().zip(block_bits(key)) {
                    all &= word & mask == mask;
                }
                all
            }
            RunFilter::Legacy(filter) => {
                use xorf::Filter;
                filter.contains(&fold_key(key))
            }
        }
    }

    /// Memory the filter holds.
    pub fn bytes(&self) -> usize {
        match self {
            RunFilter::Blocks(blocks) => blocks.len() * 64,
            RunFilter::Legacy(filter) => filter.fingerprints.len() * 2,
        }
    }
}

/// Builds a run's filter key by key.
#[derive(Debug)]
pub struct RunFilterBuilder {
    blocks: Vec<Block>,
}

impl RunFilterBuilder {
    /// For a run of about `ids` ids (more only raise its false positives).
    pub fn new(ids: u64) -> RunFilterBuilder {
        let blocks = (ids * FILTER_BITS_PER_ID).div_ceil(512).max(1) as usize;
        RunFilterBuilder {
            blocks: crate::memory::huge_vec(blocks, Block::default),
        }
    }

    pub fn push(&mut self, key: u128) {
        let index = block_of(self.blocks.len(), key);
        // block_of is below the length it is given
        let Some(block) = self.blocks.get_mut(index) else {
            return;
        };
        for (word, mask) in block.0.iter_mut().zip(block_bits(key)) {
            *word |= mask;
        }
    }

    pub fn finish(self) -> RunFilter {
        RunFilter::Blocks(self.blocks)
    }
}

/// Summary filter bits an id at its capacity (`SummaryFilter::ids_max`): a
/// "maybe" once in 40 lookups when full, once in 1 800 when half full; a
/// "maybe" only sends the lookup on to the runs' own filters.
const SUMMARY_BITS_PER_ID: u64 = 8;
/// A tenant's runs get a summary once they are at least this many and hold
/// half a table's ids (`ids_max`): below, probing each run costs little.
pub const SUMMARY_RUNS_MIN: usize = 3;
/// While a new summary is built, the current one takes runs up to its room
/// and this many quarters more: overfilled, it says "maybe" more often
/// (once in 15 lookups a quarter past its room, once in 3 at twice it; a
/// "maybe" asks every run's filter), where a run left out of it is asked by
/// every lookup. A rebuild at 240 M ids took 8 s (6 M ids at full rate,
/// three runs), one at twice the ids about twice that.
pub const SUMMARY_OVERFILL_QUARTERS: u64 = 1;

/// One filter over the ids of many runs (those marked covered), so that a
/// new id costs one lookup whatever the number of runs; the runs' own filters
/// are asked only on its "maybe". The same split-block layout as a run's
/// filter, in atomic words: the indexer sets bits while ingest reads them. A
/// run is marked covered only once every one of its keys is in, so a lookup
/// that reads a bit not yet set is for a run still asked on its own.
/// Expired runs leave their bits behind (only more "maybe"s) until the
/// summary is built anew (`DedupIndex::plan_cover`).
#[derive(Debug)]
pub struct SummaryFilter {
    /// A vector, not a boxed slice: boxing may move it off its huge pages.
    blocks: Vec<AtomicBlock>,
    ids_max: u64,
    /// Held by the one thread adding keys (`writer`), so that adding needs
    /// no locked instructions: readers see a word before or after, both true.
    writing: std::sync::Mutex<()>,
}

#[repr(C, align(64))]
#[derive(Debug, Default)]
struct AtomicBlock([AtomicU64; 8]);

/// The one thread adding keys to a summary (`SummaryFilter::writer`).
pub struct SummaryWriter<'a> {
    blocks: &'a [AtomicBlock],
    _one: std::sync::MutexGuard<'a, ()>,
}

impl SummaryWriter<'_> {
    /// Adds `key`: a load and, where a bit is missing, a plain store (the
    /// only writer, so no bit of another key can be lost in between).
    pub fn insert(&self, key: u128) {
        // block_of is below the length it is given
        let Some(block) = self.blocks.get(block_of(self.blocks.len(), key)) else {
            return;
        };
        for (word, mask) in block.0.iter().zip(block_bits(key)) {
            let bits = word.load(Ordering::Relaxed);
            if bits & mask != mask {
                word.store(bits | mask, Ordering::Relaxed);
            }
        }
    }
}

impl SummaryFilter {
    /// Room for `ids_max` ids at `SUMMARY_BITS_PER_ID`.
    pub fn new(ids_max: u64) -> SummaryFilter {
        let blocks = (ids_max * SUMMARY_BITS_PER_ID).div_ceil(512).max(1) as usize;
        SummaryFilter {
            blocks: crate::memory::huge_vec(blocks, AtomicBlock::default),
            ids_max,
            writing: std::sync::Mutex::new(()),
        }
    }

    pub fn ids_max(&self) -> u64 {
        self.ids_max
    }

    pub fn bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<AtomicBlock>()
    }

    /// Adds `key` (one writer at a time; see `writer`): for tests, which
    /// add a few keys at a time.
    #[cfg(test)]
    pub fn insert(&self, key: u128) {
        self.writer().insert(key);
    }

    /// The right to add keys while other threads look up; a second writer
    /// waits for the first.
    pub fn writer(&self) -> SummaryWriter<'_> {
        SummaryWriter {
            blocks: &self.blocks,
            // a writer that panicked left only bits set: still a valid filter
            _one: self
                .writing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        }
    }

    /// Asks the processor to fetch the block of `key` ahead of a `maybe`.
    pub fn prefetch(&self, key: u128) {
        #[cfg(target_arch = "x86_64")]
        if let Some(block) = self.blocks.get(block_of(self.blocks.len(), key)) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: sse is part of every x86_64 target; a prefetch only
            // hints the cache (of memory the filter owns) and cannot fault
            unsafe { _mm_prefetch::<_MM_HINT_T0>((block as *const AtomicBlock).cast::<i8>()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = key;
    }

    /// Adds `key` to a summary no other thread can see yet (one being built
    /// anew): plain writes, no locked instructions.
    pub fn insert_unshared(&mut self, key: u128) {
        let blocks = self.blocks.len();
        // block_of is below the length it is given
        let Some(block) = self.blocks.get_mut(block_of(blocks, key)) else {
            return;
        };
        for (word, mask) in block.0.iter_mut().zip(block_bits(key)) {
            *word.get_mut() |= mask;
        }
    }

    /// True when no covered run can hold `key` only if this is false. Runs
    /// are marked covered after their keys are in, and the mark reaches a
    /// reader through the actor's message and the published list, which
    /// order the bits before it (Relaxed loads suffice).
    pub fn maybe(&self, key: u128) -> bool {
        let Some(block) = self.blocks.get(block_of(self.blocks.len(), key)) else {
            return true;
        };
        let mut all = true;
        for (word, mask) in block.0.iter().zip(block_bits(key)) {
            all &= word.load(Ordering::Relaxed) & mask == mask;
        }
        all
    }
}

/// The summary filter work a tenant's runs want next (`DedupIndex::plan_cover`).
#[derive(Debug, Clone)]
pub enum CoverPlan {
    /// Add these runs' keys to the current summary.
    Extend {
        summary: Arc<SummaryFilter>,
        runs: Vec<Run>,
    },
    /// Build a new summary of room `ids_max` from every run: the current one
    /// is missing, full, or mostly expired ids.
    Rebuild { ids_max: u64, runs: Vec<Run> },
}

impl CoverPlan {
    pub fn runs(&self) -> &[Run] {
        match self {
            CoverPlan::Extend { runs, .. } | CoverPlan::Rebuild { runs, .. } => runs,
        }
    }
}

/// The runs as their tenant published them for ingest, with the summary
/// over those marked covered.
#[derive(Debug, Clone, Default)]
pub struct RunsView {
    pub runs: Vec<Run>,
    pub summary: Option<Arc<SummaryFilter>>,
}

/// A run on disk: its keys where `keys` keeps them, its filter in memory
/// (about 18 bits an id), confirmed against the keys on a "maybe".
#[derive(Debug, Clone)]
pub struct Run {
    pub meta: RunMeta,
    filter: Arc<RunFilter>,
    keys: Arc<dyn RunKeys>,
    /// Every key is in the index's current summary filter.
    covered: bool,
    /// The runs merged into this one, if it is a merge.
    merged_from: Arc<[u64]>,
}

/// The 64 bits of a key the filters hold.
pub fn fold_key(key: u128) -> u64 {
    (key as u64) ^ ((key >> 64) as u64)
}

impl Run {
    pub fn new(meta: RunMeta, filter: RunFilter, keys: Arc<dyn RunKeys>) -> Run {
        Run {
            meta,
            filter: Arc::new(filter),
            keys,
            covered: false,
            merged_from: Arc::new([]),
        }
    }

    /// True when the summary published with the run holds all its keys.
    pub fn covered(&self) -> bool {
        self.covered
    }

    /// Memory the run holds: its filter.
    pub fn filter_bytes(&self) -> usize {
        self.filter.bytes()
    }

    /// True when the filter cannot rule `key` out.
    pub fn filter_maybe(&self, key: u128) -> bool {
        self.filter.maybe(key)
    }

    /// True when `key` is in the run: the filter, then the keys on a "maybe".
    pub fn contains(&self, key: u128) -> Result<bool, DedupError> {
        if !self.filter_maybe(key) {
            return Ok(false);
        }
        self.keys.contains(key).map_err(DedupError::Unreadable)
    }

    /// The run's keys, for a merge.
    pub fn keys(&self) -> &Arc<dyn RunKeys> {
        &self.keys
    }
}

/// Runs merged into one at a time (size-tiered: four runs of similar size
/// make one four times larger).
pub const MERGE_FANIN: usize = 4;
/// Runs merge only when their latest event seconds lie within this span, so
/// that a merged run, forgotten whole once its latest id is, keeps ids at most
/// this much longer than they need.
pub const MERGE_SPAN_S: i64 = 3 * 3600;
/// A merge makes a run of at most this many tables' worth of ids (`ids_max`;
/// 64 M ids on the shipped table). Behind the summary filter a lookup no
/// longer probes each run, so what merging still buys (fewer files, fewer
/// probes on a "maybe") is not worth rewriting hundreds of millions of ids
/// again: a merge of four 64 M-id runs wrote 4 GiB and took a fifth of the
/// node's CPU while it ran (docs/BENCHMARKS.md).
pub const MERGED_TABLES_MAX: u64 = 16;

/// Runs to merge into one with the reserved `id`.
#[derive(Debug, Clone)]
pub struct MergePlan {
    pub id: u64,
    pub max_second: i64,
    pub inputs: Vec<Run>,
}

/// The key an id is remembered by.
pub fn id_key(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

/// Hashes an id key for the table. The key is already an xxh3 hash, so a
/// keyed multiply of its two halves spreads it; SipHash over it cost about a
/// fifth of de-dup (docs/BENCHMARKS.md, "profile"). The per-process seed keeps
/// a producer from choosing ids that crowd one probe sequence.
#[derive(Debug, Clone, Copy)]
pub struct IdKeyHasherBuilder {
    seed: u64,
}

impl Default for IdKeyHasherBuilder {
    fn default() -> Self {
        // std's RandomState is seeded randomly per process; borrow its randomness
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x7a11_u64);
        IdKeyHasherBuilder { seed: seed | 1 }
    }
}

impl BuildHasher for IdKeyHasherBuilder {
    type Hasher = IdKeyHasher;

    fn build_hasher(&self) -> IdKeyHasher {
        IdKeyHasher {
            seed: self.seed,
            hash: 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct IdKeyHasher {
    seed: u64,
    hash: u64,
}

impl IdKeyHasher {
    fn mix(&mut self, word: u64) {
        // folded 64 x 64 -> 128 multiply, as in wyhash and foldhash
        let product = ((self.hash ^ word ^ self.seed) as u128)
            .wrapping_mul(((0x9e37_79b9_7f4a_7c15_u64 ^ self.seed) | 1) as u128);
        self.hash = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl Hasher for IdKeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        // only u128 keys are hashed here; this keeps any other input correct
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u128(&mut self, value: u128) {
        self.mix(value as u64);
        self.mix((value >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

/// Parts the id table is split into, by the key's top bits (a power of two).
const ID_TABLE_PARTS: usize = 64;
const _: () = assert!(ID_TABLE_PARTS.is_power_of_two() && ID_TABLE_PARTS > 1);

/// Id key → event second, split into parts that grow on their own. One
/// table of millions of ids stalled its tenant for hundreds of milliseconds
/// each time it doubled and rehashed everything (ack p99 212 ms at 250 000
/// events/s, docs/BENCHMARKS.md); a part rehashes a 64th of that.
/// The parts are made with the first id: 64 empty maps are 2.5 KiB, which
/// 10 000 idle tenants would hold for nothing (memory follows traffic).
#[derive(Debug, Clone, Default)]
struct IdTable {
    parts: Vec<HashMap<u128, i64, IdKeyHasherBuilder>>,
    len: usize,
}

impl IdTable {
    fn part(key: u128) -> usize {
        (key >> (128 - ID_TABLE_PARTS.trailing_zeros())) as usize
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn contains_key(&self, key: &u128) -> bool {
        self.parts
            .get(Self::part(*key))
            .is_some_and(|part| part.contains_key(key))
    }

    fn insert(&mut self, key: u128, second: i64) -> Option<i64> {
        if self.parts.is_empty() {
            let hasher = IdKeyHasherBuilder::default();
            // an empty HashMap allocates nothing until its first insert
            self.parts = (0..ID_TABLE_PARTS)
                .map(|_| HashMap::with_hasher(hasher))
                .collect();
        }
        let previous = self.parts[Self::part(key)].insert(key, second);
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    fn remove(&mut self, key: &u128) -> Option<i64> {
        let removed = self.parts.get_mut(Self::part(*key))?.remove(key);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    fn iter(&self) -> impl Iterator<Item = (&u128, &i64)> {
        self.parts.iter().flat_map(|part| part.iter())
    }

    /// An empty table with room in each part for as many ids as this one's
    /// holds: at full rate the next period brings as many, and growing a part
    /// again from nothing rehashed it at every doubling on the tenant's
    /// thread. A tenant whose traffic falls gets less room at the next seal.
    fn with_room_of(&self) -> IdTable {
        if self.parts.is_empty() {
            return IdTable::default();
        }
        let hasher = IdKeyHasherBuilder::default();
        IdTable {
            parts: self
                .parts
                .iter()
                .map(|part| HashMap::with_capacity_and_hasher(part.len(), hasher))
                .collect(),
            len: 0,
        }
    }
}

/// The ids remembered: a table in memory of the ids since the last snapshot,
/// sealed sets on their way to disk, and runs on disk behind filters. Ids
/// leave the table for a run at each snapshot, so memory holds what arrived
/// since (at most `ids_max`) plus about 18 bits an id for the filters.
#[derive(Debug, Clone)]
pub struct DedupIndex {
    seconds_by_id: IdTable,
    ids_by_second: BTreeMap<i64, Vec<u128>>,
    sealed: Vec<Arc<SealedIds>>,
    runs: Vec<Run>,
    /// Over the runs marked covered, once they are enough to want one.
    summary: Option<Arc<SummaryFilter>>,
    /// Ids added to `summary`, expired ones included.
    summary_ids: u64,
    /// A new summary is being built (`plan_rebuild`) and not yet installed
    /// or abandoned: the current one is still extended meanwhile, past its
    /// room (`SUMMARY_OVERFILL_QUARTERS`).
    rebuilding: bool,
    /// Changes whenever `runs` or `summary` does, so that the owner knows
    /// when to publish them again (`check_runs`).
    runs_generation: u64,
    next_run_id: u64,
    horizon_s: i64,
    ids_max: usize,
}

/// What the runs said of an id before its tenant judged it (`check_runs`,
/// off the tenant's thread, over the runs it last published).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prechecked<'a> {
    /// Not checked: the tenant asks every run.
    No,
    /// Not in any of these runs (ids in ascending order): the tenant asks
    /// only the others.
    NotIn(&'a [u64]),
    /// Not in any run the tenant has (`runs_all_in` said the list checked
    /// holds them all): no run is asked.
    InNoRun,
    /// In this run: a duplicate while the tenant still has the run; asked
    /// anew when it has gone (expired, or merged into another).
    In(u64),
}

/// A batch's ids checked against the runs off the tenant's thread: their
/// keys, the runs asked, and which held each key.
#[derive(Debug, Clone, Default)]
pub struct RunsChecked {
    /// The ids of the runs asked, in ascending order.
    pub runs: Vec<u64>,
    pub keys: Vec<u128>,
    pub found: Vec<Option<u64>>,
}

impl RunsChecked {
    /// Checks the ids against the runs of `view`.
    pub fn of<'a>(
        view: &RunsView,
        ids: impl Iterator<Item = &'a str>,
    ) -> Result<RunsChecked, DedupError> {
        let keys: Vec<u128> = ids.map(id_key).collect();
        let found = check_runs(view, &keys)?;
        let mut runs: Vec<u64> = view.runs.iter().map(|run| run.meta.id).collect();
        runs.sort_unstable();
        Ok(RunsChecked { runs, keys, found })
    }
}

/// Which run holds each key, if any, over `view` (a list the tenant
/// published, possibly older than its own). Asks the summary first: a key it
/// rules out is in no covered run, so only the runs not yet covered are
/// probed for it. Probes the filters run by run (a filter's lookups one after
/// another, which the processor overlaps), then confirms each "maybe" against
/// the run's keys.
pub fn check_runs(view: &RunsView, keys: &[u128]) -> Result<Vec<Option<u64>>, DedupError> {
    let mut found: Vec<Option<u64>> = vec![None; keys.len()];
    let summary_maybe: Vec<bool> = match &view.summary {
        Some(summary) => {
            // each lookup is a miss in a filter of hundreds of megabytes:
            // fetched this many keys ahead, the misses overlap
            const AHEAD: usize = 16;
            for key in keys.iter().take(AHEAD) {
                summary.prefetch(*key);
            }
            let mut maybe = Vec::with_capacity(keys.len());
            for (index, key) in keys.iter().enumerate() {
                if let Some(later) = keys.get(index + AHEAD) {
                    summary.prefetch(*later);
                }
                maybe.push(summary.maybe(*key));
            }
            maybe
        }
        None => vec![true; keys.len()],
    };
    for run in &view.runs {
        let covered = run.covered && view.summary.is_some();
        for ((slot, key), maybe) in found.iter_mut().zip(keys).zip(&summary_maybe) {
            if slot.is_none()
                && (*maybe || !covered)
                && run.filter_maybe(*key)
                && run.contains(*key)?
            {
                *slot = Some(run.meta.id);
            }
        }
    }
    Ok(found)
}

impl DedupIndex {
    pub fn new(horizon_s: i64, ids_max: usize) -> Self {
        DedupIndex {
            seconds_by_id: IdTable::default(),
            ids_by_second: BTreeMap::new(),
            sealed: Vec::new(),
            runs: Vec::new(),
            summary: None,
            summary_ids: 0,
            rebuilding: false,
            runs_generation: 0,
            next_run_id: 1,
            horizon_s,
            ids_max,
        }
    }

    /// Ids in the table (not sealed, not in runs).
    pub fn len(&self) -> usize {
        self.seconds_by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seconds_by_id.is_empty()
    }

    /// Most ids the table and the sealed sets may hold together.
    pub fn ids_max(&self) -> usize {
        self.ids_max
    }

    /// Ids in memory: the table and the sealed sets not yet on disk.
    pub fn ids_in_memory(&self) -> usize {
        self.seconds_by_id.len() + self.sealed.iter().map(|set| set.len()).sum::<usize>()
    }

    /// The runs on disk, for a snapshot to list.
    pub fn runs(&self) -> Vec<RunMeta> {
        self.runs.iter().map(|run| run.meta).collect()
    }

    /// Bytes of the runs' filters and of the summary.
    pub fn filter_bytes(&self) -> usize {
        self.runs.iter().map(Run::filter_bytes).sum::<usize>()
            + self.summary.as_ref().map_or(0, |summary| summary.bytes())
    }

    /// What the summary filter wants next, if anything: a new one first
    /// (`plan_rebuild`), else the runs not covered added (`plan_extend`).
    pub fn plan_cover(&mut self) -> Option<CoverPlan> {
        self.plan_rebuild().or_else(|| self.plan_extend())
    }

    /// A new summary of room for twice the ids of every run, when the runs
    /// want one: none yet, the current one too full for the runs not
    /// covered, or mostly expired ids. Marks it under way until it is
    /// installed or abandoned, so that one is built at a time and the
    /// current one is extended meanwhile (`plan_extend`): a rebuild reads
    /// every run's keys (6 GiB at 400 M ids), and the runs written while it
    /// ran, left out of every summary, were each probed by every new id
    /// (docs/BENCHMARKS.md, "Soak, eighth session").
    pub fn plan_rebuild(&mut self) -> Option<CoverPlan> {
        let ids = self.rebuild_wanted()?;
        self.rebuilding = true;
        // what the summary wants changed: published again
        self.runs_generation += 1;
        Some(CoverPlan::Rebuild {
            ids_max: 2 * ids,
            runs: self.runs.clone(),
        })
    }

    /// The runs not yet covered, to add to the current summary, when they
    /// fit in its room (a little past it while a new one is built).
    pub fn plan_extend(&self) -> Option<CoverPlan> {
        if !self.extend_wanted() {
            return None;
        }
        Some(CoverPlan::Extend {
            summary: self.summary.clone()?,
            runs: self
                .runs
                .iter()
                .filter(|run| !run.covered)
                .cloned()
                .collect(),
        })
    }

    /// A rebuild planned will not be installed (it failed or was cancelled).
    pub fn abandon_rebuild(&mut self) {
        self.rebuilding = false;
        self.runs_generation += 1;
    }

    /// True when `plan_cover` has work (without copying the runs into a plan).
    pub fn wants_cover(&self) -> bool {
        self.rebuild_wanted().is_some() || self.extend_wanted()
    }

    /// The ids of every run, when `plan_rebuild` has work.
    fn rebuild_wanted(&self) -> Option<u64> {
        let ids: u64 = self.runs.iter().map(|run| run.meta.ids).sum();
        if self.rebuilding
            || self.runs.len() < SUMMARY_RUNS_MIN
            || ids < (self.ids_max as u64 / 2).max(1)
        {
            return None;
        }
        let Some(summary) = &self.summary else {
            return Some(ids);
        };
        let overfilled = self.summary_ids + self.uncovered_ids() > summary.ids_max();
        (overfilled || self.summary_ids > 4 * ids).then_some(ids)
    }

    /// True when `plan_extend` has work.
    fn extend_wanted(&self) -> bool {
        let Some(summary) = &self.summary else {
            return false;
        };
        let uncovered_ids = self.uncovered_ids();
        let room = if self.rebuilding {
            summary.ids_max() + summary.ids_max() / 4 * SUMMARY_OVERFILL_QUARTERS
        } else {
            summary.ids_max()
        };
        uncovered_ids > 0 && self.summary_ids + uncovered_ids <= room
    }

    fn uncovered_ids(&self) -> u64 {
        self.runs
            .iter()
            .filter(|run| !run.covered)
            .map(|run| run.meta.ids)
            .sum()
    }

    /// `summary` holds every key of the runs `covered` (by id): built anew
    /// when `rebuilt`, else the current one, extended. Runs merged or expired
    /// since the plan are left as they are.
    pub fn install_cover(&mut self, summary: Arc<SummaryFilter>, covered: &[u64], rebuilt: bool) {
        if rebuilt {
            self.rebuilding = false;
            self.summary = Some(summary);
            self.summary_ids = 0;
            for run in &mut self.runs {
                run.covered = false;
            }
        } else if !self
            .summary
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, &summary))
        {
            return;
        }
        // a run merged since the plan holds what its inputs held: covered
        // when they all were (inputs have lower ids than their merged run, so
        // one pass in id order follows merges of merges)
        let mut held: Vec<u64> = covered.to_vec();
        let mut order: Vec<usize> = (0..self.runs.len()).collect();
        order.sort_by_key(|&index| self.runs[index].meta.id);
        for index in order {
            let run = &mut self.runs[index];
            let in_summary = held.contains(&run.meta.id)
                || (rebuilt
                    && !run.merged_from.is_empty()
                    && run.merged_from.iter().all(|input| held.contains(input)));
            if in_summary && !run.covered {
                run.covered = true;
                self.summary_ids += run.meta.ids;
                held.push(run.meta.id);
            }
        }
        self.runs_generation += 1;
    }

    /// The next runs to merge, if any: `MERGE_FANIN` runs of similar size
    /// (the largest at most twice the smallest), the smallest such, whose
    /// latest seconds lie within `MERGE_SPAN_S` and whose ids together are at
    /// most `MERGED_TABLES_MAX` tables. A tenant at full rate writes a run
    /// every two seconds: runs of one size make one four times larger, which
    /// merges with three more of its size, and so on, so the run count grows
    /// with the logarithm of the ids up to the largest merged size, and
    /// linearly (one run a 64 M ids) beyond. Reserves the merged run's id.
    pub fn plan_merge(&mut self) -> Option<MergePlan> {
        let merged_ids_max = MERGED_TABLES_MAX.saturating_mul(self.ids_max as u64);
        let mut runs: Vec<&Run> = self.runs.iter().collect();
        runs.sort_by_key(|run| (run.meta.ids, run.meta.max_second, run.meta.id));
        let chosen = runs.windows(MERGE_FANIN).find(|window| {
            let smallest = window[0].meta.ids;
            let largest = window[MERGE_FANIN - 1].meta.ids;
            let ids: u64 = window.iter().map(|run| run.meta.ids).sum();
            let seconds = window.iter().map(|run| run.meta.max_second);
            let span = seconds.clone().max().unwrap_or(0) - seconds.min().unwrap_or(0);
            largest <= 2 * smallest.max(1) && span <= MERGE_SPAN_S && ids <= merged_ids_max
        })?;
        let plan = MergePlan {
            id: self.next_run_id,
            max_second: chosen
                .iter()
                .map(|run| run.meta.max_second)
                .max()
                .unwrap_or(i64::MIN),
            inputs: chosen.iter().map(|run| (*run).clone()).collect(),
        };
        self.next_run_id += 1;
        Some(plan)
    }

    /// A merged run is durable: it takes its inputs' place (those still
    /// remembered; the merged run holds every key they held).
    pub fn install_merged(&mut self, mut run: Run, inputs: &[u64]) {
        // the merged run holds exactly its inputs' keys: covered when each
        // input still is (one gone since, by expiry, leaves it to be covered)
        let covered = self
            .runs
            .iter()
            .filter(|other| inputs.contains(&other.meta.id))
            .filter(|other| other.covered)
            .count();
        run.covered = covered == inputs.len() && self.summary.is_some();
        run.merged_from = inputs.into();
        self.runs.retain(|other| !inputs.contains(&other.meta.id));
        self.next_run_id = self.next_run_id.max(run.meta.id + 1);
        self.runs.push(run);
        self.runs_generation += 1;
    }

    /// The runs and the summary, to publish for `check_runs`.
    pub fn runs_shared(&self) -> RunsView {
        RunsView {
            runs: self.runs.clone(),
            summary: self.summary.clone(),
        }
    }

    /// Changes whenever the runs do.
    pub fn runs_generation(&self) -> u64 {
        self.runs_generation
    }

    /// Recovery: a run listed by the snapshot, already read back.
    pub fn add_run(&mut self, mut run: Run) {
        run.covered = false;
        self.next_run_id = self.next_run_id.max(run.meta.id + 1);
        self.runs.push(run);
        self.runs_generation += 1;
    }

    /// Moves every id of the table into a sealed set (the snapshot writes it as
    /// a run, then `install`s it); returns every sealed set not yet installed,
    /// this one included. Call after `expire`.
    pub fn seal(&mut self) -> Vec<Arc<SealedIds>> {
        if !self.seconds_by_id.is_empty() {
            let room = self.seconds_by_id.with_room_of();
            let table = std::mem::replace(&mut self.seconds_by_id, room);
            let max_second = self
                .ids_by_second
                .last_key_value()
                .map_or(i64::MIN, |(second, _)| *second);
            let meta = RunMeta {
                id: self.next_run_id,
                ids: table.len() as u64,
                max_second,
            };
            self.next_run_id += 1;
            self.sealed.push(Arc::new(SealedIds { meta, table }));
            self.ids_by_second = BTreeMap::new();
        }
        self.sealed.clone()
    }

    /// The run written from a sealed set is durable and listed by a snapshot:
    /// the set leaves memory.
    pub fn install(&mut self, mut run: Run) {
        run.covered = false;
        let before = self.sealed.len();
        self.sealed.retain(|set| set.meta.id != run.meta.id);
        if self.sealed.len() < before {
            self.runs.push(run);
            self.runs_generation += 1;
        }
    }

    /// True when `key` is remembered anywhere but in the runs `checked`
    /// (which said no already).
    fn known_except(&self, key: u128, checked: &[u64]) -> Result<bool, DedupError> {
        if self.known_in_memory(key) {
            return Ok(true);
        }
        // asked once, and only when a covered run is left to ask: on the
        // actor's one thread, most ids come with every run checked
        let mut summary_maybe: Option<bool> = None;
        for run in &self.runs {
            if checked.binary_search(&run.meta.id).is_ok() {
                continue;
            }
            if run.covered
                && !*summary_maybe.get_or_insert_with(|| {
                    self.summary
                        .as_ref()
                        .is_none_or(|summary| summary.maybe(key))
                })
            {
                continue;
            }
            if run.contains(key)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// True when `key` is in the table or a sealed set.
    fn known_in_memory(&self, key: u128) -> bool {
        self.seconds_by_id.contains_key(&key) || self.sealed.iter().any(|set| set.contains(key))
    }

    /// True when every run the index has is in `ids` (ascending): a key
    /// checked against those runs needs none asked again
    /// (`Prechecked::InNoRun`).
    pub fn runs_all_in(&self, ids: &[u64]) -> bool {
        self.runs
            .iter()
            .all(|run| ids.binary_search(&run.meta.id).is_ok())
    }

    /// Runs not yet covered by the summary filter (each probed on its own).
    pub fn runs_uncovered(&self) -> usize {
        self.runs.iter().filter(|run| !run.covered).count()
    }

    /// Forgets ids whose event second can count in no window at `now_ms` (nor
    /// later) and lies at or before `now - horizon`. `today` is the tenant's
    /// local day at `now_ms`.
    pub fn expire(&mut self, now_ms: i64, today: DayBounds) {
        let now_s = second_of_ms(now_ms);
        // the first second that still counts somewhere, or is within the horizon
        let oldest_kept_s = (now_s - BUCKET_HISTORY_S + 1)
            .min(today.start_s)
            .min(now_s - self.horizon_s + 1);
        while let Some(entry) = self.ids_by_second.first_entry() {
            if *entry.key() >= oldest_kept_s {
                break;
            }
            for key in entry.remove() {
                self.seconds_by_id.remove(&key);
            }
        }
        // sealed sets and runs go whole, once their latest id has
        self.sealed
            .retain(|set| set.meta.max_second >= oldest_kept_s);
        let runs_before = self.runs.len();
        self.runs.retain(|run| run.meta.max_second >= oldest_kept_s);
        if self.runs.len() < runs_before {
            self.runs_generation += 1;
        }
        if self.runs.is_empty() && self.summary.is_some() {
            self.summary = None;
            self.summary_ids = 0;
            self.runs_generation += 1;
        }
    }

    /// Every remembered id with its event second (for snapshots).
    pub fn export(&self) -> Vec<(u128, i64)> {
        let mut entries: Vec<(u128, i64)> =
            self.seconds_by_id.iter().map(|(k, s)| (*k, *s)).collect();
        entries.sort_unstable_by_key(|&(key, second)| (second, key));
        entries
    }

    /// Remembers an id of a record that was accepted before (recovery: the
    /// ids of the snapshot's table, then of the log records past its
    /// position), without judging it or counting it against the cap. False
    /// when it is remembered already (a record the log holds twice).
    ///
    /// Only runs whose latest second is at or after the id's are asked. Such
    /// an id was accepted live once every run the snapshot lists was sealed,
    /// and so found in none of them; or its record is a copy of one accepted
    /// earlier, which put this very id at this very second into the run that
    /// holds it, so that run's latest second is not before it. (An id cannot
    /// sit in a run at an earlier second: to be accepted again the earlier
    /// one must have expired, and then this one, later, would have expired
    /// with it or been `late`.) Asking every run's filter for every replayed
    /// id, with no summary built yet at start, made a restart slower with
    /// each run (docs/durability.md, "De-duplication runs").
    pub fn remember_accepted(&mut self, key: u128, ts_s: i64) -> Result<bool, DedupError> {
        if self.known_in_memory(key) {
            return Ok(false);
        }
        for run in &self.runs {
            if run.meta.max_second >= ts_s && run.contains(key)? {
                return Ok(false);
            }
        }
        self.seconds_by_id.insert(key, ts_s);
        self.ids_by_second.entry(ts_s).or_default().push(key);
        Ok(true)
    }

    /// Forgets an id accepted moments ago whose batch could not be written, so
    /// that its retry is judged anew rather than as a duplicate.
    pub fn forget(&mut self, id: &str) {
        self.forget_key(id_key(id))
    }

    pub fn forget_key(&mut self, key: u128) {
        if let Some(second) = self.seconds_by_id.remove(&key) {
            if let Some(keys) = self.ids_by_second.get_mut(&second) {
                keys.retain(|other| *other != key);
                if keys.is_empty() {
                    self.ids_by_second.remove(&second);
                }
            }
        }
    }

    /// How many more ids fit in memory; call after `expire`.
    pub fn ids_free(&self) -> usize {
        self.ids_max.saturating_sub(self.ids_in_memory())
    }

    /// The outcome `admit` would give, without remembering anything. A known id
    /// is a duplicate even when its time would also make it late.
    pub fn judge(
        &self,
        id: &str,
        ts_ms: i64,
        now_ms: i64,
        today: DayBounds,
    ) -> Result<Admission, DedupError> {
        self.judge_key(id_key(id), ts_ms, now_ms, today, Prechecked::No)
    }

    fn judge_key(
        &self,
        key: u128,
        ts_ms: i64,
        now_ms: i64,
        today: DayBounds,
        prechecked: Prechecked,
    ) -> Result<Admission, DedupError> {
        let known = match prechecked {
            Prechecked::In(run) if self.runs.iter().any(|other| other.meta.id == run) => true,
            Prechecked::InNoRun => self.known_in_memory(key),
            Prechecked::NotIn(checked) => self.known_except(key, checked)?,
            Prechecked::In(_) | Prechecked::No => self.known_except(key, &[])?,
        };
        let ts_s = second_of_ms(ts_ms);
        let now_s = second_of_ms(now_ms);
        Ok(if known {
            Admission::Duplicate
        } else if !counts_in_some_window(ts_s, now_s, today) {
            Admission::Late
        } else {
            Admission::Accepted
        })
    }

    /// Decides one event's outcome and remembers it when accepted.
    /// `today` is the tenant's local day at `now_ms`.
    pub fn admit(
        &mut self,
        id: &str,
        ts_ms: i64,
        now_ms: i64,
        today: DayBounds,
    ) -> Result<Admission, DedupError> {
        self.admit_key(id_key(id), ts_ms, now_ms, today, Prechecked::No)
    }

    /// `admit` of a key, with what the runs said of it beforehand.
    pub fn admit_key(
        &mut self,
        key: u128,
        ts_ms: i64,
        now_ms: i64,
        today: DayBounds,
        prechecked: Prechecked,
    ) -> Result<Admission, DedupError> {
        let judged = self.judge_key(key, ts_ms, now_ms, today, prechecked)?;
        if judged != Admission::Accepted {
            return Ok(judged);
        }
        let ts_s = second_of_ms(ts_ms);
        if self.ids_in_memory() >= self.ids_max {
            return Err(DedupError::Full {
                ids_max: self.ids_max,
            });
        }
        self.seconds_by_id.insert(key, ts_s);
        self.ids_by_second.entry(ts_s).or_default().push(key);
        Ok(Admission::Accepted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: i64 = 1_763_805_600_000;
    const DAY: DayBounds = DayBounds {
        start_s: 1_763_769_600,
        end_s: 1_763_856_000,
    };
    const NEXT_DAY: DayBounds = DayBounds {
        start_s: DAY.end_s,
        end_s: DAY.end_s + 86_400,
    };

    #[test]
    fn the_parted_table_keeps_every_id_once() {
        let mut index = DedupIndex::new(86_400, 100_000);
        for n in 0..10_000 {
            let id = format!("id-{n}");
            assert_eq!(
                index.admit(&id, NOW_MS - (n % 60) * 1000, NOW_MS, DAY),
                Ok(Admission::Accepted)
            );
        }
        assert_eq!(index.len(), 10_000);
        assert_eq!(
            index.admit("id-42", NOW_MS, NOW_MS, DAY),
            Ok(Admission::Duplicate)
        );
        index.forget("id-42");
        index.forget("id-42");
        assert_eq!(index.len(), 9_999);
        let exported = index.export();
        assert_eq!(exported.len(), 9_999);
        assert!(exported.iter().all(|(key, _)| *key != id_key("id-42")));
        // the ids of the oldest second expire, and only they
        let next_day = NEXT_DAY;
        index.expire(NOW_MS + (86_400 - 59) * 1000, next_day);
        assert_eq!(index.len(), 9_999 - 166);
        assert_eq!(index.ids_free(), 100_000 - (9_999 - 166));
    }

    #[test]
    fn second_sighting_is_a_duplicate() {
        let mut index = DedupIndex::new(86_400, 10);
        assert_eq!(
            index.admit("a", NOW_MS, NOW_MS, DAY),
            Ok(Admission::Accepted)
        );
        assert_eq!(
            index.admit("a", NOW_MS, NOW_MS, DAY),
            Ok(Admission::Duplicate)
        );
        assert_eq!(
            index.admit("b", NOW_MS, NOW_MS, DAY),
            Ok(Admission::Accepted)
        );
    }

    #[test]
    fn ids_are_kept_while_their_second_can_count_and_expire_after() {
        // a horizon shorter than the day does not shorten the today window
        let mut index = DedupIndex::new(3_600, 10);
        let early_ms = DAY.start_s * 1000 + 1_000;
        assert_eq!(
            index.admit("a", early_ms, NOW_MS, DAY),
            Ok(Admission::Accepted)
        );
        let late_in_the_day_ms = DAY.end_s * 1000 - 1_000;
        index.expire(late_in_the_day_ms, DAY);
        assert_eq!(index.len(), 1);
        assert_eq!(
            index.admit("a", early_ms, late_in_the_day_ms, DAY),
            Ok(Admission::Duplicate)
        );
        // the next day, 30 minutes on: it counts nowhere, so it is forgotten and late
        let next_day = NEXT_DAY;
        let next_ms = DAY.end_s * 1000 + 1_800_000;
        index.expire(next_ms, next_day);
        assert!(index.is_empty());
        assert_eq!(
            index.admit("a", early_ms, next_ms, next_day),
            Ok(Admission::Late)
        );
    }

    /// Defect 6 (issue 10): with a 24 h horizon, an event stamped 00:20 EDT on
    /// the 25-hour 2025-11-02 in America/New_York that arrived at 23:50 EST was
    /// judged `late` although the today window counts it.
    #[test]
    fn defect_6_lateness_agrees_with_a_25_hour_today() {
        let tz = chrono_tz::America::New_York;
        let event_ms = 1_762_057_200_000; // 2025-11-02 00:20 EDT
        let now_ms = 1_762_145_400_000; // 2025-11-02 23:50 EST
        let today = crate::domain::time::day_bounds(now_ms / 1000, tz);
        assert_eq!(today.start_s, 1_762_056_000);
        assert_eq!(today.end_s - today.start_s, 25 * 3600);
        let mut index = DedupIndex::new(86_400, 10);
        index.expire(now_ms, today);
        assert_eq!(
            index.admit("a", event_ms, now_ms, today),
            Ok(Admission::Accepted)
        );
        // and it is still remembered at the last second of that day
        let last_ms = today.end_s * 1000 - 1;
        index.expire(last_ms, today);
        assert_eq!(
            index.admit("a", event_ms, last_ms, today),
            Ok(Admission::Duplicate)
        );
    }

    #[test]
    fn outside_every_window_is_late() {
        let mut index = DedupIndex::new(86_400, 10);
        // yesterday, more than 30 minutes ago
        let yesterday_ms = DAY.start_s * 1000 - 1_000;
        let now_ms = DAY.start_s * 1000 + 1_800_000;
        assert_eq!(
            index.admit("a", yesterday_ms, now_ms, DAY),
            Ok(Admission::Late)
        );
        // within the 15 m prev window, even though it is yesterday
        let recent_ms = DAY.start_s * 1000 - 1_000;
        let just_after_ms = DAY.start_s * 1000 + 600_000;
        assert_eq!(
            index.admit("b", recent_ms, just_after_ms, DAY),
            Ok(Admission::Accepted)
        );
    }

    #[test]
    fn a_forgotten_id_is_new_again() {
        let mut index = DedupIndex::new(86_400, 10);
        index.admit("a", NOW_MS, NOW_MS, DAY).unwrap();
        index.forget("a");
        assert!(index.is_empty());
        assert_eq!(
            index.admit("a", NOW_MS, NOW_MS, DAY),
            Ok(Admission::Accepted)
        );
    }

    /// Keys of a run kept in memory, counting the lookups a "maybe" causes.
    #[derive(Debug, Default)]
    struct MemoryKeys {
        keys: Vec<u128>,
        lookups: std::sync::atomic::AtomicUsize,
    }

    impl RunKeys for MemoryKeys {
        fn contains(&self, key: u128) -> Result<bool, String> {
            self.lookups
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(self.keys.binary_search(&key).is_ok())
        }

        fn read(&self, first: u64, count: usize, out: &mut Vec<u128>) -> Result<(), String> {
            out.extend(self.keys.iter().skip(first as usize).take(count));
            Ok(())
        }
    }

    #[test]
    fn a_new_table_has_the_room_of_the_old_and_none_of_its_ids() {
        let mut table = IdTable::default();
        let keys: Vec<u128> = (0..10_000u64).map(|n| id_key(&format!("k-{n}"))).collect();
        for (second, key) in keys.iter().enumerate() {
            assert_eq!(table.insert(*key, second as i64), None);
        }
        let next = table.with_room_of();
        assert_eq!(next.len(), 0);
        assert!(keys.iter().all(|key| !next.contains_key(key)));
        assert!(
            next.parts
                .iter()
                .zip(&table.parts)
                .all(|(new, old)| new.capacity() >= old.len()),
            "each part has room for what the old one held"
        );
        let mut small = IdTable::default();
        assert_eq!(small.insert(keys[3], 7), None);
        let after_small = small.with_room_of();
        assert_eq!(
            after_small
                .parts
                .iter()
                .map(|part| part.capacity())
                .sum::<usize>(),
            after_small
                .parts
                .iter()
                .map(|part| part.capacity())
                .max()
                .unwrap_or(0),
            "parts that held nothing get no room"
        );
        assert_eq!(IdTable::default().with_room_of().parts.len(), 0);
    }

    #[test]
    fn a_sealed_set_gives_its_keys_sorted() {
        let keys: Vec<u128> = (0..20_000u64).map(|n| id_key(&format!("s-{n}"))).collect();
        let meta = RunMeta {
            id: 1,
            ids: keys.len() as u64,
            max_second: 5,
        };
        let set = SealedIds::new(meta, keys.clone());
        let mut expected = keys;
        expected.sort_unstable();
        assert_eq!(set.sorted_keys(), expected);
        assert!(expected.iter().all(|key| set.contains(*key)));
        assert!(!set.contains(id_key("elsewhere")));
    }

    #[test]
    fn sealed_ids_answer_from_memory_then_from_their_run() {
        let mut index = DedupIndex::new(86_400, 1_000);
        for n in 0..500 {
            index.admit(&format!("s-{n}"), NOW_MS, NOW_MS, DAY).unwrap();
        }
        let sealed = index.seal();
        assert_eq!(sealed.len(), 1);
        assert_eq!(index.len(), 0);
        assert_eq!(index.ids_in_memory(), 500, "sealed ids are still in memory");
        assert_eq!(
            index.admit("s-7", NOW_MS, NOW_MS, DAY),
            Ok(Admission::Duplicate)
        );
        let set = &sealed[0];
        let set_keys = set.sorted_keys();
        let keys = Arc::new(MemoryKeys {
            keys: set_keys.clone(),
            ..MemoryKeys::default()
        });
        let run = Run::new(set.meta, RunFilter::build(&set_keys), keys.clone());
        index.install(run);
        assert_eq!(index.ids_in_memory(), 0);
        assert_eq!(index.runs(), vec![set.meta]);
        assert_eq!(
            index.admit("s-7", NOW_MS, NOW_MS, DAY),
            Ok(Admission::Duplicate)
        );
        assert_eq!(
            index.admit("new-1", NOW_MS, NOW_MS, DAY),
            Ok(Admission::Accepted)
        );
        // the run goes whole once its latest second can count nowhere
        let next_day = NEXT_DAY;
        index.expire(DAY.end_s * 1000 + 1_800_000 + 86_400_000, next_day);
        assert!(index.runs().is_empty());
    }

    #[test]
    fn a_filter_false_positive_never_makes_a_false_duplicate() {
        let mut index = DedupIndex::new(86_400, 100_000);
        for n in 0..2_000 {
            index
                .admit(&format!("in-run-{n}"), NOW_MS, NOW_MS, DAY)
                .unwrap();
        }
        let set = index.seal().remove(0);
        let set_keys = set.sorted_keys();
        let keys = Arc::new(MemoryKeys {
            keys: set_keys.clone(),
            ..MemoryKeys::default()
        });
        let run = Run::new(set.meta, RunFilter::build(&set_keys), keys.clone());
        // an id the filter cannot rule out, though the run does not hold it
        let false_positive = (0..5_000_000)
            .map(|n| format!("outside-{n}"))
            .find(|id| run.filter_maybe(id_key(id)) && set_keys.binary_search(&id_key(id)).is_err())
            .expect("a false positive among 5 M ids (rate about 1 in 1 000)");
        index.install(run);
        assert_eq!(
            index.admit(&false_positive, NOW_MS, NOW_MS, DAY),
            Ok(Admission::Accepted)
        );
        assert_eq!(
            keys.lookups.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the maybe was confirmed against the keys"
        );
    }

    #[test]
    fn replay_asks_only_the_runs_an_id_could_be_in() {
        let t = NOW_MS / 1000;
        let keys = sorted_keys("replayed", 1_000);
        let run_keys = Arc::new(MemoryKeys {
            keys: keys.clone(),
            ..MemoryKeys::default()
        });
        let filter = RunFilter::build(&keys);
        let meta = RunMeta {
            id: 1,
            ids: keys.len() as u64,
            max_second: t,
        };
        let mut index = DedupIndex::new(86_400, 1_000);
        index.add_run(Run::new(
            meta,
            filter,
            Arc::clone(&run_keys) as Arc<dyn RunKeys>,
        ));
        let lookups = || run_keys.lookups.load(std::sync::atomic::Ordering::SeqCst);
        // a record written again: its ids at their own seconds are in the run
        assert_eq!(index.remember_accepted(keys[0], t), Ok(false));
        assert_eq!(index.remember_accepted(keys[1], t - 60), Ok(false));
        assert_eq!(lookups(), 2);
        // a later second than the run's latest: the run is not asked
        assert_eq!(index.remember_accepted(keys[2], t + 1), Ok(true));
        assert_eq!(lookups(), 2);
        // and the table is, whatever the second
        assert_eq!(index.remember_accepted(keys[2], t + 1), Ok(false));
        assert_eq!(index.len(), 1);
    }

    fn memory_run(id: u64, keys: Vec<u128>, max_second: i64) -> Run {
        let meta = RunMeta {
            id,
            ids: keys.len() as u64,
            max_second,
        };
        let filter = RunFilter::build(&keys);
        Run::new(
            meta,
            filter,
            Arc::new(MemoryKeys {
                keys,
                ..MemoryKeys::default()
            }),
        )
    }

    fn sorted_keys(prefix: &str, count: usize) -> Vec<u128> {
        let mut keys: Vec<u128> = (0..count)
            .map(|n| id_key(&format!("{prefix}-{n}")))
            .collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn a_run_filter_never_misses_a_key_and_rarely_says_maybe() {
        let keys = sorted_keys("filter", 300_000);
        let filter = RunFilter::build(&keys);
        assert_eq!(filter.bytes(), 300_000 * 2);
        assert!(keys.iter().all(|key| filter.maybe(*key)));
        let false_maybes = (0..200_000)
            .filter(|n| filter.maybe(id_key(&format!("absent-{n}"))))
            .count();
        // about one in 1 000 to 2 000
        assert!(false_maybes < 400, "{false_maybes}");
        // built in any order, the same filter
        let mut builder = RunFilterBuilder::new(keys.len() as u64);
        for key in keys.iter().rev() {
            builder.push(*key);
        }
        let RunFilter::Blocks(reversed) = builder.finish() else {
            unreachable!("the builder makes blocks")
        };
        let RunFilter::Blocks(forward) = filter else {
            unreachable!("the builder makes blocks")
        };
        assert_eq!(reversed, forward);
    }

    #[test]
    fn the_smallest_four_runs_of_similar_size_within_the_span_merge() {
        let t = 1_763_805_600;
        let mut index = DedupIndex::new(86_400, 1_000);
        // similar sizes: the largest at most twice the smallest
        let sizes_and_seconds = [
            (20, t),
            (30, t + 10),
            (100, t + 20),
            (40, t + 30),
            (50, t + 40),
            (60, t + 50),
            (31, t + 60),
        ];
        for (n, (size, second)) in sizes_and_seconds.iter().enumerate() {
            let id = n as u64 + 1;
            index.add_run(memory_run(
                id,
                sorted_keys(&format!("r{id}"), *size),
                *second,
            ));
        }
        // the smallest four of similar size: 20, 30, 31, 40 (50 and 60 are
        // more than twice 20; run 3 is no one's size)
        let plan = index.plan_merge().expect("four runs of similar size");
        let mut inputs: Vec<u64> = plan.inputs.iter().map(|run| run.meta.id).collect();
        inputs.sort_unstable();
        assert_eq!(inputs, vec![1, 2, 4, 7]);
        assert_eq!(plan.id, 8, "the id is reserved");
        assert_eq!(plan.max_second, t + 60);
        let mut merged: Vec<u128> = plan
            .inputs
            .iter()
            .flat_map(|run| {
                let mut keys = Vec::new();
                run.keys().read(0, usize::MAX, &mut keys).unwrap();
                keys
            })
            .collect();
        merged.sort_unstable();
        let merged_run = memory_run(plan.id, merged, plan.max_second);
        index.install_merged(merged_run, &inputs);
        let ids: Vec<u64> = index.runs().iter().map(|meta| meta.id).collect();
        assert_eq!(ids, vec![3, 5, 6, 8]);
        assert_eq!(index.plan_merge().map(|plan| plan.id), None);
        // every id of the merged runs is still a duplicate
        for key in sorted_keys("r4", 40) {
            assert!(index.known_except(key, &[]).unwrap());
        }
        // the next sealed set takes a fresh id
        index.admit("fresh", t * 1000, t * 1000, DAY).unwrap();
        assert_eq!(index.seal()[0].meta.id, 9);

        // runs further apart than the span do not merge
        let mut apart = DedupIndex::new(86_400, 1_000);
        for n in 0..4 {
            let second = t + n * (MERGE_SPAN_S / 2);
            apart.add_run(memory_run(
                n as u64 + 1,
                sorted_keys(&format!("a{n}"), 20),
                second,
            ));
        }
        assert!(apart.plan_merge().is_none());

        // no merge makes a run of more than MERGED_TABLES_MAX tables' ids
        let mut large = DedupIndex::new(86_400, 10);
        let largest = MERGED_TABLES_MAX * 10 / 4;
        for n in 0..4 {
            large.add_run(memory_run(
                n + 1,
                sorted_keys(&format!("l{n}"), largest as usize + 1),
                t,
            ));
        }
        assert!(large.plan_merge().is_none());
        for n in 4..8 {
            large.add_run(memory_run(
                n + 1,
                sorted_keys(&format!("l{n}"), largest as usize),
                t,
            ));
        }
        let plan = large
            .plan_merge()
            .expect("four runs of the largest size merged");
        let mut inputs: Vec<u64> = plan.inputs.iter().map(|run| run.meta.id).collect();
        inputs.sort_unstable();
        assert_eq!(inputs, vec![5, 6, 7, 8]);
    }

    /// Adds the runs' keys to `summary`, as the node's indexer does.
    fn fill(summary: &SummaryFilter, runs: &[Run]) {
        for run in runs {
            let mut keys = Vec::new();
            run.keys()
                .read(0, run.meta.ids as usize, &mut keys)
                .unwrap();
            for key in keys {
                summary.insert(key);
            }
        }
    }

    fn covered_ids(index: &DedupIndex) -> Vec<u64> {
        let view = index.runs_shared();
        view.runs
            .iter()
            .filter(|run| run.covered())
            .map(|run| run.meta.id)
            .collect()
    }

    #[test]
    fn a_summary_never_misses_a_key_and_rarely_says_maybe() {
        let summary = SummaryFilter::new(100_000);
        let keys = sorted_keys("in", 100_000);
        for key in &keys {
            summary.insert(*key);
        }
        assert!(keys.iter().all(|key| summary.maybe(*key)));
        let maybes = (0..100_000)
            .filter(|n| summary.maybe(id_key(&format!("out-{n}"))))
            .count();
        // full, at 8 bits an id: about one in 40
        assert!(maybes < 100_000 / 20, "{maybes} maybes in 100 000");
        // 8 bits an id in blocks of 512 bits
        assert_eq!(summary.bytes(), (100_000 * 8_usize).div_ceil(512) * 64);
    }

    #[test]
    fn runs_behind_a_summary_are_judged_exactly_covered_or_not() {
        // a table of 1 000 ids: a summary once three runs hold 500
        let mut index = DedupIndex::new(86_400, 1_000);
        for id in 1..=2 {
            index.add_run(memory_run(
                id,
                sorted_keys(&format!("r{id}"), 200),
                NOW_MS / 1000,
            ));
        }
        assert!(index.plan_cover().is_none(), "two runs want no summary");
        index.add_run(memory_run(3, sorted_keys("r3", 200), NOW_MS / 1000));
        let Some(CoverPlan::Rebuild { ids_max, runs }) = index.plan_cover() else {
            panic!("three runs of 600 ids want a summary built");
        };
        assert_eq!(ids_max, 1_200);
        assert_eq!(runs.len(), 3);
        let summary = Arc::new(SummaryFilter::new(ids_max));
        fill(&summary, &runs);
        index.install_cover(Arc::clone(&summary), &[1, 2, 3], true);
        assert_eq!(covered_ids(&index), vec![1, 2, 3]);
        assert!(index.plan_cover().is_none());
        // a run written since is asked on its own until it is covered
        index.add_run(memory_run(4, sorted_keys("r4", 100), NOW_MS / 1000));
        let ids = ["r1-5", "r3-199", "r4-50", "none-1"];
        let checked = RunsChecked::of(&index.runs_shared(), ids.into_iter()).unwrap();
        assert_eq!(checked.found, vec![Some(1), Some(3), Some(4), None]);
        for (id, expected) in ids.iter().zip([
            Admission::Duplicate,
            Admission::Duplicate,
            Admission::Duplicate,
            Admission::Accepted,
        ]) {
            assert_eq!(index.judge(id, NOW_MS, NOW_MS, DAY), Ok(expected), "{id}");
        }
        let Some(CoverPlan::Extend {
            summary: current,
            runs,
        }) = index.plan_cover()
        else {
            panic!("the new run wants adding");
        };
        assert!(Arc::ptr_eq(&current, &summary));
        assert_eq!(
            runs.iter().map(|run| run.meta.id).collect::<Vec<_>>(),
            vec![4]
        );
        fill(&current, &runs);
        index.install_cover(current, &[4], false);
        assert_eq!(covered_ids(&index), vec![1, 2, 3, 4]);
        let checked = RunsChecked::of(&index.runs_shared(), ids.into_iter()).unwrap();
        assert_eq!(checked.found, vec![Some(1), Some(3), Some(4), None]);
        // a merge of covered runs is covered; one with an input not covered is not
        index.install_merged(memory_run(5, sorted_keys("r1", 200), NOW_MS / 1000), &[1]);
        assert_eq!(covered_ids(&index), vec![2, 3, 4, 5]);
        index.add_run(memory_run(6, sorted_keys("r6", 10), NOW_MS / 1000));
        let mut keys = sorted_keys("r6", 10);
        keys.extend(sorted_keys("r2", 200));
        keys.sort_unstable();
        index.install_merged(memory_run(7, keys, NOW_MS / 1000), &[2, 6]);
        assert_eq!(covered_ids(&index), vec![3, 4, 5]);
        assert_eq!(
            index.judge("r6-3", NOW_MS, NOW_MS, DAY),
            Ok(Admission::Duplicate)
        );
        assert_eq!(
            index.judge("r2-3", NOW_MS, NOW_MS, DAY),
            Ok(Admission::Duplicate)
        );
        // runs that would overfill the summary want it built anew, from every run
        index.add_run(memory_run(8, sorted_keys("r8", 700), NOW_MS / 1000));
        let Some(CoverPlan::Rebuild { ids_max, runs }) = index.plan_cover() else {
            panic!("an overfull summary is built anew");
        };
        assert_eq!(ids_max, 2 * (200 + 100 + 200 + 210 + 700));
        assert_eq!(runs.len(), 5);
        // runs merged while it was built are covered when their inputs are
        let old = Arc::clone(&summary);
        let rebuilt = Arc::new(SummaryFilter::new(ids_max));
        fill(&rebuilt, &runs);
        let mut keys = sorted_keys("r3", 200);
        keys.extend(sorted_keys("r4", 100));
        keys.sort_unstable();
        index.install_merged(memory_run(10, keys, NOW_MS / 1000), &[3, 4]);
        index.add_run(memory_run(11, sorted_keys("r11", 10), NOW_MS / 1000));
        let mut keys = sorted_keys("r11", 10);
        keys.extend(sorted_keys("r5", 200));
        keys.sort_unstable();
        index.install_merged(memory_run(12, keys, NOW_MS / 1000), &[5, 11]);
        index.install_cover(rebuilt, &[3, 4, 5, 7, 8], true);
        assert_eq!(covered_ids(&index), vec![7, 8, 10]);
        // a step planned on a summary replaced since changes nothing
        index.install_cover(old, &[12], false);
        assert_eq!(covered_ids(&index), vec![7, 8, 10]);
        assert_eq!(
            index.judge("r11-3", NOW_MS, NOW_MS, DAY),
            Ok(Admission::Duplicate)
        );
        assert_eq!(
            index.judge("r4-3", NOW_MS, NOW_MS, DAY),
            Ok(Admission::Duplicate)
        );
        // every run gone: the summary goes with them
        let day_after = DayBounds {
            start_s: NEXT_DAY.end_s,
            end_s: NEXT_DAY.end_s + 86_400,
        };
        index.expire(day_after.start_s * 1000 + 3_600_000, day_after);
        assert!(index.runs().is_empty());
        assert!(index.runs_shared().summary.is_none());
        assert_eq!(index.filter_bytes(), 0);
    }

    #[test]
    fn runs_written_while_a_summary_is_rebuilt_go_into_the_current_one() {
        let t = NOW_MS / 1000;
        let mut index = DedupIndex::new(86_400, 1_000);
        for id in 1..=3 {
            index.add_run(memory_run(id, sorted_keys(&format!("r{id}"), 200), t));
        }
        let Some(CoverPlan::Rebuild { ids_max, runs }) = index.plan_rebuild() else {
            panic!("three runs of 600 ids want a summary");
        };
        assert_eq!(ids_max, 1_200);
        assert!(index.plan_rebuild().is_none(), "one rebuild at a time");
        let first = Arc::new(SummaryFilter::new(ids_max));
        fill(&first, &runs);
        index.install_cover(Arc::clone(&first), &[1, 2, 3], true);
        // up to its room, a run goes into the current summary
        index.add_run(memory_run(4, sorted_keys("r4", 590), t));
        assert!(index.plan_rebuild().is_none());
        let Some(CoverPlan::Extend { summary, runs }) = index.plan_extend() else {
            panic!("run 4 fits");
        };
        fill(&summary, &runs);
        index.install_cover(summary, &[4], false);
        // past it: a new one is wanted, and nothing goes in until it is under way
        index.add_run(memory_run(5, sorted_keys("r5", 100), t));
        assert!(index.plan_extend().is_none());
        let Some(CoverPlan::Rebuild { ids_max, runs }) = index.plan_rebuild() else {
            panic!("1 290 ids overfill a room of 1 200");
        };
        assert_eq!(ids_max, 2 * 1_290);
        assert_eq!(runs.len(), 5);
        let rebuilt = Arc::new(SummaryFilter::new(ids_max));
        fill(&rebuilt, &runs);
        // while it is built, runs go into the current one up to a quarter
        // past its room (1 290 + 150 of 1 500), and no further (+ 300)
        let Some(CoverPlan::Extend { summary, runs }) = index.plan_extend() else {
            panic!("run 5 fits a quarter past the room");
        };
        assert!(Arc::ptr_eq(&summary, &first));
        fill(&summary, &runs);
        index.install_cover(Arc::clone(&summary), &[5], false);
        index.add_run(memory_run(6, sorted_keys("r6", 150), t));
        let Some(CoverPlan::Extend { summary, runs }) = index.plan_extend() else {
            panic!("run 6 fits a quarter past the room");
        };
        fill(&summary, &runs);
        index.install_cover(summary, &[6], false);
        assert_eq!(covered_ids(&index), vec![1, 2, 3, 4, 5, 6]);
        index.add_run(memory_run(7, sorted_keys("r7", 300), t));
        assert!(index.plan_extend().is_none());
        // the new one holds runs 1 to 5: run 6, added to the old one since,
        // is asked on its own until it goes into the new one too
        index.install_cover(Arc::clone(&rebuilt), &[1, 2, 3, 4, 5], true);
        assert_eq!(covered_ids(&index), vec![1, 2, 3, 4, 5]);
        for id in ["r6-7", "r7-7", "r3-7"] {
            assert_eq!(
                index.judge(id, NOW_MS, NOW_MS, DAY),
                Ok(Admission::Duplicate),
                "{id}"
            );
        }
        let Some(CoverPlan::Extend { summary, runs }) = index.plan_extend() else {
            panic!("runs 6 and 7 fit the new summary");
        };
        assert!(Arc::ptr_eq(&summary, &rebuilt));
        assert_eq!(
            runs.iter().map(|run| run.meta.id).collect::<Vec<_>>(),
            vec![6, 7]
        );
        // a rebuild abandoned can be planned again
        index.add_run(memory_run(8, sorted_keys("r8", 2_000), t));
        assert!(index.plan_rebuild().is_some());
        assert!(index.plan_rebuild().is_none());
        index.abandon_rebuild();
        assert!(index.plan_rebuild().is_some());
    }

    #[test]
    fn a_covered_run_is_asked_only_on_the_summary_maybe() {
        // the summary is what rules a key out of a covered run: a run marked
        // covered whose keys the summary lacks is not found (so the indexer
        // must add every key before the mark, as `install_cover` is told)
        let mut index = DedupIndex::new(86_400, 100);
        for id in 1..=3 {
            index.add_run(memory_run(
                id,
                sorted_keys(&format!("r{id}"), 50),
                NOW_MS / 1000,
            ));
        }
        let Some(CoverPlan::Rebuild { ids_max, runs }) = index.plan_cover() else {
            panic!("a summary is wanted");
        };
        let summary = Arc::new(SummaryFilter::new(ids_max));
        fill(&summary, &runs[..2]);
        index.install_cover(summary, &[1, 2, 3], true);
        let checked = RunsChecked::of(&index.runs_shared(), ["r1-1", "r3-1"].into_iter()).unwrap();
        assert_eq!(checked.found, vec![Some(1), None]);
    }

    #[test]
    fn a_filter_block_is_stored_as_its_eight_words() {
        #[derive(Serialize)]
        enum Before {
            Blocks(Vec<[u64; 8]>),
        }
        let words = [1, 2, 3, 4, 5, 6, 7, u64::MAX];
        assert_eq!(
            bincode::serialize(&RunFilter::Blocks(vec![Block(words)])).unwrap(),
            bincode::serialize(&Before::Blocks(vec![words])).unwrap()
        );
        assert_eq!(std::mem::align_of::<Block>(), 64);
    }

    #[test]
    fn ids_checked_against_a_stale_list_of_runs_are_judged_exactly() {
        let mut index = DedupIndex::new(0, 1_000);
        let keys = sorted_keys("old", 100);
        index.add_run(memory_run(1, keys.clone(), NOW_MS / 1000));
        let published = index.runs_shared();
        let checked = RunsChecked::of(&published, ["old-7", "new-1"].into_iter()).unwrap();
        assert_eq!(checked.found, vec![Some(1), None]);
        // checked against every run: none is asked again, the table still is
        assert!(index.runs_all_in(&checked.runs));
        assert_eq!(
            index.admit_key(checked.keys[1], NOW_MS, NOW_MS, DAY, Prechecked::InNoRun),
            Ok(Admission::Accepted)
        );
        assert_eq!(
            index.admit_key(checked.keys[1], NOW_MS, NOW_MS, DAY, Prechecked::InNoRun),
            Ok(Admission::Duplicate)
        );
        // a run published after the check is still asked
        index.add_run(memory_run(2, sorted_keys("later", 10), NOW_MS / 1000));
        assert!(!index.runs_all_in(&checked.runs));
        let later = id_key("later-3");
        assert_eq!(
            index.admit_key(later, NOW_MS, NOW_MS, DAY, Prechecked::NotIn(&checked.runs)),
            Ok(Admission::Duplicate)
        );
        // found in a run the tenant still has: a duplicate
        assert_eq!(
            index.admit_key(checked.keys[0], NOW_MS, NOW_MS, DAY, Prechecked::In(1)),
            Ok(Admission::Duplicate)
        );
        // the run expired since the check: the id is new again, not a duplicate
        let next_day = NEXT_DAY;
        let tomorrow_ms = DAY.end_s * 1000 + 3_600_000;
        index.expire(tomorrow_ms, next_day);
        assert!(index.runs().is_empty());
        assert_eq!(
            index.admit_key(
                checked.keys[0],
                tomorrow_ms,
                tomorrow_ms,
                next_day,
                Prechecked::In(1)
            ),
            Ok(Admission::Accepted)
        );
    }

    #[test]
    fn an_id_found_in_a_run_merged_since_is_found_in_the_merged_run() {
        let mut index = DedupIndex::new(86_400, 1_000);
        for id in 1..=4 {
            index.add_run(memory_run(
                id,
                sorted_keys(&format!("m{id}"), 20),
                NOW_MS / 1000,
            ));
        }
        let key = id_key("m2-5");
        let checked = RunsChecked::of(&index.runs_shared(), ["m2-5"].into_iter()).unwrap();
        assert_eq!(checked.found, vec![Some(2)]);
        let plan = index.plan_merge().unwrap();
        let mut merged: Vec<u128> = (1..=4)
            .flat_map(|id| sorted_keys(&format!("m{id}"), 20))
            .collect();
        merged.sort_unstable();
        let inputs: Vec<u64> = plan.inputs.iter().map(|run| run.meta.id).collect();
        index.install_merged(memory_run(plan.id, merged, plan.max_second), &inputs);
        assert_eq!(
            index.admit_key(key, NOW_MS, NOW_MS, DAY, Prechecked::In(2)),
            Ok(Admission::Duplicate)
        );
    }

    #[test]
    fn a_full_table_refuses_instead_of_forgetting() {
        let mut index = DedupIndex::new(86_400, 2);
        index.admit("a", NOW_MS, NOW_MS, DAY).unwrap();
        index.admit("b", NOW_MS, NOW_MS, DAY).unwrap();
        assert_eq!(index.ids_free(), 0);
        assert_eq!(
            index.admit("c", NOW_MS, NOW_MS, DAY),
            Err(DedupError::Full { ids_max: 2 })
        );
        assert_eq!(
            index.admit("a", NOW_MS, NOW_MS, DAY),
            Ok(Admission::Duplicate)
        );
    }
}
