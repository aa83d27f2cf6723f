//! [`JournalStore`] on redb.

use async_trait::async_trait;
use redb::{ReadTransaction, ReadableTable};

use crate::codec;
use crate::entry::{Entry, Seq, Snapshot};
use crate::error::{StoreError, StoreResult};
use crate::id::ActorId;
use crate::store::backend::{Page, paged_read, prepare_append, prepare_snapshot};
use crate::store::{EntryStream, JournalInfo, JournalStore, Lease, SeqRange};

use super::tables::{JOURNAL, JOURNAL_META, SNAPSHOTS, Tx, se};
use super::{EmbeddedStore, lease};

/// Entries per read transaction while streaming.
const READ_PAGE: usize = 1024;

pub(super) fn meta_of(
    table: &impl ReadableTable<&'static str, (u64, u64)>,
    actor: &str,
) -> StoreResult<(Seq, Seq)> {
    Ok(table
        .get(actor)
        .map_err(se)?
        .map(|v| v.value())
        .unwrap_or((0, 0)))
}

fn snapshot_seqs(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    actor: &str,
) -> StoreResult<Vec<Seq>> {
    let mut out = Vec::new();
    for item in table.range((actor, 0)..=(actor, Seq::MAX)).map_err(se)? {
        let (k, _) = item.map_err(se)?;
        out.push(k.value().1);
    }
    Ok(out)
}

pub(super) fn append(
    tx: &mut Tx<'_>,
    actor: &ActorId,
    expected_next: Seq,
    encoded: &[Vec<u8>],
) -> StoreResult<Seq> {
    let meta = tx.journal_meta.get()?;
    let (highest, trimmed) = meta_of(&**meta, actor.as_str())?;
    if expected_next != highest + 1 {
        return Err(StoreError::Conflict {
            actor: actor.clone(),
            expected: expected_next,
            actual: highest + 1,
        });
    }
    if encoded.is_empty() {
        return Ok(highest);
    }
    let journal = tx.journal.get()?;
    for (i, bytes) in encoded.iter().enumerate() {
        journal
            .insert((actor.as_str(), expected_next + i as Seq), bytes.as_slice())
            .map_err(se)?;
    }
    let highest = highest + encoded.len() as Seq;
    meta.insert(actor.as_str(), (highest, trimmed))
        .map_err(se)?;
    Ok(highest)
}

/// A page of entries, and the trim point in the same read transaction if `with_trim`.
fn read_page(
    txn: &ReadTransaction,
    actor: &ActorId,
    from: Seq,
    to: Seq,
    limit: usize,
    with_trim: bool,
) -> StoreResult<Page> {
    let trimmed_through = if with_trim {
        let meta = txn.open_table(JOURNAL_META).map_err(se)?;
        Some(meta_of(&meta, actor.as_str())?.1)
    } else {
        None
    };
    let table = txn.open_table(JOURNAL).map_err(se)?;
    let mut out = Vec::with_capacity(limit.min(READ_PAGE));
    for item in table
        .range((actor.as_str(), from)..=(actor.as_str(), to))
        .map_err(se)?
        .take(limit)
    {
        let (k, v) = item.map_err(se)?;
        let seq = k.value().1;
        let entry = codec::decode_entry(seq, v.value())
            .map_err(|e| StoreError::corrupt(format!("entry {seq} of {actor}"), e))?;
        out.push(entry);
    }
    Ok(Page {
        entries: out,
        trimmed_through,
        cut_short: false,
    })
}

fn save_snapshot(
    tx: &mut Tx<'_>,
    actor: &ActorId,
    seq: Seq,
    bytes: &[u8],
    keep: usize,
) -> StoreResult<()> {
    let meta = tx.journal_meta.get()?;
    let (highest, trimmed) = meta_of(&**meta, actor.as_str())?;
    if seq > highest {
        return Err(StoreError::SnapshotRefused {
            actor: actor.clone(),
            seq,
            reason: format!("the journal's highest seq is {highest}"),
        });
    }
    if seq < trimmed {
        return Err(StoreError::SnapshotRefused {
            actor: actor.clone(),
            seq,
            reason: format!(
                "entries through {trimmed} were trimmed, so replay from {seq} is impossible"
            ),
        });
    }
    let deleted = tx
        .journal_deleted
        .get()?
        .get(actor.as_str())
        .map_err(se)?
        .map_or(0, |v| v.value());
    if seq <= deleted {
        return Err(StoreError::SnapshotRefused {
            actor: actor.clone(),
            seq,
            reason: format!("the journal was deleted through {deleted}"),
        });
    }
    let snaps = tx.snapshots.get()?;
    snaps.insert((actor.as_str(), seq), bytes).map_err(se)?;
    let seqs = snapshot_seqs(&**snaps, actor.as_str())?;
    for old in seqs.iter().take(seqs.len().saturating_sub(keep)) {
        snaps.remove((actor.as_str(), *old)).map_err(se)?;
    }
    Ok(())
}

