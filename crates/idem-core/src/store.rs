//! The store contract.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    ClaimOutcome, ClaimRequest, Error, FencingToken, Record, RecordId, StateKind, Timestamp,
};

/// Where idempotency records live: memory, an embedded file, a shared database.
///
/// Object safe: gateways pick a backend at run time and hold an `Arc<dyn Store>`.
///
/// # Contract
///
/// Every implementation MUST:
/// - apply each operation atomically with respect to every other operation on the same
///   record id, across every process that shares the store, with the outcomes of
///   [`record::claim`](crate::record::claim), [`complete`](crate::record::complete),
///   [`release`](crate::record::release) and [`renew`](crate::record::renew) evaluated
///   against the store's one clock;
/// - issue fencing tokens with [`FencingToken::next`] semantics: strictly greater than every
///   earlier token of the id while the record or its tombstone exists;
/// - make `complete`, `release` and `renew` succeed only for the current token of an in-flight
///   record, and otherwise return [`Error::LeaseLost`] without changing anything;
/// - return a claim's outcome only once the claim is durable to the degree the store
///   documents (the embedded store: synced to disk);
/// - treat a record whose `expires_at` has passed as absent, whether or not it was purged;
/// - store and return response bytes exactly, whatever their content, up to at least 1 MiB;
/// - apply [`claim_batch`](Store::claim_batch) as if each request were claimed in order,
///   so a duplicate id later in the batch sees the earlier one's claim.
///
/// Every implementation SHOULD make [`purge_expired`](Store::purge_expired) run in bounded
/// batches that do not block claims for long.
///
/// # Cancellation
///
/// Dropping a returned future before it completes leaves the operation either applied or
/// not. A dropped `claim`, or one that failed after it may have reached the server, may
/// have taken the record without its caller learning the token: the record then stays in
/// flight until its lease passes and the next claim takes it over
/// ([`ClaimOutcome::TookOver`]). A store SHOULD release such a record itself, as the
/// PostgreSQL and Redis stores do ([`lost`](crate::lost)); it MUST NOT release one the
/// claim took over from an earlier attempt. A caller that executes after a failed claim
/// anyway (a gateway route that fails open) does so without deduplication. No other
/// operation can leave a record locked.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Claims a record (see [`record::decide`](crate::record::decide) for the table).
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Error>;

    /// Stores the result of the holder of `token` and ends its lease.
    async fn complete(
        &self,
        id: &RecordId,
        token: FencingToken,
        response: Bytes,
    ) -> Result<(), Error>;

    /// Gives the record up without a result: the next claim executes again.
    async fn release(&self, id: &RecordId, token: FencingToken) -> Result<(), Error>;

    /// Extends the lease of the holder of `token` to at least `now + lease`; returns the new
    /// end of the lease.
    async fn renew(
        &self,
        id: &RecordId,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Timestamp, Error>;

    /// The live record, if any (expired records are not returned).
    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error>;

    /// Claims many records at once, in order; one outcome per request.
    async fn claim_batch(&self, requests: &[ClaimRequest]) -> Result<Vec<ClaimOutcome>, Error>;

    /// Deletes up to `limit` expired records; returns how many were deleted.
    async fn purge_expired(&self, limit: usize) -> Result<usize, Error>;

    /// The store's time, the clock every lease and expiry decision uses.
    async fn now(&self) -> Result<Timestamp, Error>;

    /// The capability to wait for a record to settle, if the store has it.
    fn completion_waiter(&self) -> Option<&dyn WaitForCompletion> {
        None
    }

    /// The capability to list and inspect records (admin), if the store has it.
    fn inspector(&self) -> Option<&dyn Inspect> {
        None
    }
}

/// Waiting for an in-flight record to settle, woken by the store's notification.
#[async_trait]
pub trait WaitForCompletion: Send + Sync {
    /// Resolves once the record is no longer in flight: completed, released, removed or
    /// expired. Returns at once if it is not in flight when called.
    ///
    /// A lease that passes without a completion does not wake waiters: callers bound the
    /// wait themselves (by dropping the future), then claim again.
    async fn wait_settled(&self, id: &RecordId) -> Result<(), Error>;
}

/// Which records [`Inspect::list`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListFilter {
    /// Only records in this state.
    pub state: Option<StateKind>,
    /// Only records with an id greater than this (the last id of the previous page).
    pub after: Option<RecordId>,
    /// At most this many.
    pub limit: usize,
}

impl Default for ListFilter {
    fn default() -> Self {
        Self {
            state: None,
            after: None,
            limit: 100,
        }
    }
}

/// Admin access to records.
#[async_trait]
pub trait Inspect: Send + Sync {
    /// Live records matching the filter, in ascending id order.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Record>, Error>;

    /// Deletes a record whatever its state (an operator's purge); returns whether one
    /// existed. Its waiters are woken.
    async fn remove(&self, id: &RecordId) -> Result<bool, Error>;
}
