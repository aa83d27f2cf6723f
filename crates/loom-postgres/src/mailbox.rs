//! [`Mailbox`] on PostgreSQL: one row per message, dead letters in their own table (`schema.sql`).

use loom_core::store::backend::check_ttl;
use std::time::Duration;

use async_trait::async_trait;
use loom_core::codec::{self, RecordType};
use loom_core::partition::SHARED_STORE_PARTITIONS;
use loom_core::store::backend::{
    bury_corrupt, check_purge, dead_letter_envelope, interleave_partitions, prepare_message,
    prepare_suspend,
};
use loom_core::store::{
    Backlog, DeadLetter, Delivery, LeaseOptions, Mailbox, Receipt, Suspension, Waiting,
};
use loom_core::{ActorId, Envelope, MessageId, StoreError, StoreResult, Timestamp};
use sqlx::Row;

use crate::sql::*;
use crate::{PostgresStore, pe};

pub(crate) fn delivery(
    actor: &ActorId,
    frame: Vec<u8>,
    position: i64,
    deliveries: i32,
    last_error: Option<String>,
) -> StoreResult<Delivery> {
    Delivery::from_frame(
        actor.clone(),
        &frame,
        position as u64,
        i64::from(deliveries),
        last_error,
    )
}

impl PostgresStore {
    /// Rule D14 for the message at `position` leased to `actor` for its `deliveries`-th
    /// delivery, whose frame did not decode (`error`): dead-lettered at once by the id in its
    /// row. Whether to lease again (`bury_corrupt`).
    pub(crate) async fn bury_undecodable(
        &self,
        actor: &ActorId,
        position: i64,
        deliveries: i32,
        error: &StoreError,
    ) -> StoreResult<bool> {
        let id: Option<String> = sqlx::query_scalar(
            self.q("SELECT message_id FROM {s}.messages WHERE actor = $1 AND position = $2"),
        )
        .bind(actor.as_str())
        .bind(position)
        .fetch_optional(&self.pool)
        .await
        .map_err(pe)?;
        bury_corrupt(
            self,
            actor,
            position.max(0) as u64,
            i64::from(deliveries),
            id.as_deref(),
            error,
        )
        .await
    }

