//! The task that releases the records held by claims whose outcome was lost
//! ([`idem_core::lost`]): `release_lost.sql` for every lost claim, as soon as the server
//! answers again.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use idem_core::lost::{LostClaim, LostClaims};
use idem_core::notify::CompletionNotifier;
use idem_core::{Error, RecordId};
use tokio::task::JoinHandle;

use crate::queries::Queries;
use crate::{pg_error, pool_error, prepared, row};

/// The shortest pause between two attempts, and the first pause while the server does not
/// answer; that one doubles with each attempt the server does not answer, up to
/// [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest pause between attempts while the server does not answer, and the longest
/// the task sleeps before it looks for claims due (a claim just lost waits no longer).
const MAX_RETRY: Duration = Duration::from_secs(1);
/// How long one attempt may take (a server that hangs rather than refuses).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the task; it runs until aborted.
pub(crate) fn start(
    pool: Pool,
    queries: Arc<Queries>,
    notifier: Arc<CompletionNotifier>,
    lost: Arc<LostClaims>,
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
                    "postgres: the list of lost claims is full; the records of those refused stay held until their leases end"
                );
            }
            let claims = lost.take(Instant::now());
            if claims.is_empty() {
                continue;
            }
            let taken = claims.len();
            let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, release(&pool, &queries, &claims));
            let result = attempt.await.unwrap_or_else(|_| {
                Err(Error::Unavailable {
                    message: "postgres: releasing lost claims timed out".into(),
                    source: None,
                })
            });
            let now = Instant::now();
            match result {
                Ok(released) => {
                    if released.is_empty() {
                        tracing::debug!(lost = taken, "postgres: lost claims held no record");
                    } else {
                        tracing::info!(
                            lost = taken,
                            released = released.len(),
                            "postgres: released the records still held by claims whose answer was lost"
                        );
                    }
                    for (id, _) in &released {
                        notifier.notify(id);
                    }
                    // Settled by claim, not by id: another lost claim of the same id may
                    // still land.
                    let released: HashSet<(RecordId, [u8; 16])> = released.into_iter().collect();
                    let unsettled = claims
                        .into_iter()
                        .filter(|c| !released.contains(&(c.id, c.holder)))
                        .filter_map(|c| c.not_found(now))
                        .collect();
                    lost.finish(taken, unsettled);
                    unanswered = FIRST_RETRY;
                }
                Err(error) => {
                    if matches!(error, Error::Unavailable { .. }) {
                        tracing::debug!(%error, lost = taken, "postgres: lost claims not released yet");
                    } else {
                        tracing::warn!(%error, lost = taken, "postgres: releasing lost claims failed");
                    }
                    let again = now + unanswered;
                    lost.finish(
                        taken,
                        claims.into_iter().map(|c| c.retry_at(again)).collect(),
                    );
                    unanswered = (unanswered * 2).min(MAX_RETRY);
                }
            }
        }
    })
}

/// Runs `release_lost.sql` for `claims`: the records it released, with the holder nonce
/// of the claim each was released from.
async fn release(
    pool: &Pool,
    queries: &Queries,
    claims: &[LostClaim],
) -> Result<Vec<(RecordId, [u8; 16])>, Error> {
    let client = pool.get().await.map_err(pool_error)?;
    let statement = prepared(&client, &queries.release_lost, "release lost claims").await?;
    let ids: Vec<&[u8]> = claims.iter().map(|c| &c.id.as_bytes()[..]).collect();
    let holders: Vec<&[u8]> = claims.iter().map(|c| &c.holder[..]).collect();
    let rows = client
        .query(&statement, &[&ids, &holders])
        .await
        .map_err(|e| pg_error("release lost claims", e))?;
    rows.iter()
        .map(|row| {
            let id: &[u8] = row.try_get("id").map_err(row::decode_error)?;
            let holder: &[u8] = row.try_get("holder").map_err(row::decode_error)?;
            match (RecordId::from_slice(id), <[u8; 16]>::try_from(holder)) {
                (Some(id), Ok(holder)) => Ok((id, holder)),
                _ => Err(Error::corrupt(
                    "postgres: a released record's id or holder nonce has the wrong length",
                )),
            }
        })
        .collect()
}
