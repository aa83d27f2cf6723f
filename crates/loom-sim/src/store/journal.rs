//! [`JournalStore`] for [`SimStore`]: per-actor journals of entry frames and their snapshots.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;
use loom_core::codec;
use loom_core::store::backend::{Page, paged_read, prepare_append, prepare_snapshot};
use loom_core::{
    ActorId, Entry, EntryStream, JournalInfo, JournalStore, Lease, Seq, SeqRange, Snapshot,
    StoreError, StoreResult,
};

use super::{Frame, SimStore};

/// Entries per read request while streaming.
const READ_PAGE: usize = 1024;

/// One actor's journal.
///
/// Invariants (as the embedded store's `JOURNAL`, `JOURNAL_META`, `JOURNAL_DELETED` and
/// `SNAPSHOTS` tables keep them):
/// - `entries` holds exactly the seqs `trimmed + 1 ..= highest`: appends add at the top, trims
///   and deletes remove from the bottom, nothing else writes there;
/// - `highest` and `trimmed` only grow, `trimmed <= highest`: a seq is never reused, and
///   entries once trimmed never come back;
/// - no snapshot is above `highest`, below `trimmed`, or at or below `deleted`, and `trimmed`
///   never passes the oldest snapshot (when there is one);
/// - `deleted` is the highest seq when the journal was last deleted (0 if never).
#[derive(Debug, Clone, Default)]
pub(super) struct Journal {
    highest: Seq,
    trimmed: Seq,
    deleted: Seq,
    entries: BTreeMap<Seq, Frame>,
    snapshots: BTreeMap<Seq, Frame>,
    /// Every entry ever appended, trimmed or not, newest first: what the workloads' checkers
    /// read back ([`SimStore::history`]). Not part of the store contract (no request reads
    /// it); a persistent list, so that the copy-on-write of a journal stays cheap, and held in
    /// the journal so that a power loss takes back exactly the entries it takes back.
    history: Option<Arc<Appended>>,
}

/// One link of [`Journal::history`].
#[derive(Debug)]
struct Appended {
    seq: Seq,
    frame: Frame,
    before: Option<Arc<Appended>>,
}

impl Drop for Appended {
    /// Unlinks the chain one link at a time: the default drop would recurse once per entry,
    /// and a long journal's history would overflow the stack.
    fn drop(&mut self) {
        let mut next = self.before.take();
        while let Some(link) = next {
            next = match Arc::try_unwrap(link) {
                Ok(mut alone) => alone.before.take(),
                // Shared with another copy of the journal (the durable one): that copy keeps
                // the rest.
                Err(_) => None,
            };
        }
    }
}

/// Every journal. Invariant: an actor is here exactly when its highest seq is above 0 (it was
/// appended to, or begun at a trim point), deleted or not; that is the list
/// [`JournalStore::list_actors`] gives. A refused request never adds one.
#[derive(Debug, Clone, Default)]
pub(super) struct Journals {
    by_actor: BTreeMap<ActorId, Arc<Journal>>,
}

impl Journals {
    fn of(&self, actor: &ActorId) -> Option<&Journal> {
        self.by_actor.get(actor).map(|j| &**j)
    }

    /// The journal to change, created empty if the actor has none: only after every check.
    fn make_mut(&mut self, actor: &ActorId) -> &mut Journal {
        Arc::make_mut(self.by_actor.entry(actor.clone()).or_default())
    }

    /// The actor's highest seq and trim point; `(0, 0)` for an actor never written.
    pub(super) fn meta(&self, actor: &ActorId) -> (Seq, Seq) {
        self.of(actor).map_or((0, 0), |j| (j.highest, j.trimmed))
    }

    /// Fails with [`StoreError::Conflict`] unless the journal's next seq is `expected_next`;
    /// returns the highest seq.
    pub(super) fn check_next(&self, actor: &ActorId, expected_next: Seq) -> StoreResult<Seq> {
        let (highest, _) = self.meta(actor);
        if expected_next != highest + 1 {
            return Err(StoreError::Conflict {
                actor: actor.clone(),
                expected: expected_next,
                actual: highest + 1,
            });
        }
        Ok(highest)
    }

    /// Appends `frames` as seqs `expected_next..`, if that is the next seq. Returns the new
    /// highest seq. An empty batch writes nothing.
    pub(super) fn append(
        &mut self,
        actor: &ActorId,
        expected_next: Seq,
        frames: &[Frame],
    ) -> StoreResult<Seq> {
        let highest = self.check_next(actor, expected_next)?;
        if frames.is_empty() {
            return Ok(highest);
        }
        let journal = self.make_mut(actor);
        for (i, frame) in frames.iter().enumerate() {
            let seq = expected_next + i as Seq;
            journal.entries.insert(seq, frame.clone());
            journal.history = Some(Arc::new(Appended {
                seq,
                frame: frame.clone(),
                before: journal.history.take(),
            }));
        }
        journal.highest = highest + frames.len() as Seq;
        Ok(journal.highest)
    }

