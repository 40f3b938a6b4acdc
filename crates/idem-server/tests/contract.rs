//! End to end through the gateway (`server::run` on port 0) in front of a real upstream
//! that counts its executions: one test per row of the HTTP contract (DESIGN §2).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Gateway, Upstream, config_for, post, req};
use idem_core::{MemoryStore, Store};

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

const CHARGE: &str = r#"{"amount": 100, "currency": "eur"}"#;

#[tokio::test]
async fn first_request_is_forwarded_once_with_replayed_false() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, ""), memory()).await;
    let first = post(gw.url("/v1/charges"))
        .key("k-1")
        .header("authorization", "Bearer alice")
        .json(CHARGE)
        .send()
        .await;
    assert_eq!(first.status, 201);
    assert_eq!(first.replayed(), Some("false"));
    assert_eq!(first.execution(), 1);
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn retry_after_completion_replays_status_body_and_headers_without_the_upstream() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, ""), memory()).await;
    let send = || post(gw.url("/v1/charges")).key("k-2").json(CHARGE).send();
    let first = send().await;
    let retry = send().await;
    assert_eq!(retry.status, 201);
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.header("x-execution"), Some("1"));
    assert_eq!(retry.header("content-type"), Some("application/json"));
    assert_eq!(up.calls(), 1);
    // JSON key order and whitespace do not change the fingerprint.
    let reordered = post(gw.url("/v1/charges"))
        .key("k-2")
        .json(r#"{"currency":"eur","amount":100}"#)
        .send()
        .await;
    assert_eq!(reordered.replayed(), Some("true"));
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn retry_while_the_first_runs_gets_409_with_retry_after() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, ""), memory()).await;
    let url = gw.url("/v1/slow?ms=3000");
    let first = tokio::spawn(post(url.clone()).key("k-3").json(CHARGE).send());
    up.wait_for_calls(1).await;
    let retry = post(url.clone()).key("k-3").json(CHARGE).send().await;
    assert_eq!(retry.status, 409);
    assert_eq!(retry.problem(), "in-flight");
    let retry_after: u64 = retry.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let first = first.await.unwrap();
    assert_eq!(first.status, 201);
    let after = post(url).key("k-3").json(CHARGE).send().await;
    assert_eq!(after.replayed(), Some("true"));
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn same_key_with_a_different_request_gets_422_and_nothing_runs() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, ""), memory()).await;
    post(gw.url("/v1/charges"))
        .key("k-4")
        .json(CHARGE)
        .send()
        .await;
    let other = post(gw.url("/v1/charges"))
        .key("k-4")
        .json(r#"{"amount": 999}"#)
        .send()
        .await;
    assert_eq!(other.status, 422);
    assert_eq!(other.problem(), "fingerprint-mismatch");
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn missing_or_malformed_keys_get_400_and_nothing_runs() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(&up, "[defaults]\nkey = \"required\"\n"),
        memory(),
    )
    .await;
    let url = gw.url("/v1/charges");
    let missing = post(url.clone()).json(CHARGE).send().await;
    assert_eq!(missing.status, 400);
    assert_eq!(missing.problem(), "key-missing");
    let too_long = "k".repeat(256);
    for bad in [
        post(url.clone()).key("").json(CHARGE),
        post(url.clone()).key(&too_long).json(CHARGE),
        post(url.clone()).key("a b").json(CHARGE),
        post(url.clone()).key("one").key("two").json(CHARGE),
    ] {
        let answer = bad.send().await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.problem(), "key-invalid");
    }
    // A quoted sf-string and the bare token name the same key.
    let quoted = post(url.clone()).key("\"k-5\"").json(CHARGE).send().await;
    let bare = post(url).key("k-5").json(CHARGE).send().await;
    assert_eq!(quoted.replayed(), Some("false"));
    assert_eq!(bare.replayed(), Some("true"));
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn request_body_over_the_limit_gets_413_and_nothing_runs() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(&up, "[defaults]\nmax_request_body = \"1KiB\"\n"),
        memory(),
    )
    .await;
    let big = vec![b'x'; 2048];
    let answer = post(gw.url("/v1/upload")).key("k-6").body(big).send().await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.problem(), "body-too-large");
    assert_eq!(answer.json()["max_body_bytes"], 1024);
    let small = post(gw.url("/v1/upload"))
        .key("k-6b")
        .body(vec![b'x'; 1024])
        .send()
        .await;
    assert_eq!(small.status, 201);
    assert_eq!(up.calls(), 1);
}

