//! Snapshots: what each tenant's state was at a log position, stored as one part
//! per tenant plus a manifest, each in its own checksummed envelope.
//! Owns: the snapshot and log record shapes, their keys, and which old
//! snapshots and log records may go once newer snapshots cover them.
//! Must not: talk to actors (the node collects the parts) or flush by itself
//! (every write goes through the committer).

use serde::{Deserialize, Serialize};

use crate::domain::event::ValidEvent;
use crate::domain::metric::MetricExport;

use super::envelope::{decode, encode, EnvelopeError, RecordKind};
use super::{key_lsn, lsn_key, Op, Space, StorageError, Store};

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

/// A tenant's state at a log position: every record of this tenant with an
/// LSN at or below `position_lsn` is reflected in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantSnapshot {
    pub tenant: String,
    pub position_lsn: u64,
    pub now_ms: i64,
    pub dedup: Vec<(u128, i64)>,
    pub metrics: Vec<(String, MetricExport)>,
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

/// The writes of a snapshot: its parts, then its manifest.
pub fn snapshot_ops(
    id: u64,
    created_ms: i64,
    parts: &[TenantSnapshot],
) -> Result<Vec<Op>, EnvelopeError> {
    let mut ops = Vec::with_capacity(parts.len() + 1);
    for part in parts {
        ops.push(Op::Put {
            space: Space::Snapshot,
            key: part_key(id, &part.tenant),
            value: encode(RecordKind::SnapshotPart, part)?,
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
        value: encode(RecordKind::SnapshotManifest, &manifest)?,
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

/// Reads one snapshot whole, or says why it cannot be used.
pub fn load_snapshot(
    store: &dyn Store,
    id: u64,
    record_bytes_max: usize,
) -> Result<(SnapshotManifest, Vec<TenantSnapshot>), String> {
    let mut manifest_bytes = None;
    let mut parts_bytes: Vec<(String, Vec<u8>)> = Vec::new();
    let prefix = id.to_be_bytes();
    store
        .scan(Space::Snapshot, &prefix, &mut |key, value| {
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
        })
        .map_err(|error| error.to_string())?;
    let manifest_bytes = manifest_bytes.ok_or("no manifest (the snapshot was not finished)")?;
    let manifest: SnapshotManifest = decode(
        &manifest_bytes,
        RecordKind::SnapshotManifest,
        record_bytes_max,
    )
    .map_err(|error| format!("manifest: {error}"))?;
    let mut parts = Vec::with_capacity(manifest.tenants.len());
    for tenant in &manifest.tenants {
        let bytes = parts_bytes
            .iter()
            .find(|(name, _)| name == tenant)
            .map(|(_, bytes)| bytes)
            .ok_or_else(|| format!("part of tenant {tenant} is missing"))?;
        let part: TenantSnapshot = decode(bytes, RecordKind::SnapshotPart, record_bytes_max)
            .map_err(|error| format!("part of tenant {tenant}: {error}"))?;
        parts.push(part);
    }
    Ok((manifest, parts))
}

/// Removals that keep the newest `keep` snapshots and the log they may need.
/// The log is cut below the oldest kept snapshot that has a readable manifest,
/// so that falling back to it after damage to a newer one loses nothing.
pub fn prune_ops(
    store: &dyn Store,
    keep: usize,
    record_bytes_max: usize,
) -> Result<Vec<Op>, StorageError> {
    let ids = snapshot_ids(store)?;
    let mut ops = Vec::new();
    let kept: Vec<u64> = ids.iter().copied().take(keep.max(1)).collect();
    for &id in ids.iter().skip(keep.max(1)) {
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
    // the oldest kept snapshot whose manifest reads decides how far the log goes
    let mut wal_floor = None;
    for &id in kept.iter().rev() {
        let mut manifest = None;
        store.scan(Space::Snapshot, &manifest_key(id), &mut |key, value| {
            if key == manifest_key(id).as_slice() {
                manifest = decode::<SnapshotManifest>(
                    value,
                    RecordKind::SnapshotManifest,
                    record_bytes_max,
                )
                .ok();
            }
            false
        })?;
        if let Some(manifest) = manifest {
            wal_floor = Some(manifest.min_position_lsn);
            break;
        }
    }
    if let Some(floor) = wal_floor {
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
    }
    Ok(ops)
}
