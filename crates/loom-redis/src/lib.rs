//! # loom-redis
//!
//! Loom's store on Redis, for many nodes: journals on streams with explicit ids (`<seq>-0`, so
//! Redis itself refuses a non-increasing id), mailboxes on streams holding their current and
//! undelivered messages in order (the mailbox's meta hash says which entry is out and until
//! when; `XRANGE` hands the first out, `XDEL` settles it) with delayed messages in a sorted
//! set, leases with `SET … PX` and a fencing token from `INCR`, idempotency records with
//! `SET NX PX`. Every conditional or multi-key operation is one Lua script (`loom.lua`, which
//! also documents the key layout), so it is atomic.
//!
//! Concurrent requests from many actors share the connection: the connection manager pipelines
//! them, and concurrent calls of the hot path's scripts (appends, turns, enqueues, mailbox
//! leases and settles, lookups) go as one script call per batch (`group.rs`), so one
//! `appendfsync always` flush and one script call serve many requests.
//!
//! ## What Redis's persistence settings guarantee
//!
//! A Loom store is only as durable as the server:
//! - `appendonly yes` with `appendfsync always`: every acknowledged write is on disk before
//!   Redis answers; nothing acknowledged is lost when the server or its machine crashes. This is
//!   the setting Loom's promises assume, and the one its tests run with.
//! - `appendonly yes` with `appendfsync everysec` (Redis's default for AOF): a machine crash
//!   loses up to one second of acknowledged writes.
//! - `appendonly no` (RDB snapshots only, or nothing): a restart loses everything written since
//!   the last snapshot — acknowledged data is lost.
//!
//! - `maxmemory-policy` other than `noeviction`: a server that reaches `maxmemory` deletes
//!   keys, journal entries and waiting messages among them (`allkeys-*`), or the keys with a
//!   TTL, recorded replies and leases (`volatile-*`). With `maxmemory 0` (no limit, the
//!   default) nothing is deleted yet, but the warning stands: a limit set later starts it.
//!
//! - `no-appendfsync-on-rewrite yes`: while a snapshot (`BGSAVE`) or an AOF rewrite runs,
//!   writes are acknowledged before their fsync, and a machine crash loses them.
//!
//! [`RedisStore::connect`] reads the server's settings (of every primary of a cluster; from
//! `INFO` where `CONFIG` is disabled, which says nothing of `appendfsync`) and logs a warning
//! for all but the first (with `noeviction`).
//!
//! ## Files
//!
//! The same map as the embedded store's and PostgreSQL's, one concern per file: `journal.rs`,
//! `mailbox.rs`, `lease.rs`, `idempotency.rs`, `turn.rs` (the [`loom_core::Store`] methods),
//! `park.rs`, `membership.rs`, `relay.rs` (as the embedded store's); `group.rs` sends concurrent
//! calls of the hot path's scripts as one script call (group commit); `conn.rs` is the
//! connection to one primary or a cluster, `scan.rs` the commands that span slots; `resp.rs` decodes replies, `keys.rs` names keys, `loom.lua` holds
//! the scripts, `lua.rs` cuts from it each script's functions.
//!
//! ## Deployment
//!
//! A store of one partition (the default on one primary) writes other actors' mailboxes in a
//! turn's script and keeps its indexes in global keys, so it needs a single Redis primary (with
//! replicas for failover: [`RedisOptions::replication`] makes every write wait for them, so that
//! a failover to one keeps what was acknowledged). A store created with [`RedisOptions::partitions`] above 1 keeps each
//! turn in its actor's partition: a message to an actor of another partition goes through the
//! sender partition's outbox and the relay (`relay.rs`), and every key of a partition carries
//! its hash tag (`keys.rs`), so every script touches one slot. Such a store runs on one primary
//! or on a Redis Cluster ([`RedisStore::connect_cluster`]; `conn.rs`, `scan.rs` and `group.rs`
//! split what spans slots).
//!
//! ```no_run
//! # async fn f() -> Result<(), loom_core::StoreError> {
//! let store = loom_redis::RedisStore::connect("redis://127.0.0.1:6379/").await?;
//! # Ok(()) }
//! ```

mod conn;
mod group;
mod idempotency;
mod journal;
mod keys;
mod lease;
mod lua;
mod mailbox;
mod membership;
mod park;
mod relay;
mod resp;
mod scan;
mod signals;
mod turn;

use std::sync::Arc;
use std::time::Duration;

use conn::Conn;
pub use conn::Replication;
use loom_core::StoreError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use keys::Keys;

pub(crate) const BACKEND: &str = "redis";

