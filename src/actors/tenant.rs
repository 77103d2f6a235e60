//! TenantActor: the shell around the tenant core (`domain::tenant`). It hands
//! each message to the core, turns the core's plan into storage writes
//! (`storage::snapshot::plan_ops`), submits them to the committer, applies the
//! accepted events to the tenant's MetricActors once durable, reports back to
//! the core, and replies when the core says the reply's turn has come.
//! Must not: decide outcomes (the core does), validate fields (the HTTP layer
//! did, off the actor thread), read the clock, or flush by itself.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::{oneshot, Notify};

use crate::domain::dedup::{
    CoverPlan, MergePlan, Run, RunMeta, RunsChecked, SealedIds, SummaryFilter,
};
use crate::domain::enrich::{Enrichment, Tables};
use crate::domain::event::ValidEvent;
use crate::domain::metric::{SeriesSettings, Watched};
use crate::domain::quarantine::QuarantinedEvent;
use crate::domain::tenant::{CoreError, OutcomeCounts, Plan, RetryDecision, TenantCore};
pub use crate::domain::tenant::{EventOutcome, QuarantineCandidate, TenantContext};
use crate::storage::commit::Committer;
use crate::storage::snapshot::{plan_ops, TenantSnapshot, HISTORY_CHUNK_S};
use crate::storage::StorageError;
use crate::telemetry::{self, Outcome};

