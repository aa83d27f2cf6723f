//! The embedded store's tables. Each table's key and value layout, and the invariant that ties
//! it to the others, is written next to its definition. Public for tools that read a data file
//! directly (forensics, corruption tests); write to them only through [`super::EmbeddedStore`].

use redb::{TableDefinition, WriteTransaction};

use crate::error::{StoreError, StoreResult};

use super::redo::{Apply, Op, Rec, Sink, apply_to};

/// Backend name in errors.
pub const BACKEND: &str = "embedded";

/// The table layout this build writes; a data file with a newer layout is refused on open.
/// Layout 2 added the redo log (`loom.redo`, and `"redo_lsn"` in [`META`]); a build that knows
/// only layout 1 would ignore the log and lose what it holds, so it refuses layout 2. Layout 3
/// keeps ready mailboxes per kind ([`READY_BY_KIND`], replacing `mailbox_ready`) and parked
/// actors ([`PARKED`]). Layout 4 cuts the store into partitions (one file and redo log each,
/// `"partitions"` and `"partition"` in [`META`]) with an [`OUTBOX`] and [`HIGH_WATER`] marks, and
/// puts event lanes in their owner's partition; a build that knows only layout 3 would see one
/// partition of several and ignore the outbox. Older files are upgraded when opened (`upgrade`
/// in `mod.rs`). Layout 5 adds node membership ([`MEMBERS`], in partition 0's file); a build
/// that knows only layout 4 would refuse its redo records for that table as damage.
pub const LAYOUT_VERSION: u64 = 5;

/// `"layout"` → [`LAYOUT_VERSION`]; `"dead_letter_seq"` → last dead-letter id given;
/// `"redo_lsn"` → the last batch of the redo log whose writes the durable state holds
/// (written by checkpoints and on close); `"partitions"` → how many partitions the store has,
/// and `"partition"` → which one this file is (both written when the file is created, never
/// changed: `loom store repartition` writes a new store); `"outbox_seq"` → the last [`OUTBOX`]
/// number given.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// `(actor, seq)` → an entry frame (see [`crate::codec`]). Holds exactly the seqs
/// `trimmed_through + 1 ..= highest` of [`JOURNAL_META`]: appends add at the top, trims and
/// deletes remove from the bottom, nothing else writes here.
pub const JOURNAL: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("journal");

/// `actor` → `(highest, trimmed_through)`. Both only grow: a seq is never reused, and entries once
/// trimmed never come back. `trimmed_through <= highest`.
pub const JOURNAL_META: TableDefinition<&str, (u64, u64)> = TableDefinition::new("journal_meta");

/// `actor` → the highest seq when its journal was last deleted. No snapshot at or below it is
/// accepted (a compaction finishing after a delete cannot bring the deleted state back).
/// Only [`JournalStore::delete`](crate::JournalStore::delete) writes here.
pub const JOURNAL_DELETED: TableDefinition<&str, u64> = TableDefinition::new("journal_deleted");

/// `(actor, seq)` → a snapshot frame. Only the newest `keep` are kept; none is below
/// `trimmed_through`, and `trimmed_through` never passes the oldest one (when one exists).
pub const SNAPSHOTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("snapshots");

/// `(actor, position)` → the message's envelope frame, written once at enqueue.
pub const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("mailbox_messages");

/// `(actor, position)` → `(due_at_ms, visible_at_ms, deliveries, message_id)`: the message's
/// delivery state, and its id so that a receipt is checked against the message it names.
pub const MESSAGE_STATE: TableDefinition<(&str, u64), (u64, u64, u32, u128)> =
    TableDefinition::new("mailbox_state");

/// `(actor, position)` → the error of the message's last nack.
pub const MESSAGE_ERRORS: TableDefinition<(&str, u64), &str> =
    TableDefinition::new("mailbox_errors");

/// `(actor, due_at_ms, position)` → `()`: the actor's waiting messages in the order they are
/// handed out. The actor's *current* message (out, or waiting for a retry) is not here.
pub const QUEUE: TableDefinition<(&str, u64, u64), ()> = TableDefinition::new("mailbox_queue");

/// `actor` → `(last_position, current_position or 0, ready_at_ms, count, last_due_ms)`.
/// `ready_at` is exactly when the actor next has something to hand out: the current message's
/// `visible_at` if there is one, else the first [`QUEUE`] key's due time; `u64::MAX` when the
/// mailbox is empty. `last_due` keeps due times of undelayed messages from going backwards when
/// the clock does, so they are handed out in the order sent. A mailbox whose first message is
/// due never ([`Timestamp::MAX`](crate::time::Timestamp::MAX)) has `ready_at == u64::MAX - 1`,
/// so that it is still a waiting mailbox (here and in [`READY_BY_KIND`]).
pub const MAILBOX_META: TableDefinition<&str, (u64, u64, u64, u64, u64)> =
    TableDefinition::new("mailbox_meta");

