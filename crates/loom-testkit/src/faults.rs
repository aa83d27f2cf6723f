//! [`FaultyStore`]: a store wrapper that fails on command or at random, for fault-injection tests.
//!
//! Every call goes to the wrapped store unless a fault is armed for it. Three kinds of failure:
//! - refused: the call fails with [`StoreError::Storage`] (as from a failed disk or connection)
//!   and the wrapped store is not touched;
//! - lost reply: the call reaches the wrapped store and takes effect, but the caller gets
//!   [`StoreError::Unavailable`] and cannot tell that it happened — the hardest case for anyone
//!   who retries;
//! - corrupt snapshot: loading a chosen snapshot fails with [`StoreError::Corrupt`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use loom_core::codec::CodecError;
use loom_core::store::backend::{Committed, Turn};
use loom_core::store::{Member, Membership, Roster, Suspension};
use loom_core::{
    ActorId, DeadLetter, Delivery, Enqueued, Entry, EntryStream, Envelope, IdempotencyKey,
    IdempotencyStore, JournalInfo, JournalStore, Lease, LeaseManager, LeaseOptions, Mailbox,
    MessageId, Park, Parking, Receipt, Reservation, Seq, SeqRange, Snapshot, Store, StoreError,
    StoreResult, Timestamp, Waiting,
};
use serde_json::Value;

/// Which faults are armed. Counters fail the next N calls; flags fail every call while set;
/// percentages fail writes at random (seeded with [`Faults::seed`]).
#[derive(Debug, Default)]
pub struct Faults {
    /// Fail (refuse) the next N `commit_turn` and `append` calls.
    pub fail_writes: AtomicU32,
    /// Fail (refuse) the next N `trim` calls: a crash between a snapshot and its trim.
    pub fail_trims: AtomicU32,
    /// Fail every lease renewal while set.
    pub fail_renewals: AtomicBool,
    /// Fail every membership heartbeat while set: the node's record runs out a lease ttl after
    /// its last beat, and the other nodes then count it gone.
    pub fail_heartbeats: AtomicBool,
    /// Fail every read of the roster (`members`) while set: what every node meets when the
    /// store's membership key cannot be read (its shard down on a Redis Cluster, say).
    pub fail_members: AtomicBool,
    /// Hold every lease renewal unanswered while set (a stalled connection): it reaches the
    /// store only once this is cleared, if its caller still waits.
    pub hang_renewals: AtomicBool,
    /// Leave the next N lease `acquire` calls unanswered for ever (a connection gone silent
    /// mid-request); they never reach the store.
    pub hang_acquires: AtomicU32,
    /// Leave every idempotency `lookup` unanswered for ever while set (a connection gone
    /// silent mid-request); they never reach the store.
    pub hang_lookups: AtomicBool,
    /// Fail the next N mailbox `lease` calls.
    pub fail_leases: AtomicU32,
    /// Fail the next N `lease` calls of event lanes (kind `_event`) only: what a wait for an
    /// event meets, while its actor's own mailbox is leased as usual.
    pub fail_lane_leases: AtomicU32,
    /// Panic in the next N mailbox `lease` calls, as a store (or code under it) with a bug
    /// would, where the runtime calls it outside any handler.
    pub panic_leases: AtomicU32,
    /// Fail the next N journal reads (`read`, `info`, `load_snapshot`).
    pub fail_reads: AtomicU32,
    /// Percent of writes (appends, turns, enqueues, leases, acks, nacks) refused at random.
    pub refused_percent: AtomicU32,
    /// Percent of writes that take effect but whose reply is lost, at random.
    pub lost_reply_percent: AtomicU32,
    rng: Mutex<Option<fastrand::Rng>>,
    corrupt: Mutex<HashSet<(ActorId, Seq)>>,
    pause_read: PauseSlot,
    pause_suspend: PauseSlot,
    pause_delete: PauseSlot,
    /// How many failures were injected.
    pub injected: AtomicU64,
    /// Lease renewal calls that reached the store (`renew` and `renew_many`).
    pub renewal_calls: AtomicU64,
    /// Leases those calls asked to renew.
    pub renewals: AtomicU64,
    /// Mailbox `lease` calls that found nothing to hand out.
    pub empty_leases: AtomicU64,
    /// Idempotency `lookup` calls (an `ask` looking for its reply, among others).
    pub lookups: AtomicU64,
    /// Scans for ready actors (`ready_actors`, `ready_actors_in`).
    pub ready_scans: AtomicU64,
    /// Milliseconds each `backlog` read waits before it reads (a kind of a million mailboxes
    /// walked, a slow server); 0: none.
    pub slow_backlogs: AtomicU64,
    /// `backlog` reads begun.
    pub backlogs: AtomicU64,
    /// While set, `completions` gives no reply signals (a store without them), for the
    /// runtimes started meanwhile.
    pub no_signals: AtomicBool,
    /// While set, `completions` gives a receiver of signals that never come (a subscription
    /// that never works: an ACL without `SUBSCRIBE`, a proxy without pub/sub), for the runtimes
    /// started meanwhile.
    pub silent_signals: AtomicBool,
    /// The senders of those receivers, kept so that they stay open.
    silent: Mutex<Vec<tokio::sync::broadcast::Sender<loom_core::store::Completion>>>,
}

