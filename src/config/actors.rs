//! `[actors]`: shards (arbiter threads) and reads in flight per tenant.
//! Every key is documented with its unit in config/default.toml; `Config::check`
//! checks the limits.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActorsConfig {
    pub shards: usize,
    pub tenant_queries_inflight_max: usize,
}

impl Default for ActorsConfig {
    fn default() -> Self {
        ActorsConfig {
            shards: 0,
            tenant_queries_inflight_max: 64,
        }
    }
}
