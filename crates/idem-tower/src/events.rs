//! Observability hooks: what happened to each request, and how long the store took.

use std::time::Duration;

use idem_core::RecordId;

/// Why a claim was released (the next request with the key executes again).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReleaseReason {
    /// The inner service answered 408, 425, 429 or 503.
    RetryableStatus,
    /// The inner service answered another 5xx on a route with `server_errors = release`.
    ServerError,
    /// The inner service failed before the request took effect.
    InnerError,
    /// The outcome is unknown on a route with `ambiguous = release`.
    Ambiguous,
    /// The inner service panicked.
    Panic,
    /// The response future was dropped while the inner service ran.
    Cancelled,
}

impl ReleaseReason {
    /// A stable lower-case name (for metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::RetryableStatus => "retryable_status",
            ReleaseReason::ServerError => "server_error",
            ReleaseReason::InnerError => "inner_error",
            ReleaseReason::Ambiguous => "ambiguous",
            ReleaseReason::Panic => "panic",
            ReleaseReason::Cancelled => "cancelled",
        }
    }
}

/// What happened to a request the layer looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Event {
    /// The request matched a route but was passed through without deduplication (no key
    /// on an optional route, or `key = ignored`).
    PassedThrough,
    /// The inner service was called under a claim (what happened to its answer is
    /// reported separately: `Released`, `Ambiguous`, `ResponseTooLarge`, `LeaseLost`).
    Executed,
    /// A stored answer was replayed.
    Replayed,
    /// A running duplicate was reported with `409`.
    InFlightConflict,
    /// The request waited for a running duplicate (it then replayed, executed, or got
    /// `409` when the wait ran out).
    Waited,
    /// The key was reused with a different request: `422`.
    Mismatch,
    /// The key was missing on a required route: `400`.
    KeyMissing,
    /// The key was malformed: `400`.
    KeyRejected,
    /// The request body exceeded the route's limit: `413`.
    BodyTooLarge,
    /// A store operation failed.
    StoreError,
    /// The store failed and the route fails open: the request ran without deduplication.
    FailedOpen,
    /// The claim was released.
    Released(ReleaseReason),
    /// The outcome was unknown and an `outcome-unknown` problem was stored.
    Ambiguous,
    /// The claim took over an expired lease of an earlier attempt.
    TookOver,
    /// The response was too large to store; the `response-too-large-to-replay` marker
    /// was stored instead.
    ResponseTooLarge,
    /// The claim's lease was taken over while the inner service ran; its answer was not
    /// stored.
    LeaseLost,
    /// A stored answer could not be decoded, or the store reported the record corrupt
    /// (it fails authentication, say): `500`, neither replayed nor executed.
    StoredResponseUnreadable,
    /// The request has no principal on a route with `anonymous = reject`: `400`.
    PrincipalMissing,
}

impl Event {
    /// A stable lower-case name (for metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Event::PassedThrough => "passed_through",
            Event::Executed => "executed",
            Event::Replayed => "replayed",
            Event::InFlightConflict => "in_flight_conflict",
            Event::Waited => "waited",
            Event::Mismatch => "mismatch",
            Event::KeyMissing => "key_missing",
            Event::KeyRejected => "key_rejected",
            Event::BodyTooLarge => "body_too_large",
            Event::StoreError => "store_error",
            Event::FailedOpen => "failed_open",
            Event::Released(_) => "released",
            Event::Ambiguous => "ambiguous",
            Event::TookOver => "took_over",
            Event::ResponseTooLarge => "response_too_large",
            Event::LeaseLost => "lease_lost",
            Event::StoredResponseUnreadable => "stored_response_unreadable",
            Event::PrincipalMissing => "principal_missing",
        }
    }
}

/// A store operation, for latency reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreOp {
    /// [`Store::claim`](idem_core::Store::claim).
    Claim,
    /// [`Store::complete`](idem_core::Store::complete).
    Complete,
    /// [`Store::release`](idem_core::Store::release).
    Release,
    /// [`Store::renew`](idem_core::Store::renew).
    Renew,
}

impl StoreOp {
    /// A stable lower-case name (for metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Claim => "claim",
            StoreOp::Complete => "complete",
            StoreOp::Release => "release",
            StoreOp::Renew => "renew",
        }
    }
}

/// Receives what the layer does, to count it (a gateway's metrics). Called inline on the
/// request path: implementations must be quick and must not block.
///
/// Every method has an empty default; `()` ignores everything.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use idem_tower::{Event, IdempotencyEvents};
///
/// #[derive(Default)]
/// struct Replays(AtomicU64);
///
/// impl IdempotencyEvents for Replays {
///     fn event(&self, _route: &str, event: Event) {
///         if event == Event::Replayed {
///             self.0.fetch_add(1, Ordering::Relaxed);
///         }
///     }
/// }
/// ```
pub trait IdempotencyEvents: Send + Sync + 'static {
    /// Something happened to a request on the route with this pattern. One request may
    /// report several events (`Waited`, then `Replayed`).
    fn event(&self, route: &str, event: Event) {
        let _ = (route, event);
    }

    /// A store operation finished after `elapsed`, successfully or not.
    fn store_latency(&self, op: StoreOp, elapsed: Duration, ok: bool) {
        let _ = (op, elapsed, ok);
    }

    /// A claim acquired the record `id` ([`ClaimOutcome::Acquired`]: it was absent,
    /// released or expired), and the request is about to execute.
    ///
    /// [`ClaimOutcome::Acquired`]: idem_core::ClaimOutcome::Acquired
    fn acquired(&self, route: &str, id: &RecordId) {
        let _ = (route, id);
    }

    /// The record `id` was completed: it is replayed for `retention` from now, then
    /// expires. With [`acquired`](Self::acquired), this tells when a retry arrives after
    /// its record expired (a late retry).
    fn completed(&self, route: &str, id: &RecordId, retention: Duration) {
        let _ = (route, id, retention);
    }
}

impl IdempotencyEvents for () {}
