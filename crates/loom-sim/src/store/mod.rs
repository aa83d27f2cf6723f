//! [`SimStore`]: the whole store contract in memory, deterministic, with a durability model,
//! injected faults and a trace.
//!
//! # Determinism
//!
//! Everything the store does is a function of the seed, the [`Faults`], the order in which
//! requests reach it and the clocks, so that a simulation on a single-threaded tokio runtime
//! with a paused clock replays exactly:
//! - all state is plain owned data in one `Data` value (`BTreeMap`s and `BTreeSet`s, never a hash map:
//!   their iteration order is random per process);
//! - time is read only from [`seam::store_now`] (the wall clock, or the simulated one without
//!   any node's skew: the store is one machine, whichever node asks) and
//!   waited only with `tokio::time::sleep` (virtual under a paused clock);
//! - every random draw comes from one `fastrand::Rng`, seeded by the constructor and kept
//!   behind the same mutex as the data;
//! - a read runs inside its caller's future; a write, once sent, runs in a task of its own
//!   (spawned at once, so in the order the writes were sent), as a request on the wire goes on
//!   whether or not its sender still waits: a caller that gives up (a timeout, a task dropped)
//!   does not take its write back. Only the crash of its node does, before it arrives
//!   ([`SimStore::sever`]). Besides those, a store of one partition starts no task; one of
//!   several starts one relay task per partition on the runtime it is created on (see
//!   "Partitions" below), whose requests are requests like any other. The mutex is a
//!   `std::sync::Mutex`, never held across an `.await`.
//!
//! # Durability
//!
//! The store keeps two copies of its `Data`: `live`, what every request reads and writes, and
//! `durable`, what survives a [power loss](SimStore::power_loss). `version` counts the writes
//! applied to `live`; `durable_version` is the version `durable` is a copy of. A write:
//! 1. waits its request latency (drawn from [`Faults::latency`]);
//! 2. may fail there without being applied ([`Faults::transient`], [`Faults::disk_full`]);
//! 3. is applied to `live` under the mutex, and bumps `version` if it succeeded (a refused
//!    write wrote nothing: every write checks all its conditions before it changes anything);
//! 4. syncs: waits an fsync latency (drawn from [`Faults::fsync`]; zero means no sleep at all),
//!    then, if `durable_version` is still below its version, copies `live` to `durable`. This is
//!    group commit: one sync covers every write applied before it, so a write whose version a
//!    concurrent sync already covered copies nothing;
//! 5. returns its result, unless its reply is lost ([`Faults::lost_reply`]).
//!
//! A read returns what it found in `live`, but only once that is durable: if it saw a write
//! whose sync has not happened yet, it joins the group commit (waits an fsync latency and
//! syncs). So no caller ever sees data that a power loss can take back, even data written by a
//! request whose caller went away before its sync (a cancelled future): the next read or write
//! syncs it, as a real store's group commit does not depend on its callers waiting.
//!
//! A [power loss](SimStore::power_loss) sets `live` back to `durable` and fails every request
//! then in flight with [`SimFault::PowerLoss`]: none of them was acknowledged, and each may or
//! may not have happened (a write already synced by someone else's sync stays). Copies are cheap:
//! each actor's journal, mailbox and idempotency records sit behind an `Arc`, written with
//! `Arc::make_mut`, so a sync copies one pointer per actor, and a write after it copies only
//! the one actor's part it changes.
//!
//! [`SimStore::set_ack_before_fsync`] switches on a deliberate bug for testing the simulator
//! itself: a write then returns as soon as it is applied, and what it wrote is synced only
//! later, as an OS writes dirty pages back on its own: a write in that mode first syncs what
//! earlier writes left if the last sync is [`LAZY_SYNC`] old. A power loss then drops
//! acknowledged writes.
//!
//! # Partitions
//!
//! [`SimStore::new_partitioned`] makes a store of several partitions, as the embedded store
//! has them: an actor lives in partition `loom_core::partition::partition_of(actor, P)`, a turn
//! writes only its actor's partition, and a message it sends to an actor of another partition
//! leaves through the sender partition's outbox, in the turn's write, and is moved into its
//! target mailbox by that partition's relay, a tokio task, exactly once (rule D18; `relay.rs`
//! explains the protocol and keeps its invariants). The relay moves only durable outbox rows,
//! and its moves and trims are requests like any other: they wait their latency, fail with the
//! injected faults, sync, are taken back by a power loss, and add trace lines. The relay's
//! deliberate bug ([`Bugs::accept_duplicate_relay`]) skips the high-water mark, and the
//! relay audit records each message the relay made durable twice ([`SimStore::violations`]).
//!
//! # Trace
//!
//! Every request that answers adds one line, `<ms>ms <method> <argument> -> <outcome>`, where
//! `ms` is tokio's clock since the store was created and the outcome is `ok` or the error's
//! variant (naming the injected fault, if it was one); power losses and crashes add a line too.
//! [`SimStore::trace_hash`] is FNV-1a 64 over every line, [`SimStore::recent`] the last
//! [`RECENT`] of them. A request whose caller went away before it answered adds no line.

