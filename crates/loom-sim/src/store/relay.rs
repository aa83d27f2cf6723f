//! Partitions, outboxes and the relay of a [`SimStore`] of several partitions (rule D18 of
//! RELIABILITY.md), as the embedded store has them (its `embedded/relay.rs`).
//!
//! An actor lives in partition [`partition_of`]`(actor, P)`. A turn writes only its actor's
//! partition `p`: a message it sends to an actor of `p` is enqueued by the turn itself; one to
//! an actor of partition `q != p` is appended, in the same write, to `p`'s outbox, numbered by
//! `p`'s outbox seq (`turn.rs`). Clients' [`enqueue`](loom_core::Mailbox::enqueue) and
//! [`enqueue_once`](loom_core::Store::enqueue_once) write the target's partition directly, as
//! in the embedded store. Partition `p`'s relay (a tokio task, [`start`]) then, pass after pass:
//!
//! 1. reads `p`'s outbox from the bottom in the **durable** data only: a row still only in the
//!    live data may vanish in a power loss together with the turn that sent it, and moving it
//!    early would deliver a message whose sending turn is lost;
//! 2. for each target partition `q`, in one write: enqueues each row whose seq is above `q`'s
//!    high-water mark for `p` and raises the mark to the last one, so that a move repeated
//!    after a failure or a power loss enqueues nothing twice;
//! 3. in a separate, later write, trims `p`'s outbox through what every target took.
//!
//! The relay's writes are requests like any other (latency, faults, sync, a trace line each:
//! `relay p->q n` for a move of `n` rows, `relay-trim p n` for a trim through seq `n`). A
//! failed pass is tried again after a short backoff; the relay keeps no cursor, so what a power loss
//! took back (a move, a trim) is simply found again in the outbox and moved again (the marks
//! skip what its target already has).
//!
//! The data is not physically cut in partitions here (the whole store is one `Data`): the
//! partitions are where the outboxes and marks are kept and what decides direct vs. relayed.
//!
//! Invariants (what [`loom_core::embedded::check_outboxes`] checks on
//! [`SimStore::outbox_states`]):
//! - `mark(q, p) <= last_seq(p)`, in the live and in the durable data: a move takes only
//!   durable rows, and the durable outbox's last seq never goes back (a power loss sets the
//!   live data back to the durable one, never below);
//! - the rows of an outbox are a gapless run of seqs ending at its `last_seq`, addressed to
//!   other partitions only: only a turn adds rows (numbered one by one from `last_seq`), only
//!   [`Outboxes::trim`] removes them, from the bottom;
//! - a row is trimmed only once the mark of its target for its source reaches its seq.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use loom_core::embedded::OutboxState;
use loom_core::partition::partition_of;
use loom_core::{ActorId, MessageId, StoreResult, Timestamp};
use tokio::sync::Notify;

use super::{Data, Frame, Inner, SimStore};

/// Outbox rows one pass of a relay moves at most.
pub const RELAY_BATCH: usize = 512;

/// How often a relay looks at its outbox when no turn woke it: rows left by a failed pass, by
/// a turn whose reply was lost, or found again after a power loss are moved at least this often
/// (tokio's clock: virtual when paused).
pub const RELAY_TICK: Duration = Duration::from_millis(10);

/// One message in an outbox, with everything the move needs to enqueue it.
#[derive(Debug, Clone)]
pub(super) struct Row {
    pub(super) to: ActorId,
    pub(super) id: MessageId,
    pub(super) frame: Frame,
    pub(super) deliver_at: Option<Timestamp>,
}

/// One partition's outbox. Invariant: `rows` is a gapless run of seqs ending at `last_seq`
/// (or empty); `last_seq` only grows (in the live data; the durable one's too).
#[derive(Debug, Clone, Default)]
struct Outbox {
    last_seq: u64,
    rows: BTreeMap<u64, Row>,
}

/// Every partition's outbox and every high-water mark. Part of the store's data (live and
/// durable), unlike the [`Oracle`].
#[derive(Debug, Clone, Default)]
pub(super) struct Outboxes {
    /// Source partition → its outbox (behind an `Arc`: a sync copies one pointer each).
    by_source: BTreeMap<u32, Arc<Outbox>>,
    /// `(target, source)` → the highest seq of `source`'s outbox that `target` enqueued.
    /// Invariant: at most `source`'s `last_seq`; only grows.
    marks: BTreeMap<(u32, u32), u64>,
}