use super::metric::{ApplyEvents, ExportState, MetricActor, SetWatched};
use super::{InFlight, MetricSlots, PublishedRuns, TenantHealth};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("the actors of tenant {0} are not running")]
    ActorGone(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Where the tenant's writes go, and the log's next position (shared by all
/// tenants: LSNs order the whole log).
#[derive(Clone)]
pub struct Durability {
    pub committer: Committer,
    pub next_lsn: Arc<AtomicU64>,
    /// The largest record recovery reads back; larger ones are refused.
    pub record_bytes_max: usize,
    /// Asks the node for a snapshot now: a tenant's table of ids in memory is
    /// half full, and a snapshot moves them into a run on disk.
    pub snapshot_wanted: Arc<Notify>,
}

pub struct TenantActor {
    /// Shared with the reply futures of this actor, which run on its arbiter
    /// thread and never hold the borrow across an await.
    core: Rc<RefCell<TenantCore>>,
    /// Woken whenever a ticket completes or fails.
    progress: Rc<Notify>,
    /// Shared with the tenant's handle; filled here, on this actor's arbiter,
    /// when a metric first gets events.
    metrics: MetricSlots,
    settings: SeriesSettings,
    mailbox_capacity: usize,
    durability: Durability,
    health: Arc<TenantHealth>,
    runs: Arc<PublishedRuns>,
    /// `DedupIndex::runs_generation` when the runs were last published.
    runs_published: Option<u64>,
    /// The experiments counted per variant, as every metric actor was told.
    watched: Arc<Vec<Watched>>,
}

/// Counts the outcomes of a completed ticket, where they were decided.
fn count_outcomes(tenant: &str, counts: &OutcomeCounts) {
    telemetry::count_quarantine_evicted(tenant, counts.quarantine_evicted);
    telemetry::count_outcome(Outcome::Accepted, None, counts.accepted);
    telemetry::count_outcome(Outcome::Duplicate, None, counts.duplicate);
    telemetry::count_outcome(Outcome::Late, None, counts.late);
    for (reason, events) in &counts.quarantined {
        telemetry::count_outcome(Outcome::Quarantined, Some(*reason), *events);
    }
}

/// Counts the accepted events that name an experiment the tenant does not
/// have, or a variant their experiment does not have: counted as usual,
/// attributed to nothing, and reported here (API.md §8).
fn count_unattributed(tenant: &str, watched: &[Watched], events: &[ValidEvent]) {
    let (mut unknown_experiment, mut unknown_variant) = (0u64, 0u64);
    for event in events {
        for (experiment, variant) in &event.experiments {
            match watched.iter().find(|w| w.experiment == *experiment) {
                None => unknown_experiment += 1,
                Some(w) if !w.variants.contains(variant) => unknown_variant += 1,
                Some(_) => {}
            }
        }
    }
    telemetry::count_unattributed(tenant, "unknown_experiment", unknown_experiment);
    telemetry::count_unattributed(tenant, "unknown_variant", unknown_variant);
}

/// Waits for the flush, then applies `plan.events` to every metric they feed
/// (every send is made and awaited, also after one fails). The error says why
/// the tenant must stop.
async fn make_durable_and_apply(
    durable: Option<oneshot::Receiver<Result<(), StorageError>>>,
    metrics: Vec<Addr<MetricActor>>,
    plan: &Plan,
) -> Result<(), String> {
    if let Some(durable) = durable {
        durable
            .await
            .unwrap_or(Err(StorageError::Poisoned))
            .map_err(|error| error.to_string())?;
    }
    if plan.events.is_empty() {
        return Ok(());
    }
    let mut pending = Vec::with_capacity(metrics.len());
    for addr in &metrics {
        // room in the mailbox is guaranteed by the permit the batch holds
        pending.push(addr.send(ApplyEvents {
            now_ms: plan.now_ms,
            events: Arc::clone(&plan.events),
        }));
    }
    let mut gone = 0;
    for request in pending {
        if request.await.is_err() {
            gone += 1;
        }
    }
    if gone > 0 {
        return Err(format!(
            "{gone} metric actor(s) stopped before applying a durable batch"
        ));
    }
    Ok(())
}

impl TenantActor {
    /// `metrics` holds the actors already started (with recovered state);
    /// the others start with their first events, with `mailbox_capacity`.
    pub fn new(
        core: TenantCore,
        metrics: MetricSlots,
        settings: SeriesSettings,
        mailbox_capacity: usize,
        durability: Durability,
        health: Arc<TenantHealth>,
        runs: Arc<PublishedRuns>,
    ) -> Self {
        telemetry::set_quarantine_size(&core.context().id, core.quarantine().len());
        TenantActor {
            core: Rc::new(RefCell::new(core)),
            progress: Rc::new(Notify::new()),
            metrics,
            settings,
            mailbox_capacity,
            durability,
            health,
            runs,
            runs_published: None,
            watched: Arc::new(Vec::new()),
        }
    }

    /// The experiments the recovered metric actors already count.
    pub fn watching(mut self, watched: Vec<Watched>) -> Self {
        self.watched = Arc::new(watched);
        self
    }

    /// Publishes the runs for ingest to check (`PublishedRuns`) when they
    /// changed since last time, and their gauges.
    fn publish_runs(&mut self) {
        let core = self.core.borrow();
        let generation = core.dedup().runs_generation();
        if self.runs_published != Some(generation) {
            let view = core.dedup().runs_shared();
            // a tenant that never had runs has no gauges: with many idle
            // tenants they were a kilobyte each
            if !view.runs.is_empty() || !self.runs.get().runs.is_empty() {
                publish_dedup_runs(&core);
            }
            self.runs.set(view, core.dedup().wants_cover());
            self.runs_published = Some(generation);
        }
    }

    /// The actors of the metrics in `feeds` that keep state, started here (on
    /// this actor's arbiter) for those that had none yet.
    fn metrics_fed(&self, feeds: u64, now_ms: i64) -> Vec<Addr<MetricActor>> {
        let core = self.core.borrow();
        let context = core.context();
        let mut fed = Vec::new();
        for (index, def) in context.catalogue.metrics().iter().enumerate() {
            if feeds & (1u64 << index) == 0 || !def.kind.has_state() {
                continue;
            }
            let Some(slot) = self.metrics.get(index) else {
                continue;
            };
            let addr = slot.get_or_init(|| {
                let (tenant_id, settings) = (Arc::clone(&context.id), self.settings);
                let capacity = self.mailbox_capacity;
                let watched = Arc::clone(&self.watched);
                MetricActor::create(|ctx| {
                    ctx.set_mailbox_capacity(capacity);
                    MetricActor::new(tenant_id, index, def, settings, now_ms, &watched)
                })
            });
            fed.push(addr.clone());
        }
        fed
    }

    fn report_quarantine_size(&self) {
        let core = self.core.borrow();
        telemetry::set_quarantine_size(&core.context().id, core.quarantine().len());
    }

    /// Submits the plan's writes, then (in the reply future) waits for them,
    /// applies, reports to the core, and resolves to `reply` when the core
    /// says every earlier ticket is visible. A plan whose writes cannot be
    /// submitted is aborted at once: nothing of it happened.
    fn carry_out<T: 'static>(
        &mut self,
        plan: Plan,
        in_flight: InFlight,
        reply: T,
    ) -> ResponseFuture<Result<T, TenantError>> {
        let ticket = plan.ticket;
        let durable = if plan.writes_nothing() {
            None
        } else {
            let tenant = Arc::clone(&self.core.borrow().context().id);
            let submitted = plan_ops(
                &plan,
                &tenant,
                &self.durability.next_lsn,
                self.durability.record_bytes_max,
            )
            .and_then(|ops| self.durability.committer.submit(ops));
            match submitted {
                Ok(durable) => Some(durable),
                Err(error) => {
                    self.core.borrow_mut().abort(ticket);
                    self.report_quarantine_size();
                    self.progress.notify_waiters();
                    return Box::pin(async move { Err(error.into()) });
                }
            }
        };
        let metrics = self.metrics_fed(plan.feeds, plan.now_ms);
        let core = Rc::clone(&self.core);
        let progress = Rc::clone(&self.progress);
        let health = Arc::clone(&self.health);
        let watched = Arc::clone(&self.watched);
        Box::pin(async move {
            let carried = make_durable_and_apply(durable, metrics, &plan).await;
            match carried {
                Ok(()) => {
                    let mut core = core.borrow_mut();
                    let counts = core.complete(ticket);
                    count_outcomes(&core.context().id, &counts);
                    count_unattributed(&core.context().id, &watched, &plan.events);
                }
                Err(reason) => {
                    let mut core = core.borrow_mut();
                    tracing::error!(tenant = %core.context().id, %reason, "tenant stopped serving");
                    core.fail(ticket, &reason);
                    health.fail(&reason);
                }
            }
            progress.notify_waiters();
            // the batch keeps its place in the tenant's budget until it replies,
            // so the 429 limit also bounds batches waiting their turn
            let _in_flight = in_flight;
            loop {
                let progressed = progress.notified();
                if let Some(ready) = core.borrow().reply_ready(ticket) {
                    return ready.map(|()| reply).map_err(TenantError::from);
                }
                progressed.await;
            }
        })
    }
}

impl Actor for TenantActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        // runs read back by the recovery
        self.publish_runs();
    }
}

