//! End to end through the gateway: one test per configuration switch, plus the admin API
//! and the metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Gateway, Upstream, config_for, post, req};
use idem_core::{MemoryStore, Store};

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

const BODY: &str = r#"{"amount": 100}"#;

#[tokio::test]
async fn key_optional_passes_unkeyed_requests_through_and_dedups_keyed_ones() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(&up, "[defaults]\nkey = \"optional\"\n"),
        memory(),
    )
    .await;
    for _ in 0..2 {
        let answer = post(gw.url("/a")).json(BODY).send().await;
        assert_eq!(answer.status, 201);
        assert_eq!(answer.replayed(), None);
    }
    assert_eq!(up.calls(), 2);
    for _ in 0..2 {
        post(gw.url("/a")).key("k").json(BODY).send().await;
    }
    assert_eq!(up.calls(), 3);
}

#[tokio::test]
async fn key_ignored_executes_every_request() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, "[defaults]\nkey = \"ignored\"\n"), memory()).await;
    for _ in 0..2 {
        let answer = post(gw.url("/a")).key("k").json(BODY).send().await;
        assert_eq!(answer.replayed(), None);
    }
    assert_eq!(up.calls(), 2);
}

#[tokio::test]
async fn key_required_rejects_unkeyed_requests() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(
            &up,
            "[[routes]]\npath = \"/v1/charges/{id}\"\nkey = \"required\"\n",
        ),
        memory(),
    )
    .await;
    let answer = post(gw.url("/v1/charges/ch_1")).json(BODY).send().await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.problem(), "key-missing");
    let keyed = post(gw.url("/v1/charges/ch_1"))
        .key("k")
        .json(BODY)
        .send()
        .await;
    assert_eq!(keyed.status, 201);
    // Records are scoped by the pattern; the path is in the fingerprint.
    let other_id = post(gw.url("/v1/charges/ch_2"))
        .key("k")
        .json(BODY)
        .send()
        .await;
    assert_eq!(other_id.status, 422);
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn methods_choose_which_requests_are_deduplicated() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(
            &up,
            "[[routes]]\npath = \"/v1/orders/{id}\"\nmethods = [\"put\"]\nkey = \"required\"\n",
        ),
        memory(),
    )
    .await;
    // PUT is deduplicated (and needs a key) ...
    assert_eq!(
        req("PUT", gw.url("/v1/orders/1"))
            .json(BODY)
            .send()
            .await
            .status,
        400
    );
    for _ in 0..2 {
        req("PUT", gw.url("/v1/orders/1"))
            .key("k")
            .json(BODY)
            .send()
            .await;
    }
    assert_eq!(up.calls(), 1);
    // ... POST and PATCH are not, on this route.
    for method in ["POST", "PATCH", "POST"] {
        let answer = req(method, gw.url("/v1/orders/1"))
            .key("k")
            .json(BODY)
            .send()
            .await;
        assert_eq!(answer.replayed(), None);
    }
    assert_eq!(up.calls(), 4);
}

#[tokio::test]
async fn the_default_methods_are_post_and_patch() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, ""), memory()).await;
    for _ in 0..2 {
        req("PATCH", gw.url("/x")).key("k").json(BODY).send().await;
    }
    assert_eq!(up.calls(), 1);
    for _ in 0..2 {
        req("PUT", gw.url("/x")).key("k").json(BODY).send().await;
    }
    assert_eq!(up.calls(), 3);
}

