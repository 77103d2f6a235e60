//! The HTTP API: every route in one place (`router`), errors mapped to status in
//! `error`, who is calling in `caller` (who may do what is `crate::auth`'s).

pub mod admit;
pub mod alerts;
pub mod audit;
pub mod caller;
pub mod csv;
pub mod error;
pub mod experiments;
pub mod ingest;
pub mod keys;
pub mod live;
pub mod lookups;
pub mod prometheus;
pub mod quarantine;
pub mod query;
pub mod serve;
pub mod tenants;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::node::Node;

use error::ApiError;

pub fn router(node: Arc<Node>) -> Router {
    let mut router = Router::new();
    if node.config.prometheus.listen.is_empty() {
        router = router.route("/metrics", get(prometheus::get_metrics));
    }
    router
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // the body limit is enforced by ingest itself, with its own 413 message
        .route(
            "/v1/events",
            post(ingest::post_events).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/live", get(live::get_live))
        .route("/v1/tenant", get(query::get_tenant))
        .route("/wall", get(wall))
        .route("/v1/metrics", get(query::get_all))
        .route("/v1/metrics/{name}", get(query::get_one))
        .route("/v1/metrics/{name}/series", get(query::get_series))
        .route("/v1/alerts", get(alerts::list))
        .route(
            "/v1/alerts/{rule_id}",
            get(alerts::get_rule)
                .put(alerts::put_rule)
                .delete(alerts::delete_rule),
        )
        .route("/v1/budgets/{dim}/{value}", put(alerts::put_budget))
        .route("/v1/experiments", get(experiments::list))
        .route(
            "/v1/experiments/{id}",
            get(experiments::get)
                .put(experiments::put)
                .delete(experiments::delete),
        )
        .route("/v1/experiments/{id}/resume", post(experiments::resume))
        .route("/v1/signals", get(experiments::signals))
        .route("/v1/audit", get(audit::list))
        .route("/v1/tenants", get(tenants::list))
        .route(
            "/v1/tenants/{id}",
            get(tenants::get).put(tenants::put).delete(tenants::delete),
        )
        .route("/v1/tenants/{id}/keys", get(keys::list).post(keys::add))
        .route("/v1/tenants/{id}/keys/{key_id}", delete(keys::revoke))
        .route("/v1/quarantine", get(quarantine::list))
        .route("/v1/quarantine/retry", post(quarantine::retry_all))
        .route(
            "/v1/lookups/{table}",
            get(lookups::get)
                .put(lookups::put_or_patch)
                .patch(lookups::put_or_patch),
        )
        .route("/v1/quarantine/{qid}/retry", post(quarantine::retry))
        .route("/v1/quarantine/{qid}", delete(quarantine::delete))
        // the key before the body; inside the audit, which counts its 401s
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&node),
            admit::admit,
        ))
        // after routing, so that records name the route's pattern
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&node),
            audit::record_requests,
        ))
        // bodies are read whole by `admit` within server.max_body_bytes;
        // axum's own 2 MiB default must not cut them shorter
        .layer(DefaultBodyLimit::max(node.config.server.max_body_bytes))
        .fallback(not_found)
        .layer(axum::middleware::map_response(error::json_errors))
        .with_state(node)
}

/// `/metrics` alone, for `prometheus.listen`.
pub fn metrics_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/metrics", get(prometheus::get_metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&node),
            audit::record_requests,
        ))
        .fallback(not_found)
        .layer(axum::middleware::map_response(error::json_errors))
        .with_state(node)
}

/// The wall display: one self-contained page, embedded in the binary.
async fn wall() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("wall.html"))
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(node): State<Arc<Node>>) -> (StatusCode, Json<Value>) {
    match node.not_ready_reason() {
        None => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        ),
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}
