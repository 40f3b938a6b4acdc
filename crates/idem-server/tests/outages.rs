//! Store outages, end to end: the `idem` binary in front of a counting upstream, over a
//! PostgreSQL or Redis server of the test's own, which the test stops and starts again.
//!
//! - While requests flow (distinct keys, and retries of earlier ones), the store server is
//!   stopped at once, as in a crash. While it is down, the gateway answers `503` with
//!   `Retry-After` and the upstream receives nothing it could not claim: only requests
//!   claimed before the stop may reach it, and no key first sent during the outage does.
//!   The server is started again on the same port with its data; the same gateway process,
//!   never restarted, serves again, replays what was completed before the outage, and the
//!   upstream's journal shows no key executed twice.
//! - A claim whose answer is lost with its connection (the statement or script ran on the
//!   server; the connection failed before the answer came back) is resolved by reading it
//!   back: PostgreSQL reads the row by the claim's nonce on a fresh connection; Redis sends
//!   the script again with the same nonce and the script recognises it. The request
//!   executes once. If the server stays unreachable, the outcome is not assumed either way:
//!   the gateway answers `503` and forwards nothing; once the server is back, the store
//!   releases the record the lost claim took (it holds the claim's nonce, and its caller
//!   executed nothing), and a retry executes the request once, long before the lost claim's
//!   lease would have ended. A lost claim that took a record over from an earlier attempt
//!   is not released: that attempt's outcome is still unknown.
//!
//! Each test starts its own server (PostgreSQL through `scripts/pg-server`, `redis-server`
//! with its append-only file synced on every write), so stopping it disturbs no other test.
//! Without the server binaries a test prints why and returns, except under `CI=true`,
//! where it fails. No assertion is about time; recovery is awaited with generous deadlines.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::proxy::{LossyProxy, PG_READY_FOR_QUERY};
use common::servers::{Control, PgServer, RedisServer};
use common::shared::{self, SECRET};
use common::{Answer, Binary, Upstream, client, post};
use idem_core::{
    ClaimOutcome, ClaimRequest, Error as StoreError, Fingerprint, PrincipalHasher, RecordId,
    RecordState, Store,
};
use idem_server::records::ScopeParts;
use tempfile::TempDir;

const BODY: &str = r#"{"amount": 100}"#;

/// Where a request stood relative to the outage when it was sent or answered.
const UP: u8 = 0;
/// The stop was requested; the server may still be answering.
const STOPPING: u8 = 1;
/// The server is gone: it accepts no connections.
const DOWN: u8 = 2;
/// The restart was requested.
const RESTARTING: u8 = 3;
/// The server accepts connections again.
const BACK: u8 = 4;
/// The gateway has served a fresh key since the server came back.
const RECOVERED: u8 = 5;

/// One request of the load and its answer.
#[derive(Clone, Debug)]
struct Sent {
    key: String,
    retry: bool,
    sent_in: u8,
    answered_in: u8,
    status: u16,
    retry_after: bool,
    problem: Option<String>,
    replayed: Option<String>,
    body: Bytes,
}

fn path_of(key: &str) -> String {
    format!("/v1/charges/{key}")
}

