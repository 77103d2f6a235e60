//! Experiment costs (docs/BENCHMARKS.md, "Experiments"):
//! - `variant_counting`: what counting per variant adds to applying a batch
//!   of 1 000 attributed events to a metric (`MetricState::apply_batch`),
//!   against the same batch with no experiment watched;
//! - `experiment_tick`: one look at a tenant's 100 experiments (the shipped
//!   `experiments.per_tenant_max`), three guardrails each, through the real
//!   read path of an in-process node (`experiments::evaluate_tenant`);
//! - `signal_latency`: breach → signal on a real WebSocket client, on the
//!   shipped `experiments.tick_ms`;
//! - `enrichment`: what a lookup adds to an event on the ingest path.

mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};

use tally::clock::{Clock, ManualClock};
use tally::domain::event::ValidEvent;
use tally::domain::metric::{MetricState, Watched};

const T0_MS: i64 = 1_763_805_600_000;

fn spec(min_samples: u64) -> Value {
    json!({"variants": ["A", "B"], "control": "A", "split": {"A": 0.5, "B": 0.5},
           "min_samples": min_samples,
           "guardrails": [
             {"metric": "error_rate", "compare": "ratio", "threshold": 2.0, "action": "stop"},
             {"metric": "payment_failure_rate", "compare": "delta", "threshold": 0.01, "action": "pause"},
             {"metric": "checkout_latency_ms", "stat": "p95", "compare": "delta", "threshold": 200, "action": "stop"}]})
}

fn variant_counting(c: &mut Criterion) {
    let config = common::default_config();
    let catalogue = config.catalogue().unwrap();
    let index = catalogue.index_of("error_rate").unwrap();
    let def = &catalogue.metrics()[index];
    let settings = tally::storage::recovery::series_settings(&config, chrono_tz::Tz::UTC);
    let events: Vec<ValidEvent> = (0..1_000)
        .map(|n| {
            let event_type = if n % 50 == 0 {
                "request.failed"
            } else {
                "request.succeeded"
            };
            ValidEvent {
                id: format!("e-{n}"),
                event_type: event_type.into(),
                ts_ms: T0_MS,
                amount: None,
                value: None,
                value_integer: None,
                dims: vec![],
                experiments: vec![(
                    "checkout-v2".into(),
                    if n % 2 == 0 { "A" } else { "B" }.into(),
                )],
                route: catalogue.route(event_type),
            }
        })
        .collect();
    let watched = Watched {
        experiment: "checkout-v2".into(),
        variants: vec!["A".into(), "B".into()],
        metrics: 1 << index,
        started_ms: T0_MS,
        epoch_ms: T0_MS,
    };
    let mut group = c.benchmark_group("variant_counting");
    for (name, watching) in [
        ("no_experiment_watched", false),
        ("one_experiment_watched", true),
    ] {
        let mut state = MetricState::new(index, def, settings, T0_MS);
        if watching {
            state.watch(std::slice::from_ref(&watched), T0_MS);
        }
        group.bench_function(format!("{name}_1000_events"), |b| {
            b.iter(|| black_box(state.apply_batch(&events, T0_MS, T0_MS)))
        });
    }
    group.finish();
}

async fn put(client: &reqwest::Client, base: &str, id: &str, spec: &Value) {
    let reply = client
        .put(format!("{base}/v1/experiments/{id}"))
        .bearer_auth("demo-key")
        .json(spec)
        .send()
        .await
        .unwrap();
    assert!(reply.status().is_success(), "{}", reply.status());
}

async fn post(client: &reqwest::Client, base: &str, events: &[Value]) {
    let body: Vec<String> = events.iter().map(Value::to_string).collect();
    let reply = client
        .post(format!("{base}/v1/events"))
        .bearer_auth("demo-key")
        .header("content-type", "application/x-ndjson")
        .body(body.join("\n"))
        .send()
        .await
        .unwrap();
    assert!(reply.status().is_success(), "{}", reply.status());
}

/// `count` events of each guarded metric for `variant`, none of them bad.
fn quiet_events(
    prefix: &str,
    experiment: &str,
    variant: &str,
    count: usize,
    ts_ms: i64,
) -> Vec<Value> {
    let mut events = Vec::with_capacity(count * 3);
    for n in 0..count {
        let attribution = json!({ experiment: variant });
        events.push(json!({"id": format!("{prefix}-r{n}"), "type": "request.succeeded", "ts": ts_ms, "experiments": attribution}));
        events.push(json!({"id": format!("{prefix}-p{n}"), "type": "payment.captured", "ts": ts_ms, "amount": 100, "currency": "USD", "experiments": attribution}));
        events.push(json!({"id": format!("{prefix}-c{n}"), "type": "checkout.completed", "ts": ts_ms, "value": 100 + n % 300, "experiments": attribution}));
    }
    events
}

