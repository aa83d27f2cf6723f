//! The actor runtime: durable execution of [`Actor`]s on any [`Store`].
//!
//! ```
//! use loom_core::runtime::{Actor, Context, Rejected, Runtime};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default)]
//! struct Counter;
//!
//! impl Actor for Counter {
//!     const KIND: &'static str = "counter";
//!     type State = u64;
//!     type Message = u64;
//!     type Reply = u64;
//!
//!     async fn handle(&self, state: &mut u64, _ctx: &mut Context<'_>, add: u64) -> Result<u64, Rejected> {
//!         *state += add;
//!         Ok(*state)
//!     }
//! }
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let rt = Runtime::builder().embedded(dir.path()).register::<Counter>().start().await?;
//! let c = rt.actor::<Counter>("visits");
//! c.send(2).await?;                 // durable once it returns
//! assert_eq!(c.ask(3).await?, 5);   // the reply, journaled with the state change
//! rt.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! How it works, and which promise each part keeps:
//! - a message is enqueued durably before `send` returns (`Store::enqueue`);
//! - an actor is active on one node at a time: activation takes its lease, and every write is
//!   fenced by the lease and conditional on the journal's next seq;
//! - activation loads the newest readable snapshot and streams the journal tail;
//! - a turn's entries, its message's ack, its outgoing messages and its reply are one atomic
//!   write ([`Turn`]);
//! - compaction snapshots off the hot path and trims only what the oldest kept snapshot covers.

mod actives;
mod actor;
mod admin;
mod cell;
mod client;
mod config;
mod context;
mod health;
mod hub;
mod leases;
mod record;
mod replay;
mod trace;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use actor::{Actor, Rejected};
pub use admin::{BuryError, bury_mailbox};
pub use client::{ActorRef, AskError, AskOptions, EventOptions, SendError, SendOptions, Sent};
pub use config::{Compaction, Config, Retry};
pub use context::{ActivityKey, Context, StepError};
pub use health::{Health, StoreHealth};
pub use replay::{CompactError, Compacted, SNAPSHOT_FORMAT, compact_journal};

use crate::embedded::EmbeddedStore;
use crate::entry::EntryKind;
use crate::envelope::Envelope;
use crate::error::StoreError;
use crate::id::{ActorId, IdempotencyKey};
use crate::store::{Enqueued, Lease, LeaseOptions, Park, Store};
use crate::time::Timestamp;

use actives::{Active, Actives};
use cell::{Cell, Next};
use context::Io;
use hub::Hub;
use replay::RecoverError;

/// Counters of what the runtime did; see [`Runtime::metrics`].
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) invocations: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    pub(crate) recoveries: AtomicU64,
    pub(crate) replayed_entries: AtomicU64,
    pub(crate) compactions: AtomicU64,
    pub(crate) compaction_failures: AtomicU64,
    pub(crate) corrupt_snapshots: AtomicU64,
    pub(crate) leases_lost: AtomicU64,
    pub(crate) activation_nanos: AtomicU64,
}

/// A snapshot of the runtime's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Invocations started (including retries and resumptions).
    pub invocations: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Messages given up on.
    pub dead_letters: u64,
    /// Actor activations (recoveries from the store).
    pub recoveries: u64,
    /// Journal entries replayed by those recoveries.
    pub replayed_entries: u64,
    /// Compactions done.
    pub compactions: u64,
    /// Compactions that failed (the journal stays longer; nothing is lost).
    pub compaction_failures: u64,
    /// Unreadable snapshots skipped in favour of older ones.
    pub corrupt_snapshots: u64,
    /// Actors stopped because their lease was lost.
    pub leases_lost: u64,
    /// Total time spent activating actors (taking the lease, loading the snapshot, replaying the
    /// tail), in microseconds; divide by `recoveries` for the mean.
    pub activation_micros: u64,
    /// Actors active now.
    pub active: u64,
    /// Leases this node keeps renewed now (one per active actor).
    pub leases_held: u64,
}

/// The erased start function of one registered kind.
trait Kind: Send + Sync {
    fn start(
        &self,
        shared: Arc<Shared>,
        id: ActorId,
        lease: Lease,
        stop: CancellationToken,
        busy: Arc<AtomicBool>,
        last_used: Arc<Mutex<Instant>>,
    ) -> BoxFuture<'static, ()>;
}

