//! A message on its way to an actor.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::id::{ActorId, IdempotencyKey, MessageId};

/// A message addressed to an actor, as it sits in a mailbox.
///
/// ```
/// use loom_core::{ActorId, Envelope};
///
/// let to = ActorId::new("account", "alice")?;
/// let m = Envelope::new(to.clone(), serde_json::json!({ "Deposit": 100 }));
/// assert_eq!(m.to, to);
/// assert_eq!(m.attempt, 0);
/// # Ok::<(), loom_core::IdError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique id.
    pub id: MessageId,
    /// The recipient.
    pub to: ActorId,
    /// The body.
    pub payload: Value,
    /// The caller's idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<IdempotencyKey>,
    /// The actor to send the reply to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ActorId>,
    /// W3C trace context of the sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// How many times delivery was attempted before; the mailbox counts deliveries itself, and
    /// sets this when it hands the message out.
    #[serde(default)]
    pub attempt: u32,
    /// For a dead letter put back in its mailbox: the id the message had when it was first
    /// sent. A requeued message gets a new `id`, so that it runs again instead of being taken
    /// for a duplicate of the run that failed; what the runtime derives from a message (the ids
    /// of the messages it sends, its children, its activities' keys) comes from
    /// [`origin`](Self::origin), so it stays the same: the requeued run journals what a failed
    /// run sent at the same step to the same recipient, and does not send it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requeued_from: Option<MessageId>,
    /// Set on the runtime's own retirement message to an actor (never on a message a caller
    /// sends): when it comes, the runtime deletes the actor's journal if it is still as it was
    /// at `highest` and no other message waits ([`Store::retire`](crate::Store::retire)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire: Option<Retire>,
}

/// Why and where an actor is to be retired (see [`Envelope::retire`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Retire {
    /// The journal's highest seq when the retirement was decided: if it grew since, the actor
    /// ran again and is kept.
    pub highest: crate::entry::Seq,
    /// Why.
    pub reason: RetireReason,
}

/// Why an actor is retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetireReason {
    /// Its handler called `Context::finish`, and the grace period passed.
    Finished,
    /// It was idle longer than the retention policy allows (`Retention::idle_after`).
    Idle,
}

impl Envelope {
    /// A message with a fresh id and no options.
    pub fn new(to: ActorId, payload: Value) -> Self {
        Envelope {
            id: MessageId::new(),
            to,
            payload,
            idempotency_key: None,
            reply_to: None,
            traceparent: None,
            attempt: 0,
            requeued_from: None,
            retire: None,
        }
    }

    /// The id the message was first sent with: [`requeued_from`](Self::requeued_from) if it was
    /// requeued, else its `id`.
    pub fn origin(&self) -> MessageId {
        self.requeued_from.unwrap_or(self.id)
    }

    /// This message as it goes back into its mailbox from the dead letters: a new id (it is a
    /// new delivery, to be run, not deduplicated), the same origin, payload and idempotency key,
    /// and no earlier attempts.
    ///
    /// ```
    /// use loom_core::{ActorId, Envelope};
    ///
    /// let m = Envelope::new(ActorId::new("account", "alice")?, serde_json::json!(1));
    /// let back = m.requeued();
    /// assert_ne!(back.id, m.id);
    /// assert_eq!(back.origin(), m.id);
    /// assert_eq!(back.requeued().origin(), m.id);
    /// # Ok::<(), loom_core::IdError>(())
    /// ```
    pub fn requeued(&self) -> Envelope {
        Envelope {
            id: MessageId::new(),
            requeued_from: Some(self.origin()),
            attempt: 0,
            ..self.clone()
        }
    }
}
