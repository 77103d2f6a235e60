//! Benches of the ingest pipeline below HTTP (figures in docs/BENCHMARKS.md):
//! - `wal_append`: 1 000-event WAL records through the commit thread into
//!   sled, with group commit and with one flush per record, by how many
//!   records are in flight at once;
//! - `actor_ingest`: a validated 1 000-event batch through the tenant actor
//!   (de-dup, WAL record, group commit, then the metric actors), by the
//!   cardinality of the `country` dim (series per metric).
//!
//! Run: `cargo bench --bench pipeline`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use tally::actors::tenant::{EventOutcome, IngestBatch};
use tally::actors::InFlight;
use tally::clock::SystemClock;
use tally::domain::event::{parse_event, validate_event, ValidEvent, ValidationContext};
use tally::storage::commit::{Committer, FlushMode};
use tally::storage::envelope::{encode, RecordKind};
use tally::storage::snapshot::WalBatchRef;
use tally::storage::{lsn_key, Op, SharedStore, SledStore, Space};

const BATCH: usize = 1000;

fn order_json(id: &str, n: usize, countries: usize, ts_ms: i64) -> String {
    format!(
        "{{\"id\":\"{id}\",\"type\":\"order.completed\",\"ts\":{ts_ms},\"amount\":{},\"currency\":\"USD\",\"dims\":{{\"device\":\"d{}\",\"country\":\"c{}\"}}}}",
        500 + n,
        n % 3,
        (n * 7919) % countries
    )
}

fn validated(
    context: &ValidationContext,
    prefix: &str,
    countries: usize,
    now_ms: i64,
) -> Vec<ValidEvent> {
    (0..BATCH)
        .map(|n| {
            let json = order_json(&format!("{prefix}-{n}"), n, countries, now_ms);
            let raw = parse_event(json.as_bytes()).unwrap();
            validate_event(&raw, context, now_ms, now_ms).unwrap()
        })
        .collect()
}

fn wal_append(c: &mut Criterion) {
    const RECORDS_PER_ITER: usize = 64;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = common::default_config();
    let catalogue = config.catalogue().unwrap();
    let limits = config.event_limits();
    let context = ValidationContext {
        currency: "USD",
        catalogue: &catalogue,
        limits: &limits,
    };
    let now_ms = tally::clock::Clock::now_ms(&SystemClock);
    let events = validated(&context, "w", 50, now_ms);
    let record = encode(
        RecordKind::WalBatch,
        &WalBatchRef {
            tenant: "demo",
            now_ms,
            events: &events,
        },
    )
    .unwrap();
    eprintln!("wal record of {BATCH} events: {} bytes", record.len());
    let mut group = c.benchmark_group("wal_append");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements((RECORDS_PER_ITER * BATCH) as u64));
    for mode in [FlushMode::Group, FlushMode::EachWriteSet] {
        for in_flight in [1usize, 4, 16] {
            let dir = tempfile::tempdir().unwrap();
            let store: SharedStore = Arc::new(SledStore::open(dir.path()).unwrap());
            let (committer, thread) = Committer::start(store, 1024, mode).unwrap();
            let mut lsn = 0u64;
            let name = match mode {
                FlushMode::Group => "group_commit",
                FlushMode::EachWriteSet => "flush_per_record",
            };
            group.bench_with_input(
                BenchmarkId::new(name, format!("{in_flight}_in_flight")),
                &in_flight,
                |b, &in_flight| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let sets: Vec<Vec<Op>> = (0..RECORDS_PER_ITER)
                                .map(|_| {
                                    lsn += 1;
                                    vec![Op::Put {
                                        space: Space::Wal,
                                        key: lsn_key(lsn).to_vec(),
                                        value: record.clone(),
                                    }]
                                })
                                .collect();
                            let started = Instant::now();
                            runtime.block_on(async {
                                let mut tasks = Vec::new();
                                let mut sets = sets.into_iter();
                                for _ in 0..in_flight {
                                    let mine: Vec<Vec<Op>> =
                                        sets.by_ref().take(RECORDS_PER_ITER / in_flight).collect();
                                    let committer = committer.clone();
                                    tasks.push(tokio::spawn(async move {
                                        for ops in mine {
                                            committer.commit(ops).await.unwrap();
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
                },
            );
            let flushes = committer
                .stats
                .flushes
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(1);
            let sets = committer
                .stats
                .write_sets
                .load(std::sync::atomic::Ordering::Relaxed);
            eprintln!(
                "{name} {in_flight} in flight: {:.1} records per flush",
                sets as f64 / flushes as f64
            );
            drop(committer);
            thread.join().unwrap();
        }
    }
    group.finish();
}

fn actor_ingest(c: &mut Criterion) {
    const IN_FLIGHT: usize = 8;
    const BATCHES_PER_ITER: usize = 32;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("actor_ingest");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements((BATCHES_PER_ITER * BATCH) as u64));
    let mut round = 0usize;
    for countries in [1usize, 50, 900] {
        // a fresh node each, so its de-dup table starts empty for every cardinality
        let dir = tempfile::tempdir().unwrap();
        let running = runtime
            .block_on(tally::app::start(
                common::node_config(dir.path(), 100_000_000),
                Arc::new(SystemClock),
            ))
            .unwrap();
        let node = Arc::clone(&running.node);
        let tenant = node.tenant("demo").unwrap();
        group.bench_with_input(
            BenchmarkId::new("batch_of_1000", format!("{countries}_countries")),
            &countries,
            |b, &countries| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        round += 1;
                        let now_ms = node.now_ms();
                        let validation = tenant.context.validation();
                        let batches: Vec<Vec<ValidEvent>> = (0..BATCHES_PER_ITER)
                            .map(|batch| {
                                validated(
                                    &validation,
                                    &format!("r{round}-b{batch}"),
                                    countries,
                                    now_ms,
                                )
                            })
                            .collect();
                        let started = Instant::now();
                        runtime.block_on(async {
                            let mut tasks = Vec::new();
                            let mut batches = batches.into_iter();
                            for _ in 0..IN_FLIGHT {
                                let mine: Vec<Vec<ValidEvent>> = batches
                                    .by_ref()
                                    .take(BATCHES_PER_ITER / IN_FLIGHT)
                                    .collect();
                                let (actor, permits) =
                                    (tenant.actor.clone(), Arc::clone(&tenant.batch_permits));
                                tasks.push(tokio::spawn(async move {
                                    for events in mine {
                                        let permit =
                                            Arc::clone(&permits).acquire_owned().await.unwrap();
                                        let outcomes = actor
                                            .send(IngestBatch {
                                                in_flight: InFlight::new(permit),
                                                now_ms,
                                                events: events
                                                    .into_iter()
                                                    .enumerate()
                                                    .map(|(i, e)| (i as u32, e))
                                                    .collect(),
                                                quarantined: Vec::new(),
                                                checked: None,
                                            })
                                            .await
                                            .unwrap()
                                            .unwrap();
                                        assert_eq!(outcomes.len(), BATCH);
                                        assert!(outcomes
                                            .iter()
                                            .all(|(_, o)| *o == EventOutcome::Accepted));
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
            },
        );
        runtime.block_on(running.shutdown());
    }
    group.finish();
}

criterion_group!(benches, wal_append, actor_ingest);
criterion_main!(benches);
