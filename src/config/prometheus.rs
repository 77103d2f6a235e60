//! `[prometheus]`: the scrape key, tenant values, the series cap, its own listener.
//! Every key is documented with its unit in config/default.toml; `Config::check`
//! checks the limits.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    pub bearer_token: String,
    pub tenant_values: bool,
    pub tenant_series_max: usize,
    pub listen: String,
    pub upkeep_interval_s: u64,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        PrometheusConfig {
            bearer_token: String::new(),
            tenant_values: true,
            tenant_series_max: 10_000,
            listen: String::new(),
            upkeep_interval_s: 5,
        }
    }
}
