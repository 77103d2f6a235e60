//! Tenant routes (admin keys only; API.md §2, docs/api.md "Tenants"): list
//! the tenants, show one with its key ids, create or update one, remove one.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::auth::{Caller, Principal};
use crate::node::Node;
use crate::tenants::{Put, TenantError, TenantSpec};

use super::alerts::json_body;
use super::error::ApiError;

fn admin_only(caller: &Caller) -> Result<(), ApiError> {
    match caller.principal()? {
        Principal::Admin => Ok(()),
        Principal::Tenant(_) => Err(ApiError::Forbidden(
            "tenants are managed with an admin key".into(),
        )),
    }
}

fn tenant_error(node: &Node, error: TenantError) -> ApiError {
    match error {
        TenantError::Invalid(issues) => ApiError::Invalid(
            issues
                .into_iter()
                .map(|issue| (issue.path, issue.message))
                .collect(),
        ),
        TenantError::Unknown(_) => ApiError::NotFound(error.to_string()),
        TenantError::Retired(_) | TenantError::Fixed { .. } | TenantError::TooMany(_) => {
            ApiError::Conflict(error.to_string())
        }
        TenantError::Key(_) | TenantError::Storage(_) => ApiError::Unavailable {
            message: error.to_string(),
            retry_after_s: node.config.server.retry_after_s,
        },
    }
}

/// `GET /v1/tenants`: every tenant serving, with the same fields as one.
pub async fn list(State(node): State<Arc<Node>>, caller: Caller) -> Result<Json<Value>, ApiError> {
    admin_only(&caller)?;
    Ok(Json(json!({"tenants": crate::tenants::views(&node)})))
}

/// `GET /v1/tenants/{id}`.
pub async fn get(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin_only(&caller)?;
    crate::tenants::view(&node, &id)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("unknown tenant {id}")))
}

/// `PUT /v1/tenants/{id}`: `201` with the tenant when it is new, `200` when
/// its keys changed (or nothing did).
pub async fn put(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    admin_only(&caller)?;
    let spec: TenantSpec = json_body(&body)?;
    let put = crate::tenants::put(&node, &id, spec)
        .await
        .map_err(|error| tenant_error(&node, error))?;
    if put == Put::Created {
        // its live feed runs until the tenant is removed or the node stops
        if let Some(feed) = node.feeds.get(&id) {
            tokio::spawn(crate::live::run_feed(
                Arc::clone(&node),
                id.clone(),
                feed,
                node.stopping.subscribe(),
            ));
        }
    }
    let view = crate::tenants::view(&node, &id)
        .ok_or_else(|| ApiError::NotFound(format!("unknown tenant {id}")))?;
    let status = match put {
        Put::Created => StatusCode::CREATED,
        Put::Updated => StatusCode::OK,
    };
    Ok((status, Json(view)))
}

/// `DELETE /v1/tenants/{id}`: `204`; its keys are refused from the next
/// request on, its live sessions close (`4401`), and its id is retired.
pub async fn delete(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin_only(&caller)?;
    crate::tenants::remove(&node, &id)
        .await
        .map_err(|error| tenant_error(&node, error))?;
    Ok(StatusCode::NO_CONTENT)
}
