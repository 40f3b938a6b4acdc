//! What the middleware does with one request: the HTTP contract, step by step.

use std::future::Future;
use std::panic::{AssertUnwindSafe, resume_unwind};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{
    CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, SET_COOKIE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use idem_core::{
    BoxError, ClaimOutcome, ClaimRequest, Completion, Error as StoreError, FencingToken, Lease,
    PrincipalHash, RecordId, Scope,
};
use tokio::time::{Instant, MissedTickBehavior};
use tower_service::Service;
use tracing::{debug, error, warn};

use crate::body::{RequestBody, ResponseBody};
use crate::events::{Event, ReleaseReason, StoreOp};
use crate::layer::Shared;
use crate::outcome::{Ambiguous, AmbiguousKind, ResponseClass};
use crate::policy::{
    Anonymous, Disposition, FailMode, KeyRequirement, OnCancel, OnInFlight, Policy,
};
use crate::problem::{Problem, ProblemType};
use crate::stored::{NotStored, StoredOutcome, StoredResponse};

/// The response header that tells a first answer (`false`) from a replay (`true`).
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The RFC 7240 header a client asks to wait with (`Prefer: wait=5`).
const PREFER: HeaderName = HeaderName::from_static("prefer");

/// How many times one request re-claims after being woken (by a settlement, or when the
/// lease it waits on ends), before it gives up with `409` (a guard against a store whose
/// waiter wakes without the record settling).
const MAX_WAKE_UPS: usize = 64;

/// How long after the end of a lease in flight, by the store's clock, a waiting request
/// claims again: the store decides on its own clock, which the gateway's timer only
/// approximates.
const LEASE_END_MARGIN: Duration = Duration::from_millis(10);

/// The claim a request executes under, in the inner service's request extensions.
///
/// The fencing token lets the application fence its own writes: a write tagged with an
/// older token than the newest one seen for the record is from a holder whose lease was
/// taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClaimInfo {
    /// The record.
    pub record_id: RecordId,
    /// This execution's fencing token.
    pub token: FencingToken,
    /// Whether the claim took over an expired lease of an earlier attempt (only on routes
    /// with `ambiguous = release`: elsewhere such a request is not executed).
    pub took_over: bool,
}

type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

/// Everything about the request's route, shared with the claim guard.
#[derive(Clone)]
struct Ctx {
    shared: Arc<Shared>,
    route: Arc<str>,
    policy: Arc<Policy>,
}

impl Ctx {
    fn event(&self, event: Event) {
        self.shared.events.event(&self.route, event);
    }

    async fn timed<T>(
        &self,
        op: StoreOp,
        operation: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = std::time::Instant::now();
        let result = match self.shared.store_timeout {
            Some(limit) => tokio::time::timeout(limit, operation)
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Unavailable {
                        message: format!(
                            "the store did not answer a {} within {limit:?}; its outcome is unknown",
                            op.as_str()
                        ),
                        source: None,
                    })
                }),
            None => operation.await,
        };
        self.shared
            .events
            .store_latency(op, start.elapsed(), result.is_ok());
        result
    }
}

