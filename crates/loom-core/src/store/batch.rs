//! Group commit for a backend that talks to a server: concurrent requests from many actors go
//! to the server together, one call per batch, sent by a few worker tasks. While one batch is
//! committing, the next one gathers, so the more callers wait, the bigger the batches grow and
//! the fewer round trips (and server-side flushes) each request costs; a lone request goes out
//! at once. PostgreSQL sends a batch as one statement (`append_many`, `turn_many`), Redis as one
//! script call (`batch` in `loom.lua`).
//!
//! Invariants (the backend's `run` function keeps the first two; this module the rest):
//! - A caller hears back only from the call that holds its request, once the server answered
//!   it, so after the server made it durable. A batch that fails gives every caller in it an
//!   error; none of them is acknowledged.
//! - Each request in a batch is decided alone by the server, and a refused request writes
//!   nothing, so requests do not affect one another.
//! - Requests are taken in the order they were submitted, and a batch keeps that order.
//! - A batch holds at most the batcher's `max_requests` requests and, unless one request alone
//!   is larger, at most [`BATCH_PAYLOAD_MAX`] of payload.
//! - A request whose caller stopped waiting before its batch was formed is dropped unsent.
//! - A batch whose `run` returns the wrong number of results fails every caller in it with
//!   [`StoreError::Storage`], rather than giving anyone another request's result.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::{StoreError, StoreResult};

/// Most payload bytes in one batch (a larger single request goes alone).
pub const BATCH_PAYLOAD_MAX: usize = 8 << 20;

/// Runs a batch: one result per request, in order.
pub type RunBatch<I, O> =
    Arc<dyn Fn(Vec<I>) -> BoxFuture<'static, Vec<StoreResult<O>>> + Send + Sync>;

type Queued<I, O> = (I, usize, oneshot::Sender<StoreResult<O>>);

/// A queue of requests of one kind, served in batches by worker tasks.
///
/// ```
/// use std::sync::Arc;
/// use futures::FutureExt;
/// use loom_core::store::backend::{Batcher, RunBatch};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // A "server" that doubles numbers, a whole batch per call.
/// let run: RunBatch<u64, u64> =
///     Arc::new(|batch: Vec<u64>| async move { batch.into_iter().map(|n| Ok(n * 2)).collect() }.boxed());
/// let batcher = Arc::new(Batcher::start("example", 2, 64, run));
/// let calls = (0..100u64).map(|n| {
///     let b = batcher.clone();
///     async move { b.submit(n, 8).await }
/// });
/// let answers = futures::future::join_all(calls).await;
/// assert_eq!(answers[21].as_ref().ok(), Some(&42));
/// # }
/// ```
pub struct Batcher<I, O> {
    tx: mpsc::UnboundedSender<Queued<I, O>>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts `workers` tasks on the current tokio runtime, each sending batches of up to
    /// `max_requests` through `run`; `backend` names the store in errors. The tasks end when
    /// the batcher is dropped.
    pub fn start(
        backend: &'static str,
        workers: usize,
        max_requests: usize,
        run: RunBatch<I, O>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<Queued<I, O>>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers.max(1) {
            tokio::spawn(work(backend, rx.clone(), run.clone(), max_requests.max(1)));
        }
        Batcher { tx }
    }

