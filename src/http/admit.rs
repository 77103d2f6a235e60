//! Admission of request bodies on every route but ingest (which streams its
//! own, with the same limits): the key is checked before a byte of the body
//! is read (`401`), then the body is read whole within
//! `server.max_body_bytes` (`413`) and `server.body_read_timeout_ms` (`408`).
//! So a client without a key cannot make the node hold a body, and no body
//! waits for ever.
//! Must not: decide what a key may do (the handlers do, through `Caller`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::Caller;
use crate::node::Node;

use super::caller::bearer_token;
use super::error::ApiError;

pub async fn admit(State(node): State<Arc<Node>>, request: Request, next: Next) -> Response {
    let has_body = matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH
    );
    if !has_body || request.uri().path() == "/v1/events" {
        return next.run(request).await;
    }
    let caller = match bearer_token(request.headers()) {
        Some("") => Caller::Invalid,
        token => node.keys.caller(token),
    };
    if !matches!(caller, Caller::Key(_)) {
        return ApiError::Unauthorized.into_response();
    }
    let limit = node.config.server.max_body_bytes;
    let deadline_ms = node.config.server.body_read_timeout_ms;
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(
        Duration::from_millis(deadline_ms),
        axum::body::to_bytes(body, limit),
    )
    .await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) => {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>())
                || error.to_string().contains("length limit");
            return if too_large {
                ApiError::PayloadTooLarge(format!(
                    "the request body is larger than server.max_body_bytes ({limit} bytes)"
                ))
            } else {
                ApiError::BadRequest(format!("the request body could not be read: {error}"))
            }
            .into_response();
        }
        Err(_) => {
            return ApiError::RequestTimeout(format!(
            "the request body did not arrive within server.body_read_timeout_ms ({deadline_ms} ms)"
        ))
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}
