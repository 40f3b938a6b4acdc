//! The stored-response format: the bytes the layer hands a store at completion and reads
//! back for a replay.
//!
//! Stores keep these bytes opaque. The format is small, binary and versioned, and
//! [`StoredOutcome::decode`] returns a typed [`DecodeError`] on any malformed input; it
//! never panics and never allocates more than the input's length.
//!
//! # Version 1
//!
//! All integers are big-endian.
//!
//! ```text
//! magic    4 bytes  "IDRS"
//! version  u8       1
//! kind     u8       0 = response, 1 = not stored (too large)
//!
//! kind 0, response:
//!   status        u16
//!   header count  u32
//!   per header:   name length u16, name bytes (lower case), value length u32, value bytes
//!   body length   u64
//!   body bytes
//!
//! kind 1, not stored:
//!   status        u16   the status the first caller received
//!   limit         u64   the replay limit the body exceeded, in bytes
//! ```
//!
//! Nothing may follow the last field. Trailers are not stored.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// The format version [`StoredOutcome::encode`] writes.
pub const FORMAT_VERSION: u8 = 1;

const MAGIC: &[u8; 4] = b"IDRS";
const KIND_RESPONSE: u8 = 0;
const KIND_NOT_STORED: u8 = 1;

/// What a completed record holds: the response to replay, or the fact that the response
/// was too large to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoredOutcome {
    /// A response replayed as it was stored.
    Response(StoredResponse),
    /// The operation ran, but its response exceeded the route's `max_stored_response`:
    /// retries get a `response-too-large-to-replay` problem, never a second execution.
    NotStored(NotStored),
}

/// A stored response: status, the replayable headers, the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status code.
    pub status: StatusCode,
    /// The headers, already stripped of `Set-Cookie` and hop-by-hop headers.
    pub headers: HeaderMap,
    /// The full body.
    pub body: Bytes,
}

/// The marker of a response too large to store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotStored {
    /// The status the first caller received.
    pub status: StatusCode,
    /// The limit the body exceeded, in bytes.
    pub limit: u64,
}

/// Why stored bytes are not a valid stored outcome.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes do not start with the format's magic number.
    #[error("not a stored response: bad magic number")]
    BadMagic,
    /// A version this build cannot read.
    #[error("unsupported stored response version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// An unknown kind byte.
    #[error("unknown stored outcome kind {kind}")]
    UnknownKind {
        /// The kind found.
        kind: u8,
    },
    /// The input ends before a field it announces.
    #[error("stored response truncated at byte {offset}")]
    Truncated {
        /// Where the missing field starts.
        offset: usize,
    },
    /// A status code outside 100–999.
    #[error("invalid status code {status}")]
    InvalidStatus {
        /// The number found.
        status: u16,
    },
    /// A header name that is not a valid HTTP header name.
    #[error("invalid name of header {index}")]
    InvalidHeaderName {
        /// The header's position.
        index: usize,
    },
    /// A header value that is not a valid HTTP header value.
    #[error("invalid value of header {index}")]
    InvalidHeaderValue {
        /// The header's position.
        index: usize,
    },
    /// Bytes after the last field.
    #[error("{count} unexpected bytes after the stored response")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
}

impl StoredOutcome {
    /// Encodes the outcome in the current [`FORMAT_VERSION`].
    ///
    /// A header whose value is longer than `u32::MAX` bytes cannot be represented and is
    /// left out (HTTP implementations cap header sizes far below that).
    pub fn encode(&self) -> Bytes {
        match self {
            StoredOutcome::Response(response) => {
                let headers: Vec<(&HeaderName, &HeaderValue, u16, u32)> = response
                    .headers
                    .iter()
                    .filter_map(|(name, value)| {
                        let name_len = u16::try_from(name.as_str().len()).ok()?;
                        let value_len = u32::try_from(value.len()).ok()?;
                        Some((name, value, name_len, value_len))
                    })
                    .collect();
                // The exact size, so that the buffer is allocated once.
                let size = MAGIC.len()
                    + 1
                    + 1
                    + 2
                    + 4
                    + 8
                    + response.body.len()
                    + headers
                        .iter()
                        .map(|(_, _, name_len, value_len)| {
                            2 + usize::from(*name_len) + 4 + *value_len as usize
                        })
                        .sum::<usize>();
                let mut out = BytesMut::with_capacity(size);
                out.put_slice(MAGIC);
                out.put_u8(FORMAT_VERSION);
                out.put_u8(KIND_RESPONSE);
                out.put_u16(response.status.as_u16());
                // A HeaderMap holds far fewer than u32::MAX entries.
                out.put_u32(u32::try_from(headers.len()).unwrap_or(u32::MAX));
                for (name, value, name_len, value_len) in headers {
                    out.put_u16(name_len);
                    out.put_slice(name.as_str().as_bytes());
                    out.put_u32(value_len);
                    out.put_slice(value.as_bytes());
                }
                out.put_u64(response.body.len() as u64);
                out.put_slice(&response.body);
                debug_assert_eq!(out.len(), size);
                out.freeze()
            }
            StoredOutcome::NotStored(marker) => {
                let mut out = BytesMut::with_capacity(MAGIC.len() + 1 + 1 + 2 + 8);
                out.put_slice(MAGIC);
                out.put_u8(FORMAT_VERSION);
                out.put_u8(KIND_NOT_STORED);
                out.put_u16(marker.status.as_u16());
                out.put_u64(marker.limit);
                out.freeze()
            }
        }
    }

