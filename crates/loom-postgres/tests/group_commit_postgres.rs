//! Group commit on a real PostgreSQL: concurrent appends and turns share transactions, each
//! request is still decided alone, a request the server refuses does not fail the others of its
//! batch, and batches of turns that lock each other's mailboxes never deadlock.

#[path = "common/locks.rs"]
mod locks;

use std::time::Duration;

use loom_core::store::backend::Turn;
use loom_core::{Envelope, JournalStore, Mailbox, Store, StoreError};
use loom_postgres::{PostgresOptions, PostgresStore};
use loom_testkit::group_commit::{entry, first_appends_at_once, id, turns_sending_to_each_other};
use loom_testkit::servers::PostgresServer;
use serde_json::json;

use locks::waits_on_a_lock;

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
    assert!(
        waits_on_a_lock(&admin, "%append%").await,
        "the blocking append never waited on the lock"
    );
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
        ..LeaseOptions::default()
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

/// Runs `append_many` on `grp` for `(actor, expected, frames)` requests: (index, ok, value).
async fn append_many(
    admin: &sqlx::PgPool,
    reqs: &[(&str, i64, &[&[u8]])],
) -> Vec<(i64, bool, i64)> {
    let actors: Vec<String> = reqs.iter().map(|(a, ..)| format!("group/{a}")).collect();
    let expected: Vec<i64> = reqs.iter().map(|(_, e, _)| *e).collect();
    let counts: Vec<i32> = reqs.iter().map(|(.., f)| f.len() as i32).collect();
    let frames: Vec<Vec<u8>> = reqs
        .iter()
        .flat_map(|(.., f)| f.iter().map(|f| f.to_vec()))
        .collect();
    sqlx::query_as("SELECT idx, ok, val FROM grp.append_many($1, $2, $3, $4) ORDER BY idx")
        .bind(actors)
        .bind(expected)
        .bind(counts)
        .bind(frames)
        .fetch_all(admin)
        .await
        .expect("append_many")
}

/// The journal rows and meta rows of `group/` journals, frames as text where they are.
async fn journals(
    admin: &sqlx::PgPool,
) -> (Vec<(String, i64, Vec<u8>)>, Vec<(String, i64, i64, i64)>) {
    let rows = sqlx::query_as(
        "SELECT actor, seq, frame FROM grp.journal WHERE actor LIKE 'group/%' ORDER BY actor, seq",
    )
    .fetch_all(admin)
    .await
    .expect("journal");
    let meta = sqlx::query_as(
        "SELECT actor, highest, trimmed, deleted FROM grp.journal_meta WHERE actor LIKE 'group/%' \
         ORDER BY actor",
    )
    .fetch_all(admin)
    .await
    .expect("journal_meta");
    (rows, meta)
}

