//! The store contract: what every backend promises about journals, snapshots, mailboxes, leases
//! and idempotency records.
//!
//! One trait per concern — [`JournalStore`], [`Mailbox`], [`LeaseManager`],
//! [`IdempotencyStore`], [`Parking`] — and [`Store`] for a backend that serves them all. The rules written on
//! each method are the contract; `loom-testkit`'s conformance suite checks every backend against
//! them, case by case.
//!
//! Logic that does not depend on the backend (checking a batch before it is written, streaming a
//! read page by page, checking options, building a delivery) lives here once: [`prepare_append`],
//! [`paged_read`], [`check_ttl`], [`LeaseOptions::validate`], [`Delivery::from_frame`].

mod idempotency;
mod journal;
mod lease;
mod mailbox;
mod park;
mod turn;

pub use idempotency::{IdempotencyStore, Reservation, prepare_result};
pub use journal::{
    EntryStream, JournalInfo, JournalStore, Page, SeqRange, paged_read, prepare_append,
    prepare_snapshot,
};
pub use lease::{Lease, LeaseManager, check_owner};
pub use mailbox::{
    DeadLetter, Delivery, LeaseOptions, Mailbox, Receipt, Waiting, interleave, prepare_message,
};
pub use park::{Park, Parking};
pub use turn::{Committed, Outgoing, Record, Settle, Turn};

use std::time::Duration;

use async_trait::async_trait;

use crate::envelope::Envelope;
use crate::error::StoreResult;
use crate::id::IdempotencyKey;
use crate::time::Timestamp;

/// Refuses a zero duration where a positive one is needed (a lease or idempotency TTL, a
/// visibility timeout) with [`StoreError::InvalidRequest`](crate::StoreError::InvalidRequest)
/// naming `what`. Every backend checks its TTLs here.
///
/// ```
/// use std::time::Duration;
/// use loom_core::store::check_ttl;
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

/// The outcome of [`Store::enqueue_once`].
#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    /// The key was free: it is now reserved and the message enqueued at this position.
    New(u64),
    /// The key was taken: nothing was enqueued; this is what the key holds.
    Duplicate(Reservation),
}

/// A backend serving every concern, and the atomic [`Turn`] that ties them together.
///
/// Use `Arc<dyn Store>` to pick a backend at run time.
#[async_trait]
pub trait Store: JournalStore + Mailbox + LeaseManager + IdempotencyStore + Parking {
    /// Commits a [`Turn`] atomically (see its rules).
    async fn commit_turn(&self, turn: Turn<'_>) -> StoreResult<Committed>;

    /// Reserves `key` for `msg.to` and enqueues `msg`, in one atomic write, unless the key is
    /// already reserved or completed, in which case nothing is written.
    ///
    /// The reservation is held until the message is settled: it does not expire while the
    /// message waits (a delay, a backlog, a parked actor), however long that is, and shows as
    /// [`Reservation::Pending`] with `expires_at` [`Timestamp::MAX`]. The turn that settles the
    /// message records the result ([`Turn::record`]), which is then kept for that record's ttl.
    /// `ttl` is only checked here (positive); a message the store itself dead-letters (after
    /// `max_deliveries`) keeps its key reserved until the dead letter is requeued and settled.
    ///
    /// This is how a client retry with the same idempotency key never enqueues twice, and how a
    /// crash between "reserve" and "enqueue" cannot leave a reservation without its message.
    async fn enqueue_once(
        &self,
        msg: &Envelope,
        deliver_at: Option<Timestamp>,
        key: &IdempotencyKey,
        ttl: Duration,
    ) -> StoreResult<Enqueued>;
}
