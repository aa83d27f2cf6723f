//! One active actor: recovery from snapshot plus journal tail, then the turn loop.
//!
//! Invariants kept here:
//! - the in-memory state is exactly snapshot + every journaled `StatePatched` up to `next_seq - 1`;
//!   a turn whose write fails leaves it as it was (the old state is put back);
//! - a message is applied at most once: its ack is part of the turn's atomic write, and a
//!   message whose id the journal already completed (`recent`) is acked without running;
//! - an invocation whose `Invoked` entry is in the journal but that never completed is resumed
//!   by replay when its message comes back, never started afresh.

use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{FutureExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument;

use crate::entry::{EntryKind, Seq, Snapshot, Step};
use crate::error::StoreError;
use crate::id::{ActorId, IdempotencyKey, MessageId};
use crate::store::{Delivery, Record, SeqRange, Settle, Turn};

use super::Shared;
use super::actor::Actor;
use super::context::{Context, Interrupt, Invocation, Io};
use super::record::{Outcome, Recorded};

/// How many completed message ids an actor remembers to recognize a redelivery.
pub(crate) const RECENT: usize = 128;

/// The format of the runtime's snapshot body ([`Body`]).
pub(crate) const SNAPSHOT_FORMAT: u32 = 1;

/// What the runtime puts in a snapshot: the actor's state and the ids of its last messages.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Body {
    pub(crate) state: Value,
    pub(crate) recent: Vec<MessageId>,
}

/// An invocation the journal started but did not finish.
#[derive(Debug, Default)]
struct Unfinished {
    message_id: Option<MessageId>,
    steps: BTreeMap<Step, Vec<EntryKind>>,
}

/// Why an actor could not be recovered.
#[derive(Debug)]
pub(crate) enum RecoverError {
    /// The store failed; try again later.
    Store(StoreError),
    /// The journal cannot produce a state (every snapshot unreadable after a trim, a patch that
    /// does not apply, a state that does not decode): the actor is parked with the reason.
    Unrecoverable(String),
}

/// What the loop does after a delivery.
pub(crate) enum Next {
    Continue,
    /// Retry later: the message was nacked with this delay.
    Backoff(Duration),
    /// The journal moved under us, or an invocation was partly journaled: reload from the store.
    Reload,
    /// Stop this actor and show it as parked.
    Park(String),
    /// The lease is gone: stop at once.
    Stop,
}

pub(crate) struct Cell<A: Actor> {
    actor: Arc<A>,
    id: ActorId,
    state: A::State,
    value: Value,
    next_seq: Seq,
    recent: VecDeque<MessageId>,
    unfinished: Option<Unfinished>,
    since_snapshot: u64,
    bytes_since_snapshot: u64,
    compacting: Arc<AtomicBool>,
}

