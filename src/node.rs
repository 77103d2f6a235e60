//! The shared node state: config, catalogue, clock, keys, the tenants' actor
//! handles and live feeds, the store and its committer, readiness, and the
//! node-wide snapshot.
//! Owns: what every surface (HTTP, live push, Prometheus) and every service
//! (read, ingest) reaches through one `Arc<Node>`.
//! Must not: import a surface (http, live) or start anything; `app` builds it
//! and starts the tasks around it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Mutex, Semaphore};

use crate::actors::tenant::{
    AbandonRebuild, InstallCover, InstallMerged, InstallRuns, PlanCover, PlanMerge, TakeSnapshot,
};
use crate::actors::{FatalSender, TenantHandle};
use crate::auth::{tenant_for_read, AuthError, KeyRing, Principal};
use crate::clock::{SharedClock, Stopwatch};
use crate::config::Config;
use crate::domain::catalogue::Catalogue;
use crate::domain::dedup::{CoverPlan, SummaryFilter};
use crate::read::feed::TenantFeed;
use crate::registry::TenantMap;
use crate::storage::commit::Committer;
use crate::storage::snapshot::{
    delete_unlisted_runs, prune_ops, snapshot_ops, write_sealed_runs, HistoryBook,
};
use crate::storage::{SharedStore, StorageError};

/// Removals a prune commits at a time. The one commit thread applies a
/// commit whole before its next flush, so every acknowledgement waits for
/// it: sled took about 50 us a removed log record, and one commit of the
/// first snapshot's prune with four tenants (8 400 records) held every ack
/// for a second. Much smaller pieces (128) slowed the soak more than the
/// stalls did: each piece lengthens one of ingest's flushes, and a closed
/// loop loses throughput to every millisecond of ack (docs/BENCHMARKS.md,
/// ninth session).
pub const PRUNE_OPS_PER_COMMIT: usize = 1024;

/// What every request handler shares.
pub struct Node {
    pub config: Arc<Config>,
    pub catalogue: Arc<Catalogue>,
    pub clock: SharedClock,
    pub keys: KeyRing,
    /// The tenants serving now: config's, then those added and removed at
    /// run time (`tenants`). Read on every request, written rarely; a
    /// handle is cloned out, never borrowed across an await.
    pub tenants: TenantMap<TenantHandle>,
    /// Starts a tenant's actors (at start and when one is added).
    pub(crate) starter: crate::actors::TenantStarter,
    /// One change of the tenants at a time (`tenants`).
    pub tenants_writing: Mutex<()>,
    /// The tenants config lists (the seed), as opposed to those the API added.
    pub seed_tenants: Vec<String>,
    pub store: SharedStore,
    pub committer: Committer,
    /// Renders the node telemetry for /metrics.
    pub prometheus: metrics_exporter_prometheus::PrometheusHandle,
    /// Turns true when the node stops: live sessions close (1001).
    pub stopping: watch::Sender<bool>,
    /// Each tenant's live feed (API.md §5).
    pub feeds: TenantMap<TenantFeed>,
    /// Each tenant's alert rules and states (API.md §7).
    pub alerts: crate::alerting::AlertHub,
    /// Each tenant's experiments and signals (API.md §8).
    pub experiments: crate::experiments::ExperimentHub,
    /// Request body bytes being read and validated, in KiB, node-wide.
    pub ingest_kib: Arc<Semaphore>,
    /// One change of the tenant keys at a time (`keys`).
    pub keys_writing: tokio::sync::Mutex<()>,
    /// Moves after a key is revoked: live sessions check theirs.
    pub keys_changed: watch::Sender<u64>,
    /// The enrichments every event goes through (`[[enrichments]]`).
    pub enrichments: Arc<Vec<crate::domain::enrich::Enrichment>>,
    /// Each tenant's lookup tables (`lookups`).
    pub lookups: TenantMap<crate::lookups::TenantLookups>,
    /// The audit trail's queue (`audit`).
    pub audit: crate::audit::AuditLog,
    /// Places for live sockets still to authenticate (`live.unauthenticated_max`).
    pub live_unauthenticated: Arc<Semaphore>,
    /// Places for live sessions, node-wide (`live.sessions_max`).
    pub live_sessions: Arc<Semaphore>,
    pub(crate) next_snapshot_id: AtomicU64,
    /// One snapshot at a time (the periodic one and the final one); a merge
    /// commits under it too. Holds what the history chunks of the last
    /// durable snapshot say, so that the next writes only those that changed.
    pub(crate) snapshot_lock: Mutex<HistoryBook>,
    /// One merge at a time (two could plan the same runs); holds where the
    /// next merge looks first (`merge_runs_once`).
    pub(crate) merging: Mutex<usize>,
    /// One step extending a summary filter at a time (a summary has one
    /// writer); holds where the next looks first (`cover_runs_once`).
    pub(crate) covering: Mutex<usize>,
    /// One new summary filter at a time, besides the steps that extend the
    /// current ones; holds where the next looks first.
    pub(crate) rebuilding: Mutex<usize>,
    pub(crate) ready: AtomicBool,
    /// Set with the reason when the node must exit for a clean restart: a
    /// storage failure, or a tenant that stopped serving.
    pub fatal: FatalSender,
}

