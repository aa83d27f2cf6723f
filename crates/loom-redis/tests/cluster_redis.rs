//! The store conformance suite and the runtime suite on a private Redis Cluster of three
//! primaries (`RedisCluster` in the test kit): a store of 8 partitions, each under its hash
//! tag, so every script runs on the primary of one slot; every case under its own key prefix.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use loom_redis::{RedisOptions, RedisStore};
use loom_testkit::servers::RedisCluster;
use loom_testkit::{Factory, Fixture, conformance};

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let cluster = RedisCluster::start();
    let nodes = cluster.urls();
    let n = Arc::new(AtomicU64::new(0));
    let factory = Factory::new(move || {
        let nodes = nodes.clone();
        let prefix = format!("c{}", n.fetch_add(1, Ordering::Relaxed));
        async move {
            let options = RedisOptions {
                prefix,
                partitions: Some(8),
                ..RedisOptions::default()
            };
            Fixture::new(
                RedisStore::connect_cluster(&nodes, options)
                    .await
                    .expect("connect to the private cluster"),
            )
        }
    });
    let mut trials = conformance::all("redis_cluster", &factory);
    trials.extend(loom_testkit::runtime::trials("redis_cluster", &factory));
    let urls = cluster.urls();
    trials.push(libtest_mimic::Trial::test(
        "cluster::a_stores_partition_count_is_read_back_and_a_new_one_gets_32",
        move || {
            tokio::runtime::Runtime::new()
                .expect("tokio")
                .block_on(partition_counts(&urls));
            Ok(())
        },
    ));
    let urls = cluster.urls();
    trials.push(libtest_mimic::Trial::test(
        "cluster::every_primarys_persistence_is_checked",
        move || {
            tokio::runtime::Runtime::new()
                .expect("tokio")
                .block_on(every_primary_checked(&urls));
            Ok(())
        },
    ));
    let conclusion = libtest_mimic::run(&args, trials);
    drop(cluster);
    conclusion.exit();
}

/// Each primary needs the persistence settings: one left at `appendfsync everysec` is named in
/// the warning every time. Before, each setting was read from one node chosen at random.
async fn every_primary_checked(nodes: &[String]) {
    let store = RedisStore::connect_cluster(
        nodes,
        RedisOptions {
            prefix: "durability".to_owned(),
            partitions: Some(8),
            ..RedisOptions::default()
        },
    )
    .await
    .expect("connect");
    assert_eq!(store.durability().await.warning, None);
    let set = |value: &'static str| async move {
        let client = redis::Client::open(nodes[1].as_str()).expect("client");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("a node");
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendfsync")
            .arg(value)
            .query_async(&mut c)
            .await
            .expect("CONFIG SET");
    };
    set("everysec").await;
    for _ in 0..6 {
        let w = store.durability().await.warning.expect("a warning");
        assert!(w.contains("primary ") && w.contains("everysec"), "{w}");
    }
    set("always").await;
    assert_eq!(store.durability().await.warning, None);
}

/// A connect that asks no count reads the one the store was created with; a new store on a
/// cluster gets 32 (a partition is a slot); one partition is refused.
async fn partition_counts(nodes: &[String]) {
    let connect = |prefix: &str, partitions: Option<u32>| {
        RedisStore::connect_cluster(
            nodes,
            RedisOptions {
                prefix: prefix.to_owned(),
                partitions,
                ..RedisOptions::default()
            },
        )
    };
    use loom_core::Store;
    let eight = connect("counts8", Some(8)).await.expect("created with 8");
    assert_eq!(eight.partitions(), 8);
    let again = connect("counts8", None)
        .await
        .expect("reconnect asking nothing");
    assert_eq!(again.partitions(), 8);
    let fresh = connect("counts32", None).await.expect("a new store");
    assert_eq!(fresh.partitions(), 32);
    let err = connect("counts1", Some(1))
        .await
        .expect_err("one partition");
    assert!(
        matches!(err, loom_core::StoreError::InvalidRequest(_)),
        "{err}"
    );
    for s in [eight, fresh] {
        s.destroy().await.expect("destroy");
    }
}
