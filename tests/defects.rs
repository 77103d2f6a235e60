//! Regression tests for the six invariant defects of issue 10, one named for
//! each, run against the real tenant actor, metric actors, committer, sled
//! store and recovery. docs/durability.md says how each was shown to fail on
//! the code before the tenant core.
//!
//! The tests of this file run one at a time (`SERIAL`): defect 5 reads the
//! node-wide outcome counters, which the others move too.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::Semaphore;

use tally::actors::metric::{MetricActor, MetricRead, ReadMetric};
use tally::actors::tenant::{
    Durability, IngestBatch, ListQuarantine, RetryQuarantined, TakeSnapshot, TenantActor,
    TenantError,
};
use tally::actors::{metric_slots, InFlight, TenantHealth};
use tally::config::Config;
use tally::domain::catalogue::Catalogue;
use tally::domain::dedup::DedupIndex;
use tally::domain::event::{Reason, ValidEvent};
use tally::domain::metric::SeriesReading;
use tally::domain::quarantine::QuarantineStore;
use tally::domain::tenant::{EventOutcome, QuarantineCandidate, TenantCore};
use tally::storage::commit::{Committer, FlushMode};
use tally::storage::envelope::{encode, RecordKind};
use tally::storage::recovery::{recover, series_settings};
use tally::storage::snapshot::WalBatch;
use tally::storage::{lsn_key, Op, SledStore, Space, StorageError, Store};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// 2025-11-22T10:00:00Z
const T0_MS: i64 = 1_763_805_600_000;
const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A sled store whose flushes wait until the gate opens, and which counts the
/// flushes that started.
struct GateStore {
    inner: SledStore,
    state: Mutex<(bool, u64)>,
    changed: Condvar,
    _dir: tempfile::TempDir,
}

impl GateStore {
    fn new(open: bool) -> Arc<GateStore> {
        let dir = tempfile::tempdir().unwrap();
        Arc::new(GateStore {
            inner: SledStore::open_with_cache(dir.path(), 1 << 20).unwrap(),
            state: Mutex::new((open, 0)),
            changed: Condvar::new(),
            _dir: dir,
        })
    }

    fn open(&self) {
        self.state.lock().unwrap().0 = true;
        self.changed.notify_all();
    }

    /// Blocks (off the runtime) until `flushes` flushes have started.
    async fn wait_for_flushes(self: &Arc<Self>, flushes: u64) {
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut state = store.state.lock().unwrap();
            while state.1 < flushes {
                state = store.changed.wait(state).unwrap();
            }
        })
        .await
        .unwrap();
    }
}

impl Store for GateStore {
    fn apply(&self, ops: &[Op]) -> Result<(), StorageError> {
        self.inner.apply(ops)
    }

    fn flush(&self) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap();
        state.1 += 1;
        self.changed.notify_all();
        while !state.0 {
            state = self.changed.wait(state).unwrap();
        }
        drop(state);
        self.inner.flush()
    }

    fn scan(
        &self,
        space: Space,
        from: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        self.inner.scan(space, from, visit)
    }

    fn last_key(&self, space: Space) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.last_key(space)
    }
}

struct Tenant {
    actor: Addr<TenantActor>,
    gmv: Addr<MetricActor>,
    catalogue: Arc<Catalogue>,
    health: Arc<TenantHealth>,
    permits: Arc<Semaphore>,
    /// Blocks the gmv actor's arbiter while held.
    gmv_arbiter: Arbiter,
}

fn config(tz: &str) -> Config {
    let mut config = Config::parse(DEFAULT_TOML, Vec::new()).unwrap();
    config.tenants.retain(|tenant| tenant.id == "demo");
    config.tenants[0].timezone = tz.into();
    config
}

