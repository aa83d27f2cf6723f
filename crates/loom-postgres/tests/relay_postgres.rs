//! The outbox relay of a PostgreSQL store of 32 partitions (`relay.rs`, `schema_v12.sql`): relays
//! of several processes moving the same outboxes deliver each message once and in order, what a
//! dead process left is moved by another, a recipient that is held or refuses a message holds
//! back only its own partition, pushes that never pause do not hold off the sweep, a turn locks
//! no row of another partition, and a store's partition count is fixed when it is created.

use std::collections::HashMap;
use std::time::Duration;

use loom_core::partition::{SHARED_STORE_PARTITIONS, partition_of};
use loom_core::store::backend::{Outgoing, check_outboxes, prepare_message};
use loom_core::{ActorId, Envelope, JournalStore, Mailbox, Store, StoreError};
use loom_postgres::{PostgresOptions, PostgresStore};
use loom_testkit::conformance::partitions::{
    arrived, drained_payloads, rounds_by_sender, send_turn, spread_in,
};
use loom_testkit::servers::PostgresServer;
use serde_json::json;

const N: u32 = SHARED_STORE_PARTITIONS;

async fn connect(
    url: &str,
    schema: &str,
    partitions: Option<u32>,
) -> Result<PostgresStore, StoreError> {
    PostgresStore::connect_with(
        url,
        PostgresOptions {
            schema: schema.to_owned(),
            max_connections: 4,
            partitions,
            ..PostgresOptions::default()
        },
    )
    .await
}

fn id(kind: &str, key: &str) -> ActorId {
    ActorId::new(kind, key).expect("valid id")
}

/// An actor of `kind` in another partition than `of`.
fn elsewhere(kind: &str, of: &ActorId) -> ActorId {
    (0..)
        .map(|i| id(kind, &format!("b{i}")))
        .find(|b| partition_of(b, N) != partition_of(of, N))
        .expect("an actor of another partition")
}

