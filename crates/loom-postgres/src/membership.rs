//! [`Membership`] on PostgreSQL: one row per node in `members` (`schema_v6.sql`), liveness
//! judged on the server's clock.

use std::time::Duration;

use async_trait::async_trait;
use loom_core::store::backend::prepare_heartbeat;
use loom_core::store::{FORGET_AFTER_TTLS, Member, Membership, Roster};
use loom_core::{StoreError, StoreResult, Timestamp};

use crate::sql::*;
use crate::{PostgresStore, pe};

/// A u64 incarnation as the bits of a bigint, and back: every value round-trips.
fn bits(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

fn unbits(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

/// A stored millisecond count (never negative: the server's clock since 1970).
fn millis(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[async_trait]
impl Membership for PostgresStore {
    async fn heartbeat(
        &self,
        node: &str,
        incarnation: u64,
        kinds: &[&str],
        ttl: Duration,
    ) -> StoreResult<Member> {
        let (kinds, ttl) = prepare_heartbeat(node, kinds, ttl)?;
        let ttl_ms = ms(ttl);
        let (status, a, b): (String, i64, i64) =
            sqlx::query_as(self.q("SELECT status, a, b FROM {s}.heartbeat($1, $2, $3, $4, $5)"))
                .bind(node)
                .bind(bits(incarnation))
                .bind(ttl_ms)
                .bind(kinds.join(","))
                .bind(FORGET_AFTER_TTLS as i32)
                .fetch_one(&self.pool)
                .await
                .map_err(pe)?;
        match status.as_str() {
            "ok" => Ok(Member {
                node: node.to_owned(),
                incarnation,
                kinds,
                joined_at: Timestamp::from_millis(millis(a)),
                beat_at: Timestamp::from_millis(millis(b)),
                ttl: Duration::from_millis(millis(ttl_ms)),
            }),
            "taken" => Err(StoreError::NodeTaken {
                node: node.to_owned(),
                incarnation: unbits(a),
                remaining_ms: millis(b),
            }),
            other => Err(unexpected(format!("heartbeat returned {other}"))),
        }
    }

    async fn leave(&self, node: &str, incarnation: u64) -> StoreResult<bool> {
        let gone =
            sqlx::query(self.q("DELETE FROM {s}.members WHERE node = $1 AND incarnation = $2"))
                .bind(node)
                .bind(bits(incarnation))
                .execute(&self.pool)
                .await
                .map_err(pe)?;
        Ok(gone.rows_affected() == 1)
    }

    async fn members(&self) -> StoreResult<Roster> {
        // One row even when there are no members (the LEFT JOIN's NULLs), for the clock.
        type Row = (
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            i64,
        );
        let rows: Vec<Row> = sqlx::query_as(self.q(
            "SELECT node, incarnation, kinds, joined_ms, beat_ms, ttl_ms, n.now \
             FROM (SELECT {s}.now_ms() AS now) n LEFT JOIN {s}.members ON true \
             ORDER BY node COLLATE \"C\"",
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(pe)?;
        let at = rows.first().map_or(0, |r| millis(r.6));
        let mut members = Vec::with_capacity(rows.len());
        for row in rows {
            let (
                Some(node),
                Some(incarnation),
                Some(kinds),
                Some(joined),
                Some(beat),
                Some(ttl),
                _,
            ) = row
            else {
                continue;
            };
            let m = Member {
                node,
                incarnation: unbits(incarnation),
                kinds: kinds
                    .split(',')
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned)
                    .collect(),
                joined_at: Timestamp::from_millis(millis(joined)),
                beat_at: Timestamp::from_millis(millis(beat)),
                ttl: Duration::from_millis(millis(ttl)),
            };
            if m.forgotten_at() > Timestamp::from_millis(at) {
                members.push(m);
            }
        }
        Ok(Roster {
            at: Timestamp::from_millis(at),
            members,
        })
    }
}
