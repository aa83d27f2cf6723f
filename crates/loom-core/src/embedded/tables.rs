//! The embedded store's tables. Each table's key and value layout, and the invariant that ties
//! it to the others, is written next to its definition. Public for tools that read a data file
//! directly (forensics, corruption tests); write to them only through [`super::EmbeddedStore`].

use redb::{Table, TableDefinition, WriteTransaction};

use crate::error::{StoreError, StoreResult};

/// Backend name in errors.
pub const BACKEND: &str = "embedded";

/// The table layout this build writes; a data file with another layout is refused on open.
pub const LAYOUT_VERSION: u64 = 1;

/// `"layout"` → [`LAYOUT_VERSION`]; `"dead_letter_seq"` → last dead-letter id given.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// `(actor, seq)` → an entry frame (see [`crate::codec`]). Holds exactly the seqs
/// `trimmed_through + 1 ..= highest` of [`JOURNAL_META`]: appends add at the top, trims and
/// deletes remove from the bottom, nothing else writes here.
pub const JOURNAL: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("journal");

/// `actor` → `(highest, trimmed_through)`. Both only grow: a seq is never reused, and entries once
/// trimmed never come back. `trimmed_through <= highest`.
pub const JOURNAL_META: TableDefinition<&str, (u64, u64)> = TableDefinition::new("journal_meta");

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
/// the clock does, so they are handed out in the order sent.
pub const MAILBOX_META: TableDefinition<&str, (u64, u64, u64, u64, u64)> =
    TableDefinition::new("mailbox_meta");

/// `(ready_at_ms, actor)` → `()`: one key per non-empty mailbox, mirroring `ready_at` in
/// [`MAILBOX_META`].
pub const READY: TableDefinition<(u64, &str), ()> = TableDefinition::new("mailbox_ready");

/// dead-letter id → a dead-letter frame.
pub const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// `actor` → a lease frame. Kept after release or expiry, so the next token is always larger.
pub const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");

/// `(actor, key)` → an idempotency frame.
pub const IDEMPOTENCY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("idempotency");

/// `(expires_at_ms, actor, key)` → `()`: one key per [`IDEMPOTENCY`] record, for purging.
pub const IDEMPOTENCY_EXPIRY: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("idempotency_expiry");

/// Wraps a redb failure.
pub(crate) fn se(e: impl Into<redb::Error>) -> StoreError {
    StoreError::storage(BACKEND, e.into())
}

/// Creates every table, so that read transactions always find them.
pub(crate) fn create_all(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(META)?;
    txn.open_table(JOURNAL)?;
    txn.open_table(JOURNAL_META)?;
    txn.open_table(SNAPSHOTS)?;
    txn.open_table(MESSAGES)?;
    txn.open_table(MESSAGE_STATE)?;
    txn.open_table(MESSAGE_ERRORS)?;
    txn.open_table(QUEUE)?;
    txn.open_table(MAILBOX_META)?;
    txn.open_table(READY)?;
    txn.open_table(DEAD_LETTERS)?;
    txn.open_table(LEASES)?;
    txn.open_table(IDEMPOTENCY)?;
    txn.open_table(IDEMPOTENCY_EXPIRY)?;
    Ok(())
}

/// A table (or a group of tables) of one write batch, opened the first time a request of the
/// batch needs it and kept open for the rest of the batch. Opening and closing a redb table
/// costs about as much as a small insert, and a turn touches ten tables: opened per request,
/// that was a fifth of the writer thread's time under load.
pub(super) struct Lazy<'t, T> {
    txn: &'t WriteTransaction,
    open: fn(&'t WriteTransaction) -> StoreResult<T>,
    value: Option<T>,
}

impl<'t, T> Lazy<'t, T> {
    fn new(txn: &'t WriteTransaction, open: fn(&'t WriteTransaction) -> StoreResult<T>) -> Self {
        Lazy {
            txn,
            open,
            value: None,
        }
    }

    /// The open table, opening it now if no request of this batch has yet.
    pub(super) fn get(&mut self) -> StoreResult<&mut T> {
        let value = match self.value.take() {
            Some(v) => v,
            None => (self.open)(self.txn)?,
        };
        Ok(self.value.insert(value))
    }
}

/// Every table of the store, as one write batch sees them. Requests of a batch run one after
/// another on the same `Tx`; the writer drops it (closing the tables) before it commits.
pub(super) struct Tx<'t> {
    pub(super) meta: Lazy<'t, Table<'t, &'static str, u64>>,
    pub(super) journal: Lazy<'t, Table<'t, (&'static str, u64), &'static [u8]>>,
    pub(super) journal_meta: Lazy<'t, Table<'t, &'static str, (u64, u64)>>,
    pub(super) snapshots: Lazy<'t, Table<'t, (&'static str, u64), &'static [u8]>>,
    pub(super) mailbox: Lazy<'t, super::mailbox::Tables<'t>>,
    pub(super) dead_letters: Lazy<'t, Table<'t, u64, &'static [u8]>>,
    pub(super) leases: Lazy<'t, Table<'t, &'static str, &'static [u8]>>,
    pub(super) idempotency: Lazy<'t, Table<'t, (&'static str, &'static str), &'static [u8]>>,
    pub(super) idempotency_expiry: Lazy<'t, Table<'t, (u64, &'static str, &'static str), ()>>,
}

impl<'t> Tx<'t> {
    /// The tables of `txn`, none opened yet.
    pub(super) fn new(txn: &'t WriteTransaction) -> Self {
        Tx {
            meta: Lazy::new(txn, |t| t.open_table(META).map_err(se)),
            journal: Lazy::new(txn, |t| t.open_table(JOURNAL).map_err(se)),
            journal_meta: Lazy::new(txn, |t| t.open_table(JOURNAL_META).map_err(se)),
            snapshots: Lazy::new(txn, |t| t.open_table(SNAPSHOTS).map_err(se)),
            mailbox: Lazy::new(txn, super::mailbox::Tables::open),
            dead_letters: Lazy::new(txn, |t| t.open_table(DEAD_LETTERS).map_err(se)),
            leases: Lazy::new(txn, |t| t.open_table(LEASES).map_err(se)),
            idempotency: Lazy::new(txn, |t| t.open_table(IDEMPOTENCY).map_err(se)),
            idempotency_expiry: Lazy::new(txn, |t| t.open_table(IDEMPOTENCY_EXPIRY).map_err(se)),
        }
    }
}
