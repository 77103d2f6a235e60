//! Experiment and signal routes (API.md §8, docs/experiments.md): register,
//! inspect, resume and delete experiments; the signal records after a
//! `since` (the same records the `signals` topic pushes).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::auth::Caller;
use crate::domain::experiment::{ExperimentSpec, StoredExperiment};
use crate::domain::histogram::HistogramStats;
use crate::domain::metric::{VariantCounts, VariantsReading};
use crate::domain::window::Tally;
use crate::experiments::{read_counts, ExperimentError, TenantExperiments};
use crate::node::Node;
use crate::read::TenantReader;
use crate::storage::outbox::Topic;

use super::alerts::{json_body, records_since, writing_tenant, TenantQuery};
use super::audit::Counted;
use super::error::ApiError;
use super::query::read_error;

fn experiment_error(node: &Node, error: ExperimentError) -> ApiError {
    match error {
        ExperimentError::NotFound(_) => ApiError::NotFound(error.to_string()),
        ExperimentError::TooMany(_)
        | ExperimentError::Stopped(_)
        | ExperimentError::NotRunning(..) => ApiError::Conflict(error.to_string()),
        ExperimentError::Read(error) => read_error(node, error),
        ExperimentError::Storage(_)
        | ExperimentError::Encode(_)
        | ExperimentError::TenantGone(_) => ApiError::Unavailable {
            message: error.to_string(),
            retry_after_s: node.config.server.retry_after_s,
        },
    }
}

fn tenant_experiments(node: &Node, tenant: &str) -> Result<Arc<TenantExperiments>, ApiError> {
    node.experiments
        .get(tenant)
        .ok_or_else(|| ApiError::NotFound(format!("unknown tenant {tenant}")))
}

fn is_experiment_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn rate_json(tally: Tally) -> Value {
    let rate = (tally.count > 0).then(|| tally.sum as f64 / tally.count as f64);
    json!({"samples": tally.count, "hits": tally.sum as i64, "rate": rate})
}

fn latency_json(stats: HistogramStats) -> Value {
    json!({"samples": stats.count, "p50": stats.p50, "p95": stats.p95, "p99": stats.p99})
}

/// What `GET /v1/experiments/{id}` shows: the spec, the state, and each
/// variant's counts of each guarded metric since the start and over `15m`.
fn experiment_json(
    tenant: &str,
    stored: &StoredExperiment,
    counts: &BTreeMap<usize, Option<VariantsReading>>,
    p_values: Vec<BTreeMap<String, f64>>,
    node: &Node,
) -> Value {
    let mut variants = Map::new();
    let mut unknown_variant_events = 0u64;
    for variant in &stored.spec.variants {
        let mut metrics = Map::new();
        for (&index, reading) in counts {
            let name = node.catalogue.metrics()[index].name.clone();
            let found = reading.as_ref().and_then(|reading| {
                reading
                    .variants
                    .iter()
                    .find(|(name, _)| name == variant)
                    .map(|(_, counts)| counts)
            });
            let shown = match found {
                Some(VariantCounts::Counter {
                    since,
                    judged,
                    min15,
                }) => json!({
                    "since_start": rate_json(*since),
                    "judged": rate_json(*judged),
                    "15m": rate_json(*min15),
                }),
                Some(VariantCounts::Histogram {
                    since,
                    judged,
                    min15,
                }) => json!({
                    "since_start": latency_json(*since),
                    "judged": latency_json(
                        judged.as_deref().map_or_else(HistogramStats::default, HistogramStats::of)
                    ),
                    "15m": latency_json(*min15),
                }),
                None => json!({"since_start": null, "judged": null, "15m": null}),
            };
            metrics.insert(name, shown);
        }
        variants.insert(variant.clone(), Value::Object(metrics));
    }
    for reading in counts.values().flatten() {
        unknown_variant_events = unknown_variant_events.max(reading.unknown_variant);
    }
    let guardrails: Vec<Value> = stored
        .spec
        .guardrails
        .iter()
        .enumerate()
        .map(|(index, guardrail)| {
            let mut shown = serde_json::to_value(guardrail).unwrap_or(Value::Null);
            if let Some(p) = p_values.get(index) {
                shown["p_values"] = json!(p);
            }
            shown
        })
        .collect();
    let mut spec = serde_json::to_value(&stored.spec).unwrap_or(Value::Null);
    spec["guardrails"] = Value::Array(guardrails);
    json!({
        "tenant": tenant,
        "id": stored.id,
        "state": stored.state,
        "started_at": stored.started_ms,
        "changed_at": stored.changed_ms,
        "spec": spec,
        "variants": variants,
        "unknown_variant_events": unknown_variant_events,
        "sample_ratio": {"looks": stored.srm_looks, "mismatch": stored.srm_signalled},
    })
}