#[tokio::test]
async fn retention_expiry_lets_a_late_retry_execute_again() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(&up, "[defaults]\nretention = \"2s\"\nlease = \"1s\"\n"),
        memory(),
    )
    .await;
    let send = || post(gw.url("/a")).key("k").json(BODY).send();
    send().await;
    assert_eq!(send().await.replayed(), Some("true"));
    assert_eq!(up.calls(), 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let late = send().await;
    assert_eq!(late.replayed(), Some("false"));
    assert_eq!(late.execution(), 2);
    // The window is published per route.
    let metrics = req("GET", gw.admin_url("/metrics")).send().await;
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(
        text.contains(r#"idem_route_retention_seconds{route="/*",methods="POST,PATCH"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn the_lease_is_renewed_while_the_upstream_works() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, "[defaults]\nlease = \"1s\"\n"), memory()).await;
    let url = gw.url("/a?ms=3000");
    let first = tokio::spawn(post(url.clone()).key("k").json(BODY).send());
    up.wait_for_calls(1).await;
    // Well past the first lease: still held (renewed), so still a conflict.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let retry = post(url.clone()).key("k").json(BODY).send().await;
    assert_eq!(retry.status, 409);
    assert_eq!(first.await.unwrap().replayed(), Some("false"));
    assert_eq!(
        post(url).key("k").json(BODY).send().await.replayed(),
        Some("true")
    );
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn in_flight_wait_makes_a_retry_wait_and_replay() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(&up, "[defaults]\nin_flight = \"wait\"\n"),
        memory(),
    )
    .await;
    let url = gw.url("/a?ms=500");
    let first = tokio::spawn(post(url.clone()).key("k").json(BODY).send());
    up.wait_for_calls(1).await;
    let retry = post(url).key("k").json(BODY).send().await;
    let first = first.await.unwrap();
    assert_eq!(retry.status, 201);
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn prefer_wait_makes_a_conflict_route_wait() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, ""), memory()).await;
    let url = gw.url("/a?ms=500");
    let first = tokio::spawn(post(url.clone()).key("k").json(BODY).send());
    up.wait_for_calls(1).await;
    let retry = post(url)
        .key("k")
        .header("prefer", "wait=10")
        .json(BODY)
        .send()
        .await;
    assert_eq!(retry.status, 201);
    assert_eq!(retry.replayed(), Some("true"));
    first.await.unwrap();
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn max_wait_bounds_the_wait_then_409() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(
            &up,
            "[defaults]\nin_flight = \"wait\"\nmax_wait = \"300ms\"\n",
        ),
        memory(),
    )
    .await;
    let url = gw.url("/a?ms=3000");
    let first = tokio::spawn(post(url.clone()).key("k").json(BODY).send());
    up.wait_for_calls(1).await;
    // The client asks for more than max_wait: it is capped.
    let retry = post(url)
        .key("k")
        .header("prefer", "wait=60")
        .json(BODY)
        .send()
        .await;
    assert_eq!(retry.status, 409);
    assert_eq!(retry.problem(), "in-flight");
    assert_eq!(first.await.unwrap().status, 201);
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn server_errors_store_replays_the_5xx() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, ""), memory()).await;
    let send = || post(gw.url("/status/500")).key("k").json(BODY).send();
    assert_eq!(send().await.status, 500);
    let retry = send().await;
    assert_eq!(retry.status, 500);
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn server_errors_release_executes_a_retry_again() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(&up, "[defaults]\nserver_errors = \"release\"\n"),
        memory(),
    )
    .await;
    let send = || post(gw.url("/status/500")).key("k").json(BODY).send();
    assert_eq!(send().await.replayed(), Some("false"));
    assert_eq!(send().await.replayed(), Some("false"));
    assert_eq!(up.calls(), 2);
}

#[tokio::test]
async fn retryable_statuses_are_released_and_4xx_are_stored() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, ""), memory()).await;
    for code in [408, 425, 429, 503] {
        let url = gw.url(&format!("/status/{code}"));
        for _ in 0..2 {
            let answer = post(url.clone()).key("k").json(BODY).send().await;
            assert_eq!(answer.status, code);
            assert_eq!(answer.replayed(), Some("false"));
        }
        assert_eq!(up.calls_to(&format!("/status/{code}")), 2, "{code}");
    }
    let url = gw.url("/status/404");
    post(url.clone()).key("k").json(BODY).send().await;
    assert_eq!(
        post(url).key("k").json(BODY).send().await.replayed(),
        Some("true")
    );
    assert_eq!(up.calls_to("/status/404"), 1);
}

#[tokio::test]
async fn ambiguous_store_answers_outcome_unknown_and_never_executes_again() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, "upstream_timeout = \"300ms\"\n"), memory()).await;
    let send = || post(gw.url("/hang")).key("k").json(BODY).send();
    let first = send().await;
    assert_eq!(first.status, 504);
    assert_eq!(first.problem(), "outcome-unknown");
    assert_eq!(first.json()["reason"], "timeout");
    let retry = send().await;
    assert_eq!(retry.status, 504);
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn ambiguous_release_lets_a_retry_execute_again() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(
            &up,
            "upstream_timeout = \"300ms\"\n[defaults]\nambiguous = \"release\"\n",
        ),
        memory(),
    )
    .await;
    let send = || post(gw.url("/hang")).key("k").json(BODY).send();
    let first = send().await;
    assert_eq!(first.status, 504);
    assert_eq!(first.problem(), "upstream-timeout");
    let retry = send().await;
    assert_eq!(retry.status, 504);
    assert_eq!(up.calls(), 2);
}

