//! Script replies to outcomes and records, defensively: a stored value that does not decode
//! is `Error::Corrupt`, never a panic; a reply of the wrong shape is `Error::Backend`.

use std::time::Duration;

use bytes::Bytes;
use idem_core::{
    ClaimOutcome, Completion, Error, FencingToken, Fingerprint, Lease, Record, RecordId,
    RecordState, Timestamp,
};
use redis::Value;

use crate::error::unexpected;
use crate::keys::unhex32;

/// The items of a script's array reply, each as bytes.
fn items(context: &str, value: Value) -> Result<Vec<Vec<u8>>, Error> {
    let Value::Array(values) = value else {
        return Err(unexpected(context, format!("{value:?}")));
    };
    values
        .into_iter()
        .map(|v| match v {
            Value::BulkString(bytes) => Ok(bytes),
            Value::SimpleString(s) => Ok(s.into_bytes()),
            Value::Int(n) => Ok(n.to_string().into_bytes()),
            Value::Nil => Ok(Vec::new()),
            other => Err(unexpected(context, format!("{other:?}"))),
        })
        .collect()
}

fn number(id: &RecordId, field: &str, bytes: &[u8]) -> Result<u64, Error> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            Error::corrupt(format!(
                "redis: record {id}: {field} is not a number ({:?})",
                String::from_utf8_lossy(bytes)
            ))
        })
}

fn timestamp(id: &RecordId, field: &str, bytes: &[u8]) -> Result<Timestamp, Error> {
    number(id, field, bytes).map(Timestamp::from_millis)
}

fn token(id: &RecordId, field: &str, bytes: &[u8]) -> Result<FencingToken, Error> {
    number(id, field, bytes).map(FencingToken::new)
}

fn arity(context: &str, items: &[Vec<u8>], n: usize) -> Result<(), Error> {
    if items.len() == n {
        Ok(())
    } else {
        Err(unexpected(
            context,
            format!("{} items, expected {n}", items.len()),
        ))
    }
}

fn corrupt(id: &RecordId, items: &[Vec<u8>]) -> Error {
    let what = items
        .get(1)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .unwrap_or_default();
    Error::corrupt(format!("redis: record {id} does not decode: {what}"))
}

/// The reply of `claim.lua`, which ran with a lease of `lease_ms`.
pub(crate) fn claim(id: &RecordId, lease_ms: u64, value: Value) -> Result<ClaimOutcome, Error> {
    const CONTEXT: &str = "claim";
    if let Value::Int(token) = value {
        // A fresh key: the token is the server's time in ms times 1000, and the lease runs
        // from that time.
        return match u64::try_from(token) {
            Ok(token) if token >= 1000 => Ok(ClaimOutcome::Acquired(Lease {
                id: *id,
                token: FencingToken::new(token),
                lease_until: Timestamp::from_millis((token / 1000).saturating_add(lease_ms)),
            })),
            _ => Err(unexpected(CONTEXT, format!("token {token}"))),
        };
    }
    let mut items = items(CONTEXT, value)?;
    let lease = |items: &[Vec<u8>]| -> Result<Lease, Error> {
        Ok(Lease {
            id: *id,
            token: token(id, "token", &items[1])?,
            lease_until: timestamp(id, "lease_until", &items[2])?,
        })
    };
    match items.first().map(Vec::as_slice) {
        Some(b"acquired") => {
            arity(CONTEXT, &items, 3)?;
            Ok(ClaimOutcome::Acquired(lease(&items)?))
        }
        Some(b"took_over") => {
            arity(CONTEXT, &items, 5)?;
            Ok(ClaimOutcome::TookOver {
                lease: lease(&items)?,
                previous_token: token(id, "taken_over_token", &items[3])?,
                previous_lease_until: timestamp(id, "taken_over_lease_until", &items[4])?,
            })
        }
        Some(b"completed") => {
            arity(CONTEXT, &items, 5)?;
            let response = Bytes::from(std::mem::take(&mut items[4]));
            Ok(ClaimOutcome::Completed(Completion {
                response,
                token: token(id, "token", &items[1])?,
                completed_at: timestamp(id, "settled_at", &items[2])?,
                expires_at: timestamp(id, "expires_at", &items[3])?,
            }))
        }
        Some(b"in_flight") => {
            arity(CONTEXT, &items, 3)?;
            Ok(ClaimOutcome::InFlight {
                lease_until: timestamp(id, "lease_until", &items[1])?,
                now: timestamp(id, "now", &items[2])?,
            })
        }
        Some(b"mismatch") => {
            arity(CONTEXT, &items, 1)?;
            Ok(ClaimOutcome::Mismatch)
        }
        Some(b"corrupt") => Err(corrupt(id, &items)),
        _ => Err(unexpected(CONTEXT, format!("{:?}", items.first()))),
    }
}

