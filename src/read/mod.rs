//! The one read path: typed views of a tenant's metric windows, for every
//! surface that shows them (the HTTP queries, live push, the Prometheus scrape,
//! and the coming alerts, guardrails and CSV export). docs/architecture.md,
//! "the path of a read".
//!
//! Owns: a read's place in the tenant's read budget (`TenantReader`), whether
//! the tenant can serve it, the fan-out to the metric actors (every request
//! sent before any is awaited), and the views: what a window of each kind of
//! metric holds, its value, its previous value, its event count. A view
//! serializes to the JSON shape of API.md §4 (`serde`); the Prometheus text is
//! the scrape's to write from the same views.
//! Must not: decide who may read (the caller is resolved before a reader is
//! made), read the clock (`now_ms` comes from the caller), or wait without
//! bound (reads in flight per tenant are capped by permits).

pub mod feed;

use std::collections::HashMap;
use std::sync::Arc;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::actors::metric::{MetricRead, ReadMetric, ReadSeries, ReadVariants};
use crate::actors::{InFlight, TenantHandle};
use crate::domain::catalogue::{Catalogue, MetricKind};
use crate::domain::histogram::{HistogramReading, HistogramStats};
use crate::domain::metric::{MetricState, SeriesPoints, SeriesReading, VariantsReading, Watched};
use crate::domain::time::{SlidingWindow, WindowName};
use crate::domain::window::{CounterReading, Tally};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("unknown metric {0}")]
    UnknownMetric(String),
    #[error("metric {metric} has no breakdown by {dim}")]
    NoBreakdown { metric: String, dim: String },
    #[error("tenant {0} has too many reads in flight; retry later")]
    Busy(String),
    #[error("tenant {tenant} is not serving: {reason}")]
    NotServing { tenant: String, reason: String },
}

/// An integer that is a JSON number while it fits in i64, and a decimal
/// string beyond (a sum past ±2^63 is possible, and must not be rounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int(pub i128);

impl Serialize for Int {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match i64::try_from(self.0) {
            Ok(small) => serializer.serialize_i64(small),
            Err(_) => serializer.serialize_str(&self.0.to_string()),
        }
    }
}

/// `numerator / denominator × scale`; `None` for a zero denominator.
pub fn quotient(numerator: i128, denominator: i128, scale: u32) -> Option<f64> {
    (denominator != 0).then(|| numerator as f64 / denominator as f64 * scale as f64)
}

/// The two parts of a mean in one window, each already the value of its
/// metric (a sum's sum, a count's count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeanParts {
    pub sum: i128,
    pub count: i128,
}

/// One window of one metric. `prev` is the window before (30 s and 15 m);
/// `today` has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowView {
    Sum {
        current: Tally,
        prev: Option<Tally>,
    },
    Count {
        current: Tally,
        prev: Option<Tally>,
    },
    /// `sum` counts the numerator's events, `count` the denominator's.
    Ratio {
        current: Tally,
        prev: Option<Tally>,
    },
    Mean {
        current: MeanParts,
        prev: Option<MeanParts>,
        scale: u32,
    },
    Histogram(HistogramStats),
}

impl WindowView {
    /// The window's value in the metric's unit: a sum, a count, a ratio, a
    /// mean, or a histogram's p95. `None` when it has none (a zero
    /// denominator, an empty histogram).
    pub fn value(&self) -> Option<f64> {
        match self {
            WindowView::Sum { current, .. } => Some(current.sum as f64),
            WindowView::Count { current, .. } => Some(current.count as f64),
            WindowView::Ratio { current, .. } => quotient(current.sum, current.count as i128, 1),
            WindowView::Mean { current, scale, .. } => quotient(current.sum, current.count, *scale),
            WindowView::Histogram(stats) => stats.p95.map(|p95| p95 as f64),
        }
    }

    /// The value of the window before, where there is one.
    pub fn prev_value(&self) -> Option<f64> {
        match self {
            WindowView::Sum { prev, .. } => prev.map(|prev| prev.sum as f64),
            WindowView::Count { prev, .. } => prev.map(|prev| prev.count as f64),
            WindowView::Ratio { prev, .. } => {
                prev.and_then(|prev| quotient(prev.sum, prev.count as i128, 1))
            }
            WindowView::Mean { prev, scale, .. } => {
                prev.and_then(|prev| quotient(prev.sum, prev.count, *scale))
            }
            WindowView::Histogram(_) => None,
        }
    }

