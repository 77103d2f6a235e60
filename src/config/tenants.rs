//! `[[tenants]]`: each tenant's id, keys, currency and time zone, as written
//! (`TenantConfig`) and as `Config::check` parsed them (`TenantSettings`).

use serde::Deserialize;

use super::KeyDigest;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: String,
    pub api_keys: Vec<String>,
    pub currency: String,
    #[serde(default = "default_timezone")]
    pub timezone: String,
}

fn default_timezone() -> String {
    "UTC".into()
}

/// A configured tenant, its values parsed.
#[derive(Debug, Clone)]
pub struct TenantSettings {
    pub id: String,
    /// An ISO 4217 code (three capital letters).
    pub currency: String,
    pub tz: chrono_tz::Tz,
    pub key_digests: Vec<KeyDigest>,
}