impl Node {
    /// Ready while started, not stopping, storage has not failed and every
    /// tenant serves.
    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why the node is not ready, if it is not.
    pub fn not_ready_reason(&self) -> Option<String> {
        if !self.ready.load(Ordering::SeqCst) {
            return Some("the node is starting or stopping".into());
        }
        if self.committer.is_failed() {
            return Some("storage failed; the node restarts".into());
        }
        let mut failed: Vec<(String, String)> = self
            .tenants
            .list()
            .into_iter()
            .filter_map(|(id, tenant)| Some((id, tenant.failure()?)))
            .collect();
        failed.sort();
        failed
            .first()
            .map(|(id, reason)| format!("tenant {id} is not serving: {reason}"))
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// `Some(free bytes)` when the data directory's filesystem has less free
    /// space than `storage.disk_free_bytes_min`; nothing should be written
    /// then but what is already under way.
    pub fn disk_short(&self) -> Option<u64> {
        let min = self.config.storage.disk_free_bytes_min;
        if min == 0 {
            return None;
        }
        match crate::storage::disk_free_bytes(&self.config.storage.data_dir) {
            Ok(free) if free < min => Some(free),
            Ok(_) => None,
            // a filesystem that cannot say is not refused for it; a write that
            // fails is storage's to report
            Err(error) => {
                tracing::warn!(%error, "cannot read the free space of the data directory");
                None
            }
        }
    }

    /// A tenant serving now.
    pub fn tenant(&self, id: &str) -> Option<Arc<TenantHandle>> {
        self.tenants.get(id)
    }

    /// Every tenant serving now, by id (a copy: the registry is not held).
    pub fn tenant_list(&self) -> Vec<(String, Arc<TenantHandle>)> {
        self.tenants.list()
    }

    /// The ids of the tenants serving now, sorted.
    pub fn tenant_ids(&self) -> Vec<String> {
        self.tenants.ids()
    }

    /// The tenant a caller reads, by every surface's one rule: a tenant key
    /// its own tenant, an admin key the tenant it names
    /// (`auth::tenant_for_read`), which must exist.
    pub fn reading_tenant(
        &self,
        principal: &Principal,
        named: Option<&str>,
    ) -> Result<Arc<TenantHandle>, AuthError> {
        let id = tenant_for_read(principal, named)?;
        self.tenant(id)
            .ok_or_else(|| AuthError::UnknownTenant(id.to_string()))
    }

    /// Holds off every snapshot while the guard lives: for tests whose
    /// de-dup table a snapshot asked for at half would empty (the test's
    /// next batch would then race it). Drop it before stopping the node,
    /// which takes a last snapshot.
    #[doc(hidden)]
    pub async fn hold_snapshots(&self) -> tokio::sync::MutexGuard<'_, HistoryBook> {
        self.snapshot_lock.lock().await
    }

