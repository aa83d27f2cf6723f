//! Faults on a real Redis: the server killed under load, dropped connections, racing writers,
//! and persistence settings that cannot keep Loom's promises.

use std::collections::HashMap;
use std::time::Duration;

use futures::TryStreamExt;
use loom_core::{ActorId, Entry, JournalStore, SeqRange, StoreError};
use loom_redis::{RedisOptions, RedisStore, Replication};
use loom_testkit::load::{
    Writers, actor as id, check_acknowledged, entry, racing_nodes_never_fork_a_journal,
};
use loom_testkit::servers::RedisServer;

/// A plain connection to the server at `url`, for a case to look at or set up keys by hand.
async fn admin(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

async fn connect(url: &str, prefix: &str) -> RedisStore {
    connect_replicated(url, prefix, None).await
}

async fn connect_replicated(
    url: &str,
    prefix: &str,
    replication: Option<Replication>,
) -> RedisStore {
    let options = RedisOptions {
        prefix: prefix.to_owned(),
        response_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        tls_root_cert: None,
        partitions: None,
        replication,
    };
    RedisStore::connect_with(url, options)
        .await
        .expect("connect")
}

/// A failover to a replica that fell behind: writers append through a primary whose replica is
/// cut off mid-run (`REPLICAOF NO ONE` on it, as a partition or a lagging link leaves it), the
/// primary is killed, and the replica is what is left. Returns how many acknowledged appends
/// the replica lacks, and how many appends failed as unavailable.
async fn acknowledged_but_lost_in_a_failover(replication: Option<Replication>) -> (u64, u64) {
    let (mut primary, replica) = RedisServer::start_with_replica();
    let writers = Writers::spawn(
        connect_replicated(&primary.url(), "failover", replication).await,
        8,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut cut = redis::Client::open(replica.url())
        .expect("replica url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the replica");
    let () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut cut)
        .await
        .expect("cut the replica off");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    primary.kill();
    let (acked, errors) = writers.stop().await;
    assert!(
        acked.values().all(|h| *h > 0),
        "every writer was acknowledged before the cut: {acked:?}"
    );
    let promoted = connect(&replica.url(), "failover").await;
    let mut lost = 0;
    for (n, want) in &acked {
        let has = promoted.highest_seq(&id(*n)).await.expect("highest");
        lost += want.saturating_sub(has);
    }
    if lost == 0 {
        check_acknowledged(&promoted, &acked).await;
    }
    (lost, errors)
}

/// Rule D1 across a failover: without [`RedisOptions::replication`] the primary acknowledges
/// appends its cut-off replica never gets, and a failover to that replica loses them (which is
/// why the README says the promises hold for a primary that restarts on its own data); with it,
/// those appends fail as unavailable instead (`WAIT` gets no replica), and the replica holds
/// every append that was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_replica_keeps_what_was_acknowledged_only_with_replication() {
    let (lost, _) = acknowledged_but_lost_in_a_failover(None).await;
    assert!(
        lost > 0,
        "without waiting for replicas, the cut-off replica should lack acknowledged appends"
    );
    let (lost, errors) = acknowledged_but_lost_in_a_failover(Some(Replication {
        replicas: 1,
        timeout: Duration::from_millis(300),
    }))
    .await;
    assert_eq!(lost, 0, "acknowledged appends lost in the failover");
    assert!(
        errors > 0,
        "the cut-off replica never made an append fail: the test proved nothing"
    );
}

/// A store on `primary` under `prefix` that waits for one replica (at most 500 ms a round),
/// holding one acknowledged append (`id(0)`, seq 1).
async fn waiting_for_one_replica(primary: &RedisServer, prefix: &str) -> RedisStore {
    let store = connect_replicated(
        &primary.url(),
        prefix,
        Some(Replication {
            replicas: 1,
            timeout: Duration::from_millis(500),
        }),
    )
    .await;
    store
        .append(&id(0), 1, &[entry(0, 1)])
        .await
        .expect("append");
    store
}

/// The requests of a moment share one `WAIT` (a `WAIT` blocks its connection, so one per
/// request would queue every request behind the others' waits): 64 tasks reading at once
/// through a store waiting for a replica get every answer with far fewer `WAIT`s than requests,
/// counted by the primary's `INFO commandstats`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_their_waits_for_replicas() {
    let (primary, _replica) = RedisServer::start_with_replica();
    let store = waiting_for_one_replica(&primary, "shared").await;
    let mut admin = redis::Client::open(primary.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin)
        .await
        .expect("reset stats");
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    assert_eq!(store.highest_seq(&id(0)).await.expect("read"), 1);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("reader");
    }
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut admin)
        .await
        .expect("stats");
    let calls = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (reads, waits) = (calls("hget"), calls("wait"));
    eprintln!("{waits} WAITs for {reads} reads");
    assert!(reads >= 1280, "{reads} reads: {stats}");
    assert!(
        waits > 0 && waits * 4 < reads,
        "{waits} WAITs for {reads} reads: not shared"
    );
}

