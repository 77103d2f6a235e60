//! Group commit: one thread takes every write set that is queued, writes them
//! all, flushes once, and only then completes them, so concurrent batches share a
//! flush and an acknowledgement always follows the flush that covers it.
//! Write sets complete in the order they were submitted.
//! Must not: retry a failed flush. The first failure poisons the committer: that
//! group and everything after it fail, and `fatal` tells the node to exit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, watch};

use super::{Op, SharedStore, StorageError};

type Completion = oneshot::Sender<Result<(), StorageError>>;

struct WriteSet {
    ops: Vec<Op>,
    done: Completion,
}

#[derive(Default)]
pub struct CommitStats {
    pub flushes: AtomicU64,
    pub write_sets: AtomicU64,
}

struct FailOnExit {
    failed: Arc<AtomicBool>,
    fatal: watch::Sender<Option<String>>,
}

impl Drop for FailOnExit {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.failed.swap(true, Ordering::SeqCst) {
            let _ = self.fatal.send(Some("the commit thread panicked".into()));
        }
    }
}

#[derive(Clone)]
pub struct Committer {
    queue: mpsc::Sender<WriteSet>,
    failed: Arc<AtomicBool>,
    fatal: watch::Receiver<Option<String>>,
    pub stats: Arc<CommitStats>,
}

/// How write sets are flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushMode {
    /// Everything queued shares one flush.
    Group,
    /// One flush per write set (for comparison in benchmarks).
    EachWriteSet,
}

impl Committer {
    /// Starts the commit thread. `queue_max` bounds the write sets waiting.
    pub fn start(
        store: SharedStore,
        queue_max: usize,
        mode: FlushMode,
    ) -> std::io::Result<(Committer, JoinHandle<()>)> {
        let (queue, mut receiver) = mpsc::channel::<WriteSet>(queue_max.max(1));
        let failed = Arc::new(AtomicBool::new(false));
        let (fatal_tx, fatal) = watch::channel(None);
        let stats = Arc::new(CommitStats::default());
        let thread = {
            let failed = Arc::clone(&failed);
            let stats = Arc::clone(&stats);
            std::thread::Builder::new()
                .name("tally-commit".into())
                .spawn(move || {
                    // Whatever ends this thread (a panic in the engine too) is a
                    // storage failure: the node must exit non-zero and restart.
                    let _on_exit = FailOnExit {
                        failed: Arc::clone(&failed),
                        fatal: fatal_tx.clone(),
                    };
                    let mut group: Vec<WriteSet> = Vec::new();
                    while let Some(first) = receiver.blocking_recv() {
                        group.push(first);
                        if mode == FlushMode::Group {
                            while let Ok(more) = receiver.try_recv() {
                                group.push(more);
                            }
                        }
                        let flushing = crate::clock::Stopwatch::start();
                        let result = if failed.load(Ordering::SeqCst) {
                            Err(StorageError::Poisoned)
                        } else {
                            let written = group.iter().try_for_each(|set| store.apply(&set.ops));
                            written.and_then(|()| store.flush())
                        };
                        crate::telemetry::record_flush(flushing.elapsed_secs(), group.len());
                        if let Err(error) = &result {
                            if !failed.swap(true, Ordering::SeqCst) {
                                tracing::error!(%error, "storage write or flush failed; the node will exit");
                                let _ = fatal_tx.send(Some(error.to_string()));
                            }
                        } else {
                            stats.flushes.fetch_add(1, Ordering::Relaxed);
                            stats
                                .write_sets
                                .fetch_add(group.len() as u64, Ordering::Relaxed);
                        }
                        for set in group.drain(..) {
                            let _ = set.done.send(result.clone());
                        }
                    }
                })?
        };
        Ok((
            Committer {
                queue,
                failed,
                fatal,
                stats,
            },
            thread,
        ))
    }

    /// Queues a write set; the receiver resolves once it is durable. An empty
    /// set resolves once everything submitted before it is durable.
    pub fn submit(
        &self,
        ops: Vec<Op>,
    ) -> Result<oneshot::Receiver<Result<(), StorageError>>, StorageError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(StorageError::Poisoned);
        }
        let (done, receiver) = oneshot::channel();
        self.queue
            .try_send(WriteSet { ops, done })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => {
                    StorageError::Io("commit queue is full".into())
                }
                mpsc::error::TrySendError::Closed(_) => StorageError::Poisoned,
            })?;
        Ok(receiver)
    }

    /// Submits and waits.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<(), StorageError> {
        self.submit(ops)?
            .await
            .unwrap_or(Err(StorageError::Poisoned))
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Resolves with the failure once storage has failed.
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.fatal.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{FaultyStore, SledStore, Space};
    use super::*;

    fn put(lsn: u64) -> Vec<Op> {
        vec![Op::Put {
            space: Space::Wal,
            key: lsn.to_be_bytes().to_vec(),
            value: vec![1],
        }]
    }

    #[tokio::test]
    async fn concurrent_write_sets_share_flushes_and_all_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(SledStore::open(dir.path()).unwrap());
        let (committer, _thread) = Committer::start(store.clone(), 1000, FlushMode::Group).unwrap();
        let receivers: Vec<_> = (0..200)
            .map(|lsn| committer.submit(put(lsn)).unwrap())
            .collect();
        for receiver in receivers {
            assert_eq!(receiver.await.unwrap(), Ok(()));
        }
        let mut count = 0;
        store
            .scan(Space::Wal, &[], &mut |_, _| {
                count += 1;
                true
            })
            .unwrap();
        assert_eq!(count, 200);
        assert_eq!(committer.stats.write_sets.load(Ordering::Relaxed), 200);
        assert!(committer.stats.flushes.load(Ordering::Relaxed) <= 200);
    }

    #[tokio::test]
    async fn a_failed_flush_poisons_and_is_never_retried() {
        let dir = tempfile::tempdir().unwrap();
        let faulty = Arc::new(FaultyStore::new(Arc::new(
            SledStore::open(dir.path()).unwrap(),
        )));
        faulty.fail_after_flushes(1);
        let (committer, _thread) =
            Committer::start(faulty.clone(), 10, FlushMode::EachWriteSet).unwrap();
        let mut fatal = committer.fatal();
        assert_eq!(committer.commit(put(1)).await, Ok(()));
        assert!(committer.commit(put(2)).await.is_err());
        assert!(committer.is_failed());
        fatal.changed().await.unwrap();
        assert!(fatal.borrow().is_some());
        assert_eq!(
            committer.submit(put(3)).unwrap_err(),
            StorageError::Poisoned
        );
    }
}
