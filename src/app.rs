//! Start-up in dependency order (actor threads, tenant and metric actors, then
//! the listener) and shutdown in reverse (stop accepting, let in-flight requests
//! finish within `shutdown_grace_ms`, stop the actors).
//! Owns: `Node`, the state every request handler shares.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::actors::metric::MetricActor;
use crate::actors::tenant::{TenantActor, TenantContext};
use crate::actors::ActorRuntime;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::domain::catalogue::Catalogue;
use crate::domain::dedup::DedupIndex;
use crate::domain::metric::SeriesSettings;
use crate::domain::quarantine::QuarantineStore;
use crate::http::auth::KeyRing;

/// A tenant as request handlers reach it.
pub struct TenantHandle {
    pub context: Arc<TenantContext>,
    pub actor: Addr<TenantActor>,
    /// Indexed like the catalogue; `None` for metrics without state (mean).
    pub metrics: Vec<Option<Addr<MetricActor>>>,
    /// Ingest batches in flight; a request that gets none is shed with 429.
    pub batch_permits: Arc<Semaphore>,
    /// Reads and quarantine calls in flight; past them the request gets 503.
    pub query_permits: Arc<Semaphore>,
}

/// What every request handler shares.
pub struct Node {
    pub config: Arc<Config>,
    pub catalogue: Arc<Catalogue>,
    pub clock: SharedClock,
    pub keys: KeyRing,
    pub tenants: HashMap<String, TenantHandle>,
    ready: AtomicBool,
}

impl Node {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid config: {0}")]
    Config(String),
    #[error("cannot start the actor threads: {0}")]
    Actors(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn start_tenants(
    config: &Config,
    catalogue: &Arc<Catalogue>,
    runtime: &ActorRuntime,
    now_ms: i64,
) -> HashMap<String, TenantHandle> {
    let limits = config.event_limits();
    let batches_max = config.ingest.tenant_batches_inflight_max;
    let queries_max = config.actors.tenant_queries_inflight_max;
    // Each batch or read in flight puts at most one message in each mailbox and
    // holds its place in the budget until that message is handled (`InFlight`
    // travels with it), so a mailbox this size never fills and `send` never
    // waits or reorders, even when clients disconnect mid-request.
    let mailbox_capacity = batches_max + queries_max + 1;
    let ahead_s = (config.ingest.max_clock_skew_ms + 999) / 1000;
    let mut tenants = HashMap::new();
    for tenant in &config.tenants {
        let shard = runtime.shard_for(&tenant.id);
        // validate() checked the zone name
        let tz: chrono_tz::Tz = tenant.timezone.parse().unwrap_or(chrono_tz::Tz::UTC);
        let context = Arc::new(TenantContext {
            id: Arc::from(tenant.id.as_str()),
            currency: tenant.currency.clone(),
            tz,
            catalogue: Arc::clone(catalogue),
            limits: limits.clone(),
        });
        let settings = SeriesSettings {
            ahead_s,
            tz,
            histogram_value_max: config.windows.histogram_value_max,
            series_max: config.windows.max_series_per_metric,
        };
        let mut metrics = Vec::new();
        for (index, def) in catalogue.metrics().iter().enumerate() {
            if !def.kind.has_state() {
                metrics.push(None);
                continue;
            }
            let tenant_id = Arc::clone(&context.id);
            let def = def.clone();
            metrics.push(Some(MetricActor::start_in_arbiter(shard, move |ctx| {
                ctx.set_mailbox_capacity(mailbox_capacity);
                MetricActor::new(tenant_id, index, &def, settings, now_ms)
            })));
        }
        let actor = {
            let context = Arc::clone(&context);
            let metrics = metrics.clone();
            let dedup = DedupIndex::new(config.ingest.dedup_horizon_s, config.ingest.dedup_ids_max);
            let quarantine = QuarantineStore::new(
                config.quarantine.events_per_tenant_max,
                config.quarantine.raw_bytes_max,
            );
            TenantActor::start_in_arbiter(shard, move |ctx| {
                ctx.set_mailbox_capacity(mailbox_capacity);
                TenantActor::new(context, dedup, quarantine, metrics, now_ms)
            })
        };
        tenants.insert(
            tenant.id.clone(),
            TenantHandle {
                context,
                actor,
                metrics,
                batch_permits: Arc::new(Semaphore::new(batches_max)),
                query_permits: Arc::new(Semaphore::new(queries_max)),
            },
        );
    }
    tenants
}

/// A node serving on a socket.
pub struct RunningNode {
    pub node: Arc<Node>,
    pub local_addr: SocketAddr,
    stop_accepting: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    runtime: Option<ActorRuntime>,
}

/// Starts the actors and the HTTP server; must run inside a tokio runtime.
pub async fn start(config: Config, clock: SharedClock) -> Result<RunningNode, StartError> {
    let catalogue = Arc::new(config.catalogue().map_err(|issues| {
        StartError::Config(
            issues
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?);
    crate::telemetry::describe();
    let runtime = ActorRuntime::start(config.shard_count()).map_err(StartError::Actors)?;
    let tenants = start_tenants(&config, &catalogue, &runtime, clock.now_ms());
    let keys = KeyRing::from_config(&config);
    let addr = config.listen_addr();
    let node = Arc::new(Node {
        config: Arc::new(config),
        catalogue,
        clock,
        keys,
        tenants,
        ready: AtomicBool::new(false),
    });
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(source) => {
            runtime.stop();
            return Err(StartError::Listen { addr, source });
        }
    };
    let local_addr = listener
        .local_addr()
        .map_err(|source| StartError::Listen { addr, source })?;
    let (stop_accepting, stopped) = oneshot::channel::<()>();
    let router = crate::http::router(Arc::clone(&node));
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    node.set_ready(true);
    tracing::info!(%local_addr, shards = runtime.shard_count(), tenants = node.tenants.len(), "tally is serving");
    Ok(RunningNode {
        node,
        local_addr,
        stop_accepting: Some(stop_accepting),
        server: Some(server),
        runtime: Some(runtime),
    })
}

impl RunningNode {
    /// Stops accepting, lets in-flight requests finish within the grace period,
    /// then stops the actors.
    pub async fn shutdown(mut self) {
        self.node.set_ready(false);
        if let Some(stop) = self.stop_accepting.take() {
            let _ = stop.send(());
        }
        let grace = Duration::from_millis(self.node.config.server.shutdown_grace_ms);
        if let Some(server) = self.server.take() {
            match tokio::time::timeout(grace, server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => tracing::error!(%error, "http server failed"),
                Ok(Err(error)) => tracing::error!(%error, "http server task failed"),
                Err(_) => tracing::warn!(
                    grace_ms = grace.as_millis() as u64,
                    "in-flight requests outlived the grace period"
                ),
            }
        }
        if let Some(runtime) = self.runtime.take() {
            let _ = tokio::task::spawn_blocking(move || runtime.stop()).await;
        }
        tracing::info!("tally stopped");
    }
}