/// A primary restarted behind the same address while a store waits for its replicas: a `WAIT`
/// on the new server covers nothing the old one was sent, and the new server may give a
/// connection the client id the old one had, so the client id alone would pass a request the
/// replicas never got. The wait round that first reaches the new server sees its `run_id`
/// change and fails the requests out as unavailable; once the replica has synchronised again,
/// requests are acknowledged again, and what was acknowledged before is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_restarted_behind_its_address_fails_what_the_wait_cannot_cover() {
    let (mut primary, _replica) = RedisServer::start_with_replica();
    let store = waiting_for_one_replica(&primary, "restarted").await;
    primary.restart();
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    let highest = loop {
        match store.highest_seq(&id(0)).await {
            Ok(h) => break h,
            Err(e) => {
                assert!(
                    matches!(e, StoreError::Unavailable { .. }),
                    "not unavailable: {e}"
                );
                failures.push(e.to_string());
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no request acknowledged in 30 s after the restart: {failures:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(highest, 1, "the acknowledged append is gone");
    assert!(
        failures.iter().any(|f| f.contains("the server changed")),
        "no request failed for the restart: {failures:#?}"
    );
}

/// A recorded reply read through a store that waits for replicas is one the replicas hold,
/// whoever wrote it: here a process without replication records it while the only replica is
/// stalled (it acknowledged everything before), and the waiting store's `lookup` and
/// `enqueue_once` of that key fail as unavailable instead of handing the reply on (which a
/// failover then could lose, and the message run again record another). On this machine's
/// Redis 7.0 the wait after a read covers what it saw by itself; from 7.2 on only a write
/// moves the offset a wait waits for, which is why the store writes one after such a read
/// (`conn.rs`). Once the replica runs again, both answer it, and the write followed (*without*
/// it, `<prefix>:read-mark` is never written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_another_process_recorded_is_handed_on_only_once_replicas_hold_it() {
    use loom_core::{Enqueued, Envelope, IdempotencyKey, IdempotencyStore, Reservation, Store};
    let (primary, replica) = RedisServer::start_with_replica();
    let waiting = waiting_for_one_replica(&primary, "read").await;
    let writer = connect(&primary.url(), "read").await;
    let mut marks = admin(&primary.url()).await;
    let actor = id(1);
    let key = IdempotencyKey::new("k").unwrap();
    let ttl = Duration::from_secs(60);
    writer.reserve(&actor, &key, ttl).await.expect("reserve");
    replica.pause();
    writer
        .complete(&actor, &key, &serde_json::json!("the reply"), ttl)
        .await
        .expect("complete");
    let looked = waiting.lookup(&actor, &key).await;
    let msg = Envelope::new(actor.clone(), serde_json::json!("again"));
    let sent = waiting.enqueue_once(&msg, None, &key, ttl).await;
    replica.resume();
    assert!(
        matches!(looked, Err(StoreError::Unavailable { .. })),
        "a reply no replica holds was handed on: {looked:?}"
    );
    assert!(
        matches!(sent, Err(StoreError::Unavailable { .. })),
        "a reply no replica holds was handed on: {sent:?}"
    );
    let started = std::time::Instant::now();
    loop {
        match waiting.lookup(&actor, &key).await {
            Ok(Some(Reservation::Completed(v))) => {
                assert_eq!(v, serde_json::json!("the reply"));
                break;
            }
            Ok(other) => panic!("{other:?}"),
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(30),
                "the replica back, still no answer after 30 s: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        waiting.enqueue_once(&msg, None, &key, ttl).await,
        Ok(Enqueued::Duplicate(Reservation::Completed(_)))
    ));
    // The reply handed on was followed by the write whose wait covers it, which Redis 7.2 and
    // later need (7.0 covers the read by itself, so the refusals above come without it).
    let marked: bool = redis::cmd("EXISTS")
        .arg("read:read-mark")
        .query_async(&mut marks)
        .await
        .expect("exists");
    assert!(marked, "no write followed the read of the reply");
}

/// A replication setting that cannot work is refused at connect, with a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_setting_that_cannot_work_is_refused() {
    let server = RedisServer::start();
    for (r, why) in [
        (Replication::new(0), "0 replicas"),
        (
            Replication {
                replicas: 1,
                timeout: Duration::ZERO,
            },
            "above 0",
        ),
        (
            Replication {
                replicas: 1,
                timeout: Duration::from_millis(700),
            },
            "under a third of the response timeout",
        ),
    ] {
        let options = RedisOptions {
            prefix: "refused".to_owned(),
            response_timeout: Duration::from_secs(2),
            replication: Some(r),
            ..RedisOptions::default()
        };
        match RedisStore::connect_with(&server.url(), options).await {
            Err(StoreError::InvalidRequest(m)) => assert!(m.contains(why), "{m}"),
            other => panic!("{r:?} should be refused: {other:?}"),
        }
    }
    let options = RedisOptions {
        replication: Some(Replication::new(1)),
        ..RedisOptions::default()
    };
    match RedisStore::connect_cluster(&[server.url()], options).await {
        Err(StoreError::InvalidRequest(m)) => assert!(m.contains("Redis Cluster"), "{m}"),
        other => panic!("a cluster store waiting for replicas should be refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_under_load_loses_no_acknowledged_append() {
    let mut server = RedisServer::start();
    let url = server.url();
    let writers = Writers::spawn(connect(&url, "kill").await, 16);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SIGKILL, twice, mid-load; the writers keep going through the outage.
    for _ in 0..2 {
        server.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.restart();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (acked, errors) = writers.stop().await;
    assert!(
        errors > 0,
        "the kills did not interrupt any append; the test proved nothing"
    );
    assert!(acked.values().all(|h| *h > 0));
    server.restart();
    check_acknowledged(&connect(&url, "kill").await, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_is_a_typed_error_and_a_retry_writes_no_duplicate() {
    let server = RedisServer::start();
    let store = connect(&server.url(), "drop").await;
    let a = id(0);
    store
        .append(&a, 1, &[entry(0, 1)])
        .await
        .expect("first append");
    // Kill every client connection of this server from the side, as a proxy or network would.
    let admin = redis::Client::open(server.url()).expect("client");
    let mut c = admin
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection");
    let mut unavailable = 0;
    let mut next = 2;
    for _ in 0..20 {
        let kill: redis::RedisResult<i64> = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .query_async(&mut c)
            .await;
        kill.expect("CLIENT KILL");
        match store.append(&a, next, &[entry(0, next)]).await {
            Ok(h) => next = h + 1,
            Err(StoreError::Unavailable { .. }) => {
                unavailable += 1;
                // The retry: same seq, same entry.
                match store.append(&a, next, &[entry(0, next)]).await {
                    Ok(h) => next = h + 1,
                    Err(StoreError::Conflict { actual, .. }) => {
                        assert_eq!(
                            actual,
                            next + 1,
                            "a conflict on retry means the first try ran"
                        );
                        next += 1;
                    }
                    Err(e) => panic!("retry failed: {e:?}"),
                }
            }
            Err(e) => panic!("expected a connection error, got {e:?}"),
        }
    }
    assert!(unavailable > 0, "no append saw the dropped connection");
    let acked = HashMap::from([(0, next - 1)]);
    check_acknowledged(&store, &acked).await;
    assert_eq!(
        store.highest_seq(&a).await.unwrap(),
        next - 1,
        "a retry duplicated an entry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_on_one_actor_never_fork_the_journal() {
    let server = RedisServer::start();
    racing_nodes_never_fork_a_journal([
        connect(&server.url(), "race").await,
        connect(&server.url(), "race").await,
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_that_cannot_keep_acknowledged_writes_is_reported() {
    let good = RedisServer::start();
    assert_eq!(
        connect(&good.url(), "p").await.durability().await.warning,
        None
    );
    let no_aof = RedisServer::start_with(&["--appendonly", "no"]);
    let w = connect(&no_aof.url(), "p")
        .await
        .durability()
        .await
        .warning
        .expect("a warning");
    assert!(w.contains("appendonly is off"), "{w}");
    let everysec = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let w = connect(&everysec.url(), "p")
        .await
        .durability()
        .await
        .warning
        .expect("a warning");
    assert!(w.contains("everysec"), "{w}");
    let evicting =
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]);
    let d = connect(&evicting.url(), "p").await.durability().await;
    assert_eq!(d.maxmemory_policy.as_deref(), Some("allkeys-lru"));
    let w = d.warning.expect("a warning");
    assert!(
        w.contains("maxmemory-policy") && w.contains("journal entries") && w.contains("noeviction"),
        "{w}"
    );
    let volatile = RedisServer::start_with(&["--maxmemory-policy", "volatile-lru"]);
    let w = connect(&volatile.url(), "p")
        .await
        .durability()
        .await
        .warning
        .expect("a warning");
    assert!(
        w.contains("keys with a TTL") && w.contains("maxmemory is 0"),
        "{w}"
    );
    // Skips the AOF's fsync while a snapshot or a rewrite runs (before: no warning).
    let rewrite = RedisServer::start_with(&["--no-appendfsync-on-rewrite", "yes"]);
    let w = connect(&rewrite.url(), "p")
        .await
        .durability()
        .await
        .warning
        .expect("a warning");
    assert!(w.contains("no-appendfsync-on-rewrite"), "{w}");
    // A managed server that disables CONFIG still says its eviction policy in INFO (before:
    // only "could not read", and nothing of the eviction).
    let no_config = RedisServer::start_with(&[
        "--rename-command",
        "CONFIG",
        "",
        "--maxmemory",
        "64mb",
        "--maxmemory-policy",
        "allkeys-lru",
    ]);
    let d = connect(&no_config.url(), "p").await.durability().await;
    assert_eq!(
        (d.appendonly.as_deref(), d.maxmemory_policy.as_deref()),
        (Some("yes"), Some("allkeys-lru"))
    );
    let w = d.warning.expect("a warning");
    assert!(
        w.contains("appendfsync") && w.contains("maxmemory-policy is \"allkeys-lru\""),
        "{w}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_prefixes_are_typed_errors() {
    assert!(matches!(
        RedisStore::connect("not a url").await,
        Err(StoreError::InvalidRequest(_))
    ));
    let refused = RedisStore::connect_with(
        "redis+unix:///nonexistent/loom.sock",
        RedisOptions {
            connect_timeout: Duration::from_millis(500),
            ..RedisOptions::default()
        },
    )
    .await;
    assert!(
        matches!(refused, Err(StoreError::Unavailable { .. })),
        "{refused:?}"
    );
    let with_prefix = |prefix: String| {
        RedisStore::connect_with(
            "redis://127.0.0.1:1/",
            RedisOptions {
                prefix,
                connect_timeout: Duration::from_millis(500),
                ..RedisOptions::default()
            },
        )
    };
    // Braces would change the hash tags; a glob character or ':' would let `<prefix>:*` (what
    // `destroy` deletes) match another store's keys: `a?` matches `ab:…`, `a` matches `a:b:…`.
    let too_long = "p".repeat(loom_redis::MAX_PREFIX_LEN + 1);
    for bad in [
        "", "a{b}", "a*", "a?", "a[bc]", "a\\b", "a:b", "a b", "é", &too_long,
    ] {
        let refused = with_prefix(bad.to_owned()).await;
        assert!(
            matches!(&refused, Err(StoreError::InvalidRequest(m)) if m.contains("prefix")),
            "{bad:?}: {refused:?}"
        );
    }
    // Allowed: it gets as far as the (closed) port.
    let longest = "p".repeat(loom_redis::MAX_PREFIX_LEN);
    for good in ["loom", "app-1_v2.loom", &longest] {
        let r = with_prefix(good.to_owned()).await;
        assert!(
            matches!(r, Err(StoreError::Unavailable { .. })),
            "{good:?}: {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_and_acl_users_in_the_url() {
    let server = RedisServer::start_with(&[
        "--requirepass",
        "s3cret",
        "--user",
        "loom",
        "on",
        ">pw",
        "~*",
        "&*",
        "+@all",
        "--user",
        "narrow",
        "on",
        ">pw",
        "~*",
        "&*",
        "+@read",
        "+@write",
        "+@scripting",
    ]);
    let sock = server.socket();
    let sock = sock.display();
    let a = id(1);
    // A user without TIME (only in @fast), which nearly every script calls, is refused at
    // connect, saying what to grant (before: it connected, and then every request failed as
    // a storage failure to retry).
    match RedisStore::connect(&format!("redis+unix://{sock}?user=narrow&pass=pw")).await {
        Err(StoreError::Denied { message, .. }) => {
            assert!(message.contains("may not run a command"), "{message}")
        }
        other => panic!("a user without TIME: {other:?}"),
    }
    for url in [
        format!("redis+unix://{sock}?pass=s3cret"),
        format!("redis+unix://{sock}?user=loom&pass=pw"),
    ] {
        let store = RedisStore::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let next = store.highest_seq(&a).await.unwrap() + 1;
        store
            .append(&a, next, &[entry(1, next)])
            .await
            .expect("append");
    }
    for url in [
        format!("redis+unix://{sock}?pass=wrong"),
        format!("redis+unix://{sock}?user=loom&pass=nope"),
    ] {
        match RedisStore::connect(&url).await {
            Err(StoreError::Denied { message, .. }) => {
                assert!(message.contains("login was refused"), "{message}")
            }
            other => panic!("{url}: expected a refused login, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let (_server, url, ca) = RedisServer::start_tls();
    let options = RedisOptions {
        tls_root_cert: Some(ca),
        ..RedisOptions::default()
    };
    let store = RedisStore::connect_with(&url, options)
        .await
        .expect("connect over TLS");
    let a = id(2);
    store
        .append(&a, 1, &[entry(2, 1), entry(2, 2)])
        .await
        .expect("append over TLS");
    let entries: Vec<Entry> = store
        .read(&a, SeqRange::all())
        .try_collect()
        .await
        .expect("read over TLS");
    assert_eq!(entries.len(), 2);
    // Without the CA, the server's certificate is not trusted: a typed error, not a hang.
    let untrusted = RedisStore::connect_with(
        &url,
        RedisOptions {
            connect_timeout: Duration::from_secs(2),
            ..RedisOptions::default()
        },
    )
    .await;
    assert!(untrusted.is_err(), "an untrusted certificate was accepted");
}

/// A store written by a build that kept one ready index for every kind: the first connect of
/// this build moves it to one index per kind, and the moved actors are found by their kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_ready_index_is_moved_to_one_per_kind_at_connect() {
    use loom_core::Mailbox;
    let server = RedisServer::start();
    let admin = redis::Client::open(server.url()).expect("client");
    let mut conn = admin
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection");
    let _: () = redis::cmd("ZADD")
        .arg("old:ready")
        .arg(1000)
        .arg("counter/c1")
        .arg(2000)
        .arg("gauge/g1")
        .arg(3000)
        .arg("counter/c2")
        .query_async(&mut conn)
        .await
        .expect("seed the old index");
    let store = connect(&server.url(), "old").await;
    let counters: std::collections::HashSet<ActorId> = store
        .ready_actors(&["counter"], 10)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        counters,
        std::collections::HashSet::from([
            ActorId::new("counter", "c1").unwrap(),
            ActorId::new("counter", "c2").unwrap()
        ])
    );
    assert_eq!(
        store.ready_actors(&["gauge"], 10).await.unwrap(),
        vec![ActorId::new("gauge", "g1").unwrap()]
    );
    let left: bool = redis::cmd("EXISTS")
        .arg("old:ready")
        .query_async(&mut conn)
        .await
        .expect("exists");
    assert!(!left, "the old index is still there");
    // A second connect finds nothing to move.
    drop(connect(&server.url(), "old").await);
    assert_eq!(store.ready_actors(&["counter"], 10).await.unwrap().len(), 2);
}

/// A store written by a build that kept one ready index per kind: the first connect of this
/// build splits it into one per partition (more than one page of it), keeping when each actor
/// became ready, and each actor is then found in its own partition only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_kind_ready_index_is_split_by_partition_at_connect() {
    use loom_core::Mailbox;
    use loom_core::partition::{SHARED_STORE_PARTITIONS, partition_of};
    let server = RedisServer::start();
    let admin = redis::Client::open(server.url()).expect("client");
    let mut conn = admin
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection");
    let counters: Vec<ActorId> = (0..2500)
        .map(|n| ActorId::new("counter", format!("c{n}")).unwrap())
        .collect();
    let mut seed = redis::cmd("ZADD");
    seed.arg("split:ready:counter");
    for (n, c) in counters.iter().enumerate() {
        seed.arg(1000 + n as u64).arg(c.as_str());
    }
    // Not an actor id: dropped by the move.
    seed.arg(1).arg("junk");
    let _: () = seed
        .query_async(&mut conn)
        .await
        .expect("seed the old index");
    let store = connect(&server.url(), "split").await;
    let left: bool = redis::cmd("EXISTS")
        .arg("split:ready:counter")
        .query_async(&mut conn)
        .await
        .expect("exists");
    assert!(!left, "the per-kind index is still there");
    let layout: Option<String> = redis::cmd("GET")
        .arg("split:layout")
        .query_async(&mut conn)
        .await
        .expect("layout");
    assert_eq!(
        layout.as_deref(),
        Some("ready-per-partition"),
        "the next connect looks for nothing"
    );
    let backlog = store.backlog("counter").await.unwrap();
    assert_eq!(backlog.mailboxes, 2500);
    assert_eq!(backlog.ready, 2500);
    assert_eq!(
        backlog.oldest_ready_at,
        Some(loom_core::Timestamp::from_millis(1000)),
        "when the first became ready is kept"
    );
    for p in [0, 7, SHARED_STORE_PARTITIONS - 1] {
        let mut found = store
            .ready_actors_in(&[("counter", &[p])], SHARED_STORE_PARTITIONS, 10_000)
            .await
            .unwrap();
        found.sort();
        let mut expected: Vec<ActorId> = counters
            .iter()
            .filter(|c| partition_of(c, SHARED_STORE_PARTITIONS) == p)
            .cloned()
            .collect();
        expected.sort();
        assert!(!expected.is_empty());
        assert_eq!(found, expected, "partition {p}");
    }
}

/// A private server, an admin connection to it, a store under `prefix`, the actor `counter/c1`
/// whose mailbox a test works on, and lease options that keep a message out for a minute.
async fn one_mailbox(
    prefix: &str,
) -> (
    RedisServer,
    redis::aio::MultiplexedConnection,
    RedisStore,
    ActorId,
    loom_core::store::LeaseOptions,
) {
    let server = RedisServer::start();
    let conn = redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection");
    let store = connect(&server.url(), prefix).await;
    let opts = loom_core::store::LeaseOptions {
        visibility: Duration::from_secs(60),
        max_deliveries: 5,
        ..loom_core::store::LeaseOptions::default()
    };
    (
        server,
        conn,
        store,
        ActorId::new("counter", "c1").unwrap(),
        opts,
    )
}

/// A membership record no heartbeat wrote (mangled by hand, or by a bug) is no live node: the
/// next heartbeat deletes it with the forgotten ones, and writes over one under its own name.
/// Before, the heartbeat script did arithmetic on its missing fields and failed, for every node,
/// at every beat, and every roster read failed on it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mangled_membership_record_fails_no_heartbeat() {
    use loom_core::store::Membership;
    let (_server, mut conn, store, _, _) = one_mailbox("mangled").await;
    for (node, record) in [
        ("ghost", "garbage"),
        ("self", "1|x|2|3|"),
        ("blank", ""),
        ("far", "1|1|99999999999999999999|1|"),
        ("wide", "18446744073709551616|1|1|1|"),
    ] {
        let () = redis::cmd("HSET")
            .arg("mangled:members")
            .arg(node)
            .arg(record)
            .query_async(&mut conn)
            .await
            .expect("mangle");
    }
    assert!(
        store.members().await.is_err(),
        "a mangled record is reported"
    );
    let ttl = Duration::from_secs(5);
    let me = store
        .heartbeat("self", 7, &["counter"], ttl)
        .await
        .expect("beats");
    assert_eq!((me.incarnation, me.joined_at), (7, me.beat_at));
    let other = store.heartbeat("other", 8, &[], ttl).await.expect("beats");
    assert_eq!(other.node, "other");
    let roster = store.members().await.expect("the roster reads again");
    let mut nodes: Vec<(String, u64)> = roster
        .members
        .iter()
        .map(|m| (m.node.clone(), m.incarnation))
        .collect();
    nodes.sort();
    assert_eq!(nodes, [("other".to_owned(), 8), ("self".to_owned(), 7)]);
    // A well-formed record of a live node still refuses its name to another incarnation.
    assert!(matches!(
        store.heartbeat("self", 9, &[], ttl).await,
        Err(StoreError::NodeTaken { incarnation: 7, .. })
    ));
}

/// A mailbox's stream is never deleted; if it is lost all the same (a store destroyed while
/// nodes ran, an evicting server), the next push makes it again and the lease hands out what it
/// holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_whose_stream_was_lost_hands_out_what_is_pushed_after() {
    use loom_core::{Envelope, Mailbox};
    let (_server, mut conn, store, a, opts) = one_mailbox("lost").await;
    store
        .enqueue(&Envelope::new(a.clone(), serde_json::json!(1)), None)
        .await
        .unwrap();
    let first = store
        .lease(&a, opts)
        .await
        .unwrap()
        .expect("the first message");
    store.ack(&first.receipt).await.unwrap();
    let removed: u64 = redis::cmd("DEL")
        .arg("lost:{counter/c1}:mq")
        .query_async(&mut conn)
        .await
        .expect("delete the stream");
    assert_eq!(removed, 1, "the stream's key is where the layout says");
    let second = Envelope::new(a.clone(), serde_json::json!(2));
    store.enqueue(&second, None).await.unwrap();
    let got = store
        .lease(&a, opts)
        .await
        .expect("a lease, not an error")
        .expect("the message pushed after the loss");
    assert_eq!(got.envelope.id, second.id);
    store.ack(&got.receipt).await.unwrap();
    assert!(store.lease(&a, opts).await.unwrap().is_none());
}

/// A mailbox of an older build was read through a consumer group, `g`, which held its current
/// message as pending (and, from 3d0b8a3 on, `g = 1` in its meta). This build reads streams
/// without one: that message is handed out again once its lease runs out, and the messages
/// after it come out once each, in order, though the group never saw them delivered. A marked
/// mailbox's ack also acks the message in the group, which then holds nothing, and the meta
/// loses `g`; an unmarked one's group keeps that one pending entry, which nothing reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_of_an_older_build_comes_out_in_order_and_its_group_is_acked() {
    older_mailbox("grp", true).await;
    older_mailbox("unmarked", false).await;
}

/// What an older build's lease left in `counter/c1`'s mailbox under `prefix`, `g` set in its meta
/// or not (`marked`), read by this build.
async fn older_mailbox(prefix: &str, marked: bool) {
    use loom_core::{Envelope, Mailbox};
    let (_server, mut conn, store, a, opts) = one_mailbox(prefix).await;
    let (mm, mq) = (
        format!("{prefix}:{{counter/c1}}:mm"),
        format!("{prefix}:{{counter/c1}}:mq"),
    );
    let (mm, mq) = (mm.as_str(), mq.as_str());
    let sent: Vec<Envelope> = (1..=3)
        .map(|n| Envelope::new(a.clone(), serde_json::json!(n)))
        .collect();
    for e in &sent {
        store.enqueue(e, None).await.unwrap();
    }
    // What an older build's lease left: the group made over the stream, the first message
    // read through it (pending there), and the meta pointing at it, its lease run out.
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(mq)
        .arg("g")
        .arg("0")
        .query_async(&mut conn)
        .await
        .expect("XGROUP CREATE");
    type Read = Vec<(String, Vec<(String, HashMap<String, Vec<u8>>)>)>;
    let read: Read = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("loom")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(mq)
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("XREADGROUP");
    let (sid, fields) = read[0].1[0].clone();
    let field = |name: &str| String::from_utf8(fields[name].clone()).expect("a text field");
    let (p, msgid) = (field("p"), field("id"));
    assert_eq!(msgid, sent[0].id.to_string(), "the first message");
    let mut meta = vec![
        ("cur", p.as_str()),
        ("curid", sid.as_str()),
        ("curmsg", msgid.as_str()),
        ("dlv", "1"),
        ("vis", "0"),
        ("q", "2"),
    ];
    if marked {
        meta.push(("g", "1"));
    }
    let () = redis::cmd("HSET")
        .arg(mm)
        .arg(&meta)
        .query_async(&mut conn)
        .await
        .expect("HSET the meta");
    let pending = |mut c: redis::aio::MultiplexedConnection| async move {
        // The summary form: count, smallest id, greatest id, count per consumer.
        let summary: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg(mq)
            .arg("g")
            .query_async(&mut c)
            .await
            .expect("XPENDING");
        summary.0
    };
    assert_eq!(pending(conn.clone()).await, 1);
    let again = store
        .lease(&a, opts)
        .await
        .unwrap()
        .expect("the older build's current message, its lease run out");
    assert_eq!(again.envelope.id, sent[0].id);
    assert_eq!(again.envelope.attempt, 1, "its second delivery");
    store.ack(&again.receipt).await.unwrap();
    let left = if marked { 0 } else { 1 };
    assert_eq!(
        pending(conn.clone()).await,
        left,
        "acked in the group if marked"
    );
    let flagged: bool = redis::cmd("HEXISTS")
        .arg(mm)
        .arg("g")
        .query_async(&mut conn)
        .await
        .expect("HEXISTS");
    assert!(!flagged, "the meta drops g once the group holds nothing");
    for want in &sent[1..] {
        let got = store
            .lease(&a, opts)
            .await
            .unwrap()
            .expect("every message pushed");
        assert_eq!(got.envelope.id, want.id, "out of order");
        assert_eq!(got.envelope.attempt, 0, "a first delivery");
        store.ack(&got.receipt).await.unwrap();
    }
    assert!(store.lease(&a, opts).await.unwrap().is_none());
}

/// Rules D15 and D14: a turn whose next message's frame does not decode reports it committed,
/// and that message is buried at once (`loom_testkit::load`). The damage: the message's stream
/// entry written again with a frame of garbage, at the end of the stream, where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_message_is_buried_at_once_and_the_next_one_runs() {
    let server = RedisServer::start();
    let admin = redis::Client::open(server.url()).expect("client");
    let conn = admin
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection");
    let store = connect(&server.url(), "damage").await;
    loom_testkit::load::a_damaged_message_is_buried_at_once_and_the_next_one_runs(
        &store,
        |a, position| {
            let mut conn = conn.clone();
            async move {
                let mq = format!("damage:{{{a}}}:mq");
                let entries: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
                    .arg(&mq)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn)
                    .await
                    .expect("XRANGE");
                let (sid, fields) = entries
                    .into_iter()
                    .find(|(_, f)| f.get("p") == Some(&position.to_string().into_bytes()))
                    .expect("the message is in the stream");
                let () = redis::pipe()
                    .cmd("XDEL")
                    .arg(&mq)
                    .arg(&sid)
                    .ignore()
                    .cmd("XADD")
                    .arg(&mq)
                    .arg("*")
                    .arg("m")
                    .arg(loom_testkit::load::GARBAGE)
                    .arg("id")
                    .arg(&fields["id"])
                    .arg("p")
                    .arg(&fields["p"])
                    .ignore()
                    .query_async(&mut conn)
                    .await
                    .expect("damage the message");
            }
        },
    )
    .await;
}

/// `connect_existing` (what `loom`'s inspecting commands use) refuses a prefix that holds no
/// store, writing nothing, and accepts one that does: with its partition count recorded, or, a
/// store of a build before that record, with only its nodes' roster, or data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_existing_refuses_only_a_prefix_without_a_store() {
    let server = RedisServer::start();
    let options = |prefix: &str| RedisOptions {
        prefix: prefix.to_owned(),
        ..RedisOptions::default()
    };
    let mut admin = admin(&server.url()).await;
    let Err(refused) = RedisStore::connect_existing(&server.url(), options("none")).await else {
        panic!("a prefix without a store was opened");
    };
    assert!(
        matches!(&refused, StoreError::InvalidRequest(m) if m.contains("no Loom store")),
        "{refused}"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("none:*")
        .query_async(&mut admin)
        .await
        .expect("keys");
    assert!(keys.is_empty(), "the refusal wrote {keys:?}");
    // Made by a first connect.
    connect(&server.url(), "made").await;
    RedisStore::connect_existing(&server.url(), options("made"))
        .await
        .expect("a store made by a first connect");
    // Of older builds: only the roster, only data.
    for (prefix, key) in [
        ("roster", "roster:members"),
        ("data", "data:{account/a}:jm"),
    ] {
        let () = redis::cmd("HSET")
            .arg(key)
            .arg("x")
            .arg("1")
            .query_async(&mut admin)
            .await
            .expect("seed");
        RedisStore::connect_existing(&server.url(), options(prefix))
            .await
            .unwrap_or_else(|e| panic!("a store of an older build with {key}: {e}"));
    }
}

/// A store's stored format: a node's connect records it; a store in a newer build's format is
/// refused by a node's connect and by `loom`'s, before either writes; a store whose ready index
/// is in an older build's layout is refused by `loom`'s connect, which moves nothing, and moved
/// by a node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_another_format_is_refused_before_anything_is_written() {
    use loom_redis::STORED_FORMAT;
    let server = RedisServer::start();
    let options = |prefix: &str| RedisOptions {
        prefix: prefix.to_owned(),
        ..RedisOptions::default()
    };
    let mut admin = admin(&server.url()).await;
    let reader = admin.clone();
    let get = |key: &'static str| {
        let mut admin = reader.clone();
        async move {
            let v: Option<String> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut admin)
                .await
                .expect("get");
            v
        }
    };
    drop(connect(&server.url(), "newer").await);
    let recorded = STORED_FORMAT.to_string();
    assert_eq!(
        get("newer:format").await.as_deref(),
        Some(recorded.as_str())
    );
    // A newer build's store: nothing of it is rewritten, the layout least of all.
    let () = redis::cmd("MSET")
        .arg("newer:format")
        .arg(STORED_FORMAT + 1)
        .arg("newer:layout")
        .arg("a-newer-layout")
        .query_async(&mut admin)
        .await
        .expect("pretend a newer format");
    for opened in [
        RedisStore::connect_with(&server.url(), options("newer")).await,
        RedisStore::connect_existing(&server.url(), options("newer")).await,
    ] {
        let Err(e) = opened else {
            panic!("a store of a newer format was opened");
        };
        assert!(
            matches!(&e, StoreError::InvalidRequest(m) if m.contains("newer build")),
            "{e}"
        );
    }
    assert_eq!(
        get("newer:layout").await.as_deref(),
        Some("a-newer-layout"),
        "the refusal wrote"
    );
    // An older build's per-kind ready index: a look refuses it and moves nothing.
    let () = redis::cmd("ZADD")
        .arg("older:ready:counter")
        .arg(1000)
        .arg("counter/c1")
        .query_async(&mut admin)
        .await
        .expect("seed the old index");
    let looked = RedisStore::connect_existing(&server.url(), options("older")).await;
    assert!(
        matches!(&looked, Err(StoreError::InvalidRequest(m)) if m.contains("older build's layout")),
        "{looked:?}"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("older:*")
        .query_async(&mut admin)
        .await
        .expect("keys");
    assert_eq!(keys, ["older:ready:counter"], "the look wrote");
    drop(connect(&server.url(), "older").await);
    assert_eq!(
        get("older:format").await.as_deref(),
        Some(recorded.as_str())
    );
    assert_eq!(
        get("older:layout").await.as_deref(),
        Some("ready-per-partition")
    );
    RedisStore::connect_existing(&server.url(), options("older"))
        .await
        .expect("moved by a node's connect, it opens");
}

/// Bytes the server has sent to its clients since it started (`INFO stats`).
async fn bytes_sent(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    let stats: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(admin)
        .await
        .expect("stats");
    stats
        .lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_net_output_bytes")
}

/// A page of a long mailbox is read back alone: `messages` returns the page's frames, not
/// every waiting message's (*before*: every page, and the runtime's look at the message it
/// runs, sent the whole mailbox, so listing N messages in pages sent N² / page frames, and
/// `loom mailbox show` of 100 000 messages of 1 KiB had Redis send 100 MB per page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_a_long_mailbox_is_read_back_alone() {
    use loom_core::{Envelope, Mailbox, Timestamp};
    let server = RedisServer::start();
    let store = connect(&server.url(), "pages").await;
    let mut admin = redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let a = ActorId::new("inbox", "long").expect("id");
    let body = "x".repeat(4096);
    for n in 0..1000u32 {
        // Every tenth delayed, so that the page is picked from both of a mailbox's places.
        let due = (n % 10 == 0).then(|| Timestamp::now() + Duration::from_secs(3600));
        let m = Envelope::new(a.clone(), serde_json::json!({ "n": n, "body": body }));
        store.enqueue(&m, due).await.expect("enqueue");
    }
    let n_of = |w: &loom_core::store::Waiting| w.envelope.payload["n"].as_u64().expect("n");
    let mut after = None;
    for first in [0, 10, 20] {
        let before = bytes_sent(&mut admin).await;
        let page = store.messages(&a, after, 10).await.expect("page");
        let sent = bytes_sent(&mut admin).await - before;
        assert_eq!(
            page.iter().map(n_of).collect::<Vec<_>>(),
            (first..first + 10).collect::<Vec<u64>>()
        );
        // Ten frames of 4 KiB, and the INFO reply itself: far from the 4 MB the mailbox holds.
        assert!(
            sent < 100_000,
            "a page of 10 had the server send {sent} bytes"
        );
        after = page.last().map(|w| w.position);
    }
    assert!(store.destroy().await.expect("destroy") > 0);
}

/// A Redis 7 ACL user without the right to publish (new users get no channels by default): a
/// turn that records a reply writes everything and then signals it, and the refused signal must
/// not turn the committed turn into an error. Before, the turn came back as a storage failure
/// with its writes done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_that_may_not_publish_still_commits_turns_that_record_replies() {
    use loom_core::store::backend::{Record, Settle, Turn};
    use loom_core::{
        Envelope, IdempotencyKey, IdempotencyStore, LeaseOptions, Mailbox, Reservation, Store,
    };
    let server = RedisServer::start_with(&[
        "--user",
        "loom",
        "on",
        ">pw",
        "~*",
        "resetchannels",
        "+@all",
    ]);
    let url = format!(
        "redis+unix://{}?user=loom&pass=pw",
        server.socket().display()
    );
    let store = connect(&url, "nopub").await;
    let a = ActorId::new("acct", "alice").unwrap();
    let key = IdempotencyKey::new("k").unwrap();
    let m = Envelope {
        idempotency_key: Some(key.clone()),
        ..Envelope::new(a.clone(), serde_json::json!("in"))
    };
    store
        .enqueue_once(&m, None, &key, Duration::from_secs(60))
        .await
        .expect("enqueue");
    let d = store
        .lease(&a, LeaseOptions::default())
        .await
        .expect("lease")
        .expect("a delivery");
    let reply = serde_json::json!("done");
    let committed = store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&d.receipt)),
            record: Some(Record {
                actor: &a,
                key: &key,
                result: &reply,
                ttl: Duration::from_secs(60),
            }),
            ..Turn::append(&a, 1, &[entry(1, 1)])
        })
        .await;
    assert_eq!(committed.expect("the turn committed").highest, 1);
    assert_eq!(
        store.lookup(&a, &key).await.unwrap(),
        Some(Reservation::Completed(reply))
    );
    assert_eq!(store.pending(&a).await.unwrap(), 0);
}

