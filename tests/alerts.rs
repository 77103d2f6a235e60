//! Alerts end to end (API.md §7, docs/alerts.md): rules from config judged on
//! a tick against windows fed through the HTTP API with event timestamps, the
//! records on a real WebSocket client and through `GET /v1/alerts`, and the
//! states after a crash-like restart.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

use common::{
    next_within, order, start_node, start_node_in, subscribe_live, Socket, TestNode, T0_MS,
};
use tally::config::{Config, RuleConfig};
use tally::domain::alert::Condition;

async fn subscribe_alerts(node: &TestNode, since: u64) -> Socket {
    let subscribe = json!({"op": "subscribe", "id": "a", "topic": "alerts", "since": since});
    subscribe_live(&node.base, "demo-key", &subscribe).await
}

async fn next(socket: &mut Socket) -> Value {
    next_within(socket, Duration::from_secs(20))
        .await
        .expect("a message within 20 s")
}

fn rule(id: &str, metric: &str, window: &str, condition: Condition) -> RuleConfig {
    RuleConfig {
        id: id.into(),
        tenants: vec!["demo".into()],
        metric: metric.into(),
        window: window.into(),
        condition,
        by: None,
        min_count: 0,
        for_s: 0,
        severity: "P1".into(),
        runbook: None,
    }
}

fn gmv_drop(config: &mut Config) {
    config.alerting.tick_ms = 100;
    let mut drop = rule(
        "gmv-drop",
        "gmv",
        "15m",
        Condition::DropVsPrev { pct: 30.0 },
    );
    drop.min_count = 10;
    drop.for_s = 60;
    drop.runbook = Some("https://runbooks.example/gmv-drop".into());
    config.alerts = vec![drop];
}

async fn post_orders(node: &TestNode, prefix: &str, count: usize, amount: i64, ts_ms: i64) {
    let events: Vec<Value> = (0..count)
        .map(|n| order(&format!("{prefix}-{n}"), amount, ts_ms))
        .collect();
    let reply = node.post("demo-key", &events).await;
    assert_eq!(reply.body["accepted"], count, "{}", reply.body);
}

