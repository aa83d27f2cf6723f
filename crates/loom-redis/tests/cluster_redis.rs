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
    let conclusion = libtest_mimic::run(&args, trials);
    drop(cluster);
    conclusion.exit();
}
