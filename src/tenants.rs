//! Tenants at run time (API.md §2; docs/api.md, "Tenants"): an admin adds a
//! tenant, changes its keys, or removes it, without a restart. Config tenants
//! are the seed; each change is stored (`Space::Meta`, `tenant/<id>`, with
//! the tenant's key changes in the same commit) before it takes effect, and at
//! start the stored tenants are laid over the config's (`overlay`), so that
//! recovery, the keys and the tables see the same tenants as before the stop.
//! Owns: the stored tenant records, and the order in which a tenant's parts
//! come and go. Must not: keep a secret (keys are stored as digests by
//! `keys`), or decide what a tenant counts (its actors do).
//!
//! A removed tenant's id is retired: it cannot be added again, so that no
//! log record or stored part of the old tenant can ever be counted for a new
//! one after a crash (recovery skips records of tenants it does not know).
//! Config tenants get a record at their first start, so an id dropped from
//! config is retired for the API too.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::{digest_id, TenantKey};
use crate::config::{Config, ConfigIssue};
use crate::domain::tenant::TenantContext;
use crate::keys::{change_op, check_plain, KeyError};
use crate::node::Node;
use crate::storage::envelope::{decode, encode, RecordKind};
use crate::storage::recovery::RecoveredTenant;
use crate::storage::{tenant_prefix, Op, Space, StorageError, Store};

/// A stored tenant: one added through the API, or a removed one (any).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub id: String,
    pub currency: String,
    pub timezone: String,
    pub removed: bool,
    #[serde(rename = "at")]
    pub at_ms: i64,
    /// `api` or `config`: only the API's are laid over config at start.
    #[serde(default = "api_source")]
    pub source: String,
}

fn api_source() -> String {
    "api".into()
}

const PREFIX: &[u8] = b"tenant/";

fn record_key(id: &str) -> Vec<u8> {
    let mut key = PREFIX.to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn record_op(record: &TenantRecord) -> Result<Op, StorageError> {
    let text = serde_json::to_string(record).map_err(|e| StorageError::Io(e.to_string()))?;
    let value =
        encode(RecordKind::Rule, &text).map_err(|e| StorageError::Io(format!("tenant: {e}")))?;
    Ok(Op::Put {
        space: Space::Meta,
        key: record_key(&record.id),
        value,
    })
}

/// The stored tenant records, by id.
pub fn stored(
    store: &dyn Store,
    record_bytes_max: usize,
) -> Result<Vec<TenantRecord>, StorageError> {
    let mut records = Vec::new();
    store.scan(Space::Meta, PREFIX, &mut |key, value| {
        if !key.starts_with(PREFIX) {
            return false;
        }
        let record = decode::<String>(value, RecordKind::Rule, record_bytes_max)
            .ok()
            .and_then(|text| serde_json::from_str::<TenantRecord>(&text).ok());
        match record {
            Some(record) => records.push(record),
            // an unreadable record is left out: a tenant it added does not
            // start, and the log records of that tenant are skipped, loudly
            None => tracing::warn!(
                key = %String::from_utf8_lossy(key),
                "a stored tenant cannot be read; skipped"
            ),
        }
        true
    })?;
    Ok(records)
}

/// Lays the stored tenants over `config`'s: removed tenants go (with the
/// alert rules and budgets that named only them), added ones come. Run once,
/// at start, before the config is checked.
pub fn overlay(config: &mut Config, stored: &[TenantRecord]) {
    for record in stored {
        if record.removed {
            if config.tenants.iter().any(|tenant| tenant.id == record.id) {
                tracing::warn!(tenant = %record.id, "a config tenant was removed through the api; it stays removed");
            }
            config.tenants.retain(|tenant| tenant.id != record.id);
            // a rule or budget that named only removed tenants goes too:
            // with no tenants left it would apply to every one
            config.alerts.retain_mut(|alert| {
                let named = !alert.tenants.is_empty();
                alert.tenants.retain(|id| *id != record.id);
                !(named && alert.tenants.is_empty())
            });
            config.budgets.retain_mut(|budget| {
                let named = !budget.tenants.is_empty();
                budget.tenants.retain(|id| *id != record.id);
                !(named && budget.tenants.is_empty())
            });
        } else if record.source == "api" {
            match config
                .tenants
                .iter_mut()
                .find(|tenant| tenant.id == record.id)
            {
                // config lists it since: the stored currency and time zone
                // stay, since its windows hold them
                Some(listed) => {
                    if listed.currency != record.currency || listed.timezone != record.timezone {
                        tracing::warn!(tenant = %record.id, currency = %record.currency, timezone = %record.timezone, "config lists a tenant added through the api with another currency or time zone; the stored ones stay");
                        listed.currency = record.currency.clone();
                        listed.timezone = record.timezone.clone();
                    }
                }
                None => config.tenants.push(crate::config::TenantConfig {
                    id: record.id.clone(),
                    // its keys are stored digests, laid over by `keys::restore`
                    api_keys: Vec::new(),
                    currency: record.currency.clone(),
                    timezone: record.timezone.clone(),
                }),
            }
        }
    }
}

/// At start, after `overlay`: a record for each config tenant that has none
/// yet (so that an id config drops is retired), and the clean-up of removed
/// tenants' stored data (what a crash, or a write under way, left behind).
/// Written to the store directly: the committer is not running yet.
pub fn settle_at_start(
    store: &dyn Store,
    config: &Config,
    stored: &[TenantRecord],
    now_ms: i64,
) -> Result<(), StorageError> {
    let mut ops = Vec::new();
    for tenant in &config.tenants {
        if !stored.iter().any(|record| record.id == tenant.id) {
            ops.push(record_op(&TenantRecord {
                id: tenant.id.clone(),
                currency: tenant.currency.clone(),
                timezone: tenant.timezone.clone(),
                removed: false,
                at_ms: now_ms,
                source: "config".into(),
            })?);
        }
    }
    for record in stored.iter().filter(|record| record.removed) {
        ops.extend(stored_ops(store, &record.id)?);
        let dir = crate::storage::runs::runs_dir(&config.storage.data_dir, &record.id);
        if dir.exists() {
            if let Err(error) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(tenant = %record.id, %error, "a removed tenant's de-dup runs are not deleted");
            }
        }
    }
    if !ops.is_empty() {
        store.apply(&ops)?;
        store.flush()?;
    }
    Ok(())
}

