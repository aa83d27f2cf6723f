//! [`Mailbox`] for [`SimStore`]: per-actor queues of message frames, and the dead letters.
//!
//! Each mailbox has at most one *current* message: the one handed out and not yet acked, or
//! waiting out a nack delay or an expired lease. While it exists nothing else of that mailbox
//! is handed out, which keeps per-actor order across retries. The others wait, ordered by due
//! time, then position.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use loom_core::codec::{self, RecordType};
use loom_core::limits::clip_reason;
use loom_core::store::Suspension;
use loom_core::store::backend::{check_ttl, interleave, prepare_message, prepare_suspend};
use loom_core::{
    ActorId, DeadLetter, Delivery, Envelope, LeaseOptions, Mailbox, MessageId, Receipt, StoreError,
    StoreResult, Timestamp, Waiting,
};

use super::park::Parked;
use super::{Frame, SimStore};

/// A message waiting its turn (never handed out yet: a handed-out message stays current until
/// it is acked or buried).
#[derive(Debug, Clone)]
struct Queued {
    frame: Frame,
    id: MessageId,
    /// Asked to be cancelled ([`Mailbox::cancel`]).
    cancelling: bool,
}

/// The mailbox's current message: handed out, or waiting to be handed out again.
#[derive(Debug, Clone)]
pub(super) struct Current {
    position: u64,
    /// When it was due (for [`Mailbox::messages`]).
    due: u64,
    frame: Frame,
    id: MessageId,
    /// When it may be handed out again (its lease runs out, or its nack delay ends).
    visible_at: u64,
    /// How many times it was handed out; a receipt names the delivery it is for.
    deliveries: u32,
    /// The error of its last nack.
    error: Option<String>,
    /// While suspended ([`Mailbox::suspend`]): the event lane (`None` for a sleep), and the
    /// delivery it was suspended at (a mark that no longer matches `deliveries` is stale).
    wake_on: Option<(Option<ActorId>, u32)>,
    /// Asked to be cancelled ([`Mailbox::cancel`]).
    cancelling: bool,
}

/// One actor's mailbox.
///
/// Invariants: positions grow and are never reused (`last_position` is the highest ever given,
/// kept when the mailbox empties); every message is either `current` or in `queued`, never
/// both; `last_due` keeps the due times of undelayed messages from going backwards when the
/// clock does, so that they are handed out in the order sent.
#[derive(Debug, Clone, Default)]
pub(super) struct Queue {
    last_position: u64,
    last_due: u64,
    current: Option<Current>,
    /// `(due_ms, position)` → message, in the order they are handed out.
    queued: BTreeMap<(u64, u64), Queued>,
}

impl Queue {
    fn len(&self) -> u64 {
        self.queued.len() as u64 + u64::from(self.current.is_some())
    }

    /// Exactly when the mailbox next has something to hand out: the current message's
    /// `visible_at` if there is one, else the first waiting message's due time; `None` when
    /// empty.
    fn ready_at(&self) -> Option<u64> {
        match &self.current {
            Some(c) => Some(c.visible_at),
            None => self.queued.keys().next().map(|(due, _)| *due),
        }
    }

    /// True if a lease now hands something out (or gives up on something): a suspended
    /// current message up to `early` ms before its time ([`LeaseOptions::early`]).
    fn leasable(&self, now: u64, early: u64) -> bool {
        match &self.current {
            Some(c) if c.visible_at > now => {
                c.visible_at <= now.saturating_add(early)
                    && c.wake_on.as_ref().is_some_and(|(_, d)| *d == c.deliveries)
            }
            _ => self.ready_at().is_some_and(|at| at <= now),
        }
    }
}

/// Every mailbox and the dead letters.
///
/// Invariants: dead-letter ids grow from 1 and are never reused (`last_dead` is the highest
/// given); a mailbox, once it exists, stays (even empty), so that its positions keep growing.
#[derive(Debug, Clone, Default)]
pub(super) struct Mailboxes {
    boxes: BTreeMap<ActorId, Arc<Queue>>,
    dead: BTreeMap<u64, Arc<DeadLetter>>,
    last_dead: u64,
    /// The deliberate bug [`Bugs::timers_in_whole_seconds`](super::Bugs::timers_in_whole_seconds).
    pub(super) whole_seconds: bool,
}

/// What a lease step does with the mailbox's head.
enum Step {
    /// Hand it out.
    Hand(Current),
    /// Give up on it (its deliveries ran out): to the dead letters with this reason.
    Bury(Current, String),
}

