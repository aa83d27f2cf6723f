//! The connection a store talks through: to one primary (a `ConnectionManager`, which
//! reconnects and pipelines concurrent requests), or to a Redis Cluster (the client's cluster
//! connection, which sends each command to the primary of its keys' slot, learns the slot map
//! and follows `MOVED`/`ASK`). Everything else in this crate runs commands on [`Conn`] and
//! does not care which; what differs on a cluster (a pipeline or script may touch one slot;
//! `SCAN` and `PUBLISH` go to each node) is handled where the commands are made.
//!
//! On one primary with [`Replication`] asked, every request goes with a `WAIT` for that many
//! replicas in the same pipeline, so on the same connection right after it: a request whose
//! writes the replicas did not all acknowledge in time fails as unavailable (it may or may not
//! have happened, as for a dropped connection), and a reply is given only for writes that a
//! failover to one of those replicas keeps. `WAIT` covers everything the connection wrote
//! before it, so concurrent requests share the wait; a reconnect between a request and its
//! `WAIT` cannot happen, since both are written at once and a dropped connection fails both.

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
    /// How long a request waits for them before it fails as unavailable (default 1 s; under
    /// the store's response timeout, which bounds the whole request).
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
    One(ConnectionManager, Option<Replication>),
    /// A cluster of primaries.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Whether this is a cluster's.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

/// `WAIT` for `r`'s replicas.
fn wait(p: &mut Pipeline, r: Replication) {
    p.cmd("WAIT")
        .arg(r.replicas)
        .arg(r.timeout.as_millis().clamp(1, u128::from(u64::MAX)) as u64);
}

/// Checks `WAIT`'s reply: the replicas that acknowledged.
fn waited(reply: Option<Value>, r: Replication) -> Result<(), RedisError> {
    match reply {
        Some(Value::Int(n)) if n >= i64::from(r.replicas) => Ok(()),
        Some(Value::Int(n)) => Err(RedisError::from((
            ErrorKind::Io,
            "a write was not acknowledged by enough replicas",
            format!(
                "{n} of the {} replicas asked acknowledged within {:?}; the request may or may not have happened",
                r.replicas, r.timeout
            ),
        ))),
        Some(Value::ServerError(e)) => Err(e.into()),
        other => Err(RedisError::from((
            ErrorKind::Parse,
            "WAIT replied with something other than a count",
            format!("{other:?}"),
        ))),
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::One(c, None) => c.req_packed_command(cmd),
            Conn::One(c, Some(r)) => {
                let r = *r;
                Box::pin(async move {
                    let mut p = redis::pipe();
                    p.add_command(cmd.clone());
                    wait(&mut p, r);
                    let mut replies = c.req_packed_commands(&p, 0, 2).await?;
                    waited(replies.pop(), r)?;
                    replies.pop().ok_or_else(|| {
                        RedisError::from((ErrorKind::Parse, "a pipeline of two replied once"))
                    })
                })
            }
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
            Conn::One(c, Some(r)) => {
                let r = *r;
                Box::pin(async move {
                    // The same commands, a transaction spelled out (a WAIT inside MULTI does not
                    // wait), then the WAIT: its reply comes after the `count` asked for.
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
                    wait(&mut p, r);
                    let mut replies = c.req_packed_commands(&p, offset, count + 1).await?;
                    waited(replies.pop(), r)?;
                    Ok(replies)
                })
            }
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