/// A burst of delayed messages coming due at once is moved into the mailbox's stream a slice
/// at a time (`PROMOTE_MAX` in `loom.lua`), not by one script holding Redis's one thread for
/// all of them: after one lease, 1 000 of 2 500 due messages are in the stream and the rest
/// still in the delayed set (*before*: all 2 500 moved by that lease), and so for 1 500 due in
/// the same millisecond. They come out once each, in due order (ties in the order sent), and a
/// message sent meanwhile without a delay comes after all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_due_messages_is_moved_a_slice_at_a_time() {
    use loom_core::store::LeaseOptions;
    use loom_core::{Envelope, Mailbox, Timestamp};
    let server = RedisServer::start();
    let store = connect(&server.url(), "burst").await;
    let mut admin = redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let a = ActorId::new("inbox", "burst").expect("id");
    // Far enough ahead that none is due before all are sent, on a loaded machine too.
    let (t0, ahead) = (tokio::time::Instant::now(), Duration::from_secs(5));
    let start = Timestamp::now() + ahead;
    let total = 2500u64;
    // Each due a millisecond after the one before, sent in reverse (due order is not the
    // order sent), 100 at a time.
    let order: Vec<u64> = (0..total).rev().collect();
    for chunk in order.chunks(100) {
        futures::future::try_join_all(chunk.iter().map(|n| {
            let m = Envelope::new(a.clone(), serde_json::json!(n));
            let store = &store;
            async move {
                store
                    .enqueue(&m, Some(start + Duration::from_millis(*n)))
                    .await
            }
        }))
        .await
        .expect("enqueue");
    }
    // And 1 500 due in one millisecond, to another actor: a slice of those too, in the order
    // sent (by position, which the sends in flight together draw in any order).
    let b = ActorId::new("inbox", "ties").expect("id");
    let mut ties: Vec<(u64, u64)> = Vec::new();
    let tied: Vec<u64> = (0..1500).collect();
    for chunk in tied.chunks(100) {
        let positions = futures::future::try_join_all(chunk.iter().map(|n| {
            let m = Envelope::new(b.clone(), serde_json::json!(n));
            let store = &store;
            async move { store.enqueue(&m, Some(start)).await }
        }))
        .await
        .expect("enqueue");
        ties.extend(positions.into_iter().zip(chunk.iter().copied()));
    }
    assert!(
        Timestamp::now() < start,
        "sending took more than {ahead:?}: some were due when sent"
    );
    tokio::time::sleep_until(t0 + ahead + Duration::from_millis(total + 300)).await;
    let long = LeaseOptions {
        visibility: Duration::from_secs(60),
        max_deliveries: 5,
        ..LeaseOptions::default()
    };
    let first = store
        .lease(&b, long)
        .await
        .expect("lease")
        .expect("a message");
    let tied_left: u64 = redis::cmd("ZCARD")
        .arg("burst:{inbox/ties}:md")
        .query_async(&mut admin)
        .await
        .expect("zcard");
    assert_eq!(tied_left, 500, "ties moved by the first lease: not a slice");
    store.ack(&first.receipt).await.expect("ack");
    let mut got = vec![first.envelope.payload];
    while let Some(d) = store.lease(&b, long).await.expect("lease") {
        store.ack(&d.receipt).await.expect("ack");
        got.push(d.envelope.payload);
    }
    ties.sort();
    let expected: Vec<serde_json::Value> = ties.iter().map(|(_, n)| serde_json::json!(n)).collect();
    assert!(
        got == expected,
        "ties not in the order sent, or not once each"
    );
    let first = store
        .lease(&a, long)
        .await
        .expect("lease")
        .expect("a message");
    assert_eq!(first.envelope.payload, serde_json::json!(0));
    let delayed: u64 = redis::cmd("ZCARD")
        .arg("burst:{inbox/burst}:md")
        .query_async(&mut admin)
        .await
        .expect("zcard");
    assert_eq!(
        delayed,
        total - 1000,
        "moved by the first lease: not a slice"
    );
    store.ack(&first.receipt).await.expect("ack");
    let late = Envelope::new(a.clone(), serde_json::json!("late"));
    store.enqueue(&late, None).await.expect("enqueue");
    let mut got = Vec::new();
    while let Some(d) = store.lease(&a, long).await.expect("lease") {
        store.ack(&d.receipt).await.expect("ack");
        got.push(d.envelope.payload);
    }
    // After every message due before it, though more were due than one move takes.
    let mut expected: Vec<serde_json::Value> = (1..total).map(|n| serde_json::json!(n)).collect();
    expected.push(serde_json::json!("late"));
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "not in due order, or not once each");
}