/// `PUT /v1/experiments/{id}`: registers (201), replaces a changed spec
/// (200, counted afresh), or leaves the same spec as it is (200); a body
/// that does not check gets 400 with every problem by field.
pub async fn put(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let tenant = writing_tenant(&node, &caller, query)?;
    if !is_experiment_id(&id) {
        return Err(ApiError::Invalid(vec![(
            "id".into(),
            "must match [A-Za-z0-9_.-]{1,64}".into(),
        )]));
    }
    let spec: ExperimentSpec = json_body(&body)?;
    let problems = spec.problems(&node.catalogue);
    if !problems.is_empty() {
        return Err(ApiError::Invalid(problems));
    }
    let (created, stored) = crate::experiments::put_experiment(&node, &tenant, &id, spec)
        .await
        .map_err(|error| experiment_error(&node, error))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({
            "tenant": tenant,
            "id": stored.id,
            "state": stored.state,
            "started_at": stored.started_ms,
            "spec": stored.spec,
        })),
    ))
}

/// `GET /v1/experiments/{id}`: state and per-variant values.
pub async fn get(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let tenant = writing_tenant(&node, &caller, query)?;
    let experiments = tenant_experiments(&node, &tenant)?;
    let stored = experiments
        .get(&id)
        .ok_or_else(|| ApiError::NotFound(format!("no experiment {id}")))?;
    let handle = node
        .tenant(&tenant)
        .ok_or_else(|| ApiError::NotFound(format!("unknown tenant {tenant}")))?;
    let reader = TenantReader::begin(&handle).map_err(|error| read_error(&node, error))?;
    let counts = read_counts(&reader, &stored, &node.catalogue, true, node.now_ms())
        .await
        .map_err(|error| read_error(&node, error))?;
    drop(reader);
    Ok(Json(experiment_json(
        &tenant,
        &stored,
        &counts,
        experiments.p_values(&id),
        &node,
    )))
}

/// `GET /v1/experiments`: every experiment of the tenant with its state,
/// and the last signal seq (where a `signals` subscription after this
/// starts).
pub async fn list(
    State(node): State<Arc<Node>>,
    caller: Caller,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let tenant = writing_tenant(&node, &caller, query)?;
    let experiments = tenant_experiments(&node, &tenant)?;
    let listed: Vec<Value> = experiments
        .list()
        .into_iter()
        .map(|stored| {
            json!({
                "id": stored.id,
                "state": stored.state,
                "started_at": stored.started_ms,
                "changed_at": stored.changed_ms,
                "variants": stored.spec.variants,
                "guardrails": stored.spec.guardrails.len(),
            })
        })
        .collect();
    Ok(Json(json!({
        "tenant": tenant,
        "experiments": listed,
        "last_seq": experiments.last_seq(),
    })))
}

/// `POST /v1/experiments/{id}/resume`: a paused experiment runs again (a
/// `resume` signal); a stopped one answers 409.
pub async fn resume(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let tenant = writing_tenant(&node, &caller, query)?;
    let stored = crate::experiments::resume(&node, &tenant, &id)
        .await
        .map_err(|error| experiment_error(&node, error))?;
    Ok(Json(json!({
        "tenant": tenant,
        "id": stored.id,
        "state": stored.state,
        "changed_at": stored.changed_ms,
    })))
}

/// `DELETE /v1/experiments/{id}`: 204; its counts go, its signals stay.
pub async fn delete(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let tenant = writing_tenant(&node, &caller, query)?;
    crate::experiments::delete(&node, &tenant, &id)
        .await
        .map_err(|error| experiment_error(&node, error))?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalsQuery {
    tenant: Option<String>,
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

/// `GET /v1/signals?since=SEQ`: the signal records after `since` (default
/// 0), oldest first, at most `limit`, and `next_since` to ask again with.
pub async fn signals(
    State(node): State<Arc<Node>>,
    caller: Caller,
    query: Result<Query<SignalsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Counted, ApiError> {
    let principal = caller.principal()?;
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let tenant = node
        .reading_tenant(principal, query.tenant.as_deref())?
        .context
        .id
        .to_string();
    let (records, next_since) =
        records_since(&node, &tenant, Topic::Signals, query.since, query.limit).await?;
    Ok(Counted(
        records.len(),
        Json(json!({
            "tenant": tenant,
            "signals": records,
            "next_since": next_since,
        })),
    ))
}