    /// Snapshots every tenant and prunes what newer snapshots cover. The
    /// tenants' exports are collected from the actors; encoding and writing
    /// happen here, off the actor threads.
    pub async fn take_snapshot(&self) -> Result<SnapshotReport, SnapshotError> {
        let mut history = self.snapshot_lock.lock().await;
        if let Some(free_bytes) = self.disk_short() {
            return Err(SnapshotError::DiskShort { free_bytes });
        }
        let stopwatch = Stopwatch::start();
        // The book goes with the work and comes back only with a durable
        // snapshot: after any failure on the way (or a panic) it stays empty,
        // and the next snapshot asks for the history whole and writes every
        // chunk (the exports taken here mark the metrics' history unchanged).
        let book = std::mem::take(&mut *history);
        let whole_history = book.is_empty();
        let tenants = self.tenant_list();
        let mut taken = Vec::with_capacity(tenants.len());
        for (_, tenant) in &tenants {
            let part = tenant
                .actor
                .send(TakeSnapshot { whole_history })
                .await
                .map_err(|_| SnapshotError::Actors)?
                .map_err(|error| SnapshotError::Tenant(error.to_string()))?;
            taken.push(part);
        }
        let id = self.next_snapshot_id.fetch_add(1, Ordering::SeqCst);
        let created_ms = self.now_ms();
        let record_bytes_max = self.config.storage.record_bytes_max;
        let data_dir = self.config.storage.data_dir.clone();
        // the sealed ids become runs, durable before the manifest lists them
        let written = tokio::task::spawn_blocking(move || {
            let mut parts = Vec::with_capacity(taken.len());
            let mut installs = Vec::with_capacity(taken.len());
            for (mut part, sealed) in taken {
                let runs = write_sealed_runs(&data_dir, &mut part, &sealed);
                installs.push((part.tenant.clone(), runs));
                parts.push(part);
            }
            snapshot_ops(id, created_ms, &mut parts, record_bytes_max, &book)
                .map(|(ops, next_book)| (ops, next_book, installs))
        })
        .await
        .map_err(|_| SnapshotError::Actors)?;
        let (ops, next_book, installs) =
            written.map_err(|error| SnapshotError::Storage(StorageError::Io(error.to_string())))?;
        let bytes: usize = ops
            .iter()
            .map(|op| match op {
                crate::storage::Op::Put { value, .. } => value.len(),
                crate::storage::Op::Remove { .. } => 0,
            })
            .sum();
        self.committer
            .commit(ops)
            .await
            .map_err(SnapshotError::Storage)?;
        // the first prune after a start (or a failed snapshot) looks at every
        // history chunk: one of a snapshot that never finished may have an id
        // no snapshot has
        let sweep_history = whole_history;
        // durable: the next snapshot lists the chunks this one wrote or listed
        *history = next_book;
        let store = Arc::clone(&self.store);
        let keep = self.config.storage.snapshots_kept;
        let mut prune = tokio::task::spawn_blocking(move || {
            prune_ops(&*store, keep, sweep_history, record_bytes_max)
        })
        .await
        .map_err(|_| SnapshotError::Actors)?
        .map_err(SnapshotError::Storage)?;
        let removed = prune.len();
        // in pieces: ingest's writes go between them
        while !prune.is_empty() {
            let rest = prune.split_off(prune.len().min(PRUNE_OPS_PER_COMMIT));
            self.committer
                .commit(prune)
                .await
                .map_err(SnapshotError::Storage)?;
            prune = rest;
        }
        for (tenant, runs) in installs {
            if let Some(handle) = self.tenant(&tenant) {
                // the actor may be gone; its runs are listed and read back on restart
                let _ = handle.actor.send(InstallRuns(runs)).await;
            }
        }
        // runs no kept snapshot lists: expired, or from an unfinished snapshot
        let store = Arc::clone(&self.store);
        let data_dir = self.config.storage.data_dir.clone();
        let tenants: Vec<String> = self.tenant_ids();
        let deleted = tokio::task::spawn_blocking(move || {
            delete_unlisted_runs(&*store, &data_dir, &tenants, record_bytes_max)
        })
        .await
        .map_err(|_| SnapshotError::Actors)?;
        if let Err(error) = deleted {
            tracing::warn!(%error, "old de-dup runs not deleted; the next snapshot tries again");
        }
        let report = SnapshotReport {
            id,
            bytes,
            removed,
            duration_ms: stopwatch.elapsed_ms(),
        };
        crate::telemetry::record_snapshot(report.duration_ms as f64 / 1000.0, bytes);
        tracing::info!(
            id,
            bytes,
            removed,
            duration_ms = report.duration_ms,
            "snapshot written"
        );
        Ok(report)
    }
}

