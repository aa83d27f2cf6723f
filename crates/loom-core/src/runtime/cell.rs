//! One active actor: recovery from snapshot plus journal tail, then the turn loop.
//!
//! Invariants kept here (rules of RELIABILITY.md):
//! - the in-memory state is exactly snapshot + every journaled `StatePatched` up to `next_seq - 1`;
//!   a turn whose write fails leaves it as it was (the old state is put back);
//! - D5, D6: a message is applied at most once: its ack is part of the turn's atomic write, and
//!   a message whose id the journal already completed (`recent`) is acked without running;
//! - D7: every settlement records the message's key (a turn, or a give-up turn);
//! - D16: a store failure fails the attempt, which is retried, then given up with its reason;
//! - an invocation whose `Invoked` entry is in the journal but that never completed is resumed
//!   by replay when its message comes back, never started afresh.

use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use serde_json::Value;

use crate::finite::refuse_non_finite;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::entry::{Entry, EntryKind, Seq, Step};
use crate::envelope::{Envelope, Retire, RetireReason};
use crate::error::StoreError;
use crate::id::{ActorId, IdempotencyKey, MessageId};
use crate::store::backend::{Outgoing, Record, Settle, Turn};
use crate::store::{Delivery, LeaseOptions, Park, Retired};
use crate::time::Timestamp;

use super::Shared;
use super::actor::Actor;
use super::context::{Context, Interrupt, Invocation, Io};
use super::metrics::{Count, Latency, Metrics};
use super::record::{Outcome, Recorded};
use super::replay::{Body, GivenUp, RecoverError, Unfinished, remember, replay, state_patch};
use super::trace;

/// What the loop does after a delivery.
pub(crate) enum Next {
    /// Go on; with the actor's next message when the turn's write already leased it.
    Continue(Option<Box<Delivery>>),
    /// Go on, but wait for a wake-up before looking at the mailbox: the turn's write looked
    /// for the next message and found none, so a lease now would find none either. What comes
    /// later wakes the actor (a send of this process, another node's, an arrival from the
    /// relay, or the ready scan finding the mailbox ready), and `Notify` keeps a wake-up that
    /// comes before the wait.
    Drained,
    /// Retry later: the message was nacked with this delay.
    Backoff(Duration),
    /// The journal moved under us, or an invocation was partly journaled: reload from the store.
    Reload,
    /// Park this actor (see [`Park`]).
    Park(Park),
    /// The lease is gone: stop at once.
    Stop,
    /// The invocation suspended (its message nacked until it is due again): passivate.
    Suspend,
}

pub(crate) struct Cell<A: Actor> {
    actor: Arc<A>,
    id: ActorId,
    state: A::State,
    value: Value,
    /// True while `value` is `State::default()` and no patch was journaled on top of it: the next
    /// patch then replaces the whole state, so the journal never depends on the code's default.
    from_default: bool,
    next_seq: Seq,
    recent: VecDeque<MessageId>,
    /// What the actor's dead-lettered invocations sent (see [`GivenUp`]).
    given_up: GivenUp,
    unfinished: Option<Unfinished>,
    since_snapshot: u64,
    bytes_since_snapshot: u64,
    compacting: Arc<AtomicBool>,
    /// See `Replayed::last_change`.
    last_change: Seq,
    /// Set once this cell's actor was retired: its journal is gone, so nothing is scheduled
    /// for it again from here.
    retired: bool,
    /// Set when the state could not be put back after a failed turn (its serde is not a round
    /// trip): what is in memory is not what is journaled, so the cell is reloaded from the
    /// journal before anything else runs on it (`activation.rs` `serve`).
    diverged: bool,
    /// How many snapshots newer than the one recovery started from failed their checks: a
    /// compaction keeps that many more, so that they do not take the place of readable ones
    /// (with `keep = 2` it would keep the unreadable one and its own, and delete the one
    /// recovery used).
    unreadable_snapshots: usize,
}

impl<A: Actor> Cell<A> {
    /// Loads the newest readable snapshot and streams the journal after it.
    pub(crate) async fn recover(
        actor: Arc<A>,
        id: ActorId,
        io: &Io,
        shared: &Shared,
    ) -> Result<Self, RecoverError> {
        let initial = serde_guard(|| serde_json::to_value(A::State::default())).map_err(|e| {
            RecoverError::Unrecoverable(format!("default state does not encode: {e}"))
        })?;
        let mut r = replay(&*io.store, &id, initial).await?;
        shared
            .metrics
            .count(Count::CorruptSnapshots, A::KIND, r.corrupt_snapshots);
        const { assert!(A::STATE_VERSION >= 1, "Actor::STATE_VERSION starts at 1") };
        if !r.from_default && r.version != A::STATE_VERSION {
            upgrade(&*actor, &id, io, &mut r).await?;
            shared.metrics.count(Count::StateUpgrades, A::KIND, 1);
        }
        let state: A::State =
            serde_guard(|| serde_json::from_value(r.value.clone())).map_err(|e| {
                RecoverError::Unrecoverable(format!(
                    "journaled state does not decode as {} state: {e}",
                    A::KIND
                ))
            })?;
        shared.metrics.count(Count::Recoveries, A::KIND, 1);
        shared
            .metrics
            .count(Count::ReplayedEntries, A::KIND, r.replayed);
        tracing::debug!(actor = %id, replayed = r.replayed, "recovered");
        Ok(Cell {
            actor,
            id,
            state,
            value: r.value,
            from_default: r.from_default,
            next_seq: r.next_seq,
            recent: r.recent,
            given_up: r.given_up,
            unfinished: r.unfinished,
            since_snapshot: r.replayed,
            bytes_since_snapshot: r.bytes,
            compacting: Arc::new(AtomicBool::new(false)),
            last_change: r.last_change,
            retired: false,
            diverged: false,
            unreadable_snapshots: usize::try_from(r.corrupt_snapshots).unwrap_or(usize::MAX),
        })
    }