mod idempotency;
mod journal;

/// With [`Bugs::ack_before_fsync`] on, how old the last sync must be before a write
/// syncs what earlier writes left (the delay of an OS writing dirty pages back on its own).
pub const LAZY_SYNC: Duration = Duration::from_millis(200);

mod lease;
mod mailbox;
mod membership;
mod park;
mod relay;
mod turn;

#[doc(hidden)]
pub use relay::RelayHold;
pub use relay::{RELAY_BATCH, RELAY_TICK};

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use loom_core::partition::check_partitions;
use loom_core::{ActorId, MessageId, Seq, StoreError, StoreResult, Timestamp, seam};
use tokio::sync::{Notify, broadcast};

/// Backend name in errors.
pub const BACKEND: &str = "sim";

/// How many trace lines [`SimStore::recent`] keeps.
pub const RECENT: usize = 64;

/// A stored record (an entry, a snapshot, a message, a park record) as the other backends
/// store it: its encoded frame, shared so that copying the data copies no bytes.
type Frame = Arc<[u8]>;

/// The faults the store injects, every one drawn from its seeded generator. All off by default.
///
/// ```
/// use std::time::Duration;
/// use loom_sim::store::Faults;
///
/// let f = Faults {
///     latency: (Duration::from_millis(1), Duration::from_millis(20)),
///     transient: 0.01,
///     ..Faults::default()
/// };
/// assert_eq!(f.fsync, (Duration::ZERO, Duration::ZERO));
/// assert!(!f.disk_full);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Faults {
    /// Least and most time a request takes to reach the store, drawn uniformly per request.
    /// Under a paused clock this reorders concurrent independent requests. Zero: no sleep.
    pub latency: (Duration, Duration),
    /// Least and most time a sync (an fsync) takes, drawn uniformly per sync. Zero: no sleep.
    pub fsync: (Duration, Duration),
    /// Probability that a request fails with [`StoreError::Unavailable`]
    /// ([`SimFault::Transient`]) before it is applied: nothing is written.
    pub transient: f64,
    /// Probability that a write is applied and synced, then fails with
    /// [`StoreError::Unavailable`] ([`SimFault::LostReply`]): the caller cannot tell that it
    /// landed.
    pub lost_reply: f64,
    /// While true, every write fails before it is applied with [`StoreError::Storage`] whose
    /// cause is an `std::io::Error` of kind `StorageFull`; reads still work.
    pub disk_full: bool,
}

/// What the store counted since it was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct SimStats {
    /// Requests received (reads and writes, failed or not).
    pub requests: u64,
    /// Write requests applied to the live data (succeeded or refused by a rule of the contract).
    pub writes: u64,
    /// Syncs that copied the live data to the durable data.
    pub syncs: u64,
    /// Requests failed by an injected transient fault.
    pub transient: u64,
    /// Writes whose reply was lost.
    pub lost_reply: u64,
    /// Writes refused because the disk was full.
    pub disk_full: u64,
    /// Power losses.
    pub power_losses: u64,
    /// Process crashes recorded.
    pub crashes: u64,
    /// Snapshots damaged by [`SimStore::rot_a_snapshot`].
    pub rotten_snapshots: u64,
}

/// Why an injected failure happened; the cause inside the [`StoreError::Unavailable`] the store
/// returns for it (see [`SimFault::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SimFault {
    /// [`Faults::transient`]: the request failed before it was applied.
    #[error("simulated transient failure: the request was not applied")]
    Transient,
    /// [`Faults::lost_reply`]: the write was applied and synced, its reply lost.
    #[error("simulated lost reply: the write was applied and synced, then its reply was lost")]
    LostReply,
    /// The store lost power while the request was in flight: it was not acknowledged, and it
    /// may or may not have happened.
    #[error("simulated power loss while the request was in flight")]
    PowerLoss,
}

