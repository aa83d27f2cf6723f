//! [`Turn`]: everything one step of an actor makes durable, committed as one atomic write.

use std::time::Duration;

use serde_json::Value;

use crate::entry::{Entry, Seq};
use crate::envelope::Envelope;
use crate::error::{StoreError, StoreResult};
use crate::id::{ActorId, IdempotencyKey};
use crate::store::{Delivery, Lease, LeaseOptions, Receipt};
use crate::time::Timestamp;

/// A message a turn sends (its outbox), enqueued by the same atomic write as the turn's entries.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The message.
    pub envelope: Envelope,
    /// When it is due; `None` for now.
    pub deliver_at: Option<Timestamp>,
}

/// What a turn does with the delivery it processed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Settle<'a> {
    /// Remove the message: it was applied.
    Ack(&'a Receipt),
    /// Move the message to the dead letters with this reason.
    DeadLetter(&'a Receipt, &'a str),
}

/// An idempotency result a turn records (the reply to a request, kept for retries). The key's
/// reservation, held since [`Store::enqueue_once`](crate::Store::enqueue_once), ends here: the
/// result is kept for `ttl` from this turn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record<'a> {
    /// The actor the key belongs to.
    pub actor: &'a ActorId,
    /// The key.
    pub key: &'a IdempotencyKey,
    /// The result.
    pub result: &'a Value,
    /// How long to keep it.
    pub ttl: Duration,
}

/// One atomic write of an actor's turn (rule D5 of RELIABILITY.md).
///
/// Either all of it happens or none of it does:
/// - if `fence` is set and that lease is no longer held (expired, released, taken over),
///   [`StoreError::LeaseLost`](crate::StoreError::LeaseLost); the fence is the actor's own
///   lease or its partition's ([`fence_of`](crate::store::backend::fence_of): any other is
///   [`StoreError::InvalidRequest`](crate::StoreError::InvalidRequest)), and a write fenced by
///   its partition's lease is refused too while anyone holds the actor's own lease;
/// - if the journal's next seq is not `expected_next`, [`StoreError::Conflict`](crate::StoreError::Conflict);
/// - if `settle`'s receipt is stale, [`StoreError::StaleReceipt`](crate::StoreError::StaleReceipt);
///
/// otherwise the entries are appended, every `send` message enqueued, the delivery acked or
/// dead-lettered, and the idempotency result recorded, in one durable write. This is how a
/// message is applied at most once (its ack and its effects are one write) and how an outgoing
/// message leaves exactly once (its enqueue and its `MessageSent` entry are one write).
#[derive(Debug, Clone, Copy)]
pub struct Turn<'a> {
    /// The journal.
    pub actor: &'a ActorId,
    /// Its next seq, as the caller believes.
    pub expected_next: Seq,
    /// Entries numbered from `expected_next` (may be empty).
    pub entries: &'a [Entry],
    /// Commit only while this lease is held: the actor's own, or its partition's (see above).
    pub fence: Option<&'a Lease>,
    /// Messages to enqueue.
    pub send: &'a [Outgoing],
    /// The processed delivery.
    pub settle: Option<Settle<'a>>,
    /// An idempotency result to record.
    pub record: Option<Record<'a>>,
    /// After everything else, lease the actor's next message in the same write (saves the
    /// consumer a round trip and a commit when the mailbox has a backlog). Only a due message:
    /// [`LeaseOptions::early`] is not looked at here (a turn follows a delivery, so no
    /// suspended message is current).
    pub next: Option<LeaseOptions>,
}

/// What [`Store::commit_turn`](crate::Store::commit_turn) did.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    /// The journal's highest seq after the turn.
    pub highest: Seq,
    /// The actor's next message, if the turn asked for it and one was due. A store must lease
    /// one whenever one is due: after a turn that asked and got none, the runtime waits for a
    /// wake-up (a send, an arrival, its ready scan) before it asks the mailbox again.
    pub next: Option<Delivery>,
}

impl<'a> Turn<'a> {
    /// Checks the rules every backend enforces before writing anything: a turn records a result
    /// only under its own actor or under the mailbox it settles (an event lane of the actor:
    /// the key of the event it consumes). Every backend calls this first.
    pub fn check(&self) -> StoreResult<()> {
        if let Some(r) = &self.record {
            let settled = self.settle.map(|s| match s {
                Settle::Ack(r) | Settle::DeadLetter(r, _) => &r.actor,
            });
            if r.actor != self.actor && Some(r.actor) != settled {
                return Err(StoreError::InvalidRequest(format!(
                    "a turn of {} records a result for {}: only for its own actor or the mailbox it settles",
                    self.actor, r.actor
                )));
            }
        }
        Ok(())
    }

    /// A turn that only appends `entries`.
    pub fn append(actor: &'a ActorId, expected_next: Seq, entries: &'a [Entry]) -> Self {
        Turn {
            actor,
            expected_next,
            entries,
            fence: None,
            send: &[],
            settle: None,
            record: None,
            next: None,
        }
    }
}

