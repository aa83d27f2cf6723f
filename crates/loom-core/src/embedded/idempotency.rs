//! [`IdempotencyStore`] on redb.

use crate::store::backend::check_ttl;
use std::time::Duration;

use async_trait::async_trait;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::codec::{self, RecordType};
use crate::error::{StoreError, StoreResult};
use crate::id::{ActorId, IdempotencyKey};
use crate::store::backend::prepare_result;
use crate::store::{IdempotencyStore, Reservation};
use crate::time::Timestamp;

use super::EmbeddedStore;
use super::redo::Rec;
use super::tables::{IDEMPOTENCY, Tx, se};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    result: Option<Value>,
    expires_at: Timestamp,
}

impl Row {
    fn reservation(self) -> Reservation {
        match self.result {
            Some(v) => Reservation::Completed(v),
            None => Reservation::Pending {
                expires_at: self.expires_at,
            },
        }
    }
}

type Records<'t> = Rec<'t, (&'static str, &'static str), &'static [u8]>;
type Expiry<'t> = Rec<'t, (u64, &'static str, &'static str), ()>;

fn get(
    table: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    actor: &ActorId,
    key: &IdempotencyKey,
) -> StoreResult<Option<Row>> {
    match table.get((actor.as_str(), key.as_str())).map_err(se)? {
        None => Ok(None),
        Some(v) => codec::decode(RecordType::Idempotency, v.value())
            .map(Some)
            .map_err(|e| StoreError::corrupt(format!("idempotency record {key} of {actor}"), e)),
    }
}

/// Replaces the record (and its expiry index key) with `row`, or removes it for `None`.
fn set(
    records: &mut Records<'_>,
    expiry: &mut Expiry<'_>,
    actor: &ActorId,
    key: &IdempotencyKey,
    old: Option<&Row>,
    row: Option<&Row>,
) -> StoreResult<()> {
    let (a, k) = (actor.as_str(), key.as_str());
    if let Some(old) = old {
        expiry
            .remove((old.expires_at.as_millis(), a, k))
            .map_err(se)?;
    }
    match row {
        Some(row) => {
            let bytes = codec::encode(RecordType::Idempotency, row).map_err(|e| {
                StoreError::corrupt(format!("idempotency record {key} of {actor}"), e)
            })?;
            records.insert((a, k), bytes.as_slice()).map_err(se)?;
            expiry
                .insert((row.expires_at.as_millis(), a, k), ())
                .map_err(se)?;
        }
        None => {
            records.remove((a, k)).map_err(se)?;
        }
    }
    Ok(())
}

/// Records `result` for `key`, replacing whatever was there; for [`IdempotencyStore::complete`]
/// and for turns.
pub(super) fn record(
    tx: &mut Tx<'_>,
    actor: &ActorId,
    key: &IdempotencyKey,
    result: Value,
    ttl: Duration,
) -> StoreResult<()> {
    let records = tx.idempotency.get()?;
    let expiry = tx.idempotency_expiry.get()?;
    let old = get(&**records, actor, key)?;
    let row = Row {
        result: Some(result),
        expires_at: Timestamp::now() + ttl,
    };
    set(records, expiry, actor, key, old.as_ref(), Some(&row))
}

/// Reserves `key` unless a live record holds it; returns that record's reservation if so. The
/// reservation lasts `ttl`, or with `None` until a result is recorded ([`Timestamp::MAX`]: the
/// expiry index then never reaches it).
pub(super) fn reserve(
    tx: &mut Tx<'_>,
    actor: &ActorId,
    key: &IdempotencyKey,
    ttl: Option<Duration>,
) -> StoreResult<Option<Reservation>> {
    let now = Timestamp::now();
    let records = tx.idempotency.get()?;
    let expiry = tx.idempotency_expiry.get()?;
    let old = get(&**records, actor, key)?;
    if let Some(row) = &old
        && row.expires_at > now
    {
        return Ok(Some(row.clone().reservation()));
    }
    let row = Row {
        result: None,
        expires_at: ttl.map_or(Timestamp::MAX, |ttl| now + ttl),
    };
    set(records, expiry, actor, key, old.as_ref(), Some(&row))?;
    Ok(None)
}

/// Holds `key` for a message that waits again (a requeued dead letter): pending until a turn
/// records its result, whatever the key held before.
pub(super) fn hold(tx: &mut Tx<'_>, actor: &ActorId, key: &IdempotencyKey) -> StoreResult<()> {
    let records = tx.idempotency.get()?;
    let expiry = tx.idempotency_expiry.get()?;
    let old = get(&**records, actor, key)?;
    let row = Row {
        result: None,
        expires_at: Timestamp::MAX,
    };
    set(records, expiry, actor, key, old.as_ref(), Some(&row))
}