fn to(actor: &ActorId, payload: serde_json::Value) -> Outgoing {
    Outgoing {
        envelope: Envelope::new(actor.clone(), payload),
        deliver_at: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_of_several_processes_move_each_message_once_in_order() {
    let server = PostgresServer::start();
    let url = server.url();
    // Four connections of one store: four relays, each looking at every outbox every sweep,
    // while the turns' own store moves what they wrote at once.
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(connect(&url, "race", Some(N)).await.expect("connect"));
    }
    let senders: Vec<ActorId> = spread_in(N, "s", 1).into_iter().step_by(4).collect();
    let receivers = spread_in(N, "r", 1)[..3].to_vec();
    let rounds = 30u64;
    let mut tasks = Vec::new();
    for (i, s) in senders.iter().enumerate() {
        let store = stores[i % stores.len()].clone();
        let (s, receivers) = (s.clone(), receivers.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..rounds {
                let send: Vec<Outgoing> = receivers
                    .iter()
                    .map(|r| to(r, json!({ "from": s.as_str(), "round": round })))
                    .collect();
                send_turn(&store, &s, round + 1, &send).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    let store = &stores[0];
    let expected = senders.len() as u64 * rounds;
    for r in &receivers {
        arrived(store, r, expected).await;
    }
    // Every relay's sweep has looked again since: anything moved twice is there now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for r in &receivers {
        let by_sender = rounds_by_sender(store, r).await;
        assert_eq!(by_sender.len(), senders.len(), "{r}");
        for (s, seen) in by_sender {
            assert_eq!(
                seen,
                (0..rounds).collect::<Vec<_>>(),
                "{s} → {r}: each once, in the order sent"
            );
        }
    }
    let states = store.outbox_states().await.expect("outbox states");
    assert_eq!(states.len(), N as usize);
    assert!(
        check_outboxes(&states).is_empty(),
        "{:?}",
        check_outboxes(&states)
    );
    assert!(states.iter().all(|s| s.pending == 0), "{states:?}");
    assert!(
        store
            .relay_backlog()
            .await
            .unwrap()
            .iter()
            .all(|b| b.waiting == 0),
        "the backlog reads empty"
    );
    stores[0].destroy().await.expect("destroy");
}

/// Outbox rows of a process that died after its turns committed and before its relay moved
/// them: another process's relay finds them at its sweep and moves each once, in seq order, but
/// not while the partition's advisory lock is held (as a relay moving it holds it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_dead_process_left_in_an_outbox_is_moved_by_another() {
    let server = PostgresServer::start();
    let url = server.url();
    let store = connect(&url, "dead", Some(N)).await.expect("connect");
    let a = id("relay", "a");
    let b = elsewhere("relay", &a);
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    let pa = partition_of(&a, N) as i32;
    let mut moving = pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('loom relay dead'), $1)")
        .bind(pa)
        .execute(&mut *moving)
        .await
        .expect("lock");
    // Written as `turn_relayed` writes them, with nobody told to move them.
    for word in ["first", "second", "third"] {
        left_in_outbox(&pool, "dead", pa as u32, &b, word).await;
    }
    // Two sweeps later, nothing has moved: another relay holds the partition.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let backlog = store.relay_backlog().await.unwrap();
    assert_eq!(backlog.len(), N as usize);
    assert_eq!(backlog[pa as usize].waiting, 3, "{backlog:?}");
    assert_eq!(store.pending(&b).await.unwrap(), 0);
    moving.rollback().await.expect("rollback");
    arrived(&store, &b, 3).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let got = drained_payloads(&store, &b).await;
    assert_eq!(got, [json!("first"), json!("second"), json!("third")]);
    let states = store.outbox_states().await.expect("states");
    assert!(states.iter().all(|s| s.pending == 0), "{states:?}");

    // A row addressed to its own partition is damage `loom journal verify` names.
    let mut tx = pool.begin().await.expect("begin");
    // Held so that no relay moves it while the state is read.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('loom relay dead'), $1)")
        .bind(pa)
        .execute(&mut *tx)
        .await
        .expect("lock");
    left_in_outbox(&pool, "dead", pa as u32, &a, "misaddressed").await;
    let wrong = check_outboxes(&store.outbox_states().await.expect("states"));
    assert!(
        wrong.len() == 1 && wrong[0].contains("addressed to its own actors"),
        "{wrong:?}"
    );
    tx.rollback().await.expect("rollback");
    store.destroy().await.expect("destroy");
}

/// Writes a message from partition `part` to `to` into the outbox of the store in `schema`, as
/// `turn_relayed` writes it, with nobody told to move it (the relays' sweeps find it).
async fn left_in_outbox<'e>(
    db: impl sqlx::PgExecutor<'e>,
    schema: &str,
    part: u32,
    to: &ActorId,
    word: &str,
) {
    let msg = Envelope::new(to.clone(), json!(word));
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {schema}.outbox (part, seq, actor, message_id, frame, due) \
         VALUES ($1, nextval('{schema}.outbox_seq'), $2, $3, $4, 0)"
    )))
    .bind(part as i32)
    .bind(to.as_str())
    .bind(msg.id.to_string())
    .bind(prepare_message(&msg).expect("frame"))
    .execute(db)
    .await
    .expect("insert");
}

/// The `relay` function of the store in `schema` as defined now, and the same with `line` run
/// first in its body (to break it or slow it down, as a test needs).
async fn relay_with_first_line(pool: &sqlx::PgPool, schema: &str, line: &str) -> (String, String) {
    let definition: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT pg_get_functiondef('{schema}.relay(integer[], integer)'::regprocedure)"
    )))
    .fetch_one(pool)
    .await
    .expect("the relay function's definition");
    let changed = definition.replacen("\nBEGIN\n", &format!("\nBEGIN\n    {line}\n"), 1);
    assert_ne!(changed, definition, "the body has a BEGIN line");
    (definition, changed)
}

/// The first of `actors` in partition `p` of [`N`].
fn in_partition(actors: &[ActorId], p: u32) -> ActorId {
    actors
        .iter()
        .find(|a| partition_of(a, N) == p)
        .cloned()
        .expect("an actor in every partition")
}

/// Senders' partitions 0 and 1, and a recipient in partition 2 (the one to be held back) and
/// one in 3: actors `<stem>...` of a store of [`N`].
fn two_senders_two_recipients(stem: &str) -> (u32, u32, ActorId, ActorId) {
    let actors = spread_in(N, stem, 1);
    (0, 1, in_partition(&actors, 2), in_partition(&actors, 3))
}

