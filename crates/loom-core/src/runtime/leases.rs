//! Keeping this node's leases: one task renews the leases of every partition this node owns
//! (its actors run under those, rule D8) together, with one
//! [`LeaseManager::renew_many`](crate::LeaseManager::renew_many) call per batch, instead of a
//! timer and a durable write per lease.
//!
//! Invariants:
//! - A lease is renewed once a third of its ttl has passed since it was taken or last renewed
//!   (measured from when the request that took or renewed it was sent, as its deadline is, so
//!   a take that was slow to answer is renewed that much sooner), so a renewal has two thirds
//!   of the ttl to succeed; a failed one is retried every [`RETRY`]. Leases due within the next sixth of the
//!   ttl go along with the ones due now, so leases taken at different moments soon share calls.
//! - A partition whose lease is reported lost, or runs out before a renewal succeeds, has its
//!   `lost` token cancelled, and its actors stop at once. (Their fenced writes would be refused
//!   anyway.)
//!   A renewal that has not answered by the earliest deadline of the leases it carries is given
//!   up at that moment (they are treated as failed): a node cut off from its store (a network
//!   partition, a stalled connection) stops its actors when their partitions' leases run out, instead of
//!   running their handlers, and their activities, on past them until the store answers.
//!   The calls of one round go out at once, their leases grouped by deadline, so no call of a
//!   round waits behind another that does not answer. (The next round waits for the whole
//!   round, at most until the earliest deadline among its unanswered calls.)
//!   Such a call is still listened to, for a ttl: a lease it renewed all the same, given up
//!   here by then, is released, so its partition is taken again at once rather than a ttl
//!   later (held for this node's name, nobody could take it).
//! - A lease's deadline is counted on this node's monotonic clock from when the request that
//!   took or last renewed it was *sent*, plus the ttl: the store counted the lease's expiry from
//!   when it received that request, later, so the deadline never passes the store's expiry,
//!   whatever the two machines' wall clocks say (the store's `expires_at` is read by the
//!   store's clock, and is not compared with this node's).
//! - A renewal only ever replaces the lease with the same token; a lease given up while its
//!   renewal was in flight is not brought back.
//! - Nothing is renewed for a partition this node gave up: the [`Kept`] guard forgets the
//!   lease when it is dropped, however its holder ends (return, panic, abort).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::StoreError;
use crate::id::ActorId;
use crate::runtime::health::Observed;
use crate::store::{Lease, Store};

/// How soon a failed renewal is tried again.
const RETRY: Duration = Duration::from_millis(50);

/// Most leases renewed by one call.
const BATCH: usize = 512;

struct Held {
    lease: Lease,
    next_at: Instant,
    /// By then the store may hold the lease expired (see the module docs).
    deadline: Instant,
    lost: CancellationToken,
    /// The deadline as the lease's holders see it ([`Tenure`]).
    shared: Arc<Mutex<Instant>>,
}

impl Held {
    fn set_deadline(&mut self, at: Instant) {
        self.deadline = at;
        *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }
}

/// A kept lease as the actors it fences see it: held while the keeper has not said it lost
/// (`lost`), and its deadline has not passed on this node's clock. The deadline matters when
/// the keeper could not run to say so: a process paused past its ttl (stopped, starved) wakes
/// with actors that would otherwise lease messages of a partition another node now owns,
/// counting deliveries and hiding the messages for a visibility they can never use.
#[derive(Clone)]
pub(crate) struct Tenure {
    lost: CancellationToken,
    deadline: Arc<Mutex<Instant>>,
}

