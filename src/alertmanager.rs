//! Hands alerts to Alertmanager (`alerting.alertmanager_url`,
//! docs/alerts.md "Alertmanager"): `POST /api/v2/alerts` with labels and
//! annotations. Each tenant's outbox is the source: records after a cursor
//! (kept in the store, moved only once Alertmanager took them) are sent as they
//! come, a firing alert with an `endsAt` some resends ahead and a resolved one
//! with the time it resolved; firing alerts are sent again every
//! `alerting.alertmanager_resend_s`, as Prometheus does, so that Alertmanager
//! keeps them while they fire and lets them go if the node disappears. When
//! Alertmanager is down, sending backs off and starts again where it stopped.
//! Owns: the cursor, the request shape, retries. Must not: decide states (the
//! engine does) or route, group or silence (Alertmanager does).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::domain::alert::{AlertRecord, Transition};
use crate::node::Node;
use crate::storage::outbox::{read_since, Topic};
use crate::storage::{read_value, Op, Space};

/// How many resend intervals ahead a firing alert's `endsAt` lies.
const ENDS_AFTER_RESENDS: i64 = 4;
/// Records sent in one request at most.
const RECORDS_PER_REQUEST_MAX: usize = 500;
/// The longest wait between attempts while Alertmanager is down.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// One alert as Alertmanager's API v2 takes it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PostableAlert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: String,
    pub ends_at: String,
}

fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn number(value: Option<f64>) -> String {
    value.map_or_else(|| "none".to_string(), |value| format!("{value}"))
}

/// Alertmanager's labels: `alertname` is the rule, then the record's own
/// (tenant, rule, severity, and the dim value with `by`).
fn alert_labels(record: &AlertRecord) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for (name, value) in &record.labels {
        labels.insert(label_name(name), value.clone());
    }
    labels.insert("alertname".to_string(), record.rule.clone());
    labels
}

/// A label name Alertmanager takes (`[a-zA-Z_][a-zA-Z0-9_]*`): other
/// characters become `_` (a dim named like a built-in label is `dim_<name>`
/// already, `alerting::labels`).
fn label_name(name: &str) -> String {
    let mut clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() || clean.starts_with(|c: char| c.is_ascii_digit()) {
        clean.insert(0, '_');
    }
    clean
}

fn annotations(record: &AlertRecord) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::new();
    let subject = match &record.dim_value {
        Some(value) => format!("{} ({value})", record.metric),
        None => record.metric.clone(),
    };
    annotations.insert(
        "summary".to_string(),
        format!(
            "{subject} {} over {}: {} against baseline {}, threshold {}",
            record.condition,
            record.window,
            number(record.value),
            number(record.baseline),
            number(record.threshold)
        ),
    );
    if let Some(runbook) = &record.runbook {
        annotations.insert("runbook_url".to_string(), runbook.clone());
    }
    annotations
}

/// The alert a record makes: firing until some resends ahead, or resolved at
/// its time. `None` for `pending` and `ok` (Alertmanager hears of firing
/// alerts only).
pub fn postable(
    record: &AlertRecord,
    starts_ms: i64,
    now_ms: i64,
    resend_ms: i64,
) -> Option<PostableAlert> {
    let ends_ms = match record.state {
        Transition::Firing => now_ms + ENDS_AFTER_RESENDS * resend_ms,
        Transition::Resolved => record.at_ms,
        Transition::Pending | Transition::Ok => return None,
    };
    Some(PostableAlert {
        labels: alert_labels(record),
        annotations: annotations(record),
        starts_at: rfc3339(starts_ms),
        ends_at: rfc3339(ends_ms),
    })
}

pub(crate) fn cursor_key(tenant: &str) -> Vec<u8> {
    let mut key = b"alertmanager/".to_vec();
    key.extend_from_slice(tenant.as_bytes());
    key
}

/// One tenant's place in its records, and the last firing record of each
/// alert (to send again while it fires).
#[derive(Default)]
struct TenantCursor {
    sent_seq: u64,
    firing: BTreeMap<(String, Option<String>), (i64, AlertRecord)>,
}

