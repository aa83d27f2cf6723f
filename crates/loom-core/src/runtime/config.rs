//! Runtime settings, each with a default a production system can start from.

use std::time::Duration;

/// When to snapshot and trim (Akka's "retention criteria" as one value).
///
/// After a turn, if at least `every_entries` entries or `every_bytes` bytes were journaled since
/// the last snapshot, the runtime saves a snapshot off the hot path and, once it is durable,
/// trims the entries that the oldest kept snapshot covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    /// Snapshot after this many entries (default 100; not 0); `None` for no count-based
    /// snapshots.
    pub every_entries: Option<u64>,
    /// Snapshot after about this many journaled bytes (default 1 MiB; not 0); `None` for none.
    pub every_bytes: Option<u64>,
    /// Snapshots to keep (default 2; at least 1). The trim point never passes the oldest.
    pub keep: usize,
}

impl Compaction {
    /// No snapshots and no trimming: recovery replays the whole journal (streaming it).
    pub const DISABLED: Compaction = Compaction {
        every_entries: None,
        every_bytes: None,
        keep: 2,
    };

    /// True if it ever snapshots.
    pub fn enabled(&self) -> bool {
        self.every_entries.is_some() || self.every_bytes.is_some()
    }
}

impl Default for Compaction {
    fn default() -> Self {
        Compaction {
            every_entries: Some(100),
            every_bytes: Some(1024 * 1024),
            keep: 2,
        }
    }
}

/// How failed invocations are retried.
///
/// A failed attempt (a panicking handler, a store error) is retried after
/// `min(initial * 2^attempt, max)`, scaled by a random factor in `[0.5, 1.5)` (jitter), until
/// `max_attempts` attempts were made; then the message goes to the dead letters with its error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Delay before the first retry (default 100 ms).
    pub initial: Duration,
    /// Longest delay (default 30 s).
    pub max: Duration,
    /// Attempts before giving up (default 5; at least 1).
    pub max_attempts: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            max_attempts: 5,
        }
    }
}

impl Retry {
    /// The delay before retry number `attempt` (1 for the first retry), with jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.initial.saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1))
                .unwrap_or(u32::MAX),
        );
        let base = exp.min(self.max);
        // Jitter of 0.5 to 1.5 times; a base too long to grow by half (an unchecked per-call
        // policy of `Duration::MAX`) stays as it is instead of panicking.
        if base.checked_mul(2).is_some() {
            base.mul_f64(0.5 + crate::seam::random_f64())
        } else {
            base
        }
    }
}

/// Everything the runtime can be tuned with; see each field's default.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name in leases (default: `loom-<pid>-<random>`); unique per process.
    pub node: String,
    /// How long a lease lasts without renewal (default 10 s; at least 100 ms); renewed every
    /// third of it. A
    /// node's partitions' leases are these: they fence the partitions' actors (rule D8).
    pub lease_ttl: Duration,
    /// How long a message stays out while its invocation runs before another consumer may take it
    /// (default 10 s, as `lease_ttl`); extended every third of it while a long invocation runs
    /// an activity or waits. When a node dies mid-invocation, another node runs the message
    /// once both its partition's lease and this have run out: keep it no longer than `lease_ttl`
    /// for a failover within the lease ttl.
    pub visibility: Duration,
    /// Retries of failed invocations.
    pub retry: Retry,
    /// Snapshots and trimming.
    pub compaction: Compaction,
    /// An actor with nothing to do for this long is passivated (default 60 s).
    pub idle_timeout: Duration,
    /// Most actors active at once on this node (default 10 000); the least recently used idle
    /// one is passivated to make room.
    pub max_active: usize,
    /// How often the dispatcher looks for work enqueued by other nodes, due delayed messages and
    /// retries (default 50 ms).
    pub poll_interval: Duration,
    /// Most messages waiting in one actor's mailbox that a client's send checks for: a send
    /// beyond it fails with `SendError::MailboxFull` (default 100 000; `None` for no bound; not
    /// 0). Messages actors send each other, and those the relay moves, are not held to it.
    pub max_mailbox: Option<u64>,
    /// How long replies are kept for callers retrying with the same idempotency key (default 24 h;
    /// more than zero).
    pub reply_ttl: Duration,
    /// How long an `ask` takes at most by default, its send and its wait for the reply
    /// together (default 30 s).
    pub ask_timeout: Duration,
    /// How long a graceful shutdown waits for in-flight invocations (default 30 s).
    pub shutdown_timeout: Duration,
    /// A durable sleep ([`Context::sleep`](super::Context::sleep)) with more than this left
    /// suspends its invocation instead of sleeping in memory (default 1 s): the actor is
    /// passivated and its memory freed, and its message comes back when
    /// the sleep ends; the replay then continues at the same step. Meanwhile the actor's later
    /// messages wait (one invocation at a time). A wait for an event
    /// ([`Context::wait_event`](super::Context::wait_event)) that has waited this long in memory
    /// without its event, and has longer than this left, suspends the same way, until its event
    /// is delivered or its timeout passes. A wait resumed before its time (woken by a
    /// cancellation, or after a crash) tries to suspend at once, which is how it sees its
    /// cancellation. `Duration::MAX` never suspends, and then a cancellation is never seen.
    pub suspend_after: Duration,
    /// The longest a suspended wait for an event stays suspended before it looks at its event
    /// lane again (default 1 h), should its event arrive without waking it: an event delivered
    /// by a node of an earlier build (which does not wake waits), or a dead-lettered event
    /// requeued onto its lane. The look is a replay of the invocation, which suspends again if
    /// the event is not there.
    pub event_recheck: Duration,
    /// When actors' journals are deleted: after `Context::finish`, and (off by default) after
    /// being idle (see [`Retention`]).
    pub retention: Retention,
}