#[tokio::test]
async fn a_response_over_max_stored_response_reaches_the_first_caller_and_is_not_run_twice() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(&up, "[defaults]\nmax_stored_response = \"64KiB\"\n"),
        memory(),
    )
    .await;
    let url = gw.url("/big?bytes=200000");
    let first = post(url.clone()).key("k").json(BODY).send().await;
    assert_eq!(first.status, 200);
    assert_eq!(first.replayed(), Some("false"));
    let expected: Vec<u8> = (0..200_000usize).map(|i| (i % 251) as u8).collect();
    assert_eq!(first.body.as_ref(), expected.as_slice());
    let retry = post(url).key("k").json(BODY).send().await;
    assert_eq!(retry.status, 500);
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.problem(), "response-too-large-to-replay");
    assert_eq!(retry.json()["original_status"], 200);
    assert_eq!(retry.json()["max_stored_bytes"], 65536);
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn principal_header_chooses_who_a_key_belongs_to() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(&up, "[defaults]\nprincipal_header = \"x-tenant\"\n"),
        memory(),
    )
    .await;
    let send = |tenant: &'static str, auth: &'static str| {
        post(gw.url("/a"))
            .key("k")
            .header("x-tenant", tenant)
            .header("authorization", auth)
            .json(BODY)
            .send()
    };
    assert_eq!(send("t1", "Bearer one").await.replayed(), Some("false"));
    // Another credential of the same tenant: the same record.
    assert_eq!(send("t1", "Bearer two").await.replayed(), Some("true"));
    // Another tenant: another record.
    assert_eq!(send("t2", "Bearer one").await.replayed(), Some("false"));
    assert_eq!(up.calls(), 2);
}

#[tokio::test]
async fn a_config_without_routes_protects_every_post_with_a_key() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, ""), memory()).await;
    for path in ["/", "/a", "/deep/ly/nested"] {
        for _ in 0..2 {
            post(gw.url(path))
                .key(&format!("k{path}"))
                .json(BODY)
                .send()
                .await;
        }
        assert_eq!(up.calls_to(path), 1, "{path}");
    }
}

#[tokio::test]
async fn the_principal_secret_file_keeps_records_across_restarts() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = idem_server::store::StoreUrl::Sqlite(dir.path().join("idem.db"));
    let config = config_for(&up, "");
    let send = |gw: &Gateway| {
        post(gw.url("/a"))
            .key("k")
            .header("authorization", "Bearer alice")
            .json(BODY)
            .send()
    };
    for expected in ["false", "true"] {
        let secret = idem_server::secret::resolve(None, &url.sharing()).unwrap();
        let store = url.open().await.unwrap();
        let gw = Gateway::start_with_secret(config.clone(), store.clone(), &secret).await;
        assert_eq!(send(&gw).await.replayed(), Some(expected));
        gw.stop().await;
        tokio::task::spawn_blocking(move || drop(store))
            .await
            .unwrap();
    }
    assert_eq!(up.calls(), 1);
    assert!(dir.path().join("idem.db.secret").exists());
    // Had the secret changed, the retry would have named another record and run again.
    let store = url.open().await.unwrap();
    let gw = Gateway::start_with_secret(config, store, b"another secret").await;
    assert_eq!(send(&gw).await.replayed(), Some("false"));
}