/// A recipient's mailbox row held by a long transaction holds back only the messages for it: a
/// sweep that finds two partitions' outboxes, one sending to that recipient, still moves the
/// other's at once (within one sweep and the call's one-second `lock_timeout`: inside the 3 s
/// allowed, where waiting out the held row would take forever), and the held one's once the
/// row is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_held_elsewhere_holds_back_only_its_own_messages() {
    let server = PostgresServer::start();
    let url = server.url();
    let store = connect(&url, "held", Some(N)).await.expect("connect");
    let (p1, p2, stuck, free) = two_senders_two_recipients("h");
    let (stuck, free) = (&stuck, &free);
    store
        .enqueue(&Envelope::new(stuck.clone(), json!("before")), None)
        .await
        .expect("enqueue");
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    let holder = hold_mailbox_row(&pool, "held", stuck).await;
    left_in_outbox(&pool, "held", p1, stuck, "stuck").await;
    left_in_outbox(&pool, "held", p2, free, "free").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while store.pending(free).await.unwrap() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a message for a free recipient waited on another's row"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.pending(stuck).await.unwrap(),
        1,
        "only what was there"
    );
    holder.rollback().await.expect("rollback");
    arrived(&store, stuck, 2).await;
    let got = drained_payloads(&store, stuck).await;
    assert_eq!(got, [json!("before"), json!("stuck")]);
    store.destroy().await.expect("destroy");
}

