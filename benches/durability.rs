//! Durability benches (figures in docs/BENCHMARKS.md):
//! - recovery: open the store and recover 100 100 series (a snapshot of 50
//!   tenants × 2 metrics × 1 001 series) plus 10 s of log at 100 000 events/s;
//! - durable ingest over HTTP (1 000-event NDJSON batches, 16 concurrent clients)
//!   with group commit and with one flush per batch, side by side.
//!
//! Run: `cargo bench --bench durability`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use tally::clock::SystemClock;
use tally::config::Config;
use tally::domain::dedup::id_key;
use tally::domain::event::{parse_event, validate_event, ValidEvent};
use tally::domain::metric::MetricState;
use tally::domain::time::second_of_ms;
use tally::storage::envelope::{encode, RecordKind};
use tally::storage::recovery::{recover, series_settings};
use tally::storage::snapshot::{snapshot_ops, HistoryBook, TenantSnapshot, WalBatchRef};
use tally::storage::{lsn_key, Op, SledStore, Space, Store};

const TENANTS: usize = 50;
const SKUS: usize = 1000;
const EVENTS_PER_SKU: usize = 20;
const LOG_EVENTS_PER_S: usize = 100_000;
const LOG_SECONDS: usize = 10;
const BATCH: usize = 1000;

fn recovery_config(data_dir: &std::path::Path) -> Config {
    let mut text = format!(
        "[storage]\ndata_dir = \"{}\"\n[ingest]\ndedup_table_bytes_max = 1280000000\n",
        data_dir.display()
    );
    for tenant in 0..TENANTS {
        text.push_str(&format!(
            "[[tenants]]\nid = \"t{tenant}\"\napi_keys = [\"key-{tenant}\"]\ncurrency = \"USD\"\n"
        ));
    }
    text.push_str(
        "[[metrics]]\nname = \"gmv\"\nkind = \"sum\"\ntypes = [\"order.completed\"]\ndims = [\"sku\"]\n\
         [[metrics]]\nname = \"orders\"\nkind = \"count\"\ntypes = [\"order.completed\"]\ndims = [\"sku\"]\n",
    );
    Config::parse(&text, Vec::new()).unwrap()
}

fn order(config: &Config, id: String, ts_ms: i64, sku: usize, now_ms: i64) -> ValidEvent {
    let catalogue = config.catalogue().unwrap();
    let limits = config.event_limits();
    let json = format!(
        "{{\"id\":\"{id}\",\"type\":\"order.completed\",\"ts\":{ts_ms},\"amount\":{},\"currency\":\"USD\",\"dims\":{{\"sku\":\"sku-{sku}\"}}}}",
        1000 + sku
    );
    let raw = parse_event(json.as_bytes()).unwrap();
    let context = tally::domain::event::ValidationContext {
        currency: "USD",
        catalogue: &catalogue,
        limits: &limits,
    };
    validate_event(&raw, &context, now_ms, now_ms).unwrap()
}

/// Writes the snapshot and the log of the recovery bench into `dir`.
fn build_recovery_fixture(dir: &std::path::Path, now_ms: i64) -> Config {
    let config = recovery_config(dir);
    let catalogue = config.catalogue().unwrap();
    let template = order(&config, "x".into(), now_ms, 0, now_ms);
    let store = SledStore::open(dir).unwrap();
    let settings = series_settings(&config, chrono_tz::Tz::UTC);
    let mut parts = Vec::new();
    let mut series = 0;
    for tenant in 0..TENANTS {
        let mut events = Vec::with_capacity(SKUS * EVENTS_PER_SKU);
        for sku in 0..SKUS {
            for n in 0..EVENTS_PER_SKU {
                let mut event = template.clone();
                event.id = format!("s-{tenant}-{sku}-{n}");
                event.ts_ms = now_ms - 20_000 - ((sku * 37 + n * 997) % 880_000) as i64;
                event.amount = Some(1000 + sku as i64);
                event.dims = vec![("sku".into(), format!("sku-{sku}"))];
                events.push(event);
            }
        }
        let mut metrics = Vec::new();
        for (index, def) in catalogue.metrics().iter().enumerate() {
            let mut state = MetricState::new(index, def, settings, now_ms - 20_000);
            state.apply(&events, now_ms - 20_000);
            series += 1 + SKUS;
            metrics.push((def.name.clone(), state.export()));
        }
        parts.push(TenantSnapshot {
            tenant: format!("t{tenant}"),
            position_lsn: 0,
            now_ms: now_ms - 20_000,
            dedup: events
                .iter()
                .map(|e| (id_key(&e.id), second_of_ms(e.ts_ms)))
                .collect(),
            metrics,
            runs: Vec::new(),
            experiments: Vec::new(),
            history_extents: Vec::new(),
        });
    }
    store
        .apply(
            &snapshot_ops(1, now_ms, &mut parts, 1 << 30, &HistoryBook::default())
                .unwrap()
                .0,
        )
        .unwrap();
    // 10 s of log after the snapshot, 1 000-event batches, round-robin tenants
    let records = LOG_EVENTS_PER_S * LOG_SECONDS / BATCH;
    for lsn in 1..=records as u64 {
        let tenant = format!("t{}", lsn as usize % TENANTS);
        let events: Vec<ValidEvent> = (0..BATCH)
            .map(|n| {
                let mut event = template.clone();
                event.id = format!("w-{lsn}-{n}");
                event.ts_ms = now_ms - 10_000 + (lsn as i64 * 10_000 / records as i64);
                event.dims = vec![("sku".into(), format!("sku-{}", n % SKUS))];
                event
            })
            .collect();
        let record = WalBatchRef {
            tenant: &tenant,
            now_ms: now_ms - 10_000 + (lsn as i64 * 10_000 / records as i64),
            events: &events,
        };
        store
            .apply(&[Op::Put {
                space: Space::Wal,
                key: lsn_key(lsn).to_vec(),
                value: encode(RecordKind::WalBatch, &record).unwrap(),
            }])
            .unwrap();
    }
    store.flush().unwrap();
    eprintln!(
        "recovery fixture: {series} series, {} log records of {BATCH} events",
        records
    );
    config
}

