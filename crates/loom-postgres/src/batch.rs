//! Group commit: concurrent requests from many actors go to the server together, one statement
//! (so one transaction and one WAL flush) per batch, by a few worker tasks. While one batch is
//! committing, the next one gathers, so the more callers wait, the bigger the batches grow and
//! the fewer flushes and round trips each request costs; a lone request goes out at once.
//!
//! Invariants:
//! - A caller hears back only from the statement that holds its request, and the statement's
//!   result is only read once the server has answered `ReadyForQuery`, after the implicit
//!   transaction committed (with `synchronous_commit = on`: after its WAL flush). A batch that
//!   fails gives every caller in it an error; none of them is acknowledged.
//! - Each request in a batch is decided alone by the server functions (`append_many`,
//!   `turn_many`), and a refused request writes nothing, so requests do not affect one another.
//!   If a whole batch fails for a reason that is not about the connection (one request the
//!   server could not run), every request is tried again on its own, so one bad request cannot
//!   fail the others; a connection failure is reported to every caller as `Unavailable` (the
//!   batch may or may not have committed, as for any single request).
//! - A batch holds at most the batcher's `max_requests` requests and, unless one request alone
//!   is larger, at most [`MAX_BYTES`] of payload.

use std::sync::Arc;

use futures::future::BoxFuture;
use loom_core::{StoreError, StoreResult};
use tokio::sync::{Mutex, mpsc, oneshot};

/// Most payload bytes in one batch (a larger single request goes alone).
pub(crate) const MAX_BYTES: usize = 8 << 20;

/// Runs a batch: one result per request, in order.
pub(crate) type RunBatch<I, O> =
    Arc<dyn Fn(Vec<I>) -> BoxFuture<'static, Vec<StoreResult<O>>> + Send + Sync>;

type Queued<I, O> = (I, usize, oneshot::Sender<StoreResult<O>>);

/// A queue of requests of one kind, served in batches by `workers` tasks.
pub(crate) struct Batcher<I, O> {
    tx: mpsc::UnboundedSender<Queued<I, O>>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts `workers` tasks on the current tokio runtime, each sending batches of up to
    /// `max_requests`. They end when the batcher is dropped.
    pub(crate) fn start(workers: usize, max_requests: usize, run: RunBatch<I, O>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<Queued<I, O>>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers.max(1) {
            tokio::spawn(work(rx.clone(), run.clone(), max_requests.max(1)));
        }
        Batcher { tx }
    }

    /// Queues `request` (of `bytes` payload) and waits for the batch that holds it to commit.
    pub(crate) async fn submit(&self, request: I, bytes: usize) -> StoreResult<O> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((request, bytes, reply))
            .map_err(|_| StoreError::Closed)?;
        // The workers are gone only if their runtime was shut down under them.
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

async fn work<I, O>(
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Queued<I, O>>>>,
    run: RunBatch<I, O>,
    max_requests: usize,
) {
    // A request that did not fit the last batch opens the next one.
    let mut carry: Option<Queued<I, O>> = None;
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let first = match carry.take() {
                Some(q) => q,
                None => match rx.recv().await {
                    Some(q) => q,
                    None => return,
                },
            };
            let mut bytes = first.1;
            let mut batch = vec![first];
            while batch.len() < max_requests {
                match rx.try_recv() {
                    Ok(q) if bytes + q.1 > MAX_BYTES => {
                        carry = Some(q);
                        break;
                    }
                    Ok(q) => {
                        bytes += q.1;
                        batch.push(q);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        let mut requests = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for (request, _, reply) in batch {
            requests.push(request);
            replies.push(reply);
        }
        let n = replies.len();
        let mut results = run(requests).await;
        if results.len() != n {
            let e = crate::sql::unexpected(format!(
                "a batch of {n} requests gave {} results",
                results.len()
            ));
            results = (0..n).map(|_| Err(e.clone())).collect();
        }
        for (reply, result) in replies.into_iter().zip(results) {
            // A caller that stopped waiting (its future was dropped) needs no answer; what its
            // request did stands either way, as for any request whose reply is lost.
            let _ = reply.send(result);
        }
    }
}
