//! [`JournalStore`]: per-actor journals of numbered entries, and their snapshots.

use std::future::Future;

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};

use crate::codec;
use crate::entry::{Entry, Seq, Snapshot};
use crate::error::{Limit, StoreError, StoreResult};
use crate::id::ActorId;
use crate::limits::{
    MAX_BATCH_BYTES, MAX_BATCH_ENTRIES, MAX_ENTRY_BYTES, MAX_JSON_DEPTH, MAX_SNAPSHOT_BYTES,
};
use crate::store::Lease;

/// Which entries to read: seqs `from..=to`, at most `max` of them; with
/// [`strict`](Self::strict), starting exactly at `from`.
///
/// ```
/// use loom_core::SeqRange;
///
/// let r = SeqRange::all().from(5).to(9).max(2);
/// assert_eq!((r.from, r.to, r.max, r.strict), (5, 9, 2, false));
/// assert!(SeqRange::all().from(3).to(2).is_empty());
/// assert!(SeqRange::all().max(0).is_empty());
/// assert!(SeqRange::all().from(7).strict().strict);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    /// First seq wanted (inclusive).
    pub from: Seq,
    /// Last seq wanted (inclusive).
    pub to: Seq,
    /// Most entries to return.
    pub max: u64,
    /// The read must start at `from`: see [`JournalStore::read`].
    pub strict: bool,
}

impl SeqRange {
    /// Every entry.
    pub const fn all() -> Self {
        SeqRange {
            from: 1,
            to: Seq::MAX,
            max: u64::MAX,
            strict: false,
        }
    }

    /// Requires the read to start at `from`, for a reader whose state already covers
    /// `..from` (recovery after a snapshot at `from - 1`): if the entries from `from` on were
    /// trimmed (a compaction elsewhere since the reader looked), the stream fails with
    /// [`StoreError::Gap`] instead of silently starting later. The check is made in the same
    /// read as the first page, so no trim can slip between them.
    pub const fn strict(self) -> Self {
        SeqRange {
            strict: true,
            ..self
        }
    }

    /// Starting at `from`.
    pub const fn from(self, from: Seq) -> Self {
        SeqRange { from, ..self }
    }

    /// Ending at `to`, inclusive.
    pub const fn to(self, to: Seq) -> Self {
        SeqRange { to, ..self }
    }

    /// At most `max` entries.
    pub const fn max(self, max: u64) -> Self {
        SeqRange { max, ..self }
    }

    /// True if no entry can match.
    pub const fn is_empty(&self) -> bool {
        self.max == 0 || self.from > self.to || self.to == 0
    }
}

/// A stream of journal entries in seq order, gapless.
pub type EntryStream = BoxStream<'static, StoreResult<Entry>>;

/// What a journal holds, without reading its entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JournalInfo {
    /// The highest seq ever written (0 if none); never decreases.
    pub highest: Seq,
    /// Entries up to and including this seq were trimmed or deleted; the journal holds
    /// `trimmed_through + 1 ..= highest`.
    pub trimmed_through: Seq,
    /// Seqs of the kept snapshots, oldest first.
    pub snapshots: Vec<Seq>,
}

impl JournalInfo {
    /// How many entries the journal holds.
    pub fn len(&self) -> u64 {
        self.highest - self.trimmed_through
    }

