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

use tally::clock::SystemClock;
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
        let alerts = Arc::clone(node.alerts.tenant("demo").unwrap());
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

criterion_group!(benches, evaluation);
criterion_main!(benches);
