//! The gateway: accepts HTTP/1.1 connections, runs each request through the idempotency
//! layer in front of the [`Upstream`], and drains gracefully.
//!
//! [`run`] takes a bound listener and a shutdown future, so tests start a gateway on
//! `127.0.0.1:0` and stop it with their own future.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use idem_core::{BoxError, PrincipalHasher, RecordId, Store};
use idem_tower::{
    Ambiguous, AmbiguousKind, Event, IDEMPOTENT_REPLAYED, Idempotency, IdempotencyEvents,
    IdempotencyLayer, Problem, StoreOp,
};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::{Layer, ServiceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;
use crate::late::ExpiredFilter;
use crate::metrics::Metrics;
use crate::proxy::{ClientAddr, Upstream, UpstreamOptions};
use crate::timeout::IdleTimeout;

/// The body of the gateway's responses.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// The request id header: passed through when the client sends a usable one, generated
/// otherwise; forwarded upstream and returned to the client.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Everything a running gateway needs; cheap to clone.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    service: Idempotency<Upstream>,
    store: Arc<dyn Store>,
    hasher: PrincipalHasher,
    metrics: Metrics,
    shutdown_grace: Duration,
    request_ids: RequestIds,
    limits: Limits,
}

/// What one client connection may ask of the gateway.
#[derive(Clone, Copy, Debug)]
struct Limits {
    header_read_timeout: Duration,
    body_read_timeout: Duration,
    max_headers: usize,
    max_header_bytes: usize,
    max_connections: usize,
}

/// The layer's events: counted in the metrics, and late retries told by the filter of
/// recently expired records.
struct GatewayEvents {
    metrics: Metrics,
    expired: ExpiredFilter,
}

impl IdempotencyEvents for GatewayEvents {
    fn event(&self, route: &str, event: Event) {
        self.metrics.event(route, event);
    }

    fn store_latency(&self, op: StoreOp, elapsed: Duration, ok: bool) {
        self.metrics.store_latency(op, elapsed, ok);
    }

    fn acquired(&self, route: &str, id: &RecordId) {
        if self.expired.expired_recently(id) {
            self.metrics.late_retry(route);
            debug!(route, record = %id, "a retry arrived after its record expired");
        }
    }

    fn completed(&self, _route: &str, id: &RecordId, retention: Duration) {
        self.expired.completed(id, retention);
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("service", &self.inner.service)
            .finish_non_exhaustive()
    }
}