    /// True when both show a client the same figures (their JSON is equal): a
    /// mean shows its value alone, so parts that moved without moving it are
    /// no change. Cheaper than rendering both.
    pub fn shows_same(&self, other: &WindowView) -> bool {
        match (self, other) {
            (
                WindowView::Mean { prev, .. },
                WindowView::Mean {
                    prev: other_prev, ..
                },
            ) => {
                prev.is_some() == other_prev.is_some()
                    && self.value() == other.value()
                    && self.prev_value() == other.prev_value()
            }
            _ => self == other,
        }
    }

    /// Events the window before counted, where there is one.
    pub fn prev_events(&self) -> u64 {
        match self {
            WindowView::Sum { prev, .. }
            | WindowView::Count { prev, .. }
            | WindowView::Ratio { prev, .. } => prev.map_or(0, |prev| prev.count),
            WindowView::Mean { prev, .. } => prev.map_or(0, |prev| prev.count.max(0) as u64),
            WindowView::Histogram(_) => 0,
        }
    }

    /// Events the window counted (a ratio's denominator, a mean's count).
    pub fn events(&self) -> u64 {
        match self {
            WindowView::Sum { current, .. }
            | WindowView::Count { current, .. }
            | WindowView::Ratio { current, .. } => current.count,
            WindowView::Mean { current, .. } => current.count.max(0) as u64,
            WindowView::Histogram(stats) => stats.count,
        }
    }
}

/// The JSON shape of API.md §4.
impl Serialize for WindowView {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        match self {
            WindowView::Sum { current, prev } => {
                map.serialize_entry("value", &Int(current.sum))?;
                map.serialize_entry("count", &current.count)?;
                if let Some(prev) = prev {
                    map.serialize_entry("prev", &Int(prev.sum))?;
                    map.serialize_entry("prev_count", &prev.count)?;
                }
            }
            WindowView::Count { current, prev } => {
                map.serialize_entry("value", &current.count)?;
                if let Some(prev) = prev {
                    map.serialize_entry("prev", &prev.count)?;
                }
            }
            WindowView::Ratio { current, prev } => {
                map.serialize_entry("value", &self.value())?;
                map.serialize_entry("numerator", &Int(current.sum))?;
                map.serialize_entry("denominator", &current.count)?;
                if let Some(prev) = prev {
                    map.serialize_entry("prev", &self.prev_value())?;
                    map.serialize_entry("prev_numerator", &Int(prev.sum))?;
                    map.serialize_entry("prev_denominator", &prev.count)?;
                }
            }
            WindowView::Mean { prev, .. } => {
                map.serialize_entry("value", &self.value())?;
                if prev.is_some() {
                    map.serialize_entry("prev", &self.prev_value())?;
                }
            }
            WindowView::Histogram(stats) => {
                map.serialize_entry("count", &stats.count)?;
                map.serialize_entry("p50", &stats.p50)?;
                map.serialize_entry("p90", &stats.p90)?;
                map.serialize_entry("p95", &stats.p95)?;
                map.serialize_entry("p99", &stats.p99)?;
                map.serialize_entry("max", &stats.max)?;
            }
        }
        map.end()
    }
}

/// The windows of one metric (all three, or those asked for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricView {
    pub kind: &'static str,
    pub windows: Vec<(WindowName, WindowView)>,
}

impl MetricView {
    pub fn window(&self, name: WindowName) -> Option<&WindowView> {
        self.windows
            .iter()
            .find(|(window, _)| *window == name)
            .map(|(_, view)| view)
    }
}

/// `{"kind": …, "windows": {"30s": …, …}}`
impl Serialize for MetricView {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Windows<'w>(&'w [(WindowName, WindowView)]);
        impl Serialize for Windows<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(self.0.len()))?;
                for (name, view) in self.0 {
                    map.serialize_entry(name.name(), view)?;
                }
                map.end()
            }
        }
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("kind", self.kind)?;
        map.serialize_entry("windows", &Windows(&self.windows))?;
        map.end()
    }
}