    /// Decodes stored bytes. Any malformed input is a [`DecodeError`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { bytes, offset: 0 };
        if r.take(MAGIC.len()).ok() != Some(&MAGIC[..]) {
            return Err(DecodeError::BadMagic);
        }
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion { version });
        }
        let outcome = match r.u8()? {
            KIND_RESPONSE => {
                let status = r.status()?;
                let count = r.u32()?;
                let mut headers = HeaderMap::new();
                for index in 0..count as usize {
                    let name_len = r.u16()?;
                    let name = HeaderName::from_bytes(r.take(name_len.into())?)
                        .map_err(|_| DecodeError::InvalidHeaderName { index })?;
                    let value_len = r.u32()?;
                    let value = HeaderValue::from_bytes(r.take(value_len as usize)?)
                        .map_err(|_| DecodeError::InvalidHeaderValue { index })?;
                    headers.append(name, value);
                }
                let body_len = r.u64()?;
                let body_len = usize::try_from(body_len)
                    .map_err(|_| DecodeError::Truncated { offset: r.offset })?;
                let body = Bytes::copy_from_slice(r.take(body_len)?);
                StoredOutcome::Response(StoredResponse {
                    status,
                    headers,
                    body,
                })
            }
            KIND_NOT_STORED => {
                let status = r.status()?;
                let limit = r.u64()?;
                StoredOutcome::NotStored(NotStored { status, limit })
            }
            kind => return Err(DecodeError::UnknownKind { kind }),
        };
        let rest = r.bytes.len() - r.offset;
        if rest != 0 {
            return Err(DecodeError::TrailingBytes { count: rest });
        }
        Ok(outcome)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .offset
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(DecodeError::Truncated {
                offset: self.offset,
            })?;
        let slice = &self.bytes[self.offset..end];
        self.offset = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let offset = self.offset;
        self.take(N)?
            .try_into()
            .map_err(|_| DecodeError::Truncated { offset })
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_be_bytes)
    }

    fn status(&mut self) -> Result<StatusCode, DecodeError> {
        let status = self.u16()?;
        StatusCode::from_u16(status).map_err(|_| DecodeError::InvalidStatus { status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredOutcome {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        StoredOutcome::Response(StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(b"{\"id\":1}"),
        })
    }

    #[test]
    fn round_trips_both_kinds() {
        let response = sample();
        assert_eq!(StoredOutcome::decode(&response.encode()), Ok(response));
        let marker = StoredOutcome::NotStored(NotStored {
            status: StatusCode::OK,
            limit: 1024,
        });
        assert_eq!(StoredOutcome::decode(&marker.encode()), Ok(marker));
    }

    #[test]
    fn every_prefix_is_truncated_not_a_panic() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(
                StoredOutcome::decode(&bytes[..len]).is_err(),
                "prefix {len}"
            );
        }
    }

    #[test]
    fn rejects_malformed_input() {
        let good = sample().encode().to_vec();
        assert_eq!(StoredOutcome::decode(b"nope"), Err(DecodeError::BadMagic));
        let mut v = good.clone();
        v[4] = 9;
        assert_eq!(
            StoredOutcome::decode(&v),
            Err(DecodeError::UnsupportedVersion { version: 9 })
        );
        let mut v = good.clone();
        v[5] = 7;
        assert_eq!(
            StoredOutcome::decode(&v),
            Err(DecodeError::UnknownKind { kind: 7 })
        );
        let mut v = good.clone();
        v[6..8].copy_from_slice(&42u16.to_be_bytes());
        assert_eq!(
            StoredOutcome::decode(&v),
            Err(DecodeError::InvalidStatus { status: 42 })
        );
        let mut v = good.clone();
        v.push(0);
        assert_eq!(
            StoredOutcome::decode(&v),
            Err(DecodeError::TrailingBytes { count: 1 })
        );
        // A header count far larger than the input: an error, without a huge allocation
        // (each header consumes input before anything is allocated for it).
        let mut v = good.clone();
        v[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(StoredOutcome::decode(&v).is_err());
        // A body length far larger than the input.
        let mut v = good.clone();
        let body_len_at = v.len() - 8 - 8;
        v[body_len_at..body_len_at + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            StoredOutcome::decode(&v),
            Err(DecodeError::Truncated { .. })
        ));
        // A header name with a space in it.
        let mut v = good;
        v[14] = b' ';
        assert_eq!(
            StoredOutcome::decode(&v),
            Err(DecodeError::InvalidHeaderName { index: 0 })
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = StoredOutcome::decode(&bytes);
            let mut prefixed = b"IDRS\x01\x00".to_vec();
            prefixed.extend_from_slice(&bytes);
            let _ = StoredOutcome::decode(&prefixed);
        }

        #[test]
        fn bodies_round_trip(status in 100u16..1000, body in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let outcome = StoredOutcome::Response(StoredResponse {
                status: StatusCode::from_u16(status).unwrap(),
                headers: HeaderMap::new(),
                body: Bytes::from(body),
            });
            proptest::prop_assert_eq!(StoredOutcome::decode(&outcome.encode()), Ok(outcome));
        }
    }
}