/// A journal read held before it starts: see [`Faults::pause_next_read`].
#[derive(Debug, Default)]
pub struct ReadPause {
    /// Notified when the paused read is reached.
    pub reached: tokio::sync::Notify,
    /// Notify to let the read go on.
    pub resume: tokio::sync::Notify,
}

/// Where a call waits for the case: armed by a `pause_next_*`, taken by the next such call.
type PauseSlot = Mutex<Option<Arc<ReadPause>>>;

impl ReadPause {
    /// Arms `slot` with a new pause, which the case keeps.
    fn arm(slot: &PauseSlot) -> Arc<ReadPause> {
        let pause = Arc::new(ReadPause::default());
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(pause.clone());
        pause
    }

    /// The pause armed in `slot`, if any, taken: only the next call waits.
    fn take(slot: &PauseSlot) -> Option<Arc<ReadPause>> {
        slot.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Tells the case the call has arrived, and waits until the case lets it go on.
    async fn hold(&self) {
        self.reached.notify_one();
        self.resume.notified().await;
    }

    /// Holds the call here if `slot` is armed.
    async fn hold_if_armed(slot: &PauseSlot) {
        if let Some(pause) = Self::take(slot) {
            pause.hold().await;
        }
    }
}

impl Faults {
    /// Holds the next journal `read` before it reads anything, until the case notifies
    /// `resume` on the returned pause (it is told through `reached` when the read arrives).
    pub fn pause_next_read(&self) -> Arc<ReadPause> {
        ReadPause::arm(&self.pause_read)
    }

    /// Holds the next mailbox `suspend` before it reaches the store, as [`pause_next_read`]
    /// holds a read: what the case does meanwhile (deliver the event the wait suspends for,
    /// say) happens between the waiter's last look at its lane and its suspension.
    ///
    /// [`pause_next_read`]: Self::pause_next_read
    pub fn pause_next_suspend(&self) -> Arc<ReadPause> {
        ReadPause::arm(&self.pause_suspend)
    }

    /// Holds the next journal `delete` before it reaches the store, as [`pause_next_read`]
    /// holds a read: what the case does meanwhile (a node taking the actor's partition, say)
    /// happens between a tool's last look and its delete.
    ///
    /// [`pause_next_read`]: Self::pause_next_read
    pub fn pause_next_delete(&self) -> Arc<ReadPause> {
        ReadPause::arm(&self.pause_delete)
    }

    /// Makes the snapshot of `actor` at `seq` read as corrupt.
    pub fn corrupt_snapshot(&self, actor: &ActorId, seq: Seq) {
        self.corrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((actor.clone(), seq));
    }

    /// Seeds the random faults (a run is reproduced from its seed).
    pub fn seed(&self, seed: u64) {
        *self.rng.lock().unwrap_or_else(|p| p.into_inner()) = Some(fastrand::Rng::with_seed(seed));
    }