fn stale(receipt: &Receipt) -> StoreError {
    StoreError::StaleReceipt {
        actor: receipt.actor.clone(),
        message_id: receipt.message_id,
    }
}

/// True if `actor`'s mailbox is listed by [`Mailbox::ready_actors`] and [`Mailbox::next_due`]:
/// not a system mailbox (an event lane is read only by the invocation waiting on it), and not
/// parked (its mailbox is held).
fn listed(actor: &ActorId, parked: &Parked) -> bool {
    !actor.is_system() && !parked.contains(actor)
}

impl Mailboxes {
    fn queue(&self, actor: &ActorId) -> Option<&Queue> {
        self.boxes.get(actor).map(|q| &**q)
    }

    /// Enqueues a message due at `deliver_at` (now if `None` or past); returns its position.
    pub(super) fn enqueue(
        &mut self,
        to: &ActorId,
        id: MessageId,
        frame: Frame,
        deliver_at: Option<Timestamp>,
        now: Timestamp,
    ) -> u64 {
        let now = now.as_millis();
        let q = Arc::make_mut(self.boxes.entry(to.clone()).or_default());
        q.last_position += 1;
        let due = match deliver_at {
            Some(t) if self.whole_seconds && t.as_millis() > now => t.as_millis() / 1000 * 1000,
            Some(t) if t.as_millis() > now => t.as_millis(),
            _ => {
                q.last_due = q.last_due.max(now);
                q.last_due
            }
        };
        q.queued.insert(
            (due, q.last_position),
            Queued {
                frame,
                id,
                cancelling: false,
            },
        );
        q.last_position
    }

    /// Fails with [`StoreError::StaleReceipt`] unless `receipt` is the current delivery of its
    /// mailbox's current message.
    pub(super) fn check_receipt(&self, receipt: &Receipt) -> StoreResult<()> {
        let held = self
            .queue(&receipt.actor)
            .and_then(|q| q.current.as_ref())
            .is_some_and(|c| {
                c.position == receipt.position
                    && c.deliveries == receipt.delivery
                    && c.id == receipt.message_id
            });
        if !held {
            return Err(stale(receipt));
        }
        Ok(())
    }

    /// The current message `receipt` holds, to change.
    fn held_mut(&mut self, receipt: &Receipt) -> StoreResult<&mut Current> {
        self.check_receipt(receipt)?;
        self.boxes
            .get_mut(&receipt.actor)
            .and_then(|q| Arc::make_mut(q).current.as_mut())
            .ok_or_else(|| stale(receipt))
    }

    /// Takes the current message `receipt` holds out of its mailbox (acked, or to be buried).
    pub(super) fn settle(&mut self, receipt: &Receipt) -> StoreResult<Current> {
        self.check_receipt(receipt)?;
        self.boxes
            .get_mut(&receipt.actor)
            .and_then(|q| Arc::make_mut(q).current.take())
            .ok_or_else(|| stale(receipt))
    }

    /// Suspends the delivery `receipt` until `visible_at`, or an event on `lane` or a
    /// cancellation ([`Mailbox::suspend`]); refused, changing nothing, if the message was asked
    /// to be cancelled or the lane holds a message.
    pub(super) fn suspend(
        &mut self,
        receipt: &Receipt,
        lane: Option<&ActorId>,
        visible_at: u64,
        error: String,
    ) -> StoreResult<Suspension> {
        self.check_receipt(receipt)?;
        if self
            .queue(&receipt.actor)
            .and_then(|q| q.current.as_ref())
            .is_some_and(|c| c.cancelling)
        {
            return Ok(Suspension::Cancelled);
        }
        if lane.is_some_and(|lane| self.queue(lane).is_some_and(|q| q.len() > 0)) {
            return Ok(Suspension::EventWaiting);
        }
        let c = self.held_mut(receipt)?;
        c.visible_at = visible_at;
        c.error = Some(error);
        c.wake_on = Some((lane.cloned(), c.deliveries));
        Ok(Suspension::Suspended)
    }

