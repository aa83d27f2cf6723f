//! [`Mailbox`] on redb. Table layout and invariants: see `tables.rs` (`MESSAGES` to `READY`).
//!
//! Each actor's mailbox has at most one *current* message: the one handed out and not yet acked,
//! or waiting out a nack delay. While it exists nothing else is handed out, which keeps per-actor
//! order across retries. The others wait in `QUEUE`, ordered by due time then position.

use crate::store::backend::check_ttl;
use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadableTable, WriteTransaction};

use crate::codec::{self, RecordType};
use crate::envelope::Envelope;
use crate::error::{StoreError, StoreResult};
use crate::id::{ActorId, MessageId};
use crate::limits::clip_reason;
use crate::store::backend::{
    check_purge, interleave, keep_partitions, prepare_message, prepare_suspend,
};
use crate::store::{
    Backlog, DeadLetter, Delivery, LeaseOptions, Mailbox, Receipt, Suspension, Waiting,
};
use crate::time::Timestamp;

use super::redo::{Op, Rec, Sink, apply_to};
use super::tables::{
    CANCELS, DEAD_LETTERS, MAILBOX_META, MESSAGE_ERRORS, MESSAGE_STATE, MESSAGES, PARKED, QUEUE,
    READY_BY_KIND, Tx, WAKES, id, se,
};
use super::{EmbeddedStore, meta_counter};

const EMPTY: u64 = u64::MAX;

/// One row of `MAILBOX_META`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Meta {
    last_position: u64,
    current: u64,
    ready_at: u64,
    count: u64,
    last_due: u64,
}

impl Meta {
    fn get(
        table: &impl ReadableTable<&'static str, (u64, u64, u64, u64, u64)>,
        actor: &str,
    ) -> StoreResult<Meta> {
        Ok(match table.get(actor).map_err(se)? {
            Some(v) => {
                let (last_position, current, ready_at, count, last_due) = v.value();
                Meta {
                    last_position,
                    current,
                    ready_at,
                    count,
                    last_due,
                }
            }
            None => Meta {
                last_position: 0,
                current: 0,
                ready_at: EMPTY,
                count: 0,
                last_due: 0,
            },
        })
    }
}

/// The tables one mailbox operation touches, opened once.
pub(super) struct Tables<'t> {
    messages: Rec<'t, (&'static str, u64), &'static [u8]>,
    state: Rec<'t, (&'static str, u64), (u64, u64, u32, u128)>,
    errors: Rec<'t, (&'static str, u64), &'static str>,
    queue: Rec<'t, (&'static str, u64, u64), ()>,
    meta: Rec<'t, &'static str, (u64, u64, u64, u64, u64)>,
    ready: Rec<'t, (&'static str, u64, &'static str), ()>,
    pub(super) parked: Rec<'t, &'static str, &'static [u8]>,
    wakes: Rec<'t, &'static str, (u64, u32, &'static str)>,
    cancels: Rec<'t, (&'static str, u64), ()>,
}

impl<'t> Tables<'t> {
    pub(super) fn open(txn: &'t WriteTransaction, sink: Sink<'t>) -> StoreResult<Self> {
        Ok(Tables {
            messages: Rec::open(txn, sink, id::MESSAGES, MESSAGES)?,
            state: Rec::open(txn, sink, id::MESSAGE_STATE, MESSAGE_STATE)?,
            errors: Rec::open(txn, sink, id::MESSAGE_ERRORS, MESSAGE_ERRORS)?,
            queue: Rec::open(txn, sink, id::QUEUE, QUEUE)?,
            meta: Rec::open(txn, sink, id::MAILBOX_META, MAILBOX_META)?,
            ready: Rec::open(txn, sink, id::READY_BY_KIND, READY_BY_KIND)?,
            parked: Rec::open(txn, sink, id::PARKED, PARKED)?,
            wakes: Rec::open(txn, sink, id::WAKES, WAKES)?,
            cancels: Rec::open(txn, sink, id::CANCELS, CANCELS)?,
        })
    }

    /// Applies a logged write to one of the mailbox tables (redo log replay).
    pub(super) fn apply(&mut self, op: &Op<'_>) -> StoreResult<()> {
        match op.table() {
            id::MESSAGES => apply_to(&mut self.messages, op),
            id::MESSAGE_STATE => apply_to(&mut self.state, op),
            id::MESSAGE_ERRORS => apply_to(&mut self.errors, op),
            id::QUEUE => apply_to(&mut self.queue, op),
            id::MAILBOX_META => apply_to(&mut self.meta, op),
            id::READY_BY_KIND => apply_to(&mut self.ready, op),
            id::PARKED => apply_to(&mut self.parked, op),
            id::WAKES => apply_to(&mut self.wakes, op),
            id::CANCELS => apply_to(&mut self.cancels, op),
            other => Err(StoreError::corrupt(
                super::redo::REDO_FILE,
                codec::CodecError::Body(format!("a write to unknown table {other}")),
            )),
        }
    }

    /// When the actor next has something to hand out, given its current message.
    fn ready_at(&self, actor: &str, current: u64) -> StoreResult<u64> {
        if current != 0 {
            return Ok(self.state_of(actor, current)?.visible_at);
        }
        let first = self
            .queue
            .range((actor, 0, 0)..=(actor, u64::MAX, u64::MAX))
            .map_err(se)?
            .next()
            .transpose()
            .map_err(se)?;
        Ok(first.map(|(k, _)| k.value().1).unwrap_or(EMPTY))
    }

    /// True if the actor's message at `position`, delivered `deliveries` times, is suspended
    /// ([`WAKES`]: marked, and not woken or handed out since).
    fn suspended(&self, actor: &str, position: u64, deliveries: u32) -> StoreResult<bool> {
        suspended_in(&*self.wakes, actor, position, deliveries)
    }