/// `append_many` (schema version 13) decides each append of a batch as `append` alone would.
/// One batch with a first append, an append at the next seq, one at a stale seq, one to a
/// journal that does not exist past its first seq, empty appends at the next seq and at a stale
/// one; journals named twice in a batch; first appends racing another's, committed or rolled
/// back; and appends whose journal another transaction is moving to the seq before theirs,
/// which wait for it (taken once it commits, refused once it rolls back), where the update that
/// decides most appends does not wait. Every journal and meta row is checked afterwards: a
/// refused append writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_appends_is_decided_append_by_append() {
    let server = PostgresServer::start();
    let store = connect(&server.url(), 4).await;
    let admin = sqlx::PgPool::connect(&server.url()).await.expect("admin");
    sqlx::query("SELECT grp.append('group/old', 1, ARRAY['o1', 'o2']::bytea[])")
        .execute(&admin)
        .await
        .expect("old");
    sqlx::query("SELECT grp.append('group/older', 1, ARRAY['p1']::bytea[])")
        .execute(&admin)
        .await
        .expect("older");
    let decided = append_many(
        &admin,
        &[
            ("new", 1, &[b"n1", b"n2"]),
            ("old", 3, &[b"o3"]),
            ("older", 1, &[b"stale"]),
            ("none", 3, &[b"none"]),
            ("empty", 1, &[]),
            ("quiet", 5, &[]),
        ],
    )
    .await;
    assert_eq!(
        decided,
        vec![
            (1, true, 2),
            (2, true, 3),
            (3, false, 2),
            (4, false, 1),
            (5, true, 0),
            (6, false, 1)
        ]
    );
    let empty_at_next = append_many(&admin, &[("older", 2, &[]), ("old", 2, &[])]).await;
    assert_eq!(empty_at_next, vec![(1, true, 1), (2, false, 4)]);
    // Named twice (and a third time, stale), beside another journal: one after another.
    let twice = append_many(
        &admin,
        &[
            ("twice", 1, &[b"t1"]),
            ("other", 1, &[b"x1"]),
            ("twice", 2, &[b"t2"]),
            ("twice", 2, &[b"t3"]),
        ],
    )
    .await;
    assert_eq!(
        twice,
        vec![(1, true, 1), (2, true, 1), (3, true, 2), (4, false, 3)]
    );

    // A first append racing another transaction's first append of the same journal waits for
    // it: refused once it commits, taken once it rolls back.
    for commit in [true, false] {
        let race = if commit {
            "race_committed"
        } else {
            "race_rolled_back"
        };
        let mut tx = admin.begin().await.expect("begin");
        sqlx::query("SELECT grp.append($1, 1, ARRAY['theirs']::bytea[])")
            .bind(format!("group/{race}"))
            .execute(&mut *tx)
            .await
            .expect("their first append");
        let batch = {
            let admin = admin.clone();
            let calm = format!("calm_{race}");
            tokio::spawn(async move {
                append_many(
                    &admin,
                    &[(race, 1, &[b"ours"]), (calm.as_str(), 1, &[b"c"])],
                )
                .await
            })
        };
        assert!(
            waits_on_a_lock(&admin, "%append_many%").await,
            "the batch never waited for the racing first append"
        );
        if commit {
            tx.commit().await.expect("commit theirs");
        } else {
            tx.rollback().await.expect("roll theirs back");
        }
        let decided = batch.await.expect("batch");
        let first = if commit { (1, false, 2) } else { (1, true, 1) };
        assert_eq!(decided, vec![first, (2, true, 1)], "{race}");
    }
    for commit in [true, false] {
        let moving = if commit {
            "moving_committed"
        } else {
            "moving_rolled_back"
        };
        sqlx::query("SELECT grp.append($1, 1, ARRAY['m1']::bytea[])")
            .bind(format!("group/{moving}"))
            .execute(&admin)
            .await
            .expect("the journal's first entry");
        let mut tx = admin.begin().await.expect("begin");
        sqlx::query("SELECT grp.append($1, 2, ARRAY['theirs']::bytea[])")
            .bind(format!("group/{moving}"))
            .execute(&mut *tx)
            .await
            .expect("their append at 2");
        let batch = {
            let admin = admin.clone();
            tokio::spawn(async move {
                append_many(&admin, &[(moving, 3, &[b"ours"]), ("zcalm", 1, &[b"z"])]).await
            })
        };
        assert!(
            waits_on_a_lock(&admin, "%append_many%").await,
            "the batch never waited for the append moving its journal"
        );
        if commit {
            tx.commit().await.expect("commit theirs");
        } else {
            tx.rollback().await.expect("roll theirs back");
        }
        let decided = batch.await.expect("batch");
        let first = if commit { (1, true, 3) } else { (1, false, 2) };
        let calm = if commit { (2, true, 1) } else { (2, false, 2) };
        assert_eq!(decided, vec![first, calm], "{moving}");
    }

    let (rows, meta) = journals(&admin).await;
    let row = |a: &str, s: i64, f: &str| (format!("group/{a}"), s, f.as_bytes().to_vec());
    assert_eq!(
        rows,
        vec![
            row("calm_race_committed", 1, "c"),
            row("calm_race_rolled_back", 1, "c"),
            row("moving_committed", 1, "m1"),
            row("moving_committed", 2, "theirs"),
            row("moving_committed", 3, "ours"),
            row("moving_rolled_back", 1, "m1"),
            row("new", 1, "n1"),
            row("new", 2, "n2"),
            row("old", 1, "o1"),
            row("old", 2, "o2"),
            row("old", 3, "o3"),
            row("older", 1, "p1"),
            row("other", 1, "x1"),
            row("race_committed", 1, "theirs"),
            row("race_rolled_back", 1, "ours"),
            row("twice", 1, "t1"),
            row("twice", 2, "t2"),
            row("zcalm", 1, "z"),
        ]
    );
    let meta_row = |a: &str, h: i64| (format!("group/{a}"), h, 0, 0);
    assert_eq!(
        meta,
        vec![
            meta_row("calm_race_committed", 1),
            meta_row("calm_race_rolled_back", 1),
            meta_row("moving_committed", 3),
            meta_row("moving_rolled_back", 1),
            meta_row("new", 2),
            meta_row("old", 3),
            meta_row("older", 1),
            meta_row("other", 1),
            meta_row("race_committed", 1),
            meta_row("race_rolled_back", 1),
            meta_row("twice", 2),
            meta_row("zcalm", 1),
        ]
    );
    assert_eq!(store.highest_seq(&id("old")).await.unwrap(), 3);
}

