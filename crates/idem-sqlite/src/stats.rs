//! Counters of what the store did, for tests and metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// What a [`SqliteStore`](crate::SqliteStore) has done since it was opened.
///
/// `commits < ops` shows group commit at work: several operations shared one transaction
/// and one sync to disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SqliteStats {
    /// Operations handed to the writer thread (a `claim_batch` counts once).
    pub submitted: u64,
    /// Operations waiting in the writer's queue right now, not yet taken into a
    /// transaction.
    pub queued: u64,
    /// Operations the writer thread has applied and answered.
    pub ops: u64,
    /// Transactions the writer thread committed: one per batch of operations, each made
    /// durable with one sync.
    pub commits: u64,
    /// Batches whose transaction failed to begin or to commit; every operation in them
    /// got an error.
    pub failed_batches: u64,
    /// The largest number of operations committed in one transaction.
    pub largest_batch: u64,
    /// Claims answered from a read connection: replays of completed records.
    pub replays_from_readers: u64,
    /// Records deleted by purges (the reaper's and [`purge_expired`]'s).
    ///
    /// [`purge_expired`]: idem_core::Store::purge_expired
    pub purged: u64,
    /// Reaper rounds that ended in an error (the next round tries again).
    pub reaper_errors: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) submitted: AtomicU64,
    pub(crate) ops: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) failed_batches: AtomicU64,
    pub(crate) largest_batch: AtomicU64,
    pub(crate) replays_from_readers: AtomicU64,
    pub(crate) purged: AtomicU64,
    pub(crate) reaper_errors: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> SqliteStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SqliteStats {
            submitted: get(&self.submitted),
            queued: 0,
            ops: get(&self.ops),
            commits: get(&self.commits),
            failed_batches: get(&self.failed_batches),
            largest_batch: get(&self.largest_batch),
            replays_from_readers: get(&self.replays_from_readers),
            purged: get(&self.purged),
            reaper_errors: get(&self.reaper_errors),
        }
    }
}
