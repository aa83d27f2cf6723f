//! Loom's deterministic simulation.
//!
//! The simulator runs the real Loom runtime on a single-threaded tokio runtime whose clock is
//! paused (virtual), against [`SimStore`]: an in-memory implementation of the
//! whole [`loom_core::Store`] contract that is deterministic for a given seed and that models
//! what a real store does with time and failure:
//!
//! - **durability**: every write is applied to the *live* data (what reads see), then "synced"
//!   to the *durable* data after a simulated fsync latency, with group commit (one sync covers
//!   every write applied before it); a write returns only once it is durable.
//!   [`SimStore::power_loss`](store::SimStore::power_loss) throws away everything not yet
//!   synced, so a simulation can check that nothing acknowledged is ever lost;
//! - **faults** ([`Faults`]), all drawn from the seeded generator: latency that
//!   reorders concurrent requests, transient failures, replies lost after the write landed, a
//!   full disk;
//! - **a trace**: a running hash of every request (method, argument, virtual time, outcome), so
//!   that two runs with the same seed can be compared with one number, and the last lines of it
//!   for printing when a run fails;
//! - **partitions** ([`SimStore::new_partitioned`](store::SimStore::new_partitioned)), as the
//!   embedded store has them: a message a turn sends to an actor of another partition leaves
//!   through the sender partition's outbox and is moved by its relay, whose moves are requests
//!   like any other (so faults and power losses land mid-move).
//!
//! The store passes the same conformance suite as every other backend, with one partition and
//! with three (`cargo test -p loom-sim --test conformance_sim`). Its file map is the other
//! backends': `store/journal.rs`, `mailbox.rs`, `lease.rs`, `idempotency.rs`, `park.rs`,
//! `turn.rs`, `relay.rs`, with the durability model, the faults and the trace in
//! `store/mod.rs`.
//!
//! ```
//! use loom_core::{ActorId, Entry, EntryKind, JournalStore};
//! use loom_sim::store::{Faults, SimStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SimStore::new(7, Faults::default());
//! let a = ActorId::new("account", "alice")?;
//! store.append(&a, 1, &[Entry::new(1, EntryKind::Failed { error: "x".into(), dead_lettered: false })]).await?;
//! // Acknowledged, so durable: a power loss keeps it.
//! store.power_loss();
//! assert_eq!(store.highest_seq(&a).await?, 1);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod run;
pub mod store;
pub mod workload;

pub use store::{Faults, SimFault, SimStats, SimStore};
