//! The group-committed requests, appends, turns and leases: what a request carries, and how a
//! batch of them runs (`append_many`, whose latest version is in `schema_v13.sql`, and a batch
//! of one `append`; `turn_many` and `lease_many`, set-based since `schema_v11.sql`, for two or
//! more, and `turn` or `lease` for one; `turn_relayed`, `schema_v12.sql`, for turns that write
//! the outbox). See `loom_core::store::backend::Batcher` for the
//! batching itself and its invariants.
//!
//! What PostgreSQL adds to them (rule D1): a caller's answer is read only once the server has
//! answered `ReadyForQuery`, after the statement's implicit transaction committed (with
//! `synchronous_commit = on`, which every session sets: after its WAL flush). If a whole batch
//! fails for a reason that is not about the connection (one request the server could not run),
//! every request is tried again on its own, so one bad request cannot fail the others; a
//! connection failure is reported to every caller as `Unavailable` (the batch may or may not
//! have committed, as for any single request).

use std::sync::Arc;

use crate::sql::Bounded;
use futures::FutureExt;
use loom_core::store::backend::{Batcher, RunBatch};
use loom_core::{StoreError, StoreResult};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::pe;

/// One conditional append.
pub(crate) struct AppendReq {
    pub(crate) actor: String,
    pub(crate) expected: i64,
    pub(crate) frames: Vec<Vec<u8>>,
}

/// `append`'s answer: (appended, new highest) or (refused, the journal's next seq).
pub(crate) type AppendOut = (bool, i64);

impl AppendReq {
    pub(crate) fn bytes(&self) -> usize {
        self.frames.iter().map(Vec::len).sum::<usize>() + self.actor.len()
    }
}

/// One turn, with every value `turn` takes, and the messages it sends to actors of other
/// partitions (`ob_*`: `turn_relayed` writes them to the outbox of `ob_part`, the turn's).
pub(crate) struct TurnReq {
    pub(crate) actor: String,
    pub(crate) expected: i64,
    pub(crate) frames: Vec<Vec<u8>>,
    pub(crate) fence: Option<i64>,
    pub(crate) out_actors: Vec<String>,
    pub(crate) out_ids: Vec<String>,
    pub(crate) out_frames: Vec<Vec<u8>>,
    pub(crate) out_due: Vec<i64>,
    pub(crate) ob_part: i32,
    pub(crate) ob_actors: Vec<String>,
    pub(crate) ob_ids: Vec<String>,
    pub(crate) ob_frames: Vec<Vec<u8>>,
    pub(crate) ob_due: Vec<i64>,
    pub(crate) settle: Option<String>,
    pub(crate) settle_actor: Option<String>,
    pub(crate) pos: Option<i64>,
    pub(crate) dlv: Option<i32>,
    pub(crate) msg: Option<String>,
    pub(crate) reason: String,
    pub(crate) record_actor: Option<String>,
    pub(crate) record_key: Option<String>,
    pub(crate) record: Option<Vec<u8>>,
    pub(crate) record_ttl: Option<i64>,
    pub(crate) next_vis: Option<i64>,
    pub(crate) next_max: Option<i32>,
}

impl TurnReq {
    pub(crate) fn bytes(&self) -> usize {
        self.frames.iter().map(Vec::len).sum::<usize>()
            + self.out_frames.iter().map(Vec::len).sum::<usize>()
            + self.ob_frames.iter().map(Vec::len).sum::<usize>()
            + self.record.as_ref().map_or(0, Vec::len)
            + self.reason.len()
    }
}

/// `turn`'s answer.
pub(crate) struct TurnOut {
    pub(crate) status: String,
    pub(crate) highest: Option<i64>,
    pub(crate) nframe: Option<Vec<u8>>,
    pub(crate) npos: Option<i64>,
    pub(crate) ndlv: Option<i32>,
    pub(crate) nerr: Option<String>,
}

