//! The state of one metric of one tenant: its total series and its breakdowns by
//! dimension value, capped at `series_max` breakdown series (values past the cap
//! fold into `__other__`).
//! Owns: what an accepted event contributes to this metric, the series, and
//! the per-variant counts of the experiments that guard it (`Watched`: exact,
//! outside the breakdown cap).
//! Must not: decide whether an event is accepted (the tenant does), or read the
//! clock. Mean metrics have no state here; they are derived when read.

use std::collections::HashMap;

use chrono_tz::Tz;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::catalogue::{MetricDef, MetricKind, SumField};
use super::event::ValidEvent;
use super::histogram::{
    empty_histogram, HistogramExport, HistogramReading, HistogramStats, HistogramWindows,
};
use super::time::{second_of_ms, SlidingWindow, BUCKET_HISTORY_S};
use super::window::{CounterExport, CounterReading, CounterWindows, RecordError, Tally};

/// The breakdown series that takes dim values past the cap.
pub const OTHER_DIM_VALUE: &str = "__other__";
/// The breakdown series of events that do not carry the dim.
pub const NONE_DIM_VALUE: &str = "__none__";

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeriesSettings {
    /// Seconds an event may lie ahead of now (the clock skew, rounded up).
    pub ahead_s: i64,
    pub tz: Tz,
    pub histogram_value_max: u64,
    /// Breakdown series per metric, over all its dims (`__other__` excepted).
    pub series_max: usize,
}

#[derive(Debug, Clone)]
enum Series {
    Counter(CounterWindows),
    Histogram(HistogramWindows),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeriesExport {
    Counter(CounterExport),
    Histogram(HistogramExport),
}

/// What a metric's export from `MetricState::export_history` holds of its
/// per-second history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryExtent {
    /// `None`: every second. `Some(s)`: the seconds from `s` on (a multiple of
    /// the chunk length asked for); those before `s` are as the previous
    /// export had them, less what has left the windows since.
    pub from_s: Option<i64>,
    /// The oldest second any series still holds (`None`: none holds any);
    /// what lies before it has left every window.
    pub held_from_s: Option<i64>,
}

/// A metric's state as a snapshot stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricExport {
    pub total: SeriesExport,
    /// Per dim: `(dim value, series)`.
    pub breakdowns: Vec<(String, Vec<(String, SeriesExport)>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesReading {
    Counter(CounterReading),
    Histogram(HistogramReading),
}

/// Points of `/series`: `(second the point starts at, value)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeriesPoints {
    Counter(Vec<(i64, Tally)>),
    Histogram(Vec<(i64, HistogramStats)>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Contribution {
    Counter { sum: i64, count: u32 },
    Histogram(u64),
}

impl Series {
    fn new(kind: &MetricKind, settings: &SeriesSettings, now_ms: i64) -> Series {
        match kind {
            MetricKind::Histogram => Series::Histogram(HistogramWindows::new(
                now_ms,
                settings.ahead_s,
                settings.tz,
                settings.histogram_value_max,
            )),
            _ => Series::Counter(CounterWindows::new(now_ms, settings.ahead_s, settings.tz)),
        }
    }

    fn record(
        &mut self,
        ts_ms: i64,
        contribution: Contribution,
        now_ms: i64,
    ) -> Result<(), RecordError> {
        match (self, contribution) {
            (Series::Counter(windows), Contribution::Counter { sum, count }) => {
                windows.record(ts_ms, sum, count, now_ms)
            }
            (Series::Histogram(windows), Contribution::Histogram(value)) => {
                windows.record(ts_ms, value, now_ms)
            }
            // a series is made for its metric's kind, and so is the contribution
            _ => Ok(()),
        }
    }

    fn read(&mut self, now_ms: i64) -> SeriesReading {
        match self {
            Series::Counter(windows) => SeriesReading::Counter(windows.read(now_ms)),
            Series::Histogram(windows) => SeriesReading::Histogram(windows.read(now_ms)),
        }
    }

    fn export(&self) -> SeriesExport {
        self.export_from(i64::MIN)
    }

    fn export_from(&self, from_s: i64) -> SeriesExport {
        match self {
            Series::Counter(windows) => SeriesExport::Counter(windows.export_from(from_s)),
            Series::Histogram(windows) => SeriesExport::Histogram(windows.export_from(from_s)),
        }
    }

    fn held_from_s(&self) -> Option<i64> {
        match self {
            Series::Counter(windows) => windows.held_from_s(),
            Series::Histogram(windows) => windows.held_from_s(),
        }
    }

    /// `None` when the export is of another kind than the metric now is.
    fn import(
        kind: &MetricKind,
        export: &SeriesExport,
        settings: &SeriesSettings,
    ) -> Option<Series> {
        match (kind, export) {
            (MetricKind::Histogram, SeriesExport::Histogram(export)) => {
                Some(Series::Histogram(HistogramWindows::import(
                    export,
                    settings.ahead_s,
                    settings.tz,
                    settings.histogram_value_max,
                )))
            }
            (MetricKind::Histogram, _) | (_, SeriesExport::Histogram(_)) => None,
            (_, SeriesExport::Counter(export)) => Some(Series::Counter(CounterWindows::import(
                export,
                settings.ahead_s,
                settings.tz,
            ))),
        }
    }
}

/// An experiment a metric counts per variant (API.md §8, docs/experiments.md):
/// the events of batches accepted at or after `started_ms` count since the
/// start, and those from `epoch_ms` (the start, or the last resume) into what
/// the guardrails judge. Batch times, not event times: the log keeps them, so
/// a replay counts exactly what was counted live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watched {
    pub experiment: String,
    pub variants: Vec<String>,
    /// Bit `i`: the catalogue's metric `i` is guarded (and counted).
    pub metrics: u64,
    pub started_ms: i64,
    pub epoch_ms: i64,
}

impl Watched {
    /// The counts it needs: since the start (with windows) and since the epoch.
    fn needs(&self) -> [(CountRole, i64); 2] {
        [
            (CountRole::Since, self.started_ms),
            (CountRole::Judged, self.epoch_ms),
        ]
    }
}

/// What a set of per-variant counts is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CountRole {
    /// Since the experiment started, with each variant's windows.
    Since,
    /// Since the start or the last resume: what the guardrails judge.
    Judged,
}

