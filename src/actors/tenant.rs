//! TenantActor: decides the outcome of each of a tenant's events (de-duplication
//! and lateness), keeps the tenant's quarantine, makes each batch durable (the
//! committer's group flush) and then hands accepted events to the tenant's
//! MetricActors, replying only once they have applied them, so that an
//! acknowledged event is on disk and visible to the next read.
//! Must not: validate fields (the HTTP layer did, off the actor thread), read the
//! clock, flush by itself, or apply part of a batch it refuses.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use chrono_tz::Tz;
use tokio::sync::Notify;

use crate::domain::catalogue::Catalogue;
use crate::domain::dedup::{Admission, DedupIndex};
use crate::domain::event::{
    parse_event, validate_event, EventLimits, Reason, TenantField, ValidEvent, ValidationContext,
};
use crate::domain::quarantine::{QuarantineStore, QuarantinedEvent};
use crate::domain::time::{day_bounds, second_of_ms, DayBounds};
use crate::storage::commit::Committer;
use crate::storage::envelope::{encode, encode_within, RecordKind};
use crate::storage::snapshot::{TenantSnapshot, WalBatchRef};
use crate::storage::{lsn_key, quarantine_key, quarantine_next_key, Op, Space, StorageError};
use crate::telemetry::{self, Outcome};

use super::metric::{ApplyEvents, ExportState, MetricActor};
use super::InFlight;

/// What every part of the node knows of a tenant.
#[derive(Debug)]
pub struct TenantContext {
    pub id: Arc<str>,
    pub currency: String,
    pub tz: Tz,
    pub catalogue: Arc<Catalogue>,
    pub limits: EventLimits,
}

