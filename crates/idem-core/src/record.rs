//! Records, fencing tokens and the pure state machine every store applies atomically.
//!
//! ```text
//!             claim                      complete(token)
//!  absent ──────────────▶ in_flight ─────────────────────▶ completed
//!    ▲                    │   ▲  │                             │
//!    │        release     │   │  │ lease passed:               │ retention passed
//!    │       (token)      ▼   │  │ next claim takes over       ▼
//!    │                 released └──┘ (new token)             absent
//!    │              (tombstone: keeps the token)
//!    └──────── retention passed ──┘
//! ```
//!
//! Stores read the current record, call [`claim`], [`complete`], [`release`] or [`renew`]
//! with the store's time, and write the result back atomically. Shared stores that cannot
//! call Rust in the transaction (SQL, Lua) implement the same table; the conformance suite
//! checks they agree.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use crate::time::duration_millis;
use crate::{Error, Fingerprint, RecordId, Timestamp};

/// A fencing token: every claim of a record id gets one strictly greater than every
/// earlier token for that id, across takeovers, releases and re-claims.
///
/// Tokens are `max(previous + 1, now in microseconds)`: the `previous + 1` term makes them
/// increase while the record (or its tombstone) exists; the time term keeps them
/// increasing after a record was purged at the end of its retention, when the previous
/// token is no longer known.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// A token from its number (as stored).
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The token's number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The token the next claim of a record gets.
    pub fn next(previous: Option<FencingToken>, now: Timestamp) -> FencingToken {
        let after_previous = previous.map_or(1, |p| p.0.saturating_add(1));
        FencingToken(after_previous.max(now.as_millis().saturating_mul(1000)))
    }
}

impl fmt::Debug for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FencingToken({})", self.0)
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The default lease: how long a claim holds a record without a renewal.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// The default retention: how long a record is kept after its last transition.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// A request to claim a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The record.
    pub id: RecordId,
    /// The fingerprint of the operation claiming it.
    pub fingerprint: Fingerprint,
    /// How long the claim holds the record without a renewal.
    pub lease: Duration,
    /// How long the record is kept after it completes or is released (and after its lease
    /// passes, for a holder that never came back).
    pub retention: Duration,
    /// Whether the store may release what this claim took when the claim fails or its
    /// caller stops waiting for it ([`lost`](crate::lost)). Right for a caller that
    /// executes nothing after a failed claim, the default. A caller that executes anyway (a
    /// gateway route that fails open) sets it to `false`: the record then stays held until
    /// the lease passes, and a retry is not executed a second time.
    pub release_if_lost: bool,
}

impl ClaimRequest {
    /// A request with [`DEFAULT_LEASE`] and [`DEFAULT_RETENTION`].
    pub fn new(id: RecordId, fingerprint: Fingerprint) -> Self {
        Self {
            id,
            fingerprint,
            lease: DEFAULT_LEASE,
            retention: DEFAULT_RETENTION,
            release_if_lost: true,
        }
    }

    /// Sets the lease.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the retention.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Sets [`release_if_lost`](Self::release_if_lost).
    pub fn with_release_if_lost(mut self, release: bool) -> Self {
        self.release_if_lost = release;
        self
    }

    /// Checks that the lease and the retention are at least a millisecond.
    pub fn validate(&self) -> Result<(), Error> {
        if self.lease < Duration::from_millis(1) {
            return Err(Error::InvalidRequest {
                reason: "the lease must be at least 1ms".into(),
            });
        }
        if self.retention < Duration::from_millis(1) {
            return Err(Error::InvalidRequest {
                reason: "the retention must be at least 1ms".into(),
            });
        }
        Ok(())
    }
}

/// A held claim: present its token to complete, release or renew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The record.
    pub id: RecordId,
    /// This claim's fencing token.
    pub token: FencingToken,
    /// When the lease ends unless renewed.
    pub lease_until: Timestamp,
}

/// A completed record's stored result, as a replay returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The bytes stored at completion, exactly.
    pub response: Bytes,
    /// When it completed (store time).
    pub completed_at: Timestamp,
    /// When the record expires.
    pub expires_at: Timestamp,
    /// The token of the claim that completed it.
    pub token: FencingToken,
}

