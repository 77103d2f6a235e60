//! `GET /v1/live` (API.md §5): one WebSocket session per connection.
//! Owns: authentication (header, or `{"op":"auth"}` first; close 4401), the
//! subscriptions of a session, snapshots, updates of only what changed at most
//! once per `interval_ms`, errors as messages, pings and the idle close, and the
//! replay of `alerts` / `signals` records after `since`.
//! Must not: read windows itself per session (it reads the tenant's shared
//! frame), or buffer without bound (the frame is a latest-value `watch`; topic
//! replays are capped by `live.replay_records_max`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::app::Node;
use crate::clock::Stopwatch;
use crate::domain::time::WindowName;
use crate::live::Frame;
use crate::storage::outbox::{read_since, Topic};

use super::auth::{tenant_for_read, Principal};
use super::error::ApiError;

pub const CLOSE_UNAUTHORIZED: u16 = 4401;
pub const CLOSE_TOO_MANY_SESSIONS: u16 = 4429;
pub const CLOSE_IDLE: u16 = 1001;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_TOO_FAR_BEHIND: u16 = 4408;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveQuery {
    tenant: Option<String>,
}

/// The upgrade: a key in the header is checked now (401 before upgrading);
/// without one the first message must authenticate.
pub async fn get_live(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    query: Result<Query<LiveQuery>, axum::extract::rejection::QueryRejection>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // the key first: a bad query from a stranger is still 401
    let principal = if headers.contains_key(axum::http::header::AUTHORIZATION) {
        Some(node.keys.authenticate(&headers)?)
    } else {
        None
    };
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let tenant = match principal {
        Some(principal) => Some(resolve_tenant(&node, &principal, query.tenant.as_deref())?),
        None if query.tenant.is_some() => {
            return Err(ApiError::BadRequest(
                "without an Authorization header, name the tenant in the auth message".into(),
            ))
        }
        None => None,
    };
    let message_bytes_max = node.config.live.message_bytes_max;
    Ok(upgrade
        .max_message_size(message_bytes_max)
        .max_frame_size(message_bytes_max)
        // clients send small control messages: small buffers keep 10 000
        // sessions in memory (tungstenite's default read buffer is 128 KiB)
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .on_upgrade(move |socket| session(node, socket, tenant))
        .into_response())
}

fn resolve_tenant(
    node: &Node,
    principal: &Principal,
    named: Option<&str>,
) -> Result<String, ApiError> {
    let tenant = tenant_for_read(principal, named)?;
    if !node.tenants.contains_key(tenant) {
        return Err(ApiError::NotFound(format!("unknown tenant {tenant}")));
    }
    Ok(tenant.to_string())
}

async fn close(socket: &mut WebSocket, limit: Duration, code: u16, reason: &'static str) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(limit, socket.send(frame)).await;
}

fn error(code: &str, message: impl Into<String>) -> Value {
    json!({"type": "error", "code": code, "message": message.into()})
}

/// Sends one message; false when the client is gone or did not take it within
/// `live.send_timeout_ms` (a client that stops reading must not hold its
/// session, its place in the tenant's budget, or shutdown).
async fn send_json(socket: &mut WebSocket, limit: Duration, value: &Value) -> bool {
    matches!(
        tokio::time::timeout(limit, socket.send(Message::Text(value.to_string().into()))).await,
        Ok(Ok(()))
    )
}

/// Waits for `{"op":"auth","token":…,"tenant"?:…}` as the first message.
async fn first_message_auth(node: &Node, socket: &mut WebSocket) -> Option<String> {
    let wait = Duration::from_secs(node.config.live.idle_timeout_s);
    let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(wait, socket.recv()).await else {
        return None;
    };
    let message: Value = serde_json::from_str(&text).ok()?;
    if message["op"] != "auth" {
        return None;
    }
    let principal = node.keys.resolve(message["token"].as_str()?)?;
    resolve_tenant(node, &principal, message["tenant"].as_str()).ok()
}

/// A metric subscription: what it selects and what it last sent.
struct MetricSubscription {
    metrics: Option<Vec<String>>,
    windows: Vec<WindowName>,
    interval_ms: u64,
    since_sent: Stopwatch,
    /// Frames older than the snapshot are not sent (they would step back).
    from_ms: i64,
    /// The seq of the last frame this subscription looked at.
    last_seq: u64,
    /// (metric, window) → the value last sent.
    sent: BTreeMap<(String, &'static str), Value>,
}

impl MetricSubscription {
    fn selects(&self, metric: &str) -> bool {
        self.metrics
            .as_ref()
            .is_none_or(|names| names.iter().any(|name| name == metric))
    }

