//! The store contract: what every backend promises about journals, snapshots, mailboxes, leases
//! and idempotency records.
//!
//! One trait per concern — [`JournalStore`], [`Mailbox`], [`LeaseManager`],
//! [`IdempotencyStore`], [`Parking`], [`Membership`] — and [`Store`] for a backend that serves them all. The rules written on
//! each method are the contract; `loom-testkit`'s conformance suite checks every backend against
//! them, case by case.
//!
//! What only a backend needs — the [`Turn`] a store commits and the checks every
//! backend runs before it writes ([`prepare_append`](backend::prepare_append),
//! [`check_ttl`](backend::check_ttl), ...) — is in [`backend`]; [`LeaseOptions::validate`] and
//! [`Delivery::from_frame`] are the rest of that shared logic.

pub mod backend;
mod batch;
mod idempotency;
mod journal;
mod lease;
mod mailbox;
mod membership;
mod park;
mod relay;
mod turn;

pub use idempotency::{Completion, IdempotencyStore, Reservation};
pub use journal::{EntryStream, JournalInfo, JournalStore, SeqRange};
pub use lease::{Lease, LeaseManager};
pub use mailbox::{
    Backlog, DeadLetter, Delivery, LeaseOptions, MAX_EARLY, Mailbox, Receipt, Suspension, Waiting,
};
pub use membership::{FORGET_AFTER_TTLS, MAX_NODE_KINDS, Member, Membership, Roster};
pub use park::{Park, Parking};
pub use relay::RelayFailure;

use backend::{Committed, Turn};

use std::time::Duration;

use async_trait::async_trait;

use crate::envelope::Envelope;
use crate::error::StoreResult;
use crate::id::IdempotencyKey;
use crate::time::Timestamp;

/// The outcome of [`Store::enqueue_once`].
#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    /// The key was free: it is now reserved and the message enqueued at this position.
    New(u64),
    /// The key was taken: nothing was enqueued; this is what the key holds.
    Duplicate(Reservation),
}

/// What [`Store::retire`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// The journal and snapshots are deleted (the highest seq kept) and the message acked.
    Deleted,
    /// Nothing written: the journal is past the `highest` asked (the actor ran since).
    Moved,
    /// Nothing written: another message waits in the mailbox (due, delayed, or out).
    Busy,
}

/// What waits in one partition's outbox: messages its turns sent to actors of other
/// partitions, not yet moved there by its relay ([`Store::relay_backlog`]). A relay that keeps
/// up holds this near zero; one that falls behind (or is stopped) lets it grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayBacklog {
    /// The partition whose outbox it is.
    pub partition: u32,
    /// Messages in its outbox: not yet moved, or moved and not yet trimmed (a brief step).
    pub waiting: u64,
}

/// A backend serving every concern, and the atomic [`Turn`] that ties them together.
///
/// Use `Arc<dyn Store>` to pick a backend at run time.
#[async_trait]
pub trait Store:
    JournalStore + Mailbox + LeaseManager + IdempotencyStore + Parking + Membership
{
    /// Commits a [`Turn`] atomically (see its rules).
    async fn commit_turn(&self, turn: Turn<'_>) -> StoreResult<Committed>;

    /// How many partitions the store is cut into (see [`crate::partition`]); fixed when the
    /// store is created. A turn writes only its actor's partition; a message it sends to an
    /// actor of another partition reaches that actor's mailbox through the sender partition's
    /// outbox and relay, exactly once, a little later than the turn's commit. 1 for a store
    /// that is not partitioned (today's Redis and PostgreSQL backends).
    fn partitions(&self) -> u32 {
        1
    }

    /// Each partition's [`RelayBacklog`], for a store of several partitions; empty for a store
    /// of one (nothing crosses partitions). Reads counts only, cheap enough for every metrics
    /// scrape.
    async fn relay_backlog(&self) -> StoreResult<Vec<RelayBacklog>>;

    /// Whether this store's relay (the task that moves its partitions' outboxes, in this
    /// process) is failing to move them, since when and why; `None` while it works, and for a
    /// store without a relay (one partition). Cheap: what the relay last met, no request.
    /// [`Runtime::health`](crate::runtime::Runtime::health) shows it (rule D16).
    fn relay_failure(&self) -> Option<RelayFailure> {
        None
    }

    /// Reserves `key` for `msg.to` and enqueues `msg`, in one atomic write, unless the key is
    /// already reserved or completed, in which case nothing is written.
    ///
    /// The reservation is held until the message is settled: it does not expire while the
    /// message waits (a delay, a backlog, a parked actor), however long that is, and shows as
    /// [`Reservation::Pending`] with `expires_at` [`Timestamp::MAX`]. The turn that settles the
    /// message records the result ([`Turn::record`]), which is then kept for that record's ttl.
    /// `ttl` is only checked here (positive); a message the store itself dead-letters (after
    /// `max_deliveries`) keeps its key reserved until the dead letter is requeued and settled,
    /// or purged ([`runtime::purge_dead_letters`](crate::runtime::purge_dead_letters) settles
    /// it with the failure).
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

    /// Delivers an event: [`enqueue_once`](Self::enqueue_once) of `msg` (due now) on an event
    /// lane of `owner` (`msg.to`, from [`ActorId::event_lane_in`](crate::ActorId::event_lane_in)),
    /// and, in the same atomic write, when the event is new, the wake-up of `owner`'s message if
    /// it is [suspended](Mailbox::suspend) on that lane and has not been handed out again since:
    /// it becomes visible now. A duplicate wakes nothing.
    async fn enqueue_event(
        &self,
        msg: &Envelope,
        key: &IdempotencyKey,
        ttl: Duration,
        owner: &crate::id::ActorId,
    ) -> StoreResult<Enqueued>;

    /// Retires an actor whose retention came due: deletes its journal and snapshots as
    /// [`JournalStore::delete`] does (the highest seq kept, so that a later message starts it
    /// afresh at the next seq and no seq is reused) and acks `receipt` (the runtime's
    /// retirement message, the mailbox's current one), in one atomic write, if and only if
    /// `fence` is still held (checked as a [`Turn`]'s fence is), its journal's highest seq is
    /// still `highest`, and no
    /// other message waits in its mailbox. Otherwise nothing is written: [`Retired::Moved`] or
    /// [`Retired::Busy`], [`StoreError::LeaseLost`](crate::StoreError::LeaseLost), or
    /// [`StoreError::StaleReceipt`](crate::StoreError::StaleReceipt). So an actor with a
    /// waiting message, or one that ran since the retirement was decided, is never deleted
    /// (rule D22). Idempotency records and event lanes are not touched.
    async fn retire(
        &self,
        receipt: &Receipt,
        fence: &Lease,
        highest: crate::entry::Seq,
    ) -> StoreResult<Retired>;
}
