//! The JSON shapes of metric windows (API.md §4), shared by every reader (the
//! query routes now; live push later). Pure formatting of readings.
//!
//! Integers are JSON numbers; a sum beyond ±2^63 (never reached by real traffic,
//! but possible) is written as a decimal string rather than rounded.
//! Ratios and means are floats; a zero denominator gives `null`.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::domain::catalogue::{Catalogue, MetricKind};
use crate::domain::histogram::HistogramStats;
use crate::domain::metric::SeriesReading;
use crate::domain::time::WindowName;
use crate::domain::window::{CounterReading, SlidingTally, Tally};

pub fn int_json(value: i128) -> Value {
    if let Ok(small) = i64::try_from(value) {
        Value::from(small)
    } else {
        Value::String(value.to_string())
    }
}

pub fn ratio_json(numerator: i128, denominator: i128, scale: u32) -> Value {
    if denominator == 0 {
        return Value::Null;
    }
    let quotient = numerator as f64 / denominator as f64 * scale as f64;
    serde_json::Number::from_f64(quotient).map_or(Value::Null, Value::Number)
}

pub fn histogram_json(stats: &HistogramStats) -> Value {
    json!({
        "count": stats.count,
        "p50": stats.p50,
        "p90": stats.p90,
        "p95": stats.p95,
        "p99": stats.p99,
        "max": stats.max,
    })
}

/// What a counter metric reports as its value: the sum for sums, the count for
/// counts (used by `mean` for both of its parts).
pub fn counter_value(kind: &MetricKind, tally: Tally) -> i128 {
    match kind {
        MetricKind::Count => tally.count as i128,
        _ => tally.sum,
    }
}

fn counter_window(kind: &MetricKind, window: WindowName, reading: &CounterReading) -> Value {
    match window {
        WindowName::Today => {
            let today = reading.today;
            match kind {
                MetricKind::Sum { .. } => {
                    json!({"value": int_json(today.sum), "count": today.count})
                }
                MetricKind::Count => json!({"value": today.count}),
                _ => json!({
                    "value": ratio_json(today.sum, today.count as i128, 1),
                    "numerator": int_json(today.sum),
                    "denominator": today.count,
                }),
            }
        }
        WindowName::Sliding(window) => {
            let SlidingTally { current, prev } = reading.sliding(window);
            match kind {
                MetricKind::Sum { .. } => json!({
                    "value": int_json(current.sum), "count": current.count,
                    "prev": int_json(prev.sum), "prev_count": prev.count,
                }),
                MetricKind::Count => json!({"value": current.count, "prev": prev.count}),
                _ => json!({
                    "value": ratio_json(current.sum, current.count as i128, 1),
                    "numerator": int_json(current.sum),
                    "denominator": current.count,
                    "prev": ratio_json(prev.sum, prev.count as i128, 1),
                    "prev_numerator": int_json(prev.sum),
                    "prev_denominator": prev.count,
                }),
            }
        }
    }
}

fn histogram_window(
    window: WindowName,
    reading: &crate::domain::histogram::HistogramReading,
) -> Value {
    let stats = match window {
        WindowName::Sliding(crate::domain::time::SlidingWindow::Sec30) => &reading.sec30,
        WindowName::Sliding(crate::domain::time::SlidingWindow::Min15) => &reading.min15,
        WindowName::Today => &reading.today,
    };
    histogram_json(stats)
}

fn mean_window(
    catalogue: &Catalogue,
    sum_metric: usize,
    count_metric: usize,
    scale: u32,
    window: WindowName,
    sum_reading: &CounterReading,
    count_reading: &CounterReading,
) -> Value {
    let sum_kind = &catalogue.metrics()[sum_metric].kind;
    let count_kind = &catalogue.metrics()[count_metric].kind;
    let mean = |sum: Tally, count: Tally| {
        ratio_json(
            counter_value(sum_kind, sum),
            counter_value(count_kind, count),
            scale,
        )
    };
    match window {
        WindowName::Today => json!({"value": mean(sum_reading.today, count_reading.today)}),
        WindowName::Sliding(window) => {
            let (sum, count) = (sum_reading.sliding(window), count_reading.sliding(window));
            json!({"value": mean(sum.current, count.current), "prev": mean(sum.prev, count.prev)})
        }
    }
}

/// The readings a metric's shape needs: its own, or a mean's two parts.
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

/// `{"kind": …, "windows": {…}}` of one metric; `None` when a reading it needs
/// is missing.
pub fn metric_json(
    catalogue: &Catalogue,
    index: usize,
    readings: &HashMap<usize, SeriesReading>,
    windows: &[WindowName],
) -> Option<Value> {
    let kind = &catalogue.metrics()[index].kind;
    let mut shaped = Map::new();
    for &window in windows {
        let value = match kind {
            MetricKind::Histogram => match readings.get(&index)? {
                SeriesReading::Histogram(reading) => histogram_window(window, reading),
                SeriesReading::Counter(_) => return None,
            },
            MetricKind::Mean {
                sum_metric,
                count_metric,
                scale,
            } => match (readings.get(sum_metric)?, readings.get(count_metric)?) {
                (SeriesReading::Counter(sum), SeriesReading::Counter(count)) => mean_window(
                    catalogue,
                    *sum_metric,
                    *count_metric,
                    *scale,
                    window,
                    sum,
                    count,
                ),
                _ => return None,
            },
            _ => match readings.get(&index)? {
                SeriesReading::Counter(reading) => counter_window(kind, window, reading),
                SeriesReading::Histogram(_) => return None,
            },
        };
        shaped.insert(window.name().to_string(), value);
    }
    Some(json!({"kind": kind.name(), "windows": Value::Object(shaped)}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_stay_exact() {
        assert_eq!(int_json(1_250_000), json!(1_250_000));
        assert_eq!(int_json(i64::MAX as i128 + 1), json!("9223372036854775808"));
        assert_eq!(ratio_json(31, 1000, 1), json!(0.031));
        assert_eq!(ratio_json(1, 0, 1), Value::Null);
        assert_eq!(ratio_json(2500, 3, 1000), json!(833333.3333333334));
    }
}
