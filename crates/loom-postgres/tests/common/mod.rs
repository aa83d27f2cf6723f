//! What the suites run against PostgreSQL share: a factory of stores on one private cluster,
//! every store in a schema of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use loom_postgres::{PostgresOptions, PostgresStore};
use loom_testkit::{Factory, Fixture};

/// Stores of `partitions` (1 or 32; `None`: 1) on the cluster at `url`, in schemas `{prefix}0`,
/// `{prefix}1`, ….
pub fn factory(url: String, prefix: &'static str, partitions: Option<u32>) -> Factory {
    let n = Arc::new(AtomicU64::new(0));
    Factory::new(move || {
        let url = url.clone();
        let schema = format!("{prefix}{}", n.fetch_add(1, Ordering::Relaxed));
        async move {
            let options = PostgresOptions {
                schema,
                max_connections: 8,
                partitions,
                ..PostgresOptions::default()
            };
            Fixture::new(
                PostgresStore::connect_with(&url, options)
                    .await
                    .expect("connect to the private postgres"),
            )
        }
    })
}
