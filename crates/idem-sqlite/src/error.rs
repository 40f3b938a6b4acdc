//! Driver errors mapped into [`idem_core::Error`], keeping the driver's error as the source.

use std::sync::Arc;

use idem_core::{BoxError, Error};
use rusqlite::ffi::ErrorCode;

/// Maps a driver error met while `doing` something on the file at `path`.
pub(crate) fn sql(path: &str, doing: &str, err: rusqlite::Error) -> Error {
    classify(
        err.sqlite_error_code(),
        format!("{path}: {doing}"),
        Box::new(err),
    )
}

/// The variant for an SQLite result code: damaged files are [`Error::Corrupt`], what a retry
/// may cure (locks, I/O, a full disk) is [`Error::Unavailable`], the rest is
/// [`Error::Backend`].
fn classify(code: Option<ErrorCode>, message: String, source: BoxError) -> Error {
    match code {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => Error::Corrupt {
            message,
            source: Some(source),
        },
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::ReadOnly
            | ErrorCode::PermissionDenied
            | ErrorCode::OutOfMemory
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::NoLargeFileSupport,
        ) => Error::unavailable(message, source),
        _ => Error::backend(message, source),
    }
}

/// A failure that every operation of a batch reports: the driver error is shared, and each
/// operation gets its own [`Error`] built from it.
#[derive(Clone, Debug)]
pub(crate) struct SharedFailure {
    code: Option<ErrorCode>,
    message: String,
    source: Arc<rusqlite::Error>,
}

impl SharedFailure {
    pub(crate) fn new(path: &str, doing: &str, err: rusqlite::Error) -> Self {
        Self {
            code: err.sqlite_error_code(),
            message: format!("{path}: {doing}"),
            source: Arc::new(err),
        }
    }

    pub(crate) fn to_error(&self) -> Error {
        classify(
            self.code,
            self.message.clone(),
            Box::new(self.source.clone()),
        )
    }
}

/// The writer or reader threads are gone (the store is shutting down, or a thread died).
pub(crate) fn stopped(path: &str, what: &str) -> Error {
    Error::Unavailable {
        message: format!("{path}: the {what} has stopped"),
        source: None,
    }
}