/// A count since some moment: a tally, or a histogram kept sparse (the
/// lowest value of each HDR bucket that has values, and its count), so that
/// an experiment's variants cost what their values spread over, not a whole
/// HDR histogram each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cumulative {
    Counter { sum: i128, count: u64 },
    Histogram(Vec<(u64, u64)>),
}

impl Cumulative {
    fn new(kind: &MetricKind) -> Cumulative {
        match kind {
            MetricKind::Histogram => Cumulative::Histogram(Vec::new()),
            _ => Cumulative::Counter { sum: 0, count: 0 },
        }
    }

    /// `shape` gives a value's HDR bucket (histogram metrics have one).
    fn record(&mut self, contribution: Contribution, shape: Option<&Histogram<u64>>) {
        match (self, contribution) {
            (Cumulative::Counter { sum, count }, Contribution::Counter { sum: s, count: c }) => {
                *sum += s as i128;
                *count += c as u64;
            }
            (Cumulative::Histogram(buckets), Contribution::Histogram(value)) => {
                let Some(shape) = shape else {
                    return;
                };
                let key = shape.lowest_equivalent(value);
                match buckets.binary_search_by_key(&key, |&(value, _)| value) {
                    Ok(index) => buckets[index].1 += 1,
                    Err(index) => buckets.insert(index, (key, 1)),
                }
            }
            _ => {}
        }
    }

    fn fits(&self, kind: &MetricKind) -> bool {
        matches!(
            (kind, self),
            (MetricKind::Histogram, Cumulative::Histogram(_))
                | (
                    MetricKind::Sum { .. } | MetricKind::Count | MetricKind::Ratio,
                    Cumulative::Counter { .. }
                )
        )
    }

    fn tally(&self) -> Tally {
        match self {
            Cumulative::Counter { sum, count } => Tally {
                sum: *sum,
                count: *count,
            },
            Cumulative::Histogram(_) => Tally::default(),
        }
    }

    /// The histogram the values make (`None` when there are none).
    fn histogram(&self, value_max: u64) -> Option<Box<Histogram<u64>>> {
        let Cumulative::Histogram(buckets) = self else {
            return None;
        };
        if buckets.is_empty() {
            return None;
        }
        let mut histogram = Box::new(empty_histogram(value_max));
        for &(value, count) in buckets.iter().filter(|(value, _)| *value <= value_max) {
            let _ = histogram.record_n(value, count);
        }
        Some(histogram)
    }
}

/// One experiment's per-variant counts of one metric from one moment.
#[derive(Debug, Clone)]
struct VariantSet {
    experiment: String,
    variants: Vec<String>,
    role: CountRole,
    /// Batches accepted at or after this count.
    from_ms: i64,
    /// In the order of `variants`.
    counts: Vec<Cumulative>,
    /// `Since` sets only: each variant's windows (the view shows `15m`).
    windows: Vec<Series>,
    /// Events that named the experiment with a variant it does not have.
    unknown_variant: u64,
}

impl VariantSet {
    fn is(&self, experiment: &str, variants: &[String], role: CountRole, from_ms: i64) -> bool {
        self.experiment == experiment
            && self.role == role
            && self.from_ms == from_ms
            && self.variants == variants
    }
}

/// A set as a snapshot stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariantSetExport {
    pub experiment: String,
    pub variants: Vec<String>,
    pub role: CountRole,
    pub from_ms: i64,
    pub counts: Vec<Cumulative>,
    pub windows: Vec<SeriesExport>,
    pub unknown_variant: u64,
}

