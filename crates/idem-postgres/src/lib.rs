//! The PostgreSQL store for idem: one table shared by any number of gateway replicas.
//!
//! Every transition is one statement: a claim inserts the row of an id that has none, or
//! else reads the id's row in the same statement and round trip, and answers a replay, a
//! lease in flight or a mismatch from that read without a lock or a write. A row it may
//! take over (released, expired, or a lease that passed) costs a second statement, an
//! `INSERT ... ON CONFLICT ... DO UPDATE ... WHERE` that decides again under the row's lock
//! and bumps the fencing token. Complete, release and renew are `UPDATE`s conditional on
//! the token. Statements are prepared once per connection; a single claim binds scalars
//! rather than one-element arrays, so the server keeps one plan for it instead of planning
//! it at every run. Every time comes from the server's clock (`clock_timestamp()`), never
//! from a gateway's, so clock skew between replicas cannot make two of them both believe
//! they hold a record. Waiters in every replica are woken by `LISTEN/NOTIFY` when a record
//! settles.
//!
//! ```no_run
//! use std::sync::Arc;
//! use idem_core::Store;
//! use idem_postgres::{PostgresOptions, PostgresStore};
//!
//! # async fn run() -> Result<(), idem_core::Error> {
//! let store: Arc<dyn Store> = Arc::new(
//!     PostgresStore::connect("postgres://idem@127.0.0.1:5432/idem", PostgresOptions::default())
//!         .await?,
//! );
//! # Ok(()) }
//! ```
//!
//! # Options
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `schema` | `public` | schema of the records table (created if missing) |
//! | `table` | `idem_records` | the records table; its migrations table is `<table>_migrations` |
//! | `pool_size` | 16 | connections in the pool |
//! | `migrate` | `true` | run pending migrations when connecting (else [`migrate`] does it) |
//!
//! # TLS
//!
//! With the `tls` feature (rustls), the URL's `sslmode`, `sslrootcert`, `sslcert` and
//! `sslkey` work as in libpq: `prefer` (the default) encrypts when the server offers it,
//! `require` always, `verify-ca` also checks the certificate against `sslrootcert`'s
//! authorities, `verify-full` also the host name
//! (`postgres://idem@db/idem?sslmode=verify-full&sslrootcert=/etc/idem/db-ca.pem`).
//! Without the feature, a URL that asks for TLS is refused.
//!
//! # Claims under load
//!
//! A single claim, or a completion, runs alone while a pooled connection is free. When
//! every connection is busy, the claims that arrive meanwhile queue and go to the server
//! together, as one batch statement (one execution, one commit) on the next connection
//! free, and so do completions; each still gets its own answer. An operation whose caller
//! goes away while it is queued is withdrawn, never sent. [`PostgresStore::queued_claims`]
//! and [`PostgresStore::queued_completions`] tell how many wait.
//!
//! # Resolving lost answers
//!
//! When the connection fails while a claim is under way, whether the claim committed is
//! unknown. Each claim writes a nonce of its own with its row; the store then reads the row
//! back on a fresh connection and, if the nonce is its own, returns the lease it took. It
//! never assumes either way.
//!
//! A claim that still fails (the read-back failed too), or whose caller stops waiting for
//! it, leaves a caller that executes nothing: a task of the store releases the record it
//! took, if it took one, as soon as the server answers (`release_lost.sql`, matching the
//! claim's nonce; see [`idem_core::lost`]). A record the claim took over from an earlier
//! attempt is left in flight, as that attempt's outcome is still unknown.
//! [`PostgresStore::lost_claims`] tells how many wait.

mod claims;
mod combine;
mod completes;
mod connect;
mod lost;
mod migrate;
mod queries;
mod row;
#[cfg(feature = "tls")]
mod tls;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use idem_core::lost::LostClaims;
use idem_core::notify::CompletionNotifier;
use idem_core::{
    ClaimOutcome, ClaimRequest, Error, FencingToken, Inspect, ListFilter, Nonces, Record, RecordId,
    RecordState, StateKind, Store, Timestamp, WaitForCompletion, duration_millis,
};
use tokio::task::JoinHandle;

