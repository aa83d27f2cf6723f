//! What the runtime counts: [`MetricsSnapshot`], read by [`Runtime::metrics`](super::Runtime::metrics),
//! and the same counts, with latency histograms, through the [`metrics`] facade for whatever
//! recorder the application installs (Prometheus with `loom-http`; none: nothing is recorded).
//!
//! Names (labelled by actor `kind`, never by actor key, so the number of series stays
//! bounded by the kinds registered; the gauges of the runtime itself by its `node`):
//!
//! | name | type | what |
//! | --- | --- | --- |
//! | `loom_invocations_total` … `loom_declined_total` | counter | the [`Count`]s, one per field of [`MetricsSnapshot`] |
//! | `loom_turn_seconds` | histogram | an invocation's turn: from its message's delivery to its committed write (to its write's failure in the series labelled `outcome="failed"`) |
//! | `loom_store_commit_seconds` | histogram | the turn's atomic write alone (`Store::commit_turn`), committed (no `outcome` label) or failed (`outcome="failed"`: refused, timed out, fenced) |
//! | `loom_activation_seconds` | histogram | an activation: lease taken, snapshot loaded, tail replayed |
//! | `loom_active_actors`, `loom_leases_held`, `loom_partitions_owned`, `loom_store_healthy` (1 or 0: 1 when degraded too), `loom_store_degraded` (1 or 0; all per `node`) | gauge | set by the exporter when it is read (`loom-http`) |
//! | `loom_mailboxes_waiting`, `loom_mailboxes_ready`, `loom_mailbox_wait_seconds` (per kind) | gauge | read from the store for the exporter (`Mailbox::backlog`), in the background: mailboxes holding a message, those ready to run now, and how long the longest-ready had waited |
//! | `loom_mailbox_backlog_age_seconds` (per kind) | gauge | how old the reading of those three is (a kind too long to walk within a scrape shows the latest reading that ended) |
//! | `loom_parked_actors` (per kind) | gauge | read from the store when the exporter is read: actors parked until their code is fixed |
//!
//! A failed write is observed under `outcome="failed"` so that commits that time out raise the
//! latency a dashboard shows (its quantiles sum over both series) without changing the series
//! of committed turns (`{outcome=""}` selects them alone).
//!
//! The facade's handles are made once per kind when the runtime starts (from the recorder
//! installed then: install one before starting the runtime), so counting a turn allocates
//! nothing (it looks its kind up in a small map); without a recorder the handles do nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What the runtime counts, each an atomic of [`Metrics`] and a counter of the facade.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Count {
    Invocations,
    Retries,
    DeadLetters,
    Rejections,
    Recoveries,
    ReplayedEntries,
    Compactions,
    CompactionFailures,
    CorruptSnapshots,
    LeasesLost,
    Suspensions,
    Retired,
    StateUpgrades,
    Declined,
}

impl Count {
    const ALL: [Count; 14] = [
        Count::Invocations,
        Count::Retries,
        Count::DeadLetters,
        Count::Rejections,
        Count::Recoveries,
        Count::ReplayedEntries,
        Count::Compactions,
        Count::CompactionFailures,
        Count::CorruptSnapshots,
        Count::LeasesLost,
        Count::Suspensions,
        Count::Retired,
        Count::StateUpgrades,
        Count::Declined,
    ];

    fn name(self) -> &'static str {
        match self {
            Count::Invocations => "loom_invocations_total",
            Count::Retries => "loom_retries_total",
            Count::DeadLetters => "loom_dead_letters_total",
            Count::Rejections => "loom_rejections_total",
            Count::Recoveries => "loom_recoveries_total",
            Count::ReplayedEntries => "loom_replayed_entries_total",
            Count::Compactions => "loom_compactions_total",
            Count::CompactionFailures => "loom_compaction_failures_total",
            Count::CorruptSnapshots => "loom_corrupt_snapshots_total",
            Count::LeasesLost => "loom_leases_lost_total",
            Count::Suspensions => "loom_suspensions_total",
            Count::Retired => "loom_retired_total",
            Count::StateUpgrades => "loom_state_upgrades_total",
            Count::Declined => "loom_declined_total",
        }
    }
}

/// A latency the runtime measures, a histogram of the facade.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Latency {
    Turn,
    StoreCommit,
    Activation,
}

impl Latency {
    const ALL: [Latency; 3] = [Latency::Turn, Latency::StoreCommit, Latency::Activation];

