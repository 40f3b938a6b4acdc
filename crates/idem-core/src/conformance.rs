//! The conformance suite: the checks every [`Store`] must pass.
//!
//! Each check is a public async function named as the sentence it proves. A backend's test
//! file implements [`Harness`] and expands [`conformance_tests!`](crate::conformance_tests),
//! which gives one `#[tokio::test]` per check, so one failure never hides the rest:
//!
//! ```ignore
//! async fn harness() -> idem_core::conformance::ManualHarness {
//!     idem_core::conformance::ManualHarness::new(|clock| Arc::new(MyStore::with_clock(clock)))
//! }
//! idem_core::conformance_tests!(harness);
//! ```
//!
//! Checks use fresh record ids and a fresh store per check, and move time with
//! [`Harness::advance`]: a manual clock for stores that take one, a real sleep for stores
//! on a server's clock.

use std::any::Any;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    ClaimOutcome, ClaimRequest, Clock, Error, FencingToken, Fingerprint, IdempotencyKey, Lease,
    ListFilter, ManualClock, PrincipalHasher, RecordId, RecordState, Scope, StateKind, Store,
    Timestamp,
};

/// A store under test and control of its time.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The store (the same one on every call).
    fn store(&self) -> Arc<dyn Store>;

    /// Moves the store's time forward by at least `by`.
    async fn advance(&self, by: Duration);

    /// True for stores whose server deletes expired records by itself (Redis TTLs), so
    /// that [`Store::purge_expired`] finds nothing to do.
    fn expires_by_itself(&self) -> bool {
        false
    }

    /// A second, independent handle on the same records (another connection pool, as a
    /// second gateway replica would have), for stores shared between processes; `None`
    /// for single-process stores.
    async fn replica(&self) -> Option<Arc<dyn Store>> {
        None
    }
}

/// A [`Harness`] for stores that take a [`Clock`]: time is a [`ManualClock`] and
/// [`advance`](Harness::advance) is instant.
pub struct ManualHarness {
    clock: ManualClock,
    store: Arc<dyn Store>,
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl ManualHarness {
    /// The clock starts at a fixed, realistic time (2026-01-01).
    pub const START: Timestamp = Timestamp::from_millis(1_767_225_600_000);

    /// Builds the store on a manual clock.
    pub fn new(make: impl FnOnce(Arc<dyn Clock>) -> Arc<dyn Store>) -> Self {
        let clock = ManualClock::new(Self::START);
        let store = make(Arc::new(clock.clone()));
        Self {
            clock,
            store,
            _guard: None,
        }
    }

    /// Keeps `guard` (a temporary directory, say) alive as long as the harness.
    pub fn with_guard(mut self, guard: impl Any + Send + Sync) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }

    /// The clock, to move it by hand.
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }
}

