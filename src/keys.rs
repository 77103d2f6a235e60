//! Tenant keys at run time (the hardening issue; docs/api.md, "Tenant keys"):
//! an admin adds a key to a tenant or revokes one (a config key too), without
//! a restart. Each change is stored (`Space::Meta`, `keys/<tenant>\0<id>`)
//! through the committer before the key ring changes; at start the stored
//! changes are laid over the config's keys. A revoked key is refused on its
//! next request, and its live sessions are closed (they watch `changed`).
//! Owns: the stored changes, the secrets it makes. Must not: keep a secret:
//! only digests are stored, and a made secret is shown once.

use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::{digest_id, KeyRing, TenantKey};
use crate::node::Node;
use crate::storage::envelope::{decode, encode, RecordKind};
use crate::storage::{Op, Space, StorageError, Store};

/// A stored change of a tenant's keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KeyChange {
    tenant: String,
    /// Hex SHA-256 of the key.
    digest: String,
    revoked: bool,
    #[serde(rename = "at")]
    at_ms: i64,
}

const PREFIX: &[u8] = b"keys/";

fn change_key(tenant: &str, id: &str) -> Vec<u8> {
    let mut key = PREFIX.to_vec();
    key.extend_from_slice(tenant.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

/// Lays the stored changes over the ring's keys (the config's): revoked keys
/// go, added keys of tenants that exist come. Run once, at start.
pub fn restore(
    store: &dyn Store,
    ring: &KeyRing,
    tenants: &[String],
    record_bytes_max: usize,
) -> Result<(), StorageError> {
    let mut changes = Vec::new();
    store.scan(Space::Meta, PREFIX, &mut |key, value| {
        if !key.starts_with(PREFIX) {
            return false;
        }
        changes.push(value.to_vec());
        true
    })?;
    let mut keys: Vec<TenantKey> = ring.tenant_keys().to_vec();
    let mut read = Vec::with_capacity(changes.len());
    for value in changes {
        let change = decode::<String>(&value, RecordKind::Rule, record_bytes_max)
            .ok()
            .and_then(|text| serde_json::from_str::<KeyChange>(&text).ok());
        match change {
            Some(change) => read.push(change),
            None => tracing::warn!("a stored key change cannot be read; skipped"),
        }
    }
    // in the order they were made (a key's add and revoke share one record,
    // but the same secret may be revoked from one tenant and given to another)
    read.sort_by_key(|change| change.at_ms);
    for change in read {
        let Some(digest) = hex::decode(&change.digest)
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        else {
            continue;
        };
        // a key is its tenant's: a revocation from one tenant leaves the same
        // secret given to another since
        keys.retain(|key| !(key.digest == digest && key.tenant == change.tenant));
        // an admin key or scrape token in config since: one key, one caller
        if !change.revoked && ring.is_node_key(&digest) {
            tracing::warn!(tenant = %change.tenant, key = %digest_id(&digest), "a stored tenant key equals an admin key or the scrape token; it is not restored");
            continue;
        }
        if !change.revoked && tenants.contains(&change.tenant) {
            keys.push(TenantKey {
                digest,
                tenant: change.tenant,
                id: digest_id(&digest),
                from_config: false,
            });
        }
    }
    ring.set_tenant_keys(keys);
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("unknown tenant {0}")]
    UnknownTenant(String),
    #[error("tenant {0} has no key {1}")]
    UnknownKey(String, String),
    #[error("tenant {0} has admin.keys_per_tenant_max ({1}) keys; revoke one first")]
    TooMany(String, usize),
    #[error("that key is in use")]
    InUse,
    #[error("a key must be 16 to 256 bytes of printable ascii, without spaces")]
    BadKey,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// A new secret: 24 random bytes from the kernel, in hex, prefixed.
fn new_secret() -> Result<String, KeyError> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(|error| KeyError::Random(error.to_string()))?;
    Ok(format!("tly_{}", hex::encode(bytes)))
}

/// The stored change of a key: what `restore` lays over the config's keys.
pub(crate) fn change_op(
    tenant: &str,
    digest: &[u8; 32],
    revoked: bool,
    at_ms: i64,
) -> Result<Op, KeyError> {
    let change = KeyChange {
        tenant: tenant.to_string(),
        digest: hex::encode(digest),
        revoked,
        at_ms,
    };
    let text = serde_json::to_string(&change).map_err(|e| KeyError::Random(e.to_string()))?;
    let value = encode(RecordKind::Rule, &text)
        .map_err(|e| StorageError::Io(format!("key change: {e}")))?;
    Ok(Op::Put {
        space: Space::Meta,
        key: change_key(tenant, &digest_id(digest)),
        value,
    })
}

/// A key given by a caller: 16 to 256 bytes of printable ASCII, no space.
pub(crate) fn check_plain(plain: &str) -> Result<(), KeyError> {
    let printable = plain.bytes().all(|b| b.is_ascii_graphic());
    if !(16..=256).contains(&plain.len()) || !printable {
        return Err(KeyError::BadKey);
    }
    Ok(())
}

/// Adds a key to `tenant` (`plain`, or a new secret); stored before it
/// works. Returns its id and the secret (shown only now).
pub async fn add(
    node: &Node,
    tenant: &str,
    plain: Option<String>,
) -> Result<(String, String), KeyError> {
    if node.tenant(tenant).is_none() {
        return Err(KeyError::UnknownTenant(tenant.to_string()));
    }
    let secret = match plain {
        Some(plain) => {
            check_plain(&plain)?;
            plain
        }
        None => new_secret()?,
    };
    let _one_writer = node.keys_writing.lock().await;
    // again under the lock: a removal (which takes it too) may have come between
    if node.tenant(tenant).is_none() {
        return Err(KeyError::UnknownTenant(tenant.to_string()));
    }
    let keys = node.keys.tenant_keys();
    let max = node.config.admin.keys_per_tenant_max;
    if keys.iter().filter(|key| key.tenant == tenant).count() >= max {
        return Err(KeyError::TooMany(tenant.to_string(), max));
    }
    let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    // a key already in use (another tenant's, an admin's, the scrape token)
    // would make one request mean two callers
    if node.keys.caller(Some(&secret)) != crate::auth::Caller::Invalid {
        return Err(KeyError::InUse);
    }
    let id = digest_id(&digest);
    node.committer
        .commit(vec![change_op(tenant, &digest, false, node.now_ms())?])
        .await?;
    let mut keys = keys.to_vec();
    keys.push(TenantKey {
        digest,
        tenant: tenant.to_string(),
        id: id.clone(),
        from_config: false,
    });
    node.keys.set_tenant_keys(keys);
    Ok((id, secret))
}

/// Revokes key `id` of `tenant` (stored first): refused from the next
/// request on, and its live sessions are closed.
pub async fn revoke(node: &Node, tenant: &str, id: &str) -> Result<(), KeyError> {
    if node.tenant(tenant).is_none() {
        return Err(KeyError::UnknownTenant(tenant.to_string()));
    }
    let _one_writer = node.keys_writing.lock().await;
    let keys = node.keys.tenant_keys();
    let Some(key) = keys.iter().find(|key| key.tenant == tenant && key.id == id) else {
        return Err(KeyError::UnknownKey(tenant.to_string(), id.to_string()));
    };
    node.committer
        .commit(vec![change_op(tenant, &key.digest, true, node.now_ms())?])
        .await?;
    let remaining: Vec<TenantKey> = keys
        .iter()
        .filter(|key| !(key.tenant == tenant && key.id == id))
        .cloned()
        .collect();
    node.keys.set_tenant_keys(remaining);
    node.keys_changed.send_modify(|generation| *generation += 1);
    Ok(())
}
