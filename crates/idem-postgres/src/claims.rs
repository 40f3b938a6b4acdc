//! Claims: the claim statements, the rounds that settle ids racing with concurrent writers,
//! and the read-back of a claim whose answer was lost.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use deadpool_postgres::Pool;
use idem_core::record::{self, Decision};
use idem_core::{ClaimOutcome, ClaimRequest, Completion, Error, Lease, Record, RecordId};
use idem_core::{FencingToken, RecordState, Timestamp};

use crate::combine::Batch;
use crate::queries::Queries;
use crate::{millis_i64, outcome_unknown, pg_error, pool_error, prepared, retryable, row};
use tokio_postgres::types::Type;

/// Claims that lose a race with a concurrent writer re-run; this bounds the re-runs.
const MAX_CLAIM_ROUNDS: usize = 16;

/// One claim's result.
pub(crate) type ClaimResult = Result<ClaimOutcome, Error>;

/// Runs claim statements on connections from the pool. Cheap to clone: a claim batch can
/// run in a task of its own.
#[derive(Clone)]
pub(crate) struct Claimer {
    pub(crate) pool: Pool,
    pub(crate) queries: Arc<Queries>,
}

/// A claim and its holder nonce, which the claim writes on the record it takes: a claim
/// whose answer was lost is recognised by it.
#[derive(Clone, Debug)]
pub(crate) struct Held {
    pub(crate) request: ClaimRequest,
    pub(crate) holder: [u8; 16],
}

impl std::ops::Deref for Held {
    type Target = ClaimRequest;

    fn deref(&self) -> &ClaimRequest {
        &self.request
    }
}

impl Batch for Claimer {
    type Request = Held;
    type Output = ClaimOutcome;

    fn id(held: &Held) -> RecordId {
        held.id
    }

    async fn run(&self, requests: &[Held]) -> Vec<ClaimResult> {
        self.claim_each(requests).await
    }
}

