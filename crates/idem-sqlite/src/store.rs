//! [`SqliteStore`]: the [`Store`] on one SQLite file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use idem_core::notify::CompletionNotifier;
use idem_core::record::{self, Record, RecordState};
use idem_core::{
    ClaimOutcome, ClaimRequest, Error, FencingToken, Inspect, ListFilter, RecordId, Store,
    Timestamp, WaitForCompletion,
};

use crate::ops;
use crate::options::SqliteOptions;
use crate::queries::Shared;
use crate::readers::Readers;
use crate::reaper::{Reaper, ReaperConfig};
use crate::schema;
use crate::stats::{Counters, SqliteStats};
use crate::writer::{Done, Unanswered, Writer, task};

/// The embedded [`Store`]: records in one SQLite file, claims durable before they are
/// answered, concurrent operations grouped into shared transactions.
///
/// Opening starts a writer thread, [`readers`](SqliteOptions::readers) reader threads and,
/// unless disabled, the reaper thread. Dropping the store stops them: the reaper first, then
/// the readers, then the writer once it has finished the operations already queued. Drop
/// waits for them, so the file is closed when it returns.
///
/// Opening does blocking file I/O: call it at start-up, or from a blocking task. Every
/// other method is asynchronous and never blocks the caller's thread on the disk.
///
/// See the [crate documentation](crate) for an example and the durability guarantee.
pub struct SqliteStore {
    // Field order is drop order. The reaper holds a handle on the writer's queue, and the
    // writer stops only once every handle is gone. The readers close before the writer, so
    // that the writer's connection is the file's last: closing it checkpoints the WAL into
    // the database and deletes it.
    reaper: Option<Reaper>,
    readers: Readers,
    writer: Writer,
    shared: Arc<Shared>,
    path: PathBuf,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("clock", &self.shared.clock)
            .field("reaper", &self.reaper.is_some())
            .field("stats", &self.stats())
            .finish()
    }
}

/// What becomes of claims whose caller went away after they were applied, before their
/// answer: each record a claim acquired is released (its caller executes nothing), for the
/// claims `releasable` marks (`release_if_lost`, in the order of the outcomes); `None` if
/// it marks none. A record a claim took over from an earlier attempt stays in flight, as
/// that attempt's outcome is still unknown.
fn release_unanswered<T: 'static>(
    releasable: Vec<bool>,
    outcomes: fn(&T) -> &[ClaimOutcome],
) -> Option<Unanswered<T>> {
    if !releasable.contains(&true) {
        return None;
    }
    Some(Arc::new(move |answer: T| {
        outcomes(&answer)
            .iter()
            .zip(&releasable)
            .filter_map(|(outcome, release)| match outcome {
                ClaimOutcome::Acquired(lease) if *release => {
                    let (id, token) = (lease.id, lease.token);
                    Some(task(move |db| ops::release(db, &id, token)).0)
                }
                _ => None,
            })
            .collect()
    }))
}