/// A store that fails every operation while `down` is set.
#[derive(Debug)]
struct FlakyStore {
    inner: MemoryStore,
    down: std::sync::atomic::AtomicBool,
}

impl FlakyStore {
    fn check(&self) -> Result<(), idem_core::Error> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(idem_core::Error::Unavailable {
                message: "injected outage".into(),
                source: None,
            })
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl Store for FlakyStore {
    async fn claim(
        &self,
        request: &idem_core::ClaimRequest,
    ) -> Result<idem_core::ClaimOutcome, idem_core::Error> {
        self.check()?;
        self.inner.claim(request).await
    }
    async fn complete(
        &self,
        id: &idem_core::RecordId,
        token: idem_core::FencingToken,
        response: bytes::Bytes,
    ) -> Result<(), idem_core::Error> {
        self.check()?;
        self.inner.complete(id, token, response).await
    }
    async fn release(
        &self,
        id: &idem_core::RecordId,
        token: idem_core::FencingToken,
    ) -> Result<(), idem_core::Error> {
        self.check()?;
        self.inner.release(id, token).await
    }
    async fn renew(
        &self,
        id: &idem_core::RecordId,
        token: idem_core::FencingToken,
        lease: Duration,
    ) -> Result<idem_core::Timestamp, idem_core::Error> {
        self.check()?;
        self.inner.renew(id, token, lease).await
    }
    async fn get(
        &self,
        id: &idem_core::RecordId,
    ) -> Result<Option<idem_core::Record>, idem_core::Error> {
        self.check()?;
        self.inner.get(id).await
    }
    async fn claim_batch(
        &self,
        requests: &[idem_core::ClaimRequest],
    ) -> Result<Vec<idem_core::ClaimOutcome>, idem_core::Error> {
        self.check()?;
        self.inner.claim_batch(requests).await
    }
    async fn purge_expired(&self, limit: usize) -> Result<usize, idem_core::Error> {
        self.check()?;
        self.inner.purge_expired(limit).await
    }
    async fn now(&self) -> Result<idem_core::Timestamp, idem_core::Error> {
        self.check()?;
        self.inner.now().await
    }
}

fn flaky() -> Arc<FlakyStore> {
    Arc::new(FlakyStore {
        inner: MemoryStore::new(),
        down: std::sync::atomic::AtomicBool::new(true),
    })
}

#[tokio::test]
async fn store_unreachable_fails_closed_with_503_and_retry_after() {
    let up = Upstream::start().await;
    let store = flaky();
    let gw = Gateway::start(config_for(&up, ""), store.clone()).await;
    let answer = post(gw.url("/v1/charges"))
        .key("k-7")
        .json(CHARGE)
        .send()
        .await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.problem(), "store-unavailable");
    assert!(answer.header("retry-after").is_some());
    assert_eq!(up.calls(), 0);
    // Readiness reports the outage too.
    let ready = req("GET", gw.admin_url("/readyz")).send().await;
    assert_eq!(ready.status, 503);
    // Back up: the retry executes once.
    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let answer = post(gw.url("/v1/charges"))
        .key("k-7")
        .json(CHARGE)
        .send()
        .await;
    assert_eq!(answer.status, 201);
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn fail_open_forwards_without_deduplication_when_the_store_is_down() {
    let up = Upstream::start().await;
    let store = flaky();
    let gw = Gateway::start(
        config_for(
            &up,
            "[[routes]]\npath = \"/v1/open\"\nfail = \"open\"\n\
             [[routes]]\npath = \"/v1/closed\"\n",
        ),
        store,
    )
    .await;
    for _ in 0..2 {
        let answer = post(gw.url("/v1/open"))
            .key("k-8")
            .json(CHARGE)
            .send()
            .await;
        assert_eq!(answer.status, 201);
    }
    assert_eq!(up.calls_to("/v1/open"), 2);
    let closed = post(gw.url("/v1/closed"))
        .key("k-8")
        .json(CHARGE)
        .send()
        .await;
    assert_eq!(closed.status, 503);
    assert_eq!(up.calls_to("/v1/closed"), 0);
}

#[tokio::test]
async fn set_cookie_is_not_replayed() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, ""), memory()).await;
    let send = || post(gw.url("/v1/login")).key("k-9").json("{}").send();
    let first = send().await;
    assert_eq!(first.header("set-cookie"), Some("session=s1; HttpOnly"));
    let retry = send().await;
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.header("set-cookie"), None);
    assert_eq!(retry.header("x-execution"), Some("1"));
}

