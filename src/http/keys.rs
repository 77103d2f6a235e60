//! Tenant key routes (admin keys only; docs/api.md, "Tenant keys"): list a
//! tenant's key ids, add a key (made, or given), revoke one.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{Caller, Principal};
use crate::keys::KeyError;
use crate::node::Node;

use super::alerts::json_body;
use super::error::ApiError;

fn admin_only(caller: &Caller) -> Result<(), ApiError> {
    match caller.principal()? {
        Principal::Admin => Ok(()),
        Principal::Tenant(_) => Err(ApiError::Forbidden(
            "tenant keys are managed with an admin key".into(),
        )),
    }
}

fn key_error(node: &Node, error: KeyError) -> ApiError {
    match error {
        KeyError::UnknownTenant(_) | KeyError::UnknownKey(..) => {
            ApiError::NotFound(error.to_string())
        }
        KeyError::TooMany(..) | KeyError::InUse => ApiError::Conflict(error.to_string()),
        KeyError::BadKey => ApiError::Invalid(vec![("key".into(), error.to_string())]),
        KeyError::Storage(_) | KeyError::Random(_) => ApiError::Unavailable {
            message: error.to_string(),
            retry_after_s: node.config.server.retry_after_s,
        },
    }
}

/// `GET /v1/tenants/{id}/keys`: the ids of its keys and where each comes
/// from; never a secret.
pub async fn list(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin_only(&caller)?;
    if node.tenant(&tenant).is_none() {
        return Err(ApiError::NotFound(format!("unknown tenant {tenant}")));
    }
    let keys: Vec<Value> = node
        .keys
        .tenant_keys()
        .iter()
        .filter(|key| key.tenant == tenant)
        .map(|key| json!({"key_id": key.id, "source": if key.from_config { "config" } else { "api" }}))
        .collect();
    Ok(Json(json!({"tenant": tenant, "keys": keys})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// A key of the caller's choosing; none: the node makes one.
    key: Option<String>,
}

/// `POST /v1/tenants/{id}/keys`: 201 with the key's id and its secret,
/// which is shown this once.
pub async fn add(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path(tenant): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    admin_only(&caller)?;
    let new: NewKey = if body.iter().all(u8::is_ascii_whitespace) {
        NewKey::default()
    } else {
        json_body(&body)?
    };
    let (id, secret) = crate::keys::add(&node, &tenant, new.key)
        .await
        .map_err(|error| key_error(&node, error))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"tenant": tenant, "key_id": id, "key": secret})),
    ))
}

/// `DELETE /v1/tenants/{id}/keys/{key_id}`: 204; the key is refused from
/// the next request on and its live sessions are closed (4401).
pub async fn revoke(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path((tenant, key_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    admin_only(&caller)?;
    crate::keys::revoke(&node, &tenant, &key_id)
        .await
        .map_err(|error| key_error(&node, error))?;
    Ok(StatusCode::NO_CONTENT)
}
