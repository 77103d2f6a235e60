//! Criterion benches of the hot pure code: a window update per event, a window
//! read, a histogram record and p95 read, decode + validate of a 1 000-event
//! NDJSON batch, and de-dup of 1 000 ids by table size. Run: `cargo bench --bench windows`; figures go to
//! docs/BENCHMARKS.md with the machine they were taken on.

mod common;

use std::hint::black_box;

use chrono_tz::Tz;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

use tally::domain::dedup::DedupIndex;
use tally::domain::event::{parse_event, validate_event, ValidationContext};
use tally::domain::histogram::HistogramWindows;
use tally::domain::time::DayBounds;
use tally::domain::time::SlidingWindow;
use tally::domain::window::CounterWindows;

const T0_MS: i64 = 1_763_805_600_000;

fn counter_windows(c: &mut Criterion) {
    let mut group = c.benchmark_group("counter_windows");
    group.throughput(Throughput::Elements(1));
    // events spread over the last 20 s while the clock moves 1 ms per event
    let mut windows = CounterWindows::new(T0_MS, 300, Tz::UTC);
    let mut now_ms = T0_MS;
    let mut n: i64 = 0;
    group.bench_function("record", |b| {
        b.iter(|| {
            n += 1;
            now_ms += 1;
            windows
                .record(now_ms - (n * 7919) % 20_000, black_box(1250), 1, now_ms)
                .unwrap();
        })
    });
    group.bench_function("read_all_windows", |b| {
        b.iter(|| {
            now_ms += 1;
            black_box(windows.read(now_ms))
        })
    });
    group.finish();
}

fn histogram_windows(c: &mut Criterion) {
    let mut group = c.benchmark_group("histogram_windows");
    group.throughput(Throughput::Elements(1));
    let mut windows = HistogramWindows::new(T0_MS, 300, Tz::UTC, 3_600_000);
    let mut now_ms = T0_MS;
    let mut n: u64 = 0;
    group.bench_function("record", |b| {
        b.iter(|| {
            n += 1;
            now_ms += 1;
            windows
                .record(now_ms, black_box(50 + (n * 7919) % 2_000), now_ms)
                .unwrap();
        })
    });
    // 15 minutes of 100 values a second, then the p95 of the 15 m window
    let mut full = HistogramWindows::new(T0_MS, 300, Tz::UTC, 3_600_000);
    for second in 0..900i64 {
        for i in 0..100u64 {
            let ts_ms = T0_MS + second * 1000;
            full.record(ts_ms, 50 + (i * 7919 + second as u64) % 2_000, ts_ms)
                .unwrap();
        }
    }
    let end_ms = T0_MS + 899_000;
    group.bench_function("p95_15m_of_90000_values", |b| {
        b.iter(|| {
            black_box(
                full.window_histogram(SlidingWindow::Min15, end_ms)
                    .value_at_quantile(0.95),
            )
        })
    });
    group.finish();
}

fn decode_validate(c: &mut Criterion) {
    let config = common::default_config();
    let catalogue = config.catalogue().unwrap();
    let limits = config.event_limits();
    let context = ValidationContext {
        currency: "USD",
        catalogue: &catalogue,
        limits: &limits,
    };
    let body: String = (0..1000)
        .map(|i| {
            format!(
                "{{\"id\":\"order-{i:08}\",\"type\":\"order.completed\",\"ts\":{},\"amount\":{},\"currency\":\"USD\",\"dims\":{{\"device\":\"ios\",\"country\":\"VN\"}}}}\n",
                T0_MS - i,
                1000 + i
            )
        })
        .collect();
    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("decode_validate_1000_ndjson", |b| {
        b.iter_batched(
            || body.as_bytes(),
            |bytes| {
                let mut valid = 0;
                for line in bytes.split(|byte| *byte == b'\n').filter(|l| !l.is_empty()) {
                    let raw = parse_event(line).unwrap();
                    if validate_event(&raw, &context, T0_MS, T0_MS).is_ok() {
                        valid += 1;
                    }
                }
                assert_eq!(valid, 1000);
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// De-dup of 1 000 new ids (judge, then admit) by how many ids the tenant's
/// table already holds: the table outgrows the caches as it fills.
fn dedup(c: &mut Criterion) {
    let today = DayBounds {
        start_s: T0_MS / 1000 - 3_600,
        end_s: T0_MS / 1000 + 82_800,
    };
    let mut group = c.benchmark_group("dedup");
    group.throughput(Throughput::Elements(1000));
    for held in [10_000usize, 1_000_000, 4_000_000] {
        let mut index = DedupIndex::new(86_400, 100_000_000);
        for n in 0..held {
            let ts_ms = T0_MS - (n as i64 % 3_000) * 1000;
            index
                .admit(&format!("held-{n}"), ts_ms, T0_MS, today)
                .unwrap();
        }
        let mut round = 0u64;
        group.bench_with_input(
            BenchmarkId::new("judge_and_admit_1000_new_ids", format!("{held}_held")),
            &held,
            |b, _| {
                // the ids of a round are forgotten after it, untimed, so the
                // table holds `held` ids whenever a round starts
                b.iter_custom(|iters| {
                    let mut total = std::time::Duration::ZERO;
                    for _ in 0..iters {
                        round += 1;
                        let ids: Vec<String> =
                            (0..1000).map(|n| format!("r{round}-{n:04}")).collect();
                        let started = std::time::Instant::now();
                        for id in &ids {
                            black_box(index.judge(id, T0_MS, T0_MS, today).unwrap());
                            index.admit(id, T0_MS, T0_MS, today).unwrap();
                        }
                        total += started.elapsed();
                        for id in &ids {
                            index.forget(id);
                        }
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

criterion_group!(
    benches,
    counter_windows,
    histogram_windows,
    decode_validate,
    dedup
);
criterion_main!(benches);
