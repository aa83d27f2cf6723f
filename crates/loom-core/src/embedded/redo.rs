//! The redo log: how a group commit becomes durable without redb fsyncing its B-tree pages.
//!
//! An on-disk store runs every batch in a redb transaction committed with `Durability::None`
//! (in memory and the OS page cache, no fsync), and records the batch's writes, byte for byte,
//! as one record appended to `loom.redo`. A separate thread writes and `fdatasync`s the log, and
//! only then are the batch's callers answered. Every so often (see `writer.rs`) the writer makes
//! the redb file itself durable with one `Durability::Immediate` commit, a *checkpoint*; then the
//! log is emptied. A checkpoint stores the number of the last batch it covers as `redo_lsn` in
//! [`META`](super::tables::META); so does the store when it closes (redb makes every committed
//! batch durable then), so whatever state of redb is durable names the last batch it holds. On
//! open, records after `redo_lsn` are applied again ([`replay`]).
//!
//! Why: a batch of appends to many actors dirties one B-tree leaf per actor, and redb's own
//! durable commit writes and fsyncs every such page (4 KiB per 300-byte entry). The log writes
//! each entry once, sequentially, which is what the raw-file baseline measures. Checkpoints
//! write each dirty page once per interval instead of once per batch.
//!
//! Invariants (rules D1–D4 of RELIABILITY.md):
//! - D1: a batch is acknowledged only after its record (or a later checkpoint) is durable.
//! - Records carry consecutive sequence numbers (LSNs). The log holds, after an 8-byte header,
//!   records with LSNs `redo_lsn + 1, redo_lsn + 2, …` (older ones may precede them between a
//!   checkpoint and the truncation that follows it; replay skips them).
//! - A record holds exactly the writes of its batch, in the order they were made, so applying
//!   it to the state after the previous batch gives the state after this one.
//! - D2: nothing a read returns comes from a batch that is not durable yet: a read notes the last
//!   batch that may be visible to it ([`Durability::visible`], raised *before* each commit) and
//!   waits for the log to reach it. Once the log fails, reads and writes fail until the store
//!   is opened again, and the reopened store has every acknowledged batch.
//! - Only records written after the last completed `fdatasync` can be torn by a crash, and none
//!   of them was acknowledged. Each record carries `durable`, the last batch known durable when
//!   it was sealed; so a valid record after a bad one that says the batch the bad one should
//!   hold was already durable proves the bad bytes are damage, not a tear (rule D4). Replay
//!   stops at the first record that is incomplete or fails its checksum and then:
//!   - if the next valid record the checkpoint does not cover is the one replay needs next
//!     (the bad bytes held a record a checkpoint already covers), skips the bad bytes and goes
//!     on;
//!   - if records replay needs are missing and a later record proves them durable, refuses to
//!     open with [`StoreError::Corrupt`] naming the file and the byte offset (the log is left
//!     as it is; `loom redo salvage` opens the store without them, keeping them aside);
//!   - otherwise it is a torn tail: drops it (keeping a copy as `loom.redo.torn-<ms>`) and
//!     empties the log.
//!
//!   Intact records with a gap in their LSNs (no bad bytes between) are damage too, whatever
//!   the stamps say: a crash cannot make them.
//!
//!   A tear can only be told from damage if a later record exists: damage to the records of
//!   the very last `fdatasync` before a crash looks like a tear, and they are dropped with the
//!   warning and the kept copy.
//!
//! Record layout (integers little-endian; version 2 of the log):
//!
//! ```text
//! file:   "LOOMRDO2" record*
//! record: "LRec" | body_len u32 | crc32(body) u32 | body
//! body:   lsn u64 | durable u64 | op*
//! op:     1 table u8 key_len u32 key value_len u32 value     insert (or replace)
//!         2 table u8 key_len u32 key                         remove
//!         3 table u8 first_len u32 first last_len u32 last    remove every key in first..=last
//! ```
//!
//! Version 1 (`"LOOMRDO1"`, records without the mark and without `durable`) is still read, so
//! that a log left by an older build is replayed; the log is rewritten as version 2 after.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use redb::{Key, Table, TableDefinition, Value, WriteTransaction};
use tokio::sync::watch;

use crate::codec::CodecError;
use crate::error::{StoreError, StoreResult};

use super::tables::se;

/// Name of the redo log inside the data directory.
pub const REDO_FILE: &str = "loom.redo";

/// The first bytes of a redo log; the digit is the format version.
pub(super) const MAGIC: &[u8; 8] = b"LOOMRDO2";

/// The first bytes of a version 1 log (read for replay only).
const MAGIC_V1: &[u8; 8] = b"LOOMRDO1";

/// The first bytes of every version 2 record: what a scan for the records after damaged bytes
/// looks for.
const MARK: &[u8; 4] = b"LRec";

/// A batch stops taking requests once its record passes this size (the request that passed it
/// stays in; the rest wait for the next batch), so a record is at most this plus one request,
/// and one request is bounded by the store's limits (`limits.rs`) to well below [`MAX_RECORD`],
/// except a turn sending a great many messages: a batch whose record would pass
/// [`MAX_RECORD`] is refused whole (`writer.rs`).
pub(super) const RECORD_SOFT_CAP: usize = 64 << 20;

