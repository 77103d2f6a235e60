//! The actor side of the node: an actix System on its own thread with one
//! Arbiter per shard. A tenant's TenantActor and its MetricActors live on the
//! shard its id hashes to, so that window state is owned, never locked.
//! Must not: be driven with `do_send` on the data path; every data message is a
//! `send` whose mailbox room is guaranteed by the permits the HTTP layer holds.

pub mod metric;
pub mod tenant;

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use actix::{Actor, Addr, Arbiter, ArbiterHandle, System};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use metric::MetricActor;
use tenant::{TenantActor, TenantContext};

use crate::domain::dedup::RunsView;
use crate::domain::metric::SeriesSettings;

/// A tenant's metric actors, indexed like the catalogue. A slot is filled when
/// the metric first gets state (an event, or state recovered for it), by the
/// tenant actor on its own arbiter; until then the metric reads as empty. So
/// an idle tenant costs no metric actors (memory follows traffic).
pub type MetricSlots = Arc<[std::sync::OnceLock<Addr<MetricActor>>]>;

/// Empty slots for `metrics` metrics.
pub fn metric_slots(metrics: usize) -> MetricSlots {
    (0..metrics).map(|_| std::sync::OnceLock::new()).collect()
}

/// A place in a tenant's in-flight budget (batches or reads). Every message a
/// request sends carries it, so the place frees only when the last of them has
/// been handled, even if the client went away meanwhile. That keeps the number
/// of messages in a mailbox within the budget the mailbox is sized for.
#[derive(Debug, Clone)]
pub struct InFlight {
    _permit: Arc<OwnedSemaphorePermit>,
}

impl InFlight {
    pub fn new(permit: OwnedSemaphorePermit) -> InFlight {
        InFlight {
            _permit: Arc::new(permit),
        }
    }
}

/// Where the node hears that it must exit for a clean restart (a storage
/// failure, a tenant that stopped serving), with the reason.
pub type FatalSender = Arc<tokio::sync::watch::Sender<Option<String>>>;

/// Whether a tenant still serves, shared by its actor (which records why it
/// stopped) and everything that reads it (`/readyz`, the read path). A tenant
/// that stopped holds events in its log that its memory lacks: only a restart
/// recovers it, so the first failure also tells the node to exit (`fatal`).
#[derive(Debug, Default)]
pub struct TenantHealth {
    failure: std::sync::OnceLock<String>,
    fatal: Option<(String, FatalSender)>,
}

impl TenantHealth {
    /// The health of tenant `id`, whose failure is reported on `fatal`.
    pub fn new(id: &str, fatal: FatalSender) -> TenantHealth {
        TenantHealth {
            failure: std::sync::OnceLock::new(),
            fatal: Some((id.to_string(), fatal)),
        }
    }

    /// Records the first reason (later ones add nothing) and reports it.
    pub fn fail(&self, reason: &str) {
        if self.failure.set(reason.to_string()).is_ok() {
            if let Some((id, fatal)) = &self.fatal {
                fatal.send_replace(Some(format!("tenant {id} stopped serving: {reason}")));
            }
        }
    }

    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
}

/// The tenant's de-dup runs as its actor last published them. Ingest asks
/// their filters on its own task, on any core, before the batch reaches the
/// actor's one thread (`RunsChecked`); the actor asks only the runs the list
/// did not have, so a list older than the actor's is still exact
/// (docs/architecture.md, "one tenant on every core").
#[derive(Debug, Default)]
pub struct PublishedRuns {
    view: std::sync::RwLock<Arc<RunsView>>,
    /// The summary filter has work (`DedupIndex::wants_cover`), so that the
    /// indexer asks only tenants that have some.
    wants_cover: std::sync::atomic::AtomicBool,
}