/// `(kind, ready_at_ms, actor)` → `()`: one key per non-empty mailbox of an actor that is not
/// a system mailbox and not [`PARKED`], mirroring `ready_at` in [`MAILBOX_META`]. Per kind, so
/// that a node finds the ready actors of the kinds it hosts without reading any other's.
pub const READY_BY_KIND: TableDefinition<(&str, u64, &str), ()> =
    TableDefinition::new("mailbox_ready_by_kind");

/// Layouts 1 and 2: `(ready_at_ms, actor)` → `()`, [`READY_BY_KIND`] without the kind. Read only
/// to replay a redo log written by such a build and to upgrade the file.
pub const READY: TableDefinition<(u64, &str), ()> = TableDefinition::new("mailbox_ready");

/// `actor` → a park frame ([`crate::store::Park`]). While an actor is here its mailbox hands
/// nothing out and it has no [`READY_BY_KIND`] key.
pub const PARKED: TableDefinition<&str, &[u8]> = TableDefinition::new("parked");

/// `actor` → `(position, deliveries, lane)`: the actor's message at `position`, delivered
/// `deliveries` times, is suspended until an event arrives on its event lane `lane` (`""` for
/// a sleep: no lane) ([`crate::Mailbox::suspend`]). An event enqueued on `lane` for the actor,
/// or a cancellation of the message ([`CANCELS`]), makes that message visible at once, if it
/// is still current and has not been handed out again (its delivery count unchanged), and
/// removes the row; a row that no longer matches is stale and harmless, and the actor's next
/// suspension replaces it. At most one row per actor.
pub const WAKES: TableDefinition<&str, (u64, u32, &str)> = TableDefinition::new("wakes");

/// `(actor, position)` → `()`: the message at `position` was asked to be cancelled
/// ([`crate::Mailbox::cancel`]). Only for a message in [`MESSAGE_STATE`]: removed with it.
pub const CANCELS: TableDefinition<(&str, u64), ()> = TableDefinition::new("cancels");

/// `node` → a member frame ([`crate::store::Member`]): the node's last heartbeat
/// ([`crate::store::Membership`]). Only in partition 0's file. A heartbeat removes the records
/// past their [`Member::forgotten_at`](crate::store::Member::forgotten_at); nothing else ties
/// this table to the others. Not copied by `loom store repartition` (a copy is made while no
/// node runs).
pub const MEMBERS: TableDefinition<&str, &[u8]> = TableDefinition::new("members");

/// dead-letter id → a dead-letter frame.
pub const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// `actor` → a lease frame. Kept after release or expiry, so the next token is always larger.
pub const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");

/// `(actor, key)` → an idempotency frame.
pub const IDEMPOTENCY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("idempotency");

/// `(expires_at_ms, actor, key)` → `()`: one key per [`IDEMPOTENCY`] record, for purging.
pub const IDEMPOTENCY_EXPIRY: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("idempotency_expiry");

/// outbox seq → `(to, message id, due_at_ms or u64::MAX for now, envelope frame)`, where
/// `u64::MAX - 1` stands for due never (`Timestamp::MAX`): messages
/// a turn of this partition sent to actors of other partitions, in the order sent, numbered
/// without gaps from 1 (`"outbox_seq"` in [`META`] is the last). Written by turns, read and
/// trimmed from the bottom by this partition's relay (`relay.rs`) once every target partition
/// has taken them.
pub const OUTBOX: TableDefinition<u64, OutboxRow> = TableDefinition::new("outbox");

/// An [`OUTBOX`] row: `(to, message id, due_at_ms or u64::MAX, envelope frame)`.
pub type OutboxRow = (&'static str, u128, u64, &'static [u8]);

/// source partition → the highest outbox seq of that partition whose message this partition
/// has enqueued. Only grows. The relay enqueues an outbox message here only if its seq is
/// above the mark, and raises the mark in the same write: so a message is enqueued once
/// however often the relay moves it (after a crash between "enqueued here" and "trimmed
/// there", or a move repeated).
pub const HIGH_WATER: TableDefinition<u32, u64> = TableDefinition::new("high_water");

/// Wraps a redb failure. An I/O error is kept as the `std::io::Error` it is (redb's errors do
/// not give their cause), so that what it was, a full disk say, can be found and explained.
pub(crate) fn se(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Io(io) => StoreError::storage(BACKEND, io),
        other => StoreError::storage(BACKEND, other),
    }
}