/// A message one partition's move cannot enqueue (its recipient's mailbox refuses it: here a
/// trigger raising on its insert) holds back only its own partition: a sweep that finds two
/// partitions' outboxes, which one call moves in one transaction, still moves the other's, the
/// relay's health names only the failing partition, and once the recipient takes messages
/// again the held one moves and the health clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_its_recipient_refuses_holds_back_only_its_own_partition() {
    let server = PostgresServer::start();
    let url = server.url();
    let store = connect(&url, "refuse", Some(N)).await.expect("connect");
    let (p1, p2, stuck, free) = two_senders_two_recipients("r");
    let (stuck, free) = (&stuck, &free);
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION refuse.refused() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'this mailbox refuses messages (the test)'; END $$; \
         CREATE TRIGGER refused BEFORE INSERT ON refuse.messages FOR EACH ROW \
         WHEN (NEW.actor = '{stuck}') EXECUTE FUNCTION refuse.refused();"
    )))
    .execute(&pool)
    .await
    .expect("make the mailbox refuse messages");
    // Both in one transaction: the first sweep after it finds both outboxes at once.
    let mut tx = pool.begin().await.expect("begin");
    left_in_outbox(&mut *tx, "refuse", p1, stuck, "stuck").await;
    left_in_outbox(&mut *tx, "refuse", p2, free, "free").await;
    tx.commit().await.expect("commit");
    arrived(&store, free, 1).await;
    assert_eq!(drained_payloads(&store, free).await, [json!("free")]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let failure = loop {
        match store.relay_failure() {
            Some(f) if f.partitions == [p1] => break f,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the health should name partition {p1} alone: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(failure.latest.contains("refuses messages"), "{failure:?}");
    assert_eq!(store.pending(stuck).await.unwrap(), 0);
    let backlog = store.relay_backlog().await.unwrap();
    assert_eq!(backlog[p1 as usize].waiting, 1, "{backlog:?}");
    sqlx::raw_sql("DROP TRIGGER refused ON refuse.messages")
        .execute(&pool)
        .await
        .expect("take messages again");
    arrived(&store, stuck, 1).await;
    assert_eq!(drained_payloads(&store, stuck).await, [json!("stuck")]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Some(f) = store.relay_failure() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay moves again, but its health says {f:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.destroy().await.expect("destroy");
}

/// Locks `actor`'s mailbox row in the store in `schema` until the transaction returned ends,
/// as a long transaction of another client (or a turn of its partition) would hold it.
async fn hold_mailbox_row(
    pool: &sqlx::PgPool,
    schema: &str,
    actor: &ActorId,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT 1 FROM {schema}.mailbox WHERE actor = $1 FOR UPDATE"
    )))
    .bind(actor.as_str())
    .fetch_one(&mut *holder)
    .await
    .expect("lock the mailbox row");
    holder
}

/// The point of the outbox: a turn sending to an actor of another partition does not wait for
/// that actor's mailbox row, which a turn of that partition (here, an open transaction) holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_locks_no_row_of_another_partition() {
    let server = PostgresServer::start();
    let url = server.url();
    let store = connect(&url, "own", Some(N)).await.expect("connect");
    let a = id("relay", "a");
    let b = elsewhere("relay", &a);
    store
        .enqueue(&Envelope::new(b.clone(), json!("before")), None)
        .await
        .expect("enqueue");
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    let holder = hold_mailbox_row(&pool, "own", &b).await;
    tokio::time::timeout(
        Duration::from_secs(5),
        send_turn(&store, &a, 1, &[to(&b, json!("sent"))]),
    )
    .await
    .expect("the turn waited for a row of another partition");
    // The move waits for b's row; once it is free, the message arrives.
    holder.rollback().await.expect("rollback");
    arrived(&store, &b, 2).await;
    let got = drained_payloads(&store, &b).await;
    assert_eq!(got, [json!("before"), json!("sent")]);

    // On a store of one partition the same turn does wait: what this test would miss.
    let one = connect(&url, "one", None).await.expect("connect");
    one.enqueue(&Envelope::new(b.clone(), json!("before")), None)
        .await
        .expect("enqueue");
    let holder = hold_mailbox_row(&pool, "one", &b).await;
    let waited = tokio::time::timeout(
        Duration::from_millis(500),
        send_turn(&one, &a, 1, &[to(&b, json!("sent"))]),
    )
    .await;
    assert!(
        waited.is_err(),
        "a turn of a one-partition store locks b's row"
    );
    holder.rollback().await.expect("rollback");
    store.destroy().await.expect("destroy");
    one.destroy().await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stores_partition_count_is_fixed_when_it_is_created() {
    let server = PostgresServer::start();
    let url = server.url();
    let a = id("relay", "a");

    let many = connect(&url, "many", Some(N)).await.expect("connect");
    assert_eq!(many.partitions(), N);
    send_turn(&many, &a, 1, &[]).await;
    // Later connects read the count the store was made with.
    assert_eq!(connect(&url, "many", None).await.unwrap().partitions(), N);
    assert_eq!(
        connect(&url, "many", Some(N)).await.unwrap().partitions(),
        N
    );
    let err = connect(&url, "many", Some(1)).await.expect_err("1");
    assert!(
        matches!(&err, StoreError::InvalidRequest(m) if m.contains("has 32 partition(s), not 1")),
        "{err}"
    );
    // Only the partitions nodes own: 1 or 32.
    for n in [0, 3, 8, 64] {
        let err = connect(&url, "other", Some(n)).await.expect_err("n");
        assert!(
            matches!(&err, StoreError::InvalidRequest(m) if m.contains("1 or 32 partitions")),
            "{n}: {err}"
        );
    }

    // A store of one partition with data cannot be taken for a partitioned one.
    let one = connect(&url, "one", None).await.expect("connect");
    assert_eq!(one.partitions(), 1);
    send_turn(&one, &a, 1, &[]).await;
    let err = connect(&url, "one", Some(N)).await.expect_err("recorded");
    assert!(
        matches!(&err, StoreError::InvalidRequest(m) if m.contains("has 1 partition(s), not 32")),
        "{err}"
    );
    // A store migrated from version 11, which recorded no count: its data says it has one.
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    sqlx::query("DELETE FROM one.partitions")
        .execute(&pool)
        .await
        .unwrap();
    let err = connect(&url, "one", Some(N)).await.expect_err("data");
    assert!(
        matches!(&err, StoreError::InvalidRequest(m) if m.contains("already holds actors or nodes of one partition")),
        "{err}"
    );
    assert_eq!(connect(&url, "one", None).await.unwrap().partitions(), 1);
    assert_eq!(one.highest_seq(&a).await.unwrap(), 1, "nothing was touched");
    many.destroy().await.expect("destroy");
    one.destroy().await.expect("destroy");
}

/// The server stopped with `pg_ctl stop -m immediate` twice while turns send across partitions
/// and relays move them: every send of a turn that committed arrives once, in order. A relay's
/// move commits without waiting for its WAL flush (`schema_v12.sql`): a stop that loses one
/// loses its delete and its enqueue alike, and the rows are moved again after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_lost_to_a_server_crash_are_made_again_once() {
    let mut server = PostgresServer::start();
    let url = server.url();
    let store = connect(&url, "crash", Some(N)).await.expect("connect");
    let senders: Vec<ActorId> = spread_in(N, "s", 1).into_iter().step_by(8).collect();
    let receivers = spread_in(N, "r", 1)[..2].to_vec();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for s in senders.clone() {
        let (store, receivers, stop) = (store.clone(), receivers.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut round = 0u64;
            let mut failures = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let send: Vec<Outgoing> = receivers
                    .iter()
                    .map(|r| to(r, json!({ "from": s.as_str(), "round": round })))
                    .collect();
                let entry = [loom_core::Entry::new(
                    round + 1,
                    loom_core::EntryKind::Completed {
                        reply: json!(round),
                    },
                )];
                let turn = loom_core::store::backend::Turn {
                    send: &send,
                    ..loom_core::store::backend::Turn::append(&s, round + 1, &entry)
                };
                match store.commit_turn(turn).await {
                    Ok(_) => round += 1,
                    // Committed before the answer was lost: its sends are in the outbox.
                    Err(StoreError::Conflict { actual, .. }) if actual == round + 2 => round += 1,
                    Err(StoreError::Unavailable { .. }) => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("{s}: {e}"),
                }
            }
            (round, failures)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..2 {
        server.restart();
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut rounds = HashMap::new();
    let mut failures = 0;
    for (s, t) in senders.iter().zip(tasks) {
        let (_, f) = t.await.expect("sender");
        failures += f;
        // What committed, whether or not its answer came back.
        rounds.insert(
            s.as_str().to_owned(),
            store.highest_seq(s).await.expect("highest"),
        );
    }
    assert!(
        failures > 0,
        "the stops interrupted no turn; the test proved nothing"
    );
    let total: u64 = rounds.values().sum();
    for r in &receivers {
        arrived(&store, r, total).await;
    }
    // Every relay's sweep has looked again since: anything moved twice is there now.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for r in &receivers {
        let by_sender = rounds_by_sender(&store, r).await;
        for (s, n) in &rounds {
            // A sender with nothing received has no entry: then it must have committed nothing.
            let seen = by_sender.get(s).cloned().unwrap_or_default();
            assert_eq!(
                seen,
                (0..*n).collect::<Vec<_>>(),
                "{s} → {r}: each committed send once, in the order sent"
            );
        }
    }
    let states = store.outbox_states().await.expect("outbox states");
    assert!(states.iter().all(|s| s.pending == 0), "{states:?}");
    store.destroy().await.expect("destroy");
}

/// A move whose commit the server had not written when it crashed (its WAL writer stopped,
/// nothing else committing): the restart undoes the whole move, the message is back in the
/// outbox and not in the mailbox, and the next relay moves it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_not_yet_flushed_when_the_server_stops_is_made_again_once() {
    // The relay commits its moves without waiting for the WAL flush: the WAL writer writes and
    // flushes them within a few `wal_writer_delay`s (which a loaded machine's test outlasted
    // when this test held it back with a long delay instead), and anything else that commits
    // synchronously flushes them with its own commit, such as an autovacuum worker's ANALYZE.
    // A crash of the server's processes loses only the WAL not yet written: the kernel keeps
    // what was. So autovacuum is off and the WAL writer stopped; the turn's own commit still
    // writes and flushes its WAL itself, as every synchronous commit does.
    let mut server = PostgresServer::start_with(&["autovacuum=off"]);
    let url = server.url();
    let a = id("relay", "a");
    let b = elsewhere("relay", &a);
    let store = connect(&url, "unflushed", Some(N)).await.expect("connect");
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    let walwriter = stop_the_wal_writer(&pool).await;
    send_turn(&store, &a, 1, &[to(&b, json!("once"))]).await;
    arrived(&store, &b, 1).await;
    let (written, inserted): (String, String) =
        sqlx::query_as("SELECT pg_current_wal_lsn()::text, pg_current_wal_insert_lsn()::text")
            .fetch_one(&pool)
            .await
            .expect("WAL positions");
    pool.close().await;
    drop(store);
    // Killed, the WAL writer takes the server down as a crash, and the stop makes sure.
    signal(walwriter, "KILL");
    server.restart();
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    let (waiting, there): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM unflushed.outbox), \
                (SELECT count(*) FROM unflushed.messages WHERE actor = $1)",
    )
    .bind(b.as_str())
    .fetch_one(&pool)
    .await
    .expect("read");
    assert_eq!(
        (waiting, there),
        (1, 0),
        "the move was lost whole: back in the outbox, not in the mailbox (before the crash \
         the WAL was written through {written}, inserted through {inserted})"
    );
    let store = connect(&url, "unflushed", None).await.expect("connect");
    arrived(&store, &b, 1).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let got = drained_payloads(&store, &b).await;
    assert_eq!(got, [json!("once")]);
    assert_eq!(
        store.highest_seq(&a).await.unwrap(),
        1,
        "the turn itself was flushed"
    );
    store.destroy().await.expect("destroy");
}