/// One request's events for this tenant, validated off the actor thread.
#[derive(Message)]
#[rtype(result = "Result<Vec<(u32, EventOutcome)>, TenantError>")]
pub struct IngestBatch {
    pub in_flight: InFlight,
    pub now_ms: i64,
    pub events: Vec<(u32, ValidEvent)>,
    pub quarantined: Vec<QuarantineCandidate>,
    /// The events' ids checked against the published runs, if they were.
    pub checked: Option<RunsChecked>,
}

impl Handler<IngestBatch> for TenantActor {
    type Result = ResponseFuture<Result<Vec<(u32, EventOutcome)>, TenantError>>;

    fn handle(&mut self, batch: IngestBatch, _: &mut Context<Self>) -> Self::Result {
        telemetry::count_actor_message("tenant");
        let quarantines = !batch.quarantined.is_empty();
        let decided = self.core.borrow_mut().ingest(
            batch.now_ms,
            batch.events,
            batch.quarantined,
            batch.checked,
        );
        let (plan, outcomes) = match decided {
            Ok(decided) => decided,
            Err(error) => return Box::pin(async move { Err(error.into()) }),
        };
        if quarantines {
            self.report_quarantine_size();
        }
        // runs expire as time passes
        self.publish_runs();
        {
            let core = self.core.borrow();
            let dedup = core.dedup();
            // the table alone: ids sealed by a snapshot under way are on their
            // way out, and counting them asked for a second snapshot at once
            // (a run of a tenth the size after every full one)
            if dedup.len() >= dedup.ids_max() / 2 {
                self.durability.snapshot_wanted.notify_one();
            }
        }
        self.carry_out(plan, batch.in_flight, outcomes)
    }
}

