//! Claims whose outcome a store could not learn, kept until they are released.
//!
//! A claim call that fails after its command may have reached the server (the connection
//! dropped, the answer timed out, and reading the outcome back failed too) leaves the
//! caller with an error, so the caller executes nothing. Yet the claim may have taken the
//! record: it would then stay in flight until its lease ends, every retry would get
//! "in flight", and the next claim after the lease would take it over and find an attempt
//! whose outcome is unknown, although nothing was executed.
//!
//! A store that reports such an error records the claim's id and holder nonce here. A task
//! of the store's then releases every record still held under one of these nonces, as soon
//! as the server answers again, so that a retry executes the request once. The nonce is what
//! makes this safe: it was the failed call's alone, so a record that carries it was taken by
//! a claim whose caller executed nothing. A record the lost claim took over from an earlier
//! attempt is left in flight: that earlier attempt's outcome is still unknown, and the next
//! claim after the lease must learn so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::{ClaimRequest, RecordId};

/// One claim whose outcome is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostClaim {
    /// The record the claim was for.
    pub id: RecordId,
    /// The claim's holder nonce.
    pub holder: [u8; 16],
    /// When the claim's lease ends at the latest (its lease from when it was sent). Until
    /// then the claim may still land on the server (a statement held up in a lock wait):
    /// finding nothing to release settles it only after this.
    pub lease_end: Instant,
    /// When the record expires at the latest (the claim's lease and retention from when it
    /// was sent); past it there is nothing left to release.
    pub until: Instant,
    /// When the next attempt to release it is due.
    pub next: Instant,
    /// Attempts the server answered without finding the record.
    pub misses: u32,
}

/// The pause after an attempt that did not find the record: it doubles with each such
/// attempt, up to this.
const MAX_MISS_PAUSE: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Claims {
    /// Waiting for an attempt.
    waiting: Vec<LostClaim>,
    /// Taken for an attempt that has not finished.
    attempting: usize,
}

impl LostClaim {
    /// `request`'s claim with holder nonce `holder`, sent at `sent`; an attempt is due at
    /// once.
    pub fn new(request: &ClaimRequest, holder: [u8; 16], sent: Instant) -> Self {
        // A lease or retention beyond what the clock can hold lasts as long as the list
        // needs to care (the record outlives the process).
        let after = |d: Duration| sent.checked_add(d).unwrap_or_else(|| sent + FAR);
        Self {
            id: request.id,
            holder,
            lease_end: after(request.lease),
            until: after(request.lease.saturating_add(request.retention)),
            next: sent,
            misses: 0,
        }
    }

    /// After an attempt at `now` the server answered without finding the claim's record:
    /// `None` once the claim's lease has ended (it settles the claim); until then the claim
    /// may still land, and it is tried again after a pause that doubles with each miss
    /// (1 s, 2 s, 4 s, ... up to 30 s).
    pub fn not_found(mut self, now: Instant) -> Option<Self> {
        if now >= self.lease_end {
            return None;
        }
        let pause = Duration::from_secs(1)
            .saturating_mul(1 << self.misses.min(5))
            .min(MAX_MISS_PAUSE);
        self.misses += 1;
        self.next = (now + pause).min(self.lease_end);
        Some(self)
    }

    /// To be tried again at `at` (the server did not answer).
    pub fn retry_at(mut self, at: Instant) -> Self {
        self.next = at;
        self
    }
}

/// A time past any process's life (a hundred years), for leases beyond the clock's range.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The lost claims of a store, waiting to be released.
#[derive(Debug)]
pub struct LostClaims {
    claims: Mutex<Claims>,
    capacity: usize,
    /// Lost claims refused because the list was full.
    refused: AtomicU64,
    added: Notify,
}

impl Default for LostClaims {
    /// Room for 100,000 lost claims (a few MiB).
    fn default() -> Self {
        Self::new(100_000)
    }
}

