//! Group commit on a real PostgreSQL: concurrent appends and turns share transactions, each
//! request is still decided alone, a request the server refuses does not fail the others of its
//! batch, and batches of turns that lock each other's mailboxes never deadlock.

use std::time::Duration;

use loom_core::store::backend::Turn;
use loom_core::{Envelope, JournalStore, Mailbox, Store, StoreError};
use loom_postgres::{PostgresOptions, PostgresStore};
use loom_testkit::group_commit::{entry, first_appends_at_once, id, turns_sending_to_each_other};
use loom_testkit::servers::PostgresServer;
use serde_json::json;

async fn connect(url: &str, max_connections: u32) -> PostgresStore {
    let options = PostgresOptions {
        schema: "grp".into(),
        max_connections,
        ..PostgresOptions::default()
    };
    PostgresStore::connect_with(url, options)
        .await
        .expect("connect")
}

/// A fresh transaction id: the difference of two, less one, counts the write transactions
/// between them (every transaction that writes takes one id; reads take none).
async fn xid(admin: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(admin)
        .await
        .expect("pg_current_xact_id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_transactions_and_each_is_decided_alone() {
    let server = PostgresServer::start();
    let store = connect(&server.url(), 16).await;
    let admin = sqlx::PgPool::connect(&server.url()).await.expect("admin");
    let before = xid(&admin).await;
    let appends = first_appends_at_once(&store).await;
    let used = xid(&admin).await - before - 1;
    eprintln!("{appends} appends in {used} write transactions");
    assert!(
        used < appends as i64 / 4,
        "{appends} appends took {used} transactions: appends are not committed together"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_server_refuses_does_not_fail_the_others_in_its_batch() {
    let server = PostgresServer::start();
    // Four connections: one batch of appends in flight at a time, so the queue below becomes
    // one batch.
    let store = connect(&server.url(), 4).await;
    let admin = sqlx::PgPool::connect(&server.url()).await.expect("admin");
    // A fault in the server: inserting into the journal for one actor raises an error.
    sqlx::raw_sql(
        "CREATE FUNCTION grp.poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'poisoned actor'; END $$; \
         CREATE TRIGGER poison BEFORE INSERT ON grp.journal FOR EACH ROW \
         WHEN (NEW.actor = 'group/poison') EXECUTE FUNCTION grp.poison();",
    )
    .execute(&admin)
    .await
    .expect("trigger");
    // Hold the only batch worker on a locked row while the others queue behind it.
    let blocker = id("blocker");
    store.append(&blocker, 1, &[entry(1)]).await.expect("first");
    let mut tx = admin.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM grp.journal_meta WHERE actor = 'group/blocker' FOR UPDATE")
        .execute(&mut *tx)
        .await
        .expect("lock");
    let held = {
        let store = store.clone();
        tokio::spawn(async move { store.append(&id("blocker"), 2, &[entry(2)]).await })
    };
    let mut waiting = false;
    for _ in 0..500 {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%append%'",
        )
        .fetch_one(&admin)
        .await
        .expect("pg_stat_activity");
        if n > 0 {
            waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(waiting, "the blocking append never waited on the lock");
    let mut tasks = Vec::new();
    for n in 0..50 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.append(&id(&format!("ok{n}")), 1, &[entry(1)]).await
        }));
    }
    let poisoned = {
        let store = store.clone();
        tokio::spawn(async move { store.append(&id("poison"), 1, &[entry(1)]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.rollback().await.expect("release");
    assert_eq!(held.await.unwrap().expect("blocked append"), 2);
    for t in tasks {
        assert_eq!(
            t.await.unwrap().expect("an innocent append of the batch"),
            1
        );
    }
    match poisoned.await.unwrap() {
        Err(StoreError::Storage { .. }) => {}
        other => panic!("the poisoned append must fail with a storage error, got {other:?}"),
    }
    assert_eq!(store.highest_seq(&id("poison")).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_turns_sending_to_each_other_never_deadlock() {
    let server = PostgresServer::start();
    // Two nodes, so that batches from different pools interleave their locks.
    let nodes = [
        connect(&server.url(), 16).await,
        connect(&server.url(), 16).await,
    ];
    turns_sending_to_each_other(&nodes).await;
}

/// `enqueue_once` takes a key's row and then its mailbox's; a turn takes the mailboxes it
/// touches and then the key it records. In opposite orders the two deadlock (PostgreSQL then
/// aborts one). A trigger holds the key's row for a moment after `enqueue_once` takes it, and a
/// turn recording that key starts meanwhile: both must succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_once_and_a_turn_recording_its_key_never_deadlock() {
    use loom_core::store::backend::{Record, Settle};
    use loom_core::{IdempotencyKey, IdempotencyStore, LeaseOptions};
    let server = PostgresServer::start();
    let store = connect(&server.url(), 8).await;
    let admin = sqlx::PgPool::connect(&server.url()).await.expect("admin");
    sqlx::raw_sql(
        "CREATE FUNCTION grp.slow() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_sleep(0.4); RETURN NEW; END $$; \
         CREATE TRIGGER slow AFTER INSERT ON grp.idempotency FOR EACH ROW \
         WHEN (NEW.key = 'slow') EXECUTE FUNCTION grp.slow();",
    )
    .execute(&admin)
    .await
    .expect("trigger");
    let key = IdempotencyKey::new("slow").unwrap();
    let ttl = Duration::from_secs(60);
    let opts = LeaseOptions {
        visibility: Duration::from_secs(60),
        max_deliveries: 5,
    };
    for round in 0..3 {
        let a = id(&format!("lock-{round}"));
        store
            .enqueue_once(&Envelope::new(a.clone(), json!("first")), None, &key, ttl)
            .await
            .expect("first send");
        let d = store.lease(&a, opts).await.unwrap().expect("delivery");
        // Free the key, so that the next enqueue_once takes it afresh (an insert).
        assert!(store.abandon(&a, &key).await.unwrap());
        let again = {
            let (store, a, key) = (store.clone(), a.clone(), key.clone());
            tokio::spawn(async move {
                store
                    .enqueue_once(&Envelope::new(a, json!("again")), None, &key, ttl)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        let result = json!("done");
        let turn = store
            .commit_turn(Turn {
                settle: Some(Settle::Ack(&d.receipt)),
                record: Some(Record {
                    actor: &a,
                    key: &key,
                    result: &result,
                    ttl,
                }),
                ..Turn::append(&a, 1, &[entry(1)])
            })
            .await;
        let again = again.await.expect("task");
        assert!(
            turn.is_ok() && again.is_ok(),
            "round {round}: turn {turn:?}, enqueue_once {again:?}"
        );
    }
}

/// `append_many` decides a batch set-based (schema version 7): each append as `append` alone
/// would. One batch with a first append, an append at the next seq, one at a stale seq, one to a
/// journal that does not exist past its first seq, and an empty one; then a batch naming one
/// journal twice, decided one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_appends_is_decided_append_by_append() {
    let server = PostgresServer::start();
    let store = connect(&server.url(), 4).await;
    let admin = sqlx::PgPool::connect(&server.url()).await.expect("admin");
    store
        .append(&id("old"), 1, &[entry(1), entry(2)])
        .await
        .expect("old");
    store
        .append(&id("older"), 1, &[entry(1)])
        .await
        .expect("older");
    let batch = |actors: &[&str], expected: &[i64], counts: &[i32], frames: &[&[u8]]| {
        let query = sqlx::query_as::<_, (i64, bool, i64)>(
            "SELECT idx, ok, val FROM grp.append_many($1, $2, $3, $4) ORDER BY idx",
        )
        .bind(
            actors
                .iter()
                .map(|a| format!("group/{a}"))
                .collect::<Vec<_>>(),
        )
        .bind(expected.to_vec())
        .bind(counts.to_vec())
        .bind(frames.iter().map(|f| f.to_vec()).collect::<Vec<_>>());
        let admin = admin.clone();
        async move { query.fetch_all(&admin).await.expect("append_many") }
    };
    let decided = batch(
        &["new", "old", "older", "none", "empty"],
        &[1, 3, 1, 3, 1],
        &[2, 1, 1, 1, 0],
        &[b"n1", b"n2", b"o3", b"x", b"y"],
    )
    .await;
    assert_eq!(
        decided,
        vec![
            (1, true, 2),
            (2, true, 3),
            (3, false, 2),
            (4, false, 1),
            (5, true, 0)
        ]
    );
    let rows: Vec<(String, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT actor, seq, frame FROM grp.journal WHERE actor IN ('group/new', 'group/old') \
         AND (actor = 'group/new' OR seq = 3) ORDER BY actor, seq",
    )
    .fetch_all(&admin)
    .await
    .expect("journal");
    let frame = |a: &str, s: i64, f: &[u8]| (format!("group/{a}"), s, f.to_vec());
    assert_eq!(
        rows,
        vec![
            frame("new", 1, b"n1"),
            frame("new", 2, b"n2"),
            frame("old", 3, b"o3")
        ]
    );
    for (actor, highest) in [
        ("new", 2),
        ("old", 3),
        ("older", 1),
        ("none", 0),
        ("empty", 0),
    ] {
        assert_eq!(
            store.highest_seq(&id(actor)).await.unwrap(),
            highest,
            "{actor}"
        );
    }
    // The refused appends made no meta rows.
    let made: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM grp.journal_meta WHERE actor IN ('group/none', 'group/empty')",
    )
    .fetch_one(&admin)
    .await
    .expect("meta");
    assert_eq!(made, 0);
    let twice = batch(
        &["twice", "twice", "twice"],
        &[1, 2, 2],
        &[1, 1, 1],
        &[b"1", b"2", b"3"],
    )
    .await;
    assert_eq!(twice, vec![(1, true, 1), (2, true, 2), (3, false, 3)]);
}