fn experiment_tick(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::node_config(dir.path(), 2_000_000);
    // the engine's own tick out of the way: the bench looks
    config.experiments.tick_ms = 60_000;
    let clock = ManualClock::new(T0_MS);
    let running = runtime
        .block_on(tally::app::start(config, Arc::new(clock.clone())))
        .unwrap();
    let node = Arc::clone(&running.node);
    let base = format!("http://{}", running.local_addr);
    let client = reqwest::Client::new();
    runtime.block_on(async {
        for n in 0..100 {
            put(&client, &base, &format!("e{n}"), &spec(1_000)).await;
        }
        clock.advance_ms(1_000);
        // 2 000 events a variant of each guarded metric in every experiment
        for n in 0..100 {
            for variant in ["A", "B"] {
                let events = quiet_events(
                    &format!("e{n}{variant}"),
                    &format!("e{n}"),
                    variant,
                    2_000,
                    T0_MS + 1_000,
                );
                for chunk in events.chunks(1_000) {
                    post(&client, &base, chunk).await;
                }
            }
        }
    });
    let experiments = node.experiments.get("demo").unwrap();
    let mut group = c.benchmark_group("experiment_tick");
    group.sample_size(20);
    group.bench_function("100_experiments_3_guardrails", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let signals = tally::experiments::evaluate_tenant(&node, "demo", &experiments)
                    .await
                    .unwrap();
                assert_eq!(signals, 0);
            })
        })
    });
    group.finish();
    runtime.block_on(running.shutdown());
}

/// Breach → signal → WebSocket client: from the POST of a batch whose
/// treatment fails half its requests (control 2 %) to the client holding the
/// `stop` signal, on
/// the shipped `experiments.tick_ms` (1 000), each breach at a different
/// point of a tick. Each breach is a new experiment (the last one deleted),
/// registered untimed.
fn signal_latency(c: &mut Criterion) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = common::node_config(dir.path(), 2_000_000);
    let clock = ManualClock::new(chrono::Utc::now().timestamp_millis());
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
        let subscribe = json!({"op": "subscribe", "id": "s", "topic": "signals", "since": 0});
        socket
            .send(Message::Text(subscribe.to_string().into()))
            .await
            .unwrap();
        socket
    });
    let stop_spec = json!({"variants": ["A", "B"], "control": "A", "split": {"A": 0.5, "B": 0.5},
        "min_samples": 100,
        "guardrails": [{"metric": "error_rate", "compare": "ratio", "threshold": 2.0, "action": "stop"}]});
    let mut sent = 0u64;
    let mut group = c.benchmark_group("signal_latency");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(30));
    group.bench_function("breach_to_websocket_client", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    sent += 1;
                    let id = format!("l{sent}");
                    put(&client, &base, &id, &stop_spec).await;
                    clock.advance_ms(1);
                    // breaches come at any point of a tick, not just after one
                    let offset_ms = sent.wrapping_mul(6_364_136_223_846_793_005) >> 54;
                    tokio::time::sleep(Duration::from_millis(offset_ms % 1_000)).await;
                    let now_ms = clock.now_ms();
                    // control fails 2 %, treatment 50 %: one batch is evidence enough
                    let mut events = Vec::with_capacity(2_000);
                    for n in 0..1_000 {
                        let (a, b) = (n < 20, n < 500);
                        let kind = |failed: bool| if failed { "request.failed" } else { "request.succeeded" };
                        events.push(json!({"id": format!("{id}-a{n}"), "type": kind(a), "ts": now_ms, "experiments": {&id: "A"}}));
                        events.push(json!({"id": format!("{id}-b{n}"), "type": kind(b), "ts": now_ms, "experiments": {&id: "B"}}));
                    }
                    let started = std::time::Instant::now();
                    post(&client, &base, &events).await;
                    loop {
                        let text = match socket.next().await {
                            Some(Ok(Message::Text(text))) => text,
                            Some(Ok(_)) => continue,
                            other => panic!("the live connection ended: {other:?}"),
                        };
                        let signal: Value = serde_json::from_str(&text).unwrap();
                        if signal["experiment"] == id.as_str() && signal["action"] == "stop" {
                            break;
                        }
                    }
                    total += started.elapsed();
                    let reply = client
                        .delete(format!("{base}/v1/experiments/{id}"))
                        .bearer_auth("demo-key")
                        .send()
                        .await
                        .unwrap();
                    assert!(reply.status().is_success());
                }
                total
            })
        })
    });
    group.finish();
    runtime.block_on(running.shutdown());
}

/// What an enrichment adds on the ingest path: `domain::enrich::enrich` on
/// 1 000 events against a table of 100 000 stores (the shipped
/// `lookups.rows_per_table_max`), every event a hit.
fn enrichment(c: &mut Criterion) {
    use tally::domain::enrich::{enrich, Enrichment, OnMiss, Table, Tables};
    let config = common::default_config();
    let catalogue = config.catalogue().unwrap();
    let stores: Table = (0..100_000)
        .map(|n| (format!("s-{n}"), vec![format!("region-{}", n % 50)]))
        .collect();
    let tables: Tables = [("stores".to_string(), Arc::new(stores))].into();
    let enrichments = [Enrichment {
        table: "stores".into(),
        key: "store".into(),
        adds: vec!["region".into()],
        on_miss: OnMiss::Quarantine,
    }];
    let events: Vec<ValidEvent> = (0..1_000)
        .map(|n| ValidEvent {
            id: format!("o-{n}"),
            event_type: "order.completed".into(),
            ts_ms: T0_MS,
            amount: Some(100),
            value: None,
            value_integer: None,
            dims: vec![("store".into(), format!("s-{}", n * 97 % 100_000))],
            experiments: vec![],
            route: catalogue.route("order.completed"),
        })
        .collect();
    c.bench_function("enrich_1000_events_100000_rows", |b| {
        b.iter(|| {
            let mut batch = events.clone();
            for event in &mut batch {
                enrich(event, &enrichments, &tables).unwrap();
            }
            black_box(batch)
        })
    });
    c.bench_function("clone_1000_events_alone", |b| {
        b.iter(|| black_box(events.clone()))
    });
}

criterion_group!(
    benches,
    variant_counting,
    experiment_tick,
    signal_latency,
    enrichment
);
criterion_main!(benches);
