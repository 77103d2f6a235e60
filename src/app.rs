//! Start-up in dependency order (storage, recovery, the commit thread, actor
//! threads, tenant and metric actors over the recovered state, the snapshot
//! task, then the listener) and shutdown in reverse (stop accepting, let
//! in-flight requests finish within `shutdown_grace_ms`, take a final snapshot,
//! stop the actors and the commit thread).
//! Owns: the order of start-up and shutdown and the tasks it starts; the
//! shared state itself is `node::Node`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch, Mutex, Semaphore};
use tokio::task::JoinHandle;

use crate::actors::tenant::Durability;
use crate::actors::{ActorRuntime, FatalSender, TenantHandle, TenantStarter};
use crate::alerting::{AlertHub, TenantAlerts};
use crate::auth::KeyRing;
use crate::clock::{SharedClock, Stopwatch};
use crate::config::Config;
use crate::experiments::{ExperimentHub, TenantExperiments};
use crate::http::serve::{serve, ServeLimits};
pub use crate::node::{Node, SnapshotError, SnapshotReport};
use crate::read::feed::TenantFeed;
use crate::registry::TenantMap;
use crate::storage::commit::{Committer, FlushMode};
use crate::storage::recovery::{recover, Recovered, RecoveryReport};
use crate::storage::snapshot::HistoryBook;
use crate::storage::{SharedStore, SledStore, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid config: {0}")]
    Config(String),
    #[error("cannot open the store in {path}: {source}")]
    Store { path: String, source: StorageError },
    #[error("recovery failed: {0}")]
    Recovery(StorageError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Every `every`, runs `step` (one tenant's merge or summary step) for as
/// long as it finds work, until the node stops or storage fails; an error is
/// logged as `failed` and tried again at the next tick.
fn spawn_run_upkeep<Step, Done>(
    node: &Arc<Node>,
    every: Duration,
    failed: &'static str,
    step: Step,
) -> tokio::task::JoinHandle<()>
where
    Step: Fn(Arc<Node>) -> Done + Send + 'static,
    Done: std::future::Future<Output = Result<bool, crate::node::MergeError>> + Send,
{
    let node = Arc::clone(node);
    let mut stopping = node.stopping.subscribe();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stopping.wait_for(|stopping| *stopping) => return,
            }
            loop {
                if node.committer.is_failed() || *node.stopping.borrow() {
                    return;
                }
                match step(Arc::clone(&node)).await {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(error) => {
                        tracing::warn!(%error, "{failed}");
                        break;
                    }
                }
            }
        }
    })
}

/// Drops a request stored in `wanted` (`notify_one` keeps one for the next
/// waiter when none waits), without waiting for one.
async fn forget_request(wanted: &tokio::sync::Notify) {
    // polled first, a stored request ends the wait at once and is used up;
    // with none, the ready branch ends it
    tokio::select! {
        biased;
        _ = wanted.notified() => {}
        _ = std::future::ready(()) => {}
    }
}

/// Hands memory freed during start-up (the config's parse, recovery's decoded
/// snapshot parts and log records, the stored books read back) to the system: glibc's allocator keeps it otherwise, and a
/// restart of 10 000 idle tenants held a fifth more than a first start
/// (docs/BENCHMARKS.md, "Idle tenants").
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's own heap to the
    // system; it touches no memory the program holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn start_tenants(
    config: &Config,
    starter: &TenantStarter,
    mut recovered: Recovered,
) -> TenantMap<TenantHandle> {
    let tenants = TenantMap::default();
    for tenant in &config.tenants {
        let Some(state) = recovered.tenants.remove(&tenant.id) else {
            continue;
        };
        tenants.insert(&tenant.id, Arc::new(starter.start(state)));
    }
    tenants
}

/// A node serving on a socket.
pub struct RunningNode {
    pub node: Arc<Node>,
    pub local_addr: SocketAddr,
    /// Where /metrics is served when `prometheus.listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub recovery: RecoveryReport,
    stop_accepting: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    snapshotter: Option<JoinHandle<()>>,
    /// Upkeep and the separate /metrics listener: stopped first.
    background: Vec<JoinHandle<()>>,
    runtime: Option<ActorRuntime>,
    commit_thread: Option<std::thread::JoinHandle<()>>,
}