impl<A: Actor> Cell<A> {
    /// Loads the newest readable snapshot and streams the journal after it.
    pub(crate) async fn recover(
        actor: Arc<A>,
        id: ActorId,
        io: &Io,
        shared: &Shared,
    ) -> Result<Self, RecoverError> {
        let store = &io.store;
        let info = store.info(&id).await.map_err(RecoverError::Store)?;
        let mut base = None;
        for &seq in info.snapshots.iter().rev() {
            match store.load_snapshot(&id, seq).await {
                Ok(Some(s)) => {
                    base = Some(s);
                    break;
                }
                Ok(None) => {}
                Err(e @ StoreError::Corrupt { .. }) => {
                    shared
                        .metrics
                        .corrupt_snapshots
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(actor = %id, seq, error = %e, "snapshot is unreadable; falling back to an older snapshot plus replay");
                }
                Err(e) => return Err(RecoverError::Store(e)),
            }
        }
        let (from, mut value, recent) = match base {
            Some(s) => {
                if s.format != SNAPSHOT_FORMAT {
                    return Err(RecoverError::Unrecoverable(format!(
                        "snapshot {} has format {}; this runtime reads format {SNAPSHOT_FORMAT}",
                        s.seq, s.format
                    )));
                }
                let body: Body = serde_json::from_value(s.state).map_err(|e| {
                    RecoverError::Unrecoverable(format!(
                        "snapshot {} body does not decode: {e}",
                        s.seq
                    ))
                })?;
                (s.seq + 1, body.state, body.recent)
            }
            None if !info.snapshots.is_empty() && info.trimmed_through > 0 => {
                return Err(RecoverError::Unrecoverable(format!(
                    "no snapshot of {id} is readable and entries through {} were trimmed",
                    info.trimmed_through
                )));
            }
            None => {
                let value = serde_json::to_value(A::State::default()).map_err(|e| {
                    RecoverError::Unrecoverable(format!("default state does not encode: {e}"))
                })?;
                (info.trimmed_through + 1, value, Vec::new())
            }
        };
        let mut recent: VecDeque<MessageId> = recent.into();
        let mut unfinished: Option<Unfinished> = None;
        let mut replayed = 0u64;
        let mut bytes = 0u64;
        let mut next_seq = from;
        let mut entries = store.read(&id, SeqRange::all().from(from));
        while let Some(entry) = entries.try_next().await.map_err(|e| match e {
            e @ StoreError::Corrupt { .. } => RecoverError::Unrecoverable(e.to_string()),
            other => RecoverError::Store(other),
        })? {
            next_seq = entry.seq + 1;
            replayed += 1;
            bytes += super::weight(&entry.kind);
            match entry.kind {
                EntryKind::Invoked { message_id, .. } => {
                    unfinished = Some(Unfinished {
                        message_id: Some(message_id),
                        steps: BTreeMap::new(),
                    });
                }
                EntryKind::StatePatched { patch } => {
                    json_patch::patch(&mut value, &patch).map_err(|e| {
                        RecoverError::Unrecoverable(format!(
                            "state patch at seq {} does not apply: {e}",
                            entry.seq
                        ))
                    })?;
                }
                EntryKind::Completed { .. } | EntryKind::Failed { .. } => {
                    if let Some(Unfinished {
                        message_id: Some(m),
                        ..
                    }) = unfinished.take()
                    {
                        remember(&mut recent, m);
                    }
                }
                kind => {
                    let step = step_of(&kind);
                    match (&mut unfinished, step) {
                        (Some(u), Some(step)) => u.steps.entry(step).or_default().push(kind),
                        _ => {
                            return Err(RecoverError::Unrecoverable(format!(
                                "entry {} ({}) is outside any invocation",
                                entry.seq,
                                kind.name()
                            )));
                        }
                    }
                }
            }
        }
        // The journal may have moved past the last entry read (entries appended since): the
        // store's highest seq is the authority for the next append.
        next_seq = next_seq.max(info.highest + 1);
        let state: A::State = serde_json::from_value(value.clone()).map_err(|e| {
            RecoverError::Unrecoverable(format!(
                "journaled state does not decode as {} state: {e}",
                A::KIND
            ))
        })?;
        shared.metrics.recoveries.fetch_add(1, Ordering::Relaxed);
        shared
            .metrics
            .replayed_entries
            .fetch_add(replayed, Ordering::Relaxed);
        tracing::debug!(actor = %id, from, replayed, "recovered");
        Ok(Cell {
            actor,
            id,
            state,
            value,
            next_seq,
            recent,
            unfinished,
            since_snapshot: replayed,
            bytes_since_snapshot: bytes,
            compacting: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Handles one delivery, start to finish.
    pub(crate) async fn process(&mut self, io: &Io, shared: &Arc<Shared>, d: Delivery) -> Next {
        let span = tracing::info_span!(
            "invocation",
            actor = %self.id,
            message_id = %d.envelope.id,
            attempt = d.envelope.attempt,
            traceparent = d.envelope.traceparent.as_deref().unwrap_or(""),
        );
        self.process_inner(io, shared, d).instrument(span).await
    }

    async fn process_inner(&mut self, io: &Io, shared: &Arc<Shared>, d: Delivery) -> Next {
        let id = d.envelope.id;
        // Already applied (its ack was lost): ack it without running it again.
        if self.recent.contains(&id) {
            tracing::debug!("message already applied; acknowledging it");
            let turn = Turn {
                fence: Some(&io.lease),
                settle: Some(Settle::Ack(&d.receipt)),
                ..Turn::append(&self.id, self.next_seq, &[])
            };
            return match io.store.commit_turn(turn).await {
                Ok(_) => Next::Continue,
                Err(e) => {
                    self.on_interrupt(io, shared, &d, Interrupt::from_store(e))
                        .await
                }
            };
        }
        let resuming = self.unfinished.as_ref().and_then(|u| u.message_id) == Some(id);
        if self.unfinished.is_some() && !resuming {
            // The journal holds an invocation whose message is gone (dead-lettered): close it.
            let abandoned = self.unfinished.take().and_then(|u| u.message_id);
            let mut inv = self.invocation(io, &d, false);
            inv.push(EntryKind::Failed {
                error: "abandoned: its message was dead-lettered before it finished".into(),
            });
            let turn = Turn {
                fence: Some(&io.lease),
                ..Turn::append(&self.id, self.next_seq, &inv.pending)
            };
            match io.store.commit_turn(turn).await {
                Ok(h) => {
                    self.next_seq = h + 1;
                    if let Some(m) = abandoned {
                        remember(&mut self.recent, m);
                    }
                }
                Err(e) => {
                    return self
                        .on_interrupt(io, shared, &d, Interrupt::from_store(e))
                        .await;
                }
            }
        }
        let msg: A::Message = match serde_json::from_value(d.envelope.payload.clone()) {
            Ok(m) => m,
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
        if !resuming {
            inv.push(EntryKind::Invoked {
                message_id: id,
                payload: d.envelope.payload.clone(),
                idempotency_key: d.envelope.idempotency_key.clone(),
            });
        }
        shared.metrics.invocations.fetch_add(1, Ordering::Relaxed);
        let outcome = {
            let mut ctx = Context { inv: &mut inv, io };
            AssertUnwindSafe(self.actor.handle(&mut self.state, &mut ctx, msg))
                .catch_unwind()
                .await
        };
        if let Some(interrupt) = inv.interrupt.take() {
            self.restore_state();
            return self.on_interrupt(io, shared, &d, interrupt).await;
        }
        let (outcome, new_value) = match outcome {
            Err(panic) => {
                self.restore_state();
                let reason = format!("handler panicked: {}", panic_message(&panic));
                tracing::warn!(error = %reason, "invocation failed");
                return self
                    .retry_or_give_up(io, shared, &d, inv.journaled, &reason)
                    .await;
            }
            Ok(Ok(reply)) => {
                let new_value = serde_json::to_value(&self.state);
                let reply = serde_json::to_value(&reply);
                match (new_value, reply) {
                    (Ok(v), Ok(r)) => (Outcome::Ok(r), Some(v)),
                    (Err(e), _) | (_, Err(e)) => {
                        self.restore_state();
                        let reason = format!("state or reply does not encode: {e}");
                        return self
                            .retry_or_give_up(io, shared, &d, inv.journaled, &reason)
                            .await;
                    }
                }
            }
            Ok(Err(rejected)) => {
                self.restore_state();
                (Outcome::Rejected(rejected.reason().to_owned()), None)
            }
        };
        if !inv.recorded.is_empty() {
            let first = inv.recorded.keys().next().copied().unwrap_or_default();
            let reason = format!(
                "message {id} on {}: the journal has step {first}, but the handler now finishes after step {}",
                self.id, inv.step
            );
            self.restore_state();
            return Next::Park(reason);
        }
        if let Some(v) = &new_value {
            let patch = json_patch::diff(&self.value, v);
            if !patch.0.is_empty() {
                inv.push(EntryKind::StatePatched { patch });
            }
        }
        match &outcome {
            Outcome::Ok(reply) => inv.push(EntryKind::Completed {
                reply: reply.clone(),
            }),
            Outcome::Rejected(reason) | Outcome::Failed(reason) => inv.push(EntryKind::Failed {
                error: reason.clone(),
            }),
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
            ..Turn::append(&self.id, inv.next_seq, &inv.pending)
        };
        match io.store.commit_turn(turn).await {
            Ok(highest) => {
                self.next_seq = highest + 1;
                if let Some(v) = new_value {
                    self.value = v;
                }
                remember(&mut self.recent, id);
                self.since_snapshot += inv.pending.len() as u64;
                self.bytes_since_snapshot += inv.weight;
                if let Some(k) = &key {
                    io.hub.reply(&self.id, k, &record_value);
                }
                for o in &inv.outbox {
                    shared.wake(&o.envelope.to);
                }
                self.maybe_compact(io, shared);
                Next::Continue
            }
            Err(e) => {
                self.restore_state();
                self.on_interrupt(io, shared, &d, Interrupt::from_store(e))
                    .await
            }
        }
    }

    fn invocation(&self, _io: &Io, d: &Delivery, resuming: bool) -> Invocation {
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
        }
    }

    /// Puts back the state from before the turn (the handler may have changed it).
    fn restore_state(&mut self) {
        match serde_json::from_value(self.value.clone()) {
            Ok(s) => self.state = s,
            // The value decoded when it was recovered or written, so this cannot fail unless
            // the State type's serde is not a round trip; keep the handler's state and say so.
            Err(e) => {
                tracing::error!(actor = %self.id, error = %e, "state does not decode back from its own JSON")
            }
        }
    }

    async fn on_interrupt(
        &mut self,
        io: &Io,
        shared: &Arc<Shared>,
        d: &Delivery,
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
            Interrupt::NonDeterminism(reason) => {
                tracing::error!(actor = %self.id, %reason, "non-determinism; parking the actor");
                Next::Park(reason)
            }
            Interrupt::Store(e) => {
                let reason = format!("store failure: {e}");
                // Something of this invocation may be journaled: reload to resume it.
                let next = self.retry_or_give_up(io, shared, d, true, &reason).await;
                match next {
                    Next::Backoff(_) | Next::Continue => Next::Reload,
                    other => other,
                }
            }
        }
    }

    /// A failed attempt: nack with backoff, or after the last attempt dead-letter the message
    /// (closing its journaled invocation, if any, with `Failed`).
    async fn retry_or_give_up(
        &mut self,
        io: &Io,
        shared: &Arc<Shared>,
        d: &Delivery,
        journaled: bool,
        reason: &str,
    ) -> Next {
        let attempts = d.envelope.attempt + 1;
        let retry = io.config.retry;
        if attempts < retry.max_attempts {
            shared.metrics.retries.fetch_add(1, Ordering::Relaxed);
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
        match io.store.commit_turn(turn).await {
            Ok(h) => {
                shared.metrics.dead_letters.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(actor = %self.id, message_id = %d.envelope.id, %reason, "message dead-lettered");
                if let Some(k) = &key {
                    io.hub.reply(&self.id, k, &record_value);
                }
                if journaled {
                    Next::Reload
                } else {
                    self.next_seq = h + 1;
                    Next::Continue
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not dead-letter the message; it comes back when its visibility runs out");
                Next::Reload
            }
        }
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
            recent: self.recent.iter().copied().collect(),
        };
        let (store, id, flag, shared) = (
            io.store.clone(),
            self.id.clone(),
            self.compacting.clone(),
            shared.clone(),
        );
        let keep = policy.keep.max(1);
        shared.tasks.clone().spawn(async move {
            let result = compact(&*store, &id, seq, body, keep).await;
            flag.store(false, Ordering::Release);
            match result {
                Ok(trimmed) => {
                    shared.metrics.compactions.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(actor = %id, seq, trimmed, "compacted");
                }
                Err(e) => {
                    shared.metrics.compaction_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(actor = %id, seq, error = %e, "compaction failed; the journal stays longer until the next one");
                }
            }
        });
    }
}

/// Saves a snapshot at `seq` and, once it is durable, trims through the oldest kept snapshot.
/// Entries appended meanwhile are above `seq`, so the trim never touches them.
pub(crate) async fn compact(
    store: &dyn crate::store::Store,
    id: &ActorId,
    seq: Seq,
    body: Body,
    keep: usize,
) -> Result<Seq, StoreError> {
    let state = serde_json::to_value(&body)
        .map_err(|e| StoreError::InvalidRequest(format!("snapshot body does not encode: {e}")))?;
    let snapshot = Snapshot {
        seq,
        state,
        at: crate::Timestamp::now(),
        format: SNAPSHOT_FORMAT,
    };
    store.save_snapshot(id, &snapshot, keep).await?;
    let info = store.info(id).await?;
    let Some(&oldest) = info.snapshots.first() else {
        return Ok(info.trimmed_through);
    };
    if oldest > info.trimmed_through {
        store.trim(id, oldest).await?;
    }
    Ok(oldest)
}

fn remember(recent: &mut VecDeque<MessageId>, id: MessageId) {
    if recent.len() >= RECENT {
        recent.pop_front();
    }
    recent.push_back(id);
}

fn step_of(kind: &EntryKind) -> Option<Step> {
    match kind {
        EntryKind::ActivityStarted { step, .. }
        | EntryKind::ActivityCompleted { step, .. }
        | EntryKind::ActivityFailed { step, .. }
        | EntryKind::MessageSent { step, .. }
        | EntryKind::ChildSpawned { step, .. }
        | EntryKind::TimerStarted { step, .. }
        | EntryKind::TimerFired { step }
        | EntryKind::EventAwaited { step, .. }
        | EntryKind::EventReceived { step, .. } => Some(*step),
        _ => None,
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
}