/// Settings of a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Every key starts with `<prefix>:` (default `loom`); nothing outside it is read or written.
    pub prefix: String,
    /// How long to wait for a reply before failing with [`StoreError::Unavailable`] (default 10 s).
    pub response_timeout: Duration,
    /// How long to wait for a connection (default 5 s).
    pub connect_timeout: Duration,
    /// For `rediss://`: the CA certificate (PEM) that signed the server's certificate, when it
    /// is not in the system's trust store. `None` uses the system's roots.
    pub tls_root_cert: Option<Vec<u8>>,
    /// How many partitions a new store is cut into (`None`: 1, or what the store under
    /// `prefix` already has). Fixed when the store is created and recorded in it (`P:partitions`);
    /// asking an existing store for another count is [`StoreError::InvalidRequest`]. With more
    /// than one, a turn writes only its actor's partition and a message to an actor of another
    /// goes through the sender partition's outbox and relay (`relay.rs`), as on a partitioned
    /// embedded store: the layout Redis Cluster needs, where a script may touch one slot only.
    pub partitions: Option<u32>,
    /// Replicas that must hold each write before it is acknowledged (`None`: the primary alone,
    /// the default). Redis copies writes to replicas asynchronously, so without this a failover
    /// to a replica can lose writes the primary acknowledged; with it, every request's reply
    /// waits for a `WAIT` (shared by the requests of a moment, `conn.rs`) to see that many
    /// replicas hold what the store's connection wrote, and a request they do not acknowledge
    /// in time ([`Replication::timeout`], up to about three of them) fails with
    /// [`StoreError::Unavailable`] (it may or may not have happened). A read may still see
    /// another process's write whose wait has not ended. The replicas should persist as the
    /// primary does (`appendfsync always`), and failover should promote one that acknowledged.
    /// The client needs the commands `INFO`, `CLIENT ID` and `WAIT` (checked at connect). One
    /// primary only: a cluster store refuses it.
    pub replication: Option<Replication>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: "loom".to_owned(),
            response_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            tls_root_cert: None,
            partitions: None,
            replication: None,
        }
    }
}

/// The Redis store; cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    /// Reply signals and wake-ups between processes (`signals.rs`).
    signals: Arc<signals::Signals>,
    /// Group commit of the batched scripts' calls (`group.rs`).
    group: Arc<group::Group>,
    keys: Keys,
    scripts: &'static Scripts,
    /// The outbox relay of a store of several partitions (`relay.rs`).
    relay: Option<Arc<relay::Relay>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisStore({})", self.keys.pattern())
    }
}

const LUA: &str = include_str!("loom.lua");

/// The layout of this build's keys, recorded under `P:layout` once a store is in it: a ready
/// index per kind and partition.
const LAYOUT: &str = "ready-per-partition";

/// The stored format of this build's keys and values, recorded under `P:format` by a node's
/// connect. A build that changes what is stored raises it (and moves what an older format
/// kept, as [`RedisStore::upgrade`] does); every build refuses a store whose format is above
/// its own before it writes anything, so an older node or `loom` started after an upgrade is
/// told so instead of reading a newer shape as its own, or "upgrading" it back. A store
/// without the key is of a build before it (format 1: its one-partition layout is told by
/// `P:layout`).
pub const STORED_FORMAT: u32 = 1;

fn script(entry: &str) -> Script {
    Script::new(&lua::script_source(LUA, entry))
}

/// One entry point of `loom.lua`: its name (which `batch` calls it by), its own script, and
/// whether its calls go through the group commit (`group.rs`).
pub(crate) struct Entry {
    pub(crate) name: &'static str,
    pub(crate) script: Script,
    pub(crate) batched: bool,
    /// Whether a call may touch keys of several partitions of a partitioned store (reading
    /// several partitions' ready indexes, renewing leases of several; `cross_slot` below):
    /// every other call touches one partition's keys, one slot of a cluster.
    pub(crate) cross_slot: bool,
}

/// Declares [`Scripts`], one [`Entry`] per name, and [`BATCHED`], the names `batch` runs.
macro_rules! scripts {
    (batched: $($b:ident),* ; alone: $($a:ident),* $(,)?) => {
        /// Every script: each entry point alone, and `batch`, which runs the batched ones.
        pub(crate) struct Scripts {
            $(pub(crate) $b: Entry,)*
            $(pub(crate) $a: Entry,)*
            pub(crate) batch: Script,
        }

        impl Scripts {
            fn new() -> Self {
                Scripts {
                    $($b: Entry {
                        name: stringify!($b),
                        script: script(stringify!($b)),
                        batched: true,
                        cross_slot: CROSS_SLOT.contains(&stringify!($b)),
                    },)*
                    $($a: Entry {
                        name: stringify!($a),
                        script: script(stringify!($a)),
                        batched: false,
                        cross_slot: CROSS_SLOT.contains(&stringify!($a)),
                    },)*
                    batch: script("batch"),
                }
            }
        }

        /// The entry points that go through the group commit, which `batch`'s table in
        /// `loom.lua` must list, and the others.
        #[cfg(test)]
        pub(crate) const BATCHED: &[&str] = &[$(stringify!($b)),*];
        #[cfg(test)]
        pub(crate) const ALONE: &[&str] = &[$(stringify!($a)),*];
    };
}

// Batched: the calls of the hot path, many at once under load, each with a small reply.
// Alone: rarer calls, those whose reply can be large (a snapshot, a mailbox's messages, a ready
// list), and lease renewals and heartbeats, which should not wait behind others.
scripts!(
    batched: append, turn, enqueue, enqueue_once, lease, settle, lookup;
    alone: save_snapshot, load_snapshot, trim, compact, delete, enqueue_event, cancel, retire,
    relay_move,
    requeue, ready_actors, acquire, lease_cas, renew_many, holder, reserve, abandon, begin_at,
    messages, messages_frames, park, unpark, migrate_ready, split_ready, heartbeat, leave, members,
    record_format, clock,
);

/// The entry points whose calls may touch several partitions' keys on one primary: the ready
/// scan (one call reads every partition asked for, sharing out its limit), lease renewals (one
/// call renews a node's leases), and the moves of a store of one partition's older layouts.
/// On a cluster the first two are called once per slot, as the group commit's `batch` is
/// (`group.rs`), and the moves never run (a store on a cluster is partitioned from the start).
const CROSS_SLOT: &[&str] = &["ready_actors", "renew_many", "migrate_ready", "split_ready"];