    fn state_of(&self, actor: &str, position: u64) -> StoreResult<State> {
        self.state
            .get((actor, position))
            .map_err(se)?
            .map(|v| {
                let (due, visible_at, deliveries, id) = v.value();
                State {
                    due,
                    visible_at,
                    deliveries,
                    id,
                }
            })
            .ok_or_else(|| {
                StoreError::storage(
                    super::tables::BACKEND,
                    Inconsistent(format!("{actor} position {position} has no delivery state")),
                )
            })
    }

    /// True if the actor is parked (its mailbox is held).
    pub(super) fn is_parked(&self, actor: &str) -> StoreResult<bool> {
        Ok(self.parked.get(actor).map_err(se)?.is_some())
    }

    /// Writes the actor's meta row and keeps `READY_BY_KIND` in step with it (rules D12, D13).
    fn put_meta(&mut self, actor: &str, old: Meta, new: Meta) -> StoreResult<()> {
        // A mailbox holding messages is never EMPTY, even when its first is due never
        // (`Timestamp::MAX`, whose millis are EMPTY's): it then waits at the moment before.
        let new_ready = if new.count == 0 {
            EMPTY
        } else {
            new.ready_at.min(EMPTY - 1)
        };
        // System mailboxes (event lanes) are read only by the invocation waiting on them, and a
        // parked actor's mailbox is held, so neither is listed: the index is for finding actors
        // to run.
        if old.ready_at != new_ready && !actor.starts_with('_') && !self.is_parked(actor)? {
            let kind = kind_of(actor);
            if old.ready_at != EMPTY {
                self.ready.remove((kind, old.ready_at, actor)).map_err(se)?;
            }
            if new_ready != EMPTY {
                self.ready
                    .insert((kind, new_ready, actor), ())
                    .map_err(se)?;
            }
        }
        let row = Meta {
            ready_at: new_ready,
            ..new
        };
        self.meta
            .insert(
                actor,
                (
                    row.last_position,
                    row.current,
                    row.ready_at,
                    row.count,
                    row.last_due,
                ),
            )
            .map_err(se)?;
        Ok(())
    }

    pub(super) fn envelope(&self, actor: &ActorId, position: u64) -> StoreResult<Envelope> {
        let bytes = self
            .messages
            .get((actor.as_str(), position))
            .map_err(se)?
            .ok_or_else(|| {
                StoreError::storage(
                    super::tables::BACKEND,
                    Inconsistent(format!("{actor} position {position} has no message")),
                )
            })?;
        codec::decode(RecordType::Message, bytes.value()).map_err(|e| {
            StoreError::corrupt(
                format!("message at position {position} of {actor}'s mailbox"),
                e,
            )
        })
    }

    pub(super) fn enqueue(
        &mut self,
        actor: &ActorId,
        message_id: MessageId,
        bytes: &[u8],
        deliver_at: Option<Timestamp>,
        now: u64,
    ) -> StoreResult<u64> {
        let a = actor.as_str();
        let old = Meta::get(&*self.meta, a)?;
        let position = old.last_position + 1;
        let mut new = Meta {
            last_position: position,
            count: old.count + 1,
            ..old
        };
        let due = match deliver_at {
            Some(t) if t.as_millis() > now => t.as_millis(),
            _ => {
                new.last_due = now.max(old.last_due);
                new.last_due
            }
        };
        self.messages.insert((a, position), bytes).map_err(se)?;
        let id = message_id.as_uuid().as_u128();
        self.state
            .insert((a, position), (due, 0, 0, id))
            .map_err(se)?;
        self.queue.insert((a, due, position), ()).map_err(se)?;
        if old.current == 0 {
            new.ready_at = if old.count == 0 {
                due
            } else {
                old.ready_at.min(due)
            };
        }
        self.put_meta(a, old, new)?;
        Ok(position)
    }

    /// Checks that `receipt` is the current delivery of the actor's current message.
    pub(super) fn check_receipt(&self, receipt: &Receipt) -> StoreResult<(Meta, State)> {
        let a = receipt.actor.as_str();
        let meta = Meta::get(&*self.meta, a)?;
        let stale = || StoreError::StaleReceipt {
            actor: receipt.actor.clone(),
            message_id: receipt.message_id,
        };
        if meta.current != receipt.position || meta.current == 0 {
            return Err(stale());
        }
        let state = self.state_of(a, receipt.position)?;
        if state.deliveries != receipt.delivery
            || state.id != receipt.message_id.as_uuid().as_u128()
        {
            return Err(stale());
        }
        Ok((meta, state))
    }

    /// Makes the current message invisible until `visible_at`, recording `error` as why (a nack,
    /// a suspension).
    fn hold_current(
        &mut self,
        actor: &str,
        meta: Meta,
        state: State,
        visible_at: u64,
        error: &str,
    ) -> StoreResult<()> {
        self.state
            .insert(
                (actor, meta.current),
                State {
                    visible_at,
                    ..state
                }
                .row(),
            )
            .map_err(se)?;
        self.errors
            .insert((actor, meta.current), error)
            .map_err(se)?;
        self.put_meta(
            actor,
            meta,
            Meta {
                ready_at: visible_at,
                ..meta
            },
        )
    }

