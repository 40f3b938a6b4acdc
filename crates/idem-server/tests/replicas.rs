//! Two gateway replicas over one shared store, end to end: two `idem serve` processes, each
//! with its own store connections and the same principal secret, in front of one upstream
//! that counts its executions. For PostgreSQL, Redis and Redis Cluster:
//!
//! - 200 concurrent identical requests spread over both replicas execute once, and every
//!   client gets the same answer;
//! - a retry on replica B while the first request still runs on replica A gets `409` with
//!   `Retry-After`;
//! - a retry on B that asks to wait (`Prefer: wait=N`) is woken by the store's notification
//!   (`LISTEN/NOTIFY`, pub/sub, sharded pub/sub) when A completes, and replays A's answer.
//!
//! The servers come from `IDEM_TEST_POSTGRES_URL`, `IDEM_TEST_REDIS_URL` and
//! `IDEM_TEST_REDIS_CLUSTER_URL` (`scripts/test` starts them). Without one, its tests print
//! why and return, except under `CI=true`, where a missing server fails the run. Every test
//! uses a namespace and keys of its own, so tests share the servers without seeing each
//! other's records.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::shared::{self, POSTGRES, REDIS, REDIS_CLUSTER};
use common::{Answer, Binary, Upstream, client, post};
use tempfile::TempDir;

/// Two replicas over the store at `url`, configured with `defaults` in `[defaults]`.
struct Replicas {
    a: Binary,
    b: Binary,
    up: Upstream,
    _dir: TempDir,
}

async fn replicas(url: &str, defaults: &str) -> Replicas {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let namespace = shared::unique("replicas");
    shared::write_config(
        dir.path(),
        &up,
        url,
        &format!("namespace = \"{namespace}\"\n{defaults}"),
    );
    let a = shared::replica(dir.path());
    let b = shared::replica(dir.path());
    assert_ne!(a.child.id(), b.child.id());
    Replicas {
        a,
        b,
        up,
        _dir: dir,
    }
}

const BODY: &str = r#"{"amount": 100, "currency": "eur"}"#;

/// What must be equal in two answers to one request: status, body and the upstream's
/// execution number.
fn same_answer(a: &Answer, b: &Answer) -> bool {
    a.status == b.status && a.body == b.body && a.header("x-execution") == b.header("x-execution")
}

/// 200 concurrent identical requests, alternating between the replicas: one execution, and
/// every client gets the answer of that execution (the others wait for it and replay it).
async fn concurrent_duplicates_execute_once(url: &str) {
    let r = replicas(url, "in_flight = \"wait\"\nmax_wait = \"120s\"").await;
    let key = shared::unique("burst");
    let client = client();
    // The upstream works for a while, so that most duplicates arrive while it runs.
    let urls = [r.a.url("/v1/charges?ms=300"), r.b.url("/v1/charges?ms=300")];
    let requests: Vec<_> = (0..200)
        .map(|i| {
            let request = post(urls[i % 2].clone())
                .key(&key)
                .header("authorization", "Bearer tenant-1")
                .json(BODY);
            let client = client.clone();
            tokio::spawn(async move { request.send_with(&client).await })
        })
        .collect();
    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.unwrap().unwrap());
    }
    assert_eq!(r.up.calls(), 1, "exactly one upstream execution");
    let first = &answers[0];
    assert_eq!(
        first.status,
        201,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    for (i, answer) in answers.iter().enumerate() {
        assert!(
            same_answer(answer, first),
            "answer {i} differs: {:?} {} vs {:?} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body),
            first.status,
            String::from_utf8_lossy(&first.body)
        );
    }
    let executed = answers
        .iter()
        .filter(|a| a.replayed() == Some("false"))
        .count();
    let replayed = answers
        .iter()
        .filter(|a| a.replayed() == Some("true"))
        .count();
    assert_eq!((executed, replayed), (1, 199));
    // How many duplicates waited on each replica (the rest arrived after the completion).
    let waited_a = shared::metric(&r.a, "idem_requests_total", &["outcome=\"waited\""]).await;
    let waited_b = shared::metric(&r.b, "idem_requests_total", &["outcome=\"waited\""]).await;
    eprintln!("waited: replica A {waited_a}, replica B {waited_b}");
}

