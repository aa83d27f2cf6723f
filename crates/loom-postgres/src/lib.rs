//! # loom-postgres
//!
//! Loom's store on PostgreSQL, for teams that already run it: a journal table keyed by
//! `(actor, seq)`, a per-actor meta row holding the highest seq (kept through trims and
//! deletes), snapshots with keep-K, per-actor mailboxes locked with `FOR UPDATE SKIP LOCKED`,
//! a lease table with fencing tokens that only grow, idempotency records with expiry.
//!
//! Every conditional or multi-table operation is one server-side function (see `schema.sql`,
//! which also documents the tables and their invariants), so it is one transaction and one
//! round trip; a conditional append is guarded both by the meta row's lock and by the primary
//! key, so two writers can never both succeed for a seq.
//!
//! The schema is created (or checked) on connect, in the configured schema (default `loom`);
//! nothing outside it is touched. Group commit: concurrent appends, turns and leases, from
//! many actors are sent together as one statement per batch (`append_many`, `turn_many`,
//! `lease_many`), so
//! one transaction and one WAL flush serve the whole batch, and each caller hears back only
//! after that commit (see `group.rs`). Everything else runs on a connection pool, where
//! PostgreSQL's own WAL group commit merges the flushes of concurrent transactions.
//! Durability is PostgreSQL's: Loom's sessions run with `synchronous_commit = on` whatever the
//! server's default, so a write is acknowledged only after its WAL flush (and on synchronous
//! standbys, if any are configured). `fsync` and `full_page_writes` cannot be set per session;
//! [`PostgresStore::durability`] reads them and the store logs a warning at connect when either
//! is off.
//!
//! The files follow the embedded store's and Redis's map, one concern per file: `journal.rs`,
//! `mailbox.rs`, `lease.rs`, `idempotency.rs`, `turn.rs` (the [`loom_core::Store`] methods),
//! `park.rs`, `membership.rs`; `sql.rs` holds what they share, `group.rs` the group commit,
//! `signals.rs` the wake-ups and reply signals between processes,
//! `schema.sql` the tables and functions.
//!
//! ```no_run
//! # async fn f() -> Result<(), loom_core::StoreError> {
//! let store = loom_postgres::PostgresStore::connect("postgres://loom:secret@db.example/app?sslmode=require").await?;
//! # Ok(()) }
//! ```

mod group;
mod idempotency;
mod journal;
mod lease;
mod mailbox;
mod membership;
mod park;
mod relay;
mod signals;
mod sql;
mod turn;

use std::str::FromStr;
use std::time::Duration;

use loom_core::StoreError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub(crate) const BACKEND: &str = "postgres";

/// The longest a node's migration waits for a lock on one of the schema's tables (a
/// transaction holding it) before the start fails with the error. Another node's migration is
/// waited for without a limit.
const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(300);

/// How often a start says in the log that its migration is still under way.
const MIGRATION_NOTICE: Duration = Duration::from_secs(5);

/// How much longer than a statement may take (`statement_timeout`) the answer to a statement
/// of the store is waited for before it is given up as unanswered (`sql::Bounded`). The server
/// does not count a statement's commit (its WAL flush, a synchronous standby) against
/// `statement_timeout`: this margin is for that too.
const ANSWER_MARGIN: Duration = Duration::from_secs(5);

/// The schema version this build creates and reads.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// The schema's migrations: `MIGRATIONS[v]` takes a schema from version `v` to `v + 1`, `{s}`
/// standing for the schema's name. A new schema runs them all; an older one the ones it lacks,
/// in one transaction. Public so that tests can build a schema of an older version.
///
/// ```
/// assert_eq!(loom_postgres::MIGRATIONS.len() as i32, loom_postgres::SCHEMA_VERSION);
/// assert!(loom_postgres::MIGRATIONS[0].contains("CREATE TABLE {s}.journal"));
/// ```
pub const MIGRATIONS: [&str; 16] = [
    include_str!("schema.sql"),
    include_str!("schema_v2.sql"),
    include_str!("schema_v3.sql"),
    include_str!("schema_v4.sql"),
    include_str!("schema_v5.sql"),
    include_str!("schema_v6.sql"),
    include_str!("schema_v7.sql"),
    include_str!("schema_v8.sql"),
    include_str!("schema_v9.sql"),
    include_str!("schema_v10.sql"),
    include_str!("schema_v11.sql"),
    include_str!("schema_v12.sql"),
    include_str!("schema_v13.sql"),
    include_str!("schema_v14.sql"),
    include_str!("schema_v15.sql"),
    include_str!("schema_v16.sql"),
];