fn trim(tx: &mut Tx<'_>, actor: &ActorId, through: Seq) -> StoreResult<()> {
    let meta = tx.journal_meta.get()?;
    let (highest, trimmed) = meta_of(&**meta, actor.as_str())?;
    let snaps = tx.snapshots.get()?;
    let oldest = snaps
        .range((actor.as_str(), 0)..=(actor.as_str(), Seq::MAX))
        .map_err(se)?
        .next()
        .transpose()
        .map_err(se)?
        .map(|(k, _)| k.value().1);
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
    if through <= trimmed {
        return Ok(());
    }
    let journal = tx.journal.get()?;
    journal
        .remove_range((actor.as_str(), trimmed + 1), (actor.as_str(), through))
        .map_err(se)?;
    meta.insert(actor.as_str(), (highest, through))
        .map_err(se)?;
    Ok(())
}

/// Saves a snapshot and trims through the oldest kept one: compaction, in one write (the caller
/// checked the fence). Returns the trim point after.
fn compact(
    tx: &mut Tx<'_>,
    actor: &ActorId,
    seq: Seq,
    bytes: &[u8],
    keep: usize,
) -> StoreResult<Seq> {
    save_snapshot(tx, actor, seq, bytes, keep)?;
    let (_, trimmed) = meta_of(&**tx.journal_meta.get()?, actor.as_str())?;
    let oldest = snapshot_seqs(&**tx.snapshots.get()?, actor.as_str())?
        .first()
        .copied()
        .unwrap_or(0);
    if oldest <= trimmed {
        return Ok(trimmed);
    }
    trim(tx, actor, oldest)?;
    Ok(oldest)
}

/// A write's fence and what it fences of the actor, as [`EmbeddedStore::fence_for`] found it:
/// checked inside the write's transaction.
type Fence = Option<(Lease, crate::store::backend::FenceOf)>;

/// Refuses the write with [`StoreError::LeaseLost`] unless `fence`, if any, is held.
fn check(tx: &mut Tx<'_>, actor: &ActorId, fence: &Fence) -> StoreResult<()> {
    match fence {
        Some((lease, of)) => lease::check_fence(tx, actor, lease, *of),
        None => Ok(()),
    }
}

impl EmbeddedStore {
    /// `fence` with what it fences of `actor` (its own lease or its partition's), refused at
    /// once when it fences nothing of it.
    fn fence_for(&self, actor: &ActorId, fence: Option<&Lease>) -> StoreResult<Fence> {
        fence
            .map(|f| {
                crate::store::backend::fence_of(actor, f, self.partitions())
                    .map(|of| (f.clone(), of))
            })
            .transpose()
    }
}

pub(super) fn delete(tx: &mut Tx<'_>, actor: &ActorId) -> StoreResult<()> {
    let meta = tx.journal_meta.get()?;
    let (highest, trimmed) = meta_of(&**meta, actor.as_str())?;
    let journal = tx.journal.get()?;
    journal
        .remove_range((actor.as_str(), trimmed + 1), (actor.as_str(), Seq::MAX))
        .map_err(se)?;
    let snaps = tx.snapshots.get()?;
    snaps
        .remove_range((actor.as_str(), 0), (actor.as_str(), Seq::MAX))
        .map_err(se)?;
    if highest > 0 {
        meta.insert(actor.as_str(), (highest, highest))
            .map_err(se)?;
        tx.journal_deleted
            .get()?
            .insert(actor.as_str(), highest)
            .map_err(se)?;
    }
    Ok(())
}

#[async_trait]
impl JournalStore for EmbeddedStore {
    async fn append(
        &self,
        actor: &ActorId,
        expected_next: Seq,
        entries: &[Entry],
    ) -> StoreResult<Seq> {
        let p = self.part(actor);
        let encoded = prepare_append(actor, expected_next, entries)?;
        let actor = actor.clone();
        self.write_in(p, move |tx| append(tx, &actor, expected_next, &encoded))
            .await
    }

    fn read(&self, actor: &ActorId, range: SeqRange) -> EntryStream {
        let store = self.clone();
        let id = actor.clone();
        let p = self.part(actor);
        paged_read(
            actor.clone(),
            range,
            READ_PAGE,
            move |from, to, limit, with_trim| {
                let store = store.clone();
                let id = id.clone();
                async move {
                    store
                        .read_in(p, move |txn| {
                            read_page(txn, &id, from, to, limit, with_trim)
                        })
                        .await
                }
            },
        )
    }

    async fn highest_seq(&self, actor: &ActorId) -> StoreResult<Seq> {
        let p = self.part(actor);
        let actor = actor.clone();
        self.read_in(p, move |txn| {
            let meta = txn.open_table(JOURNAL_META).map_err(se)?;
            Ok(meta_of(&meta, actor.as_str())?.0)
        })
        .await
    }

