//! What the Redis suites share: stores on a private server, each under a key prefix of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use loom_redis::{RedisOptions, RedisStore, Replication};
use loom_testkit::{Factory, Fixture};

/// Stores on the server at `url`, of `partitions` (`None`: one), waiting for `replication`'s
/// replicas if given, prefixed `<stem><n>` with `n` from the shared `counter`, so that the
/// factories of one suite never share a prefix.
pub fn factory(
    url: &str,
    stem: &'static str,
    counter: &Arc<AtomicU64>,
    partitions: Option<u32>,
    replication: Option<Replication>,
) -> Factory {
    let (url, counter) = (url.to_owned(), counter.clone());
    Factory::new(move || {
        let url = url.clone();
        let prefix = format!("{stem}{}", counter.fetch_add(1, Ordering::Relaxed));
        async move {
            let options = RedisOptions {
                prefix,
                partitions,
                replication,
                ..RedisOptions::default()
            };
            Fixture::new(
                RedisStore::connect_with(&url, options)
                    .await
                    .expect("connect to the private redis"),
            )
        }
    })
}