impl SimFault {
    /// The injected fault behind `e`, if it is one.
    ///
    /// ```
    /// use loom_sim::store::SimFault;
    ///
    /// assert_eq!(SimFault::of(&SimFault::LostReply.into()), Some(SimFault::LostReply));
    /// assert_eq!(SimFault::of(&loom_core::StoreError::Closed), None);
    /// ```
    pub fn of(e: &StoreError) -> Option<SimFault> {
        match e {
            StoreError::Unavailable { source, .. } => {
                let cause: &(dyn std::error::Error + 'static) = &**source;
                cause.downcast_ref::<SimFault>().copied()
            }
            _ => None,
        }
    }
}

impl From<SimFault> for StoreError {
    fn from(f: SimFault) -> StoreError {
        StoreError::unavailable(BACKEND, f)
    }
}

/// Everything the store holds. `Clone` is what a sync does (`durable = live.clone()`): each
/// concern's type keeps its per-actor parts behind an `Arc`, so that clone is cheap.
#[derive(Debug, Clone, Default)]
struct Data {
    /// Journals and snapshots (`journal.rs`).
    journals: journal::Journals,
    /// Mailboxes and dead letters (`mailbox.rs`).
    mailboxes: mailbox::Mailboxes,
    /// Leases and their fencing tokens (`lease.rs`).
    leases: lease::Leases,
    /// Idempotency records (`idempotency.rs`).
    records: idempotency::Records,
    /// Park records (`park.rs`); the mailbox honours them.
    parked: park::Parked,
    /// Node membership (`membership.rs`).
    members: membership::Members,
    /// Outboxes and high-water marks of a store of several partitions (`relay.rs`).
    relay: relay::Outboxes,
}

/// Deliberate bugs, each a rule of the store contract broken on purpose, to show that the
/// simulator finds it (and finds nothing when it is off). Test-only switches: a real store has
/// no such thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Bugs {
    /// A write returns as soon as it is applied; what it wrote is synced only later, when a
    /// write finds the last sync [`LAZY_SYNC`] old (as an OS writes dirty pages back on its
    /// own). A power loss then drops acknowledged writes (rule D1).
    pub ack_before_fsync: bool,
    /// Compaction trims through the snapshot it saves, past the oldest kept one (rule D10):
    /// harmless until the newest snapshot is unreadable and recovery falls back to an older
    /// one whose entries are gone.
    pub trim_past_oldest_snapshot: bool,
    /// A turn commits without checking its fence (rule D8): a node whose lease expired while
    /// it was stalled commits what it did meanwhile. The store's fence audit records each such
    /// commit ([`SimStore::violations`]).
    pub skip_fence_check: bool,
    /// The relay enqueues every outbox row it finds, skipping the target's high-water mark
    /// (rule D18). Harmless while every move is trimmed at once; a move repeated after a
    /// failed trim, or after a power loss between a move and its trim, delivers its messages
    /// twice, and the relay audit records each ([`SimStore::violations`]).
    pub accept_duplicate_relay: bool,
    /// The mailbox keeps a scheduled message's due time in whole seconds, rounded down (as a
    /// store that scores a sorted set by UNIX seconds would): a timer may fire up to a second
    /// early (the promise of `Context::send_after`). The timer workload's check finds it.
    pub timers_in_whole_seconds: bool,
}

/// The store's state, behind its one mutex.
struct State {
    /// What requests read and write.
    live: Data,
    /// What a power loss keeps. Invariant: a copy of `live` as it was at `durable_version`.
    durable: Data,
    /// Writes applied to `live` (and power losses, each of which makes a new `live`). Only grows.
    version: u64,
    /// The version `durable` is a copy of; at most `version`.
    durable_version: u64,
    /// Power losses so far: a request that began in an earlier epoch fails with
    /// [`SimFault::PowerLoss`] at its next step.
    epoch: u64,
    /// The only source of randomness.
    rng: fastrand::Rng,
    faults: Faults,
    /// The deliberate bugs switched on ([`SimStore::set_bugs`]).
    bugs: Bugs,
    /// The relay's test hooks ([`SimStore::hold_relay`]).
    relay_hold: RelayHold,
    /// When `durable` was last brought up to date.
    synced_at: tokio::time::Instant,
    stats: SimStats,
    /// The highest version a request was answered from (what it wrote or saw), injected
    /// failures aside: the durability audit's mark (see [`SimStore::power_loss`]).
    answered: u64,
    trace: Trace,
    /// When the store was created, by tokio's clock: trace times are measured from here.
    created: tokio::time::Instant,
}

impl State {
    /// A duration drawn uniformly from `min..=max` (`min` if the range is empty). Draws
    /// even then, so that turning a fault off (as shrinking does) leaves every other draw of
    /// the run where it was.
    fn draw(&mut self, (min, max): (Duration, Duration)) -> Duration {
        let x = self.rng.f64();
        if max <= min {
            return min;
        }
        min + (max - min).mul_f64(x)
    }

    /// True with probability `p`. Draws even for a fault that is off (see [`draw`](Self::draw)).
    fn chance(&mut self, p: f64) -> bool {
        let x = self.rng.f64();
        p > 0.0 && x < p
    }

