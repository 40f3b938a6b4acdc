//! What is stored and what is released: status classes, inner errors, ambiguous outcomes,
//! takeovers, panics and cancelled requests.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use idem_core::{BoxError, Store};
use idem_tower::{
    Ambiguous, AmbiguousKind, ClaimInfo, Disposition, Event, IdempotencyLayer, KeyRequirement,
    OnCancel, Policy, ReleaseReason, Routes,
};
use tower::ServiceExt;

use common::*;

fn layer(
    policy: Policy,
) -> (
    IdempotencyLayer,
    Arc<idem_core::MemoryStore>,
    idem_core::ManualClock,
) {
    let (store, clock) = memory_store();
    let routes = Routes::new()
        .route("/v1/charges", policy.with_key(KeyRequirement::Required))
        .unwrap();
    let layer = IdempotencyLayer::new(store.clone() as Arc<dyn Store>, SECRET).with_routes(routes);
    (layer, store, clock)
}

/// An inner service that answers `status` on its first execution and `201` afterwards.
fn first_answers(
    layer: &IdempotencyLayer,
    counter: &Counter,
    status: u16,
) -> impl tower::Service<http::Request<TestBody>, Response = Answer, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    let counter = counter.clone();
    service(layer, move |_req: InnerRequest| {
        let n = counter.bump();
        async move {
            Ok(if n == 1 {
                response(status, format!("status {status}"))
            } else {
                response(201, "created")
            })
        }
    })
}

#[tokio::test]
async fn retryable_statuses_release_the_claim() {
    for status in [408, 425, 429, 503] {
        let (layer, _, _) = layer(Policy::new());
        let counter = Counter::default();
        let svc = first_answers(&layer, &counter, status);
        let first = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
        assert_eq!(first.status(), status);
        assert_eq!(replayed(&first), Some("false"));
        assert_eq!(bytes_of(first).await, format!("status {status}"));
        let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
        assert_eq!(retry.status(), 201, "after {status}");
        assert_eq!(replayed(&retry), Some("false"));
        assert_eq!(counter.get(), 2);
    }
}

#[tokio::test]
async fn definitive_answers_are_stored_including_client_errors_and_redirects() {
    for status in [200, 202, 303, 400, 404, 409, 422] {
        let (layer, _, _) = layer(Policy::new());
        let counter = Counter::default();
        let svc = first_answers(&layer, &counter, status);
        call(&svc, post("/v1/charges", Some("k"), "{}")).await;
        let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
        assert_eq!(retry.status(), status);
        assert_eq!(replayed(&retry), Some("true"));
        assert_eq!(counter.get(), 1, "{status}");
    }
}

#[tokio::test]
async fn server_errors_are_stored_by_default() {
    for status in [500, 502, 504] {
        let (layer, _, _) = layer(Policy::new());
        let counter = Counter::default();
        let svc = first_answers(&layer, &counter, status);
        call(&svc, post("/v1/charges", Some("k"), "{}")).await;
        let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
        assert_eq!(retry.status(), status);
        assert_eq!(replayed(&retry), Some("true"));
        assert_eq!(counter.get(), 1);
    }
}

#[tokio::test]
async fn server_errors_release_on_a_route_that_says_so() {
    let (layer, _, _) = layer(Policy::new().with_server_errors(Disposition::Release));
    let counter = Counter::default();
    let svc = first_answers(&layer, &counter, 500);
    assert_eq!(
        call(&svc, post("/v1/charges", Some("k"), "{}"))
            .await
            .status(),
        500
    );
    let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(retry.status(), 201);
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn an_inner_error_releases_the_claim_and_is_returned() {
    let (layer, _, _) = layer(Policy::new());
    let counter = Counter::default();
    let recorder = Arc::new(Recorder::default());
    let layer = layer.with_events(recorder.clone());
    let svc = {
        let counter = counter.clone();
        service(&layer, move |_req: InnerRequest| {
            let n = counter.bump();
            async move {
                if n == 1 {
                    Err::<InnerResponse, BoxError>("connection refused".into())
                } else {
                    Ok(response(201, "created"))
                }
            }
        })
    };
    let error = svc
        .clone()
        .oneshot(post("/v1/charges", Some("k"), "{}"))
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "connection refused");
    let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(retry.status(), 201);
    assert_eq!(counter.get(), 2);
    assert_eq!(
        recorder.count(Event::Released(ReleaseReason::InnerError)),
        1
    );
}