pub(crate) async fn handle<S, ReqB, ResB>(
    shared: Arc<Shared>,
    inner: S,
    request: Request<ReqB>,
) -> Answer<ResB, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
{
    let Some(route) = shared.routes.find(request.method(), request.uri().path()) else {
        return pass_through(inner, request).await;
    };
    let ctx = Ctx {
        route: route.pattern_arc().clone(),
        policy: route.policy_arc().clone(),
        shared: shared.clone(),
    };
    if ctx.policy.key() == KeyRequirement::Ignored {
        ctx.event(Event::PassedThrough);
        return pass_through(inner, request).await;
    }

    let (parts, body) = request.into_parts();
    let key = match shared.key_extractor.extract(&parts) {
        Ok(Some(key)) => key,
        Ok(None) if ctx.policy.key() == KeyRequirement::Required => {
            ctx.event(Event::KeyMissing);
            return Ok(problem(Problem::new(
                ProblemType::KeyMissing,
                "this endpoint requires an idempotency key",
            )));
        }
        Ok(None) => {
            ctx.event(Event::PassedThrough);
            return pass_through(inner, Request::from_parts(parts, body)).await;
        }
        Err(reason) => {
            ctx.event(Event::KeyRejected);
            return Ok(problem(Problem::new(
                ProblemType::KeyInvalid,
                format!("the idempotency key is invalid: {reason}"),
            )));
        }
    };

    let limit = ctx.policy.max_request_body();
    let body = match read_body(&parts.headers, body, limit).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            ctx.event(Event::BodyTooLarge);
            return Ok(problem(
                Problem::new(
                    ProblemType::BodyTooLarge,
                    format!(
                        "the request body is larger than this endpoint's limit of {limit} bytes"
                    ),
                )
                .with_extension("max_body_bytes", limit as u64),
            ));
        }
        Err(BodyError::Unreadable(reason)) => {
            debug!(route = %ctx.route, error = %reason, "request body unreadable");
            return Ok(problem(Problem::new(
                ProblemType::BodyUnreadable,
                "the request body could not be read",
            )));
        }
    };

    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let fingerprint = ctx.policy.fingerprinter().fingerprint(
        parts.method.as_str(),
        path_and_query,
        content_type,
        &body,
    );
    let principal = match shared.principal_extractor.principal(&parts, &ctx.policy) {
        Some(raw) => shared.hasher.hash(&raw),
        None if ctx.policy.anonymous() == Anonymous::Reject => {
            ctx.event(Event::PrincipalMissing);
            return Ok(problem(Problem::new(
                ProblemType::PrincipalMissing,
                format!(
                    "this endpoint deduplicates requests per principal and the request has no \
                     {} header",
                    ctx.policy.principal_header()
                ),
            )));
        }
        None => PrincipalHash::ANONYMOUS,
    };
    let scope_route = match ctx.policy.scope() {
        Some(scope) => std::borrow::Cow::Borrowed(scope),
        None => crate::routes::scope_name(&ctx.route, parts.uri.path()),
    };
    let id = Scope::new(
        ctx.policy.namespace(),
        principal,
        parts.method.as_str(),
        &scope_route,
        &key,
    )
    .record_id();
    // A route that fails open forwards a request whose claim failed: what the claim may
    // have taken must then stay held, or a retry would execute again.
    let claim = ClaimRequest::new(id, fingerprint)
        .with_lease(ctx.policy.lease())
        .with_retention(ctx.policy.retention())
        .with_release_if_lost(!matches!(ctx.policy.fail(), FailMode::Open));

    let deadline = wait_budget(&parts.headers, &ctx.policy).map(|budget| Instant::now() + budget);
    let mut waited = false;
    let mut wake_ups = 0;
    let outcome = loop {
        let outcome = match ctx.timed(StoreOp::Claim, shared.store.claim(&claim)).await {
            Ok(outcome) => outcome,
            // The record exists and cannot be read back (it fails authentication, say): it
            // may hold the answer of an execution, so it is neither replayed nor executed
            // again, whatever the route's fail mode.
            Err(error @ StoreError::Corrupt { .. }) => {
                ctx.event(Event::StoredResponseUnreadable);
                error!(route = %ctx.route, record = %id, %error, "a stored record is corrupt");
                return Ok(unreadable_record());
            }
            Err(error) => {
                return store_failure::<S, ReqB, ResB>(&ctx, error, inner, parts, body).await;
            }
        };
        let ClaimOutcome::InFlight { lease_until, now } = outcome else {
            break outcome;
        };
        if let (Some(deadline), Some(waiter)) = (deadline, shared.store.completion_waiter()) {
            if Instant::now() < deadline && wake_ups < MAX_WAKE_UPS {
                if !waited {
                    waited = true;
                    ctx.event(Event::Waited);
                }
                wake_ups += 1;
                // A holder that died never settles the record: wake when its lease ends
                // (on the store's clock) and claim again, which takes the record over.
                let wake =
                    (Instant::now() + now.until(lease_until) + LEASE_END_MARGIN).min(deadline);
                debug!(route = %ctx.route, record = %id, "waiting for the request in flight");
                match tokio::time::timeout_at(wake, waiter.wait_settled(&id)).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(error)) => {
                        ctx.event(Event::StoreError);
                        warn!(route = %ctx.route, %error, "waiting for a request in flight failed");
                    }
                    // The lease has ended without a settlement.
                    Err(_elapsed) if wake < deadline => continue,
                    Err(_elapsed) => {}
                }
            }
        }
        return Ok(in_flight(&ctx, lease_until, now));
    };

    match outcome {
        ClaimOutcome::Acquired(lease) => {
            shared.events.acquired(&ctx.route, &id);
            execute::<S, ReqB, ResB>(ctx, inner, parts, body, lease, false).await
        }
        ClaimOutcome::TookOver {
            lease,
            previous_token,
            ..
        } => {
            ctx.event(Event::TookOver);
            warn!(
                route = %ctx.route,
                record = %id,
                previous = %previous_token,
                "took over the expired lease of an earlier attempt"
            );
            match ctx.policy.ambiguous() {
                Disposition::Release => {
                    execute::<S, ReqB, ResB>(ctx, inner, parts, body, lease, true).await
                }
                Disposition::Store => {
                    let mut guard = ClaimGuard::new(ctx.clone(), lease);
                    Ok(store_unknown(
                        &ctx,
                        &mut guard,
                        AmbiguousKind::LeaseExpired,
                        "an earlier attempt with this idempotency key did not finish before its \
                         lease ended; it may or may not have taken effect, so it is not executed again",
                    )
                    .await)
                }
            }
        }
        ClaimOutcome::Completed(completion) => Ok(replay(&ctx, &completion)),
        ClaimOutcome::Mismatch => {
            ctx.event(Event::Mismatch);
            Ok(problem(Problem::new(
                ProblemType::FingerprintMismatch,
                "this idempotency key was already used with a different request",
            )))
        }
        ClaimOutcome::InFlight { lease_until, now } => Ok(in_flight(&ctx, lease_until, now)),
        other => {
            let error = StoreError::Backend {
                message: format!("unexpected claim outcome {other:?}"),
                source: None,
            };
            store_failure::<S, ReqB, ResB>(&ctx, error, inner, parts, body).await
        }
    }
}

