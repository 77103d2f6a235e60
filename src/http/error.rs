//! Errors of the HTTP boundary and their one mapping to status codes. Every error
//! body is `{"error": code, "message": text}`; shed load carries `Retry-After`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::actors::tenant::TenantError;
use crate::auth::AuthError;
use crate::read::ReadError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or unknown api key")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    /// A tenant key named another tenant on events; lists the events.
    #[error("events name a tenant other than the key's; nothing was applied")]
    TenantMismatch(Vec<serde_json::Value>),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// A body that does not check: every problem with its field.
    #[error("the request does not check; see errors")]
    Invalid(Vec<(String, String)>),
    #[error("{0}")]
    Conflict(String),
    /// A CSV export past `export.rows_max`.
    #[error("{0}")]
    ExportTooLarge(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("content type must be application/json or application/x-ndjson")]
    UnsupportedMediaType,
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{message}")]
    Overloaded { message: String, retry_after_s: u32 },
    #[error("{message}")]
    Unavailable { message: String, retry_after_s: u32 },
    /// The disk is short of `storage.disk_free_bytes_min`: nothing written.
    #[error("{message}")]
    InsufficientStorage { message: String, retry_after_s: u32 },
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::TenantMismatch(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::ExportTooLarge(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::InsufficientStorage { .. } => StatusCode::INSUFFICIENT_STORAGE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::TenantMismatch(_) => "tenant_mismatch",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::Invalid(_) => "invalid",
            ApiError::Conflict(_) => "conflict",
            ApiError::ExportTooLarge(_) => "export_too_large",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::InsufficientStorage { .. } => "insufficient_storage",
        }
    }

    pub fn from_tenant(error: TenantError, retry_after_s: u32) -> ApiError {
        ApiError::Unavailable {
            message: error.to_string(),
            retry_after_s,
        }
    }
}

/// Who may do what: 401, 403, or 400 for an admin that named no tenant.
impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> ApiError {
        match error {
            AuthError::Unauthorized => ApiError::Unauthorized,
            AuthError::Forbidden(message) => ApiError::Forbidden(message),
            AuthError::TenantNeeded => ApiError::BadRequest(error.to_string()),
            AuthError::UnknownTenant(_) => ApiError::NotFound(error.to_string()),
        }
    }
}

impl ApiError {
    /// A read that failed: 404 for an unknown metric, 400 for a breakdown the
    /// metric does not keep, 503 with `Retry-After` when the tenant is busy
    /// or not serving.
    pub fn from_read(error: ReadError, retry_after_s: u32) -> ApiError {
        match error {
            ReadError::UnknownMetric(_) => ApiError::NotFound(error.to_string()),
            ReadError::NoBreakdown { .. } => ApiError::BadRequest(error.to_string()),
            ReadError::Busy(_) | ReadError::NotServing { .. } => ApiError::Unavailable {
                message: error.to_string(),
                retry_after_s,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = json!({"error": self.code(), "message": self.to_string()});
        let retry_after_s = match &self {
            ApiError::Overloaded { retry_after_s, .. }
            | ApiError::Unavailable { retry_after_s, .. }
            | ApiError::InsufficientStorage { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        };
        match self {
            ApiError::TenantMismatch(errors) => body["errors"] = serde_json::Value::Array(errors),
            ApiError::Invalid(errors) => {
                body["errors"] = errors
                    .into_iter()
                    .map(|(field, message)| json!({"field": field, "message": message}))
                    .collect();
            }
            _ => {}
        }
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Every error answer is `{"error": code, "message": text}` (docs/api.md §3),
/// also those axum makes itself before a handler runs: `405` (with its
/// `Allow`), a path segment that is not UTF-8, a rejected extractor. Their
/// text becomes the message; the status decides the code.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // axum's own error texts are a line; a longer body is not an error text
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
        .unwrap_or_default();
    let code = match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "invalid",
        _ if status.is_server_error() => "unavailable",
        _ => "bad_request",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        // error text is lowercase (STYLE.md); axum's begins with a capital
        let mut chars = text.chars();
        chars
            .next()
            .map(|first| first.to_lowercase().chain(chars).collect())
            .unwrap_or_default()
    };
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = json!({"error": code, "message": message}).to_string();
    Response::from_parts(parts, axum::body::Body::from(body))
}
