//! The alert engine (API.md §7, docs/alerts.md): judges every tenant's rules
//! on a tick through the read path, writes each transition to the outbox
//! (through the committer) before any live session hears of it, and keeps the
//! current states for `GET /v1/alerts` and `tally_alert_firing`.
//! Owns: the alerts' memory between ticks, its restoration from the outbox at
//! start, and the records' seq numbers.
//! Must not: decide a transition (`domain::alert` does) or read windows other
//! than through `read`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::watch;

use crate::domain::alert::{
    judge, step, AlertMemory, AlertRecord, AlertState, Condition, Judgement, Observation, Rule,
    Transition,
};
use crate::domain::time::{SlidingWindow, WindowName};
use crate::node::Node;
use crate::read::{MetricView, ReadError, TenantReader};
use crate::storage::envelope::{decode, encode, RecordKind};
use crate::storage::outbox::{append_op, read_since, Topic};
use crate::storage::{Op, Space, StorageError, Store};

/// One alert: a rule, and the dim value it watches when the rule has `by`.
pub type AlertKey = (String, Option<String>);

/// A tenant's alerts: its rules, what each alert remembers, and the last seq
/// written (live sessions watch it).
pub struct TenantAlerts {
    rules: Mutex<Vec<Rule>>,
    /// Ids of the rules from config: the API does not change them.
    config_rules: Vec<String>,
    /// Budgets by dim and value, in the metric's unit (`budget_used`).
    budgets: Mutex<BTreeMap<(String, String), i64>>,
    state: Mutex<AlertBook>,
    written: watch::Sender<u64>,
    /// One writer at a time: a tick, or a change of rules through the API.
    writing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct AlertBook {
    /// By rule, then by dim value: a tick walks each rule's alerts once.
    alerts: BTreeMap<String, BTreeMap<Option<String>, (AlertMemory, Judgement)>>,
    next_seq: u64,
}

/// An alert as `GET /v1/alerts` shows it: pending or firing.
#[derive(Debug, Clone, Serialize)]
pub struct AlertStatus {
    pub rule: String,
    pub labels: BTreeMap<String, String>,
    pub state: &'static str,
    /// When it became pending, or started firing (ms since the epoch).
    pub since: i64,
    pub value: Option<f64>,
    pub baseline: Option<f64>,
    pub threshold: Option<f64>,
}

impl TenantAlerts {
    /// The tenant's alerts with `rules`, their states read back from the
    /// outbox: the last record of each alert says where it is (a rule firing
    /// before a restart is still firing and writes no second `firing`).
    pub fn restore(
        store: &dyn Store,
        tenant: &str,
        rules: Vec<Rule>,
        budgets: Vec<((String, String), i64)>,
        now_ms: i64,
        record_bytes_max: usize,
    ) -> Result<TenantAlerts, StorageError> {
        let config_rules: Vec<String> = rules.iter().map(|rule| rule.id.clone()).collect();
        let mut rules = rules;
        let mut budgets: BTreeMap<(String, String), i64> = budgets.into_iter().collect();
        // rules and budgets set through the API, over the config's
        let prefix = crate::storage::tenant_prefix(tenant);
        let mut stored = Vec::new();
        store.scan(Space::Rules, &prefix, &mut |key, value| {
            if !key.starts_with(&prefix) {
                return false;
            }
            stored.push((key[prefix.len()..].to_vec(), value.to_vec()));
            true
        })?;
        for (name, value) in stored {
            let Ok(text) = decode::<String>(&value, RecordKind::Rule, record_bytes_max) else {
                tracing::warn!(%tenant, "an alert rule or budget cannot be read; skipped");
                continue;
            };
            if name.starts_with(MEMORY_PREFIX) {
                continue;
            }
            match name.strip_prefix(BUDGET_PREFIX) {
                Some(budget_key) => {
                    let budget_key = String::from_utf8_lossy(budget_key);
                    let (Some((dim, dim_value)), Ok(amount)) =
                        (budget_key.split_once('\0'), text.parse::<i64>())
                    else {
                        continue;
                    };
                    budgets.insert((dim.to_string(), dim_value.to_string()), amount);
                }
                None => match serde_json::from_str::<Rule>(&text) {
                    Ok(rule) if !config_rules.contains(&rule.id) => {
                        rules.retain(|other| other.id != rule.id);
                        rules.push(rule);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%tenant, %error, "an alert rule cannot be read; skipped")
                    }
                },
            }
        }
        let mut book = AlertBook {
            next_seq: 1,
            ..AlertBook::default()
        };
        let mut since = 0;
        loop {
            let page =
                read_since::<String>(store, tenant, Topic::Alerts, since, 4096, record_bytes_max)?;
            let Some((last, _)) = page.last() else { break };
            since = *last;
            for (seq, record) in page {
                book.next_seq = seq + 1;
                let Some(record) = record
                    .ok()
                    .and_then(|text| serde_json::from_str::<AlertRecord>(&text).ok())
                else {
                    continue;
                };
                let state = match record.state {
                    Transition::Pending => AlertState::Pending {
                        since_ms: record.at_ms,
                    },
                    Transition::Firing => AlertState::Firing {
                        since_ms: record.at_ms,
                    },
                    Transition::Resolved | Transition::Ok => AlertState::Ok,
                };
                let mut memory = AlertMemory::new(now_ms);
                memory.state = state;
                let judgement = Judgement {
                    breached: state != AlertState::Ok,
                    cleared: false,
                    value: record.value,
                    baseline: record.baseline,
                    threshold: record.threshold,
                };
                book.alerts
                    .entry(record.rule)
                    .or_default()
                    .insert(record.dim_value, (memory, judgement));
            }
        }
        // what the records do not say: zscore histories, absent's last event
        let memory_prefix = memory_key(tenant, "");
        let mut dumps = Vec::new();
        store.scan(Space::Rules, &memory_prefix, &mut |key, value| {
            if !key.starts_with(&memory_prefix) {
                return false;
            }
            dumps.push((key[memory_prefix.len()..].to_vec(), value.to_vec()));
            true
        })?;
        for (rule_id, value) in dumps {
            let rule_id = String::from_utf8_lossy(&rule_id).to_string();
            let dump = decode::<String>(&value, RecordKind::Rule, record_bytes_max)
                .ok()
                .and_then(|text| serde_json::from_str::<Vec<MemoryDump>>(&text).ok());
            let Some(dump) = dump else {
                tracing::warn!(%tenant, rule = %rule_id, "an alert memory cannot be read; it starts afresh");
                continue;
            };
            let by_key = book.alerts.entry(rule_id).or_default();
            for kept in dump {
                let (memory, _) = by_key
                    .entry(kept.key)
                    .or_insert_with(|| (AlertMemory::new(now_ms), Judgement::quiet()));
                // the silence before the stop counts, the time stopped does not
                let down_ms = (now_ms - kept.saved_ms.max(kept.last_seen_ms)).max(0);
                memory.last_seen_ms = (kept.last_seen_ms + down_ms).min(now_ms);
                memory.history = kept.history;
                memory.history_stats = None;
                memory.history_period = kept.history_period;
            }
        }
        let last_written = book.next_seq - 1;
        Ok(TenantAlerts {
            rules: Mutex::new(rules),
            config_rules,
            budgets: Mutex::new(budgets),
            state: Mutex::new(book),
            written: watch::channel(last_written).0,
            writing: tokio::sync::Mutex::new(()),
        })
    }

