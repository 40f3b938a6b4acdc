//! Read connections: a small pool of threads, each with its own connection. WAL mode lets
//! them read committed data while the writer writes.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use idem_core::Error;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::error;
use crate::queries::{Db, Shared};

type Job = Box<dyn FnOnce(&Db<'_>) + Send>;

/// The handle to the reader threads: dropping it closes their queue and joins them.
#[derive(Debug)]
pub(crate) struct Readers {
    queue: Option<mpsc::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Readers {
    /// Starts one thread per connection.
    pub(crate) fn spawn(
        connections: Vec<Connection>,
        shared: Arc<Shared>,
        capacity: usize,
    ) -> Result<Self, Error> {
        let (queue, receiver) = mpsc::channel::<Job>(capacity);
        let receiver = Arc::new(Mutex::new(receiver));
        let mut readers = Self {
            queue: Some(queue),
            threads: Vec::with_capacity(connections.len()),
            shared: shared.clone(),
        };
        for (n, conn) in connections.into_iter().enumerate() {
            let receiver = receiver.clone();
            let thread_shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("idem-sqlite-reader-{n}"))
                .spawn(move || run(&conn, &receiver, &thread_shared))
                .map_err(|err| {
                    Error::backend(
                        format!("{}: cannot start a reader thread", shared.path),
                        err,
                    )
                })?;
            readers.threads.push(thread);
        }
        Ok(readers)
    }

    /// Runs `read` on a read connection.
    pub(crate) async fn run<T, F>(&self, read: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T, Error> + Send + 'static,
    {
        let path = &self.shared.path;
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |db| {
            let result = catch_unwind(AssertUnwindSafe(|| read(db))).unwrap_or_else(|_| {
                Err(Error::Backend {
                    message: format!("{}: a read panicked", db.shared.path),
                    source: None,
                })
            });
            // The caller may have stopped waiting; a read changes nothing.
            let _ = reply.send(result);
        });
        let queue = self
            .queue
            .as_ref()
            .ok_or_else(|| error::stopped(path, "reader pool"))?;
        queue
            .send(job)
            .await
            .map_err(|_| error::stopped(path, "reader pool"))?;
        answer
            .await
            .map_err(|_| error::stopped(path, "reader pool"))?
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.queue.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn run(conn: &Connection, queue: &Mutex<mpsc::Receiver<Job>>, shared: &Shared) {
    let db = Db { conn, shared };
    loop {
        // One thread waits on the queue at a time; the others wait for the lock.
        let job = queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .blocking_recv();
        let Some(job) = job else { return };
        job(&db);
    }
}