/// The value a counter metric reports: the count for counts, the sum
/// otherwise (a mean's parts are read this way).
fn counter_value(kind: &MetricKind, tally: Tally) -> i128 {
    match kind {
        MetricKind::Count => tally.count as i128,
        _ => tally.sum,
    }
}

fn tallies(reading: &CounterReading, window: WindowName) -> (Tally, Option<Tally>) {
    match window {
        WindowName::Today => (reading.today, None),
        WindowName::Sliding(sliding) => {
            let tally = reading.sliding(sliding);
            (tally.current, Some(tally.prev))
        }
    }
}

fn histogram_stats(reading: &HistogramReading, window: WindowName) -> HistogramStats {
    match window {
        WindowName::Sliding(SlidingWindow::Sec30) => reading.sec30,
        WindowName::Sliding(SlidingWindow::Min15) => reading.min15,
        WindowName::Today => reading.today,
    }
}

/// The readings a metric's view needs: its own, or a mean's two parts.
pub fn needed_readings(catalogue: &Catalogue, index: usize) -> Vec<usize> {
    match catalogue.metrics()[index].kind {
        MetricKind::Mean {
            sum_metric,
            count_metric,
            ..
        } => vec![sum_metric, count_metric],
        _ => vec![index],
    }
}

/// The view of metric `index` from the readings of its actors; `None` when a
/// reading it needs is missing (a mean whose parts do not share a dim value).
pub fn metric_view(
    catalogue: &Catalogue,
    index: usize,
    readings: &HashMap<usize, SeriesReading>,
    windows: &[WindowName],
) -> Option<MetricView> {
    let kind = &catalogue.metrics()[index].kind;
    let mut views = Vec::with_capacity(windows.len());
    for &window in windows {
        let view = match kind {
            MetricKind::Histogram => match readings.get(&index)? {
                SeriesReading::Histogram(reading) => {
                    WindowView::Histogram(histogram_stats(reading, window))
                }
                SeriesReading::Counter(_) => return None,
            },
            MetricKind::Mean {
                sum_metric,
                count_metric,
                scale,
            } => match (readings.get(sum_metric)?, readings.get(count_metric)?) {
                (SeriesReading::Counter(sums), SeriesReading::Counter(counts)) => {
                    let sum_kind = &catalogue.metrics()[*sum_metric].kind;
                    let count_kind = &catalogue.metrics()[*count_metric].kind;
                    let parts = |sum: Tally, count: Tally| MeanParts {
                        sum: counter_value(sum_kind, sum),
                        count: counter_value(count_kind, count),
                    };
                    let (sum, sum_prev) = tallies(sums, window);
                    let (count, count_prev) = tallies(counts, window);
                    WindowView::Mean {
                        current: parts(sum, count),
                        prev: sum_prev.zip(count_prev).map(|(s, c)| parts(s, c)),
                        scale: *scale,
                    }
                }
                _ => return None,
            },
            _ => match readings.get(&index)? {
                SeriesReading::Counter(reading) => {
                    let (current, prev) = tallies(reading, window);
                    match kind {
                        MetricKind::Count => WindowView::Count { current, prev },
                        MetricKind::Ratio => WindowView::Ratio { current, prev },
                        _ => WindowView::Sum { current, prev },
                    }
                }
                SeriesReading::Histogram(_) => return None,
            },
        };
        views.push((window, view));
    }
    Some(MetricView {
        kind: kind.name(),
        windows: views,
    })
}

/// A statistic of a histogram series point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistogramStat {
    Count,
    P50,
    P90,
    P95,
    P99,
    Max,
}

impl HistogramStat {
    pub fn parse(text: &str) -> Option<HistogramStat> {
        Some(match text {
            "count" => HistogramStat::Count,
            "p50" => HistogramStat::P50,
            "p90" => HistogramStat::P90,
            "p95" => HistogramStat::P95,
            "p99" => HistogramStat::P99,
            "max" => HistogramStat::Max,
            _ => return None,
        })
    }

