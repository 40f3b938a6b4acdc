//! The admin listener: metrics, health, and the admin API.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | `200` while the process runs |
//! | `GET /readyz` | `200` when the store answers, `503` otherwise |
//! | `GET /admin/records/{id}` | the record (`?body=true` adds the stored response's headers and body) |
//! | `POST /admin/records/{id}/release` | releases an in-flight record |
//! | `DELETE /admin/records/{id}` | purges a record, whatever its state |
//! | `GET /admin/records?route=&method=&key=[&principal=][&namespace=][&body=]` | the id the scope parts name, and its record |
//! | `GET /admin/in-flight[?after=ID][&limit=N]` | in-flight records, in id order |
//!
//! Errors are `application/problem+json`.
//!
//! **Access.** Without an `admin_token` the listener must be bound to a loopback address
//! (the configuration refuses anything else). With a token, every endpoint but `/healthz`
//! requires `Authorization: Bearer <token>` (compared in constant time) and answers `401`
//! `unauthorized` otherwise.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use idem_core::{PrincipalHasher, Store};
use idem_tower::Problem;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::records::{self, Purged, Released, ScopeParts};
use crate::server::App;

/// What the admin endpoints work on.
#[derive(Clone)]
pub struct AdminState {
    store: Arc<dyn Store>,
    metrics: Metrics,
    hasher: PrincipalHasher,
    /// The SHA-256 of the bearer token, if one is required.
    token: Option<[u8; 32]>,
}

impl AdminState {
    /// The admin state of a gateway, without a token (for a loopback listener).
    pub fn new(app: &App) -> Self {
        Self {
            store: app.store().clone(),
            metrics: app.metrics().clone(),
            hasher: app.hasher().clone(),
            token: None,
        }
    }

    /// Requires `Authorization: Bearer <token>` on every endpoint but `/healthz`.
    pub fn with_token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(digest);
        self
    }
}

fn digest(text: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes()).into()
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz))
        .route("/admin/records", get(lookup))
        .route("/admin/records/{id}", get(show).delete(purge))
        .route("/admin/records/{id}/release", post(release))
        .route("/admin/in-flight", get(in_flight))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .route("/healthz", get(healthz))
        .with_state(state)
}

/// Lets a request through when no token is configured or it carries the token.
async fn require_token(
    State(state): State<AdminState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use subtle::ConstantTimeEq as _;
    let Some(expected) = state.token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    // Digests of equal length, compared in constant time: neither the token's bytes nor
    // its length leak through timing.
    let authorized = given.is_some_and(|token| bool::from(digest(token).ct_eq(&expected)));
    if authorized {
        return next.run(request).await;
    }
    let mut response = problem(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        "the admin API requires Authorization: Bearer <admin_token>",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"idem-admin\""),
    );
    response
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    info!(addr = %listener.local_addr()?, "admin listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

fn problem(
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: impl Into<String>,
) -> Response {
    let uri = format!("https://idem.dev/problems/admin/{slug}");
    Problem::custom(uri, title, status, detail)
        .into_response()
        .map(axum::body::Body::from)
}

fn store_error(error: &idem_core::Error) -> Response {
    if let idem_core::Error::Corrupt { .. } = error {
        tracing::error!(%error, "admin: a stored record is corrupt");
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "corrupt-record",
            "Corrupt record",
            error.to_string(),
        );
    }
    warn!(%error, "admin: store operation failed");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "store-unavailable",
        "Idempotency store unavailable",
        error.to_string(),
    )
}

fn bad_id(detail: String) -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "invalid-id",
        "Invalid record id",
        detail,
    )
}

fn no_record() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "record-not-found",
        "Record not found",
        "no live record has this id",
    )
}

fn unsupported() -> Response {
    problem(
        StatusCode::NOT_IMPLEMENTED,
        "unsupported",
        "Not supported by this store",
        "this store cannot list or delete records",
    )
}