async fn pass_through<S, ReqB, ResB>(mut inner: S, request: Request<ReqB>) -> Answer<ResB, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
{
    let response = inner.call(request.map(RequestBody::new)).await?;
    Ok(response.map(ResponseBody::new))
}

fn problem<B>(problem: Problem) -> Response<ResponseBody<B>> {
    problem.into_response().map(ResponseBody::full)
}

fn mark_replayed<B>(mut response: Response<B>, replayed: bool) -> Response<B> {
    let value = HeaderValue::from_static(if replayed { "true" } else { "false" });
    response.headers_mut().insert(IDEMPOTENT_REPLAYED, value);
    response
}

enum BodyError {
    TooLarge,
    Unreadable(BoxError),
}

async fn read_body<B>(headers: &HeaderMap, body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let limit_u64 = limit as u64;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit_u64) || body.size_hint().lower() > limit_u64 {
        return Err(BodyError::TooLarge);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(BodyError::TooLarge)
        }
        Err(error) => Err(BodyError::Unreadable(error)),
    }
}

/// How long this request may wait for a duplicate in flight, if at all.
fn wait_budget(headers: &HeaderMap, policy: &Policy) -> Option<Duration> {
    let budget = match (prefer_wait(headers), policy.in_flight()) {
        (Some(seconds), _) => Duration::from_secs(seconds).min(policy.max_wait()),
        (None, OnInFlight::Wait) => policy.max_wait(),
        (None, OnInFlight::Conflict) => return None,
    };
    (!budget.is_zero()).then_some(budget)
}

/// The `wait` preference of RFC 7240 (`Prefer: respond-async, wait=10`).
fn prefer_wait(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all(PREFER)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|preference| {
            let token = preference.split(';').next()?.trim();
            let (name, value) = token.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("wait") {
                return None;
            }
            value.trim().trim_matches('"').parse().ok()
        })
}