    /// A page of entries in `from..=to`, at most `limit`, and the trim point as of the same
    /// read if `with_trim`.
    fn page(
        &self,
        actor: &ActorId,
        from: Seq,
        to: Seq,
        limit: usize,
        with_trim: bool,
    ) -> StoreResult<Page> {
        let journal = self.of(actor);
        let trimmed_through = with_trim.then(|| journal.map_or(0, |j| j.trimmed));
        let mut entries = Vec::new();
        if let Some(j) = journal
            && from <= to
        {
            for (seq, frame) in j.entries.range(from..=to).take(limit) {
                let entry = codec::decode_entry(*seq, frame)
                    .map_err(|e| StoreError::corrupt(format!("entry {seq} of {actor}"), e))?;
                entries.push(entry);
            }
        }
        Ok(Page {
            entries,
            trimmed_through,
            cut_short: false,
        })
    }

    /// Refuses a snapshot at `seq` above the highest seq, below the trim point, or at or below
    /// the point where the journal was deleted.
    fn check_snapshot(&self, actor: &ActorId, seq: Seq) -> StoreResult<()> {
        let (highest, trimmed, deleted) = self
            .of(actor)
            .map_or((0, 0, 0), |j| (j.highest, j.trimmed, j.deleted));
        let refuse = |reason: String| {
            Err(StoreError::SnapshotRefused {
                actor: actor.clone(),
                seq,
                reason,
            })
        };
        if seq > highest {
            return refuse(format!("the journal's highest seq is {highest}"));
        }
        if seq < trimmed {
            return refuse(format!(
                "entries through {trimmed} were trimmed, so replay from {seq} is impossible"
            ));
        }
        if seq <= deleted {
            return refuse(format!("the journal was deleted through {deleted}"));
        }
        Ok(())
    }

    /// Saves a snapshot (replacing one at the same seq) and keeps only the newest `keep`.
    fn save_snapshot(
        &mut self,
        actor: &ActorId,
        seq: Seq,
        frame: Frame,
        keep: usize,
    ) -> StoreResult<()> {
        self.check_snapshot(actor, seq)?;
        // The check passed, so `seq <= highest`: the journal exists.
        let journal = self.make_mut(actor);
        journal.snapshots.insert(seq, frame);
        while journal.snapshots.len() > keep {
            journal.snapshots.pop_first();
        }
        Ok(())
    }

    fn oldest_snapshot(&self, actor: &ActorId) -> Option<Seq> {
        self.of(actor)
            .and_then(|j| j.snapshots.keys().next().copied())
    }

    /// Removes entries `..=through`, if a snapshot is kept at `through` or later.
    fn trim(&mut self, actor: &ActorId, through: Seq) -> StoreResult<()> {
        let oldest = self.oldest_snapshot(actor);
        match oldest {
            Some(oldest) if through <= oldest => {}
            _ => {
                return Err(StoreError::TrimRefused {
                    actor: actor.clone(),
                    through,
                    oldest_snapshot: oldest,
                });
            }
        }
        let (_, trimmed) = self.meta(actor);
        if through <= trimmed {
            return Ok(());
        }
        let journal = self.make_mut(actor);
        journal.entries = journal.entries.split_off(&(through + 1));
        journal.trimmed = through;
        Ok(())
    }

    /// Saves a snapshot and trims through the oldest kept one: compaction, in one write (the
    /// caller checked the fence). Returns the trim point after.
    /// With `past_oldest` (the deliberate bug [`Bugs::trim_past_oldest_snapshot`]) it trims
    /// through the snapshot it saves instead.
    ///
    /// [`Bugs::trim_past_oldest_snapshot`]: super::Bugs::trim_past_oldest_snapshot
    fn compact(
        &mut self,
        actor: &ActorId,
        seq: Seq,
        frame: Frame,
        keep: usize,
        past_oldest: bool,
    ) -> StoreResult<Seq> {
        self.save_snapshot(actor, seq, frame, keep)?;
        let (_, trimmed) = self.meta(actor);
        if past_oldest && seq > trimmed {
            let journal = self.make_mut(actor);
            journal.entries = journal.entries.split_off(&(seq + 1));
            journal.trimmed = seq;
            return Ok(seq);
        }
        let oldest = self.oldest_snapshot(actor).unwrap_or(0);
        if oldest <= trimmed {
            return Ok(trimmed);
        }
        // A snapshot is kept at `oldest`, so this trim cannot be refused.
        self.trim(actor, oldest)?;
        Ok(oldest)
    }