#[tokio::test]
async fn a_300_kb_binary_body_is_replayed_byte_for_byte() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, ""), memory()).await;
    // Every byte value, in a pattern that is not valid UTF-8.
    let body: Vec<u8> = (0..300 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let send = || {
        post(gw.url("/echo"))
            .key("k-10")
            .header("content-type", "application/octet-stream")
            .body(body.clone())
            .send()
    };
    let first = send().await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body.as_ref(), body.as_slice());
    let retry = send().await;
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.body.as_ref(), body.as_slice());
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn tenants_never_see_each_others_records() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(
            &up,
            "[[routes]]\npath = \"/v1/charges\"\n[[routes]]\npath = \"/v1/refunds\"\n",
        ),
        memory(),
    )
    .await;
    let send = |who: &'static str| {
        post(gw.url("/v1/charges"))
            .key("shared-key")
            .header("authorization", who)
            .json(CHARGE)
            .send()
    };
    let alice = send("Bearer alice").await;
    let bob = send("Bearer bob").await;
    assert_eq!(alice.replayed(), Some("false"));
    assert_eq!(bob.replayed(), Some("false"));
    assert_eq!(up.calls(), 2);
    let alice_again = send("Bearer alice").await;
    let bob_again = send("Bearer bob").await;
    assert_eq!(alice_again.body, alice.body);
    assert_eq!(bob_again.body, bob.body);
    assert_ne!(alice_again.body, bob_again.body);
    assert_eq!(up.calls(), 2);
    // The same key on another route is another record too (routes are declared: under one
    // prefix route such as the implicit `/*`, records are scoped by the prefix pattern).
    let elsewhere = post(gw.url("/v1/refunds"))
        .key("shared-key")
        .header("authorization", "Bearer alice")
        .json(CHARGE)
        .send()
        .await;
    assert_eq!(elsewhere.replayed(), Some("false"));
}