/// Largest record accepted: anything larger is refused when sealing, and ends replay.
pub(super) const MAX_RECORD: usize = 1 << 30;

const INSERT: u8 = 1;
const REMOVE: u8 = 2;
const REMOVE_RANGE: u8 = 3;

/// Where one batch's writes go: counted always (so that the writer can tell whether a request
/// wrote anything), and recorded byte for byte when the store keeps a log.
#[derive(Clone, Copy)]
pub(super) struct Sink<'t> {
    record: Option<&'t RefCell<Vec<u8>>>,
    writes: &'t std::cell::Cell<u64>,
}

impl<'t> Sink<'t> {
    /// Counting into `writes`, and recording into `record` if there is a log.
    pub(super) fn new(
        record: Option<&'t RefCell<Vec<u8>>>,
        writes: &'t std::cell::Cell<u64>,
    ) -> Self {
        Sink { record, writes }
    }
}

/// A table that records every write it makes into the batch's [`Sink`]. Reads go straight to
/// the redb table through `Deref`; writes are only possible through the methods below, so none
/// can bypass the log.
pub(super) struct Rec<'t, K: Key + 'static, V: Value + 'static> {
    table: Table<'t, K, V>,
    id: u8,
    sink: Sink<'t>,
}

impl<'t, K: Key + 'static, V: Value + 'static> Rec<'t, K, V> {
    /// Opens table `def`, known in the log as `id`.
    pub(super) fn open(
        txn: &'t WriteTransaction,
        sink: Sink<'t>,
        id: u8,
        def: TableDefinition<K, V>,
    ) -> StoreResult<Self> {
        Ok(Rec {
            table: txn.open_table(def).map_err(se)?,
            id,
            sink,
        })
    }

    fn record(&self, op: u8, a: &[u8], b: Option<&[u8]>) {
        self.sink.writes.set(self.sink.writes.get() + 1);
        if let Some(sink) = self.sink.record {
            let mut buf = sink.borrow_mut();
            buf.push(op);
            buf.push(self.id);
            put_bytes(&mut buf, a);
            if let Some(b) = b {
                put_bytes(&mut buf, b);
            }
        }
    }

    /// Inserts or replaces `key`.
    pub(super) fn insert<'k, 'v>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        value: impl Borrow<V::SelfType<'v>>,
    ) -> Result<(), redb::StorageError> {
        let (key, value) = (key.borrow(), value.borrow());
        self.table.insert(key, value)?;
        // Recorded after redb took it: a write redb refused is not in the batch.
        self.record(
            INSERT,
            K::as_bytes(key).as_ref(),
            Some(V::as_bytes(value).as_ref()),
        );
        Ok(())
    }

    /// Removes `key` if present. Recorded only if it was: a remove of nothing (an ack's
    /// cancellation mark, which most messages never get) costs the redo log nothing.
    pub(super) fn remove<'k>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
    ) -> Result<(), redb::StorageError> {
        let key = key.borrow();
        if self.table.remove(key)?.is_some() {
            self.record(REMOVE, K::as_bytes(key).as_ref(), None);
        }
        Ok(())
    }

    /// Removes every key in `first..=last`.
    pub(super) fn remove_range<'k>(
        &mut self,
        first: K::SelfType<'k>,
        last: K::SelfType<'k>,
    ) -> Result<(), redb::StorageError> {
        let (a, b) = (
            K::as_bytes(&first).as_ref().to_vec(),
            K::as_bytes(&last).as_ref().to_vec(),
        );
        self.table.retain_in(first..=last, |_, _| false)?;
        self.record(REMOVE_RANGE, &a, Some(&b));
        Ok(())
    }

    /// Applies one logged write to this table, recording it in the batch's record if the
    /// batch has one (replay's has none; a copy between stores, `repartition.rs`, does).
    fn apply(&mut self, op: &Op<'_>) -> Result<(), redb::StorageError> {
        match *op {
            Op::Insert { key, value, .. } => {
                self.table
                    .insert(K::from_bytes(key), V::from_bytes(value))?;
                self.record(INSERT, key, Some(value));
            }
            Op::Remove { key, .. } => {
                self.table.remove(K::from_bytes(key))?;
                self.record(REMOVE, key, None);
            }
            Op::RemoveRange { first, last, .. } => {
                self.table
                    .retain_in(K::from_bytes(first)..=K::from_bytes(last), |_, _| false)?;
                self.record(REMOVE_RANGE, first, Some(last));
            }
        }
        Ok(())
    }
}

impl<'t, K: Key + 'static, V: Value + 'static> Deref for Rec<'t, K, V> {
    type Target = Table<'t, K, V>;

    fn deref(&self) -> &Self::Target {
        &self.table
    }
}

