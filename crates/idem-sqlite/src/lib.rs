//! The embedded store of idem: idempotency records in one SQLite file, for a single node.
//! It is the default store of `idem serve`: nothing else to run, claims durable before
//! the upstream is called, and fast under concurrency thanks to group commit.
//!
//! ```
//! use std::sync::Arc;
//! use idem_core::{ClaimOutcome, ClaimRequest, Fingerprint, RecordId, Store};
//! use idem_sqlite::{SqliteOptions, SqliteStore};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("idem.db");
//! let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path, SqliteOptions::default())?);
//! let request = ClaimRequest::new(RecordId::for_event("orders", "evt-1"), Fingerprint::of_bytes(b"{}"));
//!
//! // The claim is on disk when `claim` returns: a crash now cannot run the work twice.
//! let ClaimOutcome::Acquired(lease) = store.claim(&request).await? else { unreachable!() };
//! store.complete(&lease.id, lease.token, "done".into()).await?;
//!
//! // A retry, even after a restart, replays the stored result.
//! drop(store);
//! let store = SqliteStore::open(&path, SqliteOptions::default())?;
//! let ClaimOutcome::Completed(done) = store.claim(&request).await? else { unreachable!() };
//! assert_eq!(done.response, "done");
//! # Ok::<(), idem_core::Error>(())
//! # }).unwrap();
//! ```
//!
//! # Durability
//!
//! The file is in WAL mode with `synchronous = FULL`: every operation's answer is sent
//! only after the transaction that contains it committed and the write-ahead log was
//! synced to disk (`F_FULLFSYNC` on macOS). A claim that was answered survives a crash of
//! the process (`kill -9`) and a power loss; one that was not answered when the process
//! died may or may not have been applied (it is taken over when its lease passes). If a
//! commit fails, every operation in it gets an error: nothing is reported done that is not
//! on disk.
//!
//! A claim whose caller stops waiting for it (a client that went away, a timeout) is not
//! applied if the writer has not reached it yet; if it was applied, the record it acquired
//! is released right after, as its caller executes nothing. A record it took over from an
//! earlier attempt stays in flight: that attempt's outcome is still unknown.
//!
//! # How it works
//!
//! - **One writer, group commit.** A dedicated thread owns the only writing connection.
//!   Operations queue for it; it takes the first, drains whatever else is waiting (up to
//!   [`max_batch`](SqliteOptions::max_batch)), and applies them all in one transaction,
//!   each in its own savepoint so that one failure does not fail the others. Concurrent
//!   claims share one sync to disk ([`SqliteStats::commits`] against
//!   [`SqliteStats::ops`]). A `claim_batch` is one operation, applied in order.
//! - **The pure state machine decides.** Every operation reads the row, calls
//!   [`idem_core::record`]'s `claim`, `complete`, `release` or `renew` with the store
//!   clock's time, and writes the result: the store behaves exactly like
//!   [`MemoryStore`](idem_core::MemoryStore).
//! - **Reads do not wait for writes.** `get`, `list` and `wait_settled` run on separate
//!   read connections. A claim first looks there for a live completed record with the
//!   same fingerprint and replays it without the writer: completed records do not change
//!   until they expire.
//! - **The reaper** deletes expired records in bounded transactions through the writer's
//!   queue (claims interleave), wakes their waiters, and hands freed pages back to the
//!   file system with `PRAGMA incremental_vacuum`, so the file does not grow without bound.
//!
//! # Options
//!
//! See [`SqliteOptions`]; every option has a default:
//!
//! | option | unit | default |
//! |---|---|---|
//! | `clock` | | [`SystemClock`](idem_core::SystemClock) |
//! | `readers` | connections (threads) | 4 |
//! | `max_batch` | operations per transaction | 512 |
//! | `queue_capacity` | operations | 4096 |
//! | `busy_timeout` | [`Duration`](std::time::Duration) | 5 s |
//! | `reaper_interval` | [`Duration`](std::time::Duration), `None` to disable | 1 s |
//! | `purge_batch` | records per transaction | 1000 |
//! | `vacuum_pages` | pages per transaction | 1024 |
//! | `verify_on_open` | | false |
//!
//! # The file
//!
//! An SQLite database with `PRAGMA application_id` [`APPLICATION_ID`] and
//! `PRAGMA user_version` the schema version ([`SCHEMA_VERSION`]), migrated forward when
//! opened. A file that is not an idem store (random bytes, a torn or truncated file,
//! another application's database) is refused with [`Error::Corrupt`](idem_core::Error)
//! and never written to; a store of a newer schema version is refused with
//! [`Error::Backend`](idem_core::Error). Times are milliseconds since the Unix epoch.
//! Other processes may open the same file (SQLite's locks keep it consistent), but
//! `wait_settled` is woken only by the process's own writes.

mod codec;
mod error;
mod ops;
mod options;
mod queries;
mod readers;
mod reaper;
mod schema;
mod stats;
mod store;
mod writer;

pub use options::SqliteOptions;
pub use schema::{APPLICATION_ID, SCHEMA_VERSION};
pub use stats::SqliteStats;
pub use store::SqliteStore;
