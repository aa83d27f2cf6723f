//! The runtime suite against a private PostgreSQL cluster, on stores of one partition and of
//! 32; every case in its own schema.

mod common;

use loom_testkit::servers::PostgresServer;

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let server = PostgresServer::start();
    // Every case on a store of one partition, and again on one of 32, where a message to an
    // actor of another partition goes through the outbox and the relay.
    let mut trials =
        loom_testkit::runtime::trials("postgres", &common::factory(server.url(), "rt", None));
    trials.extend(loom_testkit::runtime::trials(
        "postgres_partitioned",
        &common::factory(server.url(), "rtp", Some(32)),
    ));
    let conclusion = libtest_mimic::run(&args, trials);
    drop(server);
    conclusion.exit();
}