/// What a claim found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimOutcome {
    /// The record was absent, released or expired: the caller holds it now.
    Acquired(Lease),
    /// The record was in flight with a lease that had passed: the caller holds it now.
    /// The previous holder may have done (part of) the work; callers decide what that
    /// means (the gateway treats a request already sent upstream as ambiguous).
    TookOver {
        /// The caller's new lease.
        lease: Lease,
        /// The token of the holder whose lease passed.
        previous_token: FencingToken,
        /// When that holder's lease ended.
        previous_lease_until: Timestamp,
    },
    /// The record completed with the same fingerprint: replay this.
    Completed(Completion),
    /// Another holder's lease is running; nothing changed.
    InFlight {
        /// When that lease ends unless renewed.
        lease_until: Timestamp,
        /// The store's time when it answered, so that the caller can tell how long the
        /// lease has left on the store's clock without asking for it.
        now: Timestamp,
    },
    /// The record exists with a different fingerprint; nothing changed.
    Mismatch,
}

impl ClaimOutcome {
    /// The lease, for [`Acquired`](Self::Acquired) and [`TookOver`](Self::TookOver).
    pub fn lease(&self) -> Option<&Lease> {
        match self {
            ClaimOutcome::Acquired(lease) | ClaimOutcome::TookOver { lease, .. } => Some(lease),
            _ => None,
        }
    }
}

/// A stored record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The record's id.
    pub id: RecordId,
    /// The fingerprint of the claim that created the current lifecycle.
    pub fingerprint: Fingerprint,
    /// The last token issued for this id.
    pub token: FencingToken,
    /// Where the record is in its lifecycle.
    pub state: RecordState,
    /// The retention requested by the claim.
    pub retention: Duration,
    /// When the record may be purged; until then it is live.
    pub expires_at: Timestamp,
}

/// The state of a [`Record`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// Held by the claim with the record's token.
    InFlight {
        /// When the lease ends unless renewed.
        lease_until: Timestamp,
    },
    /// Completed; replays return `response`.
    Completed {
        /// The stored result.
        response: Bytes,
        /// When it completed.
        completed_at: Timestamp,
    },
    /// Released without a result: claimable again, the tombstone keeps the token.
    Released {
        /// When it was released.
        released_at: Timestamp,
    },
}

/// The state's name without its data, for filters and storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateKind {
    /// [`RecordState::InFlight`].
    InFlight,
    /// [`RecordState::Completed`].
    Completed,
    /// [`RecordState::Released`].
    Released,
}

impl StateKind {
    /// A stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::InFlight => "in_flight",
            StateKind::Completed => "completed",
            StateKind::Released => "released",
        }
    }
}

impl RecordState {
    /// The state's kind.
    pub fn kind(&self) -> StateKind {
        match self {
            RecordState::InFlight { .. } => StateKind::InFlight,
            RecordState::Completed { .. } => StateKind::Completed,
            RecordState::Released { .. } => StateKind::Released,
        }
    }
}

impl Record {
    /// Live records count; expired ones are treated as absent and may be purged.
    pub fn is_live(&self, now: Timestamp) -> bool {
        self.expires_at > now
    }
}

/// What a claim does, decided from the stored record alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start a new lifecycle; `previous` is the token of the record being replaced, if any.
    Claim {
        /// The last token of the id, if a record (or tombstone) existed.
        previous: Option<FencingToken>,
    },
    /// Take over an in-flight record whose lease passed.
    TakeOver {
        /// The token being superseded.
        previous: FencingToken,
        /// When its lease ended.
        lease_until: Timestamp,
    },
    /// Return the stored completion.
    Replay,
    /// Report the running lease.
    InFlight {
        /// When it ends.
        lease_until: Timestamp,
    },
    /// Report a fingerprint mismatch.
    Mismatch,
}

/// The decision function: given the stored record (or none), the incoming fingerprint and
/// the store's time, what a claim does.
///
/// | stored record | same fingerprint | different fingerprint |
/// |---|---|---|
/// | none, or expired (`expires_at <= now`) | claim | claim |
/// | released (tombstone) | claim (next token) | claim (next token) |
/// | completed | replay | mismatch |
/// | in flight, lease running | in flight | mismatch |
/// | in flight, lease passed | take over (next token) | mismatch |
pub fn decide(existing: Option<&Record>, fingerprint: &Fingerprint, now: Timestamp) -> Decision {
    let Some(record) = existing else {
        return Decision::Claim { previous: None };
    };
    if !record.is_live(now) || matches!(record.state, RecordState::Released { .. }) {
        return Decision::Claim {
            previous: Some(record.token),
        };
    }
    if record.fingerprint != *fingerprint {
        return Decision::Mismatch;
    }
    match record.state {
        RecordState::Completed { .. } => Decision::Replay,
        RecordState::InFlight { lease_until } if lease_until > now => {
            Decision::InFlight { lease_until }
        }
        RecordState::InFlight { lease_until } => Decision::TakeOver {
            previous: record.token,
            lease_until,
        },
        RecordState::Released { .. } => unreachable!("handled above"),
    }
}

