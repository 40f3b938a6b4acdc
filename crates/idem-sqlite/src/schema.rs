//! Opening a file: recognising it, creating or migrating its schema, configuring the
//! connections.
//!
//! Nothing is written to a file until it is known to be an idem store or a new, empty
//! database: a foreign file is reported, never converted.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::time::Duration;

use idem_core::Error;
use rusqlite::ffi::ErrorCode;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::error;

/// The `PRAGMA application_id` of an idem store: the bytes `idem`.
pub const APPLICATION_ID: i32 = 0x6964_656d;

/// The schema version this build creates and reads (`PRAGMA user_version`).
pub const SCHEMA_VERSION: u32 = 1;

/// Migration `n` (from 0) takes the schema from version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[include_str!("../migrations/0001_records.sql")];

const _: () = assert!(MIGRATIONS.len() == SCHEMA_VERSION as usize);

const SQLITE_MAGIC: &[u8] = b"SQLite format 3\0";

/// The size the WAL file is truncated back to after a checkpoint, in bytes.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// What the file is, as read before anything is written to it.
#[derive(Debug)]
struct Identity {
    application_id: i32,
    user_version: i64,
    objects: i64,
}

/// Opens the writer's connection: recognises the file, creates or migrates the schema,
/// and configures durability (WAL, `synchronous = FULL`).
pub(crate) fn open_writer(
    path: &Path,
    shown: &str,
    busy_timeout: Duration,
    verify: bool,
) -> Result<Connection, Error> {
    check_header(path, shown)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags)
        .map_err(|err| opening_failed(shown, "opening the file", err))?;
    conn.busy_timeout(busy_timeout)
        .map_err(|err| error::sql(shown, "setting the busy timeout", err))?;

    let identity = identify(&conn, shown)?;
    let fresh = identity.application_id == 0 && identity.user_version == 0 && identity.objects == 0;
    if !fresh {
        check_identity(&identity, shown)?;
    }

    let setup =
        |doing, result: rusqlite::Result<()>| result.map_err(|e| error::sql(shown, doing, e));
    if fresh {
        // Only possible before the first table exists.
        setup(
            "enabling incremental vacuum",
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL"),
        )?;
    }
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|err| opening_failed(shown, "switching to WAL mode", err))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Backend {
            message: format!("{shown}: the file cannot use WAL mode (journal mode is {mode})"),
            source: None,
        });
    }
    setup(
        "setting synchronous = FULL",
        conn.pragma_update(None, "synchronous", "FULL"),
    )?;
    setup(
        "setting fullfsync",
        conn.pragma_update(None, "fullfsync", true),
    )?;
    setup(
        "setting checkpoint_fullfsync",
        conn.pragma_update(None, "checkpoint_fullfsync", true),
    )?;
    setup(
        "setting journal_size_limit",
        conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT),
    )?;

    migrate(&mut conn, shown)?;
    check_schema(&conn, shown)?;
    if verify {
        quick_check(&conn, shown)?;
    }
    Ok(conn)
}

/// Opens a read connection to a store the writer has opened.
pub(crate) fn open_reader(
    path: &Path,
    shown: &str,
    busy_timeout: Duration,
) -> Result<Connection, Error> {
    // Read-write at the file level (WAL readers write the shared-memory index), read-only
    // by `query_only`.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|err| opening_failed(shown, "opening a read connection", err))?;
    conn.busy_timeout(busy_timeout)
        .and_then(|()| conn.pragma_update(None, "query_only", true))
        .map_err(|err| error::sql(shown, "configuring a read connection", err))?;
    Ok(conn)
}

fn corrupt(shown: &str, what: impl std::fmt::Display) -> Error {
    Error::corrupt(format!("{shown}: not an idem store: {what}"))
}

/// Rejects what is plainly not an SQLite database before SQLite sees it: random bytes, a
/// file cut before the end of its header. A missing or empty file is a new store.
fn check_header(path: &Path, shown: &str) -> Result<(), Error> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => {
            return Err(Error::unavailable(
                format!("{shown}: cannot read the file"),
                err,
            ));
        }
    };
    let mut header = Vec::with_capacity(100);
    file.take(100)
        .read_to_end(&mut header)
        .map_err(|err| Error::unavailable(format!("{shown}: cannot read the file"), err))?;
    if header.is_empty() {
        return Ok(());
    }
    if !header.starts_with(SQLITE_MAGIC) {
        return Err(corrupt(shown, "the file is not an SQLite database"));
    }
    if header.len() < 100 {
        return Err(corrupt(
            shown,
            format_args!(
                "the file is {} bytes long, shorter than an SQLite header (torn or truncated)",
                header.len()
            ),
        ));
    }
    // With a write-ahead or rollback journal beside it, the file may legitimately be
    // mid-checkpoint: SQLite recovers it from the journal, and checks it then.
    if has_content(&sidecar(path, "-wal")) || has_content(&sidecar(path, "-journal")) {
        return Ok(());
    }
    let len = std::fs::metadata(path)
        .map_err(|err| Error::unavailable(format!("{shown}: cannot read the file"), err))?
        .len();
    let be32 = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u64::from(n),
    };
    if !page_size.is_power_of_two() || !(512..=65_536).contains(&page_size) {
        return Err(corrupt(
            shown,
            format_args!("invalid page size {page_size}"),
        ));
    }
    if len % page_size != 0 {
        return Err(corrupt(
            shown,
            format_args!(
                "the file is truncated: {len} bytes is not a whole number of {page_size}-byte pages"
            ),
        ));
    }
    // The page count in the header is valid when the change counter matches the
    // version-valid-for number.
    let pages = u64::from(be32(28));
    if be32(24) == be32(92) && len < pages * page_size {
        return Err(corrupt(
            shown,
            format_args!(
                "the file is truncated: its header counts {pages} pages of {page_size} bytes, \
                 it holds {len} bytes"
            ),
        ));
    }
    Ok(())
}