    /// Suspends the delivery `receipt` until `visible_at`, or an event on `lane` or a
    /// cancellation ([`Mailbox::suspend`]); refused, writing nothing, if the message was asked
    /// to be cancelled or the lane holds a message.
    pub(super) fn suspend(
        &mut self,
        receipt: &Receipt,
        lane: Option<&ActorId>,
        visible_at: u64,
        error: &str,
    ) -> StoreResult<Suspension> {
        let (meta, state) = self.check_receipt(receipt)?;
        let a = receipt.actor.as_str();
        if self.cancels.get((a, meta.current)).map_err(se)?.is_some() {
            return Ok(Suspension::Cancelled);
        }
        if let Some(lane) = lane
            && Meta::get(&*self.meta, lane.as_str())?.count > 0
        {
            return Ok(Suspension::EventWaiting);
        }
        self.hold_current(a, meta, state, visible_at, error)?;
        self.wakes
            .insert(
                a,
                (
                    meta.current,
                    state.deliveries,
                    lane.map_or("", |l| l.as_str()),
                ),
            )
            .map_err(se)?;
        Ok(Suspension::Suspended)
    }

    /// Wakes `owner`'s message suspended on `lane`, if it still is (see [`WAKES`]).
    pub(super) fn wake(&mut self, owner: &ActorId, lane: &ActorId, now: u64) -> StoreResult<()> {
        self.wake_marked(owner.as_str(), Some(lane.as_str()), now)
    }

    /// Wakes the actor's suspended message if its mark ([`WAKES`]) still holds and names
    /// `lane` (`None`: whatever it names).
    fn wake_marked(&mut self, a: &str, lane: Option<&str>, now: u64) -> StoreResult<()> {
        let Some((position, deliveries)) = self.wakes.get(a).map_err(se)?.and_then(|v| {
            let (p, d, l) = v.value();
            lane.is_none_or(|lane| l == lane).then_some((p, d))
        }) else {
            return Ok(());
        };
        self.wakes.remove(a).map_err(se)?;
        let meta = Meta::get(&*self.meta, a)?;
        if meta.current != position || meta.current == 0 {
            return Ok(());
        }
        let state = self.state_of(a, position)?;
        if state.deliveries != deliveries || state.visible_at <= now {
            return Ok(());
        }
        self.state
            .insert(
                (a, position),
                State {
                    visible_at: now,
                    ..state
                }
                .row(),
            )
            .map_err(se)?;
        self.put_meta(
            a,
            meta,
            Meta {
                ready_at: now,
                ..meta
            },
        )
    }

    /// Marks the message `message` of the actor as to be cancelled and wakes it if it is the
    /// suspended current one ([`Mailbox::cancel`]); its position, or `None` if it is not here.
    pub(super) fn cancel(
        &mut self,
        actor: &ActorId,
        message: MessageId,
        now: u64,
    ) -> StoreResult<Option<u64>> {
        let a = actor.as_str();
        let want = message.as_uuid().as_u128();
        let mut found = None;
        for item in self.state.range((a, 0)..=(a, u64::MAX)).map_err(se)? {
            let (k, v) = item.map_err(se)?;
            if v.value().3 == want {
                found = Some(k.value().1);
                break;
            }
        }
        let Some(position) = found else {
            return Ok(None);
        };
        self.cancels.insert((a, position), ()).map_err(se)?;
        if Meta::get(&*self.meta, a)?.current == position {
            self.wake_marked(a, None, now)?;
        }
        Ok(Some(position))
    }

    /// How many messages wait in the actor's mailbox (due, delayed or out).
    pub(super) fn count(&self, actor: &str) -> StoreResult<u64> {
        Ok(Meta::get(&*self.meta, actor)?.count)
    }

    /// Removes the actor's current message and moves on to the next.
    pub(super) fn remove_current(&mut self, actor: &str) -> StoreResult<()> {
        let old = Meta::get(&*self.meta, actor)?;
        let p = old.current;
        self.messages.remove((actor, p)).map_err(se)?;
        self.state.remove((actor, p)).map_err(se)?;
        self.errors.remove((actor, p)).map_err(se)?;
        self.cancels.remove((actor, p)).map_err(se)?;
        let new = Meta {
            current: 0,
            count: old.count - 1,
            ready_at: self.ready_at(actor, 0)?,
            ..old
        };
        self.put_meta(actor, old, new)
    }
}

/// One row of `MESSAGE_STATE`.
#[derive(Debug, Clone, Copy)]
pub(super) struct State {
    due: u64,
    visible_at: u64,
    deliveries: u32,
    id: u128,
}

impl State {
    fn row(self) -> (u64, u64, u32, u128) {
        (self.due, self.visible_at, self.deliveries, self.id)
    }
}

/// The kind of a stored actor id (`kind/key`; kinds hold no `/`).
fn kind_of(actor: &str) -> &str {
    actor.split_once('/').map_or(actor, |(k, _)| k)
}

/// Adds the actor to the ready index at `at` (the layout upgrade).
pub(super) fn list_ready(tx: &mut Tx<'_>, actor: &str, at: u64) -> StoreResult<()> {
    tx.mailbox
        .get()?
        .ready
        .insert((kind_of(actor), at, actor), ())
        .map_err(se)?;
    Ok(())
}

/// Parks the actor: records `frame` and takes its mailbox out of the ready index.
pub(super) fn park(tx: &mut Tx<'_>, actor: &ActorId, frame: &[u8]) -> StoreResult<()> {
    let t = tx.mailbox.get()?;
    let a = actor.as_str();
    let meta = Meta::get(&*t.meta, a)?;
    if !t.is_parked(a)? && meta.ready_at != EMPTY && !actor.is_system() {
        t.ready.remove((kind_of(a), meta.ready_at, a)).map_err(se)?;
    }
    t.parked.insert(a, frame).map_err(se)?;
    Ok(())
}