impl TurnOut {
    /// From a row of (status, highest, nframe, npos, ndlv, nerr), starting at column `at`.
    fn from_row(row: &PgRow, at: usize) -> Self {
        TurnOut {
            status: row.get(at),
            highest: row.get(at + 1),
            nframe: row.get(at + 2),
            npos: row.get(at + 3),
            ndlv: row.get(at + 4),
            nerr: row.get(at + 5),
        }
    }
}

/// One lease of an actor's next message.
#[derive(Clone)]
pub(crate) struct LeaseReq {
    pub(crate) actor: String,
    pub(crate) vis: i64,
    pub(crate) max: i32,
    pub(crate) early: i64,
}

/// `lease`'s answer: the frame, position, deliveries and last error of the message handed out
/// (the frame `None` when nothing was).
pub(crate) struct LeaseOut {
    pub(crate) frame: Option<Vec<u8>>,
    pub(crate) pos: Option<i64>,
    pub(crate) dlv: Option<i32>,
    pub(crate) err: Option<String>,
}

impl LeaseOut {
    /// From a row of (frame, pos, dlv, err), starting at column `at`.
    fn from_row(row: &PgRow, at: usize) -> Self {
        LeaseOut {
            frame: row.get(at),
            pos: row.get(at + 1),
            dlv: row.get(at + 2),
            err: row.get(at + 3),
        }
    }
}

/// Most leases in one batch.
const LEASE_BATCH: usize = 256;

/// Most appends in one batch.
const APPEND_BATCH: usize = 256;

/// Most turns in one batch. A batch holds the row locks of all its turns until it commits, so
/// on hot mailboxes bigger batches also mean longer waits for others; on the bank benchmark
/// (100 accounts, 512 transfers in flight) 8, 32 and 128 gave 875, 1068 and 1178 turns/s.
const TURN_BATCH: usize = 128;

/// How many batches of each kind may be in flight at once, for a pool of `connections`.
pub(crate) fn workers(connections: u32) -> usize {
    (connections as usize / 4).clamp(1, 4)
}

/// The batcher of appends.
pub(crate) fn appends(
    pool: Bounded,
    schema: &str,
    workers: usize,
) -> Batcher<AppendReq, AppendOut> {
    let one = sql(schema, "SELECT ok, val FROM {s}.append($1, $2, $3)");
    let many = sql(
        schema,
        "SELECT idx, ok, val FROM {s}.append_many($1, $2, $3, $4)",
    );
    let run: RunBatch<AppendReq, AppendOut> = Arc::new(move |reqs: Vec<AppendReq>| {
        let (pool, one, many) = (pool.clone(), one.clone(), many.clone());
        async move {
            let single = |r: AppendReq| {
                let (pool, one) = (pool.clone(), one.clone());
                async move {
                    let statement = sqlx::query(sqlx::AssertSqlSafe(one))
                        .bind(r.actor)
                        .bind(r.expected)
                        .bind(r.frames);
                    statement
                        .fetch_one(&pool)
                        .await
                        .map(|row| (row.get::<bool, _>(0), row.get::<i64, _>(1)))
                }
            };
            if reqs.len() == 1 {
                let r = reqs.into_iter().next().expect("one request");
                return vec![single(r).await.map_err(pe)];
            }
            let n = reqs.len();
            let mut actors = Vec::with_capacity(n);
            let mut expected = Vec::with_capacity(n);
            let mut counts = Vec::with_capacity(n);
            let mut frames = Vec::new();
            for r in &reqs {
                actors.push(r.actor.clone());
                expected.push(r.expected);
                counts.push(r.frames.len() as i32);
                frames.extend(r.frames.iter().cloned());
            }
            let statement = sqlx::query(sqlx::AssertSqlSafe(many))
                .bind(actors)
                .bind(expected)
                .bind(counts)
                .bind(frames);
            let batch = statement.fetch_all(&pool).await;
            answer(
                batch,
                reqs,
                |row| (row.get::<bool, _>(1), row.get::<i64, _>(2)),
                single,
                pool.within,
            )
            .await
        }
        .boxed()
    });
    Batcher::start(crate::BACKEND, workers, APPEND_BATCH, run)
}