/// What `complete.lua`, `release.lua` and `renew.lua` answer.
pub(crate) enum Settled {
    /// Applied; `renew` also gives the new end of the lease.
    Ok(Option<Timestamp>),
    /// Not the current holder.
    Lost(Option<FencingToken>),
}

/// The reply of `complete.lua`, `release.lua` or `renew.lua`.
pub(crate) fn settled(context: &str, id: &RecordId, value: Value) -> Result<Settled, Error> {
    let items = items(context, value)?;
    match items.first().map(Vec::as_slice) {
        Some(b"ok") if items.len() == 1 => Ok(Settled::Ok(None)),
        Some(b"ok") => {
            arity(context, &items, 2)?;
            Ok(Settled::Ok(Some(timestamp(id, "lease_until", &items[1])?)))
        }
        Some(b"lost") => {
            arity(context, &items, 2)?;
            if items[1].is_empty() {
                Ok(Settled::Lost(None))
            } else {
                Ok(Settled::Lost(Some(token(id, "token", &items[1])?)))
            }
        }
        Some(b"corrupt") => Err(corrupt(id, &items)),
        _ => Err(unexpected(context, format!("{:?}", items.first()))),
    }
}

/// The reply of `get.lua`: the server's time, and the record if its hash exists (live or
/// not).
pub(crate) fn record(id: &RecordId, value: Value) -> Result<(Timestamp, Option<Record>), Error> {
    const CONTEXT: &str = "get";
    let mut items = items(CONTEXT, value)?;
    let now = items
        .first()
        .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
        .map(Timestamp::from_millis)
        .ok_or_else(|| unexpected(CONTEXT, "no server time"))?;
    if items.len() == 1 {
        return Ok((now, None));
    }
    arity(CONTEXT, &items, 9)?;
    let response = std::mem::take(&mut items[8]);
    let [
        _,
        fingerprint,
        token_,
        state,
        lease_until,
        retention,
        expires_at,
        settled_at,
        _,
    ] = &items[..]
    else {
        return Err(unexpected(CONTEXT, "arity"));
    };
    let fingerprint = unhex32(fingerprint)
        .map(Fingerprint::from_bytes)
        .ok_or_else(|| Error::corrupt(format!("redis: record {id}: malformed fingerprint")))?;
    let state = match &state[..] {
        b"in_flight" => RecordState::InFlight {
            lease_until: timestamp(id, "lease_until", lease_until)?,
        },
        b"completed" => RecordState::Completed {
            response: Bytes::from(response),
            completed_at: timestamp(id, "settled_at", settled_at)?,
        },
        b"released" => RecordState::Released {
            released_at: timestamp(id, "settled_at", settled_at)?,
        },
        other => {
            return Err(Error::corrupt(format!(
                "redis: record {id}: unknown state {:?}",
                String::from_utf8_lossy(other)
            )));
        }
    };
    let record = Record {
        id: *id,
        fingerprint,
        token: token(id, "token", token_)?,
        state,
        retention: Duration::from_millis(number(id, "retention", retention)?),
        expires_at: timestamp(id, "expires_at", expires_at)?,
    };
    Ok((now, Some(record)))
}