impl Outboxes {
    /// In a turn of partition `source`: appends `rows` (messages to actors of other partitions)
    /// to its outbox, numbered on from its last seq.
    pub(super) fn push(&mut self, source: u32, rows: Vec<Row>) {
        if rows.is_empty() {
            return;
        }
        let outbox = Arc::make_mut(self.by_source.entry(source).or_default());
        for row in rows {
            outbox.last_seq += 1;
            outbox.rows.insert(outbox.last_seq, row);
        }
    }

    /// `target`'s high-water mark for `source` (0 before its first move).
    fn mark(&self, target: u32, source: u32) -> u64 {
        self.marks.get(&(target, source)).copied().unwrap_or(0)
    }

    /// Up to `limit` rows of `source`'s outbox, from the bottom, with their seqs.
    fn bottom(&self, source: u32, limit: usize) -> Vec<(u64, Row)> {
        self.by_source.get(&source).map_or_else(Vec::new, |o| {
            o.rows
                .iter()
                .take(limit)
                .map(|(seq, row)| (*seq, row.clone()))
                .collect()
        })
    }

    /// The rows of `moving` (all from `source`'s outbox, in seq order) that a move into
    /// `target` enqueues: those above the mark, or all of them with the deliberate bug.
    fn to_enqueue<'m>(
        &self,
        target: u32,
        source: u32,
        moving: &'m [(u64, Row)],
        accept_duplicates: bool,
    ) -> Vec<&'m (u64, Row)> {
        let mark = self.mark(target, source);
        moving
            .iter()
            .filter(|(seq, _)| accept_duplicates || *seq > mark)
            .collect()
    }

    /// How many of `source`'s outbox rows, from the bottom, [`trim`](Self::trim) removes
    /// through seq `through`: up to the first row its target has not taken (mark below its seq).
    fn trimmable(&self, partitions: u32, source: u32, through: u64) -> usize {
        self.by_source.get(&source).map_or(0, |outbox| {
            outbox
                .rows
                .range(..=through)
                .take_while(|(seq, row)| {
                    self.mark(partition_of(&row.to, partitions), source) >= **seq
                })
                .count()
        })
    }

    /// Removes `source`'s outbox rows through seq `through`, from the bottom, stopping at the
    /// first row its target has not taken: the rule that a row leaves the outbox only once its
    /// target has it is kept here, whatever the caller believes it moved. Returns how many rows
    /// it removed; changes nothing when that is none.
    fn trim(&mut self, partitions: u32, source: u32, through: u64) -> u64 {
        let removable = self.trimmable(partitions, source, through);
        if removable == 0 {
            return 0;
        }
        if let Some(outbox) = self.by_source.get_mut(&source) {
            let outbox = Arc::make_mut(outbox);
            for _ in 0..removable {
                outbox.rows.pop_first();
            }
        }
        removable as u64
    }

    /// What each partition's outbox and marks hold, for [`loom_core::embedded::check_outboxes`].
    fn states(&self, partitions: u32) -> Vec<OutboxState> {
        (0..partitions)
            .map(|p| {
                let outbox = self.by_source.get(&p);
                let (outbox_seq, pending, first_pending, misaddressed) =
                    outbox.map_or((0, 0, None, 0), |o| {
                        let misaddressed = o
                            .rows
                            .values()
                            .filter(|r| partition_of(&r.to, partitions) == p)
                            .count();
                        (
                            o.last_seq,
                            o.rows.len() as u64,
                            o.rows.keys().next().copied(),
                            misaddressed as u64,
                        )
                    });
                OutboxState {
                    partition: p,
                    outbox_seq,
                    pending,
                    first_pending,
                    high_water: self
                        .marks
                        .iter()
                        .filter(|((target, _), _)| *target == p)
                        .map(|((_, source), mark)| (*source, *mark))
                        .collect(),
                    misaddressed,
                    // One `Data` for the whole store: nothing can sit in a wrong partition.
                    misplaced: 0,
                    gapless: true,
                }
            })
            .collect()
    }
}

/// In a move of `source`'s rows `moving` into partition `target`: enqueues what
/// [`Outboxes::to_enqueue`] says and raises the mark to the last of them; returns the rows
/// enqueued. Changes nothing when that is none (a request whose `writes` said no).
fn deliver(
    d: &mut Data,
    target: u32,
    source: u32,
    moving: &[(u64, Row)],
    accept_duplicates: bool,
    now: Timestamp,
) -> Vec<(u64, Row)> {
    let enqueue: Vec<(u64, Row)> = d
        .relay
        .to_enqueue(target, source, moving, accept_duplicates)
        .into_iter()
        .cloned()
        .collect();
    let Some(top) = enqueue.iter().map(|(seq, _)| *seq).max() else {
        return enqueue;
    };
    for (_, row) in &enqueue {
        d.mailboxes
            .enqueue(&row.to, row.id, row.frame.clone(), row.deliver_at, now);
    }
    let mark = d.relay.marks.entry((target, source)).or_default();
    *mark = (*mark).max(top);
    enqueue
}

