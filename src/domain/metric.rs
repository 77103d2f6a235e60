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
use super::time::{SlidingWindow, BUCKET_HISTORY_S};
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
        match self {
            Series::Counter(windows) => SeriesExport::Counter(windows.export()),
            Series::Histogram(windows) => SeriesExport::Histogram(windows.export()),
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

/// A count since some moment: a tally, or a histogram (made with its first
/// value).
#[derive(Debug, Clone)]
enum Cumulative {
    Counter(Tally),
    Histogram(Option<Box<Histogram<u64>>>, u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CumulativeExport {
    Counter {
        sum: i128,
        count: u64,
    },
    /// `(value, count)` of the recorded buckets.
    Histogram(Vec<(u64, u64)>),
}

impl Cumulative {
    fn new(kind: &MetricKind, value_max: u64) -> Cumulative {
        match kind {
            MetricKind::Histogram => Cumulative::Histogram(None, value_max),
            _ => Cumulative::Counter(Tally::default()),
        }
    }

    fn record(&mut self, contribution: Contribution) {
        match (self, contribution) {
            (Cumulative::Counter(tally), Contribution::Counter { sum, count }) => {
                tally.add(Tally {
                    sum: sum as i128,
                    count: count as u64,
                })
            }
            (Cumulative::Histogram(histogram, value_max), Contribution::Histogram(value)) => {
                let value_max = *value_max;
                // validation keeps values within the histogram's range
                let _ = histogram
                    .get_or_insert_with(|| Box::new(empty_histogram(value_max)))
                    .record(value);
            }
            _ => {}
        }
    }

    fn export(&self) -> CumulativeExport {
        match self {
            Cumulative::Counter(tally) => CumulativeExport::Counter {
                sum: tally.sum,
                count: tally.count,
            },
            Cumulative::Histogram(histogram, _) => {
                CumulativeExport::Histogram(histogram.as_ref().map_or_else(Vec::new, |histogram| {
                    histogram
                        .iter_recorded()
                        .map(|bucket| (bucket.value_iterated_to(), bucket.count_at_value()))
                        .collect()
                }))
            }
        }
    }

    /// `None` when the export is of another kind than the metric now is.
    fn import(export: &CumulativeExport, kind: &MetricKind, value_max: u64) -> Option<Cumulative> {
        match (kind, export) {
            (MetricKind::Histogram, CumulativeExport::Histogram(buckets)) => {
                let mut histogram: Option<Box<Histogram<u64>>> = None;
                for &(value, count) in buckets.iter().filter(|(value, _)| *value <= value_max) {
                    let _ = histogram
                        .get_or_insert_with(|| Box::new(empty_histogram(value_max)))
                        .record_n(value, count);
                }
                Some(Cumulative::Histogram(histogram, value_max))
            }
            (MetricKind::Histogram, _) | (_, CumulativeExport::Histogram(_)) => None,
            (_, CumulativeExport::Counter { sum, count }) => Some(Cumulative::Counter(Tally {
                sum: *sum,
                count: *count,
            })),
        }
    }
}

#[derive(Debug, Clone)]
struct VariantSeries {
    since: Cumulative,
    judged: Cumulative,
    /// Its windows (the experiment view shows `15m`).
    recent: Series,
}

#[derive(Debug, Clone)]
struct VariantSet {
    watched: Watched,
    /// In the order of `watched.variants`.
    variants: Vec<VariantSeries>,
    /// Events that named the experiment with a variant it does not have.
    unknown_variant: u64,
}

impl VariantSet {
    fn new(
        watched: Watched,
        kind: &MetricKind,
        settings: &SeriesSettings,
        now_ms: i64,
    ) -> VariantSet {
        let variants = watched
            .variants
            .iter()
            .map(|_| VariantSeries {
                since: Cumulative::new(kind, settings.histogram_value_max),
                judged: Cumulative::new(kind, settings.histogram_value_max),
                recent: Series::new(kind, settings, now_ms),
            })
            .collect();
        VariantSet {
            watched,
            variants,
            unknown_variant: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariantExport {
    pub since: CumulativeExport,
    pub judged: CumulativeExport,
    pub recent: SeriesExport,
}

/// One experiment's per-variant counts of one metric, as a snapshot stores them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariantSetExport {
    pub watched: Watched,
    pub variants: Vec<VariantExport>,
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
        }
    }

    pub fn kind(&self) -> &MetricKind {
        &self.kind
    }

    pub fn export(&self) -> MetricExport {
        MetricExport {
            total: self.total.export(),
            breakdowns: self
                .breakdowns
                .iter()
                .map(|breakdown| {
                    let mut values: Vec<(String, SeriesExport)> = breakdown
                        .by_value
                        .iter()
                        .map(|(value, series)| (value.clone(), series.export()))
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
    /// experiments watched since then. Recovery replays through here too, so
    /// an experiment counts the same events live and after a restart.
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
        for event in events {
            if event.experiments.is_empty() {
                continue;
            }
            let Some(contribution) = self.contribution(event) else {
                continue;
            };
            for set in &mut self.experiments {
                if batch_ms < set.watched.started_ms {
                    continue;
                }
                let Some((_, variant)) = event
                    .experiments
                    .iter()
                    .find(|(experiment, _)| *experiment == set.watched.experiment)
                else {
                    continue;
                };
                let Some(index) = set.watched.variants.iter().position(|v| v == variant) else {
                    set.unknown_variant += 1;
                    continue;
                };
                let series = &mut set.variants[index];
                series.since.record(contribution);
                if batch_ms >= set.watched.epoch_ms {
                    series.judged.record(contribution);
                }
                // the total took this time, so the variant's windows take it too
                let _ = series.recent.record(event.ts_ms, contribution, now_ms);
            }
        }
        report
    }

    /// Sets the experiments this metric counts per variant: those of `watched`
    /// whose mask names it. An experiment already counted with the same start
    /// and variants keeps its counts (its judged counts restart when its
    /// epoch moved: a resume); any other starts from zero.
    pub fn watch(&mut self, watched: &[Watched], now_ms: i64) {
        let bit = 1u64 << self.index;
        let mut kept = Vec::new();
        for watched in watched.iter().filter(|w| w.metrics & bit != 0) {
            let same = self.experiments.iter().position(|set| {
                set.watched.experiment == watched.experiment
                    && set.watched.started_ms == watched.started_ms
                    && set.watched.variants == watched.variants
            });
            let set = match same {
                Some(index) => {
                    let mut set = self.experiments.swap_remove(index);
                    if set.watched.epoch_ms != watched.epoch_ms {
                        for series in &mut set.variants {
                            series.judged =
                                Cumulative::new(&self.kind, self.settings.histogram_value_max);
                        }
                    }
                    set.watched = watched.clone();
                    set
                }
                None => VariantSet::new(watched.clone(), &self.kind, &self.settings, now_ms),
            };
            kept.push(set);
        }
        self.experiments = kept;
    }

    /// The per-variant counts as a snapshot stores them.
    pub fn export_variants(&self) -> Vec<VariantSetExport> {
        self.experiments
            .iter()
            .map(|set| VariantSetExport {
                watched: set.watched.clone(),
                variants: set
                    .variants
                    .iter()
                    .map(|series| VariantExport {
                        since: series.since.export(),
                        judged: series.judged.export(),
                        recent: series.recent.export(),
                    })
                    .collect(),
                unknown_variant: set.unknown_variant,
            })
            .collect()
    }

    /// Puts back per-variant counts from a snapshot (before `watch` says
    /// which still count); a set of another kind than the metric is dropped.
    pub fn import_variants(&mut self, exports: &[VariantSetExport]) {
        for export in exports {
            if export.variants.len() != export.watched.variants.len() {
                continue;
            }
            let mut variants = Vec::with_capacity(export.variants.len());
            for variant in &export.variants {
                let value_max = self.settings.histogram_value_max;
                let (Some(since), Some(judged), Some(recent)) = (
                    Cumulative::import(&variant.since, &self.kind, value_max),
                    Cumulative::import(&variant.judged, &self.kind, value_max),
                    Series::import(&self.kind, &variant.recent, &self.settings),
                ) else {
                    break;
                };
                variants.push(VariantSeries {
                    since,
                    judged,
                    recent,
                });
            }
            if variants.len() == export.watched.variants.len() {
                self.experiments
                    .retain(|set| set.watched.experiment != export.watched.experiment);
                self.experiments.push(VariantSet {
                    watched: export.watched.clone(),
                    variants,
                    unknown_variant: export.unknown_variant,
                });
            }
        }
    }

    /// One experiment's counts per variant (in its order of variants) and the
    /// events that named a variant it does not have; `None` when this metric
    /// does not count it. Without `windows` the `15m` counts are left empty
    /// (a look needs only the judged counts; merging a histogram's 900
    /// seconds is most of a read's cost).
    pub fn read_variants(
        &mut self,
        experiment: &str,
        windows: bool,
        now_ms: i64,
    ) -> Option<VariantsReading> {
        let set = self
            .experiments
            .iter_mut()
            .find(|set| set.watched.experiment == experiment)?;
        let mut variants = Vec::with_capacity(set.variants.len());
        for (name, series) in set.watched.variants.iter().zip(&mut set.variants) {
            let counts = match (&series.since, &series.judged, &mut series.recent) {
                (
                    Cumulative::Counter(since),
                    Cumulative::Counter(judged),
                    Series::Counter(recent),
                ) => VariantCounts::Counter {
                    since: *since,
                    judged: *judged,
                    min15: if windows {
                        recent.read(now_ms).min15.current
                    } else {
                        Tally::default()
                    },
                },
                (
                    Cumulative::Histogram(since, _),
                    Cumulative::Histogram(judged, _),
                    Series::Histogram(recent),
                ) => VariantCounts::Histogram {
                    since: since
                        .as_deref()
                        .map_or_else(HistogramStats::default, HistogramStats::of),
                    judged: judged.clone(),
                    min15: if windows {
                        recent.read(now_ms).min15
                    } else {
                        HistogramStats::default()
                    },
                },
                // a set is made for its metric's kind, all three alike
                _ => continue,
            };
            variants.push((name.clone(), counts));
        }
        Some(VariantsReading {
            started_ms: set.watched.started_ms,
            epoch_ms: set.watched.epoch_ms,
            variants,
            unknown_variant: set.unknown_variant,
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

    fn judged_and_since(state: &mut MetricState, variant: &str) -> (Tally, Tally) {
        let reading = state.read_variants("e", true, NOW_MS + 10_000).unwrap();
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
        let mut watched = Watched {
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
            judged_and_since(&mut state, "A"),
            (tally(1, 3), tally(1, 3))
        );
        assert_eq!(
            judged_and_since(&mut state, "B"),
            (tally(2, 2), tally(2, 2))
        );
        assert_eq!(
            state
                .read_variants("e", true, NOW_MS)
                .unwrap()
                .unknown_variant,
            1
        );
        assert!(state.read_variants("other", true, NOW_MS).is_none());
        // every event still counts in the metric itself
        let SeriesReading::Counter(total) = state.read(start_ms) else {
            panic!("a counter");
        };
        assert_eq!(total.sec30.current, tally(7, 9));

        // a resume moves the epoch: judged counts start again, since stays
        watched.epoch_ms = start_ms + 2_000;
        state.watch(std::slice::from_ref(&watched), start_ms + 2_000);
        state.apply_batch(
            &[request("9", true, &a, &catalogue)],
            start_ms + 2_000,
            start_ms + 2_000,
        );
        assert_eq!(
            judged_and_since(&mut state, "A"),
            (tally(1, 1), tally(2, 4))
        );

        // a snapshot and back: the same counts
        let exported = state.export_variants();
        let mut restored =
            MetricState::import(0, &catalogue.metrics()[0], settings(0), &state.export()).unwrap();
        restored.import_variants(&exported);
        restored.watch(std::slice::from_ref(&watched), start_ms + 2_000);
        assert_eq!(
            restored.read_variants("e", true, NOW_MS + 10_000),
            state.read_variants("e", true, NOW_MS + 10_000)
        );
        // restored with an older epoch than the registry's: judged restarts
        let mut moved = watched.clone();
        moved.epoch_ms = start_ms + 5_000;
        restored.watch(std::slice::from_ref(&moved), start_ms + 5_000);
        assert_eq!(
            judged_and_since(&mut restored, "A"),
            (tally(0, 0), tally(2, 4))
        );
        // registered again (a new start): counted from zero; gone: forgotten
        let mut again = watched.clone();
        again.started_ms = start_ms + 9_000;
        state.watch(std::slice::from_ref(&again), start_ms + 9_000);
        assert_eq!(
            judged_and_since(&mut state, "A"),
            (tally(0, 0), tally(0, 0))
        );
        state.watch(&[], start_ms + 9_000);
        assert!(state.read_variants("e", true, NOW_MS).is_none());
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