/// `409`, with `Retry-After` the seconds the lease has left on the store's clock.
fn in_flight<B>(
    ctx: &Ctx,
    lease_until: idem_core::Timestamp,
    now: idem_core::Timestamp,
) -> Response<ResponseBody<B>> {
    ctx.event(Event::InFlightConflict);
    let seconds = now.until(lease_until).as_millis().div_ceil(1000);
    let seconds = u64::try_from(seconds).unwrap_or(u64::MAX).max(1);
    problem(
        Problem::new(
            ProblemType::InFlight,
            "a request with this idempotency key is still being processed",
        )
        .retry_after(seconds),
    )
}

async fn store_failure<S, ReqB, ResB>(
    ctx: &Ctx,
    error: StoreError,
    mut inner: S,
    parts: Parts,
    body: Bytes,
) -> Answer<ResB, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
{
    ctx.event(Event::StoreError);
    match ctx.policy.fail() {
        FailMode::Open => {
            warn!(route = %ctx.route, %error, "idempotency store failed; forwarding without deduplication");
            ctx.event(Event::FailedOpen);
            let request = Request::from_parts(parts, RequestBody::buffered(body));
            let response = inner.call(request).await?;
            Ok(response.map(ResponseBody::new))
        }
        FailMode::Closed => {
            warn!(route = %ctx.route, %error, "idempotency store failed; answering 503");
            let seconds = ctx.shared.store_retry_after.as_secs().max(1);
            Ok(problem(
                Problem::new(
                    ProblemType::StoreUnavailable,
                    "the idempotency store is unavailable; the request was not executed",
                )
                .retry_after(seconds),
            ))
        }
    }
}

fn replay<B>(ctx: &Ctx, completion: &Completion) -> Response<ResponseBody<B>> {
    match StoredOutcome::decode(&completion.response) {
        Ok(StoredOutcome::Response(stored)) => {
            ctx.event(Event::Replayed);
            debug!(route = %ctx.route, status = stored.status.as_u16(), "replaying a stored response");
            let mut response = Response::new(ResponseBody::full(stored.body));
            *response.status_mut() = stored.status;
            *response.headers_mut() = replayable_headers(&stored.headers);
            mark_replayed(response, true)
        }
        Ok(StoredOutcome::NotStored(marker)) => {
            ctx.event(Event::Replayed);
            let response = problem(
                Problem::new(
                    ProblemType::ResponseTooLargeToReplay,
                    format!(
                        "the request with this idempotency key was executed (status {}), but its \
                         response was larger than the {} bytes kept for replays; it is not \
                         executed again",
                        marker.status.as_u16(),
                        marker.limit
                    ),
                )
                .with_extension("original_status", marker.status.as_u16())
                .with_extension("max_stored_bytes", marker.limit),
            );
            mark_replayed(response, true)
        }
        Err(decode_error) => {
            ctx.event(Event::StoredResponseUnreadable);
            error!(route = %ctx.route, error = %decode_error, "a stored response cannot be decoded");
            unreadable_record()
        }
    }
}

fn unreadable_record<B>() -> Response<ResponseBody<B>> {
    problem(Problem::new(
        ProblemType::StoredResponseUnreadable,
        "the stored response for this idempotency key cannot be read; the request is not \
         executed again",
    ))
}

/// Runs the inner service under a held claim, then stores or releases.
async fn execute<S, ReqB, ResB>(
    ctx: Ctx,
    inner: S,
    parts: Parts,
    body: Bytes,
    lease: Lease,
    took_over: bool,
) -> Answer<ResB, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
{
    let detach = ctx.policy.on_cancel() == OnCancel::RunToCompletion;
    let run = run_claimed::<S, ReqB, ResB>(ctx, inner, parts, body, lease, took_over);
    let handle = match tokio::runtime::Handle::try_current() {
        Ok(handle) if detach => handle,
        _ => return run.await,
    };
    // Detached: dropping this future no longer cancels the execution, which settles the
    // claim itself.
    match handle.spawn(run).await {
        Ok(answer) => answer,
        Err(join_error) if join_error.is_panic() => resume_unwind(join_error.into_panic()),
        Err(_cancelled) => Ok(problem(Problem::custom(
            "about:blank",
            "Service Unavailable",
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ))),
    }
}