    fn of(self, stats: &HistogramStats) -> Option<u64> {
        match self {
            HistogramStat::Count => Some(stats.count),
            HistogramStat::P50 => stats.p50,
            HistogramStat::P90 => stats.p90,
            HistogramStat::P95 => stats.p95,
            HistogramStat::P99 => stats.p99,
            HistogramStat::Max => stats.max,
        }
    }
}

/// The value of one series point: exact integers, or a ratio or mean (`None`
/// for a zero denominator or an empty histogram).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PointValue {
    Int(i128),
    Float(Option<f64>),
}

impl Serialize for PointValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            PointValue::Int(value) => Int(*value).serialize(serializer),
            PointValue::Float(value) => value.serialize(serializer),
        }
    }
}

/// A tenant's read: its place in the tenant's read budget, held until the
/// reader is dropped (and by every message the reader sent, until handled).
pub struct TenantReader {
    tenant: Arc<TenantHandle>,
    in_flight: InFlight,
}

impl TenantReader {
    /// A reader of `tenant`, or why it cannot read now.
    pub fn begin(tenant: &Arc<TenantHandle>) -> Result<TenantReader, ReadError> {
        if let Some(reason) = tenant.failure() {
            return Err(ReadError::NotServing {
                tenant: tenant.context.id.to_string(),
                reason,
            });
        }
        let permit = Arc::clone(&tenant.query_permits)
            .try_acquire_owned()
            .map_err(|_| {
                crate::telemetry::count_shed(crate::telemetry::Shed::ReadsInFlight);
                ReadError::Busy(tenant.context.id.to_string())
            })?;
        Ok(TenantReader {
            tenant: Arc::clone(tenant),
            in_flight: InFlight::new(permit),
        })
    }

    pub fn tenant(&self) -> &TenantHandle {
        &self.tenant
    }

