//! # loom-core
//!
//! Loom is a durable actor runtime: every step of an actor is recorded in an append-only journal
//! before anything outside the actor can see it, and after a crash the actor comes back from its
//! latest snapshot plus the journal tail.
//!
//! This crate holds:
//! - identifiers ([`ActorId`], [`MessageId`], [`IdempotencyKey`]) checked at the edge;
//! - the journal's contents ([`Entry`], [`EntryKind`], [`Snapshot`]) and its byte format
//!   ([`codec`]);
//! - every size limit ([`limits`]);
//! - the store contract ([`store`]): [`JournalStore`], [`Mailbox`], [`LeaseManager`],
//!   [`IdempotencyStore`];
//! - the embedded store ([`embedded`]), crash-safe in one directory on redb with group commit,
//!   which also serves as the in-memory store.
//!
//! ```
//! use loom_core::{ActorId, Entry, EntryKind, EmbeddedStore, JournalStore, SeqRange};
//! use futures::TryStreamExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = EmbeddedStore::in_memory()?;
//! let alice = ActorId::new("account", "alice")?;
//! store.append(&alice, 1, &[Entry::new(1, EntryKind::TimerFired { step: 1, resumed_in: None })]).await?;
//! let entries: Vec<Entry> = store.read(&alice, SeqRange::all()).try_collect().await?;
//! assert_eq!(entries.len(), 1);
//! assert_eq!(store.highest_seq(&alice).await?, 1);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod codec;
pub mod embedded;
mod entry;
mod envelope;
mod error;
mod finite;
mod id;
pub mod limits;
pub mod partition;
pub mod runtime;
pub mod seam;
pub mod store;
mod time;

#[cfg(feature = "testing")]
pub use embedded::RedoFile;
pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use entry::{Entry, EntryKind, Seq, Snapshot, Step};
pub use envelope::Envelope;
pub use error::{Cause, Limit, StoreError, StoreResult, explain};
pub use id::{ActorId, IdError, IdempotencyKey, MessageId};
pub use runtime::{Actor, ActorRef, Context, Rejected, Runtime};
pub use store::{
    DeadLetter, Delivery, Enqueued, EntryStream, IdempotencyStore, JournalInfo, JournalStore,
    Lease, LeaseManager, LeaseOptions, Mailbox, Member, Membership, Park, Parking, Receipt,
    Reservation, Retired, SeqRange, Store, Waiting,
};
pub use time::Timestamp;
