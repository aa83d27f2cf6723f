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
//! let c = rt.actor::<Counter>("visits")?;
//! c.send(2).await?;                 // durable once it returns
//! assert_eq!(c.ask(3).await?, 5);   // the reply, journaled with the state change
//! rt.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! How it works, and which promise each part keeps:
//! - a message is enqueued durably before `send` returns (`Store::enqueue`);
//! - an actor is active on one node at a time: the node that owns its partition runs it under
//!   the partition's lease, and every write is fenced by that lease and conditional on the
//!   journal's next seq (rule D8);
//! - activation loads the newest readable snapshot and streams the journal tail;
//! - a turn's entries, its message's ack, its outgoing messages and its reply are one atomic
//!   write ([`Turn`](crate::store::backend::Turn));
//! - compaction snapshots off the hot path and trims only what the oldest kept snapshot covers.

mod activation;
mod actives;
mod activity;
mod actor;
mod admin;
mod alarms;
mod builder;
mod cell;
mod client;
mod config;
mod config_load;
mod context;
mod expiry;
mod health;
mod hub;
mod leases;
mod membership;
mod metrics;
mod ownership;
mod record;
mod replay;
pub(crate) mod trace;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::metrics::MetricsSnapshot;
pub use activity::{ActivityError, ActivityPolicy};
pub use actor::{Actor, Rejected};
pub use admin::{
    BuryError, CancelTarget, Cancellation, JournalBytes, bury_mailbox, cancel, delete_journal,
    journal_bytes, parked_per_kind, purge_dead_letter_ids, purge_dead_letters,
};
pub use builder::{IntoStore, RuntimeBuilder, StartError};
pub use client::{
    ActorRef, AnyActorRef, AskError, AskOptions, EventOptions, SendError, SendOptions, Sent,
};
pub use config::{Compaction, Config, Retention, Retry};
pub use config_load::{ConfigError, KEYS as CONFIG_KEYS, env_name as config_env_name};
pub use context::{ActivityKey, Context, StepError};
pub use health::{Health, NodeHealth, StoreHealth};
pub use replay::{
    CompactError, Compacted, SNAPSHOT_FORMAT, SNAPSHOT_FORMAT_VERSIONED, StateAt, StateAtError,
    compact_journal, state_at,
};

use crate::entry::EntryKind;
use crate::envelope::Envelope;
use crate::error::StoreError;
use crate::id::{ActorId, IdError, IdempotencyKey};
use crate::store::{Enqueued, Park, Store};
use crate::time::Timestamp;

use actives::Actives;
use hub::Hub;

use self::metrics::Metrics;
use activation::{Kind, Messages};

