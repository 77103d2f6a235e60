//! Black-box tests of the HTTP API against a real node on 127.0.0.1:0: every event
//! outcome and status code of API.md §3, tenancy (§2), the shapes of §4 and the
//! quarantine of §6, with exact values at manual-clock instants.

mod common;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use common::{order, start_node, T0_MS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_counted_and_listed() {
    let node = start_node(|_| {}).await;
    let body = [
        order("o-1", 1250, T0_MS).to_string(),
        order("o-2", 800, T0_MS - 10_000).to_string(),
        order("o-1", 1250, T0_MS).to_string(),
        "this line is not json".to_string(),
        json!({"id": "o-3", "type": "order.completed", "amount": 12.5, "currency": "USD"}).to_string(),
        json!({"id": "o-4", "type": "order.completed", "amount": 10_000_000_000_000_000i64, "currency": "USD"}).to_string(),
        order("o-5", 100, T0_MS + 3_600_000).to_string(),
        order("o-6", 100, T0_MS - 25 * 3_600_000).to_string(),
    ]
    .join("\n");
    let reply = node
        .post_raw(Some("demo-key"), "application/x-ndjson", body)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.body,
        json!({
            "accepted": 2, "duplicates": 1, "late": 1, "quarantined": 4, "rejected": 0,
            "errors": [
                {"index": 3, "id": null, "outcome": "quarantined", "reason": "malformed_json", "qid": 1},
                {"index": 4, "id": "o-3", "outcome": "quarantined", "reason": "amount_not_integer", "qid": 2},
                {"index": 5, "id": "o-4", "outcome": "quarantined", "reason": "amount_out_of_range", "qid": 3},
                {"index": 6, "id": "o-5", "outcome": "quarantined", "reason": "future_timestamp", "qid": 4},
            ]
        })
    );

    // the same ids again, in a later batch: duplicates, nothing counted twice
    let again = node
        .post(
            "demo-key",
            &[order("o-2", 800, T0_MS - 10_000), order("o-1", 1250, T0_MS)],
        )
        .await;
    assert_eq!(again.body["accepted"], 0);
    assert_eq!(again.body["duplicates"], 2);

    let metrics = node.metrics("demo-key").await;
    assert_eq!(metrics["tenant"], "demo");
    assert_eq!(metrics["at"], T0_MS);
    assert_eq!(
        metrics["metrics"]["gmv"],
        json!({"kind": "sum", "windows": {
            "30s": {"value": 2050, "count": 2, "prev": 0, "prev_count": 0},
            "15m": {"value": 2050, "count": 2, "prev": 0, "prev_count": 0},
            "today": {"value": 2050, "count": 2}}})
    );
    assert_eq!(
        metrics["metrics"]["orders"]["windows"]["30s"],
        json!({"value": 2, "prev": 0})
    );