    pub fn is_from_config(&self, rule_id: &str) -> bool {
        self.config_rules.iter().any(|id| id == rule_id)
    }

    pub fn rule(&self, rule_id: &str) -> Option<Rule> {
        lock(&self.rules)
            .iter()
            .find(|rule| rule.id == rule_id)
            .cloned()
    }

    /// The budget of a dim value, if one is set.
    pub fn budget(&self, dim: &str, value: &str) -> Option<i64> {
        lock(&self.budgets)
            .get(&(dim.to_string(), value.to_string()))
            .copied()
    }

    pub fn rules(&self) -> Vec<Rule> {
        lock(&self.rules).clone()
    }

    /// The seq of the last record written.
    pub fn last_seq(&self) -> u64 {
        *self.written.borrow()
    }

    /// The seq of the last record written, to watch.
    pub fn written(&self) -> watch::Receiver<u64> {
        self.written.subscribe()
    }

    /// Pending and firing alerts, by rule and dim value.
    pub fn statuses(&self, tenant: &str) -> Vec<AlertStatus> {
        let rules = self.rules();
        let book = lock(&self.state);
        let mut statuses = Vec::new();
        let each = book.alerts.iter().flat_map(|(rule_id, by_key)| {
            by_key.iter().map(move |(key, alert)| (rule_id, key, alert))
        });
        for (rule_id, key, (memory, judgement)) in each {
            let (state, since) = match memory.state {
                AlertState::Ok => continue,
                AlertState::Pending { since_ms } => ("pending", since_ms),
                AlertState::Firing { since_ms } => ("firing", since_ms),
            };
            let rule = rules.iter().find(|rule| &rule.id == rule_id);
            statuses.push(AlertStatus {
                rule: rule_id.clone(),
                labels: labels(tenant, rule_id, rule, key.as_deref()),
                state,
                since,
                value: judgement.value,
                baseline: judgement.baseline,
                threshold: judgement.threshold,
            });
        }
        statuses
    }
}

