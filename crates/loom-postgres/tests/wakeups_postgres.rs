//! `LISTEN`/`NOTIFY`: a message enqueued by another process wakes an idle runtime at once, not
//! at its next poll; and the schema's migrations run forward only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use loom_core::runtime::Runtime;
use loom_core::store::backend::{Outgoing, Record, Turn};
use loom_core::{
    ActorId, Entry, EntryKind, Envelope, IdempotencyStore, JournalStore, Mailbox, Store, StoreError,
};
use loom_postgres::{PostgresOptions, PostgresStore, SCHEMA_VERSION};
use loom_testkit::runtime::Counter;
use loom_testkit::servers::PostgresServer;
use serde_json::json;

async fn connect(url: &str, notifications: bool) -> PostgresStore {
    PostgresStore::connect_with(
        url,
        PostgresOptions {
            schema: "wake".into(),
            max_connections: 4,
            notifications,
            ..PostgresOptions::default()
        },
    )
    .await
    .expect("connect")
}

/// Starts a runtime that polls only every 60 s, lets its first poll pass, has another process
/// (another store, another pool) send to actor `key`, and returns how long the runtime took
/// to journal the message, if it did within `patience`.
async fn picked_up(
    url: &str,
    notifications: bool,
    key: &str,
    patience: Duration,
) -> Option<Duration> {
    let node = connect(url, notifications).await;
    assert_eq!(node.wakeups().is_some(), notifications);
    let rt = Runtime::builder()
        .store(Arc::new(node))
        .register::<Counter>()
        .configure(|c| c.poll_interval = Duration::from_secs(60))
        .start()
        .await
        .expect("runtime");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = connect(url, true).await;
    let id = ActorId::new("counter", key).expect("id");
    let sent = Instant::now();
    other
        .enqueue(&Envelope::new(id.clone(), json!(5)), None)
        .await
        .expect("enqueue from another process");
    let mut took = None;
    while sent.elapsed() < patience {
        if other.highest_seq(&id).await.expect("highest") > 0 {
            took = Some(sent.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.shutdown().await;
    took
}

/// Waits up to 20 s for a wake-up; `failure` says what did not wake.
async fn woken_within(woken: &mut tokio::sync::watch::Receiver<u64>, failure: &str) {
    tokio::time::timeout(Duration::from_secs(20), woken.changed())
        .await
        .expect(failure)
        .expect("listener alive");
}

/// Waits up to 20 s for a reply signal; `failure` says which did not come.
async fn heard_within(
    done: &mut tokio::sync::broadcast::Receiver<loom_core::store::Completion>,
    failure: &str,
) -> loom_core::store::Completion {
    tokio::time::timeout(Duration::from_secs(20), done.recv())
        .await
        .expect(failure)
        .expect("listener alive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_from_another_process_wakes_an_idle_runtime_at_once() {
    let server = PostgresServer::start();
    let url = server.url();
    // Control: without notifications the message waits for the 60 s poll.
    assert_eq!(
        picked_up(&url, false, "polled", Duration::from_secs(3)).await,
        None,
        "picked up without a notification: this test cannot tell the two apart"
    );
    let took = picked_up(&url, true, "notified", Duration::from_secs(20))
        .await
        .expect("the notification did not wake the runtime");
    eprintln!("a notified runtime journaled the message {took:?} after it was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_migrations_are_run_by_a_node_not_a_look_and_a_newer_schema_is_refused() {
    let server = PostgresServer::start();
    let url = server.url();
    let admin = sqlx::PgPool::connect(&url).await.expect("admin pool");
    drop(connect(&url, true).await);
    let versions = |admin: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i32>("SELECT version FROM wake.schema_version ORDER BY version")
            .fetch_all(&admin)
            .await
            .expect("versions")
    };
    let all: Vec<i32> = (1..=SCHEMA_VERSION).collect();
    assert_eq!(versions(admin.clone()).await, all);
    // A schema made by the previous version: the next connect brings it up to date.
    sqlx::query("DELETE FROM wake.schema_version WHERE version = $1")
        .bind(SCHEMA_VERSION)
        .execute(&admin)
        .await
        .expect("pretend an older schema");
    // A store opened only to look at it (`loom`'s commands) refuses it and migrates nothing.
    let options = || PostgresOptions {
        schema: "wake".into(),
        ..PostgresOptions::default()
    };
    let looked = PostgresStore::connect_existing(&url, options()).await;
    assert!(
        matches!(looked, Err(StoreError::InvalidRequest(ref m)) if m.contains("older than this build")),
        "{looked:?}"
    );
    assert_eq!(versions(admin.clone()).await, all[..all.len() - 1]);
    drop(connect(&url, true).await);
    assert_eq!(versions(admin.clone()).await, all);
    // Up to date, it opens.
    drop(
        PostgresStore::connect_existing(&url, options())
            .await
            .expect("a store of this build's version opens"),
    );
    // A schema from a newer build is refused, not written to.
    sqlx::query("INSERT INTO wake.schema_version VALUES ($1)")
        .bind(SCHEMA_VERSION + 1)
        .execute(&admin)
        .await
        .expect("pretend a newer schema");
    let newer = PostgresStore::connect_with(
        &url,
        PostgresOptions {
            schema: "wake".into(),
            ..PostgresOptions::default()
        },
    )
    .await;
    assert!(
        matches!(newer, Err(StoreError::InvalidRequest(ref m)) if m.contains("version")),
        "{newer:?}"
    );
    let looked = PostgresStore::connect_existing(&url, options()).await;
    assert!(
        matches!(looked, Err(StoreError::InvalidRequest(ref m)) if m.contains("knows versions up to")),
        "{looked:?}"
    );
    assert_eq!(
        versions(admin.clone()).await,
        (1..=SCHEMA_VERSION + 1).collect::<Vec<_>>()
    );
}

/// A store is not woken by its own sends (its runtime woke itself), only by other stores'; and
/// the listener has a connection of its own, so even a pool of one still serves the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_is_woken_by_others_sends_not_its_own() {
    let server = PostgresServer::start();
    let url = server.url();
    let a = PostgresStore::connect_with(
        &url,
        PostgresOptions {
            schema: "wake".into(),
            max_connections: 1,
            ..PostgresOptions::default()
        },
    )
    .await
    .expect("connect with a pool of one");
    let b = connect(&url, true).await;
    let mut woken = a.wakeups().expect("notifications are on");
    let id = ActorId::new("counter", "w").expect("id");
    a.enqueue(&Envelope::new(id.clone(), json!(1)), None)
        .await
        .expect("own send");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !woken.has_changed().expect("listener alive"),
        "woken by its own send"
    );
    b.enqueue(&Envelope::new(id.clone(), json!(2)), None)
        .await
        .expect("another store's send");
    woken_within(&mut woken, "not woken by another store's send").await;
    assert_eq!(a.pending(&id).await.expect("pending"), 2);
}

/// Schema version 8 gives each mailbox the partition `partition_of` gives its actor (the SQL
/// function is checked against the Rust one, multi-byte ids included), fills it in for the
/// mailboxes of an older schema, and the ready scan of a partition finds exactly its actors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailboxes_are_indexed_by_the_partition_rust_computes() {
    use loom_core::partition::{SHARED_STORE_PARTITIONS, partition_of};
    let server = PostgresServer::start();
    let url = server.url();
    let admin = sqlx::PgPool::connect(&url).await.expect("admin pool");
    let store = connect(&url, false).await;
    let actors: Vec<ActorId> = (0..300)
        .map(|n| {
            let key = match n % 3 {
                0 => format!("k{n}"),
                1 => format!("ключ-{n}-é"),
                _ => format!("{n}/🦀/{n}"),
            };
            ActorId::new("counter", key).unwrap()
        })
        .collect();
    for a in &actors {
        store
            .enqueue(&Envelope::new(a.clone(), json!({"add": 1})), None)
            .await
            .unwrap();
    }
    let check = |admin: sqlx::PgPool, actors: Vec<ActorId>| async move {
        let rows: Vec<(String, i32)> = sqlx::query_as("SELECT actor, part FROM wake.mailbox")
            .fetch_all(&admin)
            .await
            .expect("mailboxes");
        assert_eq!(rows.len(), actors.len());
        for (actor, part) in rows {
            let id: ActorId = actor.parse().unwrap();
            assert_eq!(
                part as u32,
                partition_of(&id, SHARED_STORE_PARTITIONS),
                "{actor}"
            );
        }
    };
    check(admin.clone(), actors.clone()).await;
    // Mailboxes of a schema before version 8: their partition is filled in when it is run.
    sqlx::raw_sql(
        "ALTER TABLE wake.mailbox ALTER COLUMN part DROP NOT NULL; \
         UPDATE wake.mailbox SET part = NULL; \
         DELETE FROM wake.schema_version WHERE version >= 8",
    )
    .execute(&admin)
    .await
    .expect("pretend a version 7 schema");
    drop(connect(&url, false).await);
    check(admin.clone(), actors.clone()).await;
    for p in [0, 13, SHARED_STORE_PARTITIONS - 1] {
        let mut found = store
            .ready_actors_in(&[("counter", &[p])], SHARED_STORE_PARTITIONS, 1000)
            .await
            .unwrap();
        found.sort();
        let mut expected: Vec<ActorId> = actors
            .iter()
            .filter(|a| partition_of(a, SHARED_STORE_PARTITIONS) == p)
            .cloned()
            .collect();
        expected.sort();
        assert_eq!(found, expected, "partition {p}");
    }
}

/// Since schema version 11 a store sends its signals itself, after the transaction that
/// warrants them committed (`signals.rs`): another store hears its wake-ups and its recorded
/// results. A session that does not say it sends its own (a node of an older build, psql) still
/// gets them sent by the functions, in its transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_sent_after_commit_and_for_sessions_of_older_builds_by_the_functions() {
    let server = PostgresServer::start();
    let url = server.url();
    let a = connect(&url, true).await;
    let b = connect(&url, true).await;
    let mut woken = a.wakeups().expect("notifications are on");
    let mut done = a.completions().expect("notifications are on");
    let id = ActorId::new("counter", "signals").expect("id");
    let key = loom_core::IdempotencyKey::new("k-1").expect("key");
    b.complete(&id, &key, &json!("result"), Duration::from_secs(60))
        .await
        .expect("complete");
    let heard = heard_within(&mut done, "no reply signal from another store").await;
    assert_eq!((heard.actor, heard.key), (id.clone(), key));
    b.enqueue(&Envelope::new(id.clone(), json!(1)), None)
        .await
        .expect("send");
    woken_within(&mut woken, "not woken by another store's send").await;
    // A turn's: its send due now wakes, its recorded result is announced.
    woken.mark_unchanged();
    let (to, turn_key) = (
        ActorId::new("counter", "signals-to").expect("id"),
        loom_core::IdempotencyKey::new("k-turn").expect("key"),
    );
    let entries = [Entry::new(1, EntryKind::Completed { reply: json!(1) })];
    let send = [Outgoing {
        envelope: Envelope::new(to.clone(), json!("hi")),
        deliver_at: None,
    }];
    b.commit_turn(Turn {
        send: &send,
        record: Some(Record {
            actor: &id,
            key: &turn_key,
            result: &json!("turned"),
            ttl: Duration::from_secs(60),
        }),
        ..Turn::append(&id, 1, &entries)
    })
    .await
    .expect("turn");
    let heard = heard_within(&mut done, "no reply signal for a turn's record").await;
    assert_eq!((heard.actor, heard.key), (id.clone(), turn_key));
    woken_within(&mut woken, "not woken by another store's turn").await;
    // An `enqueue_once`'s.
    woken.mark_unchanged();
    b.enqueue_once(
        &Envelope::new(to.clone(), json!("once")),
        None,
        &loom_core::IdempotencyKey::new("k-once").expect("key"),
        Duration::from_secs(60),
    )
    .await
    .expect("enqueue_once");
    woken_within(&mut woken, "not woken by another store's enqueue_once").await;

    // An older build's session: no `loom.signals`, so `enqueue` itself notifies.
    let old = sqlx::PgPool::connect(&url).await.expect("plain session");
    woken.mark_unchanged();
    sqlx::query("SELECT wake.enqueue('counter/older', 'm-old', '\\x00', 0)")
        .execute(&old)
        .await
        .expect("enqueue from an older build's session");
    woken_within(&mut woken, "an older build's enqueue did not wake").await;
    // A session that says it sends its own: the function sends nothing.
    let mut quiet = old.acquire().await.expect("connection");
    sqlx::query("SET loom.signals = 'client'")
        .execute(&mut *quiet)
        .await
        .expect("set");
    woken.mark_unchanged();
    sqlx::query("SELECT wake.enqueue('counter/older', 'm-new', '\\x00', 0)")
        .execute(&mut *quiet)
        .await
        .expect("enqueue");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !woken.has_changed().expect("listener alive"),
        "a session that sends its own signals was signalled for by the function"
    );
}

