//! The runtime suite against a private Redis, on stores of one partition and of three; every
//! case under its own key prefix.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use loom_testkit::servers::RedisServer;

mod common;

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let server = RedisServer::start();
    let n = Arc::new(AtomicU64::new(0));
    // Every case on a store of one partition, and again on one of three, where a message to an
    // actor of another partition goes through the outbox and the relay.
    let factory = |partitions| common::factory(&server.url(), "rt", &n, partitions, None);
    let mut trials = loom_testkit::runtime::trials("redis", &factory(None));
    trials.extend(loom_testkit::runtime::trials(
        "redis_partitioned",
        &factory(Some(3)),
    ));
    let conclusion = libtest_mimic::run(&args, trials);
    drop(server);
    conclusion.exit();
}
