//! What every file of this backend shares: converting numbers and durations for SQL, naming
//! the store's schema in a query, and the error for a reply that makes no sense.

use std::time::Duration;

use loom_core::store::Lease;
use loom_core::store::backend::{FenceOf, fence_of};
use loom_core::{ActorId, StoreError, StoreResult};

use crate::{BACKEND, PostgresStore};

pub(crate) fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
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
