//! Tenants at run time (docs/api.md, "Tenants"): an admin adds a tenant with
//! its keys, changes its keys, and removes it, without a restart; each change
//! is stored before it takes effect and survives a graceful stop and a
//! crash-like one (log replay); a removed tenant's keys and live sessions end
//! at once and its id is not used again.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use common::{start_node, start_node_in, Reply, TestNode, T0_MS};

fn key_id(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

async fn put_tenant(node: &TestNode, key: &str, id: &str, body: &Value) -> Reply {
    let request = node
        .client
        .put(format!("{}/v1/tenants/{id}", node.base))
        .bearer_auth(key)
        .json(body);
    node.send(request).await
}

fn yen_order(id: &str, amount: i64) -> Value {
    json!({"id": id, "type": "order.completed", "ts": T0_MS, "amount": amount, "currency": "JPY"})
}

/// The `15m` window of `gmv` as the key reads it: its value and count.
async fn gmv(node: &TestNode, key: &str) -> Value {
    let window = &node.metrics(key).await["metrics"]["gmv"]["windows"]["15m"];
    json!({"value": window["value"], "count": window["count"]})
}

async fn live_session(
    node: &TestNode,
    key: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!("{}/v1/live", node.base.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

async fn close_code(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> u16 {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return u16::from(frame.unwrap().code),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_added_at_run_time_serves_at_once_and_after_a_restart() {
    let node = start_node(|_| {}).await;
    let created = put_tenant(
        &node,
        "admin-key",
        "shop-jp",
        &json!({"currency": "JPY", "timezone": "Asia/Tokyo", "api_keys": ["shop-jp-key-0000001"]}),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(
        created.body,
        json!({
            "id": "shop-jp",
            "currency": "JPY",
            "currency_minor_digits": 0,
            "timezone": "Asia/Tokyo",
            "source": "api",
            "keys": [{"key_id": key_id("shop-jp-key-0000001"), "source": "api"}],
        })
    );
    // its key writes and reads its own tenant at once
    let posted = node
        .post(
            "shop-jp-key-0000001",
            &[yen_order("j-1", 4200), yen_order("j-2", 800)],
        )
        .await;
    assert_eq!(posted.status, StatusCode::OK, "{}", posted.body);
    assert_eq!(posted.body["accepted"], 2);
    assert_eq!(
        gmv(&node, "shop-jp-key-0000001").await,
        json!({"value": 5000, "count": 2})
    );
    // and nothing of another tenant
    assert_eq!(
        node.get(Some("shop-jp-key-0000001"), "/v1/metrics?tenant=demo")
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(gmv(&node, "demo-key").await["count"], 0);
    // the list holds config's tenants and the new one, by id
    let listed = node.get(Some("admin-key"), "/v1/tenants").await;
    let ids: Vec<&str> = listed.body["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tenant| tenant["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme", "demo", "shop-jp"]);
    assert_eq!(listed.body["tenants"][1]["source"], "config");

    // a graceful stop and a start: the tenant, its key and its windows are back
    let stopped = node.stop_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    assert_eq!(
        gmv(&node, "shop-jp-key-0000001").await,
        json!({"value": 5000, "count": 2})
    );
    // events after the snapshot, then a crash-like stop: the log is replayed
    // for a tenant config does not list
    let posted = node
        .post("shop-jp-key-0000001", &[yen_order("j-3", 1000)])
        .await;
    assert_eq!(posted.body["accepted"], 1);
    let stopped = node.halt_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    assert_eq!(
        gmv(&node, "shop-jp-key-0000001").await,
        json!({"value": 6000, "count": 3})
    );
    // and an id sent before is a duplicate
    let again = node
        .post("shop-jp-key-0000001", &[yen_order("j-1", 4200)])
        .await;
    assert_eq!(again.body["duplicates"], 1, "{}", again.body);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_rotates_keys_and_refuses_what_cannot_change() {
    let node = start_node(|_| {}).await;
    let spec = json!({"currency": "USD", "api_keys": ["rotating-key-one-0001"]});
    assert_eq!(
        put_tenant(&node, "admin-key", "shop-us", &spec)
            .await
            .status,
        StatusCode::CREATED
    );
    let mut session = live_session(&node, "rotating-key-one-0001").await;
    // the same spec again changes nothing
    let same = put_tenant(&node, "admin-key", "shop-us", &spec).await;
    assert_eq!(same.status, StatusCode::OK, "{}", same.body);
    // a new key set: the new key works, the old one is refused and its live
    // session closed
    let rotated = put_tenant(
        &node,
        "admin-key",
        "shop-us",
        &json!({"currency": "USD", "api_keys": ["rotating-key-two-0002"]}),
    )
    .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.body);
    assert_eq!(
        rotated.body["keys"],
        json!([{"key_id": key_id("rotating-key-two-0002"), "source": "api"}])
    );
    assert_eq!(close_code(&mut session).await, 4401);
    assert_eq!(
        node.get(Some("rotating-key-one-0001"), "/v1/metrics")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        node.get(Some("rotating-key-two-0002"), "/v1/metrics")
            .await
            .status,
        StatusCode::OK
    );
    // currency and time zone are fixed once made
    let currency = put_tenant(&node, "admin-key", "shop-us", &json!({"currency": "EUR"})).await;
    assert_eq!(currency.status, StatusCode::CONFLICT);
    assert_eq!(currency.body["error"], "conflict");
    assert_eq!(
        currency.body["message"],
        "tenant shop-us's currency is USD; it cannot change (create a new tenant)"
    );
    let zone = put_tenant(
        &node,
        "admin-key",
        "shop-us",
        &json!({"currency": "USD", "timezone": "Europe/Paris"}),
    )
    .await;
    assert_eq!(zone.status, StatusCode::CONFLICT);
    // checks name their fields
    let bad = put_tenant(
        &node,
        "admin-key",
        "Bad Id",
        &json!({"currency": "XAU", "timezone": "Mars/Base", "api_keys": ["short"]}),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.body);
    let fields: Vec<&str> = bad.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| error["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["id", "currency", "timezone"]);
    let unknown_field = put_tenant(
        &node,
        "admin-key",
        "shop-x",
        &json!({"currency": "USD", "colour": "red"}),
    )
    .await;
    assert_eq!(unknown_field.status, StatusCode::BAD_REQUEST);
    // a key in use by another tenant is refused, by its index
    let taken = put_tenant(
        &node,
        "admin-key",
        "shop-x",
        &json!({"currency": "USD", "api_keys": ["rotating-key-two-0002"]}),
    )
    .await;
    assert_eq!(taken.status, StatusCode::BAD_REQUEST);
    assert_eq!(taken.body["errors"][0]["field"], "api_keys[0]");
    assert_eq!(
        node.get(Some("admin-key"), "/v1/tenants/shop-x")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // only admins manage tenants; no key is 401 before any body is read
    assert_eq!(
        put_tenant(&node, "demo-key", "shop-y", &json!({"currency": "USD"}))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // (a raw client that announces 20 MiB and sends none of it gets its 401)
    let mut stream = tokio::net::TcpStream::connect(node.base.trim_start_matches("http://"))
        .await
        .unwrap();
    stream
        .write_all(b"PUT /v1/tenants/shop-y HTTP/1.1\r\nHost: tally\r\nContent-Type: application/json\r\nContent-Length: 20971520\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head))
        .await
        .expect("an answer before any body byte")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 401");
    assert_eq!(
        node.call(Method::DELETE, "demo-key", "/v1/tenants/acme")
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_tenant_stops_at_once_stays_removed_and_its_id_is_retired() {
    let node = start_node(|_| {}).await;
    let posted = node
        .post("acme-key", &[json!({"id": "a-1", "type": "order.completed", "ts": T0_MS, "amount": 700, "currency": "EUR"})])
        .await;
    assert_eq!(posted.body["accepted"], 1);
    assert_eq!(
        node.post("demo-key", &[common::order("d-1", 300, T0_MS)])
            .await
            .body["accepted"],
        1
    );
    let mut session = live_session(&node, "acme-key").await;
    let acme_telemetry = |scrape: Reply| -> Vec<String> {
        assert_eq!(scrape.status, StatusCode::OK);
        let text = scrape.body.as_str().unwrap_or_default().to_string();
        text.lines()
            .filter(|line| line.contains("tenant=\"acme\""))
            .map(str::to_string)
            .collect()
    };
    // (its live session, at least, is in the node's telemetry)
    let before = acme_telemetry(node.get(Some("admin-key"), "/metrics").await);
    assert!(
        before
            .iter()
            .any(|line| line.starts_with("tally_live_sessions{")),
        "{before:?}"
    );
    // acme is a config tenant: removing it is allowed, and it stays removed
    let removed = node
        .call(Method::DELETE, "admin-key", "/v1/tenants/acme")
        .await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT, "{}", removed.body);
    assert_eq!(close_code(&mut session).await, 4401);
    // its series leave the scrape at once (they go stale in Prometheus)
    assert_eq!(
        acme_telemetry(node.get(Some("admin-key"), "/metrics").await),
        Vec::<String>::new()
    );
    assert_eq!(
        node.get(Some("acme-key"), "/v1/metrics").await.status,
        StatusCode::UNAUTHORIZED
    );
    let read = node.get(Some("admin-key"), "/v1/metrics?tenant=acme").await;
    assert_eq!(read.status, StatusCode::NOT_FOUND, "{}", read.body);
    assert_eq!(
        node.get(Some("admin-key"), "/v1/tenants/acme").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        node.call(Method::DELETE, "admin-key", "/v1/tenants/acme")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // an admin's event naming it is rejected as unknown
    let named = node
        .post("admin-key", &[json!({"id": "a-2", "tenant": "acme", "type": "order.completed", "ts": T0_MS, "amount": 1, "currency": "EUR"})])
        .await;
    assert_eq!(named.body["rejected"], 1, "{}", named.body);
    // its id is not used again
    let again = put_tenant(&node, "admin-key", "acme", &json!({"currency": "EUR"})).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(
        again.body["message"],
        "tenant acme was removed; a tenant id is not used again"
    );
    // the other tenant is untouched
    assert_eq!(
        gmv(&node, "demo-key").await,
        json!({"value": 300, "count": 1})
    );

    // after a crash-like stop (its log record is still there) it stays gone,
    // although config still lists it
    let stopped = node.halt_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    assert_eq!(
        node.get(Some("acme-key"), "/v1/metrics").await.status,
        StatusCode::UNAUTHORIZED
    );
    let listed = node.get(Some("admin-key"), "/v1/tenants").await;
    assert_eq!(listed.body["tenants"].as_array().unwrap().len(), 1);
    assert_eq!(listed.body["tenants"][0]["id"], "demo");
    assert_eq!(
        gmv(&node, "demo-key").await,
        json!({"value": 300, "count": 1})
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_past_the_cap_are_refused_with_409() {
    // config's two tenants, and room for one more
    let node = start_node(|config| config.admin.tenants_max = 3).await;
    assert_eq!(
        put_tenant(&node, "admin-key", "third", &json!({"currency": "USD"}))
            .await
            .status,
        StatusCode::CREATED
    );
    let fourth = put_tenant(&node, "admin-key", "fourth", &json!({"currency": "USD"})).await;
    assert_eq!(fourth.status, StatusCode::CONFLICT);
    assert_eq!(
        fourth.body["message"],
        "the node serves admin.tenants_max (3) tenants; remove one first"
    );
    // a tenant made without keys gets them through the keys route
    let added = node
        .send(
            node.client
                .post(format!("{}/v1/tenants/third/keys", node.base))
                .bearer_auth("admin-key"),
        )
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.body);
    let secret = added.body["key"].as_str().unwrap();
    assert_eq!(node.metrics(secret).await["tenant"], "third");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_config_no_longer_lists_is_retired_and_an_update_keeps_the_time_zone() {
    let node = start_node(|_| {}).await;
    assert_eq!(
        node.post("acme-key", &[json!({"id": "a-1", "type": "order.completed", "ts": T0_MS, "amount": 700, "currency": "EUR"})])
            .await
            .body["accepted"],
        1
    );
    // config drops acme: its id is not given to a new tenant
    let stopped = node.stop_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, |config| {
        config.tenants.retain(|tenant| tenant.id != "acme")
    })
    .await;
    let again = put_tenant(&node, "admin-key", "acme", &json!({"currency": "EUR"})).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.body);
    // an update without a time zone keeps the tenant's (Tokyo), not UTC
    let created = put_tenant(
        &node,
        "admin-key",
        "shop-jp",
        &json!({"currency": "JPY", "timezone": "Asia/Tokyo"}),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let updated = put_tenant(
        &node,
        "admin-key",
        "shop-jp",
        &json!({"currency": "JPY", "api_keys": ["shop-jp-key-0000002"]}),
    )
    .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    assert_eq!(updated.body["timezone"], "Asia/Tokyo");
    // an admin's live session on a tenant closes when the tenant goes
    let url = format!(
        "{}/v1/live?tenant=shop-jp",
        node.base.replace("http://", "ws://")
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer admin-key".parse().unwrap());
    let (mut session, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let removed = node
        .call(Method::DELETE, "admin-key", "/v1/tenants/shop-jp")
        .await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT);
    assert_eq!(close_code(&mut session).await, 4401);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_and_removals_racing_ingest_leave_one_story_on_disk_and_in_memory() {
    let node = start_node(|_| {}).await;
    for n in 0..4 {
        let created = put_tenant(
            &node,
            "admin-key",
            &format!("race-{n}"),
            &json!({"currency": "USD", "api_keys": [format!("race-key-{n}-0000000000")]}),
        )
        .await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    }
    // each tenant's producer sends batches while the admin removes two of the
    // tenants and adds two more
    let mut producers = Vec::new();
    for n in 0..4 {
        let client = node.client.clone();
        let base = node.base.clone();
        producers.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for batch in 0..40 {
                let body: Vec<String> = (0..10)
                    .map(|i| {
                        json!({"id": format!("r{n}-{batch}-{i}"), "type": "order.completed", "ts": T0_MS, "amount": 1, "currency": "USD"})
                            .to_string()
                    })
                    .collect();
                let response = client
                    .post(format!("{base}/v1/events"))
                    .bearer_auth(format!("race-key-{n}-0000000000"))
                    .header("content-type", "application/x-ndjson")
                    .body(body.join("\n"))
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status().as_u16());
            }
            statuses
        }));
    }
    let usd = json!({"currency": "USD"});
    let (removed_0, removed_1, added_4, added_5) = tokio::join!(
        node.call(Method::DELETE, "admin-key", "/v1/tenants/race-0"),
        node.call(Method::DELETE, "admin-key", "/v1/tenants/race-1"),
        put_tenant(&node, "admin-key", "race-4", &usd),
        put_tenant(&node, "admin-key", "race-5", &usd),
    );
    assert_eq!(removed_0.status, StatusCode::NO_CONTENT);
    assert_eq!(removed_1.status, StatusCode::NO_CONTENT);
    assert_eq!(added_4.status, StatusCode::CREATED);
    assert_eq!(added_5.status, StatusCode::CREATED);
    let mut accepted_of_kept = 0;
    for (n, producer) in producers.into_iter().enumerate() {
        let statuses = producer.await.unwrap();
        // a removed tenant's producer is refused from some point on, never
        // half-served; the others are served throughout
        let first_refusal = statuses.iter().position(|status| *status != 200);
        match n {
            0 | 1 => {
                if let Some(at) = first_refusal {
                    assert!(
                        statuses[at..].iter().all(|status| *status == 401),
                        "{statuses:?}"
                    );
                }
            }
            _ => {
                assert_eq!(first_refusal, None, "{statuses:?}");
                accepted_of_kept += statuses.len() * 10;
            }
        }
    }
    assert_eq!(accepted_of_kept, 800);
    let ids = |body: &Value| -> Vec<String> {
        body["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|tenant| tenant["id"].as_str().unwrap().to_string())
            .collect()
    };
    let listed = node.get(Some("admin-key"), "/v1/tenants").await;
    let expected = ["acme", "demo", "race-2", "race-3", "race-4", "race-5"];
    assert_eq!(ids(&listed.body), expected);
    // and the same after a crash-like stop, with the kept tenants' counts
    let stopped = node.halt_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    let listed = node.get(Some("admin-key"), "/v1/tenants").await;
    assert_eq!(ids(&listed.body), expected);
    for n in 2..4 {
        assert_eq!(
            gmv(&node, &format!("race-key-{n}-0000000000")).await,
            json!({"value": 400, "count": 400})
        );
    }
    node.stop().await;
}