    /// Disarms every random fault.
    pub fn calm(&self) {
        self.refused_percent.store(0, Ordering::SeqCst);
        self.lost_reply_percent.store(0, Ordering::SeqCst);
    }

    fn take(&self, counter: &AtomicU32) -> bool {
        let hit = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if hit {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    fn roll(&self, percent: &AtomicU32) -> bool {
        let p = percent.load(Ordering::Relaxed);
        if p == 0 {
            return false;
        }
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let hit = rng
            .get_or_insert_with(|| fastrand::Rng::with_seed(0))
            .u32(0..100)
            < p;
        if hit {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Before a write: refuse it at random.
    fn before(&self, what: &'static str) -> StoreResult<()> {
        if self.roll(&self.refused_percent) {
            return Err(injected(what));
        }
        Ok(())
    }

    /// After a write: lose its reply at random (only if it took effect).
    fn after<T>(&self, what: &'static str, r: StoreResult<T>) -> StoreResult<T> {
        if r.is_ok() && self.roll(&self.lost_reply_percent) {
            return Err(StoreError::unavailable("faulty", Injected(what)));
        }
        r
    }
}

/// An injected failure.
#[derive(Debug, thiserror::Error)]
#[error("injected fault: {0}")]
pub struct Injected(&'static str);

fn injected(what: &'static str) -> StoreError {
    StoreError::storage("faulty", Injected(what))
}

/// Wraps a store; see the module documentation.
#[derive(Clone)]
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    /// The armed faults; change them at any time.
    pub faults: Arc<Faults>,
}

impl FaultyStore {
    /// Wraps `inner` with no fault armed.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        FaultyStore {
            inner,
            faults: Arc::new(Faults::default()),
        }
    }

    /// Runs a write through the armed faults.
    async fn write<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        self.faults.before(what)?;
        let r = f.await;
        self.faults.after(what, r)
    }
}

#[async_trait]
impl JournalStore for FaultyStore {
    async fn append(
        &self,
        actor: &ActorId,
        expected_next: Seq,
        entries: &[Entry],
    ) -> StoreResult<Seq> {
        if self.faults.take(&self.faults.fail_writes) {
            return Err(injected("append"));
        }
        self.write("append", self.inner.append(actor, expected_next, entries))
            .await
    }

    fn read(&self, actor: &ActorId, range: SeqRange) -> EntryStream {
        if self.faults.take(&self.faults.fail_reads) {
            return Box::pin(futures::stream::once(async { Err(injected("read")) }));
        }
        if let Some(pause) = ReadPause::take(&self.faults.pause_read) {
            // The read starts only once the case lets it: whatever the case does meanwhile (a
            // compaction, say) happens between the reader's look at the journal and its read.
            let (inner, actor) = (self.inner.clone(), actor.clone());
            return Box::pin(
                futures::stream::once(async move {
                    pause.hold().await;
                    inner.read(&actor, range)
                })
                .flatten(),
            );
        }
        self.inner.read(actor, range)
    }

    async fn highest_seq(&self, actor: &ActorId) -> StoreResult<Seq> {
        self.inner.highest_seq(actor).await
    }

    async fn info(&self, actor: &ActorId) -> StoreResult<JournalInfo> {
        if self.faults.take(&self.faults.fail_reads) {
            return Err(injected("info"));
        }
        self.inner.info(actor).await
    }

    async fn save_snapshot(
        &self,
        actor: &ActorId,
        snapshot: &Snapshot,
        keep: usize,
    ) -> StoreResult<()> {
        self.write(
            "save_snapshot",
            self.inner.save_snapshot(actor, snapshot, keep),
        )
        .await
    }

    async fn load_snapshot(
        &self,
        actor: &ActorId,
        at_or_below: Seq,
    ) -> StoreResult<Option<Snapshot>> {
        if self.faults.take(&self.faults.fail_reads) {
            return Err(injected("load_snapshot"));
        }
        let found = self.inner.load_snapshot(actor, at_or_below).await?;
        if let Some(s) = &found {
            let corrupt = self
                .faults
                .corrupt
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&(actor.clone(), s.seq));
            if corrupt {
                self.faults.injected.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::corrupt(
                    format!("snapshot {} of {actor}", s.seq),
                    CodecError::Checksum {
                        stored: 0,
                        computed: 1,
                    },
                ));
            }
        }
        Ok(found)
    }