/// Opens the store in `storage.data_dir` and starts the node; must run inside
/// a tokio runtime.
pub async fn start(config: Config, clock: SharedClock) -> Result<RunningNode, StartError> {
    let path = config.storage.data_dir.clone();
    let cache_bytes = config.storage.cache_bytes;
    let store = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&path).map_err(|error| StorageError::Io(error.to_string()))?;
        SledStore::open_with_cache(&path, cache_bytes)
    })
    .await
    .map_err(|error| StartError::Thread(std::io::Error::other(error.to_string())))?
    .map_err(|source| StartError::Store {
        path: config.storage.data_dir.display().to_string(),
        source,
    })?;
    start_with_store(config, clock, Arc::new(store)).await
}

/// Starts the node over a given store (tests inject faulty ones).
pub async fn start_with_store(
    config: Config,
    clock: SharedClock,
    store: SharedStore,
) -> Result<RunningNode, StartError> {
    // tenants added and removed through the API, over the config's (the seed)
    let seed_tenants: Vec<String> = config.tenants.iter().map(|t| t.id.clone()).collect();
    let mut config = config;
    let config = {
        let store = Arc::clone(&store);
        let now_ms = clock.now_ms();
        tokio::task::spawn_blocking(move || {
            let stored = crate::tenants::stored(&*store, config.storage.record_bytes_max)?;
            crate::tenants::overlay(&mut config, &stored);
            crate::tenants::settle_at_start(&*store, &config, &stored, now_ms)?;
            Ok(config)
        })
        .await
        .map_err(|error| StartError::Thread(std::io::Error::other(error.to_string())))?
        .map_err(StartError::Recovery)?
    };
    // the one parse of everything the config holds as text
    let checked = config.check().map_err(|issues| {
        StartError::Config(
            issues
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let catalogue = Arc::clone(&checked.catalogue);
    let prometheus = crate::telemetry::install();

    let recovered = {
        let store = Arc::clone(&store);
        let config = config.clone();
        let contexts = checked.tenant_contexts();
        let now_ms = clock.now_ms();
        tokio::task::spawn_blocking(move || recover(&*store, &config, &contexts, now_ms))
            .await
            .map_err(|error| StartError::Thread(std::io::Error::other(error.to_string())))?
            .map_err(StartError::Recovery)?
    };
    let report = recovered.report.clone();
    crate::telemetry::record_recovery(report.duration_ms as f64 / 1000.0);
    tracing::info!(
        snapshot = ?report.snapshot_id,
        replayed = report.records_replayed,
        skipped_records = report.records_skipped.len(),
        skipped_snapshots = report.snapshots_skipped.len(),
        quarantined = report.quarantined_loaded,
        snapshot_ms = report.snapshot_ms,
        replay_ms = report.replay_ms,
        duration_ms = report.duration_ms,
        "recovered"
    );
    let next_snapshot_id = recovered.next_snapshot_id;

    // Every write set waiting is bounded by the batches and reads in flight.
    // tenants added at run time count too (tokio's bounded queue takes no
    // memory for room it does not use)
    let queue_max = config.tenants.len().max(config.admin.tenants_max).max(1)
        * (config.ingest.tenant_batches_inflight_max + config.actors.tenant_queries_inflight_max)
        + 16;
    let mode = if config.storage.group_commit {
        FlushMode::Group
    } else {
        FlushMode::EachWriteSet
    };
    let (committer, commit_thread) =
        Committer::start(Arc::clone(&store), queue_max, mode).map_err(StartError::Thread)?;
    let snapshot_wanted = Arc::new(tokio::sync::Notify::new());
    let durability = Durability {
        committer: committer.clone(),
        next_lsn: Arc::new(AtomicU64::new(recovered.next_lsn)),
        record_bytes_max: config.storage.record_bytes_max,
        snapshot_wanted: Arc::clone(&snapshot_wanted),
    };

    let runtime = ActorRuntime::start(config.shard_count()).map_err(StartError::Thread)?;
    // storage failures and tenants that stop serving both end the node
    let fatal: FatalSender = Arc::new(watch::channel(None).0);
    let starter = TenantStarter::new(
        &runtime,
        &config,
        catalogue.metrics().len(),
        durability.clone(),
        Arc::clone(&fatal),
    );
    let tenants = start_tenants(&config, &starter, recovered);
    let tenant_ids: Vec<String> = config.tenants.iter().map(|t| t.id.clone()).collect();
    // alert states come back from the records they wrote
    let alerts = {
        let alerts = AlertHub::default();
        let now_ms = clock.now_ms();
        for tenant in &tenant_ids {
            let restored = TenantAlerts::restore(
                &*store,
                tenant,
                checked.rules_for(tenant),
                checked.budgets_for(tenant),
                now_ms,
                config.storage.record_bytes_max,
            );
            match restored {
                Ok(tenant_alerts) => {
                    alerts.insert(tenant, Arc::new(tenant_alerts));
                }
                Err(error) => {
                    runtime.stop();
                    return Err(StartError::Recovery(error));
                }
            }
        }
        alerts
    };
    // experiment states come back as their last write left them
    let experiments = {
        let experiments = ExperimentHub::default();
        for tenant in &tenant_ids {
            match TenantExperiments::restore(&*store, tenant, config.storage.record_bytes_max) {
                Ok(restored) => {
                    experiments.insert(tenant, Arc::new(restored));
                }
                Err(error) => {
                    runtime.stop();
                    return Err(StartError::Recovery(error));
                }
            }
        }
        experiments
    };
    let lookups =
        match crate::lookups::restore(&*store, &tenant_ids, config.storage.record_bytes_max) {
            Ok(lookups) => lookups.into_iter().collect::<TenantMap<_>>(),
            Err(error) => {
                runtime.stop();
                return Err(StartError::Recovery(error));
            }
        };
    let keys = KeyRing::from_checked(&checked);
    // keys added and revoked through the API, over the config's
    if let Err(error) =
        crate::keys::restore(&*store, &keys, &tenant_ids, config.storage.record_bytes_max)
    {
        runtime.stop();
        return Err(StartError::Recovery(error));
    }
    let addr = checked.listen;
    let snapshot_interval = Duration::from_secs(config.storage.snapshot_interval_s);
    let ingest_kib = Arc::new(Semaphore::new(
        config.server.ingest_bytes_inflight_max / 1024,
    ));
    let feeds: TenantMap<TenantFeed> = tenant_ids
        .iter()
        .map(|tenant| (tenant.clone(), TenantFeed::new()))
        .collect();
    let live_sessions = Arc::new(Semaphore::new(config.live.sessions_max));
    let live_unauthenticated = Arc::new(Semaphore::new(config.live.unauthenticated_max));
    let (audit, audit_queue) = crate::audit::AuditLog::new(&config.audit);
    let node = Arc::new(Node {
        config: Arc::new(config),
        catalogue,
        clock,
        keys,
        tenants,
        starter,
        tenants_writing: Mutex::new(()),
        seed_tenants,
        store,
        committer,
        prometheus,
        stopping: watch::channel(false).0,
        feeds,
        alerts,
        experiments,
        ingest_kib,
        live_sessions,
        live_unauthenticated,
        enrichments: Arc::new(checked.enrichments.clone()),
        lookups,
        keys_writing: tokio::sync::Mutex::new(()),
        keys_changed: watch::channel(0).0,
        audit,
        next_snapshot_id: AtomicU64::new(next_snapshot_id),
        snapshot_lock: Mutex::new(HistoryBook::default()),
        merging: Mutex::new(0),
        covering: Mutex::new(0),
        rebuilding: Mutex::new(0),
        ready: AtomicBool::new(false),
        fatal,
    });
    // a storage failure is the committer's to report; it ends the node too
    let storage_watch = {
        let node = Arc::clone(&node);
        let mut failed = node.committer.fatal();
        let mut stopping = node.stopping.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                changed = failed.changed() => {
                    let reason = match changed {
                        Ok(()) => failed.borrow().clone().unwrap_or_else(|| "storage failed".into()),
                        // a closed channel means the commit thread is gone
                        Err(_) => "the commit thread ended".into(),
                    };
                    node.fatal.send_replace(Some(reason));
                }
                _ = stopping.wait_for(|stopping| *stopping) => {}
            }
        })
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(source) => {
            runtime.stop();
            return Err(StartError::Listen { addr, source });
        }
    };
    let local_addr = listener
        .local_addr()
        .map_err(|source| StartError::Listen { addr, source })?;
    let (stop_accepting, stopped) = oneshot::channel::<()>();
    let router = crate::http::router(Arc::clone(&node));
    let limits = ServeLimits {
        header_read_timeout: Duration::from_millis(node.config.server.header_read_timeout_ms),
        write_timeout: Duration::from_millis(node.config.server.write_timeout_ms),
        connections_max: node.config.server.connections_max,
        retry_after_s: node.config.server.retry_after_s,
    };
    let server = tokio::spawn(serve(listener, router, limits, async move {
        let _ = stopped.await;
    }));
    let snapshotter = {
        let node = Arc::clone(&node);
        let mut stopping = node.stopping.subscribe();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(snapshot_interval);
            ticks.tick().await;
            loop {
                // a snapshot under way finishes; none starts once stopping. A
                // tenant whose ids in memory reach half their cap asks for one
                // early: it moves them into a run on disk.
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = snapshot_wanted.notified() => ticks.reset(),
                    _ = stopping.wait_for(|stopping| *stopping) => return,
                }
                if node.committer.is_failed() {
                    return;
                }
                if let Err(error) = node.take_snapshot().await {
                    tracing::error!(%error, "snapshot failed");
                }
                // a tenant at half asks with every batch until its table is
                // sealed, so a request was always stored while this snapshot
                // ran, and the next one followed at once for a tenth of the
                // ids (half the snapshots of a tenant at full rate, each
                // writing every window's history again). A tenant still at
                // half asks again with its next batch.
                forget_request(&snapshot_wanted).await;
            }
        })
    };
    // merges de-dup runs so that their number grows with the logarithm of the
    // ids remembered (docs/durability.md, "de-duplication runs")
    let merger = spawn_run_upkeep(
        &node,
        Duration::from_secs(1),
        "de-dup runs not merged; trying again later",
        |node| async move { node.merge_runs_once().await },
    );
    // keeps each tenant's summary filter over its de-dup runs, so that a new
    // id costs one lookup whatever the number of runs; on its own task, so a
    // long merge does not leave new runs uncovered (docs/durability.md)
    let indexer = spawn_run_upkeep(
        &node,
        Duration::from_millis(250),
        "de-dup summary filter not extended; trying again later",
        |node| async move { node.cover_runs_once(false).await },
    );
    // builds summaries anew on a task of its own, so that the runs written
    // while one is built (8 s at 240 M ids) are added to the current one
    let rebuilder = spawn_run_upkeep(
        &node,
        Duration::from_secs(1),
        "de-dup summary filter not rebuilt; trying again later",
        |node| async move { node.cover_runs_once(true).await },
    );
    let alerting = tokio::spawn(crate::alerting::run(Arc::clone(&node)));
    let experimenting = tokio::spawn(crate::experiments::run(Arc::clone(&node)));
    let auditing = tokio::spawn(crate::audit::run(Arc::clone(&node), audit_queue));
    let alertmanager = {
        let url = node.config.alerting.alertmanager_url.clone();
        (!url.is_empty()).then(|| tokio::spawn(crate::alertmanager::run(Arc::clone(&node), url)))
    };
    let upkeep = {
        let node = Arc::clone(&node);
        let every = Duration::from_secs(node.config.prometheus.upkeep_interval_s);
        let mut stopping = node.stopping.subscribe();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = ticks.tick() => node.prometheus.run_upkeep(),
                    _ = stopping.wait_for(|stopping| *stopping) => return,
                }
            }
        })
    };
    let feed_tasks: Vec<JoinHandle<()>> = node
        .feeds
        .list()
        .into_iter()
        .map(|(tenant, feed)| {
            tokio::spawn(crate::live::run_feed(
                Arc::clone(&node),
                tenant,
                feed,
                node.stopping.subscribe(),
            ))
        })
        .collect();
    let mut metrics_addr = None;
    let metrics_server = if let Some(wanted) = checked.metrics_listen {
        let listener = tokio::net::TcpListener::bind(wanted)
            .await
            .map_err(|source| StartError::Listen {
                addr: wanted,
                source,
            })?;
        metrics_addr = listener.local_addr().ok();
        let router = crate::http::metrics_router(Arc::clone(&node));
        let mut stopping = node.stopping.subscribe();
        Some(tokio::spawn(serve(listener, router, limits, async move {
            let _ = stopping.wait_for(|stopping| *stopping).await;
        })))
    } else {
        None
    };
    node.set_ready(true);
    crate::telemetry::set_tenants(node.tenants.len());
    release_freed_memory();
    tracing::info!(%local_addr, shards = runtime.shard_count(), tenants = node.tenants.len(), "tally is serving");
    Ok(RunningNode {
        node,
        local_addr,
        metrics_addr,
        recovery: report,
        stop_accepting: Some(stop_accepting),
        server: Some(server),
        snapshotter: Some(snapshotter),
        background: vec![
            alerting,
            experimenting,
            auditing,
            merger,
            indexer,
            rebuilder,
            upkeep,
            storage_watch,
        ]
        .into_iter()
        .chain(metrics_server)
        .chain(alertmanager)
        .chain(feed_tasks)
        .collect(),
        runtime: Some(runtime),
        commit_thread: Some(commit_thread),
    })
}