/// What an alert keeps between ticks that its records do not say, stored
/// every `storage.snapshot_interval_s` and when the node stops.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct MemoryDump {
    key: Option<String>,
    /// When it was stored: the time the node was down is no silence.
    #[serde(default)]
    saved_ms: i64,
    last_seen_ms: i64,
    history: std::collections::VecDeque<f64>,
    history_period: Option<i64>,
}

/// Alert memories are kept in the rules' space under this prefix.
const MEMORY_PREFIX: &[u8] = b"\x02memory\0";

fn memory_key(tenant: &str, rule_id: &str) -> Vec<u8> {
    let mut key = crate::storage::tenant_prefix(tenant);
    key.extend_from_slice(MEMORY_PREFIX);
    key.extend_from_slice(rule_id.as_bytes());
    key
}

/// Stores the memory of every `zscore` and `absent` rule of a tenant.
pub async fn save_memories(
    node: &Node,
    tenant: &str,
    alerts: &TenantAlerts,
) -> Result<(), RuleError> {
    let _one_writer = alerts.writing.lock().await;
    let rules = alerts.rules();
    let saved_ms = node.now_ms();
    let mut ops = Vec::new();
    {
        let book = lock(&alerts.state);
        for rule in &rules {
            let remembers = matches!(
                rule.condition,
                Condition::Zscore { .. } | Condition::Absent {}
            );
            let Some(by_key) = book.alerts.get(&rule.id).filter(|_| remembers) else {
                // nothing to keep: no older memory may come back either
                ops.push(Op::Remove {
                    space: Space::Rules,
                    key: memory_key(tenant, &rule.id),
                });
                continue;
            };
            let dump: Vec<MemoryDump> = by_key
                .iter()
                .map(|(key, (memory, _))| MemoryDump {
                    key: key.clone(),
                    saved_ms,
                    last_seen_ms: memory.last_seen_ms,
                    history: memory.history.clone(),
                    history_period: memory.history_period,
                })
                .collect();
            let text =
                serde_json::to_string(&dump).map_err(|e| RuleError::Encode(e.to_string()))?;
            match crate::storage::envelope::encode_within(
                RecordKind::Rule,
                &text,
                node.config.storage.record_bytes_max,
            ) {
                Ok(value) => ops.push(Op::Put {
                    space: Space::Rules,
                    key: memory_key(tenant, &rule.id),
                    value,
                }),
                Err(error) => {
                    tracing::warn!(%tenant, rule = %rule.id, %error, "an alert memory is too large to keep; it starts afresh after a restart");
                    ops.push(Op::Remove {
                        space: Space::Rules,
                        key: memory_key(tenant, &rule.id),
                    });
                }
            }
        }
    }
    if !ops.is_empty() {
        node.committer.commit(ops).await?;
    }
    Ok(())
}

