//! Protection against hostile or broken clients (docs/api.md, "Connections"):
//! a client that stalls in its headers is disconnected after
//! `server.header_read_timeout_ms` (slowloris); connections past
//! `server.connections_max` get 503 with `Retry-After` while the others are
//! served (raw TCP clients); a tenant past its event rate gets 429 and
//! nothing applied; deeply nested JSON is quarantined with its reason.

mod common;

use std::time::Duration;

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::start_node;

fn addr(node: &common::TestNode) -> String {
    node.base.trim_start_matches("http://").to_string()
}

/// Reads until the peer closes (or `wait` passes): what it sent, and whether
/// it closed.
async fn read_to_close(stream: &mut TcpStream, wait: Duration) -> (String, bool) {
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&received).into(), true),
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Err(_) => return (String::from_utf8_lossy(&received).into(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stall_in_their_headers_are_disconnected_and_others_are_served() {
    let node = start_node(|config| config.server.header_read_timeout_ms = 500).await;
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let mut stream = TcpStream::connect(addr(&node)).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\nX-Half: ")
            .await
            .unwrap();
        stalled.push(stream);
    }
    // the node serves others meanwhile
    let reply = node.get(None, "/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);
    let mut closed = 0;
    for stream in &mut stalled {
        let (_, was_closed) = read_to_close(stream, Duration::from_secs(5)).await;
        closed += usize::from(was_closed);
    }
    assert_eq!(closed, 100, "every stalled connection is closed");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_get_503_with_retry_after() {
    let node = start_node(|config| config.server.connections_max = 4).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(addr(&node)).await.unwrap());
    }
    // give the node the moment to accept the four
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fifth = TcpStream::connect(addr(&node)).await.unwrap();
    fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed) = read_to_close(&mut fifth, Duration::from_secs(5)).await;
    assert!(closed);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("retry-after: 1\r\n"), "{answer}");
    assert!(answer.contains("connections_max"), "{answer}");
    // a place comes free when a connection closes
    held.pop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut next = TcpStream::connect(addr(&node)).await.unwrap();
        next.write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (answer, _) = read_to_close(&mut next, Duration::from_secs(5)).await;
        if answer.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no place came free: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    node.stop().await;
}

