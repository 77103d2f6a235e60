//! Lookup tables per tenant (API.md §10; docs/api.md, "Enrichment"): replaced
//! or patched through the API, each change written (`Space::Meta`,
//! `lookup/<tenant>\0<table>`, the whole table) through the committer before
//! it takes effect, and read back at start. Ingest and retries take the
//! current tables (an `Arc`) and hand them to `domain::enrich`.
//! Owns: the tables and their storage. Must not: enrich (the domain does).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::domain::enrich::{Table, Tables};
use crate::node::Node;
use crate::storage::envelope::{decode, encode, RecordKind};
use crate::storage::{Op, Space, StorageError, Store};

const PREFIX: &[u8] = b"lookup/";

fn table_key(tenant: &str, table: &str) -> Vec<u8> {
    let mut key = PREFIX.to_vec();
    key.extend_from_slice(tenant.as_bytes());
    key.push(0);
    key.extend_from_slice(table.as_bytes());
    key
}

/// One tenant's tables.
#[derive(Default)]
pub struct TenantLookups {
    tables: RwLock<Arc<Tables>>,
    /// One change at a time.
    writing: tokio::sync::Mutex<()>,
}

impl TenantLookups {
    pub fn tables(&self) -> Arc<Tables> {
        Arc::clone(
            &self
                .tables
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }
}

/// Every tenant's tables, read back from the store.
pub fn restore(
    store: &dyn Store,
    tenants: &[String],
    record_bytes_max: usize,
) -> Result<HashMap<String, Arc<TenantLookups>>, StorageError> {
    let mut stored = Vec::new();
    store.scan(Space::Meta, PREFIX, &mut |key, value| {
        if !key.starts_with(PREFIX) {
            return false;
        }
        stored.push((key[PREFIX.len()..].to_vec(), value.to_vec()));
        true
    })?;
    let mut by_tenant: HashMap<String, Tables> = HashMap::new();
    for (name, value) in stored {
        let name = String::from_utf8_lossy(&name).to_string();
        let Some((tenant, table)) = name.split_once('\0') else {
            continue;
        };
        let rows = decode::<String>(&value, RecordKind::Rule, record_bytes_max)
            .ok()
            .and_then(|text| serde_json::from_str::<Vec<Vec<String>>>(&text).ok());
        let Some(rows) = rows else {
            tracing::warn!(%tenant, %table, "a lookup table cannot be read; it starts empty");
            continue;
        };
        let table_rows: Table = rows
            .into_iter()
            .filter_map(|mut row| {
                if row.is_empty() {
                    return None;
                }
                let key = row.remove(0);
                Some((key, row))
            })
            .collect();
        by_tenant
            .entry(tenant.to_string())
            .or_default()
            .insert(table.to_string(), Arc::new(table_rows));
    }
    Ok(tenants
        .iter()
        .map(|tenant| {
            let tables = by_tenant.remove(tenant).unwrap_or_default();
            (
                tenant.clone(),
                Arc::new(TenantLookups {
                    tables: RwLock::new(Arc::new(tables)),
                    writing: tokio::sync::Mutex::new(()),
                }),
            )
        })
        .collect())
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no enrichment uses table {0}")]
    UnknownTable(String),
    #[error("unknown tenant {0}")]
    UnknownTenant(String),
    #[error("table {table} would have {rows} rows, more than lookups.rows_per_table_max ({max})")]
    TooMany {
        table: String,
        rows: usize,
        max: usize,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Replaces (`replace`) or patches table `table` of `tenant` with `rows`
/// (key → values in the order of the enrichment's `adds`); written before
/// it takes effect. Returns the rows it then holds.
pub async fn change(
    node: &Node,
    tenant: &str,
    table: &str,
    rows: Vec<(String, Vec<String>)>,
    replace: bool,
) -> Result<usize, LookupError> {
    let lookups = node
        .lookups
        .get(tenant)
        .ok_or_else(|| LookupError::UnknownTenant(tenant.to_string()))?;
    let _one_writer = lookups.writing.lock().await;
    let mut next: Table = if replace {
        Table::new()
    } else {
        lookups
            .tables()
            .get(table)
            .map(|current| (**current).clone())
            .unwrap_or_default()
    };
    next.extend(rows);
    let max = node.config.lookups.rows_per_table_max;
    if next.len() > max {
        return Err(LookupError::TooMany {
            table: table.to_string(),
            rows: next.len(),
            max,
        });
    }
    let mut stored: Vec<Vec<String>> = next
        .iter()
        .map(|(key, values)| {
            let mut row = vec![key.clone()];
            row.extend(values.iter().cloned());
            row
        })
        .collect();
    stored.sort();
    let text = serde_json::to_string(&stored)
        .map_err(|e| StorageError::Io(format!("lookup table: {e}")))?;
    let value = encode(RecordKind::Rule, &text)
        .map_err(|e| StorageError::Io(format!("lookup table: {e}")))?;
    node.committer
        .commit(vec![Op::Put {
            space: Space::Meta,
            key: table_key(tenant, table),
            value,
        }])
        .await?;
    let rows = next.len();
    let mut tables = (*lookups.tables()).clone();
    tables.insert(table.to_string(), Arc::new(next));
    *lookups
        .tables
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(tables);
    Ok(rows)
}
