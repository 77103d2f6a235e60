//! The audit trail (docs/audit.md): who read or changed which tenant's data,
//! when, through which route, and how many rows. Records are queued by the
//! surfaces (the HTTP middleware, live subscriptions, scrapes) and written by
//! one task straight to the store's `audit` space (not through the committer:
//! ingest's group commit never waits for them), flushed within a second,
//! pruned by age and count. Bursts of 401/403 from one address are counted.
//! Owns: the records' seq, their queue, retention, the burst counts.
//! Must not: decide who may read what (`auth` does), or hold a request up for
//! longer than its record takes to be queued.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::auth::{Caller, Principal};
use crate::node::Node;
use crate::storage::{Op, Space, StorageError, Store};

/// The tenant of a record (and the `tenant` label of its telemetry) that
/// is about every tenant: an admin's scrape, a burst of refusals. Never a
/// tenant id (those match `[a-z0-9_-]`).
pub const EVERY_TENANT: &str = "*";

/// One access.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Set when written: node-wide, increasing.
    #[serde(default)]
    pub seq: u64,
    #[serde(rename = "at")]
    pub at_ms: i64,
    /// Which key: `admin:`/`tenant:` and the first 16 hex digits of its
    /// SHA-256 (never the secret), `scrape`, or `anonymous`.
    pub key: String,
    /// The tenant read, or `*` for every tenant.
    pub tenant: String,
    /// The route (`GET /v1/metrics/{name}`), `ws subscribe`, or
    /// `auth_failure_burst`.
    pub action: String,
    /// What was asked: the path with its query, or the subscription.
    pub target: String,
    pub status: u16,
    pub rows: u64,
    /// `rows` at or past `audit.large_read_rows`.
    pub large: bool,
    pub address: Option<String>,
}

/// Rows a response returned, set by the handler as a response extension.
#[derive(Debug, Clone, Copy)]
pub struct AuditRows(pub u64);

/// The id of a key as records show it.
pub fn key_id(caller: &Caller, token: Option<&str>) -> String {
    let digest = |token: &str| {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        crate::auth::digest_id(&digest)
    };
    match (caller, token) {
        (Caller::Key(Principal::Admin), Some(token)) => format!("admin:{}", digest(token)),
        (Caller::Key(Principal::Tenant(_)), Some(token)) => format!("tenant:{}", digest(token)),
        (Caller::Scrape, _) => "scrape".into(),
        _ => "anonymous".into(),
    }
}

/// Failures of one address in the current minute.
#[derive(Debug, Clone, Copy, Default)]
struct Failures {
    minute: i64,
    count: u32,
}

/// The queue side of the trail, on the node.
pub struct AuditLog {
    sender: mpsc::Sender<AuditRecord>,
    large_read_rows: u64,
    burst: u32,
    /// At most `audit.burst_addresses_max` addresses; the map is cleared when
    /// full (an attacker cycling addresses is counted by
    /// `tally_auth_failures_total`).
    failures: Mutex<HashMap<IpAddr, Failures>>,
    addresses_max: usize,
}

impl AuditLog {
    /// The log and the receiving end for `run`.
    pub fn new(config: &crate::config::AuditConfig) -> (AuditLog, mpsc::Receiver<AuditRecord>) {
        let (sender, receiver) = mpsc::channel(config.queue_max);
        (
            AuditLog {
                sender,
                large_read_rows: config.large_read_rows,
                burst: config.auth_failures_per_minute_max,
                failures: Mutex::new(HashMap::new()),
                addresses_max: config.burst_addresses_max,
            },
            receiver,
        )
    }

    /// Queues a record (waits for room: a reader may wait, nothing is lost).
    pub async fn record(&self, mut record: AuditRecord) {
        record.large = record.rows >= self.large_read_rows;
        if record.large {
            crate::telemetry::count_large_read(&record.tenant);
        }
        let _ = self.sender.send(record).await;
    }