impl Tenure {
    /// Whether the lease is still held, by what this node knows.
    pub(crate) fn held(&self) -> bool {
        !self.lost.is_cancelled()
            && Instant::now() < *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cancelled by the keeper once the lease is lost or given up.
    pub(crate) fn lost(&self) -> &CancellationToken {
        &self.lost
    }
}

/// The leases this node holds, renewed together.
pub(crate) struct Keeper {
    store: Arc<dyn Store>,
    ttl: Duration,
    /// Renewals are writes: what they meet is the runtime's view of its store too.
    health: Arc<Observed>,
    held: Mutex<BTreeMap<ActorId, Held>>,
    added: Notify,
    /// The waits on renewals that answered after their deadlines
    /// ([`Keeper::release_if_renewed_late`]), stopped with the keeper ([`Keeper::halt`]).
    late: tokio_util::task::TaskTracker,
    halt: CancellationToken,
}

/// Keeps a lease renewed while it lives; forgets it when dropped.
pub(crate) struct Kept {
    keeper: Arc<Keeper>,
    actor: ActorId,
    token: u64,
    tenure: Tenure,
}

impl Kept {
    /// How the lease's holders see it.
    pub(crate) fn tenure(&self) -> &Tenure {
        &self.tenure
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        let mut held = self.keeper.lock();
        if held
            .get(&self.actor)
            .is_some_and(|h| h.lease.token == self.token)
        {
            held.remove(&self.actor);
        }
    }
}

impl Keeper {
    pub(crate) fn new(store: Arc<dyn Store>, ttl: Duration, health: Arc<Observed>) -> Arc<Self> {
        Arc::new(Keeper {
            store,
            ttl,
            health,
            held: Mutex::new(BTreeMap::new()),
            added: Notify::new(),
            late: tokio_util::task::TaskTracker::new(),
            halt: CancellationToken::new(),
        })
    }

    /// Stops the waits on late renewals, and returns once they are gone: after a kill nothing
    /// is released (a crash releases nothing), and after a shutdown nothing holds the store.
    pub(crate) async fn halt(&self) {
        self.halt.cancel();
        self.late.close();
        self.late.wait().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ActorId, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn every(&self) -> Duration {
        self.ttl / 3
    }

    /// Renews `lease` until the guard is dropped; cancels `lost` if it cannot. `taken` is when
    /// the request that took it was sent.
    pub(crate) fn keep(
        self: &Arc<Self>,
        lease: Lease,
        taken: Instant,
        lost: CancellationToken,
    ) -> Kept {
        let shared = Arc::new(Mutex::new(taken + self.ttl));
        let kept = Kept {
            keeper: self.clone(),
            actor: lease.actor.clone(),
            token: lease.token,
            tenure: Tenure {
                lost: lost.clone(),
                deadline: shared.clone(),
            },
        };
        let now = Instant::now();
        // From when it was asked for, as its deadline is: a take that took a while to answer
        // leaves less of the ttl, and the renewal comes that much sooner.
        let next_at = taken + self.every();
        let was_empty = {
            let mut held = self.lock();
            let was_empty = held.is_empty();
            held.insert(
                lease.actor.clone(),
                Held {
                    lease,
                    next_at,
                    deadline: taken + self.ttl,
                    lost,
                    shared,
                },
            );
            was_empty
        };
        // A lease taken promptly is due about last (`now + every`), after every lease already
        // kept, so the keeper's next wake-up still comes first: it is woken only when it kept
        // nothing (each wake-up scans every lease, and under load leases are taken thousands
        // of times a second), or when the take was slow enough that its renewal may be due
        // before that wake-up.
        if was_empty || now.saturating_duration_since(taken) >= self.every() / 2 {
            self.added.notify_one();
        }
        kept
    }

    /// How many leases are kept, for metrics.
    pub(crate) fn count(&self) -> usize {
        self.lock().len()
    }

    /// Renews due leases until the task is aborted.
    pub(crate) async fn run(self: Arc<Self>) {
        loop {
            let now = Instant::now();
            let soon = now + self.every() / 2;
            let (due, wake_at) = {
                let held = self.lock();
                let due: Vec<(Lease, Instant)> = if held.values().any(|h| h.next_at <= now) {
                    held.values()
                        .filter(|h| h.next_at <= soon)
                        .map(|h| (h.lease.clone(), h.deadline))
                        .collect()
                } else {
                    Vec::new()
                };
                let wake_at = held
                    .values()
                    .map(|h| h.next_at)
                    .min()
                    .unwrap_or(now + self.every());
                (due, wake_at)
            };
            if due.is_empty() {
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep_until(wake_at) => {}
                    _ = self.added.notified() => {}
                }
                continue;
            }
            let store = self.store.clone();
            let ttl = self.ttl;
            self.renew_all(due, move |chunk| {
                let store = store.clone();
                async move { store.renew_many(&chunk, ttl).await }
            })
            .await;
        }
    }

