//! Two runtimes (two nodes) on one store, competing for the same actors under the bank load.
//! Mid-run the first node can no longer renew its leases nor beat: the second node, which then
//! counts it gone, takes its partitions while the first node's copies of their actors may still
//! run (the first node, which still counts itself a host, retakes only what the second has not
//! taken yet, and loses it again within a lease ttl). The books must balance: no fork, no
//! double application (rule D8).
//! Each server backend runs it from a test of its own (`racing_redis.rs`,
//! `racing_postgres.rs`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use loom_bench::bank::{Account, Bank, Transfer};
use loom_core::runtime::{Actor, Config, Runtime};
use loom_core::{ActorId, SeqRange, Store};

use crate::faults::FaultyStore;
use crate::runtime::Harness;

/// The runtime suite's quick settings ([`Harness::config`]), with more tries and a longer
/// wait for replies while the two nodes fight over partitions.
fn config(node: &str) -> Config {
    let mut c = Harness::config();
    c.node = node.to_owned();
    c.retry.max_attempts = 12;
    c.ask_timeout = Duration::from_secs(30);
    c
}

async fn node(store: Arc<dyn Store>, name: &str) -> Runtime {
    Bank::register(Runtime::builder().store(store))
        .config(config(name))
        .start()
        .await
        .expect("runtime")
}

/// The partition leases of the bank's kinds that `node` holds now and, if `theirs`, that it
/// wins among the two nodes (so not one it holds only until the other takes it). A look the
/// store fails is made again.
async fn partitions_of(store: &dyn Store, node: &str, theirs: bool) -> Vec<ActorId> {
    let n = loom_core::partition::ownership_partitions(store.partitions());
    let mut held = Vec::new();
    for kind in [Account::KIND, Transfer::KIND] {
        for p in 0..n {
            if theirs && loom_core::partition::owner_of(["node-1", "node-2"], kind, p) != Some(node)
            {
                continue;
            }
            let lease = ActorId::partition_lease(kind, p);
            let holder = loop {
                match store.holder(&lease).await {
                    Ok(h) => break h,
                    Err(e) => {
                        tracing::debug!(error = %e, "could not read a partition's lease; again");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            };
            if holder.is_some_and(|l| l.owner == node) {
                held.push(lease);
            }
        }
    }
    held
}

/// Runs the race on stores `connect` makes, each a client of the one store under test (a new
/// connection each, as separate nodes have): node 1's through a [`FaultyStore`] whose renewals
/// and heartbeats start failing halfway, node 2's plain. Panics on a fork (a journal with a
/// gap or a seq twice), on books that do not balance (a leg lost or applied twice), if node 1
/// never lost a lease or node 2 never took over a partition node 1 held.
///
/// ```no_run
/// # async fn run() {
/// use std::sync::Arc;
/// use loom_core::{EmbeddedStore, Store};
///
/// let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
/// loom_testkit::racing::two_nodes_racing_for_the_same_actors(|| {
///     let store = store.clone();
///     async move { store }
/// })
/// .await;
/// # }
/// ```
pub async fn two_nodes_racing_for_the_same_actors<F, Fut>(connect: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let first = FaultyStore::new(connect().await);
    let watch = connect().await;
    let rt1 = node(Arc::new(first.clone()), "node-1").await;
    let rt2 = node(connect().await, "node-2").await;
    let bank = Bank {
        accounts: 10,
        transfers: 300,
        concurrency: 32,
        seed: 11,
        ..Bank::default()
    };
    while bank.open_accounts(&rt1).await.is_err() {}
    // Clients send through both nodes; actors run wherever their lease is taken first.
    let start = |ids: Vec<u32>| {
        let (rt1, rt2, bank) = (rt1.clone(), rt2.clone(), bank);
        async move {
            futures::stream::iter(ids)
                .for_each_concurrent(bank.concurrency, |i| {
                    let rt = if i % 2 == 0 { rt1.clone() } else { rt2.clone() };
                    async move {
                        let mut tries = 0;
                        while let Err(e) = bank.start(&rt, i).await {
                            tries += 1;
                            assert!(tries < 100, "transfer {i}: {e}");
                        }
                    }
                })
                .await;
        }
    };
    start((0..150).collect()).await;
    // Node 1 can no longer renew nor beat: each of its actors stops when its partition's lease
    // runs out, and node 2, once node 1's record has run out too, takes its partitions.
    let before = partitions_of(watch.as_ref(), "node-1", true).await;
    assert!(!before.is_empty(), "node 1 held no partition");
    first.faults.fail_renewals.store(true, Ordering::SeqCst);
    first.faults.fail_heartbeats.store(true, Ordering::SeqCst);
    start((150..300).collect()).await;
    // Node 1's copies stop as their leases run out (within a lease ttl of its last renewal).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while rt1.metrics().leases_lost == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "node 1 never lost a lease: {:?}",
            rt1.metrics()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let statuses = bank
        .settle(&rt2, Duration::from_secs(120), |_| {})
        .await
        .expect("settle");
    let verified = bank
        .verify(&rt2, &statuses)
        .await
        .expect("the books balance");
    assert_eq!(verified.done + verified.refused, 300);
    // Node 2 took over at least one of node 1's partitions (node 1 retakes only what runs out
    // before node 2 takes it, and loses it again within a lease ttl).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = partitions_of(watch.as_ref(), "node-2", false).await;
        if before.iter().any(|p| now.contains(p)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 2 never took a partition of node 1's: {before:?} then {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rt1.parked().await.unwrap().is_empty());
    rt1.kill().await;
    rt2.shutdown().await;
    // No fork: every journal is gapless.
    let store = connect().await;
    let mut after = None;
    loop {
        let page = store.list_actors(after.as_ref(), 500).await.expect("list");
        let Some(last) = page.last().cloned() else {
            break;
        };
        for a in &page {
            let info = store.info(a).await.expect("info");
            let entries: Vec<_> = store
                .read(a, SeqRange::all())
                .try_collect()
                .await
                .expect("read");
            assert_eq!(entries.len() as u64, info.len(), "{a}: journal has a gap");
            for (i, e) in entries.iter().enumerate() {
                assert_eq!(
                    e.seq,
                    info.trimmed_through + 1 + i as u64,
                    "{a}: fork or gap"
                );
            }
        }
        after = Some(last);
    }
}