    /// Counts a 401 or 403; the failure that takes an address past
    /// `audit.auth_failures_per_minute_max` in a minute is a burst: counted,
    /// and recorded once that minute.
    pub async fn auth_failure(&self, address: Option<IpAddr>, status: u16, now_ms: i64) {
        crate::telemetry::count_auth_failure(status);
        let Some(address) = address else {
            return;
        };
        let minute = now_ms.div_euclid(60_000);
        let burst = {
            let mut failures = self
                .failures
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if failures.len() >= self.addresses_max && !failures.contains_key(&address) {
                failures.clear();
            }
            let entry = failures.entry(address).or_default();
            if entry.minute != minute {
                *entry = Failures { minute, count: 0 };
            }
            entry.count += 1;
            entry.count == self.burst + 1
        };
        if burst {
            crate::telemetry::count_auth_failure_burst();
            self.record(AuditRecord {
                seq: 0,
                at_ms: now_ms,
                key: "anonymous".into(),
                tenant: EVERY_TENANT.into(),
                action: "auth_failure_burst".into(),
                target: format!("more than {} refusals (401/403) in a minute", self.burst),
                status,
                rows: 0,
                large: false,
                address: Some(address.to_string()),
            })
            .await;
        }
    }
}

pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn key_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// The records after `since` (oldest first) that `tenant` may see (`None`:
/// every tenant's), at most `limit`, looking at no more than `scan_max`
/// records; and the seq to ask again with.
pub fn read_since(
    store: &dyn Store,
    since: u64,
    tenant: Option<&str>,
    limit: usize,
    scan_max: usize,
) -> Result<(Vec<AuditRecord>, u64), StorageError> {
    let mut records = Vec::new();
    let mut next_since = since;
    let mut scanned = 0usize;
    store.scan(
        Space::Audit,
        &seq_key(since.saturating_add(1)),
        &mut |key, value| {
            let Some(seq) = key_seq(key) else {
                return true;
            };
            scanned += 1;
            next_since = seq;
            if let Ok(record) = serde_json::from_slice::<AuditRecord>(value) {
                if tenant.is_none_or(|tenant| record.tenant == tenant) {
                    records.push(record);
                }
            }
            records.len() < limit && scanned < scan_max
        },
    )?;
    Ok((records, next_since))
}

/// Writes queued records until the queue closes; flushes once a second
/// while it writes; prunes once a minute.
pub async fn run(node: Arc<Node>, mut receiver: mpsc::Receiver<AuditRecord>) {
    let store = Arc::clone(&node.store);
    let mut next_seq = store
        .last_key(Space::Audit)
        .ok()
        .flatten()
        .and_then(|key| key_seq(&key))
        .map_or(1, |seq| seq + 1);
    let mut flush = tokio::time::interval(Duration::from_secs(1));
    let mut prune = tokio::time::interval(Duration::from_secs(60));
    let mut unflushed = false;
    let mut closing = false;
    let mut stopping = node.stopping.subscribe();
    loop {
        tokio::select! {
            received = receiver.recv() => {
                let Some(first) = received else { break };
                let mut batch = vec![first];
                while batch.len() < 1_024 {
                    match receiver.try_recv() {
                        Ok(record) => batch.push(record),
                        Err(_) => break,
                    }
                }
                let mut ops = Vec::with_capacity(batch.len());
                for mut record in batch {
                    record.seq = next_seq;
                    next_seq += 1;
                    if let Ok(value) = serde_json::to_vec(&record) {
                        ops.push(Op::Put { space: Space::Audit, key: seq_key(record.seq).to_vec(), value });
                    }
                }
                // nothing is written while the disk is short (reads go on)
                if node.disk_short().is_some() {
                    crate::telemetry::count_audit_dropped(ops.len() as u64);
                    continue;
                }
                let writing = Arc::clone(&store);
                let written = tokio::task::spawn_blocking(move || writing.apply(&ops)).await;
                if !matches!(written, Ok(Ok(()))) {
                    tracing::warn!("audit records not written");
                }
                unflushed = true;
            }
            _ = flush.tick() => {
                if unflushed {
                    unflushed = false;
                    let flushing = Arc::clone(&store);
                    let _ = tokio::task::spawn_blocking(move || flushing.flush()).await;
                }
            }
            _ = prune.tick() => {
                let pruning = Arc::clone(&store);
                let (retention_s, records_max) = (node.config.audit.retention_s, node.config.audit.records_max);
                let cutoff_ms = node.now_ms() - retention_s.saturating_mul(1000);
                let last = next_seq.saturating_sub(1);
                let _ = tokio::task::spawn_blocking(move || prune_records(&*pruning, cutoff_ms, last, records_max)).await;
            }
            () = async { let _ = stopping.wait_for(|stopping| *stopping).await; }, if !closing => {
                // what is queued now is written, then one last flush
                closing = true;
                receiver.close();
            }
        }
    }
    let _ = tokio::task::spawn_blocking(move || store.flush()).await;
}