impl Claimer {
    /// Claims every request and answers each one on its own, in order: a record that fails
    /// to decode fails its own claim, not its neighbours'. Requests may repeat an id: a
    /// later occurrence is claimed in a later round and sees the earlier claim.
    pub(crate) async fn claim_each(&self, requests: &[Held]) -> Vec<ClaimResult> {
        let n = requests.len();
        let mut results: Vec<Option<ClaimResult>> = (0..n).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..n).collect();
        // After a statement failed on the server, the claims run one at a time, so that a
        // request that makes the statement fail fails alone.
        let mut one_at_a_time = false;
        let mut rounds = 0;
        while !pending.is_empty() {
            rounds += 1;
            if rounds > MAX_CLAIM_ROUNDS + 2 * n {
                for i in pending {
                    results[i] = Some(Err(Error::Unavailable {
                        message: "postgres: claims kept racing with concurrent writers".into(),
                        source: None,
                    }));
                }
                break;
            }
            // One round claims the first pending occurrence of each id.
            let mut seen = HashSet::new();
            let (mut round, mut rest) = (Vec::new(), Vec::new());
            for &i in &pending {
                if (!one_at_a_time || round.is_empty()) && seen.insert(requests[i].id) {
                    round.push(i);
                } else {
                    rest.push(i);
                }
            }
            let batch: Vec<&Held> = round.iter().map(|&i| &requests[i]).collect();
            match self.claim_round(&batch).await {
                Ok(found) => {
                    for (i, result) in round.into_iter().zip(found) {
                        match result {
                            Some(result) => results[i] = Some(result),
                            None => rest.push(i),
                        }
                    }
                }
                // The statement failed on the server and so changed nothing.
                Err(Error::Backend { .. }) if round.len() > 1 => {
                    one_at_a_time = true;
                    rest.extend(round);
                }
                Err(e) => {
                    for i in round {
                        results[i] = Some(Err(copy_error(&e)));
                    }
                }
            }
            rest.sort_unstable();
            pending = rest;
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::backend("postgres: claim", "no outcome"))))
            .collect()
    }

    /// Claims distinct ids in one statement. `None` for an id whose row changed under the
    /// statement's snapshot (a concurrent writer won a race): the caller claims it again.
    async fn claim_round(&self, requests: &[&Held]) -> Result<Vec<Option<ClaimResult>>, Error> {
        let client = self.pool.get().await.map_err(pool_error)?;
        if let [request] = requests {
            return self.claim_single(client, request).await;
        }
        // A batch first takes the ids without a row and reads the others' rows
        // (claim_first.sql), then runs the locking statement (claim.sql) only for the rows
        // it may take over.
        let rows = match self
            .run_batch(&client, &self.queries.claim_first, requests)
            .await
        {
            Ok(rows) => rows,
            Err(e) => return self.claim_failed(client, requests, e).await,
        };
        let mut results = Vec::with_capacity(requests.len());
        let mut due = Vec::new();
        for (i, found) in found(requests, &rows)?.into_iter().enumerate() {
            match found {
                Found::Answer(result) => results.push(Some(result)),
                Found::TakeOver => {
                    results.push(None);
                    due.push(i);
                }
                Found::Absent => results.push(None),
            }
        }
        if due.is_empty() {
            return Ok(results);
        }
        let again: Vec<&Held> = due.iter().map(|&i| requests[i]).collect();
        let taken = match self.run_batch(&client, &self.queries.claim, &again).await {
            Ok(rows) => {
                found(&again, &rows).map(|found| found.into_iter().map(Found::answer).collect())
            }
            // The first statement's claims stand: only these fail (or are read back).
            Err(e) => self.claim_failed(client, &again, e).await,
        };
        match taken {
            Ok(taken) => {
                for (i, result) in due.into_iter().zip(taken) {
                    results[i] = result;
                }
            }
            Err(e) => {
                for i in due {
                    results[i] = Some(Err(copy_error(&e)));
                }
            }
        }
        Ok(results)
    }

    /// Runs a batch claim statement (claim.sql or claim_first.sql) for distinct ids:
    /// arrays bound to a statement planned at every run, for its arrays and the table as
    /// they are (claim.sql says why), in one round trip.
    async fn run_batch(
        &self,
        client: &deadpool_postgres::Client,
        sql: &str,
        requests: &[&Held],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let ids: Vec<&[u8]> = requests.iter().map(|r| &r.id.as_bytes()[..]).collect();
        let fingerprints: Vec<&[u8]> = requests
            .iter()
            .map(|r| &r.fingerprint.as_bytes()[..])
            .collect();
        let leases: Vec<i64> = requests.iter().map(|r| millis_i64(r.lease)).collect();
        let retentions: Vec<i64> = requests.iter().map(|r| millis_i64(r.retention)).collect();
        let holders: Vec<&[u8]> = requests.iter().map(|r| &r.holder[..]).collect();
        client
            .query_typed(
                sql,
                &[
                    (&ids, Type::BYTEA_ARRAY),
                    (&fingerprints, Type::BYTEA_ARRAY),
                    (&leases, Type::INT8_ARRAY),
                    (&retentions, Type::INT8_ARRAY),
                    (&holders, Type::BYTEA_ARRAY),
                ],
            )
            .await
    }

    /// Claims one id with statements prepared once per connection, scalars bound
    /// (claim_one.sql says why): one statement takes an id without a row or reads the row
    /// it has, which answers a replay, a lease in flight or a mismatch without a lock or a
    /// write. Only a row the claim may take over costs a second statement
    /// (take_over_one.sql), which decides again under the row's lock. `None` when the row
    /// changed between the statements or appeared after the first one's snapshot: the
    /// caller claims again.
    async fn claim_single(
        &self,
        client: deadpool_postgres::Client,
        request: &Held,
    ) -> Result<Vec<Option<ClaimResult>>, Error> {
        let id = &request.id.as_bytes()[..];
        let fingerprint = &request.fingerprint.as_bytes()[..];
        let (lease, retention) = (millis_i64(request.lease), millis_i64(request.retention));
        let holder_bytes = &request.holder[..];
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&id, &fingerprint, &lease, &retention, &holder_bytes];

        let statement = prepared(&client, &self.queries.claim_one, "claim").await?;
        let rows = match client.query(&statement, &params).await {
            Ok(rows) => rows,
            Err(e) => return self.claim_failed(client, &[request], e).await,
        };
        let Some(row) = rows.first() else {
            return Ok(vec![None]);
        };
        if let Found::Answer(result) = Found::of(claim_row(row), request) {
            return Ok(vec![Some(result)]);
        }

        // The row may be taken over.
        let statement = prepared(&client, &self.queries.take_over_one, "take over").await?;
        let rows = match client.query(&statement, &params).await {
            Ok(rows) => rows,
            Err(e) => return self.claim_failed(client, &[request], e).await,
        };
        Ok(vec![rows.first().and_then(|row| {
            Found::of(claim_row(row), request).answer()
        })])
    }

    /// A claim statement failed: a passing failure has the caller claim again; a lost
    /// connection leaves the outcome unknown until the claim's nonce is read back.
    async fn claim_failed(
        &self,
        client: deadpool_postgres::Client,
        requests: &[&Held],
        e: tokio_postgres::Error,
    ) -> Result<Vec<Option<ClaimResult>>, Error> {
        if retryable(&e) {
            return Ok(requests.iter().map(|_| None).collect());
        }
        if outcome_unknown(&e) {
            drop(client);
            return self.resolve_lost_claims(requests, e).await;
        }
        Err(pg_error("claim", e))
    }

    /// After a claim statement failed with its connection: reads back which of the ids carry
    /// this claim's nonce (those the claim took), on a fresh connection. The others are
    /// claimed again by the caller.
    async fn resolve_lost_claims(
        &self,
        requests: &[&Held],
        cause: tokio_postgres::Error,
    ) -> Result<Vec<Option<ClaimResult>>, Error> {
        // The caller then executes nothing; whatever the claims took is released once the
        // server answers again (the store records them as lost).
        let unknown = || {
            Error::unavailable(
                "postgres: the connection failed during a claim and its outcome could not be read back",
                format!("{cause}"),
            )
        };
        let client = self.pool.get().await.map_err(|_| unknown())?;
        let ids: Vec<&[u8]> = requests.iter().map(|r| &r.id.as_bytes()[..]).collect();
        let holders: Vec<&[u8]> = requests.iter().map(|r| &r.holder[..]).collect();
        let statement = prepared(&client, &self.queries.claim_by_holder, "read back claims")
            .await
            .map_err(|_| unknown())?;
        let rows = client
            .query(&statement, &[&ids, &holders])
            .await
            .map_err(|_| unknown())?;
        let mut mine = HashMap::new();
        for row in &rows {
            let (record, taken_over) = row::record(row)?;
            mine.insert(record.id, claimed_outcome(&record, taken_over));
        }
        Ok(requests
            .iter()
            .map(|r| mine.remove(&r.id).map(Ok))
            .collect())
    }
}

