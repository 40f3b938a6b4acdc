//! The reaper: a thread that purges expired records in bounded batches and hands the freed
//! pages back to the file system, through the writer's queue so that claims interleave.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use idem_core::Error;

use crate::ops;
use crate::queries::Shared;
use crate::stats::Counters;
use crate::writer::{Done, Queue, task};

/// What the reaper does each round.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReaperConfig {
    pub(crate) interval: Duration,
    pub(crate) purge_batch: usize,
    pub(crate) vacuum_pages: u32,
}

/// The stop signal: set once, under the lock the reaper sleeps on.
#[derive(Debug, Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    fn is_set(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }

    /// Sleeps for `interval` or until stopped; true if stopped.
    fn sleep(&self, interval: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        let (stopped, _) = self
            .wake
            .wait_timeout_while(stopped, interval, |stopped| !*stopped)
            .unwrap_or_else(PoisonError::into_inner);
        *stopped
    }
}

/// The handle to the reaper thread: dropping it stops and joins the thread (which then
/// releases its handle on the writer's queue).
#[derive(Debug)]
pub(crate) struct Reaper {
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    pub(crate) fn spawn(
        queue: Queue,
        shared: Arc<Shared>,
        config: ReaperConfig,
    ) -> Result<Self, Error> {
        let stop = Arc::new(Stop::default());
        let thread = std::thread::Builder::new()
            .name("idem-sqlite-reaper".into())
            .spawn({
                let stop = stop.clone();
                let shared = shared.clone();
                move || run(&stop, &queue, &shared, config)
            })
            .map_err(|err| {
                Error::backend(
                    format!("{}: cannot start the reaper thread", shared.path),
                    err,
                )
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stop.set();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Queues `work` on the writer and waits for its answer; `None` if the writer is gone.
fn submit<T, F>(queue: &Queue, shared: &Shared, work: F) -> Option<Result<T, Error>>
where
    T: Send + 'static,
    F: FnOnce(&crate::queries::Db<'_>) -> Result<Done<T>, Error> + Send + 'static,
{
    let (op, answer) = task(work);
    queue.blocking_send(op).ok()?;
    Counters::add(&shared.stats.submitted, 1);
    answer.blocking_recv().ok()
}

fn run(stop: &Stop, queue: &Queue, shared: &Shared, config: ReaperConfig) {
    let stats = &shared.stats;
    // Free pages left by the last round's vacuum.
    let mut free_pages = 0;
    while !stop.sleep(config.interval) {
        let mut purged_any = false;
        loop {
            let limit = config.purge_batch;
            match submit(queue, shared, move |db| ops::purge_expired(db, limit)) {
                None => return,
                Some(Ok(purged)) => {
                    Counters::add(&stats.purged, purged as u64);
                    purged_any |= purged > 0;
                    if purged < limit {
                        break;
                    }
                }
                Some(Err(_)) => {
                    Counters::add(&stats.reaper_errors, 1);
                    break;
                }
            }
            if stop.is_set() {
                return;
            }
        }
        if !purged_any && free_pages == 0 {
            continue;
        }
        let mut previous = u64::MAX;
        loop {
            let pages = config.vacuum_pages;
            match submit(queue, shared, move |db| ops::vacuum(db, pages)) {
                None => return,
                Some(Ok(left)) => {
                    // No progress means a file without incremental vacuum: wait for the
                    // next purge rather than spin.
                    let progressed = left < previous;
                    previous = left;
                    free_pages = if progressed { left } else { 0 };
                    if free_pages == 0 {
                        break;
                    }
                }
                Some(Err(_)) => {
                    Counters::add(&stats.reaper_errors, 1);
                    break;
                }
            }
            if stop.is_set() {
                return;
            }
        }
    }
}
