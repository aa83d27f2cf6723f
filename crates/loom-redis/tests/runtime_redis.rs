//! The runtime suite against a private Redis, on stores of one partition and of three; every
//! case under its own key prefix.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use loom_redis::{RedisOptions, RedisStore};
use loom_testkit::servers::RedisServer;
use loom_testkit::{Factory, Fixture};

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let server = RedisServer::start();
    let url = server.url();
    let n = Arc::new(AtomicU64::new(0));
    // Every case on a store of one partition, and again on one of three, where a message to an
    // actor of another partition goes through the outbox and the relay.
    let factory = |partitions: Option<u32>| {
        let url = url.clone();
        let n = n.clone();
        Factory::new(move || {
            let url = url.clone();
            let prefix = format!("rt{}", n.fetch_add(1, Ordering::Relaxed));
            async move {
                let options = RedisOptions {
                    prefix,
                    partitions,
                    ..RedisOptions::default()
                };
                Fixture::new(
                    RedisStore::connect_with(&url, options)
                        .await
                        .expect("connect to the private redis"),
                )
            }
        })
    };
    let mut trials = loom_testkit::runtime::trials("redis", &factory(None));
    trials.extend(loom_testkit::runtime::trials(
        "redis_partitioned",
        &factory(Some(3)),
    ));
    let conclusion = libtest_mimic::run(&args, trials);
    drop(server);
    conclusion.exit();
}
