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
use crate::domain::metric::{MetricExport, SeriesExport, VariantSetExport};
use crate::domain::tenant::{Plan, QuarantineWrite};

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
    fn series(export: &mut SeriesExport, forward: bool) {
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
    for (_, metric) in &mut part.metrics {
        series(&mut metric.total, forward);
        for (_, breakdown) in &mut metric.breakdowns {
            for (_, export) in breakdown {
                series(export, forward);
            }
        }
    }
    for (_, sets) in &mut part.experiments {
        for set in sets {
            for export in &mut set.windows {
                series(export, forward);
            }
        }
    }
}

/// Decodes a part of any of its shapes.
pub fn decode_part(bytes: &[u8], record_bytes_max: usize) -> Result<TenantSnapshot, EnvelopeError> {
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

/// The writes of a snapshot: its parts (each with the ids of its runs), then its manifest. A part larger than
/// `record_bytes_max` fails the snapshot (older ones stay, nothing is pruned).
pub fn snapshot_ops(
    id: u64,
    created_ms: i64,
    parts: &mut [TenantSnapshot],
    record_bytes_max: usize,
) -> Result<Vec<Op>, EnvelopeError> {
    let mut ops = Vec::with_capacity(2 * parts.len() + 1);
    for part in parts.iter_mut() {
        // encoded as differences in place, then given back as they were
        deltas(part, true);
        let encoded = encode_within(RecordKind::SnapshotPartDeltas, &*part, record_bytes_max);
        deltas(part, false);
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
    Ok(ops)
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
        match decode_part(bytes, record_bytes_max) {
            Ok(part) => parts.push(part),
            Err(error) => return Ok(Err(format!("part of tenant {tenant}: {error}"))),
        }
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
                    .map(|part| part.runs.iter().map(|run| run.id).collect()),
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

/// Removals that keep the newest `keep` complete snapshots (manifest readable,
/// every part present) and the log they may need: every other snapshot goes,
/// unfinished ones included, and the log is cut at the smallest position of the
/// kept ones, so that falling back to any of them after damage to a newer one
/// loses nothing. The new floor is written with the removals.
pub fn prune_ops(
    store: &dyn Store,
    keep: usize,
    record_bytes_max: usize,
) -> Result<Vec<Op>, StorageError> {
    let mut kept = Vec::new();
    let mut ops = Vec::new();
    for id in snapshot_ids(store)? {
        if kept.len() < keep.max(1) {
            if let Some(manifest) = complete_manifest(store, id, record_bytes_max)? {
                kept.push(manifest);
                continue;
            }
        }
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