/// The scripts, made once for every store (they are the same text).
static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(Scripts::new);

/// A replication setting a store can keep: at least one replica, waited for a while of which
/// three (the longest a request can wait, `Replication::timeout`) end before the response
/// timeout does (else requests would time out before their wait does).
fn check_replication(r: Replication, response_timeout: Duration) -> Result<(), StoreError> {
    if r.replicas == 0 {
        return Err(StoreError::InvalidRequest(
            "replication asks for 0 replicas: leave RedisOptions::replication None instead".into(),
        ));
    }
    if r.timeout.is_zero() || r.timeout.saturating_mul(3) >= response_timeout {
        return Err(StoreError::InvalidRequest(format!(
            "the wait for replicas ({:?}) must be above 0 and under a third of the response timeout ({response_timeout:?})",
            r.timeout
        )));
    }
    Ok(())
}

/// Whether the server refused a command because Loom's ACL user may not run it (a script's
/// call of one answers "can't run this command").
fn not_permitted(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM") || e.to_string().contains("can't run this command")
}

/// Turns a client error into a store error: a refused login or command is
/// [`StoreError::Denied`], connection trouble [`StoreError::Unavailable`] (the request may or
/// may not have run; every Loom write is safe to retry), anything else
/// [`StoreError::Storage`].
pub(crate) fn re(e: redis::RedisError) -> StoreError {
    if e.kind() == redis::ErrorKind::AuthenticationFailed {
        return StoreError::Denied {
            backend: BACKEND,
            message: format!("the login was refused: {e}"),
        };
    }
    // An ACL user without a command Loom needs: said as what to change, not as a failure.
    if not_permitted(&e) {
        return StoreError::Denied {
            backend: BACKEND,
            message: format!(
                "the Redis user may not run a command Loom needs ({e}): besides reading and \
                 writing the store's keys, Loom's scripts call TIME (@fast), its nodes PUBLISH \
                 and SUBSCRIBE to the store's channels (@pubsub), and load and run scripts \
                 (@scripting); give the user +@all on the store's keys and channels"
            ),
        };
    }
    use redis::{ErrorKind, ServerErrorKind};
    // A server still loading its data, or between roles, answers again shortly; so does a
    // cluster whose slots are moving or whose primary is failing over.
    let busy = matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::ClusterDown
        ) | ErrorKind::ClusterConnectionNotFound
    );
    if busy
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_connection_refusal()
    {
        StoreError::unavailable(BACKEND, e)
    } else {
        StoreError::storage(BACKEND, e)
    }
}

