//! `[[tenants]]`: each tenant's id, keys, currency and time zone, as written
//! (`TenantConfig`) and as `Config::check` parsed them (`TenantSettings`).

use serde::Deserialize;

use super::{issue, ConfigIssue, KeyDigest};

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

/// A tenant's currency and time zone, checked (in config, `at` is
/// `tenants[N]`; through the API, empty): the time zone when both are right.
pub fn check_fields(
    at: &str,
    currency: &str,
    timezone: &str,
    issues: &mut Vec<ConfigIssue>,
) -> Option<chrono_tz::Tz> {
    let path = |field: &str| {
        if at.is_empty() {
            field.to_string()
        } else {
            format!("{at}.{field}")
        }
    };
    let mut fine = true;
    if crate::domain::event::currency_minor_digits(currency).is_none() {
        fine = false;
        issues.push(issue(
            path("currency"),
            if iso_currency::Currency::from_code(currency).is_some() {
                "has no minor unit in ISO 4217 (a metal or a fund); amounts need one"
            } else {
                "must be an ISO 4217 code such as USD"
            },
        ));
    }
    match timezone.parse::<chrono_tz::Tz>() {
        Ok(tz) if fine => Some(tz),
        Ok(_) => None,
        Err(_) => {
            issues.push(issue(
                path("timezone"),
                "must be an IANA time zone such as Europe/Berlin",
            ));
            None
        }
    }
}
