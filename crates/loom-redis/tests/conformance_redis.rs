//! The store conformance suite against a private Redis, on stores of one partition and of
//! three, and again on a primary with a replica, every write waiting for it
//! (`RedisOptions::replication`); every case under its own key prefix.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use loom_testkit::conformance;
use loom_testkit::servers::RedisServer;

mod common;

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let server = RedisServer::start();
    let n = Arc::new(AtomicU64::new(0));
    // Every case on a store of one partition, and again on one of three, where a message to an
    // actor of another partition goes through the outbox and the relay.
    let factory = |partitions| common::factory(&server.url(), "conf", &n, partitions, None);
    let mut trials = conformance::all("redis", &factory(None));
    trials.extend(conformance::all("redis_partitioned", &factory(Some(3))));
    // Every request then goes with a WAIT in its pipeline (`conn.rs`), transactions spelled out.
    let (primary, replica) = RedisServer::start_with_replica();
    trials.extend(conformance::all(
        "redis_replicated",
        &common::factory(
            &primary.url(),
            "repl",
            &n,
            None,
            Some(loom_redis::Replication::new(1)),
        ),
    ));
    let conclusion = libtest_mimic::run(&args, trials);
    drop((server, primary, replica));
    conclusion.exit();
}