/// The batcher of turns: `turn_many` for two or more, `turn` for one; `turn_relayed`
/// (schema_v12.sql) for a batch or turn with messages for the outbox (a store of 32
/// partitions).
pub(crate) fn turns(pool: Bounded, schema: &str, workers: usize) -> Batcher<TurnReq, TurnOut> {
    let one = sql(
        schema,
        "SELECT status, highest, nframe, npos, ndlv, nerr FROM {s}.turn(\
         $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)",
    );
    let many = sql(
        schema,
        "SELECT idx, status, highest, nframe, npos, ndlv, nerr FROM {s}.turn_many(\
         $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)",
    );
    let relayed = sql(
        schema,
        "SELECT idx, status, highest, nframe, npos, ndlv, nerr FROM {s}.turn_relayed(\
         $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, \
         $23, $24, $25, $26, $27, $28)",
    );
    let run: RunBatch<TurnReq, TurnOut> = Arc::new(move |reqs: Vec<TurnReq>| {
        let (pool, one, many, relayed) = (pool.clone(), one.clone(), many.clone(), relayed.clone());
        async move {
            let single = |t: TurnReq| {
                let (pool, one, relayed) = (pool.clone(), one.clone(), relayed.clone());
                async move {
                    // A turn with messages for the outbox (a store of 32 partitions) needs
                    // `turn_relayed`, for one turn as for many.
                    if !t.ob_actors.is_empty() {
                        let statement = Columns::of(std::slice::from_ref(&t)).query(&relayed, true);
                        let rows = statement.fetch_all(&pool).await?;
                        return match rows.first() {
                            Some(row) => Ok(TurnOut::from_row(row, 1)),
                            None => Err(sqlx::Error::RowNotFound),
                        };
                    }
                    let statement = sqlx::query(sqlx::AssertSqlSafe(one))
                        .bind(t.actor)
                        .bind(t.expected)
                        .bind(t.frames)
                        .bind(t.fence)
                        .bind(t.out_actors)
                        .bind(t.out_ids)
                        .bind(t.out_frames)
                        .bind(t.out_due)
                        .bind(t.settle)
                        .bind(t.settle_actor)
                        .bind(t.pos)
                        .bind(t.dlv)
                        .bind(t.msg)
                        .bind(t.reason)
                        .bind(t.record_actor)
                        .bind(t.record_key)
                        .bind(t.record)
                        .bind(t.record_ttl)
                        .bind(t.next_vis)
                        .bind(t.next_max);
                    statement
                        .fetch_one(&pool)
                        .await
                        .map(|row| TurnOut::from_row(&row, 0))
                }
            };
            // A turn alone runs `turn`: `turn_many`'s set-based statements cost more than
            // `turn_locked`'s simple ones for one turn (1.2 against 0.7 ms a call under the
            // bank at 500 invocations/s, BENCHMARKS.md), and they pay off only from two.
            if reqs.len() == 1 {
                let t = reqs.into_iter().next().expect("one request");
                return vec![single(t).await.map_err(pe)];
            }
            let outbox = reqs.iter().any(|t| !t.ob_actors.is_empty());
            let c = Columns::of(&reqs);
            let statement = if outbox {
                c.query(&relayed, true)
            } else {
                c.query(&many, false)
            };
            let batch = statement.fetch_all(&pool).await;
            answer(
                batch,
                reqs,
                |row| TurnOut::from_row(row, 1),
                single,
                pool.within,
            )
            .await
        }
        .boxed()
    });
    Batcher::start(crate::BACKEND, workers, TURN_BATCH, run)
}