/// Batches of appends racing each other on the same journals, in orders of their own, first
/// appends included: every `append_many` call answers (no deadlock, no key violation), each
/// journal's appends are decided once (the frames of the appends answered ok are exactly the
/// journal, gapless), and every answer agrees with the journal: an ok append's value is its
/// journal's highest after it, a refused one's is a seq the journal reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_batches_of_appends_decide_each_append_once_and_never_deadlock() {
    const TASKS: u64 = 6;
    const ROUNDS: u64 = 40;
    const ACTORS: u64 = 24;
    let server = PostgresServer::start();
    let _store = connect(&server.url(), 4).await;
    let admin = sqlx::PgPool::connect(&server.url()).await.expect("admin");
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let admin = admin.clone();
        tasks.push(tokio::spawn(async move {
            // Each task's guess of each journal's next seq, from its answers.
            let mut next = std::collections::HashMap::<String, i64>::new();
            let mut won = Vec::new();
            let mut state = task.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut rand = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            for round in 0..ROUNDS {
                // Some journals every task shares from the start, and each round new ones every
                // task starts at once; each batch names them in an order of its own.
                let mut names: Vec<String> = (0..ACTORS)
                    .filter(|_| rand() % 3 != 0)
                    .map(|a| format!("shared{a}"))
                    .chain((0..4).map(|a| format!("round{round}_{a}")))
                    .collect();
                for i in (1..names.len()).rev() {
                    names.swap(i, (rand() % (i as u64 + 1)) as usize);
                }
                let frames: Vec<String> = names
                    .iter()
                    .map(|a| format!("{a}@{task}.{round}"))
                    .collect();
                let actors: Vec<String> = names.iter().map(|a| format!("group/{a}")).collect();
                let expected: Vec<i64> = names.iter().map(|a| *next.get(a).unwrap_or(&1)).collect();
                let counts = vec![1i32; names.len()];
                let all: Vec<Vec<u8>> = frames.iter().map(|f| f.as_bytes().to_vec()).collect();
                let answers: Vec<(i64, bool, i64)> = sqlx::query_as(
                    "SELECT idx, ok, val FROM grp.append_many($1, $2, $3, $4) ORDER BY idx",
                )
                .bind(actors)
                .bind(expected.clone())
                .bind(counts)
                .bind(all)
                .fetch_all(&admin)
                .await
                .unwrap_or_else(|e| panic!("task {task}, round {round}: {e}"));
                assert_eq!(answers.len(), names.len());
                for ((i, ok, val), name) in answers.into_iter().zip(&names) {
                    let e = expected[(i - 1) as usize];
                    if ok {
                        assert_eq!(val, e, "an ok append of one frame at {e} answers {val}");
                        won.push((format!("group/{name}"), e, frames[(i - 1) as usize].clone()));
                        next.insert(name.clone(), e + 1);
                    } else {
                        assert!(val > e, "refused at {e}, but the journal's next is {val}");
                        next.insert(name.clone(), val);
                    }
                }
            }
            won
        }));
    }
    let mut won = Vec::new();
    for task in tasks {
        won.extend(task.await.expect("task"));
    }
    won.sort();
    let (rows, meta) = journals(&admin).await;
    let mut rows: Vec<(String, i64, String)> = rows
        .into_iter()
        .map(|(a, s, f)| (a, s, String::from_utf8(f).expect("utf-8")))
        .collect();
    rows.sort();
    assert_eq!(
        rows, won,
        "the journals are not exactly the appends answered ok"
    );
    for (actor, highest, ..) in &meta {
        let seqs: Vec<i64> = rows
            .iter()
            .filter(|(a, ..)| a == actor)
            .map(|(_, s, _)| *s)
            .collect();
        assert_eq!(seqs, (1..=*highest).collect::<Vec<_>>(), "{actor}");
    }
}
