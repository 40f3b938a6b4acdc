//! Shared test harness: a counting inner service, request builders, a store decorator
//! that counts and injects failures, and an event recorder.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use idem_core::{
    BoxError, ClaimOutcome, ClaimRequest, Error, FencingToken, Inspect, ManualClock, MemoryStore,
    Record, RecordId, Store, Timestamp, WaitForCompletion,
};
use idem_tower::{
    Event, Idempotency, IdempotencyEvents, IdempotencyLayer, RequestBody, ResponseBody, StoreOp,
};
use serde_json::Value;
use tokio::sync::Notify;
use tower::util::ServiceFn;
use tower::{Service, ServiceExt};

/// The body type of the test requests and inner responses.
pub type TestBody = BoxBody<Bytes, BoxError>;
/// What the inner service receives.
pub type InnerRequest = Request<RequestBody<TestBody>>;
/// What the inner service answers.
pub type InnerResponse = Response<TestBody>;
/// What the layered service answers.
pub type Answer = Response<ResponseBody<TestBody>>;

pub const SECRET: &[u8] = b"test secret";

pub fn body(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A body delivered in several chunks, without a size hint.
pub fn chunked(chunks: Vec<Bytes>) -> TestBody {
    let frames = chunks
        .into_iter()
        .map(|c| Ok::<_, BoxError>(http_body::Frame::data(c)));
    http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

pub fn response(status: u16, bytes: impl Into<Bytes>) -> InnerResponse {
    let mut response = Response::new(body(bytes));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
}

/// A POST with a JSON body, the principal `Bearer alice` and, if given, a key.
pub fn post(path: &str, key: Option<&str>, json: &str) -> Request<TestBody> {
    request("POST", path, key, json)
}

pub fn request(method: &str, path: &str, key: Option<&str>, json: &str) -> Request<TestBody> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .header("authorization", "Bearer alice");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(body(json.to_owned())).unwrap()
}

pub async fn bytes_of<B>(response: Response<B>) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    response.into_body().collect().await.unwrap().to_bytes()
}

pub async fn collect<B>(body: B) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    body.collect().await.unwrap().to_bytes()
}

pub fn replayed(response: &Answer) -> Option<&str> {
    response
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap())
}

/// Checks a problem answer and returns its document.
pub async fn problem(response: Answer, status: u16, slug: &str) -> Value {
    assert_eq!(response.status(), status, "status of the {slug} problem");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let json: Value = serde_json::from_slice(&bytes_of(response).await).unwrap();
    assert_eq!(json["type"], format!("https://idem.dev/problems/{slug}"));
    assert_eq!(json["status"].as_u64(), Some(u64::from(status)));
    assert!(json["detail"].as_str().is_some_and(|d| !d.is_empty()));
    json
}

/// A memory store on a manual clock.
pub fn memory_store() -> (Arc<MemoryStore>, ManualClock) {
    let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    (
        Arc::new(MemoryStore::with_clock(Arc::new(clock.clone()))),
        clock,
    )
}

/// Counts inner executions.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The layered service around a closure-based inner service.
pub fn service<F, Fut>(layer: &IdempotencyLayer, f: F) -> Idempotency<ServiceFn<F>>
where
    F: FnMut(InnerRequest) -> Fut,
    Fut: Future<Output = Result<InnerResponse, BoxError>>,
{
    Idempotency::new(tower::service_fn(f), layer)
}

/// An inner service that counts its executions and answers `201` with
/// `charge <n>` (n = the execution number).
pub fn charging(
    layer: &IdempotencyLayer,
    counter: &Counter,
) -> impl Service<Request<TestBody>, Response = Answer, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    let counter = counter.clone();
    service(layer, move |_request: InnerRequest| {
        let n = counter.bump();
        async move { Ok(response(201, format!("charge {n}"))) }
    })
}

pub async fn call<S>(service: &S, request: Request<TestBody>) -> Answer
where
    S: Service<Request<TestBody>, Response = Answer, Error = BoxError> + Clone,
{
    service.clone().oneshot(request).await.unwrap()
}

/// A gate an inner service waits at, and a signal that it got there.
#[derive(Clone, Default)]
pub struct Gate {
    arrived: Arc<Notify>,
    open: Arc<Notify>,
    is_open: Arc<AtomicBool>,
}

