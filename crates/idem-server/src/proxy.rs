//! The upstream: a pooled HTTP/1 client that forwards each request to the one upstream,
//! as the inner service of the idempotency layer.
//!
//! What the layer needs to know from it is whether a failed request may have taken effect:
//!
//! | failure | returned as | the layer |
//! |---|---|---|
//! | connecting failed (refused, unreachable, connect timeout) | a plain error: not sent | releases the claim (a retry executes) |
//! | no response headers within `upstream_timeout` | [`Ambiguous`] `Timeout` | stores `outcome-unknown` (`504`) by default |
//! | the connection failed after the request was sent | [`Ambiguous`] `ConnectionLost` | stores `outcome-unknown` (`502`) by default |
//! | the response body stalls past `upstream_timeout` or breaks | a body error | treats the answer as interrupted (`outcome-unknown`) |
//!
//! Requests are forwarded with hop-by-hop headers removed, `Host` set to the upstream's,
//! `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host` added, and the
//! idempotency key header kept (unless `forward_key = false`). Bodies are streamed.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idem_core::BoxError;
use idem_tower::{Ambiguous, AmbiguousKind, ClaimInfo};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::metrics::{Metrics, UpstreamResult};

/// The body sent upstream.
pub type UpstreamRequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// The client connection's address, inserted into request extensions by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The upstream service. Cloning shares the connection pool.
#[derive(Clone)]
pub struct Upstream {
    shared: Arc<Shared>,
}

struct Shared {
    client: Client<HttpConnector, UpstreamRequestBody>,
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    prefix: String,
    timeout: Duration,
    /// The key header, when it must be removed before forwarding.
    strip_key: Option<HeaderName>,
    metrics: Metrics,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("authority", &self.shared.authority)
            .field("prefix", &self.shared.prefix)
            .finish_non_exhaustive()
    }
}

/// How to reach the upstream.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// `http://host:port`, optionally with a path prefix every request path is appended to.
    pub url: Uri,
    /// How long the upstream has to answer, body included.
    pub timeout: Duration,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// The idempotency key header.
    pub key_header: HeaderName,
    /// Whether the key header is forwarded.
    pub forward_key: bool,
}

impl Upstream {
    /// A client for the upstream at `options.url`.
    pub fn new(options: UpstreamOptions, metrics: Metrics) -> Result<Self, BoxError> {
        let parts = options.url.clone().into_parts();
        let scheme = parts.scheme.unwrap_or(Scheme::HTTP);
        let authority = parts.authority.ok_or("the upstream URL has no host")?;
        let host = HeaderValue::from_str(authority.as_str())?;
        let prefix = parts
            .path_and_query
            .map(|p| p.path().trim_end_matches('/').to_string())
            .unwrap_or_default();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(options.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                scheme,
                authority,
                host,
                prefix,
                timeout: options.timeout,
                strip_key: (!options.forward_key).then_some(options.key_header),
                metrics,
            }),
        })
    }

    fn upstream_uri(&self, uri: &Uri) -> Result<Uri, BoxError> {
        let path_and_query = uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let joined = format!("{}{}", self.shared.prefix, path_and_query);
        Ok(Uri::builder()
            .scheme(self.shared.scheme.clone())
            .authority(self.shared.authority.clone())
            .path_and_query(joined)
            .build()?)
    }

    fn prepare<B>(&self, request: Request<B>) -> Result<Request<UpstreamRequestBody>, BoxError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = request.into_parts();
        parts.uri = self.upstream_uri(&parts.uri)?;
        parts.version = http::Version::HTTP_11;
        let original_host = parts.headers.get(HOST).cloned();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(key) = &self.shared.strip_key {
            parts.headers.remove(key);
        }
        parts.headers.insert(HOST, self.shared.host.clone());
        if let Some(ClientAddr(addr)) = parts.extensions.get::<ClientAddr>() {
            let ip = addr.ip().to_string();
            let forwarded = match parts.headers.get(&X_FORWARDED_FOR) {
                Some(previous) => format!("{}, {ip}", previous.to_str().unwrap_or_default()),
                None => ip,
            };
            if let Ok(value) = HeaderValue::from_str(&forwarded) {
                parts.headers.insert(X_FORWARDED_FOR, value);
            }
        }
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        if let Some(host) = original_host {
            parts.headers.insert(X_FORWARDED_HOST, host);
        }
        let body = body.map_err(Into::into).boxed_unsync();
        Ok(Request::from_parts(parts, body))
    }
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1, and every header `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
    ] {
        headers.remove(name);
    }
}

type UpstreamFuture =
    Pin<Box<dyn Future<Output = Result<Response<UpstreamBody>, BoxError>> + Send>>;

impl<B> Service<Request<B>> for Upstream
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<UpstreamBody>;
    type Error = BoxError;
    type Future = UpstreamFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let claimed = request.extensions().get::<ClaimInfo>().is_some();
            let request = this.prepare(request)?;
            let shared = &this.shared;
            let _in_flight = claimed.then(|| shared.metrics.in_flight());
            let deadline = Instant::now() + shared.timeout;
            let answer = tokio::time::timeout_at(deadline, shared.client.request(request)).await;
            let result = match answer {
                Err(_elapsed) => {
                    shared.metrics.upstream(UpstreamResult::Timeout);
                    return Err(Ambiguous::with_source(
                        AmbiguousKind::Timeout,
                        format!(
                            "the upstream did not answer within {}",
                            humantime::format_duration(shared.timeout)
                        ),
                    )
                    .into());
                }
                Ok(result) => result,
            };
            match result {
                Ok(response) => {
                    shared.metrics.upstream(UpstreamResult::Ok);
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    Ok(Response::from_parts(
                        parts,
                        UpstreamBody::new(body, deadline),
                    ))
                }
                Err(error) if error.is_connect() => {
                    shared.metrics.upstream(UpstreamResult::ConnectError);
                    Err(BoxError::from(error))
                }
                Err(error) => {
                    shared.metrics.upstream(UpstreamResult::ConnectionLost);
                    Err(Ambiguous::with_source(AmbiguousKind::ConnectionLost, error).into())
                }
            }
        })
    }
}

/// The upstream's answer took longer than `upstream_timeout` to arrive in full.
#[derive(Debug, thiserror::Error)]
#[error("the upstream's response body did not finish within the upstream timeout")]
pub struct BodyTimeout;

pin_project! {
    /// An upstream response body that fails if it has not finished by the request's
    /// deadline: a stalled upstream cannot hold a claim (and a connection) forever.
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        #[pin]
        deadline: Sleep,
    }
}

impl UpstreamBody {
    fn new(inner: Incoming, deadline: Instant) -> Self {
        Self {
            inner,
            deadline: tokio::time::sleep_until(deadline),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(BoxError::from))),
            Poll::Pending => match this.deadline.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout.into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "close, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("idempotency-key", "k"),
            ("content-type", "application/json"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "idempotency-key"]);
    }
}