impl Node {
    /// Merges one tenant's de-dup runs, if any has runs to merge
    /// (`DedupIndex::plan_merge`); true when it merged. The merge is written
    /// off the actor and the snapshot path; only its commit (a rename) waits
    /// for a snapshot under way, so that no snapshot deletes the new run as
    /// unlisted before its tenant has it. Stops early when the node stops.
    pub async fn merge_runs_once(self: &Arc<Self>) -> Result<bool, MergeError> {
        if let Some(free_bytes) = self.disk_short() {
            return Err(MergeError::DiskShort { free_bytes });
        }
        // each call starts one tenant further, so that no tenant waits on another's merges
        let mut cursor = self.merging.lock().await;
        let start = *cursor;
        *cursor = cursor.wrapping_add(1);
        // only tenants with enough runs to merge (copying 10 000 ids a second
        // to look at each was most of an idle node's cpu), by id
        let tenants = self
            .tenants
            .list_where(|tenant| tenant.runs.get().runs.len() >= crate::domain::dedup::MERGE_FANIN);
        for (tenant, handle) in rotated(&tenants, start) {
            // fewer runs than a merge takes: no message to the actor (with
            // many tenants, asking each every second cost a quarter of a core)
            if handle.runs.get().runs.len() < crate::domain::dedup::MERGE_FANIN {
                continue;
            }
            let Some(plan) = handle
                .actor
                .send(PlanMerge)
                .await
                .map_err(|_| MergeError::Actors)?
            else {
                continue;
            };
            let stopwatch = Stopwatch::start();
            let dir = crate::storage::runs::runs_dir(&self.config.storage.data_dir, tenant);
            let inputs: Vec<u64> = plan.inputs.iter().map(|run| run.meta.id).collect();
            let node = Arc::clone(self);
            let merged = crate::background::run_behind("tally-merge", move || {
                let cancelled = || *node.stopping.borrow();
                crate::storage::runs::merge_runs(&dir, &plan, &cancelled)
                    .map(|merged| merged.map(|merged| (dir, merged)))
            })
            .await
            .map_err(MergeError::Upkeep)?
            .map_err(MergeError::Io)?;
            let Some((dir, merged)) = merged else {
                return Ok(false);
            };
            let ids = merged.meta.ids;
            let _no_snapshot_meanwhile = self.snapshot_lock.lock().await;
            let run = tokio::task::spawn_blocking(move || {
                crate::storage::runs::commit_merge(&dir, merged)
            })
            .await
            .map_err(|_| MergeError::Actors)?
            .map_err(MergeError::Io)?;
            let id = run.meta.id;
            handle
                .actor
                .send(InstallMerged {
                    run,
                    inputs: inputs.clone(),
                })
                .await
                .map_err(|_| MergeError::Actors)?;
            tracing::info!(
                %tenant,
                run = id,
                ?inputs,
                ids,
                duration_ms = stopwatch.elapsed_ms(),
                "de-dup runs merged"
            );
            return Ok(true);
        }
        Ok(false)
    }
}

