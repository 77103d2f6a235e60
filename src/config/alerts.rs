//! `[alerting]` and `[[alerts]]`: how often rules are judged, the limits on
//! rules, and the rules the tenants start with (API.md §7, docs/alerts.md).
//! `check_rule` is the one check of a rule, for config and the API alike;
//! every problem names its field.

use std::collections::HashSet;

use serde::Deserialize;

use crate::domain::alert::{Condition, Rule};
use crate::domain::catalogue::{Catalogue, MetricKind};
use crate::domain::time::WindowName;

use super::{is_identifier, issue, ConfigIssue};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertingConfig {
    /// Milliseconds between evaluations of every rule.
    pub tick_ms: u64,
    /// Rules one tenant may have (config and API together).
    pub rules_per_tenant_max: usize,
    /// Budgets one tenant may have (config and API together).
    pub budgets_per_tenant_max: usize,
    /// Alertmanager's base URL (`http://host:9093`); empty: none.
    pub alertmanager_url: String,
    /// Seconds between sends of the alerts still firing.
    pub alertmanager_resend_s: u64,
    /// How long one request to Alertmanager may take, in milliseconds.
    pub alertmanager_timeout_ms: u64,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        AlertingConfig {
            tick_ms: 1_000,
            rules_per_tenant_max: 1_000,
            budgets_per_tenant_max: 10_000,
            alertmanager_url: String::new(),
            alertmanager_resend_s: 60,
            alertmanager_timeout_ms: 5_000,
        }
    }
}

/// `[experiments]`: how often guardrails are judged and how many experiments
/// a tenant may have (API.md §8, docs/experiments.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExperimentsConfig {
    /// Milliseconds between looks at every running experiment.
    pub tick_ms: u64,
    /// Experiments one tenant may have, whatever their state.
    pub per_tenant_max: usize,
}

impl Default for ExperimentsConfig {
    fn default() -> Self {
        ExperimentsConfig {
            tick_ms: 1_000,
            per_tenant_max: 100,
        }
    }
}

/// A rule as written in config or sent to `PUT /v1/alerts/{rule_id}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// In config only (the API takes it from the path).
    #[serde(default)]
    pub id: String,
    /// In config only: the tenants the rule is for (empty: every tenant).
    #[serde(default)]
    pub tenants: Vec<String>,
    pub metric: String,
    pub window: String,
    pub condition: Condition,
    #[serde(default)]
    pub by: Option<String>,
    #[serde(default)]
    pub min_count: u64,
    #[serde(default)]
    pub for_s: i64,
    #[serde(default = "default_severity")]
    pub severity: String,
    #[serde(default)]
    pub runbook: Option<String>,
}

/// A budget as written in config (`[[budgets]]`); the API sets them with
/// `PUT /v1/budgets/{dim}/{value}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// The tenants it is for (empty: every tenant).
    #[serde(default)]
    pub tenants: Vec<String>,
    pub dim: String,
    pub value: String,
    /// In the metric's unit: integer minor units for money.
    pub amount: i64,
}

/// The config's budgets, each with the tenants it is for.
pub fn check_budgets(
    budgets: &[BudgetConfig],
    tenant_ids: &HashSet<&str>,
    issues: &mut Vec<ConfigIssue>,
) -> Vec<(Vec<String>, (String, String), i64)> {
    let mut checked = Vec::with_capacity(budgets.len());
    for (index, budget) in budgets.iter().enumerate() {
        let at = format!("budgets[{index}]");
        let mut fine = true;
        for (t, tenant) in budget.tenants.iter().enumerate() {
            if !tenant_ids.contains(tenant.as_str()) {
                issues.push(issue(
                    format!("{at}.tenants[{t}]"),
                    format!("unknown tenant {tenant:?}"),
                ));
                fine = false;
            }
        }
        if budget.dim.is_empty() || budget.value.is_empty() {
            issues.push(issue(
                format!("{at}.dim"),
                "dim and value must not be empty",
            ));
            fine = false;
        }
        if !(1..=crate::domain::event::AMOUNT_ABS_MAX).contains(&budget.amount) {
            issues.push(issue(
                format!("{at}.amount"),
                "must be an integer of minor units from 1 to 10^15",
            ));
            fine = false;
        }
        if fine {
            checked.push((
                budget.tenants.clone(),
                (budget.dim.clone(), budget.value.clone()),
                budget.amount,
            ));
        }
    }
    checked
}

fn default_severity() -> String {
    "warning".into()
}

/// The longest silence or hold a rule may ask for: a day.
const FOR_S_MAX: i64 = 86_400;
/// Events in the last 30 seconds tell `absent` that events still come.
const ABSENT_FOR_S_MIN: i64 = 30;

