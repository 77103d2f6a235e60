//! Who is calling: a presented key resolved to a tenant, to admin or to the
//! scrape key, and which tenant a caller may address (API.md §2, §9).
//! Owns: the key digests and the rules of who may read what. The transport
//! (where a token comes from: a header, a WebSocket message) is the surface's.
//! Must not: compare keys in time that depends on how much of a key matched.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Checked;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Tenant(String),
}

/// Who is calling, as every route, `/metrics` and `/v1/live` learn it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No key was presented.
    Anonymous,
    /// A key was presented that is not known (or not well formed).
    Invalid,
    /// `prometheus.bearer_token`: may scrape, nothing else.
    Scrape,
    Key(Principal),
}

impl Caller {
    /// The tenant or admin key behind the call; any other caller is 401.
    pub fn principal(&self) -> Result<&Principal, AuthError> {
        match self {
            Caller::Key(principal) => Ok(principal),
            _ => Err(AuthError::Unauthorized),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing or unknown api key")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("an admin key must name a tenant with ?tenant=")]
    TenantNeeded,
    #[error("unknown tenant {0}")]
    UnknownTenant(String),
}

/// A tenant key as the ring holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantKey {
    pub digest: [u8; 32],
    pub tenant: String,
    /// The first 16 hex digits of the digest (API.md §2): how records and the API name it.
    pub id: String,
    /// From config (the seed) or added through the API.
    pub from_config: bool,
}

/// The id of a key digest (docs/audit.md).
pub fn digest_id(digest: &[u8; 32]) -> String {
    hex::encode(&digest[..8])
}

/// Every key as its SHA-256 digest: the admin keys and the scrape token from
/// config, and the tenant keys, which change at run time (added and revoked
/// through the API; `keys.rs` persists them). Readers take the current list
/// (an `Arc`). Admin keys are compared one by one in constant time; tenant
/// keys, which may be tens of thousands, are found by digest in a map: its
/// timing depends on the digest alone, and a digest (SHA-256) tells nothing
/// of the secrets that are near it.
#[derive(Debug, Default)]
pub struct KeyRing {
    admin: Vec<[u8; 32]>,
    tenants: std::sync::RwLock<std::sync::Arc<TenantKeys>>,
    scrape: Option<[u8; 32]>,
}

/// The tenant keys, and each one's place by digest.
#[derive(Debug, Default)]
struct TenantKeys {
    list: std::sync::Arc<Vec<TenantKey>>,
    by_digest: std::collections::HashMap<[u8; 32], usize>,
}

impl TenantKeys {
    fn new(list: Vec<TenantKey>) -> TenantKeys {
        let by_digest = list
            .iter()
            .enumerate()
            .map(|(index, key)| (key.digest, index))
            .collect();
        TenantKeys {
            list: std::sync::Arc::new(list),
            by_digest,
        }
    }
}

impl KeyRing {
    /// The keys of a checked config.
    pub fn from_checked(checked: &Checked) -> KeyRing {
        let mut tenants = Vec::new();
        for tenant in &checked.tenants {
            for digest in &tenant.key_digests {
                tenants.push(TenantKey {
                    digest: *digest,
                    tenant: tenant.id.clone(),
                    id: digest_id(digest),
                    from_config: true,
                });
            }
        }
        KeyRing {
            admin: checked.admin_keys.clone(),
            tenants: std::sync::RwLock::new(std::sync::Arc::new(TenantKeys::new(tenants))),
            scrape: checked.scrape_key,
        }
    }

    /// True when `digest` is an admin key's or the scrape token's.
    pub fn is_node_key(&self, digest: &[u8; 32]) -> bool {
        self.admin.contains(digest) || self.scrape.as_ref() == Some(digest)
    }

    /// True when `/metrics` asks for the scrape key.
    pub fn scrape_needs_key(&self) -> bool {
        self.scrape.is_some()
    }

    /// The tenant keys now.
    pub fn tenant_keys(&self) -> std::sync::Arc<Vec<TenantKey>> {
        std::sync::Arc::clone(&self.current().list)
    }

    fn current(&self) -> std::sync::Arc<TenantKeys> {
        std::sync::Arc::clone(
            &self
                .tenants
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Replaces the tenant keys (the API's changes, made durable first).
    pub fn set_tenant_keys(&self, keys: Vec<TenantKey>) {
        *self
            .tenants
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            std::sync::Arc::new(TenantKeys::new(keys));
    }

    /// The principal of a token: its digest compared with every admin key
    /// without stopping at a match, then looked up among the tenant keys.
    pub fn resolve(&self, token: &str) -> Option<Principal> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for candidate in &self.admin {
            if bool::from(candidate.ct_eq(&digest)) {
                found = Some(Principal::Admin);
            }
        }
        let keys = self.current();
        if let Some(key) = keys
            .by_digest
            .get(&digest)
            .and_then(|&at| keys.list.get(at))
        {
            // config's check and `keys` keep admin and tenant digests apart
            found = Some(Principal::Tenant(key.tenant.clone()));
        }
        found
    }

    /// The caller a presented token makes (`None`: no token at all).
    pub fn caller(&self, token: Option<&str>) -> Caller {
        let Some(token) = token else {
            return Caller::Anonymous;
        };
        if let Some(principal) = self.resolve(token) {
            return Caller::Key(principal);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        match &self.scrape {
            Some(scrape) if bool::from(scrape.ct_eq(&digest)) => Caller::Scrape,
            _ => Caller::Invalid,
        }
    }
}

/// The tenant a read addresses: a tenant key reads its own tenant (naming
/// another is 403); an admin key must name one with `?tenant=`.
pub fn tenant_for_read<'p>(
    principal: &'p Principal,
    named: Option<&'p str>,
) -> Result<&'p str, AuthError> {
    match (principal, named) {
        (Principal::Tenant(own), None) => Ok(own),
        (Principal::Tenant(own), Some(named)) if named == own => Ok(own),
        (Principal::Tenant(_), Some(_)) => Err(AuthError::Forbidden(
            "a tenant key can only read its own tenant".into(),
        )),
        (Principal::Admin, Some(named)) => Ok(named),
        (Principal::Admin, None) => Err(AuthError::TenantNeeded),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

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
        KeyRing::from_checked(&config.check().unwrap())
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
    fn callers_are_told_apart() {
        let mut config = Config::parse(
            "[[tenants]]\nid = \"a\"\napi_keys = [\"key-a\"]\ncurrency = \"USD\"\n",
            Vec::new(),
        )
        .unwrap();
        config.prometheus.bearer_token = "scrape-me".into();
        let ring = KeyRing::from_checked(&config.check().unwrap());
        assert_eq!(ring.caller(None), Caller::Anonymous);
        assert_eq!(ring.caller(Some("nope")), Caller::Invalid);
        assert_eq!(ring.caller(Some("scrape-me")), Caller::Scrape);
        assert_eq!(
            ring.caller(Some("key-a")),
            Caller::Key(Principal::Tenant("a".into()))
        );
        assert_eq!(Caller::Scrape.principal(), Err(AuthError::Unauthorized));
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
        let ring = KeyRing::from_checked(&config.check().unwrap());
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
            Err(AuthError::Forbidden(_))
        ));
        assert_eq!(
            tenant_for_read(&Principal::Admin, None),
            Err(AuthError::TenantNeeded)
        );
        assert_eq!(tenant_for_read(&Principal::Admin, Some("b")).unwrap(), "b");
    }
}