    /// Handles one delivery, start to finish.
    pub(crate) async fn process(&mut self, io: &Io, shared: &Arc<Shared>, d: Delivery) -> Next {
        let span = tracing::info_span!(
            "loom.invocation",
            otel.name = %format_args!("{} invocation", A::KIND),
            kind = A::KIND,
            actor = %self.id,
            message_id = %d.envelope.id,
            attempt = d.envelope.attempt,
            traceparent = d.envelope.traceparent.as_deref().unwrap_or(""),
        );
        // A child of the span that sent the message (see `trace`). No OpenTelemetry layer (or
        // none that records this span) leaves nothing to link: not an error.
        // (Nothing to parse when no subscriber records the span: the hot path without tracing.)
        if !span.is_disabled()
            && span
                .set_parent(trace::parent(d.envelope.traceparent.as_deref()))
                .is_err()
        {
            tracing::trace!("no OpenTelemetry layer records the invocation span");
        }
        self.process_inner(io, shared, d).instrument(span).await
    }

    /// Whether what is in memory is no longer the journal's state (see `diverged`): the cell
    /// must be reloaded before it processes anything else (an actor whose journaled state
    /// does not decode is then parked).
    pub(crate) fn diverged(&self) -> bool {
        self.diverged
    }

    async fn process_inner(&mut self, io: &Io, shared: &Arc<Shared>, d: Delivery) -> Next {
        if let Some(r) = d.envelope.retire {
            return self.retire(io, shared, &d, r).await;
        }
        let delivered = tokio::time::Instant::now();
        let id = d.envelope.id;
        // Already applied (its ack was lost): ack it without running it again.
        if self.recent.contains(&id) {
            tracing::debug!("message already applied; acknowledging it");
            let turn = Turn {
                fence: Some(&io.lease),
                settle: Some(Settle::Ack(&d.receipt)),
                ..Turn::append(&self.id, self.next_seq, &[])
            };
            return match io.commit(turn).await {
                Ok(_) => Next::Continue(None),
                Err(e) => {
                    self.on_interrupt(io, shared, &d, false, 0, Interrupt::from_store(e))
                        .await
                }
            };
        }
        let resuming = self.unfinished.as_ref().map(|u| u.message_id) == Some(id);
        let waiting = resuming && self.unfinished.as_ref().is_some_and(|u| u.waiting());
        // Deliveries that only waited (a restart during a durable sleep or event wait) do not
        // count: from the one that saw the wait end, they do.
        let from = match &self.unfinished {
            Some(u) if resuming => u.counted_from(),
            _ => 0,
        };
        let counted = d.envelope.attempt.saturating_sub(from);
        if counted >= give_up_after(io.config.retry.max_attempts) && !waiting {
            // Every attempt was started and none of them finished, failed or gave the message
            // back: the process stopped (or the actor lost its lease) during each. Give up before
            // running it again, through the same turn as any other failure, so that its
            // caller's idempotency key gets the failure and a journaled invocation is closed
            // (a message that kills its process would otherwise take down node after node).
            let reason = format!(
                "gave up after {counted} deliveries: none of them finished (the process stopped or the actor moved during each){}",
                d.last_error
                    .as_deref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
            return self.give_up(io, shared, &d, resuming, &reason).await;
        }
        if let Some(abandoned) = self.unfinished.take_if(|_| !resuming) {
            // The journal holds an invocation whose message is gone (dead-lettered): close it.
            let mut inv = self.invocation(io, &d, false);
            inv.push(EntryKind::Failed {
                error: "abandoned: its message was dead-lettered before it finished".into(),
                dead_lettered: true,
            });
            let turn = Turn {
                fence: Some(&io.lease),
                ..Turn::append(&self.id, self.next_seq, &inv.pending)
            };
            match io.commit(turn).await {
                Ok(c) => {
                    self.next_seq = c.highest + 1;
                    abandoned.close(&self.id, true, &mut self.recent, &mut self.given_up);
                }
                Err(e) => {
                    // Still open in the journal: closed by the next try.
                    self.unfinished = Some(abandoned);
                    return self
                        .on_interrupt(io, shared, &d, false, 0, Interrupt::from_store(e))
                        .await;
                }
            }
        }
        let msg: A::Message = match serde_guard(|| {
            serde_json::from_value(d.envelope.payload.clone())
        }) {
            Ok(m) => m,
            Err(e) if resuming => {
                // It decoded when its `Invoked` was journaled: the code changed since.
                // Given up, the invocation would lose every step it recorded (the events
                // its waits received, its activities' outputs); parked, it resumes under
                // code that reads it (`loom parked unpark`), as an activity output or a
                // state that no longer decodes parks.
                let reason = format!(
                    "the message of an unfinished invocation no longer decodes as a message of actor kind {} (the code changed since it was journaled, or this node runs older code than the one that began it: unpark once every node runs code that reads it): {e}",
                    A::KIND
                );
                tracing::error!(actor = %self.id, %reason, "parking the actor");
                return Next::Park(self.park(io, &d, None, &reason));
            }
            Err(e) => {
                // Bad input: a dead letter with its reason; the journal is untouched.
                let reason = format!("malformed message for actor kind {}: {e}", A::KIND);
                return self.give_up(io, shared, &d, false, &reason).await;
            }
        };
        let recorded = if resuming {
            self.unfinished.take().map(|u| u.steps).unwrap_or_default()
        } else {
            BTreeMap::new()
        };
        let mut inv = self.invocation(io, &d, resuming);
        inv.recorded = recorded;
        inv.counted_from = from;
        if !resuming {
            inv.push(EntryKind::Invoked {
                message_id: id,
                payload: d.envelope.payload.clone(),
                idempotency_key: d.envelope.idempotency_key.clone(),
                requeued_from: d.envelope.requeued_from,
            });
        }
        shared.metrics.count(Count::Invocations, A::KIND, 1);
        let outcome = {
            let mut ctx = Context { inv: &mut inv, io };
            // Built inside the net: a handler may run code before its future (a plain `fn`
            // returning an `async` block), and that may panic too.
            AssertUnwindSafe(async { self.actor.handle(&mut self.state, &mut ctx, msg).await })
                .catch_unwind()
                .await
        };
        if let Some(interrupt) = inv.interrupt.take() {
            self.restore_state();
            // A delivery that the store failed while it still resumed the wait it was woken
            // for (a wait's recheck, or its event's arrival) only waited, like the wake-ups
            // before it, which do not count (rule D17): its failure gives the waiting message
            // up no more than theirs did. It comes back after the backoff its deliveries
            // since the wait began would have earned (up to `Retry::max`), for as long as the
            // store fails so. (A failed write that ends a wait, `flush_resumed`, counts from
            // its own delivery instead: the wait has ended then.) A refusal on its merits
            // counts as any failure.
            if waiting
                && inv.counted_from == from
                && let Interrupt::Store(e) = &interrupt
                && e.is_transient()
            {
                shared.health.failed(e);
                shared.metrics.count(Count::Retries, A::KIND, 1);
                let delay = io
                    .config
                    .retry
                    .delay(d.envelope.attempt.saturating_sub(from) + 1);
                tracing::warn!(actor = %self.id, error = %e, ?delay, "the store failed while a wait resumed; the wait is taken up again after a pause");
                let reason = format!("store failure while a wait resumed: {e}");
                if let Err(e) = io.store.nack(&d.receipt, delay, &reason).await {
                    tracing::warn!(actor = %self.id, error = %e, "could not hand the message back; it comes back when its visibility runs out");
                }
                return Next::Reload;
            }
            return self
                .on_interrupt(io, shared, &d, inv.journaled, inv.counted_from, interrupt)
                .await;
        }
        if let Some(step) = inv.open
            && outcome.is_ok()
        {
            // The handler returned with a durable call's future dropped half-way. (One that
            // panicked, inside an activity's last attempt say, unwound past the call's end: it
            // is retried as any panic is.)
            let reason = inv.dropped(step);
            tracing::error!(actor = %self.id, %reason, "non-determinism; parking the actor");
            self.restore_state();
            return Next::Park(self.park(io, &d, Some(step), &reason));
        }
        let (outcome, new_value) = match outcome {
            Err(panic) if waiting && inv.counted_from == from => {
                // Panicked while its journaled steps were replayed, before the wait it resumes:
                // the code ran past this point when it recorded them, so it changed since (or
                // does not replay alike). Retried, it would be given up counting the deliveries
                // that only waited (rule D17 spares them only until the wait ends), at once after
                // a long wait, with every step it recorded; parked, fixed code resumes it.
                self.restore_state();
                let reason = format!(
                    "handler panicked while its journaled steps were replayed, before the wait it resumes (the code changed since they were recorded, or does not replay them alike): {}",
                    panic_message(&panic)
                );
                tracing::error!(actor = %self.id, %reason, "parking the actor");
                return Next::Park(self.park(io, &d, None, &reason));
            }
            Err(panic) => {
                self.restore_state();
                let reason = format!("handler panicked: {}", panic_message(&panic));
                tracing::warn!(error = %reason, "invocation failed");
                return self
                    .retry_or_give_up(io, shared, &d, inv.journaled, inv.counted_from, &reason)
                    .await;
            }
            Ok(Ok(reply)) => {
                let encoded = serde_guard(|| {
                    Ok((
                        serde_json::to_value(&self.state)?,
                        serde_json::to_value(&reply)?,
                    ))
                });
                match encoded {
                    Ok((v, r)) => {
                        // A NaN or an infinity would be journaled (or recorded) as null, and
                        // read back as another value, or as none: refused, once, since every
                        // attempt would compute it alike.
                        let refused = refuse_non_finite(&self.state, &v, "state")
                            .and_then(|()| refuse_non_finite(&reply, &r, "reply"))
                            .and_then(|()| refuse_too_deep(&v, &self.value));
                        if let Err(reason) = refused {
                            self.restore_state();
                            tracing::warn!(actor = %self.id, message = %id, %reason, "giving the message up");
                            return self.give_up(io, shared, &d, inv.journaled, &reason).await;
                        }
                        (Outcome::Ok(r), Some(v))
                    }
                    Err(e) => {
                        self.restore_state();
                        let reason = format!("state or reply does not encode: {e}");
                        return self
                            .retry_or_give_up(
                                io,
                                shared,
                                &d,
                                inv.journaled,
                                inv.counted_from,
                                &reason,
                            )
                            .await;
                    }
                }
            }
            Ok(Err(rejected)) => {
                self.restore_state();
                tracing::debug!(actor = %self.id, message = %d.envelope.id, reason = rejected.reason(), "the handler refused the message");
                let reason = crate::limits::clip_reason(rejected.reason());
                let outcome = match rejected.value() {
                    _ if rejected.is_cancelled() => Outcome::Cancelled(reason),
                    Some(value) => Outcome::RejectedWithValue {
                        reason,
                        value: value.clone(),
                    },
                    None => Outcome::Rejected(reason),
                };
                (outcome, None)
            }
        };
        if !inv.recorded.is_empty() {
            let first = inv.recorded.keys().next().copied().unwrap_or_default();
            let reason = format!(
                "message {id} on {}: the journal has step {first}, but the handler now finishes after step {}",
                self.id, inv.step
            );
            self.restore_state();
            return Next::Park(self.park(io, &d, Some(first), &reason));
        }
        let mut changed = false;
        if let Some(v) = &new_value
            && let Some(patch) = state_patch(&self.value, v, self.from_default)
        {
            changed = true;
            if self.from_default && A::STATE_VERSION != 1 {
                // The first state of an actor whose code is past version 1 says its version (a
                // journal that does not is at version 1); whole, as that first patch would be.
                inv.push(EntryKind::StateUpgraded {
                    from: 0,
                    to: A::STATE_VERSION,
                    state: v.clone(),
                });
            } else {
                inv.push(EntryKind::StatePatched { patch });
            }
        }
        match &outcome {
            Outcome::Ok(reply) => inv.push(EntryKind::Completed {
                reply: reply.clone(),
            }),
            Outcome::Rejected(reason)
            | Outcome::RejectedWithValue { reason, .. }
            | Outcome::Failed(reason)
            | Outcome::Cancelled(reason) => inv.push(EntryKind::Failed {
                error: reason.clone(),
                dead_lettered: false,
            }),
        }
        let rejected = matches!(
            outcome,
            Outcome::Rejected(_) | Outcome::RejectedWithValue { .. } | Outcome::Cancelled(_)
        );
        if inv.finish && matches!(outcome, Outcome::Ok(_)) {
            // `Context::finish`: the retirement leaves with the reply, in the same write.
            let highest = inv.next_seq + inv.pending.len() as u64 - 1;
            inv.outbox.push(retirement(
                &self.id,
                MessageId::derived(&d.envelope.origin(), "retire"),
                Retire {
                    highest,
                    reason: RetireReason::Finished,
                },
                io.config.retention.finished_after,
            ));
        }
        let recorded = Recorded {
            message_id: id,
            outcome,
        };
        let record_value = serde_json::to_value(&recorded).unwrap_or(Value::Null);
        let key = d.envelope.idempotency_key.clone();
        let turn = Turn {
            fence: Some(&io.lease),
            send: &inv.outbox,
            settle: Some(Settle::Ack(&d.receipt)),
            record: key.as_ref().map(|k| Record {
                actor: &self.id,
                key: k,
                result: &record_value,
                ttl: io.config.reply_ttl,
            }),
            // The next message in the same write, unless the actor is stopping (a mailbox that
            // never empties would otherwise keep it from ever stopping) or its partition's
            // lease is past its deadline here (the fence may still pass at the store).
            next: (!io.stopping.is_cancelled() && io.tenure.held()).then_some(io.lease_options),
            ..Turn::append(&self.id, inv.next_seq, &inv.pending)
        };
        let asked_next = turn.next.is_some();
        let committing = tokio::time::Instant::now();
        // Before the write: a same-partition send's wake compares it with departures.
        let written = shared.moment();
        let committed = io.commit(turn).await;
        let observe = match committed {
            Ok(_) => Metrics::observe,
            // A write that timed out or was refused took its time too: a dashboard of commit
            // latency rises with it.
            Err(_) => Metrics::observe_failed,
        };
        observe(
            &shared.metrics,
            Latency::StoreCommit,
            A::KIND,
            committing.elapsed(),
        );
        observe(&shared.metrics, Latency::Turn, A::KIND, delivered.elapsed());
        match committed {
            Ok(committed) => {
                shared.health.ok();
                if rejected {
                    // Counted once the refusal is journaled: a refusal whose turn was refused
                    // (fenced by a lease lost meanwhile) refused nothing.
                    shared.metrics.count(Count::Rejections, A::KIND, 1);
                }
                self.next_seq = committed.highest + 1;
                if changed {
                    self.last_change = committed.highest;
                }
                if let Some(v) = new_value {
                    self.from_default &= v == self.value;
                    self.value = v;
                }
                remember(&mut self.recent, id);
                // Ended without a dead letter: nothing runs this message again.
                self.given_up.forget(d.envelope.origin());
                self.since_snapshot += inv.pending.len() as u64;
                self.bytes_since_snapshot += inv.weight;
                if let Some(k) = &key {
                    io.hub.reply(&self.id, k, &record_value);
                }
                // A message to another partition is not in its mailbox yet: the relay moves
                // it, and the store's feed of arrivals (`Mailbox::arrivals`) says when.
                let n = io.store.partitions();
                let here = crate::partition::partition_of(&self.id, n);
                for o in &inv.outbox {
                    if crate::partition::partition_of(&o.envelope.to, n) == here {
                        shared.wake(&o.envelope.to, Some(written));
                    }
                }
                self.maybe_compact(io, shared);
                match committed.next {
                    Some(d) => Next::Continue(Some(Box::new(d))),
                    None if asked_next => Next::Drained,
                    None => Next::Continue(None),
                }
            }
            Err(e) => {
                self.restore_state();
                self.on_interrupt(
                    io,
                    shared,
                    &d,
                    inv.journaled,
                    inv.counted_from,
                    Interrupt::from_store(e),
                )
                .await
            }
        }
    }

    /// The park record for stopping at `step` of `d`'s invocation.
    fn park(&self, io: &Io, d: &Delivery, step: Option<Step>, reason: &str) -> Park {
        Park {
            message_id: Some(d.envelope.id),
            step,
            ..Park::new(io.config.node.clone(), reason)
        }
    }

    fn invocation(&self, io: &Io, d: &Delivery, resuming: bool) -> Invocation {
        Invocation {
            actor: self.id.clone(),
            envelope: d.envelope.clone(),
            receipt: d.receipt.clone(),
            next_seq: self.next_seq,
            pending: Vec::new(),
            outbox: Vec::new(),
            journaled: resuming,
            recorded: BTreeMap::new(),
            step: 0,
            interrupt: None,
            weight: 0,
            counted_from: 0,
            patches: Default::default(),
            cancel: super::context::CancelSignal::new(&io.hub, &d.envelope.id),
            cancelled: false,
            finish: false,
            open: None,
            opening: false,
            cancel_looked: false,
            sent_before: self
                .given_up
                .sent_by(d.envelope.origin(), d.envelope.requeued_from.is_some()),
        }
    }

    /// Puts back the state from before the turn (the handler may have changed it).
    fn restore_state(&mut self) {
        match serde_guard(|| serde_json::from_value(self.value.clone())) {
            Ok(s) => self.state = s,
            // The value decoded when it was recovered or written, so this cannot fail unless
            // the State type's serde is not a round trip: the handler's changes must not be
            // journaled by a later turn, so the cell is reloaded (`diverged`).
            Err(e) => {
                tracing::error!(actor = %self.id, error = %e, "state does not decode back from its own JSON; reloading the actor from its journal");
                self.diverged = true;
            }
        }
    }

    /// `journaled`: whether part of this invocation is known to be in the journal already;
    /// `from`: the delivery from which the message's attempts count (`Invocation::counted_from`).
    async fn on_interrupt(
        &mut self,
        io: &Io,
        shared: &Arc<Shared>,
        d: &Delivery,
        journaled: bool,
        from: u32,
        i: Interrupt,
    ) -> Next {
        match i {
            Interrupt::LeaseLost => {
                tracing::warn!(actor = %self.id, "lease lost; stopping the actor");
                Next::Stop
            }
            Interrupt::Conflict(e) => {
                tracing::warn!(actor = %self.id, error = %e, "journal moved under this actor; reloading");
                Next::Reload
            }
            Interrupt::NonDeterminism(step, reason) => {
                tracing::error!(actor = %self.id, %reason, "non-determinism; parking the actor");
                Next::Park(self.park(io, d, Some(step), &reason))
            }
            Interrupt::Suspended { delay, alarm } => {
                // The context suspended the message (`Context::suspend`): it stays the
                // mailbox's current one, invisible until its time, event or cancellation (later
                // messages wait behind it); the delivery that then takes it resumes the wait,
                // which does not count against the message (rule D17).
                shared.metrics.count(Count::Suspensions, A::KIND, 1);
                if let Some((at, warm)) = alarm {
                    shared.alarms.set_at(&self.id, at, warm);
                }
                tracing::debug!(actor = %self.id, ?delay, "suspended");
                Next::Suspend
            }
            Interrupt::Unsuspended(e) => {
                // The replay runs the wait again, which tries to suspend again: after a pause,
                // so that a store that keeps refusing is not spun on.
                tracing::warn!(actor = %self.id, error = %e, "could not suspend; resuming the invocation");
                self.hand_back(io, d, io.config.poll_interval).await
            }
            Interrupt::Store(e) if let Some(reason) = unwritable(&e) => {
                tracing::warn!(actor = %self.id, message = %d.envelope.id, %reason, "giving the message up");
                self.give_up(io, shared, d, journaled, &reason).await
            }
            Interrupt::Store(e) => {
                shared.health.failed(&e);
                let reason = format!("store failure: {e}");
                // A write that failed for want of the store (a lost connection, a failed disk)
                // may have landed; one refused on its merits (too large, invalid) did not. If
                // something of this invocation may be journaled, reload to resume it, and
                // close it with `Failed` when giving up; otherwise the journal is left as it is.
                let journaled = journaled || e.is_transient();
                let next = self
                    .retry_or_give_up(io, shared, d, journaled, from, &reason)
                    .await;
                match next {
                    Next::Backoff(_) | Next::Continue(_) | Next::Drained => Next::Reload,
                    other => other,
                }
            }
        }
    }

    /// The delivery is still out to this actor, which is to run it again soon: give the
    /// message back after `delay`, so that the reload leases it then instead of when its
    /// visibility runs out. (If that fails too, it comes back then.)
    async fn hand_back(&self, io: &Io, d: &Delivery, delay: Duration) -> Next {
        if let Err(e) = io
            .store
            .nack(
                &d.receipt,
                delay,
                "could not suspend; resumed after a pause",
            )
            .await
        {
            tracing::warn!(actor = %self.id, error = %e, "could not hand the message back; it is delivered again when its visibility runs out");
        }
        Next::Reload
    }

    /// A failed attempt: nack with backoff, or after the last attempt dead-letter the message
    /// (closing its journaled invocation, if any, with `Failed`).
    async fn retry_or_give_up(
        &mut self,
        io: &Io,
        shared: &Arc<Shared>,
        d: &Delivery,
        journaled: bool,
        from: u32,
        reason: &str,
    ) -> Next {
        // Deliveries before `from` only waited (a restart or a suspension during a durable
        // wait): they are not failed attempts (rule D17).
        let attempts = d.envelope.attempt.saturating_sub(from) + 1;
        let retry = io.config.retry;
        if attempts < retry.max_attempts {
            shared.metrics.count(Count::Retries, A::KIND, 1);
            let delay = retry.delay(attempts);
            return match io.store.nack(&d.receipt, delay, reason).await {
                Ok(()) => {
                    if journaled {
                        Next::Reload
                    } else {
                        Next::Backoff(delay)
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not nack; the message comes back when its visibility runs out");
                    Next::Reload
                }
            };
        }
        let reason = format!("gave up after {attempts} attempts: {reason}");
        self.give_up(io, shared, d, journaled, &reason).await
    }

    /// Dead-letters the message with `reason`, records the failure for its caller, and closes
    /// its invocation in the journal if one was journaled.
    async fn give_up(
        &mut self,
        io: &Io,
        shared: &Arc<Shared>,
        d: &Delivery,
        journaled: bool,
        reason: &str,
    ) -> Next {
        let mut inv = self.invocation(io, d, journaled);
        if journaled {
            // Reload first so that the failure is appended after what the attempt journaled.
            match io.store.highest_seq(&self.id).await {
                Ok(h) => inv.next_seq = h + 1,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the journal to close the failed invocation");
                    return Next::Reload;
                }
            }
            inv.push(EntryKind::Failed {
                error: reason.to_owned(),
                dead_lettered: true,
            });
        }
        let recorded = Recorded {
            message_id: d.envelope.id,
            outcome: Outcome::Failed(reason.to_owned()),
        };
        let record_value = serde_json::to_value(&recorded).unwrap_or(Value::Null);
        let key: Option<IdempotencyKey> = d.envelope.idempotency_key.clone();
        let turn = Turn {
            fence: Some(&io.lease),
            settle: Some(Settle::DeadLetter(&d.receipt, reason)),
            record: key.as_ref().map(|k| Record {
                actor: &self.id,
                key: k,
                result: &record_value,
                ttl: io.config.reply_ttl,
            }),
            ..Turn::append(&self.id, inv.next_seq, &inv.pending)
        };
        match io.commit(turn).await {
            Ok(h) => {
                shared.metrics.count(Count::DeadLetters, A::KIND, 1);
                tracing::warn!(actor = %self.id, message_id = %d.envelope.id, %reason, "message dead-lettered");
                if let Some(k) = &key {
                    io.hub.reply(&self.id, k, &record_value);
                }
                if journaled {
                    Next::Reload
                } else {
                    self.next_seq = h.highest + 1;
                    Next::Continue(None)
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not dead-letter the message; it comes back when its visibility runs out");
                Next::Reload
            }
        }
    }

    /// The runtime's retirement message `r` (see `Retention`). The actor is kept if it ran
    /// since the retirement was decided: for idleness, if its journal grew; after
    /// `Context::finish`, only if its state changed (a read does not undo a finish, nor does
    /// an upgrade of its state at loading). Else its journal is deleted through
    /// `Store::retire` (fenced, and only if no other message waits: rule D22), and the actor
    /// passivated (its memory holds a state the store no longer has). A kept actor's
    /// retirement is acked; one for idleness is sent again `idle_after` later if nothing else
    /// waits (other mail leads to another idle passivation, which sends one); one after a
    /// finish, kept back by a waiting message, is sent again a grace later, unless another
    /// finish's retirement that is not stale waits.
    async fn retire(&mut self, io: &Io, shared: &Arc<Shared>, d: &Delivery, r: Retire) -> Next {
        let highest = self.next_seq - 1;
        let ran = match r.reason {
            RetireReason::Finished => self.last_change > r.highest,
            RetireReason::Idle => highest != r.highest,
        };
        let found = if ran || self.unfinished.is_some() {
            Ok(Retired::Moved)
        } else {
            io.store.retire(&d.receipt, &io.lease, highest).await
        };
        let kept = match found {
            Ok(Retired::Deleted) => {
                self.retired = true;
                shared.metrics.count(Count::Retired, A::KIND, 1);
                tracing::info!(actor = %self.id, reason = ?r.reason, highest, "retired: journal deleted");
                return Next::Suspend;
            }
            Ok(kept) => kept,
            Err(e @ (StoreError::LeaseLost { .. } | StoreError::StaleReceipt { .. })) => {
                return self
                    .on_interrupt(io, shared, d, false, 0, Interrupt::from_store(e))
                    .await;
            }
            Err(e) => {
                // Never journaled: give the message back and look again after a pause.
                shared.health.failed(&e);
                tracing::warn!(actor = %self.id, error = %e, "could not retire the actor; trying again");
                return self.hand_back(io, d, io.config.poll_interval).await;
            }
        };
        tracing::debug!(actor = %self.id, reason = ?r.reason, ?kept, "not retired: the actor ran since, or has mail");
        let mut again = Vec::new();
        // A finished actor kept by a waiting message is looked at again a grace later, and so
        // on until that message has run (dropped, the retirement kept the actor for good
        // without idle retention). Not if another finish's retirement that is not stale waits
        // (a newer finish's, or a copy sent earlier): that one decides, and finds this finish
        // too. Every finishing invocation sends one, a finishing read too, so each sending
        // itself again would pile them up. A stale one (the state changed after its finish)
        // decides nothing: it is dropped when it comes.
        if r.reason == RetireReason::Finished && kept == Retired::Busy {
            let waiting = match io.store.messages(&self.id, None, RETIREMENT_PEEK).await {
                Ok(waiting) => waiting,
                Err(e) => {
                    shared.health.failed(&e);
                    tracing::warn!(actor = %self.id, error = %e, "could not look at the actor's mail; trying again");
                    return self.hand_back(io, d, io.config.poll_interval).await;
                }
            };
            // Not stale: decided at or after the state's last change, as this one was.
            let decides = waiting.iter().any(|w| {
                w.envelope.id != d.envelope.id
                    && w.envelope.retire.is_some_and(|o| {
                        o.reason == RetireReason::Finished && o.highest >= self.last_change
                    })
            });
            if !decides {
                again.push(retirement(
                    &self.id,
                    MessageId::new(),
                    r,
                    io.config.retention.finished_after,
                ));
            }
        }
        if r.reason == RetireReason::Idle
            && kept == Retired::Moved
            && let Some(after) = io.config.retention.idle_after
        {
            match io.store.pending(&self.id).await {
                Ok(1) => again.push(idle_retirement(&self.id, highest, after)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(actor = %self.id, error = %e, "could not count the actor's mail; trying again");
                    return self.hand_back(io, d, io.config.poll_interval).await;
                }
            }
        }
        let turn = Turn {
            fence: Some(&io.lease),
            send: &again,
            settle: Some(Settle::Ack(&d.receipt)),
            ..Turn::append(&self.id, self.next_seq, &[])
        };
        match io.commit(turn).await {
            Ok(_) => Next::Continue(None),
            Err(e) => {
                self.on_interrupt(io, shared, d, false, 0, Interrupt::from_store(e))
                    .await
            }
        }
    }

    /// When the actor is passivated: with an idle retention policy, sends it its retirement,
    /// due `idle_after` from now, if its mailbox is empty (a retirement already waiting, or
    /// other mail, leads to one later) and it holds a state worth retiring.
    pub(crate) async fn schedule_idle_retirement(&self, io: &Io) -> Result<(), StoreError> {
        let Some(after) = io.config.retention.idle_after else {
            return Ok(());
        };
        let highest = self.next_seq - 1;
        if self.retired || self.from_default || highest == 0 {
            return Ok(());
        }
        if io.store.pending(&self.id).await? != 0 {
            return Ok(());
        }
        let r = idle_retirement(&self.id, highest, after);
        io.store.enqueue(&r.envelope, r.deliver_at).await?;
        Ok(())
    }

    /// Starts a compaction off the hot path if the policy asks for one and none is running.
    fn maybe_compact(&mut self, io: &Io, shared: &Arc<Shared>) {
        let policy = io.config.compaction;
        let due = policy
            .every_entries
            .is_some_and(|n| self.since_snapshot >= n)
            || policy
                .every_bytes
                .is_some_and(|b| self.bytes_since_snapshot >= b);
        if !due || self.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        self.since_snapshot = 0;
        self.bytes_since_snapshot = 0;
        let seq = self.next_seq - 1;
        let body = Body {
            state: self.value.clone(),
            version: A::STATE_VERSION,
            recent: self.recent.iter().copied().collect(),
            given_up: self.given_up.clone(),
            last_change: Some(self.last_change),
        };
        let (store, id, flag, shared, lease) = (
            io.store.clone(),
            self.id.clone(),
            self.compacting.clone(),
            shared.clone(),
            io.lease.clone(),
        );
        let keep = policy.keep.max(1).saturating_add(self.unreadable_snapshots);
        let spawner = shared.clone();
        spawner.spawn(async move {
            let result =
                super::replay::snapshot_and_trim(&*store, &id, seq, &body, keep, Some(&lease))
                    .await;
            flag.store(false, Ordering::Release);
            match result {
                Ok(trimmed) => {
                    shared.metrics.count(Count::Compactions, A::KIND, 1);
                    tracing::debug!(actor = %id, seq, trimmed, "compacted");
                }
                Err(e) => {
                    shared.metrics.count(Count::CompactionFailures, A::KIND, 1);
                    tracing::warn!(actor = %id, seq, error = %e, "compaction failed; the journal stays longer until the next one");
                }
            }
        });
    }
}

/// Upgrades state journaled under an older schema version to the code's
/// (`Actor::upgrade_state`), and journals the result (`StateUpgraded`, fenced by the actor's
/// lease) before the actor handles anything: patches computed from here on are against the new
/// shape, and a replay finds the new state before them. State from newer code, or an upgrade
/// that fails, makes the actor unrecoverable here (parked, nothing lost).
async fn upgrade<A: Actor>(
    actor: &A,
    id: &ActorId,
    io: &Io,
    r: &mut super::replay::Replayed,
) -> Result<(), RecoverError> {
    let (from, to) = (r.version, A::STATE_VERSION);
    if from > to {
        return Err(RecoverError::Declined(format!(
            "{id}: its state is at version {from}, newer than this code's {to}"
        )));
    }
    let failed = |e: String| {
        RecoverError::Unrecoverable(format!(
            "{id}: upgrading its state from version {from} to {to} failed: {e}"
        ))
    };
    let old = std::mem::take(&mut r.value);
    let state = std::panic::catch_unwind(AssertUnwindSafe(|| actor.upgrade_state(from, old)))
        .map_err(|p| failed(format!("it panicked: {}", panic_message(&p))))?
        .map_err(failed)?;
    // Checked before it is journaled: an upgrade that gives a state the code cannot read
    // must leave the journal as it was, so that fixed code upgrades it again.
    if let Err(e) = serde_guard(|| serde_json::from_value::<A::State>(state.clone())) {
        return Err(failed(format!(
            "the upgraded state does not decode as {} state: {e}",
            A::KIND
        )));
    }
    let entry = Entry::new(
        r.next_seq,
        EntryKind::StateUpgraded {
            from,
            to,
            state: state.clone(),
        },
    );
    let turn = Turn {
        fence: Some(&io.lease),
        ..Turn::append(id, r.next_seq, std::slice::from_ref(&entry))
    };
    let committed = io.commit(turn).await.map_err(|e| {
        if e.is_transient()
            || matches!(
                e,
                StoreError::LeaseLost { .. } | StoreError::Conflict { .. }
            )
        {
            RecoverError::Store(e)
        } else {
            // Refused on its merits (a state too large for one entry, say): trying again
            // would be refused again.
            failed(format!("the store refused the upgraded state: {e}"))
        }
    })?;
    tracing::info!(actor = %id, from, to, "state upgraded");
    r.next_seq = committed.highest + 1;
    r.value = state;
    r.version = to;
    if r.unfinished.is_none() {
        r.settled = committed.highest;
    }
    Ok(())
}

impl<A: Actor> Cell<A> {
    /// How the store hands out this actor's next message: its delivery limit is the net below
    /// the runtime's own give-up (`Io::lease_options`), counted from where a durable wait of
    /// the unfinished invocation ended, and lifted while that invocation is still in one: the
    /// restarts a wait lives through must not make the store bury its message, with neither
    /// its key settled nor its caller told.
    pub(crate) fn lease_options(&self, io: &Io) -> LeaseOptions {
        let net = io.lease_options.max_deliveries;
        let max_deliveries = match &self.unfinished {
            Some(u) if u.waiting() => u32::MAX,
            Some(u) => u.counted_from().saturating_add(net),
            None => net,
        };
        LeaseOptions {
            max_deliveries,
            ..io.lease_options
        }
    }
}

/// How many deliveries of a message may each end without a word (the process stopped, the
/// actor moved) before the runtime gives it up: as many as its attempts, and two more for the
/// restarts and moves that are no fault of the message. Deliveries that resume a durable wait
/// (a sleep, a wait for an event) do not count.
pub(crate) fn give_up_after(max_attempts: u32) -> u32 {
    max_attempts.max(1) + 2
}

/// How many levels a snapshot (or a `StateUpgraded` entry) adds around a state: the record,
/// then the snapshot's body (or the entry's kind).
const STATE_WRAP: usize = 2;

/// Refuses a state that a turn made too deep for its snapshot to be stored: its patches, which
/// name where they change it in a path, may each be shallow, but every snapshot would be
/// refused, and compaction fail for good. (A patch entry nests its value deeper still, and is
/// checked when it is written.) A state already that deep (journaled by a build before this
/// check) that the turn does not deepen is let through, so that its actor keeps working.
fn refuse_too_deep(state: &Value, before: &Value) -> Result<(), String> {
    let depth = crate::codec::value_depth(state);
    if depth + STATE_WRAP > crate::limits::MAX_JSON_DEPTH
        && depth > crate::codec::value_depth(before)
    {
        return Err(format!(
            "the state nests {depth} levels deep: its snapshot would nest deeper than the {} levels a stored record may",
            crate::limits::MAX_JSON_DEPTH
        ));
    }
    Ok(())
}

/// Runs the actor's types' serde code in `f`, which may panic (a hand-written `Serialize` or
/// `Deserialize`): a panic is an error naming it, as a serde error is, and never the end of the
/// actor's task.
pub(super) fn serde_guard<T>(f: impl FnOnce() -> serde_json::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(p) => Err(format!("its serde code panicked: {}", panic_message(&p))),
    }
}

pub(super) fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
}