    /// True if it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per-actor journals and snapshots.
///
/// Rules every backend keeps (and the conformance suite checks):
/// - [`append`](Self::append) is atomic for its batch and conditional on `expected_next`;
/// - seqs are gapless and never reused; [`highest_seq`](Self::highest_seq) never decreases, not
///   after a trim, not after a delete;
/// - [`read`](Self::read) streams: it never holds a whole journal in memory;
/// - [`trim`](Self::trim) never passes the oldest kept snapshot;
/// - every error is typed, and a refused request writes nothing.
#[async_trait]
pub trait JournalStore: Send + Sync + 'static {
    /// Appends `entries` as one atomic batch, if the journal's next seq is `expected_next`.
    ///
    /// The entries must be numbered `expected_next, expected_next + 1, …`
    /// ([`StoreError::BatchOutOfOrder`] otherwise). If the journal's highest seq is not
    /// `expected_next - 1`, fails with [`StoreError::Conflict`] and writes nothing. Entries over
    /// the limits fail with [`StoreError::TooLarge`] and nothing is written. An empty batch
    /// writes nothing and only checks the condition. Returns the new highest seq. When it
    /// returns `Ok`, the entries are durable (as durable as the backend is configured to be).
    async fn append(
        &self,
        actor: &ActorId,
        expected_next: Seq,
        entries: &[Entry],
    ) -> StoreResult<Seq>;

    /// Streams the entries in `range`, in order. Trimmed or deleted entries are not returned; the
    /// stream starts at the first kept entry in the range, unless the range is
    /// [`strict`](SeqRange::strict): then, if the journal's trim point is at or past `from` when
    /// the first page is read (checked in the same read), the stream yields
    /// [`StoreError::Gap`] and ends. If entries disappear while the stream is being read (a
    /// concurrent trim), the stream ends with [`StoreError::Gap`] rather than skip.
    fn read(&self, actor: &ActorId, range: SeqRange) -> EntryStream;

    /// The highest seq ever appended to the journal; 0 for an actor never written.
    async fn highest_seq(&self, actor: &ActorId) -> StoreResult<Seq>;

    /// Highest seq, trim point and kept snapshots.
    async fn info(&self, actor: &ActorId) -> StoreResult<JournalInfo>;

    /// Saves a snapshot, then keeps only the newest `keep` snapshots (at least 1), atomically.
    ///
    /// A snapshot at an existing seq replaces it. Refused ([`StoreError::SnapshotRefused`]) for a
    /// seq above the highest seq (it would claim entries that do not exist), below the trim point
    /// (the entries after it that a fallback would replay are gone), at or below the point where
    /// the journal was [deleted](Self::delete) (it would bring a deleted state back), and for
    /// seq 0.
    async fn save_snapshot(
        &self,
        actor: &ActorId,
        snapshot: &Snapshot,
        keep: usize,
    ) -> StoreResult<()>;

    /// The newest kept snapshot with seq at most `at_or_below` (`Seq::MAX` for the newest).
    ///
    /// A snapshot that fails its checks is an error ([`StoreError::Corrupt`]), never skipped
    /// silently: the caller decides to fall back to an older one (see [`JournalInfo::snapshots`]).
    async fn load_snapshot(
        &self,
        actor: &ActorId,
        at_or_below: Seq,
    ) -> StoreResult<Option<Snapshot>>;

    /// Removes entries `..=through`.
    ///
    /// Refused with [`StoreError::TrimRefused`] unless a kept snapshot exists and `through` is at
    /// most the oldest kept snapshot's seq. Trimming to a point already trimmed is a no-op.
    /// Highest seq is unchanged.
    async fn trim(&self, actor: &ActorId, through: Seq) -> StoreResult<()>;

    /// Saves `snapshot` as [`save_snapshot`](Self::save_snapshot) does, and trims through the
    /// oldest kept snapshot (when that is past the trim point), in one atomic write, only while
    /// `fence` is held ([`StoreError::LeaseLost`] otherwise, nothing written; a fence is checked
    /// as a [`Turn`](crate::store::Turn)'s is). Returns the trim
    /// point after. This is compaction: a node that lost the lease the actor ran under can no longer
    /// compact it, and there is no moment at which the snapshot is saved but not yet trimmed.
    async fn compact(
        &self,
        actor: &ActorId,
        snapshot: &Snapshot,
        keep: usize,
        fence: Option<&Lease>,
    ) -> StoreResult<Seq>;

