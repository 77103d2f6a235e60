//! Property test: the window code against a naive reference model.
//!
//! Random event streams (late, future, out-of-order and duplicate events, two
//! tenants in different time zones, time jumping across local midnight) go
//! through validation, the real tenant core (de-duplication, lateness, the
//! plan) and the metric state, as the actors drive them; the reference model keeps a plain list of the events it accepted
//! and filters it by time. At every step every metric, window, `prev`, `today`
//! and the device breakdown must be equal. At random steps the engine restarts:
//! its state goes through a snapshot (export, envelope, decode, import) and the
//! run goes on from what was restored, as recovery does.

use std::collections::{BTreeMap, HashMap};

use chrono::TimeZone;
use chrono_tz::Tz;
use proptest::prelude::*;

use std::sync::Arc;
use tally::domain::catalogue::{Catalogue, MetricDef, MetricKind, SumField};

use tally::domain::dedup::{Admission, DedupIndex};
use tally::domain::event::{parse_event, validate_event, EventLimits, ValidationContext};
use tally::domain::histogram::{empty_histogram, HistogramStats};
use tally::domain::metric::{
    HistoryExtent, MetricExport, MetricState, SeriesExport, SeriesReading, SeriesSettings,
};
use tally::domain::quarantine::QuarantineStore;
use tally::domain::tenant::{EventOutcome, TenantContext, TenantCore};
use tally::domain::time::BUCKET_HISTORY_S;
use tally::domain::window::{SlidingTally, Tally};
use tally::storage::envelope::{decode, encode, RecordKind};
use tally::storage::snapshot::{
    decode_history_chunk, decode_part, history_key, join_history, part_key, snapshot_ops,
    HistoryBook, TenantSnapshot, HISTORY_CHUNK_S,
};
use tally::storage::{Op, Space};

const SKEW_MS: i64 = 300_000;
const HORIZON_S: i64 = 7_200;
const SERIES_MAX: usize = 3;
const VALUE_MAX: u64 = 3_600_000;
const TYPES: [&str; 6] = [
    "order.completed",
    "payment.failed",
    "payment.captured",
    "checkout.completed",
    "units.earned",
    "other.thing",
];
const DEVICES: [&str; 4] = ["ios", "android", "web", "tv"];

fn catalogue() -> Catalogue {
    let def = |name: &str, kind, types: &[&str], numerator: &[&str], dims: &[&str]| MetricDef {
        name: name.into(),
        kind,
        types: types.iter().map(|t| t.to_string()).collect(),
        numerator: numerator.iter().map(|t| t.to_string()).collect(),
        dims: dims.iter().map(|t| t.to_string()).collect(),
    };
    Catalogue::new(vec![
        def(
            "gmv",
            MetricKind::Sum {
                field: SumField::Amount,
            },
            &["order.completed"],
            &[],
            &["device"],
        ),
        def("orders", MetricKind::Count, &["order.completed"], &[], &[]),
        def(
            "payment_failure_rate",
            MetricKind::Ratio,
            &["payment.failed", "payment.captured"],
            &["payment.failed"],
            &[],
        ),
        def(
            "checkout_latency_ms",
            MetricKind::Histogram,
            &["checkout.completed"],
            &[],
            &[],
        ),
        def(
            "units_earned",
            MetricKind::Sum {
                field: SumField::Value,
            },
            &["units.earned"],
            &[],
            &[],
        ),
    ])
}

#[derive(Debug, Clone)]
struct GenEvent {
    tenant: usize,
    id: u8,
    type_index: usize,
    ts_offset_ms: Option<i64>,
    amount: i64,
    value: u64,
    device: Option<usize>,
}

#[derive(Debug, Clone)]
struct Step {
    advance_ms: i64,
    events: Vec<GenEvent>,
    /// A snapshot after the step (`restart` takes one anyway).
    snapshot: bool,
    restart: bool,
}

fn ts_offset() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![
        1 => Just(None),
        10 => (-40_000i64..5_000).prop_map(Some),
        4 => (-2_000_000i64..-30_000).prop_map(Some),
        1 => (-9_000_000i64..-2_000_000).prop_map(Some),
        2 => (0i64..400_000).prop_map(Some),
    ]
}

fn gen_event() -> impl Strategy<Value = GenEvent> {
    (
        0usize..2,
        0u8..40,
        0usize..TYPES.len(),
        ts_offset(),
        prop_oneof![9 => 0i64..1_000_000, 1 => Just(1_000_000_000_000_000i64)],
        0u64..5_000,
        proptest::option::of(0usize..DEVICES.len()),
    )
        .prop_map(
            |(tenant, id, type_index, ts_offset_ms, amount, value, device)| GenEvent {
                tenant,
                id,
                type_index,
                ts_offset_ms,
                amount,
                value,
                device,
            },
        )
}

