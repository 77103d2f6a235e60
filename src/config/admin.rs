//! `[admin]`: the admin keys, and the bounds on tenants and keys added at
//! run time.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub api_keys: Vec<String>,
    /// Keys one tenant may have (config and API together).
    pub keys_per_tenant_max: usize,
    /// Tenants the node serves (config and API together).
    pub tenants_max: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            api_keys: Vec::new(),
            keys_per_tenant_max: 100,
            tenants_max: 100_000,
        }
    }
}