    /// Removes every entry and snapshot; keeps the highest seq, and refuses snapshots at or
    /// below it from now on.
    pub(super) fn delete(&mut self, actor: &ActorId) {
        if self.of(actor).is_none() {
            return;
        }
        let journal = self.make_mut(actor);
        journal.entries.clear();
        journal.snapshots.clear();
        journal.trimmed = journal.highest;
        journal.deleted = journal.highest;
    }

    /// Makes an actor without a journal look as if `1..=through` had been written and trimmed.
    fn begin_at(&mut self, actor: &ActorId, through: Seq) -> StoreResult<()> {
        let (highest, _) = self.meta(actor);
        if highest != 0 {
            return Err(StoreError::Conflict {
                actor: actor.clone(),
                expected: 1,
                actual: highest + 1,
            });
        }
        if through > 0 {
            let journal = self.make_mut(actor);
            journal.highest = through;
            journal.trimmed = through;
        }
        Ok(())
    }

    /// Every entry ever appended to the actor's journal (trimmed or not), oldest first.
    fn history(&self, actor: &ActorId) -> StoreResult<Vec<Entry>> {
        let mut out = Vec::new();
        let mut next = self.of(actor).and_then(|j| j.history.as_deref());
        while let Some(link) = next {
            let entry = codec::decode_entry(link.seq, &link.frame)
                .map_err(|e| StoreError::corrupt(format!("entry {} of {actor}", link.seq), e))?;
            out.push(entry);
            next = link.before.as_deref();
        }
        out.reverse();
        Ok(out)
    }

    fn info(&self, actor: &ActorId) -> JournalInfo {
        self.of(actor)
            .map_or_else(JournalInfo::default, |j| JournalInfo {
                highest: j.highest,
                trimmed_through: j.trimmed,
                snapshots: j.snapshots.keys().copied().collect(),
            })
    }

    fn load_snapshot(&self, actor: &ActorId, at_or_below: Seq) -> StoreResult<Option<Snapshot>> {
        let Some((seq, frame)) = self
            .of(actor)
            .and_then(|j| j.snapshots.range(..=at_or_below).next_back())
        else {
            return Ok(None);
        };
        codec::decode_snapshot(*seq, frame)
            .map(Some)
            .map_err(|e| StoreError::corrupt(format!("snapshot {seq} of {actor}"), e))
    }

    /// The actors whose newest snapshot has an older one kept beside it: the ones whose newest
    /// snapshot may rot and still be recovered from (by falling back to the older one).
    pub(super) fn with_a_fallback_snapshot(&self) -> Vec<ActorId> {
        self.by_actor
            .iter()
            .filter(|(_, j)| j.snapshots.len() >= 2)
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// The seq of the actor's newest kept snapshot.
    pub(super) fn newest_snapshot(&self, actor: &ActorId) -> Option<Seq> {
        self.of(actor)
            .and_then(|j| j.snapshots.keys().next_back().copied())
    }

    /// Damages the newest snapshot of `actor` (one byte flipped in its frame, so that its
    /// checksum fails); returns its seq.
    pub(super) fn rot_newest_snapshot(&mut self, actor: &ActorId) -> Option<Seq> {
        let journal = Arc::make_mut(self.by_actor.get_mut(actor)?);
        let (&seq, frame) = journal.snapshots.iter_mut().next_back()?;
        let mut bytes = frame.to_vec();
        let at = bytes.len().checked_sub(1)?;
        bytes[at] ^= 0x5a;
        *frame = Frame::from(bytes);
        Some(seq)
    }

    fn list(&self, after: Option<&ActorId>, limit: usize) -> Vec<ActorId> {
        let start = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.clone()));
        self.by_actor
            .range((start, Bound::Unbounded))
            .take(limit)
            .map(|(a, _)| a.clone())
            .collect()
    }
}

impl SimStore {
    /// Every entry ever appended to `actor`'s journal and still in the live data, oldest
    /// first, including those compaction trimmed: the witness the workloads' checkers hold
    /// replies against (a request of no store contract, so it is neither traced nor faulted).
    ///
    /// ```
    /// use loom_core::{ActorId, Entry, EntryKind, JournalStore, Seq};
    /// use loom_sim::store::{Faults, SimStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = SimStore::new(1, Faults::default());
    /// let a = ActorId::new("counter", "c")?;
    /// let done = |seq: Seq| Entry::new(seq, EntryKind::Completed { reply: serde_json::json!(seq) });
    /// store.append(&a, 1, &[done(1), done(2)]).await?;
    /// store.save_snapshot(&a, &loom_core::Snapshot::new(2, serde_json::json!(0)), 1).await?;
    /// store.trim(&a, 2).await?;
    /// assert_eq!(store.info(&a).await?.trimmed_through, 2);
    /// assert_eq!(store.history(&a)?.len(), 2);
    /// # Ok(()) }
    /// ```
    pub fn history(&self, actor: &ActorId) -> StoreResult<Vec<Entry>> {
        self.state().live.journals.history(actor)
    }
}