/// What the inner service's answer means for the record.
enum Finished<B> {
    /// Release the claim and pass the response on.
    Release(Response<B>, ReleaseReason),
    /// Store the response, read in full.
    Store {
        parts: http::response::Parts,
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// The body outgrew the replay limit: store the marker, stream the rest.
    TooLarge {
        parts: http::response::Parts,
        prefix: Bytes,
        rest: Pin<Box<B>>,
    },
    /// The body failed midway: the outcome is unknown.
    Interrupted { class: ResponseClass },
}

async fn run_claimed<S, ReqB, ResB>(
    ctx: Ctx,
    mut inner: S,
    parts: Parts,
    body: Bytes,
    lease: Lease,
    took_over: bool,
) -> Answer<ResB, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    S::Error: 'static,
    ResB: Body<Data = Bytes>,
{
    let mut guard = ClaimGuard::new(ctx.clone(), lease);
    let mut request = Request::from_parts(parts, RequestBody::buffered(body));
    request.extensions_mut().insert(ClaimInfo {
        record_id: lease.id,
        token: lease.token,
        took_over,
    });
    let limit = ctx.policy.max_stored_response();
    let server_errors = ctx.policy.server_errors();
    ctx.event(Event::Executed);
    debug!(route = %ctx.route, record = %lease.id, token = %lease.token, "executing under a claim");

    // A panic in `call`, in the future it returns, or in the response body is caught here,
    // so the claim is released before the panic goes on.
    let work = AssertUnwindSafe(async move {
        let response = inner.call(request).await?;
        Ok(settle(response, limit, server_errors).await)
    })
    .catch_unwind();
    let (result, lease_lost) = with_renewal(&ctx, &lease, work).await;

    let result = match result {
        Ok(result) => result,
        Err(panic) => {
            if lease_lost {
                guard.disarm();
            } else {
                guard.release(ReleaseReason::Panic).await;
            }
            resume_unwind(panic)
        }
    };

    if lease_lost {
        // Another holder took the record over: its outcome stands, this one is not stored.
        guard.disarm();
        return match result {
            Err(error) => Err(error),
            Ok(finished) => Ok(unstored(finished)),
        };
    }

    let finished = match result {
        Ok(finished) => finished,
        Err(error) => {
            if let Some(ambiguous) = Ambiguous::find(&error) {
                let kind = ambiguous.kind();
                if ctx.policy.ambiguous() == Disposition::Store {
                    return Ok(store_unknown(&ctx, &mut guard, kind, unknown_detail(kind)).await);
                }
                guard.release(ReleaseReason::Ambiguous).await;
                return Err(error);
            }
            guard.release(ReleaseReason::InnerError).await;
            return Err(error);
        }
    };

    match finished {
        Finished::Release(response, reason) => {
            guard.release(reason).await;
            Ok(mark_replayed(response.map(ResponseBody::new), false))
        }
        Finished::Store {
            mut parts,
            data,
            trailers,
        } => {
            let stored = StoredOutcome::Response(StoredResponse {
                status: parts.status,
                headers: replayable_headers(&parts.headers),
                body: data.clone(),
            });
            guard.complete(stored.encode()).await;
            parts
                .headers
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("false"));
            Ok(Response::from_parts(
                parts,
                ResponseBody::buffered(data, trailers),
            ))
        }
        Finished::TooLarge {
            mut parts,
            prefix,
            rest,
        } => {
            ctx.event(Event::ResponseTooLarge);
            warn!(
                route = %ctx.route,
                limit,
                "the response is larger than the replay limit; retries will get response-too-large-to-replay"
            );
            let marker = StoredOutcome::NotStored(NotStored {
                status: parts.status,
                limit: limit as u64,
            });
            guard.complete(marker.encode()).await;
            parts
                .headers
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("false"));
            Ok(Response::from_parts(
                parts,
                ResponseBody::prefixed(prefix, rest),
            ))
        }
        Finished::Interrupted { class } => {
            let kind = AmbiguousKind::ResponseInterrupted;
            let release = match class {
                ResponseClass::Retryable => Some(ReleaseReason::RetryableStatus),
                _ if ctx.policy.ambiguous() == Disposition::Release => {
                    Some(ReleaseReason::Ambiguous)
                }
                _ => None,
            };
            match release {
                Some(reason) => {
                    guard.release(reason).await;
                    let (problem, _) = unknown_problem(kind, unknown_detail(kind));
                    Ok(mark_replayed(problem, false))
                }
                None => Ok(store_unknown(&ctx, &mut guard, kind, unknown_detail(kind)).await),
            }
        }
    }
}

