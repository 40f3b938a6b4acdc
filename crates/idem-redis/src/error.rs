//! Driver errors to [`idem_core::Error`].

use idem_core::Error;
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// The connection failed while the command was under way (or before it was sent): whether
/// it took effect is unknown.
pub(crate) fn outcome_unknown(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound | ErrorKind::Parse
        )
}

/// The server refused the command for a passing reason; it did not run.
pub(crate) fn refused(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
        )
    ) || matches!(e.code(), Some("OOM" | "BUSY" | "NOREPLICAS"))
}

/// Whether sending the same command again may help. Only idempotent commands are sent again.
pub(crate) fn retryable(e: &RedisError) -> bool {
    outcome_unknown(e) || refused(e)
}

/// `Unavailable` for connection failures (effect unknown) and refusals, `Backend` otherwise.
pub(crate) fn redis_error(context: &str, e: RedisError) -> Error {
    if outcome_unknown(&e) {
        Error::unavailable(
            format!("redis: {context}: the connection failed; whether it took effect is unknown"),
            e,
        )
    } else if refused(&e) {
        Error::unavailable(format!("redis: {context}: refused by the server"), e)
    } else {
        Error::backend(format!("redis: {context}"), e)
    }
}

/// A reply that is not what the script sends.
pub(crate) fn unexpected(context: &str, detail: impl Into<String>) -> Error {
    Error::Backend {
        message: format!("redis: {context}: unexpected reply ({})", detail.into()),
        source: None,
    }
}
