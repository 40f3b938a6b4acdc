//! In-process completion notification, for stores to build
//! [`WaitForCompletion`](crate::WaitForCompletion) on.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use crate::RecordId;

type Waiters = Mutex<HashMap<RecordId, Arc<Notify>>>;

/// A future that resolves when its record is notified.
pub type Settled = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Waiter lists per record id, sharded so that unrelated records do not contend.
///
/// The protocol that loses no wake-up: a waiter calls [`listen`](Self::listen) *before* it
/// reads the record's state, and awaits the returned future only if the record is still in
/// flight; a writer calls [`notify`](Self::notify) *after* the new state is visible.
#[derive(Debug)]
pub struct CompletionNotifier {
    shards: Box<[Waiters]>,
}

impl Default for CompletionNotifier {
    fn default() -> Self {
        Self::new()
    }
}

impl CompletionNotifier {
    /// A notifier with a shard count suited to this machine.
    pub fn new() -> Self {
        let shards =
            (std::thread::available_parallelism().map_or(4, |n| n.get()) * 4).next_power_of_two();
        Self {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, id: &RecordId) -> &Waiters {
        &self.shards[id.shard(self.shards.len())]
    }

    /// Registers interest in `id`; the future resolves at the next [`notify`](Self::notify)
    /// of `id` after this call.
    pub fn listen(&self, id: &RecordId) -> Settled {
        let mut waiters = self
            .shard(id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let notify = waiters.entry(*id).or_default().clone();
        let mut notified = Box::pin(notify.notified_owned());
        // Registered while the shard is locked, so a notify cannot slip in between.
        notified.as_mut().enable();
        drop(waiters);
        notified
    }

    /// Wakes every waiter of `id`.
    pub fn notify(&self, id: &RecordId) {
        let removed = self
            .shard(id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if let Some(notify) = removed {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiter of every id: for a store that may have missed notifications (a
    /// lost connection to the server that sends them). Woken waiters read the record again.
    pub fn notify_all(&self) {
        for shard in self.shards.iter() {
            let drained: Vec<Arc<Notify>> = shard
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain()
                .map(|(_, notify)| notify)
                .collect();
            for notify in drained {
                notify.notify_waiters();
            }
        }
    }

    /// How many ids have registered waiters (for tests and metrics).
    pub fn watched(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}
