//! Changing a store's partition count, offline: every row of every partition is copied into a
//! new store of the new count, each to the partition its actor belongs to there
//! (`loom store repartition`).
//!
//! The copy is exact — journals, snapshots, mailboxes with their delivery state, leases (so
//! fencing tokens keep growing), idempotency records and their expiry, parks — except for what
//! is the partitions' own: the outboxes must be empty (the source's relays move everything
//! first), the high-water marks start empty (nothing is in flight), and dead letters get new
//! ids (an id names its partition) — and for membership records, which are not copied (no node
//! runs during the copy, and the next opening would forget them anyway).

use std::ops::Bound;
use std::path::Path;
use std::time::Duration;

use redb::{Key, ReadTransaction, TableDefinition, Value};

use crate::codec::{self, RecordType};
use crate::error::{StoreError, StoreResult};
use crate::id::ActorId;
use crate::partition::partition_of;
use crate::store::DeadLetter;

use super::redo::{Apply, Op};
use super::tables::{self, id, se};
use super::{EmbeddedOptions, EmbeddedStore, PARTITION, PARTITIONS, meta_counter};

/// Rows read and written at a time, at most.
const CHUNK: usize = 2000;

/// Bytes read and written at a time, at most (past one row): large entries, snapshots and
/// messages make small chunks.
const CHUNK_BYTES: usize = 8 << 20;

/// What [`EmbeddedStore::copy_repartitioned`] copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Repartitioned {
    /// The source's partition count.
    pub from: u32,
    /// The copy's.
    pub to: u32,
    /// Rows copied, over every table.
    pub rows: u64,
    /// Dead letters copied (under new ids).
    pub dead_letters: u64,
}

/// Up to `limit` rows of `def` after key `after`, as bytes.
fn chunk<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
    after: Option<&[u8]>,
    limit: usize,
) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
    let table = txn.open_table(def).map_err(se)?;
    let iter = match after {
        Some(b) => {
            table.range::<K::SelfType<'_>>((Bound::Excluded(K::from_bytes(b)), Bound::Unbounded))
        }
        None => table.range::<K::SelfType<'_>>(..),
    }
    .map_err(se)?;
    let (mut out, mut bytes) = (Vec::new(), 0);
    for item in iter.take(limit) {
        let (k, v) = item.map_err(se)?;
        let row = (
            K::as_bytes(&k.value()).as_ref().to_vec(),
            V::as_bytes(&v.value()).as_ref().to_vec(),
        );
        bytes += row.0.len() + row.1.len();
        out.push(row);
        if bytes >= CHUNK_BYTES {
            break;
        }
    }
    Ok(out)
}

