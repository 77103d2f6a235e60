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

/// The enrichments and `tenant`'s tables as they are now, for a retry.
fn enrich_now(
    node: &Node,
    tenant: &str,
) -> Option<(
    Arc<Vec<crate::domain::enrich::Enrichment>>,
    Arc<crate::domain::enrich::Tables>,
)> {
    let tables = node.lookups.get(tenant)?.tables();
    Some((Arc::clone(&node.enrichments), tables))
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
                // for a lookup miss: which table lacks which key, now
                "missing": missing_of(&node, &tenant.context.id, entry),
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

/// For an event held for `enrichment_miss`: the table and key its lookup
/// still misses (`null` once the table has it, or for other reasons).
fn missing_of(
    node: &Node,
    tenant: &str,
    entry: &crate::domain::quarantine::QuarantinedEvent,
) -> Value {
    if entry.reason != crate::domain::event::Reason::EnrichmentMiss {
        return Value::Null;
    }
    let Some(lookups) = node.lookups.get(tenant) else {
        return Value::Null;
    };
    let Ok(raw) = crate::domain::event::parse_event(&entry.raw) else {
        return Value::Null;
    };
    let dims: Vec<(String, String)> = raw.dims_text();
    match crate::domain::enrich::missing(&dims, &node.enrichments, &lookups.tables()) {
        Some((table, key)) => json!({"table": table, "key": key}),
        None => Value::Null,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkRetryQuery {
    tenant: Option<String>,
    reason: String,
}

/// `POST /v1/quarantine/retry?reason=R`: retries every event of the tenant
/// held for `R`, oldest first; each one applied at most once (de-dup sees to
/// it, so running it again applies nothing more). Returns the outcomes.
pub async fn retry_all(
    State(node): State<Arc<Node>>,
    caller: Caller,
    query: Result<Query<BulkRetryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Counted, ApiError> {
    let (query, reader) = begin_read(&node, &caller, query, |q| q.tenant.as_deref())?;
    let tenant = reader.tenant();
    let Some(reason) = crate::domain::event::Reason::ALL
        .iter()
        .copied()
        .find(|reason| reason.as_str() == query.reason)
    else {
        return Err(ApiError::BadRequest(format!(
            "unknown reason {}",
            query.reason
        )));
    };
    let page = node.config.quarantine.list_limit_max;
    let mut after = 0;
    let mut qids = Vec::new();
    loop {
        let entries = tenant
            .actor
            .send(ListQuarantine {
                in_flight: reader.in_flight(),
                after,
                limit: page,
            })
            .await
            .map_err(|_| unavailable(&node))?;
        let Some(last) = entries.last() else { break };
        after = last.qid;
        qids.extend(entries.iter().filter(|e| e.reason == reason).map(|e| e.qid));
        if entries.len() < page {
            break;
        }
    }
    let (mut accepted, mut duplicate, mut late, mut still) = (0u64, 0u64, 0u64, 0u64);
    for qid in &qids {
        let outcome = tenant
            .actor
            .send(RetryQuarantined {
                in_flight: reader.in_flight(),
                qid: *qid,
                now_ms: node.now_ms(),
                enrich: enrich_now(&node, &tenant.context.id),
            })
            .await
            .map_err(|_| unavailable(&node))?
            .map_err(|error| ApiError::from_tenant(error, node.config.server.retry_after_s))?;
        match outcome {
            Some(EventOutcome::Accepted) => accepted += 1,
            Some(EventOutcome::Duplicate) => duplicate += 1,
            Some(EventOutcome::Late) => late += 1,
            Some(EventOutcome::Quarantined { .. }) => still += 1,
            None => {}
        }
    }
    Ok(Counted(
        qids.len(),
        Json(json!({
            "tenant": &*tenant.context.id, "reason": reason.as_str(), "retried": qids.len(),
            "accepted": accepted, "duplicates": duplicate, "late": late, "quarantined": still,
        })),
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
            enrich: enrich_now(&node, &tenant.context.id),
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