impl RedisStore {
    /// Connects to `url` with the default options: `redis://host:port/db`, `rediss://…` for TLS,
    /// `unix:///path` or `redis+unix:///path` for a socket. Credentials go in the URL:
    /// `redis://user:password@host/` (ACL user; omit `user` for `requirepass`), or
    /// `redis+unix:///path?user=…&pass=…`. A refused login is [`StoreError::Denied`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, RedisOptions::default()).await
    }

    /// Connects with `options`.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self, StoreError> {
        Self::connect_one(url, options, Create::Yes).await
    }

    /// Connects to the store under `options.prefix`, which must exist already (a process
    /// connected to it before, or it holds keys of an older build): for tools that inspect a
    /// store, which must not create an empty one by mistake (a first connect records the
    /// store's partition count, 1 unless it asks for more, and that count is fixed after).
    /// Anything else is [`StoreError::InvalidRequest`], and nothing is written then; so is a
    /// store whose keys are in an older build's layout, which only a node's connect moves (a
    /// look must not change the store under the older nodes running on it), and one of a newer
    /// build's [`STORED_FORMAT`].
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), loom_core::StoreError> {
    /// let options = loom_redis::RedisOptions { prefix: "shop".into(), ..Default::default() };
    /// let store = loom_redis::RedisStore::connect_existing("redis://127.0.0.1/", options).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_existing(url: &str, options: RedisOptions) -> Result<Self, StoreError> {
        Self::connect_one(url, options, Create::No).await
    }

    async fn connect_one(
        url: &str,
        options: RedisOptions,
        create: Create,
    ) -> Result<Self, StoreError> {
        check_prefix(&options.prefix)?;
        if let Some(r) = options.replication {
            check_replication(r, options.response_timeout)?;
        }
        let bad_url = |e: redis::RedisError| {
            StoreError::InvalidRequest(format!("Redis URL {}: {e}", redact(url)))
        };
        let client = match &options.tls_root_cert {
            Some(ca) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )
            .map_err(bad_url)?,
            None => redis::Client::open(url).map_err(bad_url)?,
        };
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(options.response_timeout))
            .set_connection_timeout(Some(options.connect_timeout))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(re)?;
        let replicas = match options.replication {
            Some(r) => Some(
                conn::Replicas::start(&mut conn.clone(), r)
                    .await
                    .map_err(|e| match e.kind() {
                        // An ACL user without one of these commands: `Denied`, as every
                        // command refused Loom is.
                        _ if not_permitted(&e) => re(e),
                        // Refused by the server otherwise (a replica): a setting to fix.
                        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension => {
                            StoreError::InvalidRequest(format!(
                                "waiting for replicas (RedisOptions::replication) needs the commands INFO, CLIENT ID and WAIT on a primary: {e}"
                            ))
                        }
                        _ => re(e),
                    })?,
            ),
            None => None,
        };
        Self::open(Conn::One(conn, replicas), vec![client], options, create).await
    }

    /// Connects to a Redis Cluster through `nodes` (`redis://host:port/` each; any one that
    /// answers tells the client the rest). The store is cut into partitions, each under one
    /// hash tag, so every script of a partition runs on the primary of its slot
    /// ([`RedisOptions::partitions`]; a new store gets
    /// [`SHARED_STORE_PARTITIONS`](loom_core::partition::SHARED_STORE_PARTITIONS) unless it asks
    /// for another count, and a store of one partition cannot live on a cluster). Reply
    /// signals and wake-ups subscribe on one node at a time, the next when it cannot be reached
    /// (a cluster delivers a `PUBLISH` to every node's subscribers).
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), loom_core::StoreError> {
    /// let nodes = ["redis://10.0.0.1:7000/".to_owned(), "redis://10.0.0.2:7000/".to_owned()];
    /// let store = loom_redis::RedisStore::connect_cluster(&nodes, Default::default()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_cluster(
        nodes: &[String],
        options: RedisOptions,
    ) -> Result<Self, StoreError> {
        Self::connect_nodes(nodes, options, Create::Yes).await
    }

    /// [`connect_cluster`](Self::connect_cluster) to a store that must exist already, as
    /// [`connect_existing`](Self::connect_existing).
    pub async fn connect_cluster_existing(
        nodes: &[String],
        options: RedisOptions,
    ) -> Result<Self, StoreError> {
        Self::connect_nodes(nodes, options, Create::No).await
    }

    async fn connect_nodes(
        nodes: &[String],
        options: RedisOptions,
        create: Create,
    ) -> Result<Self, StoreError> {
        check_prefix(&options.prefix)?;
        let first = nodes.first().ok_or_else(|| {
            StoreError::InvalidRequest("a Redis Cluster store needs at least one node".into())
        })?;
        let bad_url = |e: redis::RedisError| {
            StoreError::InvalidRequest(format!("Redis Cluster nodes {}: {e}", redact(first)))
        };
        if options.tls_root_cert.is_some() {
            return Err(StoreError::InvalidRequest(
                "TLS with a private CA is not supported on a Redis Cluster store yet".into(),
            ));
        }
        if options.replication.is_some() {
            return Err(StoreError::InvalidRequest(
                "waiting for replicas (RedisOptions::replication) is supported on one primary, not on a Redis Cluster store yet".into(),
            ));
        }
        // No retries by the client: it would send a script again after a dropped connection,
        // which may have run it already (an append would then answer "conflict" for a write
        // it made). A failed request is Unavailable, and the caller retries as it does on one
        // primary.
        let cluster = redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
            .connection_timeout(options.connect_timeout)
            .response_timeout(options.response_timeout)
            .retries(0)
            .build()
            .map_err(bad_url)?;
        let conn = cluster.get_async_connection().await.map_err(re)?;
        let clients = nodes
            .iter()
            .map(|n| redis::Client::open(n.as_str()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad_url)?;
        if options.partitions == Some(1) {
            return Err(StoreError::InvalidRequest(
                "a store on a Redis Cluster has more than one partition: each partition is one hash slot"
                    .into(),
            ));
        }
        Self::open(Conn::Cluster(conn), clients, options, create).await
    }

    /// The store on `conn`; `clients` subscribe to its signals.
    async fn open(
        conn: Conn,
        clients: Vec<redis::Client>,
        options: RedisOptions,
        create: Create,
    ) -> Result<Self, StoreError> {
        // Before anything is written: the partition count is recorded next.
        if create == Create::No && !exists(&mut conn.clone(), &options.prefix).await? {
            return Err(StoreError::InvalidRequest(format!(
                "no Loom store under prefix {:?} on this server (no key {0}:partitions, nothing under {0}:*): a node's first connect creates it",
                options.prefix
            )));
        }
        let format = stored_format(&mut conn.clone(), &options.prefix).await?;
        let partitions = partitions(&conn, &options, create).await?;
        if conn.is_cluster() && partitions == 1 {
            return Err(StoreError::InvalidRequest(format!(
                "the store under prefix {:?} has one partition, which cannot live on a Redis Cluster",
                options.prefix
            )));
        }
        let keys = Keys::new(&options.prefix, partitions);
        let scripts: &'static Scripts = &SCRIPTS;
        let signals = Arc::new(signals::Signals::new(
            clients,
            conn.clone(),
            keys.done(),
            keys.wake(),
        ));
        let relay = (partitions > 1)
            .then(|| relay::Relay::start(conn.clone(), keys.clone(), scripts, signals.clone()));
        let store = RedisStore {
            group: Arc::new(group::start(conn.clone(), options.response_timeout)),
            signals,
            conn,
            keys,
            scripts,
            relay,
        };
        store.check_persistence().await;
        // Every script reads the server's clock: a user that may not is refused here, on every
        // primary of a cluster (each has its own users), by a key of each partition's slot.
        let mut slots = vec![store.keys.format()];
        if store.conn.is_cluster() {
            slots.extend((0..store.keys.partitions()).map(|p| store.keys.outbox(p).1));
        }
        for key in &slots {
            store.run(&store.scripts.clock, &[key], Vec::new()).await?;
        }
        if format != Some(STORED_FORMAT) {
            // Older layouts were of one partition, and never on a cluster.
            if partitions == 1 {
                store.upgrade(create).await?;
            }
            if create == Create::Yes {
                // Only over an older format or none: a newer build that recorded its own
                // since the check above keeps it, and this connect is refused.
                let format = store.keys.format();
                let r = store
                    .run(
                        &store.scripts.record_format,
                        &[&format],
                        vec![resp::s(STORED_FORMAT)],
                    )
                    .await?;
                if resp::status(&r) == "newer" {
                    let f = resp::bytes(r.get(1)).unwrap_or_default();
                    return Err(newer_format(&options.prefix, &String::from_utf8_lossy(&f)));
                }
            }
        }
        Ok(store)
    }

    /// Moves what older builds kept in another shape (once: a store of this layout says so in
    /// `P:layout`, and nothing is looked for after that). Stop the nodes of an older build
    /// before the first node of this one connects: what they write in their shape after that
    /// is not moved. A connect that only opens the store ([`Create::No`]) moves nothing: it
    /// refuses a store that has something to move, as the PostgreSQL store refuses an older
    /// schema, so that a look with a newer `loom` does not change the store under the older
    /// nodes that run on it.
    async fn upgrade(&self, create: Create) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let layout: Option<String> = redis::cmd("GET")
            .arg(self.keys.layout())
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        if layout.as_deref() == Some(LAYOUT) {
            return Ok(());
        }
        let legacy = self.keys.legacy_ready();
        let exists: bool = redis::cmd("EXISTS")
            .arg(&legacy)
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        if create == Create::No {
            if exists || !self.per_kind_ready_indexes().await?.is_empty() {
                return Err(StoreError::InvalidRequest(format!(
                    "the Redis store under prefix {:?} keeps its ready index in an older build's layout; \
                     it is not moved by a command that only opens it: use the `loom` of the \
                     nodes' build, or start a node of this build first (a node's connect moves \
                     it)",
                    self.keys.prefix()
                )));
            }
            return Ok(());
        }
        if exists {
            let r = self
                .run(&self.scripts.migrate_ready, &[&legacy], vec![])
                .await?;
            tracing::info!(
                mailboxes = ?r.get(1),
                "moved the ready index to one per actor kind"
            );
        }
        // Listed after the move above, which makes per-kind indexes of the oldest one.
        self.split_ready_by_partition().await?;
        let _: () = redis::cmd("SET")
            .arg(self.keys.layout())
            .arg(LAYOUT)
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        Ok(())
    }

    /// Moves each per-kind ready index of older builds (`P:ready:K`) into the per-partition
    /// ones (`P:ready:K:p`), a page at a time, each page in one script call (`split_ready` in
    /// `loom.lua`), so an interrupted move is picked up by the next connect.
    async fn split_ready_by_partition(&self) -> Result<(), StoreError> {
        for key in self.per_kind_ready_indexes().await? {
            let mut moved = 0;
            loop {
                let r = self
                    .run(&self.scripts.split_ready, &[&key], vec![resp::s(1000)])
                    .await?;
                let n = resp::number(r.get(1), "ready index members moved")?;
                if n == 0 {
                    break;
                }
                moved += n;
            }
            tracing::info!(index = %key, mailboxes = moved, "moved a ready index to one per partition");
        }
        Ok(())
    }

    /// The per-kind ready indexes of older builds (`P:ready:K`) under this store's prefix.
    async fn per_kind_ready_indexes(
        &self,
    ) -> Result<std::collections::BTreeSet<String>, StoreError> {
        Ok(scan::keys(&self.conn, &self.keys.ready_pattern())
            .await?
            .into_iter()
            .filter(|k| self.keys.kind_ready_of(k).is_some())
            .collect())
    }

    /// One node's persistence and eviction settings: by `CONFIG GET`, or where managed services
    /// disable `CONFIG`, what `INFO` says of them (`aof_enabled`, `maxmemory_policy`,
    /// `maxmemory`; it says nothing of `appendfsync` or `no-appendfsync-on-rewrite`).
    async fn node_settings(&self, node: &Option<(String, u16)>) -> NodeSettings {
        // A setting the server does not give (CONFIG refused, or the node not answering) is
        // `None`, which the warning reads as "could not read": a check that writes nothing,
        // whose failure is reported, not lost.
        let get = |name: &'static str| async move {
            let mut c = redis::cmd("CONFIG");
            c.arg("GET").arg(name);
            let v = scan::on_node(&self.conn, node, c).await.ok()?;
            let v: Vec<String> = redis::from_redis_value(v).ok()?;
            v.get(1).cloned()
        };
        let mut s = NodeSettings {
            appendonly: get("appendonly").await,
            appendfsync: get("appendfsync").await,
            no_fsync_on_rewrite: get("no-appendfsync-on-rewrite").await,
            maxmemory_policy: get("maxmemory-policy").await,
            maxmemory: get("maxmemory").await,
        };
        if s.appendonly.is_none() || s.maxmemory_policy.is_none() {
            let mut c = redis::cmd("INFO");
            c.arg("persistence").arg("memory");
            let info = scan::on_node(&self.conn, node, c)
                .await
                .ok()
                .and_then(|v| redis::from_redis_value::<String>(v).ok())
                // INFO refused too: every field unread, and the warning says so.
                .unwrap_or_default();
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
                    .map(str::to_owned)
            };
            s.appendonly = s.appendonly.or_else(|| {
                field("aof_enabled").map(|v| if v == "1" { "yes" } else { "no" }.to_owned())
            });
            s.maxmemory_policy = s.maxmemory_policy.or_else(|| field("maxmemory_policy"));
            s.maxmemory = s.maxmemory.or_else(|| field("maxmemory"));
        }
        s
    }

    /// What the server's persistence and eviction settings guarantee (see the crate
    /// documentation): of the primary, or of every primary of a cluster (each needs them;
    /// the fields are the first's, the warning names each primary it is about).
    pub async fn durability(&self) -> Durability {
        let nodes = match scan::nodes(&self.conn).await {
            Ok(n) => n,
            Err(e) => {
                return Durability {
                    appendonly: None,
                    appendfsync: None,
                    maxmemory_policy: None,
                    warning: Some(format!(
                        "could not list the cluster's primaries to read their persistence settings: {e}"
                    )),
                };
            }
        };
        let mut first = None;
        let mut warnings = Vec::new();
        for node in &nodes {
            let s = self.node_settings(node).await;
            if let Some(w) = s.warning() {
                warnings.push(match node {
                    Some((host, port)) => format!("primary {host}:{port}: {w}"),
                    None => w,
                });
            }
            first.get_or_insert(s);
        }
        // No node listed: nothing read, which the fields (all `None`) say.
        let first = first.unwrap_or_default();
        Durability {
            appendonly: first.appendonly,
            appendfsync: first.appendfsync,
            maxmemory_policy: first.maxmemory_policy,
            warning: (!warnings.is_empty()).then(|| warnings.join("; ")),
        }
    }

    /// Warns when the server is configured so that acknowledged writes can be lost (persistence
    /// or eviction).
    async fn check_persistence(&self) {
        if let Some(w) = self.durability().await.warning {
            tracing::warn!("{w}");
        }
    }

    /// Runs `entry` with `keys` and `args`, in the next group commit (`group.rs`) if it is
    /// batched; its reply.
    pub(crate) async fn run(
        &self,
        entry: &'static Entry,
        keys: &[&str],
        args: Vec<Vec<u8>>,
    ) -> Result<Vec<Value>, StoreError> {
        // On a cluster even the cross-slot entries are called once per slot (lease.rs,
        // mailbox.rs `ready_in`).
        debug_assert!(
            self.keys.partitions() == 1
                || (entry.cross_slot && !self.conn.is_cluster())
                || keys::one_slot(keys),
            "{} of a partitioned store touches keys of several slots: {keys:?}",
            entry.name
        );
        if !entry.batched {
            let mut conn = self.conn.clone();
            return group::array(group::invoke(&mut conn, &entry.script, keys, args).await?);
        }
        group::Call {
            entry,
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            args,
        }
        .submit(&self.group)
        .await
    }

    /// The first `limit` members after `after` of the sorted sets `sets` (score 0, so in id
    /// order; one per partition), as one list in id order.
    pub(crate) async fn listed(
        &self,
        sets: &[String],
        after: Option<&loom_core::ActorId>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let min = match after {
            Some(a) => format!("({a}"),
            None => "-".to_owned(),
        };
        let cmds = sets
            .iter()
            .map(|set| {
                let mut c = redis::cmd("ZRANGEBYLEX");
                c.arg(set).arg(&min).arg("+").arg("LIMIT").arg(0).arg(limit);
                c
            })
            .collect();
        let per_set: Vec<Vec<String>> = scan::each(&self.conn, cmds).await?;
        let mut all: Vec<String> = per_set.into_iter().flatten().collect();
        all.sort_unstable();
        all.truncate(limit);
        Ok(all)
    }

    pub(crate) fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// With [`RedisOptions::replication`], makes sure the replicas hold what a read just saw,
    /// whoever wrote it: a recorded reply may be another process's turn whose own wait for
    /// replicas has not ended, and a failover then would lose it, and the message could run
    /// again and record another reply under the same key. `WAIT` covers what its connection
    /// wrote (on Redis 7.2 and later, nothing a read saw); one write after the read comes
    /// after that turn in the replication stream, so the wait made for it covers the turn too
    /// (`conn.rs`). Fails as unavailable when the replicas do not answer, as a write does.
    /// Without replication, or for a reservation that holds no reply, nothing.
    pub(crate) async fn replicated_as_read(
        &self,
        found: &loom_core::Reservation,
    ) -> Result<(), StoreError> {
        if !self.conn.waits_for_replicas() || !matches!(found, loom_core::Reservation::Completed(_))
        {
            return Ok(());
        }
        let _: () = redis::cmd("SET")
            .arg(self.keys.read_mark())
            .arg(1)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(re)?;
        Ok(())
    }

    /// Deletes every key under this store's prefix (nothing else); returns how many. For tools
    /// and benchmarks that clean up what they created.
    pub async fn destroy(&self) -> Result<u64, StoreError> {
        let keys = scan::keys(&self.conn, &self.keys.pattern()).await?;
        let mut deleted = 0;
        if self.conn.is_cluster() {
            // One command per slot (keys grouped by hash tag), up to 1000 keys each.
            let mut by_tag: std::collections::BTreeMap<&str, Vec<&String>> = Default::default();
            for k in &keys {
                by_tag.entry(keys::hash_tag(k)).or_default().push(k);
            }
            let unlinks = by_tag
                .values()
                .flat_map(|ks| ks.chunks(1000))
                .map(|page| {
                    let mut c = redis::cmd("UNLINK");
                    c.arg(page);
                    c
                })
                .collect();
            let n: Vec<u64> = scan::each(&self.conn, unlinks).await?;
            return Ok(n.into_iter().sum());
        }
        for page in keys.chunks(1000) {
            let n: u64 = redis::cmd("UNLINK")
                .arg(page)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(re)?;
            deleted += n;
        }
        Ok(deleted)
    }

    /// The pattern every key of this store matches (`<prefix>:*`).
    pub fn key_pattern(&self) -> String {
        self.keys.pattern()
    }
}