/// The demo tenant over `store`, with a commit queue of `queue_max` write
/// sets. gmv runs on an arbiter of its own, so that a test can block it or
/// stop it.
fn start_tenant(store: Arc<GateStore>, queue_max: usize, tz: &str, now_ms: i64) -> Tenant {
    let config = config(tz);
    let checked = config.check().unwrap();
    let catalogue = Arc::clone(&checked.catalogue);
    let context = Arc::clone(&checked.tenant_contexts()[0]);
    let (committer, _thread) = Committer::start(store, queue_max, FlushMode::Group).unwrap();
    let durability = Durability {
        committer,
        next_lsn: Arc::new(AtomicU64::new(1)),
        record_bytes_max: 1 << 20,
        snapshot_wanted: Arc::default(),
    };
    let gmv_index = catalogue.index_of("gmv").unwrap();
    let settings = series_settings(&config, context.tz);
    let gmv_arbiter = Arbiter::new();
    let def = catalogue.metrics()[gmv_index].clone();
    let tenant_id = Arc::clone(&context.id);
    let gmv = MetricActor::start_in_arbiter(&gmv_arbiter.handle(), move |_| {
        MetricActor::new(tenant_id, gmv_index, &def, settings, now_ms, &[])
    });
    // the other metrics start on the test's arbiter with their first events
    let metrics = metric_slots(catalogue.metrics().len());
    metrics[gmv_index].set(gmv.clone()).unwrap();
    let core = TenantCore::new(
        context,
        DedupIndex::new(86_400, 1_000),
        QuarantineStore::new(100, 4096),
        now_ms,
    );
    let health = Arc::new(TenantHealth::default());
    let actor = TenantActor::new(
        core,
        metrics,
        settings,
        64,
        durability,
        Arc::clone(&health),
        Default::default(),
    )
    .start();
    Tenant {
        actor,
        gmv,
        catalogue,
        health,
        permits: Arc::new(Semaphore::new(1_000)),
        gmv_arbiter,
    }
}

impl Tenant {
    fn in_flight(&self) -> InFlight {
        InFlight::new(Arc::clone(&self.permits).try_acquire_owned().unwrap())
    }

    fn order(&self, id: &str, ts_ms: i64, amount: i64) -> ValidEvent {
        ValidEvent {
            id: id.into(),
            event_type: "order.completed".into(),
            ts_ms,
            amount: Some(amount),
            value: None,
            value_integer: None,
            dims: vec![],
            experiments: vec![],
            route: self.catalogue.route("order.completed"),
        }
    }

    fn batch(&self, now_ms: i64, events: Vec<ValidEvent>) -> IngestBatch {
        IngestBatch {
            checked: None,
            in_flight: self.in_flight(),
            now_ms,
            events: events
                .into_iter()
                .enumerate()
                .map(|(index, event)| (index as u32, event))
                .collect(),
            quarantined: vec![],
        }
    }

    /// The qids the tenant's quarantine lists.
    async fn quarantined_qids(&self) -> Vec<u64> {
        let listed = self
            .actor
            .send(ListQuarantine {
                in_flight: self.in_flight(),
                after: 0,
                limit: 10,
            })
            .await
            .unwrap();
        listed.iter().map(|entry| entry.qid).collect()
    }

    async fn retry(&self, qid: u64) -> Result<Option<EventOutcome>, TenantError> {
        self.actor
            .send(RetryQuarantined {
                in_flight: self.in_flight(),
                qid,
                now_ms: T0_MS,
                enrich: None,
            })
            .await
            .unwrap()
    }

    /// Today's gmv (sum, count).
    async fn gmv_today(&self, now_ms: i64) -> (i128, u64) {
        let read = self
            .gmv
            .send(ReadMetric {
                now_ms,
                by: None,
                in_flight: self.in_flight(),
            })
            .await
            .unwrap();
        let MetricRead::Total(SeriesReading::Counter(counter)) = read else {
            panic!("gmv is a counter");
        };
        (counter.today.sum, counter.today.count)
    }
}

fn outcomes_of(reply: Vec<(u32, EventOutcome)>) -> Vec<EventOutcome> {
    let mut reply = reply;
    reply.sort_by_key(|(index, _)| *index);
    reply.into_iter().map(|(_, outcome)| outcome).collect()
}

