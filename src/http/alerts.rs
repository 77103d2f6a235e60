//! Alert routes (API.md §7): the current states and rules, and the records
//! after a `since` (the same records the `alerts` topic pushes).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::auth::Caller;
use crate::node::Node;
use crate::storage::outbox::{read_since, Topic};

use super::error::ApiError;
use super::query::begin_read;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    tenant: Option<String>,
    since: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/alerts`: pending and firing alerts with the tenant's rules; with
/// `since=SEQ`, the records after it, oldest first, at most `limit` (default
/// and most `live.replay_records_max`), and `next_since` to ask again with.
pub async fn list(
    State(node): State<Arc<Node>>,
    caller: Caller,
    query: Result<Query<AlertsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (query, reader) = begin_read(&node, &caller, query, |q| q.tenant.as_deref())?;
    let tenant = reader.tenant().context.id.to_string();
    drop(reader);
    let alerts = node
        .alerts
        .tenant(&tenant)
        .ok_or_else(|| ApiError::NotFound(format!("unknown tenant {tenant}")))?;
    let Some(since) = query.since else {
        let rules: Vec<Value> = alerts
            .rules()
            .iter()
            .map(|rule| serde_json::to_value(rule).unwrap_or(Value::Null))
            .collect();
        return Ok(Json(json!({
            "tenant": tenant,
            "alerts": alerts.statuses(&tenant),
            "rules": rules,
        })));
    };
    let limit_max = node.config.live.replay_records_max;
    let limit = query.limit.unwrap_or(limit_max);
    if limit == 0 || limit > limit_max {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {limit_max}"
        )));
    }
    let store = Arc::clone(&node.store);
    let record_bytes_max = node.config.storage.record_bytes_max;
    let reading = tenant.clone();
    let entries = tokio::task::spawn_blocking(move || {
        read_since::<String>(
            &*store,
            &reading,
            Topic::Alerts,
            since,
            limit,
            record_bytes_max,
        )
    })
    .await
    .map_err(|_| unavailable(&node))?
    .map_err(|_| unavailable(&node))?;
    let mut next_since = since;
    let mut records = Vec::with_capacity(entries.len());
    for (seq, record) in entries {
        next_since = seq;
        let record = record
            .ok()
            .and_then(|text| serde_json::from_str::<Map<String, Value>>(&text).ok());
        records.push(match record {
            Some(record) => Value::Object(record),
            // its place is kept, so that the client's since moves past it
            None => json!({"seq": seq, "error": "record cannot be read"}),
        });
    }
    Ok(Json(json!({
        "tenant": tenant,
        "records": records,
        "next_since": next_since,
    })))
}

fn unavailable(node: &Node) -> ApiError {
    ApiError::Unavailable {
        message: "the alert records could not be read; retry".into(),
        retry_after_s: node.config.server.retry_after_s,
    }
}
