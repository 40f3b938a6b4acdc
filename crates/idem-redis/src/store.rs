//! [`RedisStore`]: the [`Store`], [`WaitForCompletion`] and [`Inspect`] implementations.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream;
use idem_core::lost::LostClaims;
use idem_core::notify::CompletionNotifier;
use idem_core::{
    ClaimOutcome, ClaimRequest, Error, FencingToken, Inspect, ListFilter, Nonces, Record, RecordId,
    RecordState, Store, Timestamp, WaitForCompletion, duration_millis,
};
use redis::aio::ConnectionManagerConfig;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{ProtocolVersion, RedisError, RedisResult, ServerErrorKind, Value};
use tokio::task::JoinHandle;

use crate::RedisOptions;
use crate::conn::{Conn, Target};
use crate::error::{redis_error, refused, retryable, unexpected};
use crate::keys::{Keys, hex};
use crate::lost;
use crate::notify::{Listener, Subscriptions, push_handler};
use crate::reply::{self, Settled};
use crate::scripts;
use crate::slots::Routes;

/// How many times an idempotent command is sent again after a connection failure or a
/// passing refusal, and the first pause (tripled each time).
const RETRIES: u32 = 3;
const RETRY_DELAY: Duration = Duration::from_millis(50);

/// Requests in flight at once for batch claims and listings on a cluster.
const CONCURRENCY: usize = 64;

/// Records in Redis or Redis Cluster: one key per record, one Lua script per transition.
///
/// See the [crate documentation](crate) for the key layout, the scripts and the
/// notification design.
pub struct RedisStore {
    conn: Conn,
    /// Cluster: claims straight to the key's master.
    routes: Option<Arc<Routes>>,
    keys: Keys,
    notifier: Arc<CompletionNotifier>,
    wake: Wake,
    /// Claims whose outcome was lost, and the task releasing what they hold.
    lost: Arc<LostClaims>,
    releaser: JoinHandle<()>,
}

/// How settlements in other processes reach this one's waiters.
enum Wake {
    /// Standalone: the subscriber task of the prefix's channel.
    Listener(JoinHandle<()>),
    /// Cluster: sharded channels subscribed per waited record.
    Sharded(Arc<Subscriptions>),
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.conn {
            Conn::Standalone(_) => "standalone",
            Conn::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("mode", &mode)
            .field("key_prefix", &self.keys.prefix())
            .finish_non_exhaustive()
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if let Wake::Listener(task) = &self.wake {
            task.abort();
        }
        self.releaser.abort();
    }
}

fn invalid_url(e: RedisError) -> Error {
    Error::InvalidRequest {
        reason: format!("invalid Redis URL: {e}"),
    }
}

fn timed_out(what: &str) -> Error {
    Error::Unavailable {
        message: format!("redis: {what} timed out"),
        source: None,
    }
}

/// The process's holder nonces (seeded from the operating system on first use).
fn source() -> Result<&'static Nonces, Error> {
    Nonces::shared(|| {
        let mut seed = [0u8; 16];
        getrandom::fill(&mut seed)
            .map_err(|e| Error::backend("no randomness for the nonce seed", e.to_string()))?;
        Ok(seed)
    })
}

/// `count` distinct holder nonces.
fn nonces(count: usize) -> Result<Vec<[u8; 16]>, Error> {
    let source = source()?;
    Ok((0..count).map(|_| source.next()).collect())
}

/// A distinct nonce, as hex.
fn nonce() -> Result<String, Error> {
    Ok(hex(&source()?.next()))
}

/// The major version in an `INFO server` reply.
fn major_version(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))?
        .split('.')
        .next()?
        .trim()
        .parse()
        .ok()
}

impl RedisStore {
    /// Connects to `redis://host:port[/db]` (standalone) or
    /// `redis+cluster://host:port,host:port,...` (Redis Cluster; any subset of the nodes),
    /// checks the server is Redis 7 or later, and starts listening for settlements.
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Self, Error> {
        let notifier = Arc::new(CompletionNotifier::new());
        match Target::parse(url)? {
            Target::Standalone(url) => Self::connect_standalone(&url, options, notifier).await,
            Target::Cluster(nodes) => Self::connect_cluster(nodes, options, notifier).await,
        }
    }

