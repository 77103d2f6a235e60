//! `POST /v1/events` (API.md §3): the caller, the body (JSON object, array or
//! NDJSON) within its limits, split into raw events for the ingest service
//! (`crate::ingest`), and the reply.
//! Must not: apply anything of a request it refuses (401/413/415 are decided
//! before the ingest service sees it), or let an event go without an outcome.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::actors::tenant::EventOutcome;
use crate::auth::{Caller, Principal};
use crate::ingest::{IngestError, IngestReport};
use crate::node::Node;
use crate::telemetry;

use super::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    Ndjson,
}

pub fn body_format(headers: &HeaderMap) -> Result<BodyFormat, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .ok_or(ApiError::UnsupportedMediaType)?;
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(BodyFormat::Json),
        "application/x-ndjson" => Ok(BodyFormat::Ndjson),
        _ => Err(ApiError::UnsupportedMediaType),
    }
}

/// Reads at most `max_bytes` of the body; more is 413.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max_bytes: usize,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "body is larger than max_body_bytes ({max_bytes} bytes)"
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max_bytes as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, max_bytes)
        .await
        .map_err(|error| {
            let inner = error.into_inner();
            if inner
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                ApiError::BadRequest(format!("cannot read the body: {inner}"))
            }
        })
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// The raw bytes of each event. A JSON body that is not JSON, or is neither an
/// object nor an array, is 400; NDJSON lines are judged one by one (blank lines
/// are skipped).
pub fn split_events(body: &[u8], format: BodyFormat) -> Result<Vec<&[u8]>, ApiError> {
    match format {
        BodyFormat::Ndjson => Ok(body
            .split(|byte| *byte == b'\n')
            .map(trim_ascii)
            .filter(|line| !line.is_empty())
            .collect()),
        BodyFormat::Json => {
            let body = trim_ascii(body);
            match body.first() {
                Some(b'[') => {
                    let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(body)
                        .map_err(|error| {
                            ApiError::BadRequest(format!("body is not valid json: {error}"))
                        })?;
                    Ok(items
                        .into_iter()
                        .map(|item| item.get().as_bytes())
                        .collect())
                }
                Some(b'{') => {
                    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(|error| {
                        ApiError::BadRequest(format!("body is not valid json: {error}"))
                    })?;
                    Ok(vec![body])
                }
                _ => Err(ApiError::BadRequest(
                    "body must be a json object, a json array of objects, or ndjson".into(),
                )),
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestQuery {
    /// A tenant key may name only its own tenant; an admin key names the tenant
    /// of events that carry no `tenant` field.
    tenant: Option<String>,
}

/// The tenant events without a `tenant` field belong to.
fn default_tenant(
    node: &Node,
    principal: &Principal,
    named: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let Some(named) = named else {
        return Ok(match principal {
            Principal::Tenant(own) => node.tenants.contains(own).then(|| own.clone()),
            Principal::Admin => None,
        });
    };
    if matches!(principal, Principal::Tenant(own) if own != named) {
        return Err(ApiError::Forbidden(
            "a tenant key can only write its own tenant".into(),
        ));
    }
    if node.tenants.contains(named) {
        Ok(Some(named.to_string()))
    } else {
        Err(ApiError::NotFound(format!("unknown tenant {named}")))
    }
}

pub async fn post_events(
    State(node): State<Arc<Node>>,
    caller: Caller,
    headers: HeaderMap,
    query: Result<Query<IngestQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let started = crate::clock::Stopwatch::start();
    let principal = caller.principal()?.clone();
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let query_tenant = default_tenant(&node, &principal, query.tenant.as_deref())?;
    let format = body_format(&headers)?;
    let retry_after_s = node.config.server.retry_after_s;
    let max_body_bytes = node.config.server.max_body_bytes;
    // Room for the whole body in the node-wide budget before reading any of it.
    let declared_bytes = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok())
        .unwrap_or(max_body_bytes)
        .min(max_body_bytes);
    let _budget = Arc::clone(&node.ingest_kib)
        .try_acquire_many_owned(declared_bytes.div_ceil(1024).max(1) as u32)
        .map_err(|_| {
            telemetry::count_shed(telemetry::Shed::RequestBytes);
            ApiError::Unavailable {
                message: "the node is reading too many request bytes at once; retry later".into(),
                retry_after_s,
            }
        })?;
    let read_timeout = std::time::Duration::from_millis(node.config.server.body_read_timeout_ms);
    let bytes = tokio::time::timeout(read_timeout, read_body(&headers, body, max_body_bytes))
        .await
        .map_err(|_| {
            ApiError::RequestTimeout("the request body did not arrive in time".into())
        })??;
    let items = split_events(&bytes, format)?;
    let events_max = node.config.ingest.max_events_per_request;
    if items.len() > events_max {
        return Err(ApiError::PayloadTooLarge(format!(
            "{} events is more than max_events_per_request ({events_max})",
            items.len()
        )));
    }
    let now_ms = node.now_ms();
    let report = crate::ingest::ingest(&node, &principal, query_tenant.as_deref(), &items, now_ms)
        .await
        .map_err(|error| ingest_error(error, retry_after_s))?;
    telemetry::record_ingest(started.elapsed_secs(), items.len());
    Ok(Json(respond(report)))
}

/// The status of a refused request (`http/error.rs` maps the rest).
fn ingest_error(error: IngestError, retry_after_s: u32) -> ApiError {
    match error {
        IngestError::TenantMismatch(events) => ApiError::TenantMismatch(
            events
                .iter()
                .map(|event| json!({"index": event.index, "id": event.id, "outcome": "rejected", "reason": event.reason.as_str()}))
                .collect(),
        ),
        IngestError::Overloaded(_) => ApiError::Overloaded {
            message: error.to_string(),
            retry_after_s,
        },
        IngestError::RateLimited {
            wait_ms: Some(wait_ms),
            ..
        } => ApiError::Overloaded {
            message: error.to_string(),
            // whole seconds, at least the node's usual advice
            retry_after_s: u32::try_from(wait_ms.div_ceil(1000))
                .unwrap_or(u32::MAX)
                .max(retry_after_s),
        },
        IngestError::RateLimited { wait_ms: None, .. } => ApiError::PayloadTooLarge(format!(
            "{error}: one request holds more events than a second allows"
        )),
        IngestError::Tenant(error) => ApiError::from_tenant(error, retry_after_s),
        IngestError::DiskShort { .. } => ApiError::InsufficientStorage {
            message: error.to_string(),
            retry_after_s,
        },
        IngestError::NotServing { .. } | IngestError::ActorGone(_) => ApiError::Unavailable {
            message: error.to_string(),
            retry_after_s,
        },
    }
}

fn respond(report: IngestReport) -> Value {
    let IngestReport {
        mut outcomes,
        rejections,
    } = report;
    outcomes.sort_by_key(|(index, _)| *index);
    let (mut accepted, mut duplicates, mut late, mut quarantined) = (0u64, 0u64, 0u64, 0u64);
    let mut errors: Vec<(u32, Value)> = Vec::new();
    for (index, outcome) in &outcomes {
        match outcome {
            EventOutcome::Accepted => accepted += 1,
            EventOutcome::Duplicate => duplicates += 1,
            EventOutcome::Late => late += 1,
            EventOutcome::Quarantined { reason, qid, id } => {
                quarantined += 1;
                errors.push((
                    *index,
                    json!({"index": index, "id": id, "outcome": "quarantined", "reason": reason.as_str(), "qid": qid}),
                ));
            }
        }
    }
    for rejection in &rejections {
        errors.push((
            rejection.index,
            json!({"index": rejection.index, "id": rejection.id, "outcome": "rejected", "reason": rejection.reason.as_str()}),
        ));
    }
    errors.sort_by_key(|(index, _)| *index);
    json!({
        "accepted": accepted,
        "duplicates": duplicates,
        "late": late,
        "quarantined": quarantined,
        "rejected": rejections.len(),
        "errors": errors.into_iter().map(|(_, error)| error).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_split_into_events() {
        let items = split_events(br#" [ {"id":"a"}, 5, {"id":"b"} ] "#, BodyFormat::Json).unwrap();
        assert_eq!(items, vec![&br#"{"id":"a"}"#[..], b"5", br#"{"id":"b"}"#]);
        let single = split_events(br#"{"id":"a"}"#, BodyFormat::Json).unwrap();
        assert_eq!(single.len(), 1);
        assert!(matches!(
            split_events(b"[{", BodyFormat::Json),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            split_events(b"42", BodyFormat::Json),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            split_events(b"", BodyFormat::Json),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn ndjson_lines_are_kept_raw_and_blank_lines_skipped() {
        let body = b"{\"id\":\"a\"}\r\n\n  not json\n{\"id\":\"b\"}";
        let items = split_events(body, BodyFormat::Ndjson).unwrap();
        assert_eq!(
            items,
            vec![&b"{\"id\":\"a\"}"[..], b"not json", b"{\"id\":\"b\"}"]
        );
    }

    #[test]
    fn content_types() {
        let mut headers = HeaderMap::new();
        assert!(matches!(
            body_format(&headers),
            Err(ApiError::UnsupportedMediaType)
        ));
        headers.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(body_format(&headers).unwrap(), BodyFormat::Json);
        headers.insert(
            header::CONTENT_TYPE,
            "application/x-ndjson".parse().unwrap(),
        );
        assert_eq!(body_format(&headers).unwrap(), BodyFormat::Ndjson);
        headers.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(matches!(
            body_format(&headers),
            Err(ApiError::UnsupportedMediaType)
        ));
    }
}
