//! The store conformance suite against a private Redis; every case under its own key prefix.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use loom_redis::{RedisOptions, RedisStore};
use loom_testkit::servers::RedisServer;
use loom_testkit::{Factory, Fixture, conformance};

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let server = RedisServer::start();
    let url = server.url();
    let n = Arc::new(AtomicU64::new(0));
    let factory = Factory::new(move || {
        let url = url.clone();
        let prefix = format!("conf{}", n.fetch_add(1, Ordering::Relaxed));
        async move {
            let options = RedisOptions {
                prefix,
                ..RedisOptions::default()
            };
            Fixture::new(
                RedisStore::connect_with(&url, options)
                    .await
                    .expect("connect to the private redis"),
            )
        }
    });
    let conclusion = libtest_mimic::run(&args, conformance::all("redis", &factory));
    drop(server);
    conclusion.exit();
}
