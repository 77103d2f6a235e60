//! `GET /metrics` (API.md §9) against the real tools: `promtool check metrics`
//! on a scrape of a loaded node, and a real `prometheus` server scraping the real
//! `tally` binary and answering its HTTP query API with the exact values.
//! Both tools come from Debian's `prometheus` package, which `scripts/test`
//! installs; a missing tool fails these tests, it does not skip them.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use common::{free_port, order, start_node, T0_MS};

fn tool(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let path = format!("{dir}/{name}");
        if std::path::Path::new(&path).exists() {
            return path;
        }
    }
    panic!("{name} is not installed: run scripts/test, which installs Debian's prometheus package");
}

async fn scrape(node: &common::TestNode, token: Option<&str>) -> (StatusCode, String) {
    let mut request = node.client.get(format!("{}/metrics", node.base));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

fn samples<'t>(text: &'t str, family: &str) -> Vec<&'t str> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{family}{{")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_scrape_of_a_loaded_node() {
    let node = start_node(|_| {}).await;
    let events = [
        order("o-1", 1250, T0_MS),
        order("o-2", 800, T0_MS - 40_000),
        json!({"id": "c-1", "type": "checkout.completed", "value": 212}),
        json!({"id": "c-2", "type": "checkout.completed", "value": 455}),
        json!({"id": "p-1", "type": "payment.failed"}),
        json!({"id": "p-2", "type": "payment.captured"}),
        json!({"id": "u-1", "type": "units.earned", "value": 5}),
    ];
    assert_eq!(node.post("demo-key", &events).await.body["accepted"], 7);
    node.post_raw(Some("demo-key"), "application/x-ndjson", "not json")
        .await;
    node.running
        .as_ref()
        .unwrap()
        .node
        .take_snapshot()
        .await
        .unwrap();
    let (status, text) = scrape(&node, Some("admin-key")).await;
    assert_eq!(status, StatusCode::OK);

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &text).unwrap();
    let checked = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(file.path()).unwrap())
        .output()
        .unwrap();
    let problems = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        checked.status.success() && problems.trim().is_empty(),
        "promtool found problems:\n{problems}"
    );

    // exact window values, one family each
    let values = samples(&text, "tally_window_value");
    for expected in [
        r#"tally_window_value{tenant="demo",metric="gmv",window="30s"} 1250"#,
        r#"tally_window_value{tenant="demo",metric="gmv",window="today"} 2050"#,
        r#"tally_window_value{tenant="demo",metric="orders",window="15m"} 2"#,
        r#"tally_window_value{tenant="demo",metric="payment_failure_rate",window="30s"} 0.5"#,
        r#"tally_window_value{tenant="demo",metric="aov",window="today"} 1025"#,
    ] {
        assert!(
            values.contains(&expected),
            "{expected} missing from:\n{}",
            values.join("\n")
        );
    }
    assert!(samples(&text, "tally_window_prev_value")
        .contains(&r#"tally_window_prev_value{tenant="demo",metric="gmv",window="30s"} 800"#));
    let quantiles = samples(&text, "tally_window_quantile");
    assert!(quantiles.contains(&r#"tally_window_quantile{tenant="demo",metric="checkout_latency_ms",window="15m",quantile="0.5"} 212"#));
    assert!(quantiles.contains(&r#"tally_window_quantile{tenant="demo",metric="checkout_latency_ms",window="15m",quantile="0.99"} 455"#));
    // a mean with nothing to divide by has no sample rather than NaN
    assert!(!values.iter().any(|line| line.contains(r#"metric="cpm""#)));
    // node telemetry is there too
    for family in [
        "tally_events_total",
        "tally_events_quarantined_by_reason_total",
        "tally_ingest_request_duration_seconds_bucket",
        "tally_wal_flush_duration_seconds_bucket",
        "tally_wal_write_sets_per_flush_bucket",
        "tally_snapshot_duration_seconds_bucket",
        "tally_actor_messages_total",
        "tally_quarantine_events",
    ] {
        assert!(text.contains(&format!("\n{family}")), "{family} missing");
    }
    assert!(text.contains("\nprocess_resident_memory_bytes "));
    assert!(text.contains("\nprocess_cpu_seconds_total "));
    assert!(text.contains("\nprocess_open_fds "));
    assert!(text.contains("\ntally_snapshot_size_bytes "));
    assert!(text.contains("\ntally_recovery_duration_seconds "));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_protects_the_route() {
    let node = start_node(|config| config.prometheus.bearer_token = "scrape-secret".into()).await;
    node.post("demo-key", &[order("o-1", 1250, T0_MS)]).await;
    assert_eq!(scrape(&node, None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        scrape(&node, Some("not-a-key")).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, text) = scrape(&node, Some("scrape-secret")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("tally_window_value{tenant=\"demo\""));
    assert!(text.contains("tally_window_value{tenant=\"acme\""));
    // a tenant key still reads its own values (API.md §9)
    let (status, text) = scrape(&node, Some("demo-key")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("tally_window_value{tenant=\"demo\",metric=\"gmv\",window=\"30s\"} 1250"));
    node.stop().await;
}

/// Tenant data on /metrics only for a key that may read it: nothing of any
/// tenant without a key, a tenant key its own tenant's only, an admin key
/// every tenant's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_each_caller_only_the_tenants_it_may_read() {
    let node = start_node(|_| {}).await;
    node.post("demo-key", &[order("o-1", 1250, T0_MS)]).await;
    let acme_order = json!({"id": "a-1", "type": "order.completed", "ts": T0_MS, "amount": 99, "currency": "EUR"});
    assert_eq!(
        node.post("acme-key", &[acme_order]).await.body["accepted"],
        1
    );
    // a quarantined event gives each tenant a tenant-labelled telemetry sample
    node.post(
        "demo-key",
        &[json!({"id": "q-1", "type": "order.completed", "amount": 5, "currency": "JPY"})],
    )
    .await;
    node.post(
        "acme-key",
        &[json!({"id": "q-2", "type": "order.completed", "amount": 5, "currency": "JPY"})],
    )
    .await;

    let (status, anonymous) = scrape(&node, None).await;
    assert_eq!(status, StatusCode::OK);
    let tenant_lines: Vec<&str> = anonymous
        .lines()
        .filter(|line| line.contains("tenant=\""))
        .collect();
    assert_eq!(
        tenant_lines,
        Vec::<&str>::new(),
        "no tenant's samples without a key"
    );
    assert!(anonymous.contains("\ntally_events_total{outcome=\"accepted\"} "));

    let (_, demo) = scrape(&node, Some("demo-key")).await;
    assert!(demo.contains("tally_window_value{tenant=\"demo\",metric=\"gmv\",window=\"30s\"} 1250"));
    assert!(
        demo.contains("tally_quarantine_events{tenant=\"demo\"} 1"),
        "{demo}"
    );
    assert!(!demo.contains("acme"), "demo's scrape names acme:\n{demo}");
    // node-wide figures sum every tenant's traffic: not for a tenant key
    assert!(!demo.contains("\ntally_events_total{"));

    let (_, admin) = scrape(&node, Some("admin-key")).await;
    assert!(admin.contains("tally_window_value{tenant=\"acme\",metric=\"gmv\",window=\"30s\"} 99"));
    assert!(
        admin.contains("tally_window_value{tenant=\"demo\",metric=\"gmv\",window=\"30s\"} 1250")
    );
    assert_eq!(
        scrape(&node, Some("not-a-key")).await.0,
        StatusCode::UNAUTHORIZED
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_samples_stop_at_the_cap_and_the_rest_is_counted() {
    let node = start_node(|config| config.prometheus.tenant_series_max = 5).await;
    node.post("demo-key", &[order("o-1", 1250, T0_MS)]).await;
    let (_, text) = scrape(&node, Some("admin-key")).await;
    let tenant_samples = text
        .lines()
        .filter(|line| line.starts_with("tally_window_"))
        .count();
    assert_eq!(tenant_samples, 5);
    let dropped: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("tally_tenant_series_dropped_total "))
        .expect("the dropped counter is exposed")
        .parse()
        .unwrap();
    assert!(dropped > 100.0, "{dropped}");
    // and without tenant values none are exposed at all
    node.stop().await;
    let node = start_node(|config| config.prometheus.tenant_values = false).await;
    let (_, text) = scrape(&node, Some("admin-key")).await;
    assert!(!text.contains("tally_window_value{"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_have_their_own_listener() {
    let node = start_node(|config| config.prometheus.listen = "127.0.0.1:0".into()).await;
    assert_eq!(scrape(&node, None).await.0, StatusCode::NOT_FOUND);
    let addr = node.running.as_ref().unwrap().metrics_addr.unwrap();
    let text = reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .bearer_auth("admin-key")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("tally_window_value{"));
    node.stop().await;
}

/// Polls Prometheus's query API until `query` has `expected` as its value.
async fn wait_for_value(client: &reqwest::Client, prometheus: &str, query: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Ok(response) = client
            .get(format!("{prometheus}/api/v1/query"))
            .query(&[("query", query)])
            .send()
            .await
        {
            if let Ok(body) = response.json::<Value>().await {
                if body["data"]["result"][0]["value"][1] == expected {
                    return;
                }
                last = body;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("prometheus never answered {query} = {expected}; last answer: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_exact_values() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/default.toml"), common::DEFAULT_TOML).unwrap();
    let node_port = free_port();
    let mut node = Command::new(env!("CARGO_BIN_EXE_tally"))
        .current_dir(dir.path())
        .env("TALLY_SERVER__LISTEN", format!("127.0.0.1:{node_port}"))
        // Prometheus scrapes with the scrape token (tenant values need a key)
        .env("TALLY_PROMETHEUS__BEARER_TOKEN", "scrape-secret")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let prometheus_port = free_port();
    let scrape_config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tally\n    authorization:\n      type: Bearer\n      credentials: scrape-secret\n    static_configs:\n      - targets: ['127.0.0.1:{node_port}']\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), scrape_config).unwrap();
    let mut prometheus = Command::new(tool("prometheus"))
        .current_dir(dir.path())
        .args([
            "--config.file=prometheus.yml",
            "--storage.tsdb.path=tsdb",
            &format!("--web.listen-address=127.0.0.1:{prometheus_port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{node_port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let reply = loop {
        let sent = client
            .post(format!("{base}/v1/events"))
            .bearer_auth("demo-key")
            .header("content-type", "application/x-ndjson")
            .body(
                [
                    json!({"id": "o-1", "type": "order.completed", "amount": 1250, "currency": "USD"}),
                    json!({"id": "o-2", "type": "order.completed", "amount": 800, "currency": "USD"}),
                    json!({"id": "o-3", "type": "order.completed", "amount": 2150, "currency": "USD"}),
                ]
                .map(|event| event.to_string())
                .join("\n"),
            )
            .send()
            .await;
        if let Ok(response) = sent {
            break response.json::<Value>().await.unwrap();
        }
        assert!(Instant::now() < deadline, "tally did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reply["accepted"], 3);

    let prometheus_url = format!("http://127.0.0.1:{prometheus_port}");
    wait_for_value(
        &client,
        &prometheus_url,
        r#"tally_window_value{tenant="demo",metric="gmv",window="today"}"#,
        "4200",
    )
    .await;
    wait_for_value(
        &client,
        &prometheus_url,
        r#"tally_events_total{outcome="accepted"}"#,
        "3",
    )
    .await;
    let _ = prometheus.kill();
    let _ = node.kill();
    let _ = prometheus.wait();
    let _ = node.wait();
}

/// The value of one sample line in a scrape, if there.
fn sample_value(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(line_start))
        .and_then(|value| value.trim().parse().ok())
}

/// Freshness on /metrics: event time → acknowledged, per tenant, exact in
/// its buckets and sum; acknowledged → on a watched live feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_is_measured_from_event_time_and_to_the_live_feed() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let node = start_node(|_| {}).await;
    let sum = r#"tally_event_freshness_seconds_sum{tenant="acme"} "#;
    let within_2_5 = r#"tally_event_freshness_seconds_bucket{tenant="acme",le="2.5"} "#;
    let within_1 = r#"tally_event_freshness_seconds_bucket{tenant="acme",le="1"} "#;
    let (_, before) = scrape(&node, Some("admin-key")).await;
    let before = |line| sample_value(&before, line).unwrap_or(0.0);
    let (sum_before, le_2_5_before, le_1_before) =
        (before(sum), before(within_2_5), before(within_1));
    // a watcher of acme's feed, so that frames are read
    let url = format!("{}/v1/live", node.base.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer acme-key".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let subscribe = json!({"op": "subscribe", "id": "s", "metrics": ["gmv"], "interval_ms": 100});
    socket
        .send(tokio_tungstenite::tungstenite::Message::Text(
            subscribe.to_string().into(),
        ))
        .await
        .unwrap();
    // watched once the snapshot came
    let snapshot = common::next_within(&mut socket, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(snapshot["type"], "snapshot");
    // ten events two seconds old when acknowledged (the clock is manual)
    let events: Vec<Value> = (0..10)
        .map(|n| json!({"id": format!("f-{n}"), "type": "order.completed", "ts": T0_MS - 2_000, "amount": 5, "currency": "EUR"}))
        .collect();
    assert_eq!(node.post("acme-key", &events).await.body["accepted"], 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = scrape(&node, Some("admin-key")).await;
        let after = |line| sample_value(&text, line).unwrap_or(0.0);
        let visible = sample_value(&text, r#"tally_live_visible_seconds_count{tenant="acme"} "#)
            .unwrap_or(0.0);
        if after(sum) - sum_before >= 20.0 && visible >= 1.0 {
            assert_eq!(after(sum) - sum_before, 20.0);
            assert_eq!(after(within_2_5) - le_2_5_before, 10.0);
            assert_eq!(after(within_1) - le_1_before, 0.0);
            break;
        }
        assert!(Instant::now() < deadline, "no freshness in:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.stop().await;
}