/// A schema built by version 11's own migrations (not a version 12 schema with its partition
/// count removed), holding a journal and a waiting message that version 11's functions wrote:
/// a connect asking for 32 partitions is refused and changes nothing; the next connect takes
/// it to this build's version as a store of one partition, with both intact, and this build's
/// functions (the batch append among them) run on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_11_schema_holding_actors_migrates_to_one_partition() {
    use futures::TryStreamExt;
    use loom_core::SeqRange;
    use loom_core::store::LeaseOptions;
    use loom_core::store::backend::{prepare_append, prepare_message};
    let server = PostgresServer::start();
    let url = server.url();
    let admin = sqlx::PgPool::connect(&url).await.expect("admin pool");
    sqlx::raw_sql(
        "CREATE SCHEMA old; CREATE TABLE old.schema_version (version integer PRIMARY KEY)",
    )
    .execute(&admin)
    .await
    .expect("schema");
    for (v, migration) in loom_postgres::MIGRATIONS[..11].iter().enumerate() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(migration.replace("{s}", "old")))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("migration to version {}: {e}", v + 1));
        sqlx::query("INSERT INTO old.schema_version VALUES ($1)")
            .bind(v as i32 + 1)
            .execute(&admin)
            .await
            .expect("version");
    }
    let id = ActorId::new("counter", "old").expect("id");
    let entries: Vec<Entry> = (1..=3)
        .map(|seq| Entry::new(seq, EntryKind::Completed { reply: json!(seq) }))
        .collect();
    let (ok, highest): (bool, i64) = sqlx::query_as("SELECT ok, val FROM old.append($1, 1, $2)")
        .bind(id.as_str())
        .bind(prepare_append(&id, 1, &entries).expect("frames"))
        .fetch_one(&admin)
        .await
        .expect("version 11's append");
    assert_eq!((ok, highest), (true, 3));
    let waiting = Envelope::new(id.clone(), json!("sent before the upgrade"));
    sqlx::query("SELECT old.enqueue($1, $2, $3, 0)")
        .bind(id.as_str())
        .bind(waiting.id.to_string())
        .bind(prepare_message(&waiting).expect("frame"))
        .execute(&admin)
        .await
        .expect("version 11's enqueue");

    let options = |partitions| PostgresOptions {
        schema: "old".into(),
        partitions,
        ..PostgresOptions::default()
    };
    let refused = PostgresStore::connect_with(&url, options(Some(32))).await;
    assert!(
        matches!(refused, Err(StoreError::InvalidRequest(ref m)) if m.contains("already holds actors")),
        "{refused:?}"
    );
    let versions = || async {
        sqlx::query_scalar::<_, i32>("SELECT version FROM old.schema_version ORDER BY version")
            .fetch_all(&admin)
            .await
            .expect("versions")
    };
    assert_eq!(versions().await, (1..=11).collect::<Vec<_>>());
    let store = PostgresStore::connect_with(&url, options(None))
        .await
        .expect("migrate");
    assert_eq!(store.partitions(), 1);
    assert_eq!(versions().await, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    let read: Vec<Entry> = store
        .read(&id, SeqRange::all())
        .try_collect()
        .await
        .expect("read");
    assert_eq!(read, entries);
    let delivery = store
        .lease(&id, LeaseOptions::default())
        .await
        .expect("lease")
        .expect("the message sent before the upgrade");
    assert_eq!(delivery.envelope.id, waiting.id);
    assert_eq!(delivery.envelope.payload, waiting.payload);
    // And it takes new appends where version 11 left off, alone and in a batch.
    let more = |seq| Entry::new(seq, EntryKind::Completed { reply: json!(seq) });
    store
        .append(&id, 4, &[more(4)])
        .await
        .expect("append after the upgrade");
    let other = ActorId::new("counter", "new").expect("id");
    let decided: Vec<(i64, bool, i64)> =
        sqlx::query_as("SELECT idx, ok, val FROM old.append_many($1, $2, $3, $4) ORDER BY idx")
            .bind(vec![id.as_str(), other.as_str()])
            .bind(vec![5i64, 1])
            .bind(vec![1i32, 1])
            .bind(
                [
                    prepare_append(&id, 5, &[more(5)]).expect("frames"),
                    prepare_append(&other, 1, &[more(1)]).expect("frames"),
                ]
                .concat(),
            )
            .fetch_all(&admin)
            .await
            .expect("this build's append_many");
    assert_eq!(decided, vec![(1, true, 5), (2, true, 1)]);
    assert_eq!(store.highest_seq(&id).await.expect("highest"), 5);
    store.destroy().await.expect("destroy");
}