impl Gate {
    /// Called by the inner service: signals arrival, then waits for the gate to open.
    pub async fn pass(&self) {
        let opened = self.open.notified();
        self.arrived.notify_one();
        if !self.is_open.load(Ordering::SeqCst) {
            opened.await;
        }
    }

    /// Waits until an inner service arrived at the gate.
    pub async fn arrival(&self) {
        self.arrived.notified().await;
    }

    pub fn open(&self) {
        self.is_open.store(true, Ordering::SeqCst);
        self.open.notify_waiters();
    }
}

/// Records events; `wait_for` resolves once an event was seen.
#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
    latencies: Mutex<Vec<StoreOp>>,
    changed: Notify,
}

impl Recorder {
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    pub fn count(&self, event: Event) -> usize {
        self.events().iter().filter(|e| **e == event).count()
    }

    pub fn latencies(&self) -> Vec<StoreOp> {
        self.latencies.lock().unwrap().clone()
    }

    pub async fn wait_for(&self, event: Event) {
        loop {
            let changed = self.changed.notified();
            if self.events().contains(&event) {
                return;
            }
            changed.await;
        }
    }
}

impl IdempotencyEvents for Recorder {
    fn event(&self, _route: &str, event: Event) {
        self.events.lock().unwrap().push(event);
        self.changed.notify_waiters();
    }

    fn store_latency(&self, op: StoreOp, _elapsed: Duration, _ok: bool) {
        self.latencies.lock().unwrap().push(op);
    }
}

/// A store decorator: counts operations and fails the ones switched to fail.
#[derive(Debug)]
pub struct TestStore {
    pub inner: Arc<MemoryStore>,
    pub fail_claims: AtomicBool,
    pub fail_completes: AtomicBool,
    /// Claims are applied, then never answered (a store that hangs after the write).
    pub hang_claims: AtomicBool,
    /// Completions are never answered, nor applied.
    pub hang_completes: AtomicBool,
    pub hide_waiter: AtomicBool,
    pub claims: AtomicUsize,
    /// Claims that let the store release what they took if they fail
    /// (`ClaimRequest::release_if_lost`).
    pub releasable_claims: AtomicUsize,
    pub completes: AtomicUsize,
    pub releases: AtomicUsize,
    pub renewals: AtomicUsize,
    /// Calls of `now`.
    pub nows: AtomicUsize,
}

impl TestStore {
    pub fn new(inner: Arc<MemoryStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            fail_claims: AtomicBool::new(false),
            fail_completes: AtomicBool::new(false),
            hang_claims: AtomicBool::new(false),
            hang_completes: AtomicBool::new(false),
            hide_waiter: AtomicBool::new(false),
            claims: AtomicUsize::new(0),
            releasable_claims: AtomicUsize::new(0),
            completes: AtomicUsize::new(0),
            releases: AtomicUsize::new(0),
            renewals: AtomicUsize::new(0),
            nows: AtomicUsize::new(0),
        })
    }

    pub fn count(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }
}

fn down() -> Error {
    Error::Unavailable {
        message: "injected outage".into(),
        source: None,
    }
}

#[async_trait]
impl Store for TestStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Error> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        if request.release_if_lost {
            self.releasable_claims.fetch_add(1, Ordering::SeqCst);
        }
        if self.fail_claims.load(Ordering::SeqCst) {
            return Err(down());
        }
        let outcome = self.inner.claim(request).await;
        if self.hang_claims.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        outcome
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: FencingToken,
        response: Bytes,
    ) -> Result<(), Error> {
        self.completes.fetch_add(1, Ordering::SeqCst);
        if self.fail_completes.load(Ordering::SeqCst) {
            return Err(down());
        }
        if self.hang_completes.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.complete(id, token, response).await
    }

    async fn release(&self, id: &RecordId, token: FencingToken) -> Result<(), Error> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        self.inner.release(id, token).await
    }

    async fn renew(
        &self,
        id: &RecordId,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Timestamp, Error> {
        self.renewals.fetch_add(1, Ordering::SeqCst);
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
        self.nows.fetch_add(1, Ordering::SeqCst);
        self.inner.now().await
    }

    fn completion_waiter(&self) -> Option<&dyn WaitForCompletion> {
        if self.hide_waiter.load(Ordering::SeqCst) {
            None
        } else {
            self.inner.completion_waiter()
        }
    }

    fn inspector(&self) -> Option<&dyn Inspect> {
        self.inner.inspector()
    }
}