/// Settings of a [`PostgresStore`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// The schema holding Loom's tables (default `loom`): lower-case letters, digits and `_`.
    pub schema: String,
    /// Pool size (default 16).
    pub max_connections: u32,
    /// Statement timeout; a statement running longer fails with [`StoreError::Unavailable`]
    /// (default 10 s). The server counts it. Every statement of the store is also waited for
    /// at most `statement_timeout + 5 s` by this side: one the server does not answer at all (a
    /// connection gone silent, a stopped server process) fails with `Unavailable` too, and its
    /// connection is closed. A call that fails so may have written (the server does not count a
    /// commit's flush against `statement_timeout`): retry what must happen once with an
    /// idempotency key. Not bounded so: the migration a first connect of a new build runs, and
    /// the `LISTEN` connection of [`notifications`](Self::notifications), which only hurries
    /// wake-ups up (silent, it leaves the runtime to its poll).
    pub statement_timeout: Duration,
    /// How long to wait for a pooled connection (default 10 s).
    pub acquire_timeout: Duration,
    /// `LISTEN` on the schema's channel so that messages enqueued by other processes wake this
    /// one's dispatcher at once (default on; see [`loom_core::Mailbox::wakeups`]). Turn off
    /// behind a pooler that cannot keep a session, such as PgBouncer in transaction mode: the
    /// runtime then finds such messages by polling.
    pub notifications: bool,
    /// How many partitions a new store is cut into: `None` (what the store already has, 1 for
    /// a new one), `Some(1)`, or `Some(32)` ([`SHARED_STORE_PARTITIONS`], the partitions nodes
    /// own). Fixed when the store is created and recorded in it. In a store of 32, a turn
    /// writes only its actor's partition: a message to an actor of another partition goes
    /// through the sender partition's outbox and the relay every connected store runs
    /// (`relay.rs`), arriving one move after the turn commits.
    ///
    /// [`SHARED_STORE_PARTITIONS`]: loom_core::partition::SHARED_STORE_PARTITIONS
    pub partitions: Option<u32>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            schema: "loom".to_owned(),
            max_connections: 16,
            statement_timeout: Duration::from_secs(10),
            acquire_timeout: Duration::from_secs(10),
            notifications: true,
            partitions: None,
        }
    }
}

/// The PostgreSQL store; cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct PostgresStore {
    /// Every statement of the store goes through it, each answered within a bound (`sql.rs`).
    pool: sql::Bounded,
    schema: String,
    /// Group commit of appends, of turns and of leases (see `group.rs`).
    appends: std::sync::Arc<loom_core::store::backend::Batcher<group::AppendReq, group::AppendOut>>,
    turns: std::sync::Arc<loom_core::store::backend::Batcher<group::TurnReq, group::TurnOut>>,
    leases: std::sync::Arc<loom_core::store::backend::Batcher<group::LeaseReq, group::LeaseOut>>,
    /// Counts notifications on the schema's channel (`None` with notifications off).
    wakeups: Option<tokio::sync::watch::Receiver<u64>>,
    /// Recorded results, from the schema's reply channel (`None` with notifications off).
    completions: Option<tokio::sync::broadcast::Sender<loom_core::store::Completion>>,
    /// Sends this store's wake-ups and reply signals (`signals.rs`).
    signals: signals::Notifier,
    /// How many partitions the store is cut into: 1 or 32 (`schema_v12.sql`).
    partitions: u32,
    /// The outbox relay of a store of 32 partitions (`relay.rs`), stopped with the last clone.
    relay: Option<std::sync::Arc<relay::Relay>>,
    /// The task that listens for them, stopped with the last clone of the store.
    _listener: Option<std::sync::Arc<tokio_util::task::AbortOnDropHandle<()>>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgresStore(schema {})", self.schema)
    }
}

