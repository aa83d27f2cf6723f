//! [`IdempotencyStore`] for [`SimStore`]: per-actor idempotency records with their expiry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use loom_core::store::backend::{check_ttl, prepare_result};
use loom_core::{ActorId, IdempotencyKey, IdempotencyStore, Reservation, StoreResult, Timestamp};
use serde_json::Value;

use super::SimStore;

/// One record: pending (`result: None`) or completed, live while `expires_at > now`. A
/// reservation held until its message is settled expires at [`Timestamp::MAX`], never.
#[derive(Debug, Clone)]
struct Row {
    result: Option<Arc<Value>>,
    expires_at: Timestamp,
}

impl Row {
    fn reservation(&self) -> Reservation {
        match &self.result {
            Some(v) => Reservation::Completed((**v).clone()),
            None => Reservation::Pending {
                expires_at: self.expires_at,
            },
        }
    }

    fn live(&self, now: Timestamp) -> bool {
        self.expires_at > now
    }
}

/// Every record, per actor. Invariants: an expired record is invisible to every call but
/// [`abandon`](IdempotencyStore::abandon) and the purge (as in the embedded store); an actor
/// with no record left has no entry here (so that a sync copies nothing for it).
#[derive(Debug, Clone, Default)]
pub(super) struct Records {
    by_actor: BTreeMap<ActorId, Arc<BTreeMap<IdempotencyKey, Row>>>,
}

impl Records {
    fn row(&self, actor: &ActorId, key: &IdempotencyKey) -> Option<&Row> {
        self.by_actor.get(actor).and_then(|keys| keys.get(key))
    }

    fn put(&mut self, actor: &ActorId, key: &IdempotencyKey, row: Row) {
        let keys = Arc::make_mut(self.by_actor.entry(actor.clone()).or_default());
        keys.insert(key.clone(), row);
    }

    fn remove(&mut self, actor: &ActorId, key: &IdempotencyKey) {
        if let Some(keys) = self.by_actor.get_mut(actor) {
            Arc::make_mut(keys).remove(key);
            if keys.is_empty() {
                self.by_actor.remove(actor);
            }
        }
    }

    /// Reserves `key` unless a live record holds it; returns that record's reservation if so.
    /// The reservation lasts `ttl`, or with `None` until a result is recorded.
    pub(super) fn reserve(
        &mut self,
        actor: &ActorId,
        key: &IdempotencyKey,
        ttl: Option<Duration>,
        now: Timestamp,
    ) -> Option<Reservation> {
        if let Some(row) = self.row(actor, key)
            && row.live(now)
        {
            return Some(row.reservation());
        }
        let row = Row {
            result: None,
            expires_at: ttl.map_or(Timestamp::MAX, |ttl| now + ttl),
        };
        self.put(actor, key, row);
        None
    }

    /// Records `result` for `key`, kept for `ttl` from `now`, replacing whatever was there.
    pub(super) fn record(
        &mut self,
        actor: &ActorId,
        key: &IdempotencyKey,
        result: Value,
        ttl: Duration,
        now: Timestamp,
    ) {
        let row = Row {
            result: Some(Arc::new(result)),
            expires_at: now + ttl,
        };
        self.put(actor, key, row);
    }

    /// Holds `key` for a message that waits again (a requeued dead letter): pending until a
    /// turn records its result, whatever the key held before.
    pub(super) fn hold(&mut self, actor: &ActorId, key: &IdempotencyKey) {
        let row = Row {
            result: None,
            expires_at: Timestamp::MAX,
        };
        self.put(actor, key, row);
    }

    /// Drops a pending reservation; returns whether there was one. A result is kept.
    fn abandon(&mut self, actor: &ActorId, key: &IdempotencyKey) -> bool {
        if self.row(actor, key).is_some_and(|r| r.result.is_none()) {
            self.remove(actor, key);
            return true;
        }
        false
    }

    fn lookup(&self, actor: &ActorId, key: &IdempotencyKey, now: Timestamp) -> Option<Reservation> {
        self.row(actor, key)
            .filter(|r| r.live(now))
            .map(Row::reservation)
    }

    /// Whether any record has expired.
    fn any_expired(&self, now: Timestamp) -> bool {
        self.by_actor
            .values()
            .any(|keys| keys.values().any(|row| !row.live(now)))
    }

    /// Removes up to `limit` expired records, in actor then key order; returns how many.
    fn purge(&mut self, limit: usize, now: Timestamp) -> u64 {
        let doomed: Vec<(ActorId, IdempotencyKey)> = self
            .by_actor
            .iter()
            .flat_map(|(actor, keys)| {
                keys.iter()
                    .filter(|(_, row)| !row.live(now))
                    .map(move |(key, _)| (actor.clone(), key.clone()))
            })
            .take(limit)
            .collect();
        for (actor, key) in &doomed {
            self.remove(actor, key);
        }
        doomed.len() as u64
    }
}

#[async_trait]
impl IdempotencyStore for SimStore {
    async fn reserve(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        ttl: Duration,
    ) -> StoreResult<Reservation> {
        check_ttl("idempotency ttl", ttl)?;
        let arg = format!("{actor} {key}");
        let (actor, key) = (actor.clone(), key.clone());
        self.update("reserve", &arg, move |d, now| {
            Ok(d.records
                .reserve(&actor, &key, Some(ttl), now)
                .unwrap_or(Reservation::Reserved))
        })
        .await
    }

    async fn complete(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        result: &Value,
        ttl: Duration,
    ) -> StoreResult<()> {
        check_ttl("idempotency ttl", ttl)?;
        prepare_result(actor, key, result)?;
        let arg = format!("{actor} {key}");
        let (actor, key, result) = (actor.clone(), key.clone(), result.clone());
        self.update("complete", &arg, move |d, now| {
            d.records.record(&actor, &key, result, ttl, now);
            Ok(())
        })
        .await
    }

    async fn abandon(&self, actor: &ActorId, key: &IdempotencyKey) -> StoreResult<bool> {
        let arg = format!("{actor} {key}");
        let (actor, key) = (actor.clone(), key.clone());
        self.update("abandon", &arg, move |d, _| {
            Ok(d.records.abandon(&actor, &key))
        })
        .await
    }

    async fn lookup(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
    ) -> StoreResult<Option<Reservation>> {
        let arg = format!("{actor} {key}");
        self.query("lookup", &arg, |d, now| {
            Ok(d.records.lookup(actor, key, now))
        })
        .await
    }

    async fn purge_expired(&self, limit: usize) -> StoreResult<u64> {
        // A write only when something has expired (as the embedded store's look first): the
        // runtime purges on a timer, and most of its calls find nothing.
        self.update_if(
            "purge_expired",
            &limit.to_string(),
            |d, now| d.records.any_expired(now),
            move |d, now| Ok(d.records.purge(limit, now)),
        )
        .await
    }
}
