//! The writer thread: the one connection that writes, with group commit.
//!
//! Operations arrive over a bounded channel. The thread takes the first one, drains
//! whatever else is queued (up to the batch limit) and applies them all in one
//! `BEGIN IMMEDIATE ... COMMIT`, so one sync to disk makes the whole batch durable. Each
//! operation runs inside its own savepoint: one that fails is rolled back alone and the
//! others go on. Answers are sent only after the commit: if it fails, every operation of
//! the batch gets the error, and nothing is reported done that is not on disk. Waiters of
//! records that settled are woken after the commit, when the new state is visible.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use idem_core::{Error, RecordId};
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::error::{self, SharedFailure};
use crate::queries::{Db, Shared};
use crate::stats::Counters;

/// What an operation returns when applied: its answer, and the ids whose waiters to wake
/// once the batch is committed.
pub(crate) struct Done<T> {
    pub(crate) value: T,
    pub(crate) settled: Vec<RecordId>,
}

impl<T> Done<T> {
    /// An answer that wakes nobody.
    pub(crate) fn quiet(value: T) -> Self {
        Self {
            value,
            settled: Vec::new(),
        }
    }
}

/// An operation waiting in the writer's queue.
pub(crate) trait Pending: Send {
    /// Applies the operation in the open transaction; false if it failed and its writes
    /// must be rolled back.
    fn apply(&mut self, db: &Db<'_>) -> bool;

    /// Ids whose waiters to wake once the batch is committed.
    fn settled(&self) -> &[RecordId];

    /// Sends the answer: the operation's own result if the batch committed, else the
    /// batch's failure. Returns the operations the answer calls for when nobody received
    /// it (see [`Unanswered`]), for the writer's next batch.
    fn finish(self: Box<Self>, failure: Option<&SharedFailure>) -> Vec<Box<dyn Pending>>;
}

/// What an answer nobody received calls for (a claim's: releasing what it took), as
/// operations for the writer: applied in its next batch when the writer finds the caller
/// gone, or queued by the caller's side when it goes between the answer and its reading.
pub(crate) type Unanswered<T> = Arc<dyn Fn(T) -> Vec<Box<dyn Pending>> + Send + Sync>;

/// The sending end of the writer's queue.
pub(crate) type Queue = mpsc::Sender<Box<dyn Pending>>;

/// A [`Pending`] operation from a closure and the channel its answer goes back on.
struct Task<T, F> {
    work: Option<F>,
    result: Option<Result<Done<T>, Error>>,
    reply: oneshot::Sender<Result<T, Error>>,
    /// Set for an operation that is pointless once its caller has gone (a claim): it is not
    /// applied if the caller went away while it was queued, and its answer goes here if the
    /// caller went away later, before the answer came.
    unanswered: Option<Unanswered<T>>,
}

/// Makes an operation of `work`; the receiver gets its answer.
pub(crate) fn task<T, F>(work: F) -> (Box<dyn Pending>, oneshot::Receiver<Result<T, Error>>)
where
    T: Send + 'static,
    F: FnOnce(&Db<'_>) -> Result<Done<T>, Error> + Send + 'static,
{
    task_for_caller(work, None)
}

/// [`task`], with what its answer calls for if nobody receives it.
fn task_for_caller<T, F>(
    work: F,
    unanswered: Option<Unanswered<T>>,
) -> (Box<dyn Pending>, oneshot::Receiver<Result<T, Error>>)
where
    T: Send + 'static,
    F: FnOnce(&Db<'_>) -> Result<Done<T>, Error> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let task = Task {
        work: Some(work),
        result: None,
        reply,
        unanswered,
    };
    (Box::new(task), answer)
}

impl<T, F> Pending for Task<T, F>
where
    T: Send,
    F: FnOnce(&Db<'_>) -> Result<Done<T>, Error> + Send,
{
    fn apply(&mut self, db: &Db<'_>) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        if self.unanswered.is_some() && self.reply.is_closed() {
            self.result = Some(Err(Error::Unavailable {
                message: "the caller stopped waiting; the operation was not applied".into(),
                source: None,
            }));
            return false;
        }
        let result = catch_unwind(AssertUnwindSafe(|| work(db))).unwrap_or_else(|_| {
            Err(Error::Backend {
                message: format!("{}: the operation panicked", db.shared.path),
                source: None,
            })
        });
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn settled(&self) -> &[RecordId] {
        match &self.result {
            Some(Ok(done)) => &done.settled,
            _ => &[],
        }
    }

    fn finish(self: Box<Self>, failure: Option<&SharedFailure>) -> Vec<Box<dyn Pending>> {
        let answer = match (failure, self.result) {
            (Some(failure), _) => Err(failure.to_error()),
            (None, Some(result)) => result.map(|done| done.value),
            (None, None) => Err(Error::Backend {
                message: "the operation was not applied".into(),
                source: None,
            }),
        };
        // The caller may have stopped waiting (its future was dropped); the operation
        // stands all the same, unless it says what to do with an answer nobody received.
        match (self.reply.send(answer), self.unanswered) {
            (Err(Ok(value)), Some(unanswered)) => unanswered(value),
            _ => Vec::new(),
        }
    }
}

/// The handle to the writer thread: dropping it closes the queue and joins the thread,
/// which finishes the operations already queued first.
#[derive(Debug)]
pub(crate) struct Writer {
    queue: Option<Queue>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Writer {
    /// Starts the writer thread on `conn`.
    pub(crate) fn spawn(
        conn: Connection,
        shared: Arc<Shared>,
        max_batch: usize,
        capacity: usize,
    ) -> Result<Self, Error> {
        let (queue, receiver) = mpsc::channel(capacity);
        let thread = std::thread::Builder::new()
            .name("idem-sqlite-writer".into())
            .spawn({
                let shared = shared.clone();
                move || run(conn, receiver, &shared, max_batch)
            })
            .map_err(|err| {
                Error::backend(
                    format!("{}: cannot start the writer thread", shared.path),
                    err,
                )
            })?;
        Ok(Self {
            queue: Some(queue),
            thread: Some(thread),
            shared,
        })
    }

    /// Operations waiting in the queue.
    pub(crate) fn queued(&self) -> u64 {
        self.queue
            .as_ref()
            .map_or(0, |q| (q.max_capacity() - q.capacity()) as u64)
    }

    /// A sender for the reaper.
    pub(crate) fn queue(&self) -> Option<Queue> {
        self.queue.clone()
    }

    /// Queues `work` and waits for its answer, after its batch committed.
    pub(crate) async fn run<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<Done<T>, Error> + Send + 'static,
    {
        self.run_for_caller(work, None).await
    }

    /// [`run`](Self::run), and with `unanswered` set, for an operation that is pointless
    /// once its caller has gone (a claim): not applied if the caller goes away while it is
    /// queued, and its answer handed to `unanswered` if the caller goes away after it was
    /// applied.
    pub(crate) async fn run_for_caller<T, F>(
        &self,
        work: F,
        unanswered: Option<Unanswered<T>>,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<Done<T>, Error> + Send + 'static,
    {
        let path = &self.shared.path;
        let queue = self
            .queue
            .as_ref()
            .ok_or_else(|| error::stopped(path, "writer thread"))?;
        let caller_side = unanswered.clone().map(|u| (u, queue));
        let (op, receiver) = task_for_caller(work, unanswered);
        let mut answer = Answer {
            receiver,
            unanswered: caller_side,
        };
        queue
            .send(op)
            .await
            .map_err(|_| error::stopped(path, "writer thread"))?;
        Counters::add(&self.shared.stats.submitted, 1);
        let received = (&mut answer.receiver).await;
        answer.unanswered = None;
        received.map_err(|_| Error::Unavailable {
            message: format!(
                "{path}: the writer thread stopped before answering; \
                 the operation may or may not have been applied"
            ),
            source: None,
        })?
    }
}

/// The caller's end of an operation with an [`Unanswered`] handler. Dropped before the
/// answer was read (the caller went away), it closes the channel: an answer not sent yet
/// then goes to the handler on the writer's side, and one already sent to the handler
/// here, whose operations are queued.
struct Answer<'q, T> {
    receiver: oneshot::Receiver<Result<T, Error>>,
    unanswered: Option<(Unanswered<T>, &'q Queue)>,
}

impl<T> Drop for Answer<'_, T> {
    fn drop(&mut self) {
        let Some((unanswered, queue)) = self.unanswered.take() else {
            return;
        };
        self.receiver.close();
        if let Ok(Ok(value)) = self.receiver.try_recv() {
            for op in unanswered(value) {
                if queue.try_send(op).is_err() {
                    tracing::warn!(
                        "sqlite: the writer's queue is full; what an abandoned operation took stays held until its lease ends"
                    );
                }
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            // A panicked writer has nothing left to clean up.
            let _ = thread.join();
        }
    }
}

fn run(
    conn: Connection,
    mut queue: mpsc::Receiver<Box<dyn Pending>>,
    shared: &Shared,
    max_batch: usize,
) {
    let db = Db {
        conn: &conn,
        shared,
    };
    let mut batch = Vec::new();
    // What answers nobody received called for: the next batch starts with them.
    let mut follow_ups: Vec<Box<dyn Pending>> = Vec::new();
    loop {
        batch.append(&mut follow_ups);
        if batch.is_empty() {
            // Blocks for the first operation, then takes whatever else is queued.
            if queue.blocking_recv_many(&mut batch, max_batch) == 0 {
                break;
            }
        } else {
            while batch.len() < max_batch {
                match queue.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
        }
        let outcome = apply_batch(&db, &mut batch);
        let stats = &shared.stats;
        let size = batch.len() as u64;
        Counters::add(&stats.ops, size);
        match &outcome {
            Ok(()) => {
                Counters::add(&stats.commits, 1);
                stats.largest_batch.fetch_max(size, Ordering::Relaxed);
            }
            Err(_) => Counters::add(&stats.failed_batches, 1),
        }
        let failure = outcome.err();
        let mut settled = Vec::new();
        for op in batch.drain(..) {
            if failure.is_none() {
                settled.extend_from_slice(op.settled());
            }
            follow_ups.extend(op.finish(failure.as_ref()));
        }
        for id in &settled {
            shared.notifier.notify(id);
        }
    }
}

/// Applies every operation of the batch in one transaction and commits it.
fn apply_batch(db: &Db<'_>, batch: &mut [Box<dyn Pending>]) -> Result<(), SharedFailure> {
    let path = &db.shared.path;
    let exec = |sql: &str, doing: &str| {
        db.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map(drop)
            .map_err(|err| SharedFailure::new(path, doing, err))
    };
    exec("BEGIN IMMEDIATE", "beginning a transaction")?;
    let applied = batch.iter_mut().try_for_each(|op| {
        exec("SAVEPOINT op", "opening a savepoint")?;
        if !op.apply(db) {
            exec("ROLLBACK TO op", "rolling back a failed operation")?;
        }
        exec("RELEASE op", "closing a savepoint")
    });
    let committed = applied.and_then(|()| exec("COMMIT", "committing"));
    if committed.is_err() && !db.conn.is_autocommit() {
        // Nothing of the batch may stay; the error already says what went wrong.
        let _ = db.conn.execute_batch("ROLLBACK");
    }
    committed
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A task whose operation was applied with `value`, answering on `reply`.
    fn applied(
        value: u32,
        reply: oneshot::Sender<Result<u32, Error>>,
        unanswered: Option<Unanswered<u32>>,
    ) -> Box<dyn Pending> {
        Box::new(Task {
            work: None::<fn(&Db<'_>) -> Result<Done<u32>, Error>>,
            result: Some(Ok(Done::quiet(value))),
            reply,
            unanswered,
        })
    }

    /// A handler that records the answers it gets and calls for one operation each.
    fn handler(handled: &Arc<Mutex<Vec<u32>>>) -> Unanswered<u32> {
        let handled = handled.clone();
        Arc::new(move |value| {
            handled.lock().unwrap().push(value);
            let (reply, _) = oneshot::channel();
            vec![applied(value + 100, reply, None)]
        })
    }

    #[test]
    fn an_answer_nobody_receives_goes_to_its_handler() {
        let handled = Arc::new(Mutex::new(Vec::new()));

        // Received: the handler is not called.
        let (reply, mut answer) = oneshot::channel();
        let follow_ups = applied(1, reply, Some(handler(&handled))).finish(None);
        assert_eq!(answer.try_recv().unwrap().unwrap(), 1);
        assert!(follow_ups.is_empty());

        // Nobody waits: the handler gets the answer, and its operations go to the writer.
        let (reply, answer) = oneshot::channel();
        drop(answer);
        let follow_ups = applied(2, reply, Some(handler(&handled))).finish(None);
        assert_eq!(*handled.lock().unwrap(), vec![2]);
        assert_eq!(follow_ups.len(), 1);

        // A plain operation whose caller went away simply stands.
        let (reply, answer) = oneshot::channel();
        drop(answer);
        assert!(applied(3, reply, None).finish(None).is_empty());
        assert_eq!(*handled.lock().unwrap(), vec![2]);
    }

    #[test]
    fn an_answer_sent_but_never_read_goes_to_the_handler_on_the_callers_side() {
        let handled = Arc::new(Mutex::new(Vec::new()));
        let (queue, mut queued) = mpsc::channel(4);

        // Sent, then the caller went away before reading it.
        let (reply, receiver) = oneshot::channel();
        let answer = Answer {
            receiver,
            unanswered: Some((handler(&handled), &queue)),
        };
        assert!(
            applied(4, reply, Some(handler(&handled)))
                .finish(None)
                .is_empty()
        );
        drop(answer);
        assert_eq!(*handled.lock().unwrap(), vec![4]);
        assert!(queued.try_recv().is_ok(), "its operation was queued");

        // Gone before the answer: the writer's side gets it, once.
        let (reply, receiver) = oneshot::channel();
        drop(Answer {
            receiver,
            unanswered: Some((handler(&handled), &queue)),
        });
        let follow_ups = applied(5, reply, Some(handler(&handled))).finish(None);
        assert_eq!(follow_ups.len(), 1);
        assert_eq!(*handled.lock().unwrap(), vec![4, 5]);
        assert!(queued.try_recv().is_err());

        // Read: nobody else gets it.
        let (reply, receiver) = oneshot::channel();
        let mut answer = Answer {
            receiver,
            unanswered: Some((handler(&handled), &queue)),
        };
        assert!(
            applied(6, reply, Some(handler(&handled)))
                .finish(None)
                .is_empty()
        );
        assert_eq!(answer.receiver.try_recv().unwrap().unwrap(), 6);
        answer.unanswered = None;
        drop(answer);
        assert_eq!(*handled.lock().unwrap(), vec![4, 5]);
        assert!(queued.try_recv().is_err());
    }
}
