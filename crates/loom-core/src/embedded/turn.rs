//! [`Store::commit_turn`] on redb: one write transaction, so all of a turn or none of it.

use crate::store::backend::{check_ttl, prepare_event};
use std::time::Duration;

use async_trait::async_trait;

use crate::envelope::Envelope;
use crate::error::{StoreError, StoreResult};
use crate::id::{ActorId, IdempotencyKey};
use crate::store::backend::{
    Committed, Outgoing, Settle, Turn, prepare_append, prepare_message, prepare_result,
};
use crate::store::{Enqueued, LeaseOptions, Store};
use crate::time::Timestamp;

use super::EmbeddedStore;
use super::mailbox::{self, bury};
use super::{idempotency, journal, lease, relay};
use crate::partition::partition_of;
use crate::store::backend::fence_of;

#[async_trait]
impl Store for EmbeddedStore {
    fn partitions(&self) -> u32 {
        EmbeddedStore::partitions(self)
    }

    fn relay_failure(&self) -> Option<crate::store::RelayFailure> {
        self.parts.relays.status.failure()
    }

    async fn relay_backlog(&self) -> StoreResult<Vec<crate::store::RelayBacklog>> {
        let n = EmbeddedStore::partitions(self);
        if n == 1 {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(n as usize);
        for p in 0..n {
            out.push(
                self.read_in(p, move |txn| super::relay::backlog_of(txn, p))
                    .await?,
            );
        }
        Ok(out)
    }

    async fn commit_turn(&self, turn: Turn<'_>) -> StoreResult<Committed> {
        // Everything that can be checked without the store is checked here, before queueing.
        turn.check()?;
        if let Some(opts) = &turn.next {
            opts.validate()?;
        }
        let next = turn.next;
        let entries = prepare_append(turn.actor, turn.expected_next, turn.entries)?;
        let outgoing: Vec<(Outgoing, Vec<u8>)> = turn
            .send
            .iter()
            .map(|o| prepare_message(&o.envelope).map(|bytes| (o.clone(), bytes)))
            .collect::<StoreResult<_>>()?;
        // A turn writes only its own partition: a message to an actor of another partition
        // goes to this partition's outbox, and the relay moves it (`relay.rs`).
        let (n, p) = (self.partitions(), self.part(turn.actor));
        let (outgoing, remote): (Vec<_>, Vec<_>) = outgoing
            .into_iter()
            .partition(|(o, _)| partition_of(&o.envelope.to, n) == p);
        if let Some(s) = &turn.settle {
            let (Settle::Ack(r) | Settle::DeadLetter(r, _)) = s;
            if partition_of(&r.actor, n) != p {
                return Err(StoreError::InvalidRequest(format!(
                    "a turn of {} settles a message of {}, which is in another partition",
                    turn.actor, r.actor
                )));
            }
        }
        let sends_away = !remote.is_empty();
        if let Some(r) = &turn.record {
            prepare_result(r.actor, r.key, r.result)?;
            check_ttl("idempotency ttl", r.ttl)?;
        }
        let actor = turn.actor.clone();
        let expected_next = turn.expected_next;
        let fence = turn
            .fence
            .map(|f| Ok::<_, StoreError>((f.clone(), fence_of(turn.actor, f, self.partitions())?)))
            .transpose()?;
        let settle = turn.settle.map(|s| match s {
            Settle::Ack(r) => (r.clone(), None),
            Settle::DeadLetter(r, reason) => (r.clone(), Some(reason.to_owned())),
        });
        let record = turn
            .record
            .map(|r| (r.actor.clone(), r.key.clone(), r.result.clone(), r.ttl));
        let recorded = turn.record.map(|r| (r.actor.clone(), r.key.clone()));
        let committed = self
            .write_in(p, move |tx| {
                // Checks first, writes after: a refused turn writes nothing (see writer.rs).
                let now = Timestamp::now();
                if let Some((fence, of)) = &fence {
                    lease::check_fence(tx, &actor, fence, *of)?;
                }
                {
                    let (highest, _) = journal::meta_of(&**tx.journal_meta.get()?, actor.as_str())?;
                    if expected_next != highest + 1 {
                        return Err(StoreError::Conflict {
                            actor: actor.clone(),
                            expected: expected_next,
                            actual: highest + 1,
                        });
                    }
                }
                if let Some((receipt, _)) = &settle {
                    // Burying cannot fail on the message itself (a damaged frame is buried raw).
                    tx.mailbox.get()?.check_receipt(receipt)?;
                }
                let highest = journal::append(tx, &actor, expected_next, &entries)?;
                {
                    let t = tx.mailbox.get()?;
                    let now_ms = now.as_millis();
                    for (o, bytes) in &outgoing {
                        t.enqueue(&o.envelope.to, o.envelope.id, bytes, o.deliver_at, now_ms)?;
                    }
                }
                {
                    let away: Vec<_> = remote.iter().map(|(o, b)| (o, b.as_slice())).collect();
                    relay::push(tx, &away)?;
                    let t = tx.mailbox.get()?;
                    match &settle {
                        Some((receipt, None)) => t.remove_current(receipt.actor.as_str())?,
                        Some((receipt, Some(reason))) => {
                            bury(tx, &receipt.actor, reason)?;
                        }
                        None => {}
                    }
                }
                if let Some((a, key, result, ttl)) = record {
                    idempotency::record(tx, &a, &key, result, ttl)?;
                }
                let leased = match next {
                    // Only a due message (`Turn::next`).
                    Some(opts) => mailbox::lease(
                        tx,
                        &actor,
                        LeaseOptions {
                            early: Duration::ZERO,
                            ..opts
                        },
                    )?,
                    None => None,
                };
                Ok((highest, leased))
            })
            .await?;
        let (highest, leased) = committed;
        if let Some((a, key)) = recorded {
            self.signal_done(&a, &key);
        }
        if sends_away {
            self.parts.relays.wake(p);
        }
        // The turn is committed, so nothing after this point may report it failed (rule D15):
        // a next message that does not decode is buried, and if even that fails, it comes back
        // when its visibility runs out and is buried then. After a burial the message behind
        // it is leased as `lease` would go on to it: a turn that asked for the next message
        // and gets none leaves its actor waiting for a wake-up (`Committed::next`).
        let next = match leased {
            Some(l) => match self.finish_or_bury(l).await {
                Ok(Some(d)) => Some(d),
                Ok(None) => {
                    let opts = next.map(|o| LeaseOptions {
                        early: Duration::ZERO,
                        ..o
                    });
                    match opts {
                        Some(opts) => {
                            match crate::store::Mailbox::lease(self, turn.actor, opts).await {
                                Ok(d) => d,
                                Err(e) => {
                                    tracing::warn!(error = %e, "could not lease the message after a buried one; the ready scan finds it");
                                    None
                                }
                            }
                        }
                        None => None,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not bury a damaged message after a turn; it is tried again when its lease runs out");
                    None
                }
            },
            None => None,
        };
        Ok(Committed { highest, next })
    }

    async fn enqueue_once(
        &self,
        msg: &Envelope,
        deliver_at: Option<Timestamp>,
        key: &IdempotencyKey,
        ttl: Duration,
    ) -> StoreResult<Enqueued> {
        check_ttl("idempotency ttl", ttl)?;
        let bytes = prepare_message(msg)?;
        let (to, id, key) = (msg.to.clone(), msg.id, key.clone());
        self.write(&msg.to, move |tx| {
            if let Some(existing) = idempotency::reserve(tx, &to, &key, None)? {
                return Ok(Enqueued::Duplicate(existing));
            }
            let t = tx.mailbox.get()?;
            let position = t.enqueue(&to, id, &bytes, deliver_at, Timestamp::now().as_millis())?;
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
        let bytes = prepare_event(msg, ttl, owner, self.partitions())?;
        let (to, id, key, owner) = (msg.to.clone(), msg.id, key.clone(), owner.clone());
        self.write(&msg.to, move |tx| {
            if let Some(existing) = idempotency::reserve(tx, &to, &key, None)? {
                return Ok(Enqueued::Duplicate(existing));
            }
            let t = tx.mailbox.get()?;
            let now = Timestamp::now().as_millis();
            let position = t.enqueue(&to, id, &bytes, None, now)?;
            t.wake(&owner, &to, now)?;
            Ok(Enqueued::New(position))
        })
        .await
    }

    async fn retire(
        &self,
        receipt: &crate::store::Receipt,
        fence: &crate::store::Lease,
        highest: crate::entry::Seq,
    ) -> StoreResult<crate::store::Retired> {
        use crate::store::Retired;
        let p = self.part(&receipt.actor);
        let of = fence_of(&receipt.actor, fence, self.partitions())?;
        let (receipt, fence) = (receipt.clone(), fence.clone());
        self.write_in(p, move |tx| {
            // Checks first, in the order the runtime's other writes check them; nothing is
            // written until all pass (rule D22).
            lease::check_fence(tx, &receipt.actor, &fence, of)?;
            let a = receipt.actor.as_str();
            let t = tx.mailbox.get()?;
            t.check_receipt(&receipt)?;
            let count = t.count(a)?;
            let (h, _) = journal::meta_of(&**tx.journal_meta.get()?, a)?;
            if h != highest {
                return Ok(Retired::Moved);
            }
            if count != 1 {
                return Ok(Retired::Busy);
            }
            tx.mailbox.get()?.remove_current(a)?;
            journal::delete(tx, &receipt.actor)?;
            Ok(Retired::Deleted)
        })
        .await
    }
}