/// True if `e` says redb met an I/O error (now, or earlier: `PreviousIo`). redb then refuses
/// every write until the database is opened again, so the store must stop (rule D3).
pub(crate) fn engine_failed(e: &StoreError) -> bool {
    if e.io_kind().is_some() {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(redb::Error::PreviousIo) = c.downcast_ref::<redb::Error>() {
            return true;
        }
        cause = match c.downcast_ref::<crate::error::Cause>() {
            Some(shared) => Some(&**shared),
            None => c.source(),
        };
    }
    false
}

/// Creates every table, so that read transactions always find them.
pub(crate) fn create_all(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(META)?;
    txn.open_table(JOURNAL)?;
    txn.open_table(JOURNAL_META)?;
    txn.open_table(JOURNAL_DELETED)?;
    txn.open_table(SNAPSHOTS)?;
    txn.open_table(MESSAGES)?;
    txn.open_table(MESSAGE_STATE)?;
    txn.open_table(MESSAGE_ERRORS)?;
    txn.open_table(QUEUE)?;
    txn.open_table(MAILBOX_META)?;
    txn.open_table(READY_BY_KIND)?;
    txn.open_table(PARKED)?;
    txn.open_table(WAKES)?;
    txn.open_table(CANCELS)?;
    txn.open_table(DEAD_LETTERS)?;
    txn.open_table(LEASES)?;
    txn.open_table(IDEMPOTENCY)?;
    txn.open_table(IDEMPOTENCY_EXPIRY)?;
    txn.open_table(OUTBOX)?;
    txn.open_table(HIGH_WATER)?;
    txn.open_table(MEMBERS)?;
    Ok(())
}

/// A table (or a group of tables) of one write batch, opened the first time a request of the
/// batch needs it and kept open for the rest of the batch. Opening and closing a redb table
/// costs about as much as a small insert, and a turn touches ten tables: opened per request,
/// that was a fifth of the writer thread's time under load.
pub(super) struct Lazy<'t, T> {
    txn: &'t WriteTransaction,
    sink: Sink<'t>,
    open: fn(&'t WriteTransaction, Sink<'t>) -> StoreResult<T>,
    value: Option<T>,
}

impl<'t, T> Lazy<'t, T> {
    fn new(
        txn: &'t WriteTransaction,
        sink: Sink<'t>,
        open: fn(&'t WriteTransaction, Sink<'t>) -> StoreResult<T>,
    ) -> Self {
        Lazy {
            txn,
            sink,
            open,
            value: None,
        }
    }

    /// The open table, opening it now if no request of this batch has yet.
    pub(super) fn get(&mut self) -> StoreResult<&mut T> {
        let value = match self.value.take() {
            Some(v) => v,
            None => (self.open)(self.txn, self.sink)?,
        };
        Ok(self.value.insert(value))
    }
}

/// The number each table is known by in the redo log (`redo.rs`). Never reuse or change one:
/// logs written by earlier builds name tables by these numbers.
pub(super) mod id {
    pub const META: u8 = 0;
    pub const JOURNAL: u8 = 1;
    pub const JOURNAL_META: u8 = 2;
    pub const SNAPSHOTS: u8 = 3;
    pub const MESSAGES: u8 = 4;
    pub const MESSAGE_STATE: u8 = 5;
    pub const MESSAGE_ERRORS: u8 = 6;
    pub const QUEUE: u8 = 7;
    pub const MAILBOX_META: u8 = 8;
    pub const READY: u8 = 9;
    pub const DEAD_LETTERS: u8 = 10;
    pub const LEASES: u8 = 11;
    pub const IDEMPOTENCY: u8 = 12;
    pub const IDEMPOTENCY_EXPIRY: u8 = 13;
    pub const JOURNAL_DELETED: u8 = 14;
    pub const PARKED: u8 = 15;
    pub const READY_BY_KIND: u8 = 16;
    pub const OUTBOX: u8 = 17;
    pub const HIGH_WATER: u8 = 18;
    pub const WAKES: u8 = 19;
    pub const CANCELS: u8 = 20;
    pub const MEMBERS: u8 = 21;
}

