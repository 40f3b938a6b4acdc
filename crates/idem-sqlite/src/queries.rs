//! The queries, each a `.sql` file next to the small function that runs it.

use idem_core::notify::CompletionNotifier;
use idem_core::record::Record;
use idem_core::{Clock, Error, ListFilter, RecordId, Timestamp};
use rusqlite::{Connection, params};

use crate::codec;
use crate::error;
use crate::stats::Counters;

/// What every connection's thread shares: the file's name for messages, the clock, the
/// waiters and the counters.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The file, as shown in messages.
    pub(crate) path: String,
    pub(crate) clock: std::sync::Arc<dyn Clock>,
    pub(crate) notifier: CompletionNotifier,
    pub(crate) stats: Counters,
}

/// A connection and what its queries need around it.
pub(crate) struct Db<'a> {
    pub(crate) conn: &'a Connection,
    pub(crate) shared: &'a Shared,
}

impl Db<'_> {
    /// The store's time.
    pub(crate) fn now(&self) -> Timestamp {
        self.shared.clock.now()
    }

    fn fail(&self, doing: &'static str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
        move |err| error::sql(&self.shared.path, doing, err)
    }

    /// The record of `id`, live or expired.
    pub(crate) fn select_record(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        const SQL: &str = include_str!("../queries/select_record.sql");
        let fail = || self.fail("reading a record");
        let mut statement = self.conn.prepare_cached(SQL).map_err(fail())?;
        let mut rows = statement.query([&id.as_bytes()[..]]).map_err(fail())?;
        match rows.next().map_err(fail())? {
            Some(row) => codec::decode(&self.shared.path, row).map(Some),
            None => Ok(None),
        }
    }

    /// Writes `record`, replacing the id's row.
    pub(crate) fn upsert_record(&self, record: &Record) -> Result<(), Error> {
        const SQL: &str = include_str!("../queries/upsert_record.sql");
        let fail = || self.fail("writing a record");
        let row = codec::encode(&self.shared.path, record)?;
        self.conn
            .prepare_cached(SQL)
            .map_err(fail())?
            .execute(params![
                row.id,
                row.fingerprint,
                row.token,
                row.state,
                row.lease_until,
                row.retention_ms,
                row.expires_at,
                row.completed_at,
                row.released_at,
                row.response,
            ])
            .map_err(fail())?;
        Ok(())
    }

    /// Deletes the record of `id`; returns whether one existed.
    pub(crate) fn delete_record(&self, id: &RecordId) -> Result<bool, Error> {
        const SQL: &str = include_str!("../queries/delete_record.sql");
        let fail = || self.fail("deleting a record");
        let deleted = self
            .conn
            .prepare_cached(SQL)
            .map_err(fail())?
            .execute([&id.as_bytes()[..]])
            .map_err(fail())?;
        Ok(deleted > 0)
    }

    /// Deletes up to `limit` records expired at `now`; returns their ids.
    pub(crate) fn purge_expired(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<RecordId>, Error> {
        const SQL: &str = include_str!("../queries/purge_expired.sql");
        let fail = || self.fail("purging expired records");
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut statement = self.conn.prepare_cached(SQL).map_err(fail())?;
        let mut rows = statement
            .query(params![codec::timestamp(now), limit])
            .map_err(fail())?;
        let mut purged = Vec::new();
        while let Some(row) = rows.next().map_err(fail())? {
            // A malformed id (which the table's checks forbid) is deleted all the same; it
            // cannot have waiters to wake.
            if let Ok(rusqlite::types::ValueRef::Blob(bytes)) = row.get_ref(0) {
                purged.extend(RecordId::from_slice(bytes));
            }
        }
        Ok(purged)
    }

    /// Live records at `now` matching `filter`, in ascending id order.
    pub(crate) fn list_records(
        &self,
        filter: &ListFilter,
        now: Timestamp,
    ) -> Result<Vec<Record>, Error> {
        const SQL: &str = include_str!("../queries/list_records.sql");
        let fail = || self.fail("listing records");
        let after: &[u8] = filter.after.as_ref().map_or(&[], |id| &id.as_bytes()[..]);
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        let mut statement = self.conn.prepare_cached(SQL).map_err(fail())?;
        let mut rows = statement
            .query(params![
                codec::timestamp(now),
                filter.state.map(codec::state_code),
                after,
                limit
            ])
            .map_err(fail())?;
        let mut found = Vec::new();
        while let Some(row) = rows.next().map_err(fail())? {
            found.push(codec::decode(&self.shared.path, row)?);
        }
        Ok(found)
    }

    /// Pages on the freelist.
    pub(crate) fn freelist_count(&self) -> Result<u64, Error> {
        const SQL: &str = include_str!("../queries/freelist_count.sql");
        let pages: i64 = self
            .conn
            .prepare_cached(SQL)
            .and_then(|mut s| s.query_row([], |row| row.get(0)))
            .map_err(self.fail("counting free pages"))?;
        Ok(u64::try_from(pages).unwrap_or(0))
    }

    /// Hands up to `pages` free pages back to the file system; returns how many remain free.
    pub(crate) fn incremental_vacuum(&self, pages: u32) -> Result<u64, Error> {
        if self.freelist_count()? == 0 {
            return Ok(0);
        }
        let fail = || self.fail("vacuuming free pages");
        // A pragma takes no parameters; `pages` is a number. The statement frees one page
        // per step, so it is stepped to the end.
        let mut statement = self
            .conn
            .prepare(&format!("PRAGMA incremental_vacuum({pages})"))
            .map_err(fail())?;
        let mut rows = statement.query([]).map_err(fail())?;
        while rows.next().map_err(fail())?.is_some() {}
        drop(rows);
        self.freelist_count()
    }
}