/// Unparks the actor: drops its record, makes its current message visible now (its delivery
/// count kept, so that no receipt repeats), and lists its mailbox again. Returns the record, if
/// it was parked.
pub(super) fn unpark(tx: &mut Tx<'_>, actor: &ActorId) -> StoreResult<Option<Vec<u8>>> {
    let t = tx.mailbox.get()?;
    let a = actor.as_str();
    let Some(frame) = t.parked.get(a).map_err(se)?.map(|v| v.value().to_vec()) else {
        return Ok(None);
    };
    t.parked.remove(a).map_err(se)?;
    let meta = Meta::get(&*t.meta, a)?;
    if meta.current != 0 {
        let state = t.state_of(a, meta.current)?;
        let now = State {
            visible_at: Timestamp::now().as_millis(),
            ..state
        };
        t.state.insert((a, meta.current), now.row()).map_err(se)?;
    }
    let ready_at = t.ready_at(a, meta.current)?;
    // Unlisted while parked: put_meta lists it as if it had been empty.
    t.put_meta(
        a,
        Meta {
            ready_at: EMPTY,
            ..meta
        },
        Meta { ready_at, ..meta },
    )?;
    Ok(Some(frame))
}

/// The tables disagree with each other: a bug or a damaged file, never a user error.
#[derive(Debug, thiserror::Error)]
#[error("mailbox tables disagree: {0}")]
struct Inconsistent(String);

/// Moves the actor's current message to the dead letters. A message whose stored frame does
/// not decode is buried all the same, as an envelope carrying its raw bytes (hex) under
/// `corrupt_frame`, so that one damaged message never blocks its mailbox (rule D14).
pub(super) fn bury(tx: &mut Tx<'_>, actor: &ActorId, reason: &str) -> StoreResult<u64> {
    let t = tx.mailbox.get()?;
    let meta = Meta::get(&*t.meta, actor.as_str())?;
    let state = t.state_of(actor.as_str(), meta.current)?;
    let envelope = match t.envelope(actor, meta.current) {
        Ok(e) => e,
        Err(StoreError::Corrupt { .. }) => {
            // No frame at all lists as an empty one.
            let raw = t
                .messages
                .get((actor.as_str(), meta.current))
                .map_err(se)?
                .map(|v| v.value().to_vec())
                .unwrap_or_default();
            let id = MessageId::from(uuid::Uuid::from_u128(state.id)).to_string();
            // The envelope a dead letter of these bytes lists as on every store (its number
            // is not given yet, and is not needed: the message id is known).
            crate::store::backend::dead_letter_envelope(0, &raw, actor.as_str(), Some(&id))?
        }
        Err(e) => return Err(e),
    };
    let deliveries = state.deliveries;
    let counters = tx.meta.get()?;
    // Dead-letter ids are unique across the store's partitions: partition p of n gives
    // p, p + n, p + 2n, ... (a store of one partition: 1, 2, 3, ...).
    let local = meta_counter(&**counters, "dead_letter_seq")? + 1;
    let n = meta_counter(&**counters, super::PARTITIONS)?.max(1);
    let id = local * n + meta_counter(&**counters, super::PARTITION)?;
    let dead = DeadLetter {
        id,
        envelope,
        reason: clip_reason(reason),
        deliveries,
        at: Timestamp::now(),
    };
    let bytes = codec::encode(RecordType::DeadLetter, &dead)
        .map_err(|e| StoreError::corrupt(format!("dead letter of {actor}"), e))?;
    tx.dead_letters
        .get()?
        .insert(id, bytes.as_slice())
        .map_err(se)?;
    counters.insert("dead_letter_seq", local).map_err(se)?;
    t.remove_current(actor.as_str())?;
    tracing::warn!(%actor, message_id = %dead.envelope.id, dead_letter = id, reason = %dead.reason, "message dead-lettered");
    Ok(id)
}

/// Buries the actor's current message as a corrupt frame, if it is still the delivery that was
/// handed out (`position`, `deliveries`); returns whether it did.
pub(super) fn bury_corrupt(
    tx: &mut Tx<'_>,
    actor: &ActorId,
    position: u64,
    deliveries: u32,
    reason: &str,
) -> StoreResult<bool> {
    let t = tx.mailbox.get()?;
    let meta = Meta::get(&*t.meta, actor.as_str())?;
    if meta.current != position || t.state_of(actor.as_str(), position)?.deliveries != deliveries {
        return Ok(false);
    }
    bury(tx, actor, reason)?;
    Ok(true)
}

/// A message handed out by [`lease`], still encoded: decoding happens off the writer thread.
pub(super) struct Leased {
    actor: ActorId,
    bytes: Vec<u8>,
    position: u64,
    deliveries: u32,
    last_error: Option<String>,
}

impl Leased {
    /// Decodes the envelope and builds the delivery.
    pub(super) fn finish(self) -> StoreResult<Delivery> {
        Delivery::from_frame(
            self.actor,
            &self.bytes,
            self.position,
            i64::from(self.deliveries),
            self.last_error,
        )
    }
}

/// True if [`lease`] would hand something out (or give up on something) now. Read-only, so an
/// empty or busy mailbox costs no write and no fsync.
pub(super) fn leasable(
    txn: &redb::ReadTransaction,
    actor: &ActorId,
    early: Duration,
) -> StoreResult<bool> {
    let a = actor.as_str();
    let now = Timestamp::now().as_millis();
    if txn
        .open_table(PARKED)
        .map_err(se)?
        .get(a)
        .map_err(se)?
        .is_some()
    {
        return Ok(false);
    }
    let meta_table = txn.open_table(MAILBOX_META).map_err(se)?;
    let meta = Meta::get(&meta_table, a)?;
    if meta.current != 0 {
        let state = txn.open_table(MESSAGE_STATE).map_err(se)?;
        let (visible_at, deliveries) = state
            .get((a, meta.current))
            .map_err(se)?
            .map(|v| (v.value().1, v.value().2))
            .unwrap_or((0, 0));
        if visible_at <= now {
            return Ok(true);
        }
        // As `lease` decides: a suspended message may go out `early`.
        if visible_at > now.saturating_add(millis(early)) {
            return Ok(false);
        }
        let wakes = txn.open_table(WAKES).map_err(se)?;
        return suspended_in(&wakes, a, meta.current, deliveries);
    }
    let queue = txn.open_table(QUEUE).map_err(se)?;
    let first = queue
        .range((a, 0, 0)..=(a, now, u64::MAX))
        .map_err(se)?
        .next()
        .transpose()
        .map_err(se)?;
    Ok(first.is_some())
}

