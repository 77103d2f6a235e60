//! The tenant core: every decision about one tenant's events, as plain code
//! that takes `now` and returns what to write and what to apply
//! (docs/architecture.md, "the path of an event").
//!
//! Owns: de-duplication and lateness, the quarantine, the log record of a
//! batch, the order in which batches become visible, and undoing a batch whose
//! writes never reached the log. Every batch gets a ticket; the shell (the
//! tenant actor, or the simulation) reports back what became of it:
//! - `abort`: its writes were never submitted (an encode or a submit failed):
//!   everything it changed is undone, so a retry is judged anew;
//! - `fail`: it was submitted but could not be made durable and applied (a
//!   failed flush, a metric actor gone): the tenant stops serving until a
//!   restart recovers it from the log;
//! - `complete`: durable and applied; its outcomes are counted now, whether or
//!   not the client still waits for the reply.
//!
//! A reply may be sent once every ticket up to its own is complete
//! (`visible_through`): a duplicate is acknowledged only after the batch that
//! holds its original is visible to reads.
//!
//! Must not: read the clock, encode, touch storage or actors. The shell turns a
//! `Plan` into storage writes (`storage::tenant_ops`) and applies `Plan::events`
//! to the metrics.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono_tz::Tz;

use super::catalogue::Catalogue;
use super::dedup::{
    id_key, Admission, CoverPlan, DedupError, DedupIndex, MergePlan, Prechecked, Run, RunsChecked,
    SealedIds, SummaryFilter,
};
use super::enrich::{enrich, Enrichment, Tables};
use super::event::{
    parse_event, validate_event, EventLimits, Reason, TenantField, ValidEvent, ValidationContext,
};
use super::quarantine::{QuarantineStore, QuarantinedEvent};
use super::time::{day_bounds, second_of_ms, DayBounds};

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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("de-duplication table of tenant {tenant} is full ({ids_max} ids, ingest.dedup_table_bytes_max); retry later")]
    DedupFull { tenant: String, ids_max: usize },
    #[error("tenant {tenant} stopped serving ({reason}); the node must restart to recover it")]
    Failed { tenant: String, reason: String },
    #[error("tenant {tenant} cannot read its de-duplication runs ({reason}); retry later")]
    Unreadable { tenant: String, reason: String },
}

/// One write to the tenant's quarantine, in the order it must happen.
#[derive(Debug, Clone, PartialEq)]
pub enum QuarantineWrite {
    Put(QuarantinedEvent),
    Remove(u64),
    /// The next qid, stored so that qids are never reused after a restart.
    NextQid(u64),
}

/// What a ticket writes and applies.
#[derive(Debug, Clone)]
pub struct Plan {
    pub ticket: u64,
    pub now_ms: i64,
    /// Accepted events: one log record, then applied to the metrics in `feeds`.
    pub events: Arc<Vec<ValidEvent>>,
    /// Bit `i` set: the catalogue's metric `i` is fed by some of `events`.
    pub feeds: u64,
    /// Quarantine writes, after the log record (a crash between the two must
    /// leave a retried event quarantined, never gone).
    pub quarantine: Vec<QuarantineWrite>,
}

impl Plan {
    /// True when nothing is written: the ticket only waits its turn.
    pub fn writes_nothing(&self) -> bool {
        self.events.is_empty() && self.quarantine.is_empty()
    }
}

/// Outcomes of a ticket, counted when it completes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutcomeCounts {
    pub accepted: u64,
    pub duplicate: u64,
    pub late: u64,
    pub quarantined: Vec<(Reason, u64)>,
    /// Quarantine entries evicted by the bound to make room.
    pub quarantine_evicted: u64,
}

impl OutcomeCounts {
    fn add(&mut self, outcome: &EventOutcome) {
        match outcome {
            EventOutcome::Accepted => self.accepted += 1,
            EventOutcome::Duplicate => self.duplicate += 1,
            EventOutcome::Late => self.late += 1,
            EventOutcome::Quarantined { reason, .. } => {
                match self.quarantined.iter_mut().find(|(seen, _)| seen == reason) {
                    Some((_, count)) => *count += 1,
                    None => self.quarantined.push((*reason, 1)),
                }
            }
        }
    }
}

