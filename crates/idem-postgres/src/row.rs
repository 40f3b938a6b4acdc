//! Rows to records, defensively: a malformed value is `Error::Corrupt`, never a panic.

use bytes::Bytes;
use idem_core::{Error, FencingToken, Fingerprint, Record, RecordId, RecordState, Timestamp};
use std::time::Duration;
use tokio_postgres::Row;

pub(crate) fn decode_error(e: tokio_postgres::Error) -> Error {
    Error::Corrupt {
        message: "postgres: a record row does not decode".into(),
        source: Some(Box::new(e)),
    }
}

pub(crate) fn timestamp(ms: i64) -> Result<Timestamp, Error> {
    u64::try_from(ms)
        .map(Timestamp::from_millis)
        .map_err(|_| Error::corrupt(format!("postgres: negative timestamp {ms}")))
}

pub(crate) fn token(value: i64) -> Result<FencingToken, Error> {
    u64::try_from(value)
        .map(FencingToken::new)
        .map_err(|_| Error::corrupt(format!("postgres: negative fencing token {value}")))
}

pub(crate) fn token_param(token: FencingToken) -> Result<i64, Error> {
    // A token that does not fit was never issued by this store: no row can match it.
    Ok(i64::try_from(token.get()).unwrap_or(-1))
}

/// The record of a row, and the (token, lease end) of the lease it took over, if any.
pub(crate) fn record(row: &Row) -> Result<(Record, Option<(i64, i64)>), Error> {
    let id: &[u8] = row.try_get("id").map_err(decode_error)?;
    let fingerprint: &[u8] = row.try_get("fingerprint").map_err(decode_error)?;
    let state: i16 = row.try_get("state").map_err(decode_error)?;
    let lease_until: i64 = row.try_get("lease_until").map_err(decode_error)?;
    let retention: i64 = row.try_get("retention").map_err(decode_error)?;
    let settled_at: Option<i64> = row.try_get("settled_at").map_err(decode_error)?;
    let response: Option<&[u8]> = row.try_get("response").map_err(decode_error)?;
    let taken_over_token: Option<i64> = row.try_get("taken_over_token").map_err(decode_error)?;
    let taken_over_until: Option<i64> = row
        .try_get("taken_over_lease_until")
        .map_err(decode_error)?;
    let id = RecordId::from_slice(id)
        .ok_or_else(|| Error::corrupt("postgres: a record id is not 32 bytes"))?;
    let settled = || {
        settled_at
            .ok_or_else(|| Error::corrupt("postgres: settled record without settled_at"))
            .and_then(timestamp)
    };
    let state =
        match state {
            0 => RecordState::InFlight {
                lease_until: timestamp(lease_until)?,
            },
            1 => RecordState::Completed {
                response: Bytes::copy_from_slice(response.ok_or_else(|| {
                    Error::corrupt("postgres: completed record without a response")
                })?),
                completed_at: settled()?,
            },
            2 => RecordState::Released {
                released_at: settled()?,
            },
            other => {
                return Err(Error::corrupt(format!(
                    "postgres: unknown record state {other}"
                )));
            }
        };
    let record = Record {
        id,
        fingerprint: Fingerprint::from_slice(fingerprint)
            .ok_or_else(|| Error::corrupt("postgres: a fingerprint is not 32 bytes"))?,
        token: token(row.try_get("token").map_err(decode_error)?)?,
        state,
        retention: Duration::from_millis(
            u64::try_from(retention).map_err(|_| Error::corrupt("postgres: negative retention"))?,
        ),
        expires_at: timestamp(row.try_get("expires_at").map_err(decode_error)?)?,
    };
    Ok((record, taken_over_token.zip(taken_over_until)))
}