/// What a PUT asks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub currency: String,
    /// A new tenant's defaults to `UTC`; left out of an update, unchanged.
    #[serde(default)]
    pub timezone: Option<String>,
    /// The tenant's keys, all of them: absent keys are revoked. Left out:
    /// the keys stay as they are.
    #[serde(default)]
    pub api_keys: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("invalid tenant")]
    Invalid(Vec<ConfigIssue>),
    #[error("unknown tenant {0}")]
    Unknown(String),
    #[error("tenant {0} was removed; a tenant id is not used again")]
    Retired(String),
    #[error("tenant {id}'s {field} is {now}; it cannot change (create a new tenant)")]
    Fixed {
        id: String,
        field: &'static str,
        now: String,
    },
    #[error("the node serves admin.tenants_max ({0}) tenants; remove one first")]
    TooMany(usize),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Whether a PUT made the tenant or changed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Created,
    Updated,
}

/// True when the id was ever a tenant's (removed, or dropped from config):
/// anything stored under it belongs to that tenant.
async fn is_retired(node: &Node, id: &str) -> Result<bool, StorageError> {
    let store = Arc::clone(&node.store);
    let key = record_key(id);
    tokio::task::spawn_blocking(move || {
        let mut found = false;
        store.scan(Space::Meta, &key, &mut |stored, _| {
            found = stored == key.as_slice();
            false
        })?;
        Ok(found)
    })
    .await
    .map_err(|e| StorageError::Io(e.to_string()))?
}

/// The key digests a spec names, checked; each problem by its index.
fn spec_digests(node: &Node, id: &str, keys: &[String]) -> Result<Vec<[u8; 32]>, TenantError> {
    let mut issues = Vec::new();
    let mut digests: Vec<[u8; 32]> = Vec::with_capacity(keys.len());
    if keys.len() > node.config.admin.keys_per_tenant_max {
        issues.push(ConfigIssue {
            path: "api_keys".into(),
            message: format!(
                "more keys than admin.keys_per_tenant_max ({})",
                node.config.admin.keys_per_tenant_max
            ),
        });
    }
    for (index, key) in keys.iter().enumerate() {
        let path = format!("api_keys[{index}]");
        if let Err(error) = check_plain(key) {
            issues.push(ConfigIssue {
                path,
                message: error.to_string(),
            });
            continue;
        }
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if digests.contains(&digest) {
            issues.push(ConfigIssue {
                path,
                message: "key is listed more than once".into(),
            });
            continue;
        }
        // a key in use by anyone but this tenant would make one request mean
        // two callers
        let own = node
            .keys
            .tenant_keys()
            .iter()
            .any(|k| k.tenant == id && k.digest == digest);
        if !own && node.keys.caller(Some(key)) != crate::auth::Caller::Invalid {
            issues.push(ConfigIssue {
                path,
                message: "that key is in use".into(),
            });
            continue;
        }
        digests.push(digest);
    }
    if issues.is_empty() {
        Ok(digests)
    } else {
        Err(TenantError::Invalid(issues))
    }
}