    /// Makes `owner`'s message suspended on `lane` visible at `now`, if it still is.
    pub(super) fn wake(&mut self, owner: &ActorId, lane: &ActorId, now: u64) {
        let on_lane = |l: &Option<ActorId>| l.as_ref() == Some(lane);
        let marked = self
            .queue(owner)
            .and_then(|q| q.current.as_ref())
            .is_some_and(|c| c.wake_on.as_ref().is_some_and(|(l, _)| on_lane(l)));
        if !marked {
            // Nothing to change: the queue, which a snapshot may share, is not copied.
            return;
        }
        if let Some(c) = self
            .boxes
            .get_mut(owner)
            .and_then(|q| Arc::make_mut(q).current.as_mut())
        {
            wake_current(c, now);
        }
    }

    /// Marks message `id` of `actor`'s mailbox as asked to be cancelled, and wakes it if it is
    /// the suspended current one ([`Mailbox::cancel`]); its position, or `None` (nothing
    /// changed) if it is not there.
    pub(super) fn cancel(&mut self, actor: &ActorId, id: MessageId, now: u64) -> Option<u64> {
        let q = self.queue(actor)?;
        let current = q.current.as_ref().is_some_and(|c| c.id == id);
        if !current && !q.queued.values().any(|m| m.id == id) {
            return None;
        }
        let q = Arc::make_mut(self.boxes.get_mut(actor)?);
        if current {
            let c = q.current.as_mut()?;
            c.cancelling = true;
            wake_current(c, now);
            return Some(c.position);
        }
        q.queued
            .iter_mut()
            .find(|(_, m)| m.id == id)
            .map(|((_, position), m)| {
                m.cancelling = true;
                *position
            })
    }

    /// Moves `current`, taken out of `actor`'s mailbox, to the dead letters; returns the dead
    /// letter's id. A message whose frame does not decode is buried all the same, as an
    /// envelope carrying its raw bytes (hex) under `corrupt_frame`, so that one damaged message
    /// never blocks its mailbox (rule D14), and so that burying never fails.
    pub(super) fn bury(
        &mut self,
        actor: &ActorId,
        current: Current,
        reason: &str,
        now: Timestamp,
    ) -> u64 {
        let envelope = match codec::decode::<Envelope>(RecordType::Message, &current.frame) {
            Ok(e) => e,
            Err(_) => {
                let raw: String = current.frame.iter().map(|b| format!("{b:02x}")).collect();
                Envelope {
                    id: current.id,
                    ..Envelope::new(actor.clone(), serde_json::json!({ "corrupt_frame": raw }))
                }
            }
        };
        self.last_dead += 1;
        let dead = DeadLetter {
            id: self.last_dead,
            envelope,
            reason: clip_reason(reason),
            deliveries: current.deliveries,
            at: now,
        };
        tracing::warn!(%actor, message_id = %dead.envelope.id, dead_letter = dead.id, reason = %dead.reason, "message dead-lettered");
        self.dead.insert(dead.id, Arc::new(dead));
        self.last_dead
    }

    /// True if [`lease`](Self::lease) would hand something out (or give up on something) now;
    /// when false, a lease writes nothing.
    pub(super) fn leasable(
        &self,
        parked: &Parked,
        actor: &ActorId,
        now: Timestamp,
        early: Duration,
    ) -> bool {
        let early = u64::try_from(early.as_millis()).unwrap_or(u64::MAX);
        !parked.contains(actor)
            && self
                .queue(actor)
                .is_some_and(|q| q.leasable(now.as_millis(), early))
    }

