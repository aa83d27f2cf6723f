//! Group commit on a real Redis: concurrent appends and turns share script calls, each request
//! is still decided alone (racing first appends: one wins), turns of one batch see each
//! other's writes as if they had been sent one by one, and callers queued behind a server that
//! stopped answering hear so in bounded time.

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use loom_core::store::backend::{Outgoing, Turn};
use loom_core::{
    ActorId, Entry, EntryKind, Envelope, JournalStore, Mailbox, SeqRange, Store, StoreError,
};
use loom_redis::{RedisOptions, RedisStore};
use loom_testkit::servers::RedisServer;
use serde_json::json;

fn entry(seq: u64) -> Entry {
    Entry::new(
        seq,
        EntryKind::Completed {
            reply: json!({ "seq": seq }),
        },
    )
}

fn id(key: &str) -> ActorId {
    ActorId::new("group", key).expect("id")
}

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
    let mut tasks = Vec::new();
    for n in 0..400 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.append(&id(&format!("a{n}")), 1, &[entry(1)]).await
        }));
    }
    // Eight first appends racing on one actor, inside the same batches.
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.append(&id("shared"), 1, &[entry(1)]).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task").expect("append"), 1);
    }
    let mut won = 0;
    for t in racers {
        match t.await.expect("task") {
            Ok(1) => won += 1,
            Err(StoreError::Conflict { actual: 2, .. }) => {}
            other => panic!("a racing first append must win or conflict, got {other:?}"),
        }
    }
    assert_eq!(won, 1, "exactly one racing first append wins");
    let shared: Vec<Entry> = store
        .read(&id("shared"), SeqRange::all())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(shared.len(), 1);
    let used = script_calls(&url).await - before;
    eprintln!("408 appends in {used} script calls");
    assert!(
        used < 408 / 4,
        "408 appends took {used} script calls: appends are not sent together"
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
    let actors = 40;
    let turns_each = 8u64;
    let mut tasks = Vec::new();
    for a in 0..actors {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let me = id(&format!("t{a}"));
            for seq in 1..=turns_each {
                // Each turn writes the mailboxes of three others, some of them in the same batch.
                let send: Vec<Outgoing> = [1, actors / 2, actors - 1]
                    .iter()
                    .map(|d| Outgoing {
                        envelope: Envelope::new(
                            id(&format!("t{}", (a + d * seq as usize) % actors)),
                            json!({ "from": a, "seq": seq }),
                        ),
                        deliver_at: None,
                    })
                    .collect();
                let entries = [entry(seq)];
                let turn = Turn {
                    send: &send,
                    ..Turn::append(&me, seq, &entries)
                };
                store
                    .commit_turn(turn)
                    .await
                    .map_err(|e| format!("t{a} turn {seq}: {e}"))?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("no turn may fail");
    }
    let used = script_calls(&url).await - before;
    let turns = actors as u64 * turns_each;
    eprintln!("{turns} turns in {used} script calls");
    assert!(
        used < turns / 2,
        "{turns} turns took {used} script calls: turns are not sent together"
    );
    let mut waiting = 0;
    for a in 0..actors {
        waiting += store.pending(&id(&format!("t{a}"))).await.expect("pending");
        assert_eq!(
            store.highest_seq(&id(&format!("t{a}"))).await.unwrap(),
            turns_each
        );
    }
    assert_eq!(waiting, turns * 3);
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