impl EmbeddedStore {
    /// Copies this store, whole, into a new store created in `target` (which must hold none)
    /// with `partitions` partitions, and closes the copy. Waits (up to a minute) for the relays
    /// to empty every outbox first; nothing may write to this store meanwhile (`loom store
    /// repartition` holds its directory's lock).
    ///
    /// ```
    /// use loom_core::{ActorId, EmbeddedOptions, EmbeddedStore, Entry, EntryKind, JournalStore};
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (from, to) = (tempfile::tempdir()?, tempfile::tempdir()?);
    /// let one = EmbeddedOptions { partitions: Some(1), ..EmbeddedOptions::default() };
    /// let store = EmbeddedStore::open_with(from.path(), one)?;
    /// let alice = ActorId::new("account", "alice")?;
    /// store.append(&alice, 1, &[Entry::new(1, EntryKind::Failed { error: "x".into(), dead_lettered: false })]).await?;
    /// let copied = store.copy_repartitioned(&to.path().join("store"), 4).await?;
    /// assert_eq!((copied.from, copied.to), (1, 4));
    /// let copy = EmbeddedStore::open(to.path().join("store"))?;
    /// assert_eq!(copy.partitions(), 4);
    /// assert_eq!(copy.highest_seq(&alice).await?, 1);
    /// # Ok(()) }
    /// ```
    pub async fn copy_repartitioned(
        &self,
        target: &Path,
        partitions: u32,
    ) -> StoreResult<Repartitioned> {
        if target.join(super::DATA_FILE).exists() {
            return Err(StoreError::InvalidRequest(format!(
                "{} already holds a store; repartition into an empty directory",
                target.display()
            )));
        }
        self.drain_outboxes().await?;
        if (self.partitions() > 1) != (partitions > 1) {
            self.check_no_events_in_lanes().await?;
        }
        let copy = EmbeddedStore::open_with(
            target,
            EmbeddedOptions {
                partitions: Some(crate::partition::check_partitions(partitions)?),
                ..EmbeddedOptions::default()
            },
        )?;
        let mut done = Repartitioned {
            from: self.partitions(),
            to: partitions,
            ..Repartitioned::default()
        };
        macro_rules! copy_table {
            ($def:expr, $id:expr, $key:ty, |$k:ident| $actor:expr) => {
                for p in 0..self.partitions() {
                    let mut after: Option<Vec<u8>> = None;
                    loop {
                        let from = after.clone();
                        let rows = self
                            .read_in(p, move |txn| chunk(txn, $def, from.as_deref(), CHUNK))
                            .await?;
                        let Some((last, _)) = rows.last() else { break };
                        after = Some(last.clone());
                        let mut by_target: Vec<Vec<(Vec<u8>, Vec<u8>)>> =
                            vec![Vec::new(); partitions as usize];
                        for (kb, vb) in rows {
                            let q = {
                                let $k = <$key as Value>::from_bytes(&kb);
                                let actor = ActorId::from_stored($actor, "actor id")?;
                                partition_of(&actor, partitions)
                            };
                            by_target[q as usize].push((kb, vb));
                        }
                        for (q, rows) in by_target.into_iter().enumerate() {
                            if rows.is_empty() {
                                continue;
                            }
                            done.rows += rows.len() as u64;
                            copy.write_in(q as u32, move |tx| {
                                for (key, value) in &rows {
                                    tx.apply(&Op::Insert {
                                        table: $id,
                                        key: key.as_slice(),
                                        value: value.as_slice(),
                                    })?;
                                }
                                Ok(())
                            })
                            .await?;
                        }
                    }
                }
            };
        }
        copy_table!(tables::JOURNAL, id::JOURNAL, (&str, u64), |k| k.0);
        copy_table!(tables::JOURNAL_META, id::JOURNAL_META, &str, |k| k);
        copy_table!(tables::JOURNAL_DELETED, id::JOURNAL_DELETED, &str, |k| k);
        copy_table!(tables::SNAPSHOTS, id::SNAPSHOTS, (&str, u64), |k| k.0);
        copy_table!(tables::MESSAGES, id::MESSAGES, (&str, u64), |k| k.0);
        copy_table!(tables::MESSAGE_STATE, id::MESSAGE_STATE, (&str, u64), |k| k
            .0);
        copy_table!(
            tables::MESSAGE_ERRORS,
            id::MESSAGE_ERRORS,
            (&str, u64),
            |k| k.0
        );
        copy_table!(tables::QUEUE, id::QUEUE, (&str, u64, u64), |k| k.0);
        copy_table!(tables::MAILBOX_META, id::MAILBOX_META, &str, |k| k);
        copy_table!(
            tables::READY_BY_KIND,
            id::READY_BY_KIND,
            (&str, u64, &str),
            |k| k.2
        );
        copy_table!(tables::PARKED, id::PARKED, &str, |k| k);
        copy_table!(tables::CANCELS, id::CANCELS, (&str, u64), |k| k.0);
        // Not WAKES: its lane names change with the partition count (`event_lane_in`), so the
        // marks are left behind, and the new store's first open hands every message they held
        // suspended out again (`mailbox::return_all` keeps only messages a mark still holds):
        // each wait replays and suspends again on its lane's new name.
        copy_table!(tables::LEASES, id::LEASES, &str, |k| k);
        copy_table!(tables::IDEMPOTENCY, id::IDEMPOTENCY, (&str, &str), |k| k.0);
        copy_table!(
            tables::IDEMPOTENCY_EXPIRY,
            id::IDEMPOTENCY_EXPIRY,
            (u64, &str, &str),
            |k| k.1
        );
        // Dead letters, in their order, under ids of the partition they move to, all above the
        // old ids (so that an old id never names another message).
        let mut highest = 0u64;
        for p in 0..self.partitions() {
            let last = self
                .read_in(p, |txn| {
                    let t = txn.open_table(tables::DEAD_LETTERS).map_err(se)?;
                    let last = redb::ReadableTable::last(&t).map_err(se)?;
                    Ok(last.map(|(k, _)| k.value()))
                })
                .await?;
            highest = highest.max(last.unwrap_or(0));
        }
        if highest > 0 {
            let start = highest / u64::from(partitions) + 1;
            for q in 0..partitions {
                copy.write_in(q, move |tx| {
                    tx.meta
                        .get()?
                        .insert("dead_letter_seq", start)
                        .map_err(se)?;
                    Ok(())
                })
                .await?;
            }
        }
        for p in 0..self.partitions() {
            let mut after: Option<Vec<u8>> = None;
            loop {
                let from = after.clone();
                let rows = self
                    .read_in(p, move |txn| {
                        chunk(txn, tables::DEAD_LETTERS, from.as_deref(), CHUNK)
                    })
                    .await?;
                let Some((last, _)) = rows.last() else { break };
                after = Some(last.clone());
                for (_, frame) in rows {
                    let dead: DeadLetter = codec::decode(RecordType::DeadLetter, &frame)
                        .map_err(|e| StoreError::corrupt("a dead letter being copied", e))?;
                    let q = partition_of(&dead.envelope.to, partitions);
                    copy.write_in(q, move |tx| {
                        let meta = tx.meta.get()?;
                        let local = meta_counter(&**meta, "dead_letter_seq")? + 1;
                        let n = meta_counter(&**meta, PARTITIONS)?.max(1);
                        let id = local * n + meta_counter(&**meta, PARTITION)?;
                        meta.insert("dead_letter_seq", local).map_err(se)?;
                        let bytes =
                            codec::encode(RecordType::DeadLetter, &DeadLetter { id, ..dead })
                                .map_err(|e| {
                                    StoreError::corrupt("a dead letter being copied", e)
                                })?;
                        tx.dead_letters
                            .get()?
                            .insert(id, bytes.as_slice())
                            .map_err(se)?;
                        Ok(())
                    })
                    .await?;
                    done.dead_letters += 1;
                }
            }
        }
        drop(copy);
        Ok(done)
    }