/// Applies a claim: the outcome, and the record to write if the claim changed anything.
pub fn claim(
    existing: Option<&Record>,
    request: &ClaimRequest,
    now: Timestamp,
) -> Result<(ClaimOutcome, Option<Record>), Error> {
    request.validate()?;
    let fresh = |previous: Option<FencingToken>| {
        let token = FencingToken::next(previous, now);
        let lease_until = now.saturating_add(request.lease);
        let record = Record {
            id: request.id,
            fingerprint: request.fingerprint,
            token,
            state: RecordState::InFlight { lease_until },
            // Whole milliseconds, as every store keeps it.
            retention: Duration::from_millis(duration_millis(request.retention)),
            expires_at: lease_until.saturating_add(request.retention),
        };
        let lease = Lease {
            id: request.id,
            token,
            lease_until,
        };
        (lease, record)
    };
    Ok(match decide(existing, &request.fingerprint, now) {
        Decision::Claim { previous } => {
            let (lease, record) = fresh(previous);
            (ClaimOutcome::Acquired(lease), Some(record))
        }
        Decision::TakeOver {
            previous,
            lease_until,
        } => {
            let (lease, record) = fresh(Some(previous));
            let outcome = ClaimOutcome::TookOver {
                lease,
                previous_token: previous,
                previous_lease_until: lease_until,
            };
            (outcome, Some(record))
        }
        Decision::Replay => {
            let record = existing.unwrap_or_else(|| unreachable!("replay needs a record"));
            let RecordState::Completed {
                response,
                completed_at,
            } = &record.state
            else {
                unreachable!("replay needs a completed record")
            };
            let completion = Completion {
                response: response.clone(),
                completed_at: *completed_at,
                expires_at: record.expires_at,
                token: record.token,
            };
            (ClaimOutcome::Completed(completion), None)
        }
        Decision::InFlight { lease_until } => (ClaimOutcome::InFlight { lease_until, now }, None),
        Decision::Mismatch => (ClaimOutcome::Mismatch, None),
    })
}

/// The record if `token` holds it: live, in flight, same token. A holder whose lease
/// passed but was not taken over still holds the record.
fn held(
    existing: Option<&Record>,
    id: RecordId,
    token: FencingToken,
    now: Timestamp,
) -> Result<&Record, Error> {
    match existing {
        Some(record)
            if record.is_live(now)
                && record.token == token
                && matches!(record.state, RecordState::InFlight { .. }) =>
        {
            Ok(record)
        }
        other => Err(Error::LeaseLost {
            id,
            token,
            current: other.filter(|r| r.is_live(now)).map(|r| r.token),
        }),
    }
}

/// Completes a held record with its result; the record is then replayed until
/// `now + retention`.
pub fn complete(
    existing: Option<&Record>,
    id: RecordId,
    token: FencingToken,
    response: Bytes,
    now: Timestamp,
) -> Result<Record, Error> {
    let record = held(existing, id, token, now)?;
    Ok(Record {
        state: RecordState::Completed {
            response,
            completed_at: now,
        },
        expires_at: now.saturating_add(record.retention),
        ..record.clone()
    })
}

/// Releases a held record: it becomes a tombstone that keeps the token until
/// `now + retention`, and any claim may take it.
pub fn release(
    existing: Option<&Record>,
    id: RecordId,
    token: FencingToken,
    now: Timestamp,
) -> Result<Record, Error> {
    let record = held(existing, id, token, now)?;
    Ok(Record {
        state: RecordState::Released { released_at: now },
        expires_at: now.saturating_add(record.retention),
        ..record.clone()
    })
}

/// Extends a held lease to at least `now + lease`.
pub fn renew(
    existing: Option<&Record>,
    id: RecordId,
    token: FencingToken,
    lease: Duration,
    now: Timestamp,
) -> Result<Record, Error> {
    if duration_millis(lease) == 0 {
        return Err(Error::InvalidRequest {
            reason: "the lease must be at least 1ms".into(),
        });
    }
    let record = held(existing, id, token, now)?;
    let RecordState::InFlight { lease_until } = record.state else {
        unreachable!("held records are in flight")
    };
    let lease_until = lease_until.max(now.saturating_add(lease));
    Ok(Record {
        state: RecordState::InFlight { lease_until },
        expires_at: lease_until.saturating_add(record.retention),
        ..record.clone()
    })
}