    async fn trim(&self, actor: &ActorId, through: Seq) -> StoreResult<()> {
        if self.faults.take(&self.faults.fail_trims) {
            return Err(injected("trim"));
        }
        self.write("trim", self.inner.trim(actor, through)).await
    }

    async fn compact(
        &self,
        actor: &ActorId,
        snapshot: &Snapshot,
        keep: usize,
        fence: Option<&Lease>,
    ) -> StoreResult<Seq> {
        if self.faults.take(&self.faults.fail_trims) {
            // A store that saves the snapshot and then fails before the trim (as one that did
            // them in two writes could, crashing between them): the state that leaves behind.
            self.inner.save_snapshot(actor, snapshot, keep).await?;
            return Err(injected("compact after its snapshot"));
        }
        self.write("compact", self.inner.compact(actor, snapshot, keep, fence))
            .await
    }

    async fn delete(&self, actor: &ActorId, fence: Option<&Lease>) -> StoreResult<()> {
        ReadPause::hold_if_armed(&self.faults.pause_delete).await;
        self.inner.delete(actor, fence).await
    }

    async fn list_actors(
        &self,
        after: Option<&ActorId>,
        limit: usize,
    ) -> StoreResult<Vec<ActorId>> {
        self.inner.list_actors(after, limit).await
    }

    async fn begin_at(&self, actor: &ActorId, through: Seq) -> StoreResult<()> {
        self.write("begin_at", self.inner.begin_at(actor, through))
            .await
    }
}

#[async_trait]
impl Mailbox for FaultyStore {
    async fn enqueue(&self, msg: &Envelope, deliver_at: Option<Timestamp>) -> StoreResult<u64> {
        self.write("enqueue", self.inner.enqueue(msg, deliver_at))
            .await
    }

    async fn lease(&self, actor: &ActorId, opts: LeaseOptions) -> StoreResult<Option<Delivery>> {
        if self.faults.take(&self.faults.fail_leases) {
            return Err(injected("lease"));
        }
        if actor.kind() == "_event" && self.faults.take(&self.faults.fail_lane_leases) {
            return Err(injected("lease"));
        }
        assert!(
            !self.faults.take(&self.faults.panic_leases),
            "a lease blew up (injected)"
        );
        let leased = self.write("lease", self.inner.lease(actor, opts)).await;
        if matches!(leased, Ok(None)) {
            self.faults.empty_leases.fetch_add(1, Ordering::Relaxed);
        }
        leased
    }

    async fn suspend(
        &self,
        receipt: &Receipt,
        lane: Option<&ActorId>,
        delay: Duration,
        reason: &str,
    ) -> StoreResult<Suspension> {
        ReadPause::hold_if_armed(&self.faults.pause_suspend).await;
        self.write("suspend", self.inner.suspend(receipt, lane, delay, reason))
            .await
    }

    async fn cancel(&self, actor: &ActorId, message: MessageId) -> StoreResult<Option<u64>> {
        self.write("cancel", self.inner.cancel(actor, message))
            .await
    }

    async fn ack(&self, receipt: &Receipt) -> StoreResult<()> {
        self.write("ack", self.inner.ack(receipt)).await
    }

    async fn nack(&self, receipt: &Receipt, delay: Duration, error: &str) -> StoreResult<()> {
        self.write("nack", self.inner.nack(receipt, delay, error))
            .await
    }

    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> StoreResult<()> {
        self.write("extend", self.inner.extend(receipt, visibility))
            .await
    }

    async fn dead_letter(&self, receipt: &Receipt, reason: &str) -> StoreResult<u64> {
        self.write("dead_letter", self.inner.dead_letter(receipt, reason))
            .await
    }

