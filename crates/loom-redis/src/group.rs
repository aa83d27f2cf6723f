//! Group commit on Redis: concurrent calls of the hot path's scripts (appends, turns, enqueues,
//! mailbox leases and settles, idempotency lookups; `batched` in `lib.rs`) from many actors go
//! to the server together, as one call of the `batch` script per batch, through [`Batcher`]
//! (whose invariants hold here too). A batch of one calls the request's own script. Calls whose
//! reply can be large (snapshots, message lists) and lease renewals and heartbeats, which
//! should not wait behind others, go alone.
//!
//! Why: a script call costs Redis's single thread much more than the commands it runs (the
//! call's parsing, the script's setup, its reply), so one call per request left
//! `append-concurrent` at a third of what bare pipelined `XADD`s reach on the same server.
//!
//! Inside `batch` each request runs as its own script would, one after another in its batch's
//! order (requests are taken from the queue in order, but two batches in flight may reach the
//! server in either order, as two pipelined calls from different tasks could), each with its
//! own reply: a refused request writes nothing, and a request whose Redis command fails (a key
//! of the wrong type, a read-only replica) gets that error as its reply, as it would have
//! alone, while the others go on. A failed call (the connection dropped, the reply timed out)
//! fails every request in it with the same error, which for a connection is
//! [`StoreError::Unavailable`]: the batch may or may not have run, as for any single request.
//!
//! Two things a batch shares, where alone each request would have its own, both bounded by one
//! batch: Redis checks `maxmemory` once per script, at its first write, so a batch over the
//! limit refuses every writing request in it and one under the limit may pass it by the batch's
//! writes; and Redis judges keys' expiry by the time the script started, so a lease or record
//! that runs out while a batch runs is still there for the requests after it in that batch
//! (fencing still holds: the batch is atomic, nothing else runs in between).

use std::sync::Arc;
use std::time::Duration;

use crate::conn::Conn;
use futures::FutureExt;
use loom_core::store::backend::{Batcher, RunBatch};
use loom_core::{StoreError, StoreResult};
use redis::{Script, Value};

use crate::resp::{status, text, unexpected};
use crate::{Entry, SCRIPTS, Scripts, re};

/// Most requests in one batch.
const MAX_REQUESTS: usize = 128;

/// How many batches may be in flight at once. Redis runs one at a time; a second one in flight
/// is read while the first runs, so the server never waits for the client between batches.
const WORKERS: usize = 2;

/// One call of an entry's script: its keys and arguments.
pub(crate) struct Call {
    pub(crate) entry: &'static Entry,
    pub(crate) keys: Vec<String>,
    pub(crate) args: Vec<Vec<u8>>,
}

impl Call {
    fn bytes(&self) -> usize {
        self.keys.iter().map(String::len).sum::<usize>()
            + self.args.iter().map(Vec::len).sum::<usize>()
    }

    /// Queues the call in `group` and waits for its reply, at most twice the response timeout:
    /// a server that stops answering fails the callers still queued too, as `Unavailable`,
    /// instead of leaving them to wait for every batch ahead of them to time out.
    pub(crate) async fn submit(self, group: &Group) -> StoreResult<Vec<Value>> {
        let bytes = self.bytes();
        match tokio::time::timeout(group.limit, group.batcher.submit(self, bytes)).await {
            Ok(reply) => reply,
            Err(_) => Err(StoreError::unavailable(
                crate::BACKEND,
                NoReply(group.limit),
            )),
        }
    }
}

/// The batcher of the batched scripts' calls; its tasks end when it is dropped.
pub(crate) struct Group {
    batcher: Batcher<Call, Vec<Value>>,
    /// How long a caller waits for its reply, in the queue and in its batch's call.
    limit: Duration,
}

/// Starts the group commit on `conn`, whose calls time out after `response_timeout`.
pub(crate) fn start(conn: Conn, response_timeout: Duration) -> Group {
    Group {
        batcher: Batcher::start(crate::BACKEND, WORKERS, MAX_REQUESTS, run(conn, &SCRIPTS)),
        // A request may wait for a batch in flight before its own goes out.
        limit: response_timeout * 2,
    }
}

/// A caller's wait that ran out (see [`Group`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "no reply within {0:?} (waiting for a batch, then in it); the request may or may not have run"
)]
struct NoReply(Duration);