    /// Queues `request` (of `bytes` payload) at once, when called, and returns a future that
    /// waits for the batch that holds it to commit. Requests are taken from the queue in the
    /// order they were queued (with more than one worker, two batches may still reach the
    /// server in either order). A request whose future is dropped before its batch is formed
    /// is not sent; once sent, it runs whether or not anyone still waits.
    pub fn submit(
        &self,
        request: I,
        bytes: usize,
    ) -> impl Future<Output = StoreResult<O>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let queued = self.tx.send((request, bytes, reply));
        async move {
            queued.map_err(|_| StoreError::Closed)?;
            // The workers are gone only if their runtime was shut down under them.
            answer.await.map_err(|_| StoreError::Closed)?
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a batch of {sent} requests gave {got} results")]
struct WrongCount {
    sent: usize,
    got: usize,
}

async fn work<I, O>(
    backend: &'static str,
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
                    Ok(q) if bytes + q.1 > BATCH_PAYLOAD_MAX => {
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
            // A caller that gave up before its request went out (its future dropped, or timed
            // out waiting) was told it may or may not run: it does not, which spares a server
            // that is slow to answer the work no one waits for.
            if reply.is_closed() {
                continue;
            }
            requests.push(request);
            replies.push(reply);
        }
        if requests.is_empty() {
            continue;
        }
        let n = replies.len();
        let mut results = run(requests).await;
        if results.len() != n {
            let e = StoreError::storage(
                backend,
                WrongCount {
                    sent: n,
                    got: results.len(),
                },
            );
            results = (0..n).map(|_| Err(e.clone())).collect();
        }
        for (reply, result) in replies.into_iter().zip(results) {
            // A caller that stopped waiting (its future was dropped) needs no answer; what its
            // request did stands either way, as for any request whose reply is lost.
            let _ = reply.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Sent = Arc<std::sync::Mutex<Vec<Vec<usize>>>>;

    /// A batcher with one worker whose `run` records each batch and answers `n * 10`, and
    /// whose first batch, request 0 alone, is held in flight until the returned semaphore gets
    /// a permit; returned once that batch is in flight, with the future of request 0.
    async fn held_in_flight() -> (
        Arc<Batcher<usize, usize>>,
        Sent,
        Arc<tokio::sync::Semaphore>,
        tokio::task::JoinHandle<StoreResult<usize>>,
    ) {
        let sent: Sent = Arc::default();
        let hold = Arc::new(tokio::sync::Semaphore::new(0));
        let (seen, held) = (sent.clone(), hold.clone());
        let run: RunBatch<usize, usize> = Arc::new(move |batch: Vec<usize>| {
            let (seen, held) = (seen.clone(), held.clone());
            async move {
                seen.lock().unwrap().push(batch.clone());
                if batch == [0] {
                    held.acquire().await.expect("open").forget();
                }
                batch.into_iter().map(|n| Ok(n * 10)).collect()
            }
            .boxed()
        });
        let b = Arc::new(Batcher::start("test", 1, 128, run));
        let first = {
            let b = b.clone();
            tokio::spawn(async move { b.submit(0, 1).await })
        };
        while sent.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        (b, sent, hold, first)
    }

    /// One request goes out alone and is held in flight; the 99 submitted meanwhile go out
    /// together behind it, in submission order, each caller hearing its own result.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_gather_while_a_batch_is_in_flight_and_keep_order() {
        let (b, sent, hold, first) = held_in_flight().await;
        // Queued when submitted, in this order, while the first batch is held.
        let rest: Vec<_> = (1..100).map(|n| b.submit(n, 1)).collect();
        hold.add_permits(1);
        assert_eq!(first.await.unwrap().unwrap(), 0);
        let answers = futures::future::join_all(rest).await;
        for (n, a) in (1..100).zip(answers) {
            assert_eq!(a.unwrap(), n * 10, "each caller hears its own result");
        }
        let batches = sent.lock().unwrap().clone();
        assert_eq!(batches[0], [0]);
        assert_eq!(
            batches[1],
            (1..100).collect::<Vec<_>>(),
            "the 99 queued behind the batch in flight went out together, in order"
        );
    }

    /// Of ten requests queued behind a batch in flight, the five whose callers gave up are not
    /// sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_whose_callers_gave_up_are_not_sent() {
        let (b, sent, hold, first) = held_in_flight().await;
        let mut kept = Vec::new();
        for n in 1..=10 {
            let f = b.submit(n, 1);
            if n % 2 == 0 {
                kept.push(f);
            }
        }
        hold.add_permits(1);
        first.await.unwrap().unwrap();
        let answers = futures::future::join_all(kept).await;
        assert_eq!(
            answers.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            [20, 40, 60, 80, 100]
        );
        assert_eq!(sent.lock().unwrap()[1], [2, 4, 6, 8, 10]);
    }

    #[tokio::test]
    async fn a_batch_with_a_wrong_result_count_fails_every_caller() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let run: RunBatch<u8, u8> = Arc::new(move |_batch: Vec<u8>| {
            c.fetch_add(1, Ordering::SeqCst);
            async move { vec![Ok(1), Ok(2), Ok(3)] }.boxed()
        });
        let b = Batcher::start("test", 1, 16, run);
        let e = b.submit(7, 1).await.unwrap_err();
        assert!(matches!(e, StoreError::Storage { .. }), "{e}");
        assert!(e.to_string().contains("1 requests gave 3 results"), "{e}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_request_over_the_byte_limit_goes_alone() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let run: RunBatch<usize, ()> = Arc::new(move |batch: Vec<usize>| {
            seen.lock().unwrap().push(batch.len());
            async move { batch.iter().map(|_| Ok(())).collect() }.boxed()
        });
        let b = Arc::new(Batcher::start("test", 1, 16, run));
        // Queued before the worker runs: a small one, a big one, a small one.
        let f = [1, BATCH_PAYLOAD_MAX, 1].map(|bytes| {
            let b = b.clone();
            tokio::spawn(async move { b.submit(bytes, bytes).await })
        });
        for h in f {
            h.await.unwrap().unwrap();
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 3);
        assert!(
            sizes.len() >= 2,
            "the big request did not share a batch: {sizes:?}"
        );
    }
}
