//! Configuration: the file (one module per section), `TALLY_<SECTION>__<KEY>`
//! overrides, and `check()`, which parses every value the file holds as text
//! (addresses, time zones, key digests, the metric catalogue) into its type
//! once (`Checked`) and names every problem with its key path.
//! Owns: config shapes, defaults, and turning config into the domain's
//! catalogue, event limits and tenant contexts. Must not: start anything, read
//! the clock, or fall back silently on a value it cannot parse.
//!
//! Every section may be left out; its keys then take the defaults of its
//! module, which `config/default.toml` states again with units (a test keeps
//! them equal).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::domain::catalogue::Catalogue;
use crate::domain::event::EventLimits;
use crate::domain::tenant::TenantContext;

mod actors;
mod admin;
pub mod alerts;
pub mod audit;
pub mod enrich;
pub mod export;
mod ingest;
mod live;
mod metrics;
mod prometheus;
mod quarantine;
mod server;
mod storage;
mod tenants;
mod windows;

pub use actors::ActorsConfig;
pub use admin::AdminConfig;
pub use alerts::{AlertingConfig, BudgetConfig, ExperimentsConfig, RuleConfig};
pub use audit::AuditConfig;
pub use enrich::{EnrichmentConfig, LookupsConfig};
pub use export::ExportConfig;
pub use ingest::IngestConfig;
pub use live::LiveConfig;
pub use metrics::{MetricConfig, MetricKindName};
pub use prometheus::PrometheusConfig;
pub use quarantine::QuarantineConfig;
pub use server::ServerConfig;
pub use storage::StorageConfig;
pub use tenants::{check_fields as check_tenant_fields, TenantConfig, TenantSettings};
pub use windows::WindowsConfig;

pub const ENV_PREFIX: &str = "TALLY_";

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub ingest: IngestConfig,
    pub actors: ActorsConfig,
    pub windows: WindowsConfig,
    pub quarantine: QuarantineConfig,
    pub admin: AdminConfig,
    pub prometheus: PrometheusConfig,
    pub live: LiveConfig,
    pub alerting: AlertingConfig,
    pub experiments: ExperimentsConfig,
    pub audit: AuditConfig,
    pub export: ExportConfig,
    pub lookups: LookupsConfig,
    pub tenants: Vec<TenantConfig>,
    pub metrics: Vec<MetricConfig>,
    pub alerts: Vec<RuleConfig>,
    pub budgets: Vec<BudgetConfig>,
    pub enrichments: Vec<EnrichmentConfig>,
}

/// The SHA-256 digest of an API key.
pub type KeyDigest = [u8; 32];

/// What `Config::check` parsed out of the text of a valid config: what the
/// node runs on. Nothing here is parsed again.
#[derive(Debug, Clone)]
pub struct Checked {
    pub listen: SocketAddr,
    /// `prometheus.listen`: `/metrics` on a listener of its own.
    pub metrics_listen: Option<SocketAddr>,
    /// `prometheus.bearer_token`: the scrape key, when one is asked for.
    pub scrape_key: Option<KeyDigest>,
    pub admin_keys: Vec<KeyDigest>,
    pub tenants: Vec<TenantSettings>,
    pub catalogue: Arc<Catalogue>,
    pub event_limits: EventLimits,
    /// `[[alerts]]`, each with the tenants it is for (empty: every one).
    pub alert_rules: Vec<(Vec<String>, crate::domain::alert::Rule)>,
    /// `[[budgets]]`: (tenants, (dim, value), amount).
    pub budgets: Vec<(Vec<String>, (String, String), i64)>,
    /// The enrichments every tenant's events go through, in order.
    pub enrichments: Vec<crate::domain::enrich::Enrichment>,
}

impl Checked {
    /// The config's budgets for `tenant`.
    pub fn budgets_for(&self, tenant: &str) -> Vec<((String, String), i64)> {
        self.budgets
            .iter()
            .filter(|(tenants, _, _)| tenants.is_empty() || tenants.iter().any(|id| id == tenant))
            .map(|(_, key, amount)| (key.clone(), *amount))
            .collect()
    }

