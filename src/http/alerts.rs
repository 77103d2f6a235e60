//! Alert routes (API.md §7): the current states and rules, and the records
//! after a `since` (the same records the `alerts` topic pushes).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::alerting::RuleError;
use crate::auth::Caller;
use crate::config::RuleConfig;
use crate::node::Node;
use crate::storage::outbox::{read_since, Topic};

use super::audit::Counted;
use super::error::ApiError;
use super::query::begin_read;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    tenant: Option<String>,
    since: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/alerts`: pending and firing alerts with the tenant's rules; with
/// `since=SEQ`, the records after it, oldest first, at most `limit` (default
/// and most `live.replay_records_max`), and `next_since` to ask again with.
pub async fn list(
    State(node): State<Arc<Node>>,
    caller: Caller,
    query: Result<Query<AlertsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Counted, ApiError> {
    let (query, reader) = begin_read(&node, &caller, query, |q| q.tenant.as_deref())?;
    let tenant = reader.tenant().context.id.to_string();
    drop(reader);
    let alerts = node
        .alerts
        .get(&tenant)
        .ok_or_else(|| ApiError::NotFound(format!("unknown tenant {tenant}")))?;
    let Some(since) = query.since else {
        let rules: Vec<Value> = alerts
            .rules()
            .iter()
            .map(|rule| serde_json::to_value(rule).unwrap_or(Value::Null))
            .collect();
        let statuses = alerts.statuses(&tenant);
        return Ok(Counted(
            statuses.len(),
            Json(json!({
                "tenant": tenant,
                "alerts": statuses,
                "rules": rules,
                // where a client subscribing to the alerts topic after this starts
                "last_seq": alerts.last_seq(),
            })),
        ));
    };
    let (records, next_since) =
        records_since(&node, &tenant, Topic::Alerts, since, query.limit).await?;
    Ok(Counted(
        records.len(),
        Json(json!({
            "tenant": tenant,
            "records": records,
            "next_since": next_since,
        })),
    ))
}

/// A topic's records after `since`, oldest first, at most `limit` (default
/// and most `live.replay_records_max`), and the seq to ask again with. A
/// record that cannot be read keeps its place (`{"seq", "error"}`), so that
/// a client's `since` moves past it.
pub(super) async fn records_since(
    node: &Node,
    tenant: &str,
    topic: Topic,
    since: u64,
    limit: Option<usize>,
) -> Result<(Vec<Value>, u64), ApiError> {
    let limit_max = node.config.live.replay_records_max;
    let limit = limit.unwrap_or(limit_max);
    if limit == 0 || limit > limit_max {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {limit_max}"
        )));
    }
    let store = Arc::clone(&node.store);
    let record_bytes_max = node.config.storage.record_bytes_max;
    let reading = tenant.to_string();
    let entries = tokio::task::spawn_blocking(move || {
        read_since::<String>(&*store, &reading, topic, since, limit, record_bytes_max)
    })
    .await
    .map_err(|_| unavailable(node))?
    .map_err(|_| unavailable(node))?;
    let mut next_since = since;
    let mut records = Vec::with_capacity(entries.len());
    for (seq, record) in entries {
        next_since = seq;
        let record = record
            .ok()
            .and_then(|text| serde_json::from_str::<Map<String, Value>>(&text).ok());
        records.push(match record {
            Some(record) => Value::Object(record),
            // its place is kept, so that the client's since moves past it
            None => json!({"seq": seq, "error": "record cannot be read"}),
        });
    }
    Ok((records, next_since))
}

fn unavailable(node: &Node) -> ApiError {
    ApiError::Unavailable {
        message: "the records could not be read; retry".into(),
        retry_after_s: node.config.server.retry_after_s,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    tenant: Option<String>,
}

/// The tenant a caller may change: its own with a tenant key, the one it
/// names with an admin key (the same rule as reads).
pub(super) fn writing_tenant(
    node: &Node,
    caller: &Caller,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<String, ApiError> {
    let principal = caller.principal()?;
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let tenant = node.reading_tenant(principal, query.tenant.as_deref())?;
    Ok(tenant.context.id.to_string())
}

/// A JSON body, or `400` naming the field that does not parse.
pub(super) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let field = error.path().to_string();
        ApiError::Invalid(vec![(field, error.into_inner().to_string())])
    })
}

fn rule_error(node: &Node, error: RuleError) -> ApiError {
    match error {
        RuleError::FromConfig(_) | RuleError::TooMany(_) | RuleError::TooManyBudgets(_) => {
            ApiError::Conflict(error.to_string())
        }
        RuleError::NotFound(_) => ApiError::NotFound(error.to_string()),
        RuleError::BadBudget => ApiError::Invalid(vec![("amount".into(), error.to_string())]),
        RuleError::Storage(_) | RuleError::Encode(_) => ApiError::Unavailable {
            message: error.to_string(),
            retry_after_s: node.config.server.retry_after_s,
        },
    }
}

/// `GET /v1/alerts/{rule_id}`: the rule, where it comes from, and its pending
/// and firing alerts.
pub async fn get_rule(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path(rule_id): Path<String>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let tenant = writing_tenant(&node, &caller, query)?;
    let alerts = node
        .alerts
        .get(&tenant)
        .ok_or_else(|| ApiError::NotFound(format!("no alert rule {rule_id}")))?;
    let rule = alerts
        .rule(&rule_id)
        .ok_or_else(|| ApiError::NotFound(format!("no alert rule {rule_id}")))?;
    let statuses: Vec<_> = alerts
        .statuses(&tenant)
        .into_iter()
        .filter(|status| status.rule == rule_id)
        .collect();
    Ok(Json(json!({
        "tenant": tenant,
        "rule": rule,
        "source": if alerts.is_from_config(&rule_id) { "config" } else { "api" },
        "alerts": statuses,
    })))
}

/// `PUT /v1/alerts/{rule_id}`: creates (201) or replaces (200) a rule; a body
/// that does not check gets 400 with every problem by field.
pub async fn put_rule(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path(rule_id): Path<String>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let tenant = writing_tenant(&node, &caller, query)?;
    let config: RuleConfig = json_body(&body)?;
    let mut problems = Vec::new();
    if !config.id.is_empty() && config.id != rule_id {
        problems.push((
            "id".to_string(),
            "must be left out or equal the path's".to_string(),
        ));
    }
    if !config.tenants.is_empty() {
        problems.push((
            "tenants".to_string(),
            "is for config; the key names the tenant".to_string(),
        ));
    }
    let checked = crate::config::alerts::check_rule(&node.catalogue, "", &rule_id, &config);
    let rule = match checked {
        Ok(rule) if problems.is_empty() => rule,
        Ok(_) => return Err(ApiError::Invalid(problems)),
        Err(issues) => {
            problems.extend(issues.into_iter().map(|issue| (issue.path, issue.message)));
            return Err(ApiError::Invalid(problems));
        }
    };
    let new = crate::alerting::put_rule(&node, &tenant, rule.clone())
        .await
        .map_err(|error| rule_error(&node, error))?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({"tenant": tenant, "rule": rule}))))
}

/// `DELETE /v1/alerts/{rule_id}`: 204; its pending and firing alerts end
/// with a record.
pub async fn delete_rule(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path(rule_id): Path<String>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let tenant = writing_tenant(&node, &caller, query)?;
    crate::alerting::delete_rule(&node, &tenant, &rule_id)
        .await
        .map_err(|error| rule_error(&node, error))?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetBody {
    /// Integer minor units (money) in the metric's unit; a float is refused.
    amount: i64,
}

/// `PUT /v1/budgets/{dim}/{value}` with `{"amount": …}` in the metric's unit.
pub async fn put_budget(
    State(node): State<Arc<Node>>,
    caller: Caller,
    Path((dim, value)): Path<(String, String)>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let tenant = writing_tenant(&node, &caller, query)?;
    let budget: BudgetBody = json_body(&body)?;
    let bad =
        |text: &str| text.is_empty() || text.len() > 128 || text.chars().any(char::is_control);
    if bad(&dim) || bad(&value) {
        return Err(ApiError::Invalid(vec![(
            "path".into(),
            "dim and value must be 1 to 128 bytes of text".into(),
        )]));
    }
    crate::alerting::put_budget(&node, &tenant, &dim, &value, budget.amount)
        .await
        .map_err(|error| rule_error(&node, error))?;
    Ok(Json(
        json!({"tenant": tenant, "dim": dim, "value": value, "amount": budget.amount}),
    ))
}