/// When the runtime deletes an actor's journal and snapshots (retires it), as one value.
///
/// A retirement is a delayed message the runtime sends the actor itself; when it comes, the
/// journal is deleted in one fenced write if the actor has not run since and no other message
/// waits for it ([`Store::retire`](crate::Store::retire), rule D22), else the actor is kept.
/// Its highest seq is kept, so a later message starts it afresh (from its default state) at
/// the next seq; its callers' idempotency records stay until they expire.
///
/// ```
/// use std::time::Duration;
/// use loom_core::runtime::{Config, Retention};
///
/// let c = Config {
///     retention: Retention {
///         finished_after: Duration::from_secs(600),
///         idle_after: Some(Duration::from_secs(30 * 24 * 3600)),
///     },
///     ..Config::default()
/// };
/// assert_eq!(Retention::default().idle_after, None);
/// # let _ = c;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// How long after an invocation that called `Context::finish` ended its actor is retired
    /// (default 1 h): the grace period, in which its journal can still be read and a new
    /// message keeps it.
    pub finished_after: Duration,
    /// Retire actors idle this long (no invocation since), counted from when they were
    /// passivated (idle, evicted, or their node stopping) with an empty mailbox; `None` (the
    /// default) keeps them. An actor used again meanwhile is kept, and looked at again
    /// `idle_after` later. Only for actors whose state may be forgotten after that long: one
    /// waiting for a reply (a transfer whose debit is pending at a parked account, say) would
    /// get it in a fresh incarnation. Zero is refused at start (it would retire every actor
    /// as it passivates, a rolling restart deleting every idle actor's state): `None` is off.
    pub idle_after: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            finished_after: Duration::from_secs(3600),
            idle_after: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node: if crate::seam::is_simulated() {
                // The process id would make two runs of one seed differ.
                format!("loom-sim-{:08x}", crate::seam::random_u32())
            } else {
                format!(
                    "loom-{}-{:08x}",
                    std::process::id(),
                    crate::seam::random_u32()
                )
            },
            lease_ttl: Duration::from_secs(10),
            visibility: Duration::from_secs(10),
            retry: Retry::default(),
            compaction: Compaction::default(),
            idle_timeout: Duration::from_secs(60),
            max_active: 10_000,
            poll_interval: Duration::from_millis(50),
            max_mailbox: Some(100_000),
            reply_ttl: Duration::from_secs(24 * 3600),
            ask_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            suspend_after: Duration::from_secs(1),
            event_recheck: Duration::from_secs(3600),
            retention: Retention::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A per-call policy is not bounded as `Config::retry` is: a delay of `Duration::MAX` is
    /// taken as it is (*before*: the jitter's multiplication overflowed and panicked, after an
    /// attempt had failed, so the attempt ran again at every retry of its message).
    #[test]
    fn a_delay_too_long_to_jitter_is_kept_whole() {
        let r = Retry {
            initial: Duration::MAX,
            max: Duration::MAX,
            max_attempts: 3,
        };
        assert_eq!(r.delay(1), Duration::MAX);
        assert_eq!(r.delay(2), Duration::MAX);
    }

    #[test]
    fn retry_delays_grow_and_are_capped() {
        let r = Retry {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            max_attempts: 10,
        };
        for _ in 0..100 {
            let d1 = r.delay(1);
            assert!(
                d1 >= Duration::from_millis(50) && d1 < Duration::from_millis(150),
                "{d1:?}"
            );
            let d3 = r.delay(3);
            assert!(
                d3 >= Duration::from_millis(200) && d3 < Duration::from_millis(600),
                "{d3:?}"
            );
            let d30 = r.delay(30);
            assert!(
                d30 >= Duration::from_millis(500) && d30 < Duration::from_millis(1500),
                "{d30:?}"
            );
        }
    }
}