#[async_trait]
impl JournalStore for SimStore {
    async fn append(
        &self,
        actor: &ActorId,
        expected_next: Seq,
        entries: &[Entry],
    ) -> StoreResult<Seq> {
        let frames: Vec<Frame> = prepare_append(actor, expected_next, entries)?
            .into_iter()
            .map(Frame::from)
            .collect();
        let id = actor.clone();
        self.update("append", actor.as_str(), move |d, _| {
            d.journals.append(&id, expected_next, &frames)
        })
        .await
    }

    fn read(&self, actor: &ActorId, range: SeqRange) -> EntryStream {
        let store = self.clone();
        let id = actor.clone();
        paged_read(
            actor.clone(),
            range,
            READ_PAGE,
            move |from, to, limit, with_trim| {
                let store = store.clone();
                let id = id.clone();
                async move {
                    store
                        .query("read", id.as_str(), |d, _| {
                            d.journals.page(&id, from, to, limit, with_trim)
                        })
                        .await
                }
            },
        )
    }

    async fn highest_seq(&self, actor: &ActorId) -> StoreResult<Seq> {
        self.query("highest_seq", actor.as_str(), |d, _| {
            Ok(d.journals.meta(actor).0)
        })
        .await
    }

    async fn info(&self, actor: &ActorId) -> StoreResult<JournalInfo> {
        self.query("info", actor.as_str(), |d, _| Ok(d.journals.info(actor)))
            .await
    }

    async fn save_snapshot(
        &self,
        actor: &ActorId,
        snapshot: &Snapshot,
        keep: usize,
    ) -> StoreResult<()> {
        let frame = Frame::from(prepare_snapshot(actor, snapshot, keep)?);
        let (id, seq) = (actor.clone(), snapshot.seq);
        self.update("save_snapshot", actor.as_str(), move |d, _| {
            d.journals.save_snapshot(&id, seq, frame, keep)
        })
        .await
    }

    async fn load_snapshot(
        &self,
        actor: &ActorId,
        at_or_below: Seq,
    ) -> StoreResult<Option<Snapshot>> {
        self.query("load_snapshot", actor.as_str(), |d, _| {
            d.journals.load_snapshot(actor, at_or_below)
        })
        .await
    }

    async fn trim(&self, actor: &ActorId, through: Seq) -> StoreResult<()> {
        let id = actor.clone();
        self.update("trim", actor.as_str(), move |d, _| {
            d.journals.trim(&id, through)
        })
        .await
    }

    async fn compact(
        &self,
        actor: &ActorId,
        snapshot: &Snapshot,
        keep: usize,
        fence: Option<&Lease>,
    ) -> StoreResult<Seq> {
        let frame = Frame::from(prepare_snapshot(actor, snapshot, keep)?);
        let past_oldest = self.bugs().trim_past_oldest_snapshot;
        let of = fence
            .map(|f| loom_core::store::backend::fence_of(actor, f, self.inner.partitions))
            .transpose()?;
        let (id, seq, fence) = (actor.clone(), snapshot.seq, fence.cloned());
        self.update("compact", actor.as_str(), move |d, now| {
            if let (Some(fence), Some(of)) = (&fence, of) {
                d.leases.check_fence(&id, fence, of, now)?;
            }
            d.journals.compact(&id, seq, frame, keep, past_oldest)
        })
        .await
    }

    async fn delete(&self, actor: &ActorId, fence: Option<&Lease>) -> StoreResult<()> {
        let of = fence
            .map(|f| loom_core::store::backend::fence_of(actor, f, self.inner.partitions))
            .transpose()?;
        let (id, fence) = (actor.clone(), fence.cloned());
        self.update("delete", actor.as_str(), move |d, now| {
            if let (Some(fence), Some(of)) = (&fence, of) {
                d.leases.check_fence(&id, fence, of, now)?;
            }
            d.journals.delete(&id);
            Ok(())
        })
        .await
    }

    async fn begin_at(&self, actor: &ActorId, through: Seq) -> StoreResult<()> {
        let id = actor.clone();
        self.update("begin_at", actor.as_str(), move |d, _| {
            d.journals.begin_at(&id, through)
        })
        .await
    }

    async fn list_actors(
        &self,
        after: Option<&ActorId>,
        limit: usize,
    ) -> StoreResult<Vec<ActorId>> {
        let arg = after.map_or("", |a| a.as_str());
        self.query("list_actors", arg, |d, _| Ok(d.journals.list(after, limit)))
            .await
    }
}