/// One variant's counts of one metric: since the start, since the epoch (what
/// the guardrails judge) and over the rolling 15 minutes. For a ratio metric
/// a tally's `sum` is the numerator (hits) and `count` the denominator
/// (samples).
#[derive(Debug, Clone, PartialEq)]
pub enum VariantCounts {
    Counter {
        since: Tally,
        judged: Tally,
        min15: Tally,
    },
    Histogram {
        since: HistogramStats,
        judged: Option<Box<Histogram<u64>>>,
        min15: HistogramStats,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct VariantsReading {
    pub started_ms: i64,
    pub epoch_ms: i64,
    pub variants: Vec<(String, VariantCounts)>,
    pub unknown_variant: u64,
}

#[derive(Debug, Clone)]
struct Breakdown {
    dim: String,
    by_value: HashMap<String, Series>,
}

/// What applying a batch did, for telemetry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub events_applied: u64,
    /// Breakdown updates that went to `__other__` because of the cap.
    pub values_folded: u64,
    /// Events that broke an invariant validation guarantees (beyond the skew or
    /// the histogram range); each changed no series.
    pub events_refused: u64,
}

#[derive(Debug, Clone)]
pub struct MetricState {
    index: usize,
    kind: MetricKind,
    settings: SeriesSettings,
    total: Series,
    breakdowns: Vec<Breakdown>,
    breakdown_series: usize,
    /// The experiments that guard this metric, counted per variant.
    experiments: Vec<VariantSet>,
    /// An empty histogram of the metric's range, for the HDR bucket of a
    /// value (histogram metrics with experiments only).
    shape: Option<Box<Histogram<u64>>>,
    /// The earliest second an event was counted at since the last
    /// `export_history` (`i64::MAX`: none; `i64::MIN`: every second counts as
    /// changed, as for a state made or imported since).
    history_changed_from_s: i64,
}

impl MetricState {
    /// `index` is the metric's place in the catalogue (its routing bit).
    pub fn new(index: usize, def: &MetricDef, settings: SeriesSettings, now_ms: i64) -> Self {
        MetricState {
            index,
            kind: def.kind.clone(),
            settings,
            total: Series::new(&def.kind, &settings, now_ms),
            breakdowns: def
                .dims
                .iter()
                .map(|dim| Breakdown {
                    dim: dim.clone(),
                    by_value: HashMap::new(),
                })
                .collect(),
            breakdown_series: 0,
            experiments: Vec::new(),
            shape: None,
            history_changed_from_s: i64::MIN,
        }
    }

    pub fn kind(&self) -> &MetricKind {
        &self.kind
    }

    pub fn export(&self) -> MetricExport {
        self.export_from(i64::MIN)
    }

    /// The export for a snapshot that keeps the history in chunks of
    /// `chunk_s` seconds: every second when `whole`, else the chunks counted
    /// into since the previous call (the caller keeps the earlier ones from
    /// the export before, which must have been made durable: after a failed
    /// snapshot, ask for `whole`). Marks the history unchanged.
    pub fn export_history(&mut self, whole: bool, chunk_s: i64) -> (MetricExport, HistoryExtent) {
        let changed_from_s = std::mem::replace(&mut self.history_changed_from_s, i64::MAX);
        let from_s = (!whole && changed_from_s != i64::MIN)
            .then(|| changed_from_s.div_euclid(chunk_s).saturating_mul(chunk_s));
        let mut held_from_s = self.total.held_from_s();
        for breakdown in &self.breakdowns {
            for series in breakdown.by_value.values() {
                held_from_s = match (held_from_s, series.held_from_s()) {
                    (Some(held), Some(other)) => Some(held.min(other)),
                    (held, other) => held.or(other),
                };
            }
        }
        let extent = HistoryExtent {
            from_s,
            held_from_s,
        };
        (self.export_from(from_s.unwrap_or(i64::MIN)), extent)
    }

    fn export_from(&self, from_s: i64) -> MetricExport {
        MetricExport {
            total: self.total.export_from(from_s),
            breakdowns: self
                .breakdowns
                .iter()
                .map(|breakdown| {
                    let mut values: Vec<(String, SeriesExport)> = breakdown
                        .by_value
                        .iter()
                        .map(|(value, series)| (value.clone(), series.export_from(from_s)))
                        .collect();
                    values.sort_by(|a, b| a.0.cmp(&b.0));
                    (breakdown.dim.clone(), values)
                })
                .collect(),
        }
    }

    /// Rebuilds a metric from a snapshot. Returns `None` when the metric's kind
    /// changed since (its state cannot carry over). Dims no longer declared are
    /// dropped; new dims start empty.
    pub fn import(
        index: usize,
        def: &MetricDef,
        settings: SeriesSettings,
        export: &MetricExport,
    ) -> Option<MetricState> {
        let total = Series::import(&def.kind, &export.total, &settings)?;
        let mut state = MetricState::new(index, def, settings, 0);
        state.total = total;
        for breakdown in &mut state.breakdowns {
            let Some((_, values)) = export
                .breakdowns
                .iter()
                .find(|(dim, _)| *dim == breakdown.dim)
            else {
                continue;
            };
            for (value, series) in values {
                let series = Series::import(&def.kind, series, &settings)?;
                if value != OTHER_DIM_VALUE {
                    state.breakdown_series += 1;
                }
                breakdown.by_value.insert(value.clone(), series);
            }
        }
        Some(state)
    }

