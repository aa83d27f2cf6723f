//! [`IdempotencyStore`] on PostgreSQL: one row per key, held while its message waits (`schema.sql`).

use loom_core::store::backend::check_ttl;
use std::time::Duration;

use async_trait::async_trait;
use loom_core::codec::CodecError;
use loom_core::store::backend::prepare_result;
use loom_core::store::{IdempotencyStore, Reservation};
use loom_core::{ActorId, IdempotencyKey, StoreError, StoreResult, Timestamp};
use serde_json::Value;
use sqlx::Row;

use crate::sql::*;
use crate::{PostgresStore, pe};

pub(crate) fn reservation(
    actor: &ActorId,
    key: &IdempotencyKey,
    result: Option<Vec<u8>>,
    expires_at: Option<i64>,
) -> StoreResult<Reservation> {
    // Every record has an expiry; none means the row was not there (schema version 15 no
    // longer answers so), which is reported rather than read as a pending record.
    let expires_at = expires_at.ok_or_else(|| {
        crate::sql::unexpected(format!(
            "idempotency record {key} of {actor} answered as taken, with no expiry"
        ))
    })?;
    match result {
        // i64::MAX: held until its message is settled (see `enqueue_once` in schema_v3.sql).
        None if expires_at == i64::MAX => Ok(Reservation::Pending {
            expires_at: Timestamp::MAX,
        }),
        None => Ok(Reservation::Pending {
            expires_at: Timestamp::from_millis(expires_at.max(0) as u64),
        }),
        Some(json) => serde_json::from_slice(&json)
            .map(Reservation::Completed)
            .map_err(|e| {
                StoreError::corrupt(
                    format!("idempotency record {key} of {actor}"),
                    CodecError::Body(e.to_string()),
                )
            }),
    }
}

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn reserve(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        ttl: Duration,
    ) -> StoreResult<Reservation> {
        check_ttl("idempotency ttl", ttl)?;
        let row = sqlx::query(self.q("SELECT reserved, res, expires FROM {s}.reserve($1, $2, $3)"))
            .bind(actor.as_str())
            .bind(key.as_str())
            .bind(ms(ttl))
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        if row.get::<bool, _>(0) {
            return Ok(Reservation::Reserved);
        }
        reservation(actor, key, row.get(1), row.get(2))
    }

    async fn complete(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        result: &Value,
        ttl: Duration,
    ) -> StoreResult<()> {
        check_ttl("idempotency ttl", ttl)?;
        let bytes = prepare_result(actor, key, result)?;
        sqlx::query(self.q("SELECT {s}.record($1, $2, $3, $4)"))
            .bind(actor.as_str())
            .bind(key.as_str())
            .bind(bytes)
            .bind(ms(ttl))
            .execute(&self.pool)
            .await
            .map_err(pe)?;
        // Committed: announce it to a waiting `ask` on any process (`signals.rs`).
        self.signals.done(loom_core::store::Completion {
            actor: actor.clone(),
            key: key.clone(),
        });
        Ok(())
    }

    async fn abandon(&self, actor: &ActorId, key: &IdempotencyKey) -> StoreResult<bool> {
        let done = sqlx::query(
            self.q("DELETE FROM {s}.idempotency WHERE actor = $1 AND key = $2 AND result IS NULL"),
        )
        .bind(actor.as_str())
        .bind(key.as_str())
        .execute(&self.pool)
        .await
        .map_err(pe)?;
        Ok(done.rows_affected() > 0)
    }

    async fn lookup(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
    ) -> StoreResult<Option<Reservation>> {
        let row = sqlx::query(self.q(
            "SELECT result, expires_at FROM {s}.idempotency WHERE actor = $1 AND key = $2 AND expires_at > {s}.now_ms()",
        ))
        .bind(actor.as_str())
        .bind(key.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(pe)?;
        match row {
            None => Ok(None),
            Some(r) => reservation(actor, key, r.get(0), r.get(1)).map(Some),
        }
    }

    async fn purge_expired(&self, limit: usize) -> StoreResult<u64> {
        // The outer condition again: a record `reserve` takes anew while this delete waits on
        // its row lock is live, and READ COMMITTED's recheck of the join alone would delete it.
        let done = sqlx::query(self.q("DELETE FROM {s}.idempotency WHERE (actor, key) IN \
             (SELECT actor, key FROM {s}.idempotency WHERE expires_at <= {s}.now_ms() LIMIT $1) \
             AND expires_at <= {s}.now_ms()"))
        .bind(limit as i64)
        .execute(&self.pool)
        .await
        .map_err(pe)?;
        Ok(done.rows_affected())
    }

    fn completions(
        &self,
    ) -> Option<tokio::sync::broadcast::Receiver<loom_core::store::Completion>> {
        self.completions.as_ref().map(|tx| tx.subscribe())
    }
}