    async fn ready_actors(&self, kinds: &[&str], limit: usize) -> StoreResult<Vec<ActorId>> {
        self.faults.ready_scans.fetch_add(1, Ordering::Relaxed);
        self.inner.ready_actors(kinds, limit).await
    }

    async fn ready_actors_in(
        &self,
        wanted: &[(&str, &[u32])],
        of: u32,
        limit: usize,
    ) -> StoreResult<Vec<ActorId>> {
        self.faults.ready_scans.fetch_add(1, Ordering::Relaxed);
        self.inner.ready_actors_in(wanted, of, limit).await
    }

    async fn next_due(&self) -> StoreResult<Option<Timestamp>> {
        self.inner.next_due().await
    }

    async fn backlog(&self, kind: &str) -> StoreResult<loom_core::store::Backlog> {
        self.faults.backlogs.fetch_add(1, Ordering::Relaxed);
        let slow = self.faults.slow_backlogs.load(Ordering::Relaxed);
        if slow > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(slow)).await;
        }
        self.inner.backlog(kind).await
    }

    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.wakeups()
    }

    fn arrivals(&self) -> Option<tokio::sync::broadcast::Receiver<std::sync::Arc<[ActorId]>>> {
        self.inner.arrivals()
    }

    async fn pending(&self, actor: &ActorId) -> StoreResult<u64> {
        self.inner.pending(actor).await
    }

    async fn dead_letters(&self, after: Option<u64>, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        self.inner.dead_letters(after, limit).await
    }

    async fn messages(
        &self,
        actor: &ActorId,
        after: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<Waiting>> {
        self.inner.messages(actor, after, limit).await
    }

    async fn mailboxes(&self, after: Option<&ActorId>, limit: usize) -> StoreResult<Vec<ActorId>> {
        self.inner.mailboxes(after, limit).await
    }

    async fn requeue_dead_letter(&self, id: u64) -> StoreResult<u64> {
        self.inner.requeue_dead_letter(id).await
    }

    async fn purge_dead_letters(&self, ids: &[u64]) -> StoreResult<u64> {
        self.inner.purge_dead_letters(ids).await
    }
}

