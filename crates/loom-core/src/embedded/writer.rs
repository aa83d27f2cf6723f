//! Group commit: one thread owns redb's single write transaction and runs every write request in
//! batches.
//!
//! Requests from any number of tasks queue on a channel. The writer takes all that are waiting
//! (up to [`MAX_BATCH`]), runs them one after another in one write transaction, commits it with
//! `Durability::Immediate` (one fsync), and only then answers each request. While one batch is
//! being made durable the next one queues, so throughput grows with concurrency while latency
//! stays near one fsync.
//!
//! Invariants:
//! - A request's answer is sent only after the commit that holds its writes returned `Ok`; if the
//!   commit fails, every request in the batch gets the error and none is acknowledged.
//! - A request refused on its merits (a conflict, a limit) must not have written anything: every
//!   operation checks first and writes after. So a refusal never needs a rollback and never
//!   affects the other requests of its batch.
//! - A storage failure (or a panic) inside a request may leave partial writes, so it *poisons*
//!   the batch: the transaction is aborted and every request in it gets the error.
//! - Requests run in the order they were sent; a later request sees the writes of earlier ones.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use redb::Database;
use tokio::sync::oneshot;

use crate::error::{StoreError, StoreResult};

use super::tables::{BACKEND, Tx, se};

/// Most requests in one transaction.
pub(super) const MAX_BATCH: usize = 4096;

type Done = Box<dyn FnOnce(Option<&StoreError>) + Send>;

struct Ran {
    /// Answers the request, given the batch's failure if there was one.
    done: Done,
    /// Set when the request failed in a way that may have left partial writes.
    poison: Option<StoreError>,
}

trait Job: Send {
    fn run(self: Box<Self>, tx: &mut Tx<'_>) -> Ran;
    fn fail(self: Box<Self>, e: StoreError);
}

struct Op<F, R> {
    op: F,
    reply: oneshot::Sender<StoreResult<R>>,
}

impl<F, R> Job for Op<F, R>
where
    F: FnOnce(&mut Tx<'_>) -> StoreResult<R> + Send + 'static,
    R: Send + 'static,
{
    fn run(self: Box<Self>, tx: &mut Tx<'_>) -> Ran {
        let Op { op, reply } = *self;
        let result = catch_unwind(AssertUnwindSafe(|| op(tx)))
            .unwrap_or_else(|panic| Err(StoreError::storage(BACKEND, Panicked::from(panic))));
        match result {
            Ok(value) => Ran {
                done: Box::new(move |failure| {
                    let answer = match failure {
                        None => Ok(value),
                        Some(e) => Err(e.clone()),
                    };
                    // The caller may have stopped waiting (its future was dropped); the
                    // outcome stands either way, so there is nobody left to tell.
                    let _ = reply.send(answer);
                }),
                poison: None,
            },
            Err(e) if e.is_transient() => Ran {
                poison: Some(e.clone()),
                done: Box::new(move |_| {
                    // As above: a caller that went away needs no answer.
                    let _ = reply.send(Err(e));
                }),
            },
            Err(e) => Ran {
                poison: None,
                done: Box::new(move |_| {
                    // As above: a caller that went away needs no answer.
                    let _ = reply.send(Err(e));
                }),
            },
        }
    }

    fn fail(self: Box<Self>, e: StoreError) {
        // As above: a caller that went away needs no answer.
        let _ = self.reply.send(Err(e));
    }
}

/// A panic inside a write request, as an error.
#[derive(Debug, thiserror::Error)]
#[error("write request panicked: {0}")]
struct Panicked(String);

impl From<Box<dyn std::any::Any + Send>> for Panicked {
    fn from(p: Box<dyn std::any::Any + Send>) -> Self {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic".to_owned());
        Panicked(msg)
    }
}

/// Counters of the writer's work.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) commits: AtomicU64,
    pub(super) requests: AtomicU64,
}

/// The handle to the writer thread.
pub(super) struct Writer {
    tx: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    pub(super) counters: Arc<Counters>,
}

impl Writer {
    pub(super) fn start(db: Arc<Database>) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("loom-embedded-writer".into())
            .spawn(move || writer_loop(&db, &rx, &c))?;
        Ok(Writer {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            counters,
        })
    }

    /// Runs `op` in the next batch and returns its result once the batch is durable.
    pub(super) async fn run<R, F>(&self, op: F) -> StoreResult<R>
    where
        F: FnOnce(&mut Tx<'_>) -> StoreResult<R> + Send + 'static,
        R: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Op { op, reply });
        {
            let guard = self.tx.lock().map_err(|_| StoreError::Closed)?;
            let tx = guard.as_ref().ok_or(StoreError::Closed)?;
            tx.send(job).map_err(|_| StoreError::Closed)?;
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Stops taking requests, lets the writer finish the queued ones, and waits for it.
    pub(super) fn shutdown(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle {
            // A panic on the writer thread was already turned into errors for its callers.
            if handle.join().is_err() {
                tracing::error!("embedded store writer thread panicked");
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn writer_loop(db: &Database, rx: &mpsc::Receiver<Box<dyn Job>>, counters: &Counters) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let n = jobs.len() as u64;
        // Immediate durability (redb's default, stated so that it cannot change under us):
        // `commit` returns only once the batch is fsynced, and only then are callers answered.
        let txn = match db.begin_write().map_err(se).and_then(|mut txn| {
            txn.set_durability(redb::Durability::Immediate)
                .map_err(se)?;
            Ok(txn)
        }) {
            Ok(txn) => txn,
            Err(e) => {
                tracing::error!(error = %e, "embedded store could not begin a write transaction");
                for job in jobs {
                    job.fail(e.clone());
                }
                continue;
            }
        };
        let mut done = Vec::with_capacity(jobs.len());
        let mut poison = None;
        let mut tx = Tx::new(&txn);
        for job in jobs {
            if let Some(e) = &poison {
                job.fail(StoreError::clone(e));
                continue;
            }
            let ran = job.run(&mut tx);
            poison = ran.poison;
            done.push(ran.done);
        }
        // The tables close here, before the commit that needs them closed.
        drop(tx);
        let failure = match poison {
            Some(e) => {
                if let Err(abort) = txn.abort() {
                    tracing::error!(error = %abort, "embedded store could not abort a poisoned batch");
                }
                Some(e)
            }
            None => txn.commit().err().map(se),
        };
        if let Some(e) = &failure {
            tracing::error!(error = %e, requests = n, "embedded store batch failed; nothing in it was acknowledged");
        } else {
            counters.commits.fetch_add(1, Ordering::Relaxed);
            counters.requests.fetch_add(n, Ordering::Relaxed);
        }
        for d in done {
            d(failure.as_ref());
        }
    }
}