fn ambiguous_service(
    layer: &IdempotencyLayer,
    counter: &Counter,
    kind: AmbiguousKind,
) -> impl tower::Service<http::Request<TestBody>, Response = Answer, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    let counter = counter.clone();
    service(layer, move |_req: InnerRequest| {
        let n = counter.bump();
        async move {
            if n == 1 {
                let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
                Err::<InnerResponse, BoxError>(Ambiguous::with_source(kind, reset).into())
            } else {
                Ok(response(201, "created"))
            }
        }
    })
}

#[tokio::test]
async fn an_ambiguous_outcome_is_stored_as_unknown_and_never_executed_again() {
    for (kind, status) in [
        (AmbiguousKind::Timeout, 504),
        (AmbiguousKind::ConnectionLost, 502),
    ] {
        let (layer, _, _) = layer(Policy::new());
        let counter = Counter::default();
        let svc = ambiguous_service(&layer, &counter, kind);
        let first = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
        assert_eq!(replayed(&first), Some("false"));
        let doc = problem(first, status, "outcome-unknown").await;
        assert_eq!(doc["outcome"], "unknown");
        assert_eq!(doc["reason"], kind.as_str());
        let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
        assert_eq!(replayed(&retry), Some("true"));
        problem(retry, status, "outcome-unknown").await;
        assert_eq!(counter.get(), 1);
    }
}

#[tokio::test]
async fn an_ambiguous_outcome_releases_on_a_route_that_says_so() {
    let (layer, _, _) = layer(Policy::new().with_ambiguous(Disposition::Release));
    let counter = Counter::default();
    let svc = ambiguous_service(&layer, &counter, AmbiguousKind::Timeout);
    let error = svc
        .clone()
        .oneshot(post("/v1/charges", Some("k"), "{}"))
        .await
        .unwrap_err();
    assert!(Ambiguous::find(&error).is_some());
    let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(retry.status(), 201);
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn a_response_body_that_fails_midway_is_an_unknown_outcome() {
    let (layer, _, _) = layer(Policy::new());
    let counter = Counter::default();
    let svc = {
        let counter = counter.clone();
        service(&layer, move |_req: InnerRequest| {
            counter.bump();
            async move {
                let frames = vec![
                    Ok(http_body::Frame::data(bytes::Bytes::from_static(b"part"))),
                    Err::<_, BoxError>("reset".into()),
                ];
                let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
                    futures_util::stream::iter(frames),
                ));
                Ok(InnerResponse::new(body))
            }
        })
    };
    let first = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    let doc = problem(first, 502, "outcome-unknown").await;
    assert_eq!(doc["reason"], "response-interrupted");
    let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(counter.get(), 1);
}

/// The first execution waits at the gate; later ones answer at once.
fn gated(
    layer: &IdempotencyLayer,
    counter: &Counter,
    gate: &Gate,
) -> impl tower::Service<http::Request<TestBody>, Response = Answer, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    let (counter, gate) = (counter.clone(), gate.clone());
    service(layer, move |req: InnerRequest| {
        let n = counter.bump();
        let gate = gate.clone();
        let took_over = req
            .extensions()
            .get::<ClaimInfo>()
            .is_some_and(|c| c.took_over);
        async move {
            if n == 1 {
                gate.pass().await;
            }
            let mut res = response(200, format!("execution {n}"));
            res.headers_mut().insert(
                "x-took-over",
                HeaderValue::from_static(if took_over { "1" } else { "0" }),
            );
            Ok(res)
        }
    })
}

#[tokio::test]
async fn taking_over_an_expired_lease_stores_an_unknown_outcome_by_default() {
    let (layer, _, clock) = layer(Policy::new().with_lease(Duration::from_secs(60)));
    let counter = Counter::default();
    let gate = Gate::default();
    let svc = gated(&layer, &counter, &gate);
    let first = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    gate.arrival().await;

    // The first attempt hangs past its lease (a crashed holder, as far as the store knows).
    clock.advance(Duration::from_secs(61));
    let second = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(replayed(&second), Some("false"));
    let doc = problem(second, 502, "outcome-unknown").await;
    assert_eq!(doc["reason"], "lease-expired");
    assert_eq!(counter.get(), 1);

    // The first attempt finishes late: its caller gets its answer, the record keeps the
    // unknown outcome (the store rejects the stale token).
    gate.open();
    let late = first.await.unwrap().unwrap();
    assert_eq!(bytes_of(late).await, "execution 1");
    let third = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(replayed(&third), Some("true"));
    problem(third, 502, "outcome-unknown").await;
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn taking_over_an_expired_lease_executes_again_when_ambiguous_outcomes_release() {
    let (layer, _, clock) = layer(
        Policy::new()
            .with_lease(Duration::from_secs(60))
            .with_ambiguous(Disposition::Release),
    );
    let counter = Counter::default();
    let gate = Gate::default();
    let svc = gated(&layer, &counter, &gate);
    let first = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    gate.arrival().await;
    clock.advance(Duration::from_secs(61));
    let second = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["x-took-over"], "1");
    assert_eq!(bytes_of(second).await, "execution 2");
    gate.open();
    first.await.unwrap().unwrap();
    // The record holds the second execution's answer.
    let third = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(replayed(&third), Some("true"));
    assert_eq!(bytes_of(third).await, "execution 2");
}