/// How a batch runs: one `batch` call, or the request's own script for a batch of one; on a
/// cluster, one such call per slot (every request's keys are of one partition, one slot),
/// all at once.
fn run(conn: Conn, scripts: &'static Scripts) -> RunBatch<Call, Vec<Value>> {
    Arc::new(move |calls: Vec<Call>| {
        let conn = conn.clone();
        async move {
            if !conn.is_cluster() {
                return call(conn, scripts, calls).await;
            }
            let n = calls.len();
            let mut per_slot: std::collections::BTreeMap<String, (Vec<usize>, Vec<Call>)> =
                Default::default();
            for (i, c) in calls.into_iter().enumerate() {
                let tag = c
                    .keys
                    .first()
                    .map_or_else(String::new, |k| crate::keys::hash_tag(k).to_owned());
                let (at, of) = per_slot.entry(tag).or_default();
                at.push(i);
                of.push(c);
            }
            let (ats, groups): (Vec<Vec<usize>>, Vec<Vec<Call>>) = per_slot.into_values().unzip();
            let replies = futures::future::join_all(
                groups.into_iter().map(|g| call(conn.clone(), scripts, g)),
            )
            .await;
            let mut out: Vec<Option<StoreResult<Vec<Value>>>> = (0..n).map(|_| None).collect();
            for (at, replies) in ats.into_iter().zip(replies) {
                for (i, r) in at.into_iter().zip(replies) {
                    out[i] = Some(r);
                }
            }
            out.into_iter()
                .map(|r| r.unwrap_or_else(|| Err(unexpected("a batched request without a reply"))))
                .collect()
        }
        .boxed()
    })
}

/// One call for `calls`: their `batch`, or the request's own script for one.
async fn call(
    mut conn: Conn,
    scripts: &'static Scripts,
    calls: Vec<Call>,
) -> Vec<StoreResult<Vec<Value>>> {
    let n = calls.len();
    if n == 1 {
        let c = calls.into_iter().next().expect("one call");
        let reply = invoke(&mut conn, &c.entry.script, &c.keys, c.args).await;
        return vec![reply.and_then(array)];
    }
    debug_assert!(
        !conn.is_cluster()
            || crate::keys::one_slot(&calls.iter().flat_map(|c| &c.keys).collect::<Vec<_>>()),
        "a batch on a cluster touches several slots"
    );
    // ARGV: n, then each call's entry, key count and argument count, then every call's
    // arguments; KEYS: every call's keys (see `batch` in loom.lua).
    let mut keys = Vec::new();
    let mut args = Vec::with_capacity(1 + 3 * n);
    args.push(n.to_string().into_bytes());
    for c in &calls {
        args.push(c.entry.name.as_bytes().to_vec());
        args.push(c.keys.len().to_string().into_bytes());
        args.push(c.args.len().to_string().into_bytes());
    }
    for c in calls {
        keys.extend(c.keys);
        args.extend(c.args);
    }
    match invoke(&mut conn, &scripts.batch, &keys, args).await {
        Ok(Value::Array(replies)) if replies.len() == n => {
            replies.into_iter().map(batched).collect()
        }
        Ok(other) => {
            let e = unexpected(format!("batch of {n} replied {other:?}"));
            (0..n).map(|_| Err(e.clone())).collect()
        }
        Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
    }
}

/// Calls `script` (loading it first if the server does not have it).
pub(crate) async fn invoke(
    conn: &mut Conn,
    script: &Script,
    keys: &[impl AsRef<str>],
    args: Vec<Vec<u8>>,
) -> StoreResult<Value> {
    let mut inv = script.prepare_invoke();
    for k in keys {
        inv.key(k.as_ref());
    }
    for a in args {
        inv.arg(a);
    }
    inv.invoke_async(conn).await.map_err(re)
}

/// A script's reply, which is an array.
pub(crate) fn array(v: Value) -> StoreResult<Vec<Value>> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(unexpected(format!("script replied {other:?}"))),
    }
}