    async fn connect_standalone(
        url: &str,
        options: RedisOptions,
        notifier: Arc<CompletionNotifier>,
    ) -> Result<Self, Error> {
        let keys = Keys::new(&options.key_prefix, false)?;
        let client = redis::Client::open(url).map_err(invalid_url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.response_timeout))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(1));
        let manager = tokio::time::timeout(
            options.connect_timeout * 2,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| timed_out("connect"))?
        .map_err(|e| redis_error("connect", e))?;
        let mut conn = Conn::Standalone(manager);
        check_version(&mut conn).await?;
        scripts::load_claim(&mut conn)
            .await
            .map_err(|e| redis_error("SCRIPT LOAD", e))?;
        let listener = Listener::start(
            client,
            keys.prefix_channel(),
            notifier.clone(),
            options.connect_timeout,
        )
        .await?;
        Self::assemble(conn, None, keys, notifier, Wake::Listener(listener))
    }

    async fn connect_cluster(
        nodes: Vec<String>,
        options: RedisOptions,
        notifier: Arc<CompletionNotifier>,
    ) -> Result<Self, Error> {
        let keys = Keys::new(&options.key_prefix, true)?;
        let seed = nodes.first().cloned().unwrap_or_default();
        let client = ClusterClientBuilder::new(nodes)
            // Sharded pub/sub arrives as RESP3 pushes on the same connection.
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(push_handler(keys.clone(), notifier.clone()))
            .connection_timeout(options.connect_timeout)
            .response_timeout(options.response_timeout)
            .overall_response_timeout(Some(options.response_timeout * 2))
            .build()
            .map_err(invalid_url)?;
        let cluster =
            tokio::time::timeout(options.connect_timeout * 2, client.get_async_connection())
                .await
                .map_err(|_| timed_out("connect"))?
                .map_err(|e| redis_error("connect", e))?;
        let mut conn = Conn::Cluster(cluster.clone());
        check_version(&mut conn).await?;
        let routes = Routes::new(
            cluster.clone(),
            &seed,
            options.connect_timeout,
            options.response_timeout,
            options.response_timeout * 2,
        )
        .map_err(invalid_url)?;
        if let Err(e) = routes.refresh().await {
            // Claims go through the cluster connection until a reading succeeds.
            tracing::debug!(error = %e, "redis: reading the cluster's slot map failed");
        }
        let wake = Wake::Sharded(Subscriptions::new(cluster, keys.clone()));
        Self::assemble(conn, Some(Arc::new(routes)), keys, notifier, wake)
    }

    /// The store around its connection, with the task that releases lost claims.
    fn assemble(
        conn: Conn,
        routes: Option<Arc<Routes>>,
        keys: Keys,
        notifier: Arc<CompletionNotifier>,
        wake: Wake,
    ) -> Result<Self, Error> {
        let lost = Arc::new(LostClaims::default());
        let releaser = lost::start(
            conn.clone(),
            keys.clone(),
            notifier.clone(),
            lost.clone(),
            source()?,
        );
        Ok(Self {
            conn,
            routes,
            keys,
            notifier,
            wake,
            lost,
            releaser,
        })
    }

    /// Claims whose outcome was lost (the call failed after it may have run and sending it
    /// again failed too, or its caller stopped waiting) and whose records, if they took any,
    /// are not released yet: a task releases them as soon as the server answers (see
    /// [`idem_core::lost`]).
    pub fn lost_claims(&self) -> usize {
        self.lost.len()
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        self.keys.prefix()
    }

    /// The Redis key of a record's hash: `<prefix>:{<hex id>}`.
    pub fn record_key(&self, id: &RecordId) -> String {
        self.keys.record(id)
    }

    /// Runs an idempotent operation, sending it again (bounded) while the connection fails
    /// or the server refuses it for a passing reason.
    async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, Error>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut attempt = 0;
        loop {
            match op(self.conn.clone()).await {
                Ok(value) => return Ok(value),
                Err(e) if retryable(&e) && attempt < RETRIES => {
                    tracing::debug!(error = %e, attempt, "redis: {what} failed; sending it again");
                    tokio::time::sleep(RETRY_DELAY * 3u32.pow(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(redis_error(what, e)),
            }
        }
    }

    /// Claims with a given holder nonce. Sending the claim again after a lost answer is safe:
    /// the script recognises its own nonce and answers with the lease the claim took.
    pub(crate) async fn claim_with(
        &self,
        request: &ClaimRequest,
        holder: &str,
    ) -> Result<ClaimOutcome, Error> {
        let value = self
            .retrying("claim", |mut conn| async move {
                match &self.routes {
                    Some(routes) => {
                        scripts::claim_routed(routes, &self.keys, request, holder).await
                    }
                    None => scripts::claim(&mut conn, &self.keys, request, holder).await,
                }
            })
            .await?;
        reply::claim(&request.id, scripts::millis(request.lease), value)
    }

    /// Standalone batch claim: one pipeline of `EVALSHA`s, which the server runs in order.
    async fn claim_pipeline(
        &self,
        requests: &[ClaimRequest],
        holders: &[String],
    ) -> Result<Vec<ClaimOutcome>, Error> {
        let mut outcomes: Vec<Option<ClaimOutcome>> = vec![None; requests.len()];
        // Requests before `from` have their outcome.
        let mut from = 0;
        let mut attempt = 0;
        let mut loaded = false;
        while from < requests.len() {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for (request, holder) in requests[from..].iter().zip(&holders[from..]) {
                pipe.add_command(scripts::claim_cmd(&self.keys, request, holder));
            }
            let mut conn = self.conn.clone();
            let values: Vec<Value> = match pipe.query_async(&mut conn).await {
                Ok(values) => values,
                Err(e) if retryable(&e) && attempt < RETRIES => {
                    // Sent again with the same nonces: claims that took effect answer with
                    // their leases.
                    tokio::time::sleep(RETRY_DELAY * 3u32.pow(attempt)).await;
                    attempt += 1;
                    continue;
                }
                Err(e) => return Err(redis_error("batch claim", e)),
            };
            if values.len() != requests.len() - from {
                return Err(unexpected(
                    "batch claim",
                    format!("{} replies", values.len()),
                ));
            }
            let mut again_from = None;
            for (i, value) in (from..).zip(values) {
                match value {
                    Value::ServerError(e) => {
                        let e = RedisError::from(e);
                        if e.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript)
                            && !loaded
                        {
                            scripts::load_claim(&mut conn)
                                .await
                                .map_err(|e| redis_error("SCRIPT LOAD", e))?;
                            loaded = true;
                        } else if refused(&e) && attempt < RETRIES {
                            tokio::time::sleep(RETRY_DELAY * 3u32.pow(attempt)).await;
                            attempt += 1;
                        } else {
                            return Err(redis_error("batch claim", e));
                        }
                        // The server did not run this one; it runs again from here, in order.
                        again_from = Some(i);
                        break;
                    }
                    value => {
                        outcomes[i] = Some(reply::claim(
                            &requests[i].id,
                            scripts::millis(requests[i].lease),
                            value,
                        )?);
                    }
                }
            }
            from = again_from.unwrap_or(requests.len());
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    /// Cluster batch claim: the records live on different nodes, so each claim is routed by
    /// its key, many at once; a duplicate id waits for a later round, so it sees the
    /// earlier claim.
    async fn claim_rounds(
        &self,
        requests: &[ClaimRequest],
        holders: &[String],
    ) -> Result<Vec<ClaimOutcome>, Error> {
        let mut outcomes: Vec<Option<ClaimOutcome>> = vec![None; requests.len()];
        let mut pending: Vec<usize> = (0..requests.len()).collect();
        while !pending.is_empty() {
            let mut seen = HashSet::new();
            let (round, rest): (Vec<usize>, Vec<usize>) =
                pending.iter().partition(|&&i| seen.insert(requests[i].id));
            let results: Vec<Result<ClaimOutcome, Error>> = stream::iter(round.clone())
                .map(|i| self.claim_with(&requests[i], &holders[i]))
                .buffered(CONCURRENCY)
                .collect()
                .await;
            for (i, result) in round.into_iter().zip(results) {
                outcomes[i] = Some(result?);
            }
            pending = rest;
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    /// complete / release / renew: the script's answer, or `LeaseLost`.
    fn settled(
        what: &str,
        id: &RecordId,
        token: FencingToken,
        value: Value,
    ) -> Result<Option<Timestamp>, Error> {
        match reply::settled(what, id, value)? {
            Settled::Ok(lease_until) => Ok(lease_until),
            Settled::Lost(current) => Err(Error::LeaseLost {
                id: *id,
                token,
                current,
            }),
        }
    }

    /// The addresses to `SCAN`: the masters of a cluster, or the one server.
    async fn scan_targets(&self) -> Result<Vec<Option<(String, u16)>>, Error> {
        if let Conn::Standalone(_) = self.conn {
            return Ok(vec![None]);
        }
        let slots: Value = self
            .retrying("CLUSTER SLOTS", |mut conn| async move {
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        masters(slots)
    }

    /// The smallest `window` record ids greater than `after`, in order, and whether there
    /// were more.
    async fn scan_ids(
        &self,
        after: Option<RecordId>,
        window: usize,
    ) -> Result<(Vec<RecordId>, bool), Error> {
        let pattern = self.keys.pattern();
        let mut ids = BTreeSet::new();
        let mut truncated = false;
        for target in self.scan_targets().await? {
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let target = &target;
                let scan = &scan;
                let value = self
                    .retrying("SCAN", |conn| async move {
                        match (conn, target) {
                            (Conn::Cluster(mut cluster), Some((host, port))) => {
                                let route =
                                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                                        host: host.clone(),
                                        port: *port,
                                    });
                                cluster.route_command(scan.clone(), route).await
                            }
                            (mut conn, _) => scan.query_async::<Value>(&mut conn).await,
                        }
                    })
                    .await?;
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::from_redis_value(value)
                    .map_err(|e| unexpected("SCAN", e.to_string()))?;
                for key in keys {
                    let Some(id) = self.keys.id_of_key(&key) else {
                        continue;
                    };
                    if after.is_some_and(|after| id <= after) {
                        continue;
                    }
                    ids.insert(id);
                    if ids.len() > window {
                        ids.pop_last();
                        truncated = true;
                    }
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        Ok((ids.into_iter().collect(), truncated))
    }
}

/// The distinct masters in a `CLUSTER SLOTS` reply.
fn masters(slots: Value) -> Result<Vec<Option<(String, u16)>>, Error> {
    let bad = |what: &str| unexpected("CLUSTER SLOTS", what.to_owned());
    let Value::Array(ranges) = slots else {
        return Err(bad("not an array"));
    };
    let mut masters = Vec::new();
    for range in ranges {
        let Value::Array(range) = range else {
            return Err(bad("a range is not an array"));
        };
        let Some(Value::Array(master)) = range.get(2) else {
            return Err(bad("a range without a master"));
        };
        let (Some(host), Some(port)) = (master.first(), master.get(1)) else {
            return Err(bad("a master without an address"));
        };
        let host: String = redis::from_redis_value_ref(host).map_err(|e| bad(&e.to_string()))?;
        let port: u16 = redis::from_redis_value_ref(port).map_err(|e| bad(&e.to_string()))?;
        let address = Some((host, port));
        if !masters.contains(&address) {
            masters.push(address);
        }
    }
    Ok(masters)
}

async fn check_version(conn: &mut Conn) -> Result<(), Error> {
    let info: Value = match conn {
        Conn::Standalone(c) => redis::cmd("INFO").arg("server").query_async(c).await,
        Conn::Cluster(c) => {
            c.route_command(
                redis::cmd("INFO").arg("server").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
            )
            .await
        }
    }
    .map_err(|e| redis_error("INFO", e))?;
    let info: String =
        redis::from_redis_value(info).map_err(|e| unexpected("INFO", e.to_string()))?;
    match major_version(&info) {
        Some(major) if major >= 7 => Ok(()),
        Some(major) => Err(Error::Backend {
            message: format!("redis: the store needs Redis 7 or later, the server is {major}.x"),
            source: None,
        }),
        None => Err(unexpected("INFO", "no redis_version")),
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Error> {
        request.validate()?;
        let holder = source()?.next();
        // Failed or abandoned (the caller went away), the claim is released by its nonce
        // once the server answers: its caller executes nothing.
        let pending = self.lost.pending([(request, holder)]);
        let outcome = self.claim_with(request, &hex(&holder)).await;
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
        let nonce = nonce()?;
        let (response, nonce) = (&response, &nonce);
        let value = self
            .retrying("complete", |mut conn| async move {
                scripts::complete(&mut conn, &self.keys, id, token, response, nonce).await
            })
            .await?;
        Self::settled("complete", id, token, value)?;
        // Waiters in this process hear the message too; waking them here saves the trip.
        self.notifier.notify(id);
        Ok(())
    }

    async fn release(&self, id: &RecordId, token: FencingToken) -> Result<(), Error> {
        let nonce = nonce()?;
        let nonce = &nonce;
        let value = self
            .retrying("release", |mut conn| async move {
                scripts::release(&mut conn, &self.keys, id, token, nonce).await
            })
            .await?;
        Self::settled("release", id, token, value)?;
        self.notifier.notify(id);
        Ok(())
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
        let value = self
            .retrying("renew", |mut conn| async move {
                scripts::renew(&mut conn, &self.keys, id, token, lease).await
            })
            .await?;
        Self::settled("renew", id, token, value)?.ok_or_else(|| unexpected("renew", "no lease end"))
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        let value = self
            .retrying("get", |mut conn| async move {
                scripts::get(&mut conn, &self.keys, id).await
            })
            .await?;
        let (now, record) = reply::record(id, value)?;
        Ok(record.filter(|r| r.is_live(now)))
    }

    async fn claim_batch(&self, requests: &[ClaimRequest]) -> Result<Vec<ClaimOutcome>, Error> {
        for request in requests {
            request.validate()?;
        }
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let raw = nonces(requests.len())?;
        let holders: Vec<String> = raw.iter().map(|h| hex(h)).collect();
        // A failure fails the whole batch, so the claims that succeeded are lost with it.
        let pending = self.lost.pending(requests.iter().zip(raw.iter().copied()));
        let outcomes = match self.conn {
            Conn::Standalone(_) => self.claim_pipeline(requests, &holders).await,
            Conn::Cluster(_) => self.claim_rounds(requests, &holders).await,
        };
        if outcomes.is_ok() {
            pending.answered();
        }
        outcomes
    }

    /// Always 0: every record's key expires by itself (`PEXPIREAT` at its `expires_at`).
    async fn purge_expired(&self, _limit: usize) -> Result<usize, Error> {
        Ok(0)
    }

    async fn now(&self) -> Result<Timestamp, Error> {
        let value = self
            .retrying("TIME", |mut conn| async move {
                redis::cmd("TIME").query_async::<Value>(&mut conn).await
            })
            .await?;
        reply::time(value)
    }

    fn completion_waiter(&self) -> Option<&dyn WaitForCompletion> {
        Some(self)
    }

    fn inspector(&self) -> Option<&dyn Inspect> {
        Some(self)
    }
}

#[async_trait]
impl WaitForCompletion for RedisStore {
    async fn wait_settled(&self, id: &RecordId) -> Result<(), Error> {
        // Cluster: the record's channel is subscribed before its state is read.
        let _subscription = match &self.wake {
            Wake::Sharded(subscriptions) => Some(subscriptions.subscribe(*id).await?),
            Wake::Listener(_) => None,
        };
        loop {
            let settled = self.notifier.listen(id);
            let in_flight = self
                .get(id)
                .await?
                .is_some_and(|r| matches!(r.state, RecordState::InFlight { .. }));
            if !in_flight {
                return Ok(());
            }
            // Woken by a settlement or a reconnection: read the record again.
            settled.await;
        }
    }
}

#[async_trait]
impl Inspect for RedisStore {
    /// Scans every key under the prefix (on every master of a cluster), so a page costs a
    /// pass over the prefix's keys: an operator's tool, not a request path.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Record>, Error> {
        let mut found = Vec::new();
        if filter.limit == 0 {
            return Ok(found);
        }
        let window = filter.limit.saturating_mul(2).clamp(64, 4096);
        let mut after = filter.after;
        loop {
            let (ids, truncated) = self.scan_ids(after, window).await?;
            let records: Vec<Result<Option<Record>, Error>> = stream::iter(ids.clone())
                .map(|id| async move { self.get(&id).await })
                .buffered(CONCURRENCY)
                .collect()
                .await;
            for record in records {
                let Some(record) = record? else { continue };
                if filter.state.is_none_or(|s| record.state.kind() == s) {
                    found.push(record);
                    if found.len() == filter.limit {
                        return Ok(found);
                    }
                }
            }
            if !truncated {
                return Ok(found);
            }
            after = ids.last().copied();
        }
    }

    async fn remove(&self, id: &RecordId) -> Result<bool, Error> {
        // Not sent again after a lost answer: a second DEL would report nothing removed.
        let mut conn = self.conn.clone();
        let removed = scripts::remove(&mut conn, &self.keys, id)
            .await
            .map_err(|e| redis_error("remove", e))?;
        self.notifier.notify(id);
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use idem_core::Fingerprint;

    fn hex_nonces(count: usize) -> Vec<String> {
        nonces(count).unwrap().iter().map(|n| hex(n)).collect()
    }

    /// A store on the server of `var` (set by scripts/test), under a prefix of its own.
    async fn store(var: &str) -> RedisStore {
        let url = std::env::var(var).unwrap_or_else(|_| {
            panic!(
                "{var} is not set: run scripts/test, which starts Redis with \
                 scripts/redis-servers, or start them yourself: \
                 eval \"$(scripts/redis-servers start <dir>)\""
            )
        });
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let options = RedisOptions {
            key_prefix: format!("idem-unit:{}:{run}", std::process::id()),
            ..RedisOptions::default()
        };
        RedisStore::connect(&url, options).await.unwrap()
    }

    fn request(label: &str, lease: Duration) -> ClaimRequest {
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        ClaimRequest::new(
            RecordId::for_event("idem-redis-unit", &format!("{label}/{run}")),
            Fingerprint::of_bytes(b"a"),
        )
        .with_lease(lease)
        .with_retention(Duration::from_secs(10))
    }

    /// What the store does when a claim's answer was lost and it sends the claim again: the
    /// script finds the claim's own nonce and answers with the lease that claim took.
    async fn a_claim_sent_again_gets_the_lease_it_took(var: &str) {
        let store = store(var).await;
        let req = request("lost-acquired", Duration::from_secs(5));
        let holder = nonce().unwrap();
        let first = store.claim_with(&req, &holder).await.unwrap();
        assert!(matches!(first, ClaimOutcome::Acquired(_)), "{first:?}");
        assert_eq!(store.claim_with(&req, &holder).await.unwrap(), first);
        // Anyone else sees it in flight.
        assert!(matches!(
            store.claim_with(&req, &nonce().unwrap()).await.unwrap(),
            ClaimOutcome::InFlight { .. }
        ));

        // The same after a takeover: the answer again reports what was taken over.
        let req = request("lost-took-over", Duration::from_millis(50));
        let abandoned = store.claim(&req).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let req = req.with_lease(Duration::from_secs(5));
        let holder = nonce().unwrap();
        let first = store.claim_with(&req, &holder).await.unwrap();
        match &first {
            ClaimOutcome::TookOver {
                previous_token,
                previous_lease_until,
                ..
            } => {
                assert_eq!(Some(*previous_token), abandoned.lease().map(|l| l.token));
                assert_eq!(
                    Some(*previous_lease_until),
                    abandoned.lease().map(|l| l.lease_until)
                );
            }
            other => panic!("expected TookOver, got {other:?}"),
        }
        assert_eq!(store.claim_with(&req, &holder).await.unwrap(), first);

        // A claim whose own lease passed before it was sent again takes the record over
        // from itself: it is told, rather than handed a lease that already ended.
        let req = request("lost-expired", Duration::from_millis(50));
        let holder = nonce().unwrap();
        let first = store.claim_with(&req, &holder).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        match store.claim_with(&req, &holder).await.unwrap() {
            ClaimOutcome::TookOver { previous_token, .. } => {
                assert_eq!(Some(previous_token), first.lease().map(|l| l.token));
            }
            other => panic!("expected TookOver, got {other:?}"),
        }
    }

    /// A batch sent again with the same nonces answers as the first time, duplicates
    /// included.
    async fn a_batch_sent_again_gets_the_same_outcomes(var: &str) {
        let store = store(var).await;
        let a = request("batch-a", Duration::from_secs(5));
        let b = request("batch-b", Duration::from_secs(5));
        let requests = vec![a.clone(), b, a];
        let holders = hex_nonces(3);
        let (first, again) = match store.conn {
            Conn::Standalone(_) => (
                store.claim_pipeline(&requests, &holders).await.unwrap(),
                store.claim_pipeline(&requests, &holders).await.unwrap(),
            ),
            Conn::Cluster(_) => (
                store.claim_rounds(&requests, &holders).await.unwrap(),
                store.claim_rounds(&requests, &holders).await.unwrap(),
            ),
        };
        assert!(matches!(first[0], ClaimOutcome::Acquired(_)));
        assert!(matches!(first[1], ClaimOutcome::Acquired(_)));
        assert!(matches!(first[2], ClaimOutcome::InFlight { .. }));
        // The same, but for the store's time an in-flight answer carries.
        let at_zero = |outcomes: Vec<ClaimOutcome>| -> Vec<ClaimOutcome> {
            outcomes
                .into_iter()
                .map(|outcome| match outcome {
                    ClaimOutcome::InFlight { lease_until, .. } => ClaimOutcome::InFlight {
                        lease_until,
                        now: Timestamp::from_millis(0),
                    },
                    other => other,
                })
                .collect()
        };
        assert_eq!(at_zero(first), at_zero(again));
    }

    /// Complete and release sent again after a lost answer answer "done", not "lease lost".
    async fn a_settlement_sent_again_succeeds_once(var: &str) {
        let store = store(var).await;
        for completing in [true, false] {
            let req = request("lost-settle", Duration::from_secs(5));
            let lease = *store.claim(&req).await.unwrap().lease().unwrap();
            let settle_nonce = nonce().unwrap();
            for _ in 0..2 {
                let mut conn = store.conn.clone();
                let value = if completing {
                    scripts::complete(
                        &mut conn,
                        &store.keys,
                        &req.id,
                        lease.token,
                        b"r",
                        &settle_nonce,
                    )
                    .await
                } else {
                    scripts::release(&mut conn, &store.keys, &req.id, lease.token, &settle_nonce)
                        .await
                }
                .unwrap();
                RedisStore::settled("settle", &req.id, lease.token, value).unwrap();
            }
            // Another call with the same token is refused.
            let again = if completing {
                store.complete(&req.id, lease.token, Bytes::new()).await
            } else {
                store.release(&req.id, lease.token).await
            };
            assert!(again.is_err_and(|e| e.is_lease_lost()));
        }
    }

    #[tokio::test]
    async fn standalone_claim_sent_again_gets_the_lease_it_took() {
        a_claim_sent_again_gets_the_lease_it_took("IDEM_TEST_REDIS_URL").await;
    }

    #[tokio::test]
    async fn cluster_claim_sent_again_gets_the_lease_it_took() {
        a_claim_sent_again_gets_the_lease_it_took("IDEM_TEST_REDIS_CLUSTER_URL").await;
    }

    #[tokio::test]
    async fn standalone_batch_sent_again_gets_the_same_outcomes() {
        a_batch_sent_again_gets_the_same_outcomes("IDEM_TEST_REDIS_URL").await;
    }

    #[tokio::test]
    async fn cluster_batch_sent_again_gets_the_same_outcomes() {
        a_batch_sent_again_gets_the_same_outcomes("IDEM_TEST_REDIS_CLUSTER_URL").await;
    }

    #[tokio::test]
    async fn standalone_settlement_sent_again_succeeds_once() {
        a_settlement_sent_again_succeeds_once("IDEM_TEST_REDIS_URL").await;
    }

    #[tokio::test]
    async fn cluster_settlement_sent_again_succeeds_once() {
        a_settlement_sent_again_succeeds_once("IDEM_TEST_REDIS_CLUSTER_URL").await;
    }

    const CLUSTER: &str = "IDEM_TEST_REDIS_CLUSTER_URL";

    fn routes(store: &RedisStore) -> Arc<Routes> {
        store.routes.clone().expect("a cluster store routes claims")
    }

    /// A plain connection to the master at `address`.
    async fn node(address: &Option<(String, u16)>) -> redis::aio::MultiplexedConnection {
        let (host, port) = address.clone().expect("the slot has a master");
        redis::Client::open(format!("redis://{host}:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Waits until the slot map is read again and names a working connection for every
    /// slot.
    async fn map_read_again(routes: &Routes, truth: &[Option<(String, u16)>]) {
        for _ in 0..250 {
            if routes.complete() && routes.addresses() == truth {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the slot map was not read again");
    }

    /// Claims on a slot map that names the wrong master for most slots: the masters answer
    /// MOVED without running the script, the claims go through the cluster connection, each
    /// takes effect once, and the map is read again.
    #[tokio::test]
    async fn cluster_claims_follow_a_stale_slot_map() {
        let store = store(CLUSTER).await;
        let routes = routes(&store);
        assert!(routes.complete(), "every slot has a route after connecting");
        let truth = routes.addresses();

        let requests: Vec<ClaimRequest> = (0..24)
            .map(|i| request(&format!("stale-map-{i}"), Duration::from_secs(5)))
            .collect();
        let slot = |r: &ClaimRequest| crate::slots::key_slot(store.record_key(&r.id).as_bytes());
        // The slots agree with the server's.
        let mut conn = store.conn.clone();
        for r in &requests[..4] {
            let server: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(store.record_key(&r.id))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(server, slot(r));
        }
        let pretended = slot(&requests[0]);
        let elsewhere = requests
            .iter()
            .filter(|r| truth[usize::from(slot(r))] != truth[usize::from(pretended)])
            .count();
        assert!(elsewhere > 0, "the ids' slots are on more than one master");
        routes.pretend_every_slot_is_on_the_master_of(pretended);

        let before = routes.fallbacks();
        let holders = hex_nonces(requests.len());
        let mut outcomes = Vec::new();
        for (r, holder) in requests.iter().zip(&holders) {
            let outcome = store.claim_with(r, holder).await.unwrap();
            assert!(matches!(outcome, ClaimOutcome::Acquired(_)), "{outcome:?}");
            outcomes.push(outcome);
        }
        assert!(
            routes.fallbacks() > before,
            "a MOVED took the cluster connection"
        );
        map_read_again(&routes, &truth).await;

        // Each claim took effect once, on its master: sent again it gets its own lease, and
        // the record holds it.
        for ((r, holder), outcome) in requests.iter().zip(&holders).zip(&outcomes) {
            assert_eq!(&store.claim_with(r, holder).await.unwrap(), outcome);
            let record = store.get(&r.id).await.unwrap().unwrap();
            assert_eq!(Some(record.token), outcome.lease().map(|l| l.token));
        }
        // On the right map, claims go straight to their masters.
        let before = routes.fallbacks();
        for i in 0..8 {
            let r = request(&format!("right-map-{i}"), Duration::from_secs(5));
            assert!(matches!(
                store.claim(&r).await.unwrap(),
                ClaimOutcome::Acquired(_)
            ));
        }
        assert_eq!(routes.fallbacks(), before);
    }

    /// A master's connection that fails: the claim goes through the cluster connection, and
    /// the map is read again with a new connection.
    #[tokio::test]
    async fn cluster_claims_survive_a_lost_node_connection() {
        let store = store(CLUSTER).await;
        let routes = routes(&store);
        let truth = routes.addresses();
        let req = request("lost-node-connection", Duration::from_secs(5));
        let slot = crate::slots::key_slot(store.record_key(&req.id).as_bytes());
        let client_id = |mut conn: redis::aio::MultiplexedConnection| async move {
            redis::cmd("CLIENT")
                .arg("ID")
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        };
        let id = client_id(routes.connection(slot).unwrap()).await;
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut node(&truth[usize::from(slot)]).await)
            .await
            .unwrap();
        assert_eq!(killed, 1);

        let before = routes.fallbacks();
        let holder = nonce().unwrap();
        let outcome = store.claim_with(&req, &holder).await.unwrap();
        assert!(matches!(outcome, ClaimOutcome::Acquired(_)), "{outcome:?}");
        assert!(routes.fallbacks() > before);
        map_read_again(&routes, &truth).await;
        assert_ne!(client_id(routes.connection(slot).unwrap()).await, id);
        assert_eq!(store.claim_with(&req, &holder).await.unwrap(), outcome);
    }

    /// A claim whose answer comes too late is sent again with the same nonce, on the
    /// fallback and by the store's retries, and takes effect once: the master is busy with
    /// a long script while the claims queue behind it, and runs them all afterwards.
    #[tokio::test]
    async fn cluster_claim_answered_too_late_takes_effect_once() {
        let url = std::env::var(CLUSTER).unwrap();
        let options = RedisOptions {
            key_prefix: format!("idem-unit:{}:late", std::process::id()),
            response_timeout: Duration::from_millis(100),
            ..RedisOptions::default()
        };
        let store = RedisStore::connect(&url, options).await.unwrap();
        let routes = routes(&store);
        let req = request("late-answer", Duration::from_secs(5));
        let slot = crate::slots::key_slot(store.record_key(&req.id).as_bytes());
        let mut busy = node(&routes.addresses()[usize::from(slot)]).await;
        let mut probe = node(&routes.addresses()[usize::from(slot)]).await;
        let busy = tokio::spawn(async move {
            redis::cmd("EVAL")
                .arg(
                    "local t = redis.call('TIME') repeat local n = redis.call('TIME') \
                     until (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 500000 return 1",
                )
                .arg(0)
                .query_async::<i64>(&mut busy)
                .await
        });
        // Wait until the master is inside the script: a PING gets no answer while it runs.
        for round in 0.. {
            let ping = redis::cmd("PING");
            let answer = ping.query_async::<String>(&mut probe);
            if tokio::time::timeout(Duration::from_millis(20), answer)
                .await
                .is_err()
            {
                break;
            }
            assert!(round < 500, "the long script never started");
        }
        let before = routes.fallbacks();
        let holder = nonce().unwrap();
        let outcome = store.claim_with(&req, &holder).await.unwrap();
        assert_eq!(busy.await.unwrap().unwrap(), 1);
        let ClaimOutcome::Acquired(lease) = outcome else {
            panic!("{outcome:?}")
        };
        assert!(routes.fallbacks() > before, "the late claim was sent again");
        let record = store.get(&req.id).await.unwrap().unwrap();
        assert_eq!(record.token, lease.token);
        assert_eq!(store.claim_with(&req, &holder).await.unwrap(), outcome);
    }

    /// Concurrent waiters of one record share one sharded subscription, which ends with the
    /// last of them, cancelled or woken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sharded_subscriptions_live_as_long_as_their_waiters() {
        let store = Arc::new(store("IDEM_TEST_REDIS_CLUSTER_URL").await);
        let Wake::Sharded(subscriptions) = &store.wake else {
            panic!("a cluster store subscribes per record")
        };
        let subscriptions = subscriptions.clone();
        let req = request("subscriptions", Duration::from_secs(5));
        let lease = *store.claim(&req).await.unwrap().lease().unwrap();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.wait_settled(&req.id).await })
            })
            .collect();
        // A cancelled wait gives its subscription up too.
        let cancelled =
            tokio::time::timeout(Duration::from_millis(100), store.wait_settled(&req.id)).await;
        assert!(cancelled.is_err(), "the record is in flight");
        assert_eq!(subscriptions.len(), 1);
        store
            .complete(&req.id, lease.token, Bytes::new())
            .await
            .unwrap();
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
        for _ in 0..100 {
            if subscriptions.len() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} subscriptions left", subscriptions.len());
    }

    #[test]
    fn versions_are_read_from_info() {
        assert_eq!(
            major_version("# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:0\r\n"),
            Some(7)
        );
        assert_eq!(major_version("redis_version:6.2.1"), Some(6));
        assert_eq!(major_version("nothing"), None);
    }

    #[test]
    fn nonces_differ() {
        let n = hex_nonces(3);
        assert_eq!(n.len(), 3);
        assert_eq!(n[0].len(), 32);
        assert!(n[0] != n[1] && n[1] != n[2]);
    }
}
