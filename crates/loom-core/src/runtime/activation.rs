//! Activation and dispatch: how an actor becomes active on this node (under its partition's
//! lease, its state recovered), serves its mailbox one message at a time, and stops; and the dispatcher
//! that finds actors with work.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::actives::{Active, Handle};
use super::alarms::Ring;
use super::cell::{self, Cell, Next};
use super::context::Io;
use super::leases::Tenure;
use super::metrics::{Count, Latency};
use super::replay::RecoverError;
use super::{Actor, Shared};
use crate::error::StoreError;
use crate::id::ActorId;
use crate::store::{Lease, LeaseOptions, Park};

/// The erased start function of one registered kind.
pub(super) trait Kind: Send + Sync {
    /// `lease`: the actor's partition's, which fences its writes; `tenure` says when that
    /// lease is lost or given up.
    fn start(
        &self,
        shared: Arc<Shared>,
        id: ActorId,
        lease: Lease,
        tenure: Tenure,
        handle: Handle,
    ) -> BoxFuture<'static, ()>;
}

/// What a runtime knows of a kind it sends to, hosted here or not
/// ([`RuntimeBuilder::sends_to`](super::RuntimeBuilder::sends_to)): how to check a JSON
/// message against the kind's message type before it is sent.
pub(super) trait Messages: Send + Sync {
    /// Whether `payload` decodes as the kind's message type; why not if it does not.
    fn check_message(&self, payload: &serde_json::Value) -> Result<(), String>;
}

/// The [`Messages`] of kind `A`, known by its type alone (no instance needed).
pub(super) struct MessagesOf<A>(pub(super) std::marker::PhantomData<fn() -> A>);

impl<A: Actor> Messages for MessagesOf<A> {
    fn check_message(&self, payload: &serde_json::Value) -> Result<(), String> {
        // On the sender's task (an HTTP request's, say): a panic of the type's own serde code
        // is a bad message, as in the actor (`cell::serde_guard`).
        super::cell::serde_guard(|| <A::Message as serde::Deserialize>::deserialize(payload))
            .map(drop)
    }
}

pub(super) struct KindOf<A: Actor>(pub(super) Arc<A>);

impl<A: Actor> Kind for KindOf<A> {
    fn start(
        &self,
        shared: Arc<Shared>,
        id: ActorId,
        lease: Lease,
        tenure: Tenure,
        handle: Handle,
    ) -> BoxFuture<'static, ()> {
        Box::pin(run::<A>(self.0.clone(), shared, id, lease, tenure, handle))
    }
}

impl Shared {
    /// Wakes the actor for a message written to its mailbox by a write that began at `written`:
    /// notifies it if it is active here, else activates it, unless it has left memory since
    /// (then it may well have run the message already; see [`Shared::ensure_active`]).
    pub(super) fn wake(self: &Arc<Self>, id: &ActorId, written: Option<u64>) {
        // Not active here, and of a partition another node owns: its owner finds the message.
        if !self.hub.notify(id) && self.ownership.owns(id) {
            let me = self.clone();
            let id = id.clone();
            self.spawn(async move {
                if me.ensure_active(&id, written).await == Activation::Skipped {
                    // A scan that begins now reads the mailbox as the actor left it.
                    me.wake.notify_one();
                }
            });
        }
    }

    /// A point in the order of this node's departures (see [`Departures`]): a moment taken
    /// before a read or write, to compare with when actors left memory.
    pub(super) fn moment(&self) -> u64 {
        self.gone.moment()
    }