    /// Fails a request that began before the latest power loss.
    fn alive(&self, epoch: u64) -> StoreResult<()> {
        if self.epoch != epoch {
            return Err(SimFault::PowerLoss.into());
        }
        Ok(())
    }

    /// Makes everything applied so far durable, if `seen` is not durable yet (group commit:
    /// one copy covers every write applied before it); returns whether it copied. Called only
    /// through [`SimStore::sync_through`], which keeps the relay audit in step.
    fn sync_through(&mut self, seen: u64) -> bool {
        if self.durable_version < seen {
            self.durable = self.live.clone();
            self.durable_version = self.version;
            self.stats.syncs += 1;
            self.synced_at = tokio::time::Instant::now();
            return true;
        }
        false
    }

    /// Milliseconds of tokio's clock (virtual when paused) since the store was created.
    fn elapsed_ms(&self) -> u128 {
        tokio::time::Instant::now()
            .saturating_duration_since(self.created)
            .as_millis()
    }
}

/// The running trace: a hash of every line and the last [`RECENT`] lines.
struct Trace {
    /// FNV-1a 64 over every line, each followed by `\n`.
    hash: u64,
    events: u64,
    recent: VecDeque<String>,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Trace {
    fn new() -> Self {
        Trace {
            hash: FNV_OFFSET,
            events: 0,
            recent: VecDeque::with_capacity(RECENT),
        }
    }

    fn push(&mut self, line: String) {
        // Every line, for `RUST_LOG=loom_sim::trace=trace`.
        tracing::trace!(target: "loom_sim::trace", "{line}");
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(FNV_PRIME);
        }
        self.events += 1;
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
    }
}

/// A short name for an outcome, for the trace: `ok`, or the error's variant (and the injected
/// fault, if it was one).
fn outcome<R>(r: &StoreResult<R>) -> String {
    let e = match r {
        Ok(_) => return "ok".to_owned(),
        Err(e) => e,
    };
    if let Some(f) = SimFault::of(e) {
        return format!("unavailable({f:?})");
    }
    if e.io_kind() == Some(std::io::ErrorKind::StorageFull) {
        return "storage(full)".to_owned();
    }
    let name = match e {
        StoreError::InvalidId(_) => "invalid_id",
        StoreError::Conflict { .. } => "conflict",
        StoreError::BatchOutOfOrder { .. } => "batch_out_of_order",
        StoreError::TooLarge { .. } => "too_large",
        StoreError::TrimRefused { .. } => "trim_refused",
        StoreError::SnapshotRefused { .. } => "snapshot_refused",
        StoreError::Gap { .. } => "gap",
        StoreError::InvalidRequest(_) => "invalid_request",
        StoreError::Corrupt { .. } => "corrupt",
        StoreError::LeaseHeld { .. } => "lease_held",
        StoreError::LeaseLost { .. } => "lease_lost",
        StoreError::StaleReceipt { .. } => "stale_receipt",
        StoreError::DeadLetterNotFound(_) => "dead_letter_not_found",
        StoreError::Locked { .. } => "locked",
        StoreError::NodeTaken { .. } => "node_taken",
        StoreError::Unavailable { .. } => "unavailable",
        StoreError::Storage { .. } => "storage",
        StoreError::Denied { .. } => "denied",
        StoreError::Closed => "closed",
        _ => "error",
    };
    name.to_owned()
}

/// Sleeps `d` on tokio's clock; a zero duration does not sleep (nor yield) at all.
async fn pause(d: Duration) {
    if d.is_zero() {
        // A real store never answers inside the caller's poll: let other tasks run first.
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(d).await;
    }
}

/// The deterministic, in-memory store of the simulator (see the [module docs](self)). A cheap
/// handle: clones share one store, so the simulator keeps one to cut the power while the
/// runtime holds another.
///
/// ```
/// use std::time::Duration;
/// use loom_core::{ActorId, Envelope, Mailbox};
/// use loom_sim::store::{Faults, SimStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = SimStore::new(1, Faults::default());
/// let a = ActorId::new("account", "alice")?;
/// store.enqueue(&Envelope::new(a.clone(), serde_json::json!(1)), None).await?;
/// assert_eq!(store.pending(&a).await?, 1);
/// assert_eq!(store.stats().writes, 1);
/// assert_eq!(store.events(), 2);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SimStore {
    inner: Arc<Inner>,
    /// The connection this handle's requests travel on (see [`SimStore::link`]).
    link: Option<Arc<Link>>,
}

