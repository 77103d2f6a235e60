//! The experiment engine (API.md §8, docs/experiments.md): registers
//! experiments (persisted, and counted per variant by the tenant's metric
//! actors from a moment the tenant actor stamps), looks at every running
//! experiment's guardrails on a tick through the read path, and writes each
//! transition as a signal record to the outbox, with the experiment's new
//! state, through the committer before any client hears of it.
//! Owns: the experiments' states between ticks, the sequential tests' state,
//! and the signals' seq numbers.
//! Must not: decide a breach (`domain::experiment` does) or read counts other
//! than through `read`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::actors::tenant::WatchExperiments;
use crate::actors::TenantHandle;
use crate::domain::catalogue::{Catalogue, MetricKind};
use crate::domain::experiment::{
    judge_guardrail, judge_sample_ratio, Breach, ExperimentSpec, ExperimentState, GuardrailCounts,
    StoredExperiment,
};
use crate::domain::guardrail::{Proportion, SequentialState};
use crate::domain::metric::{VariantCounts, VariantsReading, Watched};
use crate::node::Node;
use crate::read::{ReadError, TenantReader};
use crate::storage::envelope::{encode, RecordKind};
use crate::storage::outbox::{append_op, next_seq, Topic};
use crate::storage::recovery::stored_experiments;
use crate::storage::{named_key, Op, Space, StorageError, Store};

/// One signal as the outbox keeps it, the `signals` topic pushes it and
/// `GET /v1/signals` lists it (API.md §8's fields, and the state it moved to).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalRecord {
    pub seq: u64,
    /// Unique per tenant: a controller may de-duplicate by it.
    pub id: String,
    pub experiment: String,
    /// The treatment variant that breached; none for a resume.
    pub variant: Option<String>,
    /// `pause`, `stop`, `srm` (a sample-ratio mismatch; the state stays) or
    /// `resume`.
    pub action: String,
    /// The guardrail's metric (with `:p95` for a latency guardrail), `srm`,
    /// or none for a resume.
    pub guardrail: Option<String>,
    pub observed: Option<f64>,
    pub baseline: Option<f64>,
    pub threshold: Option<f64>,
    pub samples: u64,
    pub p_value: Option<f64>,
    /// The experiment's state after this signal.
    pub state: ExperimentState,
    #[serde(rename = "at")]
    pub at_ms: i64,
}

/// An experiment with what its looks carry over.
struct Live {
    stored: StoredExperiment,
    /// Per guardrail, each treatment variant's sequential test.
    tests: Vec<BTreeMap<String, SequentialState>>,
}

impl Live {
    fn new(stored: StoredExperiment) -> Live {
        let tests = vec![BTreeMap::new(); stored.spec.guardrails.len()];
        Live { stored, tests }
    }
}

#[derive(Default)]
struct Book {
    experiments: BTreeMap<String, Live>,
    next_seq: u64,
}

/// A tenant's experiments, and the last signal seq written (live sessions
/// and `GET /v1/signals` follow it).
pub struct TenantExperiments {
    book: Mutex<Book>,
    written: watch::Sender<u64>,
    /// One writer at a time: a tick, or a change through the API.
    writing: tokio::sync::Mutex<()>,
}