impl App {
    /// A gateway for `config` over `store`, hashing principals with `principal_secret`.
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        principal_secret: &[u8],
    ) -> Result<Self, BoxError> {
        let metrics = Metrics::new();
        let upstream = Upstream::new(
            UpstreamOptions {
                url: config.upstream.clone(),
                timeout: config.upstream_timeout,
                connect_timeout: config.connect_timeout,
                key_header: config.key_header.clone(),
                forward_key: config.forward_key,
            },
            metrics.clone(),
        )?;
        let longest_retention = config
            .routes
            .iter()
            .map(|route| route.policy().retention())
            .max()
            .unwrap_or_default();
        let events = GatewayEvents {
            metrics: metrics.clone(),
            expired: ExpiredFilter::new(config.late_retry_window, longest_retention),
        };
        let layer = IdempotencyLayer::new(store.clone(), principal_secret)
            .with_routes(config.routes.clone())
            .with_key_header(config.key_header.clone())
            .with_store_timeout(Some(config.store_timeout))
            .with_events(Arc::new(events));
        metrics.routes(layer.routes());
        Ok(Self {
            inner: Arc::new(Inner {
                service: layer.layer(upstream),
                store,
                hasher: PrincipalHasher::new(principal_secret),
                metrics,
                shutdown_grace: config.shutdown_grace,
                request_ids: RequestIds::new(),
                limits: Limits {
                    header_read_timeout: config.header_read_timeout,
                    body_read_timeout: config.body_read_timeout,
                    max_headers: config.max_headers,
                    max_header_bytes: config.max_header_bytes,
                    max_connections: config.max_connections,
                },
            }),
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The hasher principals are hashed with (for the admin API's id lookups).
    pub fn hasher(&self) -> &PrincipalHasher {
        &self.inner.hasher
    }
}

/// Serves the gateway on `listener` until `shutdown` resolves, then stops accepting,
/// lets requests in flight finish for up to the configured `shutdown_grace`, and returns.
pub async fn run(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    info!(addr = %local, "gateway listening");
    let graceful = GracefulShutdown::new();
    let limits = app.inner.limits;
    let mut http = http1::Builder::new();
    // Slow or oversized request heads are cut off: a client trickling its headers is
    // disconnected after the timeout, too many or too large headers get 431.
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_header_size(limits.max_header_bytes);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Over the limit: closed at once, so the connections already open keep being
            // served and memory stays bounded.
            app.inner.metrics.connection_rejected();
            debug!(%peer, "too many connections: closing a new one");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let inner = app.inner.clone();
        let service = hyper::service::service_fn(move |request| {
            let inner = inner.clone();
            async move { Ok::<_, Infallible>(handle(inner, request, peer).await) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%peer, %error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let grace = app.inner.shutdown_grace;
    info!(grace = %humantime::format_duration(grace), "gateway shutting down: no new connections, finishing requests in flight");
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => info!("gateway stopped: every request finished"),
        Err(_) => warn!("gateway stopped: the grace period ended with requests still in flight"),
    }
    Ok(())
}

async fn handle(
    inner: Arc<Inner>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<GatewayBody> {
    // A client that stops sending its body is cut off after the body timeout: the layer
    // answers 400 body-unreadable (or a pass-through request fails) and nothing executes.
    let idle = inner.limits.body_read_timeout;
    let mut request = request.map(|body| IdleTimeout::new(body, idle));
    let request_id = inner.request_ids.for_request(request.headers());
    request
        .headers_mut()
        .insert(X_REQUEST_ID, request_id.clone());
    request.extensions_mut().insert(ClientAddr(peer));
    let span = info_span!(
        "request",
        id = request_id.to_str().unwrap_or_default(),
        method = %request.method(),
        path = request.uri().path(),
    );
    async move {
        let start = Instant::now();
        let answer = inner.service.clone().oneshot(request).await;
        let mut response = match answer {
            Ok(response) => response.map(BodyExt::boxed_unsync),
            Err(error) => upstream_failure(&error),
        };
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        // Field values are evaluated only when the line is logged.
        info!(
            status = response.status().as_u16(),
            replayed = response
                .headers()
                .get(IDEMPOTENT_REPLAYED)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
            elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            "request finished"
        );
        response
    }
    .instrument(span)
    .await
}

/// The answer when the upstream call failed and the layer passed the error on: the claim
/// was released (not sent, or `ambiguous = release`), so a retry executes again.
fn upstream_failure(error: &BoxError) -> Response<GatewayBody> {
    let problem = match Ambiguous::find(error).map(Ambiguous::kind) {
        Some(AmbiguousKind::Timeout) => {
            warn!(%error, "the upstream timed out");
            Problem::custom(
                "https://idem.dev/problems/upstream-timeout",
                "Upstream timeout",
                StatusCode::GATEWAY_TIMEOUT,
                "the upstream did not answer in time; the request may or may not have taken effect",
            )
        }
        Some(_) => {
            warn!(%error, "the upstream connection failed after the request was sent");
            Problem::custom(
                "https://idem.dev/problems/upstream-connection-lost",
                "Upstream connection lost",
                StatusCode::BAD_GATEWAY,
                "the connection to the upstream failed after the request was sent; it may or may \
                 not have taken effect",
            )
        }
        None => {
            warn!(error = %error_chain(error.as_ref()), "the upstream cannot be reached");
            Problem::custom(
                "https://idem.dev/problems/upstream-unreachable",
                "Upstream unreachable",
                StatusCode::BAD_GATEWAY,
                "the upstream cannot be reached; the request was not sent, retry it",
            )
            .retry_after(1)
        }
    };
    problem.into_response().map(|body| {
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync()
    })
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Request ids: the client's `X-Request-Id` when it is 1 to 128 visible ASCII characters,
/// otherwise 16 hex digits unique in this process.
struct RequestIds {
    seed: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        Self {
            seed: u64::from_le_bytes(seed),
            counter: AtomicU64::new(0),
        }
    }

    fn for_request(&self, headers: &HeaderMap) -> HeaderValue {
        let given = headers.get(X_REQUEST_ID).filter(|v| {
            let bytes = v.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= 128
                && bytes.iter().all(|b| (0x21..=0x7e).contains(b))
        });
        if let Some(value) = given {
            return value.clone();
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:016x}", splitmix64(self.seed.wrapping_add(n)));
        HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}

/// A bijective mix, so consecutive counters give unrelated-looking ids.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_or_generated() {
        let ids = RequestIds::new();
        let mut headers = HeaderMap::new();
        let a = ids.for_request(&headers);
        let b = ids.for_request(&headers);
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(ids.for_request(&headers), "abc-123");
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(ids.for_request(&headers), "has space");
    }
}
