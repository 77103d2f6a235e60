//! Snapshots: what each tenant's state was at a log position, stored as one part
//! per tenant plus a manifest, each in its own checksummed envelope.
//! Owns: the snapshot and log record shapes, their keys, and which old
//! snapshots and log records may go once newer snapshots cover them.
//! Must not: talk to actors (the node collects the parts) or flush by itself
//! (every write goes through the committer).

use serde::{Deserialize, Serialize};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::domain::dedup::{Run, RunMeta, SealedIds};
use crate::domain::event::ValidEvent;
use crate::domain::histogram::HistogramExport;
use crate::domain::metric::{HistoryExtent, MetricExport, SeriesExport, VariantSetExport};
use crate::domain::tenant::{Plan, QuarantineWrite};
use crate::domain::window::CounterExport;

use super::envelope::{decode, encode, encode_within, EnvelopeError, RecordKind};
use super::{
    key_lsn, lsn_key, quarantine_key, quarantine_next_key, read_value, Op, Space, StorageError,
    Store, WAL_FLOOR_KEY,
};

/// One accepted batch of one tenant, as the write-ahead log stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WalBatch {
    pub tenant: String,
    pub now_ms: i64,
    pub events: Vec<ValidEvent>,
}

/// The same shape, borrowed, for encoding without copying the events.
#[derive(Serialize)]
pub struct WalBatchRef<'a> {
    pub tenant: &'a str,
    pub now_ms: i64,
    pub events: &'a [ValidEvent],
}

/// The writes of a tenant core's plan, in order: the log record of its
/// accepted events (with the next LSN), then its quarantine writes. An LSN is
/// taken only once every record encodes, so an error leaves no gap to explain.
/// A record larger than `record_bytes_max` is refused: recovery could not read
/// it back.
pub fn plan_ops(
    plan: &Plan,
    tenant: &str,
    next_lsn: &AtomicU64,
    record_bytes_max: usize,
) -> Result<Vec<Op>, StorageError> {
    let mut ops = Vec::with_capacity(1 + plan.quarantine.len());
    let mut record = None;
    if !plan.events.is_empty() {
        let batch = WalBatchRef {
            tenant,
            now_ms: plan.now_ms,
            events: &plan.events,
        };
        record = Some(
            encode_within(RecordKind::WalBatch, &batch, record_bytes_max)
                .map_err(|error| StorageError::Io(format!("log record refused: {error}")))?,
        );
    }
    let mut quarantine_ops = Vec::with_capacity(plan.quarantine.len());
    for write in &plan.quarantine {
        quarantine_ops.push(match write {
            QuarantineWrite::Put(entry) => Op::Put {
                space: Space::Quarantine,
                key: quarantine_key(tenant, entry.qid),
                value: encode(RecordKind::Quarantined, entry).map_err(|error| {
                    StorageError::Io(format!("quarantine entry refused: {error}"))
                })?,
            },
            QuarantineWrite::Remove(qid) => Op::Remove {
                space: Space::Quarantine,
                key: quarantine_key(tenant, *qid),
            },
            QuarantineWrite::NextQid(next) => Op::Put {
                space: Space::Quarantine,
                key: quarantine_next_key(tenant),
                value: next.to_be_bytes().to_vec(),
            },
        });
    }
    if let Some(value) = record {
        let lsn = next_lsn.fetch_add(1, Ordering::SeqCst);
        ops.push(Op::Put {
            space: Space::Wal,
            key: lsn_key(lsn).to_vec(),
            value,
        });
    }
    ops.extend(quarantine_ops);
    Ok(ops)
}

/// A tenant's state at a log position: every record of this tenant with an
/// LSN at or below `position_lsn` is reflected in it. The remembered ids are
/// in `dedup` (those not written as a run) and in the runs listed, which are
/// durable files of their own (`storage::runs`), not copied here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantSnapshot {
    pub tenant: String,
    pub position_lsn: u64,
    pub now_ms: i64,
    pub dedup: Vec<(u128, i64)>,
    pub metrics: Vec<(String, MetricExport)>,
    pub runs: Vec<RunMeta>,
    /// By metric name: the experiments' per-variant counts.
    pub experiments: Vec<(String, Vec<VariantSetExport>)>,
    /// Per metric of `metrics` (the same order): which of its history the
    /// export holds (`MetricState::export_history`). Empty, or a metric
    /// missing: all of it. Not stored; `snapshot_ops` lists the chunks left
    /// out again from the last durable snapshot.
    #[serde(skip)]
    pub history_extents: Vec<HistoryExtent>,
}

/// A part as `RecordKind::SnapshotPartHistory` stores it: the windows hold
/// heads and today only, their seconds are in the chunks `history` lists.
#[derive(Serialize)]
struct StoredPartRef<'a> {
    part: &'a TenantSnapshot,
    history: &'a [HistoryRef],
}