    /// Event lanes are named differently in a store of one partition and in one of several
    /// ([`ActorId::event_lane_in`]): refuses while any lane holds a waiting event or an event's
    /// key, which the runtime would no longer find under the new name.
    async fn check_no_events_in_lanes(&self) -> StoreResult<()> {
        let mut lanes = 0u64;
        for p in 0..self.partitions() {
            lanes += self
                .read_in(p, |txn| {
                    let meta = txn.open_table(tables::MAILBOX_META).map_err(se)?;
                    let keys = txn.open_table(tables::IDEMPOTENCY).map_err(se)?;
                    let mut n = 0u64;
                    for item in meta.range("_event/".."_event0").map_err(se)? {
                        if item.map_err(se)?.1.value().3 > 0 {
                            n += 1;
                        }
                    }
                    for item in keys.range(("_event/", "")..("_event0", "")).map_err(se)? {
                        item.map_err(se)?;
                        n += 1;
                    }
                    Ok(n)
                })
                .await?;
        }
        if lanes > 0 {
            return Err(StoreError::InvalidRequest(format!(
                "{lanes} event lanes hold waiting events or the keys of received ones, and lanes are \
                 named differently in a store of one partition and in one of several: let the \
                 waiting events be received and their keys expire (the runtime's reply_ttl), \
                 then repartition"
            )));
        }
        Ok(())
    }

    /// Waits until the relays have moved everything out of every outbox.
    async fn drain_outboxes(&self) -> StoreResult<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let waiting: u64 = self.outbox_states().await?.iter().map(|s| s.pending).sum();
            if waiting == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(StoreError::InvalidRequest(format!(
                    "{waiting} messages are still in the outboxes after a minute; the store is \
                     not repartitioned (is a partition failing? see the log)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
