//! Metric reads (API.md §4): every metric, one metric (optionally by a dim), and
//! one metric's in-memory buckets as points, served from the read path's views.
//! Must not: read another tenant's data (`auth::tenant_for_read` decides), or
//! shape values itself (the views serialize to the API's shape).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::auth::Caller;
use crate::domain::catalogue::{MetricKind, SumField};
use crate::domain::time::{SlidingWindow, WindowName};
use crate::node::Node;
use crate::read::{HistogramStat, ReadError, TenantReader};

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::audit::Counted;
use super::csv;
use super::error::ApiError;

type QueryResult<Q> = Result<Query<Q>, axum::extract::rejection::QueryRejection>;

/// The start of every tenant read: who asks (checked first, so a bad query
/// from a stranger is still 401), what they ask, and a reader of the tenant
/// it addresses (its place in that tenant's read budget). `named` picks the
/// `tenant` parameter.
pub fn begin_read<'n, Q>(
    node: &'n Node,
    caller: &Caller,
    query: QueryResult<Q>,
    named: fn(&Q) -> Option<&str>,
) -> Result<(Q, TenantReader), ApiError> {
    let principal = caller.principal()?;
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let tenant = node.reading_tenant(principal, named(&query))?;
    let reader = TenantReader::begin(&tenant).map_err(|error| read_error(node, error))?;
    Ok((query, reader))
}

pub fn read_error(node: &Node, error: ReadError) -> ApiError {
    ApiError::from_read(error, node.config.server.retry_after_s)
}

/// `GET /v1/tenant`: the tenant a key reads, its currency and time zone.
pub async fn get_tenant(
    State(node): State<Arc<Node>>,
    caller: Caller,
    query: QueryResult<AllMetricsQuery>,
) -> Result<Json<Value>, ApiError> {
    let (_, reader) = begin_read(&node, &caller, query, |q| q.tenant.as_deref())?;
    let context = &reader.tenant().context;
    Ok(Json(json!({
        "tenant": &*context.id,
        "currency": context.currency,
        // ISO 4217's: what a display divides integer minor units by
        "currency_minor_digits": crate::domain::event::currency_minor_digits(&context.currency),
        "timezone": context.tz.name(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllMetricsQuery {
    tenant: Option<String>,
}

pub async fn get_all(
    State(node): State<Arc<Node>>,
    caller: Caller,
    query: QueryResult<AllMetricsQuery>,
) -> Result<Counted, ApiError> {
    let (_, reader) = begin_read(&node, &caller, query, |q| q.tenant.as_deref())?;
    let now_ms = node.now_ms();
    let views = reader
        .all(now_ms)
        .await
        .map_err(|error| read_error(&node, error))?;
    let mut metrics = Map::new();
    for (name, view) in views {
        metrics.insert(name, json!(view));
    }
    Ok(Counted(
        metrics.len(),
        Json(json!({"tenant": &*reader.tenant().context.id, "at": now_ms, "metrics": metrics})),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OneMetricQuery {
    tenant: Option<String>,
    window: Option<String>,
    by: Option<String>,
    /// `csv` or `json` (else the `Accept` header says).
    format: Option<String>,
}

fn parse_window(text: &str) -> Result<WindowName, ApiError> {
    WindowName::parse(text).ok_or_else(|| {
        ApiError::BadRequest(format!("unknown window {text}; use 30s, 15m or today"))
    })
}

pub async fn get_one(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    query: QueryResult<OneMetricQuery>,
) -> Result<Response, ApiError> {
    let (query, reader) = begin_read(&node, &caller, query, |q| q.tenant.as_deref())?;
    let index = reader
        .metric_index(&name)
        .map_err(|error| read_error(&node, error))?;
    let as_csv = csv::wants_csv(&headers, query.format.as_deref())?;
    if as_csv && query.by.is_none() {
        return Err(ApiError::BadRequest(
            "a CSV export of a metric is by a dim (by=…) or its series (/series)".into(),
        ));
    }
    let windows = match &query.window {
        Some(text) => vec![parse_window(text)?],
        None => WindowName::ALL.to_vec(),
    };
    let now_ms = node.now_ms();
    let tenant = &*reader.tenant().context.id;
    let Some(dim) = query.by else {
        let view = reader
            .metric(index, &windows, now_ms)
            .await
            .map_err(|error| read_error(&node, error))?;
        return Ok(Counted(
            1,
            Json(json!({
                "tenant": tenant, "at": now_ms, "name": name,
                "kind": view.kind, "windows": json!(view)["windows"],
            })),
        )
        .into_response());
    };
    let kind = reader.tenant().context.catalogue.metrics()[index]
        .kind
        .name();
    let views = reader
        .breakdown(index, &dim, &windows, now_ms)
        .await
        .map_err(|error| read_error(&node, error))?;
    if as_csv {
        let money = money_of(&reader, index);
        return csv::breakdown(&dim, views, money, &node.config.export);
    }
    let mut values = Map::new();
    for (value, view) in views {
        values.insert(value, json!({"windows": json!(view)["windows"]}));
    }
    Ok(Counted(
        values.len(),
        Json(json!({
            "tenant": tenant, "at": now_ms, "name": name,
            "kind": kind, "by": dim, "values": values,
        })),
    )
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesQuery {
    tenant: Option<String>,
    window: Option<String>,
    step: Option<String>,
    stat: Option<String>,
    /// `csv` or `json` (else the `Accept` header says).
    format: Option<String>,
}

/// The currency and its minor digits when metric `index` is money (a sum of
/// `amount`).
fn money_of(reader: &TenantReader, index: usize) -> csv::Money {
    let context = &reader.tenant().context;
    match context.catalogue.metrics()[index].kind {
        MetricKind::Sum {
            field: SumField::Amount,
        } => crate::domain::event::currency_minor_digits(&context.currency)
            .map(|digits| (context.currency.clone(), digits)),
        _ => None,
    }
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

pub async fn get_series(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    query: QueryResult<SeriesQuery>,
) -> Result<Response, ApiError> {
    let (query, reader) = begin_read(&node, &caller, query, |q| q.tenant.as_deref())?;
    let as_csv = csv::wants_csv(&headers, query.format.as_deref())?;
    let index = reader
        .metric_index(&name)
        .map_err(|error| read_error(&node, error))?;
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
    let kind = &reader.tenant().context.catalogue.metrics()[index].kind;
    let stat = match (query.stat.as_deref(), kind) {
        (None, _) => HistogramStat::P95,
        (Some(text), MetricKind::Histogram) => HistogramStat::parse(text).ok_or_else(|| {
            ApiError::BadRequest("stat must be count, p50, p90, p95, p99 or max".into())
        })?,
        (Some(_), _) => {
            return Err(ApiError::BadRequest(
                "stat applies to histogram metrics only".into(),
            ))
        }
    };
    let now_ms = node.now_ms();
    let points = reader
        .series(index, window, step_s, stat, now_ms)
        .await
        .map_err(|error| read_error(&node, error))?;
    if as_csv {
        let money = money_of(&reader, index);
        let tz = reader.tenant().context.tz;
        return csv::series(points, tz, money, &node.config.export);
    }
    let points: Vec<Value> = points
        .iter()
        .map(|(at_ms, value, _)| json!([at_ms, value]))
        .collect();
    Ok(Counted(
        points.len(),
        Json(json!({
            "tenant": &*reader.tenant().context.id, "at": now_ms, "name": name,
            "kind": kind.name(), "window": window.name(), "step_s": step_s, "points": points,
        })),
    )
    .into_response())
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
