//! [`RuntimeBuilder`]: choosing the store, registering actor kinds, configuring, starting.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::activation::Kind;
use super::activation::{KindOf, dispatch};
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

/// Builds a [`Runtime`].
pub struct RuntimeBuilder {
    pub(super) store: Option<StoreChoice>,
    pub(super) config: Config,
    pub(super) kinds: Vec<(&'static str, Arc<dyn Kind>)>,
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
        self.kinds
            .push((A::KIND, Arc::new(KindOf(Arc::new(actor)))));
        self
    }

    /// Opens the store and starts the runtime; actors with pending work are activated.
    pub async fn start(self) -> Result<Runtime, StartError> {
        let mut kinds: BTreeMap<&'static str, Arc<dyn Kind>> = BTreeMap::new();
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
            active: Mutex::new(Actives::default()),
            parked: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            killed: CancellationToken::new(),
            tasks: TaskTracker::new(),
            wake: Notify::new(),
            skew,
            activating: tokio::sync::Semaphore::new(ACTIVATING),
            alarms: Default::default(),
        });
        shared.spawn(dispatch(shared.clone()));
        tracing::info!(node = %shared.config.node, "runtime started");
        Ok(Runtime { shared })
    }
}
