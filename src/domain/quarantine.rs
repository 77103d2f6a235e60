//! One tenant's quarantine: readable events that failed validation, kept with
//! their reason and raw bytes so they can be listed, retried or dropped.
//! Owns: the entries and their ids (`qid`, increasing per tenant), the bound.
//! Must not: validate or count events; when full it evicts the oldest entry and
//! reports it, so the caller can count the eviction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::event::Reason;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantinedEvent {
    pub qid: u64,
    pub reason: Reason,
    pub received_ms: i64,
    /// The event id, when the event had a readable string id.
    pub id: Option<String>,
    /// The raw bytes, cut to the configured limit.
    pub raw: Vec<u8>,
    pub truncated: bool,
}

#[derive(Debug, Clone)]
pub struct QuarantineStore {
    entries: BTreeMap<u64, QuarantinedEvent>,
    next_qid: u64,
    events_max: usize,
    raw_bytes_max: usize,
}

impl QuarantineStore {
    pub fn new(events_max: usize, raw_bytes_max: usize) -> Self {
        QuarantineStore {
            entries: BTreeMap::new(),
            next_qid: 1,
            events_max: events_max.max(1),
            raw_bytes_max,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Stores an event; returns its qid and the entries evicted to make room.
    pub fn insert(
        &mut self,
        reason: Reason,
        received_ms: i64,
        id: Option<String>,
        raw: &[u8],
    ) -> (u64, Vec<QuarantinedEvent>) {
        let mut evicted = Vec::new();
        while self.entries.len() >= self.events_max {
            if let Some((_, entry)) = self.entries.pop_first() {
                evicted.push(entry);
            }
        }
        let qid = self.next_qid;
        self.next_qid += 1;
        let kept = raw.len().min(self.raw_bytes_max);
        self.entries.insert(
            qid,
            QuarantinedEvent {
                qid,
                reason,
                received_ms,
                id,
                raw: raw[..kept].to_vec(),
                truncated: kept < raw.len(),
            },
        );
        (qid, evicted)
    }

    /// Puts back an entry read from storage (recovery). Returns the qids evicted
    /// to keep within the bound.
    pub fn restore(&mut self, entry: QuarantinedEvent) -> Vec<u64> {
        self.next_qid = self.next_qid.max(entry.qid + 1);
        self.entries.insert(entry.qid, entry);
        let mut evicted = Vec::new();
        while self.entries.len() > self.events_max {
            if let Some((qid, _)) = self.entries.pop_first() {
                evicted.push(qid);
            }
        }
        evicted
    }

    /// Makes the next qid at least `next_qid` (recovery of the stored mark).
    pub fn reserve_qids_below(&mut self, next_qid: u64) {
        self.next_qid = self.next_qid.max(next_qid);
    }

    /// Up to `limit` entries with qid greater than `after`, oldest first.
    pub fn list(&self, after: u64, limit: usize) -> Vec<QuarantinedEvent> {
        self.entries
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(_, entry)| entry.clone())
            .collect()
    }

    pub fn get(&self, qid: u64) -> Option<&QuarantinedEvent> {
        self.entries.get(&qid)
    }

    pub fn set_reason(&mut self, qid: u64, reason: Reason) {
        if let Some(entry) = self.entries.get_mut(&qid) {
            entry.reason = reason;
        }
    }

    pub fn remove(&mut self, qid: u64) -> Option<QuarantinedEvent> {
        self.entries.remove(&qid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_store_evicts_the_oldest() {
        let mut store = QuarantineStore::new(2, 4);
        assert_eq!(
            store.insert(Reason::MalformedJson, 1, None, b"abcdef"),
            (1, vec![])
        );
        assert_eq!(store.insert(Reason::MissingId, 2, None, b"{}"), (2, vec![]));
        let (qid, evicted) = store.insert(Reason::InvalidTs, 3, Some("x".into()), b"{}");
        assert_eq!(qid, 3);
        assert_eq!(evicted.iter().map(|e| e.qid).collect::<Vec<_>>(), vec![1]);
        let listed = store.list(0, 10);
        assert_eq!(listed.iter().map(|e| e.qid).collect::<Vec<_>>(), vec![2, 3]);
        assert!(store.get(1).is_none());
    }

    #[test]
    fn raw_bytes_are_cut_and_marked() {
        let mut store = QuarantineStore::new(10, 4);
        let (qid, _) = store.insert(Reason::MalformedJson, 1, None, b"abcdef");
        let entry = store.get(qid).unwrap();
        assert_eq!(entry.raw, b"abcd");
        assert!(entry.truncated);
    }

    #[test]
    fn listing_pages_after_a_qid() {
        let mut store = QuarantineStore::new(10, 64);
        for _ in 0..5 {
            store.insert(Reason::MissingId, 1, None, b"{}");
        }
        let page: Vec<u64> = store.list(2, 2).iter().map(|e| e.qid).collect();
        assert_eq!(page, vec![3, 4]);
        assert!(store.remove(3).is_some());
        assert!(store.remove(3).is_none());
        let page: Vec<u64> = store.list(2, 2).iter().map(|e| e.qid).collect();
        assert_eq!(page, vec![4, 5]);
    }
}