fn gen_step() -> impl Strategy<Value = Step> {
    (
        prop_oneof![
            8 => 0i64..3_000,
            3 => 3_000i64..120_000,
            1 => 120_000i64..4_000_000,
        ],
        proptest::collection::vec(gen_event(), 0..6),
        proptest::bool::weighted(0.3),
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(advance_ms, events, snapshot, restart)| Step {
            advance_ms,
            events,
            snapshot,
            restart,
        })
}

fn event_json(event: &GenEvent, now_ms: i64) -> String {
    let mut fields = vec![
        format!(r#""id":"e{}""#, event.id),
        format!(r#""type":"{}""#, TYPES[event.type_index]),
        format!(r#""amount":{},"currency":"USD""#, event.amount),
        format!(r#""value":{}"#, event.value),
    ];
    if let Some(offset) = event.ts_offset_ms {
        fields.push(format!(r#""ts":{}"#, now_ms + offset));
    }
    if let Some(device) = event.device {
        fields.push(format!(r#""dims":{{"device":"{}"}}"#, DEVICES[device]));
    }
    format!("{{{}}}", fields.join(","))
}

/// What the reference model keeps of an accepted event.
#[derive(Debug, Clone)]
struct Kept {
    ts_ms: i64,
    type_index: usize,
    amount: i64,
    value: u64,
    device: Option<usize>,
}

/// The naive model: a list of accepted events per tenant, filtered by time.
struct Reference {
    tz: Tz,
    accepted: Vec<(String, Kept)>,
    device_order: Vec<String>,
}

impl Reference {
    fn local_date(&self, second: i64) -> chrono::NaiveDate {
        self.tz.timestamp_opt(second, 0).unwrap().date_naive()
    }

    /// Decides the outcome from the list alone.
    fn admit(&mut self, id: String, kept: Kept, now_ms: i64) -> Admission {
        let now_s = now_ms.div_euclid(1000);
        let ts_s = kept.ts_ms.div_euclid(1000);
        // an id is remembered while its event could count in some window, and
        // at least the horizon; an event that can count nowhere is late
        let counts_somewhere = |second: i64| {
            second > now_s - 1800
                || second > now_s
                || self.local_date(second) >= self.local_date(now_s)
        };
        let seen = self.accepted.iter().any(|(other_id, other)| {
            let other_s = other.ts_ms.div_euclid(1000);
            *other_id == id && (other_s > now_s - HORIZON_S || counts_somewhere(other_s))
        });
        if seen {
            return Admission::Duplicate;
        }
        if !counts_somewhere(ts_s) {
            return Admission::Late;
        }
        if kept.type_index == 0 {
            let device = device_name(kept.device);
            if !self.device_order.contains(&device) && self.device_order.len() < SERIES_MAX {
                self.device_order.push(device);
            }
        }
        self.accepted.push((id, kept));
        Admission::Accepted
    }

    fn in_range(ts_ms: i64, now_ms: i64, from_back_s: i64, to_back_s: i64) -> bool {
        let second = ts_ms.div_euclid(1000);
        let now_s = now_ms.div_euclid(1000);
        second > now_s - from_back_s && second <= now_s - to_back_s
    }

    fn in_today(&self, ts_ms: i64, now_ms: i64) -> bool {
        let second = ts_ms.div_euclid(1000);
        let now_s = now_ms.div_euclid(1000);
        second <= now_s && self.local_date(second) == self.local_date(now_s)
    }

    fn tally<F: Fn(&Kept) -> Option<(i128, u64)>>(
        &self,
        now_ms: i64,
        pick: F,
        select: &dyn Fn(&Kept) -> bool,
    ) -> (SlidingTally, SlidingTally, Tally) {
        let mut sec30 = SlidingTally::default();
        let mut min15 = SlidingTally::default();
        let mut today = Tally::default();
        for (_, kept) in &self.accepted {
            let Some((sum, count)) = pick(kept) else {
                continue;
            };
            if !select(kept) {
                continue;
            }
            let delta = Tally { sum, count };
            let ts = kept.ts_ms;
            for (window, length) in [(&mut sec30, 30), (&mut min15, 900)] {
                if Self::in_range(ts, now_ms, length, 0) {
                    window.current.add(delta);
                }
                if Self::in_range(ts, now_ms, 2 * length, length) {
                    window.prev.add(delta);
                }
            }
            if self.in_today(ts, now_ms) {
                today.add(delta);
            }
        }
        (sec30, min15, today)
    }

    fn histogram(&self, now_ms: i64) -> [HistogramStats; 3] {
        let mut sec30 = empty_histogram(VALUE_MAX);
        let mut min15 = empty_histogram(VALUE_MAX);
        let mut today = empty_histogram(VALUE_MAX);
        for (_, kept) in &self.accepted {
            if kept.type_index != 3 {
                continue;
            }
            if Self::in_range(kept.ts_ms, now_ms, 30, 0) {
                sec30.record(kept.value).unwrap();
            }
            if Self::in_range(kept.ts_ms, now_ms, 900, 0) {
                min15.record(kept.value).unwrap();
            }
            if self.in_today(kept.ts_ms, now_ms) {
                today.record(kept.value).unwrap();
            }
        }
        [
            HistogramStats::of(&sec30),
            HistogramStats::of(&min15),
            HistogramStats::of(&today),
        ]
    }
}

fn device_name(device: Option<usize>) -> String {
    device.map_or("__none__".to_string(), |d| DEVICES[d].to_string())
}

/// The engine as the actors drive it: the tenant core decides, then every
/// metric applies the plan's events; snapshots go to `stored` as the node
/// writes them.
struct Engine {
    core: TenantCore,
    metrics: Vec<MetricState>,
    settings: SeriesSettings,
    /// Every record the snapshots wrote (none is pruned here).
    stored: HashMap<(Space, Vec<u8>), Vec<u8>>,
    /// The history chunks of the last snapshot (empty after a start).
    book: HistoryBook,
    snapshot_id: u64,
}

fn tenant_core(context: Arc<TenantContext>, dedup: DedupIndex, now_ms: i64) -> TenantCore {
    TenantCore::new(context, dedup, QuarantineStore::new(10, 1024), now_ms)
}

/// What `MetricState::import` keeps of an export: the seconds a series still
/// holds (a chunk listed again may carry seconds that have left since).
fn held_history(metric: &mut MetricExport) {
    fn held(series: &mut SeriesExport) {
        match series {
            SeriesExport::Counter(counter) => {
                let head_s = counter.head_s;
                counter
                    .buckets
                    .retain(|bucket| bucket.0 > head_s - BUCKET_HISTORY_S);
            }
            SeriesExport::Histogram(histogram) => {
                let head_s = histogram.head_s;
                histogram
                    .slices
                    .retain(|slice| slice.0 > head_s - BUCKET_HISTORY_S);
            }
        }
    }
    held(&mut metric.total);
    for (_, values) in &mut metric.breakdowns {
        for (_, series) in values {
            held(series);
        }
    }
}

impl Engine {
    /// The tenant's part at `now_ms` with these metrics' exports.
    fn part(
        &self,
        now_ms: i64,
        metrics: Vec<(String, MetricExport)>,
        history_extents: Vec<HistoryExtent>,
    ) -> TenantSnapshot {
        TenantSnapshot {
            tenant: "t".into(),
            position_lsn: 0,
            now_ms,
            dedup: self.core.export_dedup(),
            runs: Vec::new(),
            experiments: Vec::new(),
            metrics,
            history_extents,
        }
    }

    /// A snapshot as the node takes it (the history whole only after a
    /// start, else the chunks changed since the last one), written to
    /// `stored`; returns its id.
    fn snapshot(&mut self, catalogue: &Catalogue, now_ms: i64) -> u64 {
        let whole_history = self.book.is_empty();
        let mut metrics = Vec::new();
        let mut history_extents = Vec::new();
        for (def, state) in catalogue.metrics().iter().zip(&mut self.metrics) {
            let (export, extent) = state.export_history(whole_history, HISTORY_CHUNK_S);
            metrics.push((def.name.clone(), export));
            history_extents.push(extent);
        }
        let part = self.part(now_ms, metrics, history_extents);
        self.snapshot_id += 1;
        let id = self.snapshot_id;
        let mut parts = [part.clone()];
        let (ops, next_book) = snapshot_ops(id, now_ms, &mut parts, 1 << 30, &self.book).unwrap();
        assert_eq!(parts[0], part, "the parts are given back as they were");
        for op in ops {
            match op {
                Op::Put { space, key, value } => {
                    self.stored.insert((space, key), value);
                }
                Op::Remove { space, key } => {
                    self.stored.remove(&(space, key));
                }
            }
        }
        self.book = next_book;
        id
    }

    /// Through a snapshot and back, as a restart does: the part read back
    /// with the chunks it lists holds what the metrics hold.
    fn restart(&mut self, catalogue: &Catalogue, now_ms: i64) {
        let metrics = catalogue
            .metrics()
            .iter()
            .zip(&self.metrics)
            .map(|(def, state)| (def.name.clone(), state.export()))
            .collect();
        let whole = self.part(now_ms, metrics, Vec::new());
        let id = self.snapshot(catalogue, now_ms);
        let part = &self.stored[&(Space::Snapshot, part_key(id, "t"))];
        let (mut restored, history) = decode_part(part, 1 << 30).unwrap();
        for chunk in &history {
            let key = history_key(chunk.written_by, "t", &chunk.metric, chunk.start_s);
            let bytes = &self.stored[&(Space::History, key)];
            let (_, metric) = restored
                .metrics
                .iter_mut()
                .find(|(name, _)| *name == chunk.metric)
                .unwrap();
            join_history(metric, decode_history_chunk(bytes, 1 << 30).unwrap());
        }
        for (_, metric) in &mut restored.metrics {
            held_history(metric);
        }
        assert_eq!(restored, whole);
        // as the shape before history chunks still reads
        let bytes = encode(RecordKind::SnapshotPartRuns, &whole).unwrap();
        let decoded: TenantSnapshot =
            decode(&bytes, RecordKind::SnapshotPartRuns, 1 << 30).unwrap();
        assert_eq!(decoded, whole);
        let mut dedup = DedupIndex::new(HORIZON_S, 1_000_000);
        for (key, second) in restored.dedup {
            dedup.remember_accepted(key, second).unwrap();
        }
        self.core = tenant_core(Arc::clone(self.core.context()), dedup, now_ms);
        self.metrics = catalogue
            .metrics()
            .iter()
            .enumerate()
            .map(|(index, def)| {
                MetricState::import(index, def, self.settings, &restored.metrics[index].1).unwrap()
            })
            .collect();
        // a start knows no earlier snapshot's chunks
        self.book = HistoryBook::default();
    }
}

fn counter(reading: SeriesReading) -> (SlidingTally, SlidingTally, Tally) {
    match reading {
        SeriesReading::Counter(c) => (c.sec30, c.min15, c.today),
        SeriesReading::Histogram(_) => panic!("expected a counter"),
    }
}

fn run(start_ms: i64, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let catalogue = catalogue();
    let limits = EventLimits {
        max_clock_skew_ms: SKEW_MS,
        dims_per_event_max: 16,
        dim_key_bytes_max: 32,
        dim_value_bytes_max: 128,
        histogram_value_max: VALUE_MAX,
    };
    let zones = [Tz::UTC, Tz::America__New_York];
    let catalogue = Arc::new(catalogue);
    let mut engines: Vec<Engine> = zones
        .iter()
        .map(|&tz| {
            let context = Arc::new(TenantContext {
                id: "t".into(),
                currency: "USD".into(),
                tz,
                catalogue: Arc::clone(&catalogue),
                limits: limits.clone(),
            });
            let settings = SeriesSettings {
                ahead_s: SKEW_MS / 1000,
                tz,
                histogram_value_max: VALUE_MAX,
                series_max: SERIES_MAX,
            };
            Engine {
                settings,
                core: tenant_core(context, DedupIndex::new(HORIZON_S, 1_000_000), start_ms),
                metrics: catalogue
                    .metrics()
                    .iter()
                    .enumerate()
                    .map(|(i, def)| MetricState::new(i, def, settings, start_ms))
                    .collect(),
                stored: HashMap::new(),
                book: HistoryBook::default(),
                snapshot_id: 0,
            }
        })
        .collect();
    let mut references: Vec<Reference> = zones
        .iter()
        .map(|&tz| Reference {
            tz,
            accepted: Vec::new(),
            device_order: Vec::new(),
        })
        .collect();

    let mut now_ms = start_ms;
    for step in steps {
        now_ms += step.advance_ms;
        let mut batches: Vec<Vec<_>> = vec![Vec::new(), Vec::new()];
        for event in &step.events {
            let json = event_json(event, now_ms);
            let context = ValidationContext {
                currency: "USD",
                catalogue: &catalogue,
                limits: &limits,
            };
            let raw = parse_event(json.as_bytes()).unwrap();
            let validated = validate_event(&raw, &context, now_ms, now_ms);
            let ts_ms = now_ms + event.ts_offset_ms.unwrap_or(0);
            let too_far_ahead = ts_ms > now_ms + SKEW_MS;
            prop_assert_eq!(validated.is_err(), too_far_ahead, "validation of {}", json);
            let Ok(valid) = validated else { continue };

            let kept = Kept {
                ts_ms,
                type_index: event.type_index,
                amount: event.amount,
                value: event.value,
                device: event.device,
            };
            let expected = references[event.tenant].admit(valid.id.clone(), kept, now_ms);
            let index = batches[event.tenant].len() as u32;
            batches[event.tenant].push(((index, valid), expected, json));
        }
        for (engine, batch) in engines.iter_mut().zip(batches) {
            let mut events = Vec::new();
            let mut expected = Vec::new();
            for (event, admission, json) in batch {
                events.push(event);
                expected.push((admission, json));
            }
            let (plan, outcomes) = engine
                .core
                .ingest(now_ms, events, Vec::new(), None)
                .unwrap();
            for ((_, outcome), (admission, json)) in outcomes.iter().zip(&expected) {
                let expected_outcome = match admission {
                    Admission::Accepted => EventOutcome::Accepted,
                    Admission::Duplicate => EventOutcome::Duplicate,
                    Admission::Late => EventOutcome::Late,
                };
                prop_assert_eq!(
                    outcome,
                    &expected_outcome,
                    "outcome of {} at {}",
                    json,
                    now_ms
                );
            }
            // durable and applied, as the actor reports it
            engine.core.complete(plan.ticket);
            prop_assert_eq!(engine.core.visible_through(), plan.ticket);
            if step.restart {
                engine.restart(&catalogue, now_ms);
            }
            for metric in &mut engine.metrics {
                let report = metric.apply(&plan.events, now_ms);
                prop_assert_eq!(report.events_refused, 0);
            }
            if step.snapshot {
                engine.snapshot(&catalogue, now_ms);
            }
        }
        for (engine, reference) in engines.iter_mut().zip(&references) {
            check_tenant(engine, reference, now_ms)?;
        }
    }
    Ok(())
}

fn check_tenant(
    engine: &mut Engine,
    reference: &Reference,
    now_ms: i64,
) -> Result<(), TestCaseError> {
    let all = |_: &Kept| true;
    let gmv = |k: &Kept| (k.type_index == 0).then_some((k.amount as i128, 1));
    prop_assert_eq!(
        counter(engine.metrics[0].read(now_ms)),
        reference.tally(now_ms, gmv, &all),
        "gmv at {}",
        now_ms
    );
    let orders = |k: &Kept| (k.type_index == 0).then_some((0, 1));
    prop_assert_eq!(
        counter(engine.metrics[1].read(now_ms)),
        reference.tally(now_ms, orders, &all),
        "orders"
    );
    let ratio = |k: &Kept| match k.type_index {
        1 => Some((1, 1)),
        2 => Some((0, 1)),
        _ => None,
    };
    prop_assert_eq!(
        counter(engine.metrics[2].read(now_ms)),
        reference.tally(now_ms, ratio, &all),
        "ratio"
    );
    let SeriesReading::Histogram(latency) = engine.metrics[3].read(now_ms) else {
        return Err(TestCaseError::fail("latency is a histogram"));
    };
    prop_assert_eq!(
        [latency.sec30, latency.min15, latency.today],
        reference.histogram(now_ms),
        "latency"
    );
    let units = |k: &Kept| (k.type_index == 4).then_some((k.value as i128, 1));
    prop_assert_eq!(
        counter(engine.metrics[4].read(now_ms)),
        reference.tally(now_ms, units, &all),
        "units"
    );

    // The device breakdown of gmv, with values past the cap folded.
    let breakdown = engine.metrics[0].read_breakdown("device", now_ms).unwrap();
    let actual: BTreeMap<String, _> = breakdown
        .into_iter()
        .map(|(value, reading)| (value, counter(reading)))
        .collect();
    let label_of = |k: &Kept| {
        let name = device_name(k.device);
        if reference.device_order.contains(&name) {
            name
        } else {
            "__other__".to_string()
        }
    };
    let mut expected = BTreeMap::new();
    for (_, kept) in &reference.accepted {
        if kept.type_index == 0 {
            let label = label_of(kept);
            let select = |k: &Kept| label_of(k) == label;
            let tallies = reference.tally(now_ms, gmv, &select);
            expected.insert(label, tallies);
        }
    }
    prop_assert_eq!(actual, expected, "gmv by device at {}", now_ms);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Starts 40 minutes before UTC midnight (19:20 in New York) or 40 minutes
    /// before New York midnight, so `today` rolls over for one of the tenants.
    #[test]
    fn windows_equal_the_reference_model(
        start in prop_oneof![Just(1_763_853_600_000i64), Just(1_763_871_600_000i64)],
        steps in proptest::collection::vec(gen_step(), 1..120),
    ) {
        run(start, steps)?;
    }
}