fn recovery(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let now_ms = tally::clock::Clock::now_ms(&SystemClock);
    let config = build_recovery_fixture(dir.path(), now_ms);
    let contexts = config.check().unwrap().tenant_contexts();
    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));
    group.bench_function("open_and_recover_100k_series_10s_log", |b| {
        b.iter(|| {
            let store = SledStore::open(dir.path()).unwrap();
            let recovered = recover(&store, &config, &contexts, now_ms).unwrap();
            assert_eq!(
                recovered.report.records_replayed as usize,
                LOG_EVENTS_PER_S * LOG_SECONDS / BATCH
            );
            recovered.tenants.len()
        })
    });
    group.finish();
}

fn ndjson_batch(prefix: &str, batch: usize) -> String {
    let mut body = String::with_capacity(batch * 110);
    for n in 0..batch {
        body.push_str(&format!(
            "{{\"id\":\"{prefix}-{n}\",\"type\":\"order.completed\",\"amount\":{},\"currency\":\"USD\",\"dims\":{{\"device\":\"ios\"}}}}\n",
            100 + n
        ));
    }
    body
}

fn durable_ingest(c: &mut Criterion) {
    const CLIENTS: usize = 16;
    const BATCHES_PER_ITER: usize = 64;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("durable_ingest");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements((BATCHES_PER_ITER * BATCH) as u64));
    for group_commit in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = common::node_config(dir.path(), 50_000_000);
        config.storage.group_commit = group_commit;
        let running = runtime
            .block_on(tally::app::start(config, Arc::new(SystemClock)))
            .unwrap();
        let url = format!("http://{}/v1/events", running.local_addr);
        let client = reqwest::Client::new();
        let mut round = 0usize;
        let name = if group_commit {
            "group_commit"
        } else {
            "flush_per_batch"
        };
        group.bench_function(format!("{name}_16_clients_1000_event_batches"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    round += 1;
                    let bodies: Vec<String> = (0..BATCHES_PER_ITER)
                        .map(|batch| ndjson_batch(&format!("r{round}-b{batch}"), BATCH))
                        .collect();
                    let started = Instant::now();
                    runtime.block_on(async {
                        let bodies = Arc::new(bodies);
                        let mut tasks = Vec::new();
                        for worker in 0..CLIENTS {
                            let (client, url, bodies) =
                                (client.clone(), url.clone(), Arc::clone(&bodies));
                            tasks.push(tokio::spawn(async move {
                                for batch in (worker..BATCHES_PER_ITER).step_by(CLIENTS) {
                                    let response = client
                                        .post(&url)
                                        .bearer_auth("demo-key")
                                        .header("content-type", "application/x-ndjson")
                                        .body(bodies[batch].clone())
                                        .send()
                                        .await
                                        .unwrap();
                                    assert!(
                                        response.status().is_success(),
                                        "{}",
                                        response.status()
                                    );
                                }
                            }));
                        }
                        for task in tasks {
                            task.await.unwrap();
                        }
                    });
                    total += started.elapsed();
                }
                total
            })
        });
        let stats = &running.node.committer.stats;
        let flushes = stats
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1);
        let write_sets = stats.write_sets.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "{name}: {write_sets} write sets in {flushes} flushes ({:.1} per flush)",
            write_sets as f64 / flushes as f64
        );
        runtime.block_on(running.shutdown());
    }
    group.finish();
}

criterion_group!(benches, durable_ingest, recovery);
criterion_main!(benches);