/// What a ticket changed in memory, kept until the shell reports back.
#[derive(Debug, Default)]
struct Pending {
    admitted: Vec<u128>,
    quarantine_added: Vec<u64>,
    /// Entries evicted, retried or deleted by this ticket: back in on abort.
    quarantine_taken: Vec<QuarantinedEvent>,
    counts: OutcomeCounts,
}

/// What a quarantine retry decided.
#[derive(Debug)]
pub enum RetryDecision {
    NotFound,
    /// The event stays quarantined (truncated, or still invalid); nothing is
    /// written.
    Stays(EventOutcome),
    Planned(Plan, EventOutcome),
}

pub struct TenantCore {
    context: Arc<TenantContext>,
    dedup: DedupIndex,
    quarantine: QuarantineStore,
    now_ms: i64,
    today: DayBounds,
    next_ticket: u64,
    pending: BTreeMap<u64, Pending>,
    failed: Option<String>,
}

impl TenantCore {
    pub fn new(
        context: Arc<TenantContext>,
        dedup: DedupIndex,
        quarantine: QuarantineStore,
        now_ms: i64,
    ) -> TenantCore {
        let today = day_bounds(second_of_ms(now_ms), context.tz);
        let mut core = TenantCore {
            context,
            dedup,
            quarantine,
            now_ms,
            today,
            next_ticket: 1,
            pending: BTreeMap::new(),
            failed: None,
        };
        core.dedup.expire(now_ms, today);
        core
    }

    pub fn context(&self) -> &Arc<TenantContext> {
        &self.context
    }

    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    pub fn dedup(&self) -> &DedupIndex {
        &self.dedup
    }

    pub fn quarantine(&self) -> &QuarantineStore {
        &self.quarantine
    }

    /// Why the tenant stopped serving, once it has.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Every ticket up to this one is complete (or was aborted).
    pub fn visible_through(&self) -> u64 {
        match self.pending.keys().next() {
            Some(first) => first - 1,
            None => self.next_ticket - 1,
        }
    }

    /// True when no ticket waits for the shell: a snapshot taken now covers
    /// every log record this tenant was given.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Moves time forward (never back) and expires ids that can no longer count.
    pub fn advance(&mut self, now_ms: i64) -> i64 {
        self.now_ms = self.now_ms.max(now_ms);
        let now_s = second_of_ms(self.now_ms);
        if now_s >= self.today.end_s {
            self.today = day_bounds(now_s, self.context.tz);
        }
        self.dedup.expire(self.now_ms, self.today);
        self.now_ms
    }

    fn dedup_error(&self, error: DedupError) -> CoreError {
        let tenant = self.context.id.to_string();
        match error {
            DedupError::Full { ids_max } => CoreError::DedupFull { tenant, ids_max },
            DedupError::Unreadable(reason) => CoreError::Unreadable { tenant, reason },
        }
    }

