//! Group commit on a real Redis: concurrent appends and turns share script calls, each request
//! is still decided alone (racing first appends: one wins), turns of one batch see each
//! other's writes as if they had been sent one by one, and callers queued behind a server that
//! stopped answering hear so in bounded time.

use std::time::{Duration, Instant};

use loom_core::{JournalStore, StoreError};
use loom_redis::{RedisOptions, RedisStore};
use loom_testkit::group_commit::{entry, first_appends_at_once, id, turns_sending_to_each_other};
use loom_testkit::servers::RedisServer;

async fn connect(url: &str) -> RedisStore {
    connect_with(url, Duration::from_secs(10)).await
}

async fn connect_with(url: &str, response_timeout: Duration) -> RedisStore {
    let options = RedisOptions {
        prefix: "grp".into(),
        response_timeout,
        ..RedisOptions::default()
    };
    RedisStore::connect_with(url, options)
        .await
        .expect("connect")
}

async fn admin(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).expect("client");
    client
        .get_multiplexed_async_connection()
        .await
        .expect("admin")
}

/// Holds every write (script calls among them) for `ms`, so that requests sent meanwhile queue
/// in the store's batcher behind the batches already sent, whatever the machine's speed.
async fn pause_writes(url: &str, ms: u64) {
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("WRITE")
        .query_async(&mut admin(url).await)
        .await
        .expect("CLIENT PAUSE");
}

/// How many script calls the server has run (`EVALSHA` and `EVAL`).
async fn script_calls(url: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut admin(url).await)
        .await
        .expect("INFO");
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split(['=', ','])
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_script_calls_and_each_is_decided_alone() {
    let server = RedisServer::start();
    let url = server.url();
    let store = connect(&url).await;
    let before = script_calls(&url).await;
    pause_writes(&url, 200).await;
    let appends = first_appends_at_once(&store).await;
    let used = script_calls(&url).await - before;
    eprintln!("{appends} appends in {used} script calls");
    assert!(
        used < appends / 4,
        "{appends} appends took {used} script calls: appends are not sent together"
    );
    assert!(store.destroy().await.expect("destroy") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_turns_sending_to_each_other_all_arrive_and_share_calls() {
    let server = RedisServer::start();
    let url = server.url();
    let store = connect(&url).await;
    let before = script_calls(&url).await;
    pause_writes(&url, 200).await;
    let turns = turns_sending_to_each_other(std::slice::from_ref(&store)).await;
    let used = script_calls(&url).await - before;
    eprintln!("{turns} turns in {used} script calls");
    assert!(
        used < turns / 2,
        "{turns} turns took {used} script calls: turns are not sent together"
    );
    assert!(store.destroy().await.expect("destroy") > 0);
}

/// A server that stops answering (all writes paused) fails every caller within about twice the
/// response timeout, those still queued behind the batches in flight included; without the
/// bound on the queue, the last of 5 000 waited for some 20 batches to time out one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_queued_behind_a_silent_server_fail_in_bounded_time() {
    let server = RedisServer::start();
    let url = server.url();
    let timeout = Duration::from_millis(300);
    let store = connect_with(&url, timeout).await;
    pause_writes(&url, 30_000).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..5000 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let r = store.append(&id(&format!("s{n}")), 1, &[entry(1)]).await;
            (r, started.elapsed())
        }));
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (r, took) = t.await.expect("task");
        assert!(
            matches!(r, Err(StoreError::Unavailable { .. })),
            "a paused server cannot acknowledge: {r:?}"
        );
        slowest = slowest.max(took);
    }
    eprintln!("slowest caller heard back after {slowest:?}");
    // Twice the timeout, and room for a loaded machine to spawn and schedule 5 000 tasks.
    assert!(
        slowest < timeout * 2 + Duration::from_secs(2),
        "a caller waited {slowest:?}"
    );
    let () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut admin(&url).await)
        .await
        .expect("CLIENT UNPAUSE");
}