    /// Hands out the actor's next due message, if it is not parked and none is out. A current
    /// message delivered `max_deliveries` times goes to the dead letters instead, and the next
    /// one is looked at; so does one whose frame does not decode. Changes nothing unless
    /// [`leasable`](Self::leasable).
    pub(super) fn lease(
        &mut self,
        parked: &Parked,
        actor: &ActorId,
        opts: LeaseOptions,
        now: Timestamp,
    ) -> Option<Delivery> {
        let now_ms = now.as_millis();
        // Each pass hands a message out or buries one, so this ends.
        while self.leasable(parked, actor, now, opts.early) {
            let step = {
                let q = Arc::make_mut(self.boxes.get_mut(actor)?);
                match q.current.take() {
                    Some(c) if c.deliveries >= opts.max_deliveries => {
                        let reason = match &c.error {
                            Some(e) => {
                                format!(
                                    "gave up after {} deliveries; last error: {e}",
                                    c.deliveries
                                )
                            }
                            None => format!(
                                "delivered {} times and never acked (each lease ran out)",
                                c.deliveries
                            ),
                        };
                        Step::Bury(c, reason)
                    }
                    Some(c) => Step::Hand(c),
                    None => {
                        let ((due, position), m) = q.queued.pop_first()?;
                        Step::Hand(Current {
                            position,
                            due,
                            frame: m.frame,
                            id: m.id,
                            visible_at: 0,
                            deliveries: 0,
                            error: None,
                            wake_on: None,
                            cancelling: m.cancelling,
                        })
                    }
                }
            };
            let mut c = match step {
                Step::Bury(c, reason) => {
                    self.bury(actor, c, &reason, now);
                    continue;
                }
                Step::Hand(c) => c,
            };
            c.deliveries += 1;
            c.visible_at = (Timestamp::from_millis(now_ms) + opts.visibility).as_millis();
            let delivery = Delivery::from_frame(
                actor.clone(),
                &c.frame,
                c.position,
                i64::from(c.deliveries),
                c.error.clone(),
            );
            match delivery {
                Ok(d) => {
                    Arc::make_mut(self.boxes.get_mut(actor)?).current = Some(c);
                    return Some(d);
                }
                Err(e) => {
                    tracing::error!(%actor, position = c.position, error = %e, "a stored message does not decode; it goes to the dead letters");
                    let reason = format!("corrupt frame: {e}");
                    self.bury(actor, c, &reason, now);
                }
            }
        }
        None
    }

    /// Makes the actor's current message, if any, visible now (its delivery count kept, so
    /// that no receipt ever repeats): for an unparked actor.
    pub(super) fn release_current(&mut self, actor: &ActorId, now: Timestamp) {
        if self.queue(actor).is_some_and(|q| q.current.is_some())
            && let Some(q) = self.boxes.get_mut(actor)
            && let Some(c) = Arc::make_mut(q).current.as_mut()
        {
            c.visible_at = now.as_millis();
        }
    }

    /// The ready actors of `kinds`, longest-ready first per kind, kinds interleaved.
    fn ready(&self, parked: &Parked, kinds: &[&str], limit: usize, now: Timestamp) -> Vec<ActorId> {
        let now = now.as_millis();
        let per_kind = kinds
            .iter()
            .map(|kind| {
                let mut list: Vec<(u64, &ActorId)> = self
                    .boxes
                    .iter()
                    .filter(|(a, _)| a.kind() == *kind && listed(a, parked))
                    .filter_map(|(a, q)| q.ready_at().filter(|at| *at <= now).map(|at| (at, a)))
                    .collect();
                list.sort();
                list.into_iter()
                    .take(limit)
                    .map(|(_, a)| a.clone())
                    .collect()
            })
            .collect();
        interleave(per_kind, limit)
    }

    /// What waits in the listed mailboxes of `kind`.
    fn backlog(&self, parked: &Parked, kind: &str, now: Timestamp) -> loom_core::store::Backlog {
        let mut b = loom_core::store::Backlog {
            at: now,
            ..loom_core::store::Backlog::default()
        };
        let now = now.as_millis();
        for at in self
            .boxes
            .iter()
            .filter(|(a, _)| a.kind() == kind && listed(a, parked))
            .filter_map(|(_, q)| q.ready_at())
        {
            b.mailboxes += 1;
            if at <= now {
                b.ready += 1;
                let oldest = b.oldest_ready_at.map_or(at, |o| o.as_millis().min(at));
                b.oldest_ready_at = Some(Timestamp::from_millis(oldest));
            }
        }
        b
    }

    /// The earliest time a listed mailbox has something to hand out.
    fn next_due(&self, parked: &Parked) -> Option<Timestamp> {
        self.boxes
            .iter()
            .filter(|(a, _)| listed(a, parked))
            .filter_map(|(_, q)| q.ready_at())
            .min()
            .map(Timestamp::from_millis)
    }

    pub(super) fn pending(&self, actor: &ActorId) -> u64 {
        self.queue(actor).map_or(0, Queue::len)
    }

