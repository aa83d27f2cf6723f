//! The store conformance suite against a private PostgreSQL cluster, on stores of one partition
//! and of 32; every case in its own schema.

mod common;

use loom_testkit::conformance;
use loom_testkit::servers::PostgresServer;

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let server = PostgresServer::start();
    // Every case on a store of one partition, and again on one of 32, where a message to an
    // actor of another partition goes through the outbox and the relay.
    let mut trials = conformance::all("postgres", &common::factory(server.url(), "conf", None));
    trials.extend(conformance::all(
        "postgres_partitioned",
        &common::factory(server.url(), "confp", Some(32)),
    ));
    let conclusion = libtest_mimic::run(&args, trials);
    drop(server);
    conclusion.exit();
}
