//! [`RuntimeBuilder`]: choosing the store, registering actor kinds, configuring, starting.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::activation::Kind;
use super::activation::{KindOf, Messages, MessagesOf, dispatch};
use super::actives::Actives;
use super::hub::Hub;
use super::metrics::Metrics;
use super::{Actor, Config, Runtime, Shared, health, leases};
use crate::embedded::EmbeddedStore;
use crate::error::StoreError;
use crate::id::ActorId;
use crate::store::Store;

/// Most activations taking their lease at once (a bound on the burst of lease writes a flood
/// of new work puts in front of the store's other requests).
const ACTIVATING: usize = 256;

/// Why the runtime did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Two actor types registered the same kind, or a kind is not a valid kind name.
    #[error("{0}")]
    Registration(String),
    /// A setting out of its bounds ([`Config::check`](super::Config::check)).
    #[error(transparent)]
    Config(#[from] super::ConfigError),
}

/// What [`RuntimeBuilder::store`] takes: any [`Store`], by value or in an `Arc`, or an
/// `Arc<dyn Store>` (a `Box<dyn Store>` goes in as `Arc::from(boxed)`).
pub trait IntoStore {
    /// The store, shared.
    fn into_store(self) -> Arc<dyn Store>;
}

impl<S: Store> IntoStore for S {
    fn into_store(self) -> Arc<dyn Store> {
        Arc::new(self)
    }
}

impl<S: Store> IntoStore for Arc<S> {
    fn into_store(self) -> Arc<dyn Store> {
        self
    }
}

impl IntoStore for Arc<dyn Store> {
    fn into_store(self) -> Arc<dyn Store> {
        self
    }
}

