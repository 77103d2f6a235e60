//! Deterministic simulation of a tenant's pipeline under faults (TigerBeetle's
//! VOPR is the model; docs/durability.md, "simulation").
//!
//! A seeded run drives the real tenant core (`domain::tenant`), the real plan
//! encoding (`storage::snapshot::plan_ops`), the real snapshot and pruning code
//! and the real recovery (`storage::recovery::recover`) over a store that keeps
//! what was flushed apart from what was only written, through random batches,
//! duplicates, retries, abandoned requests, quarantine retries and deletes,
//! failed submits, failed encodes, failed (and partly persisted) flushes, a
//! metric actor gone, ids checked against a stale list of runs before the
//! core judges them, a log that holds a record twice, de-dup runs merged
//! (merges cancelled, and crashes between a merge and the snapshot that lists
//! it), and crashes between any two steps. After every step it checks that:
//! (a) every acknowledged event is durable, and counted after recovery;
//! (b) nothing is counted twice (windows equal the model, which holds each id
//!     once);
//! (c) the windows equal a reference model of the events that count: those
//!     applied while running, those durable after a recovery.
//!
//! `TALLY_SIM_SEEDS` (default 40) and `TALLY_SIM_STEPS` (default 1500) size the
//! run; `TALLY_SIM_SEED=N` replays one seed. A failure prints its seed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::TimeZone;
use chrono_tz::Tz;

use tally::config::Config;
use tally::domain::catalogue::Catalogue;
use tally::domain::dedup::{CoverPlan, SummaryFilter};
use tally::domain::event::{Reason, ValidEvent};
use tally::domain::metric::{MetricState, SeriesReading};
use tally::domain::tenant::{
    EventOutcome, Plan, QuarantineCandidate, QuarantineWrite, RetryDecision, TenantCore,
};
use tally::domain::time::{counts_in_some_window, day_bounds};
use tally::domain::window::{SlidingTally, Tally};
use tally::storage::recovery::{recover, series_settings};
use tally::storage::runs::{commit_merge, cover_runs, merge_runs, runs_dir};
use tally::storage::snapshot::{
    delete_unlisted_runs, plan_ops, prune_ops, snapshot_ops, write_sealed_runs, HistoryBook,
    TenantSnapshot, HISTORY_CHUNK_S,
};
use tally::storage::{key_lsn, lsn_key, Op, Space, StorageError, Store};

const TENANT: &str = "demo";
/// 2025-11-02 22:30 EST in New York: the 25-hour day ends during the run.
const START_MS: i64 = 1_762_140_600_000;
const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// splitmix64: small, seedable, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn range(&mut self, low: i64, high: i64) -> i64 {
        low + self.below((high - low) as u64) as i64
    }
}

/// Keeps what was written apart from what was flushed; a crash keeps only the
/// flushed. Faults are chosen by the simulation, not here.
#[derive(Default)]
struct SimStore {
    state: Mutex<SimState>,
}

#[derive(Default, Clone)]
struct SimState {
    written: HashMap<Space, BTreeMap<Vec<u8>, Vec<u8>>>,
    durable: HashMap<Space, BTreeMap<Vec<u8>, Vec<u8>>>,
}

fn apply_ops(maps: &mut HashMap<Space, BTreeMap<Vec<u8>, Vec<u8>>>, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Put { space, key, value } => {
                maps.entry(*space)
                    .or_default()
                    .insert(key.clone(), value.clone());
            }
            Op::Remove { space, key } => {
                maps.entry(*space).or_default().remove(key);
            }
        }
    }
}

impl SimStore {
    fn crash(&self) {
        let mut state = self.state.lock().unwrap();
        state.written = state.durable.clone();
    }

    /// Writes `ops` straight to durable storage (a flush that covers them).
    fn persist(&self, ops: &[Op]) {
        let mut state = self.state.lock().unwrap();
        apply_ops(&mut state.written, ops);
        apply_ops(&mut state.durable, ops);
    }
}

impl Store for SimStore {
    fn apply(&self, ops: &[Op]) -> Result<(), StorageError> {
        apply_ops(&mut self.state.lock().unwrap().written, ops);
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap();
        state.durable = state.written.clone();
        Ok(())
    }

    fn scan(
        &self,
        space: Space,
        from: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let state = self.state.lock().unwrap();
        if let Some(map) = state.written.get(&space) {
            for (key, value) in map.range(from.to_vec()..) {
                if !visit(key, value) {
                    break;
                }
            }
        }
        Ok(())
    }

    fn last_key(&self, space: Space) -> Result<Option<Vec<u8>>, StorageError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .written
            .get(&space)
            .and_then(|map| map.keys().next_back().cloned()))
    }
}