/// Applies logged writes to tables; implemented by the store's table set (see `tables.rs`).
pub(super) trait Apply {
    /// The table known in the log as `id`, or `None` for an unknown id.
    fn apply(&mut self, op: &Op<'_>) -> StoreResult<()>;
}

/// Applies `op` to `table` (for [`Apply`] implementations).
pub(super) fn apply_to<K: Key + 'static, V: Value + 'static>(
    table: &mut Rec<'_, K, V>,
    op: &Op<'_>,
) -> StoreResult<()> {
    table.apply(op).map_err(se)
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    // Keys and values are bounded far below 4 GiB by redb and by the store's limits.
    buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
    buf.extend_from_slice(b);
}

/// One logged write, borrowed from a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op<'a> {
    Insert {
        table: u8,
        key: &'a [u8],
        value: &'a [u8],
    },
    Remove {
        table: u8,
        key: &'a [u8],
    },
    RemoveRange {
        table: u8,
        first: &'a [u8],
        last: &'a [u8],
    },
}

impl Op<'_> {
    /// The table the write is to.
    pub(super) fn table(&self) -> u8 {
        match *self {
            Op::Insert { table, .. } | Op::Remove { table, .. } | Op::RemoveRange { table, .. } => {
                table
            }
        }
    }
}

/// Bytes before a record's body: mark, length, checksum.
const RECORD_HEAD: usize = 12;

/// The header, LSN and durable slots a batch's sink starts with; [`seal`] fills them in.
pub(super) const RECORD_PREFIX: usize = RECORD_HEAD + 16;

/// A fresh sink buffer, with room for the record header.
pub(super) fn new_record() -> Vec<u8> {
    let mut buf = Vec::with_capacity(4096);
    buf.resize(RECORD_PREFIX, 0);
    buf
}

/// Turns a sink buffer into a finished record for batch `lsn`, stamped with `durable`, the last
/// batch known durable now; `None` if it is larger than any record may be (see
/// [`RECORD_SOFT_CAP`]: that takes a bug).
pub(super) fn seal(mut buf: Vec<u8>, lsn: u64, durable: u64) -> Option<Vec<u8>> {
    buf[RECORD_HEAD..RECORD_HEAD + 8].copy_from_slice(&lsn.to_le_bytes());
    buf[RECORD_HEAD + 8..RECORD_PREFIX].copy_from_slice(&durable.to_le_bytes());
    let body_len = u32::try_from(buf.len() - RECORD_HEAD)
        .ok()
        .filter(|&n| (n as usize) < MAX_RECORD)?;
    let crc = crc32fast::hash(&buf[RECORD_HEAD..]);
    buf[0..4].copy_from_slice(MARK);
    buf[4..8].copy_from_slice(&body_len.to_le_bytes());
    buf[8..12].copy_from_slice(&crc.to_le_bytes());
    Some(buf)
}

/// Splits a record body (after its LSN) into writes.
fn ops(mut body: &[u8]) -> Result<Vec<Op<'_>>, String> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err(format!("a write is cut short ({} of {n} bytes)", b.len()));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn bytes<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], String> {
        let len = u32::from_le_bytes(take(b, 4)?.try_into().map_err(|_| "length")?);
        take(b, len as usize)
    }
    let mut out = Vec::new();
    while !body.is_empty() {
        let head = take(&mut body, 2)?;
        let (kind, table) = (head[0], head[1]);
        out.push(match kind {
            INSERT => Op::Insert {
                table,
                key: bytes(&mut body)?,
                value: bytes(&mut body)?,
            },
            REMOVE => Op::Remove {
                table,
                key: bytes(&mut body)?,
            },
            REMOVE_RANGE => Op::RemoveRange {
                table,
                first: bytes(&mut body)?,
                last: bytes(&mut body)?,
            },
            other => return Err(format!("unknown write kind {other}")),
        });
    }
    Ok(out)
}

/// What [`replay`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Replayed {
    /// Records applied again.
    pub(super) records: u64,
    /// The LSN of the last batch now in redb.
    pub(super) last_lsn: u64,
    /// Bytes of a torn tail that were dropped (from the end of the log).
    pub(super) torn_bytes: u64,
    /// Damaged bytes skipped because the records after them were all there (rot in a record a
    /// checkpoint already covered).
    pub(super) skipped_bytes: u64,
    /// Acknowledged batches are missing (see [`Damage`]); nothing after them was applied.
    pub(super) damage: Option<Damage>,
}

/// Damage in the middle of the log: records replay needs are missing or unreadable, and a later
/// record proves they had been made durable (acknowledged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Damage {
    /// Where the damaged bytes start.
    pub(super) offset: u64,
    /// Bytes from there to the end of the log.
    pub(super) bytes: u64,
    /// The last batch replayed before them.
    pub(super) after: u64,
    /// The last batch a later record says was durable.
    pub(super) durable: u64,
}

/// A record that passed its checks, at some offset of the log.
#[derive(Debug, Clone, Copy)]
struct Found<'a> {
    lsn: u64,
    durable: u64,
    ops: &'a [u8],
    /// Offset just past it.
    end: usize,
}