/// [`Tables::suspended`], on any view of [`WAKES`] (a write's or a read's).
fn suspended_in(
    wakes: &impl ReadableTable<&'static str, (u64, u32, &'static str)>,
    actor: &str,
    position: u64,
    deliveries: u32,
) -> StoreResult<bool> {
    Ok(wakes.get(actor).map_err(se)?.is_some_and(|v| {
        let (p, d, _) = v.value();
        p == position && d == deliveries
    }))
}

/// `d` in whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn lease(
    tx: &mut Tx<'_>,
    actor: &ActorId,
    opts: LeaseOptions,
) -> StoreResult<Option<Leased>> {
    let a = actor.as_str();
    let now = Timestamp::now().as_millis();
    let early = millis(opts.early);
    if tx.mailbox.get()?.is_parked(a)? {
        return Ok(None);
    }
    loop {
        let t = tx.mailbox.get()?;
        let meta = Meta::get(&*t.meta, a)?;
        let position = if meta.current != 0 {
            let State {
                visible_at,
                deliveries,
                ..
            } = t.state_of(a, meta.current)?;
            // A suspended message may go out up to `early` before its time (LeaseOptions::early).
            if visible_at > now
                && (visible_at > now.saturating_add(early)
                    || !t.suspended(a, meta.current, deliveries)?)
            {
                return Ok(None);
            }
            if deliveries >= opts.max_deliveries {
                let last = t
                    .errors
                    .get((a, meta.current))
                    .map_err(se)?
                    .map(|v| v.value().to_owned());
                let reason = match last {
                    Some(e) => format!("gave up after {deliveries} deliveries; last error: {e}"),
                    None => {
                        format!("delivered {deliveries} times and never acked (each lease ran out)")
                    }
                };
                bury(tx, actor, &reason)?;
                continue;
            }
            meta.current
        } else {
            let first = t
                .queue
                .range((a, 0, 0)..=(a, now, u64::MAX))
                .map_err(se)?
                .next()
                .transpose()
                .map_err(se)?
                .map(|(k, _)| {
                    let (_, due, position) = k.value();
                    (due, position)
                });
            match first {
                None => return Ok(None),
                Some((due, position)) => {
                    t.queue.remove((a, due, position)).map_err(se)?;
                    position
                }
            }
        };
        let bytes = t
            .messages
            .get((a, position))
            .map_err(se)?
            .map(|v| v.value().to_vec())
            .ok_or_else(|| {
                StoreError::storage(
                    super::tables::BACKEND,
                    Inconsistent(format!("{actor} position {position} has no message")),
                )
            })?;
        let state = t.state_of(a, position)?;
        let deliveries = state.deliveries + 1;
        let visible_at = (Timestamp::from_millis(now) + opts.visibility).as_millis();
        let state = State {
            visible_at,
            deliveries,
            ..state
        };
        t.state.insert((a, position), state.row()).map_err(se)?;
        let last_error = t
            .errors
            .get((a, position))
            .map_err(se)?
            .map(|v| v.value().to_owned());
        let new = Meta {
            current: position,
            ready_at: visible_at,
            ..meta
        };
        t.put_meta(a, meta, new)?;
        return Ok(Some(Leased {
            actor: actor.clone(),
            bytes,
            position,
            deliveries,
            last_error,
        }));
    }
}

#[async_trait]
impl Mailbox for EmbeddedStore {
    async fn enqueue(&self, msg: &Envelope, deliver_at: Option<Timestamp>) -> StoreResult<u64> {
        let p = self.part(&msg.to);
        let bytes = prepare_message(msg)?;
        let actor = msg.to.clone();
        let id = msg.id;
        self.write_in(p, move |tx| {
            let t = tx.mailbox.get()?;
            t.enqueue(&actor, id, &bytes, deliver_at, Timestamp::now().as_millis())
        })
        .await
    }

    async fn lease(&self, actor: &ActorId, opts: LeaseOptions) -> StoreResult<Option<Delivery>> {
        let p = self.part(actor);
        opts.validate()?;
        let a = actor.clone();
        let early = opts.early;
        if !self.read_in(p, move |txn| leasable(txn, &a, early)).await? {
            return Ok(None);
        }
        // Each pass hands out the next message or buries a corrupt one, so this ends.
        loop {
            let actor = actor.clone();
            let Some(leased) = self.write_in(p, move |tx| lease(tx, &actor, opts)).await? else {
                return Ok(None);
            };
            if let Some(d) = self.finish_or_bury(leased).await? {
                return Ok(Some(d));
            }
        }
    }

