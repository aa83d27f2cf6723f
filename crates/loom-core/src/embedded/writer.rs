//! Group commit: one thread owns redb's single write transaction and runs every write request in
//! batches.
//!
//! Requests from any number of tasks queue on a channel. The writer takes all that are waiting
//! (up to [`MAX_BATCH`]), runs them one after another in one write transaction, and answers each
//! request only once the batch is durable. While one batch is being made durable the next one
//! queues, so throughput grows with concurrency while latency stays near one fsync.
//!
//! How a batch becomes durable depends on the store:
//! - On disk, through the redo log (`redo.rs`): the batch commits to redb without an fsync, its
//!   writes go to the log thread as one record, and the log thread answers the requests once
//!   the record is fsynced. The writer goes on with the next batch meanwhile. Every
//!   [`CHECKPOINT_EVERY`] (or [`CHECKPOINT_BYTES`] of log, or after [`IDLE_CHECKPOINT`] without
//!   requests) the writer makes redb itself durable and the log is emptied.
//! - In memory or on a caller's redb backend: each batch commits with `Durability::Immediate`.
//!
//! Invariants (the durability rules are numbered in RELIABILITY.md):
//! - D1: a request's answer is sent only after the batch that holds its writes is durable; if
//!   the commit or the log fails, every request in the batch gets the error and none is
//!   acknowledged.
//! - D15: a request refused on its merits (a conflict, a limit) must not have written anything:
//!   every operation checks first and writes after, and a refused request that wrote anyway
//!   aborts its batch. So a refusal never needs a rollback and never affects the other
//!   requests of its batch.
//! - D3: a failed commit, log write, sync or checkpoint, or a panic on this thread or the log
//!   thread, stops the store until it is opened again (`reopen.rs`).
//! - A storage failure (or a panic) inside a request may leave partial writes, so it *poisons*
//!   the batch: the transaction is aborted and every request in it gets the error.
//! - Requests run in the order they were sent; a later request sees the writes of earlier ones.

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::Database;
use tokio::sync::oneshot;

use crate::error::{StoreError, StoreResult};

use super::redo::{self, Done, Durability, Item, LatchOnPanic, LogFile, RedoFile, Sink};
use super::tables::{BACKEND, META, Tx, engine_failed, se};

/// Most requests in one transaction.
pub(super) const MAX_BATCH: usize = 4096;

/// Longest time between checkpoints while batches keep coming. A checkpoint holds the writer
/// while redb writes and fsyncs the pages dirtied since the last one: on the bank workload,
/// 7–30 ms every 250 ms, against 15–45 ms every second (half-rate p99 16 ms against 30–58 ms).
/// On a larger store (100 000 sleepers) a checkpoint costs 40–50 ms whatever the interval: every
/// 100 ms, checkpoints took 60 % of the time and wake-ups were 5–10× later than every 250 ms.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Most redo log bytes between checkpoints (so replay after a crash stays short).
pub(super) const CHECKPOINT_BYTES: u64 = 64 << 20;

/// A store with no requests for this long checkpoints, so an idle store's log is empty.
pub(super) const IDLE_CHECKPOINT: Duration = Duration::from_secs(1);

/// The key in [`META`] of the last batch whose writes the durable state holds: written by each
/// checkpoint, and on close (`Inner::stamp_on_close` in `mod.rs`).
pub(super) const REDO_LSN: &str = "redo_lsn";

struct Ran {
    /// Answers the request, given the batch's failure if there was one.
    done: Done,
    /// Set when the request failed in a way that may have left partial writes.
    poison: Option<StoreError>,
    /// Set when the request was refused on its merits (it must have written nothing).
    refused: bool,
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
                refused: false,
            },
            Err(e) if e.is_transient() => Ran {
                poison: Some(e.clone()),
                refused: false,
                done: Box::new(move |_| {
                    // As above: a caller that went away needs no answer.
                    let _ = reply.send(Err(e));
                }),
            },
            Err(e) => Ran {
                poison: None,
                refused: true,
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
    pub(super) checkpoints: AtomicU64,
}

/// The redo log a store on disk writes through: its file, where the next record goes, and the
/// last batch already in it (or in redb).
pub(super) struct LogSetup {
    pub(super) file: Box<dyn RedoFile>,
    pub(super) offset: u64,
    pub(super) lsn: u64,
}

/// The handle to the writer thread.
pub(super) struct Writer {
    tx: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    pub(super) counters: Arc<Counters>,
}

