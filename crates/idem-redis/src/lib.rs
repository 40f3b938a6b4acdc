//! The Redis store for idem: records shared by any number of gateway replicas in a Redis 7
//! server or a Redis Cluster, at the latency of one round trip per operation.
//!
//! Every transition — claim, complete, release, renew — is one Lua script that reads the
//! record, applies the decision table of [`idem_core::record`] and writes the result, so it
//! is atomic on the server. Every time comes from the server's clock (`TIME` inside the
//! script), never from a gateway's, so clock skew between replicas cannot make two of them
//! both believe they hold a record. Each record's key expires by itself at the end of its
//! retention, so memory stays bounded without a reaper. Waiters in every replica are woken
//! by pub/sub when a record settles.
//!
//! ```no_run
//! use std::sync::Arc;
//! use idem_core::Store;
//! use idem_redis::{RedisOptions, RedisStore};
//!
//! # async fn run() -> Result<(), idem_core::Error> {
//! // A standalone server...
//! let store: Arc<dyn Store> =
//!     Arc::new(RedisStore::connect("redis://127.0.0.1:6379/0", RedisOptions::default()).await?);
//! // ...or a cluster, from any of its nodes.
//! let options = RedisOptions {
//!     key_prefix: "payments".into(),
//!     ..RedisOptions::default()
//! };
//! let cluster: Arc<dyn Store> = Arc::new(
//!     RedisStore::connect("redis+cluster://10.0.0.1:6379,10.0.0.2:6379", options).await?,
//! );
//! # Ok(()) }
//! ```
//!
//! # Options
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `key_prefix` | `idem` | prefix of every key and channel; 1 to 64 of `A-Z a-z 0-9 _ - . :` |
//! | `connect_timeout` | 5 s | bound on establishing a connection |
//! | `response_timeout` | 5 s | bound on one reply (a cluster request, redirections and retries included, gets twice this) |
//!
//! # Key layout
//!
//! One key per record at `<prefix>:{<64 hex digits of the record id>}`. The braces make
//! the id the hash tag, so in a cluster the record's key and its notification channel live
//! in one slot.
//!
//! A record is one string. A claim on a fresh key writes a short form with a single
//! `SET NX`: `c <fingerprint> <holder> <seconds> <microseconds> <lease> <retention>`, the
//! claim's arguments and the server's `TIME` (state in flight, token `now_ms * 1000`).
//! Every other write stores the full form: `f`, the state, the fingerprint and the holder
//! and settling nonces (hex, fixed widths), seven numbers as big-endian doubles (`token`,
//! `lease_until`, `retention`, `expires_at`, `settled_at` and, after a takeover,
//! `taken_over_token` and `taken_over_lease_until`; milliseconds since the epoch, or for
//! `retention` a duration), then the response bytes. `scripts/record.lua` reads and writes
//! both, and reads the hashes (one field per value) of earlier versions. Every write sets
//! the key's expiry to `expires_at`, so [`purge_expired`](idem_core::Store::purge_expired)
//! has nothing to do and returns 0. A released record stays as a tombstone that keeps its
//! token for the retention, so tokens keep increasing.
//!
//! # Scripts
//!
//! `scripts/*.lua`, run with `EVALSHA` (loaded again when the server answers `NOSCRIPT`),
//! each declaring its one key. Fencing tokens are `max(previous + 1, now_ms * 1000)`;
//! complete, release and renew change a record only for the current token of a live
//! in-flight record and otherwise answer with the current token ([`Error::LeaseLost`]).
//! Scripts declare themselves with a `#!lua` line, so that the server refuses them as a
//! whole (rather than halfway) when it is out of memory or lacks its required replicas.
//!
//! # Claims on Redis Cluster
//!
//! The driver's cluster connection passes every command through a routing task of its own
//! before the node's connection. Claims skip it: the store keeps one connection per master
//! and a slot map read with `CLUSTER SLOTS`, and sends a claim straight to the master of its
//! key's slot. The master decides: one that does not serve the slot answers `MOVED` or
//! `ASK` without running the script. Such a claim, a claim on a slot the map does not know,
//! and a claim whose connection failed (sent again with the same nonce, see below) go
//! through the driver's cluster connection, which follows redirections; a `MOVED` or a
//! failure has the map read again. Every other command goes through the cluster connection.
//!
//! # Lost answers
//!
//! When the connection fails after a script was sent, whether it ran is unknown. Each claim
//! carries a random holder nonce that the script stores with the record; the store sends
//! the claim again (a bounded number of times) with the same nonce, and the script, finding
//! its own nonce on a record still in flight, answers with the lease that claim took
//! ([`ClaimOutcome::Acquired`] or [`ClaimOutcome::TookOver`], from the fields stored with
//! the claim) instead of "in flight". Checking inside the script rather than reading the
//! record back leaves no window in which the first attempt could still land. Complete and
//! release carry a nonce the same way; renew is safe to repeat as it is. If the connection
//! stays down, the operation fails with [`Error::Unavailable`] and its effect is unknown.
//!
//! A claim that fails that way, or whose caller stops waiting for it, leaves a caller that
//! executes nothing: a task of the store releases the record it took, if it took one, as
//! soon as the server answers (`release_lost.lua`, matching the claim's nonce; see
//! [`idem_core::lost`]). A record the claim took over from an earlier attempt is left in
//! flight, as that attempt's outcome is still unknown. [`RedisStore::lost_claims`] tells
//! how many wait.
//!
//! # Notifications
//!
//! The scripts publish the record id when a record completes, is released or is removed.
//! On a standalone server they `PUBLISH` to `<prefix>:settled`, and each store keeps one
//! subscriber connection that reconnects by itself and then wakes every waiter (settlements
//! while it was away were not heard). On a cluster they `SPUBLISH` (sharded pub/sub) to
//! `<prefix>:{<hex id>}:settled` in the record's own slot, and a store subscribes that
//! channel while the record has waiters in the process; the driver subscribes again after
//! a failover or a slot move, and each (re)subscription and each lost node connection wakes
//! the waiters concerned. A waiter registers before it reads the record, so no settlement
//! between the read and the wait is missed.
//!
//! # Durability
//!
//! A claim is acknowledged once Redis applied it in memory. Unless the server runs with
//! `appendonly yes` and `appendfsync always`, a crash loses recent acknowledged claims; and
//! replication is asynchronous, so a failover can lose them too. `docs/stores.md` describes
//! the trade-off and the settings that narrow it.
//!
//! [`Error::LeaseLost`]: idem_core::Error::LeaseLost
//! [`Error::Unavailable`]: idem_core::Error::Unavailable
//! [`ClaimOutcome::Acquired`]: idem_core::ClaimOutcome::Acquired
//! [`ClaimOutcome::TookOver`]: idem_core::ClaimOutcome::TookOver

mod conn;
mod error;
mod keys;
mod lost;
mod notify;
mod reply;
mod scripts;
mod slots;
mod store;

use std::time::Duration;

pub use store::RedisStore;

/// Where the records live and how long to wait for the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisOptions {
    /// Prefix of every key and channel: 1 to 64 of `A-Z a-z 0-9 _ - . :`. Default `idem`.
    pub key_prefix: String,
    /// Bound on establishing a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Bound on one reply. Default 5 s.
    pub response_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            key_prefix: "idem".into(),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
        }
    }
}