/// The tenant's experiments to count per variant (all of them: the list
/// replaces the last). An entry whose `started_ms` or `epoch_ms` is 0 is
/// stamped here, later than every batch this actor has planned; the metric
/// actors hear of it before any later batch, so each batch counts for an
/// experiment wholly or not at all, live as in a replay of the log. Returns
/// the list as stamped.
#[derive(Message)]
#[rtype(result = "Arc<Vec<Watched>>")]
pub struct WatchExperiments {
    pub now_ms: i64,
    pub watched: Vec<Watched>,
}

impl Handler<WatchExperiments> for TenantActor {
    type Result = MessageResult<WatchExperiments>;

    fn handle(&mut self, message: WatchExperiments, _: &mut Context<Self>) -> Self::Result {
        let stamp_ms = message.now_ms.max(self.core.borrow().now_ms() + 1);
        let mut watched = message.watched;
        for entry in &mut watched {
            if entry.started_ms == 0 {
                entry.started_ms = stamp_ms;
            }
            if entry.epoch_ms == 0 {
                entry.epoch_ms = stamp_ms;
            }
        }
        let watched = Arc::new(watched);
        self.watched = Arc::clone(&watched);
        for slot in self.metrics.iter() {
            if let Some(addr) = slot.get() {
                // a control message, not data: one per change of experiments
                // (changes are serialized by the engine's writing lock), so
                // do_send's ignoring of the mailbox bound adds at most one;
                // and it must be queued ahead of every later batch
                addr.do_send(SetWatched(Arc::clone(&watched)));
            }
        }
        MessageResult(watched)
    }
}

#[derive(Message)]
#[rtype(result = "Vec<QuarantinedEvent>")]
pub struct ListQuarantine {
    pub in_flight: InFlight,
    pub after: u64,
    pub limit: usize,
}

impl Handler<ListQuarantine> for TenantActor {
    type Result = MessageResult<ListQuarantine>;

    fn handle(&mut self, message: ListQuarantine, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.core
                .borrow()
                .list_quarantine(message.after, message.limit),
        )
    }
}

#[derive(Message)]
#[rtype(result = "Result<bool, TenantError>")]
pub struct DeleteQuarantined {
    pub in_flight: InFlight,
    pub qid: u64,
}

impl Handler<DeleteQuarantined> for TenantActor {
    type Result = ResponseFuture<Result<bool, TenantError>>;

    fn handle(&mut self, message: DeleteQuarantined, _: &mut Context<Self>) -> Self::Result {
        let planned = self.core.borrow_mut().delete_quarantined(message.qid);
        match planned {
            Ok(Some(plan)) => {
                self.report_quarantine_size();
                self.carry_out(plan, message.in_flight, true)
            }
            Ok(None) => Box::pin(async { Ok(false) }),
            Err(error) => Box::pin(async move { Err(error.into()) }),
        }
    }
}

/// Validates a quarantined event again under the current config.
#[derive(Message)]
#[rtype(result = "Result<Option<EventOutcome>, TenantError>")]
pub struct RetryQuarantined {
    pub in_flight: InFlight,
    pub qid: u64,
    pub now_ms: i64,
    /// The enrichments and the tenant's tables now, for the event to go
    /// through as ingest's do.
    pub enrich: Option<(Arc<Vec<Enrichment>>, Arc<Tables>)>,
}

impl Handler<RetryQuarantined> for TenantActor {
    type Result = ResponseFuture<Result<Option<EventOutcome>, TenantError>>;