/// `StoredPartRef`, read back.
#[derive(Deserialize)]
struct StoredPart {
    part: TenantSnapshot,
    history: Vec<HistoryRef>,
}

/// The part's shape before experiments (`RecordKind::SnapshotPartRuns`).
#[derive(Deserialize)]
struct TenantSnapshotWithoutExperiments {
    tenant: String,
    position_lsn: u64,
    now_ms: i64,
    dedup: Vec<(u128, i64)>,
    metrics: Vec<(String, MetricExport)>,
    runs: Vec<RunMeta>,
}

/// The part's shape before runs (`RecordKind::SnapshotPart`).
#[derive(Deserialize)]
struct TenantSnapshotWithoutRuns {
    tenant: String,
    position_lsn: u64,
    now_ms: i64,
    dedup: Vec<(u128, i64)>,
    metrics: Vec<(String, MetricExport)>,
}

/// Writes the windows of `part` as differences (`forward`), or back
/// (`RecordKind::SnapshotPartDeltas`): each series' bucket and slice seconds,
/// and each slice's and today's histogram values, from the one before.
/// Wrapping arithmetic, so that going back is exact whatever the order.
fn deltas(part: &mut TenantSnapshot, forward: bool) {
    for (_, metric) in &mut part.metrics {
        metric_deltas(metric, forward);
    }
    for (_, sets) in &mut part.experiments {
        for set in sets {
            for export in &mut set.windows {
                series_deltas(export, forward);
            }
        }
    }
}

/// `deltas` for one metric (a part's, or a history chunk's).
fn metric_deltas(metric: &mut MetricExport, forward: bool) {
    series_deltas(&mut metric.total, forward);
    for (_, breakdown) in &mut metric.breakdowns {
        for (_, export) in breakdown {
            series_deltas(export, forward);
        }
    }
}

fn series_deltas(export: &mut SeriesExport, forward: bool) {
    fn seconds<T>(items: &mut [T], second: impl Fn(&mut T) -> &mut i64, forward: bool) {
        let mut previous = 0i64;
        for item in items {
            let slot = second(item);
            let value = *slot;
            if forward {
                *slot = value.wrapping_sub(previous);
                previous = value;
            } else {
                previous = previous.wrapping_add(value);
                *slot = previous;
            }
        }
    }
    fn values(pairs: &mut [(u64, u64)], forward: bool) {
        let mut previous = 0u64;
        for (value, _) in pairs {
            if forward {
                let absolute = *value;
                *value = absolute.wrapping_sub(previous);
                previous = absolute;
            } else {
                previous = previous.wrapping_add(*value);
                *value = previous;
            }
        }
    }
    match export {
        SeriesExport::Counter(counter) => {
            seconds(&mut counter.buckets, |bucket| &mut bucket.0, forward);
        }
        SeriesExport::Histogram(histogram) => {
            seconds(&mut histogram.slices, |slice| &mut slice.0, forward);
            for (_, slice) in &mut histogram.slices {
                values(slice, forward);
            }
            values(&mut histogram.today, forward);
        }
    }
}

/// Seconds of windows history one chunk holds (`Space::History`).
pub const HISTORY_CHUNK_S: i64 = 60;

/// A chunk of one metric's windows history, as a stored part lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRef {
    pub metric: String,
    /// Its first second (a multiple of `HISTORY_CHUNK_S`).
    pub start_s: i64,
    /// The snapshot that wrote it: later ones list it again while it stays
    /// the same.
    pub written_by: u64,
}

/// The key of a history chunk: the snapshot that wrote it (so that what a
/// snapshot wrote is one range), tenant, 0, metric, 0, first second (order
/// kept across the sign).
pub fn history_key(written_by: u64, tenant: &str, metric: &str, start_s: i64) -> Vec<u8> {
    let mut key = Vec::with_capacity(tenant.len() + metric.len() + 18);
    key.extend_from_slice(&written_by.to_be_bytes());
    key.extend_from_slice(tenant.as_bytes());
    key.push(0);
    key.extend_from_slice(metric.as_bytes());
    key.push(0);
    key.extend_from_slice(&((start_s as u64) ^ (1 << 63)).to_be_bytes());
    key
}

/// What the chunks of the last durable snapshot hold, so that the next one
/// writes only the chunks that changed and lists the others again: by
/// tenant, metric and first second, the digest of the chunk's record and
/// the snapshot that wrote it. Empty after a start (the first snapshot
/// writes every chunk).
#[derive(Debug, Clone, Default)]
pub struct HistoryBook {
    chunks: std::collections::BTreeMap<(String, String, i64), (u128, u64)>,
}