/// The runtime's retirement message to `actor`, due `after` from now (see `Retention`).
fn retirement(actor: &ActorId, id: MessageId, r: Retire, after: Duration) -> Outgoing {
    Outgoing {
        envelope: Envelope {
            id,
            retire: Some(r),
            ..Envelope::new(actor.clone(), Value::Null)
        },
        deliver_at: Some(Timestamp::now() + after),
    }
}

/// How many of a finished actor's waiting messages its retirement, kept back by them, looks at
/// for another finish's retirement that decides instead.
const RETIREMENT_PEEK: usize = 16;

/// The runtime's retirement of `actor` for idleness, decided at its journal's seq `highest`.
fn idle_retirement(actor: &ActorId, highest: Seq, after: Duration) -> Outgoing {
    let r = Retire {
        highest,
        reason: RetireReason::Idle,
    };
    retirement(actor, MessageId::new(), r, after)
}

/// Why a write of an invocation can never be made, if the store refused it for the size of
/// the reply's record, of one of its entries (the reply again, the state change, an activity's
/// or a spawn's input) or of one of its messages (a send's or a spawn's payload). Every
/// backend checks them all before it writes anything, so every attempt would be refused alike
/// and each would run the handler again: the message fails once instead, whichever write of
/// the invocation was refused (an activity's start, a sleep's, or the turn that ends it), and
/// its caller hears why under the key. `None` for any other failure.
fn unwritable(e: &StoreError) -> Option<String> {
    use crate::error::Limit;
    let StoreError::TooLarge {
        what,
        size,
        limit,
        limit_kind,
    } = e
    else {
        return None;
    };
    match limit_kind {
        Limit::ResultBytes => Some(format!(
            "the reply is {size} bytes as recorded, over the {limit} a recorded reply may hold (an ask's, or a keyed send's)"
        )),
        Limit::EntryBytes | Limit::MessageBytes => Some(format!(
            "its invocation cannot be written: {what} is {size} bytes, over the limit of {limit}"
        )),
        Limit::JsonDepth => Some(format!(
            "its invocation cannot be written: {what} is {size}, deeper than the {limit} it may nest"
        )),
        _ => None,
    }
}
