//! An example payments upstream for `idem demo`: it charges every request it receives and
//! counts the charges per payment, so duplicates are visible. It does no deduplication of
//! its own: that is the gateway's job.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The charges made, per payment id.
#[derive(Debug, Default)]
pub struct Ledger {
    charges: Mutex<HashMap<String, u64>>,
    total: AtomicU64,
}

impl Ledger {
    /// Every charge made.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::SeqCst)
    }

    /// Charges beyond the first, summed over payments.
    pub fn duplicates(&self) -> u64 {
        self.charges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|n| n.saturating_sub(1))
            .sum()
    }

    /// Payments charged more than once.
    pub fn payments_charged_twice(&self) -> u64 {
        let charges = self.charges.lock().unwrap_or_else(PoisonError::into_inner);
        charges.values().filter(|n| **n > 1).count() as u64
    }

    fn charge(&self, payment: &str) -> u64 {
        let number = self.total.fetch_add(1, Ordering::SeqCst) + 1;
        *self
            .charges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(payment.to_string())
            .or_default() += 1;
        number
    }
}

/// The service: `POST /v1/payments` with `{"payment_id": "...", "amount": N}` answers
/// `201` with a new charge id, every time it is called.
pub fn router(ledger: Arc<Ledger>) -> Router {
    Router::new()
        .route("/v1/payments", post(pay))
        .with_state(ledger)
}

async fn pay(State(ledger): State<Arc<Ledger>>, body: axum::body::Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "expected a JSON body").into_response();
    };
    let Some(payment) = request.get("payment_id").and_then(Value::as_str) else {
        return (StatusCode::BAD_REQUEST, "payment_id is required").into_response();
    };
    // Talking to the card network takes a moment.
    tokio::time::sleep(Duration::from_millis(3)).await;
    let number = ledger.charge(payment);
    let answer = json!({
        "charge_id": format!("ch_{number:06}"),
        "payment_id": payment,
        "amount": request.get("amount").cloned().unwrap_or(Value::Null),
        "status": "succeeded",
    });
    (StatusCode::CREATED, axum::Json(answer)).into_response()
}

/// Serves the payments service on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    ledger: Arc<Ledger>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(ledger))
        .with_graceful_shutdown(shutdown)
        .await
}