/// Removes the records older than `cutoff_ms`, and the oldest past
/// `records_max` (the last seq written is `last`).
fn prune_records(
    store: &dyn Store,
    cutoff_ms: i64,
    last: u64,
    records_max: u64,
) -> Result<(), StorageError> {
    let keep_from = last.saturating_sub(records_max.saturating_sub(1));
    // in rounds of 100 000, until nothing more goes: retention holds however
    // many records a minute brings
    loop {
        let mut removals = Vec::new();
        store.scan(Space::Audit, &seq_key(0), &mut |key, value| {
            let Some(seq) = key_seq(key) else {
                return true;
            };
            let old = serde_json::from_slice::<AuditRecord>(value)
                .map(|record| record.at_ms < cutoff_ms)
                .unwrap_or(true);
            if seq < keep_from || old {
                removals.push(Op::Remove {
                    space: Space::Audit,
                    key: key.to_vec(),
                });
                removals.len() < 100_000
            } else {
                false
            }
        })?;
        let full = removals.len() == 100_000;
        store.apply(&removals)?;
        if !full {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SledStore;

    fn record(seq: u64, at_ms: i64, tenant: &str) -> Op {
        let record = AuditRecord {
            seq,
            at_ms,
            key: "scrape".into(),
            tenant: tenant.into(),
            action: "GET /metrics".into(),
            target: "/metrics".into(),
            status: 200,
            rows: 1,
            large: false,
            address: None,
        };
        Op::Put {
            space: Space::Audit,
            key: seq_key(seq).to_vec(),
            value: serde_json::to_vec(&record).unwrap(),
        }
    }

    fn seqs(store: &dyn Store, tenant: Option<&str>) -> Vec<u64> {
        read_since(store, 0, tenant, 100, 1_000)
            .unwrap()
            .0
            .iter()
            .map(|r| r.seq)
            .collect()
    }

    #[test]
    fn records_go_by_age_and_by_count_and_pages_filter_by_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open_with_cache(dir.path(), 1 << 20).unwrap();
        let ops: Vec<Op> = (1..=10)
            .map(|seq| {
                record(
                    seq,
                    seq as i64 * 1_000,
                    if seq % 2 == 0 { "a" } else { "b" },
                )
            })
            .collect();
        store.apply(&ops).unwrap();
        assert_eq!(seqs(&store, Some("a")), [2, 4, 6, 8, 10]);
        // a page stops at its limit and says where to go on
        let (page, next) = read_since(&store, 0, None, 3, 1_000).unwrap();
        assert_eq!((page.len(), next), (3, 3));
        // a page that looks at few records says how far it looked
        let (page, next) = read_since(&store, 0, Some("a"), 100, 3).unwrap();
        assert_eq!((page.len(), next), (1, 3));
        // older than 3.5 s go
        prune_records(&store, 3_500, 10, 1_000).unwrap();
        assert_eq!(seqs(&store, None), [4, 5, 6, 7, 8, 9, 10]);
        // at most 5 kept: the oldest go
        prune_records(&store, 0, 10, 5).unwrap();
        assert_eq!(seqs(&store, None), [6, 7, 8, 9, 10]);
    }
}