impl HistoryBook {
    /// True after a start, before the first snapshot.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// Takes every second out of `export` into one export per chunk (head and
/// today left at zero), in the order of their seconds.
fn take_seconds(export: &mut SeriesExport) -> Vec<(i64, SeriesExport)> {
    fn by_chunk<T>(items: Vec<T>, second: impl Fn(&T) -> i64) -> Vec<(i64, Vec<T>)> {
        let mut chunks: Vec<(i64, Vec<T>)> = Vec::new();
        for item in items {
            let start_s = second(&item).div_euclid(HISTORY_CHUNK_S) * HISTORY_CHUNK_S;
            match chunks.last_mut() {
                Some((last, chunk)) if *last == start_s => chunk.push(item),
                _ => chunks.push((start_s, vec![item])),
            }
        }
        chunks
    }
    match export {
        SeriesExport::Counter(counter) => {
            by_chunk(std::mem::take(&mut counter.buckets), |bucket| bucket.0)
                .into_iter()
                .map(|(start_s, buckets)| {
                    let chunk = CounterExport {
                        head_s: 0,
                        buckets,
                        today: (0, 0),
                    };
                    (start_s, SeriesExport::Counter(chunk))
                })
                .collect()
        }
        SeriesExport::Histogram(histogram) => {
            by_chunk(std::mem::take(&mut histogram.slices), |slice| slice.0)
                .into_iter()
                .map(|(start_s, slices)| {
                    let chunk = HistogramExport {
                        head_s: 0,
                        slices,
                        today: Vec::new(),
                    };
                    (start_s, SeriesExport::Histogram(chunk))
                })
                .collect()
        }
    }
}

/// Puts a chunk's seconds back at the end of `export` (chunks come back in
/// the order of their seconds); a chunk of another kind is dropped.
fn append_seconds(export: &mut SeriesExport, chunk: SeriesExport) {
    match (export, chunk) {
        (SeriesExport::Counter(counter), SeriesExport::Counter(chunk)) => {
            counter.buckets.extend(chunk.buckets)
        }
        (SeriesExport::Histogram(histogram), SeriesExport::Histogram(chunk)) => {
            histogram.slices.extend(chunk.slices)
        }
        _ => {}
    }
}

/// Takes a metric's history out of `metric` into one export per minute:
/// each holds the seconds of that minute of every series (a breakdown's
/// series only where they have some), `metric` keeps its heads and today.
pub fn split_history(metric: &mut MetricExport) -> Vec<(i64, MetricExport)> {
    fn chunk_at(
        chunks: &mut Vec<(i64, MetricExport)>,
        start_s: i64,
        total: &SeriesExport,
    ) -> usize {
        match chunks.binary_search_by_key(&start_s, |(start, _)| *start) {
            Ok(index) => index,
            Err(index) => {
                let empty = match total {
                    SeriesExport::Counter(_) => SeriesExport::Counter(CounterExport {
                        head_s: 0,
                        buckets: Vec::new(),
                        today: (0, 0),
                    }),
                    SeriesExport::Histogram(_) => SeriesExport::Histogram(HistogramExport {
                        head_s: 0,
                        slices: Vec::new(),
                        today: Vec::new(),
                    }),
                };
                let chunk = MetricExport {
                    total: empty,
                    breakdowns: Vec::new(),
                };
                chunks.insert(index, (start_s, chunk));
                index
            }
        }
    }
    let mut chunks: Vec<(i64, MetricExport)> = Vec::new();
    for (start_s, seconds) in take_seconds(&mut metric.total) {
        let index = chunk_at(&mut chunks, start_s, &metric.total);
        chunks[index].1.total = seconds;
    }
    for (dim, values) in &mut metric.breakdowns {
        for (value, series) in values.iter_mut() {
            for (start_s, seconds) in take_seconds(series) {
                let index = chunk_at(&mut chunks, start_s, &metric.total);
                let breakdowns = &mut chunks[index].1.breakdowns;
                if breakdowns.last().is_none_or(|(last, _)| last != dim) {
                    breakdowns.push((dim.clone(), Vec::new()));
                }
                if let Some((_, chunk_values)) = breakdowns.last_mut() {
                    chunk_values.push((value.clone(), seconds));
                }
            }
        }
    }
    chunks
}

/// Puts a chunk of `split_history` back into `metric`; chunks come back in
/// the order of their seconds. A series the chunk has and `metric` has not
/// (dropped since) is left out.
pub fn join_history(metric: &mut MetricExport, chunk: MetricExport) {
    append_seconds(&mut metric.total, chunk.total);
    for (dim, values) in chunk.breakdowns {
        let Some((_, into)) = metric.breakdowns.iter_mut().find(|(name, _)| *name == dim) else {
            continue;
        };
        for (value, seconds) in values {
            if let Ok(index) = into.binary_search_by(|(other, _)| other.as_str().cmp(&value)) {
                append_seconds(&mut into[index].1, seconds);
            }
        }
    }
}

/// Decodes a part of any of its shapes, with the history chunks it lists
/// (none before `RecordKind::SnapshotPartHistory`): its windows lack their
/// seconds until `load_history` puts the chunks back.
pub fn decode_part(
    bytes: &[u8],
    record_bytes_max: usize,
) -> Result<(TenantSnapshot, Vec<HistoryRef>), EnvelopeError> {
    match decode::<StoredPart>(bytes, RecordKind::SnapshotPartHistory, record_bytes_max) {
        Err(EnvelopeError::Kind { .. }) => {}
        Ok(StoredPart { mut part, history }) => {
            deltas(&mut part, false);
            return Ok((part, history));
        }
        Err(error) => return Err(error),
    }
    decode_part_before_history(bytes, record_bytes_max).map(|part| (part, Vec::new()))
}

/// The shapes of a part before history chunks.
fn decode_part_before_history(
    bytes: &[u8],
    record_bytes_max: usize,
) -> Result<TenantSnapshot, EnvelopeError> {
    match decode::<TenantSnapshot>(bytes, RecordKind::SnapshotPartDeltas, record_bytes_max) {
        Err(EnvelopeError::Kind { .. }) => {}
        Ok(mut part) => {
            deltas(&mut part, false);
            return Ok(part);
        }
        other => return other,
    }
    match decode::<TenantSnapshot>(bytes, RecordKind::SnapshotPartExperiments, record_bytes_max) {
        Err(EnvelopeError::Kind { .. }) => {}
        other => return other,
    }
    match decode::<TenantSnapshotWithoutExperiments>(
        bytes,
        RecordKind::SnapshotPartRuns,
        record_bytes_max,
    ) {
        Ok(old) => Ok(TenantSnapshot {
            tenant: old.tenant,
            position_lsn: old.position_lsn,
            now_ms: old.now_ms,
            dedup: old.dedup,
            metrics: old.metrics,
            runs: old.runs,
            experiments: Vec::new(),
            history_extents: Vec::new(),
        }),
        Err(EnvelopeError::Kind { .. }) => {
            let old: TenantSnapshotWithoutRuns =
                decode(bytes, RecordKind::SnapshotPart, record_bytes_max)?;
            Ok(TenantSnapshot {
                tenant: old.tenant,
                position_lsn: old.position_lsn,
                now_ms: old.now_ms,
                dedup: old.dedup,
                metrics: old.metrics,
                runs: Vec::new(),
                experiments: Vec::new(),
                history_extents: Vec::new(),
            })
        }
        Err(error) => Err(error),
    }
}

/// Writes each sealed set as a run in the tenant's runs directory and lists
/// it in `part`; a set that cannot be written goes into `part.dedup` instead
/// (its ids must be in the snapshot one way or the other). Returns the runs
/// written, for the tenant to install once the snapshot is durable.
pub fn write_sealed_runs(
    data_dir: &std::path::Path,
    part: &mut TenantSnapshot,
    sealed: &[std::sync::Arc<SealedIds>],
) -> Vec<Run> {
    let dir = super::runs::runs_dir(data_dir, &part.tenant);
    let mut written = Vec::with_capacity(sealed.len());
    for set in sealed {
        match super::runs::write_run(&dir, set) {
            Ok(run) => {
                part.runs.push(run.meta);
                written.push(run);
            }
            Err(error) => {
                tracing::warn!(tenant = %part.tenant, run = set.meta.id, %error, "de-dup run not written; its ids stay in the snapshot");
                part.dedup.extend(
                    set.sorted_keys()
                        .into_iter()
                        .map(|key| (key, set.meta.max_second)),
                );
            }
        }
    }
    written
}

/// Written last: a snapshot without a readable manifest, or missing a part the
/// manifest lists, is not used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    pub id: u64,
    pub created_ms: i64,
    pub tenants: Vec<String>,
    /// The smallest position of its parts: log records above it may be needed.
    pub min_position_lsn: u64,
}