    async fn ack(&self, receipt: &Receipt) -> StoreResult<()> {
        let p = self.part(&receipt.actor);
        let receipt = receipt.clone();
        self.write_in(p, move |tx| {
            let t = tx.mailbox.get()?;
            t.check_receipt(&receipt)?;
            t.remove_current(receipt.actor.as_str())
        })
        .await
    }

    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> StoreResult<()> {
        let p = self.part(&receipt.actor);
        check_ttl("visibility timeout", visibility)?;
        let receipt = receipt.clone();
        self.write_in(p, move |tx| {
            let t = tx.mailbox.get()?;
            let (meta, state) = t.check_receipt(&receipt)?;
            let a = receipt.actor.as_str();
            let visible_at = (Timestamp::now() + visibility).as_millis();
            t.state
                .insert(
                    (a, receipt.position),
                    State {
                        visible_at,
                        ..state
                    }
                    .row(),
                )
                .map_err(se)?;
            t.put_meta(
                a,
                meta,
                Meta {
                    ready_at: visible_at,
                    ..meta
                },
            )
        })
        .await
    }

    async fn nack(&self, receipt: &Receipt, delay: Duration, error: &str) -> StoreResult<()> {
        let p = self.part(&receipt.actor);
        let receipt = receipt.clone();
        let error = clip_reason(error);
        self.write_in(p, move |tx| {
            let t = tx.mailbox.get()?;
            let (meta, state) = t.check_receipt(&receipt)?;
            let visible_at = (Timestamp::now() + delay).as_millis();
            t.hold_current(receipt.actor.as_str(), meta, state, visible_at, &error)
        })
        .await
    }

    async fn suspend(
        &self,
        receipt: &Receipt,
        lane: Option<&ActorId>,
        delay: Duration,
        reason: &str,
    ) -> StoreResult<Suspension> {
        let p = self.part(&receipt.actor);
        let error = prepare_suspend(receipt, lane, reason, self.partitions())?;
        let (receipt, lane) = (receipt.clone(), lane.cloned());
        // Counted from the call, not from when the writer gets to it: a suspension queued
        // behind a burst of writes must not come back later by the time it queued (the node
        // that suspends notes the moment it asked for, `runtime/alarms.rs`).
        let visible_at = (Timestamp::now() + delay).as_millis();
        self.write_in(p, move |tx| {
            tx.mailbox
                .get()?
                .suspend(&receipt, lane.as_ref(), visible_at, &error)
        })
        .await
    }

    async fn cancel(&self, actor: &ActorId, message: MessageId) -> StoreResult<Option<u64>> {
        let p = self.part(actor);
        let actor = actor.clone();
        self.write_in(p, move |tx| {
            let now = Timestamp::now().as_millis();
            tx.mailbox.get()?.cancel(&actor, message, now)
        })
        .await
    }

    async fn dead_letter(&self, receipt: &Receipt, reason: &str) -> StoreResult<u64> {
        let p = self.part(&receipt.actor);
        let receipt = receipt.clone();
        let reason = reason.to_owned();
        self.write_in(p, move |tx| {
            let t = tx.mailbox.get()?;
            t.check_receipt(&receipt)?;
            bury(tx, &receipt.actor, &reason)
        })
        .await
    }

    async fn ready_actors(&self, kinds: &[&str], limit: usize) -> StoreResult<Vec<ActorId>> {
        let kinds: Vec<String> = kinds.iter().map(|k| (*k).to_owned()).collect();
        let mut per_partition = Vec::new();
        let mut failed = None;
        for p in 0..self.partitions() {
            let kinds = kinds.clone();
            // A failed partition does not hide the ready actors of the others.
            match self
                .read_in(p, move |txn| ready_in(txn, &kinds, limit))
                .await
            {
                Ok(list) => per_partition.push(list),
                Err(e) => failed = Some(e),
            }
        }
        if let (true, Some(e)) = (per_partition.is_empty(), failed) {
            return Err(e);
        }
        // Each partition's first, then each one's second, ...: none starves another.
        Ok(interleave(per_partition, limit))
    }

    /// A store of several partitions is owned by its own partitions: only the files asked for
    /// are read. A store of one reads its index of each kind and keeps those asked for.
    async fn ready_actors_in(
        &self,
        wanted: &[(&str, &[u32])],
        of: u32,
        limit: usize,
    ) -> StoreResult<Vec<ActorId>> {
        if self.partitions() <= 1 || of != self.partitions() {
            let kinds: Vec<&str> = wanted.iter().map(|(kind, _)| *kind).collect();
            let all = self.ready_actors(&kinds, usize::MAX).await?;
            return Ok(keep_partitions(&all, wanted, of, limit));
        }
        let mut per_partition = Vec::new();
        let mut failed = None;
        for p in 0..self.partitions() {
            let kinds: Vec<String> = wanted
                .iter()
                .filter(|(_, parts)| parts.contains(&p))
                .map(|(kind, _)| (*kind).to_owned())
                .collect();
            if kinds.is_empty() {
                continue;
            }
            // A failed partition does not hide the ready actors of the others.
            match self
                .read_in(p, move |txn| ready_in(txn, &kinds, limit))
                .await
            {
                Ok(list) => per_partition.push(list),
                Err(e) => failed = Some(e),
            }
        }
        if let (true, Some(e)) = (per_partition.is_empty(), failed) {
            return Err(e);
        }
        Ok(interleave(per_partition, limit))
    }

    async fn backlog(&self, kind: &str) -> StoreResult<Backlog> {
        let mut total = Backlog::default();
        for p in 0..self.partitions() {
            let kind = kind.to_owned();
            total = total.merge(self.read_in(p, move |txn| backlog_in(txn, &kind)).await?);
        }
        Ok(total)
    }

