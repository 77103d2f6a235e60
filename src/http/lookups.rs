//! Lookup table routes (API.md §10; docs/api.md, "Enrichment"): replace a
//! table (`PUT`), add or replace rows (`PATCH`), list it (`GET`). Rows come
//! as NDJSON objects (`{"key": "s-1", "region": "north"}`) or as CSV with a
//! header row (`key,region`); every row must give the key and each dim its
//! enrichment adds. A tenant key changes its own tenant's tables; an admin
//! names the tenant with `?tenant=`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::Json;
use serde_json::{json, Map, Value};

use crate::auth::Caller;
use crate::lookups::LookupError;
use crate::node::Node;

use super::alerts::{writing_tenant, TenantQuery};
use super::audit::Counted;
use super::error::ApiError;

fn lookup_error(node: &Node, error: LookupError) -> ApiError {
    match error {
        LookupError::UnknownTable(_) | LookupError::UnknownTenant(_) => {
            ApiError::NotFound(error.to_string())
        }
        LookupError::TooMany { .. } => ApiError::PayloadTooLarge(error.to_string()),
        LookupError::Storage(_) => ApiError::Unavailable {
            message: error.to_string(),
            retry_after_s: node.config.server.retry_after_s,
        },
    }
}

/// The dims table `table`'s rows supply, from the enrichment that uses it.
fn adds_of(node: &Node, table: &str) -> Result<Vec<String>, ApiError> {
    node.enrichments
        .iter()
        .find(|enrichment| enrichment.table == table)
        .map(|enrichment| enrichment.adds.clone())
        .ok_or_else(|| ApiError::NotFound(format!("no enrichment uses table {table}")))
}

/// The rows of a body, each `(key, values in the order of adds)`, or every
/// problem by row.
fn parse_rows(
    headers: &HeaderMap,
    body: &[u8],
    adds: &[String],
    value_bytes_max: usize,
) -> Result<Vec<(String, Vec<String>)>, ApiError> {
    let csv = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/csv"));
    let mut objects: Vec<Map<String, Value>> = Vec::new();
    let mut problems = Vec::new();
    if csv {
        let mut reader = csv::Reader::from_reader(body);
        let names: Vec<String> = match reader.headers() {
            Ok(names) => names.iter().map(String::from).collect(),
            Err(error) => {
                return Err(ApiError::Invalid(vec![(
                    "header".into(),
                    error.to_string(),
                )]))
            }
        };
        for (index, record) in reader.records().enumerate() {
            match record {
                Ok(record) => objects.push(
                    names
                        .iter()
                        .cloned()
                        .zip(record.iter().map(|field| Value::String(field.to_string())))
                        .collect(),
                ),
                Err(error) => problems.push((format!("rows[{index}]"), error.to_string())),
            }
        }
    } else {
        for (index, line) in body
            .split(|byte| *byte == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .enumerate()
        {
            match serde_json::from_slice::<Map<String, Value>>(line) {
                Ok(object) => objects.push(object),
                Err(error) => problems.push((format!("rows[{index}]"), error.to_string())),
            }
        }
    }
    // the rules of an event's dim values (`ingest.dim_value_bytes_max`, no
    // control character, no `__`, which names Tally's own breakdowns): a key
    // is one, and an added value becomes one
    let text = |value: Option<&Value>| match value {
        Some(Value::String(text))
            if !text.is_empty()
                && text.len() <= value_bytes_max
                && !text.starts_with("__")
                && !text.chars().any(char::is_control) =>
        {
            Some(text.clone())
        }
        _ => None,
    };
    let rule = format!(
        "a string of 1 to {value_bytes_max} bytes (ingest.dim_value_bytes_max), without control characters, not starting with __"
    );
    let mut rows = Vec::with_capacity(objects.len());
    for (index, object) in objects.iter().enumerate() {
        let Some(key) = text(object.get("key")) else {
            problems.push((format!("rows[{index}].key"), rule.clone()));
            continue;
        };
        let mut values = Vec::with_capacity(adds.len());
        for dim in adds {
            match text(object.get(dim)) {
                Some(value) => values.push(value),
                None => problems.push((
                    format!("rows[{index}].{dim}"),
                    format!("every row gives each dim the table adds: {rule}"),
                )),
            }
        }
        if values.len() == adds.len() {
            rows.push((key, values));
        }
    }
    if problems.is_empty() {
        Ok(rows)
    } else {
        Err(ApiError::Invalid(problems))
    }
}

async fn change(
    node: Arc<Node>,
    caller: Caller,
    table: String,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Bytes,
    replace: bool,
) -> Result<Json<Value>, ApiError> {
    let tenant = writing_tenant(&node, &caller, query)?;
    let adds = adds_of(&node, &table)?;
    let rows = parse_rows(
        &headers,
        &body,
        &adds,
        node.config.ingest.dim_value_bytes_max,
    )?;
    let count = crate::lookups::change(&node, &tenant, &table, rows, replace)
        .await
        .map_err(|error| lookup_error(&node, error))?;
    Ok(Json(
        json!({"tenant": tenant, "table": table, "rows": count}),
    ))
}

/// `PUT /v1/lookups/{table}` replaces the table; `PATCH` adds rows, or
/// replaces those of their keys.
pub async fn put_or_patch(
    State(node): State<Arc<Node>>,
    caller: Caller,
    method: axum::http::Method,
    Path(table): Path<String>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let replace = method == axum::http::Method::PUT;
    change(node, caller, table, query, headers, body, replace).await
}

/// `GET /v1/lookups/{table}`: the rows, by key.
pub async fn get(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path(table): Path<String>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Counted, ApiError> {
    let tenant = writing_tenant(&node, &caller, query)?;
    let adds = adds_of(&node, &table)?;
    let tables = node
        .lookups
        .get(&tenant)
        .map(|lookups| lookups.tables())
        .unwrap_or_default();
    let mut rows: Vec<Value> = tables
        .get(&table)
        .map(|rows| {
            rows.iter()
                .map(|(key, values)| {
                    let mut row = Map::new();
                    row.insert("key".into(), json!(key));
                    for (dim, value) in adds.iter().zip(values) {
                        row.insert(dim.clone(), json!(value));
                    }
                    Value::Object(row)
                })
                .collect()
        })
        .unwrap_or_default();
    rows.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
    Ok(Counted(
        rows.len(),
        Json(json!({"tenant": tenant, "table": table, "rows": rows})),
    ))
}
