//! [`Store::commit_turn`] and [`Store::enqueue_once`] for [`SimStore`]: each one request, so
//! all of it or none of it. A turn writes only its actor's partition: what it sends to an actor
//! of another partition goes to its partition's outbox, in the same write (`relay.rs`).

use std::time::Duration;

use async_trait::async_trait;
use loom_core::partition::partition_of;
use loom_core::store::backend::{
    Committed, Settle, Turn, check_ttl, fence_of, prepare_append, prepare_event, prepare_message,
    prepare_result,
};
use loom_core::{
    ActorId, Enqueued, Envelope, IdempotencyKey, Lease, LeaseOptions, MessageId, Receipt, Retired,
    Seq, Store, StoreError, StoreResult, Timestamp,
};

use super::relay::Row;
use super::{Frame, SimStore};

/// An outgoing message, checked and encoded.
struct Out {
    to: ActorId,
    id: MessageId,
    deliver_at: Option<Timestamp>,
    frame: Frame,
}

#[async_trait]
impl Store for SimStore {
    fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    async fn relay_backlog(&self) -> StoreResult<Vec<loom_core::store::RelayBacklog>> {
        if self.inner.partitions == 1 {
            return Ok(Vec::new());
        }
        let states = self.outbox_states().await?;
        Ok(states
            .iter()
            .map(|s| loom_core::store::RelayBacklog {
                partition: s.partition,
                waiting: s.pending,
            })
            .collect())
    }

    async fn commit_turn(&self, turn: Turn<'_>) -> StoreResult<Committed> {
        // Everything that can be checked without the store is checked here, before the request.
        turn.check()?;
        if let Some(opts) = &turn.next {
            opts.validate()?;
        }
        let entries: Vec<Frame> = prepare_append(turn.actor, turn.expected_next, turn.entries)?
            .into_iter()
            .map(Frame::from)
            .collect();
        let outgoing: Vec<Out> = turn
            .send
            .iter()
            .map(|o| {
                Ok(Out {
                    to: o.envelope.to.clone(),
                    id: o.envelope.id,
                    deliver_at: o.deliver_at,
                    frame: Frame::from(prepare_message(&o.envelope)?),
                })
            })
            .collect::<StoreResult<_>>()?;
        // A turn writes only its own partition: a message to an actor of another partition
        // goes to this partition's outbox, and the relay moves it (`relay.rs`).
        let (n, p) = (
            self.partitions(),
            partition_of(turn.actor, self.partitions()),
        );
        let (outgoing, remote): (Vec<Out>, Vec<Out>) = outgoing
            .into_iter()
            .partition(|o| partition_of(&o.to, n) == p);
        let remote: Vec<Row> = remote
            .into_iter()
            .map(|o| Row {
                to: o.to,
                id: o.id,
                frame: o.frame,
                deliver_at: o.deliver_at,
            })
            .collect();
        let sends_away = !remote.is_empty();
        if let Some(s) = &turn.settle {
            let (Settle::Ack(r) | Settle::DeadLetter(r, _)) = s;
            if partition_of(&r.actor, n) != p {
                return Err(StoreError::InvalidRequest(format!(
                    "a turn of {} settles a message of {}, which is in another partition",
                    turn.actor, r.actor
                )));
            }
        }
        if let Some(r) = &turn.record {
            prepare_result(r.actor, r.key, r.result)?;
            check_ttl("idempotency ttl", r.ttl)?;
        }
        // Owned, for the request outlives this call (see the store's module docs).
        let settle = turn.settle.map(|s| match s {
            Settle::Ack(r) => (r.clone(), None),
            Settle::DeadLetter(r, reason) => (r.clone(), Some(reason.to_owned())),
        });
        let record = turn
            .record
            .map(|r| (r.actor.clone(), r.key.clone(), r.result.clone(), r.ttl));
        let (actor, expected_next) = (turn.actor.clone(), turn.expected_next);
        let fence = turn
            .fence
            .map(|f| Ok::<_, StoreError>((f.clone(), fence_of(turn.actor, f, self.partitions())?)))
            .transpose()?;
        let next = turn.next;
        let arg = format!("{} {}", turn.actor, turn.expected_next);
        let skip_fence = self.bugs().skip_fence_check;
        let store = self.clone();
        let committed = self
            .update("commit_turn", &arg, move |d, now| {
                // Checks first (rule D15): a refused turn writes nothing.
                let mut stale = None;
                if let Some((fence, of)) = &fence
                    && let Err(e) = d.leases.check_fence(&actor, fence, *of, now)
                {
                    if !skip_fence {
                        return Err(e);
                    }
                    stale = Some(e);
                }
                d.journals.check_next(&actor, expected_next)?;
                if let Some((receipt, _)) = &settle {
                    d.mailboxes.check_receipt(receipt)?;
                }
                // Writes after: each `?` below repeats a check just passed, under the same lock,
                // so none fails, and the turn is all or nothing (rule D5).
                let highest = d.journals.append(&actor, expected_next, &entries)?;
                for o in outgoing {
                    d.mailboxes.enqueue(&o.to, o.id, o.frame, o.deliver_at, now);
                }
                d.relay.push(p, remote);
                match settle {
                    Some((receipt, None)) => {
                        d.mailboxes.settle(&receipt)?;
                    }
                    Some((receipt, Some(reason))) => {
                        let current = d.mailboxes.settle(&receipt)?;
                        d.mailboxes.bury(&receipt.actor, current, &reason, now);
                    }
                    None => {}
                }
                if let Some((actor, key, result, ttl)) = record {
                    d.records.record(&actor, &key, result, ttl, now);
                }
                // Only a due message (`Turn::next`).
                let next = next.and_then(|opts| {
                    let opts = LeaseOptions {
                        early: Duration::ZERO,
                        ..opts
                    };
                    d.mailboxes.lease(&d.parked, &actor, opts, now)
                });
                if let Some(e) = stale {
                    // The fence audit: only the deliberate bug lets such a turn commit.
                    store.violation(format!(
                        "a turn of {actor} committed through seq {highest} under a lost lease ({e})"
                    ));
                }
                Ok(Committed { highest, next })
            })
            .await;
        // Also when it failed: a write whose reply was lost, or that a sync of someone else's
        // made durable before a power loss, is in the outbox all the same (a spurious wake-up
        // costs one look at it).
        if sends_away {
            self.wake_relay(p);
        }
        committed
    }