/// Budgets are kept in the rules' space under this prefix (no rule id has it:
/// ids are `[a-z0-9_-]`).
const BUDGET_PREFIX: &[u8] = b"\x01budget\0";

fn budget_key(tenant: &str, dim: &str, value: &str) -> Vec<u8> {
    let mut key = crate::storage::tenant_prefix(tenant);
    key.extend_from_slice(BUDGET_PREFIX);
    key.extend_from_slice(dim.as_bytes());
    key.push(0);
    key.extend_from_slice(value.as_bytes());
    key
}

/// Why a change of rules or budgets was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("rule {0} comes from config; change it there")]
    FromConfig(String),
    #[error("no alert rule {0}")]
    NotFound(String),
    #[error("the tenant has {0} rules, alerting.rules_per_tenant_max")]
    TooMany(usize),
    #[error("the budget must be an integer of minor units from 1 to 10^15")]
    BadBudget,
    #[error("the tenant has {0} budgets, alerting.budgets_per_tenant_max")]
    TooManyBudgets(usize),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// Sets a rule through the API (persisted before it applies); true when it
/// is new. A changed rule keeps its alerts' states and is judged anew at the
/// next tick.
pub async fn put_rule(node: &Node, tenant: &str, rule: Rule) -> Result<bool, RuleError> {
    let Some(alerts) = node.alerts.get(tenant) else {
        return Err(RuleError::NotFound(rule.id));
    };
    if alerts.is_from_config(&rule.id) {
        return Err(RuleError::FromConfig(rule.id));
    }
    let _one_writer = alerts.writing.lock().await;
    let rules_max = node.config.alerting.rules_per_tenant_max;
    let new = alerts.rule(&rule.id).is_none();
    if new && alerts.rules().len() >= rules_max {
        return Err(RuleError::TooMany(rules_max));
    }
    let text = serde_json::to_string(&rule).map_err(|e| RuleError::Encode(e.to_string()))?;
    let value = encode(RecordKind::Rule, &text).map_err(|e| RuleError::Encode(e.to_string()))?;
    let mut ops = vec![Op::Put {
        space: Space::Rules,
        key: crate::storage::named_key(tenant, &rule.id),
        value,
    }];
    // a rule that watches something else now: its alerts end and its memory
    // (histories, last events) starts afresh
    let old = alerts.rule(&rule.id);
    let watches_else = old.as_ref().is_some_and(|old| {
        old.metric != rule.metric
            || old.window != rule.window
            || old.by != rule.by
            || old.condition.name() != rule.condition.name()
    });
    let first_seq = lock(&alerts.state).next_seq;
    let mut last_seq = None;
    if watches_else {
        let ended = lock(&alerts.state)
            .alerts
            .get(&rule.id)
            .map(|by_key| ending(&rule.id, by_key))
            .unwrap_or_default();
        let (record_writes, last) =
            record_ops(tenant, &alerts, old.as_slice(), ended, node.now_ms())
                .map_err(|e| RuleError::Encode(e.to_string()))?;
        ops.extend(record_writes);
        ops.push(Op::Remove {
            space: Space::Rules,
            key: memory_key(tenant, &rule.id),
        });
        last_seq = last;
    }
    if let Err(error) = node.committer.commit(ops).await {
        lock(&alerts.state).next_seq = first_seq;
        return Err(error.into());
    }
    if watches_else {
        lock(&alerts.state).alerts.remove(&rule.id);
    }
    if let Some(seq) = last_seq {
        alerts.written.send_replace(seq);
    }
    if let Some(old) = old.filter(|old| old.severity != rule.severity || watches_else) {
        crate::telemetry::set_alert_firing(tenant, &old.id, &old.severity, 0);
    }
    let mut rules = lock(&alerts.rules);
    rules.retain(|other| other.id != rule.id);
    rules.push(rule);
    Ok(new)
}