#[tokio::test]
async fn a_panic_in_the_inner_future_releases_the_claim_at_once() {
    let (layer, _, _) = layer(Policy::new());
    let recorder = Arc::new(Recorder::default());
    let layer = layer.with_events(recorder.clone());
    let counter = Counter::default();
    let svc = {
        let counter = counter.clone();
        service(&layer, move |_req: InnerRequest| {
            let n = counter.bump();
            async move {
                if n == 1 {
                    panic!("handler bug");
                }
                Ok(response(201, "created"))
            }
        })
    };
    let panicked = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")))
        .await
        .unwrap_err();
    assert!(panicked.is_panic());
    // Claimable again now, not at the end of the lease.
    let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(retry.status(), 201);
    assert_eq!(replayed(&retry), Some("false"));
    assert_eq!(counter.get(), 2);
    assert_eq!(recorder.count(Event::Released(ReleaseReason::Panic)), 1);
}

#[tokio::test]
async fn a_panic_in_call_itself_releases_the_claim_at_once() {
    let (layer, _, _) = layer(Policy::new());
    let counter = Counter::default();
    let svc = {
        let counter = counter.clone();
        service(&layer, move |_req: InnerRequest| {
            if counter.bump() == 1 {
                panic!("bug before the future");
            }
            async move { Ok(response(201, "created")) }
        })
    };
    let panicked = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")))
        .await
        .unwrap_err();
    assert!(panicked.is_panic());
    let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(retry.status(), 201);
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn a_dropped_response_future_releases_the_claim_at_once_when_the_route_says_so() {
    let (layer, _, _) = layer(Policy::new().with_on_cancel(OnCancel::Release));
    let recorder = Arc::new(Recorder::default());
    let layer = layer.with_events(recorder.clone());
    let counter = Counter::default();
    let gate = Gate::default();
    let svc = gated(&layer, &counter, &gate);
    let first = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    gate.arrival().await;
    // The client goes away mid-flight.
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    assert_eq!(recorder.count(Event::Released(ReleaseReason::Cancelled)), 1);

    // The release runs on a spawned task; a retry that waits for the record to settle is
    // woken by it and executes (the lease, 60 s, is far from over).
    let mut retry = post("/v1/charges", Some("k"), "{}");
    retry
        .headers_mut()
        .insert("prefer", HeaderValue::from_static("wait=30"));
    let retry = call(&svc, retry).await;
    assert_eq!(retry.status(), 200);
    assert_eq!(replayed(&retry), Some("false"));
    assert_eq!(bytes_of(retry).await, "execution 2");
    assert_eq!(counter.get(), 2);
    gate.open();
}

#[tokio::test]
async fn a_dropped_response_future_runs_to_completion_by_default() {
    let (layer, _, _) = layer(Policy::new());
    let counter = Counter::default();
    let gate = Gate::default();
    let svc = gated(&layer, &counter, &gate);
    let first = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    gate.arrival().await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());

    // The execution goes on without its caller and stores its answer.
    gate.open();
    let mut retry = post("/v1/charges", Some("k"), "{}");
    retry
        .headers_mut()
        .insert("prefer", HeaderValue::from_static("wait=30"));
    let retry = call(&svc, retry).await;
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(bytes_of(retry).await, "execution 1");
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn a_panic_on_a_run_to_completion_route_releases_and_reaches_the_caller() {
    let (layer, _, _) = layer(Policy::new().with_on_cancel(OnCancel::RunToCompletion));
    let counter = Counter::default();
    let svc = {
        let counter = counter.clone();
        service(&layer, move |_req: InnerRequest| {
            let n = counter.bump();
            async move {
                if n == 1 {
                    panic!("handler bug");
                }
                Ok(response(201, "created"))
            }
        })
    };
    let panicked = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")))
        .await
        .unwrap_err();
    assert!(panicked.is_panic());
    assert_eq!(
        call(&svc, post("/v1/charges", Some("k"), "{}"))
            .await
            .status(),
        201
    );
}