    fn contribution(&self, event: &ValidEvent) -> Option<Contribution> {
        let bit = 1u64 << self.index;
        let feeds = event.route.feeds & bit != 0;
        match self.kind {
            MetricKind::Sum { field } if feeds => {
                let sum = match field {
                    SumField::Amount => event.amount,
                    SumField::Value => event.value_integer,
                };
                // validation makes the field present for every type a sum feeds on
                sum.map(|sum| Contribution::Counter { sum, count: 1 })
            }
            MetricKind::Count if feeds => Some(Contribution::Counter { sum: 0, count: 1 }),
            MetricKind::Histogram if feeds => {
                Some(Contribution::Histogram(event.histogram_value()))
            }
            MetricKind::Ratio => {
                let numerator = event.route.feeds_numerator & bit != 0;
                (numerator || feeds).then_some(Contribution::Counter {
                    sum: numerator as i64,
                    count: feeds as u32,
                })
            }
            _ => None,
        }
    }

    /// Counts accepted events into the total and the breakdowns.
    pub fn apply(&mut self, events: &[ValidEvent], now_ms: i64) -> ApplyReport {
        let mut report = ApplyReport::default();
        for event in events {
            let Some(contribution) = self.contribution(event) else {
                continue;
            };
            // The total is recorded first: an event it refuses touches nothing.
            if self
                .total
                .record(event.ts_ms, contribution, now_ms)
                .is_err()
            {
                report.events_refused += 1;
                continue;
            }
            report.events_applied += 1;
            self.history_changed_from_s =
                self.history_changed_from_s.min(second_of_ms(event.ts_ms));
            for breakdown in &mut self.breakdowns {
                let value = event.dim(&breakdown.dim).unwrap_or(NONE_DIM_VALUE);
                let key = if breakdown.by_value.contains_key(value) {
                    value
                } else if self.breakdown_series < self.settings.series_max {
                    self.breakdown_series += 1;
                    value
                } else {
                    report.values_folded += 1;
                    OTHER_DIM_VALUE
                };
                let series = breakdown
                    .by_value
                    .entry(key.to_string())
                    .or_insert_with(|| Series::new(&self.kind, &self.settings, now_ms));
                // same time and value as the total, so it cannot refuse them
                let _ = series.record(event.ts_ms, contribution, now_ms);
            }
        }
        report
    }

    /// Applies a batch the tenant accepted at `batch_ms` (its log record's
    /// time): the series as `apply` does, and the per-variant counts of the
    /// sets counting since then. Recovery replays through here too, so an
    /// experiment counts the same events live and after a restart.
    pub fn apply_batch(
        &mut self,
        events: &[ValidEvent],
        batch_ms: i64,
        now_ms: i64,
    ) -> ApplyReport {
        let report = self.apply(events, now_ms);
        if self.experiments.is_empty() {
            return report;
        }
        let shape = self.shape.as_deref();
        for event in events {
            if event.experiments.is_empty() {
                continue;
            }
            let Some(contribution) = self.contribution(event) else {
                continue;
            };
            for set in &mut self.experiments {
                if batch_ms < set.from_ms {
                    continue;
                }
                let Some((_, variant)) = event
                    .experiments
                    .iter()
                    .find(|(experiment, _)| *experiment == set.experiment)
                else {
                    continue;
                };
                let Some(index) = set.variants.iter().position(|v| v == variant) else {
                    set.unknown_variant += 1;
                    continue;
                };
                if let Some(count) = set.counts.get_mut(index) {
                    count.record(contribution, shape);
                }
                if let Some(windows) = set.windows.get_mut(index) {
                    // the total took this time, so the variant's windows take it too
                    let _ = windows.record(event.ts_ms, contribution, now_ms);
                }
            }
        }
        report
    }

