//! `POST /v1/events` (API.md §3): reads the body (JSON object, array or NDJSON),
//! attributes each event to a tenant, validates it here on the HTTP threads, and
//! hands one batch per tenant to its TenantActor.
//! Must not: apply anything of a request it refuses (401/403/413/415/429 are
//! decided before any batch is sent), or let an event go without an outcome.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::actors::tenant::{EventOutcome, IngestBatch, QuarantineCandidate, TenantError};
use crate::actors::InFlight;
use crate::auth::{Caller, Principal};
use crate::domain::event::{parse_event, validate_event, Reason, TenantField, ValidEvent};
use crate::domain::tenant::CoreError;
use crate::node::Node;
use crate::telemetry::{self, Outcome};

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

#[derive(Default)]
struct TenantBatch {
    events: Vec<(u32, ValidEvent)>,
    quarantined: Vec<QuarantineCandidate>,
}

struct Rejection {
    index: u32,
    id: Option<String>,
    reason: Reason,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestQuery {
    /// A tenant key may name only its own tenant; an admin key names the tenant
    /// of events that carry no `tenant` field.
    tenant: Option<String>,
}

/// The tenant events without a `tenant` field belong to.
fn default_tenant<'n>(
    node: &'n Node,
    principal: &Principal,
    named: Option<&str>,
) -> Result<Option<&'n str>, ApiError> {
    let Some(named) = named else {
        return Ok(match principal {
            Principal::Tenant(own) => node.tenants.get_key_value(own).map(|(id, _)| id.as_str()),
            Principal::Admin => None,
        });
    };
    if matches!(principal, Principal::Tenant(own) if own != named) {
        return Err(ApiError::Forbidden(
            "a tenant key can only write its own tenant".into(),
        ));
    }
    node.tenants
        .get_key_value(named)
        .map(|(id, _)| Some(id.as_str()))
        .ok_or_else(|| ApiError::NotFound(format!("unknown tenant {named}")))
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

    let mut batches: BTreeMap<&str, TenantBatch> = BTreeMap::new();
    let mut rejections = Vec::new();
    let mut mismatches = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let index = index as u32;
        let parsed = parse_event(item);
        let id = parsed
            .as_ref()
            .ok()
            .and_then(|raw| raw.id_text())
            .map(str::to_string);
        let tenant_id: &str = match (&principal, &parsed) {
            (Principal::Tenant(own), Ok(raw)) => match raw.tenant() {
                TenantField::Named(named) if named != own => {
                    mismatches.push(json!({"index": index, "id": id, "outcome": "rejected", "reason": Reason::TenantMismatch.as_str()}));
                    continue;
                }
                _ => own,
            },
            (Principal::Tenant(own), Err(_)) => own,
            (Principal::Admin, Ok(raw)) => {
                let named = match raw.tenant() {
                    TenantField::Named(named) => node
                        .tenants
                        .get_key_value(named)
                        .map(|(key, _)| key.as_str())
                        .ok_or(Reason::UnknownTenant),
                    TenantField::Absent => query_tenant.ok_or(Reason::MissingTenant),
                    TenantField::Invalid => Err(Reason::InvalidTenant),
                };
                match named {
                    Ok(named) => named,
                    Err(reason) => {
                        rejections.push(Rejection { index, id, reason });
                        continue;
                    }
                }
            }
            // an admin's unreadable event names no tenant whose quarantine could hold it
            (Principal::Admin, Err(reason)) => {
                rejections.push(Rejection {
                    index,
                    id,
                    reason: *reason,
                });
                continue;
            }
        };
        let Some(tenant) = node.tenants.get(tenant_id) else {
            rejections.push(Rejection {
                index,
                id,
                reason: Reason::UnknownTenant,
            });
            continue;
        };
        let batch = batches.entry(tenant_id).or_default();
        match parsed
            .and_then(|raw| validate_event(&raw, &tenant.context.validation(), now_ms, now_ms))
        {
            Ok(event) => batch.events.push((index, event)),
            Err(reason) => batch.quarantined.push(QuarantineCandidate {
                index,
                id,
                reason,
                // the quarantine cuts it to raw_bytes_max and says so
                raw: item.to_vec(),
            }),
        }
    }
    if !mismatches.is_empty() {
        telemetry::count_outcome(
            Outcome::Rejected,
            Some(Reason::TenantMismatch),
            mismatches.len() as u64,
        );
        return Err(ApiError::TenantMismatch(mismatches));
    }

    // rejections are decided here and counted here, whatever happens next
    for rejection in &rejections {
        telemetry::count_outcome(Outcome::Rejected, Some(rejection.reason), 1);
    }
    // Take a permit of every tenant first, so that a shed request applies
    // nothing; a tenant that stopped serving refuses the request with its reason.
    let mut permits = Vec::with_capacity(batches.len());
    for tenant_id in batches.keys() {
        let tenant = &node.tenants[*tenant_id];
        if let Some(reason) = tenant.failure() {
            telemetry::count_shed(telemetry::Shed::Unavailable);
            return Err(ApiError::Unavailable {
                message: format!("tenant {tenant_id} is not serving: {reason}"),
                retry_after_s,
            });
        }
        match Arc::clone(&tenant.batch_permits).try_acquire_owned() {
            Ok(permit) => permits.push(InFlight::new(permit)),
            Err(_) => {
                telemetry::count_shed(telemetry::Shed::BatchesInFlight);
                return Err(ApiError::Overloaded {
                    message: format!(
                        "tenant {tenant_id} has too many ingest batches in flight; retry later"
                    ),
                    retry_after_s,
                });
            }
        }
    }
    let mut requests = Vec::with_capacity(batches.len());
    for ((tenant_id, batch), in_flight) in batches.into_iter().zip(permits) {
        let tenant = &node.tenants[tenant_id];
        requests.push(tenant.actor.send(IngestBatch {
            in_flight,
            now_ms,
            events: batch.events,
            quarantined: batch.quarantined,
        }));
    }
    let mut outcomes: Vec<(u32, EventOutcome)> = Vec::with_capacity(items.len());
    let mut failure = None;
    for request in requests {
        match request.await {
            // each tenant's actor counted its outcomes when it decided them
            Ok(Ok(tenant_outcomes)) => outcomes.extend(tenant_outcomes),
            Ok(Err(error)) => {
                telemetry::count_shed(match error {
                    TenantError::Core(CoreError::DedupFull { .. }) => telemetry::Shed::DedupFull,
                    _ => telemetry::Shed::Unavailable,
                });
                failure = Some(ApiError::from_tenant(error, retry_after_s));
            }
            Err(error) => {
                telemetry::count_shed(telemetry::Shed::Unavailable);
                failure = Some(ApiError::Unavailable {
                    message: format!("tenant actor did not answer: {error}"),
                    retry_after_s,
                })
            }
        }
    }
    if let Some(error) = failure {
        return Err(error);
    }
    telemetry::record_ingest(started.elapsed_secs(), items.len());
    Ok(Json(respond(outcomes, rejections)))
}

fn respond(mut outcomes: Vec<(u32, EventOutcome)>, rejections: Vec<Rejection>) -> Value {
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
