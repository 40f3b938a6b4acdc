//! The task that releases the records held by claims whose outcome was lost
//! ([`idem_core::lost`]): `release_lost.lua` for every lost claim, as soon as the server
//! answers again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::lost::{LostClaim, LostClaims};
use idem_core::notify::CompletionNotifier;
use idem_core::{Error, Nonces};
use tokio::task::JoinHandle;

use crate::conn::Conn;
use crate::error::redis_error;
use crate::keys::{Keys, hex};
use crate::scripts;

/// The shortest pause between two attempts, and the first pause while the server does not
/// answer; that one doubles with each attempt the server does not answer, up to
/// [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest pause between attempts while the server does not answer, and the longest
/// the task sleeps before it looks for claims due (a claim just lost waits no longer).
const MAX_RETRY: Duration = Duration::from_secs(1);

/// Starts the task; it runs until aborted.
pub(crate) fn start(
    conn: Conn,
    keys: Keys,
    notifier: Arc<CompletionNotifier>,
    lost: Arc<LostClaims>,
    nonces: &'static Nonces,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut unanswered = FIRST_RETRY;
        let mut refused = 0;
        loop {
            lost.wait().await;
            let wake = lost.wake_at(Instant::now(), FIRST_RETRY, MAX_RETRY);
            tokio::time::sleep_until(wake.into()).await;
            if lost.refused() > refused {
                refused = lost.refused();
                tracing::warn!(
                    refused,
                    "redis: the list of lost claims is full; the records of those refused stay held until their leases end"
                );
            }
            let claims = lost.take(Instant::now());
            let taken = claims.len();
            let mut claims = claims.into_iter();
            let mut unsettled = Vec::new();
            let (mut released, mut answered) = (0, true);
            while let Some(claim) = claims.next() {
                match release(&conn, &keys, &claim, nonces).await {
                    Ok(true) => {
                        notifier.notify(&claim.id);
                        released += 1;
                    }
                    // Not found: the claim may still land while its lease lasts.
                    Ok(false) => unsettled.extend(claim.not_found(Instant::now())),
                    Err(error @ Error::Unavailable { .. }) => {
                        tracing::debug!(%error, "redis: lost claims not released yet");
                        // This claim and the ones not tried wait for the next attempt.
                        let again = Instant::now() + unanswered;
                        unsettled.push(claim.retry_at(again));
                        unsettled.extend(claims.by_ref().map(|c| c.retry_at(again)));
                        unanswered = (unanswered * 2).min(MAX_RETRY);
                        answered = false;
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, record = %claim.id, "redis: releasing a lost claim failed");
                    }
                }
            }
            if answered {
                unanswered = FIRST_RETRY;
            }
            lost.finish(taken, unsettled);
            if released > 0 {
                tracing::info!(
                    released,
                    lost = taken,
                    "redis: released the records still held by claims whose answer was lost"
                );
            }
        }
    })
}

/// Runs `release_lost.lua` for one lost claim: whether it released the record.
async fn release(
    conn: &Conn,
    keys: &Keys,
    claim: &LostClaim,
    nonces: &Nonces,
) -> Result<bool, Error> {
    let mut conn = conn.clone();
    scripts::release_lost(
        &mut conn,
        keys,
        &claim.id,
        &hex(&claim.holder),
        &hex(&nonces.next()),
    )
    .await
    .map_err(|e| redis_error("release a lost claim", e))
}