/// The reply of `TIME`: seconds and microseconds, to milliseconds.
pub(crate) fn time(value: Value) -> Result<Timestamp, Error> {
    const CONTEXT: &str = "TIME";
    let items = items(CONTEXT, value)?;
    let parse = |b: &[u8]| std::str::from_utf8(b).ok()?.parse::<u64>().ok();
    match &items[..] {
        [seconds, micros] => match (parse(seconds), parse(micros)) {
            (Some(s), Some(us)) => Ok(Timestamp::from_millis(
                s.saturating_mul(1000).saturating_add(us / 1000),
            )),
            _ => Err(unexpected(CONTEXT, "not numbers")),
        },
        _ => Err(unexpected(CONTEXT, format!("{} items", items.len()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(items: &[&[u8]]) -> Value {
        Value::Array(
            items
                .iter()
                .map(|i| Value::BulkString(i.to_vec()))
                .collect(),
        )
    }

    fn id() -> RecordId {
        RecordId::for_event("ns", "e")
    }

    #[test]
    fn claim_replies_decode() {
        assert_eq!(
            claim(&id(), 30_000, bulk(&[b"acquired", b"17", b"1000"])).unwrap(),
            ClaimOutcome::Acquired(Lease {
                id: id(),
                token: FencingToken::new(17),
                lease_until: Timestamp::from_millis(1000)
            })
        );
        assert!(matches!(
            claim(&id(), 30_000, bulk(&[b"took_over", b"18", b"2000", b"17", b"1000"])).unwrap(),
            ClaimOutcome::TookOver { previous_token, .. } if previous_token == FencingToken::new(17)
        ));
        match claim(
            &id(),
            30_000,
            bulk(&[b"completed", b"17", b"5", b"9", b"\0\xff"]),
        )
        .unwrap()
        {
            ClaimOutcome::Completed(c) => assert_eq!(c.response, &b"\0\xff"[..]),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            claim(&id(), 30_000, bulk(&[b"mismatch"])).unwrap(),
            ClaimOutcome::Mismatch
        );
        // A fresh key's reply: the token alone, the lease running from its time.
        assert_eq!(
            claim(&id(), 30_000, Value::Int(1_764_000_000_123_000)).unwrap(),
            ClaimOutcome::Acquired(Lease {
                id: id(),
                token: FencingToken::new(1_764_000_000_123_000),
                lease_until: Timestamp::from_millis(1_764_000_000_123 + 30_000)
            })
        );
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        assert!(matches!(
            claim(&id(), 30_000, bulk(&[b"acquired", b"x", b"1"])),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            claim(&id(), 30_000, bulk(&[b"corrupt", b"missing fields"])),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            claim(&id(), 30_000, bulk(&[b"acquired"])),
            Err(Error::Backend { .. })
        ));
        for token in [-1, 0, 1, 999] {
            assert!(matches!(
                claim(&id(), 30_000, Value::Int(token)),
                Err(Error::Backend { .. })
            ));
        }
        assert!(matches!(
            record(
                &id(),
                bulk(&[
                    b"1",
                    b"nothex",
                    b"1",
                    b"in_flight",
                    b"1",
                    b"1",
                    b"1",
                    b"",
                    b""
                ])
            ),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            record(
                &id(),
                bulk(&[
                    b"1",
                    &[b'a'; 64],
                    b"1",
                    b"exploded",
                    b"1",
                    b"1",
                    b"1",
                    b"",
                    b""
                ])
            ),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn time_is_milliseconds() {
        assert_eq!(
            time(bulk(&[b"1700000000", b"123456"])).unwrap(),
            Timestamp::from_millis(1_700_000_000_123)
        );
    }
}