/// What the relays do, a test hook ([`SimStore::hold_relay`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayHold {
    /// They run (the default).
    #[default]
    Run,
    /// They move nothing: messages to other partitions wait in the outboxes.
    Stop,
    /// The next pass that moves something stops between its moves and its trim, as if the
    /// relay crashed there, and every relay then stays [`Stop`](Self::Stop)ped.
    StopAfterMove,
}

/// The audit of rule D18: which outbox rows the relay has enqueued, so that a row enqueued a
/// second time is seen. Not store data (a power loss does not roll it back as such), but kept
/// exactly in step with what is durable, so that it counts only real duplicates:
/// - a move records its rows in `pending` when it is applied to the live data;
/// - a sync (which copies all of the live data) makes every pending row durable: one already
///   in `durable` is a duplicate that is now in the durable data, a violation;
/// - a power loss (which sets the live data back to the durable one) forgets `pending`: those
///   moves never happened, and moving the same rows again is no duplicate.
///
/// Rows are told apart by `(source partition, outbox seq)`, which never names two messages: the
/// relay moves only durable rows, and a durable row's seq is never given again. (The
/// `(actor, message id)` pair could: two turns may send messages with the same id.)
#[derive(Debug, Default)]
pub(super) struct Oracle {
    /// Rows whose move is durable.
    durable: BTreeSet<(u32, u64)>,
    /// Rows moved in the live data since the last sync: `(source, seq, recipient, id)`.
    pending: Vec<(u32, u64, ActorId, MessageId)>,
}

impl Oracle {
    /// A move of `source`'s `rows` was applied to the live data.
    fn applied(&mut self, source: u32, rows: &[(u64, Row)]) {
        self.pending.extend(
            rows.iter()
                .map(|(seq, row)| (source, *seq, row.to.clone(), row.id)),
        );
    }

    /// The live data was copied to the durable data: every pending move is durable now.
    /// Returns the duplicates this made durable, one sentence each.
    pub(super) fn synced(&mut self) -> Vec<String> {
        let mut twice = Vec::new();
        for (source, seq, to, id) in self.pending.drain(..) {
            if !self.durable.insert((source, seq)) {
                twice.push(format!(
                    "message {id} to {to} moved twice by the relay (outbox seq {seq} of partition {source})"
                ));
            }
        }
        twice
    }

    /// A power loss took back every move not yet synced.
    pub(super) fn power_lost(&mut self) {
        self.pending.clear();
    }

    /// Outbox rows whose move is durable.
    pub(super) fn moved(&self) -> u64 {
        self.durable.len() as u64
    }
}

/// Starts one relay task per partition of `inner` (a store of several partitions), on the
/// tokio runtime `runtime`. Each holds the store only weakly between passes: once the last
/// [`SimStore`] handle is dropped, it ends at its next wake-up (within [`RELAY_TICK`]).
pub(super) fn start(inner: &Arc<Inner>, runtime: &tokio::runtime::Handle) {
    for (p, wake) in (0u32..).zip(&inner.wake) {
        runtime.spawn(serve(Arc::downgrade(inner), p, wake.clone()));
    }
}

/// The longest a relay waits after failed passes (doubling from [`RELAY_TICK`]), as the
/// embedded store's relays back off from a failing partition.
const MAX_BACKOFF: Duration = Duration::from_millis(160);

/// What one pass of a relay found.
enum Pass {
    /// It moved and trimmed a full batch: more may wait.
    Again,
    /// It moved and trimmed everything it found, or found nothing, or is held.
    Idle,
    /// A move or the trim failed: its rows wait in the outbox for a later pass.
    Failed,
}