    fn handle(&mut self, message: RetryQuarantined, _: &mut Context<Self>) -> Self::Result {
        let decided = self.core.borrow_mut().retry_quarantined_with(
            message.qid,
            message.now_ms,
            message
                .enrich
                .as_ref()
                .map_or(&[][..], |(e, _)| e.as_slice()),
            message
                .enrich
                .as_ref()
                .map_or(&Tables::default(), |(_, t)| t),
        );
        match decided {
            Ok(RetryDecision::NotFound) => Box::pin(async { Ok(None) }),
            Ok(RetryDecision::Stays(outcome)) => Box::pin(async move { Ok(Some(outcome)) }),
            Ok(RetryDecision::Planned(plan, outcome)) => {
                self.report_quarantine_size();
                self.carry_out(plan, message.in_flight, Some(outcome))
            }
            Err(error) => Box::pin(async move { Err(error.into()) }),
        }
    }
}

/// The tenant's state for a snapshot: waits until every batch already accepted
/// is applied (taking no new messages meanwhile), seals the remembered ids for
/// runs on disk, then exports. With the part come the sealed sets the snapshot
/// must write as runs (and list) before it commits. Unless `whole_history`,
/// the metrics' history holds only the chunks changed since the last export
/// (`TenantSnapshot::history_extents`): ask for it whole after a start and
/// whenever the last snapshot did not become durable.
#[derive(Message)]
#[rtype(result = "Result<(TenantSnapshot, Vec<Arc<SealedIds>>), TenantError>")]
pub struct TakeSnapshot {
    pub whole_history: bool,
}

/// The runs a snapshot wrote are durable and listed: their ids leave memory.
#[derive(Message)]
#[rtype(result = "()")]
pub struct InstallRuns(pub Vec<Run>);

impl Handler<InstallRuns> for TenantActor {
    type Result = ();

    fn handle(&mut self, message: InstallRuns, _: &mut Context<Self>) {
        {
            let mut core = self.core.borrow_mut();
            for run in message.0 {
                core.install_run(run);
            }
        }
        self.publish_runs();
    }
}

fn publish_dedup_runs(core: &TenantCore) {
    let dedup = core.dedup();
    crate::telemetry::set_dedup_runs(
        &core.context().id,
        dedup.runs().len(),
        dedup.runs_uncovered(),
        dedup.filter_bytes(),
    );
}

/// The de-dup runs the tenant holds, oldest first (operators and tests).
#[derive(Message)]
#[rtype(result = "Vec<RunMeta>")]
pub struct ListRuns;

impl Handler<ListRuns> for TenantActor {
    type Result = Vec<RunMeta>;

    fn handle(&mut self, _: ListRuns, _: &mut Context<Self>) -> Vec<RunMeta> {
        let mut runs = self.core.borrow().dedup().runs();
        runs.sort_by_key(|run| (run.max_second, run.id));
        runs
    }
}

/// The next de-dup runs to merge, with the merged run's id reserved.
#[derive(Message)]
#[rtype(result = "Option<MergePlan>")]
pub struct PlanMerge;

impl Handler<PlanMerge> for TenantActor {
    type Result = Option<MergePlan>;

    fn handle(&mut self, _: PlanMerge, _: &mut Context<Self>) -> Option<MergePlan> {
        self.core.borrow_mut().plan_merge()
    }
}

/// A merged run is durable: it replaces its inputs (by id).
#[derive(Message)]
#[rtype(result = "()")]
pub struct InstallMerged {
    pub run: Run,
    pub inputs: Vec<u64>,
}

impl Handler<InstallMerged> for TenantActor {
    type Result = ();

    fn handle(&mut self, message: InstallMerged, _: &mut Context<Self>) {
        {
            let mut core = self.core.borrow_mut();
            core.install_merged(message.run, &message.inputs);
            crate::telemetry::count_dedup_merge(&core.context().id);
        }
        self.publish_runs();
    }
}

/// What the summary filter over the de-dup runs wants next: a new one
/// (`rebuild`, which stays under way until installed or abandoned), or the
/// runs not covered added to the current one.
#[derive(Message)]
#[rtype(result = "Option<CoverPlan>")]
pub struct PlanCover {
    pub rebuild: bool,
}

impl Handler<PlanCover> for TenantActor {
    type Result = Option<CoverPlan>;