#[derive(Debug, Clone, PartialEq)]
struct SimEvent {
    id: String,
    ts_ms: i64,
    amount: i64,
}

/// A ticket between the core and its reply.
struct InFlightTicket {
    plan: Plan,
    /// The events of the request and the request's own outcomes, by index.
    request: Vec<SimEvent>,
    outcomes: Vec<(u32, EventOutcome)>,
    /// The client went away: nobody reads the reply.
    abandoned: bool,
}

struct Node {
    core: TenantCore,
    metrics: Vec<Option<MetricState>>,
    metrics_now_ms: i64,
    next_lsn: AtomicU64,
    next_snapshot_id: u64,
    /// The history chunks of the last durable snapshot (`HistoryBook`).
    history: HistoryBook,
    /// A new summary filter built, not yet installed, and the runs it holds.
    pending_rebuild: Option<(Arc<SummaryFilter>, Vec<u64>)>,
    /// Submitted, waiting for the flush (the committer's queue).
    queued: Vec<(InFlightTicket, Vec<Op>)>,
    /// Durable, waiting to be applied.
    durable: Vec<InFlightTicket>,
    /// Applied and completed, waiting for their turn to reply.
    replying: Vec<InFlightTicket>,
    /// A metric actor is gone: every apply fails.
    metric_gone: bool,
    /// The runs as last published to ingest (often older than the core's).
    published_runs: tally::domain::dedup::RunsView,
}

struct Sim {
    rng: Rng,
    _runs_dir: tempfile::TempDir,
    config: Config,
    catalogue: Arc<Catalogue>,
    tz: Tz,
    store: Arc<SimStore>,
    node: Node,
    now_ms: i64,
    next_event: u64,
    /// The producer's view.
    unacknowledged: Vec<SimEvent>,
    acknowledged: HashMap<String, SimEvent>,
    /// The oracle: events accepted whose log record is durable, and those
    /// applied to the running node's windows.
    durable: HashMap<String, SimEvent>,
    applied: HashMap<String, SimEvent>,
    /// When the version of each id in `applied` (and in `durable`) was accepted.
    applied_at: HashMap<String, i64>,
    durable_at: HashMap<String, i64>,
    /// The qids whose entries are durable in the quarantine.
    quarantine_durable: BTreeSet<u64>,
    /// Valid events sitting in the quarantine under a made-up reason.
    quarantined_raw: HashMap<String, SimEvent>,
    crashes: u64,
    merges: u64,
    /// Summary filter steps that completed.
    covers: u64,
    faults: u64,
}

fn check(condition: bool, message: impl FnOnce() -> String) -> Result<(), String> {
    if condition {
        Ok(())
    } else {
        Err(message())
    }
}