/// Where a tenant's sending stands: the last seq sent (stored), and what was
/// still firing then (its records say so).
async fn open_cursor(node: &Node, tenant: &str) -> TenantCursor {
    let key = cursor_key(tenant);
    let store = Arc::clone(&node.store);
    let sent_seq = tokio::task::spawn_blocking(move || read_value(&*store, Space::Meta, &key))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .and_then(|value| <[u8; 8]>::try_from(value.as_slice()).ok())
        .map_or(0, u64::from_be_bytes);
    let mut cursor = TenantCursor {
        sent_seq,
        firing: BTreeMap::new(),
    };
    let mut since = 0;
    while since < cursor.sent_seq {
        let page = records_after(node, tenant, since).await.unwrap_or_default();
        let Some((last, _)) = page.last() else { break };
        since = *last;
        for (seq, record) in page {
            if seq > cursor.sent_seq {
                break;
            }
            if let Some(record) = record {
                note(&mut cursor, record);
            }
        }
    }
    cursor
}

/// Sends every tenant's alerts to Alertmanager until the node stops.
pub async fn run(node: Arc<Node>, url: String) {
    let endpoint = format!("{}/api/v2/alerts", url.trim_end_matches('/'));
    let timeout = Duration::from_millis(node.config.alerting.alertmanager_timeout_ms);
    let resend_ms = node.config.alerting.alertmanager_resend_s as i64 * 1000;
    let client = match reqwest::Client::builder().timeout(timeout).build() {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build the alertmanager client; alerts are not sent");
            return;
        }
    };
    let mut stopping = node.stopping.subscribe();
    let mut cursors: BTreeMap<String, TenantCursor> = BTreeMap::new();
    for tenant in node.tenant_ids() {
        let cursor = open_cursor(&node, &tenant).await;
        cursors.insert(tenant, cursor);
    }
    let mut backoff = Duration::from_secs(1);
    let mut next_resend_ms = node.now_ms() + resend_ms;
    let tick = Duration::from_millis(node.config.alerting.tick_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stopping.wait_for(|stopping| *stopping) => return,
        }
        // tenants added and removed at run time
        let tenants = node.tenant_ids();
        cursors.retain(|tenant, _| tenants.contains(tenant));
        for tenant in tenants {
            if let std::collections::btree_map::Entry::Vacant(entry) = cursors.entry(tenant) {
                let cursor = open_cursor(&node, entry.key()).await;
                entry.insert(cursor);
            }
        }
        let now_ms = node.now_ms();
        let resend = now_ms >= next_resend_ms;
        let mut failed = false;
        for (tenant, cursor) in cursors.iter_mut() {
            match send_tenant(
                &node, &client, &endpoint, tenant, cursor, resend, now_ms, resend_ms,
            )
            .await
            {
                Ok(()) => {}
                Err(error) => {
                    tracing::warn!(%tenant, %error, retry_in_s = backoff.as_secs(), "alertmanager did not take the alerts; trying again");
                    failed = true;
                }
            }
        }
        if failed {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stopping.wait_for(|stopping| *stopping) => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        } else {
            backoff = Duration::from_secs(1);
            if resend {
                next_resend_ms = now_ms + resend_ms;
            }
        }
    }
}