/// Deletes a rule set through the API; its pending and firing alerts end with
/// a `resolved` (or `ok`) record, written with the removal.
pub async fn delete_rule(node: &Node, tenant: &str, rule_id: &str) -> Result<(), RuleError> {
    let Some(alerts) = node.alerts.get(tenant) else {
        return Err(RuleError::NotFound(rule_id.to_string()));
    };
    if alerts.is_from_config(rule_id) {
        return Err(RuleError::FromConfig(rule_id.to_string()));
    }
    let _one_writer = alerts.writing.lock().await;
    let Some(rule) = alerts.rule(rule_id) else {
        return Err(RuleError::NotFound(rule_id.to_string()));
    };
    let now_ms = node.now_ms();
    let ended: Vec<(AlertKey, Transition, Judgement)> = {
        let book = lock(&alerts.state);
        book.alerts
            .get(rule_id)
            .map(|by_key| ending(rule_id, by_key))
            .unwrap_or_default()
    };
    let first_seq = lock(&alerts.state).next_seq;
    let (mut ops, last_seq) =
        record_ops(tenant, &alerts, std::slice::from_ref(&rule), ended, now_ms)
            .map_err(|e| RuleError::Encode(e.to_string()))?;
    ops.push(Op::Remove {
        space: Space::Rules,
        key: crate::storage::named_key(tenant, rule_id),
    });
    // its stored memory goes too (a rule of the same id later starts afresh)
    ops.push(Op::Remove {
        space: Space::Rules,
        key: memory_key(tenant, rule_id),
    });
    if let Err(error) = node.committer.commit(ops).await {
        lock(&alerts.state).next_seq = first_seq;
        return Err(error.into());
    }
    lock(&alerts.rules).retain(|other| other.id != rule_id);
    lock(&alerts.state).alerts.remove(rule_id);
    if let Some(seq) = last_seq {
        alerts.written.send_replace(seq);
    }
    crate::telemetry::set_alert_firing(tenant, rule_id, &rule.severity, 0);
    Ok(())
}

/// Sets the budget of a dim value (persisted before it applies).
pub async fn put_budget(
    node: &Node,
    tenant: &str,
    dim: &str,
    value: &str,
    amount: i64,
) -> Result<(), RuleError> {
    let Some(alerts) = node.alerts.get(tenant) else {
        return Err(RuleError::NotFound(format!("tenant {tenant}")));
    };
    if !(1..=crate::domain::event::AMOUNT_ABS_MAX).contains(&amount) {
        return Err(RuleError::BadBudget);
    }
    let _one_writer = alerts.writing.lock().await;
    let budgets_max = node.config.alerting.budgets_per_tenant_max;
    {
        let budgets = lock(&alerts.budgets);
        let new = !budgets.contains_key(&(dim.to_string(), value.to_string()));
        if new && budgets.len() >= budgets_max {
            return Err(RuleError::TooManyBudgets(budgets_max));
        }
    }
    let stored = encode(RecordKind::Rule, &amount.to_string())
        .map_err(|e| RuleError::Encode(e.to_string()))?;
    node.committer
        .commit(vec![Op::Put {
            space: Space::Rules,
            key: budget_key(tenant, dim, value),
            value: stored,
        }])
        .await?;
    lock(&alerts.budgets).insert((dim.to_string(), value.to_string()), amount);
    Ok(())
}