struct KindOf<A: Actor>(Arc<A>);

impl<A: Actor> Kind for KindOf<A> {
    fn start(
        &self,
        shared: Arc<Shared>,
        id: ActorId,
        lease: Lease,
        stop: CancellationToken,
        busy: Arc<AtomicBool>,
        last_used: Arc<Mutex<Instant>>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(run::<A>(
            self.0.clone(),
            shared,
            id,
            lease,
            stop,
            busy,
            last_used,
        ))
    }
}

pub(crate) struct Shared {
    store: Arc<dyn Store>,
    config: Arc<Config>,
    hub: Arc<Hub>,
    kinds: HashMap<&'static str, Arc<dyn Kind>>,
    active: Mutex<Actives>,
    /// Actors this node parked, and until when it takes that as still true without looking
    /// again (the store holds the record and the actor's mailbox; this only saves activating a
    /// parked actor on every local send).
    parked: Mutex<HashMap<ActorId, Instant>>,
    /// The kinds registered here, for the ready scan.
    hosted: Vec<&'static str>,
    metrics: Metrics,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    wake: Notify,
    keeper: Arc<leases::Keeper>,
    /// What the runtime's requests met at the store.
    health: Arc<health::Observed>,
    /// The keeper's task: stopped by `kill`, after the drain by `shutdown`, and with the runtime.
    /// `stop_keeper` waits for it to be gone, so that once `shutdown` has drained everything
    /// (or `kill` has stopped everything) the runtime holds the store no more, and an embedded
    /// store's directory can be opened again at once. An async mutex, held while waiting, so
    /// that a second, concurrent caller also returns only once the keeper is gone.
    keeper_task: tokio::sync::Mutex<Option<tokio_util::task::AbortOnDropHandle<()>>>,
}

impl Shared {
    /// Wakes the actor if it is active here; otherwise asks the dispatcher to look for work.
    fn wake(self: &Arc<Self>, id: &ActorId) {
        if !self.hub.notify(id) {
            let me = self.clone();
            let id = id.clone();
            self.tasks.spawn(async move { me.ensure_active(&id).await });
        }
    }

    /// Activates the actor on this node unless it is active, parked, leased elsewhere, or of a
    /// kind this node does not host: messages to such a kind are never touched here; they wait
    /// in their mailbox for a node that hosts it.
    async fn ensure_active(self: &Arc<Self>, id: &ActorId) {
        if self.shutdown.is_cancelled() || id.is_system() {
            return;
        }
        let parked_here = self
            .parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied();
        if let Some(until) = parked_here {
            if until > Instant::now() {
                return;
            }
            // Parked here a while ago: activating it would replay its journal only to find its
            // mailbox held, so look first (unparked elsewhere, `loom parked unpark`, say).
            match self.store.parked(id).await {
                Ok(Some(_)) => {
                    self.parked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id.clone(), Instant::now() + PARK_RECHECK);
                    return;
                }
                Ok(None) => {
                    self.parked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(id);
                }
                Err(e) => {
                    tracing::warn!(actor = %id, error = %e, "could not look whether the actor is still parked");
                    return;
                }
            }
        }
        let Some(kind) = self.kinds.get(id.kind()).cloned() else {
            tracing::debug!(actor = %id, "not hosted here; its messages wait for a node that hosts its kind");
            return;
        };
        let (stop, busy, last_used) = {
            let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            if active.contains(id) {
                drop(active);
                self.hub.notify(id);
                return;
            }
            active.make_room(self.config.max_active);
            let a = Active::new(self.shutdown.child_token());
            let handles = (a.stop.clone(), a.busy.clone(), a.last_used.clone());
            active.insert(id.clone(), a);
            handles
        };
        self.hub.notifier(id);
        let acquired = self
            .store
            .acquire(id, &self.config.node, self.config.lease_ttl)
            .await;
        self.health.write(&acquired);
        match acquired {
            Ok(lease) => {
                let fut = kind.start(self.clone(), id.clone(), lease, stop, busy, last_used);
                let handle = self.tasks.spawn(fut);
                if let Some(a) = self
                    .active
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(id)
                {
                    a.abort = Some(handle.abort_handle());
                }
            }
            Err(e) => {
                if !matches!(e, StoreError::LeaseHeld { .. }) {
                    tracing::warn!(actor = %id, error = %e, "could not take the actor's lease");
                }
                self.deactivated(id);
            }
        }
    }

    fn deactivated(&self, id: &ActorId) {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.hub.forget(id);
    }
}