fn orders(prefix: &str, count: usize) -> Vec<serde_json::Value> {
    (0..count)
        .map(|n| common::order(&format!("{prefix}-{n}"), 100, common::T0_MS))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_past_its_event_rate_gets_429_with_retry_after_and_nothing_applied() {
    let node = start_node(|config| config.ingest.tenant_events_per_second_max = 100).await;
    assert_eq!(
        node.post("demo-key", &orders("a", 60)).await.status,
        StatusCode::OK
    );
    let refused = node.post("demo-key", &orders("b", 60)).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.body
    );
    assert_eq!(refused.retry_after.as_deref(), Some("1"));
    assert_eq!(refused.body["error"], "overloaded");
    assert!(refused.body["message"]
        .as_str()
        .unwrap()
        .contains("tenant_events_per_second_max (100)"));
    // another tenant is not held back by this one
    let acme: Vec<serde_json::Value> = (0..60)
        .map(|n| serde_json::json!({"id": format!("x-{n}"), "type": "order.completed", "ts": common::T0_MS, "amount": 5, "currency": "EUR"}))
        .collect();
    assert_eq!(node.post("acme-key", &acme).await.status, StatusCode::OK);
    // a second later the refused events fit, and were never applied before
    node.clock.advance_ms(1_000);
    let again = node.post("demo-key", &orders("b", 60)).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["accepted"], 60, "{}", again.body);
    let metrics = node.metrics("demo-key").await;
    assert_eq!(
        metrics["metrics"]["orders"]["windows"]["today"]["value"],
        120
    );
    // more than one second's worth never fits: 413
    node.clock.advance_ms(10_000);
    let too_big = node.post("demo-key", &orders("c", 101)).await;
    assert_eq!(
        too_big.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        too_big.body
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Nesting 100 000 deep (serde_json stops at 128 levels where it recurses;
/// the body splitter does not recurse): each such event gets its reason and
/// the node goes on.
async fn deeply_nested_json_is_quarantined_and_the_node_carries_on() {
    let node = start_node(|_| {}).await;
    let depth = 100_000;
    let nested = format!(
        r#"{{"id":"deep","type":"order.completed","amount":1,"currency":"USD","dims":{}1{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let reply = node
        .post_raw(Some("demo-key"), "application/x-ndjson", nested)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.body["errors"][0]["outcome"], "quarantined",
        "{}",
        reply.body
    );
    assert_eq!(reply.body["errors"][0]["reason"], "invalid_dims");
    // a whole event nested deeply inside a JSON array body
    let body = format!("[{}{{}}{}]", "[".repeat(depth), "]".repeat(depth));
    let reply = node
        .post_raw(Some("demo-key"), "application/json", body)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.body["errors"][0]["outcome"], "quarantined",
        "{}",
        reply.body
    );
    assert_eq!(reply.body["errors"][0]["reason"], "not_an_object");
    assert_eq!(node.get(None, "/healthz").await.status, StatusCode::OK);
    node.stop().await;
}

/// Every route of tenant data, asked by demo's key for acme's (and for a
/// tenant that does not exist): 403 alike, so that a key learns nothing of
/// other tenants, not even that they exist; resources of acme named from
/// demo's side are not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_keeps_a_tenant_key_to_its_tenant() {
    use reqwest::Method;
    let node = start_node(|_| {}).await;
    // acme has a quarantined event (qid 1), a rule and an experiment
    let bad =
        serde_json::json!({"id": "q", "type": "order.completed", "amount": 1, "currency": "JPY"});
    assert_eq!(node.post("acme-key", &[bad]).await.body["quarantined"], 1);
    let rule = serde_json::json!({"metric": "orders", "window": "15m", "condition": {"type": "above", "value": 5}});
    let put = node
        .send(
            node.client
                .put(format!("{}/v1/alerts/acme-rule", node.base))
                .bearer_auth("acme-key")
                .json(&rule),
        )
        .await;
    assert_eq!(put.status, StatusCode::CREATED, "{}", put.body);
    let experiment = serde_json::json!({"variants": ["A", "B"], "control": "A", "split": {"A": 0.5, "B": 0.5},
        "guardrails": [{"metric": "error_rate", "compare": "ratio", "threshold": 2.0, "action": "stop"}]});
    let put = node
        .send(
            node.client
                .put(format!("{}/v1/experiments/acme-exp", node.base))
                .bearer_auth("acme-key")
                .json(&experiment),
        )
        .await;
    assert_eq!(put.status, StatusCode::CREATED, "{}", put.body);

    let routes: [(Method, &str); 18] = [
        (Method::GET, "/v1/tenant"),
        (Method::GET, "/v1/metrics"),
        (Method::GET, "/v1/metrics/gmv"),
        (Method::GET, "/v1/metrics/gmv/series"),
        (Method::GET, "/v1/quarantine"),
        (Method::POST, "/v1/quarantine/1/retry"),
        (Method::DELETE, "/v1/quarantine/1"),
        (Method::GET, "/v1/alerts"),
        (Method::GET, "/v1/alerts/acme-rule"),
        (Method::PUT, "/v1/alerts/acme-rule"),
        (Method::DELETE, "/v1/alerts/acme-rule"),
        (Method::PUT, "/v1/budgets/campaign/c1"),
        (Method::GET, "/v1/experiments"),
        (Method::GET, "/v1/experiments/acme-exp"),
        (Method::POST, "/v1/experiments/acme-exp/resume"),
        (Method::DELETE, "/v1/experiments/acme-exp"),
        (Method::GET, "/v1/signals"),
        (Method::GET, "/v1/audit"),
    ];
    for (method, path) in &routes {
        for other in ["acme", "no-such-tenant"] {
            let request = node
                .client
                .request(
                    method.clone(),
                    format!("{}{path}?tenant={other}", node.base),
                )
                .bearer_auth("demo-key")
                .json(&serde_json::json!({}));
            let reply = node.send(request).await;
            assert_eq!(
                reply.status,
                StatusCode::FORBIDDEN,
                "{method} {path} for {other}: {}",
                reply.body
            );
            assert!(!reply.body.to_string().contains("acme-"), "{}", reply.body);
        }
    }
    // acme's things named from demo's own side: not found
    for (method, path) in [
        (Method::GET, "/v1/alerts/acme-rule"),
        (Method::DELETE, "/v1/alerts/acme-rule"),
        (Method::GET, "/v1/experiments/acme-exp"),
        (Method::DELETE, "/v1/experiments/acme-exp"),
        (Method::POST, "/v1/quarantine/1/retry"),
        (Method::DELETE, "/v1/quarantine/1"),
    ] {
        let reply = node.call(method.clone(), "demo-key", path).await;
        assert_eq!(
            reply.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            reply.body
        );
    }
    // keys are an admin's; the live socket and the scrape keep to the key too
    assert_eq!(
        node.get(Some("demo-key"), "/v1/tenants/acme/keys")
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let url = format!(
        "{}/v1/live?tenant=acme",
        node.base.replace("http://", "ws://")
    );
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer demo-key".parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("expected 403, got {other:?}"),
    }
    let scrape = node.get(Some("demo-key"), "/metrics").await;
    assert!(!scrape.body.as_str().unwrap_or_default().contains("acme"));
    // and acme's things are all still there
    assert_eq!(
        node.get(Some("acme-key"), "/v1/alerts/acme-rule")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        node.get(Some("acme-key"), "/v1/experiments/acme-exp")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        node.get(Some("acme-key"), "/v1/quarantine").await.body["events"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    node.stop().await;
}

/// A client that stops reading a large answer is disconnected after
/// `server.write_timeout_ms`, and its connection's place comes back: 300 000
/// CSV rows (about 12 MB, more than the kernel's buffers hold) to a client
/// with a 4 KiB receive buffer that reads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_after_the_write_deadline() {
    let node = start_node(|config| {
        config.server.write_timeout_ms = 500;
        config.server.connections_max = 2;
        config.windows.max_series_per_metric = 100_000;
        config.export.rows_max = 300_000;
    })
    .await;
    for batch in 0..100 {
        let events: Vec<serde_json::Value> = (0..1_000)
            .map(|n| {
                let id = batch * 1_000 + n;
                serde_json::json!({"id": format!("o{id}"), "type": "order.completed", "ts": common::T0_MS,
                    "amount": 1, "currency": "USD", "dims": {"device": format!("d{id:06}")}})
            })
            .collect();
        assert_eq!(node.post("demo-key", &events).await.body["accepted"], 1_000);
    }
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4_096).unwrap();
    let mut stalled = socket.connect(addr(&node).parse().unwrap()).await.unwrap();
    stalled
        .write_all(
            b"GET /v1/metrics/gmv?by=device&format=csv HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer demo-key\r\n\r\n",
        )
        .await
        .unwrap();
    // reads nothing for a while once the answer has begun (peeking does not
    // drain it; building 300 000 rows took over 3 s on a loaded machine, and
    // a client reading by then took the whole answer): the node gives up on it
    let mut first = [0u8; 1];
    let began = tokio::time::timeout(Duration::from_secs(60), stalled.peek(&mut first)).await;
    assert!(
        matches!(began, Ok(Ok(1))),
        "the answer never began: {began:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (received, closed) = read_to_close(&mut stalled, Duration::from_secs(10)).await;
    assert!(closed, "the connection stays open");
    assert!(
        received.len() < 12_000_000,
        "the whole answer arrived: {} bytes",
        received.len()
    );
    // its place came back: two more connections are served
    for _ in 0..2 {
        let mut next = TcpStream::connect(addr(&node)).await.unwrap();
        next.write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (answer, _) = read_to_close(&mut next, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    }
    node.stop().await;
}