/// Closes the gate and fills the commit queue (size 1): the first batch is
/// inside the flush, the second waits in the queue. Returns their replies, to
/// await after the gate opens.
async fn fill_commit_queue(
    tenant: &Tenant,
    store: &Arc<GateStore>,
) -> Vec<actix::dev::Request<TenantActor, IngestBatch>> {
    let flushes = {
        let mut state = store.state.lock().unwrap();
        state.0 = false;
        state.1
    };
    let first = tenant
        .actor
        .send(tenant.batch(T0_MS, vec![tenant.order("fill-1", T0_MS, 1)]));
    store.wait_for_flushes(flushes + 1).await;
    let second = tenant
        .actor
        .send(tenant.batch(T0_MS, vec![tenant.order("fill-2", T0_MS, 1)]));
    // the second is in the actor's mailbox; a read behind it makes sure it
    // was handled (submitted) before the test goes on
    tenant.quarantined_qids().await;
    vec![first, second]
}

/// Defect 1: ids admitted to de-dup stayed admitted when the log submit
/// failed (`commit queue is full`); the retry came back `duplicate` with 200
/// although the event was never logged nor counted.
#[actix::test]
async fn defect_1_a_batch_refused_by_a_full_commit_queue_is_accepted_on_retry() {
    let _serial = SERIAL.lock().await;
    let store = GateStore::new(false);
    let tenant = start_tenant(Arc::clone(&store), 1, "UTC", T0_MS);
    let filling = fill_commit_queue(&tenant, &store).await;
    let refused = tenant
        .actor
        .send(tenant.batch(T0_MS, vec![tenant.order("c", T0_MS, 700)]))
        .await
        .unwrap();
    assert!(
        matches!(&refused, Err(error) if error.to_string().contains("commit queue is full")),
        "{refused:?}"
    );
    store.open();
    for reply in filling {
        reply.await.unwrap().unwrap();
    }
    let retried = tenant
        .actor
        .send(tenant.batch(T0_MS, vec![tenant.order("c", T0_MS, 700)]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcomes_of(retried), vec![EventOutcome::Accepted]);
    assert_eq!(tenant.gmv_today(T0_MS).await, (702, 3));
}

/// Defect 1, the other way in: a metric actor gone after the flush. The
/// batch is durable but not in the windows; its retry must not be
/// acknowledged as a duplicate, and the tenant reports why it stopped.
#[actix::test]
async fn defect_1_a_metric_actor_gone_after_the_flush_stops_the_tenant() {
    let _serial = SERIAL.lock().await;
    let store = GateStore::new(true);
    let tenant = start_tenant(Arc::clone(&store), 16, "UTC", T0_MS);
    tenant.gmv_arbiter.stop();
    // the arbiter stops asynchronously; wait until the address says so
    while tenant.gmv.connected() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = tenant
        .actor
        .send(tenant.batch(T0_MS, vec![tenant.order("a", T0_MS, 5)]))
        .await
        .unwrap();
    assert!(first.is_err(), "{first:?}");
    let retried = tenant
        .actor
        .send(tenant.batch(T0_MS, vec![tenant.order("a", T0_MS, 5)]))
        .await
        .unwrap();
    assert!(
        matches!(&retried, Err(error) if error.to_string().contains("stopped serving")),
        "{retried:?}"
    );
    assert!(tenant
        .health
        .failure()
        .is_some_and(|reason| reason.contains("metric actor")));
    // and no snapshot of it is taken: only the log can say what counts
    assert!(tenant
        .actor
        .send(TakeSnapshot {
            whole_history: true
        })
        .await
        .unwrap()
        .is_err());
}

/// Defect 2: an all-duplicate batch waited for the flush but not for the
/// original batch's apply, so its 200 could come before the original was
/// visible to reads.
#[actix::test]
async fn defect_2_a_duplicate_is_acknowledged_only_after_its_original_is_visible() {
    let _serial = SERIAL.lock().await;
    let store = GateStore::new(true);
    let tenant = start_tenant(Arc::clone(&store), 16, "UTC", T0_MS);
    // hold the gmv actor's thread, so the original cannot be applied yet
    let held = Arc::new((Mutex::new(true), Condvar::new()));
    {
        let held = Arc::clone(&held);
        tenant.gmv_arbiter.spawn_fn(move || {
            let mut holding = held.0.lock().unwrap();
            while *holding {
                holding = held.1.wait(holding).unwrap();
            }
        });
    }
    let order: Arc<Mutex<Vec<&str>>> = Arc::default();
    let original = tenant
        .actor
        .send(tenant.batch(T0_MS, vec![tenant.order("a", T0_MS, 9)]));
    store.wait_for_flushes(1).await;
    let duplicate = {
        let request = tenant
            .actor
            .send(tenant.batch(T0_MS, vec![tenant.order("a", T0_MS, 9)]));
        let order = Arc::clone(&order);
        actix::spawn(async move {
            let reply = request.await.unwrap().unwrap();
            order.lock().unwrap().push("duplicate acknowledged");
            reply
        })
    };
    // give a wrong implementation every chance to answer early
    tokio::time::sleep(Duration::from_millis(300)).await;
    order.lock().unwrap().push("original applied");
    *held.0.lock().unwrap() = false;
    held.1.notify_all();
    assert_eq!(
        outcomes_of(original.await.unwrap().unwrap()),
        vec![EventOutcome::Accepted]
    );
    assert_eq!(
        outcomes_of(duplicate.await.unwrap()),
        vec![EventOutcome::Duplicate]
    );
    assert_eq!(
        *order.lock().unwrap(),
        vec!["original applied", "duplicate acknowledged"]
    );
    assert_eq!(tenant.gmv_today(T0_MS).await, (9, 1));
}

/// Defect 3: a quarantine retry took the entry out of memory before the log
/// submit could fail; the event was gone until a restart.
#[actix::test]
async fn defect_3_a_failed_quarantine_retry_keeps_the_event_quarantined() {
    let _serial = SERIAL.lock().await;
    let store = GateStore::new(true);
    let tenant = start_tenant(Arc::clone(&store), 1, "UTC", T0_MS);
    let raw = format!(
        r#"{{"id":"q","type":"order.completed","ts":{T0_MS},"amount":40,"currency":"USD"}}"#
    );
    let quarantined = tenant
        .actor
        .send(IngestBatch {
            checked: None,
            in_flight: tenant.in_flight(),
            now_ms: T0_MS,
            events: vec![],
            quarantined: vec![QuarantineCandidate {
                index: 0,
                id: Some("q".into()),
                reason: Reason::InvalidCurrency,
                raw: raw.into_bytes(),
            }],
        })
        .await
        .unwrap()
        .unwrap();
    let [(_, EventOutcome::Quarantined { qid, .. })] = quarantined.as_slice() else {
        panic!("quarantined: {quarantined:?}");
    };
    let qid = *qid;
    // the gate closes behind the quarantine write
    let filling = fill_commit_queue(&tenant, &store).await;
    let retried = tenant.retry(qid).await;
    assert!(
        matches!(&retried, Err(error) if error.to_string().contains("commit queue is full")),
        "{retried:?}"
    );
    assert_eq!(tenant.quarantined_qids().await, vec![qid]);
    store.open();
    for reply in filling {
        reply.await.unwrap().unwrap();
    }
    assert_eq!(
        tenant.retry(qid).await.unwrap(),
        Some(EventOutcome::Accepted)
    );
    assert_eq!(tenant.gmv_today(T0_MS).await, (42, 3));
}

/// Defect 4: recovery replayed the log without de-dup checks, safe only
/// while the log never held an id twice.
#[test]
fn defect_4_recovery_counts_an_id_once_whatever_the_log_holds() {
    let dir = tempfile::tempdir().unwrap();
    let config = config("UTC");
    let catalogue = Arc::new(config.catalogue().unwrap());
    let store = SledStore::open_with_cache(dir.path(), 1 << 20).unwrap();
    let order = ValidEvent {
        id: "twice".into(),
        event_type: "order.completed".into(),
        ts_ms: T0_MS,
        amount: Some(250),
        value: None,
        value_integer: None,
        dims: vec![],
        experiments: vec![],
        route: catalogue.route("order.completed"),
    };
    let record = encode(
        RecordKind::WalBatch,
        &WalBatch {
            tenant: "demo".into(),
            now_ms: T0_MS,
            events: vec![order],
        },
    )
    .unwrap();
    let ops: Vec<Op> = [1u64, 2]
        .iter()
        .map(|lsn| Op::Put {
            space: Space::Wal,
            key: lsn_key(*lsn).to_vec(),
            value: record.clone(),
        })
        .collect();
    store.apply(&ops).unwrap();
    store.flush().unwrap();
    let contexts = config.check().unwrap().tenant_contexts();
    let mut recovered = recover(&store, &config, &contexts, T0_MS).unwrap();
    assert_eq!(recovered.report.records_replayed, 2);
    let gmv = catalogue.index_of("gmv").unwrap();
    let tenant = recovered.tenants.get_mut("demo").unwrap();
    let SeriesReading::Counter(counter) = tenant.metrics[gmv].as_mut().unwrap().read(T0_MS) else {
        panic!("gmv is a counter");
    };
    assert_eq!((counter.today.sum, counter.today.count), (250, 1));
    assert_eq!(tenant.core.dedup().len(), 1);
}

/// The node-wide count of an outcome, from the Prometheus rendering.
fn outcome_count(handle: &metrics_exporter_prometheus::PrometheusHandle, outcome: &str) -> u64 {
    let wanted = format!("tally_events_total{{outcome=\"{outcome}\"}} ");
    handle
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(&wanted)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Defect 5: `accepted` was counted where the reply was built, so the events
/// of a request whose client went away were applied but never counted.
#[actix::test]
async fn defect_5_outcomes_are_counted_when_decided_even_if_nobody_waits() {
    let _serial = SERIAL.lock().await;
    let handle = tally::telemetry::install();
    let accepted_before = outcome_count(&handle, "accepted");
    let duplicates_before = outcome_count(&handle, "duplicate");
    let store = GateStore::new(false);
    let tenant = start_tenant(Arc::clone(&store), 16, "UTC", T0_MS);
    let events = vec![
        tenant.order("x", T0_MS, 1),
        tenant.order("y", T0_MS, 2),
        tenant.order("x", T0_MS, 1),
    ];
    let request = tenant.actor.send(tenant.batch(T0_MS, events));
    // the batch is decided (a message behind it was answered) and waits for
    // its flush; then the client goes away: nobody reads the reply. (actix
    // skips a message whose requester left before it was handled: then
    // nothing was decided, and nothing is counted.)
    tenant.quarantined_qids().await;
    store.wait_for_flushes(1).await;
    drop(request);
    store.open();
    // a snapshot waits until every batch handed to the tenant is applied
    tenant
        .actor
        .send(TakeSnapshot {
            whole_history: true,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tenant.gmv_today(T0_MS).await, (3, 2));
    assert_eq!(outcome_count(&handle, "accepted") - accepted_before, 2);
    assert_eq!(outcome_count(&handle, "duplicate") - duplicates_before, 1);
}

/// Defect 6: with a 24 h horizon, an event stamped 00:20 EDT on the 25-hour
/// 2025-11-02 in America/New_York that arrived at 23:50 EST was `late`
/// although the today window counts it.
#[actix::test]
async fn defect_6_an_event_of_a_25_hour_day_counts_until_the_day_ends() {
    let _serial = SERIAL.lock().await;
    let event_ms = 1_762_057_200_000; // 2025-11-02 00:20 EDT
    let now_ms = 1_762_145_400_000; // 2025-11-02 23:50 EST
    let store = GateStore::new(true);
    let tenant = start_tenant(Arc::clone(&store), 16, "America/New_York", now_ms);
    let reply = tenant
        .actor
        .send(tenant.batch(now_ms, vec![tenant.order("early", event_ms, 1_234)]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcomes_of(reply), vec![EventOutcome::Accepted]);
    assert_eq!(tenant.gmv_today(now_ms).await, (1_234, 1));
}
