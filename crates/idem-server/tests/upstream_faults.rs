//! Slow and dying upstreams, through the gateway: an upstream that never answers, resets or
//! closes the connection after reading the request, sends half a body, stalls mid-body,
//! answers after the lease passed, or refuses connections. For each: what the client gets
//! (status and problem type), how many times the upstream executed, and what a retry gets,
//! on routes with the default `ambiguous = "store"` and with `ambiguous = "release"`.
//!
//! The upstream is a raw TCP server, so that it can misbehave at the byte level. What it
//! does with each request is scripted per idempotency key (the gateway forwards the key):
//! the first request of a key gets the first act of its script, the next one the next act,
//! and the last act repeats.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::{Answer, Gateway, post};
use idem_core::{
    ClaimOutcome, ClaimRequest, Error, FencingToken, Inspect, MemoryStore, PrincipalHasher, Record,
    RecordId, RecordState, Store, Timestamp, WaitForCompletion,
};
use idem_server::config::Config;
use idem_server::records::ScopeParts;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// What the upstream does with one request, after reading it in full.
#[derive(Clone, Copy, Debug)]
enum Act {
    /// `201` with `{"key": ..., "execution": n}`.
    Answer,
    /// Nothing, until the gateway closes the connection.
    Hang,
    /// Resets the connection (RST).
    Reset,
    /// Closes the connection (FIN) without a byte of answer.
    Close,
    /// The head of a `201` announcing 100 bytes, 50 of them, then FIN.
    HalfBody,
    /// The head of a `201` announcing 100 bytes, 50 of them, then nothing until the gateway
    /// closes the connection.
    Stall,
    /// `201`, once the test opens the gate.
    Gated,
}

#[derive(Default)]
struct UpstreamState {
    scripts: Mutex<HashMap<String, Vec<Act>>>,
    /// Executions by key: requests read in full.
    executions: Mutex<HashMap<String, u64>>,
    gate: Notify,
    gate_open: AtomicBool,
}

struct FaultUpstream {
    addr: SocketAddr,
    state: Arc<UpstreamState>,
}