impl Writer {
    pub(super) fn start(
        db: Arc<Database>,
        log: Option<LogSetup>,
        durability: Arc<Durability>,
    ) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let log = match log {
            None => None,
            Some(setup) => Some(Logged::start(setup, durability.clone())?),
        };
        let thread = std::thread::Builder::new()
            .name("loom-embedded-writer".into())
            .spawn(move || {
                let _latch = LatchOnPanic {
                    durability: &durability,
                    thread: "writer",
                };
                writer_loop(&db, &rx, &c, log)
            })?;
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

    /// Stops taking requests, lets the writer finish the queued ones (and checkpoint), and
    /// waits for it.
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

/// The writer's side of the redo log.
struct Logged {
    file: Arc<Mutex<LogFile>>,
    items: mpsc::Sender<Item>,
    thread: JoinHandle<()>,
    durability: Arc<Durability>,
    /// The last batch committed to redb (and handed to the log).
    lsn: u64,
    /// The last batch a checkpoint made durable in redb.
    checkpointed: u64,
    /// When the last checkpoint was taken (or tried).
    since: Instant,
    /// Record bytes handed to the log since then.
    bytes: u64,
}

impl Logged {
    fn start(setup: LogSetup, durability: Arc<Durability>) -> std::io::Result<Logged> {
        let (items, rx) = mpsc::channel();
        let d = durability.clone();
        let LogSetup { file, offset, lsn } = setup;
        let file = Arc::new(Mutex::new(LogFile::new(file, offset)));
        let f = file.clone();
        let thread = std::thread::Builder::new()
            .name("loom-embedded-log".into())
            .spawn(move || redo::log_loop(&f, &rx, &d))?;
        Ok(Logged {
            file,
            items,
            thread,
            durability,
            lsn,
            checkpointed: lsn,
            since: Instant::now(),
            bytes: 0,
        })
    }

    fn send(&self, item: Item) {
        if let Err(mpsc::SendError(item)) = self.items.send(item) {
            // The log thread is gone (it panicked): nothing will be made durable any more.
            let e = StoreError::storage(
                BACKEND,
                std::io::Error::other("the redo log thread stopped"),
            );
            self.durability.fail(&e);
            for d in item.done {
                d(Some(&e));
            }
        }
    }

    /// Makes redb itself durable through the last batch, then lets the log be emptied. A failed
    /// checkpoint loses nothing (the log still holds every batch since the last one), but stops
    /// the store: redb takes no write after a failed commit until it is opened again.
    fn checkpoint(&mut self, db: &Database, counters: &Counters) {
        self.since = Instant::now();
        // After a failure nothing more is made durable (redb may still do so when it closes:
        // the outcome of the failed requests is unknown, see RELIABILITY.md).
        if self.lsn == self.checkpointed || self.durability.failure().is_some() {
            return;
        }
        let lsn = self.lsn;
        let result = (|| -> Result<(), redb::Error> {
            let mut txn = db.begin_write()?;
            txn.set_durability(redb::Durability::Immediate)?;
            txn.open_table(META)?.insert(REDO_LSN, lsn)?;
            txn.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.checkpointed = lsn;
                self.bytes = 0;
                counters.checkpoints.fetch_add(1, Ordering::Relaxed);
                // A failure here is the log's failure: recorded there, seen by every request.
                if let Err(e) = self
                    .file
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .truncate(lsn, &self.durability)
                {
                    tracing::error!(error = %e, "embedded store could not empty the redo log after a checkpoint");
                }
            }
            Err(e) => {
                // Nothing is lost (the log still holds every batch since the last checkpoint),
                // but redb refuses every write after a failed commit: stop here, with this
                // error as the cause (a full disk, say), rather than with redb's "previous I/O
                // error" at the next batch. The store reopens itself (`reopen.rs`).
                let e = se(e);
                tracing::error!(error = %e, "embedded store checkpoint failed; the store stops taking writes until it opens again");
                self.durability.fail(&e);
            }
        }
    }