/// Reads the inner service's answer as far as needed to decide what to store.
async fn settle<B>(response: Response<B>, limit: usize, server_errors: Disposition) -> Finished<B>
where
    B: Body<Data = Bytes>,
{
    let class = ResponseClass::of(response.status());
    match class {
        ResponseClass::Retryable => {
            return Finished::Release(response, ReleaseReason::RetryableStatus);
        }
        ResponseClass::ServerError if server_errors == Disposition::Release => {
            return Finished::Release(response, ReleaseReason::ServerError);
        }
        _ => {}
    }
    let (parts, body) = response.into_parts();
    let mut body = Box::pin(body);
    let mut data = Collected::default();
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Finished::Interrupted { class };
        };
        match frame.into_data() {
            Ok(chunk) => {
                data.push(chunk);
                if data.len() > limit {
                    return Finished::TooLarge {
                        parts,
                        prefix: data.freeze(),
                        rest: body,
                    };
                }
            }
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(more);
                }
            }
        }
    }
    Finished::Store {
        parts,
        data: data.freeze(),
        trailers,
    }
}

/// A response body read in full: the one chunk as it came (most bodies arrive in one),
/// copied into one buffer only when a second chunk follows.
#[derive(Default)]
enum Collected {
    #[default]
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Collected {
    fn push(&mut self, chunk: Bytes) {
        *self = match std::mem::take(self) {
            Collected::Empty => Collected::One(chunk),
            Collected::One(first) => {
                let mut all = BytesMut::with_capacity(first.len() + chunk.len());
                all.extend_from_slice(&first);
                all.extend_from_slice(&chunk);
                Collected::Many(all)
            }
            Collected::Many(mut all) => {
                all.extend_from_slice(&chunk);
                Collected::Many(all)
            }
        };
    }

    fn len(&self) -> usize {
        match self {
            Collected::Empty => 0,
            Collected::One(one) => one.len(),
            Collected::Many(all) => all.len(),
        }
    }

    fn freeze(self) -> Bytes {
        match self {
            Collected::Empty => Bytes::new(),
            Collected::One(one) => one,
            Collected::Many(all) => all.freeze(),
        }
    }
}

/// The inner service's answer, passed on without storing it (the lease was lost).
fn unstored<B>(finished: Finished<B>) -> Response<ResponseBody<B>> {
    let response = match finished {
        Finished::Release(response, _) => response.map(ResponseBody::new),
        Finished::Store {
            parts,
            data,
            trailers,
        } => Response::from_parts(parts, ResponseBody::buffered(data, trailers)),
        Finished::TooLarge {
            parts,
            prefix,
            rest,
        } => Response::from_parts(parts, ResponseBody::prefixed(prefix, rest)),
        Finished::Interrupted { .. } => {
            let kind = AmbiguousKind::ResponseInterrupted;
            unknown_problem(kind, unknown_detail(kind)).0
        }
    };
    mark_replayed(response, false)
}

fn unknown_detail(kind: AmbiguousKind) -> &'static str {
    match kind {
        AmbiguousKind::Timeout => {
            "the request was sent but no answer came in time; it may or may not have taken \
             effect, so it is not executed again"
        }
        AmbiguousKind::ResponseInterrupted => {
            "the answer to the request was interrupted; it may or may not have taken effect, \
             so it is not executed again"
        }
        _ => {
            "the request was sent but no answer came; it may or may not have taken effect, so \
             it is not executed again"
        }
    }
}