/// The batcher of leases: `lease_many` for two or more (schema_v11.sql), `lease` for one, and
/// for each of a batch whose statement failed.
pub(crate) fn leases(pool: Bounded, schema: &str, workers: usize) -> Batcher<LeaseReq, LeaseOut> {
    let one = sql(
        schema,
        "SELECT frame, pos, dlv, err FROM {s}.lease($1, $2, $3, $4)",
    );
    let many = sql(
        schema,
        "SELECT idx, frame, pos, dlv, err FROM {s}.lease_many($1, $2, $3, $4)",
    );
    let run: RunBatch<LeaseReq, LeaseOut> = Arc::new(move |reqs: Vec<LeaseReq>| {
        let (pool, one, many) = (pool.clone(), one.clone(), many.clone());
        async move {
            let single = |l: LeaseReq| {
                let (pool, one) = (pool.clone(), one.clone());
                async move {
                    let statement = sqlx::query(sqlx::AssertSqlSafe(one))
                        .bind(l.actor)
                        .bind(l.vis)
                        .bind(l.max)
                        .bind(l.early);
                    statement
                        .fetch_one(&pool)
                        .await
                        .map(|row| LeaseOut::from_row(&row, 0))
                }
            };
            // A lease alone runs `lease`, for the reason a turn alone runs `turn`.
            if reqs.len() == 1 {
                let l = reqs.into_iter().next().expect("one request");
                return vec![single(l).await.map_err(pe)];
            }
            let statement = sqlx::query(sqlx::AssertSqlSafe(many))
                .bind(reqs.iter().map(|l| l.actor.clone()).collect::<Vec<_>>())
                .bind(reqs.iter().map(|l| l.vis).collect::<Vec<_>>())
                .bind(reqs.iter().map(|l| l.max).collect::<Vec<_>>())
                .bind(reqs.iter().map(|l| l.early).collect::<Vec<_>>());
            let batch = statement.fetch_all(&pool).await;
            answer(
                batch,
                reqs,
                |row| LeaseOut::from_row(row, 1),
                single,
                pool.within,
            )
            .await
        }
        .boxed()
    });
    Batcher::start(crate::BACKEND, workers, LEASE_BATCH, run)
}

/// A batch's turns as one array per parameter of `turn_many`.
#[derive(Default)]
struct Columns {
    actor: Vec<String>,
    expected: Vec<i64>,
    frame_counts: Vec<i32>,
    frames: Vec<Vec<u8>>,
    fence: Vec<Option<i64>>,
    out_counts: Vec<i32>,
    out_actors: Vec<String>,
    out_ids: Vec<String>,
    out_frames: Vec<Vec<u8>>,
    out_due: Vec<i64>,
    settle: Vec<Option<String>>,
    settle_actor: Vec<Option<String>>,
    pos: Vec<Option<i64>>,
    dlv: Vec<Option<i32>>,
    msg: Vec<Option<String>>,
    reason: Vec<String>,
    record_actor: Vec<Option<String>>,
    record_key: Vec<Option<String>>,
    record: Vec<Option<Vec<u8>>>,
    record_ttl: Vec<Option<i64>>,
    next_vis: Vec<Option<i64>>,
    next_max: Vec<Option<i32>>,
    ob_owner: Vec<i32>,
    ob_part: Vec<i32>,
    ob_actors: Vec<String>,
    ob_ids: Vec<String>,
    ob_frames: Vec<Vec<u8>>,
    ob_due: Vec<i64>,
}

impl Columns {
    /// The columns of a batch of `reqs`.
    fn of(reqs: &[TurnReq]) -> Columns {
        let mut c = Columns::default();
        for t in reqs {
            c.push(t);
        }
        c
    }