#[async_trait]
impl Harness for ManualHarness {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    async fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

/// The lease the checks claim with.
pub const LEASE: Duration = Duration::from_secs(2);
/// The retention the checks claim with.
pub const RETENTION: Duration = Duration::from_secs(10);

/// Record ids no other check (or earlier run against a shared server) has used.
fn fresh_id(label: &str) -> RecordId {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    RecordId::for_event(
        "idem-conformance",
        &format!("{label}/{}/{run}/{n}", std::process::id()),
    )
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of_bytes(s.as_bytes())
}

fn request(id: RecordId, fingerprint: Fingerprint) -> ClaimRequest {
    ClaimRequest::new(id, fingerprint)
        .with_lease(LEASE)
        .with_retention(RETENTION)
}

async fn acquire(store: &dyn Store, request: &ClaimRequest) -> Lease {
    match store.claim(request).await.expect("claim") {
        ClaimOutcome::Acquired(lease) => lease,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

async fn now(store: &dyn Store) -> Timestamp {
    store.now().await.expect("store time")
}

fn assert_lease_lost<T: std::fmt::Debug>(result: Result<T, Error>, what: &str) {
    match result {
        Err(Error::LeaseLost { .. }) => {}
        other => panic!("{what}: expected LeaseLost, got {other:?}"),
    }
}

/// A claim of an absent record acquires it, with a lease of the requested length, and
/// the record is then in flight under that token.
pub async fn claim_on_absent_acquires(h: &dyn Harness) {
    let store = h.store();
    let req = request(fresh_id("absent"), fp("a"));
    let before = now(&*store).await;
    let lease = acquire(&*store, &req).await;
    let after = now(&*store).await;
    assert_eq!(lease.id, req.id);
    assert!(lease.lease_until >= before.saturating_add(LEASE));
    assert!(lease.lease_until <= after.saturating_add(LEASE));
    let record = store
        .get(&req.id)
        .await
        .expect("get")
        .expect("record exists");
    assert_eq!(record.token, lease.token);
    assert_eq!(record.fingerprint, req.fingerprint);
    assert_eq!(
        record.state,
        RecordState::InFlight {
            lease_until: lease.lease_until
        }
    );
}

/// A second claim while the first holds the lease reports in flight with the lease's end,
/// and changes nothing.
pub async fn claim_while_in_flight_reports_lease_end(h: &dyn Harness) {
    let store = h.store();
    let req = request(fresh_id("in-flight"), fp("a"));
    let lease = acquire(&*store, &req).await;
    let before = store.get(&req.id).await.expect("get");
    match store.claim(&req).await.expect("claim") {
        ClaimOutcome::InFlight { lease_until, now } => {
            assert_eq!(lease_until, lease.lease_until);
            // The store's time of the answer, within the lease.
            assert!(
                now < lease_until && now.until(lease_until) <= req.lease,
                "now {now:?}, lease until {lease_until:?}"
            );
        }
        other => panic!("expected in flight, got {other:?}"),
    }
    assert_eq!(store.get(&req.id).await.expect("get"), before);
}

/// The same id with a different fingerprint is a mismatch while in flight.
pub async fn different_fingerprint_in_flight_is_mismatch(h: &dyn Harness) {
    let store = h.store();
    let id = fresh_id("mismatch-in-flight");
    acquire(&*store, &request(id, fp("a"))).await;
    assert_eq!(
        store.claim(&request(id, fp("b"))).await.expect("claim"),
        ClaimOutcome::Mismatch
    );
}

/// The same id with a different fingerprint is a mismatch after completion, and the
/// stored result is untouched.
pub async fn different_fingerprint_after_completion_is_mismatch(h: &dyn Harness) {
    let store = h.store();
    let id = fresh_id("mismatch-completed");
    let lease = acquire(&*store, &request(id, fp("a"))).await;
    store
        .complete(&id, lease.token, Bytes::from_static(b"result"))
        .await
        .expect("complete");
    assert_eq!(
        store.claim(&request(id, fp("b"))).await.expect("claim"),
        ClaimOutcome::Mismatch
    );
    match store.claim(&request(id, fp("a"))).await.expect("claim") {
        ClaimOutcome::Completed(c) => assert_eq!(c.response, "result"),
        other => panic!("expected Completed, got {other:?}"),
    }
}

/// After completion, every claim replays the exact stored bytes and the completing token.
pub async fn complete_then_claim_replays_exact_bytes(h: &dyn Harness) {
    let store = h.store();
    let req = request(fresh_id("replay"), fp("a"));
    let lease = acquire(&*store, &req).await;
    let body = Bytes::from_static(b"HTTP/1.1 201\r\n\r\n{\"id\":\"ch_1\"}\0\xff");
    store
        .complete(&req.id, lease.token, body.clone())
        .await
        .expect("complete");
    for _ in 0..3 {
        match store.claim(&req).await.expect("claim") {
            ClaimOutcome::Completed(c) => {
                assert_eq!(c.response, body);
                assert_eq!(c.token, lease.token);
                assert!(c.expires_at > c.completed_at);
            }
            other => panic!("expected Completed, got {other:?}"),
        }
    }
    let record = store.get(&req.id).await.expect("get").expect("record");
    assert_eq!(record.state.kind(), StateKind::Completed);
}

/// A released record can be claimed again, with any fingerprint, under a larger token.
pub async fn release_allows_reclaim_with_larger_token(h: &dyn Harness) {
    let store = h.store();
    let id = fresh_id("release");
    let first = acquire(&*store, &request(id, fp("a"))).await;
    store.release(&id, first.token).await.expect("release");
    let record = store.get(&id).await.expect("get").expect("tombstone");
    assert_eq!(record.state.kind(), StateKind::Released);
    assert_eq!(record.token, first.token, "the tombstone keeps the token");
    let second = acquire(&*store, &request(id, fp("a"))).await;
    assert!(second.token > first.token);
    store.release(&id, second.token).await.expect("release");
    let third = acquire(&*store, &request(id, fp("different"))).await;
    assert!(third.token > second.token);
}

/// A token that is not the holder's cannot complete, and nothing changes.
pub async fn stale_token_cannot_complete(h: &dyn Harness) {
    let store = h.store();
    let id = fresh_id("stale-complete");
    let lease = acquire(&*store, &request(id, fp("a"))).await;
    let before = store.get(&id).await.expect("get");
    for wrong in [lease.token.get() - 1, lease.token.get() + 1] {
        assert_lease_lost(
            store
                .complete(&id, FencingToken::new(wrong), Bytes::from_static(b"x"))
                .await,
            "complete with a wrong token",
        );
    }
    assert_eq!(store.get(&id).await.expect("get"), before);
}

/// A token that is not the holder's cannot release, and nothing changes.
pub async fn stale_token_cannot_release(h: &dyn Harness) {
    let store = h.store();
    let id = fresh_id("stale-release");
    let lease = acquire(&*store, &request(id, fp("a"))).await;
    let before = store.get(&id).await.expect("get");
    for wrong in [lease.token.get() - 1, lease.token.get() + 1] {
        assert_lease_lost(
            store.release(&id, FencingToken::new(wrong)).await,
            "release with a wrong token",
        );
    }
    assert_eq!(store.get(&id).await.expect("get"), before);
}

/// A token that is not the holder's cannot renew, and nothing changes.
pub async fn stale_token_cannot_renew(h: &dyn Harness) {
    let store = h.store();
    let id = fresh_id("stale-renew");
    let lease = acquire(&*store, &request(id, fp("a"))).await;
    let before = store.get(&id).await.expect("get");
    for wrong in [lease.token.get() - 1, lease.token.get() + 1] {
        assert_lease_lost(
            store.renew(&id, FencingToken::new(wrong), LEASE * 10).await,
            "renew with a wrong token",
        );
    }
    assert_eq!(store.get(&id).await.expect("get"), before);
}

/// An id that was never claimed cannot be completed, released or renewed.
pub async fn unknown_record_cannot_be_completed_released_or_renewed(h: &dyn Harness) {
    let store = h.store();
    let id = fresh_id("unknown");
    let token = FencingToken::new(1);
    match store.complete(&id, token, Bytes::new()).await {
        Err(Error::LeaseLost { current: None, .. }) => {}
        other => panic!("expected LeaseLost without a current token, got {other:?}"),
    }
    assert_lease_lost(store.release(&id, token).await, "release");
    assert_lease_lost(store.renew(&id, token, LEASE).await, "renew");
    assert_eq!(store.get(&id).await.expect("get"), None);
}

/// A lease that passed is taken over by the next claim, which is told so and gets a larger
/// token; before it passes, the claim reports in flight.
pub async fn expired_lease_is_taken_over_and_reported(h: &dyn Harness) {
    let store = h.store();
    let req = request(fresh_id("takeover"), fp("a"));
    let first = acquire(&*store, &req).await;
    h.advance(LEASE / 2).await;
    assert!(matches!(
        store.claim(&req).await.expect("claim"),
        ClaimOutcome::InFlight { .. }
    ));
    h.advance(LEASE).await;
    match store.claim(&req).await.expect("claim") {
        ClaimOutcome::TookOver {
            lease,
            previous_token,
            previous_lease_until,
        } => {
            assert_eq!(previous_token, first.token);
            assert_eq!(previous_lease_until, first.lease_until);
            assert!(lease.token > first.token);
            assert!(lease.lease_until > first.lease_until);
        }
        other => panic!("expected TookOver, got {other:?}"),
    }
}

/// The holder from before a takeover can neither complete, release nor renew; the new
/// holder's result is what replays.
pub async fn holder_from_before_a_takeover_is_fenced_off(h: &dyn Harness) {
    let store = h.store();
    let req = request(fresh_id("fenced-takeover"), fp("a"));
    let old = acquire(&*store, &req).await;
    h.advance(LEASE + Duration::from_millis(100)).await;
    let new = store
        .claim(&req)
        .await
        .expect("claim")
        .lease()
        .copied()
        .expect("took over");
    assert_lease_lost(
        store
            .complete(&req.id, old.token, Bytes::from_static(b"old"))
            .await,
        "old holder completes",
    );
    assert_lease_lost(
        store.release(&req.id, old.token).await,
        "old holder releases",
    );
    assert_lease_lost(
        store.renew(&req.id, old.token, LEASE).await,
        "old holder renews",
    );
    store
        .complete(&req.id, new.token, Bytes::from_static(b"new"))
        .await
        .expect("new holder completes");
    assert_lease_lost(
        store
            .complete(&req.id, old.token, Bytes::from_static(b"old"))
            .await,
        "old holder completes after the new one",
    );
    match store.claim(&req).await.expect("claim") {
        ClaimOutcome::Completed(c) => {
            assert_eq!(c.response, "new");
            assert_eq!(c.token, new.token);
        }
        other => panic!("expected Completed, got {other:?}"),
    }
}

/// A holder that released, after someone else re-claimed, can neither complete, release
/// nor renew.
pub async fn holder_from_before_a_release_and_reclaim_is_fenced_off(h: &dyn Harness) {
    let store = h.store();
    let id = fresh_id("fenced-release");
    let old = acquire(&*store, &request(id, fp("a"))).await;
    store.release(&id, old.token).await.expect("release");
    assert_lease_lost(
        store
            .complete(&id, old.token, Bytes::from_static(b"x"))
            .await,
        "complete after own release",
    );
    let new = acquire(&*store, &request(id, fp("a"))).await;
    let before = store.get(&id).await.expect("get");
    assert_lease_lost(
        store
            .complete(&id, old.token, Bytes::from_static(b"x"))
            .await,
        "complete after re-claim",
    );
    assert_lease_lost(
        store.release(&id, old.token).await,
        "release after re-claim",
    );
    assert_lease_lost(
        store.renew(&id, old.token, LEASE).await,
        "renew after re-claim",
    );
    assert_eq!(store.get(&id).await.expect("get"), before);
    store
        .complete(&id, new.token, Bytes::from_static(b"y"))
        .await
        .expect("the new holder completes");
}

/// A completed record cannot be completed, released or renewed again, even by its holder.
pub async fn completed_record_cannot_change(h: &dyn Harness) {
    let store = h.store();
    let id = fresh_id("completed-final");
    let lease = acquire(&*store, &request(id, fp("a"))).await;
    store
        .complete(&id, lease.token, Bytes::from_static(b"first"))
        .await
        .expect("complete");
    let before = store.get(&id).await.expect("get");
    assert_lease_lost(
        store
            .complete(&id, lease.token, Bytes::from_static(b"second"))
            .await,
        "complete twice",
    );
    assert_lease_lost(store.release(&id, lease.token).await, "release completed");
    assert_lease_lost(
        store.renew(&id, lease.token, LEASE).await,
        "renew completed",
    );
    assert_eq!(store.get(&id).await.expect("get"), before);
}

/// Renewing extends the lease: past the original end, the claim is still in flight, and
/// the holder can still complete.
pub async fn renew_extends_lease(h: &dyn Harness) {
    let store = h.store();
    let req = request(fresh_id("renew"), fp("a"));
    let lease = acquire(&*store, &req).await;
    h.advance(LEASE / 2).await;
    let renewed_until = store
        .renew(&req.id, lease.token, LEASE * 3)
        .await
        .expect("renew");
    assert!(renewed_until > lease.lease_until);
    h.advance(LEASE).await;
    match store.claim(&req).await.expect("claim") {
        ClaimOutcome::InFlight { lease_until, now } => {
            assert_eq!(lease_until, renewed_until);
            assert!(
                now < renewed_until,
                "now {now:?}, lease until {renewed_until:?}"
            );
        }
        other => panic!("expected in flight, got {other:?}"),
    }
    store
        .complete(&req.id, lease.token, Bytes::from_static(b"done"))
        .await
        .expect("complete after the original lease end");
}

/// A completed record replays until its retention ends; then it is gone and the next
/// claim acquires it under a larger token.
pub async fn completed_record_expires_after_retention_then_is_claimable(h: &dyn Harness) {
    let store = h.store();
    let req = request(fresh_id("retention"), fp("a"));
    let lease = acquire(&*store, &req).await;
    store
        .complete(&req.id, lease.token, Bytes::from_static(b"r"))
        .await
        .expect("complete");
    h.advance(RETENTION / 2).await;
    assert!(matches!(
        store.claim(&req).await.expect("claim"),
        ClaimOutcome::Completed(_)
    ));
    h.advance(RETENTION).await;
    assert_eq!(store.get(&req.id).await.expect("get"), None);
    let again = acquire(&*store, &req).await;
    assert!(again.token > lease.token);
}

/// Tokens keep increasing after a record was purged at the end of its retention.
pub async fn tokens_increase_across_purge(h: &dyn Harness) {
    let store = h.store();
    let req = request(fresh_id("purge-token"), fp("a"));
    let lease = acquire(&*store, &req).await;
    store.release(&req.id, lease.token).await.expect("release");
    h.advance(RETENTION + LEASE).await;
    while store.purge_expired(10_000).await.expect("purge") > 0 {}
    let again = acquire(&*store, &req).await;
    assert!(again.token > lease.token);
}

/// Purge deletes expired records only (completed, released and abandoned in-flight ones),
/// respects its limit, and leaves live records as they were.
pub async fn purge_removes_only_expired_records(h: &dyn Harness) {
    let store = h.store();
    // Expired by the end: one of each state.
    let done = fresh_id("purge-done");
    let lease = acquire(&*store, &request(done, fp("a"))).await;
    store
        .complete(&done, lease.token, Bytes::new())
        .await
        .expect("complete");
    let released = fresh_id("purge-released");
    let lease = acquire(&*store, &request(released, fp("a"))).await;
    store
        .release(&released, lease.token)
        .await
        .expect("release");
    let abandoned = fresh_id("purge-abandoned");
    acquire(&*store, &request(abandoned, fp("a"))).await;

    h.advance(LEASE + RETENTION + Duration::from_secs(1)).await;

    // Live by the end: one of each state.
    let live_done = fresh_id("purge-live-done");
    let lease = acquire(&*store, &request(live_done, fp("a"))).await;
    store
        .complete(&live_done, lease.token, Bytes::from_static(b"keep"))
        .await
        .expect("complete");
    let live_released = fresh_id("purge-live-released");
    let lease = acquire(&*store, &request(live_released, fp("a"))).await;
    store
        .release(&live_released, lease.token)
        .await
        .expect("release");
    let live_in_flight = fresh_id("purge-live-in-flight");
    acquire(&*store, &request(live_in_flight, fp("a"))).await;

    let mut before = Vec::new();
    for id in [live_done, live_released, live_in_flight] {
        before.push(store.get(&id).await.expect("get").expect("live record"));
    }
    if h.expires_by_itself() {
        assert_eq!(store.purge_expired(100).await.expect("purge"), 0);
    } else {
        assert_eq!(store.purge_expired(1).await.expect("purge"), 1);
        assert_eq!(store.purge_expired(100).await.expect("purge"), 2);
        assert_eq!(store.purge_expired(100).await.expect("purge"), 0);
    }
    for record in before {
        assert_eq!(store.get(&record.id).await.expect("get"), Some(record));
    }
    for id in [done, released, abandoned] {
        assert_eq!(store.get(&id).await.expect("get"), None);
    }
}

/// Namespace, principal, method, route and key each separate records: the same key in
/// another scope is a different record.
pub async fn scopes_are_isolated(h: &dyn Harness) {
    let store = h.store();
    let hasher = PrincipalHasher::new(b"conformance");
    let namespace = format!("ns-{}", fresh_id("scopes").to_hex());
    let key = IdempotencyKey::parse(b"same-key").expect("key");
    let other_key = IdempotencyKey::parse(b"other-key").expect("key");
    let alice = hasher.hash(b"alice");
    let scopes = [
        Scope::new(&namespace, alice, "POST", "/v1/charges", &key),
        Scope::new(
            "other-namespace-for-isolation",
            alice,
            "POST",
            "/v1/charges",
            &key,
        ),
        Scope::new(&namespace, hasher.hash(b"bob"), "POST", "/v1/charges", &key),
        Scope::new(
            &namespace,
            crate::PrincipalHash::ANONYMOUS,
            "POST",
            "/v1/charges",
            &key,
        ),
        Scope::new(&namespace, alice, "PATCH", "/v1/charges", &key),
        Scope::new(&namespace, alice, "POST", "/v1/refunds", &key),
        Scope::new(&namespace, alice, "POST", "/v1/charges", &other_key),
    ];
    let ids: Vec<RecordId> = scopes.iter().map(Scope::record_id).collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
    // The first scope completes; every other scope is still absent and acquires.
    let lease = acquire(&*store, &request(ids[0], fp("a"))).await;
    store
        .complete(&ids[0], lease.token, Bytes::from_static(b"alice's"))
        .await
        .expect("complete");
    for id in &ids[1..] {
        let lease = acquire(&*store, &request(*id, fp("a"))).await;
        store
            .complete(id, lease.token, Bytes::from_static(b"other"))
            .await
            .expect("complete");
    }
    match store.claim(&request(ids[0], fp("a"))).await.expect("claim") {
        ClaimOutcome::Completed(c) => assert_eq!(c.response, "alice's"),
        other => panic!("expected Completed, got {other:?}"),
    }
}

/// 64 concurrent claims of one id elect exactly one owner; the others see it in flight.
pub async fn concurrent_claims_elect_exactly_one_owner(h: &dyn Harness) {
    let store = h.store();
    let req = request(fresh_id("race"), fp("a"));
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let store = store.clone();
            let req = req.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store.claim(&req).await
            })
        })
        .collect();
    let mut owners = Vec::new();
    let mut in_flight = 0;
    for task in tasks {
        match task.await.expect("task").expect("claim") {
            ClaimOutcome::Acquired(lease) => owners.push(lease),
            ClaimOutcome::InFlight { .. } => in_flight += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(owners.len(), 1, "exactly one owner");
    assert_eq!(in_flight, 63);
    let record = store.get(&req.id).await.expect("get").expect("record");
    assert_eq!(record.token, owners[0].token);
}

/// A batch of 1,000 claims with duplicates inside the batch and against earlier records
/// gives, in order, the outcome a sequence of single claims would.
pub async fn batch_claim_handles_duplicates_within_and_across_batches(h: &dyn Harness) {
    let store = h.store();
    let ids: Vec<RecordId> = (0..900).map(|i| fresh_id(&format!("batch-{i}"))).collect();
    let mut old_tokens = Vec::new();
    // Earlier records: 0..100 completed, 100..200 in flight, 200..300 released.
    for (i, id) in ids[..300].iter().enumerate() {
        let lease = acquire(&*store, &request(*id, fp("a"))).await;
        match i / 100 {
            0 => store
                .complete(id, lease.token, Bytes::from(format!("done-{i}")))
                .await
                .expect("complete"),
            1 => {}
            _ => store.release(id, lease.token).await.expect("release"),
        }
        old_tokens.push(lease.token);
    }
    let mut batch: Vec<ClaimRequest> = ids.iter().map(|id| request(*id, fp("a"))).collect();
    // Duplicates inside the batch: 300..350 same fingerprint, 350..400 a different one.
    batch.extend(ids[300..350].iter().map(|id| request(*id, fp("a"))));
    batch.extend(ids[350..400].iter().map(|id| request(*id, fp("b"))));
    assert_eq!(batch.len(), 1_000);
    let outcomes = store.claim_batch(&batch).await.expect("batch claim");
    assert_eq!(outcomes.len(), 1_000);
    for (i, outcome) in outcomes.iter().enumerate() {
        match (i, outcome) {
            (0..100, ClaimOutcome::Completed(c)) => {
                assert_eq!(c.response, format!("done-{i}"));
            }
            (100..200, ClaimOutcome::InFlight { .. }) => {}
            (200..300, ClaimOutcome::Acquired(lease)) => assert!(lease.token > old_tokens[i]),
            (300..900, ClaimOutcome::Acquired(lease)) => assert_eq!(lease.id, ids[i]),
            (900..950, ClaimOutcome::InFlight { lease_until, .. }) => {
                assert_eq!(
                    Some(*lease_until),
                    outcomes[i - 600].lease().map(|l| l.lease_until)
                );
            }
            (950..1000, ClaimOutcome::Mismatch) => {}
            _ => panic!("request {i}: unexpected {outcome:?}"),
        }
    }
    // The batch's claims are real: completing one replays it.
    let lease = *outcomes[300].lease().expect("lease");
    store
        .complete(&lease.id, lease.token, Bytes::from_static(b"from batch"))
        .await
        .expect("complete");
    assert!(matches!(
        store.claim(&batch[300]).await.expect("claim"),
        ClaimOutcome::Completed(_)
    ));
}

/// Responses round-trip byte for byte: every byte value, an empty body, and 1 MiB.
pub async fn binary_payloads_round_trip(h: &dyn Harness) {
    let store = h.store();
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let mib: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    for (label, payload) in [
        ("all-bytes", all_bytes),
        ("empty", Vec::new()),
        ("one-mib", mib),
    ] {
        let req = request(fresh_id(label), fp(label));
        let lease = acquire(&*store, &req).await;
        let payload = Bytes::from(payload);
        store
            .complete(&req.id, lease.token, payload.clone())
            .await
            .expect("complete");
        match store.claim(&req).await.expect("claim") {
            ClaimOutcome::Completed(c) => assert!(c.response == payload, "{label} differs"),
            other => panic!("expected Completed, got {other:?}"),
        }
        match store.get(&req.id).await.expect("get").map(|r| r.state) {
            Some(RecordState::Completed { response, .. }) => assert!(response == payload),
            other => panic!("expected a completed record, got {other:?}"),
        }
    }
}

/// Waiters on an in-flight record are woken when it completes or is released, and a wait
/// on a settled record returns at once.
pub async fn waiters_are_woken_on_completion(h: &dyn Harness) {
    let store = h.store();
    assert!(
        store.completion_waiter().is_some(),
        "every store must support waiting for completion"
    );
    for settle_by_completing in [true, false] {
        let id = fresh_id("wait");
        let lease = acquire(&*store, &request(id, fp("a"))).await;
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let waiter = store.completion_waiter().expect("waiter");
                    waiter.wait_settled(&id).await
                })
            })
            .collect();
        // Let the waiters register; none may finish while the record is in flight.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        if settle_by_completing {
            store
                .complete(&id, lease.token, Bytes::from_static(b"x"))
                .await
                .expect("complete");
        } else {
            store.release(&id, lease.token).await.expect("release");
        }
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(30), waiter)
                .await
                .expect("woken")
                .expect("task")
                .expect("wait");
        }
        let waiter = store.completion_waiter().expect("waiter");
        tokio::time::timeout(Duration::from_secs(30), waiter.wait_settled(&id))
            .await
            .expect("a settled record does not block")
            .expect("wait");
    }
}