/// Reads the status word a backend's [`Store::retire`](crate::Store::retire) script or
/// function answers with (`ok`, `moved`, `busy`, `lost`, `stale`); `None` for any other word,
/// which the backend reports as unexpected.
///
/// ```
/// use std::time::Duration;
/// use loom_core::store::backend::retire_status;
/// use loom_core::{ActorId, Lease, MessageId, Receipt, Retired, Timestamp};
///
/// let actor = ActorId::new("order", "o-1")?;
/// let receipt = Receipt { actor: actor.clone(), position: 1, message_id: MessageId::new(), delivery: 1 };
/// let fence = Lease { actor, owner: "node".into(), token: 7, expires_at: Timestamp::now() + Duration::from_secs(5) };
/// assert_eq!(retire_status("busy", &receipt, &fence).unwrap()?, Retired::Busy);
/// assert!(retire_status("lost", &receipt, &fence).unwrap().is_err());
/// assert!(retire_status("what", &receipt, &fence).is_none());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn retire_status(
    status: &str,
    receipt: &Receipt,
    fence: &Lease,
) -> Option<StoreResult<crate::store::Retired>> {
    use crate::store::Retired;
    Some(match status {
        "ok" => Ok(Retired::Deleted),
        "moved" => Ok(Retired::Moved),
        "busy" => Ok(Retired::Busy),
        "lost" => Err(StoreError::LeaseLost {
            actor: receipt.actor.clone(),
            token: fence.token,
        }),
        "stale" => Err(StoreError::StaleReceipt {
            actor: receipt.actor.clone(),
            message_id: receipt.message_id,
        }),
        _ => return None,
    })
}

/// The next message a committed turn hands out, from what its store leased with it, decoded
/// (`None` if the turn leased nothing). The turn is committed whatever the decoding gives, so
/// it must be reported committed (rule D15): an error (a leased message that does not decode
/// and could not be buried, [`bury_corrupt`](crate::store::backend::bury_corrupt), or a lease
/// after it that failed) is not handed out (`None`, and logged). A message left leased then
/// comes back when its visibility runs out, and at its delivery limit goes to the dead letters.
///
/// ```
/// use loom_core::store::backend::committed_next;
/// use loom_core::{ActorId, Delivery};
///
/// let actor = ActorId::new("order", "o-1")?;
/// let damaged = Delivery::from_frame(actor.clone(), b"not a frame", 3, 1, None);
/// assert!(damaged.is_err());
/// assert!(committed_next(&actor, Some(damaged)).is_none());
/// assert!(committed_next(&actor, None).is_none());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn committed_next(actor: &ActorId, next: Option<StoreResult<Delivery>>) -> Option<Delivery> {
    match next? {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::error!(%actor, error = %e, "a committed turn's next message could not be handed out; whatever stays leased comes back when its visibility runs out (dead-lettered at its delivery limit)");
            None
        }
    }
}

/// [`committed_next`] on a store whose client decodes what it hands out (Redis, PostgreSQL),
/// past a damaged next message (rule D14): one whose frame does not decode is buried through
/// `bury` (the backend's [`bury_corrupt`](crate::store::backend::bury_corrupt) call: whether to
/// lease again) and `mailbox` leased again with the turn's `opts`; what still fails is logged
/// and not handed out, since the turn is committed (rule D15).
///
/// ```
/// # async fn f() -> Result<(), loom_core::StoreError> {
/// use loom_core::store::backend::committed_next_past_corrupt;
/// use loom_core::{ActorId, EmbeddedStore, LeaseOptions};
///
/// let store = EmbeddedStore::in_memory()?;
/// let a = ActorId::new("order", "o-1")?;
/// let next = committed_next_past_corrupt(&store, &a, None, Some(LeaseOptions::default()), |_| async {
///     Ok(true)
/// })
/// .await;
/// assert!(next.is_none(), "the turn leased nothing");
/// # Ok(()) }
/// ```
pub async fn committed_next_past_corrupt<M, B, F>(
    mailbox: &M,
    actor: &ActorId,
    next: Option<StoreResult<Delivery>>,
    opts: Option<LeaseOptions>,
    bury: B,
) -> Option<Delivery>
where
    M: crate::store::Mailbox + ?Sized,
    B: FnOnce(StoreError) -> F,
    F: std::future::Future<Output = StoreResult<bool>>,
{
    match (next, opts) {
        (Some(Err(e @ StoreError::Corrupt { .. })), Some(opts)) => {
            let again = match bury(e.clone()).await {
                Ok(true) => mailbox.lease(actor, opts).await.transpose(),
                Ok(false) => Some(Err(e)),
                Err(b) => Some(Err(b)),
            };
            committed_next(actor, again)
        }
        (next, _) => committed_next(actor, next),
    }
}