/// The store's partition count: what it recorded when it was created, else what `options`
/// ask for (recorded now, if the store holds nothing yet), else 1.
async fn partitions(
    conn: &Conn,
    options: &RedisOptions,
    create: Create,
) -> Result<u32, StoreError> {
    let conn = &mut conn.clone();
    let key = format!("{}:partitions", options.prefix);
    let asked = options
        .partitions
        .map(loom_core::partition::check_partitions)
        .transpose()?;
    let recorded: Option<u32> = redis::cmd("GET")
        .arg(&key)
        .query_async(conn)
        .await
        .map_err(re)?;
    match (recorded, asked) {
        (Some(has), Some(n)) if has != n => Err(StoreError::InvalidRequest(format!(
            "the Redis store under prefix {:?} has {has} partition(s), not {n}: the count is fixed when a store is created (by the first connect, which records it in {key}, 1 unless it asked for more)",
            options.prefix
        ))),
        (Some(has), _) => Ok(has),
        // A store that exists without the record is of a build before it, which made stores
        // of one partition only: read as such by a connect that only opens it, which writes
        // nothing (a node's connect records it).
        (None, None | Some(1)) if create == Create::No && !conn.is_cluster() => Ok(1),
        // A cluster store records its count when it is created: one without it is not read
        // as any count by a connect that only opens it.
        (None, _) if create == Create::No && conn.is_cluster() => {
            Err(StoreError::InvalidRequest(format!(
                "the Redis Cluster store under prefix {:?} has no recorded partition count ({key}); a node's connect records it",
                options.prefix
            )))
        }
        (None, Some(n)) if create == Create::No && !conn.is_cluster() => {
            Err(StoreError::InvalidRequest(format!(
                "the Redis store under prefix {:?} is of a build that made stores of one partition only, not {n}",
                options.prefix
            )))
        }
        (None, asked) => {
            // A new store: what was asked, else 1 on one primary and the shared count on a
            // cluster (where a partition is a slot).
            let n = asked.unwrap_or(if conn.is_cluster() {
                loom_core::partition::SHARED_STORE_PARTITIONS
            } else {
                1
            });
            // Keys of a store of one partition would be in the wrong places for n.
            if n > 1
                && let Some(k) = first_data_key(conn, &options.prefix).await?
            {
                return Err(StoreError::InvalidRequest(format!(
                    "the Redis store under prefix {:?} already holds data of one partition ({k}): a store's partition count is fixed when it is created; use a new prefix for {n}",
                    options.prefix
                )));
            }
            // Recorded even for 1 (a connect asking nothing), so that a process connecting
            // for another count meanwhile is refused: two first connects racing, the first
            // to record wins, and the other reads it.
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(n)
                .arg("NX")
                .query_async(conn)
                .await
                .map_err(re)?;
            if set.is_some() {
                return Ok(n);
            }
            let has: u32 = redis::cmd("GET")
                .arg(&key)
                .query_async(conn)
                .await
                .map_err(re)?;
            if asked.is_some_and(|n| n != has) {
                return Err(StoreError::InvalidRequest(format!(
                    "the Redis store under prefix {:?} has {has} partition(s), not {n}: another process created it meanwhile",
                    options.prefix
                )));
            }
            Ok(has)
        }
    }
}

