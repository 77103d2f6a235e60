//! CSV export (API.md §10; docs/api.md, "Export"): `GET /v1/metrics/{name}`
//! with `by` and `GET /v1/metrics/{name}/series` answer `text/csv` when asked
//! (`Accept: text/csv` or `format=csv`). RFC 4180 with a header row; the text
//! is made chunk by chunk as the client reads it (`CsvBody`), so an export
//! holds what its read holds plus one chunk; at most `export.rows_max` rows
//! (more: 400 `export_too_large` before any byte is sent).
//! Owns: the CSV shape of a read. Must not: read (the routes do, through the
//! read path) or decide who may.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::TimeZone;
use chrono_tz::Tz;
use serde_json::Value;

use crate::audit::AuditRows;
use crate::config::ExportConfig;
use crate::read::{MetricView, PointValue};

use super::error::ApiError;

/// True when the request asks for CSV: `format=csv`, or an `Accept` that
/// names `text/csv` (`format=json` wins over the header).
pub fn wants_csv(headers: &HeaderMap, format: Option<&str>) -> Result<bool, ApiError> {
    match format {
        Some("csv") => return Ok(true),
        Some("json") => return Ok(false),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "unknown format {other}; use csv or json"
            )))
        }
        None => {}
    }
    Ok(headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.to_ascii_lowercase().contains("text/csv")))
}

/// One field, quoted when RFC 4180 needs it.
fn field(text: &str, out: &mut String) {
    if text.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&text.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(text);
    }
}

fn line(fields: &[String], out: &mut String) {
    for (index, text) in fields.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        field(text, out);
    }
    out.push_str("\r\n");
}

/// A body that formats its rows as the client reads.
struct CsvBody {
    header: Option<Vec<String>>,
    rows: Box<dyn Iterator<Item = Vec<String>> + Send>,
    /// `export.chunk_bytes`.
    chunk_bytes: usize,
}

impl http_body::Body for CsvBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let chunk_bytes = self.chunk_bytes;
        let mut chunk = String::with_capacity(chunk_bytes + 1024);
        if let Some(header) = self.header.take() {
            line(&header, &mut chunk);
        }
        while chunk.len() < chunk_bytes {
            match self.rows.next() {
                Some(row) => line(&row, &mut chunk),
                None => break,
            }
        }
        if chunk.is_empty() {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(chunk)))))
    }
}

/// The CSV answer, or 400 `export_too_large` past `rows_max`.
fn respond(
    header: Vec<String>,
    rows: usize,
    limits: &ExportConfig,
    make: Box<dyn Iterator<Item = Vec<String>> + Send>,
) -> Result<Response, ApiError> {
    let rows_max = limits.rows_max;
    if rows > rows_max {
        return Err(ApiError::ExportTooLarge(format!(
            "the export has {rows} rows, more than export.rows_max ({rows_max}); ask for a shorter window, a coarser step or fewer values"
        )));
    }
    let mut response = (
        StatusCode::OK,
        Body::new(CsvBody {
            header: Some(header),
            rows: make,
            chunk_bytes: limits.chunk_bytes,
        }),
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8; header=present"),
    );
    response.extensions_mut().insert(AuditRows(rows as u64));
    Ok(response)
}

/// RFC 3339 in the tenant's time zone, to the millisecond.
pub fn rfc3339(at_ms: i64, tz: Tz) -> String {
    tz.timestamp_millis_opt(at_ms)
        .single()
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, false))
        .unwrap_or_default()
}

/// Integer minor units as a decimal of `digits` places, exactly.
pub fn decimal(minor: i128, digits: u16) -> String {
    if digits == 0 {
        return minor.to_string();
    }
    let scale = 10i128.pow(u32::from(digits));
    let sign = if minor < 0 { "-" } else { "" };
    let magnitude = minor.unsigned_abs();
    format!(
        "{sign}{}.{:0width$}",
        magnitude / scale as u128,
        magnitude % scale as u128,
        width = usize::from(digits)
    )
}

