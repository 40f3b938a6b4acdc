//! Duplicates in flight: conflicts, waiting, races, and lease renewal.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::HeaderValue;
use idem_core::{BoxError, Store};
use idem_tower::{Event, IdempotencyLayer, KeyRequirement, OnInFlight, Policy, Routes};
use tower::ServiceExt;

use common::*;

fn layer_over(store: Arc<dyn Store>, policy: Policy) -> IdempotencyLayer {
    let routes = Routes::new()
        .route("/v1/charges", policy.with_key(KeyRequirement::Required))
        .unwrap();
    IdempotencyLayer::new(store, SECRET).with_routes(routes)
}

/// Every execution waits at the gate, then answers `201 execution <n>`.
fn gated(
    layer: &IdempotencyLayer,
    counter: &Counter,
    gate: &Gate,
) -> impl tower::Service<http::Request<TestBody>, Response = Answer, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    let (counter, gate) = (counter.clone(), gate.clone());
    service(layer, move |_req: InnerRequest| {
        let n = counter.bump();
        let gate = gate.clone();
        async move {
            gate.pass().await;
            Ok(response(201, format!("execution {n}")))
        }
    })
}

fn waiting(seconds: u32) -> http::Request<TestBody> {
    let mut request = post("/v1/charges", Some("k"), "{}");
    let value = format!("wait={seconds}");
    request
        .headers_mut()
        .insert("prefer", HeaderValue::from_str(&value).unwrap());
    request
}

#[tokio::test]
async fn a_retry_in_flight_gets_409_with_retry_after_until_the_lease_ends() {
    let (store, clock) = memory_store();
    let layer = layer_over(store, Policy::new().with_lease(Duration::from_secs(60)));
    let counter = Counter::default();
    let gate = Gate::default();
    let svc = gated(&layer, &counter, &gate);
    let first = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    gate.arrival().await;

    let res = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(res.headers()["retry-after"], "60");
    assert_eq!(replayed(&res), None);
    problem(res, 409, "in-flight").await;
    clock.advance(Duration::from_millis(59_500));
    let res = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    // Rounded up, and never below one second.
    assert_eq!(res.headers()["retry-after"], "1");

    gate.open();
    let first = first.await.unwrap().unwrap();
    assert_eq!(replayed(&first), Some("false"));
    let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(counter.get(), 1);
}