/// The records of `transitions` with their seqs (taken from the book), as
/// writes; and the last seq.
fn record_ops(
    tenant_id: &str,
    alerts: &TenantAlerts,
    rules: &[Rule],
    transitions: Vec<(AlertKey, Transition, Judgement)>,
    now_ms: i64,
) -> Result<(Vec<Op>, Option<u64>), EvaluateError> {
    let mut ops = Vec::with_capacity(transitions.len());
    let mut last_seq = None;
    let mut book = lock(&alerts.state);
    for ((rule_id, key), transition, judgement) in transitions {
        let rule = rules.iter().find(|rule| rule.id == rule_id);
        let seq = book.next_seq;
        book.next_seq += 1;
        let record = AlertRecord {
            seq,
            rule: rule_id.clone(),
            state: transition,
            labels: labels(tenant_id, &rule_id, rule, key.as_deref()),
            dim_value: key,
            metric: rule.map(|rule| rule.metric.clone()).unwrap_or_default(),
            window: rule
                .map(|rule| rule.window.name().to_string())
                .unwrap_or_default(),
            condition: rule
                .map(|rule| rule.condition.name().to_string())
                .unwrap_or_default(),
            value: judgement.value,
            baseline: judgement.baseline,
            threshold: judgement.threshold,
            runbook: rule.and_then(|rule| rule.runbook.clone()),
            at_ms: now_ms,
        };
        let text =
            serde_json::to_string(&record).map_err(|e| EvaluateError::Encode(e.to_string()))?;
        ops.push(
            append_op(tenant_id, Topic::Alerts, seq, &text)
                .map_err(|e| EvaluateError::Encode(e.to_string()))?,
        );
        last_seq = Some(seq);
    }
    Ok((ops, last_seq))
}

/// A lock whose holder cannot leave it half-changed (no code between lock
/// and unlock panics on input); a poisoned one is used as it is.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn labels(
    tenant: &str,
    rule_id: &str,
    rule: Option<&Rule>,
    key: Option<&str>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    labels.insert("tenant".to_string(), tenant.to_string());
    labels.insert("rule".to_string(), rule_id.to_string());
    if let Some(rule) = rule {
        labels.insert("severity".to_string(), rule.severity.clone());
        if let (Some(dim), Some(value)) = (&rule.by, key) {
            // a dim named like a built-in label does not replace it
            let name = if ["tenant", "rule", "severity", "alertname"].contains(&dim.as_str()) {
                format!("dim_{dim}")
            } else {
                dim.clone()
            };
            labels.insert(name, value.to_string());
        }
    }
    labels
}

/// The node's alerts, by tenant.
/// Each tenant's alert rules and states.
pub type AlertHub = crate::registry::TenantMap<TenantAlerts>;

const RECENT: WindowName = WindowName::Sliding(SlidingWindow::Sec30);

fn observe(view: &MetricView, window: WindowName) -> Observation {
    let mut observation = Observation::default();
    if let Some(window) = view.window(window) {
        observation.value = window.value();
        observation.prev = window.prev_value();
        observation.events = window.events();
        observation.prev_events = window.prev_events();
    }
    if let Some(recent) = view.window(RECENT) {
        observation.recent_events = recent.events();
    }
    observation
}

/// A view of a metric's total (no key) or of one value of a dim.
type KeyedView = (Option<String>, MetricView);

/// A metric's views now, in every window: its total, or by each value of a
/// dim (as many as the breakdown holds: `windows.max_series_per_metric` and
/// `__other__`).
async fn views(
    reader: &TenantReader,
    metric: &str,
    by: Option<&str>,
    now_ms: i64,
) -> Result<Vec<KeyedView>, ReadError> {
    let index = reader.metric_index(metric)?;
    Ok(match by {
        None => vec![(None, reader.metric(index, &WindowName::ALL, now_ms).await?)],
        Some(dim) => reader
            .breakdown(index, dim, &WindowName::ALL, now_ms)
            .await?
            .into_iter()
            .map(|(value, view)| (Some(value), view))
            .collect(),
    })
}

/// Judges every rule of one tenant once; writes and announces what moved.
/// A tenant with rules or alerts: the others have nothing to judge or save.
fn has_rules_or_alerts(alerts: &TenantAlerts) -> bool {
    !lock(&alerts.rules).is_empty() || !lock(&alerts.state).alerts.is_empty()
}

