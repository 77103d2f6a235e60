//! `TenantMap`: a tenant's part by tenant id (handles, feeds, lookup tables,
//! alert and experiment books), read on every request from many threads and
//! changed rarely (tenants at run time). A `DashMap` underneath; every read
//! hands out a clone of the part's `Arc`, so no shard lock is ever held
//! across an await.
//! Owns: nothing of a tenant; only where its parts are found.

use std::sync::Arc;

use dashmap::DashMap;

#[derive(Debug)]
pub struct TenantMap<T> {
    parts: DashMap<String, Arc<T>>,
}

impl<T> Default for TenantMap<T> {
    fn default() -> Self {
        TenantMap {
            parts: DashMap::new(),
        }
    }
}

impl<T> FromIterator<(String, Arc<T>)> for TenantMap<T> {
    fn from_iter<I: IntoIterator<Item = (String, Arc<T>)>>(parts: I) -> Self {
        TenantMap {
            parts: parts.into_iter().collect(),
        }
    }
}

impl<T> TenantMap<T> {
    pub fn get(&self, tenant: &str) -> Option<Arc<T>> {
        self.parts
            .get(tenant)
            .map(|entry| Arc::clone(entry.value()))
    }

    pub fn contains(&self, tenant: &str) -> bool {
        self.parts.contains_key(tenant)
    }

    pub fn insert(&self, tenant: &str, part: Arc<T>) {
        self.parts.insert(tenant.to_string(), part);
    }

    pub fn remove(&self, tenant: &str) -> Option<Arc<T>> {
        self.parts.remove(tenant).map(|(_, part)| part)
    }

    pub fn len(&self) -> usize {
        self.parts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The parts `wanted` picks, by tenant id. A tick asks only for the
    /// tenants it has work for: copying 10 000 ids a second to look at each
    /// was most of an idle node's cpu.
    pub fn list_where(&self, wanted: impl Fn(&T) -> bool) -> Vec<(String, Arc<T>)> {
        let mut parts: Vec<(String, Arc<T>)> = self
            .parts
            .iter()
            .filter(|entry| wanted(entry.value()))
            .map(|entry| (entry.key().clone(), Arc::clone(entry.value())))
            .collect();
        parts.sort_by(|a, b| a.0.cmp(&b.0));
        parts
    }

    /// Every part, by tenant id.
    pub fn list(&self) -> Vec<(String, Arc<T>)> {
        self.list_where(|_| true)
    }

    /// Every tenant id, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.parts.iter().map(|entry| entry.key().clone()).collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_come_and_go_and_list_by_id() {
        let map: TenantMap<u32> = [
            ("b".to_string(), Arc::new(2)),
            ("a".to_string(), Arc::new(1)),
        ]
        .into_iter()
        .collect();
        map.insert("c", Arc::new(3));
        assert_eq!(map.ids(), ["a", "b", "c"]);
        assert_eq!(map.get("b").as_deref(), Some(&2));
        assert_eq!(map.remove("b").as_deref(), Some(&2));
        assert!(!map.contains("b"));
        let odd: Vec<(String, u32)> = map
            .list_where(|n| n % 2 == 1)
            .into_iter()
            .map(|(id, n)| (id, *n))
            .collect();
        assert_eq!(odd, [("a".to_string(), 1), ("c".to_string(), 3)]);
        assert_eq!(map.len(), 2);
    }
}
