//! The connection a store talks through: to one primary (a `ConnectionManager`, which
//! reconnects and pipelines concurrent requests), or to a Redis Cluster (the client's cluster
//! connection, which sends each command to the primary of its keys' slot, learns the slot map
//! and follows `MOVED`/`ASK`). Everything else in this crate runs commands on [`Conn`] and
//! does not care which; what differs on a cluster (a pipeline or script may touch one slot;
//! `SCAN` and `PUBLISH` go to each node) is handled where the commands are made.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A store's connection; cheap to clone (clones share it).
#[derive(Clone)]
pub(crate) enum Conn {
    /// One primary.
    One(ConnectionManager),
    /// A cluster of primaries.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Whether this is a cluster's.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::One(c) => c.req_packed_command(cmd),
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
            Conn::One(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::One(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