impl RunningNode {
    /// Resolves with the reason once storage has failed or a tenant stopped
    /// serving: the node must exit for a clean restart.
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.node.fatal.subscribe()
    }

    /// Stops accepting, lets in-flight requests finish within the grace period,
    /// writes a final snapshot (so a restart replays nothing), then stops the
    /// actors and the commit thread.
    pub async fn shutdown(self) {
        self.stop(true).await
    }

    /// Stops like a crash would leave things: no final snapshot, so the next
    /// start recovers from the last periodic one and the log (for tests).
    pub async fn halt(self) {
        self.stop(false).await
    }

    async fn stop(mut self, final_snapshot: bool) {
        self.node.set_ready(false);
        // upgraded connections outlive the HTTP server's graceful shutdown
        self.node.stopping.send_replace(true);
        if let Some(stop) = self.stop_accepting.take() {
            let _ = stop.send(());
        }
        let grace = Duration::from_millis(self.node.config.server.shutdown_grace_ms);
        // the tasks end on `stopping`; what is left at the end of the grace
        // period is aborted
        let waiting = Stopwatch::start();
        let tasks = self
            .snapshotter
            .take()
            .into_iter()
            .chain(self.background.drain(..));
        for mut task in tasks {
            if tokio::time::timeout(waiting.left_of(grace), &mut task)
                .await
                .is_err()
            {
                tracing::warn!("a background task outlived the grace period; aborted");
                task.abort();
            }
        }
        if let Some(server) = self.server.take() {
            match tokio::time::timeout(grace, server).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "http server task failed"),
                Err(_) => tracing::warn!(
                    grace_ms = grace.as_millis() as u64,
                    "in-flight requests outlived the grace period"
                ),
            }
        }
        if final_snapshot && !self.node.committer.is_failed() {
            match tokio::time::timeout(grace, self.node.take_snapshot()).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::error!(%error, "final snapshot failed; the next start replays the log")
                }
                Err(_) => tracing::error!(
                    "final snapshot outlived the grace period; the next start replays the log"
                ),
            }
        }
        if let Some(runtime) = self.runtime.take() {
            let _ = tokio::task::spawn_blocking(move || runtime.stop()).await;
        }
        let commit_thread = self.commit_thread.take();
        // the commit thread ends once the last committer handle is gone
        drop(self);
        if let Some(thread) = commit_thread {
            let joined = tokio::task::spawn_blocking(move || thread.join());
            if tokio::time::timeout(grace, joined).await.is_err() {
                tracing::warn!("the commit thread did not stop within the grace period");
            }
        }
        tracing::info!("tally stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a wait on `wanted` ends at once (using up a stored request).
    async fn heard_at_once(wanted: &tokio::sync::Notify) -> bool {
        tokio::select! {
            biased;
            _ = wanted.notified() => true,
            _ = std::future::ready(()) => false,
        }
    }

    #[tokio::test]
    async fn a_stored_snapshot_request_is_forgotten_and_the_next_one_heard() {
        let wanted = tokio::sync::Notify::new();
        wanted.notify_one();
        wanted.notify_one();
        forget_request(&wanted).await;
        assert!(!heard_at_once(&wanted).await, "the stored request is gone");
        // nothing stored: forgetting changes nothing
        forget_request(&wanted).await;
        wanted.notify_one();
        assert!(heard_at_once(&wanted).await, "a request after is heard");
        assert!(!heard_at_once(&wanted).await, "once");
    }
}
