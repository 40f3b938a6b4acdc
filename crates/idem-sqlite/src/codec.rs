//! Records to rows and back.
//!
//! Times are stored as milliseconds since the epoch in SQLite's signed 64-bit integers. A
//! time beyond `i64::MAX` milliseconds (the year 292 million, reached only by saturating
//! arithmetic on huge leases or retentions) is stored as `i64::MAX` and read back as
//! "never" (`u64::MAX`). Retentions are stored in whole milliseconds, rounded up as
//! [`duration_millis`] rounds them for every decision. Fencing tokens must fit in an `i64`:
//! they are at most the claim time in microseconds plus the number of claims.
//!
//! Decoding is defensive: a value of the wrong type, a blob of the wrong length, an unknown
//! state or a missing column of the state is [`Error::Corrupt`], never a panic.

use std::time::Duration;

use bytes::Bytes;
use idem_core::record::{Record, RecordState};
use idem_core::{
    Error, FencingToken, Fingerprint, RecordId, StateKind, Timestamp, duration_millis,
};
use rusqlite::Row;
use rusqlite::types::ValueRef;

const IN_FLIGHT: i64 = 1;
const COMPLETED: i64 = 2;
const RELEASED: i64 = 3;

/// The stored code of a state.
pub(crate) fn state_code(kind: StateKind) -> i64 {
    match kind {
        StateKind::InFlight => IN_FLIGHT,
        StateKind::Completed => COMPLETED,
        StateKind::Released => RELEASED,
    }
}

/// A timestamp as stored (saturating at `i64::MAX`).
pub(crate) fn timestamp(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

/// A duration as stored: whole milliseconds, rounded up, saturating at `i64::MAX`.
fn millis(d: Duration) -> i64 {
    i64::try_from(duration_millis(d)).unwrap_or(i64::MAX)
}

/// The column values of a record, in the order of the insert's parameters.
pub(crate) struct Encoded<'a> {
    pub(crate) id: &'a [u8],
    pub(crate) fingerprint: &'a [u8],
    pub(crate) token: i64,
    pub(crate) state: i64,
    pub(crate) lease_until: Option<i64>,
    pub(crate) retention_ms: i64,
    pub(crate) expires_at: i64,
    pub(crate) completed_at: Option<i64>,
    pub(crate) released_at: Option<i64>,
    pub(crate) response: Option<&'a [u8]>,
}

/// Encodes a record; fails only for a token that does not fit the token column.
pub(crate) fn encode<'a>(path: &str, record: &'a Record) -> Result<Encoded<'a>, Error> {
    let token = i64::try_from(record.token.get()).map_err(|_| {
        Error::corrupt(format!(
            "{path}: record {}: fencing token {} does not fit a signed 64-bit integer \
             (is the store's clock far in the future?)",
            record.id, record.token
        ))
    })?;
    let (mut lease_until, mut completed_at, mut released_at, mut response) =
        (None, None, None, None);
    match &record.state {
        RecordState::InFlight { lease_until: t } => lease_until = Some(timestamp(*t)),
        RecordState::Completed {
            response: r,
            completed_at: t,
        } => {
            completed_at = Some(timestamp(*t));
            response = Some(&r[..]);
        }
        RecordState::Released { released_at: t } => released_at = Some(timestamp(*t)),
    }
    Ok(Encoded {
        id: record.id.as_bytes(),
        fingerprint: record.fingerprint.as_bytes(),
        token,
        state: state_code(record.state.kind()),
        lease_until,
        retention_ms: millis(record.retention),
        expires_at: timestamp(record.expires_at),
        completed_at,
        released_at,
        response,
    })
}

/// Decodes a row of the select's columns (`id, fingerprint, token, state, lease_until,
/// retention_ms, expires_at, completed_at, released_at, response`).
pub(crate) fn decode(path: &str, row: &Row<'_>) -> Result<Record, Error> {
    let mut id = None;
    decode_columns(row, &mut id).map_err(|what| {
        let which = id.map_or_else(|| "a record".to_owned(), |id| format!("record {id}"));
        Error::corrupt(format!("{path}: {which} cannot be read back: {what}"))
    })
}

fn decode_columns(row: &Row<'_>, id_out: &mut Option<RecordId>) -> Result<Record, String> {
    let id = RecordId::from_bytes(blob32(row, 0, "id")?);
    *id_out = Some(id);
    let fingerprint = Fingerprint::from_bytes(blob32(row, 1, "fingerprint")?);
    let token = u64::try_from(integer(row, 2, "token")?)
        .map_err(|_| "negative fencing token".to_owned())?;
    let state = match integer(row, 3, "state")? {
        IN_FLIGHT => RecordState::InFlight {
            lease_until: time(row, 4, "lease_until")?,
        },
        COMPLETED => RecordState::Completed {
            completed_at: time(row, 7, "completed_at")?,
            response: match value(row, 9, "response")? {
                ValueRef::Blob(bytes) => Bytes::copy_from_slice(bytes),
                other => return Err(wrong_type("response", "a blob", other)),
            },
        },
        RELEASED => RecordState::Released {
            released_at: time(row, 8, "released_at")?,
        },
        other => return Err(format!("unknown state code {other}")),
    };
    let retention = match integer(row, 5, "retention_ms")? {
        i64::MAX => Duration::MAX,
        ms => Duration::from_millis(
            u64::try_from(ms).map_err(|_| format!("negative retention {ms}ms"))?,
        ),
    };
    Ok(Record {
        id,
        fingerprint,
        token: FencingToken::new(token),
        state,
        retention,
        expires_at: time(row, 6, "expires_at")?,
    })
}

fn value<'r>(row: &'r Row<'_>, index: usize, name: &str) -> Result<ValueRef<'r>, String> {
    row.get_ref(index)
        .map_err(|err| format!("column {name}: {err}"))
}

fn wrong_type(name: &str, expected: &str, found: ValueRef<'_>) -> String {
    format!(
        "column {name} is {:?}, expected {expected}",
        found.data_type()
    )
}

fn blob32(row: &Row<'_>, index: usize, name: &str) -> Result<[u8; 32], String> {
    match value(row, index, name)? {
        ValueRef::Blob(bytes) => bytes
            .try_into()
            .map_err(|_| format!("column {name} is {} bytes, expected 32", bytes.len())),
        other => Err(wrong_type(name, "a 32-byte blob", other)),
    }
}

fn integer(row: &Row<'_>, index: usize, name: &str) -> Result<i64, String> {
    match value(row, index, name)? {
        ValueRef::Integer(i) => Ok(i),
        other => Err(wrong_type(name, "an integer", other)),
    }
}

fn time(row: &Row<'_>, index: usize, name: &str) -> Result<Timestamp, String> {
    match integer(row, index, name)? {
        i64::MAX => Ok(Timestamp::from_millis(u64::MAX)),
        ms => u64::try_from(ms)
            .map(Timestamp::from_millis)
            .map_err(|_| format!("column {name} is a negative time ({ms})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturated_times_read_back_as_never() {
        assert_eq!(timestamp(Timestamp::from_millis(u64::MAX)), i64::MAX);
        assert_eq!(timestamp(Timestamp::from_millis(42)), 42);
        assert_eq!(millis(Duration::from_micros(1500)), 2);
        assert_eq!(millis(Duration::MAX), i64::MAX);
    }
}