#[tokio::test]
async fn admin_api_shows_releases_and_purges_records() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        config_for(
            &up,
            "[[routes]]\npath = \"/v1/charges\"\n[[routes]]\npath = \"/hang\"\n",
        ),
        memory(),
    )
    .await;
    assert_eq!(
        req("GET", gw.admin_url("/healthz")).send().await.status,
        200
    );
    assert_eq!(req("GET", gw.admin_url("/readyz")).send().await.status, 200);

    // A completed record, found by its scope parts.
    post(gw.url("/v1/charges"))
        .key("k-admin")
        .header("authorization", "Bearer alice")
        .json(BODY)
        .send()
        .await;
    let lookup = req(
        "GET",
        gw.admin_url(
            "/admin/records?route=/v1/charges&method=POST&key=k-admin&principal=Bearer%20alice",
        ),
    )
    .send()
    .await;
    assert_eq!(lookup.status, 200);
    let found = lookup.json();
    let id = found["id"].as_str().unwrap().to_string();
    assert_eq!(found["record"]["state"], "completed");
    assert_eq!(found["record"]["response"]["status"], 201);
    assert!(found["record"]["response"].get("body").is_none());

    // Shown by id, without the body unless asked.
    let shown = req("GET", gw.admin_url(&format!("/admin/records/{id}")))
        .send()
        .await;
    assert_eq!(shown.json()["id"], id.as_str());
    assert!(!String::from_utf8_lossy(&shown.body).contains("execution"));
    let with_body = req(
        "GET",
        gw.admin_url(&format!("/admin/records/{id}?body=true")),
    )
    .send()
    .await;
    let body = with_body.json()["response"]["body"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(body.contains("\"execution\":1"), "{body}");

    // Releasing a completed record is refused; purging it lets the key execute again.
    let release = req(
        "POST",
        gw.admin_url(&format!("/admin/records/{id}/release")),
    )
    .send()
    .await;
    assert_eq!(release.status, 409);
    let purge = req("DELETE", gw.admin_url(&format!("/admin/records/{id}")))
        .send()
        .await;
    assert_eq!(purge.status, 200);
    assert_eq!(
        req("GET", gw.admin_url(&format!("/admin/records/{id}")))
            .send()
            .await
            .status,
        404
    );
    let again = post(gw.url("/v1/charges"))
        .key("k-admin")
        .header("authorization", "Bearer alice")
        .json(BODY)
        .send()
        .await;
    assert_eq!(again.replayed(), Some("false"));
    assert_eq!(up.calls(), 2);

    // An in-flight record is listed, and releasing it lets a retry execute.
    let url = gw.url("/hang");
    let running = tokio::spawn(post(url.clone()).key("k-slow").json(BODY).send());
    up.wait_for_calls(3).await;
    let listed = req("GET", gw.admin_url("/admin/in-flight"))
        .send()
        .await
        .json();
    let records = listed["records"].as_array().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["state"], "in_flight");
    let slow_id = records[0]["id"].as_str().unwrap().to_string();
    let release = req(
        "POST",
        gw.admin_url(&format!("/admin/records/{slow_id}/release")),
    )
    .send()
    .await;
    assert_eq!(release.status, 200);
    let retry = tokio::spawn(post(url).key("k-slow").json(BODY).send());
    up.wait_for_calls(4).await;
    up.state.unhang.notify_waiters();
    assert_eq!(retry.await.unwrap().replayed(), Some("false"));
    running.await.unwrap();
    assert_eq!(up.calls(), 4);

    // Errors are problem documents.
    let bad = req("GET", gw.admin_url("/admin/records/zz")).send().await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.problem(), "admin/invalid-id");
}

#[tokio::test]
async fn metrics_count_requests_by_outcome() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, ""), memory()).await;
    let send = |body: &'static str| post(gw.url("/m")).key("k").json(body).send();
    send(BODY).await;
    send(BODY).await;
    send(r#"{"amount": 1}"#).await;
    post(gw.url("/m")).key("bad key").json(BODY).send().await;
    let metrics = req("GET", gw.admin_url("/metrics")).send().await;
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    for line in [
        r#"idem_requests_total{route="/*",outcome="executed"} 1"#,
        r#"idem_requests_total{route="/*",outcome="replayed"} 1"#,
        r#"idem_requests_total{route="/*",outcome="mismatch"} 1"#,
        r#"idem_requests_total{route="/*",outcome="key_rejected"} 1"#,
        r#"idem_upstream_requests_total{result="ok"} 1"#,
        "idem_in_flight_requests 0",
        r#"idem_store_latency_seconds_bucket{op="claim",result="ok""#,
        r#"idem_route_lease_seconds{route="/*",methods="POST,PATCH"} 60"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}
