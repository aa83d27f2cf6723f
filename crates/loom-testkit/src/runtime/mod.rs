//! The runtime suite: the actor runtime's promises, checked on any store.
//!
//! Like the conformance suite, every case gets a fresh store from the backend's [`Factory`]
//! (wrapped in a [`FaultyStore`] so cases can inject failures), and names read
//! `runtime::<backend>::<case>`. A case can start several runtimes on the same store one after
//! the other, killing the first as a crash would, to check recovery and replay.

mod activities;
mod actors;
mod cancellation;
mod cluster;
mod common;
mod compaction;
mod delivery;
mod exactly_once;
mod failures;
mod lifecycle;
mod policies;
mod retention;
mod state;
mod upgrades;
mod waits;

/// Builds [`RuntimeCase`]s from case functions, named after them.
macro_rules! runtime_cases {
    ($($name:ident),* $(,)?) => {
        vec![$($crate::runtime::RuntimeCase {
            name: stringify!($name),
            run: |h| -> futures::future::BoxFuture<'_, ()> { Box::pin($name(h)) },
        }),*]
    };
}
use runtime_cases;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use libtest_mimic::Trial;
use loom_core::runtime::{Config, Retry, Runtime, RuntimeBuilder};
use loom_core::{ActorId, EntryKind, Seq, SeqRange, Store};

pub use actors::{
    Account, AccountMsg, Balance, Counter, Gauge, GaugeMsg, GaugeState, Ghost, Log, Nest, Probe,
    Step, Touchy, TouchyState, TouchyWord, Worker,
};
pub use cluster::partitions_won;

use crate::faults::{Faults, FaultyStore};
use crate::{Factory, Fixture};

/// What a runtime case works with.
pub struct Harness {
    /// The store (a [`FaultyStore`] around the backend's).
    pub store: Arc<dyn Store>,
    /// Faults to arm on it.
    pub faults: Arc<Faults>,
    /// Watches the test actors.
    pub probe: Arc<Probe>,
    _fixture: Fixture,
}

impl Harness {
    /// The crash of a node and its restart: kills `rt` as SIGKILL would (no drain, no lease
    /// released), lets `open` more test actors through the probe's gate, and starts a new
    /// runtime on the same store, which must take over the killed node's actors.
    pub async fn crash_and_resume(&self, rt: Runtime, open: usize) -> Runtime {
        rt.kill().await;
        self.probe.open(open);
        self.runtime().await
    }

    /// Settings that make crash takeover and retries quick.
    pub fn config() -> Config {
        Config {
            lease_ttl: Duration::from_millis(900),
            visibility: Duration::from_millis(1200),
            poll_interval: Duration::from_millis(20),
            retry: Retry {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(200),
                max_attempts: 3,
            },
            shutdown_timeout: Duration::from_secs(10),
            ask_timeout: Duration::from_secs(20),
            ..Config::default()
        }
    }

    /// A runtime on this store with the test actors registered and [`Harness::config`].
    pub async fn runtime(&self) -> Runtime {
        self.runtime_with(|_| {}).await
    }

    /// The same, with changes to the configuration.
    pub async fn runtime_with(&self, f: impl FnOnce(&mut Config)) -> Runtime {
        self.runtime_versioned("", f).await
    }

    /// The same, with the worker's activities renamed by `version` (changed code).
    pub async fn runtime_versioned(
        &self,
        version: &'static str,
        f: impl FnOnce(&mut Config),
    ) -> Runtime {
        self.runtime_registering(
            |b| {
                b.register_actor(Worker {
                    probe: self.probe.clone(),
                    version,
                })
            },
            f,
        )
        .await
    }

    /// A client-only runtime on this store: it hosts no kind and sends to the account
    /// (`sends_to`), with [`Harness::config`] changed by `f`.
    pub async fn client_with(&self, f: impl FnOnce(&mut Config)) -> Runtime {
        let mut config = Self::config();
        f(&mut config);
        Runtime::builder()
            .store(self.store.clone())
            .config(config)
            .sends_to::<Account>()
            .start()
            .await
            .expect("client starts")
    }

