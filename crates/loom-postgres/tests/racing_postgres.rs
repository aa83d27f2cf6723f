//! Two runtimes (two nodes) on one PostgreSQL, competing for the same actors under the bank load
//! (`loom_testkit::racing`): node 1's renewals and heartbeats fail mid-run, node 2 takes its
//! partitions over; no fork, no double application.

use std::sync::Arc;

use loom_core::Store;
use loom_postgres::{PostgresOptions, PostgresStore};
use loom_testkit::servers::PostgresServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_for_the_same_actors_never_fork_or_double_apply() {
    let server = PostgresServer::start();
    let url = &server.url();
    loom_testkit::racing::two_nodes_racing_for_the_same_actors(move || async move {
        let options = PostgresOptions {
            schema: "race".into(),
            ..PostgresOptions::default()
        };
        let store = PostgresStore::connect_with(url, options)
            .await
            .expect("connect");
        Arc::new(store) as Arc<dyn Store>
    })
    .await;
}