    fn handle(&mut self, message: PlanCover, _: &mut Context<Self>) -> Option<CoverPlan> {
        if !message.rebuild {
            return self.core.borrow().plan_extend();
        }
        let plan = self.core.borrow_mut().plan_rebuild();
        self.publish_runs();
        plan
    }
}

/// A new summary planned by `PlanCover { rebuild: true }` will not come.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AbandonRebuild;

impl Handler<AbandonRebuild> for TenantActor {
    type Result = ();

    fn handle(&mut self, _: AbandonRebuild, _: &mut Context<Self>) {
        self.core.borrow_mut().abandon_rebuild();
        self.publish_runs();
    }
}

/// A summary filter holds every key of the runs `covered`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct InstallCover {
    pub summary: Arc<SummaryFilter>,
    pub covered: Vec<u64>,
    pub rebuilt: bool,
}

impl Handler<InstallCover> for TenantActor {
    type Result = ();

    fn handle(&mut self, message: InstallCover, _: &mut Context<Self>) {
        self.core
            .borrow_mut()
            .install_cover(message.summary, &message.covered, message.rebuilt);
        self.publish_runs();
    }
}

impl Handler<TakeSnapshot> for TenantActor {
    type Result = AtomicResponse<Self, Result<(TenantSnapshot, Vec<Arc<SealedIds>>), TenantError>>;

    fn handle(&mut self, message: TakeSnapshot, _: &mut Context<Self>) -> Self::Result {
        let core = Rc::clone(&self.core);
        let progress = Rc::clone(&self.progress);
        let idle = async move {
            loop {
                let progressed = progress.notified();
                if core.borrow().is_idle() {
                    return;
                }
                progressed.await;
            }
        }
        .into_actor(self);
        let whole_history = message.whole_history;
        AtomicResponse::new(Box::pin(idle.then(move |(), actor, _| {
            // Every LSN handed out so far that belongs to this tenant is applied,
            // and this actor hands out no new one until the export is done.
            let position_lsn = actor
                .durability
                .next_lsn
                .load(Ordering::SeqCst)
                .saturating_sub(1);
            let mut core = actor.core.borrow_mut();
            // a failed tenant's memory may lack durable events: only the log
            // and an older snapshot can say what counts
            let failure = core.failure().map(|reason| CoreError::Failed {
                tenant: core.context().id.to_string(),
                reason: reason.to_string(),
            });
            let tenant = core.context().id.to_string();
            let now_ms = core.now_ms();
            let (sealed, runs) = if failure.is_none() {
                (core.seal_dedup(), core.dedup().runs())
            } else {
                (Vec::new(), Vec::new())
            };
            // sealed: the table is empty; ids stay answered from the sealed sets
            let dedup = core.export_dedup();
            let names: Vec<(String, Addr<MetricActor>)> = actor
                .metrics
                .iter()
                .enumerate()
                .filter_map(|(index, slot)| {
                    let addr = slot.get()?.clone();
                    Some((core.context().catalogue.metrics()[index].name.clone(), addr))
                })
                .collect();
            drop(core);
            async move {
                if let Some(failure) = failure {
                    return Err(failure.into());
                }
                let mut requests = Vec::with_capacity(names.len());
                for (name, addr) in &names {
                    let export = ExportState {
                        whole_history,
                        chunk_s: HISTORY_CHUNK_S,
                    };
                    requests.push((name.clone(), addr.send(export)));
                }
                let mut metrics = Vec::with_capacity(requests.len());
                let mut history_extents = Vec::with_capacity(requests.len());
                let mut experiments = Vec::new();
                for (name, request) in requests {
                    let (export, extent, variants) = request
                        .await
                        .map_err(|_| TenantError::ActorGone(tenant.clone()))?;
                    if !variants.is_empty() {
                        experiments.push((name.clone(), variants));
                    }
                    metrics.push((name, export));
                    history_extents.push(extent);
                }
                Ok((
                    TenantSnapshot {
                        tenant,
                        position_lsn,
                        now_ms,
                        dedup,
                        metrics,
                        runs,
                        experiments,
                        history_extents,
                    },
                    sealed,
                ))
            }
            .into_actor(actor)
        })))
    }
}
