//! Rebuilding an actor's state from its journal, and compacting the journal.
//!
//! An actor's state is JSON, and the journal records every change to it as an RFC 6902 patch;
//! the first change after the default state replaces the whole document. So the state at any seq
//! can be rebuilt from the newest readable snapshot plus the `StatePatched` entries after it,
//! without the actor's code: that is what recovery does, and what lets `loom journal compact`
//! snapshot an actor the tool knows nothing about.
//!
//! Invariants kept here:
//! - a snapshot is taken only where no invocation is half-done (its seq ends an invocation), so
//!   the entries an unfinished invocation needs for replay are never trimmed;
//! - a trim never passes the oldest kept snapshot (the store refuses it anyway);
//! - an unreadable snapshot is skipped with a warning for an older one plus a longer replay.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::entry::{EntryKind, Seq, Snapshot, Step};
use crate::error::StoreError;
use crate::id::{ActorId, MessageId};
use crate::store::{Lease, SeqRange, Store};

/// How many completed message ids an actor remembers to recognize a redelivery.
pub(crate) const RECENT: usize = 128;

/// How many sends of dead-lettered messages an actor remembers (see [`GivenUp`]): with actor
/// ids of up to a few hundred bytes, well under the snapshot size limit.
pub(crate) const GIVEN_UP: usize = 16_384;

/// The recipients of a dead-lettered run's sends, per step.
type SentAt = BTreeMap<Step, BTreeSet<ActorId>>;

/// What the actor's dead-lettered invocations sent, per message origin id
/// (`Envelope::origin`): the recipients of each step at which a run of that message sent a
/// message or spawned a child. Oldest first; kept in snapshots.
///
/// A message requeued from the dead letters runs again from its first step, and what it sends
/// derives its id from the origin and the step, as the failed run's did. The receivers got the
/// failed run's sends then, and their own look for a repeated id (`recent`) remembers only
/// their last [`RECENT`] messages: so the requeued run journals a send to a recipient a
/// dead-lettered run sent to at the same step, but does not send it again
/// (`Context::queue`). That is exactly what the receiver's look would drop if it remembered
/// every id: a send to another recipient, or at another step, has another id or another
/// receiver, and goes.
///
/// Invariants: an origin is noted only when an invocation of it ends `Failed { dead_lettered:
/// true }`, and the sends of all such runs add up (a third run skips what the first sent even
/// if the second stopped sooner or sent elsewhere); it is forgotten when one ends otherwise
/// (nothing runs it again). Replay and the cell keep it by the same rule, through
/// [`Unfinished::close`]. Past [`GIVEN_UP`] sends in all, the oldest origins are forgotten.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct GivenUp(VecDeque<(MessageId, SentAt)>);

impl GivenUp {
    /// The recipients of each step at which dead-lettered runs of `origin`'s message sent
    /// something; empty for a message that was never requeued.
    pub(crate) fn sent_by(&self, origin: MessageId, requeued: bool) -> SentAt {
        if !requeued {
            return SentAt::new();
        }
        self.0
            .iter()
            .find(|(o, _)| *o == origin)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }

    /// Notes what a dead-lettered run of `origin`'s message sent; returns the origins it
    /// forgot to stay within [`GIVEN_UP`].
    fn note(
        &mut self,
        origin: MessageId,
        steps: &BTreeMap<Step, Vec<EntryKind>>,
    ) -> Vec<MessageId> {
        let mut sent = self.forget(origin).unwrap_or_default();
        for (step, kinds) in steps {
            for kind in kinds {
                let to = match kind {
                    EntryKind::MessageSent { to, .. } => to,
                    EntryKind::ChildSpawned { child, .. } => child,
                    _ => continue,
                };
                sent.entry(*step).or_default().insert(to.clone());
            }
        }
        if sent.is_empty() {
            return Vec::new();
        }
        self.0.push_back((origin, sent));
        let mut forgot = Vec::new();
        while self.0.len() > 1 && self.sends() > GIVEN_UP {
            if let Some((old, _)) = self.0.pop_front() {
                forgot.push(old);
            }
        }
        forgot
    }