    fn messages(
        &self,
        actor: &ActorId,
        after: Option<u64>,
        limit: usize,
        now: Timestamp,
    ) -> StoreResult<Vec<Waiting>> {
        let Some(q) = self.queue(actor) else {
            return Ok(Vec::new());
        };
        let now = now.as_millis();
        // (position, due, frame, out, cancelling)
        let mut all: Vec<(u64, u64, &Frame, bool, bool)> = q
            .queued
            .iter()
            .map(|((due, position), m)| (*position, *due, &m.frame, false, m.cancelling))
            .chain(
                q.current
                    .iter()
                    .map(|c| (c.position, c.due, &c.frame, true, c.cancelling)),
            )
            .filter(|(position, ..)| after.is_none_or(|a| *position > a))
            .collect();
        all.sort_by_key(|(position, ..)| *position);
        all.into_iter()
            .take(limit)
            .map(|(position, due, frame, out, cancelling)| {
                let envelope = codec::decode(RecordType::Message, frame).map_err(|e| {
                    StoreError::corrupt(
                        format!("message at position {position} of {actor}'s mailbox"),
                        e,
                    )
                })?;
                Ok(Waiting {
                    position,
                    envelope,
                    deliver_at: (due > now).then(|| Timestamp::from_millis(due)),
                    out,
                    cancelling,
                })
            })
            .collect()
    }

    fn mailboxes(&self, after: Option<&ActorId>, limit: usize) -> Vec<ActorId> {
        let start = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.clone()));
        self.boxes
            .range((start, Bound::Unbounded))
            .filter(|(_, q)| q.len() > 0)
            .take(limit)
            .map(|(a, _)| a.clone())
            .collect()
    }

    fn dead_letters(&self, after: Option<u64>, limit: usize) -> Vec<DeadLetter> {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.dead
            .range((start, Bound::Unbounded))
            .take(limit)
            .map(|(_, d)| (**d).clone())
            .collect()
    }
}

#[async_trait]
impl Mailbox for SimStore {
    async fn enqueue(&self, msg: &Envelope, deliver_at: Option<Timestamp>) -> StoreResult<u64> {
        let frame = Frame::from(prepare_message(msg)?);
        let arg = format!("{} {}", msg.to, msg.id);
        let (to, id) = (msg.to.clone(), msg.id);
        self.update("enqueue", &arg, move |d, now| {
            Ok(d.mailboxes.enqueue(&to, id, frame, deliver_at, now))
        })
        .await
    }

    async fn lease(&self, actor: &ActorId, opts: LeaseOptions) -> StoreResult<Option<Delivery>> {
        opts.validate()?;
        let (id, looked) = (actor.clone(), actor.clone());
        self.update_if(
            "lease",
            actor.as_str(),
            move |d, now| d.mailboxes.leasable(&d.parked, &looked, now, opts.early),
            move |d, now| Ok(d.mailboxes.lease(&d.parked, &id, opts, now)),
        )
        .await
    }

    async fn ack(&self, receipt: &Receipt) -> StoreResult<()> {
        let arg = format!("{} {}", receipt.actor, receipt.message_id);
        let receipt = receipt.clone();
        self.update("ack", &arg, move |d, _| {
            d.mailboxes.settle(&receipt)?;
            Ok(())
        })
        .await
    }