    /// Removes every entry and snapshot of the actor. Its highest seq is kept: the next append
    /// must use `highest + 1`, so a seq is never reused; and no snapshot at or below it is
    /// accepted again (a compaction that was under way cannot bring the deleted state back).
    /// Only while `fence` is held ([`StoreError::LeaseLost`] otherwise, nothing deleted; a
    /// fence is checked as a [`Turn`](crate::store::Turn)'s is): a tool deleting under its
    /// partition's lease deletes nothing once a node has taken the partition from it.
    async fn delete(&self, actor: &ActorId, fence: Option<&Lease>) -> StoreResult<()>;

    /// Makes an actor that has no journal (highest 0) look as if entries `1..=through` had been
    /// written and trimmed: highest and trim point become `through`, so the next append is
    /// `through + 1`. For copying a compacted journal to another store (migrate, import); its
    /// snapshots are saved after. Refused with [`StoreError::Conflict`] if the actor has a
    /// journal already (expected 1, actual its next seq).
    async fn begin_at(&self, actor: &ActorId, through: Seq) -> StoreResult<()>;

    /// Actors that have a journal (including deleted ones), in id order, after `after`.
    async fn list_actors(&self, after: Option<&ActorId>, limit: usize)
    -> StoreResult<Vec<ActorId>>;
}

/// Checks and encodes a batch for [`JournalStore::append`]: numbering, limits, encoding.
///
/// Every backend calls this before touching its store, so the rules are the same everywhere.
pub fn prepare_append(
    actor: &ActorId,
    expected_next: Seq,
    entries: &[Entry],
) -> StoreResult<Vec<Vec<u8>>> {
    if expected_next == 0 {
        return Err(StoreError::InvalidRequest(format!(
            "append to {actor}: expected_next must be at least 1"
        )));
    }
    if entries.len() > MAX_BATCH_ENTRIES {
        return Err(StoreError::TooLarge {
            what: format!("batch for {actor}"),
            size: entries.len(),
            limit: MAX_BATCH_ENTRIES,
            limit_kind: Limit::BatchEntries,
        });
    }
    let mut total = 0usize;
    let mut plain_frames = Vec::with_capacity(entries.len());
    let mut out = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let want = expected_next + index as Seq;
        if entry.seq != want {
            return Err(StoreError::BatchOutOfOrder {
                actor: actor.clone(),
                index,
                found: entry.seq,
                expected: want,
            });
        }
        let plain = encode_entry(actor, entry)?;
        total += plain.len();
        if total > MAX_BATCH_BYTES {
            return Err(StoreError::TooLarge {
                what: format!("batch for {actor}"),
                size: total,
                limit: MAX_BATCH_BYTES,
                limit_kind: Limit::BatchBytes,
            });
        }
        plain_frames.push(plain);
    }
    for plain in plain_frames {
        let frame = codec::compress_frame(plain)
            .map_err(|e| StoreError::InvalidRequest(format!("entry of {actor}: {e}")))?
            .frame;
        out.push(frame);
    }
    Ok(out)
}

/// Encodes one entry as every store does before compressing it, refused
/// ([`StoreError::TooLarge`]) past [`MAX_ENTRY_BYTES`]: limits are on this uncompressed size
/// (see `codec`), so whether an entry fits is known before it is sent.
pub fn encode_entry(actor: &ActorId, entry: &Entry) -> StoreResult<Vec<u8>> {
    let plain = codec::encode(codec::RecordType::Entry, entry)
        .map_err(|e| StoreError::InvalidRequest(format!("entry {} of {actor}: {e}", entry.seq)))?;
    if plain.len() > MAX_ENTRY_BYTES {
        return Err(StoreError::TooLarge {
            what: format!("entry {} of {actor}", entry.seq),
            size: plain.len(),
            limit: MAX_ENTRY_BYTES,
            limit_kind: Limit::EntryBytes,
        });
    }
    codec::check_depth(&plain[codec::HEADER_LEN..], MAX_JSON_DEPTH, || {
        format!("entry {} of {actor}", entry.seq)
    })?;
    Ok(plain)
}