    /// The ready actors of each kind's partitions in `wanted` (of
    /// [`SHARED_STORE_PARTITIONS`]), through the (kind, partition, ready_at) index: each
    /// partition is asked for its share of what its kind still wants, and those that come back
    /// full again for what the others left (a round is one statement; most scans take one), so
    /// that no partition's backlog hides another's and none is read past `limit`.
    async fn ready_in(&self, wanted: &[(&str, &[u32])], limit: usize) -> StoreResult<Vec<ActorId>> {
        let mut kinds = Vec::new();
        let mut parts = Vec::new();
        let mut group = Vec::new();
        for (g, (kind, ps)) in wanted.iter().enumerate() {
            for p in ps.iter() {
                if *p >= SHARED_STORE_PARTITIONS {
                    return Err(StoreError::InvalidRequest(format!(
                        "partition {p} of {kind}: a PostgreSQL store's ready index has {SHARED_STORE_PARTITIONS} per kind"
                    )));
                }
                kinds.push((*kind).to_owned());
                parts.push(*p as i32);
                group.push(g);
            }
        }
        let mut lists: Vec<Vec<ActorId>> = vec![Vec::new(); kinds.len()];
        let mut want = vec![limit; wanted.len()];
        let mut open: Vec<usize> = (0..kinds.len()).collect();
        while !open.is_empty() {
            let mut per_group = vec![0usize; wanted.len()];
            for k in &open {
                per_group[group[*k]] += 1;
            }
            let asked: Vec<(usize, usize)> = open
                .iter()
                .map(|k| (*k, want[group[*k]].div_ceil(per_group[group[*k]])))
                .filter(|(_, take)| *take > 0)
                .collect();
            if asked.is_empty() {
                break;
            }
            let rows: Vec<(i64, String)> = sqlx::query_as(self.q("SELECT k.i, m.actor \
                 FROM unnest($1::text[], $2::int[], $3::bigint[], $4::bigint[]) \
                      WITH ORDINALITY AS k(kind, part, skip, take, i) \
                 CROSS JOIN LATERAL (SELECT actor, ready_at FROM {s}.mailbox \
                    WHERE split_part(actor, '/', 1) = k.kind AND part = k.part \
                      AND ready_at <= (SELECT {s}.now_ms()) \
                    ORDER BY ready_at OFFSET k.skip LIMIT k.take) AS m \
                 ORDER BY k.i, m.ready_at"))
            .bind(
                asked
                    .iter()
                    .map(|(k, _)| kinds[*k].as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(asked.iter().map(|(k, _)| parts[*k]).collect::<Vec<_>>())
            .bind(
                asked
                    .iter()
                    .map(|(k, _)| lists[*k].len() as i64)
                    .collect::<Vec<_>>(),
            )
            .bind(
                asked
                    .iter()
                    .map(|(_, take)| *take as i64)
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&self.pool)
            .await
            .map_err(pe)?;
            let mut got = vec![0usize; asked.len()];
            for (i, actor) in rows {
                let slot = usize::try_from(i - 1)
                    .ok()
                    .filter(|i| *i < asked.len())
                    .ok_or_else(|| unexpected(format!("ready scan returned index {i}")))?;
                got[slot] += 1;
                lists[asked[slot].0].push(parse_actor(&actor, "mailbox actor id")?);
            }
            open.clear();
            for ((k, take), got) in asked.iter().zip(got) {
                let g = group[*k];
                want[g] = want[g].saturating_sub(got);
                if got == *take {
                    open.push(*k);
                }
            }
        }
        Ok(interleave_partitions(lists, wanted, limit))
    }

    pub(crate) async fn settle_op(
        &self,
        r: &Receipt,
        op: &str,
        delay: i64,
        text: &str,
    ) -> StoreResult<i64> {
        let row = sqlx::query(self.q("SELECT ok, val FROM {s}.settle($1, $2, $3, $4, $5, $6, $7)"))
            .bind(r.actor.as_str())
            .bind(op)
            .bind(int(r.position))
            .bind(i32::try_from(r.delivery).unwrap_or(i32::MAX))
            .bind(r.message_id.to_string())
            .bind(delay)
            .bind(text)
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        if !row.get::<bool, _>(0) {
            return Err(StoreError::StaleReceipt {
                actor: r.actor.clone(),
                message_id: r.message_id,
            });
        }
        Ok(row.get(1))
    }
}

#[async_trait]
impl Mailbox for PostgresStore {
    async fn enqueue(&self, msg: &Envelope, deliver_at: Option<Timestamp>) -> StoreResult<u64> {
        let frame = prepare_message(msg)?;
        let pos: i64 = sqlx::query_scalar(self.q("SELECT {s}.enqueue($1, $2, $3, $4)"))
            .bind(msg.to.as_str())
            .bind(msg.id.to_string())
            .bind(frame)
            .bind(deliver_at.map_or(0, |t| int(t.as_millis())))
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        // Committed: wake other processes if it is due now (`signals.rs`).
        self.signals.wake_if_due([deliver_at]);
        Ok(pos as u64)
    }

    async fn lease(&self, actor: &ActorId, opts: LeaseOptions) -> StoreResult<Option<Delivery>> {
        opts.validate()?;
        // Group-committed with other leases (`group.rs`).
        let req = crate::group::LeaseReq {
            actor: actor.as_str().to_owned(),
            vis: ms(opts.visibility),
            max: i32::try_from(opts.max_deliveries).unwrap_or(i32::MAX),
            // Exact (zero for none), not `ms`'s at-least-1: `validate` bounds it by MAX_EARLY.
            early: i64::try_from(opts.early.as_millis()).unwrap_or(i64::MAX),
        };
        // Each pass hands out a message, or buries one whose frame does not decode (D14) and
        // leases again: one that cannot be buried is the error, so this ends.
        loop {
            let bytes = req.actor.len();
            let out = self.leases.submit(req.clone(), bytes).await?;
            let Some(frame) = out.frame else {
                return Ok(None);
            };
            let (pos, dlv) = (out.pos.unwrap_or(0), out.dlv.unwrap_or(0));
            match delivery(actor, frame, pos, dlv, out.err) {
                Ok(d) => return Ok(Some(d)),
                Err(e @ StoreError::Corrupt { .. }) => {
                    if !self.bury_undecodable(actor, pos, dlv, &e).await? {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn ack(&self, receipt: &Receipt) -> StoreResult<()> {
        self.settle_op(receipt, "ack", 0, "").await.map(|_| ())
    }

    async fn nack(&self, receipt: &Receipt, delay: Duration, error: &str) -> StoreResult<()> {
        let error = crate::sql::reason_text(error);
        self.settle_op(
            receipt,
            "nack",
            i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
            &error,
        )
        .await
        .map(|_| ())
    }

    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> StoreResult<()> {
        check_ttl("visibility timeout", visibility)?;
        self.settle_op(receipt, "extend", ms(visibility), "")
            .await
            .map(|_| ())
    }

    async fn suspend(
        &self,
        receipt: &Receipt,
        lane: Option<&ActorId>,
        delay: Duration,
        reason: &str,
    ) -> StoreResult<Suspension> {
        let reason = prepare_suspend(receipt, lane, reason, loom_core::Store::partitions(self))?;
        let status: String =
            sqlx::query_scalar(self.q("SELECT {s}.suspend($1, $2, $3, $4, $5, $6, $7)"))
                .bind(receipt.actor.as_str())
                .bind(int(receipt.position))
                .bind(i32::try_from(receipt.delivery).unwrap_or(i32::MAX))
                .bind(receipt.message_id.to_string())
                .bind(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
                .bind(&reason)
                .bind(lane.map(ActorId::as_str))
                .fetch_one(&self.pool)
                .await
                .map_err(pe)?;
        match status.as_str() {
            "ok" => Ok(Suspension::Suspended),
            "busy" => Ok(Suspension::EventWaiting),
            "cancelled" => Ok(Suspension::Cancelled),
            "stale" => Err(StoreError::StaleReceipt {
                actor: receipt.actor.clone(),
                message_id: receipt.message_id,
            }),
            other => Err(unexpected(format!("suspend returned {other}"))),
        }
    }

    async fn cancel(&self, actor: &ActorId, message: MessageId) -> StoreResult<Option<u64>> {
        let pos: Option<i64> = sqlx::query_scalar(self.q("SELECT {s}.cancel($1, $2)"))
            .bind(actor.as_str())
            .bind(message.to_string())
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        Ok(pos.map(|p| p as u64))
    }

    async fn dead_letter(&self, receipt: &Receipt, reason: &str) -> StoreResult<u64> {
        let reason = crate::sql::reason_text(reason);
        self.settle_op(receipt, "bury", 0, &reason)
            .await
            .map(|id| id as u64)
    }

    async fn ready_actors(&self, kinds: &[&str], limit: usize) -> StoreResult<Vec<ActorId>> {
        let all: Vec<u32> = (0..SHARED_STORE_PARTITIONS).collect();
        let wanted: Vec<(&str, &[u32])> = kinds.iter().map(|k| (*k, all.as_slice())).collect();
        self.ready_in(&wanted, limit).await
    }

    async fn ready_actors_in(
        &self,
        wanted: &[(&str, &[u32])],
        of: u32,
        limit: usize,
    ) -> StoreResult<Vec<ActorId>> {
        if of != SHARED_STORE_PARTITIONS {
            return Err(StoreError::InvalidRequest(format!(
                "a PostgreSQL store's ready index has {SHARED_STORE_PARTITIONS} partitions per kind, not {of}"
            )));
        }
        self.ready_in(wanted, limit).await
    }

    async fn backlog(&self, kind: &str) -> StoreResult<Backlog> {
        // The rows `ready_actors` reads (a parked or empty mailbox has no ready_at), through
        // the (kind, partition, ready_at) index's leading column.
        let (mailboxes, ready, oldest, at): (i64, i64, Option<i64>, i64) =
            sqlx::query_as(self.q("WITH n AS (SELECT {s}.now_ms() AS t) \
             SELECT count(m.actor), count(m.actor) FILTER (WHERE m.ready_at <= n.t), \
                    min(m.ready_at) FILTER (WHERE m.ready_at <= n.t), n.t \
             FROM n LEFT JOIN {s}.mailbox m \
               ON split_part(m.actor, '/', 1) = $1 AND m.ready_at IS NOT NULL \
             GROUP BY n.t"))
            .bind(kind)
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        Ok(Backlog {
            mailboxes: mailboxes.max(0) as u64,
            ready: ready.max(0) as u64,
            oldest_ready_at: oldest.map(|t| Timestamp::from_millis(t.max(0) as u64)),
            at: Timestamp::from_millis(at.max(0) as u64),
        })
    }

    async fn next_due(&self) -> StoreResult<Option<Timestamp>> {
        let at: Option<i64> = sqlx::query_scalar(self.q(
            "SELECT min(ready_at) FROM {s}.mailbox WHERE ready_at IS NOT NULL AND left(actor, 1) <> '_'",
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(pe)?;
        Ok(at.map(crate::sql::moment))
    }

    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.wakeups.clone()
    }

    fn arrivals(&self) -> Option<tokio::sync::broadcast::Receiver<std::sync::Arc<[ActorId]>>> {
        self.relay.as_ref().map(|r| r.arrivals())
    }

    async fn pending(&self, actor: &ActorId) -> StoreResult<u64> {
        let n: Option<i64> =
            sqlx::query_scalar(self.q("SELECT count FROM {s}.mailbox WHERE actor = $1"))
                .bind(actor.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(pe)?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    async fn messages(
        &self,
        actor: &ActorId,
        after: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<Waiting>> {
        let rows = sqlx::query(self.q(
            "SELECT m.position, m.frame, m.due_at, b.current = m.position, {s}.now_ms(), m.cancel \
             FROM {s}.messages m JOIN {s}.mailbox b ON b.actor = m.actor \
             WHERE m.actor = $1 AND m.position > $2 ORDER BY m.position LIMIT $3",
        ))
        .bind(actor.as_str())
        .bind(after.map_or(0, int))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(pe)?;
        rows.iter()
            .map(|r| {
                let position = r.get::<i64, _>(0) as u64;
                let frame: Vec<u8> = r.get(1);
                let due: i64 = r.get(2);
                let now: i64 = r.get(4);
                let envelope: Envelope =
                    codec::decode(RecordType::Message, &frame).map_err(|e| {
                        StoreError::corrupt(
                            format!("message at position {position} of {actor}'s mailbox"),
                            e,
                        )
                    })?;
                Ok(Waiting {
                    position,
                    envelope,
                    deliver_at: (due > now).then(|| crate::sql::moment(due)),
                    out: r.get(3),
                    cancelling: r.get(5),
                })
            })
            .collect()
    }

    async fn mailboxes(&self, after: Option<&ActorId>, limit: usize) -> StoreResult<Vec<ActorId>> {
        let ids: Vec<String> = sqlx::query_scalar(self.q(
            "SELECT actor FROM {s}.mailbox WHERE count > 0 AND actor COLLATE \"C\" > $1 ORDER BY actor COLLATE \"C\" LIMIT $2",
        ))
        .bind(after.map_or("", |a| a.as_str()))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(pe)?;
        ids.iter()
            .map(|s| parse_actor(s, "mailbox actor id"))
            .collect()
    }

    async fn dead_letters(&self, after: Option<u64>, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        let rows = sqlx::query(self.q(
            "SELECT id, envelope, reason, deliveries, at, actor, message_id FROM {s}.dead_letters WHERE id > $1 ORDER BY id LIMIT $2",
        ))
        .bind(after.map_or(0, int))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(pe)?;
        rows.iter()
            .map(|r| {
                let id = r.get::<i64, _>(0) as u64;
                let frame: Vec<u8> = r.get(1);
                let envelope = dead_letter_envelope(id, &frame, r.get(5), Some(r.get(6)))?;
                Ok(DeadLetter {
                    id,
                    envelope,
                    reason: r.get(2),
                    deliveries: u32::try_from(r.get::<i32, _>(3)).unwrap_or(0),
                    at: Timestamp::from_millis(r.get::<i64, _>(4).max(0) as u64),
                })
            })
            .collect()
    }

    async fn purge_dead_letters(&self, ids: &[u64]) -> StoreResult<u64> {
        check_purge(ids)?;
        let ids: Vec<i64> = ids.iter().map(|&id| int(id)).collect();
        let done = sqlx::query(self.q("DELETE FROM {s}.dead_letters WHERE id = ANY($1)"))
            .bind(&ids)
            .execute(&self.pool)
            .await
            .map_err(pe)?;
        Ok(done.rows_affected())
    }

    async fn requeue_dead_letter(&self, id: u64) -> StoreResult<u64> {
        let row: Option<(Vec<u8>, String, String)> = sqlx::query_as(
            self.q("SELECT envelope, actor, message_id FROM {s}.dead_letters WHERE id = $1"),
        )
        .bind(int(id))
        .fetch_optional(&self.pool)
        .await
        .map_err(pe)?;
        let Some((frame, actor, message_id)) = row else {
            return Err(StoreError::DeadLetterNotFound(id));
        };
        let back = dead_letter_envelope(id, &frame, &actor, Some(&message_id))?.requeued();
        let pos: i64 = sqlx::query_scalar(self.q("SELECT {s}.requeue_as($1, $2, $3, $4)"))
            .bind(int(id))
            .bind(back.id.to_string())
            .bind(prepare_message(&back)?)
            .bind(back.idempotency_key.as_ref().map(|k| k.as_str().to_owned()))
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        if pos == 0 {
            return Err(StoreError::DeadLetterNotFound(id));
        }
        // Back in its mailbox, due now.
        self.signals.wake();
        Ok(pos as u64)
    }
}