    async fn nack(&self, receipt: &Receipt, delay: Duration, error: &str) -> StoreResult<()> {
        let error = clip_reason(error);
        let arg = format!("{} {}", receipt.actor, receipt.message_id);
        let receipt = receipt.clone();
        self.update("nack", &arg, move |d, now| {
            let c = d.mailboxes.held_mut(&receipt)?;
            c.visible_at = (now + delay).as_millis();
            c.error = Some(error);
            Ok(())
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
        let error = prepare_suspend(receipt, lane, reason, loom_core::Store::partitions(self))?;
        let arg = match lane {
            Some(lane) => format!("{} {} {lane}", receipt.actor, receipt.message_id),
            None => format!("{} {}", receipt.actor, receipt.message_id),
        };
        let (receipt, lane) = (receipt.clone(), lane.cloned());
        self.update("suspend", &arg, move |d, now| {
            let visible_at = (now + delay).as_millis();
            d.mailboxes
                .suspend(&receipt, lane.as_ref(), visible_at, error)
        })
        .await
    }

    async fn cancel(&self, actor: &ActorId, message: MessageId) -> StoreResult<Option<u64>> {
        let arg = format!("{actor} {message}");
        let actor = actor.clone();
        self.update("cancel", &arg, move |d, now| {
            Ok(d.mailboxes.cancel(&actor, message, now.as_millis()))
        })
        .await
    }

    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> StoreResult<()> {
        check_ttl("visibility timeout", visibility)?;
        let arg = format!("{} {}", receipt.actor, receipt.message_id);
        let receipt = receipt.clone();
        self.update("extend", &arg, move |d, now| {
            d.mailboxes.held_mut(&receipt)?.visible_at = (now + visibility).as_millis();
            Ok(())
        })
        .await
    }

    async fn dead_letter(&self, receipt: &Receipt, reason: &str) -> StoreResult<u64> {
        let arg = format!("{} {}", receipt.actor, receipt.message_id);
        let (receipt, reason) = (receipt.clone(), reason.to_owned());
        self.update("dead_letter", &arg, move |d, now| {
            let c = d.mailboxes.settle(&receipt)?;
            Ok(d.mailboxes.bury(&receipt.actor, c, &reason, now))
        })
        .await
    }

    /// The recipients of each relay move, for a store of several partitions (the relay is
    /// the only thing that fills a mailbox on its own); `None` for one of one partition.
    fn arrivals(&self) -> Option<tokio::sync::broadcast::Receiver<Arc<[ActorId]>>> {
        (self.inner.partitions > 1).then(|| self.inner.arrivals.subscribe())
    }

    async fn ready_actors(&self, kinds: &[&str], limit: usize) -> StoreResult<Vec<ActorId>> {
        let arg = kinds.join(",");
        self.query("ready_actors", &arg, |d, now| {
            Ok(d.mailboxes.ready(&d.parked, kinds, limit, now))
        })
        .await
    }

    async fn next_due(&self) -> StoreResult<Option<Timestamp>> {
        self.query("next_due", "", |d, _| Ok(d.mailboxes.next_due(&d.parked)))
            .await
    }

    async fn backlog(&self, kind: &str) -> StoreResult<loom_core::store::Backlog> {
        self.query("backlog", kind, |d, now| {
            Ok(d.mailboxes.backlog(&d.parked, kind, now))
        })
        .await
    }

    async fn pending(&self, actor: &ActorId) -> StoreResult<u64> {
        self.query("pending", actor.as_str(), |d, _| {
            Ok(d.mailboxes.pending(actor))
        })
        .await
    }

    async fn messages(
        &self,
        actor: &ActorId,
        after: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<Waiting>> {
        self.query("messages", actor.as_str(), |d, now| {
            d.mailboxes.messages(actor, after, limit, now)
        })
        .await
    }

    async fn mailboxes(&self, after: Option<&ActorId>, limit: usize) -> StoreResult<Vec<ActorId>> {
        let arg = after.map_or("", |a| a.as_str());
        self.query("mailboxes", arg, |d, _| {
            Ok(d.mailboxes.mailboxes(after, limit))
        })
        .await
    }

    async fn dead_letters(&self, after: Option<u64>, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        let arg = after.map_or_else(String::new, |a| a.to_string());
        self.query("dead_letters", &arg, |d, _| {
            Ok(d.mailboxes.dead_letters(after, limit))
        })
        .await
    }

    async fn purge_dead_letters(&self, ids: &[u64]) -> StoreResult<u64> {
        loom_core::store::backend::check_purge(ids)?;
        let ids = ids.to_vec();
        let arg = format!("{} ids", ids.len());
        self.update("purge_dead_letters", &arg, move |d, _| {
            Ok(ids
                .iter()
                .filter(|id| d.mailboxes.dead.remove(id).is_some())
                .count() as u64)
        })
        .await
    }

    async fn requeue_dead_letter(&self, id: u64) -> StoreResult<u64> {
        // Drawn from the store's generator (not the process's), so that the run replays.
        let new_id = self.fresh_message_id();
        self.update("requeue_dead_letter", &id.to_string(), move |d, now| {
            let dead = d
                .mailboxes
                .dead
                .get(&id)
                .cloned()
                .ok_or(StoreError::DeadLetterNotFound(id))?;
            let envelope = Envelope {
                id: new_id,
                ..dead.envelope.requeued()
            };
            let frame = Frame::from(prepare_message(&envelope)?);
            // Checked; from here on nothing fails.
            d.mailboxes.dead.remove(&id);
            let position = d
                .mailboxes
                .enqueue(&envelope.to, envelope.id, frame, None, now);
            // Its key is its caller's again: held until the requeued run settles it.
            if let Some(key) = &envelope.idempotency_key {
                d.records.hold(&envelope.to, key);
            }
            Ok(position)
        })
        .await
    }
}

/// Makes the current message, suspended and not handed out since, visible at `now`; drops its
/// mark either way.
fn wake_current(c: &mut Current, now: u64) {
    if let Some((_, deliveries)) = c.wake_on.take()
        && deliveries == c.deliveries
        && c.visible_at > now
    {
        c.visible_at = now;
    }
}
