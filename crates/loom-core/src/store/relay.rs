//! The outbox relay's invariants (rule D18 of RELIABILITY.md), checked alike on every
//! partitioned store (`loom journal verify`, the simulator's and the stores' tests). Each backend
//! moves its outboxes itself (`embedded/relay.rs`, `loom-redis/src/relay.rs`, the simulator's
//! `store/relay.rs`) and reports what they hold as [`OutboxState`]s.

/// Checks the relay's invariants over every partition's state (`states[p]` is partition p's);
/// returns what is wrong, one sentence each (`loom journal verify` prints them).
pub fn check_outboxes(states: &[OutboxState]) -> Vec<String> {
    let mut wrong = Vec::new();
    let n = states.len() as u32;
    for s in states {
        let p = s.partition;
        if s.misaddressed > 0 {
            wrong.push(format!(
                "partition {p}: {} outbox messages are addressed to its own actors",
                s.misaddressed
            ));
        }
        if s.misplaced > 0 {
            wrong.push(format!(
                "partition {p}: {} journals or mailboxes belong to actors of other partitions",
                s.misplaced
            ));
        }
        if let Some(first) = s.first_pending
            && s.gapless
            && (first == 0 || first + s.pending - 1 != s.outbox_seq)
        {
            wrong.push(format!(
                "partition {p}: its outbox holds {} messages from seq {first}, but its last seq is {}: a gap",
                s.pending, s.outbox_seq
            ));
        }
        for &(source, mark) in &s.high_water {
            match states.get(source as usize) {
                _ if source >= n || source == p => wrong.push(format!(
                    "partition {p}: a high-water mark for partition {source}, which cannot send to it"
                )),
                Some(src) if mark > src.outbox_seq => wrong.push(format!(
                    "partition {p}: its mark for partition {source} is {mark}, past that partition's last outbox seq {}",
                    src.outbox_seq
                )),
                _ => {}
            }
        }
    }
    wrong
}

/// What a partition's outbox and marks hold (for `loom journal verify` and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxState {
    /// The partition.
    pub partition: u32,
    /// The last outbox seq it gave.
    pub outbox_seq: u64,
    /// Messages still in its outbox (not yet trimmed).
    pub pending: u64,
    /// The first seq still in its outbox, if any.
    pub first_pending: Option<u64>,
    /// Its high-water mark for each source partition that sent it something: `(source, seq)`.
    pub high_water: Vec<(u32, u64)>,
    /// Outbox messages addressed to an actor of this same partition, or whose recipient does
    /// not parse: damage (a turn enqueues those directly).
    pub misaddressed: u64,
    /// Journals and mailboxes kept in this partition whose actor belongs to another (or does
    /// not parse): damage, or files of another store.
    pub misplaced: u64,
    /// Whether the partition numbers its outbox without gaps, so that what it holds must be a
    /// run ending at `outbox_seq` (embedded, Redis, the simulator: their relays' marks rely on
    /// it). PostgreSQL's partitions draw their seqs from one sequence, with gaps, and need no
    /// marks (a move deletes what it enqueues in one transaction): `outbox_seq` is then that
    /// sequence's last value.
    pub gapless: bool,
}

/// A relay whose moves fail ([`Store::relay_failure`](crate::Store::relay_failure)): the
/// messages its partitions' turns sent to other partitions wait in their outboxes (nothing is
/// lost, rule D18) until a move succeeds. Shown by
/// [`Runtime::health`](crate::runtime::Runtime::health) (rule D16).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RelayFailure {
    /// When its moves began to fail.
    pub since: crate::time::Timestamp,
    /// The failure that began it.
    pub error: String,
    /// The latest failure.
    pub latest: String,
    /// How many moves (or looks at which outboxes hold messages, or reads of one outbox in
    /// such a look) failed since `since`.
    pub failures: u64,
    /// The partitions whose outboxes its latest moves could not move, or (Redis) whose
    /// outboxes a look could not read, in order; empty when what failed was the whole look.
    pub partitions: Vec<u32>,
}

/// What a backend's relay met, for [`Store::relay_failure`](crate::Store::relay_failure):
/// each backend's relay notes its failed and successful moves here, one place for all.
/// Failing from the first failure until every partition that failed (and the look at which
/// outboxes hold messages, if that failed) has moved again.
///
/// ```
/// use loom_core::store::backend::RelayStatus;
///
/// let status = RelayStatus::default();
/// assert!(status.failure().is_none());
/// status.failed(Some(3), "connection refused");
/// status.failed(Some(5), "connection reset");
/// let f = status.failure().expect("failing");
/// assert_eq!((f.error.as_str(), f.latest.as_str(), f.failures), ("connection refused", "connection reset", 2));
/// assert_eq!(f.partitions, [3, 5]);
/// status.moved(3);
/// assert_eq!(status.failure().expect("5 still fails").partitions, [5]);
/// status.looked(|p| p == 5);
/// assert_eq!(status.failure().expect("5 still holds messages").partitions, [5]);
/// status.looked(|_| false);
/// assert!(status.failure().is_none());
/// ```
#[derive(Debug, Default)]
pub struct RelayStatus {
    failing: std::sync::Mutex<Option<Failing>>,
}

#[derive(Debug)]
struct Failing {
    failure: RelayFailure,
    /// Whether the look at which outboxes hold messages failed last time.
    look: bool,
}

impl RelayStatus {
    /// A move of `partition`'s outbox failed with `error` (`None`: the look at which outboxes
    /// hold messages failed). Logged when the relay begins to fail.
    pub fn failed(&self, partition: Option<u32>, error: impl std::fmt::Display) {
        let error = error.to_string();
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        let f = failing.get_or_insert_with(|| {
            tracing::error!(partition, %error, "the relay cannot move messages between partitions; they wait in their outboxes, it tries again, and `Runtime::health` shows it");
            Failing {
                failure: RelayFailure {
                    since: crate::time::Timestamp::now(),
                    error: error.clone(),
                    latest: error.clone(),
                    failures: 0,
                    partitions: Vec::new(),
                },
                look: false,
            }
        });
        f.failure.latest = error;
        f.failure.failures += 1;
        match partition {
            Some(p) => {
                if let Err(at) = f.failure.partitions.binary_search(&p) {
                    f.failure.partitions.insert(at, p);
                }
            }
            None => f.look = true,
        }
    }

    /// The look at which outboxes hold messages succeeded, and `waiting(p)` says whether
    /// partition `p`'s outbox holds any: one that holds none has nothing left to move, so what
    /// failed there before (moved since, by this relay or another process's) is over.
    pub fn looked(&self, waiting: impl Fn(u32) -> bool) {
        self.settle(|f| {
            f.look = false;
            f.failure.partitions.retain(|p| waiting(*p));
        });
    }

    /// A move of `partition`'s outbox succeeded (or found nothing to move).
    pub fn moved(&self, partition: u32) {
        self.settle(|f| f.failure.partitions.retain(|p| *p != partition));
    }

    fn settle(&self, change: impl FnOnce(&mut Failing)) {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = failing.as_mut() {
            change(f);
            if !f.look && f.failure.partitions.is_empty() {
                tracing::info!(
                    failures = f.failure.failures,
                    "the relay moves messages again"
                );
                *failing = None;
            }
        }
    }

    /// Since when and why the relay fails, if it does.
    pub fn failure(&self) -> Option<RelayFailure> {
        let failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        failing.as_ref().map(|f| f.failure.clone())
    }
}