/// Checks and encodes a snapshot for [`JournalStore::save_snapshot`] (size, `keep`, seq 0).
pub fn prepare_snapshot(actor: &ActorId, snapshot: &Snapshot, keep: usize) -> StoreResult<Vec<u8>> {
    if keep == 0 {
        return Err(StoreError::InvalidRequest(format!(
            "snapshot of {actor}: keep must be at least 1"
        )));
    }
    if snapshot.seq == 0 {
        return Err(StoreError::SnapshotRefused {
            actor: actor.clone(),
            seq: 0,
            reason: "seq 0 covers no entry".into(),
        });
    }
    let plain = codec::encode(codec::RecordType::Snapshot, snapshot)
        .map_err(|e| StoreError::InvalidRequest(format!("snapshot of {actor}: {e}")))?;
    // Limits are on the uncompressed size (see `codec`), checked before compressing.
    if plain.len() > MAX_SNAPSHOT_BYTES {
        return Err(StoreError::TooLarge {
            what: format!("snapshot {} of {actor}", snapshot.seq),
            size: plain.len(),
            limit: MAX_SNAPSHOT_BYTES,
            limit_kind: Limit::SnapshotBytes,
        });
    }
    codec::check_depth(&plain[codec::HEADER_LEN..], MAX_JSON_DEPTH, || {
        format!("snapshot {} of {actor}", snapshot.seq)
    })?;
    codec::compress_frame(plain)
        .map(|e| e.frame)
        .map_err(|e| StoreError::InvalidRequest(format!("snapshot of {actor}: {e}")))
}

/// One page of a [`paged_read`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Page {
    /// The entries, in seq order.
    pub entries: Vec<Entry>,
    /// The journal's trim point, read in the same transaction (or snapshot) as the entries, if
    /// the fetch was asked for it.
    pub trimmed_through: Option<Seq>,
    /// The page ended before the entries asked for because of its size (a backend that sends
    /// pages over the network stops one after [`READ_PAGE_BYTES`]): more may follow. A page
    /// short without it means the journal holds nothing more in range.
    pub cut_short: bool,
}

/// Where a backend that sends a read's pages over the network ends one: after the entry that
/// takes it past this many bytes of frames (so one entry at least, and at most this plus one
/// entry's [`MAX_ENTRY_BYTES`](crate::limits::MAX_ENTRY_BYTES)). A page of 1 024 entries of
/// 4 MiB would otherwise be 4 GiB in one answer, held in memory and bounded by one statement's
/// time.
pub const READ_PAGE_BYTES: usize = 16 * 1024 * 1024;

