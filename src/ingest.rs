//! The ingest service: attributes each raw event to a tenant, validates it
//! (here, off the actor threads), hands one batch per tenant to its
//! TenantActor, and gathers every event's outcome (docs/architecture.md, "the
//! path of an event"). HTTP is one source of raw events; a consumer of a
//! partitioned log (scale-out) would be another.
//! Must not: apply anything of a request it refuses (a tenant mismatch, a
//! tenant without room for another batch, a tenant that stopped serving are
//! decided before any batch is sent), or let an event go without an outcome.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::actors::tenant::{EventOutcome, IngestBatch, QuarantineCandidate, TenantError};
use crate::actors::{InFlight, TenantHandle};
use crate::auth::Principal;
use crate::domain::dedup::RunsChecked;
use crate::domain::event::{parse_event, validate_event, Reason, TenantField, ValidEvent};
use crate::domain::tenant::CoreError;
use crate::node::Node;
use crate::telemetry::{self, Outcome};

/// An event refused before it reached a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub index: u32,
    pub id: Option<String>,
    pub reason: Reason,
}

/// Every event's outcome, by its index in the request.
#[derive(Debug, Default)]
pub struct IngestReport {
    pub outcomes: Vec<(u32, EventOutcome)>,
    pub rejections: Vec<Rejection>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IngestError {
    /// A tenant key sent events naming another tenant: nothing is applied.
    #[error("a tenant key can only write its own tenant")]
    TenantMismatch(Vec<Rejection>),
    #[error("tenant {0} has too many ingest batches in flight; retry later")]
    Overloaded(String),
    /// Past `ingest.tenant_events_per_second_max`: `wait_ms` until the
    /// request's events fit, or `None` when they never fit in one burst.
    #[error("tenant {tenant} sends more than ingest.tenant_events_per_second_max ({per_second}) events a second; nothing was applied")]
    RateLimited {
        tenant: String,
        per_second: u64,
        wait_ms: Option<u64>,
    },
    #[error("tenant {tenant} is not serving: {reason}")]
    NotServing { tenant: String, reason: String },
    #[error(transparent)]
    Tenant(TenantError),
    #[error("tenant actor did not answer: {0}")]
    ActorGone(String),
    #[error("the data directory has {free_bytes} bytes free, below storage.disk_free_bytes_min ({min_bytes}); ingest resumes when space returns")]
    DiskShort { free_bytes: u64, min_bytes: u64 },
}

/// Each accepted event's time, by its index in the request.
type EventTimes = Vec<(u32, i64)>;

/// A tenant's batch sent to its actor: what to count once it is acknowledged.
type Acknowledging = (Arc<TenantHandle>, EventTimes, telemetry::LookupCounts);

/// A tenant's part of a request, with the handle it was routed by (one read
/// of the registry per tenant and request: a tenant removed meanwhile still
/// gets this request, as if it had come a moment earlier).
struct TenantBatch {
    tenant: Arc<TenantHandle>,
    events: Vec<(u32, ValidEvent)>,
    quarantined: Vec<QuarantineCandidate>,
    /// Its lookup tables as they were when the request first needed them.
    tables: Option<Arc<crate::domain::enrich::Tables>>,
    /// The lookups its events made, counted once the batch is acknowledged.
    lookups: telemetry::LookupCounts,
}

/// The tenant's token bucket; a poisoned lock is used as it is (no code
/// between lock and unlock panics).
fn lock_bucket(
    tenant: &TenantHandle,
) -> std::sync::MutexGuard<'_, crate::domain::rate::TokenBucket> {
    tenant
        .rate
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A tenant's batch is acknowledged: the freshness of its accepted events
/// (event time → now), and its feed learns that there is something new to show.
fn acknowledged(node: &Node, tenant: &str, times: &[(u32, i64)], outcomes: &[(u32, EventOutcome)]) {
    let now_ms = node.now_ms();
    // `times` is in the order of the request's events (by index)
    let mut lags = Vec::with_capacity(outcomes.len());
    for (index, outcome) in outcomes {
        if let EventOutcome::Accepted = outcome {
            if let Ok(at) = times.binary_search_by_key(index, |(at, _)| *at) {
                lags.push(now_ms - times[at].1);
            }
        }
    }
    if lags.is_empty() {
        return;
    }
    if let Some(feed) = node.feeds.get(tenant) {
        feed.event_freshness.record_ms(lags.into_iter());
        feed.acknowledged(now_ms);
    }
}

/// Ingests `items` (one raw JSON event each) for `principal`; events that
/// name no tenant go to `default_tenant` (a tenant key's own tenant, or the
/// one an admin named).
pub async fn ingest(
    node: &Node,
    principal: &Principal,
    default_tenant: Option<&str>,
    items: &[&[u8]],
    now_ms: i64,
) -> Result<IngestReport, IngestError> {
    let mut batches: BTreeMap<Arc<str>, TenantBatch> = BTreeMap::new();
    let mut rejections = Vec::new();
    let mut mismatches = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let index = index as u32;
        let parsed = parse_event(item);
        // an id past the limit is no id: echoing or keeping it would let one
        // event hold megabytes beside its raw bytes (which the quarantine cuts)
        let id = parsed
            .as_ref()
            .ok()
            .and_then(|raw| raw.id_text())
            .filter(|id| id.len() <= crate::domain::event::ID_BYTES_MAX)
            .map(str::to_string);
        let tenant_id: &str = match (principal, &parsed) {
            (Principal::Tenant(own), Ok(raw)) => match raw.tenant() {
                TenantField::Named(named) if named != own => {
                    mismatches.push(Rejection {
                        index,
                        id,
                        reason: Reason::TenantMismatch,
                    });
                    continue;
                }
                _ => own,
            },
            (Principal::Tenant(own), Err(_)) => own,
            (Principal::Admin, Ok(raw)) => {
                let named = match raw.tenant() {
                    TenantField::Named(named) => Ok(named),
                    TenantField::Absent => default_tenant.ok_or(Reason::MissingTenant),
                    TenantField::Invalid => Err(Reason::InvalidTenant),
                };
                match named {
                    Ok(named) => named,
                    Err(reason) => {
                        rejections.push(Rejection { index, id, reason });
                        continue;
                    }
                }
            }
            // an admin's unreadable event names no tenant whose quarantine could hold it
            (Principal::Admin, Err(reason)) => {
                rejections.push(Rejection {
                    index,
                    id,
                    reason: *reason,
                });
                continue;
            }
        };
        if !batches.contains_key(tenant_id) {
            let Some(tenant) = node.tenant(tenant_id) else {
                rejections.push(Rejection {
                    index,
                    id,
                    reason: Reason::UnknownTenant,
                });
                continue;
            };
            batches.insert(
                Arc::clone(&tenant.context.id),
                TenantBatch {
                    tenant,
                    events: Vec::new(),
                    quarantined: Vec::new(),
                    tables: None,
                    lookups: telemetry::LookupCounts::default(),
                },
            );
        }
        let Some(batch) = batches.get_mut(tenant_id) else {
            continue; // inserted just above
        };
        let validated = match &parsed {
            Ok(raw) => validate_event(raw, &batch.tenant.context.validation(), now_ms, now_ms),
            Err(reason) => Err(*reason),
        };
        // enrichment before counting: what it adds is logged with the event
        let validated = match validated {
            Ok(mut event) if !node.enrichments.is_empty() => {
                // the tables as they are when the request first needs them:
                // one read of the lock per tenant and request, not per event
                let tables = batch.tables.get_or_insert_with(|| {
                    node.lookups
                        .get(tenant_id)
                        .map(|lookups| lookups.tables())
                        .unwrap_or_default()
                });
                match crate::domain::enrich::enrich(&mut event, &node.enrichments, tables) {
                    Ok(made) => {
                        batch.lookups.hits += u64::from(made.hits);
                        batch.lookups.unknown += u64::from(made.unknown);
                        Ok(event)
                    }
                    Err(reason) => {
                        batch.lookups.quarantined += 1;
                        Err(reason)
                    }
                }
            }
            other => other,
        };
        match validated {
            Ok(event) => batch.events.push((index, event)),
            Err(reason) => batch.quarantined.push(QuarantineCandidate {
                index,
                id,
                reason,
                // the quarantine cuts it to raw_bytes_max and says so
                raw: item.to_vec(),
            }),
        }
    }
    if !mismatches.is_empty() {
        telemetry::count_outcome(
            Outcome::Rejected,
            Some(Reason::TenantMismatch),
            mismatches.len() as u64,
        );
        return Err(IngestError::TenantMismatch(mismatches));
    }
    // rejections are decided here and counted here, whatever happens next
    for rejection in &rejections {
        telemetry::count_outcome(Outcome::Rejected, Some(rejection.reason), 1);
    }
    // nothing is written while the disk is short; reads go on
    if let Some(free_bytes) = node.disk_short() {
        telemetry::count_shed(telemetry::Shed::DiskShort);
        return Err(IngestError::DiskShort {
            free_bytes,
            min_bytes: node.config.storage.disk_free_bytes_min,
        });
    }
    // A place in every tenant's budget first, so that a shed request applies
    // nothing; a tenant that stopped serving refuses the request with its reason.
    let mut permits = Vec::with_capacity(batches.len());
    for (tenant_id, batch) in &batches {
        let tenant = &batch.tenant;
        if let Some(reason) = tenant.failure() {
            telemetry::count_shed(telemetry::Shed::Unavailable);
            return Err(IngestError::NotServing {
                tenant: tenant_id.to_string(),
                reason,
            });
        }
        match Arc::clone(&tenant.batch_permits).try_acquire_owned() {
            Ok(permit) => permits.push(InFlight::new(permit)),
            Err(_) => {
                telemetry::count_shed(telemetry::Shed::BatchesInFlight);
                return Err(IngestError::Overloaded(tenant_id.to_string()));
            }
        }
    }
    // then the events of each tenant against its rate; a refusal gives back
    // what the request took from the tenants before it
    let mut taken: Vec<(Arc<TenantHandle>, u64)> = Vec::with_capacity(batches.len());
    for (tenant_id, batch) in &batches {
        let events = (batch.events.len() + batch.quarantined.len()) as u64;
        let took = lock_bucket(&batch.tenant).take(events, now_ms);
        if let Err(wait_ms) = took {
            for (earlier, events) in taken {
                lock_bucket(&earlier).give_back(events);
            }
            telemetry::count_shed(telemetry::Shed::RateLimited);
            return Err(IngestError::RateLimited {
                tenant: tenant_id.to_string(),
                per_second: node.config.ingest.tenant_events_per_second_max,
                wait_ms,
            });
        }
        taken.push((Arc::clone(&batch.tenant), events));
    }
    let mut requests = Vec::with_capacity(batches.len());
    // each accepted event's time, for its freshness once acknowledged
    let mut times: Vec<Acknowledging> = Vec::with_capacity(batches.len());
    for ((_, batch), in_flight) in batches.into_iter().zip(permits) {
        let tenant = batch.tenant;
        times.push((
            Arc::clone(&tenant),
            batch
                .events
                .iter()
                .map(|(index, event)| (*index, event.ts_ms))
                .collect(),
            batch.lookups,
        ));
        // the runs' filters are asked here, on this request's task, so that a
        // busy tenant's lookups spread over every core; the actor asks only
        // runs published since. A run that cannot be read is left to the actor,
        // which refuses the batch with the reason.
        let view = tenant.runs.get();
        let checked = if view.runs.is_empty() {
            None
        } else {
            let ids = batch.events.iter().map(|(_, event)| event.id.as_str());
            RunsChecked::of(&view, ids).ok()
        };
        requests.push(tenant.actor.send(IngestBatch {
            in_flight,
            now_ms,
            events: batch.events,
            quarantined: batch.quarantined,
            checked,
        }));
    }
    let mut outcomes: Vec<(u32, EventOutcome)> = Vec::with_capacity(items.len());
    let mut failure = None;
    for (request, (tenant, times, lookups)) in requests.into_iter().zip(times) {
        match request.await {
            // each tenant's actor counted its outcomes when it decided them
            Ok(Ok(tenant_outcomes)) => {
                telemetry::count_lookups(&tenant.context.id, lookups);
                acknowledged(node, &tenant.context.id, &times, &tenant_outcomes);
                outcomes.extend(tenant_outcomes);
            }
            Ok(Err(error)) => {
                telemetry::count_shed(match error {
                    TenantError::Core(CoreError::DedupFull { .. }) => telemetry::Shed::DedupFull,
                    _ => telemetry::Shed::Unavailable,
                });
                failure = Some(IngestError::Tenant(error));
            }
            Err(error) => {
                telemetry::count_shed(telemetry::Shed::Unavailable);
                failure = Some(IngestError::ActorGone(error.to_string()));
            }
        }
    }
    match failure {
        Some(error) => {
            // nothing was applied for a refused batch's client to retry: its
            // events do not count against the tenant's rate
            for (tenant, events) in taken {
                lock_bucket(&tenant).give_back(events);
            }
            Err(error)
        }
        None => Ok(IngestReport {
            outcomes,
            rejections,
        }),
    }
}