/// Stops the server's WAL writer (`SIGSTOP`) while it sleeps: stopped while it writes, it
/// could hold a WAL lock that every commit then waits for. Returns its pid.
async fn stop_the_wal_writer(pool: &sqlx::PgPool) -> i32 {
    let (pid,): (i32,) =
        sqlx::query_as("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'")
            .fetch_one(pool)
            .await
            .expect("the WAL writer's pid");
    for _ in 0..200 {
        signal(pid, "STOP");
        let (event,): (Option<String>,) =
            sqlx::query_as("SELECT wait_event FROM pg_stat_activity WHERE pid = $1")
                .bind(pid)
                .fetch_one(pool)
                .await
                .expect("the WAL writer's wait");
        // Set only while it waits for its next round, holding nothing.
        if event.as_deref() == Some("WalWriterMain") {
            return pid;
        }
        signal(pid, "CONT");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the WAL writer was never caught asleep");
}

/// Sends `sig` (`STOP`, `CONT`, `KILL`) to process `pid`.
fn signal(pid: i32, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Rule D16 for the relay (`loom_testkit::conformance::partitions`): while the `relay` function
/// fails (its body made to raise, as a broken migration would leave it) nothing moves and the
/// health names the partition; with its body back, the message moves and the health is clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_move_shows_in_the_runtimes_health() {
    let server = PostgresServer::start();
    let url = server.url();
    let store = connect(&url, "sick", Some(N)).await.expect("connect");
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    let (definition, broken) =
        relay_with_first_line(&pool, "sick", "RAISE EXCEPTION 'relay broken by the test';").await;
    let (p1, p2) = (pool.clone(), pool);
    loom_testkit::conformance::partitions::a_relay_that_cannot_move_shows_in_the_runtimes_health(
        std::sync::Arc::new(store),
        |_| async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(broken))
                .execute(&p1)
                .await
                .expect("break the relay function");
        },
        || async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(definition))
                .execute(&p2)
                .await
                .expect("restore the relay function");
        },
    )
    .await;
}