struct Inner {
    seed: u64,
    /// Fixed at creation: `1..=MAX_PARTITIONS`.
    partitions: u32,
    state: Mutex<State>,
    /// What the fence and relay audits saw (see [`SimStore::violations`]). Apart from `state`,
    /// so that a request's closure can record into it while it holds the data.
    violations: Mutex<Vec<String>>,
    /// The relay audit (`relay.rs`). Apart from `state`, so that a move's closure can record
    /// into it while it holds the data. Lock order: `state`, then this, then `violations`.
    relayed: Mutex<relay::Oracle>,
    /// Partition `p`'s relay waits on `wake[p]`; empty for a store of one partition.
    wake: Vec<Arc<Notify>>,
    /// The recipients of each relay move ([`Mailbox::arrivals`](loom_core::Mailbox::arrivals)).
    arrivals: broadcast::Sender<Arc<[ActorId]>>,
}

/// How many batches of recipients [`Mailbox::arrivals`](loom_core::Mailbox::arrivals) holds
/// for a receiver that falls behind (it then gets `Lagged` and scans).
const ARRIVALS: usize = 1024;

/// One node's connection to the store: requests sent on it while it is stalled arrive when
/// the stall ends (a network partition, a long GC pause of the node's process).
#[derive(Debug, Default)]
struct Link {
    stalled_until: Mutex<Option<tokio::time::Instant>>,
    /// The node crashed: nothing it sent and that has not arrived yet ever arrives.
    severed: std::sync::atomic::AtomicBool,
}

impl SimStore {
    /// An empty store of one partition whose random draws come from `seed`, injecting
    /// `faults`.
    ///
    /// Create it on the tokio runtime that will use it: trace times count from here by
    /// tokio's clock, so a store created before a paused runtime started would put the real
    /// time between the two into every trace line.
    pub fn new(seed: u64, faults: Faults) -> SimStore {
        SimStore::with_partitions(seed, faults, 1)
    }

