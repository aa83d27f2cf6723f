//! The connection a store talks through: to one primary (a `ConnectionManager`, which
//! reconnects and pipelines concurrent requests), or to a Redis Cluster (the client's cluster
//! connection, which sends each command to the primary of its keys' slot, learns the slot map
//! and follows `MOVED`/`ASK`). Everything else in this crate runs commands on [`Conn`] and
//! does not care which; what differs on a cluster (a pipeline or script may touch one slot;
//! `SCAN` and `PUBLISH` go to each node) is handled where the commands are made.
//!
//! On one primary with [`Replication`] asked, a request's reply is handed back only once a
//! `WAIT` on the same connection, sent after that reply came, has seen the replicas acknowledge
//! (`Replicas`): concurrent requests share one `WAIT` a round, as a group commit shares an
//! fsync, since a `WAIT` blocks its connection and covers everything the connection wrote
//! before it. Each request's pipeline also asks `CLIENT ID`, and each round's `CLIENT ID` and
//! the server's `run_id`, so a reconnect in between (the new connection's `WAIT` would cover
//! nothing) fails the request instead of passing it: to the same server, the client id differs
//! (a server never gives one twice); to a restarted one or another behind the same address,
//! which may give the same id again, the `run_id` differs from the last round's (the first one
//! is read at connect), and every request out while a round sees that fails, whichever round
//! covers it. A request whose round fails or does not get enough replicas in time
//! fails as unavailable: it may or may not have happened, as for a dropped connection.
//!
//! What `WAIT` does not cover: another client's writes. A read may see a write of another
//! process whose own wait has not ended, and which a failover just then would lose along with
//! that process's request, which failed. (Redis up to 7.0 notes a client's offset after each
//! of its commands, reads included, so that a wait after a read covers what it saw; from 7.2
//! on, only after a command that wrote.) Where such a read is handed to a caller as done, a
//! recorded reply (`lookup`, and `enqueue_once` finding one), the store writes one key after
//! it (`RedisStore::replicated_as_read`): that write comes after the one read in the
//! replication stream, so the wait made for it covers both (`faults_redis.rs`
//! `a_reply_another_process_recorded_is_handed_on_only_once_replicas_hold_it`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Value};

/// How many replicas must hold a write before it is acknowledged
/// ([`RedisOptions::replication`](crate::RedisOptions::replication)).
///
/// ```
/// use std::time::Duration;
/// use loom_redis::Replication;
///
/// let r = Replication { replicas: 1, timeout: Duration::from_secs(1) };
/// assert_eq!(r, Replication::new(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    /// Replicas that must acknowledge each write (`WAIT`'s first argument); at least 1.
    pub replicas: u32,
    /// How long one `WAIT` waits for them (default 1 s; under a third of the store's response
    /// timeout, checked at connect).
    /// A request may wait for the round in flight and then its own, and its own pipeline may
    /// queue behind a `WAIT` on the server: with replicas missing, a request fails as
    /// unavailable after up to about three times this.
    pub timeout: Duration,
}

impl Replication {
    /// `replicas` replicas, waited for at most a second.
    pub fn new(replicas: u32) -> Self {
        Replication {
            replicas,
            timeout: Duration::from_secs(1),
        }
    }
}

/// A store's connection; cheap to clone (clones share it).
#[derive(Clone)]
pub(crate) enum Conn {
    /// One primary, and the replicas each request waits for, if any.
    One(ConnectionManager, Option<Arc<Replicas>>),
    /// A cluster of primaries.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Whether this is a cluster's.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Whether each request waits for replicas ([`Replication`]).
    pub(crate) fn waits_for_replicas(&self) -> bool {
        matches!(self, Conn::One(_, Some(_)))
    }
}

/// The rounds of `WAIT` a connection's requests share (see the module's documentation).
pub(crate) struct Replicas {
    asked: Replication,
    /// Tickets given so far: a request takes the next one once its reply has come.
    issued: AtomicU64,
    /// The last round; one round at a time.
    round: tokio::sync::Mutex<Round>,
    /// How many times a round has seen the server change.
    generation: AtomicU64,
}

/// What a round of `WAIT` found, for the tickets up to `through`.
struct Round {
    through: u64,
    /// The connection it waited on, or why it failed.
    outcome: Option<Result<i64, String>>,
    /// The `run_id` of the server the last round (or the connect) talked to.
    server: String,
}

impl Replicas {
    /// The rounds of a store connected through `conn`, asking `asked`: reads the server's
    /// `run_id`, and checks that this client may ask `CLIENT ID` and `WAIT`.
    pub(crate) async fn start(
        conn: &mut ConnectionManager,
        asked: Replication,
    ) -> Result<Arc<Self>, RedisError> {
        let mut p = redis::pipe();
        p.cmd("INFO")
            .arg("server")
            .cmd("CLIENT")
            .arg("ID")
            .ignore()
            .cmd("WAIT")
            .arg(0)
            .arg(1)
            .ignore();
        let (info,): (String,) = p.query_async(conn).await?;
        let server = run_id(&info).map_err(|why| {
            RedisError::from((ErrorKind::Parse, "INFO server without a run_id", why))
        })?;
        Ok(Arc::new(Replicas {
            asked,
            issued: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            round: tokio::sync::Mutex::new(Round {
                through: 0,
                outcome: None,
                server,
            }),
        }))
    }

