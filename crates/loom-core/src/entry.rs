//! What a journal holds: [`Entry`] and its [`EntryKind`]s, and the [`Snapshot`] that stands for a
//! prefix of the journal. How they are laid out in bytes is in [`crate::codec`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::id::{ActorId, IdempotencyKey, MessageId};
use crate::time::Timestamp;

/// A position in one actor's journal. The first entry is 1; 0 means "nothing yet".
///
/// Seqs have no gaps and are never reused, even after a trim or a delete.
pub type Seq = u64;

/// The number of a durable call inside one invocation, counted from 1.
pub type Step = u32;

/// One journal record: what happened, when, and at which position.
///
/// ```
/// use loom_core::{Entry, EntryKind, Timestamp};
///
/// let e = Entry::new(1, EntryKind::TimerFired { step: 2, resumed_in: None });
/// assert_eq!(e.seq, 1);
/// assert!(e.at <= Timestamp::now());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The entry's position.
    pub seq: Seq,
    /// When it was written.
    pub at: Timestamp,
    /// What it records.
    pub kind: EntryKind,
}

impl Entry {
    /// An entry at `seq`, stamped now.
    pub fn new(seq: Seq, kind: EntryKind) -> Self {
        Entry {
            seq,
            at: Timestamp::now(),
            kind,
        }
    }
}

/// The kinds of journal entries; see DESIGN.md, "Entry kinds", for when each is written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EntryKind {
    /// An invocation started.
    Invoked {
        /// The message being processed.
        message_id: MessageId,
        /// The message body.
        payload: Value,
        /// The caller's idempotency key, if it gave one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<IdempotencyKey>,
        /// The id the message was first sent with, if it was requeued from the dead letters
        /// ([`Envelope::requeued_from`](crate::Envelope::requeued_from)): what it sends derives
        /// from that id, as the failed run's did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        requeued_from: Option<MessageId>,
    },
    /// The handler changed the state: an RFC 6902 patch from the old state to the new.
    StatePatched {
        /// The patch.
        patch: json_patch::Patch,
    },
    /// The state, whole, at a version of its schema other than 1
    /// ([`Actor::STATE_VERSION`](crate::Actor::STATE_VERSION)): newer code loaded state
    /// written under an older version and upgraded it
    /// ([`Actor::upgrade_state`](crate::Actor::upgrade_state)), or (`from` 0) an actor whose
    /// code is past version 1 changed its state for the first time. From here on the state is
    /// `state`, at version `to`, and later patches apply to it. (A kind of its own, not a field
    /// of `state_patched`, so that code from before versions refuses it instead of misreading.)
    StateUpgraded {
        /// The version it was (0: none yet).
        from: u32,
        /// The version it is.
        to: u32,
        /// The upgraded state, whole.
        state: Value,
    },
    /// A side effect is about to run.
    ActivityStarted {
        /// Its durable step.
        step: Step,
        /// The activity's name.
        name: String,
        /// Its input.
        input: Value,
    },
    /// A side effect succeeded.
    ActivityCompleted {
        /// Its durable step.
        step: Step,
        /// What it returned.
        output: Value,
    },
    /// A side effect failed for good: a terminal error, or its last attempt failed.
    ActivityFailed {
        /// Its durable step.
        step: Step,
        /// Why.
        error: String,
        /// The error's typed value for the caller, if the activity gave one
        /// ([`ActivityError::with_value`](crate::runtime::ActivityError::with_value)).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<Value>,
    },
    /// An attempt of a side effect failed with a retryable error; the next attempt is due at
    /// `retry_at` (fixed now, so a restart keeps the schedule instead of starting it over).
    ActivityAttemptFailed {
        /// Its durable step.
        step: Step,
        /// The attempt that failed, counted from 1.
        attempt: u32,
        /// Why.
        error: String,
        /// When the next attempt may start.
        retry_at: Timestamp,
    },
    /// Attempt `attempt` (2 or more) of a side effect starts, its backoff over.
    ActivityRetried {
        /// Its durable step.
        step: Step,
        /// The attempt starting.
        attempt: u32,
        /// As in [`TimerFired`](EntryKind::TimerFired): the delivery that saw the backoff end,
        /// if not the one that began it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resumed_in: Option<u32>,
    },
    /// The actor sent a message (it leaves exactly once).
    MessageSent {
        /// Its durable step.
        step: Step,
        /// The recipient.
        to: ActorId,
        /// The message's id, derived from the invocation and the step.
        message_id: MessageId,
    },
    /// A child actor was created.
    ChildSpawned {
        /// Its durable step.
        step: Step,
        /// The child, derived from the parent and the step.
        child: ActorId,
        /// The child's first message.
        input: Value,
    },
    /// A durable sleep or a scheduled message started.
    TimerStarted {
        /// Its durable step.
        step: Step,
        /// When it fires.
        fire_at: Timestamp,
    },
    /// A timer fired: its sleep ends. Journaled at or after `fire_at`, or up to 450 ms before
    /// it by a delivery handed out just before the end, which then waits out the rest; a
    /// replay waits out whatever is left of it too, so no run goes on before `fire_at`.
    TimerFired {
        /// The step of its `TimerStarted`.
        step: Step,
        /// Set when the sleep ended in a later delivery of the message than the one that began
        /// it (the process restarted during the sleep): that delivery's
        /// [`attempt`](crate::Envelope::attempt). The deliveries before it waited and are not
        /// held against the message; the runtime counts from here when it decides to give up.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resumed_in: Option<u32>,
    },
    /// The invocation suspended to wait for an event.
    EventAwaited {
        /// Its durable step.
        step: Step,
        /// The event's name.
        name: String,
        /// When the wait gives up, if it has a timeout. Fixed when the wait starts, so a restart
        /// does not restart the clock.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline: Option<Timestamp>,
    },
    /// The awaited event arrived, or the wait timed out.
    EventReceived {
        /// The step of its `EventAwaited`.
        step: Step,
        /// The event's name.
        name: String,
        /// Its data (`null` on a timeout).
        data: Value,
        /// True if the wait ended at its deadline without the event.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        timed_out: bool,
        /// As in [`TimerFired`](EntryKind::TimerFired): the delivery that saw the wait end, if
        /// not the one that began it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resumed_in: Option<u32>,
    },
    /// The wait of a step (a sleep, a wait for an event, an activity's backoff before its next
    /// attempt) ended early because the invocation was asked to be cancelled
    /// ([`ActorRef::cancel`](crate::ActorRef::cancel)); the step returned
    /// [`StepError::Cancelled`](crate::runtime::StepError::Cancelled) and a replay returns it
    /// again. (A kind of its own, so that code from before cancellation refuses it instead of
    /// misreading.)
    WaitCancelled {
        /// The step whose wait it ends.
        step: Step,
        /// As in [`TimerFired`](EntryKind::TimerFired): the delivery that saw the wait end, if
        /// not the one that began it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resumed_in: Option<u32>,
    },
    /// A value the handler took from the world ([`Context::now`](crate::Context::now),
    /// [`random_u64`](crate::Context::random_u64), [`uuid`](crate::Context::uuid),
    /// [`patched`](crate::Context::patched)): journaled
    /// on the first run, read back on a replay, so the handler sees the same value again.
    Recorded {
        /// The step that took it.
        step: Step,
        /// What it is: `now`, `random_u64`, `uuid`, or `patched:<change>` (the marker of
        /// [`Context::patched`](crate::Context::patched), whose value is `true`).
        name: String,
        /// The value.
        value: Value,
    },
    /// The invocation ended with a reply.
    Completed {
        /// The reply.
        reply: Value,
    },
    /// The invocation ended with an error.
    Failed {
        /// Why.
        error: String,
        /// True if its message went to the dead letters (the runtime gave up on it, or the store
        /// or a tool buried it before it finished), so that it may be requeued and run again: a
        /// requeued run then does not send again what this one sent.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        dead_lettered: bool,
    },
}