    /// Activates the actor on this node unless it is active, parked, leased elsewhere, of a
    /// partition this node does not own (`ownership.rs`), or of a kind this node does not host:
    /// messages to such a kind are never touched here; they wait in their mailbox for a node
    /// that hosts it.
    ///
    /// `seen`: the [`Shared::moment`] taken before what says the actor has work was read or
    /// written (a ready scan's read, a send's write). An actor that left memory after that
    /// moment is not activated ([`Activation::Skipped`]): it was active then, and may have run
    /// that work since (a sleeper that suspended and passivated while a scan that listed it
    /// ran, or that a scan activated before its send's own wake). Activated again, it would
    /// find nothing and stay in memory until its idle timeout. The caller asks for a scan
    /// instead: one that begins later reads the mailbox as the actor left it, and activates it
    /// if the work is still there. Moments are a counter, not a clock: under a paused clock
    /// (the simulator) a departure and a scan can share an instant.
    pub(super) async fn ensure_active(
        self: &Arc<Self>,
        id: &ActorId,
        seen: Option<u64>,
    ) -> Activation {
        if self.shutdown.is_cancelled() || id.is_system() || !self.ownership.owns(id) {
            return Activation::Done;
        }
        let parked_here = self
            .parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied();
        if let Some(until) = parked_here {
            if until > Instant::now() {
                return Activation::Done;
            }
            // Parked here a while ago: activating it would replay its journal only to find its
            // mailbox held, so look first (unparked elsewhere, `loom parked unpark`, say).
            match self.store.parked(id).await {
                Ok(Some(_)) => {
                    self.parked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id.clone(), Instant::now() + PARK_RECHECK);
                    return Activation::Done;
                }
                Ok(None) => {
                    self.parked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(id);
                }
                Err(e) => {
                    tracing::warn!(actor = %id, error = %e, "could not look whether the actor is still parked");
                    return Activation::Done;
                }
            }
        }
        let Some(kind) = self.kinds.get(id.kind()).cloned() else {
            tracing::debug!(actor = %id, "not hosted here; its messages wait for a node that hosts its kind");
            return Activation::Done;
        };
        let handle = {
            let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            if active.contains(id) {
                drop(active);
                self.hub.notify(id);
                return Activation::Done;
            }
            // Looked at again under the lock: a hand-off gives the partition up before it
            // takes this lock to stop the partition's actors (see `ownership.rs`).
            let Some(fence) = self.ownership.fence(id) else {
                return Activation::Done;
            };
            if let Some(seen) = seen
                && self.gone.left_after(id, seen)
            {
                return Activation::Skipped;
            }
            active.make_room(self.config.max_active);
            let a = Active::new(self.shutdown.child_token());
            let handle = a.handle.clone();
            active.insert(id.clone(), a);
            (handle, fence)
        };
        let (handle, (lease, tenure)) = handle;
        self.hub.notifier(id);
        // Bounded: a burst of activations (every message of a flood of sends to new actors, a
        // crowd of sleepers due at once) would otherwise queue thousands of lease reads ahead
        // of everything else the store does, lease renewals included. The semaphore is never
        // closed, so a permit always comes, unless the runtime stops first: then the waiting
        // activation is dropped without touching the store.
        let permit = tokio::select! {
            biased;
            _ = handle.stop.cancelled() => None,
            p = self.activating.acquire() => Some(p),
        };
        if permit.is_none() || self.shutdown.is_cancelled() {
            self.deactivated(id);
            return Activation::Done;
        }
        // The actor runs under its partition's lease (rule D8): no lease of its own is taken.
        // Its own lease held (by a tool, or a node of an older build running it) pauses it:
        // every write fenced by the partition's lease is refused meanwhile, so it is not
        // started only to fail (each start leases a message, and counts a delivery).
        let held = self.store.holder(id).await;
        drop(permit);
        // A failed read says the store is failing; a read that works says nothing of writes.
        if held.is_err() {
            self.health.write(&held);
        }
        match held {
            Ok(None) => {
                let fut = kind.start(self.clone(), id.clone(), lease, tenure, handle);
                let handle = self.spawn(fut);
                if let Some(a) = self
                    .active
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(id)
                {
                    a.abort = Some(handle.abort_handle());
                }
            }
            Ok(Some(own)) => {
                tracing::debug!(actor = %id, holder = %own.owner, "the actor's own lease is held; it waits");
                self.deactivated(id);
            }
            Err(e) => {
                tracing::warn!(actor = %id, error = %e, "could not look at the actor's own lease");
                self.deactivated(id);
            }
        }
        Activation::Done
    }

    pub(super) fn deactivated(&self, id: &ActorId) {
        // Noted before it leaves `active`: `ensure_active` looks at `gone` under the `active`
        // lock only for an actor not in `active`, so it never misses this departure.
        self.gone.left(id);
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        active.remove(id);
        // Under the `active` lock: an activation can begin only once this one has left
        // `active`, and then takes a wake-up of its own. Forgotten after the lock, this one's
        // could be handed to that activation and then forgotten under it, leaving it deaf to
        // every wake-up (and an actor drained by its turn waits for one).
        self.hub.forget(id);
        drop(active);
    }
}