    /// `turn_many`'s statement (`sql`) bound to these columns; with `outbox`,
    /// `turn_relayed`'s, which also takes the outbox's.
    fn query(
        self,
        sql: &str,
        outbox: bool,
    ) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let q = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .bind(self.actor)
            .bind(self.expected)
            .bind(self.frame_counts)
            .bind(self.frames)
            .bind(self.fence)
            .bind(self.out_counts)
            .bind(self.out_actors)
            .bind(self.out_ids)
            .bind(self.out_frames)
            .bind(self.out_due)
            .bind(self.settle)
            .bind(self.settle_actor)
            .bind(self.pos)
            .bind(self.dlv)
            .bind(self.msg)
            .bind(self.reason)
            .bind(self.record_actor)
            .bind(self.record_key)
            .bind(self.record)
            .bind(self.record_ttl)
            .bind(self.next_vis)
            .bind(self.next_max);
        if !outbox {
            return q;
        }
        q.bind(self.ob_owner)
            .bind(self.ob_part)
            .bind(self.ob_actors)
            .bind(self.ob_ids)
            .bind(self.ob_frames)
            .bind(self.ob_due)
    }

    fn push(&mut self, t: &TurnReq) {
        let turn = self.actor.len() as i32 + 1;
        for _ in &t.ob_actors {
            self.ob_owner.push(turn);
            self.ob_part.push(t.ob_part);
        }
        self.ob_actors.extend(t.ob_actors.iter().cloned());
        self.ob_ids.extend(t.ob_ids.iter().cloned());
        self.ob_frames.extend(t.ob_frames.iter().cloned());
        self.ob_due.extend(t.ob_due.iter().copied());
        self.actor.push(t.actor.clone());
        self.expected.push(t.expected);
        self.frame_counts.push(t.frames.len() as i32);
        self.frames.extend(t.frames.iter().cloned());
        self.fence.push(t.fence);
        self.out_counts.push(t.out_actors.len() as i32);
        self.out_actors.extend(t.out_actors.iter().cloned());
        self.out_ids.extend(t.out_ids.iter().cloned());
        self.out_frames.extend(t.out_frames.iter().cloned());
        self.out_due.extend(t.out_due.iter().copied());
        self.settle.push(t.settle.clone());
        self.settle_actor.push(t.settle_actor.clone());
        self.pos.push(t.pos);
        self.dlv.push(t.dlv);
        self.msg.push(t.msg.clone());
        self.reason.push(t.reason.clone());
        self.record_actor.push(t.record_actor.clone());
        self.record_key.push(t.record_key.clone());
        self.record.push(t.record.clone());
        self.record_ttl.push(t.record_ttl);
        self.next_vis.push(t.next_vis);
        self.next_max.push(t.next_max);
    }
}

/// A batch statement's answer, one result per request in request order: its rows; or, when it
/// failed for a reason the server gave (one request it could not run, or a deadlock it rolled
/// back, or a timeout), each request again on its own with `single`; or, when the connection
/// failed, that failure for every request (the batch may or may not have committed). Should
/// one of those requests on its own find the server gone (its connection lost, or no answer
/// within its bound) or time out there, the ones after it are not sent: each gets that failure
/// too, so that a batch's retries wait for a server that does not answer once, not once per
/// request. So do those left once the requests run alone have taken `budget` (a statement's
/// bound) in all (`Unavailable`, not sent): on a server slow enough to time the batch out, each
/// could take nearly a timeout without reaching one, and a batch of many would hold its worker
/// for many. The one under way at the budget runs to its own bound: two bounds at most.
async fn answer<R, O, Fut>(
    batch: Result<Vec<PgRow>, sqlx::Error>,
    reqs: Vec<R>,
    row: impl Fn(&PgRow) -> O,
    single: impl Fn(R) -> Fut,
    budget: std::time::Duration,
) -> Vec<StoreResult<O>>
where
    Fut: std::future::Future<Output = Result<O, sqlx::Error>>,
{
    let n = reqs.len();
    match batch {
        Ok(rows) => by_index(n, &rows, row),
        Err(e) => {
            let alone = rolled_back(&e);
            let e = pe(e);
            // The server out of reach, or refusing Loom's login: each request alone would fail
            // alike.
            if !alone
                && matches!(
                    e,
                    StoreError::Unavailable { .. } | StoreError::Denied { .. }
                )
            {
                return (0..n).map(|_| Err(e.clone())).collect();
            }
            let mut out = Vec::with_capacity(n);
            let mut gone: Option<StoreError> = None;
            let deadline = tokio::time::Instant::now() + budget;
            for r in reqs {
                if gone.is_none() && tokio::time::Instant::now() >= deadline {
                    // Not sent: retried as after a lost connection (nothing of it was written).
                    gone = Some(StoreError::unavailable(
                        crate::BACKEND,
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "not sent: the requests run alone after their batch failed took a statement's bound",
                        ),
                    ));
                }
                if let Some(e) = &gone {
                    out.push(Err(e.clone()));
                    continue;
                }
                match single(r).await {
                    Ok(o) => out.push(Ok(o)),
                    Err(e) => {
                        let unanswered = crate::unreachable(&e) || timed_out(&e);
                        let e = pe(e);
                        if unanswered {
                            gone = Some(e.clone());
                        }
                        out.push(Err(e));
                    }
                }
            }
            out
        }
    }
}

