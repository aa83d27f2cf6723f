//! The store conformance suite against a private PostgreSQL cluster; every case in its own schema.

mod common;

use loom_testkit::conformance;
use loom_testkit::servers::PostgresServer;

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let server = PostgresServer::start();
    let factory = common::factory(server.url(), "conf");
    let conclusion = libtest_mimic::run(&args, conformance::all("postgres", &factory));
    drop(server);
    conclusion.exit();
}