    /// The read's place in the budget, for a message to the tenant actor
    /// (the quarantine routes share the read budget).
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.clone()
    }

    fn catalogue(&self) -> &Catalogue {
        &self.tenant.context.catalogue
    }

    fn gone(&self) -> ReadError {
        ReadError::NotServing {
            tenant: self.tenant.context.id.to_string(),
            reason: "a metric actor did not answer".into(),
        }
    }

    /// The actor of metric `index`, once it has one.
    fn actor(&self, index: usize) -> Option<&actix::Addr<crate::actors::metric::MetricActor>> {
        self.tenant.metrics.get(index)?.get()
    }

    /// A metric that never had events reads as a fresh state (no actor is
    /// started for a read); `None` for metrics without state (mean).
    fn empty_state(&self, index: usize, now_ms: i64) -> Option<MetricState> {
        let def = self.catalogue().metrics().get(index)?;
        def.kind
            .has_state()
            .then(|| MetricState::new(index, def, self.tenant.settings, now_ms))
    }

    /// The index of a metric by name.
    pub fn metric_index(&self, name: &str) -> Result<usize, ReadError> {
        self.catalogue()
            .index_of(name)
            .ok_or_else(|| ReadError::UnknownMetric(name.to_string()))
    }

    /// One experiment's per-variant counts of metric `index`: `None` when the
    /// metric has had no events yet or does not count that experiment.
    pub async fn variants(
        &self,
        index: usize,
        watched: &Watched,
        windows: bool,
        now_ms: i64,
    ) -> Result<Option<VariantsReading>, ReadError> {
        let Some(addr) = self.actor(index) else {
            return Ok(None);
        };
        addr.send(ReadVariants {
            now_ms,
            watched: watched.clone(),
            windows,
            in_flight: self.in_flight.clone(),
        })
        .await
        .map_err(|_| self.gone())
    }

    /// Reads metrics `indices` (total, or by `dim`); every request is sent
    /// before any is awaited.
    async fn read(
        &self,
        indices: &[usize],
        by: Option<&str>,
        now_ms: i64,
    ) -> Result<HashMap<usize, MetricRead>, ReadError> {
        let mut requests = Vec::with_capacity(indices.len());
        let mut reads = HashMap::with_capacity(indices.len());
        for &index in indices {
            if let Some(addr) = self.actor(index) {
                requests.push((
                    index,
                    addr.send(ReadMetric {
                        now_ms,
                        by: by.map(str::to_string),
                        in_flight: self.in_flight.clone(),
                    }),
                ));
            } else if let Some(mut empty) = self.empty_state(index, now_ms) {
                let read = match by {
                    None => MetricRead::Total(empty.read(now_ms)),
                    Some(dim) => MetricRead::Breakdown(empty.read_breakdown(dim, now_ms)),
                };
                reads.insert(index, read);
            }
        }
        for (index, request) in requests {
            reads.insert(index, request.await.map_err(|_| self.gone())?);
        }
        Ok(reads)
    }

    async fn totals(
        &self,
        indices: &[usize],
        now_ms: i64,
    ) -> Result<HashMap<usize, SeriesReading>, ReadError> {
        Ok(self
            .read(indices, None, now_ms)
            .await?
            .into_iter()
            .filter_map(|(index, read)| match read {
                MetricRead::Total(reading) => Some((index, reading)),
                MetricRead::Breakdown(_) => None,
            })
            .collect())
    }

    /// Every metric of the tenant, every window, in catalogue order.
    pub async fn all(&self, now_ms: i64) -> Result<Vec<(String, MetricView)>, ReadError> {
        let catalogue = self.catalogue();
        let indices: Vec<usize> = (0..catalogue.metrics().len()).collect();
        let readings = self.totals(&indices, now_ms).await?;
        let mut views = Vec::with_capacity(indices.len());
        for (index, def) in catalogue.metrics().iter().enumerate() {
            if let Some(view) = metric_view(catalogue, index, &readings, &WindowName::ALL) {
                views.push((def.name.clone(), view));
            }
        }
        Ok(views)
    }

    /// One metric's total in `windows`.
    pub async fn metric(
        &self,
        index: usize,
        windows: &[WindowName],
        now_ms: i64,
    ) -> Result<MetricView, ReadError> {
        let catalogue = self.catalogue();
        let readings = self
            .totals(&needed_readings(catalogue, index), now_ms)
            .await?;
        metric_view(catalogue, index, &readings, windows).ok_or_else(|| self.gone())
    }

    /// One metric by the values of `dim`, sorted by value. A mean's value is
    /// listed once both of its parts have it.
    pub async fn breakdown(
        &self,
        index: usize,
        dim: &str,
        windows: &[WindowName],
        now_ms: i64,
    ) -> Result<Vec<(String, MetricView)>, ReadError> {
        let catalogue = self.catalogue();
        if !catalogue.breakdown_dims(index).iter().any(|d| d == dim) {
            return Err(ReadError::NoBreakdown {
                metric: catalogue.metrics()[index].name.clone(),
                dim: dim.to_string(),
            });
        }
        let reads = self
            .read(&needed_readings(catalogue, index), Some(dim), now_ms)
            .await?;
        let mut by_value: std::collections::BTreeMap<String, HashMap<usize, SeriesReading>> =
            Default::default();
        for (reading_index, read) in reads {
            if let MetricRead::Breakdown(Some(values)) = read {
                for (value, reading) in values {
                    by_value
                        .entry(value)
                        .or_default()
                        .insert(reading_index, reading);
                }
            }
        }
        Ok(by_value
            .into_iter()
            .filter_map(|(value, readings)| {
                Some((value, metric_view(catalogue, index, &readings, windows)?))
            })
            .collect())
    }

    /// One metric's in-memory buckets as `(start ms, value)` points of
    /// `step_s` seconds over `window`; `stat` picks a histogram's statistic.
    pub async fn series(
        &self,
        index: usize,
        window: SlidingWindow,
        step_s: i64,
        stat: HistogramStat,
        now_ms: i64,
    ) -> Result<Vec<(i64, PointValue, u64)>, ReadError> {
        let catalogue = self.catalogue();
        // the metric's points, or its parts' (a mean), in order
        let mut requests = Vec::new();
        for reading_index in needed_readings(catalogue, index) {
            if let Some(addr) = self.actor(reading_index) {
                requests.push(Ok(addr.send(ReadSeries {
                    now_ms,
                    window,
                    step_s,
                    in_flight: self.in_flight.clone(),
                })));
            } else if let Some(mut empty) = self.empty_state(reading_index, now_ms) {
                requests.push(Err(empty.series_points(window, step_s, now_ms)));
            }
        }
        let mut series = Vec::with_capacity(requests.len());
        for request in requests {
            series.push(match request {
                Ok(request) => request.await.map_err(|_| self.gone())?,
                Err(points) => points,
            });
        }
        let kind = &catalogue.metrics()[index].kind;
        let points = match (kind, series.as_slice()) {
            (MetricKind::Histogram, [SeriesPoints::Histogram(points)]) => points
                .iter()
                .map(|(second, stats)| {
                    let value = match stat.of(stats) {
                        Some(value) => PointValue::Int(value as i128),
                        None => PointValue::Float(None),
                    };
                    (second * 1000, value, stats.count)
                })
                .collect(),
            (
                MetricKind::Mean {
                    sum_metric,
                    count_metric,
                    scale,
                },
                [SeriesPoints::Counter(sums), SeriesPoints::Counter(counts)],
            ) => {
                let sum_kind = &catalogue.metrics()[*sum_metric].kind;
                let count_kind = &catalogue.metrics()[*count_metric].kind;
                sums.iter()
                    .zip(counts)
                    .map(|((second, sum), (_, count))| {
                        let value = quotient(
                            counter_value(sum_kind, *sum),
                            counter_value(count_kind, *count),
                            *scale,
                        );
                        // the events the mean divides by
                        let divided = u64::try_from(counter_value(count_kind, *count)).unwrap_or(0);
                        (second * 1000, PointValue::Float(value), divided)
                    })
                    .collect()
            }
            (_, [SeriesPoints::Counter(points)]) => points
                .iter()
                .map(|(second, tally)| {
                    let value = match kind {
                        MetricKind::Ratio => {
                            PointValue::Float(quotient(tally.sum, tally.count as i128, 1))
                        }
                        _ => PointValue::Int(counter_value(kind, *tally)),
                    };
                    (second * 1000, value, tally.count)
                })
                .collect(),
            _ => return Err(self.gone()),
        };
        Ok(points)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_stay_exact() {
        assert_eq!(json!(Int(1_250_000)), json!(1_250_000));
        assert_eq!(
            json!(Int(i64::MAX as i128 + 1)),
            json!("9223372036854775808")
        );
        assert_eq!(quotient(31, 1000, 1), Some(0.031));
        assert_eq!(quotient(1, 0, 1), None);
        assert_eq!(quotient(2500, 3, 1000), Some(833333.3333333334));
    }

    #[test]
    fn windows_serialize_to_the_api_shape() {
        let tally = |sum, count| Tally { sum, count };
        let ratio = WindowView::Ratio {
            current: tally(31, 1000),
            prev: Some(tally(0, 0)),
        };
        assert_eq!(
            json!(ratio),
            json!({"value": 0.031, "numerator": 31, "denominator": 1000,
                   "prev": null, "prev_numerator": 0, "prev_denominator": 0})
        );
        assert_eq!(ratio.value(), Some(0.031));
        assert_eq!(ratio.events(), 1000);
        let sum_today = WindowView::Sum {
            current: tally(4200, 3),
            prev: None,
        };
        assert_eq!(json!(sum_today), json!({"value": 4200, "count": 3}));
        let mean = WindowView::Mean {
            current: MeanParts {
                sum: 4200,
                count: 3,
            },
            prev: Some(MeanParts { sum: 0, count: 0 }),
            scale: 1,
        };
        assert_eq!(json!(mean), json!({"value": 1400.0, "prev": null}));
        let same_mean = WindowView::Mean {
            current: MeanParts {
                sum: 8400,
                count: 6,
            },
            prev: Some(MeanParts { sum: 0, count: 0 }),
            scale: 1,
        };
        assert!(mean.shows_same(&same_mean) && mean != same_mean);
        assert!(!ratio.shows_same(&sum_today));
        let view = MetricView {
            kind: "count",
            windows: vec![(
                WindowName::Today,
                WindowView::Count {
                    current: tally(0, 3),
                    prev: None,
                },
            )],
        };
        assert_eq!(
            json!(view),
            json!({"kind": "count", "windows": {"today": {"value": 3}}})
        );
    }
}