#[tokio::test]
async fn two_hundred_concurrent_identical_requests_execute_once() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = idem_server::store::StoreUrl::Sqlite(dir.path().join("idem.db"))
        .open()
        .await
        .unwrap();
    let gw = Gateway::start(
        config_for(
            &up,
            "[defaults]\nin_flight = \"wait\"\nmax_wait = \"30s\"\n",
        ),
        store,
    )
    .await;
    let client = common::client();
    let url = gw.url("/v1/charges?ms=300");
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let request = post(url.clone())
            .key("the-one")
            .header("authorization", "Bearer alice")
            .json(CHARGE);
        let client = client.clone();
        tasks.push(tokio::spawn(
            async move { request.send_with(&client).await },
        ));
    }
    let mut originals = 0;
    for task in tasks {
        let answer = task.await.unwrap().unwrap();
        assert_eq!(
            answer.status,
            201,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.execution(), 1);
        if answer.replayed() == Some("false") {
            originals += 1;
        }
    }
    assert_eq!(originals, 1);
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn the_key_is_forwarded_upstream_with_forwarding_headers() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, ""), memory()).await;
    let answer = post(gw.url("/v1/charges"))
        .key("\"fwd-1\"")
        .header("x-request-id", "req-abc")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .json(CHARGE)
        .send()
        .await;
    assert_eq!(answer.json()["key"], "\"fwd-1\"");
    assert_eq!(answer.header("x-request-id"), Some("req-abc"));
    let seen = up.last_headers();
    assert_eq!(seen["idempotency-key"], "\"fwd-1\"");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-request-id"], "req-abc");
    assert!(seen.get("x-hop").is_none());
    // Without a request id, the gateway makes one and sends it both ways.
    let answer = post(gw.url("/v1/charges"))
        .key("fwd-2")
        .json(CHARGE)
        .send()
        .await;
    let id = answer.header("x-request-id").unwrap().to_string();
    assert_eq!(id.len(), 16);
    assert_eq!(up.last_headers()["x-request-id"], id.as_str());
}

#[tokio::test]
async fn forward_key_false_keeps_the_key_from_the_upstream() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, "forward_key = false\n"), memory()).await;
    let answer = post(gw.url("/v1/charges"))
        .key("hidden")
        .json(CHARGE)
        .send()
        .await;
    assert_eq!(answer.status, 201);
    assert!(up.last_headers().get("idempotency-key").is_none());
}

#[tokio::test]
async fn requests_no_route_matches_pass_through_untouched() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(
            &up,
            "[[routes]]\npath = \"/v1/charges\"\nkey = \"required\"\n",
        ),
        memory(),
    )
    .await;
    for _ in 0..2 {
        let answer = post(gw.url("/v2/other"))
            .key("k-11")
            .json(CHARGE)
            .send()
            .await;
        assert_eq!(answer.status, 201);
        assert_eq!(answer.replayed(), None);
        // Passed through: even Set-Cookie reaches the client.
        assert!(answer.header("set-cookie").is_some());
    }
    assert_eq!(up.calls_to("/v2/other"), 2);
    // The route itself is protected.
    let unkeyed = post(gw.url("/v1/charges")).json(CHARGE).send().await;
    assert_eq!(unkeyed.status, 400);
}

#[tokio::test]
async fn the_upstream_unreachable_gets_502_and_a_retry_executes_once_it_is_back() {
    // A free port, with nothing listening on it yet.
    let reserved = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = reserved.local_addr().unwrap();
    drop(reserved);
    let config = idem_server::config::Config::from_toml(&format!(
        "upstream = \"http://{addr}\"\nconnect_timeout = \"1s\"\n"
    ))
    .unwrap();
    let gw = Gateway::start(config, memory()).await;
    let down = post(gw.url("/v1/charges"))
        .key("k-12")
        .json(CHARGE)
        .send()
        .await;
    assert_eq!(down.status, 502);
    assert_eq!(down.problem(), "upstream-unreachable");
    assert!(down.header("retry-after").is_some());
    // The claim was released: the request was never sent.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let up = Upstream::start_on(listener).await;
    let retry = post(gw.url("/v1/charges"))
        .key("k-12")
        .json(CHARGE)
        .send()
        .await;
    assert_eq!(retry.status, 201);
    assert_eq!(retry.replayed(), Some("false"));
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn graceful_shutdown_finishes_requests_in_flight() {
    let up = Upstream::start().await;
    let mut gw = Gateway::start(config_for(&up, ""), memory()).await;
    let url = gw.url("/v1/charges?ms=800");
    let running = tokio::spawn(post(url.clone()).key("k-13").json(CHARGE).send());
    up.wait_for_calls(1).await;
    let drained = gw.begin_stop();
    let answer = running.await.unwrap();
    assert_eq!(answer.status, 201);
    drained.await.unwrap().unwrap();
    // No new connections once drained.
    assert!(post(url).key("k-14").json(CHARGE).try_send().await.is_err());
}