    /// The selected values of `frame` that differ from what was sent, and
    /// remembers them as sent. All of them for a snapshot.
    fn changes(&mut self, frame: &Frame, everything: bool) -> Map<String, Value> {
        let mut changed = Map::new();
        for (name, shaped) in &frame.metrics {
            if !self.selects(name) {
                continue;
            }
            let mut windows = Map::new();
            for window in &self.windows {
                let Some(value) = shaped["windows"].get(window.name()) else {
                    continue;
                };
                let key = (name.clone(), window.name());
                if everything || self.sent.get(&key) != Some(value) {
                    windows.insert(window.name().to_string(), value.clone());
                    self.sent.insert(key, value.clone());
                }
            }
            if !windows.is_empty() {
                changed.insert(
                    name.clone(),
                    json!({"kind": shaped["kind"], "windows": windows}),
                );
            }
        }
        changed
    }
}

async fn session(node: Arc<Node>, mut socket: WebSocket, tenant: Option<String>) {
    let limit = Duration::from_millis(node.config.live.send_timeout_ms);
    let tenant = match tenant {
        Some(tenant) => tenant,
        None => match first_message_auth(&node, &mut socket).await {
            Some(tenant) => tenant,
            None => return close(&mut socket, limit, CLOSE_UNAUTHORIZED, "unauthorized").await,
        },
    };
    let Some(feed) = node.feeds.get(&tenant).cloned() else {
        return close(&mut socket, limit, CLOSE_UNAUTHORIZED, "unknown tenant").await;
    };
    let Some(_place) = feed.join(&tenant, node.config.live.sessions_per_tenant_max) else {
        let message = format!("tenant {tenant} has live.sessions_per_tenant_max sessions");
        send_json(&mut socket, limit, &error("too_many_sessions", message)).await;
        return close(
            &mut socket,
            limit,
            CLOSE_TOO_MANY_SESSIONS,
            "too many sessions",
        )
        .await;
    };
    let mut subscriptions: BTreeMap<String, MetricSubscription> = BTreeMap::new();
    // the loop returns from many places; the gauge is settled once, after it
    async {
        let mut frames = feed.subscribe();
        let mut topics: BTreeMap<String, Topic> = BTreeMap::new();
        let mut heard = Stopwatch::start();
        let tick = Duration::from_millis(node.config.live.tick_ms);
        let mut wake = Box::pin(tokio::time::sleep(tick));
        // true while some subscription may send now (its interval has passed)
        let mut due = true;
        let mut ping = tokio::time::interval(Duration::from_secs(node.config.live.ping_interval_s));
        ping.tick().await;
        let idle_ms = node.config.live.idle_timeout_s * 1000;
        let mut stopping = node.stopping.subscribe();
        if *stopping.borrow() {
            return close(&mut socket, limit, CLOSE_GOING_AWAY, "server stopping").await;
        }
        loop {
            tokio::select! {
                _ = stopping.changed() => {
                    return close(&mut socket, limit, CLOSE_GOING_AWAY, "server stopping").await;
                }
                received = socket.recv() => {
                    let message = match received {
                        Some(Ok(message)) => message,
                        Some(Err(error)) => {
                            // a message over live.message_bytes_max: say so (1009)
                            let too_big = error
                                .into_inner()
                                .downcast_ref::<tokio_tungstenite::tungstenite::Error>()
                                .is_some_and(|error| matches!(error, tokio_tungstenite::tungstenite::Error::Capacity(_)));
                            if too_big {
                                close(&mut socket, limit, CLOSE_TOO_BIG, "message too big").await;
                            }
                            return;
                        }
                        None => return,
                    };
                    heard = Stopwatch::start();
                    let reply = match message {
                        Message::Text(text) => {
                            handle(&node, &tenant, &text, &frames, &mut subscriptions, &mut topics).await
                        }
                        Message::Binary(_) => vec![error("bad_message", "binary messages are not supported")],
                        Message::Close(_) => return,
                        Message::Ping(_) | Message::Pong(_) => Vec::new(),
                    };                for value in reply {
                    if !send_json(&mut socket, limit, &value).await {
                        return;
                    }
                    if value["code"] == "too_far_behind" {
                        return close(&mut socket, limit, CLOSE_TOO_FAR_BEHIND, "too far behind; resume with since").await;
                    }
                }
                    // subscriptions may have changed: plan the next wake-up anew
                    wake = Box::pin(tokio::time::sleep(Duration::from_millis(1)));
                }
                // frames matter only while a subscription is due: the others sleep
                // until they are, so a frame does not wake every session
                changed = frames.changed(), if due => {
                    if changed.is_err() {
                        return;
                    }
                    // a new frame goes out at once to every subscription that is due
                    match send_due(&mut socket, limit, &frames, &mut subscriptions).await {
                        Some((wait, is_due)) => {
                            wake = Box::pin(tokio::time::sleep(wait));
                            due = is_due;
                        }
                        None => return,
                    }
                }
                _ = &mut wake => {
                    // a subscription that was not due when its frame came is due now
                    match send_due(&mut socket, limit, &frames, &mut subscriptions).await {
                        Some((wait, is_due)) => {
                            wake = Box::pin(tokio::time::sleep(wait));
                            due = is_due;
                        }
                        None => return,
                    }
                }
                _ = ping.tick() => {
                    if heard.elapsed_ms() >= idle_ms {
                        return close(&mut socket, limit, CLOSE_IDLE, "idle").await;
                    }
                    if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    .await;
    feed.add_watchers(-(subscriptions.len() as isize));
}

/// Sends an update to every subscription whose interval has passed and whose
/// values changed. Returns how long until the next subscription is due and
/// whether one is due now (then the next frame wakes the session), or `None`
/// when the client is gone.
async fn send_due(
    socket: &mut WebSocket,
    limit: Duration,
    frames: &tokio::sync::watch::Receiver<Arc<Frame>>,
    subscriptions: &mut BTreeMap<String, MetricSubscription>,
) -> Option<(Duration, bool)> {
    let frame = frames.borrow().clone();
    let mut next_due_ms = u64::MAX;
    let mut due_now = false;
    for (id, subscription) in subscriptions.iter_mut() {
        let since_ms = subscription.since_sent.elapsed_ms();
        if since_ms < subscription.interval_ms {
            next_due_ms = next_due_ms.min(subscription.interval_ms - since_ms);
            continue;
        }
        if frame.at_ms < subscription.from_ms {
            due_now = true;
            continue;
        }
        let changed = subscription.changes(&frame, false);
        if changed.is_empty() {
            due_now = true;
            continue;
        }
        subscription.since_sent = Stopwatch::start();
        // frames between the last one sent and this one were superseded
        crate::telemetry::count_live_update(frame.seq.saturating_sub(subscription.last_seq + 1));
        subscription.last_seq = frame.seq;
        next_due_ms = next_due_ms.min(subscription.interval_ms);
        let update = json!({"type": "update", "sub": id, "at": frame.at_ms, "metrics": changed});
        if !send_json(socket, limit, &update).await {
            return None;
        }
    }
    // with nothing pending, wake with the next frame (or a second from now)
    Some((Duration::from_millis(next_due_ms.clamp(1, 1000)), due_now))
}

/// One client message; returns the messages to send back.
async fn handle(
    node: &Node,
    tenant: &str,
    text: &str,
    frames: &tokio::sync::watch::Receiver<Arc<Frame>>,
    subscriptions: &mut BTreeMap<String, MetricSubscription>,
    topics: &mut BTreeMap<String, Topic>,
) -> Vec<Value> {
    let Ok(message) = serde_json::from_str::<Value>(text) else {
        return vec![error("bad_json", "a message must be a json object")];
    };
    match message["op"].as_str() {
        Some("auth") => vec![error(
            "already_authenticated",
            "this connection is authenticated",
        )],
        Some("unsubscribe") => {
            let Some(id) = message["id"].as_str() else {
                return vec![error("bad_message", "unsubscribe needs an id")];
            };
            if subscriptions.remove(id).is_some() {
                if let Some(feed) = node.feeds.get(tenant) {
                    feed.add_watchers(-1);
                }
            } else if topics.remove(id).is_none() {
                return vec![error(
                    "unknown_subscription",
                    format!("no subscription {id}"),
                )];
            }
            vec![json!({"type": "unsubscribed", "sub": id})]
        }
        Some("subscribe") => {
            let before = subscriptions.len();
            let replies = subscribe(node, tenant, &message, frames, subscriptions, topics).await;
            if subscriptions.len() > before {
                if let Some(feed) = node.feeds.get(tenant) {
                    feed.add_watchers(1);
                }
            }
            replies
        }
        _ => vec![error(
            "unknown_op",
            "op must be auth, subscribe or unsubscribe",
        )],
    }
}

async fn subscribe(
    node: &Node,
    tenant: &str,
    message: &Value,
    frames: &tokio::sync::watch::Receiver<Arc<Frame>>,
    subscriptions: &mut BTreeMap<String, MetricSubscription>,
    topics: &mut BTreeMap<String, Topic>,
) -> Vec<Value> {
    let limits = &node.config.live;
    let Some(id) = message["id"]
        .as_str()
        .filter(|id| !id.is_empty() && id.len() <= 64)
    else {
        return vec![error(
            "bad_message",
            "subscribe needs an id of 1 to 64 bytes",
        )];
    };
    if subscriptions.contains_key(id) || topics.contains_key(id) {
        return vec![error("duplicate_id", format!("subscription {id} exists"))];
    }
    if subscriptions.len() + topics.len() >= limits.subscriptions_per_session_max {
        return vec![error(
            "too_many_subscriptions",
            format!(
                "at most {} subscriptions per connection",
                limits.subscriptions_per_session_max
            ),
        )];
    }
    if let Some(topic) = message.get("topic") {
        let topic = match topic.as_str() {
            Some("alerts") => Topic::Alerts,
            Some("signals") => Topic::Signals,
            _ => return vec![error("unknown_topic", "topic must be alerts or signals")],
        };
        let since = message["since"].as_u64().unwrap_or(0);
        let kind = if topic == Topic::Alerts {
            "alert"
        } else {
            "signal"
        };
        let store = Arc::clone(&node.store);
        let (tenant_id, replay_max, record_max) = (
            tenant.to_string(),
            limits.replay_records_max,
            node.config.storage.record_bytes_max,
        );
        let records = tokio::task::spawn_blocking(move || {
            read_since::<String>(&*store, &tenant_id, topic, since, replay_max, record_max)
        })
        .await;
        let Ok(Ok(records)) = records else {
            return vec![error("unavailable", "the records could not be read; retry")];
        };
        topics.insert(id.to_string(), topic);
        let behind = records.len() >= replay_max;
        let mut replies = Vec::with_capacity(records.len() + 1);
        for (seq, record) in records {
            let Some(mut body) = record
                .ok()
                .and_then(|text| serde_json::from_str::<Map<String, Value>>(&text).ok())
            else {
                replies.push(error(
                    "unreadable_record",
                    format!("record {seq} cannot be read; it is skipped"),
                ));
                continue;
            };
            body.insert("type".into(), json!(kind));
            body.insert("sub".into(), json!(id));
            body.insert("seq".into(), json!(seq));
            replies.push(Value::Object(body));
        }
        if behind {
            // more than one replay holds: the client resumes with the last seq
            replies.push(error(
                "too_far_behind",
                "more records than one replay holds; reconnect with since",
            ));
        }
        return replies;
    }
    let metrics = match message.get("metrics") {
        None | Some(Value::Null) => None,
        Some(Value::Array(names)) => {
            let mut selected = Vec::new();
            for name in names {
                match name.as_str() {
                    Some(name) if node.catalogue.index_of(name).is_some() => {
                        selected.push(name.to_string())
                    }
                    _ => return vec![error("unknown_metric", format!("unknown metric {name}"))],
                }
            }
            Some(selected)
        }
        Some(_) => return vec![error("bad_message", "metrics must be an array of names")],
    };
    let windows = match message.get("windows") {
        None | Some(Value::Null) => WindowName::ALL.to_vec(),
        Some(Value::Array(names)) => {
            let mut selected = Vec::new();
            for name in names {
                match name.as_str().and_then(WindowName::parse) {
                    Some(window) => selected.push(window),
                    None => {
                        return vec![error(
                            "unknown_window",
                            format!("unknown window {name}; use 30s, 15m or today"),
                        )]
                    }
                }
            }
            selected
        }
        Some(_) => return vec![error("bad_message", "windows must be an array of names")],
    };
    let interval_ms = match message.get("interval_ms") {
        None | Some(Value::Null) => 1000,
        Some(value) => match value.as_u64() {
            Some(ms) if (100..=3_600_000).contains(&ms) => ms,
            _ => {
                return vec![error(
                    "bad_interval",
                    "interval_ms must be between 100 and 3600000",
                )]
            }
        },
    };
    // the snapshot comes from a fresh read, so it equals a read at this moment;
    // when the tenant's reads are all in use, say so rather than send old values
    let Some(frame) = crate::live::read_frame(node, tenant).await else {
        return vec![error(
            "unavailable",
            "the tenant is busy; subscribe again shortly",
        )];
    };
    let mut subscription = MetricSubscription {
        metrics,
        windows,
        interval_ms,
        since_sent: Stopwatch::start(),
        from_ms: frame.at_ms,
        last_seq: frames.borrow().seq,
        sent: BTreeMap::new(),
    };
    crate::telemetry::count_live_update(0);
    let snapshot = subscription.changes(&frame, true);
    subscriptions.insert(id.to_string(), subscription);
    vec![json!({"type": "snapshot", "sub": id, "at": frame.at_ms, "metrics": snapshot})]
}