/// How long a node takes an actor it parked as still parked before it looks again.
const PARK_RECHECK: Duration = Duration::from_secs(5);

/// Why an actor's task ended.
enum Exit {
    Passivated,
    LeaseLost,
    Park(Park),
    Failed(StoreError),
}

async fn run<A: Actor>(
    actor: Arc<A>,
    shared: Arc<Shared>,
    id: ActorId,
    lease: Lease,
    stop: CancellationToken,
    busy: Arc<AtomicBool>,
    last_used: Arc<Mutex<Instant>>,
) {
    let lost = CancellationToken::new();
    // Renewed with every other lease of this node until this task ends, however it ends.
    let kept = shared.keeper.keep(lease.clone(), lost.clone());
    let io = Io {
        lease_options: LeaseOptions {
            visibility: shared.config.visibility,
            // The runtime gives up a message that ended too many deliveries without a word
            // (`cell.rs`); the store's own limit is a net below that, for a message the runtime
            // never sees (a frame that does not decode). `Cell::lease_options` lifts it for the
            // message of a durable wait in progress.
            max_deliveries: cell::give_up_after(shared.config.retry.max_attempts) + 2,
        },
        store: shared.store.clone(),
        config: shared.config.clone(),
        hub: shared.hub.clone(),
        lease: lease.clone(),
    };
    let exit = tokio::select! {
        exit = serve::<A>(actor, &shared, &io, &id, &stop, &busy, &last_used) => exit,
        _ = lost.cancelled() => Exit::LeaseLost,
    };
    match &exit {
        Exit::Passivated => tracing::debug!(actor = %id, "passivated"),
        Exit::LeaseLost => {
            shared.metrics.leases_lost.fetch_add(1, Ordering::Relaxed);
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
            shared
                .parked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.clone(), Instant::now() + PARK_RECHECK);
        }
        Exit::Failed(e) => {
            tracing::warn!(actor = %id, error = %e, "actor stopped on a store failure; it is activated again when it has work")
        }
    }
    drop(kept);
    if !matches!(exit, Exit::LeaseLost) {
        match shared.store.release(&lease).await {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(actor = %id, error = %e, "could not release the lease; it expires on its own")
            }
        }
    }
    shared.deactivated(&id);
}

