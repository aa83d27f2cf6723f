//! [`Parking`] on PostgreSQL: parked actors in one table (`schema.sql`).

use async_trait::async_trait;
use loom_core::store::{Lease, Park, Parking};
use loom_core::{ActorId, StoreError, StoreResult};

use crate::sql::*;
use crate::{PostgresStore, pe};

#[async_trait]
impl Parking for PostgresStore {
    async fn park(&self, actor: &ActorId, park: &Park, fence: Option<&Lease>) -> StoreResult<()> {
        let status: String = sqlx::query_scalar(self.q("SELECT {s}.park($1, $2, $3)"))
            .bind(actor.as_str())
            .bind(park.encode()?)
            .bind(fence.map(|l| fence_token(actor, l)).transpose()?)
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        match status.as_str() {
            "ok" => Ok(()),
            "lost" => Err(StoreError::LeaseLost {
                actor: actor.clone(),
                token: fence.map_or(0, |l| l.token),
            }),
            other => Err(unexpected(format!("park returned {other}"))),
        }
    }

    async fn unpark(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        let frame: Option<Vec<u8>> = sqlx::query_scalar(self.q("SELECT {s}.unpark($1)"))
            .bind(actor.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        frame.as_deref().map(Park::decode).transpose()
    }

    async fn parked(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        let frame: Option<Vec<u8>> =
            sqlx::query_scalar(self.q("SELECT frame FROM {s}.parked WHERE actor = $1"))
                .bind(actor.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(pe)?;
        frame.as_deref().map(Park::decode).transpose()
    }

    async fn parked_actors(
        &self,
        after: Option<&ActorId>,
        limit: usize,
    ) -> StoreResult<Vec<(ActorId, Park)>> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(self.q(
            "SELECT actor, frame FROM {s}.parked WHERE actor COLLATE \"C\" > $1 ORDER BY actor COLLATE \"C\" LIMIT $2",
        ))
        .bind(after.map_or("", |a| a.as_str()))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(pe)?;
        rows.iter()
            .map(|(a, f)| Ok((parse_actor(a, "parked actor id")?, Park::decode(f)?)))
            .collect()
    }
}
