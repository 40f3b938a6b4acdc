//! The HTTP idempotency contract of idem as a [tower] layer: a client that retries a
//! mutation with the same `Idempotency-Key` gets the original answer back, and the
//! operation runs once.
//!
//! [`IdempotencyLayer`] wraps any `http::Request` → `http::Response` service (an axum
//! router, a hyper service, a reverse proxy's upstream client) over any
//! [`idem_core::Store`]. Which requests it deduplicates, and how, is a [`Policy`] per route
//! of a [`Routes`] table.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use idem_core::{MemoryStore, Store};
//! use idem_tower::{IdempotencyLayer, KeyRequirement, Policy, RequestBody, Routes};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
//! let routes = Routes::new()
//!     .route("/v1/charges", Policy::new().with_key(KeyRequirement::Required))?;
//! let layer = IdempotencyLayer::new(store, b"principal secret from configuration").with_routes(routes);
//!
//! let charges = Arc::new(std::sync::atomic::AtomicU32::new(0));
//! let counter = charges.clone();
//! let service = ServiceBuilder::new().layer(layer).service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
//!     let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
//!     async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("charge {n}"))))) }
//! });
//!
//! let charge = || {
//!     Request::post("/v1/charges")
//!         .header("idempotency-key", "\"order-42\"")
//!         .header("authorization", "Bearer alice")
//!         .body(Full::new(Bytes::from_static(br#"{"amount":100}"#)))
//!         .unwrap()
//! };
//! let first = service.clone().oneshot(charge()).await?;
//! assert_eq!(first.headers()["idempotent-replayed"], "false");
//! let retry = service.clone().oneshot(charge()).await?;
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(retry.into_body().collect().await?.to_bytes(), "charge 1");
//! assert_eq!(charges.load(std::sync::atomic::Ordering::SeqCst), 1);
//!
//! // No key on a route that requires one: 400, and nothing runs.
//! let unkeyed = Request::post("/v1/charges").body(Full::new(Bytes::new())).unwrap();
//! assert_eq!(service.clone().oneshot(unkeyed).await?.status(), 400);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # The contract
//!
//! | situation | answer | inner service called? |
//! |---|---|---|
//! | first request | the inner answer, `Idempotent-Replayed: false` | once |
//! | retry after completion, same fingerprint | the stored status, headers and body, `Idempotent-Replayed: true` | no |
//! | retry while the first runs | `409` `in-flight` + `Retry-After`; or, when the route ([`OnInFlight::Wait`]) or the client (`Prefer: wait=N`, capped by `max_wait`) asks, a wait for the first to settle, then its replay | no |
//! | same key, different fingerprint | `422` `fingerprint-mismatch` | no |
//! | key missing on a `required` route; two key headers, empty, longer than 255 characters, a byte outside visible ASCII | `400` `key-missing` / `key-invalid` | no |
//! | key missing on an `optional` route, `ignored` route, no route matches | passed through untouched | yes, without deduplication |
//! | request body over `max_request_body` (by `Content-Length` or while reading) | `413` `body-too-large` | no |
//! | store error | `503` `store-unavailable` + `Retry-After`; with [`FailMode::Open`], passed through without deduplication | no (fail closed) |
//! | the store reports the record corrupt ([`idem_core::Error::Corrupt`]: it fails authentication, say), or the stored answer does not decode | `500` `stored-response-unreadable`, whatever the fail mode | no |
//! | keyed request without a principal on a route with [`Anonymous::Reject`] | `400` `principal-missing` | no |
//!
//! Errors are `application/problem+json` documents ([`Problem`]) with a stable `type` URI
//! per [`ProblemType`].
//!
//! **Record scope.** (namespace, principal, method, route *pattern*, key); the principal is
//! the route's `principal_header` (`Authorization`) hashed with the layer's secret, so one
//! key from two tenants names two records. **Fingerprint.** Method, path and query,
//! content type and body (JSON canonicalised, excluded fields removed), by
//! [`idem_core::Fingerprinter`].
//!
//! # What is stored
//!
//! | the inner service… | class | default | alternative |
//! |---|---|---|---|
//! | answers 2xx, 3xx, 4xx other than 408/425/429 | definitive | stored | — |
//! | answers 408, 425, 429, 503 | retryable | released | — |
//! | answers another 5xx | server error | stored | released ([`Policy::with_server_errors`]) |
//! | returns an error (not sent: connect failed) | retryable | released, error returned | — |
//! | returns an [`Ambiguous`] error (sent, no answer) | ambiguous | `502`/`504` `outcome-unknown` stored | released, error returned ([`Policy::with_ambiguous`]) |
//! | panics | — | released, panic resumed | — |
//! | is cancelled (response future dropped) | — | run to completion on a spawned task and stored | released at once ([`Policy::with_on_cancel`]), for handlers whose cancelled work has no effect |
//!
//! A claim that *takes over* an expired lease ([`idem_core::ClaimOutcome::TookOver`]) means
//! an earlier attempt started and never finished: it may have taken effect. By default the
//! layer treats it as ambiguous: it completes the record with an `outcome-unknown` problem
//! (`502`) and does not call the inner service; with `ambiguous = release` it executes the
//! request again ([`ClaimInfo::took_over`] tells the inner service).
//!
//! Responses are stored in a small versioned binary format ([`stored`]): status, headers
//! without `Set-Cookie` and hop-by-hop headers, body. A response whose body exceeds
//! `max_stored_response` reaches its first caller intact (streamed on after the part read);
//! the record is completed with a marker instead, and retries get `500`
//! `response-too-large-to-replay` with the original status in `original_status`, never a
//! second execution.
//!
//! While the inner service runs, the layer renews the lease every half lease. If a renewal
//! finds the lease lost (taken over after it passed), the answer still reaches the caller
//! but is not stored.
//!
//! # Observability
//!
//! [`IdempotencyEvents`] receives every outcome ([`Event`]) and every store latency;
//! [`tracing`] logs at `debug` (flow), `warn` (store failures, lost leases) and `error`
//! (unreadable stored responses). Keys and bodies are never logged.
//!
//! # Features
//!
//! This crate has no optional features.
//!
//! [tower]: https://docs.rs/tower

mod body;
mod events;
mod extract;
mod flow;
mod future;
mod layer;
mod outcome;
mod policy;
mod problem;
mod routes;
mod service;
pub mod stored;

pub use body::{RequestBody, ResponseBody};
pub use events::{Event, IdempotencyEvents, ReleaseReason, StoreOp};
pub use extract::{HeaderKey, HeaderPrincipal, IDEMPOTENCY_KEY, KeyExtractor, PrincipalExtractor};
pub use flow::{ClaimInfo, IDEMPOTENT_REPLAYED};
pub use future::ResponseFuture;
pub use layer::{DEFAULT_STORE_TIMEOUT, IdempotencyLayer};
pub use outcome::{Ambiguous, AmbiguousKind, ResponseClass};
pub use policy::{
    Anonymous, Disposition, FailMode, KeyRequirement, OnCancel, OnInFlight, Policy, PolicyError,
};
pub use problem::{PROBLEM_JSON, Problem, ProblemType};
pub use routes::{Route, RouteError, Routes, scope_name};
pub use service::Idempotency;
