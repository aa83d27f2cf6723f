//! Faults on a real PostgreSQL: the server stopped with `pg_ctl stop -m immediate` under load and
//! started again, dropped connections, racing writers, bad URLs.

use std::collections::HashMap;
use std::time::Duration;

use futures::TryStreamExt;
use loom_core::{Entry, JournalStore, SeqRange, StoreError};
use loom_postgres::{PostgresOptions, PostgresStore};
use loom_testkit::load::{
    Writers, actor as id, check_acknowledged, entry, racing_nodes_never_fork_a_journal,
};
use loom_testkit::servers::PostgresServer;

async fn connect(url: &str) -> PostgresStore {
    connect_tuned(url, 8, Duration::from_secs(5), Duration::from_secs(2)).await
}

/// A store of schema `faults` with these pool settings.
async fn connect_tuned(
    url: &str,
    max_connections: u32,
    statement_timeout: Duration,
    acquire_timeout: Duration,
) -> PostgresStore {
    let options = PostgresOptions {
        schema: "faults".into(),
        max_connections,
        statement_timeout,
        acquire_timeout,
        ..PostgresOptions::default()
    };
    PostgresStore::connect_with(url, options)
        .await
        .expect("connect")
}

/// A plain pool on the server, to look at and hold what the store uses.
async fn admin(url: &str) -> sqlx::PgPool {
    sqlx::PgPool::connect(url).await.expect("admin pool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stopped_immediately_under_load_loses_no_acknowledged_append() {
    let mut server = PostgresServer::start();
    let url = server.url();
    let writers = Writers::spawn(connect(&url).await, 12);
    tokio::time::sleep(Duration::from_millis(800)).await;
    for _ in 0..2 {
        server.restart();
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    let (acked, errors) = writers.stop().await;
    assert!(
        errors > 0,
        "the stops interrupted no append; the test proved nothing"
    );
    server.restart();
    check_acknowledged(&connect(&url).await, &acked).await;
}

/// The pid of the session running an `append` that waits on a lock, once there is one.
async fn blocked_append(admin: &sqlx::PgPool) -> i32 {
    for _ in 0..500 {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE '%append%'",
        )
        .fetch_optional(admin)
        .await
        .expect("pg_stat_activity");
        if let Some(pid) = pid {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the append never blocked on the held lock");
}

/// An append of `entry(0, seq)` to `a` in flight inside the server: the actor's journal row is
/// held by the returned transaction, and the append's session (the returned pid) waits on it.
async fn append_held_on_its_row(
    store: &PostgresStore,
    admin: &sqlx::PgPool,
    a: &loom_core::ActorId,
    seq: u64,
) -> (
    sqlx::Transaction<'static, sqlx::Postgres>,
    tokio::task::JoinHandle<Result<u64, StoreError>>,
    i32,
) {
    let mut tx = admin.begin().await.expect("begin");
    sqlx::query("SELECT highest FROM faults.journal_meta WHERE actor = $1 FOR UPDATE")
        .bind(a.as_str())
        .fetch_one(&mut *tx)
        .await
        .expect("lock the actor's row");
    let (s, a2) = (store.clone(), a.clone());
    let pending = tokio::spawn(async move { s.append(&a2, seq, &[entry(0, seq)]).await });
    let pid = blocked_append(admin).await;
    (tx, pending, pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_append_is_a_typed_error_and_the_retry_writes_once() {
    let server = PostgresServer::start();
    let store = connect(&server.url()).await;
    let admin = admin(&server.url()).await;
    let a = id(0);
    assert_eq!(
        store
            .append(&a, 1, &[entry(0, 1)])
            .await
            .expect("first append"),
        1
    );
    for round in 0..5u64 {
        let next = round + 2;
        // Hold the actor's journal row so the append is in flight inside the server, then cut its
        // connection there, as a failover or a proxy timeout would.
        let (tx, pending, pid) = append_held_on_its_row(&store, &admin, &a, next).await;
        let cut: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&admin)
            .await
            .expect("terminate");
        assert!(cut, "round {round}: the session was not terminated");
        match pending.await.expect("append task") {
            Err(StoreError::Unavailable { .. }) => {}
            other => panic!("round {round}: a cut connection must be Unavailable, got {other:?}"),
        }
        tx.rollback().await.expect("release");
        // The pool replaces the dead connection; the retry succeeds exactly once.
        assert_eq!(
            store
                .append(&a, next, &[entry(0, next)])
                .await
                .expect("retry"),
            next
        );
        match store.append(&a, next, &[entry(0, next)]).await {
            Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, next + 1),
            other => panic!("round {round}: a second retry must conflict, got {other:?}"),
        }
    }
    check_acknowledged(&store, &HashMap::from([(0, 6)])).await;
    assert_eq!(
        store.highest_seq(&a).await.expect("highest"),
        6,
        "a retry duplicated an entry"
    );
}

/// Sends `signal` (`STOP`, `CONT`) to a server process; whether it was sent.
fn signal(pid: i32, signal: &str) -> bool {
    let sent = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
    if !matches!(sent, Ok(ref s) if s.success()) {
        eprintln!("kill -{signal} {pid} failed: {sent:?}");
        return false;
    }
    true
}

/// A server process stopped until this is dropped (so that a failing test leaves none).
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Self {
        assert!(signal(pid, "STOP"), "could not stop the server process");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // No assertion here: a test already failing must not panic again (that aborts, and
        // its own message is lost). A process left stopped is killed by the server's stop.
        signal(self.0, "CONT");
    }
}

/// A server process that stops answering in the middle of an append (SIGSTOP: its connection
/// stays open, and the server's `statement_timeout` cannot fire in a stopped process, as with a
/// frozen host or a network that drops everything) fails the append as `Unavailable` once the
/// statement's bound has passed (`statement_timeout + 5 s`, 9 s here). Before, the append and
/// its batch worker waited for as long as the connection lived. Once the process runs again,
/// appends go on from wherever that append left the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_server_stops_answering_fails_within_its_bound() {
    let server = PostgresServer::start();
    // A statement timeout long enough that the server does not cancel the statement before
    // the test has found its process and stopped it.
    let store = connect_tuned(
        &server.url(),
        4,
        Duration::from_secs(4),
        Duration::from_secs(1),
    )
    .await;
    let admin = admin(&server.url()).await;
    let a = id(0);
    store
        .append(&a, 1, &[entry(0, 1)])
        .await
        .expect("first append");
    // The append waits on a lock inside the server, and its process is stopped there.
    let started = tokio::time::Instant::now();
    let (tx, pending, pid) = append_held_on_its_row(&store, &admin, &a, 2).await;
    let stopped = Stopped::new(pid);
    tx.rollback().await.expect("release the row");
    let answered = tokio::time::timeout(Duration::from_secs(40), pending).await;
    drop(stopped);
    let answer = answered
        .expect("the append still waited after 40 s")
        .expect("append task");
    assert!(
        matches!(answer, Err(StoreError::Unavailable { .. })),
        "an unanswered append must be Unavailable (it may have committed), got {answer:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(8) && took < Duration::from_secs(30),
        "answered after {took:?}, not at its bound of 9 s"
    );
    // The stopped append may still commit once its process runs again: wait until that
    // process has ended its statement (its connection was closed), then go on from whatever it
    // left, once.
    loom_testkit::runtime::eventually(
        Duration::from_secs(15),
        "the stopped append's process ends its statement",
        || async {
            let state: Option<Option<String>> =
                sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = $1")
                    .bind(pid)
                    .fetch_optional(&admin)
                    .await
                    .expect("pg_stat_activity");
            // Gone, or no longer running a statement.
            state.flatten().as_deref() != Some("active")
        },
    )
    .await;
    let mut next = 0;
    for _ in 0..100 {
        match store.highest_seq(&a).await {
            Ok(h) => {
                next = h + 1;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(next == 2 || next == 3, "the journal's next seq is {next}");
    assert_eq!(
        store
            .append(&a, next, &[entry(0, next)])
            .await
            .expect("an append after the process ran again"),
        next
    );
    check_acknowledged(&store, &HashMap::from([(0, next)])).await;
}

/// A call of the store on its own (not in a group commit's batch).
type Call = Box<
    dyn FnOnce(PostgresStore) -> futures::future::BoxFuture<'static, Result<(), StoreError>> + Send,
>;

/// Every other call of the store (reads, enqueues, leases, heartbeats, the tools' listings)
/// is bounded as the batched writes are: each is sent on a connection of its own store, all
/// wait inside the server on tables the test holds, their server processes are stopped there
/// (SIGSTOP, as a frozen host or a network that drops everything) and the tables released.
/// Each call must fail as `Unavailable` at its bound (`statement_timeout + 5 s`, 13 s here).
/// Before, only the batched writes had a bound: these waited for as long as their
/// connections lived. Once the processes run again, every store answers again (its silent
/// connection was closed, not handed to the next call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_whose_server_stops_answering_fails_within_its_bound() {
    use futures::FutureExt;
    use loom_core::{
        Envelope, IdempotencyKey, IdempotencyStore, LeaseManager, Mailbox, Membership, Parking,
        Store,
    };
    let server = PostgresServer::start();
    // Long enough that the server does not cancel a statement before the test has found every
    // waiting process and stopped it.
    let statement_timeout = Duration::from_secs(8);
    let bound = statement_timeout + Duration::from_secs(5);
    let options = PostgresOptions {
        schema: "bounds".into(),
        // One connection per store: the call is sent on the one the test stops.
        max_connections: 1,
        statement_timeout,
        acquire_timeout: Duration::from_secs(2),
        notifications: false,
        ..PostgresOptions::default()
    };
    let admin = admin(&server.url()).await;
    let a = id(0);
    let first = PostgresStore::connect_with(&server.url(), options.clone())
        .await
        .expect("connect");
    first.append(&a, 1, &[entry(0, 1)]).await.expect("append");
    let key = IdempotencyKey::new("k").unwrap();
    let calls: Vec<(&str, Call)> = vec![
        (
            "highest_seq",
            Box::new(|s| async move { s.highest_seq(&id(0)).await.map(drop) }.boxed()),
        ),
        (
            "info",
            Box::new(|s| async move { s.info(&id(0)).await.map(drop) }.boxed()),
        ),
        (
            "load_snapshot",
            Box::new(|s| async move { s.load_snapshot(&id(0), 1).await.map(drop) }.boxed()),
        ),
        (
            "list_actors",
            Box::new(|s| async move { s.list_actors(None, 10).await.map(drop) }.boxed()),
        ),
        (
            "enqueue",
            Box::new(|s| {
                async move {
                    let m = Envelope::new(id(1), serde_json::json!("m"));
                    s.enqueue(&m, None).await.map(drop)
                }
                .boxed()
            }),
        ),
        (
            "enqueue_once",
            Box::new(move |s| {
                async move {
                    let m = Envelope::new(id(1), serde_json::json!("m"));
                    let ttl = Duration::from_secs(60);
                    s.enqueue_once(&m, None, &key, ttl).await.map(drop)
                }
                .boxed()
            }),
        ),
        (
            "pending",
            Box::new(|s| async move { s.pending(&id(1)).await.map(drop) }.boxed()),
        ),
        (
            "dead_letters",
            Box::new(|s| async move { s.dead_letters(None, 10).await.map(drop) }.boxed()),
        ),
        (
            "acquire",
            Box::new(|s| {
                async move {
                    s.acquire(&id(2), "tester", Duration::from_secs(5))
                        .await
                        .map(drop)
                }
                .boxed()
            }),
        ),
        (
            "holder",
            Box::new(|s| async move { s.holder(&id(2)).await.map(drop) }.boxed()),
        ),
        (
            "lookup",
            Box::new(|s| {
                async move {
                    let key = IdempotencyKey::new("k").unwrap();
                    s.lookup(&id(1), &key).await.map(drop)
                }
                .boxed()
            }),
        ),
        (
            "parked_actors",
            Box::new(|s| async move { s.parked_actors(None, 10).await.map(drop) }.boxed()),
        ),
        (
            "heartbeat",
            Box::new(|s| {
                async move {
                    s.heartbeat("node-a", 1, &["account"], Duration::from_secs(5))
                        .await
                        .map(drop)
                }
                .boxed()
            }),
        ),
        (
            "members",
            Box::new(|s| async move { s.members().await.map(drop) }.boxed()),
        ),
    ];
    let mut stores = Vec::new();
    for _ in &calls {
        stores.push(
            PostgresStore::connect_with(&server.url(), options.clone())
                .await
                .expect("connect"),
        );
    }
    // And a call whose caller stops waiting before the bound, as the runtime gives a lease
    // renewal up at the lease's deadline.
    let quitter = PostgresStore::connect_with(&server.url(), options.clone())
        .await
        .expect("connect");
    // Every table of the store's schema, held until the calls wait on them.
    let mut hold = admin.begin().await.expect("begin");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = 'bounds'",
    )
    .fetch_all(&mut *hold)
    .await
    .expect("tables");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        tables.join(", ")
    )))
    .execute(&mut *hold)
    .await
    .expect("lock the tables");
    let started = tokio::time::Instant::now();
    let pending: Vec<_> = calls
        .into_iter()
        .zip(stores.iter().cloned())
        .map(|((name, call), store)| {
            let run = tokio::spawn(async move {
                let answer = call(store).await;
                (answer, started.elapsed())
            });
            (name, run)
        })
        .collect();
    let given_up = {
        let (s, a) = (quitter.clone(), a.clone());
        tokio::spawn(async move { s.highest_seq(&a).await })
    };
    let mut pids: Vec<i32> = Vec::new();
    for _ in 0..500 {
        pids = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
        )
        .fetch_all(&admin)
        .await
        .expect("pg_stat_activity");
        if pids.len() == pending.len() + 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        pids.len(),
        pending.len() + 1,
        "every call waits on the held tables"
    );
    let stopped: Vec<Stopped> = pids.into_iter().map(Stopped::new).collect();
    // Its caller stops waiting (the call's future is dropped) once its statement is in.
    given_up.abort();
    hold.rollback().await.expect("release the tables");
    // However many calls wait, none past its bound and a margin.
    let deadline = started + bound + Duration::from_secs(20);
    let mut late = Vec::new();
    for (name, run) in pending {
        match tokio::time::timeout_at(deadline, run).await {
            Err(_) => late.push(name),
            Ok(joined) => {
                let (answer, took) = joined.expect("call task");
                assert!(
                    matches!(answer, Err(StoreError::Unavailable { .. })),
                    "{name}: an unanswered call must be Unavailable (it may have written), got {answer:?}"
                );
                assert!(
                    took >= bound - Duration::from_millis(500),
                    "{name} failed after {took:?}, before its bound of {bound:?}: it did not wait on the stopped process"
                );
            }
        }
    }
    assert!(late.is_empty(), "still waiting past their bound: {late:?}");
    assert!(
        given_up.await.is_err_and(|e| e.is_cancelled()),
        "the call given up by its caller was answered"
    );
    // Each store answers again on a new connection while the old one's process is still
    // stopped: the silent connection was closed, not handed back to the pool (whose slot it
    // would hold while the pool waited for its answer: the next call's acquire fails).
    for (n, store) in stores.iter().chain([&quitter]).enumerate() {
        let mut answer = store.highest_seq(&a).await;
        for _ in 0..3 {
            if answer.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            answer = store.highest_seq(&a).await;
        }
        let last = if n == stores.len() {
            " (the one whose caller gave up)"
        } else {
            ""
        };
        let answer = answer
            .unwrap_or_else(|e| panic!("store {n}{last}: no answer on a new connection: {e:?}"));
        assert_eq!(answer, 1, "store {n}{last}");
    }
    drop(stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_racing_on_one_actor_never_fork_it() {
    let server = PostgresServer::start();
    racing_nodes_never_fork_a_journal([connect(&server.url()).await, connect(&server.url()).await])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_schemas_and_logins_are_typed_errors() {
    assert!(matches!(
        PostgresStore::connect("not a url").await,
        Err(StoreError::InvalidRequest(_))
    ));
    let server = PostgresServer::start();
    let bad_schema = PostgresStore::connect_with(
        &server.url(),
        PostgresOptions {
            schema: "Robert'); DROP TABLE x;--".into(),
            ..PostgresOptions::default()
        },
    )
    .await;
    assert!(matches!(bad_schema, Err(StoreError::InvalidRequest(_))));
    // A name the SQL grammar reserves (it would be a syntax error in every statement), or
    // PL/pgSQL does (`loop` ended a function's `FOR … IN SELECT … FROM loop.f() LOOP`).
    for word in ["left", "select", "user", "loop", "while"] {
        let reserved = PostgresStore::connect_with(
            &server.url(),
            PostgresOptions {
                schema: word.into(),
                ..PostgresOptions::default()
            },
        )
        .await;
        assert!(
            matches!(&reserved, Err(StoreError::InvalidRequest(m)) if m.contains("reserved")),
            "{word}: {reserved:?}"
        );
    }
    let unreachable = PostgresStore::connect_with(
        "postgres://postgres@localhost/postgres?host=/nonexistent&port=1",
        PostgresOptions {
            acquire_timeout: Duration::from_secs(1),
            ..PostgresOptions::default()
        },
    )
    .await;
    assert!(
        matches!(unreachable, Err(StoreError::Unavailable { .. })),
        "{unreachable:?}"
    );
    let base = server.url();
    for (what, url) in [
        ("no such role", base.replace("postgres@", "nobody@")),
        ("no such database", base.replace("/postgres?", "/nosuchdb?")),
    ] {
        let r = PostgresStore::connect(&url).await;
        assert!(matches!(r, Err(StoreError::Denied { .. })), "{what}: {r:?}");
    }
}

/// A login refused under a running store (a password rotated, a role locked): `Denied`, which
/// is transient, so that the runtime holds its work and retries and the ingress answers `503`;
/// once the login is allowed again the store goes on, nothing acknowledged lost. Before, it was
/// `InvalidRequest`, refused on its merits: the ingress answered the client `400` (a request
/// not to retry), and the runtime counted each refused write as a failed attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_refused_under_a_running_store_is_transient_and_passes() {
    let server = PostgresServer::start();
    let admin = admin(&server.url()).await;
    sqlx::query("CREATE ROLE rotated LOGIN SUPERUSER")
        .execute(&admin)
        .await
        .expect("create role");
    let store = connect(&server.url().replacen("postgres@", "rotated@", 1)).await;
    let a = id(1);
    store.append(&a, 1, &[entry(1, 1)]).await.expect("append");
    sqlx::query("ALTER ROLE rotated NOLOGIN")
        .execute(&admin)
        .await
        .expect("lock the role");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'rotated'")
        .execute(&admin)
        .await
        .expect("end its sessions");
    // The first call may meet a session ended under it (Unavailable); the next ones log in.
    let mut denied = None;
    for _ in 0..50 {
        match store.append(&a, 2, &[entry(1, 2)]).await {
            Err(e @ StoreError::Denied { .. }) => {
                denied = Some(e);
                break;
            }
            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("an append under a locked role: {other:?}"),
        }
    }
    let denied = denied.expect("no call was refused its login");
    assert!(denied.is_transient(), "{denied:?}");
    assert!(denied.to_string().contains("login was refused"), "{denied}");
    assert!(
        denied.hint().is_some_and(|h| h.contains("login")),
        "{denied:?}"
    );
    sqlx::query("ALTER ROLE rotated LOGIN")
        .execute(&admin)
        .await
        .expect("unlock the role");
    store
        .append(&a, 2, &[entry(1, 2)])
        .await
        .expect("append once allowed");
    assert_eq!(store.highest_seq(&a).await.expect("highest"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_server_settings_are_reported_and_synchronous_commit_is_forced_on() {
    let safe = PostgresServer::start();
    let d = connect(&safe.url())
        .await
        .durability()
        .await
        .expect("durability");
    assert_eq!(d.warning, None, "{d:?}");
    // A server whose default is to acknowledge before the WAL flush: Loom's sessions still wait.
    let lax = PostgresServer::start_with(&["synchronous_commit=off"]);
    let d = connect(&lax.url())
        .await
        .durability()
        .await
        .expect("durability");
    assert_eq!((d.synchronous_commit.as_str(), d.warning), ("on", None));
    // Settings a session cannot override are reported.
    let unsafe_server = PostgresServer::start_with(&["fsync=off", "full_page_writes=off"]);
    let d = connect(&unsafe_server.url())
        .await
        .durability()
        .await
        .expect("durability");
    let warning = d.warning.expect("a warning");
    assert!(
        warning.contains("fsync is off") && warning.contains("full_page_writes is off"),
        "{warning}"
    );
}

/// A server that takes only TLS connections with a password: the URL carries both (the
/// password percent-encoded, the CA as `sslrootcert`), the session really is encrypted, and a
/// wrong password, an untrusted certificate or a plain connection is an error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_a_password_from_the_url() {
    let (_server, url, _ca) = PostgresServer::start_tls();
    let store = connect(&url).await;
    let a = id(7);
    let written = [entry(7, 1), entry(7, 2)];
    store
        .append(&a, 1, &written)
        .await
        .expect("append over TLS");
    let entries: Vec<Entry> = store
        .read(&a, SeqRange::all())
        .try_collect()
        .await
        .expect("read over TLS");
    assert_eq!(entries, written);
    let pool = sqlx::PgPool::connect(&url).await.expect("plain sqlx pool");
    let (ssl, user): (bool, String) = sqlx::query_as(
        "SELECT ssl, current_user::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await
    .expect("pg_stat_ssl");
    assert!(ssl, "the session is not encrypted");
    assert_eq!(user, "loom");
    pool.close().await;

    let wrong_password = PostgresStore::connect(&url.replace("s3cret%2F", "wrong%2F")).await;
    assert!(
        matches!(wrong_password, Err(StoreError::Denied { ref message, .. }) if message.contains("password")),
        "{wrong_password:?}"
    );
    let (without_ca, _) = url.split_once("&sslrootcert=").expect("a CA in the URL");
    let plain = url.replace("sslmode=verify-full", "sslmode=disable");
    // An untrusted certificate is the URL's to fix; a plain connection the server's pg_hba
    // turns away is a login the server refuses Loom (`Denied`).
    for (what, bad, says, denied) in [
        ("untrusted certificate", without_ca, "sslrootcert", false),
        ("no TLS", &plain, "no encryption", true),
    ] {
        let r = PostgresStore::connect_with(
            bad,
            PostgresOptions {
                acquire_timeout: Duration::from_secs(2),
                ..PostgresOptions::default()
            },
        )
        .await;
        let text = match &r {
            Err(StoreError::Denied { message, .. }) if denied => message,
            Err(StoreError::InvalidRequest(m)) if !denied => m,
            other => panic!("{what}: {other:?}"),
        };
        assert!(text.contains(says), "{what}: {r:?}");
    }
}

/// Rules D15 and D14: a turn whose next message's frame does not decode reports it committed,
/// and that message is buried at once (`loom_testkit::load`). The damage: the message's frame
/// overwritten with garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_message_is_buried_at_once_and_the_next_one_runs() {
    let server = PostgresServer::start();
    let url = server.url();
    let store = connect(&url).await;
    let admin = sqlx::PgPool::connect(&url).await.expect("admin pool");
    loom_testkit::load::a_damaged_message_is_buried_at_once_and_the_next_one_runs(
        &store,
        |a, position| {
            let admin = admin.clone();
            async move {
                let done = sqlx::query(
                    "UPDATE faults.messages SET frame = $3 WHERE actor = $1 AND position = $2",
                )
                .bind(a.as_str())
                .bind(i64::try_from(position).expect("a position"))
                .bind(loom_testkit::load::GARBAGE)
                .execute(&admin)
                .await
                .expect("damage the message");
                assert_eq!(done.rows_affected(), 1, "the message is in the table");
            }
        },
    )
    .await;
}

/// A node asking for a lease another node holds is told "held" at once, even while the
/// holder's turns hold the lease row (`FOR KEY SHARE`, as every fenced turn does until it
/// ends): the answer does not wait for the row's lock. (Version 1's `acquire` locked the row
/// first and waited behind every turn in flight, and behind the next ones, until its statement
/// timed out; a node's ownership loop stalled on it.) A free lease is still taken only once
/// the turns that checked it have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_for_a_held_lease_does_not_wait_for_the_turns_in_flight() {
    use loom_core::ActorId;
    use loom_core::store::LeaseManager;
    let server = PostgresServer::start();
    let store = connect(&server.url()).await;
    let admin = sqlx::PgPool::connect(&server.url()).await.expect("admin");
    let l = ActorId::new("acct", "leased").expect("a lease id");
    let held = store
        .acquire(&l, "node-a", Duration::from_secs(60))
        .await
        .expect("node a takes it");
    // A turn of node a in flight.
    let mut turn = admin.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM faults.leases WHERE actor = $1 FOR KEY SHARE")
        .bind(l.as_str())
        .execute(&mut *turn)
        .await
        .expect("hold the row as a turn does");
    let asked = tokio::time::timeout(
        Duration::from_secs(2),
        store.acquire(&l, "node-b", Duration::from_secs(60)),
    )
    .await
    .expect("the answer came without waiting for the turn");
    match asked {
        Err(StoreError::LeaseHeld { owner, .. }) => assert_eq!(owner, "node-a"),
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    // Released, the lease is free: taking it waits for the turn that checked it.
    store.release(&held).await.expect("release");
    let take = {
        let store = store.clone();
        let l = l.clone();
        tokio::spawn(async move { store.acquire(&l, "node-b", Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !take.is_finished(),
        "a free lease changed hands under a turn in flight"
    );
    turn.rollback().await.expect("the turn ends");
    let taken = take.await.expect("task").expect("node b takes it");
    assert!(taken.token > held.token, "{taken:?} after {held:?}");
}

/// A node's start migrates the schema under a lock another migrator (or a long step of an older
/// store's upgrade) may hold for longer than `statement_timeout`: it waits rather than failing
/// at every start. And a role given a schema its DBA made for it, without the right to create
/// schemas in the database, starts (a `CREATE SCHEMA IF NOT EXISTS` is refused to it even when
/// the schema exists). Before, the first failed with `statement timeout` after 1 s here, the
/// second with "permission denied for database".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_waits_for_the_migration_lock_and_needs_no_right_to_create_schemas() {
    let server = PostgresServer::start();
    let admin = admin(&server.url()).await;
    let mut held = admin.begin().await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('loom schema mig'))")
        .execute(&mut *held)
        .await
        .expect("take the migrators' lock");
    let url = server.url();
    let start = tokio::spawn(async move {
        PostgresStore::connect_with(
            &url,
            PostgresOptions {
                schema: "mig".into(),
                statement_timeout: Duration::from_secs(1),
                ..PostgresOptions::default()
            },
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!start.is_finished(), "{:?}", start.await);
    held.commit().await.expect("release the lock");
    let store = start.await.unwrap().expect("the start waited for the lock");
    store
        .append(&id(1), 1, &[entry(1, 1)])
        .await
        .expect("append");

    sqlx::raw_sql("CREATE ROLE loom_app LOGIN; CREATE SCHEMA app AUTHORIZATION loom_app")
        .execute(&admin)
        .await
        .expect("a role and its schema");
    let app = PostgresStore::connect_with(
        &server.url().replace("postgres@", "loom_app@"),
        PostgresOptions {
            schema: "app".into(),
            ..PostgresOptions::default()
        },
    )
    .await
    .expect("a role owning its schema starts");
    app.append(&id(1), 1, &[entry(1, 1)]).await.expect("append");
    let denied = PostgresStore::connect_with(
        &server.url().replace("postgres@", "loom_app@"),
        PostgresOptions {
            schema: "elsewhere".into(),
            ..PostgresOptions::default()
        },
    )
    .await;
    // Where it has no schema, it still needs the right (and the error says so).
    let Err(denied) = denied else {
        panic!("a schema was made without the right to create it")
    };
    let denied = format!("{denied:?}");
    assert!(denied.contains("permission denied"), "{denied}");
}

/// A journal of large entries is read in pages bounded by their bytes (`READ_PAGE_BYTES`), not
/// 1 024 entries whatever their size (up to 4 GiB in one answer, held in memory and bounded by
/// one statement's time): 20 entries of about 1 MiB stored come back whole, in order, across
/// pages cut short for their size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_of_large_entries_is_read_in_pages_bounded_by_bytes() {
    use loom_core::EntryKind;
    let server = PostgresServer::start();
    let store = connect(&server.url()).await;
    let a = id(7);
    // Hex of pseudo-random bytes: it compresses to about half, so each frame stays large.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut noise = |n: usize| {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from_digit((x & 15) as u32, 16).unwrap()
            })
            .collect::<String>()
    };
    for seq in 1..=20u64 {
        let e = Entry::new(
            seq,
            EntryKind::Completed {
                reply: serde_json::json!(noise(2 * 1024 * 1024)),
            },
        );
        store.append(&a, seq, &[e]).await.expect("append");
    }
    let got: Vec<Entry> = store
        .read(&a, SeqRange::all())
        .try_collect()
        .await
        .expect("read");
    assert_eq!(
        got.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
}

/// A function another role of the database plants in `public` with the exact argument types of
/// a built-in the store's functions call bare (`unnest(text[])`, which `append_many` calls on
/// its batch's actors) is never called: sessions search `pg_catalog` and `pg_temp` only.
/// Before, the planted function won over the built-in (an exact match beats `anyarray`,
/// CVE-2018-1058) and ran as the store's role, which here it notes in a table of its own;
/// one that answered as it liked could have decided fences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_planted_in_public_is_never_called() {
    let server = PostgresServer::start();
    let store = connect(&server.url()).await;
    let admin = admin(&server.url()).await;
    for plant in [
        "CREATE TABLE public.calls (at timestamptz)",
        "CREATE FUNCTION public.unnest(text[]) RETURNS SETOF text LANGUAGE plpgsql AS \
         $$ BEGIN INSERT INTO public.calls VALUES (now()); \
         RETURN QUERY SELECT pg_catalog.unnest($1); END $$",
    ] {
        sqlx::query(plant).execute(&admin).await.expect(plant);
    }
    // At once, so that the group commit batches them (`append_many`).
    for seq in 1..=3u64 {
        let appends = (0..64u32).map(|i| {
            let s = store.clone();
            async move { s.append(&id(i), seq, &[entry(i, seq)]).await }
        });
        for (i, r) in futures::future::join_all(appends)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(r.expect("append"), seq, "actor {i}");
        }
    }
    let calls: i64 = sqlx::query_scalar("SELECT count(*) FROM public.calls")
        .fetch_one(&admin)
        .await
        .expect("count the calls");
    assert_eq!(calls, 0, "the store called a function planted in public");
}

/// An expired idempotency record purged between `reserve`'s insert (which collided with it) and
/// its lock (which then finds nothing) is looked for again, and the key reserved. Before
/// (schema versions up to 14), `reserve` answered "taken, pending" with no expiry, and decoding
/// that panicked inside the caller (`ask`, `send`, `deliver_event`). A statement trigger holds
/// `reserve` between the two on an advisory lock while the test purges the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_purged_while_reserve_looks_at_it_is_reserved_again() {
    use loom_core::{IdempotencyKey, IdempotencyStore, Reservation};
    let server = PostgresServer::start();
    let store = connect(&server.url()).await;
    let admin = admin(&server.url()).await;
    let (a, key) = (id(0), IdempotencyKey::new("k").unwrap());
    assert!(matches!(
        store.reserve(&a, &key, Duration::from_millis(1)).await,
        Ok(Reservation::Reserved)
    ));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut holder = admin.acquire().await.expect("a session to hold the lock");
    sqlx::query("SELECT pg_advisory_lock(7001)")
        .execute(&mut *holder)
        .await
        .expect("lock");
    for ddl in [
        "CREATE FUNCTION public.hold_reserve() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_advisory_lock(7001); PERFORM pg_advisory_unlock(7001); \
         RETURN NULL; END $$",
        "CREATE TRIGGER hold AFTER INSERT ON faults.idempotency \
         FOR EACH STATEMENT EXECUTE FUNCTION public.hold_reserve()",
    ] {
        sqlx::query(ddl).execute(&admin).await.expect(ddl);
    }
    let (s, a2, k2) = (store.clone(), a.clone(), key.clone());
    let reserving = tokio::spawn(async move { s.reserve(&a2, &k2, Duration::from_secs(60)).await });
    // Its insert did nothing and it waits in the trigger: purge the expired record now.
    let mut waited = false;
    for _ in 0..500 {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND wait_event = 'advisory' AND query LIKE '%reserve%'",
        )
        .fetch_one(&admin)
        .await
        .expect("pg_stat_activity");
        if n > 0 {
            waited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(waited, "reserve never reached the trigger");
    let purged = sqlx::query("DELETE FROM faults.idempotency WHERE actor = $1 AND key = 'k'")
        .bind(a.as_str())
        .execute(&admin)
        .await
        .expect("purge");
    assert_eq!(purged.rows_affected(), 1);
    sqlx::query("SELECT pg_advisory_unlock(7001)")
        .execute(&mut *holder)
        .await
        .expect("unlock");
    match reserving.await {
        Ok(Ok(Reservation::Reserved)) => {}
        other => panic!("a key whose record was purged meanwhile was not reserved: {other:?}"),
    }
    // Held now, by this reservation.
    assert!(matches!(
        store.reserve(&a, &key, Duration::from_secs(60)).await,
        Ok(Reservation::Pending { .. })
    ));
}

/// The listings page in byte order (`actor COLLATE "C"`), and an index in that order serves
/// each page: none sorts its table. Before schema version 15 only the primary keys, in the
/// database's collation, were there, and every page of `loom journal ls`, `export` or
/// `parked list` sorted the whole table (with sequential scans off, the plan still sorted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listing_page_is_read_from_an_index_in_byte_order() {
    let server = PostgresServer::start();
    let _store = connect(&server.url()).await;
    let admin = admin(&server.url()).await;
    for query in [
        "SELECT actor FROM faults.journal_meta WHERE actor COLLATE \"C\" > 'a' ORDER BY actor COLLATE \"C\" LIMIT 1000",
        "SELECT actor FROM faults.mailbox WHERE count > 0 AND actor COLLATE \"C\" > 'a' ORDER BY actor COLLATE \"C\" LIMIT 1000",
        "SELECT actor, frame FROM faults.parked WHERE actor COLLATE \"C\" > 'a' ORDER BY actor COLLATE \"C\" LIMIT 1000",
    ] {
        let mut tx = admin.begin().await.expect("begin");
        // On an empty table a sequential scan (or a bitmap scan and a sort) is cheapest; what
        // matters is whether an index can give the order at all.
        for off in ["enable_seqscan", "enable_bitmapscan"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL {off} = off")))
                .execute(&mut *tx)
                .await
                .expect(off);
        }
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {query}")))
            .fetch_all(&mut *tx)
            .await
            .expect("explain");
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index") && !plan.contains("Sort"),
            "{query}:\n{plan}"
        );
    }
}

