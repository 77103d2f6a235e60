//! Enrichment (API.md §10; docs/api.md, "Enrichment"): an event's dim looked
//! up in a tenant's table adds the row's dims before the event is counted.
//! Owns: what a lookup adds, and what a miss does (quarantine, or
//! `__unknown__`). Pure: the tables are handed in; nothing here stores them.

use std::collections::HashMap;
use std::sync::Arc;

use super::event::{Reason, ValidEvent};

/// The value of an added dim when a lookup misses with `on_miss = "unknown"`.
pub const UNKNOWN_DIM_VALUE: &str = "__unknown__";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMiss {
    Quarantine,
    Unknown,
}

/// One declared enrichment (`[[enrichments]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrichment {
    pub table: String,
    /// The event dim whose value is looked up.
    pub key: String,
    /// The dims each row supplies, in the order of a row's values.
    pub adds: Vec<String>,
    pub on_miss: OnMiss,
}

/// A lookup table: key → the values of `adds`, in order.
pub type Table = HashMap<String, Vec<String>>;

/// A tenant's tables by name.
pub type Tables = HashMap<String, Arc<Table>>;

/// The lookups one event made: found, and missed with `__unknown__` added
/// (a quarantining miss is the `Err` instead).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lookups {
    pub hits: u32,
    pub unknown: u32,
}

/// Adds the dims of every enrichment whose key the event carries (an event
/// without the key dim is left as it is). A miss adds `__unknown__`, or is
/// `enrichment_miss` when the enrichment quarantines.
pub fn enrich(
    event: &mut ValidEvent,
    enrichments: &[Enrichment],
    tables: &Tables,
) -> Result<Lookups, Reason> {
    let mut lookups = Lookups::default();
    for enrichment in enrichments {
        let Some(key) = event.dim(&enrichment.key) else {
            continue;
        };
        // borrowed from the table, not the event: the event can change below
        let row: Option<&Vec<String>> = tables
            .get(&enrichment.table)
            .and_then(|table| table.get(key));
        match row {
            Some(_) => lookups.hits += 1,
            None if enrichment.on_miss == OnMiss::Quarantine => return Err(Reason::EnrichmentMiss),
            None => lookups.unknown += 1,
        }
        for (index, dim) in enrichment.adds.iter().enumerate() {
            let value = row
                .and_then(|values| values.get(index))
                .map_or_else(|| UNKNOWN_DIM_VALUE.to_string(), String::clone);
            // an added dim replaces what the event said of it
            match event.dims.iter_mut().find(|(name, _)| name == dim) {
                Some(slot) => slot.1 = value,
                None => event.dims.push((dim.clone(), value)),
            }
        }
    }
    Ok(lookups)
}

/// The first quarantining lookup of `dims` that misses: `(table, key)`.
pub fn missing(
    dims: &[(String, String)],
    enrichments: &[Enrichment],
    tables: &Tables,
) -> Option<(String, String)> {
    enrichments
        .iter()
        .filter(|enrichment| enrichment.on_miss == OnMiss::Quarantine)
        .find_map(|enrichment| {
            let key = dims
                .iter()
                .find(|(name, _)| *name == enrichment.key)?
                .1
                .clone();
            let hit = tables
                .get(&enrichment.table)
                .is_some_and(|table| table.contains_key(&key));
            (!hit).then(|| (enrichment.table.clone(), key))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(dims: &[(&str, &str)]) -> ValidEvent {
        ValidEvent {
            id: "e".into(),
            event_type: "order.completed".into(),
            ts_ms: 0,
            amount: Some(1),
            value: None,
            value_integer: None,
            dims: dims
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            experiments: vec![],
            route: Default::default(),
        }
    }

    #[test]
    fn a_hit_adds_its_dims_a_miss_quarantines_or_is_unknown() {
        let stores = Enrichment {
            table: "stores".into(),
            key: "store".into(),
            adds: vec!["region".into(), "format".into()],
            on_miss: OnMiss::Quarantine,
        };
        let mut table = Table::new();
        table.insert("s-1".into(), vec!["north".into(), "mall".into()]);
        let tables: Tables = [("stores".to_string(), Arc::new(table))].into();
        let mut hit = event(&[("store", "s-1"), ("region", "said-by-producer")]);
        assert_eq!(
            enrich(&mut hit, std::slice::from_ref(&stores), &tables),
            Ok(Lookups {
                hits: 1,
                unknown: 0
            })
        );
        assert_eq!(hit.dim("region"), Some("north"));
        assert_eq!(hit.dim("format"), Some("mall"));
        assert_eq!(hit.dims.iter().filter(|(k, _)| k == "region").count(), 1);
        let mut miss = event(&[("store", "s-9")]);
        assert_eq!(
            enrich(&mut miss, std::slice::from_ref(&stores), &tables),
            Err(Reason::EnrichmentMiss)
        );
        assert_eq!(
            missing(&miss.dims, std::slice::from_ref(&stores), &tables),
            Some(("stores".into(), "s-9".into()))
        );
        let unknown = Enrichment {
            on_miss: OnMiss::Unknown,
            ..stores.clone()
        };
        assert_eq!(
            enrich(&mut miss, std::slice::from_ref(&unknown), &tables),
            Ok(Lookups {
                hits: 0,
                unknown: 1
            })
        );
        assert_eq!(miss.dim("region"), Some(UNKNOWN_DIM_VALUE));
        // no key dim: nothing to look up
        let mut plain = event(&[]);
        assert_eq!(
            enrich(&mut plain, &[stores], &tables),
            Ok(Lookups::default())
        );
        assert!(plain.dims.is_empty());
    }
}
