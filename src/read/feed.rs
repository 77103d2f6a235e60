//! A tenant's live feed: its newest frame (every metric's view at one
//! instant) on a `watch` channel, and how many sessions and subscriptions
//! hold it. The live surface fills it (`live::run_feed`) and its sessions
//! share it; a `watch` keeps only the newest frame, so a slow session
//! conflates (latest value wins) and can neither hold up ingestion nor other
//! sessions.
//! Must not: keep more than one frame per tenant.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::MetricView;

/// Every metric of a tenant at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frame {
    /// Increases with every frame a feed publishes (to count what sessions skip).
    pub seq: u64,
    pub at_ms: i64,
    pub metrics: BTreeMap<String, MetricView>,
}

/// A tenant's feed: its newest frame and how many sessions hold it.
pub struct TenantFeed {
    frames: watch::Sender<Arc<Frame>>,
    sessions: AtomicUsize,
    /// Metric subscriptions of all sessions: the feed reads only while > 0.
    watchers: AtomicUsize,
    /// Woken when the first subscription arrives, so an unwatched feed sleeps
    /// (10 000 idle tenants cost no ticks).
    first_watcher: tokio::sync::Notify,
    /// Set when its tenant is removed: the feed's task ends.
    closed: std::sync::atomic::AtomicBool,
    /// The earliest acknowledgement (ms) not yet in a frame; 0: none.
    unseen_ack_ms: AtomicI64,
    /// Event time → acknowledgement (`tally_event_freshness_seconds`).
    pub event_freshness: crate::telemetry::SecondsHistogram,
    /// Acknowledgement → first frame that holds it (`tally_live_visible_seconds`).
    pub live_visible: crate::telemetry::SecondsHistogram,
}

impl TenantFeed {
    pub fn new() -> Arc<TenantFeed> {
        let (frames, _) = watch::channel(Arc::new(Frame::default()));
        Arc::new(TenantFeed {
            frames,
            sessions: AtomicUsize::new(0),
            watchers: AtomicUsize::new(0),
            first_watcher: tokio::sync::Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
            unseen_ack_ms: AtomicI64::new(0),
            event_freshness: Default::default(),
            live_visible: Default::default(),
        })
    }

    /// A batch was acknowledged at `at_ms`: the next frame read shows it
    /// (only while someone watches: a frame read long after, when a watcher
    /// comes, would count the time nobody looked).
    pub fn acknowledged(&self, at_ms: i64) {
        if !self.is_watched() {
            return;
        }
        let at_ms = at_ms.max(1);
        let _ = self
            .unseen_ack_ms
            .compare_exchange(0, at_ms, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Takes the earliest acknowledgement not yet shown (before a frame is
    /// read: what is acknowledged from here waits for the next).
    pub fn take_unseen_ack(&self) -> Option<i64> {
        let at_ms = self.unseen_ack_ms.swap(0, Ordering::SeqCst);
        (at_ms > 0).then_some(at_ms)
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

    /// True while some metric subscription watches the feed.
    pub fn is_watched(&self) -> bool {
        self.watchers.load(Ordering::SeqCst) > 0
    }

    /// A session's metric subscriptions changed by `delta`.
    pub fn add_watchers(&self, delta: isize) {
        if delta >= 0 {
            let before = self.watchers.fetch_add(delta as usize, Ordering::SeqCst);
            if before == 0 && delta > 0 {
                // a stored permit: the feed wakes even if it is not waiting yet
                self.first_watcher.notify_one();
            }
        } else {
            self.watchers
                .fetch_sub(delta.unsigned_abs(), Ordering::SeqCst);
        }
        crate::telemetry::add_live_subscriptions(delta as f64);
    }

    /// Resolves once some subscription watches the feed, or it is closed.
    pub async fn watched(&self) {
        while !self.is_watched() && !self.is_closed() {
            self.first_watcher.notified().await;
        }
    }

    /// Its tenant was removed: the task that reads it ends.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.first_watcher.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Publishes `frame` with the next seq, unless its values equal the
    /// current frame's (then nobody is woken).
    pub fn publish(&self, mut frame: Frame) {
        self.frames.send_if_modified(|current| {
            if current.metrics == frame.metrics {
                return false;
            }
            frame.seq = current.seq + 1;
            *current = Arc::new(std::mem::take(&mut frame));
            true
        });
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