impl TenantContext {
    pub fn validation(&self) -> ValidationContext<'_> {
        ValidationContext {
            currency: &self.currency,
            catalogue: &self.catalogue,
            limits: &self.limits,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantError {
    #[error("de-duplication table of tenant {tenant} is full ({ids_max} ids); retry later")]
    DedupFull { tenant: String, ids_max: usize },
    #[error("the actors of tenant {0} are not running")]
    ActorGone(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The outcome of one event, by its index in the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    Accepted,
    Duplicate,
    Late,
    Quarantined {
        reason: Reason,
        qid: u64,
        id: Option<String>,
    },
}

/// An event that failed validation, to be quarantined.
#[derive(Debug, Clone)]
pub struct QuarantineCandidate {
    pub index: u32,
    pub id: Option<String>,
    pub reason: Reason,
    pub raw: Vec<u8>,
}

/// Where the tenant's writes go, and the log's next position (shared by all
/// tenants: LSNs order the whole log).
#[derive(Clone)]
pub struct Durability {
    pub committer: Committer,
    pub next_lsn: Arc<AtomicU64>,
    /// The largest record recovery reads back; larger ones are refused.
    pub record_bytes_max: usize,
}

/// Counts the batches between "submitted" and "applied", so that a snapshot can
/// wait until every batch it must include is in the windows.
#[derive(Default)]
struct InFlightBatches {
    count: AtomicUsize,
    idle: Notify,
}

struct BatchGuard(Arc<InFlightBatches>);

impl Drop for BatchGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl InFlightBatches {
    fn start(self: &Arc<Self>) -> BatchGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        BatchGuard(Arc::clone(self))
    }

    async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

pub struct TenantActor {
    context: Arc<TenantContext>,
    dedup: DedupIndex,
    quarantine: QuarantineStore,
    /// Indexed like the catalogue; `None` for metrics without state (mean).
    metrics: Vec<Option<Addr<MetricActor>>>,
    durability: Durability,
    batches: Arc<InFlightBatches>,
    now_ms: i64,
    today: DayBounds,
}

/// Sends accepted events to every metric they feed and waits until applied.
async fn apply_to_metrics(
    metrics: Vec<Addr<MetricActor>>,
    events: Vec<ValidEvent>,
    now_ms: i64,
    tenant: Arc<str>,
) -> Result<(), TenantError> {
    if events.is_empty() {
        return Ok(());
    }
    let events = Arc::new(events);
    let mut pending = Vec::with_capacity(metrics.len());
    for addr in &metrics {
        // room in the mailbox is guaranteed by the permit the batch holds
        pending.push(addr.send(ApplyEvents {
            now_ms,
            events: Arc::clone(&events),
        }));
    }
    for request in pending {
        request
            .await
            .map_err(|_| TenantError::ActorGone(tenant.to_string()))?;
    }
    Ok(())
}

impl TenantActor {
    pub fn new(
        context: Arc<TenantContext>,
        dedup: DedupIndex,
        quarantine: QuarantineStore,
        metrics: Vec<Option<Addr<MetricActor>>>,
        durability: Durability,
        now_ms: i64,
    ) -> Self {
        let today = day_bounds(second_of_ms(now_ms), context.tz);
        telemetry::set_quarantine_size(&context.id, quarantine.len());
        TenantActor {
            context,
            dedup,
            quarantine,
            metrics,
            durability,
            batches: Arc::default(),
            now_ms,
            today,
        }
    }

    fn advance(&mut self, now_ms: i64) -> i64 {
        self.now_ms = self.now_ms.max(now_ms);
        let now_s = second_of_ms(self.now_ms);
        if now_s >= self.today.end_s {
            self.today = day_bounds(now_s, self.context.tz);
        }
        self.dedup.expire(self.now_ms);
        self.now_ms
    }

    fn admit(&mut self, event: &ValidEvent, now_ms: i64) -> Result<EventOutcome, TenantError> {
        match self.dedup.admit(&event.id, event.ts_ms, now_ms, self.today) {
            Ok(Admission::Accepted) => Ok(EventOutcome::Accepted),
            Ok(Admission::Duplicate) => Ok(EventOutcome::Duplicate),
            Ok(Admission::Late) => Ok(EventOutcome::Late),
            Err(full) => Err(TenantError::DedupFull {
                tenant: self.context.id.to_string(),
                ids_max: full.ids_max,
            }),
        }
    }

    /// The metric actors that any of `events` feeds.
    fn metrics_fed_by(&self, events: &[ValidEvent]) -> Vec<Addr<MetricActor>> {
        let feeds = events.iter().fold(0u64, |mask, event| {
            mask | event.route.feeds | event.route.feeds_numerator
        });
        self.metrics
            .iter()
            .enumerate()
            .filter(|(index, _)| feeds & (1u64 << index) != 0)
            .filter_map(|(_, addr)| addr.clone())
            .collect()
    }

    /// The log record of accepted events. When it cannot be written (too large
    /// to read back), their ids are forgotten again: nothing of it was applied.
    fn wal_op(&mut self, events: &[ValidEvent], now_ms: i64) -> Result<Op, TenantError> {
        let record = WalBatchRef {
            tenant: &self.context.id,
            now_ms,
            events,
        };
        let value = match encode_within(
            RecordKind::WalBatch,
            &record,
            self.durability.record_bytes_max,
        ) {
            Ok(value) => value,
            Err(error) => {
                for event in events {
                    self.dedup.forget(&event.id);
                }
                return Err(StorageError::Io(format!("log record refused: {error}")).into());
            }
        };
        let lsn = self.durability.next_lsn.fetch_add(1, Ordering::SeqCst);
        Ok(Op::Put {
            space: Space::Wal,
            key: lsn_key(lsn).to_vec(),
            value,
        })
    }

    fn quarantine_ops(
        &mut self,
        candidate: &QuarantineCandidate,
        now_ms: i64,
        ops: &mut Vec<Op>,
    ) -> Result<u64, TenantError> {
        let (qid, evicted) = self.quarantine.insert(
            candidate.reason,
            now_ms,
            candidate.id.clone(),
            &candidate.raw,
        );
        telemetry::count_quarantine_evicted(&self.context.id, evicted.len() as u64);
        for old in evicted {
            ops.push(Op::Remove {
                space: Space::Quarantine,
                key: quarantine_key(&self.context.id, old),
            });
        }
        if let Some(entry) = self.quarantine.get(qid) {
            let value = encode(RecordKind::Quarantined, entry)
                .map_err(|error| StorageError::Io(error.to_string()))?;
            ops.push(Op::Put {
                space: Space::Quarantine,
                key: quarantine_key(&self.context.id, qid),
                value,
            });
        }
        // qids are never reused, also after the entries are gone and the node restarts
        ops.push(Op::Put {
            space: Space::Quarantine,
            key: quarantine_next_key(&self.context.id),
            value: (qid + 1).to_be_bytes().to_vec(),
        });
        Ok(qid)
    }

    /// Makes `ops` durable, then applies `accepted`; resolves to `reply`.
    fn commit_then_apply<T: Send + 'static>(
        &self,
        ops: Vec<Op>,
        accepted: Vec<ValidEvent>,
        now_ms: i64,
        in_flight: InFlight,
        reply: T,
    ) -> ResponseFuture<Result<T, TenantError>> {
        // Even a batch with nothing to write waits its turn: its duplicates may
        // stand for events of an earlier batch whose flush is still under way.
        let durable = match self.durability.committer.submit(ops) {
            Ok(durable) => durable,
            Err(error) => return Box::pin(async move { Err(error.into()) }),
        };
        let guard = self.batches.start();
        let metrics = self.metrics_fed_by(&accepted);
        let tenant = Arc::clone(&self.context.id);
        Box::pin(async move {
            durable.await.unwrap_or(Err(StorageError::Poisoned))?;
            apply_to_metrics(metrics, accepted, now_ms, tenant).await?;
            drop(guard);
            drop(in_flight);
            Ok(reply)
        })
    }
}

impl Actor for TenantActor {
    type Context = Context<Self>;
}

/// One request's events for this tenant, validated off the actor thread.
#[derive(Message)]
#[rtype(result = "Result<Vec<(u32, EventOutcome)>, TenantError>")]
pub struct IngestBatch {
    pub in_flight: InFlight,
    pub now_ms: i64,
    pub events: Vec<(u32, ValidEvent)>,
    pub quarantined: Vec<QuarantineCandidate>,
}

impl Handler<IngestBatch> for TenantActor {
    type Result = ResponseFuture<Result<Vec<(u32, EventOutcome)>, TenantError>>;

    fn handle(&mut self, batch: IngestBatch, _: &mut Context<Self>) -> Self::Result {
        telemetry::count_actor_message("tenant");
        let now_ms = self.advance(batch.now_ms);
        // Refuse the whole batch up front rather than apply part of it; only
        // ids that would be new need room (a resent batch is all duplicates).
        let mut new_ids = std::collections::HashSet::new();
        for (_, event) in &batch.events {
            if self.dedup.judge(&event.id, event.ts_ms, now_ms, self.today) == Admission::Accepted {
                new_ids.insert(event.id.as_str());
            }
        }
        if self.dedup.ids_free() < new_ids.len() {
            let error = TenantError::DedupFull {
                tenant: self.context.id.to_string(),
                ids_max: self.dedup.ids_free() + self.dedup.len(),
            };
            return Box::pin(async move { Err(error) });
        }
        let mut outcomes = Vec::with_capacity(batch.events.len() + batch.quarantined.len());
        let mut accepted = Vec::new();
        for (index, event) in batch.events {
            let outcome = match self.admit(&event, now_ms) {
                Ok(outcome) => outcome,
                // cannot happen: room for every event was checked above
                Err(error) => return Box::pin(async move { Err(error) }),
            };
            if outcome == EventOutcome::Accepted {
                accepted.push(event);
            }
            outcomes.push((index, outcome));
        }
        let mut ops = Vec::new();
        if !accepted.is_empty() {
            match self.wal_op(&accepted, now_ms) {
                Ok(op) => ops.push(op),
                Err(error) => return Box::pin(async move { Err(error) }),
            }
        }
        for candidate in &batch.quarantined {
            match self.quarantine_ops(candidate, now_ms, &mut ops) {
                Ok(qid) => outcomes.push((
                    candidate.index,
                    EventOutcome::Quarantined {
                        reason: candidate.reason,
                        qid,
                        id: candidate.id.clone(),
                    },
                )),
                Err(error) => return Box::pin(async move { Err(error) }),
            }
        }
        if !batch.quarantined.is_empty() {
            telemetry::set_quarantine_size(&self.context.id, self.quarantine.len());
        }
        self.commit_then_apply(ops, accepted, now_ms, batch.in_flight, outcomes)
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
        MessageResult(self.quarantine.list(message.after, message.limit))
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
        if self.quarantine.remove(message.qid).is_none() {
            return Box::pin(async { Ok(false) });
        }
        telemetry::set_quarantine_size(&self.context.id, self.quarantine.len());
        let ops = vec![Op::Remove {
            space: Space::Quarantine,
            key: quarantine_key(&self.context.id, message.qid),
        }];
        self.commit_then_apply(ops, Vec::new(), self.now_ms, message.in_flight, true)
    }
}

/// Validates a quarantined event again under the current config.
#[derive(Message)]
#[rtype(result = "Result<Option<EventOutcome>, TenantError>")]
pub struct RetryQuarantined {
    pub in_flight: InFlight,
    pub qid: u64,
    pub now_ms: i64,
}

impl Handler<RetryQuarantined> for TenantActor {
    type Result = ResponseFuture<Result<Option<EventOutcome>, TenantError>>;

    fn handle(&mut self, message: RetryQuarantined, _: &mut Context<Self>) -> Self::Result {
        let now_ms = self.advance(message.now_ms);
        let Some(entry) = self.quarantine.get(message.qid).cloned() else {
            return Box::pin(async { Ok(None) });
        };
        if entry.truncated {
            // only part of it was kept: it can be listed and dropped, not retried
            let outcome = EventOutcome::Quarantined {
                reason: entry.reason,
                qid: message.qid,
                id: entry.id,
            };
            return Box::pin(async move { Ok(Some(outcome)) });
        }
        let validated = parse_event(&entry.raw).and_then(|raw| {
            match raw.tenant() {
                TenantField::Named(named) if named != &*self.context.id => {
                    return Err(Reason::TenantMismatch)
                }
                _ => {}
            }
            validate_event(&raw, &self.context.validation(), entry.received_ms, now_ms)
        });
        let event = match validated {
            Ok(event) => event,
            Err(reason) => {
                // the new reason lives in memory; storage keeps the first one
                self.quarantine.set_reason(message.qid, reason);
                let outcome = EventOutcome::Quarantined {
                    reason,
                    qid: message.qid,
                    id: entry.id,
                };
                return Box::pin(async move { Ok(Some(outcome)) });
            }
        };
        let outcome = match self.admit(&event, now_ms) {
            Ok(outcome) => outcome,
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        self.quarantine.remove(message.qid);
        telemetry::set_quarantine_size(&self.context.id, self.quarantine.len());
        let outcome_kind = match outcome {
            EventOutcome::Accepted => Outcome::Accepted,
            EventOutcome::Duplicate => Outcome::Duplicate,
            _ => Outcome::Late,
        };
        telemetry::count_outcome(outcome_kind, None, 1);
        let accepted = if outcome == EventOutcome::Accepted {
            vec![event]
        } else {
            Vec::new()
        };
        // The log record is written before the removal: sled does not make the
        // two atomic, and a crash between them must leave the event quarantined
        // (a retry then finds it a duplicate), never gone.
        let mut ops = Vec::new();
        if !accepted.is_empty() {
            match self.wal_op(&accepted, now_ms) {
                Ok(op) => ops.push(op),
                Err(error) => return Box::pin(async move { Err(error) }),
            }
        }
        ops.push(Op::Remove {
            space: Space::Quarantine,
            key: quarantine_key(&self.context.id, message.qid),
        });
        self.commit_then_apply(ops, accepted, now_ms, message.in_flight, Some(outcome))
    }
}

/// The tenant's state for a snapshot: waits until every batch already accepted
/// is applied (taking no new messages meanwhile), then exports.
#[derive(Message)]
#[rtype(result = "Result<TenantSnapshot, TenantError>")]
pub struct TakeSnapshot;

impl Handler<TakeSnapshot> for TenantActor {
    type Result = AtomicResponse<Self, Result<TenantSnapshot, TenantError>>;

    fn handle(&mut self, _: TakeSnapshot, _: &mut Context<Self>) -> Self::Result {
        let batches = Arc::clone(&self.batches);
        let idle = async move { batches.wait_idle().await }.into_actor(self);
        AtomicResponse::new(Box::pin(idle.then(|(), actor, _| {
            // Every LSN handed out so far that belongs to this tenant is applied,
            // and this actor hands out no new one until the export is done.
            let position_lsn = actor
                .durability
                .next_lsn
                .load(Ordering::SeqCst)
                .saturating_sub(1);
            let tenant = actor.context.id.to_string();
            let now_ms = actor.now_ms;
            let dedup = actor.dedup.export();
            let names: Vec<(String, Addr<MetricActor>)> = actor
                .metrics
                .iter()
                .enumerate()
                .filter_map(|(index, addr)| {
                    let addr = addr.clone()?;
                    Some((actor.context.catalogue.metrics()[index].name.clone(), addr))
                })
                .collect();
            async move {
                let mut requests = Vec::with_capacity(names.len());
                for (name, addr) in &names {
                    requests.push((name.clone(), addr.send(ExportState)));
                }
                let mut metrics = Vec::with_capacity(requests.len());
                for (name, request) in requests {
                    let export = request
                        .await
                        .map_err(|_| TenantError::ActorGone(tenant.clone()))?;
                    metrics.push((name, export));
                }
                Ok(TenantSnapshot {
                    tenant,
                    position_lsn,
                    now_ms,
                    dedup,
                    metrics,
                })
            }
            .into_actor(actor)
        })))
    }
}