/// The oldest server this store runs on: PostgreSQL 12 (`plan_cache_mode`, schema_v11.sql).
const OLDEST_SERVER: u32 = 120_000;

/// Refuses a server older than [`OLDEST_SERVER`] (its `server_version_num`) with a typed error,
/// before a migration would fail half-way on a setting it does not know.
fn supported_server(version_num: &str) -> Result<(), StoreError> {
    match version_num.trim().parse::<u32>() {
        Ok(v) if v >= OLDEST_SERVER => Ok(()),
        Ok(v) => {
            // 110005 is 11.5; 90624 is 9.6.24.
            let major = if v >= 100_000 {
                format!("{}", v / 10_000)
            } else {
                format!("{}.{}", v / 10_000, v % 10_000 / 100)
            };
            Err(StoreError::InvalidRequest(format!(
                "PostgreSQL {major} is too old: Loom needs PostgreSQL 12 or later"
            )))
        }
        Err(_) => Err(StoreError::InvalidRequest(format!(
            "PostgreSQL reported a server_version_num Loom cannot read: {version_num:?}"
        ))),
    }
}

/// Whether `e` says the server could not be reached or is going away (as opposed to a failure of
/// the statement's own transaction: a deadlock, a serialization failure, a statement timeout).
pub(crate) fn unreachable(e: &sqlx::Error) -> bool {
    use sqlx::Error as E;
    match e {
        E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Tls(_) => true,
        E::Database(d) => matches!(
            d.code().as_deref(),
            Some("57P01" | "57P02" | "57P03" | "08000" | "08003" | "08006")
        ),
        _ => false,
    }
}

/// Turns a database error into a store error: connection trouble, timeouts, deadlocks and
/// serialization failures are [`StoreError::Unavailable`] (retry; every Loom write is safe to
/// retry), anything else [`StoreError::Storage`].
pub(crate) fn pe(e: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    // The server unreachable or going away (admin_shutdown, crash_shutdown, cannot_connect_now,
    // connection exceptions), or the transaction's own serialization_failure, deadlock_detected
    // or query_canceled (statement timeout), or lock_not_available (a lock timeout).
    let transient = unreachable(&e)
        || matches!(&e, E::Database(d) if matches!(d.code().as_deref(), Some("40001" | "40P01" | "57014" | "55P03")));
    let code = match &e {
        E::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    };
    if transient {
        StoreError::unavailable(BACKEND, e)
    } else if matches!(code.as_deref(), Some("28P01" | "28000")) {
        StoreError::Denied {
            backend: BACKEND,
            message: format!("the login was refused: {e}"),
        }
    } else if code.as_deref() == Some("3D000") {
        StoreError::Denied {
            backend: BACKEND,
            message: format!("no such database: {e}"),
        }
    } else {
        StoreError::storage(BACKEND, e)
    }
}

/// A name for this store's sessions, unique enough among the processes on one database.
fn origin() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{nanos:x}-{n}", std::process::id())
}