/// A `409` and a wait take the lease's remaining time from the claim's own answer (the
/// store's time comes with it): one store call per conflicting retry, not two.
#[tokio::test]
async fn a_conflict_costs_one_store_call() {
    let (memory, clock) = memory_store();
    let store = TestStore::new(memory);
    let layer = layer_over(
        store.clone(),
        Policy::new()
            .with_lease(Duration::from_secs(60))
            .with_max_wait(Duration::from_secs(1)),
    );
    let counter = Counter::default();
    let gate = Gate::default();
    let svc = gated(&layer, &counter, &gate);
    let first = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    gate.arrival().await;
    clock.advance(Duration::from_secs(20));

    let claims = TestStore::count(&store.claims);
    let res = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(res.headers()["retry-after"], "40");
    problem(res, 409, "in-flight").await;
    assert_eq!(TestStore::count(&store.claims), claims + 1);
    assert_eq!(TestStore::count(&store.nows), 0);
    // A retry that waits (and runs out of time) does not ask for the time either.
    let res = call(&svc, waiting(1)).await;
    problem(res, 409, "in-flight").await;
    assert_eq!(TestStore::count(&store.nows), 0);

    gate.open();
    first.await.unwrap().unwrap();
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn prefer_wait_replays_the_first_once_it_completes() {
    let (store, _) = memory_store();
    let recorder = Arc::new(Recorder::default());
    let layer = layer_over(store, Policy::new()).with_events(recorder.clone());
    let counter = Counter::default();
    let gate = Gate::default();
    let svc = gated(&layer, &counter, &gate);
    let first = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    gate.arrival().await;

    let second = tokio::spawn(svc.clone().oneshot(waiting(30)));
    recorder.wait_for(Event::Waited).await;
    gate.open();

    let first = first.await.unwrap().unwrap();
    let second = second.await.unwrap().unwrap();
    assert_eq!(replayed(&first), Some("false"));
    assert_eq!(replayed(&second), Some("true"));
    assert_eq!(bytes_of(second).await, "execution 1");
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn a_route_that_waits_replays_without_a_prefer_header() {
    let (store, _) = memory_store();
    let recorder = Arc::new(Recorder::default());
    let layer = layer_over(store, Policy::new().with_in_flight(OnInFlight::Wait))
        .with_events(recorder.clone());
    let counter = Counter::default();
    let gate = Gate::default();
    let svc = gated(&layer, &counter, &gate);
    let first = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    gate.arrival().await;
    let second = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    recorder.wait_for(Event::Waited).await;
    gate.open();
    first.await.unwrap().unwrap();
    let second = second.await.unwrap().unwrap();
    assert_eq!(replayed(&second), Some("true"));
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn a_waiter_executes_when_the_first_is_released() {
    let (store, _) = memory_store();
    let recorder = Arc::new(Recorder::default());
    let layer = layer_over(store, Policy::new()).with_events(recorder.clone());
    let counter = Counter::default();
    let gate = Gate::default();
    let svc = {
        let (counter, gate) = (counter.clone(), gate.clone());
        service(&layer, move |_req: InnerRequest| {
            let n = counter.bump();
            let gate = gate.clone();
            async move {
                if n == 1 {
                    gate.pass().await;
                    return Ok(response(503, "try later"));
                }
                Ok(response(201, format!("execution {n}")))
            }
        })
    };
    let first = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    gate.arrival().await;
    let second = tokio::spawn(svc.clone().oneshot(waiting(30)));
    recorder.wait_for(Event::Waited).await;
    gate.open();
    assert_eq!(first.await.unwrap().unwrap().status(), 503);
    let second = second.await.unwrap().unwrap();
    assert_eq!(replayed(&second), Some("false"));
    assert_eq!(bytes_of(second).await, "execution 2");
}

#[tokio::test(start_paused = true)]
async fn a_wait_that_runs_out_is_409() {
    let (store, _) = memory_store();
    let layer = layer_over(store, Policy::new().with_max_wait(Duration::from_secs(5)));
    let counter = Counter::default();
    let gate = Gate::default();
    let svc = gated(&layer, &counter, &gate);
    let first = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    gate.arrival().await;
    // Asks for 600 s, capped at the route's 5 s; the paused clock jumps to the deadline.
    let res = call(&svc, waiting(600)).await;
    problem(res, 409, "in-flight").await;
    gate.open();
    first.await.unwrap().unwrap();
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn without_a_completion_waiter_a_wait_is_an_immediate_409() {
    let (memory, _) = memory_store();
    let store = TestStore::new(memory);
    store.hide_waiter.store(true, Ordering::SeqCst);
    let layer = layer_over(store.clone(), Policy::new());
    let counter = Counter::default();
    let gate = Gate::default();
    let svc = gated(&layer, &counter, &gate);
    let first = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    gate.arrival().await;
    problem(call(&svc, waiting(30)).await, 409, "in-flight").await;
    gate.open();
    first.await.unwrap().unwrap();
}

/// Runs `future` once every task reached the barrier.
async fn after<F: std::future::Future + Send>(
    barrier: Arc<tokio::sync::Barrier>,
    future: F,
) -> F::Output {
    barrier.wait().await;
    future.await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_duplicates_execute_exactly_once() {
    let (store, _) = memory_store();
    let layer = layer_over(store, Policy::new());
    let counter = Counter::default();
    let svc = {
        let counter = counter.clone();
        service(&layer, move |_req: InnerRequest| {
            let n = counter.bump();
            async move {
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
                Ok(response(201, format!("execution {n}")))
            }
        })
    };
    let barrier = Arc::new(tokio::sync::Barrier::new(200));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let barrier = barrier.clone();
            let request = svc
                .clone()
                .oneshot(post("/v1/charges", Some("race"), r#"{"amount":1}"#));
            tokio::spawn(after(barrier, request))
        })
        .collect();
    let (mut first, mut conflicts, mut replays) = (0, 0, 0);
    for task in tasks {
        let res = task.await.unwrap().unwrap();
        match (res.status().as_u16(), replayed(&res)) {
            (201, Some("false")) => first += 1,
            (201, Some("true")) => {
                assert_eq!(bytes_of(res).await, "execution 1");
                replays += 1;
            }
            (409, None) => conflicts += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(counter.get(), 1);
    assert_eq!(first, 1);
    assert_eq!(first + conflicts + replays, 200);
}

#[tokio::test(start_paused = true)]
async fn a_long_request_renews_its_lease_and_stops_when_done() {
    let (memory, clock) = memory_store();
    let store = TestStore::new(memory);
    let layer = layer_over(
        store.clone(),
        Policy::new().with_lease(Duration::from_secs(10)),
    );
    let counter = Counter::default();
    let gate = Gate::default();
    let svc = gated(&layer, &counter, &gate);
    let first = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    gate.arrival().await;

    // Half a lease passes (tokio time drives the renewals, the store's clock the lease).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(TestStore::count(&store.renewals), 1);
    clock.advance(Duration::from_secs(6));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(TestStore::count(&store.renewals), 2);
    clock.advance(Duration::from_secs(6));
    // 12 s of store time, more than the 10 s lease: still held thanks to the renewals.
    problem(
        call(&svc, post("/v1/charges", Some("k"), "{}")).await,
        409,
        "in-flight",
    )
    .await;

    gate.open();
    first.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(TestStore::count(&store.renewals), 2);
    let retry = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(counter.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_is_not_completed_afterwards() {
    let (memory, clock) = memory_store();
    let store = TestStore::new(memory);
    let recorder = Arc::new(Recorder::default());
    let layer = layer_over(
        store.clone(),
        Policy::new().with_lease(Duration::from_secs(10)),
    )
    .with_events(recorder.clone());
    let counter = Counter::default();
    let gate = Gate::default();
    let svc = {
        let (counter, gate) = (counter.clone(), gate.clone());
        service(&layer, move |_req: InnerRequest| {
            let n = counter.bump();
            let gate = gate.clone();
            async move {
                if n == 1 {
                    gate.pass().await;
                }
                Ok(response(201, format!("execution {n}")))
            }
        })
    };
    let first = tokio::spawn(svc.clone().oneshot(post("/v1/charges", Some("k"), "{}")));
    gate.arrival().await;

    // The holder stalls past its lease (say, a long GC pause) and a retry takes over.
    clock.advance(Duration::from_secs(11));
    let second = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    problem(second, 502, "outcome-unknown").await;
    assert_eq!(TestStore::count(&store.completes), 1);

    // The holder's next renewal finds the lease lost.
    tokio::time::sleep(Duration::from_secs(6)).await;
    recorder.wait_for(Event::LeaseLost).await;
    gate.open();
    let late = first.await.unwrap().unwrap();
    assert_eq!(bytes_of(late).await, "execution 1");
    // It did not try to complete: still only the takeover's completion.
    assert_eq!(TestStore::count(&store.completes), 1);
    assert_eq!(TestStore::count(&store.releases), 0);
    let third = call(&svc, post("/v1/charges", Some("k"), "{}")).await;
    problem(third, 502, "outcome-unknown").await;
    assert_eq!(counter.get(), 1);
}