/// Creates tenant `id` or changes its keys. A new tenant is stored (with its
/// keys) before it serves; its currency and time zone cannot change later.
/// Runs to its end on its own task: a client that goes away must not leave
/// the store and the registry telling two stories.
pub async fn put(node: &Arc<Node>, id: &str, spec: TenantSpec) -> Result<Put, TenantError> {
    let node = Arc::clone(node);
    let id = id.to_string();
    tokio::spawn(async move { put_now(&node, &id, spec).await })
        .await
        .map_err(|e| TenantError::Storage(StorageError::Io(e.to_string())))?
}

async fn put_now(node: &Arc<Node>, id: &str, spec: TenantSpec) -> Result<Put, TenantError> {
    let mut issues = Vec::new();
    if !crate::config::is_identifier(id, 64) {
        issues.push(ConfigIssue {
            path: "id".into(),
            message: "must match [a-z0-9_-]{1,64}".into(),
        });
    }
    let existing = node.tenant(id);
    // an update that leaves the time zone out keeps it
    let timezone = match (&spec.timezone, &existing) {
        (Some(timezone), _) => timezone.clone(),
        (None, Some(tenant)) => tenant.context.tz.name().to_string(),
        (None, None) => "UTC".to_string(),
    };
    let tz = crate::config::check_tenant_fields("", &spec.currency, &timezone, &mut issues);
    if !issues.is_empty() {
        return Err(TenantError::Invalid(issues));
    }
    let Some(tz) = tz else {
        return Err(TenantError::Invalid(issues));
    };
    let _one_writer = node.tenants_writing.lock().await;
    let _keys_too = node.keys_writing.lock().await;
    let now_ms = node.now_ms();
    if let Some(tenant) = node.tenant(id) {
        if tenant.context.currency != spec.currency {
            return Err(TenantError::Fixed {
                id: id.into(),
                field: "currency",
                now: tenant.context.currency.clone(),
            });
        }
        if tenant.context.tz != tz {
            return Err(TenantError::Fixed {
                id: id.into(),
                field: "timezone",
                now: tenant.context.tz.name().to_string(),
            });
        }
        if let Some(keys) = &spec.api_keys {
            let wanted = spec_digests(node, id, keys)?;
            set_keys(node, id, &wanted, now_ms).await?;
        }
        return Ok(Put::Updated);
    }
    if is_retired(node, id).await? {
        return Err(TenantError::Retired(id.into()));
    }
    let max = node.config.admin.tenants_max;
    if node.tenants.len() >= max {
        return Err(TenantError::TooMany(max));
    }
    let wanted = match &spec.api_keys {
        Some(keys) => spec_digests(node, id, keys)?,
        None => Vec::new(),
    };
    // the rules and budgets config gives every tenant
    let checked = node.config.check().map_err(|issues| {
        StorageError::Io(format!("the node's config no longer checks: {issues:?}"))
    })?;
    let record = TenantRecord {
        id: id.into(),
        currency: spec.currency.clone(),
        timezone,
        removed: false,
        at_ms: now_ms,
        source: api_source(),
    };
    let mut ops = vec![record_op(&record)?];
    for digest in &wanted {
        ops.push(change_op(id, digest, false, now_ms)?);
    }
    let record_bytes_max = node.config.storage.record_bytes_max;
    // every part before the tenant is visible; none reads the store but the
    // (empty) alert and experiment books
    let alerts = crate::alerting::TenantAlerts::restore(
        &*node.store,
        id,
        checked.rules_for(id),
        checked.budgets_for(id),
        now_ms,
        record_bytes_max,
    )?;
    let experiments =
        crate::experiments::TenantExperiments::restore(&*node.store, id, record_bytes_max)?;
    let context = Arc::new(TenantContext {
        id: Arc::from(id),
        currency: spec.currency.clone(),
        tz,
        catalogue: Arc::clone(&node.catalogue),
        limits: node.config.event_limits(),
    });
    // under the snapshot lock: a snapshot sees the tenant in full or not at
    // all, so the log it prunes never holds this tenant's first records
    let _no_snapshot_meanwhile = node.snapshot_lock.lock().await;
    node.committer.commit(ops).await?;
    let fresh = RecoveredTenant::fresh(&node.config, context, now_ms);
    let handle = Arc::new(node.starter.start(fresh));
    node.alerts.insert(id, Arc::new(alerts));
    node.experiments.insert(id, Arc::new(experiments));
    node.lookups
        .insert(id, Arc::new(crate::lookups::TenantLookups::default()));
    node.feeds.insert(id, crate::read::feed::TenantFeed::new());
    node.tenants.insert(id, handle);
    let mut keys = node.keys.tenant_keys().to_vec();
    for digest in wanted {
        keys.push(TenantKey {
            digest,
            tenant: id.into(),
            id: digest_id(&digest),
            from_config: false,
        });
    }
    node.keys.set_tenant_keys(keys);
    crate::telemetry::set_tenants(node.tenants.len());
    tracing::info!(tenant = %id, "tenant added");
    Ok(Put::Created)
}

