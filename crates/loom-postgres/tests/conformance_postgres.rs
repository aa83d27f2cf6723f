//! The store conformance suite against a private PostgreSQL cluster; every case in its own schema.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use loom_postgres::{PostgresOptions, PostgresStore};
use loom_testkit::servers::PostgresServer;
use loom_testkit::{Factory, Fixture, conformance};

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let server = PostgresServer::start();
    let url = server.url();
    let n = Arc::new(AtomicU64::new(0));
    let factory = Factory::new(move || {
        let url = url.clone();
        let schema = format!("conf{}", n.fetch_add(1, Ordering::Relaxed));
        async move {
            let options = PostgresOptions {
                schema,
                max_connections: 8,
                ..PostgresOptions::default()
            };
            Fixture::new(
                PostgresStore::connect_with(&url, options)
                    .await
                    .expect("connect to the private postgres"),
            )
        }
    });
    let conclusion = libtest_mimic::run(&args, conformance::all("postgres", &factory));
    drop(server);
    conclusion.exit();
}