/// A request held in flight at the upstream through A; its retry through B gets `409` with
/// `Retry-After`; once A finishes, a retry through B replays A's answer.
async fn a_retry_on_the_other_replica_gets_409(url: &str) {
    let r = replicas(url, "").await;
    let key = shared::unique("held");
    let first = {
        let request = post(r.a.url("/hang")).key(&key).json(BODY);
        tokio::spawn(request.send())
    };
    r.up.wait_for_calls(1).await;

    let retry = post(r.b.url("/hang")).key(&key).json(BODY).send().await;
    assert_eq!(
        retry.status,
        409,
        "{}",
        String::from_utf8_lossy(&retry.body)
    );
    assert_eq!(retry.problem(), "in-flight");
    let retry_after: u64 = retry
        .header("retry-after")
        .expect("a 409 carries Retry-After")
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert_eq!(r.up.calls(), 1);

    r.up.state.unhang.notify_waiters();
    let first = first.await.unwrap();
    assert_eq!(first.status, 201);
    assert_eq!(first.replayed(), Some("false"));
    let again = post(r.b.url("/hang")).key(&key).json(BODY).send().await;
    assert_eq!(again.replayed(), Some("true"));
    assert!(same_answer(&again, &first));
    assert_eq!(r.up.calls(), 1);
}

/// A request held in flight through A; its retry through B asks to wait (`Prefer: wait`),
/// and B's waiter is woken by the store's notification when A completes: it replays A's
/// answer, with one execution in all.
async fn a_waiting_retry_on_the_other_replica_is_woken_and_replays(url: &str) {
    // The wait budget is far longer than the test's own deadline below: B answering in time
    // means a notification woke it, not the end of its budget.
    let r = replicas(url, "max_wait = \"600s\"").await;
    let key = shared::unique("woken");
    let first = {
        let request = post(r.a.url("/hang")).key(&key).json(BODY);
        tokio::spawn(request.send())
    };
    r.up.wait_for_calls(1).await;

    let waiting = {
        let request = post(r.b.url("/hang"))
            .key(&key)
            .header("prefer", "wait=600")
            .json(BODY);
        tokio::spawn(request.send())
    };
    // B counts a request as waiting when its wait begins.
    let mut waited = 0;
    for _ in 0..600 {
        waited = shared::metric(&r.b, "idem_requests_total", &["outcome=\"waited\""]).await;
        if waited >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(waited, 1, "replica B never started waiting");
    assert!(!waiting.is_finished(), "B is waiting while A still runs");

    r.up.state.unhang.notify_waiters();
    let first = first.await.unwrap();
    assert_eq!(first.status, 201);
    assert_eq!(first.replayed(), Some("false"));
    let woken = tokio::time::timeout(Duration::from_secs(120), waiting)
        .await
        .expect("replica B's waiter was not woken by the store's notification")
        .unwrap();
    assert_eq!(woken.replayed(), Some("true"));
    assert!(
        same_answer(&woken, &first),
        "{:?} {}",
        woken.status,
        String::from_utf8_lossy(&woken.body)
    );
    assert_eq!(r.up.calls(), 1, "exactly one upstream execution");
    assert_eq!(
        shared::metric(&r.b, "idem_requests_total", &["outcome=\"replayed\""]).await,
        1
    );
}

macro_rules! per_store {
    ($($store:ident: $var:expr;)*) => {
        $(
            mod $store {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn two_hundred_concurrent_duplicates_over_two_replicas_execute_once() {
                    let Some(url) = shared::server_url($var) else { return };
                    concurrent_duplicates_execute_once(&url).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn a_retry_on_the_other_replica_while_the_first_runs_gets_409() {
                    let Some(url) = shared::server_url($var) else { return };
                    a_retry_on_the_other_replica_gets_409(&url).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn a_waiting_retry_on_the_other_replica_is_woken_by_the_store_and_replays() {
                    let Some(url) = shared::server_url($var) else { return };
                    a_waiting_retry_on_the_other_replica_is_woken_and_replays(&url).await;
                }
            }
        )*
    };
}

per_store! {
    postgres: POSTGRES;
    redis: REDIS;
    redis_cluster: REDIS_CLUSTER;
}