fn event_json(event: &SimEvent) -> String {
    format!(
        r#"{{"id":"{}","type":"order.completed","ts":{},"amount":{},"currency":"USD"}}"#,
        event.id, event.ts_ms, event.amount
    )
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut config = Config::parse(DEFAULT_TOML, Vec::new()).expect("default config is valid");
        config.tenants.retain(|tenant| tenant.id == TENANT);
        config.tenants[0].timezone = "America/New_York".into();
        config.quarantine.events_per_tenant_max = 4;
        // ids expire as soon as their events can count nowhere, so that runs
        // reach expiry, and ids come back as new events after it
        config.ingest.dedup_horizon_s = 0;
        // a small table (64 ids), so that ids move to runs often and the runs
        // soon want a summary filter (half a table's ids in three runs)
        config.ingest.dedup_table_bytes_max = 128 * 64;
        // de-dup runs are real files, in a directory of the run's own
        let runs_dir = tempfile::tempdir().expect("a temporary directory");
        config.storage.data_dir = runs_dir.path().to_path_buf();
        let catalogue = Arc::new(config.catalogue().expect("default catalogue is valid"));
        let store = Arc::new(SimStore::default());
        let node = Self::recover_node(&store, &config, START_MS);
        Sim {
            rng: Rng(seed),
            _runs_dir: runs_dir,
            config,
            catalogue,
            tz: chrono_tz::America::New_York,
            store,
            node,
            now_ms: START_MS,
            next_event: 0,
            unacknowledged: Vec::new(),
            acknowledged: HashMap::new(),
            durable: HashMap::new(),
            applied: HashMap::new(),
            applied_at: HashMap::new(),
            durable_at: HashMap::new(),
            quarantined_raw: HashMap::new(),
            quarantine_durable: BTreeSet::new(),
            crashes: 0,
            merges: 0,
            covers: 0,
            faults: 0,
        }
    }

    fn recover_node(store: &Arc<SimStore>, config: &Config, now_ms: i64) -> Node {
        let contexts = config
            .check()
            .expect("the config is valid")
            .tenant_contexts();
        let mut recovered =
            recover(&**store, config, &contexts, now_ms).expect("recovery of the simulated store");
        let tenant = recovered
            .tenants
            .remove(TENANT)
            .expect("the tenant is configured");
        Node {
            metrics_now_ms: tenant.core.now_ms(),
            core: tenant.core,
            metrics: tenant.metrics,
            next_lsn: AtomicU64::new(recovered.next_lsn),
            next_snapshot_id: recovered.next_snapshot_id,
            history: HistoryBook::default(),
            pending_rebuild: None,
            queued: Vec::new(),
            durable: Vec::new(),
            replying: Vec::new(),
            metric_gone: false,
            published_runs: Default::default(),
        }
    }

    fn valid_event(&self, event: &SimEvent) -> ValidEvent {
        ValidEvent {
            id: event.id.clone(),
            event_type: "order.completed".into(),
            ts_ms: event.ts_ms,
            amount: Some(event.amount),
            value: None,
            value_integer: None,
            dims: vec![],
            experiments: vec![],
            route: self.catalogue.route("order.completed"),
        }
    }

    fn new_event(&mut self) -> SimEvent {
        self.next_event += 1;
        let offset_ms = match self.rng.below(20) {
            0 => -self.rng.range(1_800_000, 30 * 3_600_000),
            1 => -self.rng.range(30_000, 1_800_000),
            _ => self.rng.range(-30_000, 5_000),
        };
        SimEvent {
            id: format!("e{}", self.next_event),
            ts_ms: self.now_ms + offset_ms,
            amount: self.rng.range(1, 100_000),
        }
    }

    /// A producer's request: new events, retries of unanswered ones, resends
    /// of acknowledged ones, and now and then an event for the quarantine.
    fn request(&mut self) -> Result<(), String> {
        let mut request = Vec::new();
        for _ in 0..self.rng.range(0, 6) {
            let event = self.new_event();
            request.push(event);
        }
        for _ in 0..self.rng.range(0, 3) {
            if !self.unacknowledged.is_empty() {
                let index = self.rng.below(self.unacknowledged.len() as u64) as usize;
                request.push(self.unacknowledged.swap_remove(index));
            }
        }
        if self.rng.chance(30) && !self.acknowledged.is_empty() {
            let mut ids: Vec<&String> = self.acknowledged.keys().collect();
            ids.sort();
            let id = ids[self.rng.below(ids.len() as u64) as usize].clone();
            let mut event = self.acknowledged[&id].clone();
            if self.rng.chance(30) {
                // the id comes back with a new event: a duplicate while the
                // first can still count, a new event once it cannot
                event.ts_ms = self.now_ms - self.rng.range(0, 20_000);
                event.amount = self.rng.range(1, 100_000);
            }
            request.push(event);
        }
        let events: Vec<(u32, ValidEvent)> = request
            .iter()
            .enumerate()
            .map(|(index, event)| (index as u32, self.valid_event(event)))
            .collect();
        let mut candidates = Vec::new();
        if self.rng.chance(10) {
            // a valid event quarantined under a made-up reason: its retry passes
            let event = self.new_event();
            self.quarantined_raw.insert(event.id.clone(), event.clone());
            candidates.push(QuarantineCandidate {
                index: request.len() as u32,
                id: Some(event.id.clone()),
                reason: Reason::InvalidCurrency,
                raw: event_json(&event).into_bytes(),
            });
        }
        // ingest checks the ids against the runs the tenant last published,
        // which may be stale: the core asks the runs the list lacked
        if self.rng.chance(50) {
            self.node.published_runs = self.node.core.dedup().runs_shared();
        }
        let checked = if self.rng.chance(70) {
            let ids = events.iter().map(|(_, event)| event.id.as_str());
            tally::domain::dedup::RunsChecked::of(&self.node.published_runs, ids).ok()
        } else {
            None
        };
        let decided = self
            .node
            .core
            .ingest(self.now_ms, events, candidates, checked);
        match decided {
            Ok((plan, outcomes)) => self.submit(plan, request, outcomes),
            Err(_) => {
                self.unacknowledged.extend(request);
                Ok(())
            }
        }
    }

    /// Encodes and submits a plan, with the faults an actor meets there.
    fn submit(
        &mut self,
        plan: Plan,
        request: Vec<SimEvent>,
        outcomes: Vec<(u32, EventOutcome)>,
    ) -> Result<(), String> {
        let ticket = InFlightTicket {
            abandoned: self.rng.chance(10),
            plan,
            request,
            outcomes,
        };
        if ticket.plan.writes_nothing() {
            self.node.durable.push(ticket);
            return Ok(());
        }
        // a record too large to read back: the real encoder refuses it
        let record_bytes_max = if self.rng.chance(3) {
            self.faults += 1;
            16
        } else {
            self.config.storage.record_bytes_max
        };
        let encoded = plan_ops(&ticket.plan, TENANT, &self.node.next_lsn, record_bytes_max);
        let submit_fails = self.rng.chance(3);
        match encoded {
            Ok(ops) if !submit_fails => {
                self.node.queued.push((ticket, ops));
                Ok(())
            }
            _ => {
                if submit_fails {
                    self.faults += 1;
                }
                // an encode or submit failure: the client gets 503 and retries
                self.node.core.abort(ticket.plan.ticket);
                self.unacknowledged.extend(ticket.request);
                Ok(())
            }
        }
    }

    fn retry_quarantined(&mut self) -> Result<(), String> {
        let listed = self.node.core.list_quarantine(0, 10);
        if listed.is_empty() {
            return Ok(());
        }
        let entry = &listed[self.rng.below(listed.len() as u64) as usize];
        let qid = entry.qid;
        if self.rng.chance(20) {
            if let Ok(Some(plan)) = self.node.core.delete_quarantined(qid) {
                return self.submit(plan, Vec::new(), Vec::new());
            }
            return Ok(());
        }
        let event = entry
            .id
            .as_ref()
            .and_then(|id| self.quarantined_raw.get(id))
            .cloned();
        match self.node.core.retry_quarantined(qid, self.now_ms) {
            Ok(RetryDecision::Planned(plan, outcome)) => {
                let event = event.ok_or("a retried entry is one the simulation made")?;
                self.submit(plan, vec![event], vec![(0, outcome)])
            }
            Ok(_) | Err(_) => Ok(()),
        }
    }

    /// The committer: writes every queued set, flushes once. A failed flush
    /// may still have persisted some of the sets; the node then restarts.
    fn flush(&mut self) -> Result<(), String> {
        if self.node.queued.is_empty() {
            return Ok(());
        }
        let queued = std::mem::take(&mut self.node.queued);
        let fails = self.rng.chance(3);
        let persisted = if fails {
            self.faults += 1;
            self.rng.below(queued.len() as u64 + 1) as usize
        } else {
            queued.len()
        };
        for (index, (ticket, ops)) in queued.into_iter().enumerate() {
            if index < persisted {
                self.store.persist(&ops);
                for write in &ticket.plan.quarantine {
                    match write {
                        QuarantineWrite::Put(entry) => {
                            self.quarantine_durable.insert(entry.qid);
                        }
                        QuarantineWrite::Remove(qid) => {
                            self.quarantine_durable.remove(qid);
                        }
                        QuarantineWrite::NextQid(_) => {}
                    }
                }
                for event in ticket.plan.events.iter() {
                    let sim = SimEvent {
                        id: event.id.clone(),
                        ts_ms: event.ts_ms,
                        amount: event.amount.unwrap_or(0),
                    };
                    self.durable_at.insert(event.id.clone(), ticket.plan.now_ms);
                    if let Some(old) = self.durable.insert(event.id.clone(), sim) {
                        // only an id whose first event can count nowhere any more
                        // may be accepted again
                        check(self.counts_nowhere(&old, ticket.plan.now_ms), || {
                            format!("event {} was made durable twice while it counts", old.id)
                        })?;
                    }
                }
            }
            if fails {
                self.node.core.fail(ticket.plan.ticket, "flush failed");
                self.unacknowledged.extend(ticket.request);
            } else {
                self.node.durable.push(ticket);
            }
        }
        if fails {
            // storage failed: the node exits and restarts
            self.crash()?;
        }
        Ok(())
    }

    /// Applies the oldest durable ticket to the metrics, as the actor does.
    fn apply(&mut self) -> Result<(), String> {
        if self.node.durable.is_empty() {
            return Ok(());
        }
        let index = self.rng.below(self.node.durable.len() as u64) as usize;
        let ticket = self.node.durable.remove(index);
        if self.node.metric_gone && !ticket.plan.events.is_empty() {
            self.node
                .core
                .fail(ticket.plan.ticket, "a metric actor stopped");
            self.unacknowledged.extend(ticket.request);
            return Ok(());
        }
        self.node.metrics_now_ms = self.node.metrics_now_ms.max(ticket.plan.now_ms);
        // a metric gets its state (its actor) with its first events, as the
        // tenant actor starts it
        let settings = series_settings(&self.config, self.tz);
        for (index, def) in self.catalogue.metrics().iter().enumerate() {
            if ticket.plan.feeds & (1u64 << index) != 0
                && def.kind.has_state()
                && self.node.metrics[index].is_none()
            {
                self.node.metrics[index] =
                    Some(MetricState::new(index, def, settings, ticket.plan.now_ms));
            }
        }
        for metric in self.node.metrics.iter_mut().flatten() {
            let report = metric.apply(&ticket.plan.events, self.node.metrics_now_ms);
            check(report.events_refused == 0, || {
                "the windows refused an accepted event".into()
            })?;
        }
        for event in ticket.plan.events.iter() {
            // the event as this ticket carries it (the durable version of its
            // id may be a later event already, accepted once this one could
            // count nowhere)
            check(self.durable.contains_key(&event.id), || {
                format!("event {} applied before it was durable", event.id)
            })?;
            let sim = SimEvent {
                id: event.id.clone(),
                ts_ms: event.ts_ms,
                amount: event.amount.unwrap_or(0),
            };
            // tickets apply in any order: of two events of one id, the one
            // accepted first must count nowhere by the time the other was
            let accepted_at = ticket.plan.now_ms;
            match self.applied_at.get(&event.id).copied() {
                Some(other_at) if other_at > accepted_at => {
                    check(self.counts_nowhere(&sim, other_at), || {
                        format!("event {} applied twice while it counts", event.id)
                    })?;
                }
                _ => {
                    if let Some(old) = self.applied.insert(event.id.clone(), sim) {
                        check(self.counts_nowhere(&old, accepted_at), || {
                            format!("event {} applied twice while it counts", event.id)
                        })?;
                    }
                    self.applied_at.insert(event.id.clone(), accepted_at);
                }
            }
        }
        self.node.core.complete(ticket.plan.ticket);
        self.node.replying.push(ticket);
        Ok(())
    }

    /// Sends every reply whose turn has come.
    fn reply(&mut self) -> Result<(), String> {
        let mut waiting = Vec::new();
        for ticket in std::mem::take(&mut self.node.replying) {
            match self.node.core.reply_ready(ticket.plan.ticket) {
                None => waiting.push(ticket),
                Some(Err(_)) => self.unacknowledged.extend(ticket.request),
                Some(Ok(())) if ticket.abandoned => self.unacknowledged.extend(ticket.request),
                Some(Ok(())) => {
                    for (index, outcome) in &ticket.outcomes {
                        let Some(event) = ticket.request.get(*index as usize) else {
                            continue;
                        };
                        match outcome {
                            EventOutcome::Accepted | EventOutcome::Duplicate => {
                                // an acknowledged event must already count
                                check(self.applied.contains_key(&event.id), || {
                                    format!(
                                        "event {} acknowledged ({outcome:?}) but not visible",
                                        event.id
                                    )
                                })?;
                                // a duplicate acknowledges the event that counts
                                // under that id, not this one's payload
                                let counted = self.applied[&event.id].clone();
                                self.acknowledged.insert(event.id.clone(), counted);
                            }
                            // late and quarantined events are answered; the
                            // producer does not send them again
                            _ => {}
                        }
                    }
                }
            }
        }
        self.node.replying = waiting;
        Ok(())
    }

    /// The tenant's snapshot, taken when no ticket is in flight (the actor
    /// waits for that), written and pruned through a flush.
    fn snapshot(&mut self) -> Result<(), String> {
        if !self.node.core.is_idle() || self.node.core.failure().is_some() {
            return Ok(());
        }
        // as the actor does: the remembered ids are sealed for runs on disk
        let sealed = self.node.core.seal_dedup();
        // as the node does: the history whole after a start, else only the
        // chunks changed since the last (durable) snapshot
        let whole_history = self.node.history.is_empty();
        let mut history_extents = Vec::new();
        let mut metrics = Vec::new();
        for (def, state) in self.catalogue.metrics().iter().zip(&mut self.node.metrics) {
            let Some(state) = state.as_mut() else {
                continue;
            };
            let (export, extent) = state.export_history(whole_history, HISTORY_CHUNK_S);
            metrics.push((def.name.clone(), export));
            history_extents.push(extent);
        }
        let mut part = TenantSnapshot {
            tenant: TENANT.into(),
            position_lsn: self.node.next_lsn.load(Ordering::SeqCst).saturating_sub(1),
            now_ms: self.node.core.now_ms(),
            dedup: self.node.core.export_dedup(),
            runs: self.node.core.dedup().runs(),
            experiments: Vec::new(),
            metrics,
            history_extents,
        };
        let runs = write_sealed_runs(&self.config.storage.data_dir, &mut part, &sealed);
        let id = self.node.next_snapshot_id;
        self.node.next_snapshot_id += 1;
        let record_bytes_max = self.config.storage.record_bytes_max;
        let (ops, next_book) = snapshot_ops(
            id,
            self.now_ms,
            &mut [part],
            record_bytes_max,
            &self.node.history,
        )
        .map_err(|error| error.to_string())?;
        if self.rng.chance(8) {
            // the commit fails before anything of it is durable and the node
            // goes on: it keeps no book (node.rs), so the next snapshot asks
            // for the history whole (these exports marked it unchanged)
            self.faults += 1;
            self.node.history = HistoryBook::default();
            return Ok(());
        }
        if self.rng.chance(5) {
            // the flush fails before the manifest is durable
            self.faults += 1;
            let cut = self.rng.below(ops.len() as u64) as usize;
            self.store.persist(&ops[..cut]);
            return self.crash();
        }
        self.store.persist(&ops);
        let sweep_history = self.node.history.is_empty();
        self.node.history = next_book;
        let prune = prune_ops(&*self.store, 2, sweep_history, record_bytes_max)
            .map_err(|e| e.to_string())?;
        if !prune.is_empty() && self.rng.chance(10) {
            // the node commits a prune a few removals at a time: a crash may
            // leave any prefix of it durable
            self.faults += 1;
            let cut = self.rng.below(prune.len() as u64) as usize;
            self.store.persist(&prune[..cut]);
            return self.crash();
        }
        self.store.persist(&prune);
        for run in runs {
            self.node.core.install_run(run);
        }
        delete_unlisted_runs(
            &*self.store,
            &self.config.storage.data_dir,
            &[TENANT.to_string()],
            record_bytes_max,
        )?;
        Ok(())
    }

    /// Merges de-dup runs as the node's merger does (real run files): some
    /// merges are cancelled, some crash before the commit or before a
    /// snapshot lists the merged run.
    fn merge(&mut self) -> Result<(), String> {
        let Some(plan) = self.node.core.plan_merge() else {
            return Ok(());
        };
        let dir = runs_dir(&self.config.storage.data_dir, TENANT);
        let cancel = self.rng.chance(10);
        let Some(merged) = merge_runs(&dir, &plan, &|| cancel)? else {
            return Ok(());
        };
        if self.rng.chance(10) {
            self.faults += 1;
            return self.crash();
        }
        let run = commit_merge(&dir, merged)?;
        let inputs: Vec<u64> = plan.inputs.iter().map(|run| run.meta.id).collect();
        self.node.core.install_merged(run, &inputs);
        self.merges += 1;
        Ok(())
    }

    /// Builds or extends the summary filter over the runs as the node's
    /// rebuilder and indexer do (a new summary is installed some steps after
    /// it was planned, the current one extended meanwhile); some steps are
    /// cancelled, and a crash loses the summary (it is kept in memory only,
    /// built anew after a start).
    fn cover(&mut self) -> Result<(), String> {
        let cancel = self.rng.chance(10);
        // a new summary is built in one step and installed in a later one, as
        // the node's rebuilder does beside its indexer
        if let Some((summary, covered)) = self.node.pending_rebuild.take() {
            if self.rng.chance(50) {
                self.node.core.install_cover(summary, &covered, true);
                self.covers += 1;
            } else {
                self.node.pending_rebuild = Some((summary, covered));
            }
        } else if let Some(CoverPlan::Rebuild { ids_max, runs }) = self.node.core.plan_rebuild() {
            let covered: Vec<u64> = runs.iter().map(|run| run.meta.id).collect();
            let mut summary = SummaryFilter::new(ids_max);
            if cover_runs(&runs, &|| cancel, &mut |key| summary.insert_unshared(key))? {
                self.node.pending_rebuild = Some((Arc::new(summary), covered));
            } else {
                self.node.core.abandon_rebuild();
            }
        }
        let Some(CoverPlan::Extend { summary, runs }) = self.node.core.plan_extend() else {
            return Ok(());
        };
        let covered: Vec<u64> = runs.iter().map(|run| run.meta.id).collect();
        // as the node does: one writer for the whole step
        let writer = summary.writer();
        if !cover_runs(&runs, &|| cancel, &mut |key| writer.insert(key))? {
            return Ok(());
        }
        drop(writer);
        self.node.core.install_cover(summary, &covered, false);
        self.covers += 1;
        Ok(())
    }

    /// The log holds a record twice (e.g. a source that delivers again).
    fn duplicate_a_record(&mut self) -> Result<(), String> {
        let mut records = Vec::new();
        self.store
            .scan(Space::Wal, &[], &mut |key, value| {
                records.push((key.to_vec(), value.to_vec()));
                true
            })
            .map_err(|e| e.to_string())?;
        let durable_records: Vec<_> = {
            let state = self.store.state.lock().unwrap();
            records
                .into_iter()
                .filter(|(key, _)| {
                    state
                        .durable
                        .get(&Space::Wal)
                        .is_some_and(|map| map.contains_key(key))
                })
                .collect()
        };
        if durable_records.is_empty() {
            return Ok(());
        }
        let (key, value) = &durable_records[self.rng.below(durable_records.len() as u64) as usize];
        check(key_lsn(key).is_some(), || "log keys are LSNs".into())?;
        let lsn = self.node.next_lsn.fetch_add(1, Ordering::SeqCst);
        self.faults += 1;
        self.store.persist(&[Op::Put {
            space: Space::Wal,
            key: lsn_key(lsn).to_vec(),
            value: value.clone(),
        }]);
        Ok(())
    }

    /// Everything not flushed is gone; the node recovers from the store.
    fn crash(&mut self) -> Result<(), String> {
        self.crashes += 1;
        self.store.crash();
        let node = std::mem::replace(
            &mut self.node,
            Self::recover_node(&self.store, &self.config, self.now_ms),
        );
        // requests in flight never get their reply
        for (ticket, _) in node.queued {
            self.unacknowledged.extend(ticket.request);
        }
        for ticket in node.durable.into_iter().chain(node.replying) {
            self.unacknowledged.extend(ticket.request);
        }
        self.applied = self.durable.clone();
        self.applied_at = self.durable_at.clone();
        self.check_quarantine()?;
        self.check_windows("after recovery")
    }

    fn check_acknowledged(&self) -> Result<(), String> {
        for id in self.acknowledged.keys() {
            check(self.durable.contains_key(id), || {
                format!("acknowledged event {id} is not durable")
            })?;
        }
        Ok(())
    }

    /// The quarantine in memory is the durable one, but for what queued
    /// tickets are about to put or remove: no entry vanishes from memory while
    /// it is on disk, none is listed that is not on its way there.
    fn check_quarantine(&self) -> Result<(), String> {
        let memory: BTreeSet<u64> = self
            .node
            .core
            .list_quarantine(0, usize::MAX)
            .iter()
            .map(|entry| entry.qid)
            .collect();
        let (mut adding, mut removing) = (BTreeSet::new(), BTreeSet::new());
        for (ticket, _) in &self.node.queued {
            for write in &ticket.plan.quarantine {
                match write {
                    QuarantineWrite::Put(entry) => adding.insert(entry.qid),
                    QuarantineWrite::Remove(qid) => removing.insert(*qid),
                    QuarantineWrite::NextQid(_) => false,
                };
            }
        }
        for qid in &self.quarantine_durable {
            check(memory.contains(qid) || removing.contains(qid), || {
                format!("quarantined event {qid} is on disk but gone from memory")
            })?;
        }
        for qid in &memory {
            check(
                self.quarantine_durable.contains(qid) || adding.contains(qid),
                || format!("quarantined event {qid} is listed but not on its way to disk"),
            )?;
        }
        Ok(())
    }

    /// True when `event` can count in no window at `now_ms` nor later.
    fn counts_nowhere(&self, event: &SimEvent, now_ms: i64) -> bool {
        let now_s = now_ms.div_euclid(1000);
        let today = day_bounds(now_s, self.tz);
        !counts_in_some_window(event.ts_ms.div_euclid(1000), now_s, today)
    }

    fn in_range(ts_ms: i64, now_ms: i64, from_back_s: i64, to_back_s: i64) -> bool {
        let second = ts_ms.div_euclid(1000);
        let now_s = now_ms.div_euclid(1000);
        second > now_s - from_back_s && second <= now_s - to_back_s
    }

    fn local_date(&self, second: i64) -> chrono::NaiveDate {
        self.tz.timestamp_opt(second, 0).unwrap().date_naive()
    }

    /// gmv and orders of the model: 30 s and 15 m with their prev, today.
    fn model(&self, now_ms: i64) -> [(SlidingTally, SlidingTally, Tally); 2] {
        let mut result = [(
            SlidingTally::default(),
            SlidingTally::default(),
            Tally::default(),
        ); 2];
        let now_s = now_ms.div_euclid(1000);
        for event in self.applied.values() {
            for (slot, sum) in [(0, event.amount as i128), (1, 0)] {
                let delta = Tally { sum, count: 1 };
                let (sec30, min15, today) = &mut result[slot];
                for (window, length) in [(&mut *sec30, 30), (&mut *min15, 900)] {
                    if Self::in_range(event.ts_ms, now_ms, length, 0) {
                        window.current.add(delta);
                    }
                    if Self::in_range(event.ts_ms, now_ms, 2 * length, length) {
                        window.prev.add(delta);
                    }
                }
                let second = event.ts_ms.div_euclid(1000);
                if second <= now_s && self.local_date(second) == self.local_date(now_s) {
                    today.add(delta);
                }
            }
        }
        result
    }

    fn check_windows(&mut self, when: &str) -> Result<(), String> {
        let now_ms = self.now_ms.max(self.node.metrics_now_ms);
        let expected = self.model(now_ms);
        for (slot, name) in ["gmv", "orders"].iter().enumerate() {
            let index = self
                .catalogue
                .index_of(name)
                .ok_or("the default catalogue has gmv and orders")?;
            // a metric without state reads as a fresh one, as the read path does
            let settings = series_settings(&self.config, self.tz);
            let def = &self.catalogue.metrics()[index];
            let state = self.node.metrics[index]
                .get_or_insert_with(|| MetricState::new(index, def, settings, now_ms));
            let SeriesReading::Counter(reading) = state.read(now_ms) else {
                return Err(format!("{name} is a counter"));
            };
            let actual = (reading.sec30, reading.min15, reading.today);
            check(actual == expected[slot], || {
                format!(
                    "{when}: {name} at {now_ms} is {actual:?}, the model says {:?}",
                    expected[slot]
                )
            })?;
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        match self.rng.below(100) {
            0..=29 => self.request()?,
            30..=44 => self.flush()?,
            45..=64 => self.apply()?,
            65..=74 => self.reply()?,
            75..=77 => self.retry_quarantined()?,
            78..=82 => self.snapshot()?,
            83 => {
                if self.rng.chance(50) {
                    self.merge()?
                } else {
                    self.cover()?
                }
            }
            84..=92 => {
                let advance_ms = if self.rng.chance(5) {
                    self.rng.range(60_000, 3_600_000)
                } else {
                    self.rng.range(0, 5_000)
                };
                self.now_ms += advance_ms;
                self.node.core.advance(self.now_ms);
            }
            93 => {
                self.faults += 1;
                self.node.metric_gone = true;
            }
            94 => self.duplicate_a_record()?,
            _ => {
                if self.rng.chance(40) {
                    self.crash()?;
                }
            }
        }
        // a tenant that stopped serving makes the node exit; it restarts
        if self.node.core.failure().is_some() {
            self.crash()?;
        }
        self.check_acknowledged()?;
        self.check_quarantine()?;
        self.check_windows("running")
    }
}

