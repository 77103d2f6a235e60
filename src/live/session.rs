//! One WebSocket session of `/v1/live` (API.md §5), after the upgrade.
//! Owns: authentication by the first message when the upgrade had no key
//! (close 4401), the session's subscriptions, snapshots, updates of only what
//! changed at most once per `interval_ms`, errors as messages, pings and the
//! idle close, and the replay of `alerts` / `signals` records after `since`.
//! Must not: read windows itself per session (it reads the tenant's shared
//! frame), or buffer without bound (the frame is a latest-value `watch`; topic
//! replays are capped by `live.replay_records_max`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::clock::Stopwatch;
use crate::domain::time::WindowName;
use crate::node::Node;
use crate::read::feed::Frame;
use crate::read::{MetricView, ReadError, WindowView};
use crate::storage::outbox::{read_since, Topic};

use super::protocol::{parse_client_message, ClientMessage, ErrorCode, ServerMessage, Subscribe};

pub const CLOSE_UNAUTHORIZED: u16 = 4401;
pub const CLOSE_TOO_MANY_SESSIONS: u16 = 4429;
pub const CLOSE_IDLE: u16 = 1001;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_TOO_FAR_BEHIND: u16 = 4408;
pub const CLOSE_TOO_MANY_MESSAGES: u16 = 4430;

async fn close(socket: &mut WebSocket, limit: Duration, code: u16, reason: &'static str) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(limit, socket.send(frame)).await;
}

/// Sends one message; false when the client is gone or did not take it within
/// `live.send_timeout_ms` (a client that stops reading must not hold its
/// session, its place in the tenant's budget, or shutdown).
async fn send(socket: &mut WebSocket, limit: Duration, message: &ServerMessage) -> bool {
    let text = Message::Text(message.to_text().into());
    matches!(
        tokio::time::timeout(limit, socket.send(text)).await,
        Ok(Ok(()))
    )
}

/// Waits for `{"op":"auth","token":…,"tenant"?:…}` as the first message:
/// the tenant, and the key's id for the audit records.
async fn first_message_auth(node: &Node, socket: &mut WebSocket) -> Option<(String, String)> {
    let wait = Duration::from_millis(node.config.live.auth_timeout_ms);
    let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(wait, socket.recv()).await else {
        return None;
    };
    let Ok(ClientMessage::Auth { token, tenant }) = parse_client_message(&text) else {
        return None;
    };
    let caller = node.keys.caller(Some(&token));
    let tenant = node.reading_tenant(caller.principal().ok()?, tenant.as_deref());
    let key = crate::audit::key_id(&caller, Some(&token));
    tenant
        .ok()
        .map(|tenant| (tenant.context.id.to_string(), key))
}

/// True when `key` (an id as `audit::key_id` makes it) was a key of
/// `tenant` and is no longer one, or `tenant` was removed (an admin's
/// session on it too).
fn key_revoked(node: &Node, tenant: &str, key: &str) -> bool {
    if node.tenant(tenant).is_none() {
        return true;
    }
    let Some(id) = key.strip_prefix("tenant:") else {
        return false;
    };
    !node
        .keys
        .tenant_keys()
        .iter()
        .any(|tenant_key| tenant_key.id == id && tenant_key.tenant == tenant)
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
    /// (metric, window) → what was last sent. A change is what the client
    /// would see change (`WindowView::shows_same`).
    sent: BTreeMap<(String, WindowName), WindowView>,
}

impl MetricSubscription {
    fn selects(&self, metric: &str) -> bool {
        self.metrics
            .as_ref()
            .is_none_or(|names| names.iter().any(|name| name == metric))
    }

    /// The selected windows of `frame` that differ from what was sent, and
    /// remembers them as sent. All of them for a snapshot.
    fn changes(&mut self, frame: &Frame, everything: bool) -> BTreeMap<String, MetricView> {
        let mut changed = BTreeMap::new();
        for (name, view) in &frame.metrics {
            if !self.selects(name) {
                continue;
            }
            let mut windows = Vec::new();
            for &window in &self.windows {
                let Some(value) = view.window(window) else {
                    continue;
                };
                let key = (name.clone(), window);
                let unchanged = self
                    .sent
                    .get(&key)
                    .is_some_and(|sent| sent.shows_same(value));
                if everything || !unchanged {
                    windows.push((window, *value));
                    self.sent.insert(key, *value);
                }
            }
            if !windows.is_empty() {
                changed.insert(
                    name.clone(),
                    MetricView {
                        kind: view.kind,
                        windows,
                    },
                );
            }
        }
        changed
    }
}

