//! Live values for push (API.md §5): one feed per tenant that, every
//! `live.tick_ms` while any session watches it, reads the tenant's windows once
//! and publishes them as a frame on a `watch` channel. Sessions share the frame;
//! a `watch` keeps only the newest frame, so a slow session conflates (latest
//! value wins) and can neither hold up ingestion nor other sessions.
//! Must not: read when nobody watches, or keep more than one frame per tenant.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use crate::actors::metric::MetricRead;
use crate::actors::InFlight;
use crate::app::Node;
use crate::domain::metric::SeriesReading;
use crate::domain::time::WindowName;
use crate::http::shape::metric_json;

/// Every metric of a tenant at one instant, in the shape of API.md §4.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frame {
    /// Increases with every frame a feed publishes (to count what sessions skip).
    pub seq: u64,
    pub at_ms: i64,
    /// metric name → `{"kind", "windows": {window: {...}}}`
    pub metrics: BTreeMap<String, Value>,
}

/// A tenant's feed: its newest frame and how many sessions hold it.
pub struct TenantFeed {
    frames: watch::Sender<Arc<Frame>>,
    sessions: AtomicUsize,
    /// Metric subscriptions of all sessions: the feed reads only while > 0.
    watchers: AtomicUsize,
}

impl TenantFeed {
    pub fn new() -> Arc<TenantFeed> {
        let (frames, _) = watch::channel(Arc::new(Frame::default()));
        Arc::new(TenantFeed {
            frames,
            sessions: AtomicUsize::new(0),
            watchers: AtomicUsize::new(0),
        })
    }

    /// Takes a session place, or `None` past `sessions_max`.
    pub fn join(self: &Arc<Self>, tenant: &str, sessions_max: usize) -> Option<SessionPlace> {
        let taken = self.sessions.fetch_add(1, Ordering::SeqCst);
        if taken >= sessions_max {
            self.sessions.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        crate::telemetry::set_live_sessions(tenant, taken + 1);
        Some(SessionPlace {
            feed: Arc::clone(self),
            tenant: tenant.to_string(),
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Frame>> {
        self.frames.subscribe()
    }

    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }

    /// A session's metric subscriptions changed by `delta`.
    pub fn add_watchers(&self, delta: isize) {
        if delta >= 0 {
            self.watchers.fetch_add(delta as usize, Ordering::SeqCst);
        } else {
            self.watchers
                .fetch_sub(delta.unsigned_abs(), Ordering::SeqCst);
        }
        crate::telemetry::add_live_subscriptions(delta as f64);
    }
}

/// A session's place in its tenant's session budget; freed on drop.
pub struct SessionPlace {
    feed: Arc<TenantFeed>,
    tenant: String,
}

impl Drop for SessionPlace {
    fn drop(&mut self) {
        let left = self.feed.sessions.fetch_sub(1, Ordering::SeqCst) - 1;
        crate::telemetry::set_live_sessions(&self.tenant, left);
    }
}

/// Reads every metric of a tenant once and shapes the frame.
pub async fn read_frame(node: &Node, tenant_id: &str) -> Option<Frame> {
    let tenant = node.tenants.get(tenant_id)?;
    let permit = Arc::clone(&tenant.query_permits).try_acquire_owned().ok()?;
    let in_flight = InFlight::new(permit);
    let catalogue = &node.catalogue;
    let indices: Vec<usize> = (0..catalogue.metrics().len()).collect();
    let at_ms = node.now_ms();
    let reads = crate::http::query::read_metrics(node, tenant, &indices, None, at_ms, &in_flight)
        .await
        .ok()?;
    let readings: std::collections::HashMap<usize, SeriesReading> = reads
        .into_iter()
        .filter_map(|(index, read)| match read {
            MetricRead::Total(reading) => Some((index, reading)),
            MetricRead::Breakdown(_) => None,
        })
        .collect();
    let mut metrics = BTreeMap::new();
    for (index, def) in catalogue.metrics().iter().enumerate() {
        if let Some(shaped) = metric_json(catalogue, index, &readings, &WindowName::ALL) {
            metrics.insert(def.name.clone(), shaped);
        }
    }
    Some(Frame {
        seq: 0,
        at_ms,
        metrics,
    })
}

/// Runs a tenant's feed until the node stops: a read per tick while watched.
pub async fn run_feed(node: Arc<Node>, tenant_id: String, feed: Arc<TenantFeed>) {
    let mut ticks = tokio::time::interval(Duration::from_millis(node.config.live.tick_ms));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        ticks.tick().await;
        // sessions with only topic subscriptions (or none yet) need no reads
        if feed.watchers.load(Ordering::SeqCst) == 0 {
            continue;
        }
        // a busy tenant skips a tick rather than queue behind its own ingestion
        if let Some(mut frame) = read_frame(&node, &tenant_id).await {
            // a frame whose values are the same wakes nobody
            feed.frames.send_if_modified(|current| {
                if current.metrics == frame.metrics {
                    return false;
                }
                seq += 1;
                frame.seq = seq;
                *current = Arc::new(std::mem::take(&mut frame));
                true
            });
        }
    }
}