/// What [`Shared::ensure_active`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Activation {
    /// Activated, found active, or not for this node.
    Done,
    /// Not activated: it left memory after its work was seen (the caller asks for a scan).
    Skipped,
}

/// When actors left this node's memory, for [`GONE_KEPT`], in the order of a counter that
/// [`Shared::moment`] also reads: a departure after a moment has a greater number. Taking a
/// moment (every send and turn) touches only the counter, not the lock.
#[derive(Default)]
pub(crate) struct Departures {
    counter: AtomicU64,
    kept: std::sync::Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    /// Each actor's latest departure.
    latest: HashMap<ActorId, u64>,
    /// Departures in order, for forgetting the old ones.
    order: VecDeque<(Instant, u64, ActorId)>,
}

impl Departures {
    fn moment(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn left(&self, id: &ActorId) {
        let n = self.moment();
        let now = Instant::now();
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let Kept { latest, order } = &mut *kept;
        // Kept by the greatest number: two departures of one actor racing here keep the later.
        let n = *latest
            .entry(id.clone())
            .and_modify(|m| *m = (*m).max(n))
            .or_insert(n);
        order.push_back((now, n, id.clone()));
        // Forgets what is older than `GONE_KEPT`: a scan or send that old activates as it
        // did before departures were noted (at worst an actor with nothing to do, idle until
        // its timeout).
        while let Some((at, n, id)) = order.front() {
            if now.saturating_duration_since(*at) < GONE_KEPT {
                break;
            }
            if latest.get(id) == Some(n) {
                latest.remove(id);
            }
            order.pop_front();
        }
        if latest.capacity() > 1024 && latest.len() < latest.capacity() / 4 {
            latest.shrink_to(latest.len() * 2);
            order.shrink_to(order.len() * 2);
        }
    }

    fn left_after(&self, id: &ActorId, seen: u64) -> bool {
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .latest
            .get(id)
            .is_some_and(|n| *n > seen)
    }
}

/// How long a node takes an actor it parked as still parked before it looks again.
const PARK_RECHECK: Duration = Duration::from_secs(5);

/// How long a node remembers that an actor left memory (see [`Shared::ensure_active`]).
const GONE_KEPT: Duration = Duration::from_secs(2);

/// Why an actor's task ended.
enum Exit {
    Passivated,
    LeaseLost,
    Park(Park),
    Failed(StoreError),
    /// Not for this node's code (state from newer code): left for another node, and not
    /// activated here again for a while.
    Declined(String),
    /// The actor's task panicked outside its handler (which has a net of its own, `cell.rs`):
    /// it leaves as after a store failure, and is activated again when it has work, after a
    /// while (`PARK_RECHECK`), so that a panic at every activation does not replay it at every
    /// scan.
    Panicked(String),
}

/// Leaves `id` alone for a while ([`PARK_RECHECK`]): `ensure_active` does not activate it
/// before then (a park, a decline, a panic that may come back at every activation).
fn look_again_later(shared: &Shared, id: &ActorId) {
    shared
        .parked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone(), Instant::now() + PARK_RECHECK);
}

/// Takes an activation out of `active` when its task ends, however it ends: a panic that
/// escapes even `run`'s net (a value of the actor's dropped as a lost lease ends `serve`)
/// included. An actor left in `active` with no task would take every wake-up and never run.
struct Leave {
    shared: Arc<Shared>,
    id: ActorId,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.shared.deactivated(&self.id);
    }
}

