//! Who is calling: bearer keys resolved to a tenant or to admin, and which
//! tenant a read may address (API.md §2).
//! Must not: accept tokens anywhere but the Authorization header, or compare keys
//! in time that depends on how much of a key matched.

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{key_digest, Config};

use super::error::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Tenant(String),
}

/// Every configured key as its SHA-256 digest.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    entries: Vec<([u8; 32], Principal)>,
}

impl KeyRing {
    /// Keys of a validated config (invalid keys were refused by `validate`).
    pub fn from_config(config: &Config) -> KeyRing {
        let mut entries = Vec::new();
        for key in &config.admin.api_keys {
            if let Ok(digest) = key_digest(key) {
                entries.push((digest, Principal::Admin));
            }
        }
        for tenant in &config.tenants {
            for key in &tenant.api_keys {
                if let Ok(digest) = key_digest(key) {
                    entries.push((digest, Principal::Tenant(tenant.id.clone())));
                }
            }
        }
        KeyRing { entries }
    }

    /// Compares the token's digest with every key, without stopping at a match.
    pub fn resolve(&self, token: &str) -> Option<Principal> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (candidate, principal) in &self.entries {
            if bool::from(candidate.ct_eq(&digest)) {
                found = Some(principal.clone());
            }
        }
        found
    }

    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            // the scheme is case-insensitive (RFC 9110 §11.1)
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)
            })
            .ok_or(ApiError::Unauthorized)?;
        self.resolve(token.trim()).ok_or(ApiError::Unauthorized)
    }
}

/// The tenant a read addresses: a tenant key reads its own tenant (naming
/// another is 403); an admin key must name one with `?tenant=`.
pub fn tenant_for_read<'p>(
    principal: &'p Principal,
    named: Option<&'p str>,
) -> Result<&'p str, ApiError> {
    match (principal, named) {
        (Principal::Tenant(own), None) => Ok(own),
        (Principal::Tenant(own), Some(named)) if named == own => Ok(own),
        (Principal::Tenant(_), Some(_)) => Err(ApiError::Forbidden(
            "a tenant key can only read its own tenant".into(),
        )),
        (Principal::Admin, Some(named)) => Ok(named),
        (Principal::Admin, None) => Err(ApiError::BadRequest(
            "an admin key must name a tenant with ?tenant=".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        let config = Config::parse(
            r#"
            [admin]
            api_keys = ["root"]
            [[tenants]]
            id = "a"
            api_keys = ["key-a", "sha256:7ef5e2ec8f7c5a2c7a3e3e0b4be0e0d6c8a4ae3e8cfc7a1e0e2cb7f0a3b8e7d1"]
            currency = "USD"
            "#,
            Vec::new(),
        )
        .unwrap();
        KeyRing::from_config(&config)
    }

    #[test]
    fn plain_and_hashed_keys_resolve() {
        let ring = ring();
        assert_eq!(ring.resolve("key-a"), Some(Principal::Tenant("a".into())));
        assert_eq!(ring.resolve("root"), Some(Principal::Admin));
        assert_eq!(ring.resolve("key-b"), None);
        assert_eq!(ring.resolve(""), None);
    }

    #[test]
    fn sha256_configured_key_matches_its_plain_text() {
        let digest = hex::encode(Sha256::digest(b"secret"));
        let config = Config::parse(
            &format!(
                "[[tenants]]\nid = \"t\"\napi_keys = [\"sha256:{digest}\"]\ncurrency = \"EUR\"\n"
            ),
            Vec::new(),
        )
        .unwrap();
        let ring = KeyRing::from_config(&config);
        assert_eq!(ring.resolve("secret"), Some(Principal::Tenant("t".into())));
        assert_eq!(ring.resolve(&format!("sha256:{digest}")), None);
    }

    #[test]
    fn reads_stay_within_the_key_tenant() {
        let tenant = Principal::Tenant("a".into());
        assert_eq!(tenant_for_read(&tenant, None).unwrap(), "a");
        assert_eq!(tenant_for_read(&tenant, Some("a")).unwrap(), "a");
        assert!(matches!(
            tenant_for_read(&tenant, Some("b")),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            tenant_for_read(&Principal::Admin, None),
            Err(ApiError::BadRequest(_))
        ));
        assert_eq!(tenant_for_read(&Principal::Admin, Some("b")).unwrap(), "b");
    }
}
