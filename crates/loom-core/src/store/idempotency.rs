//! [`IdempotencyStore`]: remember that a request was seen, and what it answered.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::error::{Limit, StoreError, StoreResult};
use crate::id::{ActorId, IdempotencyKey};
use crate::limits::MAX_RESULT_BYTES;
use crate::time::Timestamp;

/// The outcome of [`IdempotencyStore::reserve`].
#[derive(Debug, Clone, PartialEq)]
pub enum Reservation {
    /// The caller holds the key now and should do the work, then
    /// [`complete`](IdempotencyStore::complete) or [`abandon`](IdempotencyStore::abandon) it.
    Reserved,
    /// Someone else reserved the key and has not finished.
    Pending {
        /// When that reservation runs out.
        expires_at: Timestamp,
    },
    /// The work was done; here is what it answered.
    Completed(Value),
}

/// A result recorded for `key` of `actor`, as [`IdempotencyStore::completions`] signals it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Completion {
    /// The actor the key is of.
    pub actor: ActorId,
    /// The key.
    pub key: IdempotencyKey,
}

impl Completion {
    /// The signal's payload on the wire: `kind/key`, a newline, the idempotency key (neither
    /// holds a newline: ids refuse control characters, keys whitespace).
    ///
    /// ```
    /// use loom_core::{ActorId, IdempotencyKey};
    /// use loom_core::store::Completion;
    ///
    /// let c = Completion {
    ///     actor: ActorId::new("account", "alice")?,
    ///     key: IdempotencyKey::new("ask-1")?,
    /// };
    /// assert_eq!(c.payload(), "account/alice\nask-1");
    /// assert_eq!(Completion::parse(&c.payload()), Some(c));
    /// assert_eq!(Completion::parse("no newline"), None);
    /// # Ok::<(), loom_core::IdError>(())
    /// ```
    pub fn payload(&self) -> String {
        format!("{}\n{}", self.actor, self.key)
    }

    /// Reads a [`payload`](Self::payload); `None` if it is not one.
    pub fn parse(payload: &str) -> Option<Completion> {
        let (actor, key) = payload.split_once('\n')?;
        Some(Completion {
            actor: actor.parse().ok()?,
            key: IdempotencyKey::new(key).ok()?,
        })
    }
}

/// Idempotency records, per actor and key, each with a time to live.
///
/// Rules every backend keeps:
/// - [`reserve`](Self::reserve) is atomic: of any number of concurrent callers, exactly one gets
///   [`Reservation::Reserved`];
/// - a record is gone once its TTL has run out: reserving the key again succeeds;
/// - [`complete`](Self::complete) records the result, which later reservations return.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Reserves `key` for `ttl`, or reports who has it.
    async fn reserve(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        ttl: Duration,
    ) -> StoreResult<Reservation>;

    /// Records the result for `key`, kept for `ttl` from now.
    async fn complete(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        result: &Value,
        ttl: Duration,
    ) -> StoreResult<()>;

    /// Drops a pending reservation (the work failed and may be tried again). A completed record
    /// is kept. Returns whether a reservation was dropped.
    async fn abandon(&self, actor: &ActorId, key: &IdempotencyKey) -> StoreResult<bool>;

    /// The record for `key`, if it has not expired: `Pending` or `Completed`.
    async fn lookup(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
    ) -> StoreResult<Option<Reservation>>;

    /// A signal that results were recorded, by this process or another one: the actor and key
    /// of each, so that a node waiting for a reply another node's turn records (a client
    /// runtime's `ask`) looks at once instead of at its next poll (Redis: `PUBLISH`,
    /// PostgreSQL: `NOTIFY`; the embedded store: in memory, between the runtimes of its one
    /// process). `None`, the default, for stores that offer none: the waiter then polls
    /// [`lookup`](Self::lookup). A signal may be spurious, or missed while the store reconnects
    /// or the receiver lags; the poll stays as the safety net either way.
    fn completions(&self) -> Option<tokio::sync::broadcast::Receiver<Completion>> {
        None
    }

    /// Removes up to `limit` expired records; returns how many. Expired records are already
    /// invisible to every other call; a backend whose records expire by themselves (Redis keys
    /// with a TTL) has nothing to purge and returns 0. Live records are never removed.
    async fn purge_expired(&self, limit: usize) -> StoreResult<u64>;
}

/// Checks a result for [`IdempotencyStore::complete`] against [`MAX_RESULT_BYTES`]; every
/// backend calls it.
pub fn prepare_result(
    actor: &ActorId,
    key: &IdempotencyKey,
    result: &Value,
) -> StoreResult<Vec<u8>> {
    let bytes = serde_json::to_vec(result)
        .map_err(|e| StoreError::InvalidRequest(format!("result for {key} of {actor}: {e}")))?;
    if bytes.len() > MAX_RESULT_BYTES {
        return Err(StoreError::TooLarge {
            what: format!("result for idempotency key {key} of {actor}"),
            size: bytes.len(),
            limit: MAX_RESULT_BYTES,
            limit_kind: Limit::ResultBytes,
        });
    }
    crate::codec::check_depth(&bytes, crate::limits::MAX_JSON_DEPTH, || {
        format!("result for idempotency key {key} of {actor}")
    })?;
    Ok(bytes)
}
