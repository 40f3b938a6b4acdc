//! The in-memory store: the reference implementation of [`Store`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::notify::CompletionNotifier;
use crate::record::{self, Record, RecordState};
use crate::{
    ClaimOutcome, ClaimRequest, Clock, Error, FencingToken, Inspect, ListFilter, RecordId, Store,
    SystemClock, Timestamp, WaitForCompletion,
};

type Shard = HashMap<RecordId, Record>;

/// Records in memory, in lock-striped shards so that claims on different ids run in
/// parallel. Nothing survives the process: for tests, development and ephemeral use.
///
/// ```
/// use std::sync::Arc;
/// use idem_core::{ClaimOutcome, ClaimRequest, Fingerprint, MemoryStore, RecordId, Store};
///
/// # tokio_test_block_on(async {
/// let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
/// let request = ClaimRequest::new(RecordId::for_event("orders", "evt-1"), Fingerprint::of_bytes(b"{}"));
/// let ClaimOutcome::Acquired(lease) = store.claim(&request).await? else { unreachable!() };
/// store.complete(&lease.id, lease.token, "done".into()).await?;
/// let ClaimOutcome::Completed(done) = store.claim(&request).await? else { unreachable!() };
/// assert_eq!(done.response, "done");
/// # Ok::<(), idem_core::Error>(())
/// # }).unwrap();
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    clock: Arc<dyn Clock>,
    notifier: CompletionNotifier,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// A store on the given clock (tests pass a [`ManualClock`](crate::ManualClock)).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        let shards =
            (std::thread::available_parallelism().map_or(4, |n| n.get()) * 8).next_power_of_two();
        Self {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            clock,
            notifier: CompletionNotifier::new(),
        }
    }

    fn shard(&self, id: &RecordId) -> MutexGuard<'_, Shard> {
        // A panic cannot leave a shard half-written: every write is one `insert`.
        self.shards[id.shard(self.shards.len())]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn claim_one(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Error> {
        let now = self.clock.now();
        let mut shard = self.shard(&request.id);
        let (outcome, write) = record::claim(shard.get(&request.id), request, now)?;
        if let Some(record) = write {
            shard.insert(request.id, record);
        }
        Ok(outcome)
    }

    /// Applies a transition to a held record and notifies waiters if it settled.
    fn transition(
        &self,
        id: &RecordId,
        apply: impl FnOnce(Option<&Record>, Timestamp) -> Result<Record, Error>,
    ) -> Result<Record, Error> {
        let now = self.clock.now();
        let mut shard = self.shard(id);
        let next = apply(shard.get(id), now)?;
        shard.insert(*id, next.clone());
        drop(shard);
        if !matches!(next.state, RecordState::InFlight { .. }) {
            self.notifier.notify(id);
        }
        Ok(next)
    }

    /// How many records are held, live or expired-but-not-purged.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// True when no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Error> {
        self.claim_one(request)
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: FencingToken,
        response: Bytes,
    ) -> Result<(), Error> {
        self.transition(id, |r, now| record::complete(r, *id, token, response, now))
            .map(drop)
    }

    async fn release(&self, id: &RecordId, token: FencingToken) -> Result<(), Error> {
        self.transition(id, |r, now| record::release(r, *id, token, now))
            .map(drop)
    }

    async fn renew(
        &self,
        id: &RecordId,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Timestamp, Error> {
        let next = self.transition(id, |r, now| record::renew(r, *id, token, lease, now))?;
        match next.state {
            RecordState::InFlight { lease_until } => Ok(lease_until),
            _ => unreachable!("renew keeps a record in flight"),
        }
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        let now = self.clock.now();
        Ok(self.shard(id).get(id).filter(|r| r.is_live(now)).cloned())
    }

    async fn claim_batch(&self, requests: &[ClaimRequest]) -> Result<Vec<ClaimOutcome>, Error> {
        for request in requests {
            request.validate()?;
        }
        requests.iter().map(|r| self.claim_one(r)).collect()
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, Error> {
        let now = self.clock.now();
        let mut purged = Vec::new();
        for shard in self.shards.iter() {
            if purged.len() >= limit {
                break;
            }
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let expired: Vec<RecordId> = shard
                .values()
                .filter(|r| !r.is_live(now))
                .map(|r| r.id)
                .take(limit - purged.len())
                .collect();
            for id in expired {
                shard.remove(&id);
                purged.push(id);
            }
        }
        for id in &purged {
            self.notifier.notify(id);
        }
        Ok(purged.len())
    }

    async fn now(&self) -> Result<Timestamp, Error> {
        Ok(self.clock.now())
    }

    fn completion_waiter(&self) -> Option<&dyn WaitForCompletion> {
        Some(self)
    }

    fn inspector(&self) -> Option<&dyn Inspect> {
        Some(self)
    }
}

#[async_trait]
impl WaitForCompletion for MemoryStore {
    async fn wait_settled(&self, id: &RecordId) -> Result<(), Error> {
        let settled = self.notifier.listen(id);
        let now = self.clock.now();
        let in_flight = self
            .shard(id)
            .get(id)
            .is_some_and(|r| r.is_live(now) && matches!(r.state, RecordState::InFlight { .. }));
        if in_flight {
            settled.await;
        }
        Ok(())
    }
}

#[async_trait]
impl Inspect for MemoryStore {
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Record>, Error> {
        let now = self.clock.now();
        let mut found: Vec<Record> = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            found.extend(
                shard
                    .values()
                    .filter(|r| r.is_live(now))
                    .filter(|r| filter.state.is_none_or(|s| r.state.kind() == s))
                    .filter(|r| filter.after.is_none_or(|after| r.id > after))
                    .cloned(),
            );
        }
        found.sort_by_key(|r| r.id);
        found.truncate(filter.limit);
        Ok(found)
    }

    async fn remove(&self, id: &RecordId) -> Result<bool, Error> {
        let existed = self.shard(id).remove(id).is_some();
        self.notifier.notify(id);
        Ok(existed)
    }
}