use claims::{Claimer, Held};
use combine::Combiner;
use completes::{Completer, Settled};
use connect::Target;
pub use migrate::migrate;
use queries::Queries;

/// How to connect and where the records live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Schema of the records table; created if missing. Default `public`.
    pub schema: String,
    /// The records table. Default `idem_records`.
    pub table: String,
    /// Connections in the pool. Default 16.
    pub pool_size: usize,
    /// Run pending migrations when connecting. Default `true`.
    pub migrate: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            schema: "public".into(),
            table: "idem_records".into(),
            pool_size: 16,
            migrate: true,
        }
    }
}

impl PostgresOptions {
    /// Takes the store's own parameters out of a connection URL's query string and returns
    /// the URL the driver gets (everything else, as written) with the options they set over
    /// `self`:
    ///
    /// | parameter | sets |
    /// |---|---|
    /// | `schema=NAME` | [`schema`](Self::schema) |
    /// | `table=NAME` | [`table`](Self::table) |
    /// | `pool_size=N` | [`pool_size`](Self::pool_size), 1 to 1000 |
    ///
    /// ```
    /// use idem_postgres::PostgresOptions;
    ///
    /// let (url, options) = PostgresOptions::default()
    ///     .with_url_parameters("postgres://idem@db/idem?pool_size=32&application_name=gw&table=keys")
    ///     .unwrap();
    /// assert_eq!(url, "postgres://idem@db/idem?application_name=gw");
    /// assert_eq!((options.pool_size, options.table.as_str()), (32, "keys"));
    /// ```
    pub fn with_url_parameters(mut self, url: &str) -> Result<(String, Self), Error> {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), self));
        };
        let invalid = |reason: String| Error::InvalidRequest { reason };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "schema" => self.schema = value.to_owned(),
                "table" => self.table = value.to_owned(),
                "pool_size" => {
                    self.pool_size = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=1000).contains(n))
                        .ok_or_else(|| {
                            invalid(format!(
                                "invalid PostgreSQL URL: pool_size must be a number from 1 to 1000, not {value:?}"
                            ))
                        })?;
                }
                _ => kept.push(pair),
            }
        }
        // The names are checked as the store checks them (plain identifiers), and the TLS
        // parameters as far as they can be before their files are read.
        Queries::new(&self.schema, &self.table)?;
        connect::check(url)?;
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((url, self))
    }
}

/// Records in a PostgreSQL table.
pub struct PostgresStore {
    pool: Pool,
    queries: Arc<Queries>,
    /// Runs claim statements (batches, and the rounds of ids that raced).
    claimer: Claimer,
    /// Single claims: alone while a connection is free, combined into batches otherwise.
    claims: Combiner<Claimer>,
    /// Completions, likewise.
    completes: Combiner<Completer>,
    notifier: Arc<CompletionNotifier>,
    listener: JoinHandle<()>,
    /// Claims whose outcome was lost, and the task releasing what they hold.
    lost: Arc<LostClaims>,
    releaser: JoinHandle<()>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.queries.table)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
        self.releaser.abort();
    }
}

pub(crate) fn pg_error(context: &str, e: tokio_postgres::Error) -> Error {
    if e.code().is_some() {
        Error::backend(format!("postgres: {context}"), e)
    } else {
        Error::unavailable(format!("postgres: {context}"), e)
    }
}

pub(crate) fn pool_error(e: deadpool_postgres::PoolError) -> Error {
    Error::unavailable("postgres: no connection from the pool", e)
}

/// Whether a statement's failure leaves its effect unknown (the connection broke while it
/// was under way) rather than known not to have happened.
pub(crate) fn outcome_unknown(e: &tokio_postgres::Error) -> bool {
    e.code().is_none()
}

