//! `GET /metrics` (API.md §9): the exporter's node telemetry, then the current
//! window values of every tenant (unless `prometheus.tenant_values = false`),
//! at most `prometheus.tenant_series_max` samples, in the Prometheus text format.
//! Must not: let a scrape stall ingestion (tenant reads take a read permit like
//! any read; a busy tenant is left out of that scrape) or expose label values
//! that do not come from config.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::actors::metric::MetricRead;
use crate::actors::InFlight;
use crate::app::Node;
use crate::config::key_digest;
use crate::domain::catalogue::MetricKind;
use crate::domain::histogram::HistogramStats;
use crate::domain::metric::SeriesReading;
use crate::domain::time::{SlidingWindow, WindowName};
use crate::domain::window::Tally;
use crate::telemetry;

use super::error::ApiError;
use super::query::read_metrics;
use super::shape::counter_value;

/// The families of tenant window samples (name, type, help), in the order they
/// are written. Quantiles are a summary: only summaries may carry `quantile`.
const FAMILIES: [(&str, &str, &str); 8] = [
    (
        "tally_window_value",
        "gauge",
        "current value of a metric's window (sum, count, ratio or mean; the metric's unit)",
    ),
    (
        "tally_window_prev_value",
        "gauge",
        "value of the window before the current one (30s and 15m)",
    ),
    (
        "tally_window_events",
        "gauge",
        "events counted in the window (ratios: the denominator)",
    ),
    (
        "tally_window_prev_events",
        "gauge",
        "events counted in the window before the current one",
    ),
    (
        "tally_window_numerator",
        "gauge",
        "ratio metrics: events counted in the numerator",
    ),
    (
        "tally_window_quantile",
        "summary",
        "histogram metrics: value at the quantile (the metric's unit)",
    ),
    (
        "tally_window_max",
        "gauge",
        "histogram metrics: largest value in the window",
    ),
    (
        "tally_window_mean_denominator",
        "gauge",
        "mean metrics: the count the mean divides by",
    ),
];

/// Samples collected per family, then written family by family (the text
/// format wants each family's samples together).
struct Samples {
    by_family: Vec<Vec<String>>,
    written: usize,
    dropped: usize,
    max: usize,
}

impl Samples {
    fn push(&mut self, family: usize, labels: &str, value: &str) {
        if self.written >= self.max {
            self.dropped += 1;
            return;
        }
        self.written += 1;
        self.by_family[family].push(format!("{}{{{labels}}} {value}", FAMILIES[family].0));
    }

    fn push_int(&mut self, family: usize, labels: &str, value: i128) {
        self.push(family, labels, &value.to_string());
    }

    fn push_float(&mut self, family: usize, labels: &str, value: Option<f64>) {
        if let Some(value) = value.filter(|v| v.is_finite()) {
            self.push(family, labels, &value.to_string());
        }
    }
}

fn quotient(numerator: i128, denominator: i128, scale: u32) -> Option<f64> {
    (denominator != 0).then(|| numerator as f64 / denominator as f64 * scale as f64)
}