/// Makes `wanted` the tenant's keys: adds the missing, revokes the others
/// (stored first, in one commit); revoked keys' sessions close.
async fn set_keys(
    node: &Node,
    id: &str,
    wanted: &[[u8; 32]],
    now_ms: i64,
) -> Result<(), TenantError> {
    let keys = node.keys.tenant_keys();
    let have: Vec<&TenantKey> = keys.iter().filter(|key| key.tenant == id).collect();
    let mut ops = Vec::new();
    for digest in wanted {
        if !have.iter().any(|key| key.digest == *digest) {
            ops.push(change_op(id, digest, false, now_ms)?);
        }
    }
    let mut revoked = false;
    for key in &have {
        if !wanted.contains(&key.digest) {
            ops.push(change_op(id, &key.digest, true, now_ms)?);
            revoked = true;
        }
    }
    if ops.is_empty() {
        return Ok(());
    }
    node.committer.commit(ops).await?;
    let mut next: Vec<TenantKey> = keys
        .iter()
        .filter(|key| key.tenant != id || wanted.contains(&key.digest))
        .cloned()
        .collect();
    for digest in wanted {
        if !have.iter().any(|key| key.digest == *digest) {
            next.push(TenantKey {
                digest: *digest,
                tenant: id.into(),
                id: digest_id(digest),
                from_config: false,
            });
        }
    }
    node.keys.set_tenant_keys(next);
    if revoked {
        node.keys_changed.send_modify(|generation| *generation += 1);
    }
    Ok(())
}

/// Removes tenant `id`: stored first (its id retired, its keys revoked), then
/// it stops serving at once: its keys are refused, its live sessions close,
/// its actors stop. What it stored (quarantine, rules, experiments, tables)
/// is deleted after; its log records and de-dup runs go with the snapshots
/// that pass them; the next start deletes what writes under way or a crash
/// left. Runs to its end on its own task, as `put` does.
pub async fn remove(node: &Arc<Node>, id: &str) -> Result<(), TenantError> {
    let node = Arc::clone(node);
    let id = id.to_string();
    tokio::spawn(async move { remove_now(&node, &id).await })
        .await
        .map_err(|e| TenantError::Storage(StorageError::Io(e.to_string())))?
}

async fn remove_now(node: &Arc<Node>, id: &str) -> Result<(), TenantError> {
    let _one_writer = node.tenants_writing.lock().await;
    let _keys_too = node.keys_writing.lock().await;
    let Some(tenant) = node.tenant(id) else {
        return Err(TenantError::Unknown(id.into()));
    };
    let now_ms = node.now_ms();
    let record = TenantRecord {
        id: id.into(),
        currency: tenant.context.currency.clone(),
        timezone: tenant.context.tz.name().to_string(),
        removed: true,
        at_ms: now_ms,
        source: api_source(),
    };
    let keys = node.keys.tenant_keys();
    let mut ops = vec![record_op(&record)?];
    for key in keys.iter().filter(|key| key.tenant == id) {
        ops.push(change_op(id, &key.digest, true, now_ms)?);
    }
    {
        let _no_snapshot_meanwhile = node.snapshot_lock.lock().await;
        node.committer.commit(ops).await?;
        node.tenants.remove(id);
        node.keys.set_tenant_keys(
            keys.iter()
                .filter(|key| key.tenant != id)
                .cloned()
                .collect(),
        );
        node.keys_changed.send_modify(|generation| *generation += 1);
        if let Some(feed) = node.feeds.remove(id) {
            feed.close();
        }
        node.lookups.remove(id);
        node.alerts.remove(id);
        node.experiments.remove(id);
    }
    // its actors stop when the last handle goes (requests under way finish)
    drop(tenant);
    crate::telemetry::set_tenants(node.tenants.len());
    tracing::info!(tenant = %id, "tenant removed");
    // the removal holds; what is left is clean-up, which the next start
    // repeats if it fails here
    if let Err(error) = clean_up(node, id).await {
        tracing::warn!(tenant = %id, %error, "a removed tenant's stored data is not all deleted; the next start tries again");
    }
    Ok(())
}