/// Serialization failures and deadlocks: the statement did nothing and may simply run again.
pub(crate) fn retryable(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

pub(crate) fn millis_i64(d: Duration) -> i64 {
    i64::try_from(duration_millis(d)).unwrap_or(i64::MAX)
}

/// `sql` prepared on `client`, once per connection: the server parses and plans it once, and
/// each run is then one round trip (an unprepared query is two: parse, then run).
pub(crate) async fn prepared(
    client: &deadpool_postgres::Client,
    sql: &str,
    what: &str,
) -> Result<tokio_postgres::Statement, Error> {
    client
        .prepare_cached(sql)
        .await
        .map_err(|e| pg_error(&format!("prepare {what}"), e))
}

/// A distinct holder nonce for a claim statement (the process's source is seeded from the
/// operating system on first use).
pub(crate) fn nonce() -> Result<[u8; 16], Error> {
    let source = Nonces::shared(|| {
        let mut seed = [0u8; 16];
        getrandom::fill(&mut seed)
            .map_err(|e| Error::backend("no randomness for the nonce seed", e.to_string()))?;
        Ok(seed)
    })?;
    Ok(source.next())
}

impl PostgresStore {
    /// Connects a pool to `url` (`postgres://user:password@host:port/database`), runs
    /// pending migrations (unless disabled) and starts listening for completions.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<Self, Error> {
        let target = Target::parse(url)?;
        let queries = Arc::new(Queries::new(&options.schema, &options.table)?);
        if options.migrate {
            migrate::run(&target, &queries).await?;
        }
        let manager = Manager::from_config(
            target.config.clone(),
            target.tls(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .build()
            .map_err(|e| Error::backend("postgres: cannot build the pool", e))?;
        // Check the table is there (and the schema current) before accepting work.
        migrate::check(&pool, &queries).await?;
        let notifier = Arc::new(CompletionNotifier::new());
        let listener = listen::start(target, queries.channel.clone(), notifier.clone()).await?;
        let lost = Arc::new(LostClaims::default());
        let releaser = lost::start(
            pool.clone(),
            queries.clone(),
            notifier.clone(),
            lost.clone(),
        );
        let claimer = Claimer {
            pool: pool.clone(),
            queries: queries.clone(),
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(options.pool_size.max(1)));
        let completer = Completer {
            pool: pool.clone(),
            queries: queries.clone(),
        };
        Ok(Self {
            claims: Combiner::new(claimer.clone(), slots.clone()),
            completes: Combiner::new(completer, slots),
            claimer,
            pool,
            queries,
            notifier,
            listener,
            lost,
            releaser,
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, Error> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Claims whose outcome was lost (the call failed after it may have run and reading the
    /// outcome back failed too, or its caller stopped waiting) and whose records, if they
    /// took any, are not released yet: a task releases them as soon as the server answers
    /// (see [`idem_core::lost`]).
    pub fn lost_claims(&self) -> usize {
        self.lost.len()
    }

    /// Single claims waiting for a connection, to go to the server combined into one batch
    /// statement when one is free (every pooled connection was busy when they came).
    pub fn queued_claims(&self) -> usize {
        self.claims.queued()
    }

    /// Completions waiting for a connection, likewise.
    pub fn queued_completions(&self) -> usize {
        self.completes.queued()
    }

    async fn release_one(&self, id: &RecordId, token: FencingToken) -> Result<(), Error> {
        let client = self.client().await?;
        let statement = prepared(&client, &self.queries.release, "release").await?;
        let row = client
            .query_one(
                &statement,
                &[&&id.as_bytes()[..], &row::token_param(token)?],
            )
            .await
            .map_err(|e| pg_error("release", e))?;
        let changed: i64 = row.try_get("changed").map_err(row::decode_error)?;
        if changed == 1 {
            // Waiters in this process hear the NOTIFY too; waking them here saves the trip.
            self.notifier.notify(id);
            return Ok(());
        }
        let current: Option<i64> = row.try_get("current").map_err(row::decode_error)?;
        let current = current.map(row::token).transpose()?;
        drop(client);
        Err(self.lease_lost(id, token, current).await)
    }

    /// The [`Error::LeaseLost`] of `token`, naming the record's current token as read after
    /// the failed transition.
    ///
    /// The transition statements return the current token too, but read it from the
    /// snapshot taken when the statement started (READ COMMITTED). When a concurrent
    /// transition (a takeover, a release) is what made the update miss, the statement
    /// waited for it and re-checked the row, yet that snapshot still shows the record from
    /// before: often with the caller's own token, as if it still held the record. A fresh
    /// read sees the transition that won. If it fails, the statement's value is kept: the
    /// error stays a lost lease.
    async fn lease_lost(
        &self,
        id: &RecordId,
        token: FencingToken,
        from_statement: Option<FencingToken>,
    ) -> Error {
        let current = match self.get(id).await {
            Ok(record) => record.map(|r| r.token),
            Err(_) => from_statement,
        };
        Error::LeaseLost {
            id: *id,
            token,
            current,
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Error> {
        request.validate()?;
        let held = Held {
            request: request.clone(),
            holder: nonce()?,
        };
        // Failed or abandoned (the caller went away), the claim is released by its nonce
        // once the server answers: its caller executes nothing.
        let pending = self.lost.pending([(request, held.holder)]);
        let outcome = self.claims.run(held).await;
        if outcome.is_ok() {
            pending.answered();
        }
        outcome
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: FencingToken,
        response: Bytes,
    ) -> Result<(), Error> {
        match self.completes.run((*id, token, response)).await? {
            Settled::Changed => {
                // Waiters in this process hear the NOTIFY too; waking them here saves the
                // trip.
                self.notifier.notify(id);
                Ok(())
            }
            Settled::NotHeld(current) => Err(self.lease_lost(id, token, current).await),
        }
    }

    async fn release(&self, id: &RecordId, token: FencingToken) -> Result<(), Error> {
        self.release_one(id, token).await
    }

    async fn renew(
        &self,
        id: &RecordId,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Timestamp, Error> {
        if duration_millis(lease) == 0 {
            return Err(Error::InvalidRequest {
                reason: "the lease must be at least 1ms".into(),
            });
        }
        let client = self.client().await?;
        let statement = prepared(&client, &self.queries.renew, "renew").await?;
        let row = client
            .query_one(
                &statement,
                &[
                    &&id.as_bytes()[..],
                    &row::token_param(token)?,
                    &millis_i64(lease),
                ],
            )
            .await
            .map_err(|e| pg_error("renew", e))?;
        let lease_until: Option<i64> = row.try_get("lease_until").map_err(row::decode_error)?;
        match lease_until {
            Some(until) => row::timestamp(until),
            None => {
                let current: Option<i64> = row.try_get("current").map_err(row::decode_error)?;
                let current = current.map(row::token).transpose()?;
                drop(client);
                Err(self.lease_lost(id, token, current).await)
            }
        }
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        let client = self.client().await?;
        let statement = prepared(&client, &self.queries.get, "get").await?;
        let row = client
            .query_opt(&statement, &[&&id.as_bytes()[..]])
            .await
            .map_err(|e| pg_error("get", e))?;
        row.map(|r| row::record(&r).map(|(record, _)| record))
            .transpose()
    }

    async fn claim_batch(&self, requests: &[ClaimRequest]) -> Result<Vec<ClaimOutcome>, Error> {
        let mut held = Vec::with_capacity(requests.len());
        for request in requests {
            request.validate()?;
            held.push(Held {
                request: request.clone(),
                holder: nonce()?,
            });
        }
        // A failure fails the whole batch, so the claims that succeeded are lost with it.
        let pending = self
            .lost
            .pending(held.iter().map(|h| (&h.request, h.holder)));
        let outcomes = self
            .claimer
            .claim_each(&held)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>();
        if outcomes.is_ok() {
            pending.answered();
        }
        outcomes
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, Error> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(&self.queries.purge, &[&limit])
            .await
            .map_err(|e| pg_error("purge", e))?;
        for row in &rows {
            let id: &[u8] = row.try_get("id").map_err(row::decode_error)?;
            if let Some(id) = RecordId::from_slice(id) {
                self.notifier.notify(&id);
            }
        }
        Ok(rows.len())
    }

    async fn now(&self) -> Result<Timestamp, Error> {
        let client = self.client().await?;
        let statement = prepared(&client, &self.queries.now, "now").await?;
        let row = client
            .query_one(&statement, &[])
            .await
            .map_err(|e| pg_error("now", e))?;
        row::timestamp(row.try_get("now").map_err(row::decode_error)?)
    }

    fn completion_waiter(&self) -> Option<&dyn WaitForCompletion> {
        Some(self)
    }

    fn inspector(&self) -> Option<&dyn Inspect> {
        Some(self)
    }
}

#[async_trait]
impl WaitForCompletion for PostgresStore {
    async fn wait_settled(&self, id: &RecordId) -> Result<(), Error> {
        // A wake-up is a hint (a reconnected listener wakes everyone): read the record
        // again each time, and return only once it is no longer in flight.
        loop {
            let settled = self.notifier.listen(id);
            let in_flight = self
                .get(id)
                .await?
                .is_some_and(|r| matches!(r.state, RecordState::InFlight { .. }));
            if !in_flight {
                return Ok(());
            }
            settled.await;
        }
    }
}

#[async_trait]
impl Inspect for PostgresStore {
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Record>, Error> {
        let client = self.client().await?;
        let state: Option<i16> = filter.state.map(|s| match s {
            StateKind::InFlight => 0,
            StateKind::Completed => 1,
            StateKind::Released => 2,
        });
        let after: Option<&[u8]> = filter.after.as_ref().map(|id| &id.as_bytes()[..]);
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        let rows = client
            .query(&self.queries.list, &[&state, &after, &limit])
            .await
            .map_err(|e| pg_error("list", e))?;
        rows.iter()
            .map(|r| row::record(r).map(|(record, _)| record))
            .collect()
    }

    async fn remove(&self, id: &RecordId) -> Result<bool, Error> {
        let client = self.client().await?;
        let row = client
            .query_one(&self.queries.remove, &[&&id.as_bytes()[..]])
            .await
            .map_err(|e| pg_error("remove", e))?;
        let removed: i64 = row.try_get("removed").map_err(row::decode_error)?;
        self.notifier.notify(id);
        Ok(removed > 0)
    }
}

mod listen {
    //! The LISTEN connection: wakes this process's waiters when any replica settles a record.

    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::StreamExt;
    use idem_core::notify::CompletionNotifier;
    use idem_core::{Error, RecordId};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tokio_postgres::AsyncMessage;

    use crate::connect::Target;

    /// Starts the listener and waits until its first `LISTEN` is in place.
    pub(crate) async fn start(
        target: Target,
        channel: String,
        notifier: Arc<CompletionNotifier>,
    ) -> Result<JoinHandle<()>, Error> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(run(target, channel, notifier, Some(ready_tx)));
        match ready_rx.await {
            Ok(Ok(())) => Ok(task),
            Ok(Err(e)) => {
                task.abort();
                Err(e)
            }
            Err(_) => Err(Error::Unavailable {
                message: "postgres: the notification listener stopped".into(),
                source: None,
            }),
        }
    }

    async fn run(
        target: Target,
        channel: String,
        notifier: Arc<CompletionNotifier>,
        mut ready: Option<oneshot::Sender<Result<(), Error>>>,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match listen_once(&target, &channel, &notifier, &mut ready).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(e));
                        return;
                    }
                    tracing::warn!(error = %e, "postgres notification listener disconnected; reconnecting");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One connection's life: LISTEN, dispatch notifications until it ends.
    async fn listen_once(
        target: &Target,
        channel: &str,
        notifier: &Arc<CompletionNotifier>,
        ready: &mut Option<oneshot::Sender<Result<(), Error>>>,
    ) -> Result<(), Error> {
        let (client, mut connection) = target
            .connect()
            .await
            .map_err(|e| crate::pg_error("listener connect", e))?;
        let dispatch_notifier = notifier.clone();
        let dispatch = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    if let Some(id) = RecordId::from_hex(n.payload()) {
                        dispatch_notifier.notify(&id);
                    }
                }
            }
        });
        let listened = client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .await
            .map_err(|e| crate::pg_error("LISTEN", e));
        if let Err(e) = listened {
            dispatch.abort();
            return Err(e);
        }
        // Settlements while no listener was connected were not heard: wake every waiter so
        // it reads its record again.
        notifier.notify_all();
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }
        let _ = dispatch.await;
        drop(client);
        notifier.notify_all();
        Ok(())
    }
}