impl FaultUpstream {
    async fn start() -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    fn start_on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState::default());
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, shared.clone()));
            }
        });
        Self { addr, state }
    }

    fn script(&self, key: &str, acts: &[Act]) {
        self.state
            .scripts
            .lock()
            .unwrap()
            .insert(key.to_string(), acts.to_vec());
    }

    fn executions(&self, key: &str) -> u64 {
        self.state
            .executions
            .lock()
            .unwrap()
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    async fn wait_for_executions(&self, key: &str, n: u64) {
        for _ in 0..1000 {
            if self.executions(key) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{key} never reached {n} executions");
    }

    fn open_gate(&self) {
        self.state.gate_open.store(true, Ordering::SeqCst);
        self.state.gate.notify_waiters();
    }
}

/// Reads one request head and its `Content-Length` body; `None` at end of stream.
async fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = buffer[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, value) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Waits until the peer closes the connection (or 60 s).
async fn until_closed(stream: &mut TcpStream) {
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

async fn serve(mut stream: TcpStream, state: Arc<UpstreamState>) {
    let Some((head, _body)) = read_request(&mut stream).await else {
        return;
    };
    let key = header(&head, "idempotency-key")
        .unwrap_or_default()
        .to_string();
    let (act, execution) = {
        let mut executions = state.executions.lock().unwrap();
        let n = executions.entry(key.clone()).or_default();
        *n += 1;
        let scripts = state.scripts.lock().unwrap();
        let script = scripts.get(&key).map_or(&[Act::Answer][..], Vec::as_slice);
        let index = usize::try_from(*n - 1).unwrap().min(script.len() - 1);
        (script[index], *n)
    };
    let half_head = "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\
                     content-length: 100\r\nconnection: close\r\n\r\n";
    let half_body = [b'x'; 50];
    match act {
        Act::Answer | Act::Gated => {
            if matches!(act, Act::Gated) {
                let opened = state.gate.notified();
                if !state.gate_open.load(Ordering::SeqCst) {
                    opened.await;
                }
            }
            let body = format!(r#"{{"key":"{key}","execution":{execution}}}"#);
            let answer = format!(
                "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
        Act::Hang => until_closed(&mut stream).await,
        Act::Reset => {
            // SO_LINGER 0: closing sends RST, and does not block.
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
            drop(stream);
        }
        Act::Close => {
            let _ = stream.shutdown().await;
        }
        Act::HalfBody => {
            let _ = stream.write_all(half_head.as_bytes()).await;
            let _ = stream.write_all(&half_body).await;
            let _ = stream.shutdown().await;
        }
        Act::Stall => {
            let _ = stream.write_all(half_head.as_bytes()).await;
            let _ = stream.write_all(&half_body).await;
            let _ = stream.flush().await;
            until_closed(&mut stream).await;
        }
    }
}

/// A store whose renewals can be made to fail, as when the gateway loses its store for a
/// while: the lease of a running request then really passes.
#[derive(Debug)]
struct RenewalSwitch {
    inner: Arc<dyn Store>,
    fail_renewals: AtomicBool,
}

#[async_trait]
impl Store for RenewalSwitch {
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Error> {
        self.inner.claim(request).await
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: FencingToken,
        response: Bytes,
    ) -> Result<(), Error> {
        self.inner.complete(id, token, response).await
    }

    async fn release(&self, id: &RecordId, token: FencingToken) -> Result<(), Error> {
        self.inner.release(id, token).await
    }

    async fn renew(
        &self,
        id: &RecordId,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Timestamp, Error> {
        if self.fail_renewals.load(Ordering::SeqCst) {
            return Err(Error::unavailable("renewals are switched off", "test"));
        }
        self.inner.renew(id, token, lease).await
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        self.inner.get(id).await
    }

    async fn claim_batch(&self, requests: &[ClaimRequest]) -> Result<Vec<ClaimOutcome>, Error> {
        self.inner.claim_batch(requests).await
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, Error> {
        self.inner.purge_expired(limit).await
    }

    async fn now(&self) -> Result<Timestamp, Error> {
        self.inner.now().await
    }

    fn completion_waiter(&self) -> Option<&dyn WaitForCompletion> {
        self.inner.completion_waiter()
    }

    fn inspector(&self) -> Option<&dyn Inspect> {
        self.inner.inspector()
    }
}

/// A gateway in front of the upstream at `upstream`: routes `/store` (the default,
/// `ambiguous = "store"`) and `/release` (`ambiguous = "release"`), the given upstream
/// timeout and lease.
async fn gateway(
    upstream: SocketAddr,
    timeout: &str,
    lease: &str,
    store: Arc<dyn Store>,
) -> Gateway {
    let config = Config::from_toml(&format!(
        "upstream = \"http://{upstream}\"\n\
         upstream_timeout = \"{timeout}\"\n\
         connect_timeout = \"1s\"\n\
         [defaults]\n\
         key = \"required\"\n\
         lease = \"{lease}\"\n\
         [[routes]]\n\
         path = \"/store\"\n\
         [[routes]]\n\
         path = \"/release\"\n\
         ambiguous = \"release\"\n"
    ))
    .unwrap();
    Gateway::start(config, store).await
}

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

const BODY: &str = r#"{"amount": 100}"#;

async fn send(gw: &Gateway, route: &str, key: &str) -> Answer {
    post(gw.url(route)).key(key).json(BODY).send().await
}

/// The record a request with `key` on `route` names (anonymous principal).
fn record_id(route: &str, key: &str) -> RecordId {
    ScopeParts {
        method: "POST".into(),
        route: route.into(),
        key: key.into(),
        ..ScopeParts::default()
    }
    .record_id(&PrincipalHasher::new(b"test secret"))
    .unwrap()
}

fn assert_problem(answer: &Answer, status: u16, kind: &str, replayed: Option<&str>) {
    assert_eq!(
        answer.status.as_u16(),
        status,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.problem(), kind);
    assert_eq!(answer.replayed(), replayed);
}

fn assert_created(answer: &Answer, execution: u64, replayed: &str) {
    assert_eq!(
        answer.status,
        201,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.execution(), execution);
    assert_eq!(answer.replayed(), Some(replayed));
}

// ---------------------------------------------------------------------------------------
// (a) No answer within upstream_timeout.

#[tokio::test]
async fn an_upstream_that_never_answers_is_a_stored_504_outcome_unknown_and_never_runs_again() {
    let up = FaultUpstream::start().await;
    let gw = gateway(up.addr, "1s", "60s", memory()).await;
    up.script("hang", &[Act::Hang, Act::Answer]);

    let first = send(&gw, "/store", "hang").await;
    assert_problem(&first, 504, "outcome-unknown", Some("false"));
    assert_eq!(first.json()["reason"], "timeout");
    assert_eq!(first.json()["outcome"], "unknown");

    let retry = send(&gw, "/store", "hang").await;
    assert_problem(&retry, 504, "outcome-unknown", Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(up.executions("hang"), 1);
}

#[tokio::test]
async fn an_upstream_that_never_answers_on_a_release_route_is_a_504_upstream_timeout_and_the_retry_runs()
 {
    let up = FaultUpstream::start().await;
    let gw = gateway(up.addr, "1s", "60s", memory()).await;
    up.script("hang", &[Act::Hang, Act::Answer]);

    let first = send(&gw, "/release", "hang").await;
    assert_problem(&first, 504, "upstream-timeout", None);

    // Released: the retry executes, with the same key forwarded so that the upstream
    // could deduplicate it itself.
    let retry = send(&gw, "/release", "hang").await;
    assert_created(&retry, 2, "false");
    let again = send(&gw, "/release", "hang").await;
    assert_created(&again, 2, "true");
    assert_eq!(up.executions("hang"), 2);
}

// ---------------------------------------------------------------------------------------
// (b) The connection dies after the request was read.

#[tokio::test]
async fn a_connection_reset_or_closed_after_the_request_is_a_stored_502_outcome_unknown() {
    let up = FaultUpstream::start().await;
    let gw = gateway(up.addr, "1s", "60s", memory()).await;
    for (key, act) in [("reset", Act::Reset), ("close", Act::Close)] {
        up.script(key, &[act, Act::Answer]);

        let first = send(&gw, "/store", key).await;
        assert_problem(&first, 502, "outcome-unknown", Some("false"));
        assert_eq!(first.json()["reason"], "connection-lost", "{key}");

        let retry = send(&gw, "/store", key).await;
        assert_problem(&retry, 502, "outcome-unknown", Some("true"));
        assert_eq!(retry.body, first.body);
        assert_eq!(up.executions(key), 1, "{key}");
    }
}

#[tokio::test]
async fn a_connection_reset_or_closed_on_a_release_route_is_a_502_connection_lost_and_the_retry_runs()
 {
    let up = FaultUpstream::start().await;
    let gw = gateway(up.addr, "1s", "60s", memory()).await;
    for (key, act) in [("reset", Act::Reset), ("close", Act::Close)] {
        up.script(key, &[act, Act::Answer]);

        let first = send(&gw, "/release", key).await;
        assert_problem(&first, 502, "upstream-connection-lost", None);

        let retry = send(&gw, "/release", key).await;
        assert_created(&retry, 2, "false");
        assert_eq!(send(&gw, "/release", key).await.replayed(), Some("true"));
        assert_eq!(up.executions(key), 2, "{key}");
    }
}

// ---------------------------------------------------------------------------------------
// (c) Half an answer.

#[tokio::test]
async fn half_a_body_or_a_body_that_stalls_is_a_stored_502_outcome_unknown() {
    let up = FaultUpstream::start().await;
    let gw = gateway(up.addr, "1s", "60s", memory()).await;
    for (key, act) in [("half", Act::HalfBody), ("stall", Act::Stall)] {
        up.script(key, &[act, Act::Answer]);

        let first = send(&gw, "/store", key).await;
        assert_problem(&first, 502, "outcome-unknown", Some("false"));
        assert_eq!(first.json()["reason"], "response-interrupted", "{key}");

        let retry = send(&gw, "/store", key).await;
        assert_problem(&retry, 502, "outcome-unknown", Some("true"));
        assert_eq!(retry.body, first.body);
        assert_eq!(up.executions(key), 1, "{key}");
    }
}

#[tokio::test]
async fn half_a_body_on_a_release_route_is_a_502_outcome_unknown_not_stored_and_the_retry_runs() {
    let up = FaultUpstream::start().await;
    let gw = gateway(up.addr, "1s", "60s", memory()).await;
    for (key, act) in [("half", Act::HalfBody), ("stall", Act::Stall)] {
        up.script(key, &[act, Act::Answer]);

        let first = send(&gw, "/release", key).await;
        assert_problem(&first, 502, "outcome-unknown", Some("false"));
        assert_eq!(first.json()["reason"], "response-interrupted", "{key}");

        let retry = send(&gw, "/release", key).await;
        assert_created(&retry, 2, "false");
        assert_eq!(send(&gw, "/release", key).await.replayed(), Some("true"));
        assert_eq!(up.executions(key), 2, "{key}");
    }
}

// ---------------------------------------------------------------------------------------
// (d) An answer after the lease passed.

/// Waits until the record is in flight and its *first* lease (`first_until`) has passed by
/// the store's clock; returns the record's current lease end.
async fn wait_past_first_lease(store: &dyn Store, id: &RecordId) -> (Timestamp, Timestamp) {
    let mut first_until = None;
    for _ in 0..2000 {
        let record = store.get(id).await.unwrap();
        if let Some(Record {
            state: RecordState::InFlight { lease_until },
            ..
        }) = record
        {
            let first = *first_until.get_or_insert(lease_until);
            if store.now().await.unwrap() > first {
                return (first, lease_until);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the record never passed its first lease: {:?}",
        store.get(id).await
    );
}

#[tokio::test]
async fn an_answer_after_the_first_lease_is_stored_because_the_lease_was_renewed() {
    let up = FaultUpstream::start().await;
    let store = memory();
    let gw = gateway(up.addr, "60s", "2s", store.clone()).await;
    up.script("late", &[Act::Gated]);

    let url = gw.url("/store");
    let first = tokio::spawn(post(url).key("late").json(BODY).send());
    up.wait_for_executions("late", 1).await;

    // The first lease has passed, but the running request renewed it (every half lease):
    // a retry finds it in flight, not expired.
    let id = record_id("/store", "late");
    let (first_until, lease_until) = wait_past_first_lease(&*store, &id).await;
    assert!(lease_until > first_until, "the lease was renewed");
    let retry = send(&gw, "/store", "late").await;
    assert_problem(&retry, 409, "in-flight", None);
    assert!(retry.header("retry-after").is_some());

    up.open_gate();
    let first = first.await.unwrap();
    assert_created(&first, 1, "false");
    let retry = send(&gw, "/store", "late").await;
    assert_created(&retry, 1, "true");
    assert_eq!(retry.body, first.body);
    assert_eq!(up.executions("late"), 1);
}

#[tokio::test]
async fn an_answer_after_a_takeover_is_passed_on_but_not_stored_and_the_key_stays_outcome_unknown()
{
    let up = FaultUpstream::start().await;
    let store = Arc::new(RenewalSwitch {
        inner: memory(),
        fail_renewals: AtomicBool::new(true),
    });
    let gw = gateway(up.addr, "60s", "1s", store.clone()).await;
    up.script("late", &[Act::Gated]);

    let url = gw.url("/store");
    let first = tokio::spawn(post(url).key("late").json(BODY).send());
    up.wait_for_executions("late", 1).await;
    let id = record_id("/store", "late");
    let (first_until, lease_until) = wait_past_first_lease(&*store, &id).await;
    assert_eq!(lease_until, first_until, "renewals fail: the lease passes");

    // The lease passed while the request still runs: the next request takes the record
    // over and, since the first may have taken effect, stores an unknown outcome instead
    // of executing again.
    let second = send(&gw, "/store", "late").await;
    assert_problem(&second, 502, "outcome-unknown", Some("false"));
    assert_eq!(second.json()["reason"], "lease-expired");

    // The first request's answer reaches its client, but cannot be stored: its lease is
    // lost. Every retry gets the unknown outcome.
    up.open_gate();
    let first = first.await.unwrap();
    assert_created(&first, 1, "false");
    let third = send(&gw, "/store", "late").await;
    assert_problem(&third, 502, "outcome-unknown", Some("true"));
    assert_eq!(third.body, second.body);
    assert_eq!(up.executions("late"), 1);
}

#[tokio::test]
async fn on_a_release_route_a_takeover_executes_again_and_its_answer_is_the_one_stored() {
    let up = FaultUpstream::start().await;
    let store = Arc::new(RenewalSwitch {
        inner: memory(),
        fail_renewals: AtomicBool::new(true),
    });
    let gw = gateway(up.addr, "60s", "1s", store.clone()).await;
    up.script("late", &[Act::Gated, Act::Answer]);

    let url = gw.url("/release");
    let first = tokio::spawn(post(url).key("late").json(BODY).send());
    up.wait_for_executions("late", 1).await;
    let id = record_id("/release", "late");
    wait_past_first_lease(&*store, &id).await;

    // `ambiguous = "release"` is for upstreams that deduplicate on the forwarded key: the
    // takeover executes again (the upstream sees the same key twice).
    let second = send(&gw, "/release", "late").await;
    assert_created(&second, 2, "false");

    up.open_gate();
    let first = first.await.unwrap();
    assert_created(&first, 1, "false");
    let third = send(&gw, "/release", "late").await;
    assert_created(&third, 2, "true");
    assert_eq!(third.body, second.body);
    assert_eq!(up.executions("late"), 2);
}

// ---------------------------------------------------------------------------------------
// (e) Connection refused.

#[tokio::test]
async fn a_refused_connection_is_a_502_upstream_unreachable_the_claim_is_released_and_the_retry_runs()
 {
    // A port nothing listens on, until the upstream starts there.
    let reserved = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = reserved.local_addr().unwrap();
    drop(reserved);
    let store = memory();
    let gw = gateway(addr, "1s", "60s", store.clone()).await;
    for route in ["/store", "/release"] {
        let refused = send(&gw, route, "refused").await;
        assert_problem(&refused, 502, "upstream-unreachable", None);
        assert_eq!(refused.header("retry-after"), Some("1"));
        let record = store.get(&record_id(route, "refused")).await.unwrap();
        assert!(
            matches!(
                record,
                Some(Record {
                    state: RecordState::Released { .. },
                    ..
                })
            ),
            "{route}: {record:?}"
        );
    }

    let up = FaultUpstream::start_on(TcpListener::bind(addr).await.unwrap());
    for route in ["/store", "/release"] {
        let retry = send(&gw, route, "refused").await;
        assert_eq!(retry.status, 201, "{route}");
        assert_eq!(retry.replayed(), Some("false"));
        let again = send(&gw, route, "refused").await;
        assert_eq!(again.replayed(), Some("true"));
        assert_eq!(again.body, retry.body);
    }
    assert_eq!(up.executions("refused"), 2, "once per route");
}