/// Builds a [`JournalStore::read`] stream from a page fetcher.
///
/// `fetch(from, to, limit, with_trim)` returns up to `limit` entries with seqs in `from..=to`,
/// in order, and, when `with_trim` is true, the trim point as of the same read (asked for the
/// first page of a [strict](SeqRange::strict) read only). The stream asks for the next page
/// only when the previous one is consumed, so memory stays bounded by one page. It checks that
/// the entries are gapless: the first page may start after `range.from` (those entries were
/// trimmed) unless the read is strict, but after that every entry must follow the last, or the
/// stream yields [`StoreError::Gap`] and ends.
pub fn paged_read<F, Fut>(actor: ActorId, range: SeqRange, page: usize, fetch: F) -> EntryStream
where
    F: FnMut(Seq, Seq, usize, bool) -> Fut + Send + 'static,
    Fut: Future<Output = StoreResult<Page>> + Send + 'static,
{
    struct State<F> {
        actor: ActorId,
        next: Seq,
        to: Seq,
        left: u64,
        strict: bool,
        started: bool,
        done: bool,
        page: usize,
        fetch: F,
    }
    if range.is_empty() {
        return stream::empty().boxed();
    }
    let state = State {
        actor,
        next: range.from.max(1),
        to: range.to,
        left: range.max,
        strict: range.strict,
        started: false,
        done: false,
        page: page.max(1),
        fetch,
    };
    stream::unfold(state, |mut st| async move {
        if st.done || st.left == 0 || st.next > st.to {
            return None;
        }
        let limit = usize::try_from(st.left).unwrap_or(usize::MAX).min(st.page);
        let strict = st.strict && !st.started;
        let page = match (st.fetch)(st.next, st.to, limit, strict).await {
            Ok(p) => p,
            Err(e) => {
                st.done = true;
                return Some((vec![Err(e)], st));
            }
        };
        if strict {
            // The reader's state covers `..next`; if what follows was trimmed, it cannot go on.
            match page.trimmed_through {
                Some(t) if t >= st.next => {
                    st.done = true;
                    let gap = StoreError::Gap {
                        actor: st.actor.clone(),
                        expected: st.next,
                        found: t + 1,
                    };
                    return Some((vec![Err(gap)], st));
                }
                Some(_) => {}
                None => {
                    st.done = true;
                    let e = StoreError::InvalidRequest(format!(
                        "read of {}: the store gave no trim point for a strict read",
                        st.actor
                    ));
                    return Some((vec![Err(e)], st));
                }
            }
            // Untrimmed from `next` on: the first entry, if any, must be `next` itself.
            st.started = true;
        }
        let batch = page.entries;
        if batch.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(batch.len());
        for entry in batch {
            if st.left == 0 || entry.seq > st.to {
                st.done = true;
                break;
            }
            if (st.started && entry.seq != st.next) || entry.seq < st.next {
                out.push(Err(StoreError::Gap {
                    actor: st.actor.clone(),
                    expected: st.next,
                    found: entry.seq,
                }));
                st.done = true;
                break;
            }
            st.started = true;
            st.next = entry.seq + 1;
            st.left -= 1;
            out.push(Ok(entry));
        }
        if out.len() < limit && !page.cut_short {
            // A short page means the journal has nothing more in range right now.
            st.done = true;
        }
        Some((out, st))
    })
    .flat_map(stream::iter)
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EntryKind;

    fn large() -> serde_json::Value {
        serde_json::json!(
            (0..2000)
                .map(|i| format!("row {i} of a large state"))
                .collect::<Vec<_>>()
        )
    }

    /// What every backend stores: large entries and snapshots compressed, small ones plain.
    /// A page cut short for its size is not the end: the stream asks for the next one; a page
    /// short without the flag is.
    #[tokio::test]
    async fn a_page_cut_short_for_its_size_is_followed_by_the_next() {
        use futures::StreamExt;
        let actor = ActorId::new("t", "a").unwrap();
        let read = |cut: bool| {
            paged_read(
                actor.clone(),
                SeqRange::all(),
                10,
                move |from, to, _limit, _| async move {
                    // Two entries a page, of the ten the journal holds.
                    let entries = (from..=to.min(10))
                        .take(2)
                        .map(|s| Entry::new(s, EntryKind::Completed { reply: s.into() }))
                        .collect::<Vec<_>>();
                    Ok(Page {
                        cut_short: cut && !entries.is_empty(),
                        entries,
                        trimmed_through: None,
                    })
                },
            )
            .map(|e| e.unwrap().seq)
            .collect::<Vec<_>>()
        };
        assert_eq!(read(true).await, (1..=10).collect::<Vec<_>>());
        assert_eq!(read(false).await, vec![1, 2]);
    }

    #[test]
    fn stores_get_large_records_compressed_and_small_ones_plain() {
        let a = ActorId::new("t", "a").unwrap();
        let frames = prepare_append(
            &a,
            1,
            &[
                Entry::new(1, EntryKind::Completed { reply: large() }),
                Entry::new(2, EntryKind::Completed { reply: 1.into() }),
            ],
        )
        .unwrap();
        assert_eq!(frames[0][0], codec::FORMAT_ZSTD);
        assert_eq!(frames[1][0], codec::FORMAT_VERSION);
        let snap = prepare_snapshot(&a, &Snapshot::new(1, large()), 1).unwrap();
        assert_eq!(snap[0], codec::FORMAT_ZSTD);
    }
}