    /// The config's alert rules for `tenant`.
    pub fn rules_for(&self, tenant: &str) -> Vec<crate::domain::alert::Rule> {
        self.alert_rules
            .iter()
            .filter(|(tenants, _)| tenants.is_empty() || tenants.iter().any(|id| id == tenant))
            .map(|(_, rule)| rule.clone())
            .collect()
    }

    /// What every part of the node knows of each tenant, in config order.
    pub fn tenant_contexts(&self) -> Vec<Arc<TenantContext>> {
        self.tenants
            .iter()
            .map(|tenant| {
                Arc::new(TenantContext {
                    id: Arc::from(tenant.id.as_str()),
                    currency: tenant.currency.clone(),
                    tz: tenant.tz,
                    catalogue: Arc::clone(&self.catalogue),
                    limits: self.event_limits.clone(),
                })
            })
            .collect()
    }
}

/// One problem with a config, at a key path such as `tenants[0].currency`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn issue(path: impl Into<String>, message: impl Into<String>) -> ConfigIssue {
    ConfigIssue {
        path: path.into(),
        message: message.into(),
    }
}

/// An API key as configured: plain text or `sha256:<hex>`; kept as its digest.
pub fn key_digest(configured: &str) -> Result<KeyDigest, String> {
    if let Some(hex_digest) = configured.strip_prefix("sha256:") {
        let bytes = hex::decode(hex_digest).map_err(|_| "sha256 key is not hex".to_string())?;
        return <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| "sha256 key must be 64 hex digits".to_string());
    }
    if configured.is_empty() {
        return Err("key is empty".into());
    }
    Ok(Sha256::digest(configured.as_bytes()).into())
}

