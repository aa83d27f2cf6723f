//! [`IdempotencyStore`] on Redis: a hash per key, held while its message waits; see `loom.lua`.

use loom_core::store::backend::check_ttl;
use std::time::Duration;

use async_trait::async_trait;
use loom_core::codec::CodecError;
use loom_core::store::backend::prepare_result;
use loom_core::store::{IdempotencyStore, Reservation};
use loom_core::{ActorId, IdempotencyKey, StoreError, StoreResult, Timestamp};
use redis::Value;
use serde_json::Value as Json;

use crate::resp::*;
use crate::{RedisStore, re};

/// Reads an idempotency record's value (`P` or `C<json>`) and its expiry as the scripts give it
/// (`record_expiry`: empty for a reservation held until its message is settled).
pub(crate) fn reservation(
    actor: &ActorId,
    key: &IdempotencyKey,
    value: &[u8],
    expiry: Option<&Value>,
) -> StoreResult<Reservation> {
    let expires_at = match text(expiry).as_deref() {
        Some("") => Timestamp::MAX,
        _ => Timestamp::from_millis(number(expiry, "expiry")?),
    };
    match value.split_first() {
        Some((b'P', _)) => Ok(Reservation::Pending { expires_at }),
        Some((b'C', json)) => serde_json::from_slice(json)
            .map(Reservation::Completed)
            .map_err(|e| {
                StoreError::corrupt(
                    format!("idempotency record {key} of {actor}"),
                    CodecError::Body(e.to_string()),
                )
            }),
        _ => Err(StoreError::corrupt(
            format!("idempotency record {key} of {actor}"),
            CodecError::Body("unknown record".into()),
        )),
    }
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    async fn reserve(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        ttl_: Duration,
    ) -> StoreResult<Reservation> {
        check_ttl("idempotency ttl", ttl_)?;
        let k = self.keys.idempotency(actor, key);
        let r = self
            .run(&self.scripts.reserve, &[&k], vec![ttl(ttl_)])
            .await?;
        match status(&r).as_str() {
            "ok" => Ok(Reservation::Reserved),
            "taken" => {
                let found =
                    reservation(actor, key, &bytes(r.get(1)).unwrap_or_default(), r.get(2))?;
                self.replicated_as_read(&found).await?;
                Ok(found)
            }
            other => Err(unexpected(format!("reserve replied {other}"))),
        }
    }

    async fn complete(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        result: &Json,
        ttl_: Duration,
    ) -> StoreResult<()> {
        check_ttl("idempotency ttl", ttl_)?;
        let mut value = b"C".to_vec();
        value.extend(prepare_result(actor, key, result)?);
        let mut conn = self.conn();
        let _: () = redis::cmd("SET")
            .arg(self.keys.idempotency(actor, key))
            .arg(value)
            .arg("PX")
            .arg(ttl(ttl_))
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        // The signal for a node waiting for this reply; after the record, so that whoever it
        // wakes finds it. Not part of the write: a lost signal leaves the waiter to its poll.
        let c = loom_core::store::Completion {
            actor: actor.clone(),
            key: key.clone(),
        };
        let published: Result<u64, _> = redis::cmd("PUBLISH")
            .arg(self.keys.done())
            .arg(c.payload())
            .query_async(&mut conn)
            .await;
        if let Err(e) = published {
            tracing::debug!(actor = %actor, error = %e, "could not signal a recorded result; waiters find it by their poll");
        }
        Ok(())
    }

    fn completions(
        &self,
    ) -> Option<tokio::sync::broadcast::Receiver<loom_core::store::Completion>> {
        Some(self.signals.completions())
    }

    async fn abandon(&self, actor: &ActorId, key: &IdempotencyKey) -> StoreResult<bool> {
        let k = self.keys.idempotency(actor, key);
        let r = self.run(&self.scripts.abandon, &[&k], vec![]).await?;
        Ok(text(r.get(1)).as_deref() == Some("1"))
    }

    async fn lookup(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
    ) -> StoreResult<Option<Reservation>> {
        let k = self.keys.idempotency(actor, key);
        let r = self.run(&self.scripts.lookup, &[&k], vec![]).await?;
        match status(&r).as_str() {
            "none" => Ok(None),
            "ok" => {
                let found =
                    reservation(actor, key, &bytes(r.get(1)).unwrap_or_default(), r.get(2))?;
                self.replicated_as_read(&found).await?;
                Ok(Some(found))
            }
            other => Err(unexpected(format!("lookup replied {other}"))),
        }
    }

    /// Redis expires records by itself (each has a TTL), so there is never anything to purge.
    async fn purge_expired(&self, _limit: usize) -> StoreResult<u64> {
        Ok(0)
    }
}