/// The version 2 record at `at`, if one is there whole and intact.
fn record_at(log: &[u8], at: usize) -> Option<Found<'_>> {
    let rest = log.get(at..)?;
    if rest.get(..4)? != MARK {
        return None;
    }
    let len = u32::from_le_bytes(rest.get(4..8)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(rest.get(8..12)?.try_into().ok()?);
    if !(16..MAX_RECORD).contains(&len) {
        return None;
    }
    let body = rest.get(RECORD_HEAD..RECORD_HEAD + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    Some(Found {
        lsn: u64::from_le_bytes(body[0..8].try_into().ok()?),
        durable: u64::from_le_bytes(body[8..16].try_into().ok()?),
        ops: &body[16..],
        end: at + RECORD_HEAD + len,
    })
}

/// The first intact record after `from` (a scan for the mark, as the bad bytes' own length may
/// be what is damaged).
fn next_record(log: &[u8], from: usize) -> Option<(usize, Found<'_>)> {
    let mut at = from;
    while at + MARK.len() <= log.len() {
        let i = log[at..].windows(MARK.len()).position(|w| w == MARK)?;
        if let Some(f) = record_at(log, at + i) {
            return Some((at + i, f));
        }
        at += i + 1;
    }
    None
}

/// The last batch the intact records from `from` on say was durable.
fn durable_after(log: &[u8], from: usize) -> u64 {
    let mut durable = 0;
    let mut scan = from;
    while let Some((_, f)) = next_record(log, scan) {
        durable = durable.max(f.durable);
        scan = f.end;
    }
    durable
}

/// Applies the records of `log` that come after `checkpoint` to `tables`, in order; see the
/// module documentation for what happens at bad bytes. A record that passes its checks but
/// does not follow the one before it (when nothing bad lies between) is damage; one whose
/// writes do not parse is an error.
pub(super) fn replay(log: &[u8], checkpoint: u64, tables: &mut dyn Apply) -> StoreResult<Replayed> {
    let corrupt = |msg: String| StoreError::corrupt(REDO_FILE, CodecError::Body(msg));
    let mut out = Replayed {
        last_lsn: checkpoint,
        ..Replayed::default()
    };
    if log.is_empty() {
        return Ok(out);
    }
    if log.len() >= MAGIC_V1.len() && &log[..MAGIC_V1.len()] == MAGIC_V1 {
        return replay_v1(log, checkpoint, tables);
    }
    if log.len() < MAGIC.len() || &log[..MAGIC.len()] != MAGIC {
        return Err(corrupt(
            "the file does not start with a redo log header".into(),
        ));
    }
    let mut at = MAGIC.len();
    while at < log.len() {
        let found = match record_at(log, at) {
            Some(f) => f,
            None => {
                // The first intact record after the bad bytes that the checkpoint does not
                // cover (a covered one says nothing of what the bad bytes held).
                let mut next = next_record(log, at + 1);
                while let Some((_, f)) = next
                    && f.lsn <= checkpoint
                {
                    next = next_record(log, f.end);
                }
                let needed = out.last_lsn + 1;
                match next {
                    // What follows is exactly what replay needs: the bad bytes (and any
                    // covered records among them) held nothing it needs.
                    Some((p, f)) if f.lsn == needed => {
                        tracing::warn!(
                            offset = at,
                            bytes = p - at,
                            "skipped damaged bytes in the redo log that held no batch replay needs"
                        );
                        out.skipped_bytes += (p - at) as u64;
                        f
                    }
                    Some((p, _)) => {
                        let durable = durable_after(log, p);
                        if durable >= needed {
                            out.damage = Some(Damage {
                                offset: at as u64,
                                bytes: (log.len() - at) as u64,
                                after: out.last_lsn,
                                durable,
                            });
                        } else {
                            out.torn_bytes = (log.len() - at) as u64;
                        }
                        break;
                    }
                    None => {
                        out.torn_bytes = (log.len() - at) as u64;
                        break;
                    }
                }
            }
        };
        if found.lsn <= checkpoint {
            at = found.end;
            continue;
        }
        if found.lsn != out.last_lsn + 1 {
            // Intact records with a gap between them: records are missing, though no bytes
            // are bad (a crash cannot do that; an edit or a copy can). Damage, whatever the
            // later records say was durable: nothing from here on is applied.
            out.damage = Some(Damage {
                offset: at as u64,
                bytes: (log.len() - at) as u64,
                after: out.last_lsn,
                durable: durable_after(log, at).max(found.lsn - 1),
            });
            break;
        }
        at = found.end;
        for op in ops(found.ops).map_err(|e| corrupt(format!("record {}: {e}", found.lsn)))? {
            tables.apply(&op)?;
        }
        out.records += 1;
        out.last_lsn = found.lsn;
    }
    Ok(out)
}

/// Replay of a version 1 log (no marks, no durable stamps): the first bad record ends it.
fn replay_v1(log: &[u8], checkpoint: u64, tables: &mut dyn Apply) -> StoreResult<Replayed> {
    let corrupt = |msg: String| StoreError::corrupt(REDO_FILE, CodecError::Body(msg));
    let mut at = MAGIC_V1.len();
    let mut out = Replayed {
        last_lsn: checkpoint,
        ..Replayed::default()
    };
    while at < log.len() {
        let rest = &log[at..];
        let Some(body) = rest.get(8..).and_then(|tail| {
            let len = u32::from_le_bytes(rest[0..4].try_into().ok()?) as usize;
            let crc = u32::from_le_bytes(rest[4..8].try_into().ok()?);
            let body = tail.get(..len).filter(|_| (8..MAX_RECORD).contains(&len))?;
            (crc32fast::hash(body) == crc).then_some(body)
        }) else {
            out.torn_bytes = rest.len() as u64;
            break;
        };
        at += 8 + body.len();
        let lsn = u64::from_le_bytes(body[0..8].try_into().map_err(|_| corrupt("lsn".into()))?);
        if lsn <= checkpoint {
            continue;
        }
        if lsn != out.last_lsn + 1 {
            return Err(corrupt(format!(
                "record {lsn} follows record {} (records are missing)",
                out.last_lsn
            )));
        }
        for op in ops(&body[8..]).map_err(|e| corrupt(format!("record {lsn}: {e}")))? {
            tables.apply(&op)?;
        }
        out.records += 1;
        out.last_lsn = lsn;
    }
    Ok(out)
}

/// The file the log is written to. A trait so that tests can make writes and syncs fail.
pub trait RedoFile: Send + 'static {
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes everything written so far durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Cuts the file to `len` bytes, durably.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

impl RedoFile for File {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)?;
        self.sync_all()
    }
}