    fn serving(&self) -> Result<(), CoreError> {
        match &self.failed {
            Some(reason) => Err(CoreError::Failed {
                tenant: self.context.id.to_string(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn new_ticket(&mut self, pending: Pending) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.pending.insert(ticket, pending);
        ticket
    }

    fn feeds_of(events: &[ValidEvent]) -> u64 {
        events.iter().fold(0u64, |mask, event| {
            mask | event.route.feeds | event.route.feeds_numerator
        })
    }

    fn quarantine_candidate(
        &mut self,
        candidate: &QuarantineCandidate,
        now_ms: i64,
        pending: &mut Pending,
        writes: &mut Vec<QuarantineWrite>,
    ) -> EventOutcome {
        let (qid, evicted) = self.quarantine.insert(
            candidate.reason,
            now_ms,
            candidate.id.clone(),
            &candidate.raw,
        );
        for old in evicted {
            writes.push(QuarantineWrite::Remove(old.qid));
            pending.quarantine_taken.push(old);
            pending.counts.quarantine_evicted += 1;
        }
        if let Some(entry) = self.quarantine.get(qid) {
            writes.push(QuarantineWrite::Put(entry.clone()));
        }
        writes.push(QuarantineWrite::NextQid(qid + 1));
        pending.quarantine_added.push(qid);
        EventOutcome::Quarantined {
            reason: candidate.reason,
            qid,
            id: candidate.id.clone(),
        }
    }

    /// Decides the outcome of every event of a batch. The whole batch is
    /// refused (and nothing changes) when the de-dup table has no room for
    /// its new ids.
    /// `checked`, when given, is what the runs said of the events' ids
    /// (aligned with `events`), asked off the tenant's thread.
    pub fn ingest(
        &mut self,
        now_ms: i64,
        events: Vec<(u32, ValidEvent)>,
        quarantined: Vec<QuarantineCandidate>,
        checked: Option<RunsChecked>,
    ) -> Result<(Plan, Vec<(u32, EventOutcome)>), CoreError> {
        // a check that does not match the batch is not used
        let checked = checked.filter(|checked| {
            checked.keys.len() == events.len() && checked.found.len() == events.len()
        });
        self.serving()?;
        let now_ms = self.advance(now_ms);
        // Only ids that would be new need room (a resent batch is all
        // duplicates). Each event adds at most one id, so the ids are judged
        // twice only when the table might not hold them all.
        if self.dedup.ids_free() < events.len() {
            let mut new_ids = HashSet::new();
            for (_, event) in &events {
                let judged = self
                    .dedup
                    .judge(&event.id, event.ts_ms, now_ms, self.today)
                    .map_err(|error| self.dedup_error(error))?;
                if judged == Admission::Accepted {
                    new_ids.insert(event.id.as_str());
                }
            }
            if self.dedup.ids_free() < new_ids.len() {
                return Err(CoreError::DedupFull {
                    tenant: self.context.id.to_string(),
                    ids_max: self.dedup.ids_max(),
                });
            }
        }
        let mut pending = Pending::default();
        let mut outcomes = Vec::with_capacity(events.len() + quarantined.len());
        let mut accepted = Vec::new();
        // asked once a batch: most batches were checked against every run the
        // tenant still has, and then its ids need no run asked again
        let every_run_checked = checked
            .as_ref()
            .is_some_and(|checked| self.dedup.runs_all_in(&checked.runs));
        for (position, (index, event)) in events.into_iter().enumerate() {
            let (key, prechecked) = match &checked {
                Some(checked) => (
                    checked.keys[position],
                    match checked.found[position] {
                        Some(run) => Prechecked::In(run),
                        None if every_run_checked => Prechecked::InNoRun,
                        None => Prechecked::NotIn(&checked.runs),
                    },
                ),
                None => (id_key(&event.id), Prechecked::No),
            };
            let admitted = self
                .dedup
                .admit_key(key, event.ts_ms, now_ms, self.today, prechecked);
            let admission = match admitted {
                Ok(admission) => admission,
                // room for every new id was checked above, and every run read;
                // should it still refuse, the batch is refused whole, nothing
                // of it kept
                Err(error) => {
                    for key in pending.admitted {
                        self.dedup.forget_key(key);
                    }
                    return Err(self.dedup_error(error));
                }
            };
            let outcome = match admission {
                Admission::Accepted => {
                    pending.admitted.push(key);
                    accepted.push(event);
                    EventOutcome::Accepted
                }
                Admission::Duplicate => EventOutcome::Duplicate,
                Admission::Late => EventOutcome::Late,
            };
            pending.counts.add(&outcome);
            outcomes.push((index, outcome));
        }
        let mut writes = Vec::new();
        for candidate in &quarantined {
            let outcome = self.quarantine_candidate(candidate, now_ms, &mut pending, &mut writes);
            pending.counts.add(&outcome);
            outcomes.push((candidate.index, outcome));
        }
        let feeds = Self::feeds_of(&accepted);
        let ticket = self.new_ticket(pending);
        Ok((
            Plan {
                ticket,
                now_ms,
                events: Arc::new(accepted),
                feeds,
                quarantine: writes,
            },
            outcomes,
        ))
    }

    /// Validates a quarantined event again under the current config; when it
    /// passes, plans its log record and the removal of the entry.
    pub fn retry_quarantined(&mut self, qid: u64, now_ms: i64) -> Result<RetryDecision, CoreError> {
        self.retry_quarantined_with(qid, now_ms, &[], &Tables::default())
    }

    /// A retry that enriches the event as ingest does, with the tables as
    /// they are now (a table that gained the missing key lets it through).
    pub fn retry_quarantined_with(
        &mut self,
        qid: u64,
        now_ms: i64,
        enrichments: &[Enrichment],
        tables: &Tables,
    ) -> Result<RetryDecision, CoreError> {
        self.serving()?;
        let now_ms = self.advance(now_ms);
        let Some(entry) = self.quarantine.get(qid).cloned() else {
            return Ok(RetryDecision::NotFound);
        };
        let stays = |reason| EventOutcome::Quarantined {
            reason,
            qid,
            id: entry.id.clone(),
        };
        if entry.truncated {
            // only part of it was kept: it can be listed and dropped, not retried
            return Ok(RetryDecision::Stays(stays(entry.reason)));
        }
        let validated = parse_event(&entry.raw).and_then(|raw| {
            if let TenantField::Named(named) = raw.tenant() {
                if named != &*self.context.id {
                    return Err(Reason::TenantMismatch);
                }
            }
            let mut event =
                validate_event(&raw, &self.context.validation(), entry.received_ms, now_ms)?;
            enrich(&mut event, enrichments, tables)?;
            Ok(event)
        });
        let event = match validated {
            Ok(event) => event,
            Err(reason) => {
                // the new reason lives in memory; storage keeps the first one
                self.quarantine.set_reason(qid, reason);
                return Ok(RetryDecision::Stays(stays(reason)));
            }
        };
        let mut pending = Pending::default();
        let admission = self
            .dedup
            .admit(&event.id, event.ts_ms, now_ms, self.today)
            .map_err(|error| self.dedup_error(error))?;
        let outcome = match admission {
            Admission::Accepted => EventOutcome::Accepted,
            Admission::Duplicate => EventOutcome::Duplicate,
            Admission::Late => EventOutcome::Late,
        };
        pending.counts.add(&outcome);
        let events = if admission == Admission::Accepted {
            pending.admitted.push(id_key(&event.id));
            vec![event]
        } else {
            Vec::new()
        };
        if let Some(taken) = self.quarantine.remove(qid) {
            pending.quarantine_taken.push(taken);
        }
        let feeds = Self::feeds_of(&events);
        let ticket = self.new_ticket(pending);
        Ok(RetryDecision::Planned(
            Plan {
                ticket,
                now_ms,
                events: Arc::new(events),
                feeds,
                quarantine: vec![QuarantineWrite::Remove(qid)],
            },
            outcome,
        ))
    }

    /// Plans the removal of a quarantined event; `None` when there is none.
    pub fn delete_quarantined(&mut self, qid: u64) -> Result<Option<Plan>, CoreError> {
        self.serving()?;
        let Some(taken) = self.quarantine.remove(qid) else {
            return Ok(None);
        };
        let ticket = self.new_ticket(Pending {
            quarantine_taken: vec![taken],
            ..Pending::default()
        });
        Ok(Some(Plan {
            ticket,
            now_ms: self.now_ms,
            events: Arc::new(Vec::new()),
            feeds: 0,
            quarantine: vec![QuarantineWrite::Remove(qid)],
        }))
    }

    /// The ticket's writes never reached the log: undo what it changed. Only
    /// the newest ticket can be aborted (the shell aborts in the same handler
    /// that planned it): undoing an older one would forget ids that later
    /// tickets judged duplicates of.
    pub fn abort(&mut self, ticket: u64) {
        debug_assert_eq!(
            ticket,
            self.next_ticket - 1,
            "only the newest ticket aborts"
        );
        let Some(pending) = self.pending.remove(&ticket) else {
            return;
        };
        for key in pending.admitted {
            self.dedup.forget_key(key);
        }
        for qid in &pending.quarantine_added {
            self.quarantine.remove(*qid);
        }
        for entry in pending.quarantine_taken {
            if !pending.quarantine_added.contains(&entry.qid) {
                // the bound may evict another entry in its place; that one is
                // still on disk and comes back after a restart
                let _ = self.quarantine.restore(entry);
            }
        }
    }

    /// The ticket was submitted and then failed: what it wrote may or may not
    /// be durable, so only recovery from the log can say what counts. The
    /// tenant stops serving; nothing is undone.
    pub fn fail(&mut self, ticket: u64, reason: &str) {
        self.pending.remove(&ticket);
        if self.failed.is_none() {
            self.failed = Some(reason.to_string());
        }
    }

    /// The ticket is durable and applied; returns its outcomes to count. Once
    /// the tenant has failed, nothing is counted: the client gets 503, and
    /// its retry after the restart gets (and counts) the outcome.
    pub fn complete(&mut self, ticket: u64) -> OutcomeCounts {
        let counts = self.pending.remove(&ticket).map(|pending| pending.counts);
        match self.failed {
            Some(_) => OutcomeCounts::default(),
            None => counts.unwrap_or_default(),
        }
    }

    /// A reply for `ticket` may go out: everything before it is visible, and
    /// the tenant still serves.
    pub fn reply_ready(&self, ticket: u64) -> Option<Result<(), CoreError>> {
        if let Err(error) = self.serving() {
            return Some(Err(error));
        }
        (self.visible_through() >= ticket).then_some(Ok(()))
    }

    /// Recovery: the events of a log record that count, records in log order.
    /// Ids expire as they did when the record was decided; an id still
    /// remembered (from the snapshot or an earlier record) is not counted
    /// again, whatever the log holds; the ids cap does not apply to what was
    /// acknowledged. Only the runs an id could be in are asked
    /// (`DedupIndex::remember_accepted`).
    pub fn replay(
        &mut self,
        record_now_ms: i64,
        events: Vec<ValidEvent>,
    ) -> Result<Vec<ValidEvent>, CoreError> {
        // expire as the live core did when it decided this record: an id
        // accepted again after its first event could count nowhere is a new
        // event, and must be counted again
        self.advance(record_now_ms);
        let mut counted = Vec::with_capacity(events.len());
        for event in events {
            let new = self
                .dedup
                .remember_accepted(id_key(&event.id), second_of_ms(event.ts_ms))
                .map_err(|error| self.dedup_error(error))?;
            if new {
                counted.push(event);
            }
        }
        Ok(counted)
    }

    /// A snapshot: moves the remembered ids into a sealed set for a run on
    /// disk; returns every sealed set not yet installed. Call while idle.
    pub fn seal_dedup(&mut self) -> Vec<Arc<SealedIds>> {
        self.dedup.expire(self.now_ms, self.today);
        self.dedup.seal()
    }

    /// A run written from a sealed set is durable and listed by a snapshot.
    pub fn install_run(&mut self, run: Run) {
        self.dedup.install(run);
    }

    /// The next de-dup runs to merge (`DedupIndex::plan_merge`); none while
    /// the tenant has failed.
    pub fn plan_merge(&mut self) -> Option<MergePlan> {
        if self.failed.is_some() {
            return None;
        }
        self.dedup.plan_merge()
    }

    /// A merged run is durable: it replaces its inputs.
    pub fn install_merged(&mut self, run: Run, inputs: &[u64]) {
        self.dedup.install_merged(run, inputs);
    }

    /// A new summary filter over the runs, when they want one
    /// (`DedupIndex::plan_rebuild`).
    pub fn plan_rebuild(&mut self) -> Option<CoverPlan> {
        if self.failed.is_some() {
            return None;
        }
        self.dedup.plan_rebuild()
    }

    /// The runs not in the summary filter, to add to it
    /// (`DedupIndex::plan_extend`).
    pub fn plan_extend(&self) -> Option<CoverPlan> {
        if self.failed.is_some() {
            return None;
        }
        self.dedup.plan_extend()
    }

    /// A new summary filter planned will not come
    /// (`DedupIndex::abandon_rebuild`).
    pub fn abandon_rebuild(&mut self) {
        self.dedup.abandon_rebuild();
    }

    /// `summary` holds the keys of the runs `covered` (`DedupIndex::install_cover`).
    pub fn install_cover(&mut self, summary: Arc<SummaryFilter>, covered: &[u64], rebuilt: bool) {
        self.dedup.install_cover(summary, covered, rebuilt);
    }

    /// Recovery: an entry read back from storage. Returns the qids evicted to
    /// keep within the bound (their removal is the caller's to write).
    pub fn restore_quarantined(&mut self, entry: QuarantinedEvent) -> Vec<u64> {
        self.quarantine.restore(entry)
    }

    /// Recovery: the stored next qid, so that qids are never reused.
    pub fn reserve_qids_below(&mut self, next_qid: u64) {
        self.quarantine.reserve_qids_below(next_qid);
    }

    /// Every remembered id with its event second (for snapshots).
    pub fn export_dedup(&self) -> Vec<(u128, i64)> {
        self.dedup.export()
    }

    pub fn list_quarantine(&self, after: u64, limit: usize) -> Vec<QuarantinedEvent> {
        self.quarantine.list(after, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::catalogue::{MetricDef, MetricKind};

    const NOW_MS: i64 = 1_763_805_600_000;

    fn context(tz: Tz) -> Arc<TenantContext> {
        let catalogue = Catalogue::new(vec![MetricDef {
            name: "orders".into(),
            kind: MetricKind::Count,
            types: vec!["order.completed".into()],
            numerator: vec![],
            dims: vec![],
        }]);
        Arc::new(TenantContext {
            id: "t".into(),
            currency: "USD".into(),
            tz,
            catalogue: Arc::new(catalogue),
            limits: EventLimits {
                max_clock_skew_ms: 300_000,
                dims_per_event_max: 16,
                dim_key_bytes_max: 32,
                dim_value_bytes_max: 128,
                histogram_value_max: 1000,
            },
        })
    }

    fn core(ids_max: usize) -> TenantCore {
        TenantCore::new(
            context(Tz::UTC),
            DedupIndex::new(86_400, ids_max),
            QuarantineStore::new(2, 1024),
            NOW_MS,
        )
    }

    fn event(core: &TenantCore, id: &str, ts_ms: i64) -> ValidEvent {
        ValidEvent {
            id: id.into(),
            event_type: "order.completed".into(),
            ts_ms,
            amount: None,
            value: None,
            value_integer: None,
            dims: vec![],
            experiments: vec![],
            route: core.context.catalogue.route("order.completed"),
        }
    }

    fn candidate(index: u32, raw: &str) -> QuarantineCandidate {
        QuarantineCandidate {
            index,
            id: None,
            reason: Reason::MissingType,
            raw: raw.as_bytes().to_vec(),
        }
    }

    #[test]
    fn an_aborted_batch_forgets_its_ids_so_the_retry_is_accepted() {
        let mut core = core(10);
        let batch = vec![
            (0, event(&core, "a", NOW_MS)),
            (1, event(&core, "b", NOW_MS)),
        ];
        let (plan, outcomes) = core.ingest(NOW_MS, batch.clone(), vec![], None).unwrap();
        assert_eq!(outcomes[0].1, EventOutcome::Accepted);
        assert_eq!(plan.events.len(), 2);
        assert_eq!(plan.feeds, 1);
        core.abort(plan.ticket);
        assert!(core.dedup().is_empty());
        assert_eq!(core.visible_through(), plan.ticket);
        let (retry, outcomes) = core.ingest(NOW_MS, batch, vec![], None).unwrap();
        assert!(outcomes.iter().all(|(_, o)| *o == EventOutcome::Accepted));
        assert_eq!(
            core.complete(retry.ticket),
            OutcomeCounts {
                accepted: 2,
                ..OutcomeCounts::default()
            }
        );
    }

    #[test]
    fn an_aborted_batch_takes_its_quarantine_entries_back_and_returns_the_evicted() {
        let mut core = core(10);
        let (first, _) = core
            .ingest(
                NOW_MS,
                vec![],
                vec![candidate(0, "{1}"), candidate(1, "{2}")],
                None,
            )
            .unwrap();
        core.complete(first.ticket);
        let (plan, outcomes) = core
            .ingest(NOW_MS, vec![], vec![candidate(0, "{3}")], None)
            .unwrap();
        assert!(matches!(
            outcomes[0].1,
            EventOutcome::Quarantined { qid: 3, .. }
        ));
        assert_eq!(plan.quarantine[0], QuarantineWrite::Remove(1));
        core.abort(plan.ticket);
        let qids: Vec<u64> = core.list_quarantine(0, 10).iter().map(|e| e.qid).collect();
        assert_eq!(qids, vec![1, 2]);
    }

    #[test]
    fn a_duplicate_is_ready_only_after_the_batch_holding_its_original() {
        let mut core = core(10);
        let (original, _) = core
            .ingest(NOW_MS, vec![(0, event(&core, "a", NOW_MS))], vec![], None)
            .unwrap();
        let (duplicate, outcomes) = core
            .ingest(NOW_MS, vec![(0, event(&core, "a", NOW_MS))], vec![], None)
            .unwrap();
        assert_eq!(outcomes[0].1, EventOutcome::Duplicate);
        assert!(duplicate.writes_nothing());
        assert_eq!(core.reply_ready(duplicate.ticket), None);
        assert_eq!(
            core.complete(duplicate.ticket),
            OutcomeCounts {
                duplicate: 1,
                ..OutcomeCounts::default()
            }
        );
        assert_eq!(core.reply_ready(duplicate.ticket), None);
        core.complete(original.ticket);
        assert_eq!(core.reply_ready(duplicate.ticket), Some(Ok(())));
    }

    #[test]
    fn a_failed_ticket_stops_the_tenant_and_every_waiting_reply() {
        let mut core = core(10);
        let (original, _) = core
            .ingest(NOW_MS, vec![(0, event(&core, "a", NOW_MS))], vec![], None)
            .unwrap();
        let (duplicate, _) = core
            .ingest(NOW_MS, vec![(0, event(&core, "a", NOW_MS))], vec![], None)
            .unwrap();
        core.complete(duplicate.ticket);
        core.fail(original.ticket, "metric actor gone");
        assert!(matches!(
            core.reply_ready(duplicate.ticket),
            Some(Err(CoreError::Failed { .. }))
        ));
        // the id stays remembered: its record may be durable
        assert_eq!(core.dedup().len(), 1);
        assert!(matches!(
            core.ingest(NOW_MS, vec![], vec![], None),
            Err(CoreError::Failed { .. })
        ));
    }

    #[test]
    fn a_full_table_refuses_the_whole_batch_and_changes_nothing() {
        let mut core = core(1);
        let batch = vec![
            (0, event(&core, "a", NOW_MS)),
            (1, event(&core, "b", NOW_MS)),
        ];
        assert!(matches!(
            core.ingest(NOW_MS, batch, vec![], None),
            Err(CoreError::DedupFull { ids_max: 1, .. })
        ));
        assert!(core.dedup().is_empty());
        assert!(core.is_idle());
    }

    #[test]
    fn an_aborted_retry_puts_the_entry_back_and_forgets_the_id() {
        let mut core = core(10);
        let raw = format!(r#"{{"id":"q","type":"order.completed","ts":{NOW_MS}}}"#);
        let (first, _) = core
            .ingest(NOW_MS, vec![], vec![candidate(0, &raw)], None)
            .unwrap();
        core.complete(first.ticket);
        let RetryDecision::Planned(plan, outcome) = core.retry_quarantined(1, NOW_MS).unwrap()
        else {
            panic!("a valid event is planned");
        };
        assert_eq!(outcome, EventOutcome::Accepted);
        assert_eq!(plan.events[0].id, "q");
        assert_eq!(plan.quarantine, vec![QuarantineWrite::Remove(1)]);
        assert!(core.quarantine().get(1).is_none());
        core.abort(plan.ticket);
        assert!(core.quarantine().get(1).is_some());
        assert!(core.dedup().is_empty());
    }

    #[test]
    fn replay_counts_an_id_again_once_it_had_expired_as_the_live_core_did() {
        let mut core = core(10);
        let first = event(&core, "a", NOW_MS);
        assert_eq!(core.replay(NOW_MS, vec![first]).unwrap().len(), 1);
        // two days on, "a" comes back as a new event: the live core had expired
        // the first one and accepted this one, so replay must count it too
        let later_ms = NOW_MS + 2 * 86_400_000;
        let second = event(&core, "a", later_ms);
        assert_eq!(core.replay(later_ms, vec![second]).unwrap().len(), 1);
    }

    #[test]
    fn nothing_is_counted_once_the_tenant_failed() {
        let mut core = core(10);
        let (first, _) = core
            .ingest(NOW_MS, vec![(0, event(&core, "a", NOW_MS))], vec![], None)
            .unwrap();
        let (second, _) = core
            .ingest(NOW_MS, vec![(0, event(&core, "b", NOW_MS))], vec![], None)
            .unwrap();
        core.fail(first.ticket, "flush failed");
        // the client of the second gets 503; its retry after the restart counts
        assert_eq!(core.complete(second.ticket), OutcomeCounts::default());
    }

    #[test]
    fn replay_counts_an_id_once_whatever_the_log_holds() {
        let mut core = core(1);
        let events = vec![event(&core, "a", NOW_MS), event(&core, "b", NOW_MS)];
        assert_eq!(core.replay(NOW_MS, events.clone()).unwrap().len(), 2);
        assert!(core.replay(NOW_MS, events).unwrap().is_empty());
        // past the cap: acknowledged ids are remembered all the same
        assert_eq!(core.dedup().len(), 2);
    }
}