    fn sends(&self) -> usize {
        self.0
            .iter()
            .flat_map(|(_, sent)| sent.values())
            .map(BTreeSet::len)
            .sum()
    }

    pub(crate) fn forget(&mut self, origin: MessageId) -> Option<SentAt> {
        let at = self.0.iter().position(|(o, _)| *o == origin)?;
        self.0.remove(at).map(|(_, sent)| sent)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The format of the runtime's snapshot body.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// The format of a snapshot body whose state is at a schema version other than 1 (the body
/// says which): a format of its own, so that code from before versions refuses it instead of
/// reading the state as version 1.
pub const SNAPSHOT_FORMAT_VERSIONED: u32 = 2;

/// What the runtime puts in a snapshot: the actor's state, the version of its schema, and the
/// ids of its last messages.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Body {
    pub(crate) state: Value,
    /// `Actor::STATE_VERSION` of the code that wrote `state` (1 in snapshots from before
    /// versions were kept).
    #[serde(default = "first_version", skip_serializing_if = "is_first_version")]
    pub(crate) version: u32,
    pub(crate) recent: Vec<MessageId>,
    /// See [`GivenUp`]; absent in snapshots from before it was kept.
    #[serde(default, skip_serializing_if = "GivenUp::is_empty")]
    pub(crate) given_up: GivenUp,
    /// See [`Replayed::last_change`], at or below the snapshot's seq; absent in snapshots from
    /// before it was kept, which then stand for a change at their own seq (the most a
    /// retirement for `Context::finish` can then assume: the actor is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) last_change: Option<Seq>,
}

fn first_version() -> u32 {
    1
}

fn is_first_version(v: &u32) -> bool {
    *v == 1
}

/// An invocation the journal started but did not finish.
#[derive(Debug)]
pub(crate) struct Unfinished {
    pub(crate) message_id: MessageId,
    /// The id its message was first sent with (`Envelope::origin`).
    pub(crate) origin: MessageId,
    pub(crate) steps: BTreeMap<Step, Vec<EntryKind>>,
}

impl Unfinished {
    /// Ends the invocation in what the actor remembers: its message id among the applied
    /// (`recent`), and what it sent in `given_up` if its message was dead-lettered (else its
    /// origin is forgotten there: nothing runs it again).
    pub(crate) fn close(
        self,
        actor: &ActorId,
        dead_lettered: bool,
        recent: &mut VecDeque<MessageId>,
        given_up: &mut GivenUp,
    ) {
        if dead_lettered {
            // Said again at each recovery while this run is in the journal's tail.
            for old in given_up.note(self.origin, &self.steps) {
                tracing::warn!(%actor, origin = %old, "more than {GIVEN_UP} sends of dead-lettered messages remembered: the oldest message's are forgotten, and if it is requeued what it sent is sent again");
            }
        } else {
            given_up.forget(self.origin);
        }
        remember(recent, self.message_id);
    }

    /// True if the invocation stopped in a durable wait (a sleep, a wait for an event, an
    /// activity's backoff before its next attempt, none of them ended): a restart during the
    /// wait is not a failed attempt.
    pub(crate) fn waiting(&self) -> bool {
        let last = self.steps.values().next_back().map(Vec::as_slice);
        matches!(
            last,
            Some([EntryKind::TimerStarted { .. }] | [EntryKind::EventAwaited { .. }])
        ) || matches!(
            last.and_then(<[EntryKind]>::last),
            Some(EntryKind::ActivityAttemptFailed { .. })
        )
    }