/// What handling a client message asks of the session.
enum Next {
    Stay,
    /// Close after the replies (4408: the client resumes with `since`).
    CloseTooFarBehind,
}

/// Runs a session; `tenant` is known when the upgrade carried a key.
/// A session of `authenticated` (its tenant and key id, when the upgrade's
/// header said), or of whoever authenticates with the first message. `place`
/// is its place among the sessions, or, still to authenticate, among the
/// unauthenticated sockets (traded for a session's place once it has).
pub async fn run(
    node: Arc<Node>,
    mut socket: WebSocket,
    authenticated: Option<(String, String)>,
    peer: Option<std::net::IpAddr>,
    place: tokio::sync::OwnedSemaphorePermit,
) {
    let limit = Duration::from_millis(node.config.live.send_timeout_ms);
    let (tenant, key, _place) = match authenticated {
        Some((tenant, key)) => (tenant, key, place),
        None => match first_message_auth(&node, &mut socket).await {
            Some((tenant, key)) => {
                drop(place);
                let Ok(place) = Arc::clone(&node.live_sessions).try_acquire_owned() else {
                    crate::telemetry::count_shed(crate::telemetry::Shed::LiveSessions);
                    return close(
                        &mut socket,
                        limit,
                        CLOSE_TOO_MANY_SESSIONS,
                        "too many sessions",
                    )
                    .await;
                };
                (tenant, key, place)
            }
            None => {
                // a wrong key sent in the message counts toward its address's burst
                node.audit.auth_failure(peer, 401, node.now_ms()).await;
                return close(&mut socket, limit, CLOSE_UNAUTHORIZED, "unauthorized").await;
            }
        },
    };
    let Some(feed) = node.feeds.get(&tenant) else {
        return close(&mut socket, limit, CLOSE_UNAUTHORIZED, "unknown tenant").await;
    };
    let Some(_place) = feed.join(&tenant, node.config.live.sessions_per_tenant_max) else {
        let message = format!("tenant {tenant} has live.sessions_per_tenant_max sessions");
        send(
            &mut socket,
            limit,
            &ServerMessage::error(ErrorCode::TooManySessions, message),
        )
        .await;
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
        // each topic subscription with the last seq it was sent
        let mut topics: BTreeMap<String, TopicSubscription> = BTreeMap::new();
        // new alert and signal records: the engines move these after each
        // write (a tenant without an engine keeps its own sender: never moves)
        let (_quiet, quiet) = watch::channel(0u64);
        let mut alerts_written = node
            .alerts
            .get(&tenant)
            .map_or_else(|| quiet.clone(), |alerts| alerts.written());
        let mut signals_written = node
            .experiments
            .get(&tenant)
            .map_or(quiet, |experiments| experiments.written());
        let mut heard = Stopwatch::start();
        let tick = Duration::from_millis(node.config.live.tick_ms);
        let mut wake = Box::pin(tokio::time::sleep(tick));
        // true while some subscription may send now (its interval has passed)
        let mut due = true;
        let mut ping = tokio::time::interval(Duration::from_secs(node.config.live.ping_interval_s));
        ping.tick().await;
        let heartbeat_ms = node.config.live.heartbeat_interval_ms;
        let mut heartbeat = tokio::time::interval(Duration::from_millis(heartbeat_ms));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // the first beat one interval after the start (an interval's first
        // tick is at once)
        heartbeat.tick().await;
        // messages from the client in the current second
        let (mut second, mut heard_this_second) = (Stopwatch::start(), 0u32);
        let idle_ms = node.config.live.idle_timeout_s * 1000;
        let mut keys_changed = node.keys_changed.subscribe();
        // a key revoked between the upgrade and here is seen at the first turn
        keys_changed.mark_changed();
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
                    if second.elapsed_ms() >= 1000 {
                        (second, heard_this_second) = (Stopwatch::start(), 0);
                    }
                    heard_this_second += 1;
                    if heard_this_second > node.config.live.messages_per_second_max {
                        let message = format!(
                            "more than live.messages_per_second_max ({}) messages in a second",
                            node.config.live.messages_per_second_max
                        );
                        send(&mut socket, limit, &ServerMessage::error(ErrorCode::TooManyMessages, message)).await;
                        return close(&mut socket, limit, CLOSE_TOO_MANY_MESSAGES, "too many messages").await;
                    }
                    let (replies, next) = match message {
                        Message::Text(text) => {
                            handle(&node, (&tenant, &key, peer), &text, &frames, &mut subscriptions, &mut topics).await
                        }
                        Message::Binary(_) => (
                            vec![ServerMessage::error(ErrorCode::BadMessage, "binary messages are not supported")],
                            Next::Stay,
                        ),
                        Message::Close(_) => return,
                        Message::Ping(_) | Message::Pong(_) => (Vec::new(), Next::Stay),
                    };
                    for reply in &replies {
                        if !send(&mut socket, limit, reply).await {
                            return;
                        }
                    }
                    if let Next::CloseTooFarBehind = next {
                        return close(&mut socket, limit, CLOSE_TOO_FAR_BEHIND, "too far behind; resume with since").await;
                    }
                    // subscriptions may have changed: plan the next wake-up anew
                    wake = Box::pin(tokio::time::sleep(Duration::from_millis(1)));
                }
                // records written since: every subscription to the topic gets them
                changed = alerts_written.changed(), if topics.values().any(|sub| sub.topic == Topic::Alerts) => {
                    if changed.is_err() || !push_written(&node, &tenant, Topic::Alerts, &mut socket, limit, &mut topics).await {
                        return;
                    }
                }
                changed = signals_written.changed(), if topics.values().any(|sub| sub.topic == Topic::Signals) => {
                    if changed.is_err() || !push_written(&node, &tenant, Topic::Signals, &mut socket, limit, &mut topics).await {
                        return;
                    }
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
                // a revoked key's sessions end at once
                changed = keys_changed.changed() => {
                    if changed.is_err() || key_revoked(&node, &tenant, &key) {
                        return close(&mut socket, limit, CLOSE_UNAUTHORIZED, "key revoked").await;
                    }
                }
                _ = heartbeat.tick() => {
                    let beat = ServerMessage::Heartbeat { at: node.now_ms(), interval_ms: heartbeat_ms };
                    if !send(&mut socket, limit, &beat).await {
                        return;
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

/// Sends every subscription to `topic` the records written after the last
/// it was sent; false when the session is over (the client is gone, or too
/// far behind and closed).
async fn push_written(
    node: &Node,
    tenant: &str,
    topic: Topic,
    socket: &mut WebSocket,
    limit: Duration,
    topics: &mut BTreeMap<String, TopicSubscription>,
) -> bool {
    let subs: Vec<(String, TopicSubscription)> = topics
        .iter()
        .filter(|(_, sub)| sub.topic == topic)
        .map(|(id, sub)| (id.clone(), sub.clone()))
        .collect();
    for (id, sub) in subs {
        let (replies, next) = replay(node, tenant, id, sub, topics).await;
        for reply in &replies {
            if !send(socket, limit, reply).await {
                return false;
            }
        }
        if let Next::CloseTooFarBehind = next {
            close(
                socket,
                limit,
                CLOSE_TOO_FAR_BEHIND,
                "too far behind; resume with since",
            )
            .await;
            return false;
        }
    }
    true
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
        let update = ServerMessage::Update {
            sub: id.clone(),
            at: frame.at_ms,
            metrics: changed,
        };
        if !send(socket, limit, &update).await {
            return None;
        }
    }
    // with nothing pending, wake with the next frame (or a second from now)
    Some((Duration::from_millis(next_due_ms.clamp(1, 1000)), due_now))
}

/// One client message; returns the messages to send back and what follows.
async fn handle(
    node: &Node,
    (tenant, key, peer): (&str, &str, Option<std::net::IpAddr>),
    text: &str,
    frames: &tokio::sync::watch::Receiver<Arc<Frame>>,
    subscriptions: &mut BTreeMap<String, MetricSubscription>,
    topics: &mut BTreeMap<String, TopicSubscription>,
) -> (Vec<ServerMessage>, Next) {
    let message = match parse_client_message(text) {
        Ok(message) => message,
        Err(error) => return (vec![error], Next::Stay),
    };
    match message {
        ClientMessage::Auth { .. } => (
            vec![ServerMessage::error(
                ErrorCode::AlreadyAuthenticated,
                "this connection is authenticated",
            )],
            Next::Stay,
        ),
        ClientMessage::Unsubscribe { id } => {
            if subscriptions.remove(&id).is_some() {
                if let Some(feed) = node.feeds.get(tenant) {
                    feed.add_watchers(-1);
                }
            } else if topics.remove(&id).is_none() {
                let message = format!("no subscription {id}");
                return (
                    vec![ServerMessage::error(
                        ErrorCode::UnknownSubscription,
                        message,
                    )],
                    Next::Stay,
                );
            }
            (vec![ServerMessage::Unsubscribed { sub: id }], Next::Stay)
        }
        ClientMessage::Subscribe(request) => {
            let before = subscriptions.len() + topics.len();
            let metrics_before = subscriptions.len();
            let target = match (&request.topic, &request.metrics) {
                (Some(topic), _) => format!("topic {topic} since {}", request.since.unwrap_or(0)),
                (None, Some(metrics)) => format!("metrics {}", metrics.join(",")),
                (None, None) => "metrics *".to_string(),
            };
            let replies = subscribe(node, tenant, request, frames, subscriptions, topics).await;
            if subscriptions.len() > metrics_before {
                if let Some(feed) = node.feeds.get(tenant) {
                    feed.add_watchers(1);
                }
            }
            // a subscription made is a read of the tenant's data
            if subscriptions.len() + topics.len() > before {
                let rows = replies
                    .0
                    .iter()
                    .map(|reply| match reply {
                        ServerMessage::Snapshot { metrics, .. } => metrics.len(),
                        ServerMessage::Alert { .. } | ServerMessage::Signal { .. } => 1,
                        _ => 0,
                    })
                    .sum::<usize>();
                node.audit
                    .record(crate::audit::AuditRecord {
                        seq: 0,
                        at_ms: node.now_ms(),
                        key: key.to_string(),
                        tenant: tenant.to_string(),
                        action: "ws subscribe".into(),
                        target,
                        status: 200,
                        rows: rows as u64,
                        large: false,
                        address: peer.map(|ip| ip.to_string()),
                    })
                    .await;
            }
            replies
        }
    }
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> (Vec<ServerMessage>, Next) {
    (vec![ServerMessage::error(code, message)], Next::Stay)
}

async fn subscribe(
    node: &Node,
    tenant: &str,
    request: Subscribe,
    frames: &tokio::sync::watch::Receiver<Arc<Frame>>,
    subscriptions: &mut BTreeMap<String, MetricSubscription>,
    topics: &mut BTreeMap<String, TopicSubscription>,
) -> (Vec<ServerMessage>, Next) {
    let limits = &node.config.live;
    let id = request.id;
    if id.is_empty() || id.len() > 64 {
        return refuse(
            ErrorCode::BadMessage,
            "subscribe needs an id of 1 to 64 bytes",
        );
    }
    if subscriptions.contains_key(&id) || topics.contains_key(&id) {
        return refuse(ErrorCode::DuplicateId, format!("subscription {id} exists"));
    }
    if subscriptions.len() + topics.len() >= limits.subscriptions_per_session_max {
        return refuse(
            ErrorCode::TooManySubscriptions,
            format!(
                "at most {} subscriptions per connection",
                limits.subscriptions_per_session_max
            ),
        );
    }
    if let Some(topic) = request.topic {
        let topic = match topic.as_str() {
            "alerts" => Topic::Alerts,
            "signals" => Topic::Signals,
            _ => return refuse(ErrorCode::UnknownTopic, "topic must be alerts or signals"),
        };
        if topic == Topic::Alerts && request.experiment.is_some() {
            return refuse(
                ErrorCode::BadMessage,
                "experiment filters the signals topic only",
            );
        }
        let sub = TopicSubscription {
            topic,
            last: request.since.unwrap_or(0),
            experiment: request.experiment,
        };
        return replay(node, tenant, id, sub, topics).await;
    }
    let metrics = match request.metrics {
        None => None,
        Some(names) => {
            if let Some(unknown) = names
                .iter()
                .find(|name| node.catalogue.index_of(name).is_none())
            {
                return refuse(
                    ErrorCode::UnknownMetric,
                    format!("unknown metric {unknown}"),
                );
            }
            Some(names)
        }
    };
    let windows = match request.windows {
        None => WindowName::ALL.to_vec(),
        Some(names) => {
            let mut selected = Vec::with_capacity(names.len());
            for name in names {
                match WindowName::parse(&name) {
                    Some(window) => selected.push(window),
                    None => {
                        return refuse(
                            ErrorCode::UnknownWindow,
                            format!("unknown window {name}; use 30s, 15m or today"),
                        )
                    }
                }
            }
            selected
        }
    };
    let interval_ms = match request.interval_ms {
        None => 1000,
        Some(ms) if (100..=3_600_000).contains(&ms) => ms,
        Some(_) => {
            return refuse(
                ErrorCode::BadInterval,
                "interval_ms must be between 100 and 3600000",
            )
        }
    };
    // the snapshot comes from a fresh read, so it equals a read at this moment;
    // when the tenant's reads are all in use, say so rather than send old values
    let Some(handle) = node.tenant(tenant) else {
        return refuse(ErrorCode::Unavailable, format!("unknown tenant {tenant}"));
    };
    let frame = match super::read_frame(&handle, node.now_ms()).await {
        Ok(frame) => frame,
        Err(ReadError::Busy(_)) => {
            return refuse(
                ErrorCode::Unavailable,
                "the tenant is busy; subscribe again shortly",
            )
        }
        Err(error) => return refuse(ErrorCode::Unavailable, error.to_string()),
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
    subscriptions.insert(id.clone(), subscription);
    (
        vec![ServerMessage::Snapshot {
            sub: id,
            at: frame.at_ms,
            metrics: snapshot,
        }],
        Next::Stay,
    )
}

/// A subscription to a topic of records: the last seq it was sent (or
/// passed over), and for `signals` the one experiment it follows, if any.
#[derive(Debug, Clone)]
struct TopicSubscription {
    topic: Topic,
    last: u64,
    experiment: Option<String>,
}

/// The records of a topic after `sub.last`, at most `live.replay_records_max`
/// read; records of another experiment than the subscription follows are
/// passed over (its `last` moves past them).
async fn replay(
    node: &Node,
    tenant: &str,
    id: String,
    sub: TopicSubscription,
    topics: &mut BTreeMap<String, TopicSubscription>,
) -> (Vec<ServerMessage>, Next) {
    let (topic, since) = (sub.topic, sub.last);
    let store = Arc::clone(&node.store);
    let (tenant_id, replay_max, record_max) = (
        tenant.to_string(),
        node.config.live.replay_records_max,
        node.config.storage.record_bytes_max,
    );
    let records = tokio::task::spawn_blocking(move || {
        // one more than a replay holds tells whether there are more
        read_since::<String>(
            &*store,
            &tenant_id,
            topic,
            since,
            replay_max + 1,
            record_max,
        )
    })
    .await;
    let Ok(Ok(mut records)) = records else {
        return refuse(
            ErrorCode::Unavailable,
            "the records could not be read; retry",
        );
    };
    let behind = records.len() > replay_max;
    records.truncate(replay_max);
    let last = records.last().map_or(since, |(seq, _)| *seq).max(since);
    let experiment = sub.experiment.clone();
    topics.insert(id.clone(), TopicSubscription { last, ..sub });
    let mut replies = Vec::with_capacity(records.len() + 1);
    for (seq, record) in records {
        let Some(mut record) = record
            .ok()
            .and_then(|text| serde_json::from_str::<Map<String, Value>>(&text).ok())
        else {
            replies.push(ServerMessage::error(
                ErrorCode::UnreadableRecord,
                format!("record {seq} cannot be read; it is skipped"),
            ));
            continue;
        };
        if let Some(experiment) = &experiment {
            if record.get("experiment").and_then(Value::as_str) != Some(experiment.as_str()) {
                continue;
            }
        }
        // the envelope's own keys win over a record's
        for key in ["type", "sub", "seq"] {
            record.remove(key);
        }
        let sub = id.clone();
        replies.push(match topic {
            Topic::Alerts => ServerMessage::Alert { sub, seq, record },
            Topic::Signals => ServerMessage::Signal { sub, seq, record },
        });
    }
    if behind {
        // more than one replay holds: the client resumes with the last seq
        replies.push(ServerMessage::error(
            ErrorCode::TooFarBehind,
            "more records than one replay holds; reconnect with since",
        ));
        return (replies, Next::CloseTooFarBehind);
    }
    (replies, Next::Stay)
}