const MANIFEST_SUFFIX: &[u8] = b"/m";
const PART_INFIX: &[u8] = b"/t/";
const RUNS_INFIX: &[u8] = b"/r/";

pub fn manifest_key(id: u64) -> Vec<u8> {
    let mut key = id.to_be_bytes().to_vec();
    key.extend_from_slice(MANIFEST_SUFFIX);
    key
}

pub fn part_key(id: u64, tenant: &str) -> Vec<u8> {
    let mut key = id.to_be_bytes().to_vec();
    key.extend_from_slice(PART_INFIX);
    key.extend_from_slice(tenant.as_bytes());
    key
}

/// The key of the run ids a part lists (`RecordKind::SnapshotRuns`).
fn runs_key(id: u64, tenant: &str) -> Vec<u8> {
    let mut key = id.to_be_bytes().to_vec();
    key.extend_from_slice(RUNS_INFIX);
    key.extend_from_slice(tenant.as_bytes());
    key
}

/// The writes of a snapshot: the history chunks that changed since the
/// snapshot `book` describes, its parts (each listing its chunks, and with
/// the ids of its runs beside it), then its manifest; and the book to keep
/// once these writes are durable. A record larger than `record_bytes_max`
/// fails the snapshot (older ones stay, nothing is pruned). `parts` are as
/// they were when it returns.
pub fn snapshot_ops(
    id: u64,
    created_ms: i64,
    parts: &mut [TenantSnapshot],
    record_bytes_max: usize,
    book: &HistoryBook,
) -> Result<(Vec<Op>, HistoryBook), EnvelopeError> {
    let mut ops = Vec::with_capacity(2 * parts.len() + 1);
    let mut next_book = HistoryBook::default();
    for part in parts.iter_mut() {
        // the windows' seconds go into chunks, the part keeps heads and today
        let mut chunks: Vec<(usize, i64, MetricExport)> = Vec::new();
        for (index, (_, metric)) in part.metrics.iter_mut().enumerate() {
            for (start_s, chunk) in split_history(metric) {
                chunks.push((index, start_s, chunk));
            }
        }
        let written = history_ops(
            id,
            part,
            &mut chunks,
            record_bytes_max,
            book,
            &mut next_book,
        );
        let encoded = written.and_then(|(history, history_ops)| {
            ops.extend(history_ops);
            // encoded as differences in place, then given back as they were
            deltas(part, true);
            let stored = StoredPartRef {
                part,
                history: &history,
            };
            let encoded = encode_within(RecordKind::SnapshotPartHistory, &stored, record_bytes_max);
            deltas(part, false);
            encoded
        });
        for (index, _, chunk) in chunks {
            join_history(&mut part.metrics[index].1, chunk);
        }
        ops.push(Op::Put {
            space: Space::Snapshot,
            key: part_key(id, &part.tenant),
            value: encoded?,
        });
        let run_ids: Vec<u64> = part.runs.iter().map(|run| run.id).collect();
        ops.push(Op::Put {
            space: Space::Snapshot,
            key: runs_key(id, &part.tenant),
            value: encode_within(RecordKind::SnapshotRuns, &run_ids, record_bytes_max)?,
        });
    }
    let manifest = SnapshotManifest {
        id,
        created_ms,
        tenants: parts.iter().map(|part| part.tenant.clone()).collect(),
        min_position_lsn: parts
            .iter()
            .map(|part| part.position_lsn)
            .min()
            .unwrap_or(0),
    };
    ops.push(Op::Put {
        space: Space::Snapshot,
        key: manifest_key(id),
        value: encode_within(RecordKind::SnapshotManifest, &manifest, record_bytes_max)?,
    });
    Ok((ops, next_book))
}