/// A kind registered to be hosted: its name, how to run it, how to check its messages.
pub(super) type Hosted = (&'static str, Arc<dyn Kind>, Arc<dyn Messages>);

/// Builds a [`Runtime`].
pub struct RuntimeBuilder {
    pub(super) store: Option<StoreChoice>,
    pub(super) config: Config,
    /// Hosted kinds: how to run them, and how to check their messages.
    pub(super) kinds: Vec<Hosted>,
    pub(super) sends_to: Vec<(&'static str, Arc<dyn Messages>)>,
}

pub(super) enum StoreChoice {
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

    /// Uses any store: one taken by value, one shared in an `Arc`, or an `Arc<dyn Store>`
    /// picked at run time (see [`IntoStore`]).
    ///
    /// ```
    /// use loom_core::EmbeddedStore;
    /// use loom_core::runtime::Runtime;
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let rt = Runtime::builder().store(EmbeddedStore::in_memory()?).start().await?;
    /// # rt.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn store(mut self, store: impl IntoStore) -> Self {
        self.store = Some(StoreChoice::Given(store.into_store()));
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
        self.kinds.push((
            A::KIND,
            Arc::new(KindOf(Arc::new(actor))),
            Arc::new(MessagesOf::<A>(std::marker::PhantomData)),
        ));
        self
    }

    /// Lets this runtime send to, ask and deliver events to actors of kind `A` without hosting
    /// it: other nodes on the same store run them. Its messages wait in their mailboxes until
    /// a node hosting `A` runs them (`loom mailbox ls` shows them); this node never does. A
    /// runtime that registers no kind and declares the kinds it talks to this way is a
    /// *client*: a web front end, a tool.
    ///
    /// A kind neither registered nor declared is refused at the first send
    /// ([`SendError::UnknownKind`](super::SendError::UnknownKind)), so that a kind forgotten
    /// at registration is not silently left waiting.
    ///
    /// ```
    /// use loom_core::EmbeddedStore;
    /// use loom_core::runtime::{Actor, Context, Rejected, Runtime};
    ///
    /// #[derive(Default)]
    /// struct Counter;
    ///
    /// impl Actor for Counter {
    ///     const KIND: &'static str = "counter";
    ///     type State = i64;
    ///     type Message = i64;
    ///     type Reply = i64;
    ///     async fn handle(&self, n: &mut i64, _: &mut Context<'_>, d: i64) -> Result<i64, Rejected> {
    ///         *n += d;
    ///         Ok(*n)
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = std::sync::Arc::new(EmbeddedStore::in_memory()?);
    /// // A node that runs the counters, and a client that only talks to them.
    /// let node = Runtime::builder().store(store.clone()).register::<Counter>().start().await?;
    /// let client = Runtime::builder().store(store).sends_to::<Counter>().start().await?;
    /// assert_eq!(client.actor::<Counter>("c")?.ask(5).await?, 5);
    /// assert!(client.kinds().is_empty(), "the client hosts nothing");
    /// # client.shutdown().await;
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn sends_to<A: Actor>(mut self) -> Self {
        self.sends_to
            .push((A::KIND, Arc::new(MessagesOf::<A>(std::marker::PhantomData))));
        self
    }

    /// Opens the store and starts the runtime; actors with pending work are activated.
    pub async fn start(self) -> Result<Runtime, StartError> {
        self.config.check()?;
        let mut kinds: BTreeMap<&'static str, Arc<dyn Kind>> = BTreeMap::new();
        let mut known: BTreeMap<&'static str, Arc<dyn Messages>> = BTreeMap::new();
        for (name, kind, messages) in self.kinds {
            ActorId::new(name, "k")
                .map_err(|e| StartError::Registration(format!("actor kind {name:?}: {e}")))?;
            if kinds.insert(name, kind).is_some() {
                return Err(StartError::Registration(format!(
                    "actor kind {name:?} is registered twice"
                )));
            }
            known.insert(name, messages);
        }
        for (name, messages) in self.sends_to {
            ActorId::new(name, "k")
                .map_err(|e| StartError::Registration(format!("actor kind {name:?}: {e}")))?;
            if kinds.contains_key(name) {
                return Err(StartError::Registration(format!(
                    "actor kind {name:?} is both hosted here (register) and declared as hosted elsewhere (sends_to)"
                )));
            }
            if known.insert(name, messages).is_some() {
                return Err(StartError::Registration(format!(
                    "actor kind {name:?} is declared twice with sends_to"
                )));
            }
        }
        // What every heartbeat will say, checked now: a bad node name (it also names the
        // node's leases), too many kinds or a lease ttl over a day is refused at start, not
        // by every heartbeat and lease afterwards.
        let hosted: Vec<&str> = kinds.keys().copied().collect();
        crate::store::backend::prepare_heartbeat(&self.config.node, &hosted, self.config.lease_ttl)
            .map_err(|e| StartError::Registration(format!("node {:?}: {e}", self.config.node)))?;
        let store: Arc<dyn Store> = match self
            .store
            .unwrap_or(StoreChoice::Embedded(PathBuf::from("./loom-data")))
        {
            StoreChoice::Embedded(dir) => Arc::new(EmbeddedStore::open(dir)?),
            StoreChoice::Memory => Arc::new(EmbeddedStore::in_memory()?),
            StoreChoice::Given(s) => s,
        };
        let health = Arc::new(health::Observed::new(
            &self.config.retry,
            self.config.lease_ttl,
        ));
        let partitions = store.partitions();
        // Reply signals, if the store gives them (a subscription that may still be starting:
        // until it is, the asks' own looks find their replies).
        let completions = store.completions();
        // A simulated node's clock skew (see `seam::skewed`), kept for every task it spawns.
        let skew = crate::seam::skew();
        let keeper = leases::Keeper::new(store.clone(), self.config.lease_ttl, health.clone());
        let keeper_task = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            crate::seam::skewed(skew, keeper.clone().run()),
        ));
        let shared = Arc::new(Shared {
            keeper,
            keeper_task: tokio::sync::Mutex::new(Some(keeper_task)),
            store,
            config: Arc::new(self.config),
            hub: Arc::new(Hub::default()),
            health,
            hosted: kinds.keys().copied().collect(),
            metrics: Metrics::new(kinds.keys().copied()),
            kinds,
            known,
            active: Mutex::new(Actives::default()),
            parked: Mutex::new(HashMap::new()),
            gone: Default::default(),
            shutdown: CancellationToken::new(),
            killed: CancellationToken::new(),
            stopped: CancellationToken::new(),
            tasks: TaskTracker::new(),
            wake: Notify::new(),
            skew,
            activating: tokio::sync::Semaphore::new(ACTIVATING),
            alarms: Default::default(),
            incarnation: crate::seam::random_u64(),
            left: tokio::sync::Mutex::new(false),
            ownership: super::ownership::Ownership::new(crate::partition::ownership_partitions(
                partitions,
            )),
        });
        if let Some(rx) = completions {
            shared.spawn(super::client::replies_from_other_nodes(shared.clone(), rx));
        }
        shared.spawn(dispatch(shared.clone()));
        shared.spawn(super::membership::heartbeats(shared.clone()));
        shared.spawn(super::expiry::purge_expired_records(shared.clone()));
        if !shared.hosted.is_empty() {
            shared.spawn(super::ownership::own_partitions(shared.clone()));
        }
        tracing::info!(node = %shared.config.node, "runtime started");
        Ok(Runtime { shared })
    }
}