/// The file SQLite keeps beside the database, `suffix` being `-wal` or `-journal`.
fn sidecar(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

fn has_content(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
}

/// Maps a failure to open or first read the file: a damaged file is [`Error::Corrupt`]
/// with a message that says so.
fn opening_failed(shown: &str, doing: &str, err: rusqlite::Error) -> Error {
    match err.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => Error::Corrupt {
            message: format!(
                "{shown}: not a readable idem store: the file is torn, truncated or not an \
                 SQLite database ({doing})"
            ),
            source: Some(Box::new(err)),
        },
        _ => error::sql(shown, doing, err),
    }
}

fn identify(conn: &Connection, shown: &str) -> Result<Identity, Error> {
    const SQL: &str = include_str!("../queries/identify.sql");
    conn.query_row(SQL, [], |row| {
        Ok(Identity {
            application_id: row.get(0)?,
            user_version: row.get(1)?,
            objects: row.get(2)?,
        })
    })
    .map_err(|err| opening_failed(shown, "reading the schema", err))
}

/// Accepts an existing idem store of a version this build knows.
fn check_identity(identity: &Identity, shown: &str) -> Result<(), Error> {
    let Identity {
        application_id,
        user_version,
        objects,
    } = *identity;
    if application_id != APPLICATION_ID {
        return Err(corrupt(
            shown,
            format_args!(
                "an SQLite database of another application (application_id {application_id:#010x}, \
                 user_version {user_version}, {objects} schema objects)"
            ),
        ));
    }
    if user_version > i64::from(SCHEMA_VERSION) {
        return Err(newer(shown, user_version));
    }
    if user_version <= 0 {
        return Err(corrupt(
            shown,
            format_args!("the file has idem's application_id but schema version {user_version}"),
        ));
    }
    Ok(())
}

fn newer(shown: &str, version: i64) -> Error {
    Error::Backend {
        message: format!(
            "{shown}: the store's schema version {version} is newer than this build of \
             idem-sqlite supports ({SCHEMA_VERSION}); upgrade idem to open it"
        ),
        source: None,
    }
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction.
fn migrate(conn: &mut Connection, shown: &str) -> Result<(), Error> {
    let fail = |doing| move |err| error::sql(shown, doing, err);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(fail("starting the migration"))?;
    // Read again under the write lock: another process may have migrated meanwhile.
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(fail("reading the schema version"))?;
    if version > i64::from(SCHEMA_VERSION) {
        return Err(newer(shown, version));
    }
    let from = usize::try_from(version).unwrap_or(0);
    if from == MIGRATIONS.len() {
        return Ok(());
    }
    for migration in &MIGRATIONS[from..] {
        tx.execute_batch(migration)
            .map_err(fail("migrating the schema"))?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .and_then(|()| tx.pragma_update(None, "application_id", APPLICATION_ID))
        .and_then(|()| tx.commit())
        .map_err(fail("recording the schema version"))
}

/// Checks that the queries compile against the file's tables.
fn check_schema(conn: &Connection, shown: &str) -> Result<(), Error> {
    for sql in [
        include_str!("../queries/select_record.sql"),
        include_str!("../queries/upsert_record.sql"),
        include_str!("../queries/purge_expired.sql"),
    ] {
        conn.prepare(sql).map_err(|err| Error::Corrupt {
            message: format!(
                "{shown}: the records table does not match schema version {SCHEMA_VERSION}"
            ),
            source: Some(Box::new(err)),
        })?;
    }
    Ok(())
}

/// `PRAGMA quick_check`: reads every page (time proportional to the file's size).
fn quick_check(conn: &Connection, shown: &str) -> Result<(), Error> {
    let problems: Vec<String> = conn
        .prepare("PRAGMA quick_check(10)")
        .and_then(|mut s| s.query_map([], |row| row.get(0))?.collect())
        .map_err(|err| opening_failed(shown, "checking the file", err))?;
    match problems.as_slice() {
        [ok] if ok == "ok" => Ok(()),
        _ => Err(Error::corrupt(format!(
            "{shown}: the integrity check failed: {}",
            problems.join("; ")
        ))),
    }
}