/// An error for one of several claims that failed together: the same variant and message,
/// the driver's error kept as text.
pub(crate) fn copy_error(e: &Error) -> Error {
    let source = |s: Option<&(dyn std::error::Error + Send + Sync + 'static)>| {
        s.map(|s| s.to_string().into())
    };
    match e {
        Error::Unavailable { message, source: s } => Error::Unavailable {
            message: message.clone(),
            source: source(s.as_deref()),
        },
        Error::Corrupt { message, source: s } => Error::Corrupt {
            message: message.clone(),
            source: source(s.as_deref()),
        },
        Error::InvalidRequest { reason } => Error::InvalidRequest {
            reason: reason.clone(),
        },
        other => Error::Backend {
            message: other.to_string(),
            source: None,
        },
    }
}

/// What a batch claim statement returned for one request.
enum Found {
    /// The claim's outcome: the row it took, or the row that answers it.
    Answer(ClaimResult),
    /// A row the claim may take over, which the statement did not take.
    TakeOver,
    /// No row: it appeared after the statement's snapshot.
    Absent,
}

impl Found {
    /// What a claim statement's row (or its failure to decode) says of `request`.
    fn of(row: Result<ClaimRow, Error>, request: &ClaimRequest) -> Self {
        match row {
            Err(e) => Found::Answer(Err(e)),
            Ok(row) if row.claimed => {
                Found::Answer(Ok(claimed_outcome(&row.record, row.taken_over)))
            }
            Ok(row) => match existing_outcome(&row.record, request, row.now) {
                Some(outcome) => Found::Answer(Ok(outcome)),
                None => Found::TakeOver,
            },
        }
    }