/// The `outcome-unknown` problem, as a response and as its stored form.
fn unknown_problem<B>(kind: AmbiguousKind, detail: &str) -> (Response<ResponseBody<B>>, Bytes) {
    let response = Problem::new(ProblemType::OutcomeUnknown, detail)
        .with_status(kind.status())
        .with_extension("outcome", "unknown")
        .with_extension("reason", kind.as_str())
        .into_response();
    let stored = StoredOutcome::Response(StoredResponse {
        status: response.status(),
        headers: response.headers().clone(),
        body: response.body().clone(),
    })
    .encode();
    (response.map(ResponseBody::full), stored)
}

/// Completes the record with an `outcome-unknown` problem and answers it.
async fn store_unknown<B>(
    ctx: &Ctx,
    guard: &mut ClaimGuard,
    kind: AmbiguousKind,
    detail: &str,
) -> Response<ResponseBody<B>> {
    ctx.event(Event::Ambiguous);
    warn!(route = %ctx.route, reason = kind.as_str(), "storing an unknown outcome");
    let (response, stored) = unknown_problem(kind, detail);
    guard.complete(stored).await;
    mark_replayed(response, false)
}

/// Runs `work`, renewing the lease every half lease while it runs. Returns its output and
/// whether the lease was lost (taken over) meanwhile.
async fn with_renewal<F: Future>(ctx: &Ctx, lease: &Lease, work: F) -> (F::Output, bool) {
    let length = ctx.policy.lease();
    let period = (length / 2).max(Duration::from_millis(1));
    let renewals = async {
        let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let renewed = ctx
                .timed(
                    StoreOp::Renew,
                    ctx.shared.store.renew(&lease.id, lease.token, length),
                )
                .await;
            match renewed {
                Ok(until) => {
                    debug!(route = %ctx.route, record = %lease.id, %until, "lease renewed")
                }
                Err(error) if error.is_lease_lost() => {
                    ctx.event(Event::LeaseLost);
                    warn!(
                        route = %ctx.route,
                        record = %lease.id,
                        token = %lease.token,
                        "the lease was taken over while the request runs; its answer will not be stored"
                    );
                    return;
                }
                Err(error) => {
                    ctx.event(Event::StoreError);
                    warn!(route = %ctx.route, record = %lease.id, %error, "renewing the lease failed");
                }
            }
        }
    };
    let mut work = pin!(work);
    let mut renewals = pin!(renewals);
    tokio::select! {
        output = &mut work => (output, false),
        () = &mut renewals => (work.await, true),
    }
}

/// Settles a held claim on every exit path: completed or released explicitly, or released
/// on a spawned task when dropped while still armed (a cancelled future).
struct ClaimGuard {
    ctx: Ctx,
    lease: Lease,
    armed: bool,
}

impl ClaimGuard {
    fn new(ctx: Ctx, lease: Lease) -> Self {
        Self {
            ctx,
            lease,
            armed: true,
        }
    }

    /// Forgets the claim (it was lost, or must stay until its lease passes).
    fn disarm(&mut self) {
        self.armed = false;
    }

    async fn release(&mut self, reason: ReleaseReason) {
        let store = &self.ctx.shared.store;
        let released = self
            .ctx
            .timed(
                StoreOp::Release,
                store.release(&self.lease.id, self.lease.token),
            )
            .await;
        self.armed = false;
        self.ctx.event(Event::Released(reason));
        match released {
            Ok(()) => {
                debug!(route = %self.ctx.route, record = %self.lease.id, reason = reason.as_str(), "claim released")
            }
            Err(error) if error.is_lease_lost() => {
                self.ctx.event(Event::LeaseLost);
                warn!(route = %self.ctx.route, record = %self.lease.id, %error, "releasing a claim whose lease was lost");
            }
            Err(error) => {
                self.ctx.event(Event::StoreError);
                warn!(
                    route = %self.ctx.route,
                    record = %self.lease.id,
                    %error,
                    "releasing a claim failed; the key stays locked until its lease passes"
                );
            }
        }
    }

