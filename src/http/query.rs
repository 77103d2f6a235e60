//! Metric reads (API.md §4): every metric, one metric (optionally by a dim), and
//! one metric's in-memory buckets as points.
//! Must not: read another tenant's data (tenant resolution is `auth`'s), or wait
//! without bound (reads in flight per tenant are capped by permits).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::actors::metric::{MetricRead, ReadMetric, ReadSeries};
use crate::actors::InFlight;
use crate::app::{Node, TenantHandle};
use crate::domain::catalogue::MetricKind;
use crate::domain::histogram::HistogramStats;
use crate::domain::metric::{SeriesPoints, SeriesReading};
use crate::domain::time::{SlidingWindow, WindowName};

use super::auth::{tenant_for_read, Principal};
use super::error::ApiError;
use super::shape::{counter_value, int_json, metric_json, needed_readings, ratio_json};

/// The start of every read: who asks (checked first, so a bad query from a
/// stranger is still 401), what they ask, and the tenant it addresses with its
/// place in that tenant's read budget. `named` picks the `tenant` parameter.
pub fn begin_read<'n, Q>(
    node: &'n Node,
    headers: &HeaderMap,
    query: Result<Query<Q>, axum::extract::rejection::QueryRejection>,
    named: fn(&Q) -> Option<&str>,
) -> Result<(Q, &'n TenantHandle, InFlight), ApiError> {
    let principal = node.keys.authenticate(headers)?;
    let Query(query) = query.map_err(bad_query)?;
    let (tenant, in_flight) = reading_tenant(node, &principal, named(&query))?;
    Ok((query, tenant, in_flight))
}

/// The tenant a read addresses, with its place in the tenant's read budget.
fn reading_tenant<'n>(
    node: &'n Node,
    principal: &Principal,
    named: Option<&str>,
) -> Result<(&'n TenantHandle, InFlight), ApiError> {
    let tenant_id = tenant_for_read(principal, named)?;
    let tenant = node
        .tenants
        .get(tenant_id)
        .ok_or_else(|| ApiError::NotFound(format!("unknown tenant {tenant_id}")))?;
    let permit = Arc::clone(&tenant.query_permits)
        .try_acquire_owned()
        .map_err(|_| {
            crate::telemetry::count_shed(crate::telemetry::Shed::ReadsInFlight);
            ApiError::Unavailable {
                message: format!("tenant {tenant_id} has too many reads in flight; retry later"),
                retry_after_s: node.config.server.retry_after_s,
            }
        })?;
    Ok((tenant, InFlight::new(permit)))
}

fn actor_gone(node: &Node) -> ApiError {
    ApiError::Unavailable {
        message: "metric actor did not answer".into(),
        retry_after_s: node.config.server.retry_after_s,
    }
}

/// Reads the named metrics of a tenant; all requests are enqueued before any is
/// awaited.
pub(crate) async fn read_metrics(
    node: &Node,
    tenant: &TenantHandle,
    indices: &[usize],
    by: Option<&str>,
    now_ms: i64,
    in_flight: &InFlight,
) -> Result<HashMap<usize, MetricRead>, ApiError> {
    let mut requests = Vec::new();
    for &index in indices {
        if let Some(Some(addr)) = tenant.metrics.get(index) {
            requests.push((
                index,
                addr.send(ReadMetric {
                    now_ms,
                    by: by.map(str::to_string),
                    in_flight: in_flight.clone(),
                }),
            ));
        }
    }
    let mut reads = HashMap::new();
    for (index, request) in requests {
        reads.insert(index, request.await.map_err(|_| actor_gone(node))?);
    }
    Ok(reads)
}

fn totals(reads: HashMap<usize, MetricRead>) -> HashMap<usize, SeriesReading> {
    reads
        .into_iter()
        .filter_map(|(index, read)| match read {
            MetricRead::Total(reading) => Some((index, reading)),
            MetricRead::Breakdown(_) => None,
        })
        .collect()
}

fn bad_query(rejection: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::BadRequest(rejection.body_text())
}

