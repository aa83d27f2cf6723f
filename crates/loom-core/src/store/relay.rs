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