impl EntryKind {
    /// The entry kind's name as written in the journal, such as `state_patched`.
    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::Invoked { .. } => "invoked",
            EntryKind::StatePatched { .. } => "state_patched",
            EntryKind::StateUpgraded { .. } => "state_upgraded",
            EntryKind::ActivityStarted { .. } => "activity_started",
            EntryKind::ActivityCompleted { .. } => "activity_completed",
            EntryKind::ActivityFailed { .. } => "activity_failed",
            EntryKind::ActivityAttemptFailed { .. } => "activity_attempt_failed",
            EntryKind::ActivityRetried { .. } => "activity_retried",
            EntryKind::MessageSent { .. } => "message_sent",
            EntryKind::ChildSpawned { .. } => "child_spawned",
            EntryKind::TimerStarted { .. } => "timer_started",
            EntryKind::TimerFired { .. } => "timer_fired",
            EntryKind::EventAwaited { .. } => "event_awaited",
            EntryKind::EventReceived { .. } => "event_received",
            EntryKind::WaitCancelled { .. } => "wait_cancelled",
            EntryKind::Recorded { .. } => "recorded",
            EntryKind::Completed { .. } => "completed",
            EntryKind::Failed { .. } => "failed",
        }
    }
}

/// The actor's state after applying entries `1..=seq`.
///
/// ```
/// use loom_core::Snapshot;
///
/// let s = Snapshot::new(100, serde_json::json!({ "balance": 42 }));
/// assert_eq!(s.seq, 100);
/// assert_eq!(s.format, 1);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The last entry the state includes.
    pub seq: Seq,
    /// The state, as JSON.
    pub state: Value,
    /// When the snapshot was taken.
    pub at: Timestamp,
    /// The version of the state's schema, chosen by the actor; lets a newer actor read an older
    /// snapshot or refuse it.
    pub format: u32,
}

impl Snapshot {
    /// A snapshot at `seq` of `state`, stamped now, with state format 1.
    pub fn new(seq: Seq, state: Value) -> Self {
        Snapshot {
            seq,
            state,
            at: Timestamp::now(),
            format: 1,
        }
    }
}
