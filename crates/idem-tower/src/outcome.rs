//! Classes of outcomes: what is stored, what is released, what is unknown.

use std::any::Any;
use std::error::Error as StdError;
use std::fmt;

use http::StatusCode;
use idem_core::BoxError;

/// How an answer of the inner service is treated.
///
/// | class | statuses | what happens |
/// |---|---|---|
/// | [`Definitive`](Self::Definitive) | 1xx, 2xx, 3xx, 4xx other than 408, 425, 429 | stored and replayed |
/// | [`Retryable`](Self::Retryable) | 408, 425, 429, 503 | the claim is released: a retry executes again |
/// | [`ServerError`](Self::ServerError) | other 5xx | stored by default; released with [`Disposition::Release`](crate::Disposition::Release) |
///
/// ```
/// use http::StatusCode;
/// use idem_tower::ResponseClass;
///
/// assert_eq!(ResponseClass::of(StatusCode::CREATED), ResponseClass::Definitive);
/// assert_eq!(ResponseClass::of(StatusCode::TOO_MANY_REQUESTS), ResponseClass::Retryable);
/// assert_eq!(ResponseClass::of(StatusCode::BAD_GATEWAY), ResponseClass::ServerError);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResponseClass {
    /// The operation's final answer.
    Definitive,
    /// The server asked the client to come back: nothing to replay.
    Retryable,
    /// A server failure that may or may not have had effects.
    ServerError,
}

impl ResponseClass {
    /// The class of a status.
    pub fn of(status: StatusCode) -> Self {
        match status.as_u16() {
            408 | 425 | 429 | 503 => ResponseClass::Retryable,
            500..=599 => ResponseClass::ServerError,
            _ => ResponseClass::Definitive,
        }
    }
}

/// Why an outcome is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AmbiguousKind {
    /// The request was sent and no answer came in time (stored as `504`).
    Timeout,
    /// The connection failed after the request was sent (stored as `502`).
    ConnectionLost,
    /// The answer started but its body failed midway (stored as `502`).
    ResponseInterrupted,
    /// An earlier attempt's lease passed before it finished (stored as `502`).
    LeaseExpired,
}

impl AmbiguousKind {
    /// The status of the `outcome-unknown` problem.
    pub fn status(self) -> StatusCode {
        match self {
            AmbiguousKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// A stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            AmbiguousKind::Timeout => "timeout",
            AmbiguousKind::ConnectionLost => "connection-lost",
            AmbiguousKind::ResponseInterrupted => "response-interrupted",
            AmbiguousKind::LeaseExpired => "lease-expired",
        }
    }
}

/// The error an inner service returns when a request *may* have taken effect but no
/// answer came: sent upstream, then a timeout or a reset.
///
/// The layer never silently executes such a request again. With the route's default
/// [`Disposition::Store`](crate::Disposition::Store) it stores an `outcome-unknown` problem
/// (`504` for a timeout, `502` otherwise) and answers it, now and on every retry; with
/// [`Disposition::Release`](crate::Disposition::Release) it releases the claim and returns
/// the error.
///
/// The layer finds it when the inner service's error type is `Ambiguous` itself, or a
/// [`BoxError`] whose value or `source()` chain contains one. Any other error means the
/// request never took effect (it was not sent): the claim is released.
///
/// ```
/// use idem_core::BoxError;
/// use idem_tower::{Ambiguous, AmbiguousKind};
///
/// let error: BoxError = Ambiguous::new(AmbiguousKind::Timeout).into();
/// assert_eq!(Ambiguous::find(&error).map(Ambiguous::kind), Some(AmbiguousKind::Timeout));
/// let other: BoxError = "connect refused".into();
/// assert!(Ambiguous::find(&other).is_none());
/// ```
#[derive(Debug)]
pub struct Ambiguous {
    kind: AmbiguousKind,
    source: Option<BoxError>,
}

impl Ambiguous {
    /// An ambiguous outcome of the given kind.
    pub fn new(kind: AmbiguousKind) -> Self {
        Self { kind, source: None }
    }

    /// An ambiguous outcome caused by `source` (the client's timeout or I/O error).
    pub fn with_source(kind: AmbiguousKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: Some(source.into()),
        }
    }

    /// Why the outcome is unknown.
    pub fn kind(&self) -> AmbiguousKind {
        self.kind
    }

    /// The `Ambiguous` in an inner service's error, if there is one: the error itself, or
    /// in a [`BoxError`]'s `source()` chain.
    pub fn find<E: 'static>(error: &E) -> Option<&Ambiguous> {
        let any: &dyn Any = error;
        if let Some(ambiguous) = any.downcast_ref::<Ambiguous>() {
            return Some(ambiguous);
        }
        let boxed = any.downcast_ref::<BoxError>()?;
        let mut current: Option<&(dyn StdError + 'static)> = Some(boxed.as_ref());
        while let Some(error) = current {
            if let Some(ambiguous) = error.downcast_ref::<Ambiguous>() {
                return Some(ambiguous);
            }
            current = error.source();
        }
        None
    }
}

impl fmt::Display for Ambiguous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the outcome of the request is unknown ({})",
            self.kind.as_str()
        )
    }
}

impl StdError for Ambiguous {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(Ambiguous);

    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }

    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn finds_ambiguity_in_source_chains() {
        let direct = Ambiguous::new(AmbiguousKind::ConnectionLost);
        assert!(Ambiguous::find(&direct).is_some());
        let chained: BoxError = Box::new(Wrapper(Ambiguous::new(AmbiguousKind::Timeout)));
        assert_eq!(
            Ambiguous::find(&chained).map(Ambiguous::kind),
            Some(AmbiguousKind::Timeout)
        );
        assert!(Ambiguous::find(&std::io::Error::other("x")).is_none());
        assert!(Ambiguous::find(&()).is_none());
    }

    #[test]
    fn classes() {
        for (status, class) in [
            (200, ResponseClass::Definitive),
            (302, ResponseClass::Definitive),
            (404, ResponseClass::Definitive),
            (409, ResponseClass::Definitive),
            (408, ResponseClass::Retryable),
            (425, ResponseClass::Retryable),
            (429, ResponseClass::Retryable),
            (503, ResponseClass::Retryable),
            (500, ResponseClass::ServerError),
            (502, ResponseClass::ServerError),
            (504, ResponseClass::ServerError),
        ] {
            assert_eq!(
                ResponseClass::of(StatusCode::from_u16(status).unwrap()),
                class
            );
        }
    }
}