/// A key under `prefix` other than the ones a connect writes before any data (the layout, the
/// roster, the stored format, and the read mark of `RedisStore::replicated_as_read`), if there
/// is one.
async fn first_data_key(conn: &mut Conn, prefix: &str) -> Result<Option<String>, StoreError> {
    let bare = [
        format!("{prefix}:layout"),
        format!("{prefix}:members"),
        keys::format_key(prefix),
        keys::read_mark_key(prefix),
    ];
    let keys = scan::keys(conn, &format!("{prefix}:*")).await?;
    Ok(keys.into_iter().find(|k| !bare.contains(k)))
}

fn newer_format(prefix: &str, found: &str) -> StoreError {
    StoreError::InvalidRequest(format!(
        "the Redis store under prefix {prefix:?} is in stored format {found}, written by a newer \
         build of Loom; this build reads formats up to {STORED_FORMAT}: run the nodes' build \
         (and its `loom`)"
    ))
}

/// The stored format recorded under `prefix` (`None`: a store of a build before the record,
/// or none yet); a format above [`STORED_FORMAT`] is refused here, before the connect writes
/// anything.
async fn stored_format(conn: &mut Conn, prefix: &str) -> Result<Option<u32>, StoreError> {
    let key = keys::format_key(prefix);
    let raw: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(conn)
        .await
        .map_err(re)?;
    let Some(raw) = raw else {
        return Ok(None);
    };
    match raw.parse::<u32>() {
        Ok(f) if f <= STORED_FORMAT => Ok(Some(f)),
        Ok(_) => Err(newer_format(prefix, &raw)),
        Err(_) => Err(StoreError::InvalidRequest(format!(
            "the Redis store under prefix {prefix:?} records its stored format as {raw:?} in \
             {key}, which no build of Loom writes"
        ))),
    }
}

