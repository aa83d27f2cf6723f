//! [`LeaseManager`] on PostgreSQL: one fenced lease row per actor (`schema.sql`).

use loom_core::store::backend::check_ttl;
use std::time::Duration;

use async_trait::async_trait;
use loom_core::store::backend::check_owner;
use loom_core::store::{Lease, LeaseManager};
use loom_core::{ActorId, StoreError, StoreResult, Timestamp};
use sqlx::Row;

use crate::sql::*;
use crate::{PostgresStore, pe};

#[async_trait]
impl LeaseManager for PostgresStore {
    async fn acquire(&self, actor: &ActorId, owner: &str, ttl: Duration) -> StoreResult<Lease> {
        check_owner(owner)?;
        check_ttl("lease ttl", ttl)?;
        let row = sqlx::query(
            self.q("SELECT ok, holder, tok, expires, {s}.now_ms() FROM {s}.acquire($1, $2, $3)"),
        )
        .bind(actor.as_str())
        .bind(owner)
        .bind(ms(ttl))
        .fetch_one(&self.pool)
        .await
        .map_err(pe)?;
        let token = row.get::<i64, _>(2) as u64;
        let expires = row.get::<i64, _>(3);
        if row.get::<bool, _>(0) {
            return Ok(Lease {
                actor: actor.clone(),
                owner: owner.to_owned(),
                token,
                expires_at: Timestamp::from_millis(expires.max(0) as u64),
            });
        }
        let now: i64 = row.get(4);
        Err(StoreError::LeaseHeld {
            actor: actor.clone(),
            owner: row.get(1),
            token,
            remaining_ms: (expires - now).max(0) as u64,
        })
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> StoreResult<Lease> {
        check_ttl("lease ttl", ttl)?;
        let at: Option<i64> =
            sqlx::query_scalar(self.q("SELECT {s}.lease_cas($1, $2, 'renew', $3)"))
                .bind(lease.actor.as_str())
                .bind(int(lease.token))
                .bind(ms(ttl))
                .fetch_one(&self.pool)
                .await
                .map_err(pe)?;
        match at {
            Some(at) => Ok(Lease {
                expires_at: Timestamp::from_millis(at.max(0) as u64),
                ..lease.clone()
            }),
            None => Err(StoreError::LeaseLost {
                actor: lease.actor.clone(),
                token: lease.token,
            }),
        }
    }

    async fn renew_many(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> StoreResult<Vec<StoreResult<Lease>>> {
        check_ttl("lease ttl", ttl)?;
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let actors: Vec<&str> = leases.iter().map(|l| l.actor.as_str()).collect();
        let tokens: Vec<i64> = leases.iter().map(|l| int(l.token)).collect();
        let rows: Vec<(i64, Option<i64>)> =
            sqlx::query_as(self.q("SELECT idx, expires FROM {s}.renew_many($1, $2, $3)"))
                .bind(actors)
                .bind(tokens)
                .bind(ms(ttl))
                .fetch_all(&self.pool)
                .await
                .map_err(pe)?;
        let mut out: Vec<Option<StoreResult<Lease>>> = vec![None; leases.len()];
        for (idx, expires) in rows {
            let i = usize::try_from(idx - 1)
                .ok()
                .filter(|i| *i < leases.len())
                .ok_or_else(|| unexpected(format!("renew_many returned index {idx}")))?;
            let l = &leases[i];
            out[i] = Some(match expires {
                Some(at) => Ok(Lease {
                    expires_at: Timestamp::from_millis(at.max(0) as u64),
                    ..l.clone()
                }),
                None => Err(StoreError::LeaseLost {
                    actor: l.actor.clone(),
                    token: l.token,
                }),
            });
        }
        out.into_iter()
            .map(|r| r.ok_or_else(|| unexpected("renew_many skipped a lease")))
            .collect()
    }

    async fn release(&self, lease: &Lease) -> StoreResult<bool> {
        let at: Option<i64> =
            sqlx::query_scalar(self.q("SELECT {s}.lease_cas($1, $2, 'release', 0)"))
                .bind(lease.actor.as_str())
                .bind(int(lease.token))
                .fetch_one(&self.pool)
                .await
                .map_err(pe)?;
        Ok(at.is_some())
    }

    async fn holder(&self, actor: &ActorId) -> StoreResult<Option<Lease>> {
        let row = sqlx::query(self.q(
            "SELECT owner, token, expires_at FROM {s}.leases WHERE actor = $1 AND owner IS NOT NULL AND expires_at > {s}.now_ms()",
        ))
        .bind(actor.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(pe)?;
        Ok(row.map(|r| Lease {
            actor: actor.clone(),
            owner: r.get(0),
            token: r.get::<i64, _>(1) as u64,
            expires_at: Timestamp::from_millis(r.get::<i64, _>(2).max(0) as u64),
        }))
    }
}