fn authorized(node: &Node, headers: &HeaderMap) -> bool {
    let expected = &node.config.prometheus.bearer_token;
    if expected.is_empty() {
        return true;
    }
    let Ok(expected) = key_digest(expected) else {
        return false;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let Some(token) = presented else {
        return false;
    };
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    bool::from(digest.ct_eq(&expected))
}

pub async fn get_metrics(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    if !authorized(&node, &headers) {
        return ApiError::Unauthorized.into_response();
    }
    telemetry::collect_process_metrics();
    let mut text = String::new();
    if node.config.prometheus.tenant_values {
        let samples = tenant_samples(&node).await;
        if samples.dropped > 0 {
            telemetry::count_tenant_series_dropped(samples.dropped as u64);
        }
        for (family, (name, kind, help)) in FAMILIES.iter().enumerate() {
            if samples.by_family[family].is_empty() {
                continue;
            }
            let _ = writeln!(text, "# HELP {name} {help}");
            let _ = writeln!(text, "# TYPE {name} {kind}");
            for line in &samples.by_family[family] {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    // the tenant families after the exporter's, each family whole
    let mut rendered = node.prometheus.render();
    rendered.push_str(&text);
    let mut response = (StatusCode::OK, rendered).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn tenant_samples(node: &Node) -> Samples {
    let mut samples = Samples {
        by_family: vec![Vec::new(); FAMILIES.len()],
        written: 0,
        dropped: 0,
        max: node.config.prometheus.tenant_series_max,
    };
    let catalogue = &node.catalogue;
    let indices: Vec<usize> = (0..catalogue.metrics().len()).collect();
    let mut tenant_ids: Vec<&String> = node.tenants.keys().collect();
    tenant_ids.sort();
    let now_ms = node.now_ms();
    for tenant_id in tenant_ids {
        let tenant = &node.tenants[tenant_id];
        let Ok(permit) = Arc::clone(&tenant.query_permits).try_acquire_owned() else {
            tracing::warn!(tenant = %tenant_id, "tenant busy: its window values are left out of this scrape");
            continue;
        };
        let in_flight = InFlight::new(permit);
        let Ok(reads) = read_metrics(node, tenant, &indices, None, now_ms, &in_flight).await else {
            continue;
        };
        let readings: HashMap<usize, SeriesReading> = reads
            .into_iter()
            .filter_map(|(index, read)| match read {
                MetricRead::Total(reading) => Some((index, reading)),
                MetricRead::Breakdown(_) => None,
            })
            .collect();
        for (index, def) in catalogue.metrics().iter().enumerate() {
            for window in WindowName::ALL {
                let labels = format!(
                    "tenant=\"{tenant_id}\",metric=\"{}\",window=\"{}\"",
                    def.name,
                    window.name()
                );
                metric_samples(
                    &mut samples,
                    &labels,
                    &def.kind,
                    index,
                    window,
                    &readings,
                    catalogue,
                );
            }
        }
    }
    samples
}

/// The current and previous tallies of a counter window (no previous for today).
fn tallies(reading: &SeriesReading, window: WindowName) -> Option<(Tally, Option<Tally>)> {
    let SeriesReading::Counter(counter) = reading else {
        return None;
    };
    Some(match window {
        WindowName::Today => (counter.today, None),
        WindowName::Sliding(sliding) => {
            let tally = counter.sliding(sliding);
            (tally.current, Some(tally.prev))
        }
    })
}

fn metric_samples(
    samples: &mut Samples,
    labels: &str,
    kind: &MetricKind,
    index: usize,
    window: WindowName,
    readings: &HashMap<usize, SeriesReading>,
    catalogue: &crate::domain::catalogue::Catalogue,
) {
    match kind {
        MetricKind::Histogram => {
            let Some(SeriesReading::Histogram(reading)) = readings.get(&index) else {
                return;
            };
            let stats: &HistogramStats = match window {
                WindowName::Sliding(SlidingWindow::Sec30) => &reading.sec30,
                WindowName::Sliding(SlidingWindow::Min15) => &reading.min15,
                WindowName::Today => &reading.today,
            };
            samples.push_int(2, labels, stats.count as i128);
            for (quantile, value) in [
                ("0.5", stats.p50),
                ("0.9", stats.p90),
                ("0.95", stats.p95),
                ("0.99", stats.p99),
            ] {
                if let Some(value) = value {
                    samples.push_int(
                        5,
                        &format!("{labels},quantile=\"{quantile}\""),
                        value as i128,
                    );
                }
            }
            if let Some(max) = stats.max {
                samples.push_int(6, labels, max as i128);
            }
        }
        MetricKind::Mean {
            sum_metric,
            count_metric,
            scale,
        } => {
            let (Some(sums), Some(counts)) = (readings.get(sum_metric), readings.get(count_metric))
            else {
                return;
            };
            let (Some((sum, sum_prev)), Some((count, count_prev))) =
                (tallies(sums, window), tallies(counts, window))
            else {
                return;
            };
            let sum_kind = &catalogue.metrics()[*sum_metric].kind;
            let count_kind = &catalogue.metrics()[*count_metric].kind;
            let denominator = counter_value(count_kind, count);
            samples.push_float(
                0,
                labels,
                quotient(counter_value(sum_kind, sum), denominator, *scale),
            );
            samples.push_int(7, labels, denominator);
            if let (Some(sum_prev), Some(count_prev)) = (sum_prev, count_prev) {
                let prev = quotient(
                    counter_value(sum_kind, sum_prev),
                    counter_value(count_kind, count_prev),
                    *scale,
                );
                samples.push_float(1, labels, prev);
            }
        }
        MetricKind::Ratio => {
            let Some((current, prev)) = readings.get(&index).and_then(|r| tallies(r, window))
            else {
                return;
            };
            samples.push_float(0, labels, quotient(current.sum, current.count as i128, 1));
            samples.push_int(2, labels, current.count as i128);
            samples.push_int(4, labels, current.sum);
            if let Some(prev) = prev {
                samples.push_float(1, labels, quotient(prev.sum, prev.count as i128, 1));
                samples.push_int(3, labels, prev.count as i128);
            }
        }
        MetricKind::Sum { .. } | MetricKind::Count => {
            let Some((current, prev)) = readings.get(&index).and_then(|r| tallies(r, window))
            else {
                return;
            };
            samples.push_int(0, labels, counter_value(kind, current));
            samples.push_int(2, labels, current.count as i128);
            if let Some(prev) = prev {
                samples.push_int(1, labels, counter_value(kind, prev));
                samples.push_int(3, labels, prev.count as i128);
            }
        }
    }
}
