//! The rows of the HTTP contract: keys, fingerprints, bodies, replays, scopes, retention,
//! store failures.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use idem_core::{
    ClaimOutcome, ClaimRequest, Fingerprinter, IdempotencyKey, KeyError, PrincipalHasher, Scope,
    Store,
};
use idem_tower::{
    Event, FailMode, IdempotencyLayer, KeyRequirement, Policy, RequestBody, Routes, StoreOp,
};

use common::*;

fn required() -> Policy {
    Policy::new().with_key(KeyRequirement::Required)
}

fn layer_with(store: Arc<dyn Store>, routes: Routes) -> IdempotencyLayer {
    IdempotencyLayer::new(store, SECRET).with_routes(routes)
}

fn charges_layer(policy: Policy) -> (IdempotencyLayer, Arc<idem_core::MemoryStore>) {
    let (store, _clock) = memory_store();
    let routes = Routes::new().route("/v1/charges", policy).unwrap();
    (layer_with(store.clone(), routes), store)
}

// --- first request and replay ---------------------------------------------------------

#[tokio::test]
async fn first_request_executes_and_the_retry_replays_status_headers_and_body() {
    let (layer, _) = charges_layer(required());
    let counter = Counter::default();
    let svc = {
        let counter = counter.clone();
        service(&layer, move |_req: InnerRequest| {
            let n = counter.bump();
            async move {
                let mut res = response(201, format!("{{\"charge\":{n}}}"));
                res.headers_mut()
                    .insert("x-charge-id", HeaderValue::from(n as u64));
                res.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/json"));
                Ok(res)
            }
        })
    };

    let first = call(&svc, post("/v1/charges", Some("k1"), "{}")).await;
    assert_eq!(first.status(), 201);
    assert_eq!(replayed(&first), Some("false"));
    assert_eq!(first.headers()["x-charge-id"], "1");
    assert_eq!(bytes_of(first).await, "{\"charge\":1}");

    let retry = call(&svc, post("/v1/charges", Some("k1"), "{}")).await;
    assert_eq!(retry.status(), 201);
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.headers()["x-charge-id"], "1");
    assert_eq!(retry.headers()["content-type"], "application/json");
    assert_eq!(bytes_of(retry).await, "{\"charge\":1}");
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn quoted_and_bare_keys_name_the_same_record() {
    let (layer, _) = charges_layer(required());
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    call(&svc, post("/v1/charges", Some("\"order-1\""), "{}")).await;
    let retry = call(&svc, post("/v1/charges", Some("order-1"), "{}")).await;
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn set_cookie_and_hop_by_hop_headers_are_not_replayed() {
    let (layer, _) = charges_layer(required());
    let svc = service(&layer, |_req: InnerRequest| async {
        let mut res = response(200, "ok");
        let headers = res.headers_mut();
        for (name, value) in [
            ("set-cookie", "session=secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic"),
            ("trailer", "x-checksum"),
            ("upgrade", "h2c"),
            ("connection", "x-per-hop"),
            ("x-per-hop", "1"),
            ("x-kept", "yes"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        Ok(res)
    });

    let first = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    // The first caller gets the upstream's headers untouched.
    assert_eq!(first.headers()["set-cookie"], "session=secret");
    let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(replayed(&retry), Some("true"));
    for name in [
        "set-cookie",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "upgrade",
        "connection",
        "x-per-hop",
    ] {
        assert!(!retry.headers().contains_key(name), "{name} was replayed");
    }
    assert_eq!(retry.headers()["x-kept"], "yes");
}

#[tokio::test]
async fn a_300_kb_binary_body_is_replayed_byte_for_byte() {
    let (layer, _) = charges_layer(required());
    let payload: Bytes = (0..300 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into();
    let counter = Counter::default();
    let svc = {
        let (payload, counter) = (payload.clone(), counter.clone());
        service(&layer, move |_req: InnerRequest| {
            counter.bump();
            let chunks = payload.chunks(7000).map(Bytes::copy_from_slice).collect();
            async move {
                let mut res = InnerResponse::new(chunked(chunks));
                res.headers_mut().insert(
                    "content-type",
                    HeaderValue::from_static("application/octet-stream"),
                );
                Ok(res)
            }
        })
    };
    let first = call(&svc, post("/v1/charges", Some("bin"), "{}")).await;
    assert_eq!(bytes_of(first).await, payload);
    let retry = call(&svc, post("/v1/charges", Some("bin"), "{}")).await;
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(bytes_of(retry).await, payload);
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn a_response_too_large_to_store_reaches_the_first_caller_and_is_never_executed_twice() {
    let (layer, _) = charges_layer(required().with_max_stored_response(1024));
    let counter = Counter::default();
    let chunks: Vec<Bytes> = (0..8u8).map(|i| Bytes::from(vec![i; 512])).collect();
    let expected: Bytes = chunks.concat().into();
    let svc = {
        let (chunks, counter) = (chunks.clone(), counter.clone());
        service(&layer, move |_req: InnerRequest| {
            counter.bump();
            let chunks = chunks.clone();
            async move {
                let mut res = InnerResponse::new(chunked(chunks));
                *res.status_mut() = http::StatusCode::CREATED;
                Ok(res)
            }
        })
    };

    let first = call(&svc, post("/v1/charges", Some("big"), "{}")).await;
    assert_eq!(first.status(), 201);
    assert_eq!(replayed(&first), Some("false"));
    assert_eq!(bytes_of(first).await, expected);

    let retry = call(&svc, post("/v1/charges", Some("big"), "{}")).await;
    assert_eq!(replayed(&retry), Some("true"));
    let doc = problem(retry, 500, "response-too-large-to-replay").await;
    assert_eq!(doc["original_status"].as_u64(), Some(201));
    assert_eq!(doc["max_stored_bytes"].as_u64(), Some(1024));
    assert_eq!(counter.get(), 1);
}

// --- keys -----------------------------------------------------------------------------

#[tokio::test]
async fn a_missing_key_on_a_required_route_is_400_and_nothing_runs() {
    let (layer, _) = charges_layer(required());
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    let res = call(&svc, post("/v1/charges", None, "{}")).await;
    assert_eq!(replayed(&res), None);
    problem(res, 400, "key-missing").await;
    assert_eq!(counter.get(), 0);
}

#[tokio::test]
async fn malformed_keys_are_400_and_nothing_runs() {
    let (layer, _) = charges_layer(required());
    let counter = Counter::default();
    let svc = charging(&layer, &counter);

    let mut two = post("/v1/charges", Some("a"), "{}");
    two.headers_mut()
        .append("idempotency-key", HeaderValue::from_static("b"));
    let mut bad_bytes = post("/v1/charges", None, "{}");
    bad_bytes.headers_mut().insert(
        "idempotency-key",
        HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
    );
    let too_long = "k".repeat(256);
    let cases = [
        ("two header lines", two),
        ("empty", post("/v1/charges", Some(""), "{}")),
        ("empty sf-string", post("/v1/charges", Some("\"\""), "{}")),
        ("too long", post("/v1/charges", Some(&too_long), "{}")),
        ("not visible ASCII", bad_bytes),
        ("space", post("/v1/charges", Some("a b"), "{}")),
        ("unterminated", post("/v1/charges", Some("\"abc"), "{}")),
    ];
    for (what, request) in cases {
        let res = call(&svc, request).await;
        assert_eq!(res.status(), 400, "{what}");
        problem(res, 400, "key-invalid").await;
    }
    // 255 characters is the longest key accepted.
    let longest = "k".repeat(255);
    let res = call(&svc, post("/v1/charges", Some(&longest), "{}")).await;
    assert_eq!(res.status(), 201);
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn a_missing_key_on_an_optional_route_is_passed_through_untouched() {
    let (layer, _) = charges_layer(Policy::new().with_key(KeyRequirement::Optional));
    let counter = Counter::default();
    let svc = {
        let counter = counter.clone();
        service(&layer, move |req: InnerRequest| {
            counter.bump();
            let buffered = req.body().is_buffered();
            async move {
                let echo = collect(req.into_body()).await;
                let mut res = response(200, echo);
                res.headers_mut()
                    .insert("x-buffered", HeaderValue::from(u32::from(buffered)));
                Ok(res)
            }
        })
    };
    for _ in 0..2 {
        let res = call(&svc, post("/v1/charges", None, "{\"a\":1}")).await;
        assert_eq!(replayed(&res), None);
        assert_eq!(res.headers()["x-buffered"], "0");
        assert_eq!(bytes_of(res).await, "{\"a\":1}");
    }
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn ignored_routes_unmatched_paths_and_unlisted_methods_pass_through() {
    let (store, _) = memory_store();
    let routes = Routes::new()
        .route(
            "/v1/charges",
            required().with_methods([Method::POST, Method::PUT]),
        )
        .unwrap()
        .route(
            "/v1/events",
            Policy::new().with_key(KeyRequirement::Ignored),
        )
        .unwrap();
    let layer = layer_with(store, routes);
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    for request in [
        post("/v1/events", Some("k"), "{}"),
        post("/v1/events", Some("k"), "{}"),
        post("/v1/other", Some("k"), "{}"),
        post("/v1/other", Some("k"), "{}"),
        request("PATCH", "/v1/charges", Some("k"), "{}"),
        request("PATCH", "/v1/charges", Some("k"), "{}"),
    ] {
        let res = call(&svc, request).await;
        assert_eq!(res.status(), 201);
        assert_eq!(replayed(&res), None);
    }
    assert_eq!(counter.get(), 6);
    // PUT is listed, so it is deduplicated.
    call(&svc, request("PUT", "/v1/charges", Some("k"), "{}")).await;
    let retry = call(&svc, request("PUT", "/v1/charges", Some("k"), "{}")).await;
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(counter.get(), 7);
}

#[tokio::test]
async fn an_empty_route_table_deduplicates_post_and_patch_everywhere() {
    let (store, _) = memory_store();
    let layer = layer_with(store, Routes::new());
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    for (method, path, key) in [
        ("POST", "/anything/here", "k1"),
        ("PATCH", "/", "k2"),
        ("POST", "/", "k3"),
    ] {
        call(&svc, request(method, path, Some(key), "{}")).await;
        let retry = call(&svc, request(method, path, Some(key), "{}")).await;
        assert_eq!(replayed(&retry), Some("true"), "{method} {path}");
    }
    assert_eq!(counter.get(), 3);
    // GET is not deduplicated, and a missing key is fine (optional by default).
    call(&svc, request("GET", "/x", Some("k"), "")).await;
    call(&svc, request("GET", "/x", Some("k"), "")).await;
    call(&svc, post("/x", None, "{}")).await;
    assert_eq!(counter.get(), 6);
}

#[tokio::test]
async fn a_custom_key_header_and_a_key_extractor_closure() {
    let (store, _) = memory_store();
    let routes = Routes::new().route("/v1/charges", required()).unwrap();
    let counter = Counter::default();

    let layer = layer_with(store.clone(), routes.clone())
        .with_key_header(HeaderName::from_static("x-request-key"));
    let svc = charging(&layer, &counter);
    let mut req = post("/v1/charges", None, "{}");
    req.headers_mut()
        .insert("x-request-key", HeaderValue::from_static("k"));
    call(&svc, req).await;
    let mut retry = post("/v1/charges", None, "{}");
    retry
        .headers_mut()
        .insert("x-request-key", HeaderValue::from_static("k"));
    assert_eq!(replayed(&call(&svc, retry).await), Some("true"));
    // The standard header is not read any more.
    let res = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    problem(res, 400, "key-missing").await;

    let from_query = |parts: &http::request::Parts| -> Result<Option<IdempotencyKey>, KeyError> {
        parts
            .uri
            .query()
            .and_then(|q| q.strip_prefix("key="))
            .map(|k| IdempotencyKey::parse(k.as_bytes()))
            .transpose()
    };
    let layer = layer_with(store, routes).with_key_extractor(from_query);
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    // The pattern matches the path; the query is part of the fingerprint.
    call(&svc, post("/v1/charges?key=q1", None, "{}")).await;
    let retry = call(&svc, post("/v1/charges?key=q1", None, "{}")).await;
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(counter.get(), 1);
}

// --- fingerprints ---------------------------------------------------------------------

#[tokio::test]
async fn the_same_key_with_a_different_request_is_422_and_nothing_runs() {
    let (layer, _) = charges_layer(required());
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    call(&svc, post("/v1/charges", Some("k"), r#"{"amount":100}"#)).await;
    for request in [
        post("/v1/charges", Some("k"), r#"{"amount":200}"#),
        post("/v1/charges?capture=false", Some("k"), r#"{"amount":100}"#),
    ] {
        let res = call(&svc, request).await;
        assert_eq!(replayed(&res), None);
        problem(res, 422, "fingerprint-mismatch").await;
    }
    let mut other_type = post("/v1/charges", Some("k"), r#"{"amount":100}"#);
    other_type
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("text/plain"));
    problem(call(&svc, other_type).await, 422, "fingerprint-mismatch").await;
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn json_key_order_whitespace_and_excluded_fields_do_not_change_the_fingerprint() {
    let (layer, _) = charges_layer(required().exclude_field("meta.sent_at"));
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    call(
        &svc,
        post(
            "/v1/charges",
            Some("k"),
            r#"{"amount":100,"currency":"eur","meta":{"sent_at":1}}"#,
        ),
    )
    .await;
    let retry = call(
        &svc,
        post(
            "/v1/charges",
            Some("k"),
            "{ \"meta\": {\"sent_at\": 2}, \"currency\": \"eur\",\n \"amount\": 100 }",
        ),
    )
    .await;
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn records_are_scoped_by_the_route_pattern_not_the_concrete_path() {
    let (store, _) = memory_store();
    let routes = Routes::new()
        .route("/v1/charges/{id}/capture", required())
        .unwrap();
    let layer = layer_with(store, routes);
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    call(&svc, post("/v1/charges/ch_1/capture", Some("k"), "{}")).await;
    // Same pattern, same key, another path: the same record with another fingerprint.
    let res = call(&svc, post("/v1/charges/ch_2/capture", Some("k"), "{}")).await;
    problem(res, 422, "fingerprint-mismatch").await;
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn under_a_prefix_route_each_concrete_path_is_its_own_endpoint() {
    for routes in [
        Routes::new(),
        Routes::new().route("/v1/*", Policy::new()).unwrap(),
    ] {
        let (store, _) = memory_store();
        let layer = layer_with(store, routes);
        let counter = Counter::default();
        let svc = charging(&layer, &counter);
        // One key, two endpoints: two records, two executions, no 422.
        let charge = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
        assert_eq!(replayed(&charge), Some("false"));
        let refund = call(&svc, post("/v1/refunds", Some("k"), r#"{"other":1}"#)).await;
        assert_eq!(replayed(&refund), Some("false"));
        assert_eq!(counter.get(), 2);
        // Each replays its own answer.
        let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
        assert_eq!(replayed(&retry), Some("true"));
        assert_eq!(bytes_of(retry).await, bytes_of(charge).await);
        let retry = call(&svc, post("/v1/refunds", Some("k"), r#"{"other":1}"#)).await;
        assert_eq!(replayed(&retry), Some("true"));
        assert_eq!(bytes_of(retry).await, bytes_of(refund).await);
        assert_eq!(counter.get(), 2);
    }
}

#[tokio::test]
async fn a_shared_scope_name_shares_keys_across_routes() {
    let (store, _) = memory_store();
    let shared = || required().with_scope("account");
    let routes = Routes::new()
        .route("/v1/charges", shared())
        .unwrap()
        .route("/v1/refunds", shared())
        .unwrap()
        .route("/v1/payouts", required())
        .unwrap();
    let layer = layer_with(store, routes);
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    // Stripe-style: the key is taken across the account, so another endpoint mismatches.
    problem(
        call(&svc, post("/v1/refunds", Some("k"), "{}")).await,
        422,
        "fingerprint-mismatch",
    )
    .await;
    // A route with its own scope does not collide.
    let other = call(&svc, post("/v1/payouts", Some("k"), "{}")).await;
    assert_eq!(replayed(&other), Some("false"));
    assert_eq!(counter.get(), 2);
}

// --- principals -----------------------------------------------------------------------

#[tokio::test]
async fn the_same_key_from_two_principals_executes_twice_without_cross_replay() {
    let (layer, _) = charges_layer(required());
    let counter = Counter::default();
    let svc = {
        let counter = counter.clone();
        service(&layer, move |req: InnerRequest| {
            let n = counter.bump();
            let who = req
                .headers()
                .get("authorization")
                .map_or("anonymous", |v| v.to_str().unwrap())
                .to_owned();
            async move { Ok(response(201, format!("{who} #{n}"))) }
        })
    };
    let as_user = |who: &'static str| {
        let mut req = post("/v1/charges", Some("shared-key"), "{}");
        req.headers_mut()
            .insert("authorization", HeaderValue::from_static(who));
        req
    };
    let alice = call(&svc, as_user("Bearer alice")).await;
    let bob = call(&svc, as_user("Bearer bob")).await;
    assert_eq!(replayed(&alice), Some("false"));
    assert_eq!(replayed(&bob), Some("false"));
    assert_eq!(bytes_of(alice).await, "Bearer alice #1");
    assert_eq!(bytes_of(bob).await, "Bearer bob #2");
    // Each retry replays its own principal's answer.
    let alice = call(&svc, as_user("Bearer alice")).await;
    let bob = call(&svc, as_user("Bearer bob")).await;
    assert_eq!(bytes_of(alice).await, "Bearer alice #1");
    assert_eq!(bytes_of(bob).await, "Bearer bob #2");
    // No principal at all is a third scope (anonymous).
    let mut anonymous = post("/v1/charges", Some("shared-key"), "{}");
    anonymous.headers_mut().remove("authorization");
    assert_eq!(replayed(&call(&svc, anonymous).await), Some("false"));
    assert_eq!(counter.get(), 3);
}

#[tokio::test]
async fn a_principal_header_per_route_and_a_principal_extractor_closure() {
    let (store, _) = memory_store();
    let routes = Routes::new()
        .route(
            "/v1/charges",
            required().with_principal_header(HeaderName::from_static("x-tenant")),
        )
        .unwrap();
    let layer = layer_with(store.clone(), routes.clone());
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    let tenant = |t: &'static str, auth: &'static str| {
        let mut req = post("/v1/charges", Some("k"), "{}");
        req.headers_mut()
            .insert("x-tenant", HeaderValue::from_static(t));
        req.headers_mut()
            .insert("authorization", HeaderValue::from_static(auth));
        req
    };
    call(&svc, tenant("t1", "Bearer one")).await;
    // Same tenant, another credential: the same scope.
    assert_eq!(
        replayed(&call(&svc, tenant("t1", "Bearer two")).await),
        Some("true")
    );
    assert_eq!(
        replayed(&call(&svc, tenant("t2", "Bearer one")).await),
        Some("false")
    );
    assert_eq!(counter.get(), 2);

    let by_account = |parts: &http::request::Parts, _: &Policy| {
        parts
            .headers
            .get("x-account")
            .map(|v| v.as_bytes().to_vec())
    };
    let layer = layer_with(store, routes).with_principal_extractor(by_account);
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    let account = |a: &'static str| {
        let mut req = post("/v1/charges", Some("k2"), "{}");
        req.headers_mut()
            .insert("x-account", HeaderValue::from_static(a));
        req
    };
    call(&svc, account("a1")).await;
    call(&svc, account("a2")).await;
    assert_eq!(replayed(&call(&svc, account("a1")).await), Some("true"));
    assert_eq!(counter.get(), 2);
}

// --- bodies ---------------------------------------------------------------------------

#[tokio::test]
async fn a_declared_content_length_over_the_limit_is_413_before_reading() {
    let (layer, _) = charges_layer(required().with_max_request_body(1024));
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    let mut req = post("/v1/charges", Some("k"), "{}");
    req.headers_mut()
        .insert("content-length", HeaderValue::from(1_000_000u64));
    let doc = problem(call(&svc, req).await, 413, "body-too-large").await;
    assert_eq!(doc["max_body_bytes"].as_u64(), Some(1024));
    assert_eq!(counter.get(), 0);
}

#[tokio::test]
async fn a_streamed_body_over_the_limit_is_413_and_under_it_reaches_the_inner_service() {
    let (layer, _) = charges_layer(required().with_max_request_body(1024));
    let counter = Counter::default();
    let svc = {
        let counter = counter.clone();
        service(&layer, move |req: InnerRequest| {
            counter.bump();
            assert!(req.body().is_buffered());
            async move { Ok(response(200, collect(req.into_body()).await)) }
        })
    };
    let streamed = |chunks: usize| {
        let mut req = post("/v1/charges", Some("k"), "");
        *req.body_mut() = chunked(vec![Bytes::from(vec![b'x'; 300]); chunks]);
        req.headers_mut()
            .insert("content-type", HeaderValue::from_static("text/plain"));
        req
    };
    problem(call(&svc, streamed(4)).await, 413, "body-too-large").await;
    assert_eq!(counter.get(), 0);
    let res = call(&svc, streamed(3)).await;
    assert_eq!(bytes_of(res).await, vec![b'x'; 900]);
    assert_eq!(counter.get(), 1);
}

// --- retention ------------------------------------------------------------------------

#[tokio::test]
async fn a_retry_after_the_retention_executes_again() {
    let (store, clock) = memory_store();
    let routes = Routes::new()
        .route(
            "/v1/charges",
            required().with_retention(Duration::from_secs(3600)),
        )
        .unwrap();
    let layer = layer_with(store, routes);
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    clock.advance(Duration::from_secs(3599));
    let within = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(replayed(&within), Some("true"));
    clock.advance(Duration::from_secs(2));
    let after = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(replayed(&after), Some("false"));
    assert_eq!(bytes_of(after).await, "charge 2");
}

// --- store failures -------------------------------------------------------------------

#[tokio::test]
async fn a_store_outage_is_503_with_retry_after_and_nothing_runs() {
    let (memory, _) = memory_store();
    let store = TestStore::new(memory);
    store.fail_claims.store(true, Ordering::SeqCst);
    let routes = Routes::new().route("/v1/charges", required()).unwrap();
    let layer = layer_with(store.clone(), routes).with_store_retry_after(Duration::from_secs(5));
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    let res = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(res.headers()["retry-after"], "5");
    problem(res, 503, "store-unavailable").await;
    assert_eq!(counter.get(), 0);
    // Nothing ran, so the store may release what the failed claim may have taken.
    assert_eq!(TestStore::count(&store.releasable_claims), 1);
}

#[tokio::test]
async fn a_store_outage_on_a_fail_open_route_forwards_without_deduplication() {
    let (memory, _) = memory_store();
    let store = TestStore::new(memory);
    store.fail_claims.store(true, Ordering::SeqCst);
    let routes = Routes::new()
        .route("/v1/charges", required().with_fail(FailMode::Open))
        .unwrap();
    let layer = layer_with(store.clone(), routes);
    let counter = Counter::default();
    let svc = {
        let counter = counter.clone();
        service(&layer, move |req: InnerRequest| {
            counter.bump();
            async move { Ok(response(201, collect(req.into_body()).await)) }
        })
    };
    for _ in 0..2 {
        let res = call(&svc, post("/v1/charges", Some("k"), "{\"a\":1}")).await;
        assert_eq!(res.status(), 201);
        assert_eq!(replayed(&res), None);
        assert_eq!(bytes_of(res).await, "{\"a\":1}");
    }
    assert_eq!(counter.get(), 2);
    // What a failed claim may have taken stays held: the forwarded request's retry must
    // not find the record released and execute again.
    assert_eq!(TestStore::count(&store.claims), 2);
    assert_eq!(TestStore::count(&store.releasable_claims), 0);
}

#[tokio::test]
async fn a_failed_completion_leaves_the_key_in_flight_never_released() {
    let (memory, clock) = memory_store();
    let store = TestStore::new(memory);
    store.fail_completes.store(true, Ordering::SeqCst);
    let routes = Routes::new().route("/v1/charges", required()).unwrap();
    let layer = layer_with(store.clone(), routes);
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    // The first caller still gets its answer: the request ran.
    let first = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(first.status(), 201);
    assert_eq!(TestStore::count(&store.releases), 0);
    // A retry is in flight until the lease passes, then an unknown outcome, never a rerun.
    problem(
        call(&svc, post("/v1/charges", Some("k"), "{}")).await,
        409,
        "in-flight",
    )
    .await;
    store.fail_completes.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(61));
    problem(
        call(&svc, post("/v1/charges", Some("k"), "{}")).await,
        502,
        "outcome-unknown",
    )
    .await;
    assert_eq!(counter.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_claim_the_store_never_answers_is_503_after_the_store_timeout_and_runs_nothing() {
    let (memory, clock) = memory_store();
    let store = TestStore::new(memory);
    // The claim lands, but its answer never comes back.
    store.hang_claims.store(true, Ordering::SeqCst);
    let routes = Routes::new().route("/v1/charges", required()).unwrap();
    let layer = layer_with(store.clone(), routes)
        .with_store_timeout(Some(Duration::from_secs(2)))
        .with_store_retry_after(Duration::from_secs(3));
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    let res = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(res.headers()["retry-after"], "3");
    problem(res, 503, "store-unavailable").await;
    assert_eq!(counter.get(), 0);
    // The claim did land: a retry finds it in flight, and never runs it a second time.
    store.hang_claims.store(false, Ordering::SeqCst);
    problem(
        call(&svc, post("/v1/charges", Some("k"), "{}")).await,
        409,
        "in-flight",
    )
    .await;
    clock.advance(Duration::from_secs(61));
    problem(
        call(&svc, post("/v1/charges", Some("k"), "{}")).await,
        502,
        "outcome-unknown",
    )
    .await;
    assert_eq!(counter.get(), 0);
}

/// A request that waits on a record whose holder is gone (its claim landed, its answer was
/// lost, nothing will ever settle it) claims again when the lease ends and is told the
/// outcome is unknown, rather than sleeping through its whole wait and answering `409`.
#[tokio::test(start_paused = true)]
async fn a_waiting_request_claims_again_when_the_lease_it_waits_on_ends() {
    let (memory, clock) = memory_store();
    let store = TestStore::new(memory);
    store.hang_claims.store(true, Ordering::SeqCst);
    let policy = required()
        .with_lease(Duration::from_secs(10))
        .with_max_wait(Duration::from_secs(60));
    let routes = Routes::new().route("/v1/charges", policy).unwrap();
    let recorder = Arc::new(Recorder::default());
    let layer = layer_with(store.clone(), routes)
        .with_store_timeout(Some(Duration::from_secs(2)))
        .with_events(recorder.clone());
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    // The first claim lands and its answer is lost: the record is held by nobody.
    problem(
        call(&svc, post("/v1/charges", Some("k"), "{}")).await,
        503,
        "store-unavailable",
    )
    .await;
    store.hang_claims.store(false, Ordering::SeqCst);

    let mut retry = post("/v1/charges", Some("k"), "{}");
    retry
        .headers_mut()
        .insert("prefer", HeaderValue::from_static("wait=50"));
    let retry = tokio::spawn(tower::ServiceExt::oneshot(svc.clone(), retry));
    recorder.wait_for(Event::Waited).await;
    // The lease ends on the store's clock; the waiting request's timer follows it.
    clock.advance(Duration::from_secs(11));
    let answer = retry.await.unwrap().unwrap();
    problem(answer, 502, "outcome-unknown").await;
    assert_eq!(counter.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_completion_the_store_never_answers_still_answers_the_client() {
    let (memory, _) = memory_store();
    let store = TestStore::new(memory);
    store.hang_completes.store(true, Ordering::SeqCst);
    let routes = Routes::new().route("/v1/charges", required()).unwrap();
    let layer = layer_with(store.clone(), routes);
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    // The default bound (5 s) ends the wait; the request ran, so its answer goes out.
    let first = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(first.status(), 201);
    assert_eq!(TestStore::count(&store.releases), 0);
    problem(
        call(&svc, post("/v1/charges", Some("k"), "{}")).await,
        409,
        "in-flight",
    )
    .await;
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn an_unreadable_stored_response_is_500_and_not_executed_again() {
    let (store, _) = memory_store();
    let routes = Routes::new().route("/v1/charges", required()).unwrap();
    let layer = layer_with(store.clone(), routes);
    // Complete the record the request maps to with bytes that are not a stored response.
    let key = IdempotencyKey::parse(b"k").unwrap();
    let principal = PrincipalHasher::new(SECRET).hash(b"Bearer alice");
    let id = Scope::new("default", principal, "POST", "/v1/charges", &key).record_id();
    let fingerprint =
        Fingerprinter::new().fingerprint("POST", "/v1/charges", Some("application/json"), b"{}");
    let ClaimOutcome::Acquired(lease) = store
        .claim(&ClaimRequest::new(id, fingerprint))
        .await
        .unwrap()
    else {
        panic!("claim")
    };
    store
        .complete(&lease.id, lease.token, Bytes::from_static(b"garbage"))
        .await
        .unwrap();

    let recorder = Arc::new(Recorder::default());
    let layer = layer.with_events(recorder.clone());
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    problem(
        call(&svc, post("/v1/charges", Some("k"), "{}")).await,
        500,
        "stored-response-unreadable",
    )
    .await;
    assert_eq!(counter.get(), 0);
    assert_eq!(recorder.count(Event::StoredResponseUnreadable), 1);
}

// --- events ---------------------------------------------------------------------------

#[tokio::test]
async fn events_count_outcomes_and_store_latencies() {
    let (store, _) = memory_store();
    let routes = Routes::new().route("/v1/charges", required()).unwrap();
    let recorder = Arc::new(Recorder::default());
    let layer = layer_with(store, routes).with_events(recorder.clone());
    let counter = Counter::default();
    let svc = charging(&layer, &counter);
    call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    call(&svc, post("/v1/charges", Some("k"), "{\"x\":1}")).await;
    call(&svc, post("/v1/charges", None, "{}")).await;
    call(&svc, post("/v1/charges", Some(""), "{}")).await;
    assert_eq!(
        recorder.events(),
        [
            Event::Executed,
            Event::Replayed,
            Event::Mismatch,
            Event::KeyMissing,
            Event::KeyRejected
        ]
    );
    let latencies = recorder.latencies();
    assert_eq!(
        latencies.iter().filter(|op| **op == StoreOp::Claim).count(),
        3
    );
    assert_eq!(
        latencies
            .iter()
            .filter(|op| **op == StoreOp::Complete)
            .count(),
        1
    );
}

#[tokio::test]
async fn the_inner_service_sees_the_claim_in_its_request_extensions() {
    let (layer, _) = charges_layer(required());
    let svc = service(&layer, |req: InnerRequest| async move {
        let claim = req.extensions().get::<idem_tower::ClaimInfo>().copied();
        let token = claim.map(|c| c.token.get()).unwrap_or(0);
        assert!(claim.is_some_and(|c| !c.took_over));
        Ok(response(200, token.to_string()))
    });
    let res = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    let token: u64 = String::from_utf8(bytes_of(res).await.to_vec())
        .unwrap()
        .parse()
        .unwrap();
    assert!(token > 0);
    // Request<RequestBody<_>> is what the inner service gets; a plain body can be built too.
    let _: Request<RequestBody<TestBody>> = Request::new(RequestBody::buffered(Bytes::new()));
}

#[tokio::test]
async fn namespaces_separate_layers_sharing_a_store() {
    let (store, _) = memory_store();
    let layer_in = |namespace: &str| {
        let routes = Routes::new()
            .route("/v1/charges", required().with_namespace(namespace))
            .unwrap();
        layer_with(store.clone(), routes)
    };
    let counter = Counter::default();
    let billing = charging(&layer_in("billing"), &counter);
    let billing_replica = charging(&layer_in("billing"), &counter);
    let shipping = charging(&layer_in("shipping"), &counter);
    call(&billing, post("/v1/charges", Some("k"), "{}")).await;
    // Another process in the same namespace sees the record...
    let replica = call(&billing_replica, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(replayed(&replica), Some("true"));
    // ...another namespace does not.
    let other = call(&shipping, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(replayed(&other), Some("false"));
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn the_inner_service_is_reachable_through_the_middleware() {
    let (layer, _) = charges_layer(required());
    let mut svc = idem_tower::Idempotency::new(7u32, &layer);
    assert_eq!(*svc.get_ref(), 7);
    *svc.get_mut() += 1;
    assert_eq!(svc.into_inner(), 8);
    let svc = tower::Layer::layer(&layer, 1u8);
    assert_eq!(*svc.get_ref(), 1);
}
