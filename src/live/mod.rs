//! Live push (API.md §5): the feed runner that fills each tenant's shared frame
//! (`read::feed`) while any session watches it, the typed WebSocket protocol
//! (`protocol`) and the sessions (`session`). docs/architecture.md, "the path
//! of a read".
//! Must not: read when nobody watches, or read windows per session (sessions
//! share their tenant's frame).

pub mod protocol;
pub mod session;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::actors::TenantHandle;
use crate::node::Node;
use crate::read::feed::{Frame, TenantFeed};
use crate::read::{ReadError, TenantReader};

/// Reads every metric of a tenant once (a fresh read, so it equals a read at
/// this moment), or says why it cannot now (busy, or not serving).
pub async fn read_frame(tenant: &Arc<TenantHandle>, at_ms: i64) -> Result<Frame, ReadError> {
    let reader = TenantReader::begin(tenant)?;
    let views = reader.all(at_ms).await?;
    Ok(Frame {
        seq: 0,
        at_ms,
        metrics: views.into_iter().collect::<BTreeMap<_, _>>(),
    })
}

/// Runs a tenant's feed until `stopping` turns true: a read per
/// `live.tick_ms` while watched.
pub async fn run_feed(
    node: Arc<Node>,
    tenant_id: String,
    feed: Arc<TenantFeed>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(Duration::from_millis(node.config.live.tick_ms));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if feed.is_closed() {
            return;
        }
        // sessions with only topic subscriptions (or none yet) need no reads:
        // an unwatched feed sleeps until its first subscription
        if !feed.is_watched() {
            tokio::select! {
                _ = feed.watched() => {}
                _ = stopping.wait_for(|stopping| *stopping) => return,
            }
            // nobody looked meanwhile: nothing waited to be seen
            feed.take_unseen_ack();
            ticks.reset_immediately();
        }
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopping.wait_for(|stopping| *stopping) => return,
        }
        if !feed.is_watched() {
            continue;
        }
        // a busy tenant skips a tick rather than queue behind its own ingestion
        let Some(tenant) = node.tenant(&tenant_id) else {
            return;
        };
        let unseen_ack_ms = feed.take_unseen_ack();
        match read_frame(&tenant, node.now_ms()).await {
            Ok(frame) => {
                feed.publish(frame);
                if let Some(ack_ms) = unseen_ack_ms {
                    let waited_ms = (node.now_ms() - ack_ms).max(0);
                    feed.live_visible.record_ms(std::iter::once(waited_ms));
                }
            }
            // not shown yet: the next frame shows it
            Err(_) => {
                if let Some(ack_ms) = unseen_ack_ms {
                    feed.acknowledged(ack_ms);
                }
            }
        }
    }
}
