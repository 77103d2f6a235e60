//! Recovery at start-up: the newest snapshot whose every part reads, then the
//! log records after each tenant's position, then the quarantine. A snapshot or
//! record that fails its checksum is reported and skipped (for the next older
//! snapshot), never a panic.
//! Owns: rebuilding the domain state of every configured tenant. Must not start
//! actors or write anything but the removals of entries it cannot use.

use std::collections::HashMap;
use std::sync::Arc;

use chrono_tz::Tz;

use crate::clock::Stopwatch;
use crate::config::Config;
use crate::domain::dedup::{DedupIndex, Run};
use crate::domain::experiment::StoredExperiment;
use crate::domain::metric::{MetricState, SeriesSettings, Watched};
use crate::domain::quarantine::{QuarantineStore, QuarantinedEvent};
use crate::domain::tenant::{TenantContext, TenantCore};
use crate::domain::time::{day_bounds, second_of_ms, BUCKET_HISTORY_S};

use super::envelope::{decode, RecordKind};
use super::runs::{delete_merges, read_run, runs_dir};
use super::snapshot::{load_snapshot, snapshot_ids, TenantSnapshot, WalBatch};
use super::{key_lsn, lsn_key, quarantine_key, wal_floor, Space, StorageError, Store};

/// The state of one tenant, ready for its actors.
pub struct RecoveredTenant {
    pub core: TenantCore,
    /// Indexed like the catalogue; `None` for metrics without state.
    pub metrics: Vec<Option<MetricState>>,
    /// The experiments its metrics count per variant.
    pub watched: Vec<Watched>,
}

impl RecoveredTenant {
    /// A tenant with nothing recovered: one added at run time.
    pub fn fresh(config: &Config, context: Arc<TenantContext>, now_ms: i64) -> RecoveredTenant {
        let dedup = DedupIndex::new(config.ingest.dedup_horizon_s, config.ingest.dedup_ids_max());
        let quarantine = QuarantineStore::new(
            config.quarantine.events_per_tenant_max,
            config.quarantine.raw_bytes_max,
        );
        let metrics = context.catalogue.metrics().iter().map(|_| None).collect();
        RecoveredTenant {
            core: TenantCore::new(context, dedup, quarantine, now_ms),
            metrics,
            watched: Vec::new(),
        }
    }
}

/// What recovery did, for the log and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub snapshot_id: Option<u64>,
    pub snapshots_skipped: Vec<(u64, String)>,
    pub records_replayed: u64,
    pub records_skipped: Vec<(u64, String)>,
    pub quarantined_loaded: u64,
    /// Reading the snapshot and the runs it lists.
    pub snapshot_ms: u64,
    /// Replaying the log past the snapshot.
    pub replay_ms: u64,
    pub duration_ms: u64,
}

pub struct Recovered {
    pub tenants: HashMap<String, RecoveredTenant>,
    /// The LSN the next log record gets.
    pub next_lsn: u64,
    /// The id the next snapshot gets.
    pub next_snapshot_id: u64,
    pub report: RecoveryReport,
}

/// The settings every series of a tenant is built with.
pub fn series_settings(config: &Config, tz: Tz) -> SeriesSettings {
    SeriesSettings {
        ahead_s: (config.ingest.max_clock_skew_ms + 999) / 1000,
        tz,
        histogram_value_max: config.windows.histogram_value_max,
        series_max: config.windows.max_series_per_metric,
    }
}