    /// Sets the experiments this metric counts per variant: those of `watched`
    /// whose mask names it. A set that one of them still needs (the same
    /// experiment, variants, role and moment) keeps its counts; a set none
    /// needs goes; a needed one not there starts from zero. An experiment may
    /// be listed twice while a change is being made durable (its old and new
    /// moments both counted, so that an undo loses nothing).
    pub fn watch(&mut self, watched: &[Watched], now_ms: i64) {
        let bit = 1u64 << self.index;
        let mut kept: Vec<VariantSet> = Vec::new();
        for watched in watched.iter().filter(|w| w.metrics & bit != 0) {
            for (role, from_ms) in watched.needs() {
                let (experiment, variants) = (&watched.experiment, &watched.variants);
                if kept
                    .iter()
                    .any(|set| set.is(experiment, variants, role, from_ms))
                {
                    continue;
                }
                let set = match self
                    .experiments
                    .iter()
                    .position(|set| set.is(experiment, variants, role, from_ms))
                {
                    Some(index) => self.experiments.swap_remove(index),
                    None => VariantSet {
                        experiment: experiment.clone(),
                        variants: variants.clone(),
                        role,
                        from_ms,
                        counts: variants
                            .iter()
                            .map(|_| Cumulative::new(&self.kind))
                            .collect(),
                        windows: match role {
                            CountRole::Since => variants
                                .iter()
                                .map(|_| Series::new(&self.kind, &self.settings, now_ms))
                                .collect(),
                            CountRole::Judged => Vec::new(),
                        },
                        unknown_variant: 0,
                    },
                };
                kept.push(set);
            }
        }
        self.experiments = kept;
        if self.kind == MetricKind::Histogram
            && !self.experiments.is_empty()
            && self.shape.is_none()
        {
            self.shape = Some(Box::new(empty_histogram(self.settings.histogram_value_max)));
        }
    }

    /// The per-variant counts as a snapshot stores them.
    pub fn export_variants(&self) -> Vec<VariantSetExport> {
        self.experiments
            .iter()
            .map(|set| VariantSetExport {
                experiment: set.experiment.clone(),
                variants: set.variants.clone(),
                role: set.role,
                from_ms: set.from_ms,
                counts: set.counts.clone(),
                windows: set.windows.iter().map(Series::export).collect(),
                unknown_variant: set.unknown_variant,
            })
            .collect()
    }

    /// Puts back per-variant counts from a snapshot (before `watch` says
    /// which still count); a set of another kind than the metric is dropped.
    pub fn import_variants(&mut self, exports: &[VariantSetExport]) {
        for export in exports {
            let shaped = export.counts.len() == export.variants.len()
                && export.counts.iter().all(|count| count.fits(&self.kind))
                && match export.role {
                    CountRole::Since => export.windows.len() == export.variants.len(),
                    CountRole::Judged => export.windows.is_empty(),
                };
            if !shaped {
                continue;
            }
            let mut windows = Vec::with_capacity(export.windows.len());
            for series in &export.windows {
                match Series::import(&self.kind, series, &self.settings) {
                    Some(series) => windows.push(series),
                    None => break,
                }
            }
            if windows.len() != export.windows.len() {
                continue;
            }
            self.experiments.push(VariantSet {
                experiment: export.experiment.clone(),
                variants: export.variants.clone(),
                role: export.role,
                from_ms: export.from_ms,
                counts: export.counts.clone(),
                windows,
                unknown_variant: export.unknown_variant,
            });
        }
    }

    /// One experiment's counts per variant (in its order of variants) from
    /// `started_ms` and `epoch_ms`, and the events that named a variant it
    /// does not have; `None` when this metric does not count it. Without
    /// `windows` the `15m` counts are left empty (a look needs only the
    /// judged counts; merging a histogram's 900 seconds is most of a read).
    pub fn read_variants(
        &mut self,
        watched: &Watched,
        windows: bool,
        now_ms: i64,
    ) -> Option<VariantsReading> {
        let (experiment, variants) = (&watched.experiment, &watched.variants);
        let since_index = self
            .experiments
            .iter()
            .position(|set| set.is(experiment, variants, CountRole::Since, watched.started_ms))?;
        let judged = self
            .experiments
            .iter()
            .find(|set| set.is(experiment, variants, CountRole::Judged, watched.epoch_ms))?
            .counts
            .clone();
        let value_max = self.settings.histogram_value_max;
        let since_set = &mut self.experiments[since_index];
        let mut readings = Vec::with_capacity(variants.len());
        for (index, name) in variants.iter().enumerate() {
            let (Some(since), Some(judged), Some(series)) = (
                since_set.counts.get(index),
                judged.get(index),
                since_set.windows.get_mut(index),
            ) else {
                continue;
            };
            let counts = match series {
                Series::Counter(recent) => VariantCounts::Counter {
                    since: since.tally(),
                    judged: judged.tally(),
                    min15: if windows {
                        recent.read(now_ms).min15.current
                    } else {
                        Tally::default()
                    },
                },
                Series::Histogram(recent) => VariantCounts::Histogram {
                    since: since
                        .histogram(value_max)
                        .as_deref()
                        .map_or_else(HistogramStats::default, HistogramStats::of),
                    judged: judged.histogram(value_max),
                    min15: if windows {
                        recent.read(now_ms).min15
                    } else {
                        HistogramStats::default()
                    },
                },
            };
            readings.push((name.clone(), counts));
        }
        Some(VariantsReading {
            started_ms: watched.started_ms,
            epoch_ms: watched.epoch_ms,
            variants: readings,
            unknown_variant: since_set.unknown_variant,
        })
    }

    pub fn read(&mut self, now_ms: i64) -> SeriesReading {
        self.total.read(now_ms)
    }