async fn run<A: Actor>(
    actor: Arc<A>,
    shared: Arc<Shared>,
    id: ActorId,
    lease: Lease,
    tenure: Tenure,
    handle: Handle,
) {
    // Dropped last, after the exit below is handled.
    let _leave = Leave {
        shared: shared.clone(),
        id: id.clone(),
    };
    let io = Io {
        lease_options: LeaseOptions {
            visibility: shared.config.visibility,
            // The runtime gives up a message that ended too many deliveries without a word
            // (`cell.rs`); the store's own limit is a net below that, for a message the runtime
            // never sees (a frame that does not decode). `Cell::lease_options` lifts it for the
            // message of a durable wait in progress.
            max_deliveries: cell::give_up_after(shared.config.retry.max_attempts) + 2,
            // A sleep that suspended is leased a little before it ends and waits out the rest
            // in memory (`alarms::lease_early`).
            early: super::alarms::lease_early(shared.config.suspend_after),
        },
        store: shared.store.clone(),
        config: shared.config.clone(),
        hub: shared.hub.clone(),
        lease: lease.clone(),
        tenure: tenure.clone(),
        stopping: handle.stop.clone(),
    };
    // A panic that escaped every net in `serve` ends the activation as a failure would (and
    // `_leave` takes it out of `active`).
    let served =
        std::panic::AssertUnwindSafe(serve::<A>(actor, &shared, &io, &id, &handle)).catch_unwind();
    let exit = tokio::select! {
        biased;
        exit = served => exit.unwrap_or_else(|panic| Exit::Panicked(super::cell::panic_message(&panic))),
        _ = tenure.lost().cancelled() => Exit::LeaseLost,
    };
    match &exit {
        Exit::Passivated => tracing::debug!(actor = %id, "passivated"),
        Exit::LeaseLost => {
            shared.metrics.count(Count::LeasesLost, A::KIND, 1);
            tracing::warn!(actor = %id, "lease lost; the actor stopped");
        }
        Exit::Park(park) => {
            // Recorded in the store, fenced by the lease (rule D12): every node honours it,
            // across restarts, until someone unparks the actor. A park found at activation
            // (the journal does not replay) keeps the record of an earlier park, which says
            // more (the message, the step).
            let earlier = match park.message_id {
                None => match shared.store.parked(&id).await {
                    Ok(p) => p,
                    // Parked again below, which is what not knowing costs.
                    Err(e) => {
                        tracing::debug!(actor = %id, error = %e, "could not read an earlier park");
                        None
                    }
                },
                Some(_) => None,
            };
            let parked = match earlier {
                Some(_) => Ok(()),
                None => shared.store.park(&id, park, Some(&lease)).await,
            };
            match parked {
                Ok(()) => {
                    tracing::error!(actor = %id, reason = %park.reason, "actor parked; `loom parked ls` shows it, `loom parked unpark` lets it run again")
                }
                Err(e) => {
                    tracing::error!(actor = %id, reason = %park.reason, error = %e, "actor stopped, but its park could not be recorded; it will be tried again")
                }
            }
            look_again_later(&shared, &id);
        }
        Exit::Failed(e) => {
            tracing::warn!(actor = %id, error = %e, "actor stopped on a store failure; it is activated again when it has work")
        }
        Exit::Panicked(panic) => {
            tracing::error!(actor = %id, %panic, "the actor's task panicked outside its handler; it is activated again after a while when it has work, and a message that keeps doing this is dead-lettered after its deliveries");
            // Not at once: a panic that comes back at every activation (before any message is
            // leased) would otherwise replay the actor at every scan.
            look_again_later(&shared, &id);
        }
        Exit::Declined(reason) => {
            shared.metrics.count(Count::Declined, A::KIND, 1);
            tracing::warn!(actor = %id, %reason, "actor left to a node running newer code; its messages wait for one");
            // Looked at again after a while, as a parked actor is; the store has no park, so
            // the next look activates it, and declines again while this code is older.
            look_again_later(&shared, &id);
        }
    }
    // The partition's lease stays with the partition (`ownership.rs`): nothing to release.
    // `_leave` takes the activation out of `active`.
}