/// One request's reply in a batch's: its script's, or `{ 'error', message }` when a Redis
/// command failed under it, which becomes the error it would have been alone (read as the
/// server's error reply, so `re` sorts it as it sorts any).
fn batched(v: Value) -> StoreResult<Vec<Value>> {
    let items = array(v)?;
    if status(&items) != "error" {
        return Ok(items);
    }
    let message =
        text(items.get(1)).ok_or_else(|| unexpected("a batch error reply without its message"))?;
    match redis::parse_redis_value(format!("-{message}\r\n").as_bytes()) {
        Ok(Value::ServerError(e)) => Err(re(e.into())),
        Ok(_) => Err(unexpected(format!("batch error reply {message:?}"))),
        Err(e) => Err(re(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::status;
    use crate::{RedisOptions, RedisStore};
    use futures::TryStreamExt;
    use loom_core::store::backend::prepare_append;
    use loom_core::{ActorId, JournalStore, SeqRange, StoreError};
    use loom_testkit::load::entry;
    use loom_testkit::servers::RedisServer;

    fn append(store: &RedisStore, actor: &ActorId, expected: u64) -> Call {
        let k = store.keys.journal(actor);
        let mut args = vec![
            actor.as_str().as_bytes().to_vec(),
            expected.to_string().into_bytes(),
        ];
        args.extend(prepare_append(actor, expected, &[entry(0, expected)]).expect("frames"));
        Call {
            entry: &store.scripts.append,
            keys: vec![k.j, k.jm, store.keys.actors_of(actor)],
            args,
        }
    }

    fn replied(r: &StoreResult<Vec<Value>>) -> String {
        match r {
            Ok(v) => status(v),
            Err(e) => format!("error: {e}"),
        }
    }

    /// A failed request's reply is sorted as the server's error reply would be.
    #[test]
    fn a_failed_request_in_a_batch_is_the_error_it_would_be_alone() {
        let reply = |m: &str| {
            Value::Array(vec![
                Value::BulkString(b"error".to_vec()),
                Value::BulkString(m.as_bytes().to_vec()),
            ])
        };
        let busy = batched(reply("LOADING Redis is loading the dataset in memory")).unwrap_err();
        assert!(matches!(busy, StoreError::Unavailable { .. }), "{busy}");
        let oom = batched(reply(
            "OOM command not allowed when used memory > 'maxmemory'.",
        ));
        let oom = oom.unwrap_err();
        assert!(matches!(oom, StoreError::Storage { .. }), "{oom}");
        assert!(oom.to_string().contains("maxmemory"), "{oom}");
        let ok = batched(Value::Array(vec![Value::BulkString(b"ok".to_vec())])).unwrap();
        assert_eq!(status(&ok), "ok");
    }

    /// The batch script against the calls one by one: the same replies, a failing request does
    /// not stop the others, and requests see those before them in the batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_gives_each_request_the_reply_it_would_have_alone() {
        let server = RedisServer::start();
        let options = RedisOptions {
            prefix: "group".to_owned(),
            ..RedisOptions::default()
        };
        let store = RedisStore::connect_with(&server.url(), options)
            .await
            .expect("connect");
        let [a, b, c] = ["a", "b", "c"].map(|k| ActorId::new("grp", k).expect("id"));
        // b's journal key holds a string, so its XADD fails (WRONGTYPE) before it writes.
        let mut conn = store.conn();
        let () = redis::cmd("SET")
            .arg(store.keys.journal(&b).j)
            .arg("not a stream")
            .query_async(&mut conn)
            .await
            .expect("SET");
        let batch = run(store.conn(), store.scripts);
        let replies = batch(vec![
            append(&store, &a, 1),
            append(&store, &a, 2),
            append(&store, &b, 1),
            append(&store, &c, 5),
            append(&store, &a, 3),
        ])
        .await;
        let got: Vec<String> = replies.iter().map(replied).collect();
        assert_eq!(got[0], "ok");
        assert_eq!(got[1], "ok", "the second append saw the first: {got:?}");
        assert!(got[2].contains("WRONGTYPE"), "{got:?}");
        assert!(
            matches!(replies[2], Err(StoreError::Storage { .. })),
            "{got:?}"
        );
        assert_eq!(got[3], "conflict", "{got:?}");
        assert_eq!(
            got[4], "ok",
            "the batch went on after the failed request: {got:?}"
        );
        // Alone, b's append fails the same way.
        let alone = batch(vec![append(&store, &b, 1)]).await;
        assert!(
            matches!(&alone[0], Err(StoreError::Storage { .. }))
                && replied(&alone[0]).contains("WRONGTYPE"),
            "{:?}",
            replied(&alone[0])
        );
        let read: Vec<_> = store
            .read(&a, SeqRange::all())
            .try_collect()
            .await
            .expect("read a");
        assert_eq!(read.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(store.highest_seq(&c).await.expect("c"), 0);
        assert!(store.destroy().await.expect("destroy") > 0);
    }
}