async fn clean_up(node: &Node, id: &str) -> Result<(), StorageError> {
    let store = Arc::clone(&node.store);
    let tenant_id = id.to_string();
    let dir = crate::storage::runs::runs_dir(&node.config.storage.data_dir, id);
    let deleted = tokio::task::spawn_blocking(move || {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| StorageError::Io(e.to_string()))?;
        }
        stored_ops(&*store, &tenant_id)
    })
    .await
    .map_err(|e| StorageError::Io(e.to_string()))??;
    let count = deleted.len();
    if !deleted.is_empty() {
        node.committer.commit(deleted).await?;
    }
    tracing::info!(tenant = %id, records = count, "a removed tenant's stored data deleted");
    Ok(())
}

/// Removals of everything stored under the tenant's prefix: quarantine,
/// rules, experiments, alert and signal records, and its lookup tables.
fn stored_ops(store: &dyn Store, tenant: &str) -> Result<Vec<Op>, StorageError> {
    let prefix = tenant_prefix(tenant);
    let mut ops = Vec::new();
    for space in [
        Space::Quarantine,
        Space::Rules,
        Space::Experiments,
        Space::Outbox,
    ] {
        store.scan(space, &prefix, &mut |key, _| {
            if !key.starts_with(&prefix) {
                return false;
            }
            ops.push(Op::Remove {
                space,
                key: key.to_vec(),
            });
            true
        })?;
    }
    let mut lookups = b"lookup/".to_vec();
    lookups.extend_from_slice(&prefix);
    store.scan(Space::Meta, &lookups, &mut |key, _| {
        if !key.starts_with(&lookups) {
            return false;
        }
        ops.push(Op::Remove {
            space: Space::Meta,
            key: key.to_vec(),
        });
        true
    })?;
    ops.push(Op::Remove {
        space: Space::Meta,
        key: crate::alertmanager::cursor_key(tenant),
    });
    Ok(ops)
}

/// What `GET /v1/tenants/{id}` shows; `None` for a tenant not serving.
pub fn view(node: &Node, id: &str) -> Option<serde_json::Value> {
    let keys = node.keys.tenant_keys();
    let own: Vec<&TenantKey> = keys.iter().filter(|key| key.tenant == id).collect();
    view_with(node, id, &own)
}

/// What `GET /v1/tenants` shows: every tenant's view, by id, the key list
/// walked once.
pub fn views(node: &Node) -> Vec<serde_json::Value> {
    let keys = node.keys.tenant_keys();
    let mut by_tenant: std::collections::HashMap<&str, Vec<&TenantKey>> =
        std::collections::HashMap::new();
    for key in keys.iter() {
        by_tenant.entry(key.tenant.as_str()).or_default().push(key);
    }
    node.tenant_ids()
        .iter()
        .filter_map(|id| {
            let own = by_tenant.get(id.as_str()).map_or(&[][..], Vec::as_slice);
            view_with(node, id, own)
        })
        .collect()
}

fn view_with(node: &Node, id: &str, own: &[&TenantKey]) -> Option<serde_json::Value> {
    let tenant = node.tenant(id)?;
    let keys: Vec<serde_json::Value> = own
        .iter()
        .map(|key| {
            serde_json::json!({
                "key_id": key.id,
                "source": if key.from_config { "config" } else { "api" },
            })
        })
        .collect();
    let from_config = node.seed_tenants.iter().any(|seed| seed == id);
    Some(serde_json::json!({
        "id": id,
        "currency": tenant.context.currency,
        "currency_minor_digits": crate::domain::event::currency_minor_digits(&tenant.context.currency),
        "timezone": tenant.context.tz.name(),
        "source": if from_config { "config" } else { "api" },
        "keys": keys,
    }))
}
