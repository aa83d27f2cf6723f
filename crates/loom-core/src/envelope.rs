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
        }
    }
}
