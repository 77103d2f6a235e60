//! `GET /v1/live` (API.md §5): the upgrade. A key in the header is checked
//! now (401 or 403 before upgrading); without one, the session's first message
//! must authenticate (`live::session`).
//! Must not: run the session itself.

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::auth::Caller;
use crate::node::Node;

use super::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveQuery {
    tenant: Option<String>,
}

pub async fn get_live(
    State(node): State<Arc<Node>>,
    caller: Caller,
    query: Result<Query<LiveQuery>, axum::extract::rejection::QueryRejection>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // the key first: a bad query from a stranger is still 401
    let principal = match &caller {
        Caller::Anonymous => None,
        caller => Some(caller.principal()?),
    };
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let tenant = match principal {
        Some(principal) => {
            let tenant = node.reading_tenant(principal, query.tenant.as_deref())?;
            Some(tenant.context.id.to_string())
        }
        None if query.tenant.is_some() => {
            return Err(ApiError::BadRequest(
                "without an Authorization header, name the tenant in the auth message".into(),
            ))
        }
        None => None,
    };
    let message_bytes_max = node.config.live.message_bytes_max;
    Ok(upgrade
        .max_message_size(message_bytes_max)
        .max_frame_size(message_bytes_max)
        // clients send small control messages: small buffers keep 10 000
        // sessions in memory (tungstenite's default read buffer is 128 KiB)
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .on_upgrade(move |socket| crate::live::session::run(node, socket, tenant))
        .into_response())
}