async fn serve<A: Actor>(
    actor: Arc<A>,
    shared: &Arc<Shared>,
    io: &Io,
    id: &ActorId,
    handle: &Handle,
) -> Exit {
    let Handle {
        stop,
        busy,
        last_used,
    } = handle;
    let recover = || Cell::<A>::recover(actor.clone(), id.clone(), io, shared);
    let activation_began = *last_used.lock().unwrap_or_else(|p| p.into_inner());
    let mut cell = match recover().await {
        Ok(c) => {
            shared
                .metrics
                .observe(Latency::Activation, A::KIND, activation_began.elapsed());
            c
        }
        Err(RecoverError::Store(e)) => return Exit::Failed(e),
        Err(RecoverError::Unrecoverable(reason)) => {
            return Exit::Park(Park::new(io.config.node.clone(), &reason));
        }
        Err(RecoverError::Declined(reason)) => return Exit::Declined(reason),
    };
    let signal = shared.hub.notifier(id);
    let mut idle_since = Instant::now();
    // A message the last turn's write already leased; it is processed even when stopping, so
    // that it is not left out until its visibility timeout.
    let mut leased: Option<crate::store::Delivery> = None;
    // The last turn's write looked for the next message and found none (`Next::Drained`).
    let mut drained = false;
    // The actor's wake-ups counted before its last read of its mailbox (a lease, or the turn
    // that looks for the next message): one counted by then and raised by a write (a send, a
    // relay, an unpark, a scan that read the message) was for a message that read saw, or took,
    // so waiting ends only at a later one (`Signal::woken_since`). Otherwise a message sent while
    // the actor was busy, and taken by its turn's look, would leave a wake-up that costs a lease
    // finding nothing. (A wake-up raised by time, an alarm's, for a message not yet visible to
    // that read, is covered as before by the scan soon after, `DUE_RECHECK`, and the poll.)
    let mut seen = signal.count();
    loop {
        if leased.is_none() && stop.is_cancelled() {
            return passivate(&cell, io, id).await;
        }
        let next = match leased.take() {
            Some(d) => Ok(Some(d)),
            // Straight to the wait below: a lease now would find nothing the write did not.
            None if std::mem::take(&mut drained) => Ok(None),
            None => {
                // Not by a node that lost the partition before its keeper could say so (a
                // process paused past its ttl): the lease would count a delivery, and hide
                // the message from its new owner, for nothing this node could commit.
                if !io.tenure.held() {
                    return Exit::LeaseLost;
                }
                seen = signal.count();
                io.store.lease(id, cell.lease_options(io)).await
            }
        };
        match next {
            Ok(Some(d)) => {
                seen = signal.count();
                busy.store(true, Ordering::Release);
                let next = cell.process(io, shared, d).await;
                busy.store(false, Ordering::Release);
                *last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                idle_since = Instant::now();
                // A cell whose state could not be put back after a failed turn is reloaded
                // from the journal before anything else runs on it (`Cell::diverged`); a
                // message the turn's write leased stays leased for the reloaded cell.
                let mut reload = cell.diverged();
                match next {
                    Next::Continue(d) => leased = d.map(|d| *d),
                    Next::Drained => drained = true,
                    Next::Backoff(d) => {
                        tokio::select! {
                            biased;
                            _ = tokio::time::sleep(d) => {}
                            _ = stop.cancelled() => return Exit::Passivated,
                        }
                    }
                    Next::Reload => reload = true,
                    Next::Park(park) => return Exit::Park(park),
                    Next::Stop => return Exit::LeaseLost,
                    // Its lease released, its memory freed: the message comes back when due.
                    Next::Suspend => return Exit::Passivated,
                }
                if reload {
                    cell = match recover().await {
                        Ok(c) => c,
                        Err(RecoverError::Store(e)) => return Exit::Failed(e),
                        Err(RecoverError::Unrecoverable(reason)) => {
                            return Exit::Park(Park::new(io.config.node.clone(), &reason));
                        }
                        Err(RecoverError::Declined(reason)) => return Exit::Declined(reason),
                    }
                }
            }
            Ok(None) => {
                let left = io.config.idle_timeout.saturating_sub(idle_since.elapsed());
                if left.is_zero() {
                    return passivate(&cell, io, id).await;
                }
                tokio::select! {
                    biased;
                    _ = signal.woken_since(seen) => {}
                    _ = tokio::time::sleep(left) => {}
                    _ = stop.cancelled() => return passivate(&cell, io, id).await,
                }
            }
            Err(e) => {
                shared.health.failed(&e);
                tracing::warn!(actor = %id, error = %e, "could not read the mailbox; trying again");
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep(io.config.poll_interval.max(Duration::from_millis(10))) => {}
                    _ = stop.cancelled() => return Exit::Passivated,
                }
            }
        }
    }
}

/// An actor with nothing to do leaves memory (idle, evicted, or its node stopping); with an
/// idle retention policy it is sent its retirement first (`Cell::schedule_idle_retirement`).
async fn passivate<A: Actor>(cell: &Cell<A>, io: &Io, id: &ActorId) -> Exit {
    if let Err(e) = cell.schedule_idle_retirement(io).await {
        // It is sent at the actor's next passivation instead.
        tracing::warn!(actor = %id, error = %e, "could not send the actor its retirement for idleness");
    }
    Exit::Passivated
}