/// The chunks of one part: those the export left out listed again as
/// `book` has them (less those wholly before every second a series still
/// holds), the others each encoded, written when `book` holds another digest
/// for it (or none), listed either way. `chunks` are given back as they came
/// (by metric index, first second).
fn history_ops(
    id: u64,
    part: &TenantSnapshot,
    chunks: &mut [(usize, i64, MetricExport)],
    record_bytes_max: usize,
    book: &HistoryBook,
    next_book: &mut HistoryBook,
) -> Result<(Vec<HistoryRef>, Vec<Op>), EnvelopeError> {
    let mut history = Vec::with_capacity(chunks.len());
    let mut ops = Vec::new();
    let mut next_chunk = 0;
    for (index, (metric, _)) in part.metrics.iter().enumerate() {
        let extent = part.history_extents.get(index).copied().unwrap_or_default();
        if let (Some(from_s), Some(held_from_s)) = (extent.from_s, extent.held_from_s) {
            let first_s = held_from_s.div_euclid(HISTORY_CHUNK_S) * HISTORY_CHUNK_S;
            if first_s < from_s {
                let first = (part.tenant.clone(), metric.clone(), first_s);
                let end = (part.tenant.clone(), metric.clone(), from_s);
                for (book_key, &(digest, written_by)) in book.chunks.range(first..end) {
                    next_book
                        .chunks
                        .insert(book_key.clone(), (digest, written_by));
                    history.push(HistoryRef {
                        metric: metric.clone(),
                        start_s: book_key.2,
                        written_by,
                    });
                }
            }
        }
        while next_chunk < chunks.len() && chunks[next_chunk].0 == index {
            let (_, start_s, chunk) = &mut chunks[next_chunk];
            next_chunk += 1;
            metric_deltas(chunk, true);
            let encoded = encode_within(RecordKind::HistoryChunk, &*chunk, record_bytes_max);
            metric_deltas(chunk, false);
            let encoded = encoded?;
            let digest = xxhash_rust::xxh3::xxh3_128(&encoded);
            let book_key = (part.tenant.clone(), metric.clone(), *start_s);
            let written_by = match book.chunks.get(&book_key) {
                Some(&(known, written_by)) if known == digest => written_by,
                _ => {
                    ops.push(Op::Put {
                        space: Space::History,
                        key: history_key(id, &part.tenant, metric, *start_s),
                        value: encoded,
                    });
                    id
                }
            };
            next_book.chunks.insert(book_key, (digest, written_by));
            history.push(HistoryRef {
                metric: metric.clone(),
                start_s: *start_s,
                written_by,
            });
        }
    }
    Ok((history, ops))
}