    /// The delivery from which deliveries count against the message: the latest that saw a
    /// durable wait of this invocation end after a restart (`resumed_in`), or 0. Those before
    /// it only waited.
    pub(crate) fn counted_from(&self) -> u32 {
        self.steps
            .values()
            .flatten()
            .filter_map(|k| match k {
                EntryKind::TimerFired { resumed_in, .. }
                | EntryKind::EventReceived { resumed_in, .. }
                | EntryKind::ActivityRetried { resumed_in, .. }
                | EntryKind::WaitCancelled { resumed_in, .. } => *resumed_in,
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
}

/// Why an actor could not be recovered.
#[derive(Debug)]
pub(crate) enum RecoverError {
    /// The store failed; try again later.
    Store(StoreError),
    /// The journal cannot produce a state (every snapshot unreadable after a trim, a patch that
    /// does not apply, a state that does not decode): the actor is parked with the reason.
    Unrecoverable(String),
    /// Newer code wrote the actor's state: this node leaves it to a node running that code
    /// (not parked, so a rolling upgrade or a rollback does not stop it for good).
    Declined(String),
}

/// The result of [`replay`].
pub(crate) struct Replayed {
    pub(crate) value: Value,
    /// The version of the state's schema `value` is at (meaningless while `from_default`).
    pub(crate) version: u32,
    pub(crate) from_default: bool,
    pub(crate) recent: VecDeque<MessageId>,
    pub(crate) given_up: GivenUp,
    pub(crate) unfinished: Option<Unfinished>,
    pub(crate) next_seq: Seq,
    /// The seq of the last change of state a handler made (a patch, or a first state journaled
    /// whole as an upgrade from version 0; when none follows the snapshot, the one its body
    /// records, or its own seq for a body from before it was kept; 0 for none): a retirement for `Context::finish` keeps the actor only if its state changed
    /// after it finished. Upgrades are not changes.
    pub(crate) last_change: Seq,
    /// The last seq at which no invocation was half-done.
    pub(crate) settled: Seq,
    pub(crate) replayed: u64,
    pub(crate) bytes: u64,
    pub(crate) corrupt_snapshots: u64,
    /// The seq of the snapshot it started from, if any.
    pub(crate) snapshot: Option<Seq>,
}

/// How many times [`replay`] starts over when the journal is trimmed under it.
const REPLAY_TRIES: u32 = 8;

/// Rebuilds the actor's JSON state: newest readable snapshot, then the journal after it,
/// streamed (memory holds one page of entries and the current invocation's steps, never the
/// history). `initial` is the state when there is no snapshot.
///
/// The journal is read [strictly](SeqRange::strict) from just after the state it starts from:
/// a compaction elsewhere (an older incarnation, a node that lost the lease, `loom journal
/// compact`) may trim between the look at the snapshots and the read, and then the read fails
/// instead of starting later, and replay starts over from the newer snapshot (rule D9).
pub(crate) async fn replay(
    store: &dyn Store,
    id: &ActorId,
    initial: Value,
) -> Result<Replayed, RecoverError> {
    let mut tries = 0;
    loop {
        match replay_once(store, id, initial.clone(), Seq::MAX).await {
            Err(RecoverError::Store(e @ StoreError::Gap { .. })) if tries + 1 < REPLAY_TRIES => {
                tries += 1;
                tracing::debug!(actor = %id, error = %e, "the journal was trimmed while it was replayed; starting over");
            }
            other => return other,
        }
    }
}

/// [`replay`] once, of the entries through `upto` only (`Seq::MAX` for all): the state as it
/// was at `upto`.
async fn replay_once(
    store: &dyn Store,
    id: &ActorId,
    initial: Value,
    upto: Seq,
) -> Result<Replayed, RecoverError> {
    let info = store.info(id).await.map_err(RecoverError::Store)?;
    let mut base = None;
    let mut corrupt_snapshots = 0;
    for &seq in info.snapshots.iter().rev().filter(|&&s| s <= upto) {
        match store.load_snapshot(id, seq).await {
            // The newest at or below `seq`: older than `seq` when `seq` is gone since.
            Ok(Some(s)) if s.seq == seq => {
                base = Some(s);
                break;
            }
            // Listed, then gone: a compaction elsewhere replaced it. Start over from what it
            // left (as for a trim under the read, below).
            Ok(_) => {
                return Err(RecoverError::Store(StoreError::Gap {
                    actor: id.clone(),
                    expected: seq,
                    found: 0,
                }));
            }
            Err(e @ StoreError::Corrupt { .. }) => {
                corrupt_snapshots += 1;
                tracing::warn!(actor = %id, seq, error = %e, "snapshot is unreadable; falling back to an older snapshot plus replay");
            }
            Err(e) => return Err(RecoverError::Store(e)),
        }
    }
    let snapshot = base.as_ref().map(|s| s.seq);
    let (from, mut value, mut version, recent, given_up, from_default, last_change) = match base {
        // Every listed snapshot is at or above the trim point (rule D10), so a readable one
        // below it means the store trimmed past its oldest kept snapshot and the newer ones
        // are unreadable: the entries between are gone, and starting over would only find the
        // same gap again (found by the simulator, `loom-sim --bug trim-past-oldest-snapshot`:
        // the actor was activated again and again, forever).
        Some(s) if s.seq < info.trimmed_through => {
            return Err(RecoverError::Unrecoverable(format!(
                "entries {}..={} of {id} were trimmed, but its newest readable snapshot is at {} \
                 (the newer ones are unreadable): the store trimmed past its oldest kept snapshot",
                s.seq + 1,
                info.trimmed_through,
                s.seq
            )));
        }
        Some(s) => {
            if s.format != SNAPSHOT_FORMAT && s.format != SNAPSHOT_FORMAT_VERSIONED {
                return Err(RecoverError::Unrecoverable(format!(
                    "snapshot {} has format {}; this runtime reads formats {SNAPSHOT_FORMAT} \
                     and {SNAPSHOT_FORMAT_VERSIONED}",
                    s.seq, s.format
                )));
            }
            let body: Body = serde_json::from_value(s.state).map_err(|e| {
                RecoverError::Unrecoverable(format!("snapshot {} body does not decode: {e}", s.seq))
            })?;
            (
                s.seq + 1,
                body.state,
                body.version,
                body.recent,
                body.given_up,
                false,
                body.last_change.unwrap_or(s.seq).min(s.seq),
            )
        }
        None if !info.snapshots.is_empty() && info.trimmed_through > 0 => {
            return Err(RecoverError::Unrecoverable(format!(
                "no snapshot of {id} is readable and entries through {} were trimmed",
                info.trimmed_through
            )));
        }
        None => (
            info.trimmed_through + 1,
            initial,
            1,
            Vec::new(),
            GivenUp::default(),
            true,
            0,
        ),
    };
    let mut out = Replayed {
        value: Value::Null,
        version: 1,
        from_default,
        recent: recent.into(),
        given_up,
        unfinished: None,
        next_seq: from,
        last_change,
        settled: from - 1,
        replayed: 0,
        bytes: 0,
        corrupt_snapshots,
        snapshot,
    };
    let mut entries = store.read(id, SeqRange::all().from(from).to(upto).strict());
    while let Some(entry) = entries.try_next().await.map_err(|e| match e {
        e @ StoreError::Corrupt { .. } => RecoverError::Unrecoverable(e.to_string()),
        other => RecoverError::Store(other),
    })? {
        out.next_seq = entry.seq + 1;
        out.replayed += 1;
        out.bytes += super::weight(&entry.kind);
        match entry.kind {
            EntryKind::Invoked {
                message_id,
                requeued_from,
                ..
            } => {
                out.unfinished = Some(Unfinished {
                    message_id,
                    origin: requeued_from.unwrap_or(message_id),
                    steps: BTreeMap::new(),
                });
            }
            EntryKind::StatePatched { patch } => {
                json_patch::patch(&mut value, &patch).map_err(|e| {
                    RecoverError::Unrecoverable(format!(
                        "state patch at seq {} does not apply: {e}",
                        entry.seq
                    ))
                })?;
                out.from_default = false;
                out.last_change = entry.seq;
            }
            // Whole, so applying it again is harmless. An upgrade journaled at activation may
            // sit inside an unfinished invocation, past `settled`: a snapshot taken at
            // `settled` then holds the upgraded state (the invocation changes no state until
            // it ends), and the replay from it meets the same whole state again. One from
            // version 0 is no upgrade but a handler's first state, journaled whole with its
            // version (`Cell::process_inner`): a change, as it was counted when it was made.
            EntryKind::StateUpgraded { from, to, state } => {
                value = state;
                version = to;
                out.from_default = false;
                if from == 0 {
                    out.last_change = entry.seq;
                }
            }
            EntryKind::Completed { .. } | EntryKind::Failed { .. } => {
                let dead_lettered = matches!(
                    entry.kind,
                    EntryKind::Failed {
                        dead_lettered: true,
                        ..
                    }
                );
                if let Some(u) = out.unfinished.take() {
                    u.close(id, dead_lettered, &mut out.recent, &mut out.given_up);
                }
                out.settled = entry.seq;
            }
            kind => match (&mut out.unfinished, step_of(&kind)) {
                (Some(u), Some(step)) => u.steps.entry(step).or_default().push(kind),
                _ => {
                    return Err(RecoverError::Unrecoverable(format!(
                        "entry {} ({}) is outside any invocation",
                        entry.seq,
                        kind.name()
                    )));
                }
            },
        }
    }
    // Entries appended since the read began are above it: the store's highest seq is the
    // authority for the next append.
    out.next_seq = out.next_seq.max(info.highest + 1);
    if out.unfinished.is_none() {
        out.settled = out.next_seq - 1;
    }
    out.value = value;
    out.version = version;
    Ok(out)
}

/// The patch that takes the state from `old` to `new`: a whole-document replace when `old` is
/// the code's default (so the journal does not depend on it), a diff otherwise; `None` if equal.
pub(crate) fn state_patch(
    old: &Value,
    new: &Value,
    from_default: bool,
) -> Option<json_patch::Patch> {
    if old == new {
        return None;
    }
    if from_default {
        // `replace` at the root works on any document, so replay can start from nothing.
        return serde_json::from_value(json!([{ "op": "replace", "path": "", "value": new }])).ok();
    }
    Some(json_patch::diff(old, new))
}

/// Saves a snapshot at `seq` and trims through the oldest kept snapshot, in one write
/// ([`JournalStore::compact`](crate::JournalStore::compact)), fenced by the lease the actor runs
/// under (its partition's) when the runtime compacts (rule D8). Entries appended meanwhile are above `seq`, so the trim never
/// touches them. Returns the new trim point.
pub(crate) async fn snapshot_and_trim(
    store: &dyn Store,
    id: &ActorId,
    seq: Seq,
    body: &Body,
    keep: usize,
    fence: Option<&Lease>,
) -> Result<Seq, StoreError> {
    let state = serde_json::to_value(body)
        .map_err(|e| StoreError::InvalidRequest(format!("snapshot body does not encode: {e}")))?;
    let snapshot = Snapshot {
        seq,
        state,
        at: crate::Timestamp::now(),
        format: if body.version == 1 {
            SNAPSHOT_FORMAT
        } else {
            SNAPSHOT_FORMAT_VERSIONED
        },
    };
    store.compact(id, &snapshot, keep, fence).await
}

/// What [`compact_journal`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// The seq of the snapshot it saved.
    pub snapshot: Seq,
    /// The journal's trim point afterwards.
    pub trimmed_through: Seq,
}

/// An actor's state as it was at one seq of its journal: see [`state_at`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateAt {
    /// The seq the state is at.
    pub seq: Seq,
    /// The state, as JSON (`null` before the first change).
    pub state: Value,
    /// The version of the state's schema (`Actor::STATE_VERSION` of the code that wrote it).
    pub version: u32,
    /// The snapshot it was rebuilt from, if any (else the journal's start).
    pub snapshot: Option<Seq>,
    /// Entries read after it.
    pub replayed: u64,
}

/// Why [`state_at`] has no state to show.
#[derive(Debug, thiserror::Error)]
pub enum StateAtError {
    /// The store failed or refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The actor has no journal.
    #[error("{0} has no journal")]
    NoJournal(ActorId),
    /// The actor's journal and snapshots were deleted (it was retired, or `loom journal
    /// delete`d): only its highest seq is kept.
    #[error(
        "the journal of {actor} was deleted through {highest} (retired, or deleted by an operator): no state is kept"
    )]
    Deleted {
        /// The actor.
        actor: ActorId,
        /// The highest seq it had.
        highest: Seq,
    },
    /// The seq is past the journal's end.
    #[error("{actor} has no entry {seq}: its journal ends at {highest}")]
    Beyond {
        /// The actor.
        actor: ActorId,
        /// The seq asked for.
        seq: Seq,
        /// Its highest seq.
        highest: Seq,
    },
    /// The entries up to the seq were trimmed, and no kept snapshot is at or below it.
    #[error(
        "the state of {actor} at {seq} is no longer kept: entries through {trimmed_through} were \
         trimmed; the earliest state kept is at {earliest}"
    )]
    Trimmed {
        /// The actor.
        actor: ActorId,
        /// The seq asked for.
        seq: Seq,
        /// The journal's trim point.
        trimmed_through: Seq,
        /// The earliest seq whose state can be shown (the oldest kept snapshot).
        earliest: Seq,
    },
    /// The journal cannot be replayed (see the reason).
    #[error("journal of {actor} cannot be replayed: {reason}")]
    Unrecoverable {
        /// The actor.
        actor: ActorId,
        /// Why.
        reason: String,
    },
}