/// Like [`pe`], for the first connection: a TLS handshake that failed on the certificate is a
/// configuration error (retrying cannot help), said as such.
fn connect_error(e: sqlx::Error) -> StoreError {
    let certificate = match &e {
        sqlx::Error::Tls(_) => e.to_string().to_lowercase().contains("certificate"),
        sqlx::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::InvalidData
                && io.to_string().to_lowercase().contains("certificate")
        }
        _ => false,
    };
    if certificate {
        StoreError::InvalidRequest(format!(
            "PostgreSQL's TLS certificate was refused ({e}); trust its CA with \
             `sslrootcert=PATH` in the URL, or check the host name"
        ))
    } else {
        pe(e)
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/db?sslmode=require`, or a unix
    /// socket with `?host=/path/to/dir`) with the default options, creating the schema if needed.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connects with `options`.
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        Self::connect_inner(url, options, true).await
    }

    /// Connects to the store in `options.schema`, which must exist already (a process connected
    /// to it before): for tools that inspect a store, which must not create an empty one by
    /// mistake (a first connect creates the schema and records the store's partition count, 1
    /// unless it asks for more, and that count is fixed after). Anything else is
    /// [`StoreError::InvalidRequest`], and nothing is created. Nothing is migrated either: a
    /// schema of an older version than this build's is refused (a node's connect migrates it),
    /// so that a look with a newer tool never changes the schema under running nodes.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), loom_core::StoreError> {
    /// let options = loom_postgres::PostgresOptions { schema: "shop".into(), ..Default::default() };
    /// let url = "postgres://loom@127.0.0.1/app";
    /// let store = loom_postgres::PostgresStore::connect_existing(url, options).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_existing(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        Self::connect_inner(url, options, false).await
    }

    async fn connect_inner(
        url: &str,
        options: PostgresOptions,
        create: bool,
    ) -> Result<Self, StoreError> {
        let schema = options.schema.clone();
        let valid = !schema.is_empty()
            && schema.len() <= 48
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !schema.starts_with(|c: char| c.is_ascii_digit())
            && !schema.starts_with("pg_");
        if !valid {
            return Err(StoreError::InvalidRequest(format!(
                "PostgreSQL schema {schema:?} must be 1 to 48 of a-z, 0-9, _ (not starting with a digit or pg_)"
            )));
        }
        let timeout = format!("{}ms", options.statement_timeout.as_millis().max(1));
        let origin = origin();
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::InvalidRequest(format!("PostgreSQL URL: {e}")))?
            // A commit is acknowledged only once it is flushed (and, with synchronous standbys
            // configured, on them too), whatever the server's default for other clients.
            .options([
                ("statement_timeout", timeout.as_str()),
                // A lock is waited for within `statement_timeout` alone: a `lock_timeout` a
                // role or database carries would time out a batch waiting on a hot row, and
                // send its requests down the one-by-one path (`group.rs` `answer`).
                ("lock_timeout", "0"),
                // Every object of Loom's is named with its schema, and the functions' bodies
                // run under the session's path: with the default one ("$user", public), a
                // function another role of the database created in `public` with the exact
                // argument types of a built-in Loom calls bare (`unnest`, `array_agg`, ...)
                // would be called instead of it, as Loom's role (CVE-2018-1058), and could
                // decide a fence. `pg_temp` last, so that no temporary table shadows one.
                ("search_path", "pg_catalog, pg_temp"),
                ("synchronous_commit", "on"),
                // Who sent a wake-up (`schema_v2.sql`), so that the sender's listener skips it.
                ("loom.origin", origin.as_str()),
                // This store sends its signals itself, after commit (`signals.rs`).
                ("loom.signals", "client"),
                // Every function is written for READ COMMITTED (a statement after a lock wait
                // sees what the holder committed: the relay's moves, schema_v12.sql), whatever
                // the database's default.
                ("default_transaction_isolation", "read committed"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect.clone())
            .await
            .map_err(connect_error)?;
        let workers = group::workers(options.max_connections.max(1));
        // A statement is waited for as long as the server's own limit on it allows, and then
        // some: past that, the server is not answering at all.
        let pool = sql::Bounded {
            pool,
            within: options.statement_timeout.saturating_add(ANSWER_MARGIN),
        };
        let mut store = PostgresStore {
            appends: std::sync::Arc::new(group::appends(pool.clone(), &schema, workers)),
            turns: std::sync::Arc::new(group::turns(pool.clone(), &schema, workers)),
            leases: std::sync::Arc::new(group::leases(pool.clone(), &schema, workers)),
            signals: signals::Notifier::start(pool.clone(), &schema, origin.clone()),
            pool,
            schema,
            partitions: 1,
            relay: None,
            wakeups: None,
            completions: None,
            _listener: None,
        };
        if !create {
            // `schema` was checked above to be [a-z0-9_].
            let s = &store.schema;
            let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
                .bind(format!("{s}.schema_version"))
                .fetch_one(&store.pool)
                .await
                .map_err(pe)?;
            if found.is_none() {
                return Err(StoreError::InvalidRequest(format!(
                    "no Loom store in schema {s:?} of this database (no table {s}.schema_version): a node's first connect creates it"
                )));
            }
        }
        store.partitions = if create {
            store.migrate(options.partitions).await?
        } else {
            store.check_version(options.partitions).await?
        };
        if store.partitions > 1 {
            store.relay = Some(relay::Relay::start(
                store.pool.clone(),
                &store.schema,
                store.partitions,
                store.signals.clone(),
            ));
        }
        if options.notifications {
            let own = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(options.acquire_timeout)
                .connect_with(connect)
                .await
                .map_err(connect_error)?;
            let (rx, done, task) = signals::listen(&own, &store.schema, origin).await?;
            store.wakeups = Some(rx);
            store.completions = Some(done);
            store._listener = Some(std::sync::Arc::new(task));
        }
        if let Some(w) = store.durability().await?.warning {
            tracing::warn!("{w}");
        }
        Ok(store)
    }

    /// What the server's settings guarantee for this store's writes (see the crate
    /// documentation); a warning names any setting that can lose or corrupt acknowledged
    /// writes in a crash. Also logged at connect.
    pub async fn durability(&self) -> Result<Durability, StoreError> {
        let (fsync, synchronous_commit, full_page_writes): (String, String, String) =
            sqlx::query_as(
                "SELECT current_setting('fsync'), current_setting('synchronous_commit'), \
                 current_setting('full_page_writes')",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        let mut problems = Vec::new();
        if fsync != "on" {
            problems.push(
                "fsync is off: a machine crash can lose acknowledged writes and corrupt the database",
            );
        }
        if synchronous_commit == "off" {
            problems.push(
                "synchronous_commit is off for Loom's sessions: a crash can lose acknowledged writes",
            );
        }
        if full_page_writes != "on" {
            problems.push(
                "full_page_writes is off: a torn page after a power loss can corrupt the database",
            );
        }
        let warning =
            (!problems.is_empty()).then(|| format!("PostgreSQL: {}", problems.join("; ")));
        Ok(Durability {
            fsync,
            synchronous_commit,
            full_page_writes,
            warning,
        })
    }

    /// Creates the schema and its tables and functions, or checks that they are this build's;
    /// returns the store's partition count (recorded now for a store that has none yet).
    async fn migrate(&self, asked: Option<u32>) -> Result<u32, StoreError> {
        let version: String = sqlx::query_scalar("SELECT current_setting('server_version_num')")
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        supported_server(&version)?;
        let s = &self.schema;
        // A word the grammar reserves cannot name a schema in these statements unquoted.
        let reserved: Option<String> = sqlx::query_scalar(
            "SELECT catdesc FROM pg_get_keywords() WHERE word = $1 AND catcode IN ('R', 'T')",
        )
        .bind(s)
        .fetch_optional(&self.pool)
        .await
        .map_err(pe)?;
        if let Some(what) = reserved {
            return Err(StoreError::InvalidRequest(format!(
                "PostgreSQL schema {s:?} is a keyword SQL reserves ({what}); choose another name"
            )));
        }
        // The words PL/pgSQL reserves (`pl_reserved_kwlist.h`) that SQL does not: the
        // functions' bodies end a statement at them (`FOR r IN SELECT … FROM loop.f() LOOP`).
        const PLPGSQL_RESERVED: [&str; 9] = [
            "begin", "by", "declare", "execute", "foreach", "if", "loop", "strict", "while",
        ];
        if PLPGSQL_RESERVED.contains(&s.as_str()) {
            return Err(StoreError::InvalidRequest(format!(
                "PostgreSQL schema {s:?} is a keyword PL/pgSQL reserves (reserved in PL/pgSQL); choose another name"
            )));
        }
        let mut tx = self.pool.pool.begin().await.map_err(pe)?;
        // A migration may rightly take long (a step rewriting every row of an older store's
        // table), and a start waits for another node's: the session's `statement_timeout` (and
        // a `lock_timeout` a role may carry) would cut it off at every start, and roll it back
        // each time. It is said in the log while it lasts.
        sqlx::raw_sql("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0")
            .execute(&mut *tx)
            .await
            .map_err(pe)?;
        let _notice = tokio_util::task::AbortOnDropHandle::new(tokio::spawn({
            let s = s.to_owned();
            async move {
                loop {
                    tokio::time::sleep(MIGRATION_NOTICE).await;
                    tracing::warn!(schema = %s, "still migrating Loom's schema: another node is migrating it, a step rewrites a large table, or a transaction holds one of its tables (a lock on a table is waited for up to {MIGRATION_LOCK_WAIT:?})");
                }
            }
        }));
        // One migrator at a time per schema, across every process.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("loom schema {s}"))
            .execute(&mut *tx)
            .await
            .map_err(pe)?;
        // A table's lock still held after MIGRATION_LOCK_WAIT (an idle transaction holding
        // it, while every other user of the table queues behind the migration) ends the start
        // with the error.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET LOCAL lock_timeout = '{}s'",
            MIGRATION_LOCK_WAIT.as_secs()
        )))
        .execute(&mut *tx)
        .await
        .map_err(pe)?;
        // `s` was checked above to be [a-z0-9_]: the only text put into these statements.
        // `CREATE SCHEMA IF NOT EXISTS` needs the right to create schemas in the database even
        // when the schema exists, which a role given a schema made for it by its DBA lacks: it
        // is created only when it is not there, and so is the version table (which needs
        // the right to create in the schema).
        let (schema_there, table_there): (bool, bool) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1), \
             to_regclass(quote_ident($1) || '.schema_version') IS NOT NULL",
        )
        .bind(s)
        .fetch_one(&mut *tx)
        .await
        .map_err(pe)?;
        let mut create = String::new();
        if !schema_there {
            create.push_str(&format!("CREATE SCHEMA IF NOT EXISTS {s}; "));
        }
        if !table_there {
            create.push_str(&format!(
                "CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer PRIMARY KEY);"
            ));
        }
        if !create.is_empty() {
            sqlx::raw_sql(sqlx::AssertSqlSafe(create))
                .execute(&mut *tx)
                .await
                .map_err(pe)?;
        }
        let version: Option<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT max(version) FROM {s}.schema_version"
        )))
        .fetch_one(&mut *tx)
        .await
        .map_err(pe)?;
        let from = version.unwrap_or(0);
        if !(0..=SCHEMA_VERSION).contains(&from) {
            return Err(StoreError::InvalidRequest(format!(
                "schema {s} has Loom schema version {from}; this build knows versions up to {SCHEMA_VERSION}"
            )));
        }
        for (v, migration) in MIGRATIONS.iter().enumerate().skip(from as usize) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(migration.replace("{s}", s)))
                .execute(&mut *tx)
                .await
                .map_err(pe)?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {s}.schema_version VALUES ($1)"
            )))
            .bind(v as i32 + 1)
            .execute(&mut *tx)
            .await
            .map_err(pe)?;
        }
        if from < SCHEMA_VERSION {
            tracing::info!(schema = %s, from, to = SCHEMA_VERSION, "migrated Loom's schema");
        }
        let recorded = recorded_partitions(&mut *tx, s).await?;
        let partitions = partitions(Some(&mut tx), recorded, s, asked).await?;
        tx.commit().await.map_err(pe)?;
        Ok(partitions)
    }

    /// For a store opened as existing: checks, without writing, that the schema is this build's
    /// version; returns its partition count. An older schema is refused rather than migrated:
    /// a look with a newer `loom` must not change the schema under the nodes that run on it.
    async fn check_version(&self, asked: Option<u32>) -> Result<u32, StoreError> {
        let s = &self.schema;
        let version: Option<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT max(version) FROM {s}.schema_version"
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(pe)?;
        let at = version.unwrap_or(0);
        if at > SCHEMA_VERSION {
            return Err(StoreError::InvalidRequest(format!(
                "schema {s} has Loom schema version {at}; this build knows versions up to \
                 {SCHEMA_VERSION}: use a `loom` of the nodes' build"
            )));
        }
        if at < SCHEMA_VERSION {
            return Err(StoreError::InvalidRequest(format!(
                "schema {s} has Loom schema version {at}, older than this build's {SCHEMA_VERSION}; \
                 it is not migrated by a command that only opens it: use the `loom` of the nodes' \
                 build, or start a node of this build first (a node's connect migrates it)"
            )));
        }
        // At this version a store's count is recorded when it is created (`migrate`, in the
        // same transaction): read here, never made.
        let recorded = recorded_partitions(&self.pool, s).await?;
        partitions(None, recorded, s, asked).await
    }

    /// The schema this store uses.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Drops the schema and everything in it (for tools and tests that clean up what they made).
    pub async fn destroy(&self) -> Result<(), StoreError> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await
        .map_err(pe)?;
        Ok(())
    }
}

/// The partition count the store in schema `s` recorded when it was created, if any.
async fn recorded_partitions<'c>(
    db: impl sqlx::Executor<'c, Database = sqlx::Postgres>,
    s: &str,
) -> Result<Option<i32>, StoreError> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT n FROM {s}.partitions")))
        .fetch_optional(db)
        .await
        .map_err(pe)
}

/// The store's partition count: what it `recorded` when it was created, else what `asked` (1
/// or 32, default 1), recorded now through `tx`, the migrating transaction (which holds the
/// schema's migrator lock, so two first connects cannot record two counts); refused without
/// one (a store only opened writes nothing). A store that already holds actors cannot take 32:
/// its event lanes are named for one partition.
async fn partitions(
    tx: Option<&mut sqlx::PgConnection>,
    recorded: Option<i32>,
    s: &str,
    asked: Option<u32>,
) -> Result<u32, StoreError> {
    use loom_core::partition::SHARED_STORE_PARTITIONS;
    if let Some(n) = asked
        && n != 1
        && n != SHARED_STORE_PARTITIONS
    {
        return Err(StoreError::InvalidRequest(format!(
            "a PostgreSQL store has 1 or {SHARED_STORE_PARTITIONS} partitions, not {n}: its \
             partitions are the {SHARED_STORE_PARTITIONS} that nodes own"
        )));
    }
    match (recorded, asked) {
        (Some(has), Some(n)) if has as u32 != n => Err(StoreError::InvalidRequest(format!(
            "the PostgreSQL store in schema {s} has {has} partition(s), not {n}: the count is \
             fixed when a store is created (by its first connect, 1 unless it asked for \
             {SHARED_STORE_PARTITIONS}); use a new schema for {n}"
        ))),
        (Some(has), _) => Ok(has as u32),
        (None, asked) => {
            let Some(tx) = tx else {
                return Err(StoreError::InvalidRequest(format!(
                    "schema {s} records no partition count (table {s}.partitions is empty): a \
                     node's connect records it"
                )));
            };
            let n = asked.unwrap_or(1);
            // Actors, or nodes (of an older build, still connected, that would send straight
            // into other partitions' mailboxes and name event lanes for one partition).
            let used: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.mailbox) OR EXISTS (SELECT 1 FROM {s}.journal_meta) \
                 OR EXISTS (SELECT 1 FROM {s}.members) OR EXISTS (SELECT 1 FROM {s}.leases)"
            )))
            .fetch_one(&mut *tx)
            .await
            .map_err(pe)?;
            if n > 1 && used {
                return Err(StoreError::InvalidRequest(format!(
                    "the PostgreSQL store in schema {s} already holds actors or nodes of one \
                     partition: a store's partition count is fixed when it is created; use a new \
                     schema for {n}"
                )));
            }
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {s}.partitions (n) VALUES ($1)"
            )))
            .bind(n as i32)
            .execute(&mut *tx)
            .await
            .map_err(pe)?;
            Ok(n)
        }
    }
}

/// The server settings that decide whether an acknowledged write survives a crash, as
/// [`PostgresStore::durability`] read them (for this store's sessions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durability {
    /// `fsync`.
    pub fsync: String,
    /// `synchronous_commit`, as Loom's sessions run (Loom sets `on`).
    pub synchronous_commit: String,
    /// `full_page_writes`.
    pub full_page_writes: String,
    /// Why acknowledged writes could be lost or corrupted, if they could.
    pub warning: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_12_are_refused_by_name() {
        for ok in ["120000", "150004", "170000\n"] {
            assert!(supported_server(ok).is_ok(), "{ok}");
        }
        for (old, name) in [("110005", "PostgreSQL 11 "), ("90624", "PostgreSQL 9.6 ")] {
            match supported_server(old) {
                Err(StoreError::InvalidRequest(m)) => {
                    assert!(m.contains(name) && m.contains("12 or later"), "{m}")
                }
                other => panic!("{old}: {other:?}"),
            }
        }
        assert!(matches!(
            supported_server("fifteen"),
            Err(StoreError::InvalidRequest(m)) if m.contains("fifteen")
        ));
    }
}