/// The de-dup runs every part lists, read back. A run that cannot be read
/// makes the snapshot unusable, unless every id in it is expired already (the
/// run was only kept because an older snapshot listed it).
fn load_runs(
    config: &Config,
    contexts: &[Arc<TenantContext>],
    parts: &[TenantSnapshot],
    now_ms: i64,
) -> Result<HashMap<String, Vec<Run>>, String> {
    let now_s = second_of_ms(now_ms);
    let mut loaded = HashMap::new();
    // merges a stopped or killed node left unfinished; no merge runs yet
    for context in contexts {
        let dir = runs_dir(&config.storage.data_dir, &context.id);
        delete_merges(&dir).map_err(|error| format!("tenant {}: {error}", context.id))?;
    }
    for part in parts {
        let Some(context) = contexts.iter().find(|context| *context.id == part.tenant) else {
            continue;
        };
        let today = day_bounds(now_s, context.tz);
        let oldest_kept_s = (now_s - BUCKET_HISTORY_S + 1)
            .min(today.start_s)
            .min(now_s - config.ingest.dedup_horizon_s + 1);
        let dir = runs_dir(&config.storage.data_dir, &part.tenant);
        let mut tenant_runs = Vec::with_capacity(part.runs.len());
        for meta in &part.runs {
            match read_run(&dir, meta) {
                Ok(run) => tenant_runs.push(run),
                Err(_) if meta.max_second < oldest_kept_s => {}
                Err(error) => {
                    return Err(format!("tenant {}: run {}: {error}", part.tenant, meta.id))
                }
            }
        }
        loaded.insert(part.tenant.clone(), tenant_runs);
    }
    Ok(loaded)
}