impl Node {
    /// Does one tenant's next summary filter step of the kind asked, if any
    /// tenant wants one: builds a new summary from every run (`rebuild`,
    /// the rebuilder's task), or adds the runs not yet covered to the
    /// current one (the indexer's task, which goes on while a rebuild runs:
    /// docs/durability.md). True when it did. Reads the runs' keys off the
    /// actor; only the result goes through it. Stops early when the node
    /// stops.
    pub async fn cover_runs_once(self: &Arc<Self>, rebuild: bool) -> Result<bool, MergeError> {
        // each call starts one tenant further, so that no tenant waits on another's
        let mut cursor = if rebuild {
            self.rebuilding.lock().await
        } else {
            self.covering.lock().await
        };
        let start = *cursor;
        *cursor = cursor.wrapping_add(1);
        let tenants = self.tenants.list_where(|tenant| tenant.runs.wants_cover());
        for (tenant, handle) in rotated(&tenants, start) {
            let Some(plan) = handle
                .actor
                .send(PlanCover { rebuild })
                .await
                .map_err(|_| MergeError::Actors)?
            else {
                continue;
            };
            let stopwatch = Stopwatch::start();
            let covered: Vec<u64> = plan.runs().iter().map(|run| run.meta.id).collect();
            let ids: u64 = plan.runs().iter().map(|run| run.meta.ids).sum();
            let node = Arc::clone(self);
            let summary = crate::background::run_behind("tally-cover", move || {
                let cancelled = || *node.stopping.borrow();
                cover(plan, &cancelled)
            })
            .await;
            let summary = match summary {
                Ok(Ok(Some(summary))) => summary,
                failed => {
                    if rebuild {
                        // the next rebuild may be planned (the actor may be gone)
                        let _ = handle.actor.send(AbandonRebuild).await;
                    }
                    return match failed {
                        Err(error) => Err(MergeError::Upkeep(error)),
                        Ok(Err(error)) => Err(MergeError::Io(error)),
                        Ok(Ok(_)) => Ok(false),
                    };
                }
            };
            let runs = covered.len();
            handle
                .actor
                .send(InstallCover {
                    summary,
                    covered,
                    rebuilt: rebuild,
                })
                .await
                .map_err(|_| MergeError::Actors)?;
            tracing::debug!(
                %tenant,
                runs,
                ids,
                rebuilt = rebuild,
                duration_ms = stopwatch.elapsed_ms(),
                "de-dup summary filter extended"
            );
            return Ok(true);
        }
        Ok(false)
    }
}

/// Every item once, starting at `start` (modulo their number): each merge or
/// summary step starts one tenant further, so that none waits on another's.
fn rotated<T>(items: &[T], start: usize) -> impl Iterator<Item = &T> {
    let count = items.len();
    items.iter().cycle().skip(start % count.max(1)).take(count)
}

/// Carries out a summary filter step (`cover_runs_once`): the summary with the
/// plan's runs in, or `None` when the node stopped first.
fn cover(
    plan: CoverPlan,
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<Arc<SummaryFilter>>, String> {
    match plan {
        CoverPlan::Extend { summary, runs } => {
            let writer = summary.writer();
            let done =
                crate::storage::runs::cover_runs(&runs, cancelled, &mut |key| writer.insert(key))?;
            drop(writer);
            Ok(done.then_some(summary))
        }
        CoverPlan::Rebuild { ids_max, runs } => {
            // nobody sees it until it is installed: plain writes
            let mut summary = SummaryFilter::new(ids_max);
            let done = crate::storage::runs::cover_runs(&runs, cancelled, &mut |key| {
                summary.insert_unshared(key)
            })?;
            Ok(done.then(|| Arc::new(summary)))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("the actors are not running")]
    Actors,
    #[error("de-dup merge failed: {0}")]
    Io(String),
    #[error(transparent)]
    Upkeep(#[from] crate::background::BackgroundError),
    #[error("the data directory has {free_bytes} bytes free, below storage.disk_free_bytes_min; merges wait")]
    DiskShort { free_bytes: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    pub id: u64,
    pub bytes: usize,
    /// Old snapshot entries and log records removed.
    pub removed: usize,
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the actors are not running")]
    Actors,
    #[error("tenant refused the snapshot: {0}")]
    Tenant(String),
    #[error(transparent)]
    Storage(StorageError),
    #[error("the data directory has {free_bytes} bytes free, below storage.disk_free_bytes_min; the snapshot waits")]
    DiskShort { free_bytes: u64 },
}