/// Up to `RECORDS_PER_REQUEST_MAX` alert records of `tenant` after `since`,
/// read off the async threads; a record that does not decode is `None` in its
/// place.
async fn records_after(
    node: &Node,
    tenant: &str,
    since: u64,
) -> Result<Vec<(u64, Option<AlertRecord>)>, String> {
    let store = Arc::clone(&node.store);
    let tenant_id = tenant.to_string();
    let record_bytes_max = node.config.storage.record_bytes_max;
    let page = tokio::task::spawn_blocking(move || {
        read_since::<String>(
            &*store,
            &tenant_id,
            Topic::Alerts,
            since,
            RECORDS_PER_REQUEST_MAX,
            record_bytes_max,
        )
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok(page
        .into_iter()
        .map(|(seq, record)| {
            let record = record
                .ok()
                .and_then(|text| serde_json::from_str::<AlertRecord>(&text).ok());
            (seq, record)
        })
        .collect())
}

/// Keeps what a record says of its alert's firing.
fn note(cursor: &mut TenantCursor, record: AlertRecord) {
    let key = (record.rule.clone(), record.dim_value.clone());
    match record.state {
        Transition::Firing => {
            cursor.firing.insert(key, (record.at_ms, record));
        }
        Transition::Resolved | Transition::Ok => {
            cursor.firing.remove(&key);
        }
        Transition::Pending => {}
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_tenant(
    node: &Node,
    client: &reqwest::Client,
    endpoint: &str,
    tenant: &str,
    cursor: &mut TenantCursor,
    resend: bool,
    now_ms: i64,
    resend_ms: i64,
) -> Result<(), String> {
    let records = records_after(node, tenant, cursor.sent_seq).await?;
    let mut alerts = Vec::new();
    let mut last_seq = cursor.sent_seq;
    let mut noted = Vec::new();
    for (seq, record) in records {
        last_seq = seq;
        let Some(record) = record else {
            continue;
        };
        let key = (record.rule.clone(), record.dim_value.clone());
        let starts_ms = match record.state {
            Transition::Resolved => cursor.firing.get(&key).map_or(record.at_ms, |(at, _)| *at),
            _ => record.at_ms,
        };
        if let Some(alert) = postable(&record, starts_ms, now_ms, resend_ms) {
            alerts.push(alert);
        }
        noted.push(record);
    }
    if resend {
        // what this batch ended is not sent again as firing
        let mut firing = cursor.firing.clone();
        for record in &noted {
            let key = (record.rule.clone(), record.dim_value.clone());
            if matches!(record.state, Transition::Resolved | Transition::Ok) {
                firing.remove(&key);
            }
        }
        for (starts_ms, record) in firing.values() {
            if let Some(alert) = postable(record, *starts_ms, now_ms, resend_ms) {
                alerts.push(alert);
            }
        }
    }
    if !alerts.is_empty() {
        let response = client
            .post(endpoint)
            .json(&alerts)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            return Err(format!("{status}: {body}"));
        }
    }
    if last_seq != cursor.sent_seq {
        // Alertmanager has them: the cursor moves, durably
        node.committer
            .commit(vec![Op::Put {
                space: Space::Meta,
                key: cursor_key(tenant),
                value: last_seq.to_be_bytes().to_vec(),
            }])
            .await
            .map_err(|e| e.to_string())?;
        cursor.sent_seq = last_seq;
        for record in noted {
            note(cursor, record);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: Transition) -> AlertRecord {
        let mut labels = BTreeMap::new();
        labels.insert("tenant".to_string(), "demo".to_string());
        labels.insert("rule".to_string(), "gmv-drop".to_string());
        labels.insert("severity".to_string(), "P1".to_string());
        AlertRecord {
            seq: 2,
            rule: "gmv-drop".into(),
            state,
            labels,
            dim_value: None,
            metric: "gmv".into(),
            window: "15m".into(),
            condition: "drop_vs_prev".into(),
            value: Some(60_000.0),
            baseline: Some(100_000.0),
            threshold: Some(70_000.0),
            runbook: Some("https://runbooks.example/gmv-drop".into()),
            at_ms: 1_763_805_660_000,
        }
    }

    #[test]
    fn a_firing_record_ends_some_resends_ahead_and_a_resolved_one_when_it_resolved() {
        let firing = postable(
            &record(Transition::Firing),
            1_763_805_660_000,
            1_763_805_700_000,
            60_000,
        )
        .unwrap();
        assert_eq!(firing.labels["alertname"], "gmv-drop");
        assert_eq!(firing.labels["severity"], "P1");
        assert_eq!(firing.starts_at, "2025-11-22T10:01:00.000Z");
        assert_eq!(firing.ends_at, "2025-11-22T10:05:40.000Z");
        assert_eq!(
            firing.annotations["runbook_url"],
            "https://runbooks.example/gmv-drop"
        );
        assert_eq!(
            firing.annotations["summary"],
            "gmv drop_vs_prev over 15m: 60000 against baseline 100000, threshold 70000"
        );
        let resolved = postable(
            &record(Transition::Resolved),
            1_763_805_600_000,
            1_763_805_700_000,
            60_000,
        )
        .unwrap();
        assert_eq!(resolved.ends_at, "2025-11-22T10:01:00.000Z");
        assert!(postable(&record(Transition::Pending), 0, 0, 60_000).is_none());
        assert!(postable(&record(Transition::Ok), 0, 0, 60_000).is_none());
    }
}