/// Checks one rule against the catalogue; every problem with its field
/// under `at` (e.g. `alerts[2]`, or empty for an API body).
pub fn check_rule(
    catalogue: &Catalogue,
    at: &str,
    id: &str,
    rule: &RuleConfig,
) -> Result<Rule, Vec<ConfigIssue>> {
    let field = |name: &str| {
        if at.is_empty() {
            name.to_string()
        } else {
            format!("{at}.{name}")
        }
    };
    let mut issues = Vec::new();
    if !is_identifier(id, 64) {
        issues.push(issue(field("id"), "must match [a-z0-9_-]{1,64}"));
    }
    let metric = catalogue
        .index_of(&rule.metric)
        .map(|index| &catalogue.metrics()[index]);
    if metric.is_none() {
        issues.push(issue(
            field("metric"),
            format!("unknown metric {:?}", rule.metric),
        ));
    }
    let window = WindowName::parse(&rule.window);
    if window.is_none() {
        issues.push(issue(field("window"), "must be one of 30s, 15m, today"));
    }
    if let Some((name, message)) = rule.condition.problem() {
        issues.push(issue(field(name), message));
    }
    if let (Some(index), Some(by)) = (catalogue.index_of(&rule.metric), &rule.by) {
        if !catalogue.breakdown_dims(index).contains(by) {
            issues.push(issue(
                field("by"),
                format!("metric {} has no breakdown by {by:?}", rule.metric),
            ));
        }
    }
    if !(0..=FOR_S_MAX).contains(&rule.for_s) {
        issues.push(issue(
            field("for_s"),
            format!("must be within 0..={FOR_S_MAX}"),
        ));
    }
    match &rule.condition {
        Condition::Absent {} if rule.for_s < ABSENT_FOR_S_MIN => issues.push(issue(
            field("for_s"),
            format!("absent needs at least {ABSENT_FOR_S_MIN} seconds of silence"),
        )),
        Condition::DropVsPrev { .. } | Condition::RiseVsPrev { .. }
            if window == Some(WindowName::Today) =>
        {
            issues.push(issue(
                field("window"),
                "today has no window before it: use 30s or 15m",
            ))
        }
        Condition::BudgetUsed { .. } => {
            if metric.is_some_and(|metric| !matches!(metric.kind, MetricKind::Sum { .. })) {
                issues.push(issue(field("metric"), "budget_used needs a sum metric"));
            }
            if rule.by.is_none() {
                issues.push(issue(
                    field("by"),
                    "budget_used needs by: budgets are per dim value",
                ));
            }
        }
        Condition::Zscore { .. } if window == Some(WindowName::Today) => issues.push(issue(
            field("window"),
            "zscore compares windows of one length: use 30s or 15m",
        )),
        // a histogram's value is its p95, which has no window before it
        Condition::DropVsPrev { .. } | Condition::RiseVsPrev { .. } | Condition::Zscore { .. }
            if metric.is_some_and(|metric| matches!(metric.kind, MetricKind::Histogram)) =>
        {
            issues.push(issue(
                field("condition.type"),
                "a histogram's p95 has no window before it: use above or below",
            ))
        }
        _ => {}
    }
    if rule.severity.is_empty()
        || rule.severity.len() > 32
        || rule.severity.chars().any(char::is_control)
    {
        issues.push(issue(field("severity"), "must be 1 to 32 bytes of text"));
    }
    if rule
        .runbook
        .as_ref()
        .is_some_and(|runbook| runbook.len() > 2048 || runbook.chars().any(char::is_control))
    {
        issues.push(issue(
            field("runbook"),
            "must be at most 2048 bytes of text",
        ));
    }
    match (metric, window) {
        (Some(metric), Some(window)) if issues.is_empty() => Ok(Rule {
            id: id.to_string(),
            metric: metric.name.clone(),
            window,
            condition: rule.condition.clone(),
            by: rule.by.clone(),
            min_count: rule.min_count,
            for_s: rule.for_s,
            severity: rule.severity.clone(),
            runbook: rule.runbook.clone(),
        }),
        _ => Err(issues),
    }
}

/// The config's rules, each with the tenants it is for (empty: every one).
pub fn check_rules(
    catalogue: &Catalogue,
    rules: &[RuleConfig],
    tenant_ids: &HashSet<&str>,
    issues: &mut Vec<ConfigIssue>,
) -> Vec<(Vec<String>, Rule)> {
    let mut checked = Vec::with_capacity(rules.len());
    let mut ids = HashSet::new();
    for (index, rule) in rules.iter().enumerate() {
        let at = format!("alerts[{index}]");
        if !ids.insert(rule.id.as_str()) {
            issues.push(issue(format!("{at}.id"), "rule id is used more than once"));
        }
        for (t, tenant) in rule.tenants.iter().enumerate() {
            if !tenant_ids.contains(tenant.as_str()) {
                issues.push(issue(
                    format!("{at}.tenants[{t}]"),
                    format!("unknown tenant {tenant:?}"),
                ));
            }
        }
        match check_rule(catalogue, &at, &rule.id, rule) {
            Ok(checked_rule) => checked.push((rule.tenants.clone(), checked_rule)),
            Err(rule_issues) => issues.extend(rule_issues),
        }
    }
    checked
}

/// The window length a rule's condition compares, where it has one.
pub fn window_ms(window: WindowName) -> Option<i64> {
    match window {
        WindowName::Sliding(sliding) => Some(sliding.length_s() * 1000),
        WindowName::Today => None,
    }
}