/// For stores shared between processes: a waiter on one replica is woken when another
/// replica completes or releases the record, and each replica sees the other's claims.
/// Single-process stores (no [`Harness::replica`]) have nothing to show here.
pub async fn replicas_see_each_others_claims_and_wake_each_others_waiters(h: &dyn Harness) {
    let Some(replica) = h.replica().await else {
        return;
    };
    let store = h.store();
    for settle_by_completing in [true, false] {
        let req = request(fresh_id("replica"), fp("a"));
        let lease = acquire(&*store, &req).await;
        assert!(matches!(
            replica.claim(&req).await.expect("claim on the replica"),
            ClaimOutcome::InFlight { .. }
        ));
        let waiter_store = replica.clone();
        let id = req.id;
        let waiter = tokio::spawn(async move {
            let waiter = waiter_store.completion_waiter().expect("waiter");
            waiter.wait_settled(&id).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        if settle_by_completing {
            store
                .complete(
                    &id,
                    lease.token,
                    Bytes::from_static(b"from the first replica"),
                )
                .await
                .expect("complete");
        } else {
            store.release(&id, lease.token).await.expect("release");
        }
        tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("the replica's waiter is woken")
            .expect("task")
            .expect("wait");
        match replica.claim(&req).await.expect("claim on the replica") {
            ClaimOutcome::Completed(c) if settle_by_completing => {
                assert_eq!(c.response, "from the first replica");
            }
            ClaimOutcome::Acquired(again) if !settle_by_completing => {
                assert!(again.token > lease.token);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The store works as a shared `Arc<dyn Store>` across tasks.
pub async fn store_is_usable_as_shared_trait_object(h: &dyn Harness) {
    let store: Arc<dyn Store> = h.store();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let req = request(fresh_id(&format!("dyn-{i}")), fp("a"));
                let lease = acquire(&*store, &req).await;
                store
                    .complete(&req.id, lease.token, Bytes::from(vec![i as u8; 8]))
                    .await
                    .expect("complete");
                req
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let req = task.await.expect("task");
        match store.claim(&req).await.expect("claim") {
            ClaimOutcome::Completed(c) => assert_eq!(c.response, vec![i as u8; 8]),
            other => panic!("expected Completed, got {other:?}"),
        }
    }
}

/// Requests with a zero lease or retention are rejected and change nothing.
pub async fn invalid_requests_are_rejected(h: &dyn Harness) {
    let store = h.store();
    let id = fresh_id("invalid");
    for bad in [
        request(id, fp("a")).with_lease(Duration::ZERO),
        request(id, fp("a")).with_retention(Duration::ZERO),
    ] {
        assert!(matches!(
            store.claim(&bad).await,
            Err(Error::InvalidRequest { .. })
        ));
        assert!(matches!(
            store
                .claim_batch(&[request(fresh_id("ok"), fp("a")), bad])
                .await,
            Err(Error::InvalidRequest { .. })
        ));
    }
    assert_eq!(store.get(&id).await.expect("get"), None);
}

/// The admin capability lists live records by state in id order, pages with `after`, and
/// removes a record (waking its waiters).
pub async fn inspector_lists_and_removes_records(h: &dyn Harness) {
    let store = h.store();
    let inspector = store
        .inspector()
        .expect("every store must support inspection");
    let ids: Vec<RecordId> = (0..6).map(|i| fresh_id(&format!("inspect-{i}"))).collect();
    for (i, id) in ids.iter().enumerate() {
        let lease = acquire(&*store, &request(*id, fp("a"))).await;
        if i % 2 == 0 {
            store
                .complete(id, lease.token, Bytes::new())
                .await
                .expect("complete");
        }
    }
    let mut in_flight = Vec::new();
    let mut after = None;
    loop {
        let page = inspector
            .list(&ListFilter {
                state: Some(StateKind::InFlight),
                after,
                limit: 2,
            })
            .await
            .expect("list");
        assert!(page.len() <= 2);
        assert!(page.windows(2).all(|w| w[0].id < w[1].id));
        assert!(page.iter().all(|r| r.state.kind() == StateKind::InFlight));
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        in_flight.extend(page.iter().map(|r| r.id));
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(in_flight.contains(id), i % 2 == 1, "record {i}");
    }
    let waiter_store = store.clone();
    let target = ids[1];
    let waiter = tokio::spawn(async move {
        let waiter = waiter_store.completion_waiter().expect("waiter");
        waiter.wait_settled(&target).await
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(inspector.remove(&ids[1]).await.expect("remove"));
    assert!(!inspector.remove(&ids[1]).await.expect("remove again"));
    assert_eq!(store.get(&ids[1]).await.expect("get"), None);
    tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("woken by removal")
        .expect("task")
        .expect("wait");
}

/// Expands to one `#[tokio::test]` per conformance check, each calling `$make().await` for
/// a fresh [`Harness`]. The calling crate needs `tokio` (with `macros` and
/// `rt-multi-thread`) as a dev-dependency.
#[macro_export]
macro_rules! conformance_tests {
    ($make:path) => {
        $crate::__conformance_tests!(
            $make;
            claim_on_absent_acquires,
            claim_while_in_flight_reports_lease_end,
            different_fingerprint_in_flight_is_mismatch,
            different_fingerprint_after_completion_is_mismatch,
            complete_then_claim_replays_exact_bytes,
            release_allows_reclaim_with_larger_token,
            stale_token_cannot_complete,
            stale_token_cannot_release,
            stale_token_cannot_renew,
            unknown_record_cannot_be_completed_released_or_renewed,
            expired_lease_is_taken_over_and_reported,
            holder_from_before_a_takeover_is_fenced_off,
            holder_from_before_a_release_and_reclaim_is_fenced_off,
            completed_record_cannot_change,
            renew_extends_lease,
            completed_record_expires_after_retention_then_is_claimable,
            tokens_increase_across_purge,
            purge_removes_only_expired_records,
            scopes_are_isolated,
            concurrent_claims_elect_exactly_one_owner,
            batch_claim_handles_duplicates_within_and_across_batches,
            binary_payloads_round_trip,
            waiters_are_woken_on_completion,
            store_is_usable_as_shared_trait_object,
            replicas_see_each_others_claims_and_wake_each_others_waiters,
            invalid_requests_are_rejected,
            inspector_lists_and_removes_records,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($make:path; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let harness = $make().await;
                $crate::conformance::$check(&harness).await;
            }
        )*
    };
}
