//! [`Parking`]: actors stopped until someone fixes them, recorded in the store so that every
//! node honours it and `loom parked` shows it.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::codec::{self, RecordType};
use crate::entry::Step;
use crate::error::{StoreError, StoreResult};
use crate::id::{ActorId, MessageId};
use crate::limits::clip_reason;
use crate::store::Lease;
use crate::time::Timestamp;

/// Why an actor is parked, and where: the runtime parks an actor whose journal no longer
/// matches its code (non-determinism), or cannot be replayed at all.
///
/// ```
/// use loom_core::store::Park;
///
/// let p = Park::new("node-1", "step 2: the journal has activity \"a\", the code calls \"b\"");
/// let bytes = p.encode()?;
/// assert_eq!(Park::decode(&bytes)?, p);
/// # Ok::<(), loom_core::StoreError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Park {
    /// Why (clipped to [`MAX_REASON_LEN`](crate::limits::MAX_REASON_LEN)).
    pub reason: String,
    /// The message whose invocation stopped, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<MessageId>,
    /// The durable step it stopped at, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Step>,
    /// The node that parked it.
    pub node: String,
    /// When.
    pub at: Timestamp,
}

impl Park {
    /// A record made now by `node`, with no message or step.
    pub fn new(node: impl Into<String>, reason: &str) -> Self {
        Park {
            reason: clip_reason(reason),
            message_id: None,
            step: None,
            node: node.into(),
            at: Timestamp::now(),
        }
    }

    /// Its frame (see [`crate::codec`]); every backend stores it so.
    pub fn encode(&self) -> StoreResult<Vec<u8>> {
        codec::encode(RecordType::Park, self)
            .map_err(|e| StoreError::InvalidRequest(format!("park record: {e}")))
    }

    /// Reads a frame written by [`encode`](Self::encode).
    pub fn decode(bytes: &[u8]) -> StoreResult<Self> {
        codec::decode(RecordType::Park, bytes).map_err(|e| StoreError::corrupt("park record", e))
    }
}

/// Parked actors (rule D12 of RELIABILITY.md).
///
/// Rules every backend keeps:
/// - while an actor is parked its mailbox is held: [`lease`](crate::Mailbox::lease) hands
///   nothing out (not even a message whose visibility ran out), and
///   [`ready_actors`](crate::Mailbox::ready_actors) does not list it; messages sent to it wait;
/// - [`park`](Self::park) is fenced: with a lease that is no longer held it fails with
///   [`StoreError::LeaseLost`] and writes nothing (a fence is checked as a
///   [`Turn`](crate::store::Turn)'s is);
/// - [`unpark`](Self::unpark) makes the message that was out when the actor was parked
///   visible at once (its delivery count kept, so that no receipt ever repeats) and the
///   mailbox ready again.
#[async_trait]
pub trait Parking: Send + Sync + 'static {
    /// Parks the actor with `park` (replacing an earlier record), while `fence` is held.
    async fn park(&self, actor: &ActorId, park: &Park, fence: Option<&Lease>) -> StoreResult<()>;

    /// Lets a parked actor run again; returns its record, or `None` if it was not parked.
    async fn unpark(&self, actor: &ActorId) -> StoreResult<Option<Park>>;

    /// The actor's park record, if it is parked.
    async fn parked(&self, actor: &ActorId) -> StoreResult<Option<Park>>;

    /// Parked actors in id order after `after`, at most `limit`.
    async fn parked_actors(
        &self,
        after: Option<&ActorId>,
        limit: usize,
    ) -> StoreResult<Vec<(ActorId, Park)>>;
}
