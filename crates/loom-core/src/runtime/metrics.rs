//! What the runtime counts: [`MetricsSnapshot`], read by [`Runtime::metrics`](super::Runtime::metrics).

use std::sync::atomic::AtomicU64;

/// Counters of what the runtime did; see [`Runtime::metrics`].
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) invocations: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    pub(crate) rejections: AtomicU64,
    pub(crate) recoveries: AtomicU64,
    pub(crate) replayed_entries: AtomicU64,
    pub(crate) compactions: AtomicU64,
    pub(crate) compaction_failures: AtomicU64,
    pub(crate) corrupt_snapshots: AtomicU64,
    pub(crate) leases_lost: AtomicU64,
    pub(crate) suspensions: AtomicU64,
    pub(crate) retired: AtomicU64,
    pub(crate) state_upgrades: AtomicU64,
    pub(crate) declined: AtomicU64,
    pub(crate) activation_nanos: AtomicU64,
}

/// A snapshot of the runtime's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Invocations started (including retries and resumptions).
    pub invocations: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Messages given up on.
    pub dead_letters: u64,
    /// Invocations whose handler refused the message ([`Rejected`](super::Rejected)), counted
    /// when the refusal is journaled; the caller got the reason.
    pub rejections: u64,
    /// Actor activations (recoveries from the store).
    pub recoveries: u64,
    /// Journal entries replayed by those recoveries.
    pub replayed_entries: u64,
    /// Compactions done.
    pub compactions: u64,
    /// Compactions that failed (the journal stays longer; nothing is lost).
    pub compaction_failures: u64,
    /// Unreadable snapshots skipped in favour of older ones.
    pub corrupt_snapshots: u64,
    /// Actors stopped because their lease was lost.
    pub leases_lost: u64,
    /// Invocations suspended in a long durable sleep (the actor passivated, its message back
    /// when the sleep ends; see `Config::suspend_after`).
    pub suspensions: u64,
    /// Actors retired: their journals deleted (see `Config::retention`).
    pub retired: u64,
    /// Actors whose state was upgraded to the code's schema version on loading
    /// ([`Actor::upgrade_state`](super::Actor::upgrade_state)).
    pub state_upgrades: u64,
    /// Activations this node left to a node running newer code (the actor's state is at a
    /// newer schema version than this code's).
    pub declined: u64,
    /// Total time spent activating actors (waiting for a turn to take the lease when many
    /// activate at once, taking it, loading the snapshot, replaying the tail), in
    /// microseconds; divide by `recoveries` for the mean.
    pub activation_micros: u64,
    /// Actors active now.
    pub active: u64,
    /// Leases this node keeps renewed now (one per active actor that has taken its lease).
    pub leases_held: u64,
}