/// A JSON scalar as a CSV field: numbers as JSON writes them (integers
/// exact), null empty.
fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The money columns' currency and its minor digits, for a money metric.
pub type Money = Option<(String, u16)>;

/// `/series` as CSV: `at`, `value`, `count`, and for money `currency`,
/// `amount`.
pub fn series(
    points: Vec<(i64, PointValue, u64)>,
    tz: Tz,
    money: Money,
    limits: &ExportConfig,
) -> Result<Response, ApiError> {
    let mut header: Vec<String> = ["at", "value", "count"].map(String::from).to_vec();
    if money.is_some() {
        header.extend(["currency", "amount"].map(String::from));
    }
    let rows = points.len();
    let make = points.into_iter().map(move |(at_ms, value, count)| {
        let mut row = vec![
            rfc3339(at_ms, tz),
            text(&serde_json::json!(value)),
            count.to_string(),
        ];
        if let Some((currency, digits)) = &money {
            row.push(currency.clone());
            row.push(match value {
                PointValue::Int(minor) => decimal(minor, *digits),
                PointValue::Float(_) => String::new(),
            });
        }
        row
    });
    respond(header, rows, limits, Box::new(make))
}

/// `?by=` as CSV: one row per value and window: the dim's value, `window`,
/// then the window's fields as the JSON has them (`value`, `count`, `prev`,
/// …; a field a window lacks is empty), and for money `currency`, `amount`
/// (of `value`).
pub fn breakdown(
    dim: &str,
    views: Vec<(String, MetricView)>,
    money: Money,
    limits: &ExportConfig,
) -> Result<Response, ApiError> {
    let mut fields = BTreeSet::new();
    let mut rows = 0;
    for (_, view) in &views {
        for (_, window) in &view.windows {
            rows += 1;
            if let Value::Object(object) = serde_json::json!(window) {
                fields.extend(object.keys().cloned());
            }
        }
    }
    let fields: Vec<String> = fields.into_iter().collect();
    let mut header = vec![dim.to_string(), "window".to_string()];
    header.extend(fields.iter().cloned());
    if money.is_some() {
        header.extend(["currency", "amount"].map(String::from));
    }
    let make = views.into_iter().flat_map(move |(value, view)| {
        let (fields, money) = (fields.clone(), money.clone());
        view.windows.into_iter().map(move |(name, window)| {
            let object = serde_json::json!(window);
            let mut row = vec![value.clone(), name.name().to_string()];
            for field in &fields {
                row.push(object.get(field).map(text).unwrap_or_default());
            }
            if let Some((currency, digits)) = &money {
                row.push(currency.clone());
                row.push(
                    object
                        .get("value")
                        .and_then(Value::as_i64)
                        .map(|minor| decimal(i128::from(minor), *digits))
                        .unwrap_or_default(),
                );
            }
            row
        })
    });
    respond(header, rows, limits, Box::new(make))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_quoted_as_rfc_4180_says() {
        let mut out = String::new();
        line(
            &[
                "plain".into(),
                "a,b".into(),
                "say \"hi\"".into(),
                "two\nlines".into(),
            ],
            &mut out,
        );
        assert_eq!(out, "plain,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\"\r\n");
    }

    #[test]
    fn amounts_are_exact_decimals_of_their_minor_units() {
        assert_eq!(decimal(4200, 0), "4200");
        assert_eq!(decimal(1250, 2), "12.50");
        assert_eq!(decimal(5, 2), "0.05");
        assert_eq!(decimal(-1250, 2), "-12.50");
        assert_eq!(decimal(4200, 3), "4.200");
        assert_eq!(decimal(i128::from(i64::MAX), 2), "92233720368547758.07");
    }

    #[test]
    fn times_are_in_the_tenant_zone() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        assert_eq!(
            rfc3339(1_763_805_600_000, tz),
            "2025-11-22T11:00:00.000+01:00"
        );
        assert_eq!(
            rfc3339(1_763_805_600_000, Tz::UTC),
            "2025-11-22T10:00:00.000+00:00"
        );
    }
}