/// How far batches have got: shared by the writer, the log thread and readers.
pub(super) struct Durability {
    /// The last batch that may be visible to a read: raised before each redb commit.
    visible: AtomicU64,
    /// The last batch that is durable, and whether the log has failed.
    durable: watch::Sender<Durable>,
}

#[derive(Debug, Clone, Default)]
struct Durable {
    lsn: u64,
    failed: Option<StoreError>,
}

impl Durability {
    pub(super) fn new(lsn: u64) -> Self {
        Durability {
            visible: AtomicU64::new(lsn),
            durable: watch::Sender::new(Durable { lsn, failed: None }),
        }
    }

    /// Called before committing batch `lsn`: reads that begin from now on may see it.
    pub(super) fn commit_begins(&self, lsn: u64) {
        self.visible.store(lsn, Ordering::SeqCst);
    }

    /// The last batch a read that has begun may see.
    pub(super) fn visible(&self) -> u64 {
        self.visible.load(Ordering::SeqCst)
    }

    /// The last batch that is durable.
    pub(super) fn durable(&self) -> u64 {
        self.durable.borrow().lsn
    }

    fn durable_through(&self, lsn: u64) {
        self.durable.send_modify(|d| d.lsn = d.lsn.max(lsn));
    }

    /// Latches a failure: from now on nothing more becomes durable, and every request and every
    /// read that could see an undurable batch fails.
    pub(super) fn fail(&self, e: &StoreError) {
        self.durable.send_modify(|d| {
            d.failed.get_or_insert_with(|| e.clone());
        });
    }

    /// The log's failure, if it has failed.
    pub(super) fn failure(&self) -> Option<StoreError> {
        self.durable.borrow().failed.as_ref().map(failed)
    }

    /// Waits until batch `lsn` is durable; fails if the log failed first.
    pub(super) async fn wait(&self, lsn: u64) -> StoreResult<()> {
        let mut rx = self.durable.subscribe();
        let d = rx
            .wait_for(|d| d.lsn >= lsn || d.failed.is_some())
            .await
            .map_err(|_| StoreError::Closed)?;
        match &d.failed {
            Some(e) if d.lsn < lsn => Err(failed(e)),
            _ => Ok(()),
        }
    }
}

/// What every request gets once the store has failed: a `Storage` error whose source is the
/// first failure (so that its cause, a full disk say, is still there to find).
fn failed(e: &StoreError) -> StoreError {
    StoreError::storage(super::tables::BACKEND, Latched(e.clone()))
}