    async fn enqueue_once(
        &self,
        msg: &Envelope,
        deliver_at: Option<Timestamp>,
        key: &IdempotencyKey,
        ttl: Duration,
    ) -> StoreResult<Enqueued> {
        check_ttl("idempotency ttl", ttl)?;
        let frame = Frame::from(prepare_message(msg)?);
        let arg = format!("{} {} {key}", msg.to, msg.id);
        let (to, id, key) = (msg.to.clone(), msg.id, key.clone());
        self.update("enqueue_once", &arg, move |d, now| {
            // Held until the turn that settles the message records its result, however long
            // the message waits: no ttl here.
            if let Some(existing) = d.records.reserve(&to, &key, None, now) {
                return Ok(Enqueued::Duplicate(existing));
            }
            let position = d.mailboxes.enqueue(&to, id, frame, deliver_at, now);
            Ok(Enqueued::New(position))
        })
        .await
    }

    async fn enqueue_event(
        &self,
        msg: &Envelope,
        key: &IdempotencyKey,
        ttl: Duration,
        owner: &ActorId,
    ) -> StoreResult<Enqueued> {
        let frame = Frame::from(prepare_event(msg, ttl, owner, self.partitions())?);
        let arg = format!("{} {} {key} {owner}", msg.to, msg.id);
        let (to, id, key, owner) = (msg.to.clone(), msg.id, key.clone(), owner.clone());
        self.update("enqueue_event", &arg, move |d, now| {
            if let Some(existing) = d.records.reserve(&to, &key, None, now) {
                return Ok(Enqueued::Duplicate(existing));
            }
            let position = d.mailboxes.enqueue(&to, id, frame, None, now);
            d.mailboxes.wake(&owner, &to, now.as_millis());
            Ok(Enqueued::New(position))
        })
        .await
    }

    async fn retire(&self, receipt: &Receipt, fence: &Lease, highest: Seq) -> StoreResult<Retired> {
        let arg = format!("{} {} {highest}", receipt.actor, receipt.message_id);
        let of = fence_of(&receipt.actor, fence, self.partitions())?;
        let (receipt, fence) = (receipt.clone(), fence.clone());
        self.update("retire", &arg, move |d, now| {
            // Every check before any write (rule D22).
            d.leases.check_fence(&receipt.actor, &fence, of, now)?;
            d.mailboxes.check_receipt(&receipt)?;
            let a = &receipt.actor;
            if d.journals.meta(a).0 != highest {
                return Ok(Retired::Moved);
            }
            if d.mailboxes.pending(a) != 1 {
                return Ok(Retired::Busy);
            }
            d.mailboxes.settle(&receipt)?;
            d.journals.delete(a);
            Ok(Retired::Deleted)
        })
        .await
    }
}
