//! Combining: when every pooled connection is busy, the claims (or completions) waiting for
//! one go to the server together, as one batch statement on the next connection free.
//!
//! A statement costs the server about the same for one record as for several (the
//! statement's start, its plan, its commit and the commit's flush are paid once per
//! statement; for completions, so is the commit's turn at the notification queue, which
//! PostgreSQL serialises across every transaction that notifies), so under load many
//! records per statement is what lets a pool of a few connections keep up with many more
//! operations in flight. When a connection is free, an operation runs alone: combining never
//! makes one wait.
//!
//! The rules that keep an operation from running twice or being lost:
//!
//! - an operation is taken from the queue exactly once, by whoever holds a slot next, and
//!   the batch it joins runs in a task of its own: a caller that goes away (a cancelled
//!   request) cannot take the other operations of its batch down with it;
//! - a caller that goes away while its operation is still queued takes it out of the queue:
//!   an operation nobody waits for is never sent;
//! - a batch never holds one record twice (a repeated record waits for the next batch and
//!   sees the earlier operation), and each operation gets its own answer.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use idem_core::{Error, RecordId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// Operations in one batch statement, at most.
const MAX_BATCH: usize = 64;

/// Operations that can go to the server together.
pub(crate) trait Batch: Clone + Send + Sync + 'static {
    /// One operation.
    type Request: Send + 'static;
    /// Its answer.
    type Output: Send + 'static;
    /// The record an operation is about: a batch holds each record once.
    fn id(request: &Self::Request) -> RecordId;
    /// Runs operations on distinct records and answers each, in order.
    fn run(
        &self,
        requests: &[Self::Request],
    ) -> impl Future<Output = Vec<Result<Self::Output, Error>>> + Send;
}

/// Runs one operation alone while a slot is free, combines them otherwise.
pub(crate) struct Combiner<B: Batch> {
    batch: B,
    /// Statements running at once, shared by every combiner of a store: as many as the pool
    /// has connections.
    slots: Arc<Semaphore>,
    queue: Arc<Mutex<Queue<B>>>,
}

struct Queue<B: Batch> {
    next_ticket: u64,
    waiting: VecDeque<Waiting<B>>,
}

struct Waiting<B: Batch> {
    ticket: u64,
    request: B::Request,
    reply: oneshot::Sender<Result<B::Output, Error>>,
}

impl<B: Batch> Queue<B> {
    fn holds(&self, ticket: u64) -> bool {
        self.waiting.iter().any(|w| w.ticket == ticket)
    }

    /// The oldest waiting operations, one per record, at most `MAX_BATCH`.
    fn take_batch(&mut self) -> Vec<Waiting<B>> {
        let mut ids = HashSet::new();
        let mut batch = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for waiting in self.waiting.drain(..) {
            if batch.len() < MAX_BATCH && ids.insert(B::id(&waiting.request)) {
                batch.push(waiting);
            } else {
                kept.push_back(waiting);
            }
        }
        self.waiting = kept;
        batch
    }
}

/// Takes a queued operation back out of the queue when its caller stops waiting.
struct Withdraw<'a, B: Batch> {
    queue: &'a Mutex<Queue<B>>,
    ticket: u64,
}

impl<B: Batch> Drop for Withdraw<'_, B> {
    fn drop(&mut self) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.waiting.retain(|w| w.ticket != self.ticket);
    }
}

impl<B: Batch> Combiner<B> {
    pub(crate) fn new(batch: B, slots: Arc<Semaphore>) -> Self {
        Self {
            batch,
            slots,
            queue: Arc::new(Mutex::new(Queue {
                next_ticket: 0,
                waiting: VecDeque::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<B>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Operations waiting for a slot.
    pub(crate) fn queued(&self) -> usize {
        self.lock().waiting.len()
    }

    pub(crate) async fn run(&self, request: B::Request) -> Result<B::Output, Error> {
        // A free slot and nobody queued: the operation runs alone, here.
        let mut slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_some() && self.lock().waiting.is_empty() {
            let mut results = self.batch.run(std::slice::from_ref(&request)).await;
            drop(slot);
            return results
                .pop()
                .unwrap_or_else(|| Err(Error::backend("postgres", "no outcome")));
        }

        let (reply, mut answer) = oneshot::channel();
        let ticket = {
            let mut queue = self.lock();
            let ticket = queue.next_ticket;
            queue.next_ticket += 1;
            queue.waiting.push_back(Waiting {
                ticket,
                request,
                reply,
            });
            ticket
        };
        let _withdraw = Withdraw {
            queue: &self.queue,
            ticket,
        };
        loop {
            let permit = match slot.take() {
                Some(permit) => permit,
                None => tokio::select! {
                    biased;
                    answered = &mut answer => return answered.unwrap_or_else(|_| Err(lost())),
                    permit = self.slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return Err(lost()),
                    },
                },
            };
            let (batch, still_queued) = {
                let mut queue = self.lock();
                let batch = queue.take_batch();
                (batch, queue.holds(ticket))
            };
            if !batch.is_empty() {
                tokio::spawn(run_batch(self.batch.clone(), batch, permit));
            }
            if !still_queued {
                return answer.await.unwrap_or_else(|_| Err(lost()));
            }
        }
    }
}

/// Runs one batch on `slot` and answers each of its operations.
async fn run_batch<B: Batch>(batch: B, waiting: Vec<Waiting<B>>, slot: OwnedSemaphorePermit) {
    let (requests, replies): (Vec<_>, Vec<_>) =
        waiting.into_iter().map(|w| (w.request, w.reply)).unzip();
    let results = batch.run(&requests).await;
    drop(slot);
    for (reply, result) in replies.into_iter().zip(results) {
        // A caller that stopped waiting: its operation took effect all the same (the store
        // recorded such a claim as lost when its caller went, and releases what it took).
        let _ = reply.send(result);
    }
}

/// The answer for an operation whose batch ended without one (its task panicked).
fn lost() -> Error {
    Error::Unavailable {
        message: "postgres: a combined operation ended without an answer; its outcome is unknown"
            .into(),
        source: None,
    }
}