pub async fn evaluate_tenant(
    node: &Node,
    tenant_id: &str,
    alerts: &TenantAlerts,
) -> Result<usize, EvaluateError> {
    let Some(handle) = node.tenant(tenant_id) else {
        return Ok(0);
    };
    // a tenant without rules (most, where tenants are many) costs nothing
    if lock(&alerts.rules).is_empty() && lock(&alerts.state).alerts.is_empty() {
        return Ok(0);
    }
    let _one_writer = alerts.writing.lock().await;
    let reader = TenantReader::begin(&handle)?;
    let now_ms = node.now_ms();
    let rules = alerts.rules();
    // each metric (and breakdown) is read once a tick, whatever its rules
    let mut read: HashMap<(String, Option<String>), Vec<KeyedView>> = HashMap::new();
    let mut observed = Vec::with_capacity(rules.len());
    for rule in &rules {
        let source = (rule.metric.clone(), rule.by.clone());
        if !read.contains_key(&source) {
            let shown = match views(&reader, &rule.metric, rule.by.as_deref(), now_ms).await {
                Ok(shown) => shown,
                // a busy or stopped tenant is judged at a later tick
                Err(error @ (ReadError::Busy(_) | ReadError::NotServing { .. })) => {
                    return Err(error.into())
                }
                // a rule the catalogue no longer allows (a metric or dim gone
                // from config): that rule only is not judged
                Err(error) => {
                    tracing::warn!(tenant = %tenant_id, rule = %rule.id, %error, "alert rule not judged");
                    Vec::new()
                }
            };
            read.insert(source.clone(), shown);
        }
        let shown = read.get(&source).map(Vec::as_slice).unwrap_or_default();
        observed.push(
            shown
                .iter()
                .map(|(key, view)| (key.clone(), observe(view, rule.window)))
                .collect::<Vec<_>>(),
        );
    }
    drop(reader);
    let mut records = Vec::new();
    // the states before this tick of the alerts that moved, to put back if
    // their records cannot be written
    let mut moved: Vec<(AlertKey, AlertState)> = Vec::new();
    let mut firing: Vec<(String, String, usize)> = Vec::with_capacity(rules.len());
    {
        let mut book = lock(&alerts.state);
        // alerts of rules that are gone (from config, at a restart) end
        let gone: Vec<String> = book
            .alerts
            .keys()
            .filter(|id| !rules.iter().any(|rule| &rule.id == *id))
            .cloned()
            .collect();
        for rule_id in gone {
            if let Some(by_key) = book.alerts.remove(&rule_id) {
                records.extend(ending(&rule_id, &by_key));
            }
        }
        for (rule, observations) in rules.iter().zip(observed) {
            let window_ms = crate::config::alerts::window_ms(rule.window);
            let by_key = book.alerts.entry(rule.id.clone()).or_default();
            let absent = matches!(rule.condition, Condition::Absent {});
            // values left from earlier ticks show as more alerts than values
            // now (a value gone this tick is found at the next): only then are
            // the values seen kept track of
            let tracking = absent || by_key.len() > observations.len();
            let mut seen = std::collections::HashSet::new();
            for (key, observation) in observations {
                let budget = match (&rule.by, &key) {
                    (Some(dim), Some(value)) => alerts.budget(dim, value),
                    _ => None,
                };
                if tracking {
                    seen.insert(key.clone());
                }
                let (memory, last) = match by_key.get_mut(&key) {
                    Some(alert) => alert,
                    None => by_key
                        .entry(key.clone())
                        .or_insert_with(|| (AlertMemory::new(now_ms), Judgement::quiet())),
                };
                let judgement = judge(rule, &observation, budget, memory, window_ms, now_ms);
                let before = memory.state;
                if let Some(transition) = step(rule, &judgement, memory, now_ms) {
                    moved.push(((rule.id.clone(), key.clone()), before));
                    records.push(((rule.id.clone(), key), transition, judgement.clone()));
                }
                *last = judgement;
            }
            // a dim value gone from every window has gone silent
            if absent {
                for (key, (memory, last)) in by_key.iter_mut() {
                    if seen.contains(key) {
                        continue;
                    }
                    let quiet = Observation::default();
                    let judgement = judge(rule, &quiet, None, memory, window_ms, now_ms);
                    let before = memory.state;
                    if let Some(transition) = step(rule, &judgement, memory, now_ms) {
                        moved.push(((rule.id.clone(), key.clone()), before));
                        records.push((
                            (rule.id.clone(), key.clone()),
                            transition,
                            judgement.clone(),
                        ));
                    }
                    *last = judgement;
                }
            } else if tracking {
                // a value gone from every window that is not pending or
                // firing has nothing left to judge: its memory goes, so that
                // values that come and go do not pile up
                by_key.retain(|key, (memory, _)| {
                    seen.contains(key) || memory.state != AlertState::Ok
                });
            }
            let count = by_key
                .values()
                .filter(|(memory, _)| matches!(memory.state, AlertState::Firing { .. }))
                .count();
            firing.push((rule.id.clone(), rule.severity.clone(), count));
        }
    }
    let written = records.len();
    if !records.is_empty() {
        let first_seq = lock(&alerts.state).next_seq;
        let (ops, last_seq) = record_ops(tenant_id, alerts, &rules, records, now_ms)?;
        // durable before anyone hears of it; if it cannot be written, the
        // alerts go back to where they were and the next tick tries again
        if let Err(error) = node.committer.commit(ops).await {
            let mut book = lock(&alerts.state);
            book.next_seq = first_seq;
            for ((rule_id, key), before) in moved {
                if let Some((memory, _)) = book
                    .alerts
                    .get_mut(&rule_id)
                    .and_then(|by_key| by_key.get_mut(&key))
                {
                    memory.state = before;
                }
            }
            return Err(error.into());
        }
        if let Some(seq) = last_seq {
            alerts.written.send_replace(seq);
        }
    }
    for (rule, severity, count) in firing {
        crate::telemetry::set_alert_firing(tenant_id, &rule, &severity, count);
    }
    Ok(written)
}