    /// The claim's result, or `None` for a claim to make again.
    fn answer(self) -> Option<ClaimResult> {
        match self {
            Found::Answer(result) => Some(result),
            Found::TakeOver | Found::Absent => None,
        }
    }
}

/// Each request's row among a batch statement's rows (the requests' ids are distinct).
fn found(requests: &[&Held], rows: &[tokio_postgres::Row]) -> Result<Vec<Found>, Error> {
    let mut by_id: HashMap<RecordId, Result<ClaimRow, Error>> = HashMap::with_capacity(rows.len());
    for row in rows {
        let id: &[u8] = row.try_get("id").map_err(row::decode_error)?;
        let id = RecordId::from_slice(id)
            .ok_or_else(|| Error::corrupt("postgres: a record id is not 32 bytes"))?;
        by_id.insert(id, claim_row(row));
    }
    Ok(requests
        .iter()
        .map(|request| match by_id.remove(&request.id) {
            None => Found::Absent,
            Some(row) => Found::of(row, request),
        })
        .collect())
}

/// One row of the claim statement.
struct ClaimRow {
    /// Whether this statement took the record.
    claimed: bool,
    record: Record,
    /// The server's time of the statement.
    now: Timestamp,
    /// The (token, lease end) of the lease the claim took over.
    taken_over: Option<(i64, i64)>,
}

fn claim_row(row: &tokio_postgres::Row) -> Result<ClaimRow, Error> {
    let (record, taken_over) = row::record(row)?;
    let claimed: bool = row.try_get("claimed").map_err(row::decode_error)?;
    let now: i64 = row.try_get("now").map_err(row::decode_error)?;
    Ok(ClaimRow {
        claimed,
        record,
        now: row::timestamp(now)?,
        taken_over,
    })
}

/// The outcome for a row the claim took.
fn claimed_outcome(record: &Record, taken_over: Option<(i64, i64)>) -> ClaimOutcome {
    let lease_until = match record.state {
        RecordState::InFlight { lease_until } => lease_until,
        _ => unreachable!("a claimed row is in flight"),
    };
    let lease = Lease {
        id: record.id,
        token: record.token,
        lease_until,
    };
    match taken_over {
        Some((token, lease_until)) => ClaimOutcome::TookOver {
            lease,
            previous_token: FencingToken::new(token as u64),
            previous_lease_until: Timestamp::from_millis(lease_until.max(0) as u64),
        },
        None => ClaimOutcome::Acquired(lease),
    }
}

/// The outcome for a row the claim did not take; `None` if the row says it should have
/// (the statement's snapshot was older than the row it conflicted with).
fn existing_outcome(
    record: &Record,
    request: &ClaimRequest,
    now: Timestamp,
) -> Option<ClaimOutcome> {
    match record::decide(Some(record), &request.fingerprint, now) {
        Decision::Replay => match &record.state {
            RecordState::Completed {
                response,
                completed_at,
            } => Some(ClaimOutcome::Completed(Completion {
                response: response.clone(),
                completed_at: *completed_at,
                expires_at: record.expires_at,
                token: record.token,
            })),
            _ => None,
        },
        Decision::InFlight { lease_until } => Some(ClaimOutcome::InFlight { lease_until, now }),
        Decision::Mismatch => Some(ClaimOutcome::Mismatch),
        Decision::Claim { .. } | Decision::TakeOver { .. } => None,
    }
}
