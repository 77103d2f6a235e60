//! `GET /v1/live` (API.md §5): the upgrade. A key in the header is checked
//! now (401 or 403 before upgrading); without one, the session's first message
//! must authenticate (`live::session`).
//! Must not: run the session itself.

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
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
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    query: Result<Query<LiveQuery>, axum::extract::rejection::QueryRejection>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // the key's id for the audit records of the session's subscriptions
    let key = Some(crate::audit::key_id(
        &caller,
        super::caller::bearer_token(&headers),
    ));
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
    // a place before upgrading: past the cap the client gets an HTTP answer
    // it can act on, not a socket closed at once. A socket that has still to
    // authenticate takes a place among those (`live.unauthenticated_max`),
    // and one among the sessions only once it has.
    let (places, max, name) = if tenant.is_some() {
        (
            &node.live_sessions,
            node.config.live.sessions_max,
            "live.sessions_max",
        )
    } else {
        (
            &node.live_unauthenticated,
            node.config.live.unauthenticated_max,
            "live.unauthenticated_max",
        )
    };
    let Ok(place) = Arc::clone(places).try_acquire_owned() else {
        crate::telemetry::count_shed(crate::telemetry::Shed::LiveSessions);
        return Err(ApiError::Unavailable {
            message: format!("the node has {name} ({max}) live sockets; retry"),
            retry_after_s: node.config.server.retry_after_s,
        });
    };
    let message_bytes_max = node.config.live.message_bytes_max;
    Ok(upgrade
        .max_message_size(message_bytes_max)
        .max_frame_size(message_bytes_max)
        // clients send small control messages: small buffers keep 10 000
        // sessions in memory (tungstenite's default read buffer is 128 KiB)
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .on_upgrade(move |socket| async move {
            crate::live::session::run(node, socket, tenant.zip(key), Some(peer.ip()), place).await;
        })
        .into_response())
}
