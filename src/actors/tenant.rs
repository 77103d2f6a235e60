//! TenantActor: decides the outcome of each of a tenant's events (de-duplication
//! and lateness), keeps the tenant's quarantine, and hands accepted events to the
//! tenant's MetricActors, replying only once they have applied them, so that a
//! read after an acknowledged ingest sees its events.
//! Must not: validate fields (the HTTP layer did, off the actor thread), read the
//! clock, or apply part of a batch it refuses.

use std::sync::Arc;

use actix::prelude::*;
use chrono_tz::Tz;

use crate::domain::catalogue::Catalogue;
use crate::domain::dedup::{Admission, DedupIndex};
use crate::domain::event::{
    parse_event, validate_event, EventLimits, Reason, TenantField, ValidEvent, ValidationContext,
};
use crate::domain::quarantine::{QuarantineStore, QuarantinedEvent};
use crate::domain::time::{day_bounds, second_of_ms, DayBounds};
use crate::telemetry::{self, Outcome};

use super::metric::{ApplyEvents, MetricActor};
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

pub struct TenantActor {
    context: Arc<TenantContext>,
    dedup: DedupIndex,
    quarantine: QuarantineStore,
    /// Indexed like the catalogue; `None` for metrics without state (mean).
    metrics: Vec<Option<Addr<MetricActor>>>,
    now_ms: i64,
    today: DayBounds,
}

impl TenantActor {
    pub fn new(
        context: Arc<TenantContext>,
        dedup: DedupIndex,
        quarantine: QuarantineStore,
        metrics: Vec<Option<Addr<MetricActor>>>,
        now_ms: i64,
    ) -> Self {
        let today = day_bounds(second_of_ms(now_ms), context.tz);
        TenantActor {
            context,
            dedup,
            quarantine,
            metrics,
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

    fn store_quarantined(
        &mut self,
        reason: Reason,
        now_ms: i64,
        id: Option<String>,
        raw: &[u8],
    ) -> u64 {
        let (qid, evicted) = self.quarantine.insert(reason, now_ms, id, raw);
        telemetry::count_quarantine_evicted(&self.context.id, evicted as u64);
        qid
    }

    /// Sends accepted events to every metric they feed; resolves once applied.
    fn apply(
        &self,
        events: Vec<ValidEvent>,
        now_ms: i64,
    ) -> ResponseFuture<Result<(), TenantError>> {
        let feeds = events.iter().fold(0u64, |mask, event| {
            mask | event.route.feeds | event.route.feeds_numerator
        });
        let events = Arc::new(events);
        let mut pending = Vec::new();
        for (index, metric) in self.metrics.iter().enumerate() {
            if let Some(addr) = metric {
                if feeds & (1u64 << index) != 0 && !events.is_empty() {
                    // Enqueued here, in order; room is guaranteed by the caller's permits.
                    pending.push(addr.send(ApplyEvents {
                        now_ms,
                        events: Arc::clone(&events),
                    }));
                }
            }
        }
        let tenant = self.context.id.to_string();
        Box::pin(async move {
            for request in pending {
                request
                    .await
                    .map_err(|_| TenantError::ActorGone(tenant.clone()))?;
            }
            Ok(())
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
        let now_ms = self.advance(batch.now_ms);
        // Refuse the whole batch up front rather than apply part of it.
        if self.dedup.ids_free() < batch.events.len() {
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
        for candidate in batch.quarantined {
            let qid = self.store_quarantined(
                candidate.reason,
                now_ms,
                candidate.id.clone(),
                &candidate.raw,
            );
            outcomes.push((
                candidate.index,
                EventOutcome::Quarantined {
                    reason: candidate.reason,
                    qid,
                    id: candidate.id,
                },
            ));
        }
        let applied = self.apply(accepted, now_ms);
        let in_flight = batch.in_flight;
        Box::pin(async move {
            applied.await?;
            drop(in_flight);
            Ok(outcomes)
        })
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
    type Result = Result<bool, TenantError>;

    fn handle(&mut self, message: DeleteQuarantined, _: &mut Context<Self>) -> Self::Result {
        Ok(self.quarantine.remove(message.qid).is_some())
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
        let validated = parse_event(&entry.raw).and_then(|raw| {
            match raw.tenant() {
                TenantField::Named(named) if named != &*self.context.id => {
                    return Err(Reason::TenantMismatch)
                }
                _ => {}
            }
            validate_event(&raw, &self.context.validation(), now_ms)
        });
        let event = match validated {
            Ok(event) => event,
            Err(reason) => {
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
        let applied = self.apply(accepted, now_ms);
        let in_flight = message.in_flight;
        Box::pin(async move {
            applied.await?;
            drop(in_flight);
            Ok(Some(outcome))
        })
    }
}