#[async_trait]
impl IdempotencyStore for EmbeddedStore {
    async fn reserve(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        ttl: Duration,
    ) -> StoreResult<Reservation> {
        let p = self.part(actor);
        check_ttl("idempotency ttl", ttl)?;
        let (actor, key) = (actor.clone(), key.clone());
        self.write_in(p, move |tx| {
            Ok(reserve(tx, &actor, &key, Some(ttl))?.unwrap_or(Reservation::Reserved))
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
        let p = self.part(actor);
        check_ttl("idempotency ttl", ttl)?;
        prepare_result(actor, key, result)?;
        let (a, k, result) = (actor.clone(), key.clone(), result.clone());
        self.write_in(p, move |tx| {
            let records = tx.idempotency.get()?;
            let expiry = tx.idempotency_expiry.get()?;
            let old = get(&**records, &a, &k)?;
            let row = Row {
                result: Some(result),
                expires_at: Timestamp::now() + ttl,
            };
            set(records, expiry, &a, &k, old.as_ref(), Some(&row))
        })
        .await?;
        self.signal_done(actor, key);
        Ok(())
    }

    fn completions(&self) -> Option<tokio::sync::broadcast::Receiver<crate::store::Completion>> {
        Some(self.done_signals())
    }

    async fn abandon(&self, actor: &ActorId, key: &IdempotencyKey) -> StoreResult<bool> {
        let p = self.part(actor);
        let (actor, key) = (actor.clone(), key.clone());
        self.write_in(p, move |tx| {
            let records = tx.idempotency.get()?;
            let expiry = tx.idempotency_expiry.get()?;
            match get(&**records, &actor, &key)? {
                Some(row) if row.result.is_none() => {
                    set(records, expiry, &actor, &key, Some(&row), None)?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
        .await
    }

    async fn lookup(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
    ) -> StoreResult<Option<Reservation>> {
        let p = self.part(actor);
        let (actor, key) = (actor.clone(), key.clone());
        self.read_in(p, move |txn| {
            let records = txn.open_table(IDEMPOTENCY).map_err(se)?;
            let now = Timestamp::now();
            Ok(get(&records, &actor, &key)?
                .filter(|r| r.expires_at > now)
                .map(Row::reservation))
        })
        .await
    }

    async fn purge_expired(&self, limit: usize) -> StoreResult<u64> {
        // Up to `limit` in all, partition after partition.
        let mut purged = 0;
        for p in 0..self.partitions() {
            let left = limit.saturating_sub(purged as usize);
            if left == 0 {
                break;
            }
            // A look first: the runtime purges on a timer, and a write (a batch of the
            // partition's writer, its redo record) for nothing would cost every partition that.
            let now = Timestamp::now().as_millis();
            let any = self
                .read_in(p, move |txn| {
                    let expiry = txn
                        .open_table(super::tables::IDEMPOTENCY_EXPIRY)
                        .map_err(se)?;
                    Ok(expiry.range(expired_by(now)).map_err(se)?.next().is_some())
                })
                .await?;
            if any {
                purged += self.write_in(p, move |tx| purge_in(tx, left)).await?;
            }
        }
        Ok(purged)
    }
}

/// The expiry index's keys of records expired by `now` (ms): every key at or before it.
fn expired_by(now: u64) -> std::ops::RangeToInclusive<(u64, &'static str, &'static str)> {
    ..=(now, "\u{10FFFF}", "\u{10FFFF}")
}

/// Purges up to `limit` expired records of one partition.
fn purge_in(tx: &mut Tx<'_>, limit: usize) -> StoreResult<u64> {
    let now = Timestamp::now().as_millis();
    let records = tx.idempotency.get()?;
    let expiry = tx.idempotency_expiry.get()?;
    let mut doomed = Vec::new();
    for item in expiry.range(expired_by(now)).map_err(se)?.take(limit) {
        let (k, _) = item.map_err(se)?;
        let (at, a, key) = k.value();
        doomed.push((at, a.to_owned(), key.to_owned()));
    }
    for (at, a, key) in &doomed {
        expiry.remove((*at, a.as_str(), key.as_str())).map_err(se)?;
        records.remove((a.as_str(), key.as_str())).map_err(se)?;
    }
    Ok(doomed.len() as u64)
}