/// How many actors a ring of the alarms may activate ahead: no more than a scan would, nor
/// than `max_active` leaves beside the actors in use ([`Actives::in_use`] within
/// [`IN_USE`]). An activation ahead makes room as any activation does, passivating the least
/// recently used idle actors, never one in a turn; the recently used ones are not counted as
/// room, so that a ring does not evict the actors an earlier ring warmed (idle until they
/// take their message) or those just served. (Counting every active actor instead left no
/// room on a node whose woken sleepers stay active until their idle timeout: at 1 667
/// wake-ups a second `max_active` was full of them within seconds, and 45 % of the sleepers
/// of `loom bench sleepers` were not warmed.)
fn warm_room(shared: &Shared) -> usize {
    let in_use = shared
        .active
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .in_use(IN_USE);
    SCAN.min(shared.config.max_active.saturating_sub(in_use))
}

/// An actor activated or served this recently is in use for [`warm_room`]: longer than a
/// warmed actor waits for its message (`alarms::WARM_AHEAD` and a batch), with room for a
/// slow activation.
const IN_USE: Duration = Duration::from_secs(1);

/// How soon after a due ring the dispatcher scans for what it did not find visible yet.
const DUE_RECHECK: Duration = Duration::from_millis(10);

/// Most actors one scan for ready actors asks for. (A crowd of more due at one alarm is found
/// by the scans that follow: the next alarm's, or the poll. Scanning again at once when a scan
/// comes back full would spin on a backlog that cannot be activated yet, `max_active`.)
const SCAN: usize = 512;

/// Most actors a scan asks for beyond [`SCAN`] (see [`held_in`]).
const SCAN_PAST: usize = 8 * SCAN;

/// How many of a scan's `ids` this node leaves alone for now (parked, declined, or panicking
/// at activation: [`look_again_later`]). Their messages stay in the store's ready index,
/// oldest first, and the scan does not activate them, so the next scan asks for that many
/// more than [`SCAN`] (up to [`SCAN_PAST`]): without room for them, as many as a scan reads
/// (older code declining newer state during a rollback, say) would hide every later ready
/// actor of this node's partitions, whose delayed messages and retries only the scan finds.
fn held_in(shared: &Shared, ids: &[ActorId]) -> usize {
    let now = Instant::now();
    let parked = shared.parked.lock().unwrap_or_else(|p| p.into_inner());
    ids.iter()
        .filter(|id| parked.get(*id).is_some_and(|until| *until > now))
        .count()
}

/// The ready actors of the partitions this node holds, at most `limit`: when nodes share the
/// store, the store looks only in those partitions (its index is per kind and partition), so
/// another node's backlog, however large, hides none of this node's work.
async fn scan_ready(shared: &Shared, limit: usize) -> crate::StoreResult<Vec<ActorId>> {
    // A node hosting nothing (a client) runs no actor: nothing to look for. (`scope` of no
    // kinds says "every partition", which would ask the store about no kinds every poll.)
    if shared.hosted.is_empty() {
        return Ok(Vec::new());
    }
    match shared.ownership.scope(&shared.hosted) {
        None => shared.store.ready_actors(&shared.hosted, limit).await,
        Some(scope) if scope.is_empty() => Ok(Vec::new()),
        Some(scope) => {
            let wanted: Vec<(&str, &[u32])> = scope
                .iter()
                .map(|(kind, parts)| (*kind, parts.as_slice()))
                .collect();
            shared
                .store
                .ready_actors_in(&wanted, shared.ownership.partitions(), limit)
                .await
        }
    }
}

