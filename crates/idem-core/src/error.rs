//! The error type of every store operation.

use crate::{FencingToken, RecordId};

/// A boxed error from a backend driver, kept as the `source()` of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A failure of a store operation. Domain outcomes (in flight, mismatch, replay) are not
/// errors: they are variants of [`ClaimOutcome`](crate::ClaimOutcome).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A client's idempotency key is malformed.
    #[error("invalid idempotency key: {0}")]
    InvalidKey(#[from] crate::KeyError),
    /// The token is not the current holder's: the lease was taken over, released,
    /// completed or never existed. Nothing was changed.
    #[error("lease lost on record {id:?}: token {token} is not the current holder's")]
    LeaseLost {
        /// The record.
        id: RecordId,
        /// The token presented.
        token: FencingToken,
        /// The record's current token, if the record exists.
        current: Option<FencingToken>,
    },
    /// The request itself is invalid (a zero lease, say); nothing was changed.
    #[error("invalid request: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// The store cannot be reached or refused the operation; whether the operation took
    /// effect is unknown unless the variant's context says otherwise.
    #[error("store unavailable: {message}")]
    Unavailable {
        /// What failed.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
    /// Stored data cannot be read back: a torn or foreign file, a record that fails to
    /// decode. It is never replayed.
    #[error("store data is corrupt: {message}")]
    Corrupt {
        /// What was found.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// Any other backend failure.
    #[error("store error: {message}")]
    Backend {
        /// What failed.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// An [`Error::Backend`] with a source.
    pub fn backend(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// An [`Error::Unavailable`] with a source.
    pub fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// An [`Error::Corrupt`] without a source.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::Corrupt {
            message: message.into(),
            source: None,
        }
    }

    /// An [`Error::Corrupt`] with a source.
    pub fn corrupt_with(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Corrupt {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// True for [`Error::LeaseLost`].
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Error::LeaseLost { .. })
    }
}
