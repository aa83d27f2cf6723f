//! The store contract: what every backend promises about journals, snapshots, mailboxes, leases
//! and idempotency records.
//!
//! One trait per concern — [`JournalStore`], [`Mailbox`], [`LeaseManager`],
//! [`IdempotencyStore`] — and [`Store`] for a backend that serves all four. The rules written on
//! each method are the contract; `loom-testkit`'s conformance suite checks every backend against
//! them, case by case.
//!
//! Logic that does not depend on the backend (checking a batch before it is written, streaming a
//! read page by page) lives here once, in [`prepare_append`] and [`paged_read`].

mod idempotency;
mod journal;
mod lease;
mod mailbox;

pub use idempotency::{IdempotencyStore, Reservation, prepare_result};
pub use journal::{
    EntryStream, JournalInfo, JournalStore, SeqRange, paged_read, prepare_append, prepare_snapshot,
};
pub use lease::{Lease, LeaseManager, check_owner};
pub use mailbox::{DeadLetter, Delivery, LeaseOptions, Mailbox, Receipt, prepare_message};

/// A backend serving all four concerns.
///
/// Implemented for every type that implements the four traits; use `Arc<dyn Store>` to pick a
/// backend at run time.
pub trait Store: JournalStore + Mailbox + LeaseManager + IdempotencyStore {}

impl<T: JournalStore + Mailbox + LeaseManager + IdempotencyStore> Store for T {}
