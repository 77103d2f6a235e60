//! Experiments end to end (API.md §8, docs/experiments.md): registered over
//! HTTP, fed events with `experiments` attribution, judged on the engine's
//! tick; the signals on a real WebSocket client and through
//! `GET /v1/signals`, exactly once across a crash-like restart and a SIGKILL
//! of the real binary; per-variant counts exact against what was sent.

mod common;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use common::{
    next_within, start_node, start_node_in, subscribe_live, Reply, Socket, TestNode, T0_MS,
};

async fn subscribe_signals(base: &str, since: u64, experiment: Option<&str>) -> Socket {
    let mut subscribe = json!({"op": "subscribe", "id": "s", "topic": "signals", "since": since});
    if let Some(experiment) = experiment {
        subscribe["experiment"] = json!(experiment);
    }
    subscribe_live(base, "demo-key", &subscribe).await
}

fn fast_ticks(config: &mut tally::config::Config) {
    config.experiments.tick_ms = 100;
}

async fn put_experiment(node: &TestNode, key: &str, id: &str, spec: &Value) -> Reply {
    let request = node
        .client
        .put(format!("{}/v1/experiments/{id}", node.base))
        .bearer_auth(key)
        .json(spec);
    node.send(request).await
}

/// `count` requests of `variant` (none: no attribution), the first
/// `failed` of them failed.
fn requests(
    prefix: &str,
    experiment: &str,
    variant: Option<&str>,
    count: usize,
    failed: usize,
) -> Vec<Value> {
    (0..count)
        .map(|n| {
            let event_type = if n < failed {
                "request.failed"
            } else {
                "request.succeeded"
            };
            let mut event = json!({"id": format!("{prefix}-{n}"), "type": event_type, "ts": T0_MS});
            if let Some(variant) = variant {
                event["experiments"] = json!({ experiment: variant });
            }
            event
        })
        .collect()
}

async fn post_all(node: &TestNode, events: &[Value]) {
    for chunk in events.chunks(1_000) {
        let reply = node.post("demo-key", chunk).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.body["accepted"], chunk.len(), "{}", reply.body);
    }
}

/// Posts `events` as one batch: a tick between two batches that held one
/// variant each saw 1 000 of A and none of B, a sample-ratio mismatch at the
/// first look, and signalled it before the guardrail (a flake under load).
async fn post_together(node: &TestNode, events: &[Value]) {
    let reply = node.post("demo-key", events).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["accepted"], events.len(), "{}", reply.body);
}