/// Requests from a few concurrent clients, each sending fresh keys and, every fourth
/// request, a retry of its own key from three requests earlier.
struct Load {
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Sent>>>,
    /// Requests sent before the outage and not answered yet.
    outstanding_before_down: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gateway: &Binary, prefix: &str, workers: usize) -> Self {
        let phase = Arc::new(AtomicU8::new(UP));
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let outstanding = Arc::new(AtomicU64::new(0));
        let handles = (0..workers)
            .map(|w| {
                let base = gateway.url("");
                let prefix = prefix.to_string();
                let (phase, stop, log, outstanding) = (
                    phase.clone(),
                    stop.clone(),
                    log.clone(),
                    outstanding.clone(),
                );
                tokio::spawn(async move {
                    let client = client();
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let retry = i % 4 == 3;
                        let n = if retry { i - 3 } else { i };
                        let key = format!("{prefix}-{w}-{n}");
                        let sent_in = phase.load(Ordering::SeqCst);
                        let before_down = sent_in < DOWN;
                        if before_down {
                            outstanding.fetch_add(1, Ordering::SeqCst);
                        }
                        let answer = post(format!("{base}{}", path_of(&key)))
                            .key(&key)
                            .json(BODY)
                            .send_with(&client)
                            .await
                            .unwrap_or_else(|e| panic!("the gateway did not answer: {e}"));
                        if before_down {
                            outstanding.fetch_sub(1, Ordering::SeqCst);
                        }
                        let answered_in = phase.load(Ordering::SeqCst);
                        let problem = (answer.header("content-type")
                            == Some("application/problem+json"))
                        .then(|| answer.problem());
                        log.lock().unwrap().push(Sent {
                            key,
                            retry,
                            sent_in,
                            answered_in,
                            status: answer.status.as_u16(),
                            retry_after: answer.header("retry-after").is_some(),
                            problem,
                            replayed: answer.replayed().map(str::to_string),
                            body: answer.body.clone(),
                        });
                        i += 1;
                        // Leave the two cores some room for the gateway and the server.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Self {
            phase,
            stop,
            log,
            outstanding_before_down: outstanding,
            workers: handles,
        }
    }

    fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Waits (generously) until `n` requests sent in `phase` were answered with one of
    /// `statuses`.
    async fn wait_for(&self, n: usize, phase: u8, statuses: &[u16]) {
        for _ in 0..1200 {
            let count = self
                .log
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.sent_in == phase && s.answered_in == phase)
                .filter(|s| statuses.contains(&s.status))
                .count();
            if count >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("fewer than {n} answers {statuses:?} to requests sent in phase {phase}");
    }

    async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers {
            worker.await.unwrap();
        }
        self.log.lock().unwrap().clone()
    }
}

/// A gateway over the store at `store`, with `defaults` in `[defaults]`.
fn gateway(dir: &TempDir, up: &Upstream, store: &str, defaults: &str) -> Binary {
    shared::write_config(dir.path(), up, store, defaults);
    shared::replica(dir.path())
}

fn is_running(gateway: &mut Binary) -> bool {
    gateway.child.try_wait().unwrap().is_none()
}

/// Sends one request with `key` and returns the answer.
async fn send(gateway: &Binary, key: &str) -> Answer {
    post(gateway.url(&path_of(key)))
        .key(key)
        .json(BODY)
        .send()
        .await
}

fn assert_store_unavailable(answer: &Answer) {
    assert_eq!(
        answer.status,
        503,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.problem(), "store-unavailable");
    assert!(
        answer.header("retry-after").is_some(),
        "a 503 carries Retry-After"
    );
}

/// The whole outage story against `server` (see the module docs).
async fn the_gateway_rides_out_an_outage(server: &mut dyn Control) {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(&dir, &up, &server.url(), "");
    let pid = gw.child.id();
    let prefix = shared::unique("outage");

    // Store up: requests flow and complete.
    let load = Load::start(&gw, &prefix, 6);
    load.wait_for(40, UP, &[201]).await;
    let completed_before = {
        let log = load.log.lock().unwrap();
        log.iter()
            .find(|s| s.status == 201 && s.replayed.as_deref() == Some("false"))
            .cloned()
            .expect("a request completed before the outage")
    };

    // Stop the server in the middle of the run.
    load.set_phase(STOPPING);
    tokio::task::block_in_place(|| server.stop());
    load.set_phase(DOWN);
    let in_flight_at_stop = load.outstanding_before_down.load(Ordering::SeqCst);
    let calls_at_stop = up.calls();

    // While it is down: 503 with Retry-After, for a fresh key and for a retry of a
    // completed one alike.
    let down_key = format!("{prefix}-down-probe");
    assert_store_unavailable(&send(&gw, &down_key).await);
    assert_store_unavailable(&send(&gw, &completed_before.key).await);
    load.wait_for(12, DOWN, &[503]).await;
    let journal_down = up.executions();
    let calls_down = up.calls();

    // Back on the same port, with the same data.
    load.set_phase(RESTARTING);
    tokio::task::block_in_place(|| server.restart());
    load.set_phase(BACK);

    // The same gateway process recovers by itself.
    let mut recovered = None;
    for attempt in 0..600 {
        let answer = send(&gw, &format!("{prefix}-back-probe-{attempt}")).await;
        if answer.status == 201 {
            recovered = Some(answer);
            break;
        }
        assert_store_unavailable(&answer);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered.is_some(), "the gateway did not recover");
    load.set_phase(RECOVERED);
    load.wait_for(40, RECOVERED, &[201]).await;
    let log = load.finish().await;
    assert!(is_running(&mut gw), "the gateway kept running");
    assert_eq!(gw.child.id(), pid, "the same gateway process");

    // What was completed before the outage is replayed, not executed again; the request
    // refused during the outage executes now, once.
    let replay = send(&gw, &completed_before.key).await;
    assert_eq!(replay.replayed(), Some("true"));
    assert_eq!(replay.body, completed_before.body);
    let down_probe = send(&gw, &down_key).await;
    assert_eq!(down_probe.status, 201);
    assert_eq!(down_probe.replayed(), Some("false"));

    // During the outage the upstream received only requests claimed before the stop.
    let first_sent: HashMap<&str, u8> = log.iter().rev().map(|s| (&*s.key, s.sent_in)).collect();
    let sent_while_down: HashSet<&str> = first_sent
        .iter()
        .filter(|(_, phase)| **phase == DOWN)
        .map(|(key, _)| *key)
        .collect();
    for key in &sent_while_down {
        assert!(
            !journal_down.contains_key(&path_of(key)),
            "{key}, first sent while the store was down, reached the upstream during the outage"
        );
    }
    assert!(!journal_down.contains_key(&path_of(&down_key)));
    assert!(
        calls_down - calls_at_stop <= in_flight_at_stop,
        "{} upstream calls while the store was down, but only {in_flight_at_stop} requests \
         were under way when it stopped",
        calls_down - calls_at_stop
    );
    eprintln!(
        "{} requests: {} answered while the store was down; {} upstream calls during the \
         outage ({in_flight_at_stop} requests were under way at the stop)",
        log.len(),
        log.iter().filter(|s| s.answered_in == DOWN).count(),
        calls_down - calls_at_stop
    );

    // Every answer is one of the contract's: executed or replayed, in flight (a key claimed
    // before the stop whose completion the outage prevented), or 503 with Retry-After.
    let mut originals: HashMap<&str, &Bytes> = HashMap::new();
    for s in &log {
        match s.status {
            201 => {
                if s.replayed.as_deref() == Some("false") {
                    assert!(
                        originals.insert(&s.key, &s.body).is_none(),
                        "{} executed twice",
                        s.key
                    );
                }
            }
            409 => {
                assert!(s.retry, "{s:?}");
                assert!(s.retry_after, "{s:?}");
            }
            503 => {
                assert!(s.retry_after, "{s:?}");
                assert_eq!(s.problem.as_deref(), Some("store-unavailable"));
                assert!(
                    s.sent_in < RECOVERED,
                    "503 after the gateway recovered: {s:?}"
                );
            }
            other => panic!("unexpected answer {other}: {s:?}"),
        }
        if s.sent_in == DOWN && s.answered_in == DOWN {
            assert_eq!(s.status, 503, "{s:?}");
        }
    }
    for s in log.iter().filter(|s| s.replayed.as_deref() == Some("true")) {
        if let Some(original) = originals.get(&*s.key) {
            assert_eq!(
                *original, &s.body,
                "a replay differs from the original answer"
            );
        }
    }

    // No key executed twice, and every executed answer a client saw is in the journal once.
    let journal = up.executions();
    for (path, count) in &journal {
        assert_eq!(*count, 1, "{path} executed {count} times");
    }
    for key in originals.keys() {
        assert_eq!(journal.get(&path_of(key)), Some(&1), "{key}");
    }
}

/// How the lost claim's answer is recognised on the wire, per store.
#[derive(Clone, Copy)]
enum Wire {
    Postgres,
    Redis,
}

/// A gateway that reaches the store through a [`LossyProxy`], and the record id of the
/// request `post(path)` with `key` and no principal.
struct Lossy {
    up: Upstream,
    proxy: LossyProxy,
    gw: Binary,
    namespace: String,
    _dir: TempDir,
}

async fn lossy(server: &dyn Control, wire: Wire, defaults: &str) -> Lossy {
    let up = Upstream::start().await;
    let proxy = LossyProxy::start(server.addr()).await;
    let url = match wire {
        Wire::Postgres => format!("postgres://postgres@{}/postgres", proxy.addr),
        Wire::Redis => format!("redis://{}", proxy.addr),
    };
    let dir = tempfile::tempdir().unwrap();
    let namespace = shared::unique("lossy");
    let gw = gateway(
        &dir,
        &up,
        &url,
        &format!("namespace = \"{namespace}\"\n{defaults}"),
    );
    Lossy {
        up,
        proxy,
        gw,
        namespace,
        _dir: dir,
    }
}

impl Lossy {
    /// Arms the proxy to lose the answer to the claim of `key`'s record.
    fn lose_claim_answer(&self, wire: Wire, key: &str, then_refuse: bool) {
        let parts = ScopeParts {
            namespace: Some(self.namespace.clone()),
            principal: None,
            method: "POST".into(),
            route: "/*".into(),
            path: Some(path_of(key)),
            key: key.into(),
        };
        let id = parts
            .record_id(&PrincipalHasher::new(SECRET.as_bytes()))
            .unwrap();
        match wire {
            // The id travels as a bytea parameter of the claim statement; the answer is
            // complete (and committed) at ReadyForQuery.
            Wire::Postgres => {
                self.proxy
                    .lose_answer_to(id.as_bytes(), Some(PG_READY_FOR_QUERY), then_refuse);
            }
            // The id is in the record's key, `<prefix>:{<hex id>}`.
            Wire::Redis => {
                self.proxy
                    .lose_answer_to(id.to_hex().as_bytes(), None, then_refuse);
            }
        }
    }
}

/// The claim ran on the server, its answer was lost: the store reads it back and the
/// request executes once.
async fn a_lost_claim_answer_is_read_back(server: &dyn Control, wire: Wire) {
    let l = lossy(server, wire, "").await;
    let key = shared::unique("lost");
    l.lose_claim_answer(wire, &key, false);
    let first = send(&l.gw, &key).await;
    assert_eq!(l.proxy.lost(), 1, "the claim's answer was lost");
    assert_eq!(
        first.status,
        201,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(first.replayed(), Some("false"));
    assert_eq!(l.up.calls(), 1);
    let retry = send(&l.gw, &key).await;
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(l.up.calls(), 1);
}

/// The claim ran on the server, its answer was lost, and the server stays unreachable: the
/// outcome is unknown, so the gateway answers 503 and forwards nothing. Once the server is
/// reachable, the store releases the record the lost claim took, and a retry executes the
/// request once. The lease (10 minutes) is far longer than the test's patience, so only the
/// release can let the retry through.
async fn a_lost_claim_answer_is_never_assumed(server: &dyn Control, wire: Wire) {
    let l = lossy(server, wire, "lease = \"600s\"").await;
    let key = shared::unique("unknown");
    l.lose_claim_answer(wire, &key, true);
    let first = send(&l.gw, &key).await;
    assert_eq!(l.proxy.lost(), 1, "the claim's answer was lost");
    assert_store_unavailable(&first);
    assert_eq!(l.up.calls(), 0);

    l.proxy.heal();
    let mut answer = send(&l.gw, &key).await;
    for _ in 0..600 {
        if answer.status != 503 && answer.status != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        answer = send(&l.gw, &key).await;
    }
    assert_eq!(
        answer.status,
        201,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.replayed(), Some("false"));
    assert_eq!(
        l.up.calls(),
        1,
        "executed once, after the lost claim was released"
    );
    let again = send(&l.gw, &key).await;
    assert_eq!(again.replayed(), Some("true"));
    assert_eq!(again.body, answer.body);
    assert_eq!(l.up.calls(), 1);
}

/// A store over a proxy that loses the answer to one claim and then refuses connections,
/// and a store straight on the server.
enum Stores {
    Postgres {
        via: idem_postgres::PostgresStore,
        direct: idem_postgres::PostgresStore,
    },
    Redis {
        via: idem_redis::RedisStore,
        direct: idem_redis::RedisStore,
    },
}

impl Stores {
    async fn connect(server: &dyn Control, wire: Wire, proxy: &LossyProxy) -> Self {
        match wire {
            Wire::Postgres => {
                let url = |addr| format!("postgres://postgres@{addr}/postgres");
                let options = idem_postgres::PostgresOptions::default;
                Stores::Postgres {
                    via: idem_postgres::PostgresStore::connect(&url(proxy.addr), options())
                        .await
                        .unwrap(),
                    direct: idem_postgres::PostgresStore::connect(&url(server.addr()), options())
                        .await
                        .unwrap(),
                }
            }
            Wire::Redis => {
                let url = |addr| format!("redis://{addr}");
                let options = idem_redis::RedisOptions::default;
                Stores::Redis {
                    via: idem_redis::RedisStore::connect(&url(proxy.addr), options())
                        .await
                        .unwrap(),
                    direct: idem_redis::RedisStore::connect(&url(server.addr()), options())
                        .await
                        .unwrap(),
                }
            }
        }
    }

    fn via(&self) -> &dyn Store {
        match self {
            Stores::Postgres { via, .. } => via,
            Stores::Redis { via, .. } => via,
        }
    }

    fn direct(&self) -> &dyn Store {
        match self {
            Stores::Postgres { direct, .. } => direct,
            Stores::Redis { direct, .. } => direct,
        }
    }

    fn lost_claims(&self) -> usize {
        match self {
            Stores::Postgres { via, .. } => via.lost_claims(),
            Stores::Redis { via, .. } => via.lost_claims(),
        }
    }

    /// Arms the proxy to lose the answer to the next claim of `id`, then (with
    /// `then_refuse`) refuse connections. PostgreSQL claims a record it may take over in two
    /// statements, a read and then the takeover: with `takeover`, the read is answered and
    /// the takeover's answer is lost.
    fn lose_claim_answer(
        &self,
        proxy: &LossyProxy,
        id: &RecordId,
        takeover: bool,
        then_refuse: bool,
    ) {
        match self {
            Stores::Postgres { .. } => proxy.lose_later_answer_to(
                id.as_bytes(),
                Some(PG_READY_FOR_QUERY),
                then_refuse,
                usize::from(takeover),
            ),
            Stores::Redis { .. } => {
                proxy.lose_answer_to(id.to_hex().as_bytes(), None, then_refuse);
            }
        }
    }

    /// Arms the proxy to hold back the answer to the next claim of `id`.
    fn hold_claim_answer(&self, proxy: &LossyProxy, id: &RecordId) {
        match self {
            Stores::Postgres { .. } => {
                proxy.hold_answer_to(id.as_bytes(), Some(PG_READY_FOR_QUERY))
            }
            Stores::Redis { .. } => proxy.hold_answer_to(id.to_hex().as_bytes(), None),
        }
    }

    /// Waits until the store over the proxy has no lost claim left to release.
    async fn settle_lost_claims(&self) {
        for _ in 0..600 {
            if self.lost_claims() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("lost claims still waiting: {}", self.lost_claims());
    }
}

/// The store itself, without a gateway. A claim whose lost answer is read back is the
/// caller's, and nothing of it is released. A lost claim on a free record is released once
/// the server answers again, and the next claim acquires the record afresh, unless the
/// claim said not to (`release_if_lost`). A lost claim that took a record over is not
/// released: the record stays held by it, and the claim after its lease is told that an
/// earlier attempt did not finish (`TookOver`).
async fn a_lost_claim_releases_only_a_record_it_took_free(server: &dyn Control, wire: Wire) {
    let proxy = LossyProxy::start(server.addr()).await;
    let stores = Stores::connect(server, wire, &proxy).await;
    let run = shared::unique("lost-claims");
    let request = |event: &str, lease: Duration| {
        ClaimRequest::new(
            RecordId::for_event(&run, event),
            Fingerprint::of_bytes(b"lost claims"),
        )
        .with_lease(lease)
    };

    // The answer is lost with the server reachable: read back (PostgreSQL) or sent again
    // (Redis), the claim is the caller's, and nothing is left to release.
    let read_back = request("read-back", Duration::from_secs(600));
    stores.lose_claim_answer(&proxy, &read_back.id, false, false);
    let lease = *stores
        .via()
        .claim(&read_back)
        .await
        .unwrap()
        .lease()
        .unwrap();
    assert_eq!(proxy.lost(), 1);
    assert_eq!(stores.lost_claims(), 0);

    // A fresh record, the server unreachable once the answer is lost.
    let fresh = request("fresh", Duration::from_secs(600));
    stores.lose_claim_answer(&proxy, &fresh.id, false, true);
    let error = stores.via().claim(&fresh).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert_eq!(proxy.lost(), 2);
    let held = stores.direct().get(&fresh.id).await.unwrap().unwrap();
    assert!(
        matches!(held.state, RecordState::InFlight { .. }),
        "{held:?}"
    );
    assert_eq!(stores.lost_claims(), 1);
    proxy.heal();
    stores.settle_lost_claims().await;
    let released = stores.direct().get(&fresh.id).await.unwrap().unwrap();
    assert!(
        matches!(released.state, RecordState::Released { .. }),
        "{released:?}"
    );
    assert_eq!(released.token, held.token);
    match stores.direct().claim(&fresh).await.unwrap() {
        ClaimOutcome::Acquired(lease) => assert!(lease.token > held.token),
        other => panic!("expected the released record acquired afresh, got {other:?}"),
    }
    // The read-back claim's record is still its caller's.
    let record = stores.direct().get(&read_back.id).await.unwrap().unwrap();
    assert_eq!(record.token, lease.token);
    assert!(matches!(record.state, RecordState::InFlight { .. }));

    // A claim that says not to release what it took is not recorded as lost.
    let kept = request("kept", Duration::from_secs(600)).with_release_if_lost(false);
    stores.lose_claim_answer(&proxy, &kept.id, false, true);
    stores.via().claim(&kept).await.unwrap_err();
    assert_eq!(proxy.lost(), 3);
    assert_eq!(stores.lost_claims(), 0);
    proxy.heal();

    // A record whose lease passed, taken over by the lost claim.
    let stale = request("taken-over", Duration::from_millis(50));
    let first = *stores
        .direct()
        .claim(&stale)
        .await
        .unwrap()
        .lease()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    // A lost claim not found is kept while its lease lasts (it might still land), so
    // this one's lease is short.
    let takeover = request("taken-over", Duration::from_secs(2));
    stores.lose_claim_answer(&proxy, &takeover.id, true, true);
    let error = stores.via().claim(&takeover).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert_eq!(proxy.lost(), 4);
    proxy.heal();
    stores.settle_lost_claims().await;
    let record = stores.direct().get(&takeover.id).await.unwrap().unwrap();
    assert!(record.token > first.token, "{record:?}");
    assert!(
        matches!(record.state, RecordState::InFlight { .. }),
        "the takeover's record must stay held: {record:?}"
    );
    match stores.direct().claim(&takeover).await.unwrap() {
        ClaimOutcome::TookOver { previous_token, .. } => assert_eq!(previous_token, record.token),
        other => panic!("expected the lost takeover taken over in turn, got {other:?}"),
    }
}

/// The store itself: a batch of claims whose answer is lost while the server stays away
/// fails as a whole, and every record it took is released once the server answers again.
async fn a_lost_batch_releases_what_it_took(server: &dyn Control, wire: Wire) {
    let proxy = LossyProxy::start(server.addr()).await;
    let stores = Stores::connect(server, wire, &proxy).await;
    let run = shared::unique("lost-batch");
    let requests: Vec<ClaimRequest> = ["a", "b"]
        .into_iter()
        .map(|event| {
            ClaimRequest::new(
                RecordId::for_event(&run, event),
                Fingerprint::of_bytes(b"lost batch"),
            )
            .with_lease(Duration::from_secs(600))
        })
        .collect();
    stores.lose_claim_answer(&proxy, &requests[0].id, false, true);
    let error = stores.via().claim_batch(&requests).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert_eq!(proxy.lost(), 1);
    for request in &requests {
        let held = stores.direct().get(&request.id).await.unwrap().unwrap();
        assert!(
            matches!(held.state, RecordState::InFlight { .. }),
            "{held:?}"
        );
    }
    proxy.heal();
    stores.settle_lost_claims().await;
    for request in &requests {
        let released = stores.direct().get(&request.id).await.unwrap().unwrap();
        assert!(
            matches!(released.state, RecordState::Released { .. }),
            "{released:?}"
        );
        assert!(matches!(
            stores.direct().claim(request).await.unwrap(),
            ClaimOutcome::Acquired(_)
        ));
    }
}

/// The store itself: a claim that ran on the server but whose caller stopped waiting for
/// the answer (a client that went away, the gateway's `store_timeout`) is released, as its
/// caller executes nothing; the next claim acquires the record afresh.
async fn an_abandoned_claim_is_released(server: &dyn Control, wire: Wire) {
    let proxy = LossyProxy::start(server.addr()).await;
    let stores = Stores::connect(server, wire, &proxy).await;
    let request = ClaimRequest::new(
        RecordId::for_event(&shared::unique("abandoned"), "claim"),
        Fingerprint::of_bytes(b"abandoned"),
    )
    .with_lease(Duration::from_secs(600));
    stores.hold_claim_answer(&proxy, &request.id);
    tokio::select! {
        outcome = stores.via().claim(&request) => panic!("the held answer came: {outcome:?}"),
        () = async {
            while proxy.lost() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        } => {}
    }
    // The claim ran on the server and its caller has gone.
    let held = stores.direct().get(&request.id).await.unwrap().unwrap();
    assert!(
        matches!(held.state, RecordState::InFlight { .. }),
        "{held:?}"
    );
    proxy.drop_held();
    stores.settle_lost_claims().await;
    let released = stores.direct().get(&request.id).await.unwrap().unwrap();
    assert!(
        matches!(released.state, RecordState::Released { .. }),
        "{released:?}"
    );
    assert_eq!(released.token, held.token);
    assert!(matches!(
        stores.direct().claim(&request).await.unwrap(),
        ClaimOutcome::Acquired(_)
    ));
}

fn postgres() -> Option<PgServer> {
    shared::require(
        PgServer::available(),
        "PostgreSQL",
        "apt-get install postgresql (scripts/test installs it)",
    )?;
    Some(PgServer::start())
}

fn redis() -> Option<RedisServer> {
    shared::require(
        RedisServer::available(),
        "redis-server",
        "apt-get install redis-server (scripts/test installs it)",
    )?;
    Some(RedisServer::start())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_answers_503_forwards_nothing_and_recovers_without_a_restart() {
    let Some(mut server) = postgres() else { return };
    the_gateway_rides_out_an_outage(&mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_answers_503_forwards_nothing_and_recovers_without_a_restart() {
    let Some(mut server) = redis() else { return };
    the_gateway_rides_out_an_outage(&mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_claim_whose_answer_is_lost_is_read_back_and_executes_once() {
    let Some(server) = postgres() else { return };
    a_lost_claim_answer_is_read_back(&server, Wire::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_claim_whose_answer_is_lost_is_read_back_and_executes_once() {
    let Some(server) = redis() else { return };
    a_lost_claim_answer_is_read_back(&server, Wire::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lost_batch_releases_what_it_took() {
    let Some(server) = postgres() else { return };
    a_lost_batch_releases_what_it_took(&server, Wire::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lost_batch_releases_what_it_took() {
    let Some(server) = redis() else { return };
    a_lost_batch_releases_what_it_took(&server, Wire::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_abandoned_claim_is_released() {
    let Some(server) = postgres() else { return };
    an_abandoned_claim_is_released(&server, Wire::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_abandoned_claim_is_released() {
    let Some(server) = redis() else { return };
    an_abandoned_claim_is_released(&server, Wire::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lost_claim_releases_only_a_record_it_took_free() {
    let Some(server) = postgres() else { return };
    a_lost_claim_releases_only_a_record_it_took_free(&server, Wire::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lost_claim_releases_only_a_record_it_took_free() {
    let Some(server) = redis() else { return };
    a_lost_claim_releases_only_a_record_it_took_free(&server, Wire::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_claim_whose_answer_is_lost_while_the_server_is_away_is_never_assumed() {
    let Some(server) = postgres() else { return };
    a_lost_claim_answer_is_never_assumed(&server, Wire::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_claim_whose_answer_is_lost_while_the_server_is_away_is_never_assumed() {
    let Some(server) = redis() else { return };
    a_lost_claim_answer_is_never_assumed(&server, Wire::Redis).await;
}