impl LostClaims {
    /// Room for `capacity` claims: past it, [`add`](Self::add) refuses, and such a record
    /// stays in flight until its lease ends, as it would without this list.
    pub fn new(capacity: usize) -> Self {
        Self {
            claims: Mutex::new(Claims::default()),
            capacity,
            refused: AtomicU64::new(0),
            added: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims under way: unless [answered](Pending::answered), they are recorded as lost
    /// when the returned guard drops (the call failed, or its caller went away). Requests
    /// that say not to ([`ClaimRequest::release_if_lost`]) are left out.
    pub fn pending<'r>(
        &self,
        claims: impl IntoIterator<Item = (&'r ClaimRequest, [u8; 16])>,
    ) -> Pending<'_> {
        let sent = Instant::now();
        Pending {
            lost: self,
            claims: claims
                .into_iter()
                .filter(|(request, _)| request.release_if_lost)
                .map(|(request, holder)| LostClaim::new(request, holder, sent))
                .collect(),
        }
    }

    /// Records a lost claim; `false` if the list is full.
    pub fn add(&self, claim: LostClaim) -> bool {
        let mut claims = self.lock();
        if claims.waiting.len() + claims.attempting >= self.capacity {
            drop(claims);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        claims.waiting.push(claim);
        drop(claims);
        self.added.notify_one();
        true
    }

    /// How many lost claims are not settled: waiting, or taken for an attempt that has
    /// not [finished](Self::finish).
    pub fn len(&self) -> usize {
        let claims = self.lock();
        claims.waiting.len() + claims.attempting
    }

    /// Lost claims refused so far because the list was full: their records, if they took
    /// any, stay held until their leases end.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether every lost claim is settled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When the earliest waiting claim's next attempt is due; `None` if none waits.
    pub fn next_due(&self) -> Option<Instant> {
        self.lock().waiting.iter().map(|c| c.next).min()
    }

    /// When a releasing task that looks at `now` should next [`take`](Self::take) claims:
    /// when the earliest is due, but at least `min_pause` and at most `max_sleep` from now
    /// (so that a claim added meanwhile waits no longer than that).
    pub fn wake_at(&self, now: Instant, min_pause: Duration, max_sleep: Duration) -> Instant {
        self.next_due()
            .unwrap_or(now)
            .min(now + max_sleep)
            .max(now + min_pause)
    }

    /// Waits until a lost claim waits for an attempt (at once if one does).
    pub async fn wait(&self) {
        loop {
            let added = self.added.notified();
            if !self.lock().waiting.is_empty() {
                return;
            }
            added.await;
        }
    }

    /// Takes every waiting claim whose attempt is due at `now` for an attempt, and drops
    /// those with nothing left to release. The attempt ends with [`finish`](Self::finish).
    pub fn take(&self, now: Instant) -> Vec<LostClaim> {
        let mut claims = self.lock();
        claims.waiting.retain(|c| c.until > now);
        let (taken, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut claims.waiting)
            .into_iter()
            .partition(|c| c.next <= now);
        claims.waiting = waiting;
        claims.attempting += taken.len();
        taken
    }

    /// Ends the attempt on `taken` claims (as many as [`take`](Self::take) returned):
    /// `unsettled`, those of them the attempt could not settle (the server did not answer),
    /// wait for the next one.
    pub fn finish(&self, taken: usize, unsettled: Vec<LostClaim>) {
        let mut claims = self.lock();
        claims.attempting = claims.attempting.saturating_sub(taken);
        if unsettled.is_empty() {
            return;
        }
        claims.waiting.extend(unsettled);
        drop(claims);
        self.added.notify_one();
    }
}

/// Claims under way, recorded as lost when dropped unless [answered](Self::answered): the
/// caller of a claim that failed, or that it stopped waiting for, executes nothing.
#[derive(Debug)]
#[must_use = "dropping the guard records its claims as lost"]
pub struct Pending<'a> {
    lost: &'a LostClaims,
    claims: Vec<LostClaim>,
}

impl Pending<'_> {
    /// The caller has the claims' outcomes: none of them is lost.
    pub fn answered(mut self) {
        self.claims.clear();
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        for claim in self.claims.drain(..) {
            self.lost.add(claim);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Claim `n`, due at `next`, with a record that lasts until `until`.
    fn claim(n: u8, next: Instant, until: Instant) -> LostClaim {
        LostClaim {
            id: RecordId::for_event("lost", &n.to_string()),
            holder: [n; 16],
            lease_end: until,
            until,
            next,
            misses: 0,
        }
    }

    #[test]
    fn a_claim_with_a_lease_beyond_the_clock_is_recorded() {
        let request = ClaimRequest::new(
            RecordId::for_event("lost", "long"),
            crate::Fingerprint::of_bytes(b"x"),
        )
        .with_lease(Duration::MAX)
        .with_retention(Duration::MAX);
        let now = Instant::now();
        let claim = LostClaim::new(&request, [1; 16], now);
        assert!(claim.lease_end > now + Duration::from_secs(3600 * 24 * 365));
        assert_eq!(claim.lease_end, claim.until);
        assert_eq!(claim.next, now);
    }

    #[test]
    fn claims_are_taken_when_due_until_they_expire_and_unsettled_ones_come_back() {
        let lost = LostClaims::new(10);
        let now = Instant::now();
        let (soon, later) = (now + Duration::from_secs(1), now + Duration::from_secs(60));
        assert!(lost.add(claim(1, now, later)));
        assert!(lost.add(claim(2, now, now)));
        assert!(lost.add(claim(3, soon, later)));
        assert_eq!(lost.len(), 3);
        // The second has expired by `now`: nothing is left of it to release. The third is
        // not due yet.
        assert_eq!(lost.take(now), vec![claim(1, now, later)]);
        assert_eq!(lost.next_due(), Some(soon));
        // Taken for an attempt, a claim still counts until the attempt finishes.
        assert_eq!(lost.len(), 2);
        lost.finish(1, vec![claim(1, soon, later)]);
        assert_eq!(lost.len(), 2);
        assert_eq!(
            lost.take(soon),
            vec![claim(3, soon, later), claim(1, soon, later)]
        );
        lost.finish(2, Vec::new());
        assert!(lost.is_empty());
        assert_eq!(lost.next_due(), None);
    }

    #[test]
    fn the_task_wakes_when_a_claim_is_due_within_bounds() {
        let lost = LostClaims::new(10);
        let now = Instant::now();
        let (pause, sleep) = (Duration::from_millis(100), Duration::from_secs(1));
        let later = now + Duration::from_secs(60);
        assert_eq!(lost.wake_at(now, pause, sleep), now + pause);
        lost.add(claim(1, now + Duration::from_millis(500), later));
        assert_eq!(
            lost.wake_at(now, pause, sleep),
            now + Duration::from_millis(500)
        );
        lost.add(claim(2, now, later));
        assert_eq!(lost.wake_at(now, pause, sleep), now + pause);
        let far = LostClaims::new(10);
        far.add(claim(3, now + Duration::from_secs(30), later));
        assert_eq!(far.wake_at(now, pause, sleep), now + sleep);
    }

    #[test]
    fn a_full_list_refuses() {
        let lost = LostClaims::new(1);
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        assert!(lost.add(claim(1, now, later)));
        assert!(!lost.add(claim(2, now, later)));
        assert_eq!((lost.len(), lost.refused()), (1, 1));
    }

    #[test]
    fn pending_claims_are_lost_unless_answered() {
        let lost = LostClaims::new(10);
        let request = |event: &str| {
            ClaimRequest::new(
                RecordId::for_event("lost", event),
                crate::Fingerprint::of_bytes(b"x"),
            )
        };
        let (a, b) = (request("a"), request("b"));
        lost.pending([(&a, [1; 16]), (&b, [2; 16])]).answered();
        assert!(lost.is_empty());
        drop(lost.pending([(&a, [1; 16]), (&b, [2; 16])]));
        let taken = lost.take(Instant::now());
        assert_eq!(
            taken.iter().map(|c| (c.id, c.holder)).collect::<Vec<_>>(),
            vec![(a.id, [1; 16]), (b.id, [2; 16])]
        );
        lost.finish(2, Vec::new());
        // A request that says not to release what it took is never recorded.
        let kept = request("kept").with_release_if_lost(false);
        drop(lost.pending([(&kept, [3; 16])]));
        assert!(lost.is_empty());
    }

    #[test]
    fn a_lost_claim_lasts_as_long_as_its_record_can() {
        let request = ClaimRequest::new(
            RecordId::for_event("lost", "1"),
            crate::Fingerprint::of_bytes(b"x"),
        )
        .with_lease(Duration::from_secs(30))
        .with_retention(Duration::from_secs(3600));
        let sent = Instant::now();
        let claim = LostClaim::new(&request, [9; 16], sent);
        assert_eq!(claim.until, sent + Duration::from_secs(3630));
        assert_eq!(claim.lease_end, sent + Duration::from_secs(30));
        assert_eq!((claim.id, claim.holder), (request.id, [9; 16]));
        assert_eq!((claim.next, claim.misses), (sent, 0));
        // Not found on the server, it is tried again after 1 s, 2 s, 4 s, ... while its
        // lease lasts, and settled once the lease has ended.
        let at = |s| sent + Duration::from_secs(s);
        let missed = claim.not_found(at(1)).unwrap();
        assert_eq!((missed.next, missed.misses), (at(2), 1));
        let missed = missed.not_found(at(2)).unwrap();
        assert_eq!((missed.next, missed.misses), (at(4), 2));
        let missed = missed.not_found(at(28)).unwrap();
        assert_eq!(missed.next, at(30), "never past the lease");
        assert_eq!(missed.not_found(at(30)), None);
        assert_eq!(claim.retry_at(at(5)).next, at(5));
    }

    #[tokio::test]
    async fn waiting_ends_when_a_claim_is_added() {
        let lost = std::sync::Arc::new(LostClaims::new(10));
        let waiter = tokio::spawn({
            let lost = lost.clone();
            async move { lost.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let now = Instant::now();
        lost.add(claim(1, now, now + Duration::from_secs(60)));
        waiter.await.unwrap();
        // With a claim waiting, waiting ends at once.
        lost.wait().await;
    }
}