async fn serve<A: Actor>(
    actor: Arc<A>,
    shared: &Arc<Shared>,
    io: &Io,
    id: &ActorId,
    stop: &CancellationToken,
    busy: &AtomicBool,
    last_used: &Mutex<Instant>,
) -> Exit {
    let recover = || Cell::<A>::recover(actor.clone(), id.clone(), io, shared);
    let activation_began = *last_used.lock().unwrap_or_else(|p| p.into_inner());
    let mut cell = match recover().await {
        Ok(c) => {
            let took = u64::try_from(activation_began.elapsed().as_nanos()).unwrap_or(u64::MAX);
            shared
                .metrics
                .activation_nanos
                .fetch_add(took, Ordering::Relaxed);
            c
        }
        Err(RecoverError::Store(e)) => return Exit::Failed(e),
        Err(RecoverError::Unrecoverable(reason)) => {
            return Exit::Park(Park::new(io.config.node.clone(), &reason));
        }
    };
    let signal = shared.hub.notifier(id);
    let mut idle_since = Instant::now();
    // A message the last turn's write already leased; it is processed even when stopping, so
    // that it is not left out until its visibility timeout.
    let mut leased: Option<crate::store::Delivery> = None;
    loop {
        if leased.is_none() && stop.is_cancelled() {
            return Exit::Passivated;
        }
        let next = match leased.take() {
            Some(d) => Ok(Some(d)),
            None => io.store.lease(id, cell.lease_options(io)).await,
        };
        match next {
            Ok(Some(d)) => {
                busy.store(true, Ordering::Release);
                let next = cell.process(io, shared, d).await;
                busy.store(false, Ordering::Release);
                *last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                idle_since = Instant::now();
                match next {
                    Next::Continue(d) => leased = d.map(|d| *d),
                    Next::Backoff(d) => {
                        tokio::select! {
                            _ = tokio::time::sleep(d) => {}
                            _ = stop.cancelled() => return Exit::Passivated,
                        }
                    }
                    Next::Reload => {
                        cell = match recover().await {
                            Ok(c) => c,
                            Err(RecoverError::Store(e)) => return Exit::Failed(e),
                            Err(RecoverError::Unrecoverable(reason)) => {
                                return Exit::Park(Park::new(io.config.node.clone(), &reason));
                            }
                        }
                    }
                    Next::Park(park) => return Exit::Park(park),
                    Next::Stop => return Exit::LeaseLost,
                }
            }
            Ok(None) => {
                let left = io.config.idle_timeout.saturating_sub(idle_since.elapsed());
                if left.is_zero() {
                    return Exit::Passivated;
                }
                tokio::select! {
                    _ = signal.notified() => {}
                    _ = tokio::time::sleep(left) => {}
                    _ = stop.cancelled() => return Exit::Passivated,
                }
            }
            Err(e) => {
                shared.health.failed(&e);
                tracing::warn!(actor = %id, error = %e, "could not read the mailbox; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(io.config.poll_interval.max(Duration::from_millis(10))) => {}
                    _ = stop.cancelled() => return Exit::Passivated,
                }
            }
        }
    }
}

/// Looks for work enqueued by other nodes, due delayed messages and due retries.
async fn dispatch(shared: Arc<Shared>) {
    let mut wakeups = shared.store.wakeups();
    loop {
        match shared.store.ready_actors(&shared.hosted, 512).await {
            Ok(ids) => {
                for id in ids {
                    shared.ensure_active(&id).await;
                }
            }
            // Not noted in `health`: a read that failed once says little of the store (a
            // connection dropped), and what the runtime writes says the rest.
            Err(e) => tracing::warn!(error = %e, "could not look for ready actors"),
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = shared.wake.notified() => {}
            _ = woken(&mut wakeups) => {}
            _ = tokio::time::sleep(shared.config.poll_interval) => {}
        }
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

/// Why the runtime did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Two actor types registered the same kind, or a kind is not a valid kind name.
    #[error("{0}")]
    Registration(String),
}

/// Builds a [`Runtime`].
pub struct RuntimeBuilder {
    store: Option<StoreChoice>,
    config: Config,
    kinds: Vec<(&'static str, Arc<dyn Kind>)>,
}

enum StoreChoice {
    Embedded(PathBuf),
    Memory,
    Given(Arc<dyn Store>),
}

impl RuntimeBuilder {
    /// Uses the embedded store in directory `dir` (the default: `./loom-data`).
    pub fn embedded(mut self, dir: impl Into<PathBuf>) -> Self {
        self.store = Some(StoreChoice::Embedded(dir.into()));
        self
    }

    /// Uses an in-memory store (nothing survives the process).
    pub fn memory(mut self) -> Self {
        self.store = Some(StoreChoice::Memory);
        self
    }

    /// Uses any store.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(StoreChoice::Given(store));
        self
    }

    /// Replaces the whole configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Changes the configuration in place.
    pub fn configure(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self
    }

    /// Registers actor kind `A`, built with `A::default()`.
    pub fn register<A: Actor + Default>(self) -> Self {
        self.register_actor(A::default())
    }

    /// Registers actor kind `A` with a given instance (holding, say, a client for activities).
    pub fn register_actor<A: Actor>(mut self, actor: A) -> Self {
        self.kinds
            .push((A::KIND, Arc::new(KindOf(Arc::new(actor)))));
        self
    }

    /// Opens the store and starts the runtime; actors with pending work are activated.
    pub async fn start(self) -> Result<Runtime, StartError> {
        let mut kinds: HashMap<&'static str, Arc<dyn Kind>> = HashMap::new();
        for (name, kind) in self.kinds {
            ActorId::new(name, "k")
                .map_err(|e| StartError::Registration(format!("actor kind {name:?}: {e}")))?;
            if kinds.insert(name, kind).is_some() {
                return Err(StartError::Registration(format!(
                    "actor kind {name:?} is registered twice"
                )));
            }
        }
        let store: Arc<dyn Store> = match self
            .store
            .unwrap_or(StoreChoice::Embedded(PathBuf::from("./loom-data")))
        {
            StoreChoice::Embedded(dir) => Arc::new(EmbeddedStore::open(dir)?),
            StoreChoice::Memory => Arc::new(EmbeddedStore::in_memory()?),
            StoreChoice::Given(s) => s,
        };
        let health = Arc::new(health::Observed::default());
        let keeper = leases::Keeper::new(store.clone(), self.config.lease_ttl, health.clone());
        let keeper_task =
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(keeper.clone().run()));
        let shared = Arc::new(Shared {
            keeper,
            keeper_task: tokio::sync::Mutex::new(Some(keeper_task)),
            store,
            config: Arc::new(self.config),
            hub: Arc::new(Hub::default()),
            health,
            hosted: kinds.keys().copied().collect(),
            kinds,
            active: Mutex::new(Actives::default()),
            parked: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            wake: Notify::new(),
        });
        shared.tasks.spawn(dispatch(shared.clone()));
        tracing::info!(node = %shared.config.node, "runtime started");
        Ok(Runtime { shared })
    }
}