/// Waits (wall time: the engine ticks every 100 ms) until `GET /v1/signals`
/// has `count` records after `since` (0: reads once).
async fn signals_after(node: &TestNode, since: u64, count: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let reply = node
            .get(Some("demo-key"), &format!("/v1/signals?since={since}"))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let records = reply.body["signals"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if records.len() >= count || tokio::time::Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn error_rate_stop() -> Value {
    json!({"variants": ["A", "B"], "control": "A", "split": {"A": 0.5, "B": 0.5},
           "min_samples": 200, "confidence": 0.95,
           "guardrails": [{"metric": "error_rate", "compare": "ratio", "threshold": 2.0, "action": "stop"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worse_treatment_is_stopped_once_with_exact_counts_and_no_second_signal_after_a_crash() {
    let node = start_node(fast_ticks).await;
    let reply = put_experiment(&node, "demo-key", "checkout-v2", &error_rate_stop()).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.body["state"], "running");
    // the same spec again changes nothing
    let again = put_experiment(&node, "demo-key", "checkout-v2", &error_rate_stop()).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.body["started_at"], reply.body["started_at"]);
    // batches count from the moment the registration was stamped
    node.clock.advance_ms(1_000);
    let mut socket = subscribe_signals(&node.base, 0, None).await;
    let mut elsewhere = subscribe_signals(&node.base, 0, Some("another")).await;

    // control 2 % errors, treatment 20 %; plus a variant and an experiment
    // the node does not know, counted as usual and attributed to nothing
    let mut events = requests("a", "checkout-v2", Some("A"), 1_000, 20);
    events.extend(requests("b", "checkout-v2", Some("B"), 1_000, 200));
    events.extend(requests("c", "checkout-v2", Some("C"), 10, 10));
    events.extend(requests("x", "nobody", Some("A"), 10, 0));
    post_together(&node, &events).await;

    let signal = next_within(&mut socket, Duration::from_secs(20))
        .await
        .expect("a signal within 20 s");
    assert_eq!(signal["type"], "signal", "{signal}");
    assert_eq!(signal["seq"], 1);
    assert_eq!(signal["experiment"], "checkout-v2");
    assert_eq!(signal["variant"], "B");
    assert_eq!(signal["action"], "stop");
    assert_eq!(signal["state"], "stopped");
    assert_eq!(signal["guardrail"], "error_rate");
    assert_eq!(signal["observed"], 0.2);
    assert_eq!(signal["baseline"], 0.02);
    assert_eq!(signal["threshold"], 2.0);
    assert_eq!(signal["samples"], 1_000);
    assert!(signal["p_value"].as_f64().unwrap() < 0.05, "{signal}");
    assert_eq!(signal["id"], "checkout-v2/1");
    // no second signal for the same breach
    assert!(next_within(&mut socket, Duration::from_millis(800))
        .await
        .is_none());
    // a subscription that follows another experiment hears nothing of it
    assert!(next_within(&mut elsewhere, Duration::from_millis(100))
        .await
        .is_none());
    let mut this_one = subscribe_signals(&node.base, 0, Some("checkout-v2")).await;
    let replayed = next_within(&mut this_one, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        (replayed["seq"].clone(), replayed["action"].clone()),
        (json!(1), json!("stop"))
    );

    let listed = signals_after(&node, 0, 1).await;
    assert_eq!(listed.len(), 1);
    for field in [
        "seq",
        "id",
        "experiment",
        "variant",
        "action",
        "guardrail",
        "observed",
        "baseline",
        "threshold",
        "samples",
        "p_value",
        "at",
    ] {
        assert_eq!(listed[0][field], signal[field], "{field}");
    }
    let shown = node
        .get(Some("demo-key"), "/v1/experiments/checkout-v2")
        .await;
    assert_eq!(shown.status, StatusCode::OK, "{}", shown.body);
    assert_eq!(shown.body["state"], "stopped");
    let since =
        |variant: &str| shown.body["variants"][variant]["error_rate"]["since_start"].clone();
    assert_eq!(
        since("A"),
        json!({"samples": 1_000, "hits": 20, "rate": 0.02})
    );
    assert_eq!(
        since("B"),
        json!({"samples": 1_000, "hits": 200, "rate": 0.2})
    );
    assert_eq!(
        shown.body["variants"]["B"]["error_rate"]["15m"]["samples"],
        1_000
    );
    assert_eq!(shown.body["unknown_variant_events"], 10);
    // the metric itself counted every event
    let metric = node.get(Some("demo-key"), "/v1/metrics/error_rate").await;
    assert_eq!(
        metric.body["windows"]["15m"]["denominator"], 2_020,
        "{}",
        metric.body
    );
    // a stopped experiment does not resume
    let resumed = node
        .call(
            Method::POST,
            "demo-key",
            "/v1/experiments/checkout-v2/resume",
        )
        .await;
    assert_eq!(resumed.status, StatusCode::CONFLICT, "{}", resumed.body);
    // nor does a changed spec bring it back
    let mut changed = error_rate_stop();
    changed["min_samples"] = json!(500);
    let replaced = put_experiment(&node, "demo-key", "checkout-v2", &changed).await;
    assert_eq!(replaced.status, StatusCode::CONFLICT, "{}", replaced.body);
    let scrape = node.get(Some("admin-key"), "/metrics").await;
    let text = scrape.body.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains("tally_experiment_state{tenant=\"demo\",experiment=\"checkout-v2\",state=\"stopped\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("tally_experiment_unattributed_events_total{tenant=\"demo\",reason=\"unknown_variant\"} 10"),
        "{text}"
    );
    assert!(
        text.contains("tally_experiment_unattributed_events_total{tenant=\"demo\",reason=\"unknown_experiment\"} 10"),
        "{text}"
    );

    // crash-like stop, restart: the same state and counts, no second signal
    let stopped = node.halt_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, fast_ticks).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let after = node
        .get(Some("demo-key"), "/v1/experiments/checkout-v2")
        .await;
    assert_eq!(after.body["state"], "stopped");
    assert_eq!(after.body["variants"], shown.body["variants"]);
    assert_eq!(signals_after(&node, 0, 0).await.len(), 1);
    // a controller resuming after seq 1 gets nothing more
    let mut socket = subscribe_signals(&node.base, 1, None).await;
    assert!(next_within(&mut socket, Duration::from_millis(500))
        .await
        .is_none());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_experiment_resumes_and_judges_only_the_events_after_the_resume() {
    let node = start_node(fast_ticks).await;
    let spec = json!({"variants": ["A", "B"], "control": "A", "split": {"A": 0.5, "B": 0.5},
        "min_samples": 200,
        "guardrails": [{"metric": "error_rate", "compare": "delta", "threshold": 0.05, "action": "pause"}]});
    let reply = put_experiment(&node, "demo-key", "search-v3", &spec).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    node.clock.advance_ms(1_000);
    let mut events = requests("a1", "search-v3", Some("A"), 500, 5);
    events.extend(requests("b1", "search-v3", Some("B"), 500, 150));
    post_all(&node, &events).await;
    let paused = signals_after(&node, 0, 1).await;
    assert_eq!(paused.len(), 1, "{paused:?}");
    assert_eq!(paused[0]["action"], "pause");
    assert_eq!(paused[0]["state"], "paused");

    let resumed = node
        .call(Method::POST, "demo-key", "/v1/experiments/search-v3/resume")
        .await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.body);
    assert_eq!(resumed.body["state"], "running");
    let records = signals_after(&node, 1, 1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0]["seq"].clone(), records[0]["action"].clone()),
        (json!(2), json!("resume"))
    );
    // after the resume both variants fail at 1 %: nothing to signal, though
    // since the start B is still far worse
    node.clock.advance_ms(1_000);
    let mut events = requests("a2", "search-v3", Some("A"), 500, 5);
    events.extend(requests("b2", "search-v3", Some("B"), 500, 5));
    post_all(&node, &events).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(signals_after(&node, 2, 0).await.len(), 0);
    let shown = node
        .get(Some("demo-key"), "/v1/experiments/search-v3")
        .await;
    assert_eq!(shown.body["state"], "running");
    let b = &shown.body["variants"]["B"]["error_rate"];
    assert_eq!(
        b["since_start"],
        json!({"samples": 1_000, "hits": 155, "rate": 0.155})
    );
    assert_eq!(
        b["judged"],
        json!({"samples": 500, "hits": 5, "rate": 0.01})
    );
    // a crash-like stop: the log replayed against the moved epoch gives the
    // same counts, and no signal comes again
    let stopped = node.halt_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, fast_ticks).await;
    assert!(node.recovery().records_replayed > 0);
    let after = node
        .get(Some("demo-key"), "/v1/experiments/search-v3")
        .await;
    assert_eq!(after.body["variants"], shown.body["variants"]);
    assert_eq!(after.body["state"], "running");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(signals_after(&node, 2, 0).await.len(), 0);
    // a resume of a running experiment changes nothing and signals nothing
    let again = node
        .call(Method::POST, "demo-key", "/v1/experiments/search-v3/resume")
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(signals_after(&node, 2, 0).await.len(), 0);
    // a graceful stop writes the counts into the final snapshot; they come
    // back from it the same
    let stopped = node.stop_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, fast_ticks).await;
    let after = node
        .get(Some("demo-key"), "/v1/experiments/search-v3")
        .await;
    assert_eq!(after.body["state"], "running");
    assert_eq!(after.body["variants"], shown.body["variants"]);
    assert_eq!(node.recovery().records_replayed, 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_52_48_split_over_100_000_samples_is_a_sample_ratio_mismatch() {
    let node = start_node(fast_ticks).await;
    let spec = json!({"variants": ["A", "B"], "control": "A", "split": {"A": 0.5, "B": 0.5},
        "guardrails": [{"metric": "error_rate", "compare": "ratio", "threshold": 2.0, "action": "stop"}]});
    assert_eq!(
        put_experiment(&node, "demo-key", "srm", &spec).await.status,
        StatusCode::CREATED
    );
    node.clock.advance_ms(1_000);
    // the same error rate in both: only the split is wrong; 13 of A to 12
    // of B all along, so that every look sees 52/48
    let a = requests("a", "srm", Some("A"), 52_000, 520);
    let b = requests("b", "srm", Some("B"), 48_000, 480);
    let mut mixed = Vec::with_capacity(100_000);
    for (a, b) in a.chunks(13).zip(b.chunks(12)) {
        mixed.extend_from_slice(a);
        mixed.extend_from_slice(b);
    }
    assert_eq!(mixed.len(), 100_000);
    post_all(&node, &mixed).await;
    let records = signals_after(&node, 0, 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["action"], "srm");
    assert_eq!(records[0]["guardrail"], "srm");
    assert_eq!(records[0]["state"], "running");
    assert!(records[0]["p_value"].as_f64().unwrap() < 0.001 / 30.0);
    let shown = node.get(Some("demo-key"), "/v1/experiments/srm").await;
    assert_eq!(shown.body["sample_ratio"]["mismatch"], true);
    assert_eq!(shown.body["state"], "running");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiments_are_checked_by_field_and_kept_to_their_tenant() {
    let node = start_node(|config| config.experiments.per_tenant_max = 2).await;
    let bad = json!({"variants": ["A", "A"], "control": "C", "split": {"A": 0.7},
        "guardrails": [
            {"metric": "gmv", "compare": "ratio", "threshold": 2.0, "action": "stop"},
            {"metric": "checkout_latency_ms", "compare": "delta", "threshold": 200, "action": "stop"}]});
    let reply = put_experiment(&node, "demo-key", "bad", &bad).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["error"], "invalid");
    let fields: Vec<&str> = reply.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "variants[1]",
            "control",
            "split",
            "guardrails[0].metric",
            "guardrails[1].stat"
        ]
    );
    let unknown_field =
        json!({"variants": ["A", "B"], "control": "A", "split": {"A": 0.5, "B": 0.5}, "colour": 1});
    let reply = put_experiment(&node, "demo-key", "x", &unknown_field).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{}",
        reply.body
    );
    let reply = put_experiment(&node, "demo-key", "has space", &error_rate_stop()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.body["errors"][0]["field"], "id");
    assert_eq!(
        node.get(Some("demo-key"), "/v1/experiments/missing")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let no_key = node.get(None, "/v1/experiments").await;
    assert_eq!(no_key.status, StatusCode::UNAUTHORIZED);

    // demo's experiment: acme neither sees, resumes, deletes nor lists it
    assert_eq!(
        put_experiment(&node, "demo-key", "one", &error_rate_stop())
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        put_experiment(&node, "demo-key", "two", &error_rate_stop())
            .await
            .status,
        StatusCode::CREATED
    );
    let third = put_experiment(&node, "demo-key", "three", &error_rate_stop()).await;
    assert_eq!(third.status, StatusCode::CONFLICT, "{}", third.body);
    assert_eq!(
        node.get(Some("acme-key"), "/v1/experiments/one")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        node.call(Method::POST, "acme-key", "/v1/experiments/one/resume")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        node.call(Method::DELETE, "acme-key", "/v1/experiments/one")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let listed = node.get(Some("acme-key"), "/v1/experiments").await;
    assert_eq!(listed.body["experiments"], json!([]));
    assert_eq!(
        node.get(Some("acme-key"), "/v1/experiments?tenant=demo")
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        node.get(Some("acme-key"), "/v1/signals?tenant=demo")
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // an admin names the tenant
    let listed = node
        .get(Some("admin-key"), "/v1/experiments?tenant=demo")
        .await;
    let ids: Vec<&str> = listed.body["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["one", "two"]);
    // a delete makes room
    assert_eq!(
        node.call(Method::DELETE, "demo-key", "/v1/experiments/one")
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        put_experiment(&node, "demo-key", "three", &error_rate_stop())
            .await
            .status,
        StatusCode::CREATED
    );
    // persisted: after a graceful restart the same list
    let stopped = node.stop_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    let listed = node.get(Some("demo-key"), "/v1/experiments").await;
    let ids: Vec<&str> = listed.body["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["three", "two"]);
    node.stop().await;
}

/// The real binary, killed with SIGKILL after it stopped an experiment: after
/// the restart the experiment is still stopped, its per-variant counts are
/// those acknowledged, and there is no second signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_killed_with_9_keeps_a_stopped_experiment_without_a_second_signal() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let config = common::binary_config(port, dir.path()).replace(
        "tick_ms = 1000\n# Experiments one tenant",
        "tick_ms = 100\n# Experiments one tenant",
    );
    assert!(config.contains("tick_ms = 100\n# Experiments one tenant"));
    let config_path = dir.path().join("tally.toml");
    std::fs::write(&config_path, config).unwrap();
    let log = dir.path().join("log");
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let get = |path: String| {
        let client = client.clone();
        async move {
            let body: Value = client
                .get(path)
                .bearer_auth("demo-key")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body
        }
    };
    let mut child = common::spawn_binary(&config_path, &log);
    common::wait_until_ready(&client, &mut child, &base, &log).await;
    let reply = client
        .put(format!("{base}/v1/experiments/checkout-v2"))
        .bearer_auth("demo-key")
        .json(&error_rate_stop())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
    // batches stamped after the registration's millisecond
    tokio::time::sleep(Duration::from_millis(5)).await;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut events = requests("a", "checkout-v2", Some("A"), 1_000, 20);
    events.extend(requests("b", "checkout-v2", Some("B"), 1_000, 200));
    for event in &mut events {
        event["ts"] = json!(now_ms);
    }
    let body: Vec<String> = events.iter().map(Value::to_string).collect();
    let reply = client
        .post(format!("{base}/v1/events"))
        .bearer_auth("demo-key")
        .header("content-type", "application/x-ndjson")
        .body(body.join("\n"))
        .send()
        .await
        .unwrap();
    assert!(reply.status().is_success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let signals = get(format!("{base}/v1/signals?since=0")).await;
        if !signals["signals"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no signal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = get(format!("{base}/v1/experiments/checkout-v2")).await;
    assert_eq!(before["state"], "stopped");

    common::kill_9(&mut child);
    let mut child = common::spawn_binary(&config_path, &log);
    common::wait_until_ready(&client, &mut child, &base, &log).await;
    // many ticks after the restart
    tokio::time::sleep(Duration::from_millis(800)).await;
    let signals = get(format!("{base}/v1/signals?since=0")).await;
    let actions: Vec<(u64, &str)> = signals["signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["seq"].as_u64().unwrap(), s["action"].as_str().unwrap()))
        .collect();
    assert_eq!(actions, vec![(1, "stop")]);
    let after = get(format!("{base}/v1/experiments/checkout-v2")).await;
    assert_eq!(after["state"], "stopped");
    assert_eq!(
        after["variants"]["B"]["error_rate"]["since_start"],
        json!({"samples": 1_000, "hits": 200, "rate": 0.2})
    );
    assert_eq!(after["variants"], before["variants"]);
    let _ = child.kill();
    let _ = child.wait();
}

/// `examples/controller.rs` (built by `cargo test` with the tests), beside
/// this test's own binary: `target/<profile>/examples/controller`.
fn controller_path() -> std::path::PathBuf {
    let test_binary = std::env::current_exe().unwrap();
    let profile_dir = test_binary.parent().unwrap().parent().unwrap();
    profile_dir.join("examples").join("controller")
}

/// The example controller against a node: it acts on the stop once, keeps
/// the seq on disk, and after its own restart acts on nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_controller_acts_on_each_signal_once_across_its_restarts() {
    let node = start_node(fast_ticks).await;
    let reply = put_experiment(&node, "demo-key", "checkout-v2", &error_rate_stop()).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    node.clock.advance_ms(1_000);
    let mut events = requests("a", "checkout-v2", Some("A"), 1_000, 20);
    events.extend(requests("b", "checkout-v2", Some("B"), 1_000, 200));
    post_together(&node, &events).await;
    assert_eq!(signals_after(&node, 0, 1).await.len(), 1);

    let dir = tempfile::tempdir().unwrap();
    let since_file = dir.path().join("since");
    let url = format!("{}/v1/live", node.base.replace("http://", "ws://"));
    let run = |wait: Duration| {
        let (path, url, since_file) = (controller_path(), url.clone(), since_file.clone());
        async move {
            let mut child = std::process::Command::new(&path)
                .args([url.as_str(), "demo-key", since_file.to_str().unwrap()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            tokio::time::sleep(wait).await;
            child.kill().unwrap();
            let output = tokio::task::spawn_blocking(move || child.wait_with_output())
                .await
                .unwrap()
                .unwrap();
            String::from_utf8(output.stdout).unwrap()
        }
    };
    let first = run(Duration::from_millis(1_500)).await;
    assert_eq!(
        first
            .lines()
            .filter(|line| line
                .starts_with("would STOP checkout-v2: variant B breached \"error_rate\""))
            .count(),
        1,
        "{first}"
    );
    assert_eq!(std::fs::read_to_string(&since_file).unwrap(), "1\n");
    let second = run(Duration::from_millis(1_000)).await;
    assert_eq!(second, "", "a restarted controller resumes after seq 1");
    node.stop().await;
}