fn run_seed(seed: u64, steps: u64) -> Result<Sim, String> {
    let mut sim = Sim::new(seed);
    for step in 0..steps {
        sim.step()
            .map_err(|error| format!("step {step}: {error}"))?;
    }
    // drain: everything durable is applied and answered, then a last crash
    sim.node.metric_gone = false;
    sim.flush()?;
    while !sim.node.durable.is_empty() {
        sim.apply()?;
    }
    sim.reply()?;
    sim.crash()?;
    Ok(sim)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[test]
fn the_tenant_pipeline_keeps_its_invariants_under_faults() {
    let steps = env_u64("TALLY_SIM_STEPS", 1_500);
    let seeds: Vec<u64> = match std::env::var("TALLY_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("TALLY_SIM_SEED is a number")],
        Err(_) => {
            let first = env_u64("TALLY_SIM_FIRST_SEED", 1);
            (first..first + env_u64("TALLY_SIM_SEEDS", 40)).collect()
        }
    };
    let (mut acknowledged, mut crashes, mut faults, mut merges, mut covers) = (0, 0, 0, 0, 0);
    for seed in &seeds {
        match run_seed(*seed, steps) {
            Ok(sim) => {
                acknowledged += sim.acknowledged.len();
                crashes += sim.crashes;
                faults += sim.faults;
                merges += sim.merges;
                covers += sim.covers;
            }
            Err(error) => panic!(
                "seed {seed} failed at {error}\nreplay: TALLY_SIM_SEED={seed} TALLY_SIM_STEPS={steps} \
                 cargo test --test simulation"
            ),
        }
    }
    println!(
        "simulation: {} seeds x {steps} steps, {acknowledged} events acknowledged, \
         {crashes} crashes, {faults} faults injected, {merges} de-dup merges, \
         {covers} summary filter steps",
        seeds.len()
    );
    // the run must have exercised what it claims to
    assert!(acknowledged > 0 && crashes > 0 && faults > 0 && merges > 0 && covers > 0);
}