    async fn next_due(&self) -> StoreResult<Option<Timestamp>> {
        let mut earliest: Option<Timestamp> = None;
        let (mut failed, mut answered) = (None, false);
        for p in 0..self.partitions() {
            match self.read_in(p, next_due_in).await {
                Ok(t) => {
                    answered = true;
                    if let Some(t) = t {
                        earliest = Some(earliest.map_or(t, |e| e.min(t)));
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
        match (answered, failed) {
            (false, Some(e)) => Err(e),
            _ => Ok(earliest),
        }
    }

    fn arrivals(&self) -> Option<tokio::sync::broadcast::Receiver<std::sync::Arc<[ActorId]>>> {
        // Messages the relays move arrive without a sender in this process to wake anyone.
        (self.partitions() > 1).then(|| self.relay_arrivals())
    }

    async fn pending(&self, actor: &ActorId) -> StoreResult<u64> {
        let p = self.part(actor);
        let actor = actor.clone();
        self.read_in(p, move |txn| {
            let meta = txn.open_table(MAILBOX_META).map_err(se)?;
            Ok(Meta::get(&meta, actor.as_str())?.count)
        })
        .await
    }

    async fn messages(
        &self,
        actor: &ActorId,
        after: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<Waiting>> {
        let p = self.part(actor);
        let actor = actor.clone();
        self.read_in(p, move |txn| {
            let a = actor.as_str();
            let now = Timestamp::now().as_millis();
            let meta = Meta::get(&txn.open_table(MAILBOX_META).map_err(se)?, a)?;
            let state = txn.open_table(MESSAGE_STATE).map_err(se)?;
            let messages = txn.open_table(MESSAGES).map_err(se)?;
            let cancels = txn.open_table(CANCELS).map_err(se)?;
            let start = after.map_or(0, |p| p.saturating_add(1));
            let mut out = Vec::new();
            for item in state
                .range((a, start)..=(a, u64::MAX))
                .map_err(se)?
                .take(limit)
            {
                let (k, v) = item.map_err(se)?;
                let position = k.value().1;
                let (due, _, _, _) = v.value();
                let bytes = messages.get((a, position)).map_err(se)?.ok_or_else(|| {
                    StoreError::storage(
                        super::tables::BACKEND,
                        Inconsistent(format!("{a} position {position} has no message")),
                    )
                })?;
                let envelope: Envelope = codec::decode(RecordType::Message, bytes.value())
                    .map_err(|e| {
                        StoreError::corrupt(
                            format!("message at position {position} of {a}'s mailbox"),
                            e,
                        )
                    })?;
                out.push(Waiting {
                    position,
                    envelope,
                    deliver_at: (due > now).then(|| Timestamp::from_millis(due)),
                    out: meta.current == position,
                    cancelling: cancels.get((a, position)).map_err(se)?.is_some(),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn mailboxes(&self, after: Option<&ActorId>, limit: usize) -> StoreResult<Vec<ActorId>> {
        let after = after.cloned();
        self.read_merged(
            limit,
            |a: &ActorId, b| a.cmp(b),
            move |txn| {
                let meta = txn.open_table(MAILBOX_META).map_err(se)?;
                let iter = match &after {
                    Some(a) => meta.range::<&str>((
                        std::ops::Bound::Excluded(a.as_str()),
                        std::ops::Bound::Unbounded,
                    )),
                    None => meta.range::<&str>(..),
                }
                .map_err(se)?;
                let mut out = Vec::new();
                for item in iter {
                    if out.len() >= limit {
                        break;
                    }
                    let (k, v) = item.map_err(se)?;
                    if v.value().3 > 0 {
                        out.push(parse_actor(k.value())?);
                    }
                }
                Ok(out)
            },
        )
        .await
    }

    async fn dead_letters(&self, after: Option<u64>, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        self.read_merged(
            limit,
            |a: &DeadLetter, b| a.id.cmp(&b.id),
            move |txn| {
                let table = txn.open_table(DEAD_LETTERS).map_err(se)?;
                let start = after.map_or(0, |a| a.saturating_add(1));
                let mut out = Vec::new();
                for item in table.range(start..).map_err(se)?.take(limit) {
                    let (k, v) = item.map_err(se)?;
                    let dl: DeadLetter =
                        codec::decode(RecordType::DeadLetter, v.value()).map_err(|e| {
                            StoreError::corrupt(format!("dead letter {}", k.value()), e)
                        })?;
                    out.push(dl);
                }
                Ok(out)
            },
        )
        .await
    }

    async fn purge_dead_letters(&self, ids: &[u64]) -> StoreResult<u64> {
        check_purge(ids)?;
        // The id says which partition holds it (see `bury`): one write per partition.
        let n = u64::from(self.partitions());
        let mut by_partition: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
        for &id in ids {
            by_partition.entry((id % n) as u32).or_default().push(id);
        }
        let mut purged = 0;
        for (p, ids) in by_partition {
            purged += self
                .write_in(p, move |tx| {
                    let table = tx.dead_letters.get()?;
                    let mut removed = 0;
                    for id in ids {
                        let there = table.get(id).map_err(se)?.is_some();
                        if there {
                            table.remove(id).map_err(se)?;
                            removed += 1;
                        }
                    }
                    Ok(removed)
                })
                .await?;
        }
        Ok(purged)
    }

    async fn requeue_dead_letter(&self, id: u64) -> StoreResult<u64> {
        // The id says which partition holds it (see `bury`).
        let p = (id % u64::from(self.partitions())) as u32;
        self.write_in(p, move |tx| {
            let table = tx.dead_letters.get()?;
            let dl: DeadLetter = match table.get(id).map_err(se)? {
                None => return Err(StoreError::DeadLetterNotFound(id)),
                Some(v) => codec::decode(RecordType::DeadLetter, v.value())
                    .map_err(|e| StoreError::corrupt(format!("dead letter {id}"), e))?,
            };
            let envelope = dl.envelope.requeued();
            let bytes = prepare_message(&envelope)?;
            table.remove(id).map_err(se)?;
            let t = tx.mailbox.get()?;
            let position = t.enqueue(
                &envelope.to,
                envelope.id,
                &bytes,
                None,
                Timestamp::now().as_millis(),
            )?;
            // Its key is its caller's again: held until the requeued run settles it.
            if let Some(key) = &envelope.idempotency_key {
                super::idempotency::hold(tx, &envelope.to, key)?;
            }
            Ok(position)
        })
        .await
    }
}

impl EmbeddedStore {
    /// Decodes a leased message; one whose frame is damaged goes to the dead letters at once
    /// with reason "corrupt frame: …" (`None`), instead of failing every lease of its mailbox.
    pub(super) async fn finish_or_bury(&self, leased: Leased) -> StoreResult<Option<Delivery>> {
        let (actor, position, deliveries) =
            (leased.actor.clone(), leased.position, leased.deliveries);
        match leased.finish() {
            Ok(d) => Ok(Some(d)),
            Err(e @ StoreError::Corrupt { .. }) => {
                let reason = crate::store::backend::corrupt_frame_reason(&e);
                tracing::error!(%actor, position, error = %e, "a stored message does not decode; it goes to the dead letters");
                let p = self.part(&actor);
                self.write_in(p, move |tx| {
                    bury_corrupt(tx, &actor, position, deliveries, &reason)
                })
                .await?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// The ready actors of `kinds` in one partition, at most `limit`, kinds interleaved.
fn ready_in(
    txn: &redb::ReadTransaction,
    kinds: &[String],
    limit: usize,
) -> StoreResult<Vec<ActorId>> {
    let ready = txn.open_table(READY_BY_KIND).map_err(se)?;
    let now = Timestamp::now().as_millis();
    let mut per_kind = Vec::with_capacity(kinds.len());
    for kind in kinds {
        let mut list = Vec::new();
        for item in ready
            .range((kind.as_str(), 0, "")..(kind.as_str(), now.saturating_add(1), ""))
            .map_err(se)?
            .take(limit)
        {
            let (k, _) = item.map_err(se)?;
            list.push(parse_actor(k.value().2)?);
        }
        per_kind.push(list);
    }
    Ok(interleave(per_kind, limit))
}

/// One partition's [`Backlog`] of `kind`, from its [`READY_BY_KIND`] keys (in ready-at order:
/// the first is the longest-waiting).
fn backlog_in(txn: &redb::ReadTransaction, kind: &str) -> StoreResult<Backlog> {
    let ready = txn.open_table(READY_BY_KIND).map_err(se)?;
    let now = Timestamp::now().as_millis();
    // Every key of `kind` and none of a kind it is a prefix of (ids hold no NUL).
    let next = format!("{kind}\0");
    let mut b = Backlog {
        at: Timestamp::from_millis(now),
        ..Backlog::default()
    };
    for item in ready
        .range((kind, 0, "")..(next.as_str(), 0, ""))
        .map_err(se)?
    {
        let (k, _) = item.map_err(se)?;
        let at = k.value().1;
        b.mailboxes += 1;
        if at <= now {
            b.ready += 1;
            b.oldest_ready_at.get_or_insert(Timestamp::from_millis(at));
        }
    }
    Ok(b)
}

/// When the first message of one partition is due.
fn next_due_in(txn: &redb::ReadTransaction) -> StoreResult<Option<Timestamp>> {
    let ready = txn.open_table(READY_BY_KIND).map_err(se)?;
    // The first key of each kind, skipping from one kind to the next.
    let mut earliest: Option<u64> = None;
    let mut from = String::new();
    while let Some(item) = ready.range((from.as_str(), 0, "")..).map_err(se)?.next() {
        let (k, _) = item.map_err(se)?;
        let (kind, at, _) = k.value();
        earliest = Some(earliest.map_or(at, |e| e.min(at)));
        from = format!("{kind}\0");
    }
    // A mailbox whose first message is due never waits at EMPTY - 1 (see `put_meta`).
    Ok(earliest.map(|at| {
        if at >= EMPTY - 1 {
            Timestamp::MAX
        } else {
            Timestamp::from_millis(at)
        }
    }))
}

fn parse_actor(s: &str) -> StoreResult<ActorId> {
    ActorId::from_stored(s, "mailbox actor id")
}

/// Makes every leased message visible again now (delivery counts kept); returns how many. For a
/// store opened by a new process: the consumer that leased them is gone. A suspended message
/// ([`WAKES`], still matching: a sleep, or a wait for an event) is left suspended: it waits
/// for its time, event or cancellation, not for a consumer, and thousands of multi-day waits
/// are not replayed at every start.
pub(super) fn return_all(tx: &mut Tx<'_>) -> StoreResult<u64> {
    let now = Timestamp::now().as_millis();
    let t = tx.mailbox.get()?;
    let mut out = Vec::new();
    for item in t.meta.iter().map_err(se)? {
        let (k, v) = item.map_err(se)?;
        let (last_position, current, ready_at, count, last_due) = v.value();
        if current != 0 && ready_at > now {
            let meta = Meta {
                last_position,
                current,
                ready_at,
                count,
                last_due,
            };
            out.push((k.value().to_owned(), meta));
        }
    }
    let mut returned = 0u64;
    for (actor, meta) in &out {
        let state = t.state_of(actor, meta.current)?;
        if t.suspended(actor, meta.current, state.deliveries)? {
            continue;
        }
        returned += 1;
        t.state
            .insert(
                (actor.as_str(), meta.current),
                State {
                    visible_at: now,
                    ..state
                }
                .row(),
            )
            .map_err(se)?;
        t.put_meta(
            actor,
            *meta,
            Meta {
                ready_at: now,
                ..*meta
            },
        )?;
    }
    Ok(returned)
}