/// The records that end a rule's pending and firing alerts (its rule is gone
/// or changed what it watches).
fn ending(
    rule_id: &str,
    by_key: &BTreeMap<Option<String>, (AlertMemory, Judgement)>,
) -> Vec<(AlertKey, Transition, Judgement)> {
    by_key
        .iter()
        .filter_map(|(key, (memory, last))| {
            let transition = match memory.state {
                AlertState::Ok => return None,
                AlertState::Pending { .. } => Transition::Ok,
                AlertState::Firing { .. } => Transition::Resolved,
            };
            Some(((rule_id.to_string(), key.clone()), transition, last.clone()))
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("an alert record cannot be encoded: {0}")]
    Encode(String),
}

async fn save_all(node: &Node) {
    if node.committer.is_failed() {
        return;
    }
    for (tenant_id, alerts) in &node.alerts.list_where(has_rules_or_alerts) {
        if let Err(error) = save_memories(node, tenant_id, alerts).await {
            tracing::warn!(tenant = %tenant_id, %error, "alert memories not stored");
        }
    }
}

/// Judges every tenant's rules every `alerting.tick_ms` until the node stops,
/// and stores their memories every `storage.snapshot_interval_s` and at the
/// end.
pub async fn run(node: Arc<Node>) {
    let mut stopping = node.stopping.subscribe();
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(
        node.config.alerting.tick_ms,
    ));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut saves = tokio::time::interval(std::time::Duration::from_secs(
        node.config.storage.snapshot_interval_s,
    ));
    saves.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // the first tick of an interval is at once: nothing to save yet
    saves.tick().await;
    loop {
        enum Wake {
            Tick,
            Save,
            Stop,
        }
        let wake = tokio::select! {
            _ = ticks.tick() => Wake::Tick,
            _ = saves.tick() => Wake::Save,
            _ = stopping.wait_for(|stopping| *stopping) => Wake::Stop,
        };
        if node.committer.is_failed() {
            return;
        }
        match wake {
            Wake::Stop => {
                save_all(&node).await;
                return;
            }
            Wake::Save => {
                save_all(&node).await;
                continue;
            }
            Wake::Tick => {}
        }
        for (tenant_id, alerts) in &node.alerts.list_where(has_rules_or_alerts) {
            match evaluate_tenant(&node, tenant_id, alerts).await {
                Ok(_) => {}
                // a busy tenant is judged at the next tick
                Err(EvaluateError::Read(ReadError::Busy(_))) => {}
                Err(error) => {
                    tracing::warn!(tenant = %tenant_id, %error, "alert rules not evaluated");
                }
            }
        }
    }
}