/// Recovers every tenant of `contexts` (the configured ones; records of
/// others are skipped and said so).
pub fn recover(
    store: &dyn Store,
    config: &Config,
    contexts: &[Arc<TenantContext>],
    now_ms: i64,
) -> Result<Recovered, StorageError> {
    let started = Stopwatch::start();
    let record_bytes_max = config.storage.record_bytes_max;
    let mut report = RecoveryReport::default();

    let ids = snapshot_ids(store)?;
    // past every id a history chunk was written by too: a snapshot that never
    // finished may have written chunks and nothing else
    let history_last = store
        .last_key(Space::History)?
        .and_then(|key| key.get(..8).and_then(key_lsn));
    let next_snapshot_id = ids
        .first()
        .copied()
        .max(history_last)
        .map_or(1, |id| id + 1);
    let mut snapshot: Vec<TenantSnapshot> = Vec::new();
    let mut runs: HashMap<String, Vec<Run>> = HashMap::new();
    for id in ids {
        match load_snapshot(store, id, record_bytes_max)? {
            Ok((_, parts)) => match load_runs(config, contexts, &parts, now_ms) {
                Ok(loaded) => {
                    report.snapshot_id = Some(id);
                    snapshot = parts;
                    runs = loaded;
                    break;
                }
                Err(reason) => {
                    tracing::warn!(snapshot = id, %reason, "skipping a snapshot whose de-dup runs cannot be read");
                    report.snapshots_skipped.push((id, reason));
                }
            },
            Err(reason) => {
                tracing::warn!(snapshot = id, %reason, "skipping a snapshot that cannot be used");
                report.snapshots_skipped.push((id, reason));
            }
        }
    }

    report.snapshot_ms = started.elapsed_ms();
    let mut tenants = HashMap::new();
    let mut positions: HashMap<String, u64> = HashMap::new();
    for context in contexts {
        let tenant_id: &str = &context.id;
        let catalogue = &context.catalogue;
        let settings = series_settings(config, context.tz);
        let mut dedup =
            DedupIndex::new(config.ingest.dedup_horizon_s, config.ingest.dedup_ids_max());
        // a metric gets state when the snapshot or a replayed record has some
        // for it (its actor starts with it); the others stay empty
        let mut metrics: Vec<Option<MetricState>> =
            catalogue.metrics().iter().map(|_| None).collect();
        let mut tenant_now_ms = now_ms;
        let mut position = 0;
        // the experiments as stored: replay counts each batch for those it
        // counted for live (batch times against their starts)
        let watched: Vec<Watched> = stored_experiments(store, tenant_id, record_bytes_max)?
            .iter()
            .map(|experiment| experiment.watched(catalogue))
            .collect();
        if let Some(part) = snapshot.iter().find(|part| part.tenant == tenant_id) {
            position = part.position_lsn;
            tenant_now_ms = part.now_ms;
            for run in runs.remove(tenant_id).unwrap_or_default() {
                dedup.add_run(run);
            }
            for &(key, second) in &part.dedup {
                dedup
                    .remember_accepted(key, second)
                    .map_err(|error| StorageError::Io(format!("tenant {tenant_id}: {error}")))?;
            }
            for (index, def) in catalogue.metrics().iter().enumerate() {
                if !def.kind.has_state() {
                    continue;
                }
                let Some((_, export)) = part.metrics.iter().find(|(name, _)| *name == def.name)
                else {
                    continue;
                };
                metrics[index] = MetricState::import(index, def, settings, export);
                match &mut metrics[index] {
                    None => {
                        tracing::warn!(tenant = %tenant_id, metric = %def.name, "metric changed kind since the snapshot; it starts empty");
                    }
                    Some(state) => {
                        if let Some((_, variants)) =
                            part.experiments.iter().find(|(name, _)| *name == def.name)
                        {
                            state.import_variants(variants);
                        }
                    }
                }
            }
        }
        for state in metrics.iter_mut().flatten() {
            state.watch(&watched, tenant_now_ms);
        }
        positions.insert(tenant_id.to_string(), position);
        let quarantine = QuarantineStore::new(
            config.quarantine.events_per_tenant_max,
            config.quarantine.raw_bytes_max,
        );
        tenants.insert(
            tenant_id.to_string(),
            RecoveredTenant {
                core: TenantCore::new(Arc::clone(context), dedup, quarantine, tenant_now_ms),
                metrics,
                watched,
            },
        );
    }

    // Records at or below the floor were pruned: a tenant of the snapshot whose
    // position is below it would come back with events missing. Refuse instead.
    let floor = wal_floor(store)?;
    if floor > 0 {
        let missing: Vec<String> = if snapshot.is_empty() {
            vec![format!(
                "no usable snapshot, and the log up to LSN {floor} was pruned"
            )]
        } else {
            snapshot
                .iter()
                .filter(|part| part.position_lsn < floor)
                .map(|part| {
                    format!(
                        "tenant {} needs log records after LSN {}",
                        part.tenant, part.position_lsn
                    )
                })
                .collect()
        };
        if !missing.is_empty() {
            return Err(StorageError::Io(format!(
                "recovery would lose acknowledged events ({}; the log is kept only after LSN {floor}); \
                 refusing to start: restore the data directory from a backup, or move it away to start empty",
                missing.join("; ")
            )));
        }
    }

    let replay_started = Stopwatch::start();
    // Replay the log after the lowest position; each record only for a tenant
    // whose position it is past.
    let mut next_lsn = positions.values().copied().max().unwrap_or(0) + 1;
    let from_lsn = positions.values().copied().min().unwrap_or(0) + 1;
    let mut scan_error = None;
    let mut replay_error = None;
    store.scan(Space::Wal, &lsn_key(from_lsn), &mut |key, value| {
        let Some(lsn) = key_lsn(key) else {
            return true;
        };
        next_lsn = next_lsn.max(lsn + 1);
        let batch: WalBatch = match decode(value, RecordKind::WalBatch, record_bytes_max) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(lsn, %error, "skipping a log record that cannot be read");
                report.records_skipped.push((lsn, error.to_string()));
                return true;
            }
        };
        let (Some(tenant), Some(&position)) = (tenants.get_mut(&batch.tenant), positions.get(&batch.tenant)) else {
            tracing::warn!(lsn, tenant = %batch.tenant, "log record of a tenant no longer configured; skipped");
            return true;
        };
        if lsn <= position {
            return true;
        }
        let mut events = batch.events;
        for event in &mut events {
            event.route = tenant.core.context().catalogue.route(&event.event_type);
        }
        // the core counts an id once, whatever the log holds
        let events = match tenant.core.replay(batch.now_ms, events) {
            Ok(events) => events,
            Err(error) => {
                replay_error = Some(format!("log record {lsn}: {error}"));
                return false;
            }
        };
        let feeds = events.iter().fold(0u64, |mask, event| {
            mask | event.route.feeds | event.route.feeds_numerator
        });
        let context = Arc::clone(tenant.core.context());
        let settings = series_settings(config, context.tz);
        for (index, def) in context.catalogue.metrics().iter().enumerate() {
            if feeds & (1u64 << index) != 0 && def.kind.has_state() && tenant.metrics[index].is_none() {
                let mut state = MetricState::new(index, def, settings, batch.now_ms);
                state.watch(&tenant.watched, batch.now_ms);
                tenant.metrics[index] = Some(state);
            }
        }
        for metric in tenant.metrics.iter_mut().flatten() {
            let applied = metric.apply_batch(&events, batch.now_ms, batch.now_ms);
            if applied.events_refused > 0 {
                scan_error = Some(format!("log record {lsn} broke a window invariant"));
            }
        }
        report.records_replayed += 1;
        true
    })?;
    if let Some(error) = replay_error {
        return Err(StorageError::Io(format!("recovery cannot replay: {error}")));
    }
    if let Some(error) = scan_error {
        tracing::error!(%error, "replay refused events");
    }
    if let Some(last) = store.last_key(Space::Wal)?.as_deref().and_then(key_lsn) {
        next_lsn = next_lsn.max(last + 1);
    }

    report.replay_ms = replay_started.elapsed_ms();

    // The quarantine: keys are tenant, a 0 byte, then the qid.
    let mut quarantined = Vec::new();
    let mut next_qids = Vec::new();
    store.scan(Space::Quarantine, &[], &mut |key, value| {
        let Some(split) = key.iter().position(|byte| *byte == 0) else {
            return true;
        };
        let tenant = String::from_utf8_lossy(&key[..split]).into_owned();
        if &key[split + 1..] == b"next" {
            if let Some(next) = key_lsn(value) {
                next_qids.push((tenant, next));
            }
            return true;
        }
        match decode::<QuarantinedEvent>(value, RecordKind::Quarantined, record_bytes_max) {
            Ok(entry) => quarantined.push((tenant, entry)),
            Err(error) => {
                tracing::warn!(%tenant, %error, "skipping a quarantined event that cannot be read")
            }
        }
        true
    })?;
    for (tenant_id, next) in next_qids {
        if let Some(tenant) = tenants.get_mut(&tenant_id) {
            tenant.core.reserve_qids_below(next);
        }
    }
    for (tenant_id, entry) in quarantined {
        if let Some(tenant) = tenants.get_mut(&tenant_id) {
            report.quarantined_loaded += 1;
            let evicted = tenant.core.restore_quarantined(entry);
            // a smaller bound than before: the oldest go, as they would have
            let removals: Vec<_> = evicted
                .into_iter()
                .map(|qid| super::Op::Remove {
                    space: Space::Quarantine,
                    key: quarantine_key(&tenant_id, qid),
                })
                .collect();
            store.apply(&removals)?;
        }
    }
    for tenant in tenants.values_mut() {
        // the actor starts at the instant the table was expired at
        tenant.core.advance(now_ms);
    }

    report.duration_ms = started.elapsed_ms();
    Ok(Recovered {
        tenants,
        next_lsn,
        next_snapshot_id,
        report,
    })
}

/// The experiments of a tenant as stored (`Space::Experiments`); one that
/// cannot be read is reported and left out.
pub fn stored_experiments(
    store: &dyn Store,
    tenant: &str,
    record_bytes_max: usize,
) -> Result<Vec<StoredExperiment>, StorageError> {
    let prefix = super::tenant_prefix(tenant);
    let mut values = Vec::new();
    store.scan(Space::Experiments, &prefix, &mut |key, value| {
        if !key.starts_with(&prefix) {
            return false;
        }
        values.push(value.to_vec());
        true
    })?;
    let mut experiments = Vec::with_capacity(values.len());
    for value in values {
        let stored = decode::<String>(&value, RecordKind::Experiment, record_bytes_max)
            .ok()
            .and_then(|text| serde_json::from_str::<StoredExperiment>(&text).ok());
        match stored {
            Some(experiment) => experiments.push(experiment),
            None => tracing::warn!(%tenant, "an experiment cannot be read; skipped"),
        }
    }
    Ok(experiments)
}