/// The actor runtime; cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    shared: Arc<Shared>,
}

impl Runtime {
    /// A builder with the default configuration and the embedded store at `./loom-data`.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder {
            store: None,
            config: Config::default(),
            kinds: Vec::new(),
        }
    }

    /// A handle to the actor `A::KIND/key` (an invalid key is reported when it is used).
    pub fn actor<A: Actor>(&self, key: impl AsRef<str>) -> ActorRef<A> {
        ActorRef::new(self.clone(), key.as_ref())
    }

    /// The store the runtime runs on.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Actors parked (stopped until fixed) by any node of this store, with their records, in id
    /// order (`loom parked ls` shows the same).
    pub async fn parked(&self) -> Result<Vec<(ActorId, Park)>, StoreError> {
        let mut out: Vec<(ActorId, Park)> = Vec::new();
        loop {
            let page = self
                .shared
                .store
                .parked_actors(out.last().map(|(a, _)| a), 1000)
                .await?;
            let done = page.len() < 1000;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    /// Lets a parked actor run again (after the code was fixed, say): the message it stopped at
    /// runs again with a fresh set of attempts. True if it was parked.
    pub async fn unpark(&self, id: &ActorId) -> Result<bool, StoreError> {
        let was = self.shared.store.unpark(id).await?.is_some();
        self.shared
            .parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if was {
            self.shared.wake(id);
        }
        Ok(was)
    }

    /// How the runtime's store is doing: [`StoreHealth::Failing`] (since when, the failure
    /// that began it, the latest, what to do) from the first failed write, lease renewal or
    /// mailbox read until a write or renewal succeeds again. A store
    /// failure is also logged once, with the same hint, when it begins.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let rt = loom_core::Runtime::builder().memory().start().await?;
    /// assert!(rt.health().is_healthy());
    /// # Ok(()) }
    /// ```
    pub fn health(&self) -> Health {
        self.shared.health.health()
    }

    /// The runtime's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let m = &self.shared.metrics;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            invocations: get(&m.invocations),
            retries: get(&m.retries),
            dead_letters: get(&m.dead_letters),
            recoveries: get(&m.recoveries),
            replayed_entries: get(&m.replayed_entries),
            compactions: get(&m.compactions),
            compaction_failures: get(&m.compaction_failures),
            corrupt_snapshots: get(&m.corrupt_snapshots),
            leases_lost: get(&m.leases_lost),
            activation_micros: get(&m.activation_nanos) / 1000,
            active: self
                .shared
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len() as u64,
            leases_held: self.shared.keeper.len() as u64,
        }
    }

    /// True if the actor is active on this node now.
    pub fn is_active(&self, id: &ActorId) -> bool {
        self.shared
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Stops taking work, lets in-flight invocations finish (up to `Config::shutdown_timeout`),
    /// passivates every actor and releases its lease.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(
            self.shared.config.shutdown_timeout,
            self.shared.tasks.wait(),
        )
        .await
        .is_err()
        {
            tracing::warn!(
                "shutdown timed out with invocations still running; they resume after a restart"
            );
        }
        // Every actor has released its lease (or, after a timeout, lets it expire).
        self.stop_keeper().await;
    }

    /// Aborts the lease keeper and waits until its task (and its handle on the store) is gone.
    async fn stop_keeper(&self) {
        let mut slot = self.shared.keeper_task.lock().await;
        if let Some(task) = slot.take() {
            task.abort();
            match task.await {
                Ok(()) => {}
                Err(e) if e.is_cancelled() => {}
                Err(e) => tracing::error!(error = %e, "the lease keeper failed"),
            }
        }
    }

    /// Stops everything at once, as a crash would: invocations are dropped mid-way, leases are
    /// not released (they expire), nothing is drained. What was acknowledged stays durable; what
    /// was in flight is resumed by whichever runtime takes the actors over. For tests of
    /// recovery, and for emergencies. Returns once every actor task has stopped (a write it
    /// had already handed to the store may still land, as it may in a real crash).
    pub async fn kill(&self) {
        self.shared.shutdown.cancel();
        self.stop_keeper().await;
        {
            let active = self.shared.active.lock().unwrap_or_else(|p| p.into_inner());
            for a in active.values() {
                if let Some(abort) = &a.abort {
                    abort.abort();
                }
            }
        }
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }

    async fn enqueue(&self, env: Envelope, deliver_at: Option<Timestamp>) -> Result<(), SendError> {
        self.check_open(&env.to).await?;
        let r = self.shared.store.enqueue(&env, deliver_at).await;
        self.shared.health.write(&r);
        r?;
        self.shared.wake(&env.to);
        Ok(())
    }

    async fn enqueue_once(
        &self,
        env: Envelope,
        deliver_at: Option<Timestamp>,
        key: &IdempotencyKey,
    ) -> Result<Enqueued, SendError> {
        self.check_open(&env.to).await?;
        let to = env.to.clone();
        let r = self
            .shared
            .store
            .enqueue_once(&env, deliver_at, key, self.shared.config.reply_ttl)
            .await;
        self.shared.health.write(&r);
        let r = r?;
        if matches!(r, Enqueued::New(_)) {
            self.shared.wake(&to);
        }
        Ok(r)
    }

    async fn check_open(&self, to: &ActorId) -> Result<(), SendError> {
        if self.shared.shutdown.is_cancelled() {
            return Err(SendError::Shutdown);
        }
        if let Some(max) = self.shared.config.max_mailbox {
            let pending = self.shared.store.pending(to).await?;
            if pending >= max {
                return Err(SendError::MailboxFull {
                    actor: to.clone(),
                    pending,
                });
            }
        }
        Ok(())
    }
}

/// A cheap estimate of an entry's journaled size, for the byte-based compaction trigger.
pub(crate) fn weight(kind: &EntryKind) -> u64 {
    fn value(v: &Value) -> u64 {
        match v {
            Value::Null | Value::Bool(_) | Value::Number(_) => 8,
            Value::String(s) => s.len() as u64 + 2,
            Value::Array(a) => 2 + a.iter().map(value).sum::<u64>(),
            Value::Object(o) => {
                2 + o
                    .iter()
                    .map(|(k, v)| k.len() as u64 + 3 + value(v))
                    .sum::<u64>()
            }
        }
    }
    64 + match kind {
        EntryKind::Invoked { payload, .. } => value(payload),
        EntryKind::StatePatched { patch } => patch.0.len() as u64 * 48,
        EntryKind::ActivityStarted { input, name, .. } => value(input) + name.len() as u64,
        EntryKind::ActivityCompleted { output, .. } => value(output),
        EntryKind::ChildSpawned { input, .. } => value(input),
        EntryKind::EventReceived { data, .. } => value(data),
        EntryKind::Completed { reply } => value(reply),
        EntryKind::ActivityFailed { error, .. } | EntryKind::Failed { error } => error.len() as u64,
        _ => 0,
    }
}