/// Waits (in wall time: the engine ticks every 100 ms) until `GET /v1/alerts`
/// shows `count` records after `since`.
async fn records_after(node: &TestNode, since: u64, count: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let reply = node
            .get(Some("demo-key"), &format!("/v1/alerts?since={since}"))
            .await;
        let records = reply.body["records"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if records.len() >= count || tokio::time::Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gmv_drop_fires_survives_a_crash_without_a_second_firing_and_resumes_exactly_once() {
    let node = start_node(gmv_drop).await;
    let mut socket = subscribe_alerts(&node, 0).await;
    // the window before: 100 orders of 1 000; this window: 60 (a 40 % drop),
    // in one request so that no tick sees half of it
    let mut events: Vec<Value> = (0..100)
        .map(|n| order(&format!("before-{n}"), 1_000, T0_MS - 20 * 60_000))
        .collect();
    events.extend((0..60).map(|n| order(&format!("now-{n}"), 1_000, T0_MS - 5 * 60_000)));
    assert_eq!(node.post("demo-key", &events).await.body["accepted"], 160);

    let pending = next(&mut socket).await;
    assert_eq!(pending["type"], "alert");
    assert_eq!(pending["seq"], 1);
    assert_eq!(pending["state"], "pending");
    assert_eq!(pending["rule"], "gmv-drop");
    assert_eq!(pending["value"], 60_000.0);
    assert_eq!(pending["baseline"], 100_000.0);
    assert_eq!(pending["threshold"], 70_000.0);
    assert_eq!(pending["at"], T0_MS);
    assert_eq!(
        pending["labels"],
        json!({"tenant": "demo", "rule": "gmv-drop", "severity": "P1"})
    );
    assert_eq!(pending["runbook"], "https://runbooks.example/gmv-drop");
    // still pending until the breach has held for_s (60 s)
    node.clock.advance_ms(59_000);
    assert_eq!(
        next_within(&mut socket, Duration::from_millis(500)).await,
        None
    );
    node.clock.advance_ms(1_000);
    let firing = next(&mut socket).await;
    assert_eq!(
        (firing["seq"].clone(), firing["state"].clone()),
        (json!(2), json!("firing"))
    );
    assert_eq!(firing["at"], T0_MS + 60_000);

    let alerts = node.get(Some("demo-key"), "/v1/alerts").await.body;
    assert_eq!(alerts["alerts"][0]["state"], "firing");
    assert_eq!(alerts["alerts"][0]["since"], T0_MS + 60_000);
    assert_eq!(alerts["rules"][0]["id"], "gmv-drop");
    // and on the tenant's scrape, once the tick after the firing has set it
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let line = r#"tally_alert_firing{tenant="demo",rule="gmv-drop",severity="P1"} 1"#;
    loop {
        let scrape = node
            .client
            .get(format!("{}/metrics", node.base))
            .bearer_auth("demo-key")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if scrape.lines().any(|l| l == line) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {line} in:\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // kill -9 (no final snapshot), then a restart: still firing, no second record
    drop(socket);
    let stopped = node.halt_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, gmv_drop).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = records_after(&node, 0, 2).await;
    let states: Vec<(u64, String)> = records
        .iter()
        .map(|r| {
            (
                r["seq"].as_u64().unwrap(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(states, vec![(1, "pending".into()), (2, "firing".into())]);
    let alerts = node.get(Some("demo-key"), "/v1/alerts").await.body;
    assert_eq!(alerts["alerts"][0]["state"], "firing");
    assert_eq!(alerts["alerts"][0]["since"], T0_MS + 60_000);

    // a client that saw seq 1 resumes: seq 2 once, then the resolve as it happens
    let mut socket = subscribe_alerts(&node, 1).await;
    let resumed = next(&mut socket).await;
    assert_eq!(
        (resumed["seq"].clone(), resumed["state"].clone()),
        (json!(2), json!("firing"))
    );
    post_orders(&node, "recovered", 40, 1_000, T0_MS - 4 * 60_000).await;
    let resolved = next(&mut socket).await;
    assert_eq!(
        (resolved["seq"].clone(), resolved["state"].clone()),
        (json!(3), json!("resolved"))
    );
    assert_eq!(resolved["value"], 100_000.0);
    assert_eq!(
        next_within(&mut socket, Duration::from_millis(500)).await,
        None
    );
    assert_eq!(records_after(&node, 0, 3).await.len(), 3);
    assert!(
        node.get(Some("demo-key"), "/v1/alerts").await.body["alerts"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    node.stop().await;
}

fn device_order(id: &str, device: &str, ts_ms: i64) -> Value {
    json!({"id": id, "type": "order.completed", "ts": ts_ms, "amount": 100,
           "currency": "USD", "dims": {"device": device}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_fires_for_the_device_that_went_silent_only_and_resolves_when_it_reports() {
    let node = start_node(|config| {
        config.alerting.tick_ms = 100;
        let mut silent = rule("device-silent", "orders", "15m", Condition::Absent {});
        silent.by = Some("device".into());
        silent.for_s = 60;
        config.alerts = vec![silent];
    })
    .await;
    let mut socket = subscribe_alerts(&node, 0).await;
    let reply = node
        .post(
            "demo-key",
            &[
                device_order("a-0", "pos-1", T0_MS),
                device_order("b-0", "pos-2", T0_MS),
            ],
        )
        .await;
    assert_eq!(reply.body["accepted"], 2);
    // both seen; then pos-1 reports every 20 s and pos-2 stays silent
    tokio::time::sleep(Duration::from_millis(400)).await;
    for step in 1..=4 {
        let now = T0_MS + step * 20_000;
        node.clock.set_ms(now);
        let reply = node
            .post(
                "demo-key",
                &[device_order(&format!("a-{step}"), "pos-1", now)],
            )
            .await;
        assert_eq!(reply.body["accepted"], 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // at T0 + 80 s pos-2 has been silent 80 s (> 60): one alert, for pos-2
    let firing = next(&mut socket).await;
    assert_eq!(firing["state"], "firing");
    assert_eq!(firing["dim_value"], "pos-2");
    assert_eq!(firing["labels"]["device"], "pos-2");
    assert_eq!(
        next_within(&mut socket, Duration::from_millis(500)).await,
        None
    );
    let now = T0_MS + 90_000;
    node.clock.set_ms(now);
    let reply = node
        .post("demo-key", &[device_order("b-1", "pos-2", now)])
        .await;
    assert_eq!(reply.body["accepted"], 1);
    let resolved = next(&mut socket).await;
    assert_eq!(resolved["state"], "resolved");
    assert_eq!(resolved["dim_value"], "pos-2");
    node.stop().await;
}

async fn call_json(
    node: &TestNode,
    method: reqwest::Method,
    key: &str,
    path: &str,
    body: Value,
) -> common::Reply {
    let request = node
        .client
        .request(method, format!("{}{}", node.base, path))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string());
    node.send(request).await
}

fn spend(id: &str, campaign: &str, amount: i64, ts_ms: i64) -> Value {
    json!({"id": id, "type": "ad.impression", "ts": ts_ms, "amount": amount,
           "currency": "USD", "dims": {"campaign": campaign}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_budget_fires_at_nine_thousand_spent_not_at_8999() {
    let node = start_node(|config| config.alerting.tick_ms = 100).await;
    let rule = json!({"metric": "ad_spend", "window": "today", "by": "campaign",
                      "condition": {"type": "budget_used", "pct": 90}, "severity": "P2"});
    let reply = call_json(
        &node,
        reqwest::Method::PUT,
        "demo-key",
        "/v1/alerts/campaign-budget",
        rule,
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let reply = call_json(
        &node,
        reqwest::Method::PUT,
        "demo-key",
        "/v1/budgets/campaign/spring",
        json!({"amount": 10_000}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // money is integer minor units: a fraction, zero and a negative are refused
    for amount in [json!(10_000.5), json!(0), json!(-5), json!("10000")] {
        let reply = call_json(
            &node,
            reqwest::Method::PUT,
            "demo-key",
            "/v1/budgets/campaign/spring",
            json!({ "amount": amount }),
        )
        .await;
        assert_eq!(reply.status, 400, "{amount}: {}", reply.body);
        assert_eq!(reply.body["errors"][0]["field"], "amount", "{}", reply.body);
    }
    let mut socket = subscribe_alerts(&node, 0).await;
    let events: Vec<Value> = (0..8)
        .map(|n| spend(&format!("s-{n}"), "spring", 1_000, T0_MS))
        .chain([
            spend("s-8", "spring", 999, T0_MS),
            spend("o-1", "autumn", 50_000, T0_MS),
        ])
        .collect();
    assert_eq!(node.post("demo-key", &events).await.body["accepted"], 10);
    // 8 999 of 10 000 (and a campaign without a budget): nothing
    assert_eq!(
        next_within(&mut socket, Duration::from_millis(600)).await,
        None
    );
    assert_eq!(
        node.post("demo-key", &[spend("s-9", "spring", 1, T0_MS)])
            .await
            .body["accepted"],
        1
    );
    let firing = next(&mut socket).await;
    assert_eq!(firing["state"], "firing");
    assert_eq!(firing["labels"]["campaign"], "spring");
    assert_eq!(firing["value"], 9_000.0);
    assert_eq!(firing["baseline"], 10_000.0);
    assert_eq!(firing["threshold"], 9_000.0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_through_the_api_are_checked_persisted_kept_per_tenant_and_deleted() {
    let with_config_rule = |config: &mut Config| {
        config.alerting.tick_ms = 100;
        config.alerts = vec![rule(
            "from-config",
            "orders",
            "15m",
            Condition::Above { value: 1e9 },
        )];
    };
    let node = start_node(with_config_rule).await;
    let put = |path: &'static str, body: Value| {
        call_json(&node, reqwest::Method::PUT, "demo-key", path, body)
    };
    // every problem, by field
    let reply = put(
        "/v1/alerts/bad",
        json!({"metric": "nope", "window": "1h", "condition": {"type": "above", "value": 1}, "for_s": -5}),
    )
    .await;
    assert_eq!(reply.status, 400);
    let fields: Vec<&str> = reply.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| error["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["metric", "window", "for_s"], "{}", reply.body);
    let reply = put(
        "/v1/alerts/bad",
        json!({"metric": "gmv", "window": "15m", "condition": {"type": "sideways"}}),
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.body["errors"][0]["field"], "condition.type",
        "{}",
        reply.body
    );
    let reply = put(
        "/v1/alerts/Bad%20Id",
        json!({"metric": "gmv", "window": "15m", "condition": {"type": "above", "value": 1}}),
    )
    .await;
    assert_eq!(reply.body["errors"][0]["field"], "id", "{}", reply.body);

    let failures = json!({"metric": "payment_failure_rate", "window": "15m",
                          "condition": {"type": "above", "value": 0.05}, "min_count": 100,
                          "for_s": 60, "severity": "P1", "runbook": "https://runbooks.example/pfr"});
    assert_eq!(put("/v1/alerts/pfr", failures.clone()).await.status, 201);
    assert_eq!(put("/v1/alerts/pfr", failures).await.status, 200);
    let config_rule =
        json!({"metric": "orders", "window": "15m", "condition": {"type": "above", "value": 1}});
    assert_eq!(put("/v1/alerts/from-config", config_rule).await.status, 409);
    let got = node.get(Some("demo-key"), "/v1/alerts/pfr").await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.body["rule"]["condition"],
        json!({"type": "above", "value": 0.05})
    );
    assert_eq!(got.body["source"], "api");
    // bad reads of the records are refused, not guessed
    for query in [
        "since=0&limit=0",
        "since=0&limit=1000000",
        "since=abc",
        "since=0&color=red",
    ] {
        let reply = node
            .get(Some("demo-key"), &format!("/v1/alerts?{query}"))
            .await;
        assert_eq!(reply.status, 400, "{query}: {}", reply.body);
    }
    assert_eq!(node.get(None, "/v1/alerts").await.status, 401);
    // another tenant neither sees nor deletes it
    assert_eq!(
        node.get(Some("acme-key"), "/v1/alerts/pfr").await.status,
        404
    );
    assert_eq!(
        node.call(reqwest::Method::DELETE, "acme-key", "/v1/alerts/pfr")
            .await
            .status,
        404
    );
    let ids = |body: &Value| -> Vec<String> {
        body["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rule| rule["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids(&node.get(Some("acme-key"), "/v1/alerts").await.body),
        Vec::<String>::new()
    );

    // kept across a crash-like restart
    let stopped = node.halt_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, with_config_rule).await;
    assert_eq!(
        ids(&node.get(Some("demo-key"), "/v1/alerts").await.body),
        ["from-config", "pfr"]
    );
    assert_eq!(
        node.call(
            reqwest::Method::DELETE,
            "demo-key",
            "/v1/alerts/from-config"
        )
        .await
        .status,
        409
    );
    assert_eq!(
        node.call(reqwest::Method::DELETE, "demo-key", "/v1/alerts/pfr")
            .await
            .status,
        204
    );
    assert_eq!(
        node.get(Some("demo-key"), "/v1/alerts/pfr").await.status,
        404
    );
    let stopped = node.stop_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, with_config_rule).await;
    assert_eq!(
        ids(&node.get(Some("demo-key"), "/v1/alerts").await.body),
        ["from-config"]
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silence_is_counted_across_a_restart() {
    let silent_rule = |config: &mut Config| {
        config.alerting.tick_ms = 100;
        let mut silent = rule("device-silent", "orders", "15m", Condition::Absent {});
        silent.by = Some("device".into());
        silent.for_s = 60;
        config.alerts = vec![silent];
    };
    let node = start_node(silent_rule).await;
    let reply = node
        .post("demo-key", &[device_order("b-0", "pos-2", T0_MS)])
        .await;
    assert_eq!(reply.body["accepted"], 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // pos-2 last seen at T0; the node stops at T0 + 40 s and starts again
    node.clock.set_ms(T0_MS + 40_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = node.stop_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, silent_rule).await;
    let mut socket = subscribe_alerts(&node, 0).await;
    // 60 s of silence at T0 + 60 s, counted from before the restart (not
    // from the start at T0 + 40 s, which would wait until T0 + 100 s)
    node.clock.set_ms(T0_MS + 61_000);
    let firing = next(&mut socket).await;
    assert_eq!(firing["state"], "firing");
    assert_eq!(firing["dim_value"], "pos-2");
    assert_eq!(firing["at"], T0_MS + 61_000);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_alert_whose_rule_left_the_config_resolves_after_the_restart() {
    let with_rule = |config: &mut Config| {
        config.alerting.tick_ms = 100;
        config.alerts = vec![rule(
            "many-orders",
            "orders",
            "today",
            Condition::Above { value: 2.0 },
        )];
    };
    let node = start_node(with_rule).await;
    let events: Vec<Value> = (0..3)
        .map(|n| order(&format!("o-{n}"), 100, T0_MS))
        .collect();
    assert_eq!(node.post("demo-key", &events).await.body["accepted"], 3);
    assert_eq!(records_after(&node, 0, 1).await[0]["state"], "firing");
    let stopped = node.stop_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, |config| {
        config.alerting.tick_ms = 100;
    })
    .await;
    let records = records_after(&node, 1, 1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["rule"], "many-orders");
    assert_eq!(records[0]["state"], "resolved");
    assert!(
        node.get(Some("demo-key"), "/v1/alerts").await.body["alerts"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    node.stop().await;
}

/// The real binary, killed with SIGKILL while an alert fires: after the
/// restart the alert is still firing and no second `firing` record exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_killed_with_9_keeps_a_firing_alert_without_a_second_record() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let config = format!(
        "{}\n[[alerts]]\nid = \"many-orders\"\nmetric = \"orders\"\nwindow = \"today\"\n\
         condition = {{ type = \"above\", value = 2 }}\nseverity = \"P1\"\n",
        common::binary_config(port, dir.path()).replace(
            "tick_ms = 1000\n# Alert rules",
            "tick_ms = 100\n# Alert rules"
        )
    );
    assert!(
        config.contains("tick_ms = 100\n# Alert rules"),
        "the test's config overrides apply"
    );
    let config_path = dir.path().join("tally.toml");
    std::fs::write(&config_path, config).unwrap();
    let log = dir.path().join("log");
    let spawn = || common::spawn_binary(&config_path, &log);
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let records = |client: reqwest::Client, base: String| async move {
        let body: Value = client
            .get(format!("{base}/v1/alerts?since=0"))
            .bearer_auth("demo-key")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["records"].as_array().cloned().unwrap_or_default()
    };
    let mut child = spawn();
    common::wait_until_ready(&client, &mut child, &base, &log).await;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let body: Vec<String> = (0..3)
        .map(|n| order(&format!("o-{n}"), 100, now_ms).to_string())
        .collect();
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
    while records(client.clone(), base.clone()).await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no alert record");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    common::kill_9(&mut child);
    let mut child = spawn();
    common::wait_until_ready(&client, &mut child, &base, &log).await;
    // many ticks after the restart
    tokio::time::sleep(Duration::from_millis(800)).await;
    let states: Vec<(u64, String)> = records(client.clone(), base.clone())
        .await
        .iter()
        .map(|r| {
            (
                r["seq"].as_u64().unwrap(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(states, vec![(1, "firing".to_string())]);
    let alerts: Value = client
        .get(format!("{base}/v1/alerts"))
        .bearer_auth("demo-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(alerts["alerts"][0]["state"], "firing");
    let _ = child.kill();
    let _ = child.wait();
}
