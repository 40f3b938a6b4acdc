//! How a store is opened.

use std::sync::Arc;
use std::time::Duration;

use idem_core::{Clock, Error, SystemClock};

/// Options of [`SqliteStore::open`](crate::SqliteStore::open). Start from
/// [`SqliteOptions::default()`] and change what you need with the `with_` methods.
///
/// | option | default | meaning |
/// |---|---|---|
/// | [`clock`](Self::clock) | [`SystemClock`] | the clock of every lease and expiry decision |
/// | [`readers`](Self::readers) | 4 | read connections (threads) for `get`, `list` and replays |
/// | [`max_batch`](Self::max_batch) | 512 operations | most operations committed in one transaction |
/// | [`queue_capacity`](Self::queue_capacity) | 4096 operations | operations waiting for the writer before callers wait to queue |
/// | [`busy_timeout`](Self::busy_timeout) | 5 s | how long to wait for a lock held by another process |
/// | [`reaper_interval`](Self::reaper_interval) | 1 s | pause between purges of expired records; `None`: no reaper |
/// | [`purge_batch`](Self::purge_batch) | 1000 records | records deleted per purge transaction |
/// | [`vacuum_pages`](Self::vacuum_pages) | 1024 pages | free pages handed back to the file system per vacuum transaction |
/// | [`verify_on_open`](Self::verify_on_open) | false | run `PRAGMA quick_check` when opening |
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// The clock of every lease and expiry decision. Default: [`SystemClock`]; tests pass a
    /// [`ManualClock`](idem_core::ManualClock).
    pub clock: Arc<dyn Clock>,
    /// Read connections, each on its own thread, for `get`, `list`, `wait_settled` and
    /// replays of completed records. At least 1; default 4.
    pub readers: usize,
    /// The most operations the writer commits in one transaction. At least 1; default 512.
    pub max_batch: usize,
    /// Operations that may wait for the writer; beyond this, callers wait asynchronously to
    /// queue theirs. At least 1; default 4096.
    pub queue_capacity: usize,
    /// How long an operation waits for a lock held by another process on the same file
    /// before it fails with [`Error::Unavailable`]. Default 5 s.
    pub busy_timeout: Duration,
    /// The pause between two rounds of the reaper, which purges expired records and hands
    /// freed pages back to the file system. `None` disables the reaper (call
    /// [`purge_expired`](idem_core::Store::purge_expired) yourself). Default 1 s.
    pub reaper_interval: Option<Duration>,
    /// Records the reaper deletes per transaction; claims run between two such
    /// transactions. At least 1; default 1000.
    pub purge_batch: usize,
    /// Free pages the reaper hands back to the file system per transaction
    /// (`PRAGMA incremental_vacuum`). At least 1; default 1024 (4 MiB with SQLite's default
    /// 4 KiB pages).
    pub vacuum_pages: u32,
    /// Whether to check the whole file (`PRAGMA quick_check`) when opening: time
    /// proportional to its size. Without it, damage is found when a damaged page is read.
    /// Default false.
    pub verify_on_open: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            readers: 4,
            max_batch: 512,
            queue_capacity: 4096,
            busy_timeout: Duration::from_secs(5),
            reaper_interval: Some(Duration::from_secs(1)),
            purge_batch: 1000,
            vacuum_pages: 1024,
            verify_on_open: false,
        }
    }
}

impl SqliteOptions {
    /// Sets [`clock`](Self::clock).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Sets [`readers`](Self::readers).
    pub fn with_readers(mut self, readers: usize) -> Self {
        self.readers = readers;
        self
    }

    /// Sets [`max_batch`](Self::max_batch).
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch;
        self
    }

    /// Sets [`queue_capacity`](Self::queue_capacity).
    pub fn with_queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity;
        self
    }

    /// Sets [`busy_timeout`](Self::busy_timeout).
    pub fn with_busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Sets [`reaper_interval`](Self::reaper_interval); `None` disables the reaper.
    pub fn with_reaper_interval(mut self, interval: Option<Duration>) -> Self {
        self.reaper_interval = interval;
        self
    }

    /// Sets [`purge_batch`](Self::purge_batch).
    pub fn with_purge_batch(mut self, records: usize) -> Self {
        self.purge_batch = records;
        self
    }

    /// Sets [`vacuum_pages`](Self::vacuum_pages).
    pub fn with_vacuum_pages(mut self, pages: u32) -> Self {
        self.vacuum_pages = pages;
        self
    }

    /// Sets [`verify_on_open`](Self::verify_on_open).
    pub fn with_verify_on_open(mut self, verify: bool) -> Self {
        self.verify_on_open = verify;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| {
            Err(Error::InvalidRequest {
                reason: format!("invalid sqlite store options: {reason}"),
            })
        };
        if self.readers == 0 {
            return invalid("readers must be at least 1".into());
        }
        if self.max_batch == 0 {
            return invalid("max_batch must be at least 1".into());
        }
        if self.queue_capacity == 0 || self.queue_capacity > tokio::sync::Semaphore::MAX_PERMITS {
            return invalid(format!(
                "queue_capacity must be at least 1 and at most {}",
                tokio::sync::Semaphore::MAX_PERMITS
            ));
        }
        if self.purge_batch == 0 {
            return invalid("purge_batch must be at least 1".into());
        }
        if self.vacuum_pages == 0 {
            return invalid("vacuum_pages must be at least 1".into());
        }
        if self.reaper_interval == Some(Duration::ZERO) {
            return invalid(
                "reaper_interval must be positive (or None to disable the reaper)".into(),
            );
        }
        Ok(())
    }
}
