//! Quarantine routes (API.md §6): list, retry under the current config, drop.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::actors::tenant::{DeleteQuarantined, EventOutcome, ListQuarantine, RetryQuarantined};
use crate::auth::Caller;
use crate::node::Node;

use super::audit::Counted;
use super::error::ApiError;
use super::query::begin_read;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    tenant: Option<String>,
    limit: Option<usize>,
    after: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    tenant: Option<String>,
}

fn unavailable(node: &Node) -> ApiError {
    ApiError::Unavailable {
        message: "tenant actor did not answer".into(),
        retry_after_s: node.config.server.retry_after_s,
    }
}

fn parse_qid(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::NotFound(format!("no quarantined event {text}")))
}

pub async fn list(
    State(node): State<Arc<Node>>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Counted, ApiError> {
    let (query, reader) = begin_read(&node, &caller, query, |q| q.tenant.as_deref())?;
    let (tenant, in_flight) = (reader.tenant(), reader.in_flight());
    let limit_max = node.config.quarantine.list_limit_max;
    let limit = query.limit.unwrap_or(100.min(limit_max));
    if limit == 0 || limit > limit_max {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {limit_max}"
        )));
    }
    let entries = tenant
        .actor
        .send(ListQuarantine {
            in_flight,
            after: query.after.unwrap_or(0),
            limit,
        })
        .await
        .map_err(|_| unavailable(&node))?;
    let next_after = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.qid))
        .flatten();
    let events: Vec<Value> = entries
        .iter()
        .map(|entry| {
            json!({
                "qid": entry.qid,
                "reason": entry.reason.as_str(),
                "remedy": entry.reason.remedy(),
                "received_at": entry.received_ms,
                "id": entry.id,
                "raw": String::from_utf8_lossy(&entry.raw),
                "truncated": entry.truncated,
            })
        })
        .collect();
    Ok(Counted(
        events.len(),
        Json(json!({"tenant": &*tenant.context.id, "events": events, "next_after": next_after})),
    ))
}

pub async fn retry(
    State(node): State<Arc<Node>>,
    Path(qid): Path<String>,
    caller: Caller,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (_, reader) = begin_read(&node, &caller, query, |q| q.tenant.as_deref())?;
    let (tenant, in_flight) = (reader.tenant(), reader.in_flight());
    let qid = parse_qid(&qid)?;
    let now_ms = node.now_ms();
    let outcome = tenant
        .actor
        .send(RetryQuarantined {
            in_flight,
            qid,
            now_ms,
        })
        .await
        .map_err(|_| unavailable(&node))?
        .map_err(|error| ApiError::from_tenant(error, node.config.server.retry_after_s))?
        .ok_or_else(|| ApiError::NotFound(format!("no quarantined event {qid}")))?;
    let body = match outcome {
        EventOutcome::Accepted => json!({"qid": qid, "outcome": "accepted"}),
        EventOutcome::Duplicate => json!({"qid": qid, "outcome": "duplicate"}),
        EventOutcome::Late => json!({"qid": qid, "outcome": "late"}),
        EventOutcome::Quarantined { reason, .. } => {
            json!({"qid": qid, "outcome": "quarantined", "reason": reason.as_str()})
        }
    };
    Ok(Json(body))
}

pub async fn delete(
    State(node): State<Arc<Node>>,
    Path(qid): Path<String>,
    caller: Caller,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let (_, reader) = begin_read(&node, &caller, query, |q| q.tenant.as_deref())?;
    let (tenant, in_flight) = (reader.tenant(), reader.in_flight());
    let qid = parse_qid(&qid)?;
    let removed = tenant
        .actor
        .send(DeleteQuarantined { in_flight, qid })
        .await
        .map_err(|_| unavailable(&node))?
        .map_err(|error| ApiError::from_tenant(error, node.config.server.retry_after_s))?;
    if removed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no quarantined event {qid}")))
    }
}