    /// Renews `due` (each lease with its deadline) by `renew`, at most [`BATCH`] leases a call,
    /// the calls all at once and their leases grouped by deadline. A call is given up at the
    /// earliest deadline among its own leases, so one that does not answer keeps no other
    /// call's leases past their deadlines. (One after another, in key order, a call hanging
    /// until its first deadline held back a later call whose leases were due before that:
    /// they were given up only when it was sent, after their deadlines.)
    async fn renew_all<F, Fut>(self: &Arc<Self>, mut due: Vec<(Lease, Instant)>, renew: F)
    where
        F: Fn(Vec<Lease>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<Result<Lease, StoreError>>, StoreError>>
            + Send
            + 'static,
    {
        due.sort_by_key(|(_, deadline)| *deadline);
        let calls = due.chunks(BATCH).map(|chunk| {
            let sent = Instant::now();
            let deadline = chunk.iter().map(|(_, d)| *d).min().unwrap_or(sent);
            let leases: Vec<Lease> = chunk.iter().map(|(l, _)| l.clone()).collect();
            let mut call = Box::pin(renew(leases.clone()));
            async move {
                let outcome = match tokio::time::timeout_at(deadline, &mut call).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        self.release_if_renewed_late(call);
                        Err(StoreError::unavailable(
                            "lease renewal",
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "no answer before the lease expired",
                            ),
                        ))
                    }
                };
                self.settle(&leases, sent, outcome);
            }
        });
        futures::future::join_all(calls).await;
    }

    /// Waits on (for at most a ttl) a renewal given up at its deadline, and releases each lease
    /// it renewed that is no longer kept: the store may have renewed it all the same (its
    /// answer came late), and then held it for this node's name for another ttl, in which the
    /// partition, given up here, was taken by nobody: not by another node (held), nor by this
    /// one (held under its own name, which it cannot tell from an earlier process's). Released,
    /// it is taken again at the next look. A lease kept again meanwhile (its token is the one
    /// renewed) is left alone; one taken by another node since has another token, which the
    /// release does not touch.
    fn release_if_renewed_late<Fut>(self: &Arc<Self>, call: std::pin::Pin<Box<Fut>>)
    where
        Fut: std::future::Future<Output = Result<Vec<Result<Lease, StoreError>>, StoreError>>
            + Send
            + 'static,
    {
        let keeper = self.clone();
        self.late.spawn(async move {
            let answer = tokio::select! {
                biased;
                _ = keeper.halt.cancelled() => return,
                answer = tokio::time::timeout(keeper.ttl, call) => answer,
            };
            let Ok(Ok(results)) = answer else {
                // No answer within a ttl, or a failure: nothing was renewed that a release
                // must give back (an answer never seen leaves the lease to run out).
                return;
            };
            for lease in results.into_iter().flatten() {
                let kept = keeper
                    .lock()
                    .get(&lease.actor)
                    .is_some_and(|h| h.lease.token == lease.token);
                if kept {
                    continue;
                }
                let released = tokio::select! {
                    biased;
                    _ = keeper.halt.cancelled() => return,
                    r = keeper.store.release(&lease) => r,
                };
                match released {
                    Ok(_) => {
                        tracing::info!(actor = %lease.actor, "released a lease whose renewal answered after it was given up")
                    }
                    Err(e) => {
                        tracing::warn!(actor = %lease.actor, error = %e, "could not release a lease whose renewal answered late; it runs out by itself")
                    }
                }
            }
        });
    }

    /// Applies the outcome of renewing `asked`, sent at `sent`. A lease past its expiry by
    /// then is given up (its actor stops) unless the renewal succeeded.
    fn settle(
        &self,
        asked: &[Lease],
        sent: Instant,
        outcome: Result<Vec<Result<Lease, StoreError>>, StoreError>,
    ) {
        match &outcome {
            Ok(r) if r.iter().any(Result::is_ok) => self.health.ok(),
            Ok(r) => {
                if let Some(Err(e)) = r
                    .iter()
                    .find(|r| r.as_ref().is_err_and(StoreError::is_transient))
                {
                    self.health.failed(e);
                }
            }
            Err(e) => self.health.failed(e),
        }
        let mut held = self.lock();
        let results: Vec<Result<Lease, StoreError>> = match outcome {
            Ok(r) if r.len() == asked.len() => r,
            Ok(r) => {
                let e = StoreError::InvalidRequest(format!(
                    "renew_many answered {} results for {} leases",
                    r.len(),
                    asked.len()
                ));
                asked.iter().map(|_| Err(e.clone())).collect()
            }
            Err(e) => asked.iter().map(|_| Err(e.clone())).collect(),
        };
        for (asked, result) in asked.iter().zip(results) {
            // Only the lease that was sent: it may have been given up (and even taken again)
            // while the renewal was in flight.
            let Some(h) = held
                .get_mut(&asked.actor)
                .filter(|h| h.lease.token == asked.token)
            else {
                continue;
            };
            match result {
                Ok(renewed) => {
                    h.lease = renewed;
                    h.next_at = sent + self.every();
                    h.set_deadline(sent + self.ttl);
                }
                Err(StoreError::LeaseLost { .. }) => {
                    h.lost.cancel();
                    held.remove(&asked.actor);
                }
                Err(e) => {
                    if Instant::now() >= h.deadline {
                        tracing::warn!(actor = %asked.actor, error = %e, "could not renew the lease before it expired");
                        h.lost.cancel();
                        held.remove(&asked.actor);
                    } else {
                        tracing::debug!(actor = %asked.actor, error = %e, "lease renewal failed; retrying");
                        h.next_at = Instant::now() + RETRY;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Timestamp;

    /// A lease whose take answered late (here 7 s into a 9 s ttl) is renewed counting from when
    /// it was asked for, before its deadline: counted from when it was handed over, its first
    /// renewal would come a second after the store let it go.
    #[tokio::test]
    async fn a_lease_taken_slowly_is_renewed_before_its_deadline() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn Store> = Arc::new(crate::EmbeddedStore::open(dir.path()).expect("open"));
        let ttl = Duration::from_secs(9);
        let keeper = Keeper::new(store, ttl, Arc::new(Observed::default()));
        let actor = ActorId::new("acct", "slow").expect("id");
        let taken = Instant::now() - Duration::from_secs(7);
        let _kept = keeper.keep(
            Lease {
                actor: actor.clone(),
                owner: "node".into(),
                token: 1,
                expires_at: Timestamp::from_millis(0),
            },
            taken,
            CancellationToken::new(),
        );
        let held = keeper.lock();
        let h = &held[&actor];
        assert_eq!(h.deadline, taken + ttl);
        assert!(
            h.next_at <= taken + ttl / 3,
            "renewal due {:?} after the take was sent, its deadline {:?}",
            h.next_at - taken,
            ttl
        );
    }

    /// A renewal that answers after its lease's deadline, having renewed it all the same: the
    /// lease is given up here at the deadline (its holders stop), and released once the answer
    /// comes, so that the partition can be taken again at once. Before, the store held it for
    /// this node's name for another ttl, in which nobody could take the partition.
    #[tokio::test]
    async fn a_renewal_that_answers_after_its_deadline_releases_what_it_renewed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn Store> = Arc::new(crate::EmbeddedStore::open(dir.path()).expect("open"));
        let ttl = Duration::from_secs(1);
        let keeper = Keeper::new(store.clone(), ttl, Arc::new(Observed::default()));
        let id = ActorId::partition_lease("acct", 3);
        let lease = store
            .acquire(&id, "node", Duration::from_secs(30))
            .await
            .expect("acquire");
        let lost = CancellationToken::new();
        let kept = keeper.keep(lease.clone(), Instant::now(), lost.clone());
        let deadline = Instant::now() + ttl;
        let slow = store.clone();
        keeper
            .renew_all(vec![(lease.clone(), deadline)], move |chunk| {
                let store = slow.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    store.renew_many(&chunk, Duration::from_secs(30)).await
                }
            })
            .await;
        assert!(lost.is_cancelled(), "given up at its deadline");
        drop(kept);
        // The late answer renewed it in the store: the keeper gives it back.
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.holder(&id).await.expect("holder").is_some() {
            assert!(
                Instant::now() < deadline,
                "the lease renewed late is still held under the node's name"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A kept lease's tenure, which its actors look at before each lease of a message, ends at
    /// its deadline on this node's clock whether or not the keeper ran to say so (here its
    /// task never runs, as in a process paused past its ttl), and a renewal moves it on.
    /// Before, only the keeper's word ended it: a process waking from a pause leased messages
    /// of partitions another node had taken meanwhile.
    #[tokio::test(start_paused = true)]
    async fn a_tenure_ends_at_its_deadline_even_when_the_keeper_cannot_run() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn Store> = Arc::new(crate::EmbeddedStore::open(dir.path()).expect("open"));
        let ttl = Duration::from_secs(6);
        let keeper = Keeper::new(store, ttl, Arc::new(Observed::default()));
        let lease = Lease {
            actor: ActorId::new("acct", "paused").expect("id"),
            owner: "node".into(),
            token: 1,
            expires_at: Timestamp::from_millis(0),
        };
        let kept = keeper.keep(lease.clone(), Instant::now(), CancellationToken::new());
        let tenure = kept.tenure().clone();
        assert!(tenure.held());
        // A renewal sent at 2 s that answers (as the keeper settles one) moves the deadline
        // to 8 s.
        tokio::time::advance(Duration::from_secs(2)).await;
        keeper.settle(
            std::slice::from_ref(&lease),
            Instant::now(),
            Ok(vec![Ok(lease.clone())]),
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(tenure.held(), "past the first deadline, renewed");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            !tenure.held() && !tenure.lost().is_cancelled(),
            "past its deadline, with the keeper silent"
        );
    }

    /// More leases than one call carries, and no call ever answers: a lease whose key sorts
    /// after a full call's worth of later-due leases is still given up at its own deadline.
    /// Before, the calls went one after another in key order: the first hung until its
    /// earliest deadline, 4 s here, and the last lease, due at 2 s, ran on until then.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_never_answers_holds_back_no_other_calls_leases() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn Store> = Arc::new(crate::EmbeddedStore::open(dir.path()).expect("open"));
        let ttl = Duration::from_secs(6);
        let keeper = Keeper::new(store, ttl, Arc::new(Observed::default()));
        let lease = |key: String| Lease {
            actor: ActorId::new("acct", &key).expect("id"),
            owner: "node".into(),
            token: 1,
            expires_at: Timestamp::from_millis(0),
        };
        let now = Instant::now();
        let mut kept = Vec::new();
        let mut due = Vec::new();
        // A full call's worth, taken 2 s ago (deadlines in 4 s), whose keys sort first.
        for i in 0..BATCH {
            let l = lease(format!("a{i:04}"));
            due.push((l.clone(), now + Duration::from_secs(4)));
            kept.push(keeper.keep(l, now - Duration::from_secs(2), CancellationToken::new()));
        }
        // One taken 4 s ago (deadline in 2 s), whose key sorts last.
        let last = lease("z".into());
        let lost = CancellationToken::new();
        due.push((last.clone(), now + Duration::from_secs(2)));
        kept.push(keeper.keep(last, now - Duration::from_secs(4), lost.clone()));
        let renewing = tokio::spawn({
            let keeper = keeper.clone();
            async move {
                keeper
                    .renew_all(due, |_| {
                        std::future::pending::<Result<Vec<Result<Lease, StoreError>>, StoreError>>()
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(
            lost.is_cancelled(),
            "the lease due at 2 s was not given up by 2.1 s"
        );
        renewing.abort();
    }
}
