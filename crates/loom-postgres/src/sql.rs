//! What every file of this backend shares: converting numbers and durations for SQL, naming
//! the store's schema in a query, the error for a reply that makes no sense, and the pool every
//! statement goes through, which bounds how long its answer is waited for ([`Bounded`]).

use std::time::Duration;

use loom_core::store::Lease;
use loom_core::store::backend::{FenceOf, fence_of};
use loom_core::{ActorId, StoreError, StoreResult};

use crate::{BACKEND, PostgresStore};

pub(crate) fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A moment stored by [`int`]: `i64::MAX`, where every later moment was clamped (a due time of
/// `Timestamp::MAX`, "never", which a delay too long to add saturates to), is read back as
/// `Timestamp::MAX`; a negative one as the epoch.
pub(crate) fn moment(ms: i64) -> loom_core::Timestamp {
    match ms {
        i64::MAX => loom_core::Timestamp::MAX,
        ms => loom_core::Timestamp::from_millis(ms.max(0) as u64),
    }
}

/// The `p_fence_token` of a write of `actor` fenced by `fence` (rule D8; `fence_held` in
/// `schema_v10.sql`): the token of the actor's own lease, or the negated token of its
/// partition's. A fence that is neither is refused.
pub(crate) fn fence_token(actor: &ActorId, fence: &Lease) -> StoreResult<i64> {
    // A store of 1 partition or of 32: nodes divide SHARED_STORE_PARTITIONS among themselves
    // either way.
    Ok(match fence_of(actor, fence, 1)? {
        FenceOf::Own => int(fence.token),
        FenceOf::Partition => -int(fence.token),
    })
}

/// A failure text (a nack's error, a dead letter's reason) as a `text` column takes it:
/// clipped ([`clip_reason`](loom_core::limits::clip_reason)), and each NUL, which PostgreSQL's
/// `text` refuses, replaced by U+FFFD. A handler's failure may hold what its input held, and a
/// refused nack or burial would leave its message redelivered without backoff.
pub(crate) fn reason_text(text: &str) -> String {
    let clipped = loom_core::limits::clip_reason(text);
    if clipped.contains('\0') {
        clipped.replace('\0', "\u{FFFD}")
    } else {
        clipped
    }
}

pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

pub(crate) fn unexpected(what: impl Into<String>) -> StoreError {
    StoreError::storage(BACKEND, Unexpected(what.into()))
}

#[derive(Debug, thiserror::Error)]
#[error("unexpected reply from PostgreSQL: {0}")]
pub(crate) struct Unexpected(String);

pub(crate) fn parse_actor(s: &str, what: &str) -> StoreResult<ActorId> {
    ActorId::from_stored(s, what)
}

impl PostgresStore {
    /// A query text with the schema filled in. The schema is the only text ever put into a
    /// query (values are bound parameters), and it was checked at connect to be `[a-z0-9_]`.
    pub(crate) fn q(&self, sql: &str) -> sqlx::AssertSqlSafe<String> {
        sqlx::AssertSqlSafe(sql.replace("{s}", &self.schema))
    }
}

/// The store's connection pool, through which every statement of the store is sent (as
/// `.fetch_all(&self.pool)`, the pool being this): it waits for a connection at most the pool's
/// `acquire_timeout`, and for the statement's answer at most `within`, the session's
/// `statement_timeout` and a margin (`lib.rs`, `ANSWER_MARGIN`). A statement the server has
/// not answered by then (a connection gone silent, a server process stopped mid-statement:
/// waits that `statement_timeout`, counted by the server, cannot end, and that would otherwise
/// last as long as the kernel keeps the connection) fails as a lost connection does, with an
/// I/O error (`Unavailable`: it may have committed). Its connection is closed, never handed to
/// another statement: returning it to the pool would first wait, without a bound, for the
/// answer that did not come.
///
/// What this does not bound: the migrating transaction at connect (`lib.rs`, `migrate`),
/// whose statements run on a connection of their own and may rightly take long, and the
/// `LISTEN` connection (`signals.rs`, a pool of its own), which only hurries wake-ups up; and
/// sqlx's ping of an answered statement's connection on its way back to the pool: a server that
/// freezes just then keeps that connection's slot, so the pool has one fewer (calls still end,
/// with `Unavailable` once `acquire_timeout` passes, if no slot is left). A call of several
/// statements waits up to one bound for each.
#[derive(Clone, Debug)]
pub(crate) struct Bounded {
    pub(crate) pool: sqlx::PgPool,
    pub(crate) within: Duration,
}

/// A connection taken for one statement, closed when dropped unless the statement was answered.
/// A caller that stops waiting (the runtime gives a lease renewal up at the lease's deadline,
/// sooner than the bound) drops the statement unanswered: returning the connection to the pool
/// would first wait, without a bound, for that answer, holding the pool's slot meanwhile.
struct Taken {
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    answered: bool,
}

impl Drop for Taken {
    fn drop(&mut self) {
        if !self.answered {
            self.conn.close_on_drop();
        }
    }
}

/// Runs `$call` (a statement on the connection `$c`) on a connection of `$pool` (a
/// [`Bounded`]), waiting for its answer at most the pool's bound.
macro_rules! within_bound {
    ($pool:expr, |$c:ident| $call:expr) => {{
        let mut taken = Taken {
            conn: $pool.pool.acquire().await?,
            answered: false,
        };
        let $c = &mut *taken.conn;
        match tokio::time::timeout($pool.within, $call).await {
            Ok(answer) => {
                taken.answered = true;
                answer
            }
            Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within {:?}: the statement may have committed",
                    $pool.within
                ),
            ))),
        }
    }};
}

impl<'p> sqlx::Executor<'p> for &'_ Bounded {
    type Database = sqlx::Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> futures::stream::BoxStream<
        'e,
        Result<sqlx::Either<sqlx::postgres::PgQueryResult, sqlx::postgres::PgRow>, sqlx::Error>,
    >
    where
        'p: 'e,
        E: 'q + sqlx::Execute<'q, sqlx::Postgres>,
    {
        use futures::{StreamExt, TryStreamExt};
        let pool = self.clone();
        // The whole answer is read within the bound, then handed on: the store's statements
        // answer a bounded number of rows.
        futures::stream::once(async move {
            within_bound!(pool, |c| c.fetch_many(query).try_collect::<Vec<_>>())
        })
        .map_ok(|all| futures::stream::iter(all.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> futures::future::BoxFuture<'e, Result<Option<sqlx::postgres::PgRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + sqlx::Execute<'q, sqlx::Postgres>,
    {
        use futures::FutureExt;
        let pool = self.clone();
        async move { within_bound!(pool, |c| c.fetch_optional(query)) }.boxed()
    }

    fn prepare_with<'e>(
        self,
        sql: sqlx::SqlStr,
        parameters: &'e [sqlx::postgres::PgTypeInfo],
    ) -> futures::future::BoxFuture<'e, Result<sqlx::postgres::PgStatement, sqlx::Error>>
    where
        'p: 'e,
    {
        use futures::FutureExt;
        let pool = self.clone();
        async move { within_bound!(pool, |c| c.prepare_with(sql, parameters)) }.boxed()
    }
}