    let quarantine = node.get(Some("demo-key"), "/v1/quarantine").await;
    assert_eq!(quarantine.status, StatusCode::OK);
    let events = quarantine.body["events"].as_array().unwrap();
    let reasons: Vec<&str> = events
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "malformed_json",
            "amount_not_integer",
            "amount_out_of_range",
            "future_timestamp"
        ]
    );
    assert_eq!(events[0]["raw"], "this line is not json");
    assert_eq!(events[0]["received_at"], T0_MS);
    assert_eq!(events[1]["id"], "o-3");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_slide_with_the_clock_and_every_kind_has_its_shape() {
    let node = start_node(|_| {}).await;
    let events = [
        order("o-1", 1000, T0_MS),
        order("o-2", 3000, T0_MS - 5_000),
        json!({"id": "p-1", "type": "payment.failed"}),
        json!({"id": "p-2", "type": "payment.captured"}),
        json!({"id": "p-3", "type": "payment.captured"}),
        json!({"id": "p-4", "type": "payment.captured"}),
        json!({"id": "c-1", "type": "checkout.completed", "value": 100}),
        json!({"id": "c-2", "type": "checkout.completed", "value": 200}),
        json!({"id": "c-3", "type": "checkout.completed", "value": 300.4}),
        json!({"id": "u-1", "type": "units.earned", "value": 40}),
        json!({"id": "a-1", "type": "ad.impression", "amount": 7, "currency": "USD"}),
        json!({"id": "a-2", "type": "ad.impression", "amount": 8, "currency": "USD"}),
    ];
    let reply = node.post("demo-key", &events).await;
    assert_eq!(reply.body["accepted"], 12, "{}", reply.body);

    let metrics = node.metrics("demo-key").await;
    let m = &metrics["metrics"];
    assert_eq!(
        m["aov"],
        json!({"kind": "mean", "windows": {
        "30s": {"value": 2000.0, "prev": null}, "15m": {"value": 2000.0, "prev": null},
        "today": {"value": 2000.0}}})
    );
    assert_eq!(
        m["payment_failure_rate"]["windows"]["30s"],
        json!({
        "value": 0.25, "numerator": 1, "denominator": 4,
        "prev": null, "prev_numerator": 0, "prev_denominator": 0})
    );
    assert_eq!(
        m["payment_failure_rate"]["windows"]["today"],
        json!({"value": 0.25, "numerator": 1, "denominator": 4})
    );
    assert_eq!(
        m["checkout_latency_ms"]["windows"]["15m"],
        json!({
        "count": 3, "p50": 200, "p90": 300, "p95": 300, "p99": 300, "max": 300})
    );
    assert_eq!(m["units_earned"]["windows"]["30s"]["value"], 40);
    assert_eq!(m["cpm"]["windows"]["30s"]["value"], 7500.0);
    assert_eq!(
        m["order_error_rate"]["windows"]["30s"]["value"],
        Value::Null
    );

    // 25 s later o-2 (at T0-5s) has left the 30 s window; 30 s later so has o-1
    node.clock.set_ms(T0_MS + 25_000);
    let gmv = &node.metrics("demo-key").await["metrics"]["gmv"]["windows"];
    assert_eq!(
        gmv["30s"],
        json!({"value": 1000, "count": 1, "prev": 3000, "prev_count": 1})
    );
    node.clock.set_ms(T0_MS + 30_000);
    let m = node.metrics("demo-key").await["metrics"].clone();
    assert_eq!(
        m["gmv"]["windows"]["30s"],
        json!({"value": 0, "count": 0, "prev": 4000, "prev_count": 2})
    );
    assert_eq!(
        m["gmv"]["windows"]["15m"],
        json!({"value": 4000, "count": 2, "prev": 0, "prev_count": 0})
    );
    assert_eq!(
        m["aov"]["windows"]["30s"],
        json!({"value": null, "prev": 2000.0})
    );
    assert_eq!(m["checkout_latency_ms"]["windows"]["30s"]["count"], 0);
    assert_eq!(
        m["checkout_latency_ms"]["windows"]["30s"]["p95"],
        Value::Null
    );

    node.clock.set_ms(T0_MS + 900_000);
    let gmv = node.metrics("demo-key").await["metrics"]["gmv"]["windows"].clone();
    assert_eq!(
        gmv["15m"],
        json!({"value": 0, "count": 0, "prev": 4000, "prev_count": 2})
    );
    assert_eq!(gmv["today"], json!({"value": 4000, "count": 2}));

    // past UTC midnight the demo tenant's today starts again
    node.clock.set_ms(T0_MS + 14 * 3_600_000);
    let gmv = node.metrics("demo-key").await["metrics"]["gmv"]["windows"].clone();
    assert_eq!(gmv["today"], json!({"value": 0, "count": 0}));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_key_naming_another_tenant_is_403_and_applies_nothing() {
    let node = start_node(|_| {}).await;
    let mut foreign = order("x-1", 500, T0_MS);
    foreign["tenant"] = json!("acme");
    let mut own = order("d-2", 70, T0_MS);
    own["tenant"] = json!("demo");
    let reply = node
        .post(
            "demo-key",
            &[order("d-1", 900, T0_MS), foreign, own.clone()],
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.body["error"], "tenant_mismatch");
    assert_eq!(
        reply.body["errors"],
        json!([{"index": 1, "id": "x-1", "outcome": "rejected", "reason": "tenant_mismatch"}])
    );

    assert_eq!(
        node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["today"]["value"],
        0
    );
    let acme = node.get(Some("admin-key"), "/v1/metrics?tenant=acme").await;
    assert_eq!(acme.body["metrics"]["gmv"]["windows"]["today"]["value"], 0);
    // nothing was remembered either: the same events are accepted, not duplicates
    let retry = node
        .post("demo-key", &[order("d-1", 900, T0_MS), own])
        .await;
    assert_eq!(
        (
            retry.body["accepted"].clone(),
            retry.body["duplicates"].clone()
        ),
        (json!(2), json!(0))
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_stay_within_the_key_tenant() {
    let node = start_node(|_| {}).await;
    let acme_order =
        json!({"id": "a-1", "type": "order.completed", "amount": 4200, "currency": "EUR"});
    assert_eq!(
        node.post("acme-key", &[acme_order]).await.body["accepted"],
        1
    );
    for path in [
        "/v1/metrics?tenant=acme",
        "/v1/metrics/gmv?tenant=acme",
        "/v1/metrics/gmv/series?tenant=acme",
        "/v1/quarantine?tenant=acme",
    ] {
        let reply = node.get(Some("demo-key"), path).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(reply.body["error"], "forbidden");
    }
    let retry = node
        .call(
            Method::POST,
            "demo-key",
            "/v1/quarantine/1/retry?tenant=acme",
        )
        .await;
    assert_eq!(retry.status, StatusCode::FORBIDDEN);
    let delete = node
        .call(Method::DELETE, "demo-key", "/v1/quarantine/1?tenant=acme")
        .await;
    assert_eq!(delete.status, StatusCode::FORBIDDEN);

    // the demo key sees only demo's money; acme's key and admin see acme's
    assert_eq!(
        node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["today"]["value"],
        0
    );
    assert_eq!(
        node.metrics("acme-key").await["metrics"]["gmv"]["windows"]["today"]["value"],
        4200
    );
    let admin = node.get(Some("admin-key"), "/v1/metrics?tenant=acme").await;
    assert_eq!(admin.body["tenant"], "acme");
    assert_eq!(
        admin.body["metrics"]["gmv"]["windows"]["today"]["value"],
        4200
    );
    assert_eq!(
        node.get(Some("admin-key"), "/v1/metrics").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        node.get(Some("admin-key"), "/v1/metrics?tenant=nope")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unknown_keys_are_401() {
    let node = start_node(|_| {}).await;
    let body = order("o-1", 1, T0_MS).to_string();
    assert_eq!(
        node.post_raw(None, "application/json", body.clone())
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let unknown = node
        .post_raw(Some("demo-key-2"), "application/json", body.clone())
        .await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert_eq!(unknown.body["error"], "unauthorized");
    assert_eq!(
        node.get(None, "/v1/metrics").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        node.get(Some("nope"), "/v1/quarantine").await.status,
        StatusCode::UNAUTHORIZED
    );
    // tokens are never read from the query string
    assert_eq!(
        node.get(None, "/v1/metrics?token=demo-key").await.status,
        StatusCode::UNAUTHORIZED
    );
    let basic = node
        .send(
            node.client
                .get(format!("{}/v1/metrics", node.base))
                .header("authorization", "Basic ZGVtby1rZXk6"),
        )
        .await;
    assert_eq!(basic.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        node.metrics("demo-key").await["metrics"]["orders"]["windows"]["today"]["value"],
        0
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_ingest_routes_each_event_to_the_tenant_it_names() {
    let node = start_node(|_| {}).await;
    let body = [
        json!({"id": "a-1", "tenant": "acme", "type": "order.completed", "amount": 300, "currency": "EUR"}).to_string(),
        json!({"id": "d-1", "tenant": "demo", "type": "order.completed", "amount": 200, "currency": "USD"}).to_string(),
        json!({"id": "n-1", "type": "order.completed", "amount": 1, "currency": "USD"}).to_string(),
        json!({"id": "u-1", "tenant": "nope", "type": "order.completed"}).to_string(),
        "{broken".to_string(),
        json!({"id": "a-2", "tenant": "acme", "type": "order.completed", "amount": 5, "currency": "USD"}).to_string(),
    ]
    .join("\n");
    let reply = node
        .post_raw(Some("admin-key"), "application/x-ndjson", body)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.body,
        json!({"accepted": 2, "duplicates": 0, "late": 0, "quarantined": 1, "rejected": 3, "errors": [
            {"index": 2, "id": "n-1", "outcome": "rejected", "reason": "missing_tenant"},
            {"index": 3, "id": "u-1", "outcome": "rejected", "reason": "unknown_tenant"},
            {"index": 4, "id": null, "outcome": "rejected", "reason": "malformed_json"},
            {"index": 5, "id": "a-2", "outcome": "quarantined", "reason": "currency_mismatch", "qid": 1},
        ]})
    );
    assert_eq!(
        node.metrics("acme-key").await["metrics"]["gmv"]["windows"]["today"]["value"],
        300
    );
    assert_eq!(
        node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["today"]["value"],
        200
    );
    let quarantine = node.get(Some("acme-key"), "/v1/quarantine").await;
    assert_eq!(quarantine.body["events"][0]["reason"], "currency_mismatch");
    assert_eq!(
        node.get(Some("demo-key"), "/v1/quarantine").await.body["events"],
        json!([])
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_their_status_and_apply_nothing() {
    let node = start_node(|config| {
        config.server.max_body_bytes = 1024;
        config.ingest.max_events_per_request = 3;
    })
    .await;
    let bad_json = node
        .post_raw(Some("demo-key"), "application/json", "[{\"id\":")
        .await;
    assert_eq!(bad_json.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_json.body["error"], "bad_request");
    assert_eq!(
        node.post_raw(Some("demo-key"), "application/json", "42")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let text = node
        .post_raw(
            Some("demo-key"),
            "text/plain",
            order("o-1", 1, T0_MS).to_string(),
        )
        .await;
    assert_eq!(text.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let none = node
        .send(
            node.client
                .post(format!("{}/v1/events", node.base))
                .bearer_auth("demo-key")
                .body("{}"),
        )
        .await;
    assert_eq!(none.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let big = format!(
        "[{}]",
        vec![order("o-1", 1, T0_MS).to_string(); 20].join(",")
    );
    assert!(big.len() > 1024);
    let too_large = node
        .post_raw(Some("demo-key"), "application/json", big)
        .await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(too_large.body["error"], "payload_too_large");
    let four: Vec<Value> = (0..4).map(|i| order(&format!("o-{i}"), 1, T0_MS)).collect();
    let too_many = node.post("demo-key", &four).await;
    assert_eq!(too_many.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        node.metrics("demo-key").await["metrics"]["orders"]["windows"]["today"]["value"],
        0
    );

    // a JSON array and a single object are both bodies of events
    let array = json!([order("o-1", 5, T0_MS), 7, order("o-2", 6, T0_MS)]).to_string();
    let reply = node
        .post_raw(Some("demo-key"), "application/json; charset=utf-8", array)
        .await;
    assert_eq!(reply.body["accepted"], 2);
    assert_eq!(reply.body["errors"][0]["reason"], "not_an_object");
    let single = node
        .post_raw(
            Some("demo-key"),
            "application/json",
            order("o-3", 7, T0_MS).to_string(),
        )
        .await;
    assert_eq!(single.body["accepted"], 1);
    assert_eq!(
        node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["today"]["value"],
        18
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_load_is_429_with_retry_after_and_applies_nothing() {
    let node = start_node(|config| config.ingest.tenant_batches_inflight_max = 1).await;
    let running = node.running.as_ref().unwrap();
    // hold the tenant's only in-flight batch slot, as a slow batch would
    let permit = running
        .node
        .tenant("demo")
        .unwrap()
        .batch_permits
        .clone()
        .acquire_owned()
        .await
        .unwrap();
    let reply = node.post("demo-key", &[order("o-1", 100, T0_MS)]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.retry_after.as_deref(), Some("1"));
    assert_eq!(reply.body["error"], "overloaded");
    // another tenant is not held up
    let acme = json!({"id": "a-1", "type": "order.completed", "amount": 1, "currency": "EUR"});
    assert_eq!(node.post("acme-key", &[acme]).await.body["accepted"], 1);
    drop(permit);
    let retry = node.post("demo-key", &[order("o-1", 100, T0_MS)]).await;
    assert_eq!(
        retry.body["accepted"], 1,
        "the shed request left nothing behind"
    );
    assert_eq!(
        node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["today"]["value"],
        100
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_past_their_limit_are_503() {
    let node = start_node(|config| config.actors.tenant_queries_inflight_max = 1).await;
    let running = node.running.as_ref().unwrap();
    let permit = running
        .node
        .tenant("demo")
        .unwrap()
        .query_permits
        .clone()
        .acquire_owned()
        .await
        .unwrap();
    let reply = node.get(Some("demo-key"), "/v1/metrics").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.retry_after.as_deref(), Some("1"));
    drop(permit);
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics").await.status,
        StatusCode::OK
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_dedup_table_is_503_and_forgets_nothing() {
    let node = start_node(|config| {
        config.ingest.dedup_table_bytes_max = 3 * 128;
    })
    .await;
    // the first batch fills the table past half, which asks for a snapshot
    // at once; one that finished before the second batch would empty the
    // table, so none may start until the 503 is seen
    let held = node.running.as_ref().unwrap().node.hold_snapshots().await;
    assert_eq!(
        node.post(
            "demo-key",
            &[order("o-1", 1, T0_MS), order("o-2", 2, T0_MS)]
        )
        .await
        .body["accepted"],
        2
    );
    let full = node
        .post(
            "demo-key",
            &[order("o-3", 4, T0_MS), order("o-4", 8, T0_MS)],
        )
        .await;
    assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(full.retry_after.as_deref(), Some("1"));
    assert_eq!(
        node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["today"]["value"],
        3
    );
    drop(held);
    // duplicates are still recognised: the table was not evicted to make room
    assert_eq!(
        node.post("demo-key", &[order("o-1", 1, T0_MS)]).await.body["duplicates"],
        1
    );
    // a resent batch of known ids needs no room: duplicates, not 503
    let resent = node
        .post(
            "demo-key",
            &[order("o-1", 1, T0_MS), order("o-2", 2, T0_MS)],
        )
        .await;
    assert_eq!(resent.body["duplicates"], 2, "{}", resent.body);
    // once the horizon has passed the ids expire and new events fit again
    let later_ms = T0_MS + 86_401_000;
    node.clock.set_ms(later_ms);
    let later = node
        .post(
            "demo-key",
            &[order("o-3", 4, later_ms), order("o-4", 8, later_ms)],
        )
        .await;
    assert_eq!(later.body["accepted"], 2, "{}", later.body);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_events_are_acknowledged_and_not_counted() {
    let node = start_node(|_| {}).await;
    let reply = node
        .post(
            "demo-key",
            &[
                order("old", 5, T0_MS - 86_400_000),
                // today (UTC), 5 hours ago: counts in today only
                order("today", 7, T0_MS - 5 * 3_600_000),
                // 9 minutes ago: in the 15 m window
                order("recent", 11, T0_MS - 540_000),
            ],
        )
        .await;
    assert_eq!(
        (reply.body["accepted"].clone(), reply.body["late"].clone()),
        (json!(2), json!(1))
    );
    let gmv = node.metrics("demo-key").await["metrics"]["gmv"]["windows"].clone();
    assert_eq!(gmv["today"]["value"], 18);
    assert_eq!(gmv["15m"]["value"], 11);
    assert_eq!(gmv["30s"]["value"], 0);
    // acme is in Berlin (UTC+1): 10:30 UTC yesterday-local is before its midnight
    let berlin_yesterday = json!({"id": "y", "type": "order.completed", "ts": "2025-11-21T22:59:59Z", "amount": 1, "currency": "EUR"});
    let berlin_today = json!({"id": "t", "type": "order.completed", "ts": "2025-11-21T23:00:00Z", "amount": 2, "currency": "EUR"});
    let reply = node
        .post("acme-key", &[berlin_yesterday, berlin_today])
        .await;
    assert_eq!(
        (reply.body["accepted"].clone(), reply.body["late"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(
        node.metrics("acme-key").await["metrics"]["gmv"]["windows"]["today"]["value"],
        2
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakdowns_and_series_have_exact_values() {
    let node = start_node(|_| {}).await;
    let with_device = |id: &str, amount: i64, ts: i64, device: &str| {
        let mut event = order(id, amount, ts);
        event["dims"] = json!({"device": device, "ignored": "x"});
        event
    };
    node.post(
        "demo-key",
        &[
            with_device("1", 100, T0_MS - 25_000, "ios"),
            with_device("2", 200, T0_MS - 12_000, "android"),
            with_device("3", 400, T0_MS - 11_000, "ios"),
            order("4", 800, T0_MS),
        ],
    )
    .await;
    let reply = node
        .get(Some("demo-key"), "/v1/metrics/gmv?by=device&window=30s")
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["by"], "device");
    assert_eq!(
        reply.body["values"],
        json!({
            "__none__": {"windows": {"30s": {"value": 800, "count": 1, "prev": 0, "prev_count": 0}}},
            "android": {"windows": {"30s": {"value": 200, "count": 1, "prev": 0, "prev_count": 0}}},
            "ios": {"windows": {"30s": {"value": 500, "count": 2, "prev": 0, "prev_count": 0}}},
        })
    );
    let aov = node
        .get(Some("demo-key"), "/v1/metrics/aov?by=device&window=today")
        .await;
    assert_eq!(
        aov.body["values"]["ios"],
        json!({"windows": {"today": {"value": 250.0}}})
    );
    let one = node
        .get(Some("demo-key"), "/v1/metrics/orders?window=15m")
        .await;
    assert_eq!(one.body["windows"], json!({"15m": {"value": 4, "prev": 0}}));
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics/gmv?by=colour")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics/gmv?window=1h")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics/nope").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics?colour=red")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );

    // T0 is second 1763805600; the 30 s window is seconds 1763805571..=1763805600
    let series = node
        .get(
            Some("demo-key"),
            "/v1/metrics/gmv/series?window=30s&step=10s",
        )
        .await;
    assert_eq!(series.body["step_s"], 10);
    // order 1 at second …575, orders 2 and 3 at …588 and …589, order 4 at …600
    assert_eq!(
        series.body["points"],
        json!([
            [1_763_805_571_000i64, 100],
            [1_763_805_580_000i64, 600],
            [1_763_805_590_000i64, 0],
            [1_763_805_600_000i64, 800],
        ])
    );
    let checkout =
        json!({"id": "c-1", "type": "checkout.completed", "ts": T0_MS - 3_000, "value": 250});
    assert_eq!(node.post("demo-key", &[checkout]).await.body["accepted"], 1);
    let latency = node
        .get(
            Some("demo-key"),
            "/v1/metrics/checkout_latency_ms/series?window=30s&step=30s&stat=max",
        )
        .await;
    // 30 s steps align to multiples of 30: seconds …571..=…599, then …600
    assert_eq!(
        latency.body["points"],
        json!([[1_763_805_571_000i64, 250], [1_763_805_600_000i64, null]])
    );
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics/gmv/series?window=today")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics/gmv/series?step=0s")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics/gmv/series?stat=p95")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_events_can_be_retried_and_dropped() {
    let node = start_node(|_| {}).await;
    let reply = node
        .post_raw(
            Some("demo-key"),
            "application/x-ndjson",
            [
                order("f-1", 900, T0_MS + 600_000).to_string(),
                "{not json".to_string(),
                json!({"id": "m-1", "type": "order.completed", "amount": 5}).to_string(),
            ]
            .join("\n"),
        )
        .await;
    assert_eq!(reply.body["quarantined"], 3);
    // still in the future: it stays quarantined
    let early = node
        .call(Method::POST, "demo-key", "/v1/quarantine/1/retry")
        .await;
    assert_eq!(
        early.body,
        json!({"qid": 1, "outcome": "quarantined", "reason": "future_timestamp"})
    );
    // ten minutes later the clock has reached it: accepted and counted at its time
    node.clock.set_ms(T0_MS + 600_000);
    let retry = node
        .call(Method::POST, "demo-key", "/v1/quarantine/1/retry")
        .await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.body, json!({"qid": 1, "outcome": "accepted"}));
    assert_eq!(
        node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["30s"]["value"],
        900
    );
    assert_eq!(
        node.call(Method::POST, "demo-key", "/v1/quarantine/1/retry")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // a line that is not JSON stays what it is
    let malformed = node
        .call(Method::POST, "demo-key", "/v1/quarantine/2/retry")
        .await;
    assert_eq!(malformed.body["reason"], "malformed_json");
    assert_eq!(
        node.call(Method::DELETE, "demo-key", "/v1/quarantine/2")
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        node.call(Method::DELETE, "demo-key", "/v1/quarantine/2")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        node.call(Method::DELETE, "demo-key", "/v1/quarantine/x")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let listed = node.get(Some("demo-key"), "/v1/quarantine?limit=10").await;
    let qids: Vec<i64> = listed.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["qid"].as_i64().unwrap())
        .collect();
    assert_eq!(qids, vec![3]);
    assert_eq!(listed.body["events"][0]["reason"], "missing_currency");
    // what to do about it, beside it
    assert_eq!(
        listed.body["events"][0]["remedy"],
        "an amount needs its ISO 4217 currency: add it and resend"
    );
    assert_eq!(
        node.get(Some("demo-key"), "/v1/quarantine?limit=0")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        node.get(Some("demo-key"), "/v1/quarantine?limit=1001")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_quarantine_evicts_the_oldest() {
    let node = start_node(|config| config.quarantine.events_per_tenant_max = 2).await;
    let lines = ["bad-1", "bad-2", "bad-3"].join("\n");
    assert_eq!(
        node.post_raw(Some("demo-key"), "application/x-ndjson", lines)
            .await
            .body["quarantined"],
        3
    );
    let listed = node.get(Some("demo-key"), "/v1/quarantine").await;
    let raws: Vec<&str> = listed.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["raw"].as_str().unwrap())
        .collect();
    assert_eq!(raws, vec!["bad-2", "bad-3"]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let node = start_node(|_| {}).await;
    assert_eq!(
        node.get(None, "/healthz").await.body,
        json!({"status": "ok"})
    );
    assert_eq!(
        node.get(None, "/readyz").await.body,
        json!({"status": "ready"})
    );
    let missing = node.get(None, "/v2/nothing").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.body["error"], "not_found");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_query_names_a_tenant_only_within_the_key() {
    let node = start_node(|_| {}).await;
    let post = |query: &'static str, key: &'static str, events: Value| {
        let request = node
            .client
            .post(format!("{}/v1/events{query}", node.base))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(events.to_string());
        node.send(request)
    };
    let foreign = post("?tenant=acme", "demo-key", json!([order("o-1", 5, T0_MS)])).await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN);
    assert_eq!(
        post("?colour=red", "demo-key", json!([order("o-1", 5, T0_MS)]))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post("?tenant=nope", "admin-key", json!([order("o-1", 5, T0_MS)]))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["today"]["value"],
        0
    );
    assert_eq!(
        post("?tenant=demo", "demo-key", json!([order("o-1", 5, T0_MS)]))
            .await
            .body["accepted"],
        1
    );
    // an admin's ?tenant= places events that name none
    let eur = json!({"id": "a-1", "type": "order.completed", "amount": 9, "currency": "EUR"});
    assert_eq!(
        post("?tenant=acme", "admin-key", json!([eur])).await.body["accepted"],
        1
    );
    assert_eq!(
        node.metrics("acme-key").await["metrics"]["gmv"]["windows"]["today"]["value"],
        9
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let node = start_node(|_| {}).await;
    let request = node
        .client
        .get(format!("{}/v1/metrics", node.base))
        .header("authorization", "bearer demo-key");
    assert_eq!(node.send(request).await.status, StatusCode::OK);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_event_without_ts_keeps_its_receipt_time() {
    let narrow = |config: &mut tally::config::Config| config.windows.histogram_value_max = 1000;
    let node = start_node(narrow).await;
    let slow = json!({"id": "c-1", "type": "checkout.completed", "value": 5000});
    let other = json!({"id": "c-2", "type": "checkout.completed", "value": 6000});
    let reply = node.post("demo-key", &[slow, other]).await;
    assert_eq!(reply.body["errors"][0]["reason"], "value_out_of_range");
    let stopped = node.stop_keeping_data().await;

    // a wider histogram after a restart: the quarantined events now pass
    let wide = |config: &mut tally::config::Config| config.windows.histogram_value_max = 10_000;
    let node = common::start_node_in(stopped.data, stopped.clock, wide).await;
    node.clock.set_ms(T0_MS + 10_000);
    let retry = node
        .call(Method::POST, "demo-key", "/v1/quarantine/1/retry")
        .await;
    assert_eq!(retry.body, json!({"qid": 1, "outcome": "accepted"}));
    let latency =
        node.metrics("demo-key").await["metrics"]["checkout_latency_ms"]["windows"].clone();
    assert_eq!(latency["30s"]["count"], 1);
    // counted at T0, when it arrived: 30 s after that it has left the 30 s window
    node.clock.set_ms(T0_MS + 30_000);
    let latency =
        node.metrics("demo-key").await["metrics"]["checkout_latency_ms"]["windows"].clone();
    assert_eq!(
        (
            latency["30s"]["count"].clone(),
            latency["15m"]["count"].clone()
        ),
        (json!(0), json!(1))
    );
    // a day after its arrival it is late, whatever the time of the retry
    node.clock.set_ms(T0_MS + 86_400_000);
    let late = node
        .call(Method::POST, "demo-key", "/v1/quarantine/2/retry")
        .await;
    assert_eq!(late.body, json!({"qid": 2, "outcome": "late"}));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_quarantined_event_is_cut_flagged_and_keeps_its_reason() {
    let node = start_node(|_| {}).await;
    let long =
        json!({"id": "o-1", "type": "order.completed", "amount": 5, "note": "n".repeat(5000)});
    let reply = node.post("demo-key", &[long]).await;
    assert_eq!(reply.body["errors"][0]["reason"], "missing_currency");
    let listed = node.get(Some("demo-key"), "/v1/quarantine").await;
    assert_eq!(listed.body["events"][0]["truncated"], true);
    assert_eq!(
        listed.body["events"][0]["raw"].as_str().unwrap().len(),
        4096
    );
    let retry = node
        .call(Method::POST, "demo-key", "/v1/quarantine/1/retry")
        .await;
    assert_eq!(
        retry.body,
        json!({"qid": 1, "outcome": "quarantined", "reason": "missing_currency"})
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bytes_in_flight_are_bounded_node_wide() {
    let node = start_node(|config| {
        config.server.max_body_bytes = 64 * 1024;
        config.server.ingest_bytes_inflight_max = 64 * 1024;
    })
    .await;
    let running = node.running.as_ref().unwrap();
    let held = running
        .node
        .ingest_kib
        .clone()
        .acquire_many_owned(60)
        .await
        .unwrap();
    let body = json!([order("o-1", 1, T0_MS)]).to_string();
    let reply = node
        .send(
            node.client
                .post(format!("{}/v1/events", node.base))
                .bearer_auth("demo-key")
                .header("content-type", "application/json")
                .header("content-length", "10000")
                .body(format!("{body}{}", " ".repeat(10_000 - body.len()))),
        )
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.retry_after.as_deref(), Some("1"));
    drop(held);
    assert_eq!(
        node.post("demo-key", &[order("o-1", 1, T0_MS)]).await.body["accepted"],
        1
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_is_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = start_node(|config| config.server.body_read_timeout_ms = 200).await;
    let addr = node.running.as_ref().unwrap().local_addr;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = "POST /v1/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer demo-key\r\n\
                content-type: application/json\r\ncontent-length: 100\r\n\r\n[";
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = vec![0u8; 512];
    let read = stream.read(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response[..read]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_endpoint_names_only_the_key_tenant() {
    let node = start_node(|_| {}).await;
    let own = node.get(Some("acme-key"), "/v1/tenant").await;
    assert_eq!(
        own.body,
        json!({"tenant": "acme", "currency": "EUR", "currency_minor_digits": 2, "timezone": "Europe/Berlin"})
    );
    assert_eq!(
        node.get(None, "/v1/tenant").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        node.get(Some("acme-key"), "/v1/tenant?tenant=demo")
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        node.get(Some("acme-key"), "/v1/tenant?colour=red")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        node.get(Some("admin-key"), "/v1/tenant").await.status,
        StatusCode::BAD_REQUEST
    );
    let admin = node.get(Some("admin-key"), "/v1/tenant?tenant=demo").await;
    assert_eq!(admin.body["currency"], "USD");
    node.stop().await;
}
