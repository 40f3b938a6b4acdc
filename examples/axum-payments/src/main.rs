//! A small payments API built with axum, made safe to retry by idem's `IdempotencyLayer`
//! over the in-memory store.
//!
//! Run it (it listens on `127.0.0.1:3000`, or on the address given as the first argument):
//!
//! ```text
//! cargo run -p axum-payments
//! ```
//!
//! Then, from another terminal:
//!
//! ```text
//! # Create a charge. The answer carries `Idempotent-Replayed: false`.
//! curl -i localhost:3000/v1/charges -H 'Idempotency-Key: order-42' \
//!      -H 'Authorization: Bearer alice' -H 'Content-Type: application/json' \
//!      -d '{"amount": 1000, "currency": "eur"}'
//!
//! # Send exactly the same request again: the same charge id comes back with
//! # `Idempotent-Replayed: true`, and no second charge is created.
//! curl -i localhost:3000/v1/charges ...same as above...
//! curl localhost:3000/v1/charges -H 'Authorization: Bearer alice'      # one charge
//!
//! # JSON key order and whitespace do not matter; a different amount does: 422.
//! curl -i localhost:3000/v1/charges -H 'Idempotency-Key: order-42' \
//!      -H 'Authorization: Bearer alice' -H 'Content-Type: application/json' \
//!      -d '{"amount": 2000, "currency": "eur"}'
//!
//! # The same key from another tenant is another operation.
//! curl -i localhost:3000/v1/charges -H 'Idempotency-Key: order-42' \
//!      -H 'Authorization: Bearer bob' -H 'Content-Type: application/json' \
//!      -d '{"amount": 1000, "currency": "eur"}'
//!
//! # No key: 400 (the route requires one).
//! curl -i localhost:3000/v1/charges -H 'Content-Type: application/json' -d '{"amount": 1}'
//!
//! # Payouts take 5 seconds. Start one, and while it runs send the same request again:
//! # 409 with Retry-After. Add `-H 'Prefer: wait=10'` to wait for the first and get its
//! # answer instead.
//! curl -i localhost:3000/v1/payouts -H 'Idempotency-Key: payout-1' \
//!      -H 'Authorization: Bearer alice' -H 'Content-Type: application/json' -d '{"amount": 50}'
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use idem_core::{MemoryStore, Store};
use idem_tower::{IdempotencyLayer, KeyRequirement, Policy, Routes};
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// The "bank": charges and payouts, per tenant.
#[derive(Default)]
struct Ledger {
    next_id: AtomicU64,
    charges: Mutex<Vec<(String, Value)>>,
}

type Shared = Arc<Ledger>;

fn tenant(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anonymous")
        .to_owned()
}

fn amount(body: &Value) -> Result<u64, (StatusCode, Json<Value>)> {
    body.get("amount")
        .and_then(Value::as_u64)
        .filter(|a| *a > 0)
        .ok_or((
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "amount must be a positive integer" })),
        ))
}

async fn create_charge(
    State(ledger): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Json<Value>), (StatusCode, Json<Value>)> {
    let amount = amount(&body)?;
    let id = format!("ch_{}", ledger.next_id.fetch_add(1, Ordering::SeqCst) + 1);
    let charge = json!({
        "id": id,
        "amount": amount,
        "currency": body.get("currency").cloned().unwrap_or(json!("eur")),
        "status": "succeeded",
    });
    ledger
        .charges
        .lock()
        .await
        .push((tenant(&headers), charge.clone()));
    Ok((StatusCode::CREATED, Json(charge)))
}

async fn list_charges(State(ledger): State<Shared>, headers: HeaderMap) -> Json<Value> {
    let tenant = tenant(&headers);
    let charges: Vec<Value> = ledger
        .charges
        .lock()
        .await
        .iter()
        .filter(|(owner, _)| *owner == tenant)
        .map(|(_, charge)| charge.clone())
        .collect();
    Json(json!({ "data": charges }))
}

async fn get_charge(
    State(ledger): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, StatusCode> {
    let tenant = tenant(&headers);
    ledger
        .charges
        .lock()
        .await
        .iter()
        .find(|(owner, charge)| *owner == tenant && charge["id"] == id.as_str())
        .map(|(_, charge)| Json(charge.clone()))
        .ok_or(StatusCode::NOT_FOUND)
}

async fn create_payout(
    State(ledger): State<Shared>,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Json<Value>), (StatusCode, Json<Value>)> {
    let amount = amount(&body)?;
    // A slow bank transfer: retries sent meanwhile are in flight.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let id = format!("po_{}", ledger.next_id.fetch_add(1, Ordering::SeqCst) + 1);
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "amount": amount, "status": "paid" })),
    ))
}

fn app(store: Arc<dyn Store>) -> Result<Router, idem_tower::RouteError> {
    let keyed = Policy::new().with_key(KeyRequirement::Required);
    let routes = Routes::new()
        .route("/v1/charges", keyed.clone())?
        .route("/v1/payouts", keyed.with_lease(Duration::from_secs(30)))?;
    // In production the secret comes from configuration and is the same on every replica.
    let idempotency =
        IdempotencyLayer::new(store, b"example secret, not for production").with_routes(routes);
    Ok(Router::new()
        .route("/v1/charges", post(create_charge).get(list_charges))
        .route("/v1/charges/{id}", get(get_charge))
        .route("/v1/payouts", post(create_payout))
        .layer(idempotency)
        .with_state(Shared::default()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let app = app(store)?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("payments API on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