/// A page of a mailbox of 150 000 messages whose lowest positions were handled cannot be picked
/// from its first entries (its window of positions is not all there), so its script reads the
/// whole stream: it now reads at most `LIST_BUDGET` entries a call, in several calls, and no
/// call holds Redis's one thread for long (none in the server's slow log above 250 ms; before,
/// the first page's one call took about a second). And a mailbox listed in pages of several
/// calls each (20 000 messages after one delayed at position 1, the first ten of them
/// handled) still lists every message once, in position order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_a_huge_mailbox_is_picked_in_calls_that_each_hold_redis_briefly() {
    use loom_core::store::LeaseOptions;
    use loom_core::{Envelope, Mailbox, Timestamp};
    let server = RedisServer::start();
    let store = connect(&server.url(), "huge").await;
    let mut admin = redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let long = LeaseOptions {
        visibility: Duration::from_secs(60),
        max_deliveries: 5,
        ..LeaseOptions::default()
    };
    let fill = |a: ActorId, n: u64| {
        let store = store.clone();
        async move {
            let all: Vec<u64> = (0..n).collect();
            for chunk in all.chunks(200) {
                // One after another within a chunk is not needed: positions are read back.
                futures::future::try_join_all(chunk.iter().map(|i| {
                    let m = Envelope::new(a.clone(), serde_json::json!(i));
                    let store = &store;
                    async move { store.enqueue(&m, None).await }
                }))
                .await
                .expect("enqueue");
            }
        }
    };
    // The listing walked whole: one message delayed an hour (position 1), then 20 000, the
    // first 10 of those handled, and each page read across calls.
    let a = ActorId::new("inbox", "walked").expect("id");
    let later = Timestamp::now() + Duration::from_secs(3600);
    store
        .enqueue(
            &Envelope::new(a.clone(), serde_json::json!("later")),
            Some(later),
        )
        .await
        .expect("enqueue");
    fill(a.clone(), 20_000).await;
    for _ in 0..10 {
        let d = store
            .lease(&a, long)
            .await
            .expect("lease")
            .expect("a message");
        store.ack(&d.receipt).await.expect("ack");
    }
    let mut positions = Vec::new();
    let mut after = None;
    loop {
        let page = store.messages(&a, after, 3000).await.expect("page");
        let Some(last) = page.last() else { break };
        after = Some(last.position);
        positions.extend(page.iter().map(|w| w.position));
    }
    let expected: Vec<u64> = std::iter::once(1).chain(12..=20_001).collect();
    assert_eq!(positions.len(), expected.len());
    assert!(positions == expected, "not every message once, in order");

    // The big one, and the server's slow log.
    let b = ActorId::new("inbox", "huge").expect("id");
    fill(b.clone(), 150_000).await;
    for _ in 0..10 {
        let d = store
            .lease(&b, long)
            .await
            .expect("lease")
            .expect("a message");
        store.ack(&d.receipt).await.expect("ack");
    }
    for (k, v) in [
        ("slowlog-log-slower-than", "250000"),
        ("slowlog-max-len", "128"),
    ] {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut admin)
            .await
            .expect("config");
    }
    let () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut admin)
        .await
        .expect("slowlog reset");
    let first = store.messages(&b, None, 100).await.expect("first page");
    assert_eq!(
        first.iter().map(|w| w.position).collect::<Vec<_>>(),
        (11..111).collect::<Vec<u64>>()
    );
    let slow: u64 = redis::cmd("SLOWLOG")
        .arg("LEN")
        .query_async(&mut admin)
        .await
        .expect("slowlog len");
    let entries: redis::Value = redis::cmd("SLOWLOG")
        .arg("GET")
        .query_async(&mut admin)
        .await
        .expect("slowlog get");
    assert_eq!(slow, 0, "calls over 250 ms: {entries:?}");
}

