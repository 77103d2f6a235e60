//! The audit middleware and `GET /v1/audit` (docs/audit.md): every request of
//! a keyed caller to a route of tenant data is recorded after it is answered
//! (who, which tenant, what, its status and rows); every 401/403 counts toward
//! its address's burst. Ingest, health and the wall page are not recorded.
//! Must not: change a response, or decide who may read (the routes do).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, MatchedPath, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::audit::{key_id, read_since, AuditRecord, AuditRows};
use crate::auth::{tenant_for_read, Caller, Principal};
use crate::node::Node;

use super::caller::bearer_token;
use super::error::ApiError;

/// A JSON answer and the rows it returned, for the audit record.
pub struct Counted(pub usize, pub Json<Value>);

impl IntoResponse for Counted {
    fn into_response(self) -> Response {
        let mut response = self.1.into_response();
        response.extensions_mut().insert(AuditRows(self.0 as u64));
        response
    }
}

/// Routes that are not reads or changes of tenant data.
fn unaudited(route: &str) -> bool {
    matches!(
        route,
        "/v1/events" | "/healthz" | "/readyz" | "/wall" | "/v1/live"
    )
}

/// The tenant a request names, decoded as the routes decode it: in its path
/// (`/v1/tenants/{id}/…`) or its `tenant` parameter.
fn named_tenant(route: &str, uri: &axum::http::Uri) -> Option<String> {
    if route.starts_with("/v1/tenants/{id}") {
        return uri.path().split('/').nth(3).map(str::to_string);
    }
    let Query(query) =
        Query::<std::collections::HashMap<String, String>>::try_from_uri(uri).ok()?;
    query.get("tenant").cloned()
}

pub async fn record_requests(
    State(node): State<Arc<Node>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || request.uri().path().to_string(),
        |m| m.as_str().to_string(),
    );
    let address = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    // ingest, health and the wall: only their refusals count (bursts); none
    // of the record's parts is made for them
    if unaudited(&route) {
        let response = next.run(request).await;
        let status = response.status().as_u16();
        if status == 401 || status == 403 {
            node.audit
                .auth_failure(address, status, node.now_ms())
                .await;
        }
        return response;
    }
    let action = format!("{} {route}", request.method());
    let target = request
        .uri()
        .path_and_query()
        .map_or_else(String::new, |p| p.as_str().to_string());
    let token = bearer_token(request.headers()).map(str::to_string);
    let named = named_tenant(&route, request.uri());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let now_ms = node.now_ms();
    if status == 401 || status == 403 {
        node.audit.auth_failure(address, status, now_ms).await;
    }
    let caller = match token.as_deref() {
        Some("") => Caller::Invalid,
        token => node.keys.caller(token),
    };
    let tenant = match &caller {
        Caller::Key(Principal::Tenant(own)) => own.clone(),
        // a scrape reads every tenant it may, whatever its query says
        Caller::Key(Principal::Admin) | Caller::Scrape if route == "/metrics" => {
            crate::audit::EVERY_TENANT.into()
        }
        Caller::Key(Principal::Admin) | Caller::Scrape => {
            named.unwrap_or_else(|| crate::audit::EVERY_TENANT.into())
        }
        // no tenant data without a key: nothing to record
        Caller::Anonymous | Caller::Invalid => return response,
    };
    let rows = response
        .extensions()
        .get::<AuditRows>()
        .map_or(0, |rows| rows.0);
    // an export is recorded as one (API.md §10)
    let exported = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/csv"));
    let action = if exported {
        format!("{action} (csv export)")
    } else {
        action
    };
    node.audit
        .record(AuditRecord {
            seq: 0,
            at_ms: now_ms,
            key: key_id(&caller, token.as_deref()),
            tenant,
            action,
            target,
            status,
            rows,
            large: false,
            address: address.map(|ip| ip.to_string()),
        })
        .await;
    response
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    tenant: Option<String>,
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

/// `GET /v1/audit?since=SEQ[&limit=N][&tenant=]`: an admin reads every
/// tenant's records (or one tenant's with `tenant`); a tenant key its own.
pub async fn list(
    State(node): State<Arc<Node>>,
    caller: Caller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Counted, ApiError> {
    let principal = caller.principal()?;
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let tenant = match (principal, query.tenant.as_deref()) {
        (Principal::Admin, None) => None,
        (principal, named) => Some(tenant_for_read(principal, named)?.to_string()),
    };
    let limit_max = node.config.audit.list_limit_max;
    let limit = query.limit.unwrap_or(limit_max);
    if limit == 0 || limit > limit_max {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {limit_max}"
        )));
    }
    let store = Arc::clone(&node.store);
    let since = query.since;
    // a tenant's records among many: a page looks at most at
    // audit.list_scan_max of them
    let scan_max = node.config.audit.list_scan_max.max(limit);
    let (records, next_since) = tokio::task::spawn_blocking(move || {
        read_since(&*store, since, tenant.as_deref(), limit, scan_max)
    })
    .await
    .ok()
    .and_then(Result::ok)
    .ok_or_else(|| ApiError::Unavailable {
        message: "the audit records could not be read; retry".into(),
        retry_after_s: node.config.server.retry_after_s,
    })?;
    Ok(Counted(
        records.len(),
        Json(json!({"records": records, "next_since": next_since})),
    ))
}