/// A history chunk as written (`RecordKind::HistoryChunk`), for
/// `join_history`.
pub fn decode_history_chunk(
    bytes: &[u8],
    record_bytes_max: usize,
) -> Result<MetricExport, EnvelopeError> {
    let mut chunk: MetricExport = decode(bytes, RecordKind::HistoryChunk, record_bytes_max)?;
    metric_deltas(&mut chunk, false);
    Ok(chunk)
}

/// Puts the chunks `history` lists back into `part`'s windows. A chunk
/// missing or damaged makes the part unusable (the reason is returned).
pub fn load_history(
    store: &dyn Store,
    part: &mut TenantSnapshot,
    history: &[HistoryRef],
    record_bytes_max: usize,
) -> Result<Result<(), String>, StorageError> {
    for chunk_ref in history {
        let key = history_key(
            chunk_ref.written_by,
            &part.tenant,
            &chunk_ref.metric,
            chunk_ref.start_s,
        );
        let Some(bytes) = read_value(store, Space::History, &key)? else {
            return Ok(Err(format!(
                "history of metric {} from second {} (snapshot {}) is missing",
                chunk_ref.metric, chunk_ref.start_s, chunk_ref.written_by
            )));
        };
        let chunk = match decode_history_chunk(&bytes, record_bytes_max) {
            Ok(chunk) => chunk,
            Err(error) => {
                return Ok(Err(format!(
                    "history of metric {} from second {}: {error}",
                    chunk_ref.metric, chunk_ref.start_s
                )))
            }
        };
        let Some((_, metric)) = part
            .metrics
            .iter_mut()
            .find(|(name, _)| *name == chunk_ref.metric)
        else {
            return Ok(Err(format!(
                "history of metric {} that the part does not have",
                chunk_ref.metric
            )));
        };
        join_history(metric, chunk);
    }
    Ok(Ok(()))
}

/// Every snapshot id present (with or without a manifest), newest first.
pub fn snapshot_ids(store: &dyn Store) -> Result<Vec<u64>, StorageError> {
    let mut ids = Vec::new();
    store.scan(Space::Snapshot, &[], &mut |key, _| {
        if let Some(id) = key.get(..8).and_then(key_lsn) {
            if ids.last() != Some(&id) {
                ids.push(id);
            }
        }
        true
    })?;
    ids.reverse();
    Ok(ids)
}

/// A snapshot read whole, or why it cannot be used.
pub type LoadedSnapshot = Result<(SnapshotManifest, Vec<TenantSnapshot>), String>;

/// Reads one snapshot whole. A storage error is returned as such (it says
/// nothing about the snapshot); damage is the inner `Err`.
pub fn load_snapshot(
    store: &dyn Store,
    id: u64,
    record_bytes_max: usize,
) -> Result<LoadedSnapshot, StorageError> {
    let mut manifest_bytes = None;
    let mut parts_bytes: Vec<(String, Vec<u8>)> = Vec::new();
    let prefix = id.to_be_bytes();
    store.scan(Space::Snapshot, &prefix, &mut |key, value| {
        if !key.starts_with(&prefix) {
            return false;
        }
        let rest = &key[8..];
        if rest == MANIFEST_SUFFIX {
            manifest_bytes = Some(value.to_vec());
        } else if let Some(tenant) = rest.strip_prefix(PART_INFIX) {
            parts_bytes.push((String::from_utf8_lossy(tenant).into_owned(), value.to_vec()));
        }
        true
    })?;
    let Some(manifest_bytes) = manifest_bytes else {
        return Ok(Err("no manifest (the snapshot was not finished)".into()));
    };
    let manifest: SnapshotManifest = match decode(
        &manifest_bytes,
        RecordKind::SnapshotManifest,
        record_bytes_max,
    ) {
        Ok(manifest) => manifest,
        Err(error) => return Ok(Err(format!("manifest: {error}"))),
    };
    let mut parts = Vec::with_capacity(manifest.tenants.len());
    for tenant in &manifest.tenants {
        let Some((_, bytes)) = parts_bytes.iter().find(|(name, _)| name == tenant) else {
            return Ok(Err(format!("part of tenant {tenant} is missing")));
        };
        let (mut part, history) = match decode_part(bytes, record_bytes_max) {
            Ok(decoded) => decoded,
            Err(error) => return Ok(Err(format!("part of tenant {tenant}: {error}"))),
        };
        if let Err(reason) = load_history(store, &mut part, &history, record_bytes_max)? {
            return Ok(Err(format!("part of tenant {tenant}: {reason}")));
        }
        parts.push(part);
    }
    Ok(Ok((manifest, parts)))
}

