//! The workloads a simulated run drives besides the bank, each with the check that proves its
//! promise after the last round:
//!
//! - [`counter`]: counters asked from every node; each actor's replies must be linearizable
//!   against its journal (the journal's order is the witness);
//! - [`saga`]: the `order_saga` example's orders (activities, an approval event, a durable
//!   timer, compensation); every order ends shipped or compensated, and the outside world saw
//!   exactly what its status says;
//! - [`timer`]: scheduled messages and durable sleeps; every timer fires exactly once and
//!   none early.
//!
//! Every workload has the same shape: its actors are registered on each node
//! (`register`), each round drives a paced slice of its items through the round's nodes
//! (`drive`), retrying each until it is acknowledged, and after the last round the final node
//! drives what is left and checks (`check`). Items have numbers, and everything about item `i`
//! (its actor, its message, its idempotency key) is drawn from the seed and `i`, so a round
//! that restarts an item sends what the crashed round sent.

use std::future::Future;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use loom_core::IdempotencyKey;
use loom_core::runtime::AskError;

pub mod counter;
pub mod saga;
pub mod timer;

/// Runs `start(i)` for each of `items`, the `k`-th after `k` paces spread `over` the round, so
/// that its end (a crash, a power loss) finds starts in flight. Returns when every one
/// returned (or never, if the task is dropped first).
pub(crate) async fn paced<F, Fut>(items: Vec<u32>, over: Duration, start: F)
where
    F: Fn(u32) -> Fut,
    Fut: Future<Output = ()>,
{
    let pace = over / u32::try_from(items.len() + 1).unwrap_or(u32::MAX);
    let starts = items.into_iter().enumerate().map(|(k, i)| {
        let started = start(i);
        async move {
            tokio::time::sleep(pace * u32::try_from(k).unwrap_or(u32::MAX)).await;
            started.await;
        }
    });
    futures::future::join_all(starts).await;
}

/// Calls `f` until it succeeds, 100 ms (simulated) apart: a client that retries.
pub(crate) async fn until_ok<T, E, Fut>(mut f: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        match f().await {
            Ok(v) => return v,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// True for an ask's answer that no retry changes: a refusal, a failure recorded under the
/// call's idempotency key, a reply that does not decode. The rest (the store unreachable, no
/// reply in time) may pass on a retry.
pub(crate) fn final_answer(e: &AskError) -> bool {
    matches!(
        e,
        AskError::Rejected(_) | AskError::Failed(_) | AskError::BadReply(_)
    )
}

/// Asks until answered, 100 ms (simulated) apart, retrying what may pass on a retry; returns an
/// answer that never will ([`final_answer`]) as the error.
pub(crate) async fn ask_until<T, Fut>(mut ask: impl FnMut() -> Fut) -> Result<T, AskError>
where
    Fut: Future<Output = Result<T, AskError>>,
{
    loop {
        match ask().await {
            Ok(v) => return Ok(v),
            Err(e) if final_answer(&e) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// What a workload's clients were answered for good with an error (none in a healthy run):
/// the item is not retried, and the check reports it.
#[derive(Clone, Default)]
pub(crate) struct Errors(Arc<Mutex<Vec<String>>>);

impl Errors {
    pub(crate) fn push(&self, what: String) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(what);
    }

    /// Fails with every error recorded, if any.
    pub(crate) fn check(&self) -> Result<(), String> {
        let e = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_empty() {
            Ok(())
        } else {
            Err(format!("answered with an error for good: {}", e.join("; ")))
        }
    }
}

/// The idempotency key `name`, which the workloads build from short ASCII parts only.
pub(crate) fn key(name: String) -> IdempotencyKey {
    IdempotencyKey::new(name).expect("a workload's idempotency keys are short ASCII")
}
