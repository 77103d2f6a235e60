//! The alert/signal outbox: records persisted before they are published, read
//! back in order from any `seq` so that a client resuming with `since` misses
//! nothing (docs/architecture.md, invariant 7).
//! Owns: the keys (tenant, topic, seq), the next seq per tenant and topic after
//! a restart, and ordered reads. Must not: publish (the live hub does) or flush
//! (records are written through the committer like everything else).

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::envelope::{decode, encode, EnvelopeError, RecordKind};
use super::{tenant_prefix, Op, Space, StorageError, Store};

/// The outbox topics of API.md §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Topic {
    Alerts = 1,
    Signals = 2,
}

fn topic_prefix(tenant: &str, topic: Topic) -> Vec<u8> {
    let mut key = tenant_prefix(tenant);
    key.push(topic as u8);
    key
}

pub fn outbox_key(tenant: &str, topic: Topic, seq: u64) -> Vec<u8> {
    let mut key = topic_prefix(tenant, topic);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The write of one record with its seq.
pub fn append_op<T: Serialize>(
    tenant: &str,
    topic: Topic,
    seq: u64,
    record: &T,
) -> Result<Op, EnvelopeError> {
    Ok(Op::Put {
        space: Space::Outbox,
        key: outbox_key(tenant, topic, seq),
        value: encode(RecordKind::OutboxRecord, record)?,
    })
}

/// The seq the next record of `tenant` and `topic` gets (seqs start at 1 and
/// never go back, also across restarts).
pub fn next_seq(store: &dyn Store, tenant: &str, topic: Topic) -> Result<u64, StorageError> {
    let prefix = topic_prefix(tenant, topic);
    let mut last = 0;
    store.scan(Space::Outbox, &prefix, &mut |key, _| {
        let Some(rest) = key.strip_prefix(prefix.as_slice()) else {
            return false;
        };
        if let Ok(bytes) = <[u8; 8]>::try_from(rest) {
            last = u64::from_be_bytes(bytes);
        }
        true
    })?;
    Ok(last + 1)
}

/// A record as read back: its seq, and the record or why it does not decode.
pub type OutboxEntry<T> = (u64, Result<T, EnvelopeError>);

/// Up to `limit` records with seq greater than `since`, in seq order. A record
/// that does not decode is returned as its error, in its place.
pub fn read_since<T: DeserializeOwned>(
    store: &dyn Store,
    tenant: &str,
    topic: Topic,
    since: u64,
    limit: usize,
    record_bytes_max: usize,
) -> Result<Vec<OutboxEntry<T>>, StorageError> {
    let prefix = topic_prefix(tenant, topic);
    let mut records = Vec::new();
    store.scan(
        Space::Outbox,
        &outbox_key(tenant, topic, since.saturating_add(1)),
        &mut |key, value| {
            let Some(rest) = key.strip_prefix(prefix.as_slice()) else {
                return false;
            };
            let Ok(bytes) = <[u8; 8]>::try_from(rest) else {
                return true;
            };
            records.push((
                u64::from_be_bytes(bytes),
                decode(value, RecordKind::OutboxRecord, record_bytes_max),
            ));
            records.len() < limit
        },
    )?;
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::super::SledStore;
    use super::*;

    #[test]
    fn records_resume_in_order_after_a_restart_and_stay_per_tenant_and_topic() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            assert_eq!(next_seq(&store, "demo", Topic::Alerts).unwrap(), 1);
            let mut ops = Vec::new();
            for seq in 1..=300u64 {
                ops.push(append_op("demo", Topic::Alerts, seq, &format!("alert {seq}")).unwrap());
            }
            ops.push(append_op("demo", Topic::Signals, 1, &"signal 1".to_string()).unwrap());
            ops.push(append_op("demo-2", Topic::Alerts, 1, &"other tenant".to_string()).unwrap());
            store.apply(&ops).unwrap();
            store.flush().unwrap();
        }
        let store = super::super::reopen(dir.path()).unwrap();
        assert_eq!(next_seq(&store, "demo", Topic::Alerts).unwrap(), 301);
        assert_eq!(next_seq(&store, "demo", Topic::Signals).unwrap(), 2);
        assert_eq!(next_seq(&store, "demo-2", Topic::Alerts).unwrap(), 2);
        assert_eq!(next_seq(&store, "dem", Topic::Alerts).unwrap(), 1);
        let page: Vec<OutboxEntry<String>> =
            read_since(&store, "demo", Topic::Alerts, 255, 10, 1 << 20).unwrap();
        let seqs: Vec<u64> = page.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (256..=265).collect::<Vec<u64>>());
        assert_eq!(page[0].1.as_deref(), Ok("alert 256"));
        let tail: Vec<OutboxEntry<String>> =
            read_since(&store, "demo", Topic::Alerts, 299, 10, 1 << 20).unwrap();
        assert_eq!(tail.len(), 1);
        let none: Vec<OutboxEntry<String>> =
            read_since(&store, "demo", Topic::Alerts, 300, 10, 1 << 20).unwrap();
        assert!(none.is_empty());
    }
}
