//! `GET /v1/live` with a real WebSocket client (tokio-tungstenite) against a real
//! node: authentication, snapshot and updates equal to `GET /v1/metrics`, no
//! update when nothing changed, a client that never reads does not slow
//! ingestion and then gets the latest values, tenant isolation, limits, errors,
//! and the replay of topic records after `since`.

mod common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use common::{order, start_node, TestNode, T0_MS};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(
    node: &TestNode,
    key: Option<&str>,
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let url = format!("{}/v1/live", node.base.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    if let Some(key) = key {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
}

async fn send(socket: &mut Socket, value: Value) {
    socket
        .send(Message::Text(value.to_string().into()))
        .await
        .unwrap();
}

/// The next JSON message (pings and heartbeats are skipped); fails after 20 s.
async fn next(socket: &mut Socket) -> Value {
    // one deadline for the message, however many pings come first
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("a message within 20 s")
            .expect("the connection is open")
            .unwrap();
        match message {
            Message::Text(text) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["type"] != "heartbeat" {
                    return value;
                }
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The next frame as it comes (within 5 s), pings skipped.
async fn raw_next(socket: &mut Socket) -> Message {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("a frame within 5 s")
            .expect("the connection is open")
            .unwrap();
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_session_gets_heartbeats() {
    let node = start_node(|config| config.live.heartbeat_interval_ms = 200).await;
    let mut socket = connect(&node, Some("demo-key")).await.unwrap();
    let started = std::time::Instant::now();
    for _ in 0..3 {
        let Message::Text(text) = raw_next(&mut socket).await else {
            panic!("a text frame");
        };
        let beat: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(beat["type"], "heartbeat", "{beat}");
        assert_eq!(beat["interval_ms"], 200);
        assert_eq!(beat["at"], T0_MS);
    }
    // three beats, the first one interval after the start
    assert!(started.elapsed() >= Duration::from_millis(550));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_does_not_authenticate_in_time_is_closed() {
    let node = start_node(|config| config.live.auth_timeout_ms = 300).await;
    let mut socket = connect(&node, None).await.unwrap();
    let started = std::time::Instant::now();
    let Message::Close(Some(frame)) = raw_next(&mut socket).await else {
        panic!("a close");
    };
    assert_eq!(u16::from(frame.code), 4401);
    assert!(started.elapsed() < Duration::from_secs(3));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_too_many_messages_is_told_and_closed() {
    let node = start_node(|config| config.live.messages_per_second_max = 5).await;
    let mut socket = connect(&node, Some("demo-key")).await.unwrap();
    for n in 0..6 {
        send(
            &mut socket,
            json!({"op": "unsubscribe", "id": format!("x{n}")}),
        )
        .await;
    }
    let mut codes = Vec::new();
    let close = loop {
        match raw_next(&mut socket).await {
            Message::Text(text) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                codes.push(value["code"].as_str().unwrap_or_default().to_string());
            }
            Message::Close(frame) => break frame,
            other => panic!("unexpected {other:?}"),
        }
    };
    // five answered (no such subscription), the sixth refused
    assert_eq!(codes[..5], vec!["unknown_subscription".to_string(); 5]);
    assert_eq!(codes[5], "too_many_messages");
    assert_eq!(u16::from(close.unwrap().code), 4430);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_the_node_wide_cap_get_503_before_upgrading() {
    let node = start_node(|config| config.live.sessions_max = 2).await;
    let first = connect(&node, Some("demo-key")).await.unwrap();
    let _second = connect(&node, Some("acme-key")).await.unwrap();
    match connect(&node, Some("demo-key")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            assert_eq!(response.headers()["retry-after"], "1");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    // a session that ends gives its place back
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while connect(&node, Some("demo-key")).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no place came free");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.stop().await;
}

/// `GET /v1/metrics` restricted to some metrics and windows, shaped as a push.
async fn rest_view(node: &TestNode, key: &str, metrics: &[&str], windows: &[&str]) -> Value {
    let all = node.metrics(key).await;
    let mut view = serde_json::Map::new();
    for name in metrics {
        let shaped = &all["metrics"][name];
        let mut selected = serde_json::Map::new();
        for window in windows {
            selected.insert(window.to_string(), shaped["windows"][window].clone());
        }
        view.insert(
            name.to_string(),
            json!({"kind": shaped["kind"], "windows": selected}),
        );
    }
    Value::Object(view)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_refused() {
    let node = start_node(|_| {}).await;
    // in the header: 401 before the upgrade
    let refused = connect(&node, Some("nope")).await.unwrap_err().to_string();
    assert!(refused.contains("401"), "{refused}");
    // in the first message: close 4401
    let mut socket = connect(&node, None).await.unwrap();
    send(&mut socket, json!({"op": "auth", "token": "nope"})).await;
    let closed = socket.next().await.unwrap().unwrap();
    let Message::Close(Some(frame)) = closed else {
        panic!("expected a close, got {closed:?}")
    };
    assert_eq!(u16::from(frame.code), 4401);
    // a first message that is not auth closes the same way
    let mut socket = connect(&node, None).await.unwrap();
    send(&mut socket, json!({"op": "subscribe", "id": "s1"})).await;
    let Message::Close(Some(frame)) = socket.next().await.unwrap().unwrap() else {
        panic!("expected a close")
    };
    assert_eq!(u16::from(frame.code), 4401);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_updates_equal_the_rest_api_and_only_what_changed_is_sent() {
    let node = start_node(|_| {}).await;
    node.post("demo-key", &[order("o-1", 1250, T0_MS)]).await;
    let mut socket = connect(&node, None).await.unwrap();
    send(&mut socket, json!({"op": "auth", "token": "demo-key"})).await;
    send(&mut socket, json!({"op": "subscribe", "id": "s1", "metrics": ["gmv", "orders", "payment_failure_rate"], "windows": ["30s", "today"], "interval_ms": 100})).await;
    let snapshot = next(&mut socket).await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["sub"], "s1");
    assert_eq!(snapshot["at"], T0_MS);
    let metrics = ["gmv", "orders", "payment_failure_rate"];
    assert_eq!(
        snapshot["metrics"],
        rest_view(&node, "demo-key", &metrics, &["30s", "today"]).await
    );

    // an event no subscribed metric counts changes nothing: no update for it;
    // the next message is the update for the order after it
    node.post("demo-key", &[json!({"id": "x-1", "type": "search.query"})])
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    node.post("demo-key", &[order("o-2", 800, T0_MS)]).await;
    let update = next(&mut socket).await;
    assert_eq!(update["type"], "update");
    assert_eq!(update["sub"], "s1");
    let now = rest_view(&node, "demo-key", &["gmv", "orders"], &["30s", "today"]).await;
    assert_eq!(update["metrics"], now, "only gmv and orders changed");
    assert_eq!(update["metrics"]["gmv"]["windows"]["today"]["value"], 2050);

    // a second subscription in the same session, then unsubscribe
    send(
        &mut socket,
        json!({"op": "subscribe", "id": "s2", "metrics": ["aov"], "windows": ["today"]}),
    )
    .await;
    let second = next(&mut socket).await;
    assert_eq!(
        second["metrics"],
        json!({"aov": {"kind": "mean", "windows": {"today": {"value": 1025.0}}}})
    );
    send(&mut socket, json!({"op": "unsubscribe", "id": "s2"})).await;
    assert_eq!(
        next(&mut socket).await,
        json!({"type": "unsubscribed", "sub": "s2"})
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_does_not_slow_ingestion() {
    let node = start_node(|_| {}).await;
    let mut socket = connect(&node, Some("demo-key")).await.unwrap();
    send(
        &mut socket,
        json!({"op": "subscribe", "id": "all", "interval_ms": 100}),
    )
    .await;
    // the client now reads nothing while 100 000 events go in
    let mut accepted = 0;
    let mut expected_gmv = 0i64;
    for batch in 0..100 {
        let events: Vec<Value> = (0..1000)
            .map(|i| {
                expected_gmv += 1 + i % 7;
                order(&format!("b{batch}-{i}"), 1 + i % 7, T0_MS)
            })
            .collect();
        accepted += node.post("demo-key", &events).await.body["accepted"]
            .as_i64()
            .unwrap();
    }
    assert_eq!(accepted, 100_000);
    // reading again, it catches up to the latest values (older ones conflated)
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let message = next(&mut socket).await;
        if message["metrics"]["gmv"]["windows"]["today"]["value"] == expected_gmv {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never saw the latest gmv"
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_never_receives_another_tenants_data() {
    let node = start_node(|_| {}).await;
    let mut acme = connect(&node, Some("acme-key")).await.unwrap();
    send(&mut acme, json!({"op": "subscribe", "id": "s", "metrics": ["gmv"], "windows": ["today"], "interval_ms": 100})).await;
    assert_eq!(
        next(&mut acme).await["metrics"]["gmv"]["windows"]["today"]["value"],
        0
    );
    node.post("demo-key", &[order("d-1", 999_999, T0_MS)]).await;
    let eur = json!({"id": "a-1", "type": "order.completed", "amount": 42, "currency": "EUR"});
    node.post("acme-key", &[eur]).await;
    let update = next(&mut acme).await;
    assert_eq!(
        update["metrics"]["gmv"]["windows"]["today"],
        json!({"value": 42, "count": 1})
    );
    // an acme key cannot watch demo, whatever it asks for
    let refused = {
        let url = format!(
            "{}/v1/live?tenant=demo",
            node.base.replace("http://", "ws://")
        );
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", "Bearer acme-key".parse().unwrap());
        tokio_tungstenite::connect_async(request)
            .await
            .unwrap_err()
            .to_string()
    };
    assert!(refused.contains("403"), "{refused}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_errors_and_the_connection_stays() {
    let node = start_node(|config| config.live.subscriptions_per_session_max = 2).await;
    let mut socket = connect(&node, Some("demo-key")).await.unwrap();
    let cases = [
        (json!("not an object"), "unknown_op"),
        (
            json!({"op": "subscribe", "id": "a", "metrics": ["nope"]}),
            "unknown_metric",
        ),
        (
            json!({"op": "subscribe", "id": "a", "windows": ["1h"]}),
            "unknown_window",
        ),
        (
            json!({"op": "subscribe", "id": "a", "interval_ms": 50}),
            "bad_interval",
        ),
        (
            json!({"op": "subscribe", "id": "a", "topic": "news"}),
            "unknown_topic",
        ),
        (
            json!({"op": "unsubscribe", "id": "zzz"}),
            "unknown_subscription",
        ),
        (json!({"op": "dance"}), "unknown_op"),
        (
            json!({"op": "auth", "token": "demo-key"}),
            "already_authenticated",
        ),
    ];
    for (message, code) in cases {
        send(&mut socket, message.clone()).await;
        let reply = next(&mut socket).await;
        assert_eq!(
            (reply["type"].as_str(), reply["code"].as_str()),
            (Some("error"), Some(code)),
            "{message}"
        );
    }
    socket
        .send(Message::Text("{not json".into()))
        .await
        .unwrap();
    assert_eq!(next(&mut socket).await["code"], "bad_json");
    for id in ["a", "b"] {
        send(
            &mut socket,
            json!({"op": "subscribe", "id": id, "metrics": ["gmv"]}),
        )
        .await;
        assert_eq!(next(&mut socket).await["type"], "snapshot");
    }
    send(
        &mut socket,
        json!({"op": "subscribe", "id": "a", "metrics": ["gmv"]}),
    )
    .await;
    send(
        &mut socket,
        json!({"op": "subscribe", "id": "c", "metrics": ["gmv"]}),
    )
    .await;
    let duplicate = next(&mut socket).await;
    let third = next(&mut socket).await;
    assert_eq!(
        (duplicate["code"].clone(), third["code"].clone()),
        (json!("duplicate_id"), json!("too_many_subscriptions"))
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_tenant_are_limited() {
    let node = start_node(|config| config.live.sessions_per_tenant_max = 1).await;
    let mut first = connect(&node, Some("demo-key")).await.unwrap();
    // the first session holds its place once it answers (the upgrade returns
    // before the session starts, so a second connection could overtake it)
    send(
        &mut first,
        json!({"op": "subscribe", "id": "s", "metrics": ["orders"]}),
    )
    .await;
    assert_eq!(next(&mut first).await["type"], "snapshot");
    let mut second = connect(&node, Some("demo-key")).await.unwrap();
    assert_eq!(next(&mut second).await["code"], "too_many_sessions");
    let closed = tokio::time::timeout(Duration::from_secs(20), second.next())
        .await
        .expect("a close within 20 s");
    let Message::Close(Some(frame)) = closed.unwrap().unwrap() else {
        panic!("expected a close")
    };
    assert_eq!(u16::from(frame.code), 4429);
    // the first still works, and another tenant is not affected
    send(
        &mut first,
        json!({"op": "subscribe", "id": "t", "metrics": ["gmv"]}),
    )
    .await;
    assert_eq!(next(&mut first).await["type"], "snapshot");
    let mut acme = connect(&node, Some("acme-key")).await.unwrap();
    send(
        &mut acme,
        json!({"op": "subscribe", "id": "s", "metrics": ["orders"]}),
    )
    .await;
    assert_eq!(next(&mut acme).await["type"], "snapshot");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_records_replay_after_since_in_order() {
    let node = start_node(|_| {}).await;
    let store = &node.running.as_ref().unwrap().node.store;
    let mut ops = Vec::new();
    for seq in 1..=3u64 {
        let record =
            json!({"id": format!("alert-{seq}"), "rule": "pfr", "observed": seq}).to_string();
        ops.push(
            tally::storage::outbox::append_op(
                "demo",
                tally::storage::outbox::Topic::Alerts,
                seq,
                &record,
            )
            .unwrap(),
        );
    }
    let other = json!({"id": "acme-alert"}).to_string();
    ops.push(
        tally::storage::outbox::append_op("acme", tally::storage::outbox::Topic::Alerts, 1, &other)
            .unwrap(),
    );
    store.apply(&ops).unwrap();
    let mut socket = connect(&node, Some("demo-key")).await.unwrap();
    send(
        &mut socket,
        json!({"op": "subscribe", "id": "a", "topic": "alerts", "since": 1}),
    )
    .await;
    for seq in [2, 3] {
        let record = next(&mut socket).await;
        assert_eq!(
            record,
            json!({"type": "alert", "sub": "a", "seq": seq, "id": format!("alert-{seq}"), "rule": "pfr", "observed": seq})
        );
    }
    // nothing else: the next message answers the next request
    send(&mut socket, json!({"op": "unsubscribe", "id": "a"})).await;
    assert_eq!(next(&mut socket).await["type"], "unsubscribed");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_and_an_oversized_message_closes() {
    let node = start_node(|config| {
        config.live.ping_interval_s = 1;
        config.live.idle_timeout_s = 2;
        config.live.message_bytes_max = 2048;
    })
    .await;
    // a client that never answers (it does not read, so it sends no pongs)
    let mut silent = connect(&node, Some("demo-key")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut closed = None;
    while let Some(Ok(message)) = silent.next().await {
        if let Message::Close(frame) = message {
            closed = frame.map(|frame| u16::from(frame.code));
            break;
        }
    }
    assert_eq!(closed, Some(1001));

    let mut big = connect(&node, Some("demo-key")).await.unwrap();
    let text = format!(r#"{{"op":"subscribe","id":"{}"}}"#, "x".repeat(4096));
    big.send(Message::Text(text.into())).await.unwrap();
    let mut code = None;
    while let Some(Ok(message)) = big.next().await {
        if let Message::Close(frame) = message {
            code = frame.map(|frame| u16::from(frame.code));
            break;
        }
    }
    assert_eq!(
        code,
        Some(1009),
        "a message over live.message_bytes_max closes with 1009"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_sessions_show_in_the_node_telemetry() {
    let node = start_node(|_| {}).await;
    let mut socket = connect(&node, Some("acme-key")).await.unwrap();
    send(
        &mut socket,
        json!({"op": "subscribe", "id": "s", "metrics": ["gmv"], "interval_ms": 100}),
    )
    .await;
    assert_eq!(next(&mut socket).await["type"], "snapshot");
    let text = node
        .client
        .get(format!("{}/metrics", node.base))
        .bearer_auth("admin-key")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // the recorder is shared by this test process: other tests' sessions count too
    assert!(
        text.contains("\ntally_live_sessions{tenant=\"acme\"} "),
        "{text}"
    );
    for family in ["tally_live_subscriptions", "tally_live_updates_sent_total"] {
        assert!(text.contains(&format!("\n{family} ")), "{family} missing");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_far_behind_on_records_is_told_and_closed_with_4408() {
    let node = start_node(|config| config.live.replay_records_max = 2).await;
    let store = &node.running.as_ref().unwrap().node.store;
    let ops: Vec<_> = (1..=3u64)
        .map(|seq| {
            let record = json!({"id": format!("s-{seq}")}).to_string();
            tally::storage::outbox::append_op(
                "demo",
                tally::storage::outbox::Topic::Signals,
                seq,
                &record,
            )
            .unwrap()
        })
        .collect();
    store.apply(&ops).unwrap();
    let mut socket = connect(&node, Some("demo-key")).await.unwrap();
    send(
        &mut socket,
        json!({"op": "subscribe", "id": "g", "topic": "signals", "since": 0}),
    )
    .await;
    assert_eq!(next(&mut socket).await["seq"], 1);
    assert_eq!(next(&mut socket).await["seq"], 2);
    assert_eq!(next(&mut socket).await["code"], "too_far_behind");
    let Message::Close(Some(frame)) = socket.next().await.unwrap().unwrap() else {
        panic!("expected a close")
    };
    assert_eq!(u16::from(frame.code), 4408);
    // resuming with the last seq seen gets the rest
    let mut socket = connect(&node, Some("demo-key")).await.unwrap();
    send(
        &mut socket,
        json!({"op": "subscribe", "id": "g", "topic": "signals", "since": 2}),
    )
    .await;
    assert_eq!(
        next(&mut socket).await,
        json!({"type": "signal", "sub": "g", "seq": 3, "id": "s-3"})
    );
    node.stop().await;
}
