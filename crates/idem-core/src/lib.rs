//! The idempotency engine of idem: keys, scopes, fingerprints, the record state machine
//! with fencing tokens, and the store contract every backend implements.
//!
//! Nothing here performs I/O. A store (this crate's [`MemoryStore`], the embedded SQLite
//! store, PostgreSQL, Redis) persists records; the HTTP layer and the gateway decide what a
//! request means. The flow of one operation:
//!
//! 1. parse the client's [`IdempotencyKey`], build its [`Scope`] and [`RecordId`];
//! 2. compute the request's [`Fingerprint`];
//! 3. [`Store::claim`]: run the operation only on [`ClaimOutcome::Acquired`] (or
//!    [`ClaimOutcome::TookOver`], where the caller decides what an unfinished earlier attempt
//!    means); replay [`ClaimOutcome::Completed`]; report the rest;
//! 4. [`Store::complete`] with the result, or [`Store::release`] if nothing happened.
//!
//! ```
//! use std::sync::Arc;
//! use idem_core::*;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
//! let hasher = PrincipalHasher::new(b"secret from configuration");
//! let key = IdempotencyKey::parse(b"\"charge-7\"")?;
//! let scope = Scope::new("payments", hasher.hash(b"Bearer alice"), "POST", "/v1/charges", &key);
//! let fingerprint = Fingerprinter::new()
//!     .fingerprint("POST", "/v1/charges", Some("application/json"), br#"{"amount":100}"#);
//! let request = ClaimRequest::new(scope.record_id(), fingerprint);
//!
//! let executions = match store.claim(&request).await? {
//!     ClaimOutcome::Acquired(lease) => {
//!         // ... charge the card, once ...
//!         store.complete(&lease.id, lease.token, "charged".into()).await?;
//!         1
//!     }
//!     _ => 0,
//! };
//! // The retry replays the stored result instead of charging again.
//! let ClaimOutcome::Completed(replay) = store.claim(&request).await? else { panic!() };
//! assert_eq!((executions, &replay.response[..]), (1, &b"charged"[..]));
//! # Ok::<(), Error>(())
//! # }).unwrap();
//! ```
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `conformance` | [`conformance`]: the checks every store must pass, and [`conformance_tests!`] |

mod error;
mod fingerprint;
mod key;
pub mod lost;
mod memory;
mod nonce;
pub mod notify;
pub mod record;
mod scope;
mod store;
mod time;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use error::{BoxError, Error};
pub use fingerprint::{Fingerprint, Fingerprinter};
pub use key::{IdempotencyKey, KeyError, MAX_KEY_LEN};
pub use memory::MemoryStore;
pub use nonce::Nonces;
pub use record::{
    ClaimOutcome, ClaimRequest, Completion, FencingToken, Lease, Record, RecordState, StateKind,
};
pub use scope::{PrincipalHash, PrincipalHasher, RecordId, Scope};
pub use store::{Inspect, ListFilter, Store, WaitForCompletion};
pub use time::{Clock, ManualClock, SystemClock, Timestamp, duration_millis};