    /// Readings per value of `dim`, sorted by value; `None` when the metric does
    /// not keep that dim.
    pub fn read_breakdown(
        &mut self,
        dim: &str,
        now_ms: i64,
    ) -> Option<Vec<(String, SeriesReading)>> {
        let breakdown = self.breakdowns.iter_mut().find(|b| b.dim == dim)?;
        let mut readings: Vec<(String, SeriesReading)> = breakdown
            .by_value
            .iter_mut()
            .map(|(value, series)| (value.clone(), series.read(now_ms)))
            .collect();
        readings.sort_by(|a, b| a.0.cmp(&b.0));
        Some(readings)
    }

    /// The window's seconds grouped into points of `step_s` seconds, aligned to
    /// multiples of `step_s`; the first and last points may cover fewer seconds.
    pub fn series_points(
        &mut self,
        window: SlidingWindow,
        step_s: i64,
        now_ms: i64,
    ) -> SeriesPoints {
        let step_s = step_s.clamp(1, BUCKET_HISTORY_S);
        match &mut self.total {
            Series::Counter(windows) => {
                windows.advance(now_ms);
                let head_s = windows.head_second();
                let groups = point_groups(head_s, window.length_s(), step_s);
                SeriesPoints::Counter(
                    groups
                        .into_iter()
                        .map(|(start_s, end_s)| {
                            let mut tally = Tally::default();
                            for second in start_s..=end_s {
                                tally.add(windows.bucket(second));
                            }
                            (start_s, tally)
                        })
                        .collect(),
                )
            }
            Series::Histogram(windows) => {
                windows.advance(now_ms);
                let head_s = windows.head_second();
                let groups = point_groups(head_s, window.length_s(), step_s);
                SeriesPoints::Histogram(
                    groups
                        .into_iter()
                        .map(|(start_s, end_s)| {
                            let merged = windows.merge_seconds(end_s, end_s - start_s + 1);
                            (start_s, HistogramStats::of(&merged))
                        })
                        .collect(),
                )
            }
        }
    }
}

/// `[start_s, end_s]` groups covering `(head_s - length_s, head_s]`.
fn point_groups(head_s: i64, length_s: i64, step_s: i64) -> Vec<(i64, i64)> {
    let first_s = head_s - length_s + 1;
    let mut groups = Vec::new();
    let mut start_s = first_s.div_euclid(step_s) * step_s;
    while start_s <= head_s {
        let end_s = (start_s + step_s - 1).min(head_s);
        groups.push((start_s.max(first_s), end_s));
        start_s += step_s;
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::super::catalogue::{Catalogue, MetricDef};
    use super::*;

    const NOW_MS: i64 = 1_763_805_600_000;

    fn settings(series_max: usize) -> SeriesSettings {
        SeriesSettings {
            ahead_s: 300,
            tz: Tz::UTC,
            histogram_value_max: 3_600_000,
            series_max,
        }
    }

    fn order(id: &str, amount: i64, device: Option<&str>, catalogue: &Catalogue) -> ValidEvent {
        ValidEvent {
            id: id.into(),
            event_type: "order.completed".into(),
            ts_ms: NOW_MS,
            amount: Some(amount),
            value: None,
            value_integer: None,
            dims: device
                .map(|d| vec![("device".to_string(), d.to_string())])
                .unwrap_or_default(),
            experiments: vec![],
            route: catalogue.route("order.completed"),
        }
    }

    fn gmv_catalogue() -> Catalogue {
        Catalogue::new(vec![MetricDef {
            name: "gmv".into(),
            kind: MetricKind::Sum {
                field: SumField::Amount,
            },
            types: vec!["order.completed".into()],
            numerator: vec![],
            dims: vec!["device".into()],
        }])
    }

    fn sec30_sum(reading: SeriesReading) -> i128 {
        match reading {
            SeriesReading::Counter(counter) => counter.sec30.current.sum,
            SeriesReading::Histogram(_) => panic!("not a counter"),
        }
    }

    #[test]
    fn breakdowns_past_the_cap_fold_into_other() {
        let catalogue = gmv_catalogue();
        let mut state = MetricState::new(0, &catalogue.metrics()[0], settings(2), NOW_MS);
        let events = vec![
            order("1", 100, Some("ios"), &catalogue),
            order("2", 200, None, &catalogue),
            order("3", 300, Some("web"), &catalogue),
            order("4", 400, Some("tv"), &catalogue),
            order("5", 500, Some("ios"), &catalogue),
        ];
        let report = state.apply(&events, NOW_MS);
        assert_eq!(report.events_applied, 5);
        assert_eq!(report.values_folded, 2);
        assert_eq!(sec30_sum(state.read(NOW_MS)), 1500);
        let by_device: Vec<(String, i128)> = state
            .read_breakdown("device", NOW_MS)
            .unwrap()
            .into_iter()
            .map(|(value, reading)| (value, sec30_sum(reading)))
            .collect();
        assert_eq!(
            by_device,
            vec![
                ("__none__".to_string(), 200),
                ("__other__".to_string(), 700),
                ("ios".to_string(), 600),
            ]
        );
        assert!(state.read_breakdown("country", NOW_MS).is_none());
    }

    fn request(
        id: &str,
        failed: bool,
        experiments: &[(&str, &str)],
        catalogue: &Catalogue,
    ) -> ValidEvent {
        let event_type = if failed {
            "request.failed"
        } else {
            "request.succeeded"
        };
        ValidEvent {
            id: id.into(),
            event_type: event_type.into(),
            ts_ms: NOW_MS,
            amount: None,
            value: None,
            value_integer: None,
            dims: vec![],
            experiments: experiments
                .iter()
                .map(|(e, v)| (e.to_string(), v.to_string()))
                .collect(),
            route: catalogue.route(event_type),
        }
    }

    fn error_rate_catalogue() -> Catalogue {
        Catalogue::new(vec![MetricDef {
            name: "error_rate".into(),
            kind: MetricKind::Ratio,
            types: vec!["request.succeeded".into(), "request.failed".into()],
            numerator: vec!["request.failed".into()],
            dims: vec!["device".into()],
        }])
    }

    fn judged_and_since(
        state: &mut MetricState,
        watched: &Watched,
        variant: &str,
    ) -> (Tally, Tally) {
        let reading = state.read_variants(watched, true, NOW_MS + 10_000).unwrap();
        let (_, counts) = reading
            .variants
            .iter()
            .find(|(name, _)| name == variant)
            .unwrap();
        match counts {
            VariantCounts::Counter { since, judged, .. } => (*judged, *since),
            VariantCounts::Histogram { .. } => panic!("error_rate is a counter"),
        }
    }

    #[test]
    fn experiments_count_per_variant_from_their_start_and_judge_from_their_epoch() {
        let catalogue = error_rate_catalogue();
        // no breakdown series at all: the variants are outside the cap
        let mut state = MetricState::new(0, &catalogue.metrics()[0], settings(0), NOW_MS);
        let start_ms = NOW_MS + 1_000;
        let watched = Watched {
            experiment: "e".into(),
            variants: vec!["A".into(), "B".into()],
            metrics: 0b1,
            started_ms: start_ms,
            epoch_ms: start_ms,
        };
        state.watch(std::slice::from_ref(&watched), NOW_MS);
        let a = [("e", "A")];
        // a batch accepted before the start does not count for it
        state.apply_batch(
            &[request("0", true, &a, &catalogue)],
            start_ms - 1,
            start_ms - 1,
        );
        let batch = vec![
            request("1", true, &a, &catalogue),
            request("2", false, &a, &catalogue),
            request("3", false, &a, &catalogue),
            request("4", true, &[("e", "B")], &catalogue),
            request("5", true, &[("other", "B"), ("e", "B")], &catalogue),
            request("6", true, &[("e", "C")], &catalogue),
            request("7", true, &[], &catalogue),
            request("8", true, &[("other", "A")], &catalogue),
        ];
        state.apply_batch(&batch, start_ms, start_ms);
        let tally = |sum: i128, count: u64| Tally { sum, count };
        assert_eq!(
            judged_and_since(&mut state, &watched, "A"),
            (tally(1, 3), tally(1, 3))
        );
        assert_eq!(
            judged_and_since(&mut state, &watched, "B"),
            (tally(2, 2), tally(2, 2))
        );
        assert_eq!(
            state
                .read_variants(&watched, true, NOW_MS)
                .unwrap()
                .unknown_variant,
            1
        );
        let mut other = watched.clone();
        other.experiment = "other".into();
        assert!(state.read_variants(&other, true, NOW_MS).is_none());
        // every event still counts in the metric itself
        let SeriesReading::Counter(total) = state.read(start_ms) else {
            panic!("a counter");
        };
        assert_eq!(total.sec30.current, tally(7, 9));

        // a resume, while it is being made durable: both epochs count
        let mut resumed = watched.clone();
        resumed.epoch_ms = start_ms + 2_000;
        state.watch(&[watched.clone(), resumed.clone()], start_ms + 2_000);
        state.apply_batch(
            &[request("9", true, &a, &catalogue)],
            start_ms + 2_000,
            start_ms + 2_000,
        );
        assert_eq!(
            judged_and_since(&mut state, &resumed, "A"),
            (tally(1, 1), tally(2, 4))
        );
        assert_eq!(
            judged_and_since(&mut state, &watched, "A"),
            (tally(2, 4), tally(2, 4))
        );
        // its write failed: back to the old epoch, nothing lost
        let mut undone = state.clone();
        undone.watch(std::slice::from_ref(&watched), start_ms + 2_000);
        assert_eq!(
            judged_and_since(&mut undone, &watched, "A"),
            (tally(2, 4), tally(2, 4))
        );
        assert!(undone.read_variants(&resumed, true, NOW_MS).is_none());
        // its write held: the new epoch alone
        state.watch(std::slice::from_ref(&resumed), start_ms + 2_000);
        assert_eq!(
            judged_and_since(&mut state, &resumed, "A"),
            (tally(1, 1), tally(2, 4))
        );
        assert!(state.read_variants(&watched, true, NOW_MS).is_none());

        // a snapshot and back: the same counts
        let exported = state.export_variants();
        let mut restored =
            MetricState::import(0, &catalogue.metrics()[0], settings(0), &state.export()).unwrap();
        restored.import_variants(&exported);
        restored.watch(std::slice::from_ref(&resumed), start_ms + 2_000);
        assert_eq!(
            restored.read_variants(&resumed, true, NOW_MS + 10_000),
            state.read_variants(&resumed, true, NOW_MS + 10_000)
        );
        // the store says a later resume than the snapshot knew: judged from zero
        let mut later = resumed.clone();
        later.epoch_ms = start_ms + 5_000;
        restored.watch(std::slice::from_ref(&later), start_ms + 5_000);
        assert_eq!(
            judged_and_since(&mut restored, &later, "A"),
            (tally(0, 0), tally(2, 4))
        );
        // registered again (a new start): counted from zero; gone: forgotten
        let mut again = watched.clone();
        again.started_ms = start_ms + 9_000;
        again.epoch_ms = start_ms + 9_000;
        state.watch(std::slice::from_ref(&again), start_ms + 9_000);
        assert_eq!(
            judged_and_since(&mut state, &again, "A"),
            (tally(0, 0), tally(0, 0))
        );
        state.watch(&[], start_ms + 9_000);
        assert!(state.read_variants(&again, true, NOW_MS).is_none());
    }

    #[test]
    fn a_histograms_variants_keep_their_values_through_a_snapshot() {
        let catalogue = Catalogue::new(vec![MetricDef {
            name: "latency".into(),
            kind: MetricKind::Histogram,
            types: vec!["checkout.completed".into()],
            numerator: vec![],
            dims: vec![],
        }]);
        let mut state = MetricState::new(0, &catalogue.metrics()[0], settings(10), NOW_MS);
        let watched = Watched {
            experiment: "e".into(),
            variants: vec!["A".into(), "B".into()],
            metrics: 0b1,
            started_ms: NOW_MS,
            epoch_ms: NOW_MS,
        };
        state.watch(std::slice::from_ref(&watched), NOW_MS);
        let mut model = empty_histogram(3_600_000);
        let events: Vec<ValidEvent> = [1u64, 250, 999, 1_234, 3_600_000, 3_599_999]
            .iter()
            .enumerate()
            .map(|(n, &value)| {
                model.record(value).unwrap();
                ValidEvent {
                    id: format!("c{n}"),
                    event_type: "checkout.completed".into(),
                    ts_ms: NOW_MS,
                    amount: None,
                    value: Some(value as f64),
                    value_integer: Some(value as i64),
                    dims: vec![],
                    experiments: vec![("e".into(), "B".into())],
                    route: catalogue.route("checkout.completed"),
                }
            })
            .collect();
        state.apply_batch(&events, NOW_MS, NOW_MS);
        let exported = state.export_variants();
        let mut restored =
            MetricState::import(0, &catalogue.metrics()[0], settings(10), &state.export()).unwrap();
        restored.import_variants(&exported);
        restored.watch(std::slice::from_ref(&watched), NOW_MS);
        for reading in [
            state.read_variants(&watched, true, NOW_MS).unwrap(),
            restored.read_variants(&watched, true, NOW_MS).unwrap(),
        ] {
            let VariantCounts::Histogram { since, judged, .. } = &reading.variants[1].1 else {
                panic!("a histogram");
            };
            // the top of the range too: bucket keys are lowest equivalents
            assert_eq!(*since, HistogramStats::of(&model));
            assert_eq!(
                HistogramStats::of(judged.as_ref().unwrap()),
                HistogramStats::of(&model)
            );
        }
    }

    #[test]
    fn series_points_are_aligned_to_the_step() {
        assert_eq!(
            point_groups(105, 30, 10),
            vec![(76, 79), (80, 89), (90, 99), (100, 105)]
        );
        assert_eq!(
            point_groups(109, 30, 10),
            vec![(80, 89), (90, 99), (100, 109)]
        );
        let catalogue = gmv_catalogue();
        let mut state = MetricState::new(0, &catalogue.metrics()[0], settings(10), NOW_MS);
        state.apply(&[order("1", 100, None, &catalogue)], NOW_MS);
        let SeriesPoints::Counter(points) =
            state.series_points(SlidingWindow::Sec30, 10, NOW_MS + 5_000)
        else {
            panic!("gmv is a counter");
        };
        let head_s = NOW_MS / 1000 + 5;
        assert_eq!(points.len(), 4);
        assert_eq!(points.last().unwrap().0, head_s / 10 * 10);
        let total: i128 = points.iter().map(|(_, tally)| tally.sum).sum();
        assert_eq!(total, 100);
    }
}