/// A row another session holds past `statement_timeout` times out the batch waiting on it; the
/// server rolled the batch back, so its requests run alone, and those before the one on the
/// held row commit (the one on it, and any after it, fail as `Unavailable`, after one timeout
/// more at most). Before, every request of the batch failed with the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_timed_out_on_a_held_row_commits_the_requests_before_it() {
    let server = PostgresServer::start();
    // Four connections: one batch in flight at a time (`group::workers`).
    let store = connect_tuned(
        &server.url(),
        4,
        Duration::from_secs(2),
        Duration::from_secs(2),
    )
    .await;
    let admin = admin(&server.url()).await;
    let (held, blocker) = (id(0), id(100));
    for a in [&held, &blocker] {
        store
            .append(a, 1, &[entry(0, 1)])
            .await
            .expect("first append");
    }
    let hold = |a: loom_core::ActorId| {
        let admin = admin.clone();
        async move {
            let mut tx = admin.begin().await.expect("begin");
            sqlx::query("SELECT highest FROM faults.journal_meta WHERE actor = $1 FOR UPDATE")
                .bind(a.as_str())
                .fetch_one(&mut *tx)
                .await
                .expect("hold the row");
            tx
        }
    };
    let (held_tx, blocker_tx) = (hold(held.clone()).await, hold(blocker.clone()).await);
    // The one batch in flight waits on the blocker's row while the next one gathers: ten
    // appends to new journals, then one to the held row, last.
    let spawn = |a: loom_core::ActorId, seq: u64| {
        let s = store.clone();
        tokio::spawn(async move { s.append(&a, seq, &[entry(0, seq)]).await })
    };
    let first = spawn(blocker.clone(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let others: Vec<_> = (1..=10).map(|i| spawn(id(i), 1)).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let on_held = spawn(held.clone(), 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    blocker_tx.rollback().await.expect("release the blocker");
    assert_eq!(first.await.unwrap().expect("the blocker's append"), 2);
    for (i, o) in others.into_iter().enumerate() {
        assert_eq!(
            o.await
                .unwrap()
                .expect("an append batched with one on a held row"),
            1,
            "append {i}"
        );
    }
    match on_held.await.unwrap() {
        Err(StoreError::Unavailable { .. }) => {}
        other => panic!("the append on the held row: {other:?}"),
    }
    held_tx.rollback().await.expect("release");
}