/// Partition `p`'s relay: a pass whenever a turn wrote to its outbox, and every [`RELAY_TICK`];
/// after a failed pass, a wait doubling up to [`MAX_BACKOFF`].
async fn serve(store: Weak<Inner>, p: u32, wake: Arc<Notify>) {
    let mut backoff = RELAY_TICK;
    loop {
        // Held for one pass only (never while waiting), so that the store can go away.
        let Some(inner) = store.upgrade() else {
            return;
        };
        let pass = SimStore { inner, link: None }.relay_pass(p).await;
        match pass {
            Pass::Again => backoff = RELAY_TICK,
            Pass::Idle => {
                backoff = RELAY_TICK;
                // Biased: an unbiased select draws its order from the process, not the seed.
                tokio::select! {
                    biased;
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(RELAY_TICK) => {}
                }
            }
            Pass::Failed => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

impl SimStore {
    /// One pass of partition `p`'s relay (see the [module docs](self)).
    async fn relay_pass(&self, p: u32) -> Pass {
        let n = self.inner.partitions;
        let (batch, accept_duplicates) = {
            let s = self.state();
            if s.relay_hold == RelayHold::Stop {
                return Pass::Idle;
            }
            // Only what is durable (step 1 of the module docs).
            let batch = s.durable.relay.bottom(p, RELAY_BATCH);
            (batch, s.bugs.accept_duplicate_relay)
        };
        let Some(last) = batch.last().map(|(seq, _)| *seq) else {
            return Pass::Idle;
        };
        let full = batch.len() == RELAY_BATCH;
        let mut by_target: BTreeMap<u32, Vec<(u64, Row)>> = BTreeMap::new();
        for (seq, row) in batch {
            by_target
                .entry(partition_of(&row.to, n))
                .or_default()
                .push((seq, row));
        }
        // Every target is tried, so that one failed move holds up only its own rows; the
        // batch is moved again at the next pass (the marks skip what arrived) until all took it.
        let mut failed = false;
        for (q, moving) in by_target {
            let arg = format!("{p}->{q} {}", moving.len());
            let inner = self.inner.clone();
            let moved = self
                .update_if(
                    "relay",
                    &arg,
                    {
                        let moving = moving.clone();
                        move |d, _| {
                            !d.relay
                                .to_enqueue(q, p, &moving, accept_duplicates)
                                .is_empty()
                        }
                    },
                    move |d, now| {
                        let enqueued = deliver(d, q, p, &moving, accept_duplicates, now);
                        // Under the data's mutex, so in step with syncs (see `Oracle`).
                        inner
                            .relayed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .applied(p, &enqueued);
                        Ok(enqueued)
                    },
                )
                .await;
            match moved {
                Ok(enqueued) if !enqueued.is_empty() => {
                    let to: Arc<[ActorId]> = enqueued.into_iter().map(|(_, r)| r.to).collect();
                    // An error only says that no runtime listens: nobody is to be woken.
                    let _ = self.inner.arrivals.send(to);
                }
                Ok(_) => {}
                // In the trace already; the rows stay in the outbox for the next pass.
                Err(e) => {
                    tracing::debug!(source = p, target = q, error = %e, "a relay move failed; it is tried again");
                    failed = true;
                }
            }
        }
        if failed {
            return Pass::Failed;
        }
        {
            let mut s = self.state();
            if s.relay_hold == RelayHold::StopAfterMove {
                s.relay_hold = RelayHold::Stop;
                return Pass::Idle;
            }
        }
        let arg = format!("{p} {last}");
        let trimmed = self
            .update_if(
                "relay-trim",
                &arg,
                // Writes only if it removes something.
                move |d, _| d.relay.trimmable(n, p, last) > 0,
                move |d, _| Ok(d.relay.trim(n, p, last)),
            )
            .await;
        match trimmed {
            // A full batch trimmed: more may wait behind it.
            Ok(removed) if full && removed > 0 => Pass::Again,
            Ok(_) => Pass::Idle,
            // In the trace already; the next pass moves the rows again (skipped by the marks)
            // and trims them then.
            Err(e) => {
                tracing::debug!(source = p, error = %e, "a relay trim failed; it is tried again");
                Pass::Failed
            }
        }
    }

    /// What each partition's outbox and high-water marks hold (a read, like any other), for
    /// [`loom_core::embedded::check_outboxes`] and tests. `misplaced` is always 0: the
    /// simulated store keeps every partition in one data set.
    pub async fn outbox_states(&self) -> StoreResult<Vec<OutboxState>> {
        let n = self.inner.partitions;
        self.query("outbox_states", "", |d, _| Ok(d.relay.states(n)))
            .await
    }

    /// Outbox rows whose move into their target's mailbox is durable, each counted once
    /// however many times it was moved.
    pub fn relayed(&self) -> u64 {
        self.inner
            .relayed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .moved()
    }

    /// Test hook: stops the relays, or lets them run, or stops them right after their next
    /// move (see [`RelayHold`]); [`RelayHold::Run`] by default.
    #[doc(hidden)]
    pub fn hold_relay(&self, hold: RelayHold) {
        self.state().relay_hold = hold;
        for w in &self.inner.wake {
            w.notify_one();
        }
    }

    /// Wakes partition `p`'s relay (a turn wrote to its outbox).
    pub(super) fn wake_relay(&self, p: u32) {
        if let Some(w) = self.inner.wake.get(p as usize) {
            w.notify_one();
        }
    }
}