    /// A runtime with the account, the actors `register` adds, and [`Harness::config`]
    /// changed by `f` (for cases with actors of their own).
    pub async fn runtime_registering(
        &self,
        register: impl FnOnce(RuntimeBuilder) -> RuntimeBuilder,
        f: impl FnOnce(&mut Config),
    ) -> Runtime {
        self.runtime_on_registering(self.store.clone(), register, f)
            .await
    }

    /// The same as [`Harness::runtime_with`], on `store`: this harness's store wrapped in a
    /// [`FaultyStore`] of its own, say, for faults that one node meets and the others do not.
    pub async fn runtime_on(&self, store: Arc<dyn Store>, f: impl FnOnce(&mut Config)) -> Runtime {
        self.runtime_on_registering(
            store,
            |b| {
                b.register_actor(Worker {
                    probe: self.probe.clone(),
                    version: "",
                })
            },
            f,
        )
        .await
    }

    async fn runtime_on_registering(
        &self,
        store: Arc<dyn Store>,
        register: impl FnOnce(RuntimeBuilder) -> RuntimeBuilder,
        f: impl FnOnce(&mut Config),
    ) -> Runtime {
        let mut config = Self::config();
        f(&mut config);
        let builder = Runtime::builder()
            .store(store)
            .config(config)
            .register_actor(Account {
                probe: self.probe.clone(),
            });
        register(builder).start().await.expect("runtime starts")
    }

    /// Every entry of the actor's journal that is still kept.
    pub async fn journal(&self, id: &ActorId) -> Vec<loom_core::Entry> {
        use futures::TryStreamExt;
        self.store
            .read(id, SeqRange::all())
            .try_collect()
            .await
            .expect("read journal")
    }

    /// The kinds of the actor's kept entries, in order.
    pub async fn kinds(&self, id: &ActorId) -> Vec<&'static str> {
        self.journal(id)
            .await
            .iter()
            .map(|e| e.kind.name())
            .collect()
    }

    /// Count of kept entries of a kind.
    pub async fn count(&self, id: &ActorId, pred: impl Fn(&EntryKind) -> bool) -> usize {
        self.journal(id)
            .await
            .iter()
            .filter(|e| pred(&e.kind))
            .count()
    }

    /// The actor's highest seq.
    pub async fn highest(&self, id: &ActorId) -> Seq {
        self.store.highest_seq(id).await.expect("highest")
    }
}

/// Waits until `check` holds, up to `limit`; panics with `what` otherwise.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One runtime case.
#[derive(Clone, Copy)]
pub struct RuntimeCase {
    /// Name.
    pub name: &'static str,
    /// Body.
    pub run: for<'a> fn(&'a Harness) -> BoxFuture<'a, ()>,
}

/// The runtime cases for `backend`, as test trials.
pub fn trials(backend: &str, factory: &Factory) -> Vec<Trial> {
    [
        state::cases(),
        exactly_once::cases(),
        activities::cases(),
        policies::cases(),
        upgrades::cases(),
        waits::cases(),
        cancellation::cases(),
        retention::cases(),
        delivery::cases(),
        failures::cases(),
        compaction::cases(),
        lifecycle::cases(),
        cluster::cases(),
    ]
    .into_iter()
    .flatten()
    .map(|case| {
        let factory = factory.clone();
        Trial::test(format!("runtime::{backend}::{}", case.name), move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("tokio runtime: {e}"))?;
            rt.block_on(async move {
                let fixture = factory.create().await;
                let faulty = FaultyStore::new(fixture.store.clone());
                let harness = Harness {
                    faults: faulty.faults.clone(),
                    store: Arc::new(faulty),
                    probe: Arc::new(Probe::default()),
                    _fixture: fixture,
                };
                (case.run)(&harness).await;
            });
            Ok(())
        })
    })
    .collect()
}
