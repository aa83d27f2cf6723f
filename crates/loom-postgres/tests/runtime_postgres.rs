//! The runtime suite against a private PostgreSQL cluster; every case in its own schema.

mod common;

use loom_testkit::servers::PostgresServer;

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let server = PostgresServer::start();
    let factory = common::factory(server.url(), "rt");
    let conclusion = libtest_mimic::run(&args, loom_testkit::runtime::trials("postgres", &factory));
    drop(server);
    conclusion.exit();
}
