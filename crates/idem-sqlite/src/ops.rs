//! The writer's operations: read the row, let the pure state machine decide with the
//! store's time, write its result.

use std::time::Duration;

use bytes::Bytes;
use idem_core::record::{self, Record, RecordState};
use idem_core::{ClaimOutcome, ClaimRequest, Error, FencingToken, RecordId, Timestamp};

use crate::queries::Db;
use crate::writer::Done;

/// Claims one record.
pub(crate) fn claim(db: &Db<'_>, request: &ClaimRequest) -> Result<ClaimOutcome, Error> {
    let now = db.now();
    let existing = db.select_record(&request.id)?;
    let (outcome, write) = record::claim(existing.as_ref(), request, now)?;
    if let Some(record) = write {
        db.upsert_record(&record)?;
    }
    Ok(outcome)
}

/// Claims records in order, so that a duplicate sees the earlier claim.
pub(crate) fn claim_batch(
    db: &Db<'_>,
    requests: &[ClaimRequest],
) -> Result<Done<Vec<ClaimOutcome>>, Error> {
    requests
        .iter()
        .map(|request| claim(db, request))
        .collect::<Result<_, _>>()
        .map(Done::quiet)
}

/// Applies a transition to a held record; waiters are woken if it settled.
pub(crate) fn transition(
    db: &Db<'_>,
    id: &RecordId,
    apply: impl FnOnce(Option<&Record>, Timestamp) -> Result<Record, Error>,
) -> Result<Done<Record>, Error> {
    let now = db.now();
    let existing = db.select_record(id)?;
    let next = apply(existing.as_ref(), now)?;
    db.upsert_record(&next)?;
    let settled = if matches!(next.state, RecordState::InFlight { .. }) {
        Vec::new()
    } else {
        vec![*id]
    };
    Ok(Done {
        value: next,
        settled,
    })
}

pub(crate) fn complete(
    db: &Db<'_>,
    id: &RecordId,
    token: FencingToken,
    response: Bytes,
) -> Result<Done<()>, Error> {
    transition(db, id, |r, now| {
        record::complete(r, *id, token, response, now)
    })
    .map(|done| Done {
        value: (),
        settled: done.settled,
    })
}

pub(crate) fn release(db: &Db<'_>, id: &RecordId, token: FencingToken) -> Result<Done<()>, Error> {
    transition(db, id, |r, now| record::release(r, *id, token, now)).map(|done| Done {
        value: (),
        settled: done.settled,
    })
}

pub(crate) fn renew(
    db: &Db<'_>,
    id: &RecordId,
    token: FencingToken,
    lease: Duration,
) -> Result<Done<Timestamp>, Error> {
    let done = transition(db, id, |r, now| record::renew(r, *id, token, lease, now))?;
    match done.value.state {
        RecordState::InFlight { lease_until } => Ok(Done::quiet(lease_until)),
        _ => Err(Error::Backend {
            message: "renew left the record settled".into(),
            source: None,
        }),
    }
}

/// Deletes a record whatever its state; its waiters are woken either way.
pub(crate) fn remove(db: &Db<'_>, id: &RecordId) -> Result<Done<bool>, Error> {
    Ok(Done {
        value: db.delete_record(id)?,
        settled: vec![*id],
    })
}

/// Deletes up to `limit` expired records; their waiters are woken.
pub(crate) fn purge_expired(db: &Db<'_>, limit: usize) -> Result<Done<usize>, Error> {
    let purged = db.purge_expired(db.now(), limit)?;
    Ok(Done {
        value: purged.len(),
        settled: purged,
    })
}

/// Hands up to `pages` free pages back to the file system; returns how many remain.
pub(crate) fn vacuum(db: &Db<'_>, pages: u32) -> Result<Done<u64>, Error> {
    db.incremental_vacuum(pages).map(Done::quiet)
}