impl SqliteStore {
    /// Opens the store in the file at `path`, creating it if it does not exist.
    ///
    /// # Errors
    ///
    /// - [`Error::Corrupt`] for a file that is not an idem store: random bytes, a torn or
    ///   truncated file, another application's SQLite database. The message names the
    ///   file. Nothing is written to such a file.
    /// - [`Error::Backend`] for an idem store of a newer schema version than this build
    ///   knows.
    /// - [`Error::Unavailable`] if the file cannot be opened or is locked by another
    ///   process for longer than the [busy timeout](SqliteOptions::busy_timeout).
    /// - [`Error::InvalidRequest`] for invalid options.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, Error> {
        options.validate()?;
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let writer_conn =
            schema::open_writer(&path, &shown, options.busy_timeout, options.verify_on_open)?;
        let reader_conns = (0..options.readers)
            .map(|_| schema::open_reader(&path, &shown, options.busy_timeout))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            path: shown,
            clock: options.clock.clone(),
            notifier: CompletionNotifier::new(),
            stats: Counters::default(),
        });
        let writer = Writer::spawn(
            writer_conn,
            shared.clone(),
            options.max_batch,
            options.queue_capacity,
        )?;
        let readers = Readers::spawn(reader_conns, shared.clone(), options.queue_capacity)?;
        let reaper = match (options.reaper_interval, writer.queue()) {
            (Some(interval), Some(queue)) => Some(Reaper::spawn(
                queue,
                shared.clone(),
                ReaperConfig {
                    interval,
                    purge_batch: options.purge_batch,
                    vacuum_pages: options.vacuum_pages,
                },
            )?),
            _ => None,
        };
        Ok(Self {
            reaper,
            readers,
            writer,
            shared,
            path,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the store has done since it was opened.
    pub fn stats(&self) -> SqliteStats {
        SqliteStats {
            queued: self.writer.queued(),
            ..self.shared.stats.snapshot()
        }
    }

    /// Answers a replay from a read connection: a live completed record with the same
    /// fingerprint cannot change until it expires, so this needs no write lock.
    async fn replay_from_reader(
        &self,
        request: &ClaimRequest,
    ) -> Result<Option<ClaimOutcome>, Error> {
        let request = request.clone();
        let replay = self
            .readers
            .run(move |db| {
                let Some(existing) = db.select_record(&request.id)? else {
                    return Ok(None);
                };
                if !matches!(existing.state, RecordState::Completed { .. }) {
                    return Ok(None);
                }
                match record::claim(Some(&existing), &request, db.now())? {
                    (outcome @ ClaimOutcome::Completed(_), None) => Ok(Some(outcome)),
                    _ => Ok(None),
                }
            })
            .await?;
        if replay.is_some() {
            Counters::add(&self.shared.stats.replays_from_readers, 1);
        }
        Ok(replay)
    }

    /// The live record of `id`, read on a read connection.
    async fn read_live(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        let id = *id;
        self.readers
            .run(move |db| {
                let record = db.select_record(&id)?;
                let now = db.now();
                Ok(record.filter(|r| r.is_live(now)))
            })
            .await
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Error> {
        request.validate()?;
        if let Some(replay) = self.replay_from_reader(request).await? {
            return Ok(replay);
        }
        let unanswered = release_unanswered(vec![request.release_if_lost], std::slice::from_ref);
        let request = request.clone();
        self.writer
            .run_for_caller(
                move |db| ops::claim(db, &request).map(Done::quiet),
                unanswered,
            )
            .await
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: FencingToken,
        response: Bytes,
    ) -> Result<(), Error> {
        let id = *id;
        self.writer
            .run(move |db| ops::complete(db, &id, token, response))
            .await
    }

    async fn release(&self, id: &RecordId, token: FencingToken) -> Result<(), Error> {
        let id = *id;
        self.writer
            .run(move |db| ops::release(db, &id, token))
            .await
    }

    async fn renew(
        &self,
        id: &RecordId,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Timestamp, Error> {
        let id = *id;
        self.writer
            .run(move |db| ops::renew(db, &id, token, lease))
            .await
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        self.read_live(id).await
    }

    async fn claim_batch(&self, requests: &[ClaimRequest]) -> Result<Vec<ClaimOutcome>, Error> {
        for request in requests {
            request.validate()?;
        }
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let releasable = requests.iter().map(|r| r.release_if_lost).collect();
        let unanswered = release_unanswered(releasable, Vec::as_slice);
        let requests = requests.to_vec();
        self.writer
            .run_for_caller(move |db| ops::claim_batch(db, &requests), unanswered)
            .await
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, Error> {
        if limit == 0 {
            return Ok(0);
        }
        let purged = self
            .writer
            .run(move |db| ops::purge_expired(db, limit))
            .await?;
        Counters::add(&self.shared.stats.purged, purged as u64);
        Ok(purged)
    }

    async fn now(&self) -> Result<Timestamp, Error> {
        Ok(self.shared.clock.now())
    }

    fn completion_waiter(&self) -> Option<&dyn WaitForCompletion> {
        Some(self)
    }

    fn inspector(&self) -> Option<&dyn Inspect> {
        Some(self)
    }
}

#[async_trait]
impl WaitForCompletion for SqliteStore {
    /// Woken by this store's own completions, releases, removals and purges. A record
    /// settled by another process that opened the same file does not wake the waiter:
    /// bound the wait and claim again, as for a lease that passes.
    async fn wait_settled(&self, id: &RecordId) -> Result<(), Error> {
        // Listen before reading, so that a settlement between the two is not missed.
        let settled = self.shared.notifier.listen(id);
        let in_flight = self
            .read_live(id)
            .await?
            .is_some_and(|r| matches!(r.state, RecordState::InFlight { .. }));
        if in_flight {
            settled.await;
        }
        Ok(())
    }
}

#[async_trait]
impl Inspect for SqliteStore {
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Record>, Error> {
        if filter.limit == 0 {
            return Ok(Vec::new());
        }
        let filter = filter.clone();
        self.readers
            .run(move |db| db.list_records(&filter, db.now()))
            .await
    }

    async fn remove(&self, id: &RecordId) -> Result<bool, Error> {
        let id = *id;
        self.writer.run(move |db| ops::remove(db, &id)).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use idem_core::{Fingerprint, ManualClock};

    use super::*;

    #[tokio::test]
    async fn an_unanswered_claim_releases_what_it_acquired_and_keeps_what_it_took_over() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
        let options = SqliteOptions::default()
            .with_clock(Arc::new(clock.clone()))
            .with_reaper_interval(None);
        let store = SqliteStore::open(dir.path().join("idem.db"), options).unwrap();
        let request = |event: &str| {
            ClaimRequest::new(
                RecordId::for_event("unanswered", event),
                Fingerprint::of_bytes(b"x"),
            )
            .with_lease(Duration::from_secs(10))
        };
        let (fresh, stale) = (request("fresh"), request("stale"));
        let acquired = store.claim(&fresh).await.unwrap();
        store.claim(&stale).await.unwrap();
        clock.advance(Duration::from_secs(11));
        let took_over = store.claim(&stale).await.unwrap();
        assert!(matches!(took_over, ClaimOutcome::TookOver { .. }));

        let kept = request("kept");
        let kept_outcome = store.claim(&kept).await.unwrap();

        // As if the callers of these claims had gone before their answers came; the last
        // one's request said not to release what it took.
        let release = release_unanswered(vec![true, true, false], Vec::as_slice).unwrap();
        let follow_ups = release(vec![acquired, took_over, kept_outcome]);
        assert_eq!(follow_ups.len(), 1, "one release, for the acquired record");
        let queue = store.writer.queue().unwrap();
        for op in follow_ups {
            assert!(queue.send(op).await.is_ok());
        }
        // The release is queued behind them; an operation after it sees it applied.
        store.claim(&request("after")).await.unwrap();
        let state = |record: Option<Record>| record.unwrap().state;
        assert!(matches!(
            state(store.get(&fresh.id).await.unwrap()),
            RecordState::Released { .. }
        ));
        assert!(matches!(
            state(store.get(&stale.id).await.unwrap()),
            RecordState::InFlight { .. }
        ));
        assert!(matches!(
            state(store.get(&kept.id).await.unwrap()),
            RecordState::InFlight { .. }
        ));
        assert!(
            release_unanswered::<Vec<ClaimOutcome>>(vec![false, false], Vec::as_slice).is_none()
        );
    }
}