/// The store failed earlier with this error, and takes no writes until it is opened again.
#[derive(Debug, thiserror::Error)]
#[error(
    "the embedded store failed ({0}); nothing written since was acknowledged; it reopens itself once it can"
)]
struct Latched(#[source] StoreError);

/// Called with the batch's failure, if any, once its record is durable (or never will be).
pub(super) type Done = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// What the writer hands the log thread: a sealed batch record, and what to do once it is
/// durable.
pub(super) struct Item {
    pub(super) lsn: u64,
    pub(super) bytes: Vec<u8>,
    pub(super) done: Vec<Done>,
}

/// The log file and where the next record goes. Shared by the log thread and the writer, which
/// writes a record itself when nothing else is waiting (one thread hand-off less per batch),
/// and empties the log after a checkpoint. Records reach the file in LSN order, except that
/// records a checkpoint already covers may still be written after it emptied the log (replay
/// skips them): the writer writes one itself only once every earlier one is durable.
/// Emptying happens only here, under the lock, and only through the checkpoint's LSN.
pub(super) struct LogFile {
    file: Box<dyn RedoFile>,
    offset: u64,
    failure: Option<StoreError>,
}

impl LogFile {
    pub(super) fn new(file: Box<dyn RedoFile>, offset: u64) -> Self {
        LogFile {
            file,
            offset,
            failure: None,
        }
    }

    /// Writes `records` (the last one being batch `last`) and syncs them. After a failure,
    /// every later call fails too.
    pub(super) fn append(
        &mut self,
        records: &[&[u8]],
        last: u64,
        durability: &Durability,
    ) -> Result<(), StoreError> {
        if let Some(e) = &self.failure {
            return Err(e.clone());
        }
        let result = (|| {
            for bytes in records {
                self.file.write_all_at(bytes, self.offset)?;
                self.offset += bytes.len() as u64;
            }
            self.file.sync_data()
        })();
        match result {
            Ok(()) => {
                durability.durable_through(last);
                Ok(())
            }
            Err(e) => Err(self.fail(e, durability)),
        }
    }

    /// Empties the log after a checkpoint through batch `lsn`.
    pub(super) fn truncate(&mut self, lsn: u64, durability: &Durability) -> Result<(), StoreError> {
        if let Some(e) = &self.failure {
            return Err(e.clone());
        }
        match self.file.truncate(MAGIC.len() as u64) {
            Ok(()) => {
                self.offset = MAGIC.len() as u64;
                durability.durable_through(lsn);
                Ok(())
            }
            Err(e) => Err(self.fail(e, durability)),
        }
    }

    fn fail(&mut self, e: io::Error, durability: &Durability) -> StoreError {
        tracing::error!(error = %e, "the redo log failed; the store takes no more writes until it is opened again");
        let e = StoreError::storage(super::tables::BACKEND, e);
        durability.fail(&e);
        self.failure = Some(e.clone());
        e
    }
}

/// Latches the store failed if the thread it lives on panics (rule D3): a batch may be visible
/// and not durable, and without the latch a read waiting for it would wait forever.
pub(super) struct LatchOnPanic<'a> {
    pub(super) durability: &'a Durability,
    pub(super) thread: &'static str,
}

impl Drop for LatchOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let e = StoreError::storage(
                super::tables::BACKEND,
                io::Error::other(format!(
                    "the embedded store's {} thread panicked",
                    self.thread
                )),
            );
            tracing::error!(error = %e, "the store takes no more writes until it is opened again");
            self.durability.fail(&e);
        }
    }
}