#[async_trait]
impl LeaseManager for FaultyStore {
    async fn acquire(&self, actor: &ActorId, owner: &str, ttl: Duration) -> StoreResult<Lease> {
        if self.faults.take(&self.faults.hang_acquires) {
            return std::future::pending().await;
        }
        self.write("acquire", self.inner.acquire(actor, owner, ttl))
            .await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> StoreResult<Lease> {
        if self.faults.fail_renewals.load(Ordering::Acquire) {
            self.faults.injected.fetch_add(1, Ordering::Relaxed);
            return Err(injected("renew"));
        }
        self.faults.renewal_calls.fetch_add(1, Ordering::Relaxed);
        self.faults.renewals.fetch_add(1, Ordering::Relaxed);
        self.write("renew", self.inner.renew(lease, ttl)).await
    }

    async fn renew_many(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> StoreResult<Vec<StoreResult<Lease>>> {
        if self.faults.fail_renewals.load(Ordering::Acquire) {
            self.faults.injected.fetch_add(1, Ordering::Relaxed);
            return Err(injected("renew"));
        }
        if self.faults.hang_renewals.load(Ordering::Acquire) {
            self.faults.injected.fetch_add(1, Ordering::Relaxed);
            while self.faults.hang_renewals.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.faults.renewal_calls.fetch_add(1, Ordering::Relaxed);
        self.faults
            .renewals
            .fetch_add(leases.len() as u64, Ordering::Relaxed);
        self.write("renew", self.inner.renew_many(leases, ttl))
            .await
    }

    async fn release(&self, lease: &Lease) -> StoreResult<bool> {
        self.inner.release(lease).await
    }

    async fn holder(&self, actor: &ActorId) -> StoreResult<Option<Lease>> {
        self.inner.holder(actor).await
    }
}

#[async_trait]
impl IdempotencyStore for FaultyStore {
    async fn reserve(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        ttl: Duration,
    ) -> StoreResult<Reservation> {
        self.write("reserve", self.inner.reserve(actor, key, ttl))
            .await
    }

    async fn complete(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        result: &Value,
        ttl: Duration,
    ) -> StoreResult<()> {
        self.write("complete", self.inner.complete(actor, key, result, ttl))
            .await
    }

    async fn abandon(&self, actor: &ActorId, key: &IdempotencyKey) -> StoreResult<bool> {
        self.inner.abandon(actor, key).await
    }

    async fn lookup(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
    ) -> StoreResult<Option<Reservation>> {
        self.faults.lookups.fetch_add(1, Ordering::Relaxed);
        if self.faults.hang_lookups.load(Ordering::SeqCst) {
            return std::future::pending().await;
        }
        self.inner.lookup(actor, key).await
    }

    async fn purge_expired(&self, limit: usize) -> StoreResult<u64> {
        self.inner.purge_expired(limit).await
    }

    fn completions(
        &self,
    ) -> Option<tokio::sync::broadcast::Receiver<loom_core::store::Completion>> {
        if self.faults.no_signals.load(Ordering::SeqCst) {
            return None;
        }
        if self.faults.silent_signals.load(Ordering::SeqCst) {
            let (tx, rx) = tokio::sync::broadcast::channel(1);
            self.faults
                .silent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(tx);
            return Some(rx);
        }
        self.inner.completions()
    }
}

#[async_trait]
impl Parking for FaultyStore {
    async fn park(&self, actor: &ActorId, park: &Park, fence: Option<&Lease>) -> StoreResult<()> {
        self.write("park", self.inner.park(actor, park, fence))
            .await
    }

    async fn unpark(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        self.inner.unpark(actor).await
    }

    async fn parked(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        self.inner.parked(actor).await
    }

    async fn parked_actors(
        &self,
        after: Option<&ActorId>,
        limit: usize,
    ) -> StoreResult<Vec<(ActorId, Park)>> {
        self.inner.parked_actors(after, limit).await
    }
}

#[async_trait]
impl Membership for FaultyStore {
    async fn heartbeat(
        &self,
        node: &str,
        incarnation: u64,
        kinds: &[&str],
        ttl: Duration,
    ) -> StoreResult<Member> {
        if self.faults.fail_heartbeats.load(Ordering::Acquire) {
            self.faults.injected.fetch_add(1, Ordering::Relaxed);
            return Err(injected("heartbeat"));
        }
        self.write(
            "heartbeat",
            self.inner.heartbeat(node, incarnation, kinds, ttl),
        )
        .await
    }

    async fn leave(&self, node: &str, incarnation: u64) -> StoreResult<bool> {
        self.write("leave", self.inner.leave(node, incarnation))
            .await
    }

    async fn members(&self) -> StoreResult<Roster> {
        if self.faults.fail_members.load(Ordering::Acquire) {
            self.faults.injected.fetch_add(1, Ordering::Relaxed);
            return Err(injected("members"));
        }
        self.inner.members().await
    }
}

#[async_trait]
impl Store for FaultyStore {
    fn partitions(&self) -> u32 {
        self.inner.partitions()
    }

    async fn relay_backlog(&self) -> StoreResult<Vec<loom_core::store::RelayBacklog>> {
        self.inner.relay_backlog().await
    }

    fn relay_failure(&self) -> Option<loom_core::store::RelayFailure> {
        self.inner.relay_failure()
    }

    async fn commit_turn(&self, turn: Turn<'_>) -> StoreResult<Committed> {
        if self.faults.take(&self.faults.fail_writes) {
            return Err(injected("commit_turn"));
        }
        self.write("commit_turn", self.inner.commit_turn(turn))
            .await
    }

    async fn enqueue_once(
        &self,
        msg: &Envelope,
        deliver_at: Option<Timestamp>,
        key: &IdempotencyKey,
        ttl: Duration,
    ) -> StoreResult<Enqueued> {
        self.write(
            "enqueue_once",
            self.inner.enqueue_once(msg, deliver_at, key, ttl),
        )
        .await
    }

    async fn enqueue_event(
        &self,
        msg: &Envelope,
        key: &IdempotencyKey,
        ttl: Duration,
        owner: &ActorId,
    ) -> StoreResult<Enqueued> {
        self.write(
            "enqueue_event",
            self.inner.enqueue_event(msg, key, ttl, owner),
        )
        .await
    }

    async fn retire(
        &self,
        receipt: &Receipt,
        fence: &Lease,
        highest: Seq,
    ) -> StoreResult<loom_core::Retired> {
        self.write("retire", self.inner.retire(receipt, fence, highest))
            .await
    }
}

/// A redb storage backend over a file that fails writes, fsyncs or reads on command: faults
/// under the embedded store, where its group commit meets the disk.
#[derive(Debug)]
pub struct FaultyDisk {
    inner: loom_core::embedded::FileBackend,
    /// The armed faults.
    pub faults: Arc<DiskFaults>,
}

/// The faults a [`FaultyDisk`] can inject; counters fail the next N calls.
#[derive(Debug, Default)]
pub struct DiskFaults {
    /// Fail the next N `fdatasync`s.
    pub fail_syncs: AtomicU32,
    /// Fail the next N writes.
    pub fail_writes: AtomicU32,
    /// Fail the next N reads.
    pub fail_reads: AtomicU32,
    /// Panic in the next N writes ([`FaultyRedo`] only): a bug on the thread that writes, as
    /// the store would meet it.
    pub panic_writes: AtomicU32,
    /// How many failures were injected.
    pub injected: AtomicU64,
}

impl DiskFaults {
    fn hit(&self, counter: &AtomicU32, what: &str) -> std::io::Result<()> {
        if counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(std::io::Error::other(format!("injected {what} failure")));
        }
        Ok(())
    }
}

impl FaultyDisk {
    /// Opens (creating) `path` with no fault armed.
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(FaultyDisk {
            inner: loom_core::embedded::FileBackend::new(file).map_err(std::io::Error::other)?,
            faults: Arc::default(),
        })
    }
}

impl loom_core::embedded::StorageBackend for FaultyDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.faults.hit(&self.faults.fail_reads, "read")?;
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.faults.hit(&self.faults.fail_syncs, "fdatasync")?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.faults.hit(&self.faults.fail_writes, "write")?;
        self.inner.write(offset, data)
    }
}