/// Whether a connect may create the store (see [`RedisStore::connect_existing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Create {
    Yes,
    No,
}

/// Whether a store is under `prefix`: its partition count is recorded, or (a store of a build
/// before that record) its layout or its nodes' roster is, or it holds data. One key per
/// `EXISTS`, so that a cluster takes each (they are in different slots).
async fn exists(conn: &mut Conn, prefix: &str) -> Result<bool, StoreError> {
    for bare in ["partitions", "layout", "members"] {
        let found: bool = redis::cmd("EXISTS")
            .arg(format!("{prefix}:{bare}"))
            .query_async(conn)
            .await
            .map_err(re)?;
        if found {
            return Ok(true);
        }
    }
    Ok(first_data_key(conn, prefix).await?.is_some())
}

/// The longest key prefix [`RedisStore::connect_with`] takes, in bytes.
pub const MAX_PREFIX_LEN: usize = 64;

/// A key prefix is 1 to [`MAX_PREFIX_LEN`] of `A-Z a-z 0-9 _ - .`. No glob character (`*?[]\`),
/// so `<prefix>:*`, which [`RedisStore::destroy`] deletes and the upgrade scans match, names
/// this store's keys alone; no `:`, so no store's keys lie under another's (`a:*` would match
/// every key of a store prefixed `a:b`); no braces, which would change the hash tags.
fn check_prefix(prefix: &str) -> Result<(), StoreError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN || !prefix.chars().all(allowed) {
        return Err(StoreError::InvalidRequest(format!(
            "Redis key prefix {prefix:?} must be 1 to {MAX_PREFIX_LEN} of A-Z a-z 0-9 _ - . \
             (no ':' or glob character, so that no store's keys match another's pattern)"
        )));
    }
    Ok(())
}