/// Turns pushing their partitions' outboxes without a pause keep the relay moving them, and
/// its sweep still comes every half second: a message only the sweep finds (left by a dead process
/// in another partition's outbox) arrives while the pushes go on. (The relay once drained for
/// as long as pushes came, so such a message, and any partition waiting for the next sweep,
/// waited until the load stopped.) Each call of the relay function is made to take 50 ms, so
/// that pushes always come during it, as they do under a heavy load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_that_never_pause_do_not_hold_off_the_sweep() {
    let server = PostgresServer::start();
    let url = server.url();
    let store = std::sync::Arc::new(connect(&url, "busy", Some(N)).await.expect("connect"));
    let actors = spread_in(N, "busy", 1);
    let of = |p: u32| in_partition(&actors, p);
    let (recipient, swept) = (of(5), of(7));
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    let (_, slow) = relay_with_first_line(&pool, "busy", "PERFORM pg_sleep(0.05);").await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(slow))
        .execute(&pool)
        .await
        .expect("slow the relay function down");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pushers: Vec<_> = (0..5)
        .map(|p| {
            let (store, stop, sender, recipient) =
                (store.clone(), stop.clone(), of(p), recipient.clone());
            tokio::spawn(async move {
                let mut next = 1;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let msg = to(
                        &recipient,
                        json!({"from": sender.as_str(), "round": next - 1}),
                    );
                    send_turn(&*store, &sender, next, &[msg]).await;
                    next += 1;
                }
                next - 1
            })
        })
        .collect();
    // The pushes are under way before the message only a sweep finds is written.
    arrived(&*store, &recipient, 20).await;
    left_in_outbox(&pool, "busy", 6, &swept, "found by the sweep").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.pending(&swept).await.unwrap() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a message only the sweep finds waited 5 s while pushes went on"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        pushers.iter().all(|p| !p.is_finished()),
        "the pushes went on all the while"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut sent = 0;
    for p in pushers {
        sent += p.await.expect("pusher");
    }
    arrived(&*store, &recipient, sent).await;
    let rounds = rounds_by_sender(&*store, &recipient).await;
    assert_eq!(rounds.values().map(|r| r.len() as u64).sum::<u64>(), sent);
    for r in rounds.values() {
        assert_eq!(
            *r,
            (0..r.len() as u64).collect::<Vec<_>>(),
            "once, in order"
        );
    }
    assert_eq!(
        drained_payloads(&*store, &swept).await,
        [json!("found by the sweep")]
    );
    store.destroy().await.expect("destroy");
}
