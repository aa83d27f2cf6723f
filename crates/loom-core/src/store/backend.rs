//! What a backend needs to implement the store contract, and nothing a user of Loom needs: the
//! [`Turn`] a store commits in one atomic write and what comes with it, and the checks every
//! backend runs before it writes, kept here once so that the backends cannot disagree; and the
//! group commit ([`Batcher`]) of the backends that talk to a server.

use std::time::Duration;

use crate::error::StoreResult;

pub use super::batch::{BATCH_PAYLOAD_MAX, Batcher, RunBatch};
pub use super::idempotency::prepare_result;
pub use super::journal::{
    Page, READ_PAGE_BYTES, encode_entry, paged_read, prepare_append, prepare_snapshot,
};
pub use super::lease::{FenceOf, check_owner, fence_of};
pub use super::mailbox::{
    bury_corrupt, check_lane, check_purge, corrupt_frame_reason, dead_letter_envelope, interleave,
    interleave_partitions, keep_partitions, prepare_event, prepare_message, prepare_suspend,
};
pub use super::membership::{beat, prepare_heartbeat};
pub use super::relay::{OutboxState, RelayStatus, check_outboxes};
pub use super::turn::{
    Committed, Outgoing, Record, Settle, Turn, committed_next, committed_next_past_corrupt,
    retire_status,
};

/// Refuses a zero duration where a positive one is needed (a lease or idempotency TTL, a
/// visibility timeout) with [`StoreError::InvalidRequest`](crate::StoreError::InvalidRequest)
/// naming `what`. Every backend checks its TTLs here.
///
/// ```
/// use std::time::Duration;
/// use loom_core::store::backend::check_ttl;
///
/// assert!(check_ttl("lease ttl", Duration::from_secs(5)).is_ok());
/// let e = check_ttl("lease ttl", Duration::ZERO).unwrap_err();
/// assert!(e.to_string().contains("lease ttl must be positive"), "{e}");
/// ```
pub fn check_ttl(what: &str, d: Duration) -> StoreResult<()> {
    if d.is_zero() {
        return Err(crate::StoreError::InvalidRequest(format!(
            "{what} must be positive"
        )));
    }
    Ok(())
}