    /// True for the latencies observed when what they time fails too.
    fn fails(self) -> bool {
        matches!(self, Latency::Turn | Latency::StoreCommit)
    }

    fn name(self) -> &'static str {
        match self {
            Latency::Turn => "loom_turn_seconds",
            Latency::StoreCommit => "loom_store_commit_seconds",
            Latency::Activation => "loom_activation_seconds",
        }
    }
}

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
    /// The facade's handles per kind, in the order of [`Count::ALL`] and [`Latency::ALL`].
    facade: Facade,
}

#[derive(Default)]
struct Facade(HashMap<&'static str, Handles>);

impl std::fmt::Debug for Facade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

struct Handles {
    counters: [metrics::Counter; Count::ALL.len()],
    histograms: [metrics::Histogram; Latency::ALL.len()],
    /// The same histograms labelled `outcome="failed"`, for what failed: a turn and its
    /// write (an activation that fails is not timed).
    failed: [Option<metrics::Histogram>; Latency::ALL.len()],
}

impl Metrics {
    /// Counters at zero, and the facade's handles for `kinds` from the recorder installed now.
    pub(crate) fn new(kinds: impl IntoIterator<Item = &'static str>) -> Self {
        let facade = kinds
            .into_iter()
            .map(|kind| {
                let handles = Handles {
                    counters: Count::ALL.map(|c| metrics::counter!(c.name(), "kind" => kind)),
                    histograms: Latency::ALL.map(|l| metrics::histogram!(l.name(), "kind" => kind)),
                    failed: Latency::ALL.map(|l| {
                        l.fails().then(
                            || metrics::histogram!(l.name(), "kind" => kind, "outcome" => "failed"),
                        )
                    }),
                };
                (kind, handles)
            })
            .collect();
        Metrics {
            facade: Facade(facade),
            ..Metrics::default()
        }
    }

    fn counter(&self, c: Count) -> &AtomicU64 {
        match c {
            Count::Invocations => &self.invocations,
            Count::Retries => &self.retries,
            Count::DeadLetters => &self.dead_letters,
            Count::Rejections => &self.rejections,
            Count::Recoveries => &self.recoveries,
            Count::ReplayedEntries => &self.replayed_entries,
            Count::Compactions => &self.compactions,
            Count::CompactionFailures => &self.compaction_failures,
            Count::CorruptSnapshots => &self.corrupt_snapshots,
            Count::LeasesLost => &self.leases_lost,
            Count::Suspensions => &self.suspensions,
            Count::Retired => &self.retired,
            Count::StateUpgrades => &self.state_upgrades,
            Count::Declined => &self.declined,
        }
    }

    /// Counts `n` of `c` for an actor of `kind`.
    pub(crate) fn count(&self, c: Count, kind: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        self.counter(c).fetch_add(n, Ordering::Relaxed);
        if let Some(h) = self.facade.0.get(kind) {
            h.counters[c as usize].increment(n);
        }
    }

    /// Records that `l` took `took` for an actor of `kind`.
    pub(crate) fn observe(&self, l: Latency, kind: &'static str, took: Duration) {
        if let Latency::Activation = l {
            let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
            self.activation_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
        if let Some(h) = self.facade.0.get(kind) {
            h.histograms[l as usize].record(took.as_secs_f64());
        }
    }

    /// Records that `l` failed after `took` for an actor of `kind` (the facade's histogram
    /// labelled `outcome="failed"`, for the latencies whose failures are timed).
    pub(crate) fn observe_failed(&self, l: Latency, kind: &'static str, took: Duration) {
        if let Some(Some(h)) = self.facade.0.get(kind).map(|h| &h.failed[l as usize]) {
            h.record(took.as_secs_f64());
        }
    }
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
    /// Leases this node keeps renewed now: one per partition it owns, whose actors run under
    /// it (rule D8). Actors take no leases of their own.
    pub leases_held: u64,
    /// Partitions this node owns now, over every kind it hosts (see
    /// [`Runtime::partitions_owned`](super::Runtime::partitions_owned)).
    pub partitions_owned: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handles are indexed by the variants' order: `ALL` must list them in it.
    #[test]
    fn all_lists_the_variants_in_their_order() {
        for (i, c) in Count::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?}");
        }
        for (i, l) in Latency::ALL.iter().enumerate() {
            assert_eq!(*l as usize, i, "{l:?}");
        }
    }
}