/// The state `id` had at `seq` (time travel), without its code: the newest readable snapshot at
/// or below `seq`, then the journal's patches after it through `seq`. Read only. The state at a
/// seq inside an invocation is the state before that invocation's end (a handler's changes are
/// journaled when its invocation completes).
///
/// ```
/// use loom_core::runtime::{Actor, Context, Rejected, Runtime, state_at};
///
/// struct Counter;
/// impl Actor for Counter {
///     const KIND: &'static str = "counter";
///     type State = u64;
///     type Message = u64;
///     type Reply = u64;
///     async fn handle(&self, n: &mut u64, _: &mut Context<'_>, add: u64) -> Result<u64, Rejected> {
///         *n += add;
///         Ok(*n)
///     }
/// }
///
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let rt = Runtime::builder().memory().register_actor(Counter).start().await?;
/// let c = rt.actor::<Counter>("c")?;
/// c.ask(2).await?;
/// let after_first = rt.store().info(c.id()).await?.highest;
/// c.ask(3).await?;
/// let highest = rt.store().info(c.id()).await?.highest;
/// assert_eq!(state_at(&**rt.store(), c.id(), highest).await?.state, 5);
/// assert_eq!(state_at(&**rt.store(), c.id(), after_first).await?.state, 2);
/// assert!(state_at(&**rt.store(), c.id(), highest + 1).await.is_err());
/// # rt.shutdown().await;
/// # Ok(()) }
/// ```
pub async fn state_at(store: &dyn Store, id: &ActorId, seq: Seq) -> Result<StateAt, StateAtError> {
    let mut tries = 0;
    let r = loop {
        // Looked at on every try: a compaction may trim past `seq` while it is read.
        let info = store.info(id).await?;
        if info.highest == 0 {
            return Err(StateAtError::NoJournal(id.clone()));
        }
        if info.snapshots.is_empty() && info.trimmed_through == info.highest {
            // Trimmed through its end with no snapshot: only a deletion leaves that (a trim
            // never passes the oldest kept snapshot).
            return Err(StateAtError::Deleted {
                actor: id.clone(),
                highest: info.highest,
            });
        }
        if seq > info.highest {
            return Err(StateAtError::Beyond {
                actor: id.clone(),
                seq,
                highest: info.highest,
            });
        }
        let earliest = info
            .snapshots
            .first()
            .copied()
            .unwrap_or(info.trimmed_through);
        if info.trimmed_through > 0 && seq < earliest {
            return Err(StateAtError::Trimmed {
                actor: id.clone(),
                seq,
                trimmed_through: info.trimmed_through,
                earliest,
            });
        }
        match replay_once(store, id, Value::Null, seq).await {
            Err(RecoverError::Store(StoreError::Gap { .. })) if tries + 1 < REPLAY_TRIES => {
                tries += 1;
            }
            Err(RecoverError::Store(e)) => return Err(e.into()),
            Err(RecoverError::Unrecoverable(reason) | RecoverError::Declined(reason)) => {
                return Err(StateAtError::Unrecoverable {
                    actor: id.clone(),
                    reason,
                });
            }
            Ok(r) => break r,
        }
    };
    Ok(StateAt {
        seq,
        state: r.value,
        version: r.version,
        snapshot: r.snapshot,
        replayed: r.replayed,
    })
}