    async fn info(&self, actor: &ActorId) -> StoreResult<JournalInfo> {
        let p = self.part(actor);
        let actor = actor.clone();
        self.read_in(p, move |txn| {
            let meta = txn.open_table(JOURNAL_META).map_err(se)?;
            let (highest, trimmed_through) = meta_of(&meta, actor.as_str())?;
            let snaps = txn.open_table(SNAPSHOTS).map_err(se)?;
            Ok(JournalInfo {
                highest,
                trimmed_through,
                snapshots: snapshot_seqs(&snaps, actor.as_str())?,
            })
        })
        .await
    }

    async fn save_snapshot(
        &self,
        actor: &ActorId,
        snapshot: &Snapshot,
        keep: usize,
    ) -> StoreResult<()> {
        let p = self.part(actor);
        let bytes = prepare_snapshot(actor, snapshot, keep)?;
        let actor = actor.clone();
        let seq = snapshot.seq;
        self.write_in(p, move |tx| save_snapshot(tx, &actor, seq, &bytes, keep))
            .await
    }

    async fn load_snapshot(
        &self,
        actor: &ActorId,
        at_or_below: Seq,
    ) -> StoreResult<Option<Snapshot>> {
        let p = self.part(actor);
        let actor = actor.clone();
        self.read_in(p, move |txn| {
            let snaps = txn.open_table(SNAPSHOTS).map_err(se)?;
            let last = snaps
                .range((actor.as_str(), 0)..=(actor.as_str(), at_or_below))
                .map_err(se)?
                .next_back()
                .transpose()
                .map_err(se)?;
            match last {
                None => Ok(None),
                Some((k, v)) => {
                    let seq = k.value().1;
                    codec::decode_snapshot(seq, v.value())
                        .map(Some)
                        .map_err(|e| StoreError::corrupt(format!("snapshot {seq} of {actor}"), e))
                }
            }
        })
        .await
    }

    async fn trim(&self, actor: &ActorId, through: Seq) -> StoreResult<()> {
        let p = self.part(actor);
        let actor = actor.clone();
        self.write_in(p, move |tx| trim(tx, &actor, through)).await
    }

    async fn compact(
        &self,
        actor: &ActorId,
        snapshot: &Snapshot,
        keep: usize,
        fence: Option<&Lease>,
    ) -> StoreResult<Seq> {
        let p = self.part(actor);
        let bytes = prepare_snapshot(actor, snapshot, keep)?;
        let fence = self.fence_for(actor, fence)?;
        let (actor, seq) = (actor.clone(), snapshot.seq);
        self.write_in(p, move |tx| {
            check(tx, &actor, &fence)?;
            compact(tx, &actor, seq, &bytes, keep)
        })
        .await
    }

    async fn delete(&self, actor: &ActorId, fence: Option<&Lease>) -> StoreResult<()> {
        let p = self.part(actor);
        let fence = self.fence_for(actor, fence)?;
        let actor = actor.clone();
        self.write_in(p, move |tx| {
            check(tx, &actor, &fence)?;
            delete(tx, &actor)
        })
        .await
    }

    async fn begin_at(&self, actor: &ActorId, through: Seq) -> StoreResult<()> {
        let p = self.part(actor);
        let actor = actor.clone();
        self.write_in(p, move |tx| {
            let meta = tx.journal_meta.get()?;
            let (highest, _) = meta_of(&**meta, actor.as_str())?;
            if highest != 0 {
                return Err(StoreError::Conflict {
                    actor: actor.clone(),
                    expected: 1,
                    actual: highest + 1,
                });
            }
            if through > 0 {
                meta.insert(actor.as_str(), (through, through))
                    .map_err(se)?;
            }
            Ok(())
        })
        .await
    }

    async fn list_actors(
        &self,
        after: Option<&ActorId>,
        limit: usize,
    ) -> StoreResult<Vec<ActorId>> {
        let after = after.cloned();
        self.read_merged(
            limit,
            |a: &ActorId, b| a.cmp(b),
            move |txn| {
                let meta = txn.open_table(JOURNAL_META).map_err(se)?;
                let iter = match &after {
                    Some(a) => meta.range::<&str>((
                        std::ops::Bound::Excluded(a.as_str()),
                        std::ops::Bound::Unbounded,
                    )),
                    None => meta.range::<&str>(..),
                }
                .map_err(se)?;
                let mut out = Vec::new();
                for item in iter.take(limit) {
                    let (k, _) = item.map_err(se)?;
                    let id = ActorId::from_stored(k.value(), "journal actor id")?;
                    out.push(id);
                }
                Ok(out)
            },
        )
        .await
    }
}