/// Whether the server answered a batch's statement with a deadlock, a serialization failure,
/// or a statement or lock timeout (one request waiting on a row another session holds, say):
/// it rolled the statement back (a batch is one statement, its own transaction), so nothing of
/// the batch committed and each request can run alone, as after any other error the server
/// answered with, rather than every caller hearing `Unavailable` ("may have committed"), which
/// is what a lost connection must answer.
fn rolled_back(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40001" | "40P01" | "57014" | "55P03")))
}

/// Whether a request run alone timed out at the server (`statement_timeout`, or a lock
/// timeout): the requests after it are not run alone, each of which could wait as long, but
/// answered with its failure, so that a batch that timed out costs at most two bounds more.
fn timed_out(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("57014" | "55P03")))
}

fn sql(schema: &str, text: &str) -> String {
    // The schema was checked at connect to be [a-z0-9_]: the only text put into a query.
    text.replace("{s}", schema)
}

/// Puts rows carrying a 1-based index in column 0 back in request order.
fn by_index<O>(n: usize, rows: &[PgRow], f: impl Fn(&PgRow) -> O) -> Vec<StoreResult<O>> {
    let mut out: Vec<Option<O>> = (0..n).map(|_| None).collect();
    for row in rows {
        let idx: i64 = row.get(0);
        if let Some(slot) = usize::try_from(idx - 1).ok().and_then(|i| out.get_mut(i)) {
            *slot = Some(f(row));
        }
    }
    out.into_iter()
        .map(|o| o.ok_or_else(|| crate::sql::unexpected("a batch skipped a request")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A batch the server refused is retried request by request; once one of those finds the
    /// server gone (here: no answer within its bound), the rest are not sent and get that
    /// failure. Before, each was sent and waited out its own bound: a batch of 256 could hold
    /// its worker for 256 bounds.
    #[tokio::test]
    async fn retries_stop_at_the_first_that_finds_the_server_gone() {
        let sent = AtomicUsize::new(0);
        let refused = Err(sqlx::Error::Protocol("refused".into()));
        let out = answer(
            refused,
            vec![1, 2, 3, 4],
            |_| 0,
            |r: i32| {
                sent.fetch_add(1, Ordering::SeqCst);
                async move {
                    if r == 1 {
                        Ok(10)
                    } else {
                        Err(sqlx::Error::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no answer",
                        )))
                    }
                }
            },
            std::time::Duration::from_secs(60),
        )
        .await;
        assert_eq!(sent.load(Ordering::SeqCst), 2, "requests sent one by one");
        assert!(matches!(out[0], Ok(10)));
        for r in &out[1..] {
            assert!(matches!(r, Err(StoreError::Unavailable { .. })), "{r:?}");
        }
    }

    /// Requests run alone after a batch failed stop being sent once they have taken the
    /// budget in all, each slow but none failing: the rest get the batch's failure. Before, a
    /// server slow enough to time a batch out held its worker for about a timeout per request.
    #[tokio::test]
    async fn requests_run_alone_stop_at_the_budget() {
        let sent = AtomicUsize::new(0);
        let refused = Err(sqlx::Error::Protocol("refused".into()));
        let out = answer(
            refused,
            vec![1, 2, 3, 4, 5, 6],
            |_| 0,
            |r: i32| {
                sent.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    Ok(r)
                }
            },
            std::time::Duration::from_millis(250),
        )
        .await;
        // At 0, 100 and 200 ms under the budget (later on a loaded machine), at 300 past it.
        let sent = sent.load(Ordering::SeqCst);
        assert!((1..=3).contains(&sent), "{sent} requests sent one by one");
        for (i, r) in out.iter().enumerate() {
            assert_eq!(r.is_ok(), i < sent, "request {i}: {r:?}");
        }
    }
}