/// `GET /v1/tenant`: the tenant a key reads, its currency and time zone.
pub async fn get_tenant(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    query: Result<Query<AllMetricsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (_, tenant, _in_flight) = begin_read(&node, &headers, query, |q| q.tenant.as_deref())?;
    Ok(Json(json!({
        "tenant": &*tenant.context.id,
        "currency": tenant.context.currency,
        "timezone": tenant.context.tz.name(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllMetricsQuery {
    tenant: Option<String>,
}

pub async fn get_all(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    query: Result<Query<AllMetricsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (_, tenant, in_flight) = begin_read(&node, &headers, query, |q| q.tenant.as_deref())?;
    let now_ms = node.now_ms();
    let catalogue = &node.catalogue;
    let indices: Vec<usize> = (0..catalogue.metrics().len()).collect();
    let readings = totals(read_metrics(&node, tenant, &indices, None, now_ms, &in_flight).await?);
    let mut metrics = Map::new();
    for (index, def) in catalogue.metrics().iter().enumerate() {
        if let Some(shaped) = metric_json(catalogue, index, &readings, &WindowName::ALL) {
            metrics.insert(def.name.clone(), shaped);
        }
    }
    Ok(Json(
        json!({"tenant": &*tenant.context.id, "at": now_ms, "metrics": metrics}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OneMetricQuery {
    tenant: Option<String>,
    window: Option<String>,
    by: Option<String>,
}

fn parse_window(text: &str) -> Result<WindowName, ApiError> {
    WindowName::parse(text).ok_or_else(|| {
        ApiError::BadRequest(format!("unknown window {text}; use 30s, 15m or today"))
    })
}

fn metric_index(node: &Node, name: &str) -> Result<usize, ApiError> {
    node.catalogue
        .index_of(name)
        .ok_or_else(|| ApiError::NotFound(format!("unknown metric {name}")))
}

pub async fn get_one(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    query: Result<Query<OneMetricQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (query, tenant, in_flight) = begin_read(&node, &headers, query, |q| q.tenant.as_deref())?;
    let catalogue = &node.catalogue;
    let index = metric_index(&node, &name)?;
    let windows = match &query.window {
        Some(text) => vec![parse_window(text)?],
        None => WindowName::ALL.to_vec(),
    };
    let needed = needed_readings(catalogue, index);
    let now_ms = node.now_ms();
    let kind = catalogue.metrics()[index].kind.name();
    let Some(dim) = query.by else {
        let readings =
            totals(read_metrics(&node, tenant, &needed, None, now_ms, &in_flight).await?);
        let shaped =
            metric_json(catalogue, index, &readings, &windows).ok_or_else(|| actor_gone(&node))?;
        return Ok(Json(json!({
            "tenant": &*tenant.context.id, "at": now_ms, "name": name,
            "kind": kind, "windows": shaped["windows"],
        })));
    };
    if !catalogue.breakdown_dims(index).contains(&dim) {
        return Err(ApiError::BadRequest(format!(
            "metric {name} has no breakdown by {dim}"
        )));
    }
    let reads = read_metrics(&node, tenant, &needed, Some(&dim), now_ms, &in_flight).await?;
    // value of the dim → readings of the metrics the shape needs
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
    let mut values = Map::new();
    for (value, readings) in by_value {
        // a mean's parts may not share a value (e.g. one folded it); show it once both have it
        if let Some(shaped) = metric_json(catalogue, index, &readings, &windows) {
            values.insert(value, json!({"windows": shaped["windows"]}));
        }
    }
    Ok(Json(json!({
        "tenant": &*tenant.context.id, "at": now_ms, "name": name,
        "kind": kind, "by": dim, "values": values,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesQuery {
    tenant: Option<String>,
    window: Option<String>,
    step: Option<String>,
    stat: Option<String>,
}

/// `10s`, `1m` or a plain number of seconds.
fn parse_step_s(text: &str) -> Option<i64> {
    let (digits, unit_s) = match text.strip_suffix('s') {
        Some(digits) => (digits, 1),
        None => match text.strip_suffix('m') {
            Some(digits) => (digits, 60),
            None => (text, 1),
        },
    };
    digits.parse::<i64>().ok().map(|n| n.saturating_mul(unit_s))
}

fn histogram_stat(stats: &HistogramStats, stat: &str) -> Value {
    match stat {
        "count" => json!(stats.count),
        "p50" => json!(stats.p50),
        "p90" => json!(stats.p90),
        "p99" => json!(stats.p99),
        "max" => json!(stats.max),
        _ => json!(stats.p95),
    }
}

pub async fn get_series(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    query: Result<Query<SeriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (query, tenant, in_flight) = begin_read(&node, &headers, query, |q| q.tenant.as_deref())?;
    let catalogue = &node.catalogue;
    let index = metric_index(&node, &name)?;
    let window = match query.window.as_deref().map(parse_window).transpose()? {
        None => SlidingWindow::Min15,
        Some(WindowName::Sliding(window)) => window,
        Some(WindowName::Today) => {
            return Err(ApiError::BadRequest(
                "series are kept for the 30s and 15m windows only".into(),
            ))
        }
    };
    let default_step_s = if window == SlidingWindow::Sec30 {
        1
    } else {
        10
    };
    let step_s = match query.step.as_deref() {
        None => default_step_s,
        Some(text) => parse_step_s(text)
            .filter(|step_s| (1..=window.length_s()).contains(step_s))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "step must be between 1s and the window ({}s)",
                    window.length_s()
                ))
            })?,
    };
    let kind = &catalogue.metrics()[index].kind;
    let stat = match (&query.stat, kind) {
        (None, _) => "p95".to_string(),
        (Some(stat), MetricKind::Histogram)
            if ["count", "p50", "p90", "p95", "p99", "max"].contains(&stat.as_str()) =>
        {
            stat.clone()
        }
        (Some(_), MetricKind::Histogram) => {
            return Err(ApiError::BadRequest(
                "stat must be count, p50, p90, p95, p99 or max".into(),
            ))
        }
        (Some(_), _) => {
            return Err(ApiError::BadRequest(
                "stat applies to histogram metrics only".into(),
            ))
        }
    };
    let now_ms = node.now_ms();
    let needed = needed_readings(catalogue, index);
    let mut requests = Vec::new();
    for &reading_index in &needed {
        if let Some(Some(addr)) = tenant.metrics.get(reading_index) {
            requests.push(addr.send(ReadSeries {
                now_ms,
                window,
                step_s,
                in_flight: in_flight.clone(),
            }));
        }
    }
    let mut series = Vec::new();
    for request in requests {
        series.push(request.await.map_err(|_| actor_gone(&node))?);
    }
    let points: Vec<Value> = match (kind, series.as_slice()) {
        (MetricKind::Histogram, [SeriesPoints::Histogram(points)]) => points
            .iter()
            .map(|(second, stats)| json!([second * 1000, histogram_stat(stats, &stat)]))
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
                    json!([
                        second * 1000,
                        ratio_json(
                            counter_value(sum_kind, *sum),
                            counter_value(count_kind, *count),
                            *scale
                        )
                    ])
                })
                .collect()
        }
        (_, [SeriesPoints::Counter(points)]) => points
            .iter()
            .map(|(second, tally)| {
                let value = match kind {
                    MetricKind::Ratio => ratio_json(tally.sum, tally.count as i128, 1),
                    _ => int_json(counter_value(kind, *tally)),
                };
                json!([second * 1000, value])
            })
            .collect(),
        _ => return Err(actor_gone(&node)),
    };
    Ok(Json(json!({
        "tenant": &*tenant.context.id, "at": now_ms, "name": name, "kind": kind.name(),
        "window": window.name(), "step_s": step_s, "points": points,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_with_units() {
        assert_eq!(parse_step_s("10s"), Some(10));
        assert_eq!(parse_step_s("2m"), Some(120));
        assert_eq!(parse_step_s("5"), Some(5));
        assert_eq!(parse_step_s("ten"), None);
    }
}