pub(crate) fn is_identifier(text: &str, bytes_max: usize) -> bool {
    !text.is_empty()
        && text.len() <= bytes_max
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl Config {
    /// Reads a file and applies `TALLY_*` overrides from `env`.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Vec<ConfigIssue>> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            vec![issue(
                path.display().to_string(),
                format!("cannot read: {error}"),
            )]
        })?;
        Config::parse(&text, env)
    }

    pub fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Vec<ConfigIssue>> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|error: toml::de::Error| vec![issue("(file)", error.message().to_string())])?;
        for (name, value) in env {
            let Some(path) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            // TALLY_HOME and the like belong to other tools: an override always
            // names a section (TALLY_<SECTION>__<KEY>)
            if !path.contains("__") {
                tracing::warn!(variable = %name, "ignored: not an override (expected TALLY_<SECTION>__<KEY>)");
                continue;
            }
            apply_override(&mut table, path, &value)
                .map_err(|message| vec![issue(format!("(env {name})"), message)])?;
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|error| {
                let path = error.path().to_string();
                vec![issue(path, error.into_inner().message().to_string())]
            })?;
        config.check()?;
        Ok(config)
    }

    pub fn event_limits(&self) -> EventLimits {
        EventLimits {
            max_clock_skew_ms: self.ingest.max_clock_skew_ms,
            dims_per_event_max: self.ingest.dims_per_event_max,
            dim_key_bytes_max: self.ingest.dim_key_bytes_max,
            dim_value_bytes_max: self.ingest.dim_value_bytes_max,
            histogram_value_max: self.windows.histogram_value_max,
        }
    }

    /// The shard count, with 0 meaning one per core.
    pub fn shard_count(&self) -> usize {
        if self.actors.shards == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.actors.shards
        }
    }

    /// Every problem, each with its key path; empty when the config is valid.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        self.check().err().unwrap_or_default()
    }

    /// Parses every value that is text in the file (addresses, time zones,
    /// currencies, keys, the metric catalogue) into its type, once, and checks
    /// every limit; every problem is named with its key path.
    pub fn check(&self) -> Result<Checked, Vec<ConfigIssue>> {
        let mut issues = Vec::new();
        let listen = SocketAddr::from_str(&self.server.listen).ok();
        if listen.is_none() {
            issues.push(issue(
                "server.listen",
                "must be an address such as 127.0.0.1:7700",
            ));
        }
        let positive = [
            ("server.max_body_bytes", self.server.max_body_bytes),
            (
                "ingest.max_events_per_request",
                self.ingest.max_events_per_request,
            ),
            (
                "ingest.tenant_batches_inflight_max",
                self.ingest.tenant_batches_inflight_max,
            ),
            ("ingest.dims_per_event_max", self.ingest.dims_per_event_max),
            ("ingest.dim_key_bytes_max", self.ingest.dim_key_bytes_max),
            (
                "ingest.dim_value_bytes_max",
                self.ingest.dim_value_bytes_max,
            ),
            (
                "actors.tenant_queries_inflight_max",
                self.actors.tenant_queries_inflight_max,
            ),
            (
                "windows.max_series_per_metric",
                self.windows.max_series_per_metric,
            ),
            (
                "quarantine.events_per_tenant_max",
                self.quarantine.events_per_tenant_max,
            ),
            ("quarantine.raw_bytes_max", self.quarantine.raw_bytes_max),
            ("quarantine.list_limit_max", self.quarantine.list_limit_max),
            ("storage.snapshots_kept", self.storage.snapshots_kept),
            (
                "live.sessions_per_tenant_max",
                self.live.sessions_per_tenant_max,
            ),
            (
                "live.subscriptions_per_session_max",
                self.live.subscriptions_per_session_max,
            ),
            ("live.replay_records_max", self.live.replay_records_max),
            ("storage.record_bytes_max", self.storage.record_bytes_max),
        ];
        for (path, value) in positive {
            if value == 0 {
                issues.push(issue(path, "must be at least 1"));
            }
        }
        if self.ingest.dedup_table_bytes_max < ingest::DEDUP_TABLE_BYTES_PER_ID {
            issues.push(issue(
                "ingest.dedup_table_bytes_max",
                "must be at least 128 (one id)",
            ));
        }
        if !(100..=60_000).contains(&self.alerting.tick_ms) {
            issues.push(issue("alerting.tick_ms", "must be within 100..=60000"));
        }
        let url = &self.alerting.alertmanager_url;
        let plain_http = url.len() > "http://".len()
            && url.starts_with("http://")
            && !url.contains(char::is_whitespace);
        if !url.is_empty() && !plain_http {
            issues.push(issue(
                "alerting.alertmanager_url",
                "must be empty or a plain http:// URL such as http://127.0.0.1:9093",
            ));
        }
        if !(1..=3600).contains(&self.alerting.alertmanager_resend_s) {
            issues.push(issue(
                "alerting.alertmanager_resend_s",
                "must be within 1..=3600",
            ));
        }
        if !(100..=60_000).contains(&self.alerting.alertmanager_timeout_ms) {
            issues.push(issue(
                "alerting.alertmanager_timeout_ms",
                "must be within 100..=60000",
            ));
        }
        if self.alerting.budgets_per_tenant_max == 0 {
            issues.push(issue(
                "alerting.budgets_per_tenant_max",
                "must be at least 1",
            ));
        }
        if self.alerting.rules_per_tenant_max == 0 {
            issues.push(issue("alerting.rules_per_tenant_max", "must be at least 1"));
        }
        if self.export.rows_max == 0 {
            issues.push(issue("export.rows_max", "must be at least 1"));
        }
        if self.audit.queue_max == 0 {
            issues.push(issue("audit.queue_max", "must be at least 1"));
        }
        if self.audit.retention_s < 60 {
            issues.push(issue("audit.retention_s", "must be at least 60"));
        }
        if self.audit.records_max == 0 {
            issues.push(issue("audit.records_max", "must be at least 1"));
        }
        if self.audit.list_scan_max < self.audit.list_limit_max {
            issues.push(issue(
                "audit.list_scan_max",
                "must be at least audit.list_limit_max",
            ));
        }
        if self.audit.burst_addresses_max == 0 {
            issues.push(issue("audit.burst_addresses_max", "must be at least 1"));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.export.chunk_bytes) {
            issues.push(issue(
                "export.chunk_bytes",
                "must be within 1024..=16777216",
            ));
        }
        if self.audit.list_limit_max == 0 {
            issues.push(issue("audit.list_limit_max", "must be at least 1"));
        }
        if !(100..=60_000).contains(&self.experiments.tick_ms) {
            issues.push(issue("experiments.tick_ms", "must be within 100..=60000"));
        }
        if !(1..=10_000).contains(&self.experiments.per_tenant_max) {
            issues.push(issue(
                "experiments.per_tenant_max",
                "must be within 1..=10000",
            ));
        }
        if self.storage.cache_bytes < 1 << 20 {
            issues.push(issue(
                "storage.cache_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        if self.storage.snapshot_interval_s == 0 {
            issues.push(issue("storage.snapshot_interval_s", "must be at least 1"));
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            issues.push(issue("storage.data_dir", "must name a directory"));
        }
        if self.actors.shards > 1024 {
            issues.push(issue(
                "actors.shards",
                "must be at most 1024 (0 = one per core)",
            ));
        }
        if !(0..=3_600_000).contains(&self.ingest.max_clock_skew_ms) {
            issues.push(issue(
                "ingest.max_clock_skew_ms",
                "must be within 0..=3600000",
            ));
        }
        // ids are kept while their events can count in some window anyway; the
        // horizon only keeps them longer (docs/durability.md, "the tenant core")
        if self.ingest.dedup_horizon_s < 0 {
            issues.push(issue("ingest.dedup_horizon_s", "must be at least 0"));
        }
        if !(2..=(1u64 << 53)).contains(&self.windows.histogram_value_max) {
            issues.push(issue(
                "windows.histogram_value_max",
                "must be within 2..=9007199254740992 (2^53, exact as a float)",
            ));
        }
        if self.server.ingest_bytes_inflight_max < self.server.max_body_bytes {
            issues.push(issue(
                "server.ingest_bytes_inflight_max",
                "must be at least server.max_body_bytes",
            ));
        }
        // every log record (one request's events, re-encoded) must read back
        if self.storage.record_bytes_max < 4 * self.server.max_body_bytes + (1 << 20) {
            issues.push(issue(
                "storage.record_bytes_max",
                "must be at least 4 x server.max_body_bytes + 1 MiB, so that every log record reads back",
            ));
        }
        let mut metrics_listen = None;
        if !self.prometheus.listen.is_empty() {
            match SocketAddr::from_str(&self.prometheus.listen) {
                Ok(addr) => metrics_listen = Some(addr),
                Err(_) => issues.push(issue(
                    "prometheus.listen",
                    "must be empty (serve on server.listen) or an address such as 127.0.0.1:9770",
                )),
            }
        }
        let mut scrape_key = None;
        let mut digests = HashSet::new();
        if !self.prometheus.bearer_token.is_empty() {
            match key_digest(&self.prometheus.bearer_token) {
                Ok(digest) => {
                    // one key, one caller: the scrape key is no API key
                    digests.insert(digest);
                    scrape_key = Some(digest);
                }
                Err(message) => issues.push(issue("prometheus.bearer_token", message)),
            }
        }
        if !(10..=1000).contains(&self.live.tick_ms) {
            issues.push(issue("live.tick_ms", "must be within 10..=1000"));
        }
        if self.live.sessions_max == 0 {
            issues.push(issue("live.sessions_max", "must be at least 1"));
        }
        if self.live.unauthenticated_max == 0 {
            issues.push(issue("live.unauthenticated_max", "must be at least 1"));
        }
        if !(100..=60_000).contains(&self.live.auth_timeout_ms) {
            issues.push(issue("live.auth_timeout_ms", "must be within 100..=60000"));
        }
        if self.live.messages_per_second_max == 0 {
            issues.push(issue("live.messages_per_second_max", "must be at least 1"));
        }
        if !(100..=60_000).contains(&self.live.heartbeat_interval_ms) {
            issues.push(issue(
                "live.heartbeat_interval_ms",
                "must be within 100..=60000",
            ));
        }
        if self.live.send_timeout_ms == 0 {
            issues.push(issue("live.send_timeout_ms", "must be at least 1"));
        }
        if self.live.message_bytes_max < 1024 {
            issues.push(issue("live.message_bytes_max", "must be at least 1024"));
        }
        if self.live.ping_interval_s == 0 || self.live.idle_timeout_s <= self.live.ping_interval_s {
            issues.push(issue(
                "live.idle_timeout_s",
                "must be longer than live.ping_interval_s (at least 1)",
            ));
        }
        if self.prometheus.upkeep_interval_s == 0 {
            issues.push(issue("prometheus.upkeep_interval_s", "must be at least 1"));
        }
        if !(100..=600_000).contains(&self.server.header_read_timeout_ms) {
            issues.push(issue(
                "server.header_read_timeout_ms",
                "must be within 100..=600000",
            ));
        }
        if self.ingest.tenant_events_per_second_max == 0 {
            issues.push(issue(
                "ingest.tenant_events_per_second_max",
                "must be at least 1",
            ));
        }
        if !(100..=600_000).contains(&self.server.write_timeout_ms) {
            issues.push(issue(
                "server.write_timeout_ms",
                "must be within 100..=600000",
            ));
        }
        if self.server.connections_max == 0 {
            issues.push(issue("server.connections_max", "must be at least 1"));
        }
        if self.server.body_read_timeout_ms == 0 {
            issues.push(issue("server.body_read_timeout_ms", "must be at least 1"));
        }
        if self.admin.keys_per_tenant_max == 0 {
            issues.push(issue("admin.keys_per_tenant_max", "must be at least 1"));
        }
        if self.admin.tenants_max == 0 {
            issues.push(issue("admin.tenants_max", "must be at least 1"));
        } else if self.tenants.len() > self.admin.tenants_max {
            issues.push(issue(
                "tenants",
                format!(
                    "{} tenants; admin.tenants_max is {}",
                    self.tenants.len(),
                    self.admin.tenants_max
                ),
            ));
        }
        // the scrape token's digest is already in `digests`: one key, one caller
        let mut check_key =
            |issues: &mut Vec<ConfigIssue>, path: String, key: &str, kept: &mut Vec<KeyDigest>| {
                match key_digest(key) {
                    Ok(digest) => {
                        if !digests.insert(digest) {
                            issues.push(issue(path, "key is used more than once"));
                        }
                        kept.push(digest);
                    }
                    Err(message) => issues.push(issue(path, message)),
                }
            };
        let mut admin_keys = Vec::new();
        for (i, key) in self.admin.api_keys.iter().enumerate() {
            check_key(
                &mut issues,
                format!("admin.api_keys[{i}]"),
                key,
                &mut admin_keys,
            );
        }
        let mut tenants = Vec::with_capacity(self.tenants.len());
        let mut tenant_ids = HashSet::new();
        for (t, tenant) in self.tenants.iter().enumerate() {
            let at = format!("tenants[{t}]");
            if !is_identifier(&tenant.id, 64) {
                issues.push(issue(format!("{at}.id"), "must match [a-z0-9_-]{1,64}"));
            } else if !tenant_ids.insert(tenant.id.as_str()) {
                issues.push(issue(
                    format!("{at}.id"),
                    "tenant id is used more than once",
                ));
            }
            let mut key_digests = Vec::new();
            if tenant.api_keys.len() > self.admin.keys_per_tenant_max {
                issues.push(issue(
                    format!("{at}.api_keys"),
                    format!(
                        "more keys than admin.keys_per_tenant_max ({})",
                        self.admin.keys_per_tenant_max
                    ),
                ));
            }
            for (i, key) in tenant.api_keys.iter().enumerate() {
                check_key(
                    &mut issues,
                    format!("{at}.api_keys[{i}]"),
                    key,
                    &mut key_digests,
                );
            }
            if let Some(tz) =
                tenants::check_fields(&at, &tenant.currency, &tenant.timezone, &mut issues)
            {
                tenants.push(TenantSettings {
                    id: tenant.id.clone(),
                    currency: tenant.currency.clone(),
                    tz,
                    key_digests,
                });
            }
        }
        let catalogue = match self.catalogue() {
            Ok(catalogue) => Some(catalogue),
            Err(metric_issues) => {
                issues.extend(metric_issues);
                None
            }
        };
        let alert_rules = match &catalogue {
            Some(catalogue) => {
                alerts::check_rules(catalogue, &self.alerts, &tenant_ids, &mut issues)
            }
            None => Vec::new(),
        };
        let budgets = alerts::check_budgets(&self.budgets, &tenant_ids, &mut issues);
        let enrichments = enrich::check(
            &self.enrichments,
            self.ingest.dim_key_bytes_max,
            &mut issues,
        );
        if self.lookups.rows_per_table_max == 0 {
            issues.push(issue("lookups.rows_per_table_max", "must be at least 1"));
        }
        for tenant in &self.tenants {
            let rules = alert_rules
                .iter()
                .filter(|(tenants, _)| tenants.is_empty() || tenants.contains(&tenant.id))
                .count();
            if rules > self.alerting.rules_per_tenant_max {
                issues.push(issue(
                    "alerts",
                    format!(
                        "tenant {} has {rules} rules, more than alerting.rules_per_tenant_max",
                        tenant.id
                    ),
                ));
            }
        }
        match (listen, catalogue) {
            (Some(listen), Some(catalogue)) if issues.is_empty() => Ok(Checked {
                listen,
                metrics_listen,
                scrape_key,
                admin_keys,
                tenants,
                catalogue: Arc::new(catalogue),
                event_limits: self.event_limits(),
                alert_rules,
                budgets,
                enrichments,
            }),
            _ => Err(issues),
        }
    }
}

/// Sets `path` (`SECTION__KEY`, lower-cased) in `table`. The value is read as a
/// TOML value when it parses as one (numbers, booleans, arrays), else as a string.
fn apply_override(table: &mut toml::Table, path: &str, raw: &str) -> Result<(), String> {
    let keys: Vec<String> = path
        .split("__")
        .map(|key| key.to_ascii_lowercase())
        .collect();
    if keys.iter().any(|key| key.is_empty()) {
        return Err("expected TALLY_<SECTION>__<KEY>".into());
    }
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut parsed| parsed.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let (last, parents) = keys.split_last().ok_or("empty override")?;
    let mut current = table;
    for key in parents {
        let entry = current
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| format!("{key} is not a section"))?;
    }
    current.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn default_file_is_valid_and_states_the_code_defaults() {
        let config = Config::parse(DEFAULT_TOML, no_env()).unwrap();
        let defaults = Config::default();
        assert_eq!(config.server, defaults.server);
        assert_eq!(config.storage, defaults.storage);
        assert_eq!(config.ingest, defaults.ingest);
        assert_eq!(config.actors, defaults.actors);
        assert_eq!(config.windows, defaults.windows);
        assert_eq!(config.quarantine, defaults.quarantine);
        assert_eq!(config.prometheus, defaults.prometheus);
        assert_eq!(config.live, defaults.live);
        assert_eq!(config.alerting, defaults.alerting);
        assert!(config.alerts.is_empty(), "the shipped rules are commented");
        assert_eq!(config.tenants[0].id, "demo");
        assert_eq!(config.tenants[0].api_keys, vec!["demo-key".to_string()]);
        let catalogue = config.catalogue().unwrap();
        let names: Vec<&str> = catalogue
            .metrics()
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        for expected in [
            "gmv",
            "orders",
            "aov",
            "refunds",
            "payment_failure_rate",
            "order_error_rate",
            "checkout_abandonment_rate",
            "search_zero_result_rate",
            "error_rate",
            "checkout_latency_ms",
            "ad_spend",
            "impressions",
            "cpm",
            "units_earned",
            "units_spent",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} missing from the default catalogue"
            );
        }
    }

    /// The commented rules of config/default.toml, uncommented.
    fn with_shipped_rules() -> String {
        let mut text = String::new();
        let mut in_rules = false;
        for line in DEFAULT_TOML.lines() {
            if line == "# [[alerts]]" {
                in_rules = true;
            }
            match line.strip_prefix("# ") {
                Some(rest) if in_rules => text.push_str(rest),
                _ if in_rules && line == "#" => {}
                _ => text.push_str(line),
            }
            text.push('\n');
        }
        text
    }

    #[test]
    fn the_shipped_alert_rules_check_when_uncommented() {
        let config = Config::parse(&with_shipped_rules(), no_env()).unwrap();
        let checked = config.check().unwrap();
        let ids: Vec<String> = checked
            .rules_for("demo")
            .into_iter()
            .map(|rule| rule.id)
            .collect();
        assert_eq!(
            ids,
            [
                "gmv-drop",
                "payment-failures",
                "order-errors",
                "zero-result-searches",
                "checkout-abandonment-spike",
                "gmv-anomaly",
                "campaign-budget",
                "device-silent"
            ]
        );
    }

    #[test]
    fn a_bad_alert_rule_names_each_field() {
        let text = format!(
            "{DEFAULT_TOML}\n[[alerts]]\nid = \"x\"\nmetric = \"nope\"\nwindow = \"1h\"\n\
             condition = {{ type = \"drop_vs_prev\", pct = 0 }}\nfor_s = -1\n\
             tenants = [\"ghost\"]\n\
             [[alerts]]\nid = \"y\"\nmetric = \"orders\"\nwindow = \"15m\"\nby = \"campaign\"\n\
             condition = {{ type = \"absent\" }}\nfor_s = 10\n\
             [[alerts]]\nid = \"z\"\nmetric = \"orders\"\nwindow = \"today\"\n\
             condition = {{ type = \"budget_used\", pct = 90 }}\n"
        );
        let issues = Config::parse(&text, no_env()).unwrap_err();
        let paths: Vec<&str> = issues.iter().map(|issue| issue.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "alerts[0].tenants[0]",
                "alerts[0].metric",
                "alerts[0].window",
                "alerts[0].condition.pct",
                "alerts[0].for_s",
                "alerts[1].by",
                "alerts[1].for_s",
                "alerts[2].metric",
                "alerts[2].by",
            ],
            "{issues:?}"
        );
    }

    #[test]
    fn env_overrides_set_nested_keys_with_types() {
        let env = vec![
            (
                "TALLY_SERVER__LISTEN".to_string(),
                "127.0.0.1:9000".to_string(),
            ),
            (
                "TALLY_INGEST__DEDUP_HORIZON_S".to_string(),
                "172800".to_string(),
            ),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let config = Config::parse(DEFAULT_TOML, env).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:9000");
        assert_eq!(config.ingest.dedup_horizon_s, 172_800);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let errors = Config::parse("[server]\nlisten_addr = \"x\"\n", no_env()).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "server.listen_addr");
        assert!(
            errors[0].message.contains("unknown field `listen_addr`"),
            "{}",
            errors[0].message
        );
        let errors =
            Config::parse("", vec![("TALLY_SERVER__LISTN".into(), "x".into())]).unwrap_err();
        assert!(errors[0].message.contains("unknown field `listn`"));
    }

    #[test]
    fn enrichment_dims_are_dim_names_and_the_scrape_token_is_no_other_key() {
        let paths = |text: &str| {
            Config::parse(text, Vec::new())
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|issue| issue.path)
                .collect::<Vec<_>>()
        };
        let long = "d".repeat(33);
        let enrichment = format!(
            "[[enrichments]]\ntable = \"stores\"\nkey = \"store\"\nadds = [\"region\", \"{long}\"]\n"
        );
        assert_eq!(paths(&enrichment), ["enrichments[0].adds[1]"]);
        // one key, one caller: the scrape token equal to a tenant's key
        let shared = "[prometheus]\nbearer_token = \"same-key\"\n\n[[tenants]]\nid = \"t\"\napi_keys = [\"same-key\"]\ncurrency = \"USD\"\n";
        assert_eq!(paths(shared), ["tenants[0].api_keys[0]"]);
        // the limits that were constants, checked like the others
        let limits =
            "[export]\nchunk_bytes = 10\n\n[audit]\nlist_scan_max = 10\nburst_addresses_max = 0\n";
        assert_eq!(
            paths(limits),
            [
                "audit.list_scan_max",
                "audit.burst_addresses_max",
                "export.chunk_bytes"
            ]
        );
    }

    #[test]
    fn tenant_currencies_are_iso_4217_with_a_minor_unit() {
        let problems = |code: &str| {
            let text =
                format!("[[tenants]]\nid = \"t\"\napi_keys = [\"k\"]\ncurrency = \"{code}\"\n");
            // parse checks too: its errors are the problems
            Config::parse(&text, Vec::new())
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|issue| (issue.path, issue.message))
                .collect::<Vec<_>>()
        };
        assert_eq!(problems("JPY"), vec![]);
        assert_eq!(problems("BHD"), vec![]);
        let abc = problems("ABC");
        assert_eq!(abc.len(), 1);
        assert_eq!(abc[0].0, "tenants[0].currency");
        assert!(abc[0].1.contains("ISO 4217"));
        let gold = problems("XAU");
        assert_eq!(gold.len(), 1);
        assert!(gold[0].1.contains("no minor unit"), "{gold:?}");
    }

    #[test]
    fn validate_reports_every_problem_with_its_path() {
        let text = r#"
            [server]
            listen = "nowhere"
            [storage]
            cache_bytes = 1000
            [ingest]
            dedup_horizon_s = -1
            [[tenants]]
            id = "Bad Id"
            api_keys = ["sha256:abc", "k1"]
            currency = "usd"
            timezone = "Mars/Olympus"
            [[tenants]]
            id = "b"
            api_keys = ["k1"]
            currency = "EUR"
            [[metrics]]
            name = "gmv"
            kind = "sum"
            types = []
            [[metrics]]
            name = "aov"
            kind = "mean"
            sum_metric = "nope"
            count_metric = "gmv"
        "#;
        let errors = Config::parse(text, no_env()).unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "server.listen",
                "storage.cache_bytes",
                "ingest.dedup_horizon_s",
                "tenants[0].id",
                "tenants[0].api_keys[0]",
                "tenants[0].currency",
                "tenants[0].timezone",
                "tenants[1].api_keys[0]",
                "metrics[0].types",
                "metrics[1].sum_metric",
            ]
        );
    }

    #[test]
    fn a_metric_kind_is_one_of_the_kinds() {
        let text = "[[metrics]]\nname = \"x\"\nkind = \"median\"\ntypes = [\"a\"]\n";
        let errors = Config::parse(text, no_env()).unwrap_err();
        assert_eq!(errors[0].path, "metrics[0].kind");
        assert!(
            errors[0].message.contains("unknown variant `median`"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn a_variable_with_the_prefix_and_no_section_is_not_an_override() {
        let env = vec![
            ("TALLY_HOME".to_string(), "/opt/tally".to_string()),
            (
                "TALLY_SERVER__LISTEN".to_string(),
                "127.0.0.1:9001".to_string(),
            ),
        ];
        let config = Config::parse(DEFAULT_TOML, env).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:9001");
    }

    #[test]
    fn check_parses_the_text_values_once() {
        let mut config = Config::parse(DEFAULT_TOML, no_env()).unwrap();
        config.prometheus.listen = "127.0.0.1:9770".into();
        config.tenants[0].timezone = "America/New_York".into();
        let checked = config.check().unwrap();
        assert_eq!(checked.listen, "127.0.0.1:7700".parse().unwrap());
        assert_eq!(
            checked.metrics_listen,
            Some("127.0.0.1:9770".parse().unwrap())
        );
        assert_eq!(checked.tenants[0].tz, chrono_tz::America::New_York);
        assert_eq!(
            checked.tenants[0].key_digests,
            vec![key_digest("demo-key").unwrap()]
        );
        let contexts = checked.tenant_contexts();
        assert_eq!(&*contexts[0].id, "demo");
        assert_eq!(contexts[0].tz, chrono_tz::America::New_York);
    }

    #[test]
    fn sha256_keys_match_their_plain_text() {
        let digest = key_digest("demo-key").unwrap();
        let configured = format!("sha256:{}", hex::encode(digest));
        assert_eq!(key_digest(&configured).unwrap(), digest);
        assert!(key_digest("sha256:zz").is_err());
        assert!(key_digest("").is_err());
    }
}