/// A lock whose holder cannot leave it half-changed (no code between lock
/// and unlock panics on input); a poisoned one is used as it is.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TenantExperiments {
    /// The tenant's experiments as stored, and the next signal seq after the
    /// outbox's last: states come back as the last committed write left them,
    /// so a breach signalled before a restart is not signalled again.
    pub fn restore(
        store: &dyn Store,
        tenant: &str,
        record_bytes_max: usize,
    ) -> Result<TenantExperiments, StorageError> {
        let mut book = Book {
            next_seq: next_seq(store, tenant, Topic::Signals)?,
            ..Book::default()
        };
        for stored in stored_experiments(store, tenant, record_bytes_max)? {
            book.experiments
                .insert(stored.id.clone(), Live::new(stored));
        }
        let last_written = book.next_seq - 1;
        Ok(TenantExperiments {
            book: Mutex::new(book),
            written: watch::channel(last_written).0,
            writing: tokio::sync::Mutex::new(()),
        })
    }

    pub fn written(&self) -> watch::Receiver<u64> {
        self.written.subscribe()
    }

    pub fn last_seq(&self) -> u64 {
        lock(&self.book).next_seq - 1
    }

    pub fn get(&self, id: &str) -> Option<StoredExperiment> {
        lock(&self.book)
            .experiments
            .get(id)
            .map(|live| live.stored.clone())
    }

    pub fn list(&self) -> Vec<StoredExperiment> {
        lock(&self.book)
            .experiments
            .values()
            .map(|live| live.stored.clone())
            .collect()
    }

    /// Each treatment's always-valid p-value so far, per guardrail (empty for
    /// `method = "z"`, which keeps nothing between looks).
    pub fn p_values(&self, id: &str) -> Vec<BTreeMap<String, f64>> {
        lock(&self.book)
            .experiments
            .get(id)
            .map(|live| {
                live.tests
                    .iter()
                    .map(|tests| {
                        tests
                            .iter()
                            .map(|(variant, state)| (variant.clone(), state.p_value))
                            .collect()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn watched(&self, catalogue: &Catalogue, except: Option<&str>) -> Vec<Watched> {
        lock(&self.book)
            .experiments
            .values()
            .filter(|live| Some(live.stored.id.as_str()) != except)
            .map(|live| live.stored.watched(catalogue))
            .collect()
    }
}

/// The node's experiments, by tenant.
/// Each tenant's experiments and signals.
pub type ExperimentHub = crate::registry::TenantMap<TenantExperiments>;

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("no experiment {0}")]
    NotFound(String),
    #[error("the tenant has experiments.per_tenant_max ({0}) experiments; delete one first")]
    TooMany(usize),
    #[error(
        "experiment {0} is stopped; a stopped experiment does not resume (register a new one)"
    )]
    Stopped(String),
    #[error("experiment {0} is {1}; its spec changes only while it runs (resume it, or delete it and register it again)")]
    NotRunning(String, &'static str),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("an experiment record cannot be encoded: {0}")]
    Encode(String),
    #[error("tenant {0} is not serving")]
    TenantGone(String),
}

fn parts(
    node: &Node,
    tenant: &str,
) -> Result<(Arc<TenantHandle>, Arc<TenantExperiments>), ExperimentError> {
    match (node.tenant(tenant), node.experiments.get(tenant)) {
        (Some(handle), Some(experiments)) => Ok((handle, experiments)),
        _ => Err(ExperimentError::NotFound(format!("tenant {tenant}"))),
    }
}

/// Tells the tenant actor the experiments to count; returns them stamped.
async fn watch_experiments(
    handle: &TenantHandle,
    now_ms: i64,
    watched: Vec<Watched>,
) -> Result<Arc<Vec<Watched>>, ExperimentError> {
    handle
        .actor
        .send(WatchExperiments { now_ms, watched })
        .await
        .map_err(|_| ExperimentError::TenantGone(handle.context.id.to_string()))
}

fn stored_op(tenant: &str, stored: &StoredExperiment) -> Result<Op, ExperimentError> {
    let text = serde_json::to_string(stored).map_err(|e| ExperimentError::Encode(e.to_string()))?;
    let value = encode(RecordKind::Experiment, &text)
        .map_err(|e| ExperimentError::Encode(e.to_string()))?;
    Ok(Op::Put {
        space: Space::Experiments,
        key: named_key(tenant, &stored.id),
        value,
    })
}

fn signal_op(tenant: &str, signal: &SignalRecord) -> Result<Op, ExperimentError> {
    let text = serde_json::to_string(signal).map_err(|e| ExperimentError::Encode(e.to_string()))?;
    append_op(tenant, Topic::Signals, signal.seq, &text)
        .map_err(|e| ExperimentError::Encode(e.to_string()))
}

/// Registers an experiment (persisted before it answers). The same spec
/// again changes nothing (`false`); a new one, or a changed spec of a running
/// experiment, starts it afresh: running, counted from the next batch (`true`
/// when it is new). A paused or stopped experiment's spec does not change.
pub async fn put_experiment(
    node: &Node,
    tenant: &str,
    id: &str,
    spec: ExperimentSpec,
) -> Result<(bool, StoredExperiment), ExperimentError> {
    let (handle, experiments) = parts(node, tenant)?;
    let _one_writer = experiments.writing.lock().await;
    let existing = experiments.get(id);
    match &existing {
        Some(existing) if existing.spec == spec => return Ok((false, existing.clone())),
        Some(existing) if existing.state != ExperimentState::Running => {
            return Err(ExperimentError::NotRunning(
                id.to_string(),
                existing.state.name(),
            ))
        }
        Some(_) => {}
        None => {
            let max = node.config.experiments.per_tenant_max;
            if lock(&experiments.book).experiments.len() >= max {
                return Err(ExperimentError::TooMany(max));
            }
        }
    }
    let now_ms = node.now_ms();
    let mut stored = StoredExperiment {
        id: id.to_string(),
        spec,
        state: ExperimentState::Running,
        started_ms: 0,
        epoch_ms: 0,
        srm_looks: 0,
        srm_signalled: false,
        changed_ms: now_ms,
    };
    let stamped = change_watched(
        node,
        &handle,
        &experiments,
        id,
        stored.watched(&node.catalogue),
        now_ms,
        |op| {
            let (started_ms, epoch_ms) = op;
            stored.started_ms = started_ms;
            stored.epoch_ms = epoch_ms;
            stored_op(tenant, &stored).map(|put| vec![put])
        },
    )
    .await?;
    stored.started_ms = stamped.started_ms;
    stored.epoch_ms = stamped.epoch_ms;
    lock(&experiments.book)
        .experiments
        .insert(id.to_string(), Live::new(stored.clone()));
    Ok((existing.is_none(), stored))
}

/// Changes what experiment `id` is counted from, in two steps so that a
/// failed write loses no counts: the tenant actor stamps `next` (its zero
/// moments) and the metric actors count it beside the current entry; then the
/// writes `ops` makes from the stamped moments are committed; then the
/// current entry goes (or, if the commit failed, `next` goes).
async fn change_watched(
    node: &Node,
    handle: &TenantHandle,
    experiments: &TenantExperiments,
    id: &str,
    next: Watched,
    now_ms: i64,
    ops: impl FnOnce((i64, i64)) -> Result<Vec<Op>, ExperimentError>,
) -> Result<Watched, ExperimentError> {
    let before = experiments.watched(&node.catalogue, None);
    let mut both = before.clone();
    both.push(next);
    let stamped = watch_experiments(handle, now_ms, both).await?;
    let Some(next) = stamped.last().cloned() else {
        return Err(ExperimentError::TenantGone(handle.context.id.to_string()));
    };
    let committed = match ops((next.started_ms, next.epoch_ms)) {
        Ok(ops) => node.committer.commit(ops).await.map_err(Into::into),
        Err(error) => Err(error),
    };
    let after = match &committed {
        Ok(()) => {
            let mut after = experiments.watched(&node.catalogue, Some(id));
            after.push(next.clone());
            after
        }
        Err(_) => before,
    };
    if let Err(error) = watch_experiments(handle, now_ms, after).await {
        // counted twice until the next change: only memory, never a count
        tracing::warn!(tenant = %handle.context.id, experiment = %id, %error, "experiment counts not settled");
    }
    committed.map(|()| next)
}

/// `paused → running`, with a `resume` signal; the guardrails judge the
/// events from the next batch on (what paused it is not judged again). A
/// running experiment stays as it is; a stopped one does not resume.
pub async fn resume(
    node: &Node,
    tenant: &str,
    id: &str,
) -> Result<StoredExperiment, ExperimentError> {
    let (handle, experiments) = parts(node, tenant)?;
    let _one_writer = experiments.writing.lock().await;
    let Some(mut stored) = experiments.get(id) else {
        return Err(ExperimentError::NotFound(id.to_string()));
    };
    match stored.state.on_resume() {
        Err(_) => return Err(ExperimentError::Stopped(id.to_string())),
        Ok(_) if stored.state == ExperimentState::Running => return Ok(stored),
        Ok(state) => stored.state = state,
    }
    let now_ms = node.now_ms();
    stored.changed_ms = now_ms;
    let seq = lock(&experiments.book).next_seq;
    let signal = SignalRecord {
        seq,
        id: format!("{id}/{seq}"),
        experiment: id.to_string(),
        variant: None,
        action: "resume".into(),
        guardrail: None,
        observed: None,
        baseline: None,
        threshold: None,
        samples: 0,
        p_value: None,
        state: ExperimentState::Running,
        at_ms: now_ms,
    };
    let mut next = stored.watched(&node.catalogue);
    next.epoch_ms = 0;
    let stamped = change_watched(
        node,
        &handle,
        &experiments,
        id,
        next,
        now_ms,
        |(_, epoch_ms)| {
            let mut resumed = stored.clone();
            resumed.epoch_ms = epoch_ms;
            Ok(vec![
                stored_op(tenant, &resumed)?,
                signal_op(tenant, &signal)?,
            ])
        },
    )
    .await?;
    stored.epoch_ms = stamped.epoch_ms;
    {
        let mut book = lock(&experiments.book);
        book.next_seq = seq + 1;
        book.experiments
            .insert(id.to_string(), Live::new(stored.clone()));
    }
    experiments.written.send_replace(seq);
    crate::telemetry::count_signal(tenant, "resume");
    Ok(stored)
}

/// Deletes an experiment (the removal durable first), then its per-variant
/// counts; its signals stay in the outbox.
pub async fn delete(node: &Node, tenant: &str, id: &str) -> Result<(), ExperimentError> {
    let (handle, experiments) = parts(node, tenant)?;
    let _one_writer = experiments.writing.lock().await;
    if experiments.get(id).is_none() {
        return Err(ExperimentError::NotFound(id.to_string()));
    }
    node.committer
        .commit(vec![Op::Remove {
            space: Space::Experiments,
            key: named_key(tenant, id),
        }])
        .await?;
    lock(&experiments.book).experiments.remove(id);
    let watched = experiments.watched(&node.catalogue, None);
    if let Err(error) = watch_experiments(&handle, node.now_ms(), watched).await {
        // its counts stay in memory until the next change: never counted
        tracing::warn!(tenant = %tenant, experiment = %id, %error, "deleted experiment's counts not dropped");
    }
    Ok(())
}

/// Every guarded metric's per-variant counts of one experiment, by metric
/// index (`None`: no events for that metric yet); with `windows`, also the
/// `15m` counts.
pub async fn read_counts(
    reader: &TenantReader,
    stored: &StoredExperiment,
    catalogue: &Catalogue,
    windows: bool,
    now_ms: i64,
) -> Result<BTreeMap<usize, Option<VariantsReading>>, ReadError> {
    let mut counts = BTreeMap::new();
    let watched = stored.watched(catalogue);
    for guardrail in &stored.spec.guardrails {
        let Some(index) = catalogue.index_of(&guardrail.metric) else {
            continue;
        };
        if counts.contains_key(&index) {
            continue;
        }
        let reading = reader.variants(index, &watched, windows, now_ms).await?;
        counts.insert(index, reading);
    }
    Ok(counts)
}

/// Samples per variant since the start, in the experiment's order, of the
/// guarded metric that has the most: what the sample-ratio test counts.
fn split_samples(
    stored: &StoredExperiment,
    counts: &BTreeMap<usize, Option<VariantsReading>>,
) -> Vec<u64> {
    let mut best: Vec<u64> = vec![0; stored.spec.variants.len()];
    for reading in counts.values().flatten() {
        let samples: Vec<u64> = stored
            .spec
            .variants
            .iter()
            .map(|variant| {
                reading
                    .variants
                    .iter()
                    .find(|(name, _)| name == variant)
                    .map_or(0, |(_, counts)| match counts {
                        VariantCounts::Counter { since, .. } => since.count,
                        VariantCounts::Histogram { since, .. } => since.count,
                    })
            })
            .collect();
        if samples.iter().sum::<u64>() > best.iter().sum::<u64>() {
            best = samples;
        }
    }
    best
}

/// One look at a running experiment: the first guardrail that breaches.
fn look(
    stored: &StoredExperiment,
    tests: &mut [BTreeMap<String, SequentialState>],
    counts: &BTreeMap<usize, Option<VariantsReading>>,
    catalogue: &Catalogue,
) -> Option<Breach> {
    let spec = &stored.spec;
    for (index, guardrail) in spec.guardrails.iter().enumerate() {
        let Some(metric) = catalogue.index_of(&guardrail.metric) else {
            continue;
        };
        let reading = counts.get(&metric).and_then(Option::as_ref);
        let find = |variant: &String| {
            reading.and_then(|r| {
                r.variants
                    .iter()
                    .find(|(name, _)| name == variant)
                    .map(|(_, counts)| counts)
            })
        };
        let tests = tests.get_mut(index)?;
        let breach = if catalogue.metrics()[metric].kind == MetricKind::Histogram {
            let histograms: Vec<Option<&Histogram<u64>>> = spec
                .variants
                .iter()
                .map(|variant| match find(variant) {
                    Some(VariantCounts::Histogram { judged, .. }) => judged.as_deref(),
                    _ => None,
                })
                .collect();
            judge_guardrail(spec, index, GuardrailCounts::Latency(&histograms), tests)
        } else {
            let proportions: Vec<Proportion> = spec
                .variants
                .iter()
                .map(|variant| match find(variant) {
                    Some(VariantCounts::Counter { judged, .. }) => Proportion {
                        samples: judged.count,
                        hits: u64::try_from(judged.sum).unwrap_or(0),
                    },
                    _ => Proportion::default(),
                })
                .collect();
            judge_guardrail(spec, index, GuardrailCounts::Rate(&proportions), tests)
        };
        if breach.is_some() {
            return breach;
        }
    }
    None
}

/// Looks once at every running or paused experiment of one tenant; writes
/// and announces the signals. Returns how many were written.
pub async fn evaluate_tenant(
    node: &Node,
    tenant_id: &str,
    experiments: &TenantExperiments,
) -> Result<usize, ExperimentError> {
    let Some(handle) = node.tenant(tenant_id) else {
        return Ok(0);
    };
    let watching: Vec<StoredExperiment> = lock(&experiments.book)
        .experiments
        .values()
        .filter(|live| live.stored.state != ExperimentState::Stopped)
        .map(|live| live.stored.clone())
        .collect();
    // a tenant without experiments (most, where tenants are many) costs nothing
    if watching.is_empty() {
        return Ok(0);
    }
    let _one_writer = experiments.writing.lock().await;
    let reader = TenantReader::begin(&handle)?;
    let now_ms = node.now_ms();
    let mut read = Vec::with_capacity(watching.len());
    for stored in watching {
        let counts = read_counts(&reader, &stored, &node.catalogue, false, now_ms).await?;
        read.push((stored, counts));
    }
    drop(reader);
    let mut signals: Vec<SignalRecord> = Vec::new();
    // the book changes only once these are durable
    let mut changed: Vec<StoredExperiment> = Vec::new();
    {
        let mut book = lock(&experiments.book);
        let mut next_seq = book.next_seq;
        for (seen, counts) in read {
            let Some(live) = book.experiments.get_mut(&seen.id) else {
                continue;
            };
            // changed through the API while this tick read: the next judges it
            if live.stored != seen {
                continue;
            }
            let mut stored = live.stored.clone();
            if stored.state == ExperimentState::Running {
                if let Some(breach) = look(&stored, &mut live.tests, &counts, &node.catalogue) {
                    let guardrail = &stored.spec.guardrails[breach.guardrail];
                    if let Some(state) = stored.state.on_breach(guardrail.action) {
                        stored.state = state;
                        stored.changed_ms = now_ms;
                        let name = match &guardrail.stat {
                            Some(stat) => format!("{}:{stat}", guardrail.metric),
                            None => guardrail.metric.clone(),
                        };
                        signals.push(SignalRecord {
                            seq: next_seq,
                            id: format!("{}/{next_seq}", stored.id),
                            experiment: stored.id.clone(),
                            variant: Some(breach.variant),
                            action: guardrail.action.name().to_string(),
                            guardrail: Some(name),
                            observed: breach.observed,
                            baseline: breach.baseline,
                            threshold: Some(breach.threshold),
                            samples: breach.samples,
                            p_value: Some(breach.p_value),
                            state,
                            at_ms: now_ms,
                        });
                        next_seq += 1;
                    }
                }
            }
            if !stored.srm_signalled {
                let samples = split_samples(&stored, &counts);
                let (looks, mismatch) =
                    judge_sample_ratio(&stored.spec, &samples, stored.srm_looks);
                stored.srm_looks = looks;
                if let Some(mismatch) = mismatch {
                    stored.srm_signalled = true;
                    signals.push(SignalRecord {
                        seq: next_seq,
                        id: format!("{}/{next_seq}", stored.id),
                        experiment: stored.id.clone(),
                        variant: None,
                        action: "srm".into(),
                        guardrail: Some("srm".into()),
                        observed: Some(mismatch.chi_square),
                        baseline: None,
                        threshold: Some(crate::domain::guardrail::SRM_ALPHA),
                        samples: mismatch.samples,
                        p_value: Some(mismatch.p_value),
                        state: stored.state,
                        at_ms: now_ms,
                    });
                    next_seq += 1;
                }
            }
            if stored != live.stored {
                changed.push(stored);
            }
        }
    }
    if changed.is_empty() {
        return Ok(0);
    }
    let mut ops = Vec::with_capacity(changed.len() + signals.len());
    for stored in &changed {
        ops.push(stored_op(tenant_id, stored)?);
    }
    for signal in &signals {
        ops.push(signal_op(tenant_id, signal)?);
    }
    // durable before anyone hears of it or reads the new state; if it cannot
    // be written, nothing moved and the next tick looks again
    node.committer.commit(ops).await?;
    {
        let mut book = lock(&experiments.book);
        if let Some(last) = signals.last() {
            book.next_seq = last.seq + 1;
        }
        for stored in changed {
            if let Some(live) = book.experiments.get_mut(&stored.id) {
                live.stored = stored;
            }
        }
    }
    if let Some(last) = signals.last() {
        experiments.written.send_replace(last.seq);
    }
    for signal in &signals {
        let action = match signal.action.as_str() {
            "pause" => "pause",
            "stop" => "stop",
            _ => "srm",
        };
        crate::telemetry::count_signal(tenant_id, action);
    }
    Ok(signals.len())
}

/// Looks at every tenant's experiments every `experiments.tick_ms` until the
/// node stops.
pub async fn run(node: Arc<Node>) {
    let mut stopping = node.stopping.subscribe();
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(
        node.config.experiments.tick_ms,
    ));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopping.wait_for(|stopping| *stopping) => return,
        }
        if node.committer.is_failed() {
            return;
        }
        // a tenant without experiments still to judge has nothing to do
        let judging = node.experiments.list_where(|experiments| {
            lock(&experiments.book)
                .experiments
                .values()
                .any(|live| live.stored.state != ExperimentState::Stopped)
        });
        for (tenant_id, experiments) in &judging {
            match evaluate_tenant(&node, tenant_id, experiments).await {
                Ok(_) => {}
                // a busy tenant is looked at the next tick
                Err(ExperimentError::Read(ReadError::Busy(_))) => {}
                Err(error) => {
                    tracing::warn!(tenant = %tenant_id, %error, "experiments not evaluated");
                }
            }
        }
    }
}