impl PublishedRuns {
    pub fn get(&self) -> Arc<RunsView> {
        // a panic while holding the lock cannot leave the Arc half-written
        match self.view.read() {
            Ok(view) => Arc::clone(&view),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn set(&self, view: RunsView, wants_cover: bool) {
        let view = Arc::new(view);
        match self.view.write() {
            Ok(mut slot) => *slot = view,
            Err(poisoned) => *poisoned.into_inner() = view,
        }
        self.wants_cover
            .store(wants_cover, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn wants_cover(&self) -> bool {
        self.wants_cover.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A tenant as request handlers reach it.
pub struct TenantHandle {
    pub context: Arc<TenantContext>,
    pub actor: Addr<TenantActor>,
    /// Indexed like the catalogue; empty for metrics without state (mean) and
    /// for metrics that never had any.
    pub metrics: MetricSlots,
    /// What every series of the tenant is built with (an empty metric reads
    /// as a fresh state with these).
    pub settings: SeriesSettings,
    /// Ingest batches in flight; a request that gets none is shed with 429.
    pub batch_permits: Arc<Semaphore>,
    /// Reads and quarantine calls in flight; past them the request gets 503.
    pub query_permits: Arc<Semaphore>,
    /// Why the tenant stopped serving, once it has.
    pub health: Arc<TenantHealth>,
    pub runs: Arc<PublishedRuns>,
    /// Events it may send now (`ingest.tenant_events_per_second_max`).
    pub rate: Arc<std::sync::Mutex<crate::domain::rate::TokenBucket>>,
}

impl TenantHandle {
    /// Why the tenant cannot serve: its core failed, or one of its actors
    /// stopped (a panic ends every actor of its arbiter).
    pub fn failure(&self) -> Option<String> {
        if let Some(reason) = self.health.failure() {
            return Some(reason.to_string());
        }
        if !self.actor.connected() {
            return Some("the tenant actor stopped".into());
        }
        for (index, metric) in self.metrics.iter().enumerate() {
            if metric.get().is_some_and(|addr| !addr.connected()) {
                let name = &self.context.catalogue.metrics()[index].name;
                return Some(format!("the actor of metric {name} stopped"));
            }
        }
        None
    }
}

/// The actor threads: one System thread and `shards` Arbiter threads.
pub struct ActorRuntime {
    arbiters: Vec<ArbiterHandle>,
    system: System,
    thread: Option<JoinHandle<()>>,
}

impl ActorRuntime {
    pub fn start(shards: usize) -> std::io::Result<ActorRuntime> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("tally-actors".into())
            .spawn(move || {
                let runner = System::new();
                let arbiters: Vec<Arbiter> = (0..shards.max(1)).map(|_| Arbiter::new()).collect();
                let handles = arbiters.iter().map(|arbiter| arbiter.handle()).collect();
                let _ = ready_tx.send((handles, System::current()));
                let _ = runner.run();
                for arbiter in arbiters {
                    arbiter.stop();
                    let _ = arbiter.join();
                }
            })?;
        let (arbiters, system) = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("actor system thread ended before it started"))?;
        Ok(ActorRuntime {
            arbiters,
            system,
            thread: Some(thread),
        })
    }

    /// The Arbiter that owns `tenant_id`.
    pub fn shard_for(&self, tenant_id: &str) -> &ArbiterHandle {
        let hash = xxhash_rust::xxh3::xxh3_64(tenant_id.as_bytes());
        &self.arbiters[(hash % self.arbiters.len() as u64) as usize]
    }

    pub fn shard_count(&self) -> usize {
        self.arbiters.len()
    }

    /// Stops every actor and joins the threads.
    pub fn stop(mut self) {
        self.system.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts a tenant's actors on the shard its id hashes to: at start over the
/// recovered state, and when a tenant is added at run time (over a fresh one).
#[derive(Clone)]
pub struct TenantStarter {
    arbiters: Vec<ArbiterHandle>,
    metric_count: usize,
    durability: tenant::Durability,
    fatal: FatalSender,
    batches_max: usize,
    queries_max: usize,
    events_per_second_max: u64,
    /// Series settings without the time zone, which is the tenant's.
    settings: SeriesSettings,
}

impl TenantStarter {
    pub fn new(
        runtime: &ActorRuntime,
        config: &crate::config::Config,
        metric_count: usize,
        durability: tenant::Durability,
        fatal: FatalSender,
    ) -> TenantStarter {
        TenantStarter {
            arbiters: runtime.arbiters.clone(),
            metric_count,
            durability,
            fatal,
            batches_max: config.ingest.tenant_batches_inflight_max,
            queries_max: config.actors.tenant_queries_inflight_max,
            events_per_second_max: config.ingest.tenant_events_per_second_max,
            settings: crate::storage::recovery::series_settings(config, chrono_tz::UTC),
        }
    }

    /// Starts the actors of `state`'s tenant; its metric actors only for
    /// metrics with state (the others start with their first events).
    pub fn start(&self, state: crate::storage::recovery::RecoveredTenant) -> TenantHandle {
        // Each batch or read in flight puts at most one message in each mailbox
        // and holds its place in the budget until that message is handled
        // (`InFlight` travels with it), so a mailbox this size never fills and
        // `send` never waits or reorders, even when clients disconnect
        // mid-request. Snapshots and merges add one message at a time, and
        // a change of experiments one `SetWatched` to each metric actor (a
        // control message sent with `do_send`, which ignores the bound;
        // changes are serialized by the experiment engine's lock): room for
        // it too, so that it never makes a data `send` wait.
        let mailbox_capacity = self.batches_max + self.queries_max + 3;
        let context = Arc::clone(state.core.context());
        let hash = xxhash_rust::xxh3::xxh3_64(context.id.as_bytes());
        // at least one arbiter: ActorRuntime::start makes `shards.max(1)`
        let shard = &self.arbiters[(hash % self.arbiters.len() as u64) as usize];
        let now_ms = state.core.now_ms();
        let metrics = metric_slots(self.metric_count);
        for (index, metric_state) in state.metrics.into_iter().enumerate() {
            let Some(metric_state) = metric_state else {
                continue;
            };
            let tenant_id = Arc::clone(&context.id);
            let name = context.catalogue.metrics()[index].name.clone();
            let addr = MetricActor::start_in_arbiter(shard, move |ctx| {
                ctx.set_mailbox_capacity(mailbox_capacity);
                MetricActor::from_state(tenant_id, name, metric_state, now_ms)
            });
            // each slot is filled once, here, before the tenant actor exists
            let _ = metrics[index].set(addr);
        }
        let settings = SeriesSettings {
            tz: context.tz,
            ..self.settings
        };
        let health = Arc::new(TenantHealth::new(&context.id, Arc::clone(&self.fatal)));
        let runs = Arc::new(PublishedRuns::default());
        let actor = {
            let runs = Arc::clone(&runs);
            let metrics = Arc::clone(&metrics);
            let durability = self.durability.clone();
            let health = Arc::clone(&health);
            let core = state.core;
            let watched = state.watched;
            TenantActor::start_in_arbiter(shard, move |ctx| {
                ctx.set_mailbox_capacity(mailbox_capacity);
                TenantActor::new(
                    core,
                    metrics,
                    settings,
                    mailbox_capacity,
                    durability,
                    health,
                    runs,
                )
                .watching(watched)
            })
        };
        TenantHandle {
            context,
            actor,
            metrics,
            settings,
            batch_permits: Arc::new(Semaphore::new(self.batches_max)),
            query_permits: Arc::new(Semaphore::new(self.queries_max)),
            health,
            runs,
            rate: Arc::new(std::sync::Mutex::new(
                crate::domain::rate::TokenBucket::new(
                    self.events_per_second_max,
                    self.events_per_second_max,
                    now_ms,
                ),
            )),
        }
    }
}