/// The server's persistence settings, as [`RedisStore::durability`] read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durability {
    /// `appendonly`, if readable.
    pub appendonly: Option<String>,
    /// `appendfsync`, if readable.
    pub appendfsync: Option<String>,
    /// `maxmemory-policy`, if readable.
    pub maxmemory_policy: Option<String>,
    /// Why acknowledged writes could be lost, if they could (also logged at connect).
    pub warning: Option<String>,
}

/// One node's settings that decide whether acknowledged writes survive (`None`: not readable).
#[derive(Default)]
struct NodeSettings {
    appendonly: Option<String>,
    appendfsync: Option<String>,
    no_fsync_on_rewrite: Option<String>,
    maxmemory_policy: Option<String>,
    maxmemory: Option<String>,
}

impl NodeSettings {
    /// Why acknowledged writes could be lost on this node, if they could.
    fn warning(&self) -> Option<String> {
        let persistence = match (self.appendonly.as_deref(), self.appendfsync.as_deref()) {
            (Some("yes"), Some("always")) => None,
            (Some("yes"), Some(other)) => Some(format!(
                "Redis appendfsync is {other:?}, not \"always\": a machine crash can lose up to a second of acknowledged writes"
            )),
            (Some("yes"), None) => Some(
                "could not read Redis appendfsync (CONFIG GET refused); Loom assumes appendfsync always".to_owned(),
            ),
            (Some(_), _) => Some(
                "Redis appendonly is off: a restart loses every acknowledged write since the last RDB snapshot".to_owned(),
            ),
            (None, _) => Some(
                "could not read Redis persistence settings (CONFIG GET and INFO refused); Loom assumes appendonly yes, appendfsync always"
                    .to_owned(),
            ),
        };
        // With it, Redis skips the AOF's fsync while a child process runs (every BGSAVE and AOF
        // rewrite): for those seconds "always" acknowledges writes a machine crash loses.
        let rewrite = (self.no_fsync_on_rewrite.as_deref() == Some("yes")
            && self.appendonly.as_deref() == Some("yes"))
        .then(|| {
            "Redis no-appendfsync-on-rewrite is yes: while a snapshot or an AOF rewrite runs, writes are acknowledged unsynced, and a machine crash loses them; set it to no".to_owned()
        });
        // Any policy but noeviction lets Redis delete keys when it reaches maxmemory: journal
        // entries, waiting messages, leases, acknowledged or not.
        // The volatile-* policies delete only keys with a TTL: Loom's recorded replies and
        // leases, so a retried send may run twice and a lease vanish under its holder.
        let eviction = match self.maxmemory_policy.as_deref() {
            Some("noeviction") | None => None,
            Some(other) => {
                let what = if other.starts_with("volatile") {
                    "keys with a TTL, and with them recorded replies (a retried send may then run twice) and leases (two nodes may then run one actor until fencing stops one)"
                } else {
                    "keys, and with them acknowledged journal entries and messages"
                };
                let yet = if self.maxmemory.as_deref() == Some("0") {
                    " (maxmemory is 0, no limit, so nothing is deleted yet; setting a limit starts it)"
                } else {
                    ""
                };
                Some(format!(
                    "Redis maxmemory-policy is {other:?}, not \"noeviction\": when the server reaches maxmemory it deletes {what}{yet}; set maxmemory-policy noeviction"
                ))
            }
        };
        let all: Vec<String> = [persistence, rewrite, eviction]
            .into_iter()
            .flatten()
            .collect();
        (!all.is_empty()).then(|| all.join("; "))
    }
}

/// A reply Loom's scripts never give.
#[derive(Debug, thiserror::Error)]
#[error("unexpected reply from Redis: {0}")]
pub(crate) struct Unexpected(pub(crate) String);

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(super::redact("redis://u:secret@h:1/"), "redis://u:***@h:1/");
        assert_eq!(super::redact("redis://h:1/"), "redis://h:1/");
    }
}