/// A page of a long mailbox picked in several calls while its actor runs: messages the page
/// chose are settled before their frames are read, and delayed messages it chose come due and
/// move into the stream. The page still holds the lowest positions waiting, as many as asked.
/// Before, it came back short (what was settled meanwhile left out, so a caller paging on
/// took it for the end), and without the delayed messages that had moved (never listed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_picked_while_the_actor_runs_is_whole() {
    use loom_core::store::LeaseOptions;
    use loom_core::{Envelope, Mailbox, Timestamp};
    let server = RedisServer::start();
    let store = connect(&server.url(), "live").await;
    let a = ActorId::new("inbox", "live").expect("id");
    // 50 delayed (positions 1..=50), then 50 000; the delayed ones are made due while the
    // pages are picked, below (sent due in an hour, so that however long the sends take
    // none is due before).
    let hour = Timestamp::now() + Duration::from_secs(3600);
    for n in 0..50 {
        let m = Envelope::new(a.clone(), serde_json::json!(format!("later {n}")));
        store.enqueue(&m, Some(hour)).await.expect("enqueue");
    }
    let all: Vec<u64> = (0..50_000).collect();
    for chunk in all.chunks(200) {
        futures::future::try_join_all(chunk.iter().map(|i| {
            let m = Envelope::new(a.clone(), serde_json::json!(i));
            let store = &store;
            async move { store.enqueue(&m, None).await }
        }))
        .await
        .expect("enqueue");
    }
    let long = LeaseOptions {
        visibility: Duration::from_secs(60),
        max_deliveries: 5,
        ..LeaseOptions::default()
    };
    for _ in 0..10 {
        let d = store
            .lease(&a, long)
            .await
            .expect("lease")
            .expect("a message");
        store.ack(&d.receipt).await.expect("ack");
    }
    // Due in a second now: their scores in the delayed set moved (the mailbox's own layout).
    let wait = 1000;
    let due = Timestamp::now() + Duration::from_millis(wait);
    let mut admin = redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut zadd = redis::cmd("ZADD");
    zadd.arg("live:{inbox/live}:md").arg("XX");
    for pos in 1..=50 {
        zadd.arg(due.as_millis()).arg(pos);
    }
    let () = zadd.query_async(&mut admin).await.expect("zadd");
    // The actor runs: from just before the delayed messages are due, 300 messages taken and
    // settled, from the head (a lease moves the due ones to the stream's end).
    let runner = {
        let (store, a) = (store.clone(), a.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(wait - 200)).await;
            for _ in 0..300 {
                let d = store
                    .lease(&a, long)
                    .await
                    .expect("lease")
                    .expect("a message");
                store.ack(&d.receipt).await.expect("ack");
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(wait - 300)).await;
    let mut pages = 0;
    while !runner.is_finished() {
        let page = store.messages(&a, None, 100).await.expect("page");
        pages += 1;
        let positions: Vec<u64> = page.iter().map(|w| w.position).collect();
        assert_eq!(positions.len(), 100, "a short page: {positions:?}");
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        // Once due, the delayed ones wait at the stream's end, at the lowest positions.
        if Timestamp::now() > due + Duration::from_millis(500) {
            assert_eq!(
                positions[..50],
                (1..=50).collect::<Vec<u64>>()[..],
                "{positions:?}"
            );
        }
    }
    runner.await.expect("runner");
    eprintln!("{pages} pages picked while the actor ran");
    assert!(pages > 0, "no page was picked while the actor ran");
    let page = store.messages(&a, None, 100).await.expect("page");
    assert_eq!(
        page.iter().take(50).map(|w| w.position).collect::<Vec<_>>(),
        (1..=50).collect::<Vec<u64>>()
    );
}