/// The manifest of snapshot `id`, when there is one and it decodes.
fn read_manifest(
    store: &dyn Store,
    id: u64,
    record_bytes_max: usize,
) -> Result<Option<SnapshotManifest>, StorageError> {
    let Some(bytes) = read_value(store, Space::Snapshot, &manifest_key(id))? else {
        return Ok(None);
    };
    Ok(decode::<SnapshotManifest>(&bytes, RecordKind::SnapshotManifest, record_bytes_max).ok())
}

/// The manifest of a snapshot when it reads and every part it lists is there.
fn complete_manifest(
    store: &dyn Store,
    id: u64,
    record_bytes_max: usize,
) -> Result<Option<SnapshotManifest>, StorageError> {
    let Some(manifest) = read_manifest(store, id, record_bytes_max)? else {
        return Ok(None);
    };
    for tenant in &manifest.tenants {
        if !super::has_value(store, Space::Snapshot, &part_key(id, tenant))? {
            return Ok(None);
        }
    }
    Ok(Some(manifest))
}

/// Each tenant's run ids, as a snapshot lists them.
type RunLists = Vec<(String, Vec<u64>)>;

/// The run ids each part of snapshot `id` lists, by tenant; `None` when the
/// snapshot cannot be read (no manifest, a part missing or damaged). Reads
/// the small lists written beside the parts; a part written before them
/// (`RecordKind::SnapshotRuns`) is decoded whole.
fn listed_runs(
    store: &dyn Store,
    id: u64,
    record_bytes_max: usize,
) -> Result<Option<RunLists>, StorageError> {
    let Some(manifest) = read_manifest(store, id, record_bytes_max)? else {
        return Ok(None);
    };
    let mut lists = Vec::with_capacity(manifest.tenants.len());
    for tenant in manifest.tenants {
        let runs = match read_value(store, Space::Snapshot, &runs_key(id, &tenant))? {
            Some(bytes) => {
                decode::<Vec<u64>>(&bytes, RecordKind::SnapshotRuns, record_bytes_max).ok()
            }
            None => match read_value(store, Space::Snapshot, &part_key(id, &tenant))? {
                Some(bytes) => decode_part(&bytes, record_bytes_max)
                    .ok()
                    .map(|(part, _)| part.runs.iter().map(|run| run.id).collect()),
                None => None,
            },
        };
        let Some(runs) = runs else {
            return Ok(None);
        };
        lists.push((tenant, runs));
    }
    Ok(Some(lists))
}

/// Deletes every run file of `tenants` that no snapshot in the store lists
/// (call after pruning, so that what is left is what is kept). Returns the
/// files deleted.
pub fn delete_unlisted_runs(
    store: &dyn Store,
    data_dir: &std::path::Path,
    tenants: &[String],
    record_bytes_max: usize,
) -> Result<usize, String> {
    let mut listed: std::collections::HashMap<String, std::collections::HashSet<u64>> =
        std::collections::HashMap::new();
    for id in snapshot_ids(store).map_err(|e| e.to_string())? {
        match listed_runs(store, id, record_bytes_max).map_err(|e| e.to_string())? {
            Some(lists) => {
                for (tenant, runs) in lists {
                    listed.entry(tenant).or_default().extend(runs);
                }
            }
            // a snapshot that cannot be read lists runs nobody can tell: keep all
            None => return Ok(0),
        }
    }
    let mut deleted = 0;
    for tenant in tenants {
        let dir = super::runs::runs_dir(data_dir, tenant);
        let empty = std::collections::HashSet::new();
        deleted += super::runs::delete_unlisted(&dir, listed.get(tenant).unwrap_or(&empty))?;
    }
    Ok(deleted)
}