/// Every table of the store, as one write batch sees them. Requests of a batch run one after
/// another on the same `Tx`; the writer drops it (closing the tables) before it commits. Every
/// write goes through a [`Rec`], so it is also recorded in the batch's redo record, if any.
pub(super) struct Tx<'t> {
    pub(super) meta: Lazy<'t, Rec<'t, &'static str, u64>>,
    pub(super) journal: Lazy<'t, Rec<'t, (&'static str, u64), &'static [u8]>>,
    pub(super) journal_meta: Lazy<'t, Rec<'t, &'static str, (u64, u64)>>,
    pub(super) journal_deleted: Lazy<'t, Rec<'t, &'static str, u64>>,
    pub(super) snapshots: Lazy<'t, Rec<'t, (&'static str, u64), &'static [u8]>>,
    pub(super) mailbox: Lazy<'t, super::mailbox::Tables<'t>>,
    pub(super) dead_letters: Lazy<'t, Rec<'t, u64, &'static [u8]>>,
    /// Layouts 1 and 2's ready index, for replay and the upgrade only.
    pub(super) legacy_ready: Lazy<'t, Rec<'t, (u64, &'static str), ()>>,
    pub(super) leases: Lazy<'t, Rec<'t, &'static str, &'static [u8]>>,
    pub(super) idempotency: Lazy<'t, Rec<'t, (&'static str, &'static str), &'static [u8]>>,
    pub(super) idempotency_expiry: Lazy<'t, Rec<'t, (u64, &'static str, &'static str), ()>>,
    pub(super) outbox: Lazy<'t, Rec<'t, u64, OutboxRow>>,
    pub(super) high_water: Lazy<'t, Rec<'t, u32, u64>>,
    pub(super) members: Lazy<'t, Rec<'t, &'static str, &'static [u8]>>,
}

impl<'t> Tx<'t> {
    /// The tables of `txn`, none opened yet, recording their writes into `sink`.
    pub(super) fn new(txn: &'t WriteTransaction, sink: Sink<'t>) -> Self {
        Tx {
            meta: Lazy::new(txn, sink, |t, s| Rec::open(t, s, id::META, META)),
            journal: Lazy::new(txn, sink, |t, s| Rec::open(t, s, id::JOURNAL, JOURNAL)),
            journal_meta: Lazy::new(txn, sink, |t, s| {
                Rec::open(t, s, id::JOURNAL_META, JOURNAL_META)
            }),
            journal_deleted: Lazy::new(txn, sink, |t, s| {
                Rec::open(t, s, id::JOURNAL_DELETED, JOURNAL_DELETED)
            }),
            snapshots: Lazy::new(txn, sink, |t, s| Rec::open(t, s, id::SNAPSHOTS, SNAPSHOTS)),
            mailbox: Lazy::new(txn, sink, super::mailbox::Tables::open),
            dead_letters: Lazy::new(txn, sink, |t, s| {
                Rec::open(t, s, id::DEAD_LETTERS, DEAD_LETTERS)
            }),
            legacy_ready: Lazy::new(txn, sink, |t, s| Rec::open(t, s, id::READY, READY)),
            leases: Lazy::new(txn, sink, |t, s| Rec::open(t, s, id::LEASES, LEASES)),
            idempotency: Lazy::new(txn, sink, |t, s| {
                Rec::open(t, s, id::IDEMPOTENCY, IDEMPOTENCY)
            }),
            idempotency_expiry: Lazy::new(txn, sink, |t, s| {
                Rec::open(t, s, id::IDEMPOTENCY_EXPIRY, IDEMPOTENCY_EXPIRY)
            }),
            outbox: Lazy::new(txn, sink, |t, s| Rec::open(t, s, id::OUTBOX, OUTBOX)),
            high_water: Lazy::new(txn, sink, |t, s| {
                Rec::open(t, s, id::HIGH_WATER, HIGH_WATER)
            }),
            members: Lazy::new(txn, sink, |t, s| Rec::open(t, s, id::MEMBERS, MEMBERS)),
        }
    }
}

impl Apply for Tx<'_> {
    fn apply(&mut self, op: &Op<'_>) -> StoreResult<()> {
        match op.table() {
            id::META => apply_to(self.meta.get()?, op),
            id::JOURNAL => apply_to(self.journal.get()?, op),
            id::JOURNAL_META => apply_to(self.journal_meta.get()?, op),
            id::JOURNAL_DELETED => apply_to(self.journal_deleted.get()?, op),
            id::SNAPSHOTS => apply_to(self.snapshots.get()?, op),
            id::DEAD_LETTERS => apply_to(self.dead_letters.get()?, op),
            id::READY => apply_to(self.legacy_ready.get()?, op),
            id::LEASES => apply_to(self.leases.get()?, op),
            id::IDEMPOTENCY => apply_to(self.idempotency.get()?, op),
            id::IDEMPOTENCY_EXPIRY => apply_to(self.idempotency_expiry.get()?, op),
            id::OUTBOX => apply_to(self.outbox.get()?, op),
            id::HIGH_WATER => apply_to(self.high_water.get()?, op),
            id::MEMBERS => apply_to(self.members.get()?, op),
            _ => self.mailbox.get()?.apply(op),
        }
    }
}