    /// Completes the record. Whatever happens, the claim is never released afterwards:
    /// the request ran, so a record left in flight (the store failed) waits for its lease
    /// to pass, and the next claim then takes it over as an unknown outcome.
    async fn complete(&mut self, stored: Bytes) {
        self.armed = false;
        let store = &self.ctx.shared.store;
        let completed = self
            .ctx
            .timed(
                StoreOp::Complete,
                store.complete(&self.lease.id, self.lease.token, stored),
            )
            .await;
        match completed {
            Ok(()) => {
                debug!(route = %self.ctx.route, record = %self.lease.id, "response stored");
                self.ctx.shared.events.completed(
                    &self.ctx.route,
                    &self.lease.id,
                    self.ctx.policy.retention(),
                );
            }
            Err(error) if error.is_lease_lost() => {
                self.ctx.event(Event::LeaseLost);
                warn!(
                    route = %self.ctx.route,
                    record = %self.lease.id,
                    %error,
                    "the lease was taken over before the response was stored"
                );
            }
            Err(error) => {
                self.ctx.event(Event::StoreError);
                error!(
                    route = %self.ctx.route,
                    record = %self.lease.id,
                    %error,
                    "storing the response failed; the key stays in flight until its lease passes"
                );
            }
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.ctx.event(Event::Released(ReleaseReason::Cancelled));
        let store = self.ctx.shared.store.clone();
        let events = self.ctx.shared.events.clone();
        let route = self.ctx.route.clone();
        let Lease { id, token, .. } = self.lease;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let start = std::time::Instant::now();
                    let released = store.release(&id, token).await;
                    events.store_latency(StoreOp::Release, start.elapsed(), released.is_ok());
                    match released {
                        Ok(()) => debug!(%route, record = %id, "claim of a cancelled request released"),
                        Err(error) => warn!(%route, record = %id, %error, "releasing the claim of a cancelled request failed"),
                    }
                });
            }
            Err(_) => warn!(
                %route,
                record = %id,
                "no runtime to release the claim of a cancelled request on; the key stays \
                 locked until its lease passes"
            ),
        }
    }
}

/// The headers a stored response keeps: no `Set-Cookie`, no hop-by-hop header (nor any
/// header the `Connection` header names), no `Idempotent-Replayed`.
pub(crate) fn replayable_headers(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    let mut kept = HeaderMap::new();
    for (name, value) in headers {
        if is_replayable(name) && !named.contains(name) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

fn is_replayable(name: &HeaderName) -> bool {
    let hop_by_hop = name == CONNECTION
        || name == TE
        || name == TRAILER
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str().starts_with("proxy-");
    let never = name == SET_COOKIE || name.as_str() == "set-cookie2" || name == IDEMPOTENT_REPLAYED;
    !(hop_by_hop || never)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefer_wait_is_parsed() {
        let mut headers = HeaderMap::new();
        assert_eq!(prefer_wait(&headers), None);
        headers.append(PREFER, HeaderValue::from_static("respond-async, WAIT=5"));
        assert_eq!(prefer_wait(&headers), Some(5));
        let mut headers = HeaderMap::new();
        headers.append(PREFER, HeaderValue::from_static("handling=lenient"));
        headers.append(PREFER, HeaderValue::from_static("wait=\"7\"; x=1"));
        assert_eq!(prefer_wait(&headers), Some(7));
    }

    #[test]
    fn wait_budget_is_capped_by_max_wait() {
        let policy = Policy::new().with_max_wait(Duration::from_secs(3));
        let mut headers = HeaderMap::new();
        assert_eq!(wait_budget(&headers, &policy), None);
        headers.insert(PREFER, HeaderValue::from_static("wait=100"));
        assert_eq!(wait_budget(&headers, &policy), Some(Duration::from_secs(3)));
        headers.insert(PREFER, HeaderValue::from_static("wait=0"));
        assert_eq!(
            wait_budget(&headers, &policy.clone().with_in_flight(OnInFlight::Wait)),
            None
        );
        assert_eq!(
            wait_budget(&HeaderMap::new(), &policy.with_in_flight(OnInFlight::Wait)),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn hop_by_hop_and_cookies_are_not_kept() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("content-type", "text/plain"),
            ("set-cookie", "a=b"),
            ("connection", "close, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("idempotent-replayed", "false"),
            ("x-request-id", "r1"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let kept = replayable_headers(&headers);
        let names: Vec<&str> = kept.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type", "x-request-id"]);
    }
}