/// The keys of the history chunks a part lists; `None` when the part
/// cannot be read.
fn listed_history(
    store: &dyn Store,
    id: u64,
    tenant: &str,
    record_bytes_max: usize,
) -> Result<Option<Vec<Vec<u8>>>, StorageError> {
    let Some(bytes) = read_value(store, Space::Snapshot, &part_key(id, tenant))? else {
        return Ok(None);
    };
    let Ok((_, history)) = decode_part(&bytes, record_bytes_max) else {
        return Ok(None);
    };
    Ok(Some(
        history
            .iter()
            .map(|chunk| history_key(chunk.written_by, tenant, &chunk.metric, chunk.start_s))
            .collect(),
    ))
}

/// Removals of the history chunks that no snapshot of `kept` lists among
/// those the snapshots `removed` listed or wrote (or, with `sweep`, among
/// all: after a start, for chunks of a snapshot that never finished and
/// whose id no snapshot has). Nothing when a kept part cannot be read: what
/// it lists is unknown, so every chunk stays. A chunk stays listed by every
/// snapshot after the one that wrote it until it changes, so the chunks that
/// lose their last listing are among those the snapshots pruned listed.
fn unlisted_history_ops(
    store: &dyn Store,
    kept: &[SnapshotManifest],
    removed: &[u64],
    sweep: bool,
    record_bytes_max: usize,
) -> Result<Vec<Op>, StorageError> {
    if kept.is_empty() {
        return Ok(Vec::new());
    }
    let mut listed = std::collections::HashSet::new();
    for manifest in kept {
        for tenant in &manifest.tenants {
            match listed_history(store, manifest.id, tenant, record_bytes_max)? {
                Some(keys) => listed.extend(keys),
                None => return Ok(Vec::new()),
            }
        }
    }
    let mut candidates = std::collections::BTreeSet::new();
    let mut visit = |key: &[u8]| {
        if !listed.contains(key) {
            candidates.insert(key.to_vec());
        }
    };
    if sweep {
        store.scan(Space::History, &[], &mut |key, _| {
            visit(key);
            true
        })?;
    }
    for &id in removed {
        let prefix = id.to_be_bytes();
        store.scan(Space::History, &prefix, &mut |key, _| {
            if !key.starts_with(&prefix) {
                return false;
            }
            visit(key);
            true
        })?;
        let Some(manifest) = read_manifest(store, id, record_bytes_max)? else {
            continue;
        };
        for tenant in &manifest.tenants {
            let keys = listed_history(store, id, tenant, record_bytes_max)?;
            for key in keys.unwrap_or_default() {
                visit(&key);
            }
        }
    }
    Ok(candidates
        .into_iter()
        .map(|key| Op::Remove {
            space: Space::History,
            key,
        })
        .collect())
}

/// Removals that keep the newest `keep` complete snapshots (manifest readable,
/// every part present) and the log they may need: every other snapshot goes,
/// unfinished ones included, and the log is cut at the smallest position of the
/// kept ones, so that falling back to any of them after damage to a newer one
/// loses nothing. The new floor is written with the removals, and the
/// removals of the history chunks no kept snapshot lists
/// (`unlisted_history_ops`; `sweep_history` looks at every chunk, for the
/// first prune after a start).
pub fn prune_ops(
    store: &dyn Store,
    keep: usize,
    sweep_history: bool,
    record_bytes_max: usize,
) -> Result<Vec<Op>, StorageError> {
    let mut kept = Vec::new();
    let mut removed = Vec::new();
    let mut ops = Vec::new();
    for id in snapshot_ids(store)? {
        if kept.len() < keep.max(1) {
            if let Some(manifest) = complete_manifest(store, id, record_bytes_max)? {
                kept.push(manifest);
                continue;
            }
        }
        removed.push(id);
        let prefix = id.to_be_bytes();
        store.scan(Space::Snapshot, &prefix, &mut |key, _| {
            if !key.starts_with(&prefix) {
                return false;
            }
            ops.push(Op::Remove {
                space: Space::Snapshot,
                key: key.to_vec(),
            });
            true
        })?;
    }
    // read before the removals above are applied
    ops.extend(unlisted_history_ops(
        store,
        &kept,
        &removed,
        sweep_history,
        record_bytes_max,
    )?);
    let Some(floor) = kept.iter().map(|manifest| manifest.min_position_lsn).min() else {
        return Ok(ops);
    };
    let previous = super::wal_floor(store)?;
    if floor <= previous {
        return Ok(ops);
    }
    store.scan(Space::Wal, &[], &mut |key, _| match key_lsn(key) {
        Some(lsn) if lsn <= floor => {
            ops.push(Op::Remove {
                space: Space::Wal,
                key: lsn_key(lsn).to_vec(),
            });
            true
        }
        _ => false,
    })?;
    ops.push(Op::Put {
        space: Space::Meta,
        key: WAL_FLOOR_KEY.to_vec(),
        value: lsn_key(floor).to_vec(),
    });
    Ok(ops)
}
