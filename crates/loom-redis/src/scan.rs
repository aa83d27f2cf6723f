//! Commands that cover several slots. On one primary they go as one pipeline; on a cluster a
//! pipeline may touch one slot and `SCAN` sees one node's keys, so [`each`] sends each command
//! on its own (concurrently, each to its slot's primary) and [`keys`] scans every primary.

use loom_core::StoreError;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, FromRedisValue, Value};

use crate::conn::Conn;
use crate::re;

/// Most of [`each`]'s commands in flight at once on a cluster.
const IN_FLIGHT: usize = 64;

/// Runs `cmds` (each of one slot) and returns their replies in order.
pub(crate) async fn each<T: FromRedisValue>(
    conn: &Conn,
    cmds: Vec<Cmd>,
) -> Result<Vec<T>, StoreError> {
    each_settled(conn, cmds).await?.into_iter().collect()
}

/// Runs `cmds` (each of one slot) and returns each one's reply or failure, in order: a command
/// that fails (its slot's primary down on a cluster, a key of another type) fails only itself.
/// `Err` only when none could be sent (the one primary's connection failed).
pub(crate) async fn each_settled<T: FromRedisValue>(
    conn: &Conn,
    cmds: Vec<Cmd>,
) -> Result<Vec<Result<T, StoreError>>, StoreError> {
    if cmds.is_empty() {
        return Ok(Vec::new());
    }
    if !conn.is_cluster() {
        let mut pipe = redis::pipe();
        for c in cmds {
            pipe.add_command(c);
        }
        let replies: Vec<redis::RedisResult<T>> = pipe
            .ignore_errors()
            .query_async(&mut conn.clone())
            .await
            .map_err(re)?;
        return Ok(replies.into_iter().map(|r| r.map_err(re)).collect());
    }
    use futures::StreamExt;
    let replies: Vec<_> = futures::stream::iter(cmds.into_iter().map(|c| {
        let mut conn = conn.clone();
        async move { c.query_async::<T>(&mut conn).await }
    }))
    // In order, a bounded number at once: a caller may pass many (destroy's UNLINKs), and a
    // flood of them would hold up everything else on the connection.
    .buffered(IN_FLIGHT)
    .collect()
    .await;
    Ok(replies.into_iter().map(|r| r.map_err(re)).collect())
}

/// Every key matching `pattern`: one `SCAN` over the primary, or over each primary of a
/// cluster (found by `CLUSTER NODES`).
pub(crate) async fn keys(conn: &Conn, pattern: &str) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for node in nodes(conn).await? {
        out.extend(scan_one(conn, node, pattern).await?);
    }
    Ok(out)
}

/// The nodes holding keys: the primary (`None`), or each primary of a cluster by address.
pub(crate) async fn nodes(conn: &Conn) -> Result<Vec<Option<(String, u16)>>, StoreError> {
    let Conn::Cluster(cluster) = conn else {
        return Ok(vec![None]);
    };
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut cluster.clone())
        .await
        .map_err(re)?;
    Ok(primaries(&nodes)?.into_iter().map(Some).collect())
}

/// Runs `cmd` on `node` (one of [`nodes`]).
pub(crate) async fn on_node(
    conn: &Conn,
    node: &Option<(String, u16)>,
    cmd: Cmd,
) -> redis::RedisResult<Value> {
    match (conn, node) {
        (Conn::Cluster(c), Some((host, port))) => {
            c.clone()
                .route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    }),
                )
                .await
        }
        _ => cmd.query_async(&mut conn.clone()).await,
    }
}

/// The primaries `CLUSTER NODES` lists (lines `<id> <host>:<port>@<bus>[,<name>] <flags> …`);
/// Unavailable while one is failing (`fail` or `fail?`): its keys could not be listed.
fn primaries(nodes: &str) -> Result<Vec<(String, u16)>, StoreError> {
    let mut out = Vec::new();
    for line in nodes.lines() {
        let mut fields = line.split_whitespace();
        let (Some(address), Some(flags)) = (fields.nth(1), fields.next()) else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master") {
            continue;
        }
        if flags.iter().any(|f| *f == "fail" || *f == "fail?") {
            return Err(StoreError::unavailable(
                crate::BACKEND,
                crate::Unexpected(format!("cluster node {address} is failing")),
            ));
        }
        let parsed = address
            .split(['@', ','])
            .next()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)));
        match parsed {
            Some(node) => out.push(node),
            None => {
                return Err(crate::resp::unexpected(format!(
                    "CLUSTER NODES address {address}"
                )));
            }
        }
    }
    Ok(out)
}

/// One node's keys matching `pattern` (`node`: a cluster's primary at that address).
async fn scan_one(
    conn: &Conn,
    node: Option<(String, u16)>,
    pattern: &str,
) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000);
        let reply = on_node(conn, &node, cmd).await.map_err(re)?;
        let (next, keys): (u64, Vec<String>) =
            redis::from_redis_value(reply).map_err(|e| re(e.into()))?;
        out.extend(keys);
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_primaries_of_cluster_nodes_are_read_from_its_lines() {
        let nodes = "\
07c3 127.0.0.1:30004@31004,host-a slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@31002 master,nofailover - 0 1426238316232 2 connected 5461-10922
e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
";
        assert_eq!(
            super::primaries(nodes).unwrap(),
            [
                ("127.0.0.1".to_owned(), 30002),
                ("127.0.0.1".to_owned(), 30001)
            ]
        );
        let failing = format!(
            "{nodes}292f 127.0.0.1:30003@31003 master,fail? - 0 0 3 connected 10923-16383\n"
        );
        assert!(matches!(
            super::primaries(&failing),
            Err(loom_core::StoreError::Unavailable { .. })
        ));
    }
}
