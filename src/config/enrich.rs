//! `[[enrichments]]` and `[lookups]`: the lookups that add dims to events, and
//! the bound on their tables (API.md §10; docs/api.md, "Enrichment").

use serde::Deserialize;

use crate::domain::enrich::{Enrichment, OnMiss};

use super::{is_identifier, issue, ConfigIssue};

/// An enrichment as written in config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichmentConfig {
    /// A lookup table, one per tenant.
    pub table: String,
    /// The event dim whose value is looked up.
    pub key: String,
    /// The dims each row supplies.
    pub adds: Vec<String>,
    /// `quarantine` (the default) or `unknown`.
    #[serde(default = "default_on_miss")]
    pub on_miss: String,
}

fn default_on_miss() -> String {
    "quarantine".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LookupsConfig {
    /// Rows one lookup table of one tenant may hold.
    pub rows_per_table_max: usize,
}

impl Default for LookupsConfig {
    fn default() -> Self {
        LookupsConfig {
            rows_per_table_max: 100_000,
        }
    }
}

/// At most this many enrichments, each adding at most `ADDS_MAX` dims.
pub const ENRICHMENTS_MAX: usize = 8;
pub const ADDS_MAX: usize = 8;

/// The enrichments, checked; every problem names its key path.
/// Dim names follow an event's dim keys (`ingest.dim_key_bytes_max`, given).
pub fn check(
    configs: &[EnrichmentConfig],
    dim_key_bytes_max: usize,
    issues: &mut Vec<ConfigIssue>,
) -> Vec<Enrichment> {
    if configs.len() > ENRICHMENTS_MAX {
        issues.push(issue("enrichments", "at most 8 enrichments"));
    }
    let mut enrichments = Vec::new();
    for (index, config) in configs.iter().enumerate() {
        let at = format!("enrichments[{index}]");
        let mut fine = true;
        if !is_identifier(&config.table, 64) {
            issues.push(issue(format!("{at}.table"), "must match [a-z0-9_-]{1,64}"));
            fine = false;
        } else if configs[..index]
            .iter()
            .any(|other| other.table == config.table)
        {
            issues.push(issue(
                format!("{at}.table"),
                "is named by an earlier enrichment",
            ));
            fine = false;
        }
        let dim_name = |name: &str| {
            !name.is_empty()
                && name.len() <= dim_key_bytes_max
                && !name.chars().any(char::is_control)
        };
        if !dim_name(&config.key) {
            issues.push(issue(
                format!("{at}.key"),
                format!("must be a dim name of 1 to {dim_key_bytes_max} bytes (ingest.dim_key_bytes_max)"),
            ));
            fine = false;
        }
        if config.adds.is_empty() || config.adds.len() > ADDS_MAX {
            issues.push(issue(format!("{at}.adds"), "must name 1 to 8 dims"));
            fine = false;
        }
        for (i, dim) in config.adds.iter().enumerate() {
            if !dim_name(dim) || *dim == config.key {
                issues.push(issue(
                    format!("{at}.adds[{i}]"),
                    format!("must be a dim name of 1 to {dim_key_bytes_max} bytes (ingest.dim_key_bytes_max), not the key"),
                ));
                fine = false;
            }
        }
        let on_miss = match config.on_miss.as_str() {
            "quarantine" => OnMiss::Quarantine,
            "unknown" => OnMiss::Unknown,
            _ => {
                issues.push(issue(
                    format!("{at}.on_miss"),
                    "must be \"quarantine\" or \"unknown\"",
                ));
                fine = false;
                OnMiss::Quarantine
            }
        };
        if fine {
            enrichments.push(Enrichment {
                table: config.table.clone(),
                key: config.key.clone(),
                adds: config.adds.clone(),
                on_miss,
            });
        }
    }
    enrichments
}
