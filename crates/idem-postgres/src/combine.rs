//! Claim combining: when every pooled connection is busy, the claims waiting for one go to
//! the server together, as one batch statement on the next connection free.
//!
//! A claim statement costs the server about the same for one id as for several (the
//! statement's start, its plan, its commit and the commit's flush are paid once per
//! statement), so under load many claims per statement is what lets a pool of a few
//! connections keep up with many more claims in flight. When a connection is free, a claim
//! runs alone, as before: combining never makes a claim wait.
//!
//! The rules that keep a claim from running twice or being lost:
//!
//! - a claim is taken from the queue exactly once, by whoever holds a slot next, and the
//!   batch it joins runs in a task of its own: a caller that goes away (a cancelled
//!   request) cannot take the other claims of its batch down with it;
//! - a caller that goes away while its claim is still queued takes the claim out of the
//!   queue: a claim nobody waits for is never sent;
//! - a batch never holds one id twice (a repeated id waits for the next batch and sees the
//!   earlier claim), and each claim gets its own answer (a record that fails to decode fails
//!   its own claim only).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use idem_core::{ClaimRequest, Error};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::claims::{ClaimResult, Claimer};

/// Claims in one batch statement, at most.
const MAX_BATCH: usize = 64;

/// The claims of a store: runs one alone while a slot is free, combines them otherwise.
pub(crate) struct Combiner {
    claimer: Claimer,
    /// Claim statements running at once: as many as the pool has connections.
    slots: Arc<Semaphore>,
    queue: Arc<Mutex<Queue>>,
}

#[derive(Default)]
struct Queue {
    next_ticket: u64,
    waiting: VecDeque<Waiting>,
}

struct Waiting {
    ticket: u64,
    request: ClaimRequest,
    reply: oneshot::Sender<ClaimResult>,
}

impl Queue {
    fn holds(&self, ticket: u64) -> bool {
        self.waiting.iter().any(|w| w.ticket == ticket)
    }

    /// The oldest waiting claims, one per id, at most `MAX_BATCH`.
    fn take_batch(&mut self) -> Vec<Waiting> {
        let mut ids = HashSet::new();
        let mut batch = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for waiting in self.waiting.drain(..) {
            if batch.len() < MAX_BATCH && ids.insert(waiting.request.id) {
                batch.push(waiting);
            } else {
                kept.push_back(waiting);
            }
        }
        self.waiting = kept;
        batch
    }
}

/// Takes a queued claim back out of the queue when its caller stops waiting.
struct Withdraw<'a> {
    queue: &'a Mutex<Queue>,
    ticket: u64,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.waiting.retain(|w| w.ticket != self.ticket);
    }
}

impl Combiner {
    pub(crate) fn new(claimer: Claimer, slots: usize) -> Self {
        Self {
            claimer,
            slots: Arc::new(Semaphore::new(slots.max(1))),
            queue: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims waiting for a slot.
    pub(crate) fn queued(&self) -> usize {
        self.lock().waiting.len()
    }

    pub(crate) async fn claim(&self, request: &ClaimRequest) -> ClaimResult {
        // A free slot and nobody queued: the claim runs alone, here.
        let mut slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_some() && self.lock().waiting.is_empty() {
            let mut results = self.claimer.claim_each(std::slice::from_ref(request)).await;
            drop(slot);
            return results
                .pop()
                .unwrap_or_else(|| Err(Error::backend("postgres: claim", "no outcome")));
        }

        let (reply, mut answer) = oneshot::channel();
        let ticket = {
            let mut queue = self.lock();
            let ticket = queue.next_ticket;
            queue.next_ticket += 1;
            queue.waiting.push_back(Waiting {
                ticket,
                request: request.clone(),
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
                tokio::spawn(run_batch(self.claimer.clone(), batch, permit));
            }
            if !still_queued {
                return answer.await.unwrap_or_else(|_| Err(lost()));
            }
        }
    }
}

/// Runs one batch on `slot` and answers each of its claims.
async fn run_batch(claimer: Claimer, batch: Vec<Waiting>, slot: OwnedSemaphorePermit) {
    let requests: Vec<ClaimRequest> = batch.iter().map(|w| w.request.clone()).collect();
    let results = claimer.claim_each(&requests).await;
    drop(slot);
    for (waiting, result) in batch.into_iter().zip(results) {
        // A caller that stopped waiting leaves its claim to expire with its lease.
        let _ = waiting.reply.send(result);
    }
}

/// The answer for a claim whose batch ended without one (its task panicked).
fn lost() -> Error {
    Error::Unavailable {
        message: "postgres: a combined claim ended without an answer; its outcome is unknown"
            .into(),
        source: None,
    }
}
