//! The layer's answers to a corrupt record and to requests without a principal, and the
//! record hooks late-retry counting is built on.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::{Counter, TestBody, call, charging, memory_store, post, problem, replayed};
use http::Request;
use idem_core::{
    ClaimOutcome, ClaimRequest, Error, FencingToken, MemoryStore, Record, RecordId, Store,
    Timestamp,
};
use idem_tower::{
    Anonymous, Event, FailMode, IdempotencyEvents, IdempotencyLayer, KeyRequirement, Policy, Routes,
};

/// A store whose completed records all fail to read back, as an encrypted record that
/// fails authentication does.
#[derive(Debug)]
struct CorruptReads(Arc<MemoryStore>);

#[async_trait]
impl Store for CorruptReads {
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Error> {
        match self.0.claim(request).await? {
            ClaimOutcome::Completed(_) => Err(Error::corrupt("fails authentication")),
            other => Ok(other),
        }
    }
    async fn complete(
        &self,
        id: &RecordId,
        token: FencingToken,
        response: Bytes,
    ) -> Result<(), Error> {
        self.0.complete(id, token, response).await
    }
    async fn release(&self, id: &RecordId, token: FencingToken) -> Result<(), Error> {
        self.0.release(id, token).await
    }
    async fn renew(
        &self,
        id: &RecordId,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Timestamp, Error> {
        self.0.renew(id, token, lease).await
    }
    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        self.0.get(id).await
    }
    async fn claim_batch(&self, requests: &[ClaimRequest]) -> Result<Vec<ClaimOutcome>, Error> {
        self.0.claim_batch(requests).await
    }
    async fn purge_expired(&self, limit: usize) -> Result<usize, Error> {
        self.0.purge_expired(limit).await
    }
    async fn now(&self) -> Result<Timestamp, Error> {
        self.0.now().await
    }
}

#[derive(Default)]
struct Hooks {
    events: Mutex<Vec<Event>>,
    acquired: Mutex<Vec<RecordId>>,
    completed: Mutex<Vec<(RecordId, Duration)>>,
}

impl IdempotencyEvents for Hooks {
    fn event(&self, _route: &str, event: Event) {
        self.events.lock().unwrap().push(event);
    }
    fn acquired(&self, _route: &str, id: &RecordId) {
        self.acquired.lock().unwrap().push(*id);
    }
    fn completed(&self, _route: &str, id: &RecordId, retention: Duration) {
        self.completed.lock().unwrap().push((*id, retention));
    }
}

#[tokio::test]
async fn a_corrupt_record_is_answered_500_never_replayed_nor_executed_even_failing_open() {
    for fail in [FailMode::Closed, FailMode::Open] {
        let (memory, _clock) = memory_store();
        let hooks = Arc::new(Hooks::default());
        let layer = IdempotencyLayer::new(Arc::new(CorruptReads(memory)), common::SECRET)
            .with_routes(
                Routes::new()
                    .route("/charges", Policy::new().with_fail(fail))
                    .unwrap(),
            )
            .with_events(hooks.clone());
        let counter = Counter::default();
        let service = charging(&layer, &counter);
        let first = call(&service, post("/charges", Some("k"), "{}")).await;
        assert_eq!(replayed(&first), Some("false"));
        for _ in 0..2 {
            let retry = call(&service, post("/charges", Some("k"), "{}")).await;
            problem(retry, 500, "stored-response-unreadable").await;
        }
        assert_eq!(counter.get(), 1, "{fail:?}: executed once");
        let events = hooks.events.lock().unwrap().clone();
        assert_eq!(
            events
                .iter()
                .filter(|e| **e == Event::StoredResponseUnreadable)
                .count(),
            2
        );
        assert!(!events.contains(&Event::FailedOpen), "{events:?}");
    }
}

fn anonymous(path: &str, key: &str) -> Request<TestBody> {
    let mut request = post(path, Some(key), "{}");
    request.headers_mut().remove("authorization");
    request
}

#[tokio::test]
async fn requests_without_a_principal_share_a_scope_or_are_rejected_per_route() {
    let (memory, _clock) = memory_store();
    let layer = IdempotencyLayer::new(memory, common::SECRET).with_routes(
        Routes::new()
            .route("/shared", Policy::new())
            .unwrap()
            .route(
                "/strict",
                Policy::new()
                    .with_anonymous(Anonymous::Reject)
                    .with_key(KeyRequirement::Optional),
            )
            .unwrap(),
    );
    let counter = Counter::default();
    let service = charging(&layer, &counter);
    assert_eq!(
        replayed(&call(&service, anonymous("/shared", "k")).await),
        Some("false")
    );
    assert_eq!(
        replayed(&call(&service, anonymous("/shared", "k")).await),
        Some("true")
    );
    // Alice's request with the same key is hers, not the anonymous one's.
    assert_eq!(
        replayed(&call(&service, post("/shared", Some("k"), "{}")).await),
        Some("false")
    );
    assert_eq!(counter.get(), 2);
    problem(
        call(&service, anonymous("/strict", "k")).await,
        400,
        "principal-missing",
    )
    .await;
    assert_eq!(counter.get(), 2);
    // Without a key nothing is deduplicated, so nothing is refused either.
    let mut unkeyed = post("/strict", None, "{}");
    unkeyed.headers_mut().remove("authorization");
    assert_eq!(call(&service, unkeyed).await.status(), 201);
    assert_eq!(counter.get(), 3);
}

#[tokio::test]
async fn acquired_and_completed_hooks_name_the_record_and_its_retention() {
    let (memory, _clock) = memory_store();
    let hooks = Arc::new(Hooks::default());
    let retention = Duration::from_secs(3600);
    let layer = IdempotencyLayer::new(memory, common::SECRET)
        .with_routes(
            Routes::new()
                .route("/charges", Policy::new().with_retention(retention))
                .unwrap(),
        )
        .with_events(hooks.clone());
    let counter = Counter::default();
    let service = charging(&layer, &counter);
    call(&service, post("/charges", Some("k"), "{}")).await;
    call(&service, post("/charges", Some("k"), "{}")).await;
    let acquired = hooks.acquired.lock().unwrap().clone();
    let completed = hooks.completed.lock().unwrap().clone();
    assert_eq!(acquired.len(), 1, "the replay acquires nothing");
    assert_eq!(completed, [(acquired[0], retention)]);
}