    fn due(&self) -> bool {
        self.bytes >= CHECKPOINT_BYTES || self.since.elapsed() >= CHECKPOINT_EVERY
    }
}

/// The next request, or `None` once the store is closing. While batches await a checkpoint,
/// waits at most [`IDLE_CHECKPOINT`] and checkpoints when nothing came.
fn next_job(
    db: &Database,
    rx: &mpsc::Receiver<Box<dyn Job>>,
    peeked: &mut Option<Box<dyn Job>>,
    counters: &Counters,
    log: &mut Option<Logged>,
) -> Option<Box<dyn Job>> {
    if let Some(job) = peeked.take() {
        return Some(job);
    }
    loop {
        match log {
            Some(l) if l.lsn > l.checkpointed => match rx.recv_timeout(IDLE_CHECKPOINT) {
                Ok(job) => return Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => l.checkpoint(db, counters),
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            },
            _ => return rx.recv().ok(),
        }
    }
}

fn writer_loop(
    db: &Database,
    rx: &mpsc::Receiver<Box<dyn Job>>,
    counters: &Counters,
    mut log: Option<Logged>,
) {
    // A request taken off the channel to learn whether any was waiting; the next batch's first.
    let mut peeked = None;
    // Requests left over when a batch's record reached its size cap: the next batch's first.
    let mut carried: std::collections::VecDeque<Box<dyn Job>> = Default::default();
    loop {
        let first = match carried.pop_front() {
            Some(job) => job,
            None => match next_job(db, rx, &mut peeked, counters, &mut log) {
                Some(job) => job,
                None => break,
            },
        };
        let mut jobs = vec![first];
        jobs.extend(carried.drain(..));
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if let Some(e) = log.as_ref().and_then(|l| l.durability.failure()) {
            for job in jobs {
                job.fail(e.clone());
            }
            continue;
        }
        // Without a log, Immediate durability (redb's default, stated so that it cannot change
        // under us): `commit` returns only once the batch is fsynced. With one, the log makes
        // the batch durable and redb's copy is made durable by the next checkpoint.
        let durability = match log {
            Some(_) => redb::Durability::None,
            None => redb::Durability::Immediate,
        };
        let txn = match db.begin_write().map_err(se).and_then(|mut txn| {
            txn.set_durability(durability).map_err(se)?;
            Ok(txn)
        }) {
            Ok(txn) => txn,
            Err(e) => {
                // redb refuses writes after an I/O error (`PreviousIo`): stop (D3), so that
                // the store opens again.
                tracing::error!(error = %e, "embedded store could not begin a write transaction; it takes no more writes until it opens again");
                if let Some(l) = &log {
                    l.durability.fail(&e);
                }
                for job in jobs {
                    job.fail(e.clone());
                }
                continue;
            }
        };
        // Only a store with a log records its writes (and needs the record's room).
        let sink = RefCell::new(match log {
            Some(_) => redo::new_record(),
            None => Vec::new(),
        });
        let mut done = Vec::with_capacity(jobs.len());
        let mut poison = None;
        let writes = std::cell::Cell::new(0);
        let mut tx = Tx::new(&txn, Sink::new(log.as_ref().map(|_| &sink), &writes));
        let mut jobs = jobs.into_iter();
        for job in jobs.by_ref() {
            if let Some(e) = &poison {
                job.fail(StoreError::clone(e));
                continue;
            }
            let before = writes.get();
            let ran = job.run(&mut tx);
            poison = ran.poison;
            if ran.refused && writes.get() != before {
                // A refusal must be true: a request refused on its merits that wrote anything
                // (a bug) would report failure for writes about to commit (rule D15). Abort the
                // batch instead, so that nothing it wrote lands.
                let e = StoreError::storage(
                    BACKEND,
                    std::io::Error::other(
                        "a request refused on its merits had written (a bug); its batch was aborted",
                    ),
                );
                tracing::error!(error = %e, "embedded store write batch aborted");
                poison = Some(e);
            }
            done.push(ran.done);
            let size = sink.borrow().len();
            if size >= redo::MAX_RECORD {
                // This request (a turn sending a great many messages, say) wrote more than a
                // record may hold (the ones before it stayed under the soft cap): the batch
                // cannot be logged, so none of it is kept. This request is refused on its
                // merits; the others ran with it get a retryable error; the requests not run
                // yet wait for the next batch.
                if let Some(offender) = done.pop() {
                    offender(Some(&StoreError::TooLarge {
                        what: "one write request's redo log record".into(),
                        size,
                        limit: redo::MAX_RECORD,
                        limit_kind: crate::error::Limit::RedoRecordBytes,
                    }));
                }
                poison = Some(StoreError::storage(
                    BACKEND,
                    std::io::Error::other(
                        "another request of this write batch was too large to log; nothing in \
                         the batch was kept",
                    ),
                ));
                break;
            } else if size >= redo::RECORD_SOFT_CAP {
                break;
            }
        }
        carried.extend(jobs);
        let n = done.len() as u64;
        // The tables close here, before the commit that needs them closed.
        drop(tx);
        let lsn = log.as_ref().map_or(0, |l| l.lsn + 1);
        if let Some(e) = poison {
            if let Err(abort) = txn.abort() {
                tracing::error!(error = %abort, "embedded store could not abort a poisoned batch");
            }
            tracing::error!(error = %e, requests = n, "embedded store batch failed; nothing in it was acknowledged");
            // An I/O error inside a request (redb writing pages out as its cache fills, say):
            // redb takes no write from now on, so stop here with this cause (D3).
            if let Some(l) = &log
                && engine_failed(&e)
            {
                l.durability.fail(&e);
            }
            for d in done {
                d(Some(&e));
            }
            continue;
        }
        if let Some(l) = &mut log {
            // Raised before the commit, so a read that can see this batch waits for it.
            l.durability.commit_begins(lsn);
            let committed = txn.commit().map_err(se).and_then(|()| {
                redo::seal(sink.into_inner(), lsn, l.durability.durable()).ok_or_else(|| {
                    StoreError::storage(
                        BACKEND,
                        std::io::Error::other("a redo record over the size limit"),
                    )
                })
            });
            l.lsn = lsn;
            match committed {
                Ok(record) => {
                    l.bytes += record.len() as u64;
                    counters.commits.fetch_add(1, Ordering::Relaxed);
                    counters.requests.fetch_add(n, Ordering::Relaxed);
                    // Alone (nothing queued behind this batch, nothing of the log thread's
                    // still to write): write the record here, saving a thread hand-off. Busy:
                    // hand it over and go on with the next batch while it is fsynced.
                    if peeked.is_none() && carried.is_empty() {
                        // Not a store result: `Err` means no request is waiting (empty), or
                        // none ever will (closed), which `next_job` sees on its own.
                        peeked = rx.try_recv().ok();
                    }
                    let alone =
                        peeked.is_none() && carried.is_empty() && l.durability.durable() + 1 == lsn;
                    if alone {
                        let result = l.file.lock().unwrap_or_else(|p| p.into_inner()).append(
                            &[&record],
                            lsn,
                            &l.durability,
                        );
                        let failure = result.err();
                        for d in done {
                            d(failure.as_ref());
                        }
                    } else {
                        l.send(Item {
                            lsn,
                            bytes: record,
                            done,
                        });
                    }
                }
                Err(e) => {
                    // redb may have made the batch visible before failing, and it cannot be
                    // logged: stop here, as after a failed log write (see `redo.rs`).
                    tracing::error!(error = %e, requests = n, "embedded store batch failed; nothing in it was acknowledged; the store takes no more writes until it is opened again");
                    l.durability.fail(&e);
                    for d in done {
                        d(Some(&e));
                    }
                }
            }
            if l.due() {
                l.checkpoint(db, counters);
            }
            continue;
        }
        let failure = txn.commit().err().map(se);
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
    if let Some(mut l) = log {
        // Closing: make redb durable through the last batch, so that the directory needs no
        // replay, then let the log thread finish what it was given.
        if l.durability.failure().is_none() {
            l.checkpoint(db, counters);
        }
        let Logged { items, thread, .. } = l;
        drop(items);
        if thread.join().is_err() {
            tracing::error!("embedded store log thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::EmbeddedStore;

    /// A request refused on its merits must have written nothing; one that wrote anyway (a
    /// bug) must not have its writes committed under a refusal: its batch is aborted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_request_that_wrote_does_not_commit_its_writes() {
        let store = EmbeddedStore::in_memory().unwrap();
        let refused = store
            .write_in(0, |tx| {
                tx.meta.get()?.insert("stray", 1).map_err(se)?;
                Err::<(), _>(StoreError::InvalidRequest("refused after a write".into()))
            })
            .await;
        assert!(
            matches!(refused, Err(StoreError::InvalidRequest(_))),
            "{refused:?}"
        );
        let stray = store
            .read_in(0, |txn| {
                let meta = txn.open_table(META).map_err(se)?;
                Ok(meta.get("stray").map_err(se)?.map(|v| v.value()))
            })
            .await
            .unwrap();
        assert_eq!(stray, None, "the refused request's write was committed");
        // The store goes on.
        store
            .write_in(0, |tx| {
                tx.meta.get()?.insert("fine", 2).map_err(se).map(|_| ())
            })
            .await
            .unwrap();
    }
}