    /// The server generation a request notes before it is sent, for [`Replicas::covered`].
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Waits until the replicas hold what connection `id` wrote before a reply that just came:
    /// a round that started after it, on the same connection, saw enough of them, and no round
    /// saw the server change since the request noted `generation` (a round that was not its
    /// own may have been the one to see the change).
    async fn covered(
        &self,
        conn: &mut ConnectionManager,
        id: i64,
        generation: u64,
    ) -> Result<(), RedisError> {
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let mut round = self.round.lock().await;
        if round.through < ticket {
            // Every ticket given by now had its reply before this round is sent.
            let through = self.issued.load(Ordering::SeqCst);
            let mut p = redis::pipe();
            p.cmd("CLIENT")
                .arg("ID")
                .cmd("INFO")
                .arg("server")
                .cmd("WAIT")
                .arg(self.asked.replicas)
                .arg(
                    self.asked
                        .timeout
                        .as_millis()
                        .clamp(1, u128::from(u64::MAX)) as u64,
                );
            let outcome = match conn.req_packed_commands(&p, 0, 3).await {
                Ok(mut v) => {
                    let acked = v.pop();
                    let server = match v.pop() {
                        Some(Value::BulkString(b)) => run_id(&String::from_utf8_lossy(&b)),
                        Some(Value::VerbatimString { text, .. }) => run_id(&text),
                        other => Err(format!("INFO server replied {other:?}")),
                    };
                    client_id(v.pop()).and_then(|cid| {
                        let server = server?;
                        if server != round.server {
                            round.server = server;
                            self.generation.fetch_add(1, Ordering::SeqCst);
                            return Err("the server changed (restarted, or another behind its address) since the last wait for replicas".to_owned());
                        }
                        match acked {
                            Some(Value::Int(n)) if n >= i64::from(self.asked.replicas) => Ok(cid),
                            Some(Value::Int(n)) => Err(format!(
                                "{n} of the {} replicas asked acknowledged within {:?}",
                                self.asked.replicas, self.asked.timeout
                            )),
                            other => Err(format!("WAIT replied {other:?}")),
                        }
                    })
                }
                Err(e) => Err(format!("the wait for replicas failed: {e}")),
            };
            round.through = through;
            round.outcome = Some(outcome);
        }
        if self.generation() != generation {
            return Err(unreplicated(
                "the server changed (restarted, or another behind its address) while the request was out".to_owned(),
            ));
        }
        match &round.outcome {
            Some(Ok(cid)) if *cid == id => Ok(()),
            Some(Ok(_)) => Err(unreplicated(
                "the connection was replaced between the request and the wait for its replicas"
                    .to_owned(),
            )),
            Some(Err(why)) => Err(unreplicated(why.clone())),
            None => Err(unreplicated("no round of WAIT ran".to_owned())),
        }
    }
}

/// The error of a request its replicas were not seen to hold: unavailable, since it may or may
/// not have happened.
fn unreplicated(why: String) -> RedisError {
    RedisError::from((
        ErrorKind::Io,
        "a request was not acknowledged by enough replicas",
        format!("{why}; it may or may not have happened"),
    ))
}

/// The `run_id` in the text of `INFO server`.
fn run_id(info: &str) -> Result<String, String> {
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned())
        .ok_or_else(|| "INFO server has no run_id".to_owned())
}

/// `CLIENT ID`'s reply.
fn client_id(reply: Option<Value>) -> Result<i64, String> {
    match reply {
        Some(Value::Int(id)) => Ok(id),
        other => Err(format!("CLIENT ID replied {other:?}")),
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::One(c, None) => c.req_packed_command(cmd),
            Conn::One(c, Some(r)) => Box::pin(async move {
                let generation = r.generation();
                let mut p = redis::pipe();
                p.add_command(cmd.clone()).cmd("CLIENT").arg("ID");
                let mut replies = c.req_packed_commands(&p, 0, 2).await?;
                let id = client_id(replies.pop()).map_err(unreplicated)?;
                r.covered(c, id, generation).await?;
                replies.pop().ok_or_else(|| {
                    RedisError::from((ErrorKind::Parse, "a pipeline of two replied once"))
                })
            }),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::One(c, None) => c.req_packed_commands(cmd, offset, count),
            Conn::One(c, Some(r)) => Box::pin(async move {
                // The same commands, a transaction spelled out (so that `CLIENT ID` comes
                // after its `EXEC`, on the same connection), then `CLIENT ID`: its reply comes
                // after the `count` asked for. (Errors queued in a transaction then come back
                // as an unparsed `EXECABORT`; the store's transactions are reads.)
                let mut p = redis::pipe();
                if cmd.is_transaction() {
                    p.cmd("MULTI");
                }
                for c in cmd.cmd_iter() {
                    p.add_command(c.clone());
                }
                if cmd.is_transaction() {
                    p.cmd("EXEC");
                }
                p.cmd("CLIENT").arg("ID");
                let generation = r.generation();
                let mut replies = c.req_packed_commands(&p, offset, count + 1).await?;
                let id = client_id(replies.pop()).map_err(unreplicated)?;
                r.covered(c, id, generation).await?;
                Ok(replies)
            }),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::One(c, _) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