/// The log thread: writes records in order, one `fdatasync` for all that are waiting.
pub(super) fn log_loop(
    file: &std::sync::Mutex<LogFile>,
    rx: &mpsc::Receiver<Item>,
    durability: &Durability,
) {
    let _latch = LatchOnPanic {
        durability,
        thread: "log",
    };
    while let Ok(first) = rx.recv() {
        let mut items = vec![first];
        while let Ok(item) = rx.try_recv() {
            items.push(item);
        }
        let last = items.last().map_or(0, |i| i.lsn);
        let records: Vec<&[u8]> = items.iter().map(|i| i.bytes.as_slice()).collect();
        let result = file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(&records, last, durability);
        let failure = result.err();
        for item in items {
            for d in item.done {
                d(failure.as_ref());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One applied write: (kind, table, key or first, value or last).
    type Applied = (u8, u8, Vec<u8>, Vec<u8>);

    struct Collect(Vec<Applied>);

    impl Apply for Collect {
        fn apply(&mut self, op: &Op<'_>) -> StoreResult<()> {
            self.0.push(match *op {
                Op::Insert { table, key, value } => (INSERT, table, key.to_vec(), value.to_vec()),
                Op::Remove { table, key } => (REMOVE, table, key.to_vec(), vec![]),
                Op::RemoveRange { table, first, last } => {
                    (REMOVE_RANGE, table, first.to_vec(), last.to_vec())
                }
            });
            Ok(())
        }
    }

    /// (kind, table, key or first, value or last)
    type Write<'a> = (u8, u8, &'a [u8], Option<&'a [u8]>);

    fn record_stamped(lsn: u64, durable: u64, writes: &[Write<'_>]) -> Vec<u8> {
        let mut buf = new_record();
        for (op, table, a, b) in writes {
            buf.push(*op);
            buf.push(*table);
            put_bytes(&mut buf, a);
            if let Some(b) = b {
                put_bytes(&mut buf, b);
            }
        }
        seal(buf, lsn, durable).expect("small record")
    }

    /// A record written after the one before it was synced (the common case one at a time).
    fn record(lsn: u64, writes: &[Write<'_>]) -> Vec<u8> {
        record_stamped(lsn, lsn - 1, writes)
    }

    fn log(records: &[Vec<u8>]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for r in records {
            out.extend_from_slice(r);
        }
        out
    }

    fn put(n: u8) -> Vec<u8> {
        record(u64::from(n), &[(INSERT, 1, &[n], Some(b"v"))])
    }

    #[test]
    fn records_after_the_checkpoint_are_applied_in_order() {
        let l = log(&[
            record(4, &[(INSERT, 1, b"old", Some(b"x"))]),
            record(
                5,
                &[(INSERT, 1, b"k", Some(b"v")), (REMOVE, 2, b"gone", None)],
            ),
            record(6, &[(REMOVE_RANGE, 3, b"a", Some(b"z"))]),
        ]);
        let mut c = Collect(vec![]);
        let r = replay(&l, 4, &mut c).unwrap();
        assert_eq!(
            r,
            Replayed {
                records: 2,
                last_lsn: 6,
                ..Replayed::default()
            }
        );
        assert_eq!(
            c.0,
            vec![
                (INSERT, 1, b"k".to_vec(), b"v".to_vec()),
                (REMOVE, 2, b"gone".to_vec(), vec![]),
                (REMOVE_RANGE, 3, b"a".to_vec(), b"z".to_vec()),
            ]
        );
    }

    #[test]
    fn a_torn_tail_ends_the_log_at_every_cut() {
        let full = log(&[put(1), put(2)]);
        let first_end = MAGIC.len() + put(1).len();
        for cut in first_end..full.len() {
            let mut c = Collect(vec![]);
            let r = replay(&full[..cut], 0, &mut c).unwrap();
            assert_eq!(r.records, 1, "cut at {cut}");
            assert_eq!(r.torn_bytes, (cut - first_end) as u64);
            assert_eq!(r.damage, None);
        }
        // A flipped bit in the last record is a torn tail too: nothing after it vouches for it.
        let mut flipped = full.clone();
        let n = flipped.len();
        flipped[n - 1] ^= 0x40;
        let r = replay(&flipped, 0, &mut Collect(vec![])).unwrap();
        assert_eq!((r.last_lsn, r.damage), (1, None));
    }

    /// Three acknowledged batches, one at a time: the first one's bytes rot. The records after
    /// it say it was durable, so this is damage, not a tear: nothing after it is applied, and
    /// the offset is reported.
    #[test]
    fn damage_vouched_for_by_a_later_record_is_not_a_tear() {
        let l = log(&[put(1), put(2), put(3)]);
        for flip in [
            MAGIC.len() + RECORD_PREFIX + 3,
            MAGIC.len() + 5,
            MAGIC.len(),
        ] {
            let mut bad = l.clone();
            bad[flip] ^= 0x08;
            let mut c = Collect(vec![]);
            let r = replay(&bad, 0, &mut c).unwrap();
            assert_eq!(
                r.damage,
                Some(Damage {
                    offset: MAGIC.len() as u64,
                    bytes: (l.len() - MAGIC.len()) as u64,
                    after: 0,
                    durable: 2,
                }),
                "flip at {flip}"
            );
            assert!(c.0.is_empty(), "applied past the damage");
        }
        // The middle record: the first is applied, then the damage.
        let mut bad = l.clone();
        bad[MAGIC.len() + put(1).len() + RECORD_PREFIX + 1] ^= 0x01;
        let r = replay(&bad, 0, &mut Collect(vec![])).unwrap();
        assert_eq!(r.last_lsn, 1);
        assert_eq!(r.damage.map(|d| (d.after, d.durable)), Some((1, 2)));
    }

    /// Records written together, before one sync: the crash can tear any of them (power loss),
    /// and nothing after says they were durable, so it is a tear.
    #[test]
    fn a_torn_record_among_unsynced_ones_is_a_tear() {
        let l = log(&[
            put(1),
            record_stamped(2, 1, &[(INSERT, 1, b"2", Some(b"v"))]),
            record_stamped(3, 1, &[(INSERT, 1, b"3", Some(b"v"))]),
        ]);
        let mut bad = l.clone();
        bad[MAGIC.len() + put(1).len() + RECORD_PREFIX + 1] ^= 0x01;
        let r = replay(&bad, 0, &mut Collect(vec![])).unwrap();
        assert_eq!((r.last_lsn, r.damage), (1, None));
        assert_eq!(r.torn_bytes, (l.len() - MAGIC.len() - put(1).len()) as u64);
    }

    /// A record a checkpoint already covers, written after the log was emptied, rots: what
    /// follows is exactly what replay needs, so the bad bytes are skipped.
    #[test]
    fn rot_in_a_record_the_checkpoint_covers_is_skipped() {
        let l = log(&[put(3), put(5), put(6)]);
        let mut bad = l.clone();
        bad[MAGIC.len() + RECORD_PREFIX + 1] ^= 0x01;
        let mut c = Collect(vec![]);
        let r = replay(&bad, 4, &mut c).unwrap();
        assert_eq!((r.last_lsn, r.records, r.damage), (6, 2, None));
        assert_eq!(r.skipped_bytes, put(3).len() as u64);
    }

    #[test]
    fn a_missing_record_is_damage_not_a_tail() {
        let l = log(&[put(1), put(3), put(4)]);
        let mut c = Collect(vec![]);
        let r = replay(&l, 0, &mut c).unwrap();
        let at = (MAGIC.len() + put(1).len()) as u64;
        assert_eq!(
            r.damage,
            Some(Damage {
                offset: at,
                bytes: l.len() as u64 - at,
                after: 1,
                durable: 3,
            })
        );
        assert_eq!((r.last_lsn, r.records, c.0.len()), (1, 1, 1));
    }

    /// Bad bytes followed by records the checkpoint covers, then a gap: the covered records
    /// say nothing of what the bad bytes held, so the gap is judged by the stamps, not skipped.
    #[test]
    fn covered_records_after_bad_bytes_do_not_hide_a_gap() {
        let l = log(&[
            put(3),
            put(4),
            record_stamped(6, 5, &[(INSERT, 1, b"6", Some(b"v"))]),
        ]);
        let mut bad = l.clone();
        bad[MAGIC.len() + RECORD_PREFIX + 1] ^= 0x01;
        let mut c = Collect(vec![]);
        let r = replay(&bad, 4, &mut c).unwrap();
        assert_eq!(r.damage.map(|d| (d.after, d.durable)), Some((4, 5)));
        assert!(c.0.is_empty(), "applied past the damage");
        // Without a stamp saying batch 5 was durable, it is a tear (never acknowledged).
        let l = log(&[
            put(3),
            put(4),
            record_stamped(6, 4, &[(INSERT, 1, b"6", Some(b"v"))]),
        ]);
        let mut bad = l.clone();
        bad[MAGIC.len() + RECORD_PREFIX + 1] ^= 0x01;
        let r = replay(&bad, 4, &mut Collect(vec![])).unwrap();
        assert_eq!((r.last_lsn, r.damage), (4, None));
        assert_eq!(r.torn_bytes, (bad.len() - MAGIC.len()) as u64);
    }

    #[test]
    fn a_file_that_is_not_a_redo_log_is_refused() {
        let e = replay(b"not a log at all", 0, &mut Collect(vec![])).unwrap_err();
        assert!(e.to_string().contains("header"), "{e}");
        // An empty file (created, never written) is an empty log.
        assert_eq!(replay(b"", 7, &mut Collect(vec![])).unwrap().last_lsn, 7);
    }

    #[test]
    fn an_unknown_write_kind_is_damage() {
        let l = log(&[record(1, &[(9, 1, b"k", None)])]);
        let e = replay(&l, 0, &mut Collect(vec![])).unwrap_err();
        assert!(e.to_string().contains("unknown write kind"), "{e}");
    }

    /// A log left by a build that wrote version 1 is replayed.
    #[test]
    fn a_version_1_log_is_replayed() {
        let v1 = |lsn: u64, key: &[u8]| {
            let mut body = lsn.to_le_bytes().to_vec();
            body.push(INSERT);
            body.push(1);
            put_bytes(&mut body, key);
            put_bytes(&mut body, b"v");
            let mut r = (body.len() as u32).to_le_bytes().to_vec();
            r.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            r.extend_from_slice(&body);
            r
        };
        let mut l = MAGIC_V1.to_vec();
        l.extend(v1(1, b"a"));
        l.extend(v1(2, b"b"));
        l.extend_from_slice(&[9, 9]);
        let mut c = Collect(vec![]);
        let r = replay(&l, 0, &mut c).unwrap();
        assert_eq!((r.records, r.last_lsn, r.torn_bytes), (2, 2, 2));
        assert_eq!(c.0.len(), 2);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// A log of `n` one-write records, each written after the one before was synced.
        fn valid(n: u8) -> (Vec<u8>, Vec<Applied>) {
            let records: Vec<Vec<u8>> = (1..=n).map(put).collect();
            let ops = (1..=n)
                .map(|k| (INSERT, 1, vec![k], b"v".to_vec()))
                .collect();
            (log(&records), ops)
        }

        proptest! {
            /// Any bytes at all, behind either header: replay never panics, and reports a
            /// result or a typed error.
            #[test]
            fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..2048), v1 in any::<bool>()) {
                let mut l = if v1 { MAGIC_V1.to_vec() } else { MAGIC.to_vec() };
                l.extend(body);
                let _ = replay(&l, 0, &mut Collect(vec![]));
                let _ = replay(&l[8..], 3, &mut Collect(vec![]));
            }

            /// A valid log, damaged (bits flipped, bytes cut, bytes inserted): replay applies
            /// a prefix of the true writes, never anything else, and whatever it does not
            /// apply is reported as torn, damaged or an error.
            #[test]
            fn damaged_logs_apply_a_prefix_or_say_why(
                n in 1u8..12,
                flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 0..4),
                cut in proptest::option::of(any::<usize>()),
                insert in proptest::option::of((any::<usize>(), proptest::collection::vec(any::<u8>(), 1..40))),
            ) {
                let (mut l, truth) = valid(n);
                for (at, bits) in flips {
                    let i = MAGIC.len() + at % (l.len() - MAGIC.len());
                    l[i] ^= bits;
                }
                if let Some((at, bytes)) = insert {
                    let i = MAGIC.len() + at % (l.len() - MAGIC.len() + 1);
                    l.splice(i..i, bytes);
                }
                if let Some(c) = cut {
                    let keep = MAGIC.len() + c % (l.len() - MAGIC.len() + 1);
                    l.truncate(keep);
                }
                let mut c = Collect(vec![]);
                if let Ok(r) = replay(&l, 0, &mut c) {
                    prop_assert_eq!(&c.0[..], &truth[..c.0.len()]);
                    prop_assert_eq!(r.records as usize, c.0.len());
                    prop_assert_eq!(r.last_lsn as usize, c.0.len());
                    // A cut at a record's end is a log that ends there: nothing to say.
                    if c.0.len() < truth.len() && cut.is_none() {
                        prop_assert!(r.torn_bytes > 0 || r.damage.is_some() || r.skipped_bytes > 0,
                            "writes were lost without a word: {:?}", r);
                    }
                }
            }
        }
    }
}
