//! [`Store`] on PostgreSQL: a turn (entries, ack, sends, record) as one function call, grouped
//! into batches by `group.rs` (`schema.sql`).

use loom_core::store::backend::{check_ttl, committed_next_past_corrupt, prepare_event};
use std::time::Duration;

use async_trait::async_trait;
use loom_core::partition::partition_of;
use loom_core::store::backend::{
    Committed, Settle, Turn, prepare_append, prepare_message, prepare_result,
};
use loom_core::store::{Completion, Enqueued, Lease, Receipt, Retired, Store};
use loom_core::{ActorId, Envelope, IdempotencyKey, Seq, StoreError, StoreResult, Timestamp};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::group::TurnReq;
use crate::idempotency::*;
use crate::mailbox::*;
use crate::sql::*;
use crate::{PostgresStore, pe};

#[async_trait]
impl Store for PostgresStore {
    fn partitions(&self) -> u32 {
        self.partitions
    }

    fn relay_failure(&self) -> Option<loom_core::store::RelayFailure> {
        self.relay.as_ref().and_then(|r| r.failure())
    }

    async fn relay_backlog(&self) -> StoreResult<Vec<loom_core::store::RelayBacklog>> {
        self.backlog_of_outboxes().await
    }

    async fn commit_turn(&self, turn: Turn<'_>) -> StoreResult<Committed> {
        turn.check()?;
        let frames = prepare_append(turn.actor, turn.expected_next, turn.entries)?;
        if let Some(opts) = &turn.next {
            opts.validate()?;
        }
        // A message to an actor of another partition goes through this one's outbox
        // (`relay.rs`); the others, and every message of a store of one partition, straight
        // into their mailboxes.
        let n = self.partitions;
        let here = partition_of(turn.actor, n);
        let relayed: Vec<bool> = turn
            .send
            .iter()
            .map(|o| n > 1 && partition_of(&o.envelope.to, n) != here)
            .collect();
        let mut direct = Sends::default();
        let mut outbox = Sends::default();
        for (o, &relayed) in turn.send.iter().zip(&relayed) {
            let sends = if relayed { &mut outbox } else { &mut direct };
            sends.frames.push(prepare_message(&o.envelope)?);
            sends.actors.push(o.envelope.to.as_str().to_owned());
            sends.ids.push(o.envelope.id.to_string());
            sends
                .due
                .push(o.deliver_at.map_or(0, |t| int(t.as_millis())));
        }
        let mut record = None;
        if let Some(r) = &turn.record {
            check_ttl("idempotency ttl", r.ttl)?;
            record = Some((
                r.actor.as_str().to_owned(),
                r.key.as_str().to_owned(),
                prepare_result(r.actor, r.key, r.result)?,
                ms(r.ttl),
            ));
        }
        let (op, receipt, reason) = match turn.settle {
            Some(Settle::Ack(r)) => (Some("ack"), Some(r), String::new()),
            Some(Settle::DeadLetter(r, reason)) => {
                (Some("bury"), Some(r), crate::sql::reason_text(reason))
            }
            None => (None, None, String::new()),
        };
        // The turn settles a delivery of its own actor's mailbox, or of one of its event lanes:
        // of its own partition, whose rows alone it may lock.
        if let Some(r) = receipt
            && partition_of(&r.actor, n) != here
        {
            return Err(StoreError::InvalidRequest(format!(
                "a turn of {} settles a message of {}, which is in another partition",
                turn.actor, r.actor
            )));
        }
        let (record_actor, record_key, record, record_ttl) = match record {
            Some((a, k, r, t)) => (Some(a), Some(k), Some(r), Some(t)),
            None => (None, None, None, None),
        };
        let req = TurnReq {
            actor: turn.actor.as_str().to_owned(),
            expected: int(turn.expected_next),
            frames,
            fence: turn.fence.map(|l| fence_token(turn.actor, l)).transpose()?,
            out_actors: direct.actors,
            out_ids: direct.ids,
            out_frames: direct.frames,
            out_due: direct.due,
            ob_part: here as i32,
            ob_actors: outbox.actors,
            ob_ids: outbox.ids,
            ob_frames: outbox.frames,
            ob_due: outbox.due,
            settle: op.map(str::to_owned),
            settle_actor: receipt.map(|r| r.actor.as_str().to_owned()),
            pos: receipt.map(|r| int(r.position)),
            dlv: receipt.map(|r| i32::try_from(r.delivery).unwrap_or(i32::MAX)),
            msg: receipt.map(|r| r.message_id.to_string()),
            reason,
            record_actor,
            record_key,
            record,
            record_ttl,
            next_vis: turn.next.map(|o| ms(o.visibility)),
            next_max: turn
                .next
                .map(|o| i32::try_from(o.max_deliveries).unwrap_or(i32::MAX)),
        };
        let bytes = req.bytes();
        let out = self.turns.submit(req, bytes).await?;
        let highest = || {
            out.highest
                .map(|h| h as u64)
                .ok_or_else(|| unexpected("turn gave no highest seq"))
        };
        match out.status.as_str() {
            "ok" => {
                // Its signals, now that it has committed (`signals.rs`): a send due now wakes,
                // and a recorded result is announced. What went to the outbox the relay moves
                // now, and wakes once moved.
                self.signals.wake_if_due(
                    turn.send
                        .iter()
                        .zip(&relayed)
                        .filter(|(_, relayed)| !**relayed)
                        .map(|(o, _)| o.deliver_at),
                );
                if relayed.contains(&true)
                    && let Some(relay) = &self.relay
                {
                    relay.pushed(here);
                }
                if let Some(r) = &turn.record {
                    self.signals.done(Completion {
                        actor: r.actor.clone(),
                        key: r.key.clone(),
                    });
                }
                // Committed: a next message that does not decode is not an error (D15); it
                // is buried and the mailbox leased again (D14).
                let (npos, ndlv) = (out.npos.unwrap_or(0), out.ndlv.unwrap_or(0));
                let next = out
                    .nframe
                    .clone()
                    .map(|frame| delivery(turn.actor, frame, npos, ndlv, out.nerr.clone()));
                let next = committed_next_past_corrupt(
                    self,
                    turn.actor,
                    next,
                    turn.next,
                    |e| async move { self.bury_undecodable(turn.actor, npos, ndlv, &e).await },
                )
                .await;
                Ok(Committed {
                    highest: highest()?,
                    next,
                })
            }
            "conflict" => Err(StoreError::Conflict {
                actor: turn.actor.clone(),
                expected: turn.expected_next,
                actual: highest()?,
            }),
            "lost" => Err(StoreError::LeaseLost {
                actor: turn.actor.clone(),
                token: turn.fence.map_or(0, |l| l.token),
            }),
            "stale" => {
                let r = receipt.ok_or_else(|| unexpected("stale receipt without a receipt"))?;
                Err(StoreError::StaleReceipt {
                    actor: r.actor.clone(),
                    message_id: r.message_id,
                })
            }
            other => Err(unexpected(format!("turn returned {other}"))),
        }
    }

