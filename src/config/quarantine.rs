//! `[quarantine]`: entries kept per tenant, raw bytes kept, listing pages.
//! Every key is documented with its unit in config/default.toml; `Config::check`
//! checks the limits.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineConfig {
    pub events_per_tenant_max: usize,
    pub raw_bytes_max: usize,
    pub list_limit_max: usize,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            events_per_tenant_max: 10_000,
            raw_bytes_max: 4096,
            list_limit_max: 1000,
        }
    }
}
