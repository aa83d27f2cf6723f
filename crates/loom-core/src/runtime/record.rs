//! What the runtime records under an idempotency key: the outcome of the request, for callers
//! that retry or come back later.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::id::MessageId;

/// A request's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    /// The handler's reply.
    Ok(Value),
    /// The handler rejected the message.
    Rejected(String),
    /// The handler rejected the message with a typed value (a separate variant, so that
    /// records written before values existed still read as `Rejected`).
    RejectedWithValue {
        /// Why.
        reason: String,
        /// The value.
        value: Value,
    },
    /// The message was given up on (dead-lettered).
    Failed(String),
    /// The invocation was cancelled ([`ActorRef::cancel`](crate::ActorRef::cancel)) and the
    /// handler passed the cancellation on.
    Cancelled(String),
}

/// The record kept under a request's idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Recorded {
    pub(crate) message_id: MessageId,
    pub(crate) outcome: Outcome,
}