    async fn enqueue_once(
        &self,
        msg: &Envelope,
        deliver_at: Option<Timestamp>,
        key: &IdempotencyKey,
        ttl: Duration,
    ) -> StoreResult<Enqueued> {
        check_ttl("idempotency ttl", ttl)?;
        let frame = prepare_message(msg)?;
        let row = sqlx::query(
            self.q("SELECT new, pos, res, expires FROM {s}.enqueue_once($1, $2, $3, $4, $5, $6)"),
        )
        .bind(msg.to.as_str())
        .bind(msg.id.to_string())
        .bind(frame)
        .bind(deliver_at.map_or(0, |t| int(t.as_millis())))
        .bind(key.as_str())
        .bind(ms(ttl))
        .fetch_one(&self.pool)
        .await
        .map_err(pe)?;
        let out = enqueued(msg, key, &row)?;
        if matches!(out, Enqueued::New(_)) {
            self.signals.wake_if_due([deliver_at]);
        }
        Ok(out)
    }

    async fn enqueue_event(
        &self,
        msg: &Envelope,
        key: &IdempotencyKey,
        ttl: Duration,
        owner: &ActorId,
    ) -> StoreResult<Enqueued> {
        let frame = prepare_event(msg, ttl, owner, self.partitions())?;
        let row = sqlx::query(
            self.q("SELECT new, pos, res, expires FROM {s}.enqueue_event($1, $2, $3, $4, $5, $6)"),
        )
        .bind(msg.to.as_str())
        .bind(msg.id.to_string())
        .bind(frame)
        .bind(key.as_str())
        .bind(ms(ttl))
        .bind(owner.as_str())
        .fetch_one(&self.pool)
        .await
        .map_err(pe)?;
        let out = enqueued(msg, key, &row)?;
        // The event is due at once in its lane (the owner's wake-up, if any, the function
        // sends itself).
        if matches!(out, Enqueued::New(_)) {
            self.signals.wake();
        }
        Ok(out)
    }

    async fn retire(&self, receipt: &Receipt, fence: &Lease, highest: Seq) -> StoreResult<Retired> {
        let a = &receipt.actor;
        let status: String =
            sqlx::query_scalar(self.q("SELECT {s}.retire($1, $2, $3, $4, $5, $6)"))
                .bind(a.as_str())
                .bind(int(highest))
                .bind(int(receipt.position))
                .bind(i32::try_from(receipt.delivery).unwrap_or(i32::MAX))
                .bind(receipt.message_id.to_string())
                .bind(fence_token(&receipt.actor, fence)?)
                .fetch_one(&self.pool)
                .await
                .map_err(pe)?;
        loom_core::store::backend::retire_status(&status, receipt, fence)
            .unwrap_or_else(|| Err(unexpected(format!("retire returned {status}"))))
    }
}

/// A turn's sends of one way (straight into mailboxes, or through the outbox), as columns.
#[derive(Default)]
struct Sends {
    actors: Vec<String>,
    ids: Vec<String>,
    frames: Vec<Vec<u8>>,
    due: Vec<i64>,
}

/// Reads the row of `enqueue_once` or `enqueue_event`.
fn enqueued(msg: &Envelope, key: &IdempotencyKey, row: &PgRow) -> StoreResult<Enqueued> {
    if row.get::<bool, _>(0) {
        return Ok(Enqueued::New(row.get::<i64, _>(1) as u64));
    }
    Ok(Enqueued::Duplicate(reservation(
        &msg.to,
        key,
        row.get(2),
        row.get(3),
    )?))
}