/// The embedded store's redo log file with faults: wrap it with
/// [`loom_core::EmbeddedStore::open_with_redo`]. Writes and syncs fail as armed in
/// [`DiskFaults`]; while [`FaultyRedo::hold`] is set, every sync waits (and says so in
/// [`FaultyRedo::holding`]) until it is cleared, which lets a test look at the store while a
/// batch is committed but not yet durable.
pub struct FaultyRedo {
    file: std::fs::File,
    /// The armed faults (`fail_writes`, `fail_syncs`; reads do not go through here).
    pub faults: Arc<DiskFaults>,
    /// Set to hold syncs.
    pub hold: Arc<AtomicBool>,
    /// True while a sync is being held.
    pub holding: Arc<AtomicBool>,
}

impl FaultyRedo {
    /// Wraps the log file, with no fault armed.
    pub fn new(file: std::fs::File) -> Self {
        FaultyRedo {
            file,
            faults: Arc::default(),
            hold: Arc::default(),
            holding: Arc::default(),
        }
    }
}

impl loom_core::RedoFile for FaultyRedo {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.faults.hit(&self.faults.panic_writes, "write").is_err() {
            panic!("injected panic in a redo log write");
        }
        self.faults.hit(&self.faults.fail_writes, "write")?;
        std::os::unix::fs::FileExt::write_all_at(&self.file, buf, offset)
    }

    fn sync_data(&mut self) -> std::io::Result<()> {
        while self.hold.load(Ordering::SeqCst) {
            self.holding.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
        }
        self.holding.store(false, Ordering::SeqCst);
        self.faults.hit(&self.faults.fail_syncs, "fdatasync")?;
        self.file.sync_data()
    }

    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.faults.hit(&self.faults.fail_writes, "truncate")?;
        self.file.set_len(len)?;
        self.file.sync_all()
    }
}