pub(crate) struct Shared {
    store: Arc<dyn Store>,
    config: Arc<Config>,
    hub: Arc<Hub>,
    kinds: BTreeMap<&'static str, Arc<dyn Kind>>,
    /// Every kind this runtime sends to: those it hosts and those declared with
    /// [`RuntimeBuilder::sends_to`] (hosted by other nodes).
    known: BTreeMap<&'static str, Arc<dyn Messages>>,
    active: Mutex<Actives>,
    /// Actors this node parked, and until when it takes that as still true without looking
    /// again (the store holds the record and the actor's mailbox; this only saves activating a
    /// parked actor on every local send).
    parked: Mutex<HashMap<ActorId, Instant>>,
    /// Actors that left memory in the last few seconds, and when (see
    /// `Shared::ensure_active`).
    gone: activation::Departures,
    /// The kinds registered here, for the ready scan.
    hosted: Vec<&'static str>,
    metrics: Metrics,
    shutdown: CancellationToken,
    /// Cancelled by [`Runtime::kill`]: every task the runtime spawned stops at its next await,
    /// wherever it is (a store request that never answers included), as in a crash.
    killed: CancellationToken,
    /// Cancelled once the runtime has stopped (a shutdown's drain done, or a kill): asks still
    /// waiting then end with [`AskError::Stopped`], naming the key to ask again with.
    stopped: CancellationToken,
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
    /// The clock skew (ms) a simulation gave the task that started the runtime, kept for every
    /// task it spawns (see `seam::skewed`); 0 outside a simulation.
    skew: i64,
    /// Lease acquisitions of activations in flight at once (see `ensure_active`).
    activating: tokio::sync::Semaphore,
    /// When the messages of invocations this node suspended come due (see `alarms.rs`).
    alarms: alarms::Alarms,
    /// This process among the nodes of its store (see `membership.rs`): drawn at random at
    /// start, so that a second process under the same name is told apart.
    incarnation: u64,
    /// Held by a heartbeat while it is in flight, and set once this node has left: no
    /// heartbeat is sent after the leave (it would announce the node again for a ttl).
    left: tokio::sync::Mutex<bool>,
    /// The partitions this node owns (see `ownership.rs`).
    ownership: ownership::Ownership,
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
            sends_to: Vec::new(),
        }
    }

    /// A handle to the actor `A::KIND/key`; an invalid key (empty, too long, with a control
    /// character: see [`ActorId::new`]) is refused here, before anything is sent.
    ///
    /// ```
    /// # use loom_core::runtime::{Actor, Context, Rejected, Runtime};
    /// # struct Account;
    /// # impl Actor for Account {
    /// #     const KIND: &'static str = "account";
    /// #     type State = i64;
    /// #     type Message = i64;
    /// #     type Reply = i64;
    /// #     async fn handle(&self, b: &mut i64, _: &mut Context<'_>, d: i64) -> Result<i64, Rejected> {
    /// #         *b += d;
    /// #         Ok(*b)
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let rt = Runtime::builder().memory().register_actor(Account).start().await?;
    /// let alice = rt.actor::<Account>("alice")?;
    /// assert_eq!(alice.id().to_string(), "account/alice");
    /// assert!(rt.actor::<Account>("").is_err(), "an empty key is refused at once");
    /// # rt.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn actor<A: Actor>(&self, key: impl AsRef<str>) -> Result<ActorRef<A>, IdError> {
        ActorRef::new(self.clone(), key.as_ref())
    }

    /// A handle to the actor `kind/key` when the kind is known only by its name at run time
    /// (an HTTP ingress, a tool): messages and replies as JSON, each message checked against
    /// the kind's message type before it is sent. Refused at once if the key is invalid or
    /// `kind` is neither registered here nor declared with
    /// [`sends_to`](RuntimeBuilder::sends_to). See [`AnyActorRef`].
    pub fn any_actor(&self, kind: &str, key: &str) -> Result<AnyActorRef, SendError> {
        AnyActorRef::new(self.clone(), ActorId::new(kind, key)?)
    }

    /// The actor kinds registered with this runtime, in name order.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.shared.kinds.keys().copied().collect()
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
    /// runs again, its delivery count kept (deliveries that failed before the park still
    /// count toward its attempts; those that only waited do not). True if it was parked.
    pub async fn unpark(&self, id: &ActorId) -> Result<bool, StoreError> {
        let written = self.shared.moment();
        let was = self.shared.store.unpark(id).await?.is_some();
        self.shared
            .parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if was {
            self.shared.wake(id, Some(written));
        }
        Ok(was)
    }

    /// How the runtime's store is doing: [`StoreHealth::Failing`] (since when, the failure
    /// that began it, the latest, what to do, the latest success) from the first failed write,
    /// lease renewal or mailbox read until a write or renewal succeeds; a store failing in
    /// part (failures with successes between, as when one partition or shard fails) shows
    /// [`StoreHealth::Degraded`] instead of alternating between healthy and failing. A store
    /// failure is also logged once, with the same hint, when it begins. [`Health::relay`]: the
    /// store's relay between partitions, if its moves fail
    /// ([`Store::relay_failure`](crate::Store::relay_failure)), logged once as well.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let rt = loom_core::Runtime::builder().memory().start().await?;
    /// assert!(rt.health().is_healthy());
    /// # Ok(()) }
    /// ```
    pub fn health(&self) -> Health {
        let mut health = Health {
            relay: self.shared.store.relay_failure(),
            ..self.shared.health.health()
        };
        // From the moment a shutdown begins: sends are refused from then on (`check_open`).
        if self.shared.shutdown.is_cancelled() {
            health.node = NodeHealth::Stopping;
        }
        health
    }

    /// The runtime's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let m = &self.shared.metrics;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            invocations: get(&m.invocations),
            retries: get(&m.retries),
            dead_letters: get(&m.dead_letters),
            rejections: get(&m.rejections),
            recoveries: get(&m.recoveries),
            replayed_entries: get(&m.replayed_entries),
            compactions: get(&m.compactions),
            compaction_failures: get(&m.compaction_failures),
            corrupt_snapshots: get(&m.corrupt_snapshots),
            leases_lost: get(&m.leases_lost),
            suspensions: get(&m.suspensions),
            retired: get(&m.retired),
            state_upgrades: get(&m.state_upgrades),
            declined: get(&m.declined),
            activation_micros: get(&m.activation_nanos) / 1000,
            active: self
                .shared
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len() as u64,
            leases_held: self.shared.keeper.count() as u64,
            partitions_owned: self.shared.ownership.count() as u64,
        }
    }

    /// The partitions this node owns now, as (kind, partition), sorted: of each kind it hosts,
    /// those that rendezvous hashing over the live nodes hosting the kind gives it and whose
    /// lease it holds (see [`partition::owner_of`](crate::partition::owner_of)). It activates
    /// only actors of these.
    ///
    /// ```
    /// # use loom_core::runtime::{Actor, Context, Rejected, Runtime};
    /// # use loom_core::{EmbeddedStore, Store};
    /// # use loom_core::partition::ownership_partitions;
    /// # struct Account;
    /// # impl Actor for Account {
    /// #     const KIND: &'static str = "account";
    /// #     type State = i64;
    /// #     type Message = i64;
    /// #     type Reply = i64;
    /// #     async fn handle(&self, b: &mut i64, _: &mut Context<'_>, d: i64) -> Result<i64, Rejected> {
    /// #         *b += d;
    /// #         Ok(*b)
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = EmbeddedStore::in_memory()?;
    /// let all = ownership_partitions(store.partitions()) as usize;
    /// let rt = Runtime::builder().store(store).register_actor(Account).start().await?;
    /// // Alone, a node comes to own every partition of the kinds it hosts.
    /// while rt.partitions_owned().len() < all {
    ///     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    /// }
    /// assert!(rt.partitions_owned().iter().all(|(kind, _)| kind == "account"));
    /// # rt.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn partitions_owned(&self) -> Vec<(String, u32)> {
        self.shared.ownership.owned()
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
    /// passivates every actor, and hands this node's partitions to the other nodes (each
    /// partition's lease, which fenced its actors, released once they are gone). What still
    /// runs at the timeout is stopped as [`kill`](Self::kill) stops it (it resumes after a
    /// restart, or on another node once its partition's lease runs out).
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        // Gone from the roster first: the other nodes stop naming this one the owner of its
        // partitions at once, and take each as this node hands it off (once its actors have
        // drained; `ownership.rs`).
        membership::leave(&self.shared).await;
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
            // Stopped where they are, as by `kill`: nothing of this runtime runs on (or holds
            // the store) after `shutdown` returns.
            self.shared.killed.cancel();
            self.shared.tasks.wait().await;
        }
        // What the drain did not answer is not answered here.
        self.shared.stopped.cancel();
        // Every actor has stopped (or, after a timeout, was stopped); the partitions' leases go
        // next, so that the other nodes take them at their next look.
        ownership::release_all(&self.shared).await;
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
        self.shared.keeper.halt().await;
    }

    /// Stops everything at once, as a crash would: invocations are dropped mid-way, leases are
    /// not released (they expire), nothing is drained. What was acknowledged stays durable; what
    /// was in flight is resumed by whichever runtime takes the actors over. For tests of
    /// recovery, and for emergencies. Returns once every actor task has stopped (a write it
    /// had already handed to the store may still land, as it may in a real crash).
    pub async fn kill(&self) {
        self.shared.killed.cancel();
        self.shared.shutdown.cancel();
        self.stop_keeper().await;
        // Owned no more (their leases are left to run out, as a crash leaves them).
        ownership::forget_all(&self.shared);
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
        self.shared.stopped.cancel();
    }

    async fn enqueue(&self, env: Envelope, deliver_at: Option<Timestamp>) -> Result<(), SendError> {
        self.check_open(&env.to).await?;
        let written = self.shared.moment();
        let r = self.shared.store.enqueue(&env, deliver_at).await;
        self.shared.health.write(&r);
        r?;
        self.shared.wake(&env.to, Some(written));
        Ok(())
    }

    async fn enqueue_once(
        &self,
        env: Envelope,
        deliver_at: Option<Timestamp>,
        key: &IdempotencyKey,
    ) -> Result<Enqueued, SendError> {
        if let Some(duplicate) = self.check_open_keyed(&env.to, key).await? {
            return Ok(duplicate);
        }
        let to = env.to.clone();
        let written = self.shared.moment();
        let r = self
            .shared
            .store
            .enqueue_once(&env, deliver_at, key, self.shared.config.reply_ttl)
            .await;
        self.shared.health.write(&r);
        let r = r?;
        if matches!(r, Enqueued::New(_)) {
            self.shared.wake(&to, Some(written));
        }
        Ok(r)
    }

    /// [`check_open`](Self::check_open) for a keyed send: a full mailbox refuses it only if
    /// its key holds nothing. A retry of a message already in the mailbox (or whose reply is
    /// recorded) is that message's duplicate; `MailboxFull` would tell its caller nothing was
    /// sent, and a caller believing it would send again under a new key.
    async fn check_open_keyed(
        &self,
        to: &ActorId,
        key: &IdempotencyKey,
    ) -> Result<Option<Enqueued>, SendError> {
        match self.check_open(to).await {
            // A lookup that fails leaves the refusal as it is: this request sent nothing.
            Err(e @ SendError::MailboxFull { .. }) => match self.shared.store.lookup(to, key).await
            {
                Ok(Some(held)) => Ok(Some(Enqueued::Duplicate(held))),
                Ok(None) => Err(e),
                Err(looked) => {
                    tracing::debug!(actor = %to, error = %looked, "could not look up the key of a send refused for a full mailbox");
                    Err(e)
                }
            },
            r => r.map(|()| None),
        }
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

/// `d` from now; for a setting of `Duration::MAX` (meaning "no bound"), or any other too far
/// to be a moment, 30 years from now instead of a panic.
pub(crate) fn after(d: std::time::Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(30 * 365 * 86_400))
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
        // The values the patch carries: a large state changed in one op weighs what it holds.
        EntryKind::StatePatched { patch } => patch
            .0
            .iter()
            .map(|op| {
                48 + match op {
                    json_patch::PatchOperation::Add(o) => value(&o.value),
                    json_patch::PatchOperation::Replace(o) => value(&o.value),
                    json_patch::PatchOperation::Test(o) => value(&o.value),
                    _ => 0,
                }
            })
            .sum(),
        EntryKind::StateUpgraded { state, .. } => value(state),
        EntryKind::ActivityStarted { input, name, .. } => value(input) + name.len() as u64,
        EntryKind::ActivityCompleted { output, .. } => value(output),
        EntryKind::ChildSpawned { input, .. } => value(input),
        EntryKind::EventReceived { data, .. } => value(data),
        EntryKind::Recorded { value: v, name, .. } => value(v) + name.len() as u64,
        EntryKind::Completed { reply } => value(reply),
        EntryKind::ActivityFailed { error, .. }
        | EntryKind::ActivityAttemptFailed { error, .. }
        | EntryKind::Failed { error, .. } => error.len() as u64,
        _ => 0,
    }
}

impl Shared {
    /// Spawns a task of this runtime: tracked (shutdown waits for it) and dropped at its next
    /// await by [`Runtime::kill`].
    fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<()>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let killed = self.killed.clone();
        // The runtime's clock skew, if a simulation gave it one (0 otherwise).
        self.tasks.spawn(crate::seam::skewed(self.skew, async move {
            tokio::select! {
                biased;
                _ = killed.cancelled() => {}
                _ = fut => {}
            }
        }))
    }
}
