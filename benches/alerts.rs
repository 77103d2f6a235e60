//! Alert evaluation cost (docs/BENCHMARKS.md, "Alerts"): one tick of a tenant
//! with 1 000 rules, each by a dim with 1 000 values (1 000 000 alerts), and
//! with 1 000 rules without `by`; through the real read path of an in-process
//! node, as the engine runs it (`alerting::evaluate_tenant`). The engine's own
//! tick is set to a minute so that it does not run beside the bench.

mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;

use tally::clock::{Clock, SystemClock};
use tally::config::RuleConfig;
use tally::domain::alert::Condition;

fn rules(count: usize, by: Option<&str>) -> Vec<RuleConfig> {
    (0..count)
        .map(|n| RuleConfig {
            id: format!("r{n}"),
            tenants: vec!["demo".into()],
            metric: "orders".into(),
            window: "15m".into(),
            // never breached: the cost of judging, not of writing records
            condition: Condition::Above {
                value: 1e12 + n as f64,
            },
            by: by.map(str::to_string),
            min_count: 0,
            for_s: 0,
            severity: "P2".into(),
            runbook: None,
        })
        .collect()
}

fn evaluation(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("alert_tick");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    for (name, by) in [
        ("1000_rules_by_1000_values", Some("device")),
        ("1000_rules", None),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = common::node_config(dir.path(), 2_000_000);
        config.alerting.tick_ms = 60_000;
        config.alerts = rules(1_000, by);
        let running = runtime
            .block_on(tally::app::start(config, Arc::new(SystemClock)))
            .unwrap();
        let node = Arc::clone(&running.node);
        // 999 devices and one more folded into __other__: 1 000 values
        let client = reqwest::Client::new();
        let base = format!("http://{}", running.local_addr);
        let now_ms = node.now_ms();
        let body: Vec<String> = (0..5_000)
            .map(|n| {
                json!({"id": format!("o-{n}"), "type": "order.completed", "ts": now_ms,
                       "amount": 100, "currency": "USD", "dims": {"device": format!("pos-{}", n % 1_000)}})
                .to_string()
            })
            .collect();
        runtime.block_on(async {
            let reply = client
                .post(format!("{base}/v1/events"))
                .bearer_auth("demo-key")
                .header("content-type", "application/x-ndjson")
                .body(body.join("\n"))
                .send()
                .await
                .unwrap();
            assert!(reply.status().is_success());
        });
        let alerts = node.alerts.get("demo").unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                runtime
                    .block_on(tally::alerting::evaluate_tenant(&node, "demo", &alerts))
                    .unwrap()
            })
        });
        runtime.block_on(running.shutdown());
    }
    group.finish();
}

/// Breach → record → WebSocket client: the time from the POST that breaches a
/// rule (30-second `orders` above 0, `for_s` 0) to the client receiving its
/// `firing` record, on the shipped `alerting.tick_ms` (1 000), each breach at
/// a different point of a tick. The node's clock is manual: between breaches it
/// moves 31 s so that the alert resolves.
fn latency(c: &mut Criterion) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::node_config(dir.path(), 2_000_000);
    let mut rule = rules(1, None).remove(0);
    rule.window = "30s".into();
    rule.condition = Condition::Above { value: 0.0 };
    config.alerts = vec![rule];
    let clock = tally::clock::ManualClock::new(chrono::Utc::now().timestamp_millis());
    let running = runtime
        .block_on(tally::app::start(config, Arc::new(clock.clone())))
        .unwrap();
    let base = format!("http://{}", running.local_addr);
    let client = reqwest::Client::new();
    let mut request = format!("ws://{}/v1/live", running.local_addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer demo-key".parse().unwrap());
    let mut socket = runtime.block_on(async {
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let subscribe = json!({"op": "subscribe", "id": "a", "topic": "alerts", "since": 0});
        socket
            .send(Message::Text(subscribe.to_string().into()))
            .await
            .unwrap();
        socket
    });
    let mut sent = 0u64;
    let mut group = c.benchmark_group("alert_latency");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(30));
    group.bench_function("breach_to_websocket_client", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    sent += 1;
                    // breaches come at any point of a tick, not just after one
                    let offset_ms = sent.wrapping_mul(6_364_136_223_846_793_005) >> 54;
                    tokio::time::sleep(Duration::from_millis(offset_ms % 1_000)).await;
                    let now_ms = clock.now_ms();
                    let event = json!({"id": format!("l-{sent}"), "type": "order.completed", "ts": now_ms,
                                       "amount": 100, "currency": "USD"});
                    let started = std::time::Instant::now();
                    let reply = client
                        .post(format!("{base}/v1/events"))
                        .bearer_auth("demo-key")
                        .header("content-type", "application/x-ndjson")
                        .body(event.to_string())
                        .send()
                        .await
                        .unwrap();
                    assert!(reply.status().is_success());
                    loop {
                        let text = match socket.next().await {
                            Some(Ok(Message::Text(text))) => text,
                            Some(Ok(_)) => continue,
                            other => panic!("the live connection ended: {other:?}"),
                        };
                        let record: serde_json::Value = serde_json::from_str(&text).unwrap();
                        if record["state"] == "firing" {
                            break;
                        }
                    }
                    total += started.elapsed();
                    // the window empties: wait for the resolve, untimed
                    clock.advance_ms(31_000);
                    loop {
                        let text = match socket.next().await {
                            Some(Ok(Message::Text(text))) => text,
                            Some(Ok(_)) => continue,
                            other => panic!("the live connection ended: {other:?}"),
                        };
                        let record: serde_json::Value = serde_json::from_str(&text).unwrap();
                        if record["state"] == "resolved" {
                            break;
                        }
                    }
                }
                total
            })
        })
    });
    group.finish();
    runtime.block_on(running.shutdown());
}

criterion_group!(benches, evaluation, latency);
criterion_main!(benches);