/// Looks for work enqueued by other nodes, due delayed messages and due retries.
pub(super) async fn dispatch(shared: Arc<Shared>) {
    let mut wakeups = shared.store.wakeups();
    // A node hosting nothing has nothing to wake (and need not hear every other's wake-ups).
    let mut arrivals = if shared.hosted.is_empty() {
        None
    } else {
        shared.store.arrivals()
    };
    let mut scan = true;
    // The scan for due delayed messages, retries and other nodes' messages runs at least every
    // poll interval, however often arrivals wake the loop in between.
    let mut next_scan = tokio::time::Instant::now();
    // The last scan's actors: how many of them this node leaves alone (`held_in`, counted
    // just before the next scan, once their activations had time to decline) widens it.
    let mut last: Vec<ActorId> = Vec::new();
    loop {
        if scan || tokio::time::Instant::now() >= next_scan {
            next_scan = tokio::time::Instant::now() + shared.config.poll_interval;
            let began = shared.moment();
            let held = held_in(&shared, &last);
            match scan_ready(&shared, SCAN + held.min(SCAN_PAST)).await {
                Ok(ids) => {
                    // What a hand-off gave up since the scope was read is left alone.
                    let ids: Vec<ActorId> = ids
                        .into_iter()
                        .filter(|id| shared.ownership.owns(id))
                        .collect();
                    // All at once: each activation takes a lease (a write), and a store's group
                    // commit makes one write of many taken together; one after another, a
                    // burst of due messages (sleepers waking) would be activated one fsync
                    // apart.
                    let done = futures::future::join_all(
                        ids.iter().map(|id| shared.ensure_active(id, Some(began))),
                    )
                    .await;
                    // Listed while still active: looked at again soon (not at once, which
                    // could spin while actors keep leaving), as the scan after a due ring.
                    if done.contains(&Activation::Skipped) {
                        next_scan = next_scan.min(tokio::time::Instant::now() + DUE_RECHECK);
                    }
                    last = ids;
                }
                // Not noted in `health`: a read that failed once says little of the store (a
                // connection dropped), and what the runtime writes says the rest.
                Err(e) => tracing::warn!(error = %e, "could not look for ready actors"),
            }
        }
        scan = true;
        tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => return,
            _ = shared.wake.notified() => {}
            // Messages this node suspended come due (`alarms.rs`): sleepers are activated
            // ahead and woken at the moment, not found at the next poll.
            ring = shared.alarms.rung(|| warm_room(&shared)) => {
                match ring {
                    Ring::Warm(ids) => {
                        // Not awaited here: the activations' lease writes must not hold up a
                        // due ring behind them.
                        let me = shared.clone();
                        shared.spawn(async move {
                            futures::future::join_all(
                                ids.iter().map(|id| me.ensure_active(id, None)),
                            )
                            .await;
                        });
                        scan = false;
                    }
                    Ring::Due(ids) => {
                        // Those not active here (not warmed, or gone since) are left to the
                        // scan: it activates only those whose message is there, at most
                        // `SCAN` at once.
                        let mut cold = 0;
                        for id in &ids {
                            if !shared.hub.notify(id) {
                                cold += 1;
                            }
                        }
                        scan = cold > 0;
                        // A store whose clock is its server's counts a suspension from when it
                        // ran the request, a little after the alarm's moment: a scan soon
                        // after finds a message that was not visible yet when its actor woke.
                        next_scan = next_scan.min(tokio::time::Instant::now() + DUE_RECHECK);
                    }
                }
            }
            _ = woken(&mut wakeups) => {}
            got = arrived(&mut arrivals) => {
                // Messages the store moved into these mailboxes (a relay between
                // partitions): wake exactly them. If the feed fell behind, scan.
                if let Some(ids) = got {
                    // When the relay wrote is not known here: woken whatever.
                    for id in ids.iter() {
                        shared.wake(id, None);
                    }
                    scan = false;
                }
            }
            _ = tokio::time::sleep_until(next_scan) => {}
        }
    }
}

/// The next batch of actors whose mailboxes the store filled; `None` if the feed fell behind
/// (the caller scans); never returns if the store has no such feed.
async fn arrived(
    arrivals: &mut Option<tokio::sync::broadcast::Receiver<Arc<[ActorId]>>>,
) -> Option<Arc<[ActorId]>> {
    use tokio::sync::broadcast::error::RecvError;
    match arrivals {
        Some(rx) => match rx.recv().await {
            Ok(ids) => Some(ids),
            Err(RecvError::Lagged(_)) => None,
            Err(RecvError::Closed) => {
                *arrivals = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// Returns when the store signals work from another process; never, if it has no such signal
/// (or it has stopped: the poll then carries on alone).
async fn woken(wakeups: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match wakeups {
        Some(w) => {
            if w.changed().await.is_err() {
                *wakeups = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}