/// Why [`compact_journal`] did not compact.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    /// The store failed or refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The journal cannot be replayed (see the reason).
    #[error("journal of {actor} cannot be replayed: {reason}")]
    Unrecoverable {
        /// The actor.
        actor: ActorId,
        /// Why.
        reason: String,
    },
    /// Nothing to snapshot: the journal has no state change since its last snapshot or start.
    #[error("nothing to compact for {0}: no state to snapshot beyond what is already kept")]
    Nothing(ActorId),
}

/// Compacts one actor's journal without its code: rebuilds its state from the newest readable
/// snapshot and the journal's patches, saves a snapshot at the last seq where no invocation was
/// half-done, keeps the newest `keep` snapshots (and one more for each newer snapshot that was
/// unreadable), and trims what the oldest kept one covers.
///
/// Safe to run while the actor runs elsewhere: the snapshot is of entries already durable, the
/// trim never passes it, and a runtime recovering the actor meanwhile notices the trim and
/// starts over from the new snapshot (recovery's strict read, rule D9 of RELIABILITY.md).
pub async fn compact_journal(
    store: &dyn Store,
    id: &ActorId,
    keep: usize,
) -> Result<Compacted, CompactError> {
    let r = replay(store, id, Value::Null).await.map_err(|e| match e {
        RecoverError::Store(e) => CompactError::Store(e),
        RecoverError::Unrecoverable(reason) | RecoverError::Declined(reason) => {
            CompactError::Unrecoverable {
                actor: id.clone(),
                reason,
            }
        }
    })?;
    let info = store.info(id).await?;
    let already = info.snapshots.last().copied().unwrap_or(0);
    if r.from_default || r.settled <= already || r.settled == 0 {
        return Err(CompactError::Nothing(id.clone()));
    }
    let body = Body {
        state: r.value,
        version: r.version,
        recent: r.recent.into_iter().collect(),
        given_up: r.given_up,
        last_change: Some(r.last_change.min(r.settled)),
    };
    // Unreadable snapshots newer than the one it started from do not count toward `keep`.
    let keep = keep.saturating_add(usize::try_from(r.corrupt_snapshots).unwrap_or(usize::MAX));
    let trimmed_through = snapshot_and_trim(store, id, r.settled, &body, keep, None).await?;
    Ok(Compacted {
        snapshot: r.settled,
        trimmed_through,
    })
}