/// A delayed message whose record is damaged (no `|` between its id and frame), and a current
/// message whose stream entry is gone, no longer fail every script that reaches them: the first
/// moves into the stream when due and is buried at its lease (D14), the second is buried when
/// its lease runs out, and the messages after each come out. Before, both raised a Lua error,
/// which fails the script after whatever it wrote before (a turn sending to the actor had
/// journaled its entries and pushed its outbox, and its sends were lost), and every lease and
/// every send to the actor failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_delayed_and_current_records_are_settled_not_a_script_error() {
    use loom_core::{Envelope, Mailbox, Timestamp};
    let (_server, mut conn, store, a, _) = one_mailbox("dmg").await;
    let opts = loom_core::store::LeaseOptions {
        visibility: Duration::from_millis(100),
        max_deliveries: 5,
        ..loom_core::store::LeaseOptions::default()
    };
    let soon = Timestamp::now() + Duration::from_millis(50);
    store
        .enqueue(&Envelope::new(a.clone(), serde_json::json!(1)), Some(soon))
        .await
        .unwrap();
    let () = redis::cmd("HSET")
        .arg("dmg:{counter/c1}:mdx")
        .arg(1)
        .arg("garbage")
        .query_async(&mut conn)
        .await
        .expect("damage the delayed record");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = Envelope::new(a.clone(), serde_json::json!(2));
    store
        .enqueue(&second, None)
        .await
        .expect("a send behind a damaged delayed message");
    let got = store
        .lease(&a, opts)
        .await
        .expect("a lease, not an error")
        .expect("the message after the damaged one");
    assert_eq!(got.envelope.id, second.id);
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "the damaged message is buried: {dead:?}");
    // The current message's entry is lost from the stream while it is out.
    let entries: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
        .arg("dmg:{counter/c1}:mq")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    let (sid, _) = entries.first().expect("the current message's entry");
    let () = redis::cmd("XDEL")
        .arg("dmg:{counter/c1}:mq")
        .arg(sid)
        .query_async(&mut conn)
        .await
        .map(|_: u64| ())
        .expect("lose it");
    let third = Envelope::new(a.clone(), serde_json::json!(3));
    store.enqueue(&third, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let got = store
        .lease(&a, opts)
        .await
        .expect("a lease, not an error")
        .expect("the message after the lost one");
    assert_eq!(got.envelope.id, third.id);
    store.ack(&got.receipt).await.unwrap();
    assert!(store.lease(&a, opts).await.unwrap().is_none());
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 2, "the lost message is buried too: {dead:?}");
}