async fn not_found() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no such admin endpoint",
    )
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match state.store.now().await {
        Ok(now) => axum::Json(json!({ "status": "ready", "store_time_ms": now.as_millis() }))
            .into_response(),
        Err(error) => store_error(&error),
    }
}

#[derive(Debug, Default, Deserialize)]
struct BodyQuery {
    #[serde(default)]
    body: bool,
}

async fn show(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(query): Query<BodyQuery>,
) -> Response {
    let id = match records::parse_id(&id) {
        Ok(id) => id,
        Err(detail) => return bad_id(detail),
    };
    match state.store.get(&id).await {
        Ok(Some(record)) => axum::Json(records::record_json(&record, query.body)).into_response(),
        Ok(None) => no_record(),
        Err(error) => store_error(&error),
    }
}

async fn release(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    let id = match records::parse_id(&id) {
        Ok(id) => id,
        Err(detail) => return bad_id(detail),
    };
    match records::release(&state.store, &id).await {
        Ok(Released::Released) => {
            info!(record = %id, "admin: in-flight record released");
            axum::Json(json!({ "id": id.to_hex(), "released": true })).into_response()
        }
        Ok(Released::NotInFlight(kind)) => problem(
            StatusCode::CONFLICT,
            "not-in-flight",
            "Record not in flight",
            format!("the record is {}, not in flight", kind.as_str()),
        ),
        Ok(Released::NotFound) => no_record(),
        Err(error) => store_error(&error),
    }
}

async fn purge(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    let id = match records::parse_id(&id) {
        Ok(id) => id,
        Err(detail) => return bad_id(detail),
    };
    match records::purge(&state.store, &id).await {
        Ok(Purged::Purged) => {
            info!(record = %id, "admin: record purged");
            axum::Json(json!({ "id": id.to_hex(), "purged": true })).into_response()
        }
        Ok(Purged::NotFound) => no_record(),
        Ok(Purged::Unsupported) => unsupported(),
        Err(error) => store_error(&error),
    }
}

#[derive(Debug, Deserialize)]
struct LookupQuery {
    route: Option<String>,
    path: Option<String>,
    method: Option<String>,
    key: Option<String>,
    principal: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    body: bool,
}

async fn lookup(State(state): State<AdminState>, Query(query): Query<LookupQuery>) -> Response {
    let (Some(route), Some(method), Some(key)) = (query.route, query.method, query.key) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "missing-parameter",
            "Missing parameter",
            "route, method and key are required (principal and namespace are optional)",
        );
    };
    let parts = ScopeParts {
        namespace: query.namespace,
        principal: query.principal,
        method,
        route,
        path: query.path,
        key,
    };
    let id = match parts.record_id(&state.hasher) {
        Ok(id) => id,
        Err(error) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid-scope",
                "Invalid scope parts",
                error.to_string(),
            );
        }
    };
    match state.store.get(&id).await {
        Ok(record) => {
            let record = record.map_or(Value::Null, |r| records::record_json(&r, query.body));
            axum::Json(json!({ "id": id.to_hex(), "record": record })).into_response()
        }
        Err(error) => store_error(&error),
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

async fn in_flight(State(state): State<AdminState>, Query(query): Query<ListQuery>) -> Response {
    let after = match query.after.as_deref().map(records::parse_id).transpose() {
        Ok(after) => after,
        Err(detail) => return bad_id(detail),
    };
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    match records::in_flight(&state.store, after, limit).await {
        Ok(Some(found)) => {
            let next = (found.len() == limit)
                .then(|| found.last().map(|r| r.id.to_hex()))
                .flatten();
            let records: Vec<Value> = found
                .iter()
                .map(|r| records::record_json(r, false))
                .collect();
            axum::Json(json!({ "records": records, "next_after": next })).into_response()
        }
        Ok(None) => unsupported(),
        Err(error) => store_error(&error),
    }
}