pub(crate) fn remember(recent: &mut VecDeque<MessageId>, id: MessageId) {
    if recent.len() >= RECENT {
        recent.pop_front();
    }
    recent.push_back(id);
}

fn step_of(kind: &EntryKind) -> Option<Step> {
    match kind {
        EntryKind::ActivityStarted { step, .. }
        | EntryKind::ActivityCompleted { step, .. }
        | EntryKind::ActivityFailed { step, .. }
        | EntryKind::ActivityAttemptFailed { step, .. }
        | EntryKind::ActivityRetried { step, .. }
        | EntryKind::MessageSent { step, .. }
        | EntryKind::ChildSpawned { step, .. }
        | EntryKind::TimerStarted { step, .. }
        | EntryKind::TimerFired { step, .. }
        | EntryKind::EventAwaited { step, .. }
        | EntryKind::EventReceived { step, .. }
        | EntryKind::WaitCancelled { step, .. }
        | EntryKind::Recorded { step, .. } => Some(*step),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(step: Step, to: &ActorId) -> BTreeMap<Step, Vec<EntryKind>> {
        BTreeMap::from([(
            step,
            vec![EntryKind::MessageSent {
                step,
                to: to.clone(),
                message_id: MessageId::new(),
            }],
        )])
    }

    #[test]
    fn given_up_adds_up_runs_forgets_ended_ones_and_keeps_the_newest() {
        let (bob, ann) = (
            ActorId::new("acct", "bob").unwrap(),
            ActorId::new("acct", "ann").unwrap(),
        );
        let mut g = GivenUp::default();
        let o = MessageId::new();
        assert!(g.note(o, &sent(1, &bob)).is_empty());
        // A second dead-lettered run that stopped sooner keeps what the first sent, and one
        // that sent elsewhere at the same step adds to it.
        g.note(o, &BTreeMap::new());
        g.note(o, &sent(1, &ann));
        g.note(o, &sent(3, &ann));
        assert_eq!(
            g.sent_by(o, true),
            BTreeMap::from([
                (1, BTreeSet::from([bob.clone(), ann.clone()])),
                (3, BTreeSet::from([ann.clone()]))
            ])
        );
        // Asked only for a requeued message.
        assert!(g.sent_by(o, false).is_empty());
        // A run that sent nothing is not kept.
        let quiet = MessageId::new();
        g.note(quiet, &BTreeMap::new());
        assert!(g.sent_by(quiet, true).is_empty());
        // Ended otherwise: forgotten.
        g.forget(o);
        assert!(g.is_empty());

        // Past the bound the oldest goes, and noting one again makes it the newest.
        let origins: Vec<MessageId> = (0..GIVEN_UP).map(|_| MessageId::new()).collect();
        for &o in &origins {
            g.note(o, &sent(1, &bob));
        }
        assert_eq!(g.note(origins[0], &sent(2, &bob)), vec![origins[1]]);
        assert_eq!(g.note(MessageId::new(), &sent(1, &bob)), vec![origins[2]]);
        assert_eq!(g.sends(), GIVEN_UP);
        assert!(
            g.sent_by(origins[1], true).is_empty(),
            "the oldest was kept"
        );
        assert_eq!(g.sent_by(origins[0], true).len(), 2);
        // Kept in snapshots as it is.
        let back: GivenUp = serde_json::from_value(serde_json::to_value(&g).unwrap()).unwrap();
        assert_eq!(back, g);
    }

    #[test]
    fn a_snapshot_body_without_given_up_reads_as_none() {
        let body: Body = serde_json::from_value(json!({"state": {"n": 1}, "recent": []})).unwrap();
        assert!(body.given_up.is_empty());
        assert!(
            !serde_json::to_string(&body).unwrap().contains("given_up"),
            "an empty record is written"
        );
    }
}