    /// An empty store of `partitions` partitions (see the [module docs](self)), whose random
    /// draws come from `seed`, injecting `faults`. With more than one, it starts one relay task
    /// per partition on the current tokio runtime; they end once the last handle to the store
    /// is dropped.
    ///
    /// Fails with [`StoreError::InvalidRequest`] for a count outside
    /// `1..=`[`MAX_PARTITIONS`](loom_core::partition::MAX_PARTITIONS) (as the embedded store
    /// does), and for more than one partition outside a tokio runtime (nothing could run the
    /// relays).
    ///
    /// ```
    /// use loom_core::Store;
    /// use loom_sim::store::{Faults, SimStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = SimStore::new_partitioned(1, Faults::default(), 3)?;
    /// assert_eq!(store.partitions(), 3);
    /// assert!(SimStore::new_partitioned(1, Faults::default(), 0).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new_partitioned(seed: u64, faults: Faults, partitions: u32) -> StoreResult<SimStore> {
        let partitions = check_partitions(partitions)?;
        if partitions == 1 {
            return Ok(SimStore::with_partitions(seed, faults, 1));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::InvalidRequest(
                "a simulated store of several partitions is created on the tokio runtime that runs its relays".into(),
            )
        })?;
        let store = SimStore::with_partitions(seed, faults, partitions);
        relay::start(&store.inner, &runtime);
        Ok(store)
    }

    /// The store, without its relays started. `partitions` is checked by the caller.
    fn with_partitions(seed: u64, faults: Faults, partitions: u32) -> SimStore {
        let state = State {
            live: Data::default(),
            durable: Data::default(),
            version: 0,
            durable_version: 0,
            epoch: 0,
            rng: fastrand::Rng::with_seed(seed),
            faults,
            bugs: Bugs::default(),
            relay_hold: RelayHold::Run,
            synced_at: tokio::time::Instant::now(),
            stats: SimStats::default(),
            answered: 0,
            trace: Trace::new(),
            created: tokio::time::Instant::now(),
        };
        SimStore {
            inner: Arc::new(Inner {
                seed,
                partitions,
                state: Mutex::new(state),
                violations: Mutex::new(Vec::new()),
                relayed: Mutex::new(relay::Oracle::default()),
                wake: if partitions > 1 {
                    (0..partitions).map(|_| Arc::new(Notify::new())).collect()
                } else {
                    Vec::new()
                },
                arrivals: broadcast::channel(ARRIVALS).0,
            }),
            link: None,
        }
    }

    /// A handle to the same store on a connection of its own, for one node: [`stall`]
    /// delays only the requests of this handle (and its clones).
    ///
    /// [`stall`]: Self::stall
    pub fn link(&self) -> SimStore {
        SimStore {
            inner: self.inner.clone(),
            link: Some(Arc::default()),
        }
    }

    /// Stalls this handle's connection for `d` from now: a request sent meanwhile reaches the
    /// store only when the stall ends, as after a network partition or a long pause of the
    /// node's process. Its lease renewals stall too, so its leases expire and other nodes take
    /// its actors over while it still believes it holds them. No-op on a handle without a
    /// [`link`](Self::link).
    pub fn stall(&self, d: Duration) {
        if let Some(link) = &self.link {
            let until = tokio::time::Instant::now() + d;
            *link.stalled_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
            let mut s = self.state();
            let line = format!("{}ms stall {} ms", s.elapsed_ms(), d.as_millis());
            s.trace.push(line);
        }
    }

    /// Cuts this handle's connection for good, as when its node crashes: a request sent on it
    /// that has not reached the store yet never does (nor does any sent later). No-op on a
    /// handle without a [`link`](Self::link).
    pub fn sever(&self) {
        if let Some(link) = &self.link {
            link.severed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let mut s = self.state();
            let line = format!("{}ms sever", s.elapsed_ms());
            s.trace.push(line);
        }
    }

    fn severed(&self) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.severed.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Rule breaks the audits saw: a turn that committed although its fence was not the
    /// actor's current lease (rule D8), and a message the relay enqueued a second time in the
    /// durable data (rule D18). Empty unless [`Bugs::skip_fence_check`] or
    /// [`Bugs::accept_duplicate_relay`] is on: the store
    /// refuses such turns, and the relay's high-water marks skip what was moved.
    pub fn violations(&self) -> Vec<String> {
        self.inner
            .violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a rule break (see [`violations`](Self::violations)).
    fn violation(&self, what: String) {
        self.inner
            .violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`State::sync_through`], with the relay audit kept in step: called with the data's
    /// mutex held (`s`), so that the moves the audit holds as pending are exactly those the
    /// copy made durable. Records each duplicate the copy made durable.
    fn sync_through(&self, s: &mut State, seen: u64) {
        if s.sync_through(seen) {
            let twice = self
                .inner
                .relayed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .synced();
            for what in twice {
                self.violation(what);
            }
        }
    }

    /// The seed the store was created with.
    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// The faults injected from now on.
    pub fn faults(&self) -> Faults {
        self.state().faults
    }

    /// Injects `faults` from now on (requests already past a step keep what they drew).
    pub fn set_faults(&self, faults: Faults) {
        self.state().faults = faults;
    }

    /// Switches deliberate bugs on or off (all off by default), to show that the simulator
    /// finds each of them (see [`Bugs`]).
    pub fn set_bugs(&self, bugs: Bugs) {
        let mut s = self.state();
        s.bugs = bugs;
        // Kept in the data itself, live and durable, so that a power loss keeps it.
        s.live.mailboxes.whole_seconds = bugs.timers_in_whole_seconds;
        s.durable.mailboxes.whole_seconds = bugs.timers_in_whole_seconds;
    }

    /// The bugs switched on.
    pub fn bugs(&self) -> Bugs {
        self.state().bugs
    }

    /// Switches [`Bugs::ack_before_fsync`] alone.
    pub fn set_ack_before_fsync(&self, on: bool) {
        self.state().bugs.ack_before_fsync = on;
    }

    /// The power goes out: everything not yet synced is gone (`live` becomes a copy of
    /// `durable`), and every request in flight fails with [`SimFault::PowerLoss`]. Leases,
    /// leased messages and the rest are data like any other: what was durable stays.
    pub fn power_loss(&self) {
        let mut s = self.state();
        if s.answered > s.durable_version {
            // The durability audit (rule D1): a caller was answered from a version that is
            // about to vanish. Never without the ack-before-fsync bug: every answer waits for
            // the sync of what it wrote or saw.
            let lost = format!(
                "a power loss dropped versions {}..={} of the store, already answered to a caller \
                 (acknowledged before durable)",
                s.durable_version + 1,
                s.answered
            );
            self.violation(lost);
        }
        let kept = s.durable.clone();
        s.live = kept;
        s.version += 1;
        s.durable_version = s.version;
        s.epoch += 1;
        s.stats.power_losses += 1;
        // Still under the data's mutex: no move lands between the two.
        self.inner
            .relayed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .power_lost();
        let line = format!("{}ms power-loss", s.elapsed_ms());
        s.trace.push(line);
    }

    /// Bit rot: the newest snapshot of one actor that keeps an older one beside it is damaged
    /// (on disk: in both the live and the durable data), so that loading it fails its checksum
    /// and recovery must fall back to the older one (rule D9). The actor is drawn from the
    /// store's generator; returns it and the damaged snapshot's seq (`None` if no actor keeps
    /// two snapshots).
    pub fn rot_a_snapshot(&self) -> Option<(ActorId, Seq)> {
        let mut s = self.state();
        let candidates = s.live.journals.with_a_fallback_snapshot();
        if candidates.is_empty() {
            return None;
        }
        let actor = candidates[s.rng.usize(..candidates.len())].clone();
        let seq = s.live.journals.rot_newest_snapshot(&actor)?;
        // The durable copy holds the same snapshot only if it was synced; damage it there too
        // when it is the same one.
        if s.durable.journals.newest_snapshot(&actor) == Some(seq) {
            s.durable.journals.rot_newest_snapshot(&actor);
        }
        s.stats.rotten_snapshots += 1;
        let line = format!("{}ms rot {actor} snapshot {seq}", s.elapsed_ms());
        s.trace.push(line);
        Some((actor, seq))
    }

    /// The process using the store crashed: the store keeps everything (it is another
    /// process's memory, or a disk), so this only records the crash in the trace and the stats.
    pub fn crash(&self) {
        let mut s = self.state();
        s.stats.crashes += 1;
        let line = format!("{}ms crash", s.elapsed_ms());
        s.trace.push(line);
    }

    /// What the store counted so far.
    pub fn stats(&self) -> SimStats {
        self.state().stats
    }

    /// The trace's running hash: equal for two runs that sent the same requests at the same
    /// virtual times with the same outcomes.
    pub fn trace_hash(&self) -> u64 {
        self.state().trace.hash
    }

    /// How many events (requests, power losses, crashes) the trace holds.
    pub fn events(&self) -> u64 {
        self.state().trace.events
    }

    /// The last [`RECENT`] trace lines, oldest first (`<ms>ms <method> <argument> -> <outcome>`),
    /// for printing when a run fails.
    pub fn recent(&self) -> Vec<String> {
        self.state().trace.recent.iter().cloned().collect()
    }

    /// How many writes are applied but not yet durable (0 when everything is synced).
    pub fn unsynced(&self) -> u64 {
        let s = self.state();
        s.version - s.durable_version
    }

    /// A fresh message id from the store's own generator: a time-ordered UUID (version 7) of
    /// [`seam::store_now`], as [`MessageId::new`] makes, but deterministic for the seed.
    fn fresh_message_id(&self) -> MessageId {
        let ms = seam::store_now().as_millis();
        let bits = self.state().rng.u128(..).to_le_bytes();
        let mut random = [0u8; 10];
        random.copy_from_slice(&bits[..10]);
        MessageId::from(uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid())
    }

    /// A read request: `f` sees the live data (see the [module docs](self) for the steps).
    async fn query<R, F>(&self, method: &'static str, arg: &str, f: F) -> StoreResult<R>
    where
        F: FnOnce(&Data, Timestamp) -> StoreResult<R> + Send,
        R: Send,
    {
        self.exec(method, arg, false, |_, _| false, |d, now| f(d, now))
            .await
    }

    /// A write request: `f` changes the live data, and must check every condition before it
    /// changes anything (a refused write writes nothing).
    async fn update<R, F>(&self, method: &'static str, arg: &str, f: F) -> StoreResult<R>
    where
        F: FnOnce(&mut Data, Timestamp) -> StoreResult<R> + Send + 'static,
        R: Send + 'static,
    {
        self.send(method, arg, |_, _| true, f).await
    }

    /// A request that writes only if `writes` says so, at the same instant, on the same data
    /// (a lease of an empty mailbox reads; it is not refused by a full disk). `f` must change
    /// nothing when `writes` is false.
    async fn update_if<R, P, F>(
        &self,
        method: &'static str,
        arg: &str,
        writes: P,
        f: F,
    ) -> StoreResult<R>
    where
        P: FnOnce(&Data, Timestamp) -> bool + Send + 'static,
        F: FnOnce(&mut Data, Timestamp) -> StoreResult<R> + Send + 'static,
        R: Send + 'static,
    {
        self.send(method, arg, writes, f).await
    }

    /// Sends a write: it runs in a task of its own (see the [module docs](self)), and the
    /// caller waits for its reply. Dropping the caller's future drops only the wait.
    async fn send<R, P, F>(
        &self,
        method: &'static str,
        arg: &str,
        writes: P,
        f: F,
    ) -> StoreResult<R>
    where
        P: FnOnce(&Data, Timestamp) -> bool + Send + 'static,
        F: FnOnce(&mut Data, Timestamp) -> StoreResult<R> + Send + 'static,
        R: Send + 'static,
    {
        let (store, arg) = (self.clone(), arg.to_owned());
        let (reply, answer) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let result = store.exec(method, &arg, true, writes, f).await;
            // An error only says that the caller gave up waiting: the write happened (or
            // failed) all the same, as on a real store.
            let _ = reply.send(result);
        });
        // The task is gone without a reply only if the tokio runtime is shutting down.
        answer.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Runs one request through the pipeline and records it in the trace.
    async fn exec<R, P, F>(
        &self,
        method: &'static str,
        arg: &str,
        may_write: bool,
        writes: P,
        f: F,
    ) -> StoreResult<R>
    where
        P: FnOnce(&Data, Timestamp) -> bool + Send,
        F: FnOnce(&mut Data, Timestamp) -> StoreResult<R> + Send,
        R: Send,
    {
        let result = self.attempt(may_write, writes, f).await;
        let mut s = self.state();
        let line = format!(
            "{}ms {method} {arg} -> {}",
            s.elapsed_ms(),
            outcome(&result)
        );
        s.trace.push(line);
        result
    }

    /// The steps of a request (see the [module docs](self)). The mutex is taken and let go
    /// around each step, never held across a sleep.
    async fn attempt<R, P, F>(&self, may_write: bool, writes: P, f: F) -> StoreResult<R>
    where
        P: FnOnce(&Data, Timestamp) -> bool + Send,
        F: FnOnce(&mut Data, Timestamp) -> StoreResult<R> + Send,
        R: Send,
    {
        // 1. On its way to the store.
        let (epoch, latency) = {
            let mut s = self.state();
            s.stats.requests += 1;
            let range = s.faults.latency;
            (s.epoch, s.draw(range))
        };
        pause(latency).await;
        let stalled = self
            .link
            .as_ref()
            .and_then(|l| *l.stalled_until.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(until) = stalled {
            tokio::time::sleep_until(until).await;
        }
        if self.severed() {
            // Sent by a node that crashed before it arrived: it never does.
            std::future::pending::<()>().await;
        }
        // 2. Arrived: it may fail before anything happens. In the ack-before-fsync bug, a write
        // syncs what earlier writes left behind first (it will not wait for its own sync).
        let presync = {
            let mut s = self.state();
            s.alive(epoch)?;
            let faults = s.faults;
            if s.chance(faults.transient) {
                s.stats.transient += 1;
                return Err(SimFault::Transient.into());
            }
            if may_write
                && s.bugs.ack_before_fsync
                && s.durable_version < s.version
                && s.synced_at.elapsed() >= LAZY_SYNC
            {
                Some((s.version, s.draw(faults.fsync)))
            } else {
                None
            }
        };
        if let Some((seen, fsync)) = presync {
            pause(fsync).await;
            let mut s = self.state();
            s.alive(epoch)?;
            self.sync_through(&mut s, seen);
        }
        // 3. Applied to the live data, all at one instant (unless its node crashed since it
        // was sent: no await between this look and the write).
        if self.severed() {
            std::future::pending::<()>().await;
        }
        let (result, wrote, seen, sync) = {
            let mut s = self.state();
            s.alive(epoch)?;
            // The store's own clock, whichever node's task asks.
            let now = seam::store_now();
            let wrote = may_write && writes(&s.live, now);
            if wrote && s.faults.disk_full {
                s.stats.disk_full += 1;
                return Err(StoreError::storage(
                    BACKEND,
                    std::io::Error::new(
                        std::io::ErrorKind::StorageFull,
                        "simulated full disk: no space left on device",
                    ),
                ));
            }
            let result = f(&mut s.live, now);
            if wrote {
                s.stats.writes += 1;
                // A refused write changed nothing (checks come before writes): no new version.
                if result.is_ok() {
                    s.version += 1;
                }
            }
            // What this request saw (or wrote) must be durable before it answers, unless the
            // bug is on.
            let seen = s.version;
            let sync = if !s.bugs.ack_before_fsync && s.durable_version < seen {
                let range = s.faults.fsync;
                Some((seen, s.draw(range)))
            } else {
                None
            };
            (result, wrote, seen, sync)
        };
        // 4. The sync (group commit).
        if let Some((seen, fsync)) = sync {
            pause(fsync).await;
            let mut s = self.state();
            s.alive(epoch)?;
            self.sync_through(&mut s, seen);
        }
        // 5. The reply.
        let mut s = self.state();
        if wrote {
            let p = s.faults.lost_reply;
            if s.chance(p) {
                s.stats.lost_reply += 1;
                return Err(SimFault::LostReply.into());
            }
        }
        s.answered = s.answered.max(seen);
        result
    }
}

impl fmt::Debug for SimStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.state();
        f.debug_struct("SimStore")
            .field("seed", &self.inner.seed)
            .field("partitions", &self.inner.partitions)
            .field("version", &s.version)
            .field("durable_version", &s.durable_version)
            .field("faults", &s.faults)
            .field("bugs", &s.bugs)
            .field("stats", &s.stats)
            .field("events", &s.trace.events)
            .finish()
    }
}
