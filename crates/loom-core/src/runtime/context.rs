//! [`Context`]: the durable calls a handler makes, each journaled before its effect is visible,
//! and replayed from the journal when an invocation is resumed after a crash.
//!
//! Every durable call takes the next *step* number. In live mode a call journals what it does;
//! in replay mode (an invocation resumed after a crash) it first looks at what the journal says
//! step `n` was: a different kind or name stops the invocation with a non-determinism error that
//! parks the actor, a recorded result is returned without running anything again, and a step the
//! journal started but never finished (an activity interrupted by the crash) runs again.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::entry::{Entry, EntryKind, Seq, Step};
use crate::envelope::Envelope;
use crate::error::StoreError;
use crate::id::{ActorId, MessageId};
use crate::limits::MAX_CHANGE_ID_LEN;
use crate::store::backend::{Outgoing, Record, Settle, Turn};
use crate::store::{Lease, LeaseOptions, Receipt, Store, Suspension};
use crate::time::Timestamp;

use super::actor::{Actor, Rejected};
use super::config::Config;
use super::hub::Hub;
use super::trace;
use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Why a durable call did not give its result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The activity failed for good: a terminal error, or its last attempt failed (journaled;
    /// a replay returns it again).
    #[error("activity {name} failed: {error}")]
    ActivityFailed {
        /// The activity.
        name: String,
        /// Its error.
        error: String,
        /// The error's typed value, if the activity gave one
        /// ([`ActivityError::with_value`](super::ActivityError::with_value)).
        value: Option<Value>,
    },
    /// The wait for an event reached its deadline.
    #[error("waiting for event {name} timed out")]
    TimedOut {
        /// The event.
        name: String,
    },
    /// A value could not be encoded or decoded (an event whose data is not the expected type,
    /// a message that does not serialize).
    #[error("{0}")]
    Invalid(String),
    /// The invocation was asked to be cancelled ([`ActorRef::cancel`](crate::ActorRef::cancel))
    /// and this step's wait (a sleep, a wait for an event, an activity's backoff) ended for it
    /// (journaled; a replay returns it again). Pass it on with `?` to end the invocation as
    /// cancelled (its caller gets `AskError::Cancelled`, the state is left as it was), or
    /// compensate first: the handler's later steps run, and their waits run to their end (in
    /// memory, however long) instead of being cancelled in turn.
    #[error("the invocation was cancelled")]
    Cancelled,
    /// The invocation cannot go on here (the store failed, the lease was lost, the code no longer
    /// matches the journal). The runtime takes over: whatever the handler returns is ignored, and
    /// the invocation is retried, reloaded or parked.
    #[error("invocation interrupted: {0}")]
    Interrupted(String),
}

impl From<StepError> for Rejected {
    /// The error as a rejection; an activity's typed value goes with it to the caller.
    fn from(e: StepError) -> Self {
        let value = match &e {
            StepError::ActivityFailed { value, .. } => value.clone(),
            StepError::Cancelled => return Rejected::cancelled(e.to_string()),
            _ => None,
        };
        Rejected::new(e.to_string()).set_value(value)
    }
}

/// The key handed to an activity for the outside system to deduplicate with: the same for every
/// run of the same step of the same invocation (`actor/message-id/step`, with the message's
/// origin id, so that a requeued message's activities keep their keys).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActivityKey(pub(crate) String);

impl ActivityKey {
    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Display for ActivityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an invocation stopped before finishing; decided by the runtime, not the handler.
#[derive(Debug, Clone)]
pub(crate) enum Interrupt {
    /// The store failed: retry the invocation later.
    Store(StoreError),
    /// The journal moved under us (another writer): reload the actor.
    Conflict(StoreError),
    /// The actor's lease is gone: stop at once.
    LeaseLost,
    /// The code no longer matches the journal at this step: park the actor.
    NonDeterminism(Step, String),
    /// The context suspended the invocation in the store ([`Context::suspend`]): its message
    /// comes back after `delay` or when an event or a cancellation wakes it; passivate the
    /// actor meanwhile. `alarm`: when the delay runs out, counted from just before the store
    /// was asked (as the store counts it), if it is a deadline worth waking the actor for, and
    /// whether to activate the actor ahead of it (a sleep, whose end is sure to come; not a
    /// wait, whose event usually comes first) (`alarms.rs`).
    Suspended {
        delay: Duration,
        alarm: Option<(tokio::time::Instant, bool)>,
    },
    /// The store failed to suspend the invocation: hand its message back and replay.
    Unsuspended(StoreError),
}

/// The longest a message is put back for a suspended wait (a century, as a scheduled
/// message's delay may be); a longer sleep (a "sleep forever") suspends again when the message
/// comes back.
const MAX_SUSPENSION: Duration = crate::limits::MAX_DELAY;

/// Why [`Context::suspend`] did not suspend (the store wrote nothing; the delivery is still out).
pub(super) enum Refused {
    /// The lane holds an event: receive it.
    EventWaiting,
    /// The invocation was asked to be cancelled: end the wait with [`StepError::Cancelled`].
    Cancelled,
}

impl Interrupt {
    pub(crate) fn from_store(e: StoreError) -> Self {
        match e {
            StoreError::LeaseLost { .. } => Interrupt::LeaseLost,
            StoreError::Conflict { .. } | StoreError::StaleReceipt { .. } => Interrupt::Conflict(e),
            other => Interrupt::Store(other),
        }
    }

    fn describe(&self) -> String {
        match self {
            Interrupt::Store(e) => format!("store failure: {e}"),
            Interrupt::Conflict(e) => format!("journal moved: {e}"),
            Interrupt::LeaseLost => "the actor's lease was lost".to_owned(),
            Interrupt::NonDeterminism(_, m) => format!("non-determinism: {m}"),
            Interrupt::Suspended { delay, .. } => format!("suspended for up to {delay:?}"),
            Interrupt::Unsuspended(e) => format!("could not suspend: {e}"),
        }
    }
}

/// What the runtime hands a context: the services of this actor's activation.
pub(crate) struct Io {
    pub(crate) store: Arc<dyn Store>,
    /// How this actor leases its messages.
    pub(crate) lease_options: LeaseOptions,
    pub(crate) config: Arc<Config>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) lease: Lease,
    /// Whether this node still holds `lease` ([`Tenure::held`](super::leases::Tenure::held)).
    pub(crate) tenure: super::leases::Tenure,
    /// Cancelled when the actor is asked to passivate (idle, evicted, its partition handed
    /// off, the node stopping): its turns then stop leasing the next message, so that a busy
    /// mailbox does not keep it running.
    pub(crate) stopping: tokio_util::sync::CancellationToken,
}

impl Io {
    /// Commits `turn` in a `loom.store.commit` span (a child of the invocation's): the store
    /// write of a turn, as a trace shows it.
    pub(crate) async fn commit(
        &self,
        turn: Turn<'_>,
    ) -> crate::error::StoreResult<crate::store::backend::Committed> {
        let span = tracing::info_span!(
            "loom.store.commit",
            entries = turn.entries.len(),
            sent = turn.send.len(),
            settles = turn.settle.is_some(),
        );
        self.store.commit_turn(turn).instrument(span).await
    }
}

/// The state of one invocation while it runs.
pub(crate) struct Invocation {
    pub(crate) actor: ActorId,
    pub(crate) envelope: Envelope,
    pub(crate) receipt: Receipt,
    /// The journal's next seq.
    pub(crate) next_seq: Seq,
    /// Entries not yet durable, numbered from `next_seq`.
    pub(crate) pending: Vec<Entry>,
    /// Messages to send with the next durable write.
    pub(crate) outbox: Vec<Outgoing>,
    /// True once the `Invoked` entry is durable.
    pub(crate) journaled: bool,
    /// Replay: what the journal recorded for each step of this invocation.
    pub(crate) recorded: BTreeMap<Step, Vec<EntryKind>>,
    pub(crate) step: Step,
    pub(crate) interrupt: Option<Interrupt>,
    /// Approximate bytes of the entries journaled by this invocation (for compaction).
    pub(crate) weight: u64,
    /// The delivery from which this message's deliveries count as attempts (rule D17): the
    /// latest that saw a durable wait of this invocation end (`resumed_in`), or 0. Deliveries
    /// before it only waited (a restart, a suspension).
    pub(crate) counted_from: u32,
    /// What [`Context::patched`] answered for each change in this run.
    pub(crate) patches: std::collections::HashMap<String, bool>,
    /// The in-process signal of this invocation's cancellation (`ActorRef::cancel` on this
    /// node), registered for the whole invocation so that one asked between two waits is
    /// kept for the next.
    pub(crate) cancel: CancelSignal,
    /// True once a wait of this invocation ended for its cancellation (live, or replayed from
    /// `WaitCancelled`): its later waits (compensation) run to their end instead of being
    /// cancelled in turn, in memory, since the store refuses to suspend a marked message.
    pub(crate) cancelled: bool,
    /// Set by [`Context::finish`]: if the invocation completes, its actor is retired.
    pub(crate) finish: bool,
    /// The recipients of each step at which a dead-lettered run of this message sent a message
    /// or spawned a child (`replay::GivenUp`): this run, requeued, journals a send to such a
    /// recipient at such a step but does not send it again.
    pub(crate) sent_before: BTreeMap<Step, std::collections::BTreeSet<ActorId>>,
    /// The step of an async durable call (a sleep, a wait for an event, an activity) under way:
    /// set when it takes its step, cleared when its future ends. Still set at the next durable
    /// call, or when the handler ends, means its future was dropped half-way (a
    /// `tokio::time::timeout` around it): what it journaled a replay cannot repeat.
    pub(crate) open: Option<Step>,
    /// An async durable call began and has not taken its step yet.
    pub(crate) opening: bool,
    /// Whether this delivery looked for its message's cancellation mark in the store yet
    /// ([`Context::cancelled_before`]).
    pub(crate) cancel_looked: bool,
}

impl Invocation {
    /// Why an invocation whose durable call at `step` was dropped half-way stops (it parks:
    /// the run went on where a replay cannot follow).
    pub(crate) fn dropped(&self, step: Step) -> String {
        format!(
            "step {step} of message {} on {}, a durable call (a sleep, a wait for an event or an activity), was dropped before it ended: its future was not awaited to the end (a `tokio::time::timeout` or `select!` around it), so a replay cannot repeat what this run did; use the call's own time limit instead (`wait_event`'s timeout, an activity's policy)",
            self.envelope.id, self.actor
        )
    }

    pub(crate) fn push(&mut self, kind: EntryKind) {
        self.weight += super::weight(&kind);
        let seq = self.next_seq + self.pending.len() as Seq;
        self.pending.push(Entry::new(seq, kind));
    }

    /// Takes back the last entry pushed, not yet flushed.
    pub(crate) fn unpush(&mut self) {
        if let Some(e) = self.pending.pop() {
            self.weight -= super::weight(&e.kind);
        }
    }
}

/// What a handler uses for everything that must survive a crash.
///
/// See the module documentation for live and replay mode.
pub struct Context<'a> {
    pub(crate) inv: &'a mut Invocation,
    pub(crate) io: &'a Io,
}

fn kind_and_name(k: &EntryKind) -> (&'static str, String) {
    match k {
        EntryKind::ActivityStarted { name, .. } => ("activity", name.clone()),
        EntryKind::MessageSent { to, .. } => ("send", to.to_string()),
        EntryKind::ChildSpawned { child, .. } => ("spawn", child.kind().to_owned()),
        EntryKind::TimerStarted { .. } => ("sleep", String::new()),
        EntryKind::EventAwaited { name, .. } => ("wait_event", name.clone()),
        EntryKind::Recorded { name, .. } => ("record", name.clone()),
        other => (other.name(), String::new()),
    }
}

impl<'a> Context<'a> {
    /// The actor running.
    pub fn actor_id(&self) -> &ActorId {
        &self.inv.actor
    }

    /// The id of the message being handled. A dead letter put back in its mailbox runs under a
    /// new id; [`origin_id`](Self::origin_id) is the one it was first sent with.
    pub fn message_id(&self) -> MessageId {
        self.inv.envelope.id
    }

    /// The id the message being handled was first sent with (the same as
    /// [`message_id`](Self::message_id) unless it was requeued from the dead letters). Activity
    /// keys, child ids and the ids of the messages this invocation sends derive from it.
    pub fn origin_id(&self) -> MessageId {
        self.inv.envelope.origin()
    }

    /// How many times this message was delivered before (0 on the first delivery). Deliveries
    /// that only waited count too: a restart or a suspension during a durable sleep, an event
    /// wait or an activity's backoff ended one (they are not held against the message when it
    /// is retried).
    pub fn attempt(&self) -> u32 {
        self.inv.envelope.attempt
    }

    /// The actor the sender asked replies to go to, if any.
    pub fn reply_to(&self) -> Option<&ActorId> {
        self.inv.envelope.reply_to.as_ref()
    }

    fn check(&self) -> Result<(), StepError> {
        match &self.inv.interrupt {
            Some(i) => Err(StepError::Interrupted(i.describe())),
            None => Ok(()),
        }
    }

    /// A durable wait that began in an earlier delivery ended in this one (`resumed_in`): this
    /// message's attempts count from here.
    pub(super) fn resumed(&mut self, resumed_in: Option<u32>) {
        if let Some(a) = resumed_in {
            self.inv.counted_from = self.inv.counted_from.max(a);
        }
    }

    pub(super) fn interrupt(&mut self, i: Interrupt) -> StepError {
        let e = StepError::Interrupted(i.describe());
        if self.inv.interrupt.is_none() {
            self.inv.interrupt = Some(i);
        }
        e
    }

    /// Takes the next step number and, in replay, what the journal recorded for it, checking that
    /// the journal's step is the same kind and name as this call.
    pub(super) fn next_step(
        &mut self,
        kind: &'static str,
        name: &str,
    ) -> Result<(Step, Option<Vec<EntryKind>>), StepError> {
        self.check()?;
        if let Some(open) = self.inv.open {
            let msg = self.inv.dropped(open);
            return Err(self.interrupt(Interrupt::NonDeterminism(open, msg)));
        }
        self.inv.step += 1;
        let step = self.inv.step;
        if std::mem::take(&mut self.inv.opening) {
            self.inv.open = Some(step);
        }
        let Some(recorded) = self.inv.recorded.remove(&step) else {
            return Ok((step, None));
        };
        let (jk, jn) = recorded
            .first()
            .map(kind_and_name)
            .unwrap_or(("nothing", String::new()));
        if jk != kind || jn != name {
            let msg = format!(
                "step {step} of message {} on {}: the journal has {jk} {jn:?}, the code now calls {kind} {name:?}",
                self.inv.envelope.id, self.inv.actor
            );
            return Err(self.interrupt(Interrupt::NonDeterminism(step, msg)));
        }
        Ok((step, Some(recorded)))
    }

    /// Suspends the invocation in the store until `until` (`None`: no deadline) or until an
    /// event on `lane` (none for a sleep or a backoff) or a cancellation wakes it
    /// ([`Mailbox::suspend`](crate::Mailbox::suspend)); everything pending must be durable
    /// already. Once suspended, the interrupt to pass on (the runtime passivates the actor);
    /// else why the store refused. A wait for an event comes back to look again after
    /// `Config::event_recheck` at the latest.
    pub(super) async fn suspend(
        &mut self,
        until: Option<Timestamp>,
        lane: Option<&ActorId>,
    ) -> Result<Refused, StepError> {
        let asked = tokio::time::Instant::now();
        let mut delay = until.map_or(MAX_SUSPENSION, |u| u.saturating_since(Timestamp::now()));
        if lane.is_some() {
            delay = delay.min(self.io.config.event_recheck);
        }
        let delay = delay.min(MAX_SUSPENSION);
        let reason = match (until, lane) {
            (Some(u), None) => format!("suspended: waiting until {u}"),
            (Some(u), Some(_)) => format!("suspended: waiting for an event until {u}"),
            (None, _) => "suspended: waiting for an event".to_owned(),
        };
        match self
            .io
            .store
            .suspend(&self.inv.receipt, lane, delay, &reason)
            .await
        {
            Ok(Suspension::Suspended) => {
                // Only a deadline: a recheck (events wake the wait) is not worth a scan.
                let alarm = (until.is_some()
                    && (lane.is_none() || delay < self.io.config.event_recheck))
                    .then_some((asked + delay, lane.is_none()));
                Err(self.interrupt(Interrupt::Suspended { delay, alarm }))
            }
            Ok(Suspension::EventWaiting) => Ok(Refused::EventWaiting),
            Ok(Suspension::Cancelled) => Ok(Refused::Cancelled),
            Err(e @ StoreError::StaleReceipt { .. }) => Err(self.interrupt(Interrupt::Conflict(e))),
            Err(e) => Err(self.interrupt(Interrupt::Unsuspended(e))),
        }
    }

    /// Suspends the sleep (or backoff) of `step` until `at`: what the step returns, the
    /// interruption once suspended, or its cancellation.
    pub(super) async fn suspend_until(
        &mut self,
        at: Timestamp,
        step: Step,
        resumed_in: Option<u32>,
    ) -> StepError {
        match self.suspend(Some(at), None).await {
            Err(e) => e,
            Ok(Refused::Cancelled) => self.wait_cancelled(step, resumed_in).await,
            Ok(Refused::EventWaiting) => {
                self.interrupt(Interrupt::Unsuspended(StoreError::InvalidRequest(
                    "the store refused a suspension without a lane for an event on it".into(),
                )))
            }
        }
    }

    /// Ends the wait of `step` for a cancellation: journals it (at once) and returns
    /// [`StepError::Cancelled`] for the step to give.
    pub(super) async fn wait_cancelled(
        &mut self,
        step: Step,
        resumed_in: Option<u32>,
    ) -> StepError {
        tracing::debug!(actor = %self.inv.actor, message = %self.inv.envelope.id, step, "wait cancelled");
        self.inv.cancelled = true;
        self.inv.push(EntryKind::WaitCancelled { step, resumed_in });
        match self.flush_resumed(resumed_in).await {
            Ok(()) => StepError::Cancelled,
            Err(e) => e,
        }
    }

    /// [`flush`](Self::flush)es the end of a durable wait that began in an earlier delivery
    /// (`resumed_in`, rule D17). The message's attempts count from this delivery once that end
    /// is durable, or if the write failed for want of the store (it may have landed, and a
    /// store that is down is waited out, not held against the message). A write refused on
    /// its merits leaves them counted from before: the journal still says the wait goes on,
    /// and a message whose every resumption is refused is given up, not retried forever.
    pub(super) async fn flush_resumed(&mut self, resumed_in: Option<u32>) -> Result<(), StepError> {
        let r = self.flush().await;
        let transient =
            matches!(&self.inv.interrupt, Some(Interrupt::Store(e)) if e.is_transient());
        if r.is_ok() || transient {
            self.resumed(resumed_in);
        }
        r
    }

    /// Makes everything pending durable (entries and outgoing messages, in one write).
    pub(crate) async fn flush(&mut self) -> Result<(), StepError> {
        self.check()?;
        if self.inv.pending.is_empty() && self.inv.outbox.is_empty() {
            return Ok(());
        }
        let turn = Turn {
            fence: Some(&self.io.lease),
            send: &self.inv.outbox,
            ..Turn::append(&self.inv.actor, self.inv.next_seq, &self.inv.pending)
        };
        match self.io.commit(turn).await {
            Ok(c) => {
                self.inv.next_seq = c.highest + 1;
                self.inv.pending.clear();
                self.inv.outbox.clear();
                self.inv.journaled = true;
                Ok(())
            }
            Err(e) => Err(self.interrupt(Interrupt::from_store(e))),
        }
    }

    /// Marks the actor done: when this invocation completes (returns `Ok`), the runtime
    /// retires the actor after `Config::retention.finished_after` (default 1 h), deleting its
    /// journal and snapshots, unless a message changes its state meanwhile (then it is kept;
    /// a read does not count) or one waits then. Call it once, when the actor becomes done:
    /// each call sends one retirement (a delayed message). Its callers' idempotency records stay until they expire, so a caller asking
    /// again with its key still gets its reply; a message after the retirement starts the
    /// actor afresh from its default state. A rejected invocation does not finish its actor.
    /// Not a durable step: a replay that calls it again finishes the same.
    ///
    /// ```
    /// use std::time::Duration;
    /// use loom_core::runtime::{Actor, Context, Rejected, Runtime};
    ///
    /// struct Transfer;
    /// impl Actor for Transfer {
    ///     const KIND: &'static str = "transfer";
    ///     type State = u32;
    ///     type Message = ();
    ///     type Reply = u32;
    ///     async fn handle(&self, runs: &mut u32, ctx: &mut Context<'_>, _: ()) -> Result<u32, Rejected> {
    ///         *runs += 1;
    ///         ctx.finish(); // one transfer, then its journal can go
    ///         Ok(*runs)
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let rt = Runtime::builder()
    ///     .memory()
    ///     .register_actor(Transfer)
    ///     .configure(|c| c.retention.finished_after = Duration::from_millis(100))
    ///     .start()
    ///     .await?;
    /// let t = rt.actor::<Transfer>("t-1")?;
    /// assert_eq!(t.ask(()).await?, 1);
    /// while rt.metrics().retired == 0 {
    ///     tokio::time::sleep(Duration::from_millis(20)).await;
    /// }
    /// assert_eq!(t.ask(()).await?, 1, "retired: a new message starts it afresh");
    /// # rt.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn finish(&mut self) {
        self.inv.finish = true;
    }

    /// The current time, read once per step: the first run reads the clock and journals it, a
    /// replay returns what was journaled. Use it instead of `Timestamp::now()` or
    /// `SystemTime::now()` wherever the time decides what the handler does, so that a replay
    /// after a crash takes the same branch.
    ///
    /// ```
    /// use loom_core::runtime::{Actor, Context, Rejected};
    ///
    /// #[derive(Default)]
    /// struct Stamp;
    ///
    /// impl Actor for Stamp {
    ///     const KIND: &'static str = "stamp";
    ///     type State = Vec<String>;
    ///     type Message = ();
    ///     type Reply = String;
    ///
    ///     async fn handle(&self, seen: &mut Vec<String>, ctx: &mut Context<'_>, _: ()) -> Result<String, Rejected> {
    ///         let at = ctx.now()?;             // the same after a crash and replay
    ///         let id = ctx.uuid()?;            // likewise
    ///         let coin = ctx.random_u64()? % 2; // likewise
    ///         seen.push(format!("{id} at {at}: {coin}"));
    ///         Ok(seen.last().cloned().unwrap_or_default())
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let rt = loom_core::runtime::Runtime::builder().memory().register_actor(Stamp).start().await?;
    /// let stamp = rt.actor::<Stamp>("s")?;
    /// let (first, second) = (stamp.ask(()).await?, stamp.ask(()).await?);
    /// assert_ne!(first, second, "each invocation draws its own values");
    /// # rt.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn now(&mut self) -> Result<Timestamp, StepError> {
        self.record("now", Timestamp::now)
    }

    /// A random number, drawn once per step and journaled like [`now`](Self::now).
    pub fn random_u64(&mut self) -> Result<u64, StepError> {
        self.record("random_u64", crate::seam::random_u64)
    }

    /// A random (version 4) UUID, drawn once per step and journaled like [`now`](Self::now).
    pub fn uuid(&mut self) -> Result<uuid::Uuid, StepError> {
        self.record("uuid", crate::seam::uuid_v4)
    }

    /// Whether this invocation runs the code after the change `change` (Temporal's
    /// `patched`): lets an invocation that began under old code finish on the old code's path
    /// after an upgrade, while new invocations take the new one.
    ///
    /// The first call for a change in an invocation decides; later calls for it return the
    /// same answer without taking a step. Live, it journals a marker (a `Recorded` entry named
    /// `patched:<change>`, one step) and returns `true`. On a replay, it returns `true` if the journal has that marker at this
    /// step, and `false` if it has another step there: the invocation began under code without
    /// the change, which went on to that step; the call then takes no step, so the old path's
    /// next call meets its own journaled step. (An invocation from before the change that had
    /// not yet passed this point takes the new path: nothing journaled contradicts it.) Once
    /// no invocation from before the change can
    /// be left, the old branch can go; keep the `patched` call (or remove both together with
    /// the journals that have the marker).
    ///
    /// ```
    /// use loom_core::runtime::{Actor, Context, Rejected};
    ///
    /// struct Order;
    ///
    /// impl Actor for Order {
    ///     const KIND: &'static str = "order";
    ///     type State = ();
    ///     type Message = u64;
    ///     type Reply = String;
    ///
    ///     async fn handle(&self, _: &mut (), ctx: &mut Context<'_>, cents: u64) -> Result<String, Rejected> {
    ///         ctx.activity("reserve", &cents, |_| async { Ok::<_, String>(()) }).await?;
    ///         // Added in v2: a fraud check. Orders begun under v1 skip it on their replay.
    ///         if ctx.patched("fraud-check")? {
    ///             ctx.activity("fraud-check", &cents, |_| async { Ok::<_, String>(()) }).await?;
    ///         }
    ///         ctx.activity("charge", &cents, |_| async { Ok::<_, String>(()) }).await?;
    ///         Ok("charged".into())
    ///     }
    /// }
    /// ```
    pub fn patched(&mut self, change: &str) -> Result<bool, StepError> {
        self.check()?;
        if change.is_empty() || change.len() > MAX_CHANGE_ID_LEN {
            return Err(StepError::Invalid(format!(
                "a change id is 1 to {MAX_CHANGE_ID_LEN} bytes, not {}",
                change.len()
            )));
        }
        // The first call for a change decides for the whole invocation: one that began under
        // old code stays on the old path at every place the change guards.
        if let Some(&known) = self.inv.patches.get(change) {
            return Ok(known);
        }
        let marker = format!("patched:{change}");
        let step = self.inv.step + 1;
        let patched = match self.inv.recorded.get(&step).and_then(|r| r.first()) {
            // Began under code with the change (this very call): replay its choice.
            Some(EntryKind::Recorded { name, .. }) if *name == marker => {
                self.inv.recorded.remove(&step);
                self.inv.step = step;
                true
            }
            // Began under code without it, which journaled something else here.
            Some(_) => false,
            // Past everything the journal has for this invocation: new code's path.
            None => {
                self.inv.step = step;
                self.inv.push(EntryKind::Recorded {
                    step,
                    name: marker,
                    value: Value::Bool(true),
                });
                true
            }
        };
        self.inv.patches.insert(change.to_owned(), patched);
        Ok(patched)
    }

    /// Takes `fresh()` on the first run and journals it as a `Recorded` entry (written with the
    /// turn's next write, before anything it may lead to leaves the actor); on a replay, the
    /// journaled value.
    fn record<T: Serialize + DeserializeOwned>(
        &mut self,
        name: &'static str,
        fresh: impl FnOnce() -> T,
    ) -> Result<T, StepError> {
        let (step, recorded) = self.next_step("record", name)?;
        if let Some(EntryKind::Recorded { value, .. }) = recorded.as_ref().and_then(|r| r.first()) {
            return serde_json::from_value(value.clone()).map_err(|e| {
                StepError::Invalid(format!(
                    "the {name} journaled at step {step} does not decode: {e}"
                ))
            });
        }
        let v = fresh();
        let value = serde_json::to_value(&v)
            .map_err(|e| StepError::Invalid(format!("{name} does not encode: {e}")))?;
        self.inv.push(EntryKind::Recorded {
            step,
            name: name.to_owned(),
            value,
        });
        Ok(v)
    }

    /// Runs `fut` while keeping the invoking message out of other consumers' reach.
    pub(super) async fn keep_out<T>(
        &mut self,
        fut: impl Future<Output = T>,
    ) -> Result<T, StepError> {
        let every = self.io.config.visibility / 3;
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Ok(out),
                _ = tokio::time::sleep(every) => {
                    if let Err(e) = self.io.store.extend(&self.inv.receipt, self.io.config.visibility).await {
                        return Err(self.interrupt(Interrupt::from_store(e)));
                    }
                }
            }
        }
    }

    /// Sends `msg` to the actor `B::KIND/key`. It leaves exactly once: with the turn's next
    /// durable write, in the same atomic write as the `MessageSent` entry that records it.
    /// Live, it queues the message for that write; on a replay, the journal's `MessageSent`
    /// says it left already, and nothing is sent again. (Its id derives from this message and
    /// the step, so the receiver could deduplicate it too.) A message requeued from the dead
    /// letters runs again from its first step: a send to the recipient a dead-lettered run of it
    /// sent to at the same step is journaled but not sent again, since that recipient got it
    /// then.
    ///
    /// ```
    /// use loom_core::runtime::{Actor, Context, Rejected, Runtime};
    ///
    /// struct Inbox;
    /// impl Actor for Inbox {
    ///     const KIND: &'static str = "inbox";
    ///     type State = Vec<String>;
    ///     type Message = Option<String>; // a note to keep, or None to read them
    ///     type Reply = Vec<String>;
    ///     async fn handle(&self, notes: &mut Vec<String>, _: &mut Context<'_>, note: Option<String>) -> Result<Vec<String>, Rejected> {
    ///         notes.extend(note);
    ///         Ok(notes.clone())
    ///     }
    /// }
    ///
    /// struct Greeter;
    /// impl Actor for Greeter {
    ///     const KIND: &'static str = "greeter";
    ///     type State = ();
    ///     type Message = String;
    ///     type Reply = ();
    ///     async fn handle(&self, _: &mut (), ctx: &mut Context<'_>, name: String) -> Result<(), Rejected> {
    ///         ctx.send::<Inbox>(&name, &Some(format!("hello, {name}")))?;
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let rt = Runtime::builder().memory().register_actor(Inbox).register_actor(Greeter).start().await?;
    /// rt.actor::<Greeter>("g")?.ask("ada".to_owned()).await?;
    /// // The greeting left with the greeter's turn; the inbox handles it in its own turn.
    /// let inbox = rt.actor::<Inbox>("ada")?;
    /// let notes = tokio::time::timeout(std::time::Duration::from_secs(10), async {
    ///     loop {
    ///         let notes = inbox.ask(None).await?;
    ///         if !notes.is_empty() {
    ///             return Ok::<_, loom_core::runtime::AskError>(notes);
    ///         }
    ///         tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    ///     }
    /// })
    /// .await??;
    /// assert_eq!(notes, vec!["hello, ada"]);
    /// # rt.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn send<B: Actor>(
        &mut self,
        key: impl AsRef<str>,
        msg: &B::Message,
    ) -> Result<(), StepError> {
        self.send_at::<B>(key, msg, None)
    }

    /// Sends `msg` to `B::KIND/key`, due after `delay` (a scheduled message; durable like
    /// [`send`](Self::send), and the delay counts from the first run, not from a replay).
    pub fn send_after<B: Actor>(
        &mut self,
        key: impl AsRef<str>,
        msg: &B::Message,
        delay: Duration,
    ) -> Result<(), StepError> {
        self.send_at::<B>(key, msg, Some(delay))
    }

    fn send_at<B: Actor>(
        &mut self,
        key: impl AsRef<str>,
        msg: &B::Message,
        delay: Option<Duration>,
    ) -> Result<(), StepError> {
        let to =
            ActorId::new(B::KIND, key.as_ref()).map_err(|e| StepError::Invalid(e.to_string()))?;
        let (step, recorded) = self.next_step("send", to.as_str())?;
        if recorded.is_some() {
            return Ok(());
        }
        if let Some(d) = delay {
            crate::limits::check_delay(d)
                .map_err(|e| StepError::Invalid(format!("message to {to}: {e}")))?;
        }
        let payload = serde_json::to_value(msg)
            .map_err(|e| StepError::Invalid(format!("message to {to} does not encode: {e}")))?;
        // Refused here, not dead-lettered by its receiver as a message that does not decode.
        crate::finite::refuse_non_finite(msg, &payload, "message")
            .map_err(|e| StepError::Invalid(format!("message to {to}: {e}")))?;
        self.queue(
            step,
            to,
            payload,
            delay.map(|d| Timestamp::now() + d),
            false,
        );
        Ok(())
    }

    /// Creates a child actor of kind `C` by sending it `input` as its first message. The child's
    /// key is derived from this actor, this message and the step: a replay finds the same child
    /// (and sends nothing again), so a crash never makes two children of one spawn.
    ///
    /// ```
    /// use loom_core::runtime::{Actor, Context, Rejected, Runtime};
    ///
    /// struct Job;
    /// impl Actor for Job {
    ///     const KIND: &'static str = "job";
    ///     type State = u32;
    ///     type Message = u32; // work to add, or 0 to read
    ///     type Reply = u32;
    ///     async fn handle(&self, done: &mut u32, _: &mut Context<'_>, work: u32) -> Result<u32, Rejected> {
    ///         *done += work;
    ///         Ok(*done)
    ///     }
    /// }
    ///
    /// struct Batch;
    /// impl Actor for Batch {
    ///     const KIND: &'static str = "batch";
    ///     type State = Vec<String>;
    ///     type Message = u32;
    ///     type Reply = Vec<String>;
    ///     async fn handle(&self, jobs: &mut Vec<String>, ctx: &mut Context<'_>, n: u32) -> Result<Vec<String>, Rejected> {
    ///         for i in 0..n {
    ///             let child = ctx.spawn::<Job>(&(i + 1))?;
    ///             jobs.push(child.key().to_owned());
    ///         }
    ///         Ok(jobs.clone())
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let rt = Runtime::builder().memory().register_actor(Job).register_actor(Batch).start().await?;
    /// let children = rt.actor::<Batch>("nightly")?.ask(2).await?;
    /// assert_eq!(children.len(), 2);
    /// // Each child got its input as its first message.
    /// let second = rt.actor::<Job>(&children[1])?;
    /// let done = tokio::time::timeout(std::time::Duration::from_secs(10), async {
    ///     loop {
    ///         let done = second.ask(0).await?;
    ///         if done > 0 {
    ///             return Ok::<_, loom_core::runtime::AskError>(done);
    ///         }
    ///         tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    ///     }
    /// })
    /// .await??;
    /// assert_eq!(done, 2);
    /// # rt.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn spawn<C: Actor>(&mut self, input: &C::Message) -> Result<ActorId, StepError> {
        let (step, recorded) = self.next_step("spawn", C::KIND)?;
        if let Some(EntryKind::ChildSpawned { child, .. }) =
            recorded.as_ref().and_then(|r| r.first())
        {
            return Ok(child.clone());
        }
        let origin = self.inv.envelope.origin();
        let seed = format!("{}/{origin}/{step}", self.inv.actor);
        let key = uuid::Uuid::new_v5(origin.as_uuid(), seed.as_bytes());
        let child = ActorId::new(C::KIND, key.to_string())
            .map_err(|e| StepError::Invalid(e.to_string()))?;
        let payload = serde_json::to_value(input).map_err(|e| {
            StepError::Invalid(format!("input of child {child} does not encode: {e}"))
        })?;
        crate::finite::refuse_non_finite(input, &payload, "input")
            .map_err(|e| StepError::Invalid(format!("child {child}: {e}")))?;
        self.queue(step, child.clone(), payload, None, true);
        Ok(child)
    }

    fn queue(
        &mut self,
        step: Step,
        to: ActorId,
        payload: Value,
        deliver_at: Option<Timestamp>,
        spawn: bool,
    ) {
        // From the message's origin, so that a requeued message sends what it sent before.
        let message_id = MessageId::derived(&self.inv.envelope.origin(), &format!("step-{step}"));
        let envelope = Envelope {
            id: message_id,
            to: to.clone(),
            payload: payload.clone(),
            idempotency_key: None,
            reply_to: Some(self.inv.actor.clone()),
            // Sent from this invocation's span (or the handler's own): the receiver's span
            // is its child.
            traceparent: Some(trace::outgoing(
                None,
                self.inv.envelope.traceparent.as_deref(),
            )),
            attempt: 0,
            requeued_from: None,
            retire: None,
        };
        if spawn {
            self.inv.push(EntryKind::ChildSpawned {
                step,
                child: to,
                input: payload,
            });
        } else {
            self.inv.push(EntryKind::MessageSent {
                step,
                to,
                message_id,
            });
        }
        // Sent already, under this id and to this recipient, by a dead-lettered run of this
        // message: its receiver got it then, and may not remember that id any more.
        if self
            .inv
            .sent_before
            .get(&step)
            .is_some_and(|to| to.contains(&envelope.to))
        {
            tracing::debug!(%message_id, to = %envelope.to, step, "sent by a dead-lettered run of this message already; not sent again");
            return;
        }
        self.inv.outbox.push(Outgoing {
            envelope,
            deliver_at,
        });
    }

    /// Sleeps durably: the wake-up time is journaled before sleeping, so a restart continues the
    /// same sleep instead of starting it again.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use loom_core::runtime::{Actor, Context, Rejected, Runtime};
    ///
    /// struct Reminder;
    /// impl Actor for Reminder {
    ///     const KIND: &'static str = "reminder";
    ///     type State = ();
    ///     type Message = u64;
    ///     type Reply = String;
    ///     async fn handle(&self, _: &mut (), ctx: &mut Context<'_>, ms: u64) -> Result<String, Rejected> {
    ///         // Live: journals the wake-up time, then sleeps. Replay (after a crash): the same
    ///         // wake-up time, whatever time it is now.
    ///         ctx.sleep(Duration::from_millis(ms)).await?;
    ///         Ok(format!("slept {ms} ms"))
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let rt = Runtime::builder().memory().register_actor(Reminder).start().await?;
    /// let began = Instant::now();
    /// assert_eq!(rt.actor::<Reminder>("short")?.ask(200).await?, "slept 200 ms");
    /// assert!(began.elapsed() >= Duration::from_millis(200));
    /// assert_eq!(rt.metrics().suspensions, 0, "a short sleep waits in memory");
    /// // Longer than `Config::suspend_after` (1 s): the invocation suspends meanwhile.
    /// assert_eq!(rt.actor::<Reminder>("long")?.ask(1500).await?, "slept 1500 ms");
    /// assert_eq!(rt.metrics().suspensions, 1);
    /// # rt.shutdown().await;
    /// # Ok(()) }
    /// ```
    ///
    /// A sleep with more than `Config::suspend_after` left (default 1 s) does not hold the actor
    /// in memory: the invocation suspends (this call returns [`StepError::Interrupted`], which
    /// the handler passes on with `?`), the actor is passivated, and the
    /// message comes back when the sleep ends, on whichever node; the replay then returns from
    /// this call and the handler goes on. Later messages to the actor wait meanwhile.
    ///
    /// A cancellation (`ActorRef::cancel`) ends the sleep with [`StepError::Cancelled`]: at
    /// once if it is suspended or sleeps in memory on the node that asked; a sleep of at most
    /// `suspend_after` in memory on another node is not told and runs to its end. A suspended
    /// sleep spends its last moments (450 ms at most) in memory: its actor takes its message
    /// back just before the end and journals the sleep's end then, so that at the moment
    /// itself the handler goes on with no write ahead of it; a cancellation in those moments
    /// does not end the sleep (the next wait sees it).
    pub async fn sleep(&mut self, duration: Duration) -> Result<(), StepError> {
        let span = tracing::info_span!(
            "loom.sleep",
            duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        );
        self.inv.opening = true;
        let r = self.sleep_step(duration).instrument(span).await;
        self.step_ended();
        r
    }

    /// An async durable call's future ended (see [`Invocation::open`]).
    pub(super) fn step_ended(&mut self) {
        self.inv.open = None;
        self.inv.opening = false;
    }

    /// [`Self::sleep`], in its span.
    async fn sleep_step(&mut self, duration: Duration) -> Result<(), StepError> {
        let (step, recorded) = self.next_step("sleep", "")?;
        let (fire_at, resumed_in) = match recorded {
            Some(r) => {
                if r.iter().any(|k| matches!(k, EntryKind::TimerFired { .. })) {
                    // Its end may have been journaled just before the end itself (see below):
                    // what is left of it is waited out here too, so no run goes on early.
                    if let Some(EntryKind::TimerStarted { fire_at, .. }) = r.first() {
                        self.wait_out(*fire_at).await?;
                    }
                    return Ok(());
                }
                if r.iter()
                    .any(|k| matches!(k, EntryKind::WaitCancelled { .. }))
                {
                    self.inv.cancelled = true;
                    return Err(StepError::Cancelled);
                }
                let fire_at = match r.first() {
                    Some(EntryKind::TimerStarted { fire_at, .. }) => *fire_at,
                    _ => Timestamp::now(),
                };
                (fire_at, Some(self.inv.envelope.attempt))
            }
            None => {
                let fire_at = Timestamp::now() + duration;
                self.inv.push(EntryKind::TimerStarted { step, fire_at });
                self.flush().await?;
                (fire_at, None)
            }
        };
        let left = fire_at.saturating_since(Timestamp::now());
        if self.suspends() && left > self.io.config.suspend_after
            || self.woken_early(resumed_in, left).await
        {
            // Journaled above (or in the run that began it): the replay continues it.
            return Err(self.suspend_until(fire_at, step, resumed_in).await);
        }
        if resumed_in.is_some() && !left.is_zero() && left <= LEASED_EARLY {
            // Handed out just before its end (`LeaseOptions::early`; or back after a restart
            // with as little left): its end is journaled now, off the moment itself, and the
            // rest waited out in memory, so that at the moment the handler goes on with no
            // write ahead of it. A replay of this delivery waits out what is left (above).
            // The rest is not cancelled: the journal says the sleep ends.
            self.inv.push(EntryKind::TimerFired { step, resumed_in });
            self.flush_resumed(resumed_in).await?;
            return self.wait_out(fire_at).await;
        }
        if self.sleep_unless_cancelled(left).await? {
            return Err(self.suspend_until(fire_at, step, resumed_in).await);
        }
        self.inv.push(EntryKind::TimerFired { step, resumed_in });
        if resumed_in.is_some() {
            // The sleep began in an earlier delivery: journal its end at once, so that the
            // deliveries that only slept are not held against the message from here on (and a
            // handler that stops its process after the sleep is still given up).
            self.flush_resumed(resumed_in).await?;
        }
        Ok(())
    }

    /// Waits in memory until `fire_at`, the end of a sleep whose end is journaled already (not
    /// cancelled: the journal says the sleep ends), so that no run goes on before it.
    async fn wait_out(&mut self, fire_at: Timestamp) -> Result<(), StepError> {
        let left = fire_at.saturating_since(Timestamp::now());
        if !left.is_zero() {
            self.keep_out(tokio::time::sleep(left)).await?;
        }
        Ok(())
    }

    /// Waits for the event `name` delivered to this actor (see `ActorRef::deliver_event`), at
    /// most until `timeout` (counted from the first run: a restart does not restart it).
    ///
    /// While it waits, the invocation holds the actor: later messages queue behind it. An event
    /// delivered before the wait began is kept and received as soon as the wait begins. Events
    /// of one name are received in the order delivered, each by one wait; an event delivered
    /// twice with one key (`ActorRef::deliver_event_with`; by default the key comes from the
    /// data) is received once.
    ///
    /// A wait that has gone `Config::suspend_after` (default 1 s) in memory without its event,
    /// and has longer than that left, suspends, as a long [`sleep`](Self::sleep) does: this call
    /// returns [`StepError::Interrupted`] (pass it on with `?`), the actor is passivated, and
    /// its message comes back when the event is delivered or the timeout
    /// passes, on whichever node; the replay then continues this call. The event's delivery
    /// and the wake-up are one write, and the suspension checks for an event in the same write
    /// that suspends, so an event is never missed between the two. A wait resumed before its
    /// time (woken by a cancellation, or after a crash) that finds no event suspends again at
    /// once.
    ///
    /// A cancellation (`ActorRef::cancel`) ends the wait with [`StepError::Cancelled`]: at
    /// once if it is suspended or waits on the node that asked, else when it next tries to
    /// suspend (after `suspend_after` in memory; a wait with less than that left to its
    /// deadline is not told).
    ///
    /// Live, it journals that it waits (with its deadline), and then what it received; on a
    /// replay it returns the journaled event (or timeout) without waiting, or, if the crash
    /// came while it waited, waits on until the same deadline.
    ///
    /// ```
    /// use std::time::Duration;
    /// use loom_core::runtime::{Actor, Context, Rejected, Runtime, StepError};
    ///
    /// struct Approval;
    /// impl Actor for Approval {
    ///     const KIND: &'static str = "approval";
    ///     type State = ();
    ///     type Message = ();
    ///     type Reply = String;
    ///     async fn handle(&self, _: &mut (), ctx: &mut Context<'_>, _: ()) -> Result<String, Rejected> {
    ///         Ok(match ctx.wait_event::<bool>("approved", Some(Duration::from_millis(300))).await {
    ///             Ok(true) => "approved".into(),
    ///             Ok(false) => "refused".into(),
    ///             Err(StepError::TimedOut { .. }) => "no answer".into(),
    ///             Err(e) => return Err(e.into()), // an interruption: pass it on
    ///         })
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let rt = Runtime::builder().memory().register_actor(Approval).start().await?;
    /// let early = rt.actor::<Approval>("early")?;
    /// early.deliver_event("approved", &true).await?; // before the wait began: kept for it
    /// assert_eq!(early.ask(()).await?, "approved");
    /// assert_eq!(rt.actor::<Approval>("ignored")?.ask(()).await?, "no answer");
    /// # rt.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn wait_event<T: DeserializeOwned>(
        &mut self,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<T, StepError> {
        let span = tracing::info_span!("loom.wait_event", event = name);
        self.inv.opening = true;
        let r = self.wait_event_step(name, timeout).instrument(span).await;
        self.step_ended();
        r
    }

    /// [`Self::wait_event`], in its span.
    async fn wait_event_step<T: DeserializeOwned>(
        &mut self,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<T, StepError> {
        let (step, recorded) = self.next_step("wait_event", name)?;
        let resumed_in = recorded.as_ref().map(|_| self.inv.envelope.attempt);
        let deadline = match recorded {
            Some(r) => {
                if let Some(EntryKind::EventReceived {
                    data, timed_out, ..
                }) = r.get(1)
                {
                    if *timed_out {
                        return Err(StepError::TimedOut {
                            name: name.to_owned(),
                        });
                    }
                    return decode_event(name, data.clone());
                }
                if let Some(EntryKind::WaitCancelled { .. }) = r.get(1) {
                    self.inv.cancelled = true;
                    return Err(StepError::Cancelled);
                }
                match r.first() {
                    Some(EntryKind::EventAwaited { deadline, .. }) => *deadline,
                    _ => None,
                }
            }
            None => {
                crate::limits::check_step_name("an event's", name).map_err(StepError::Invalid)?;
                let deadline = timeout.map(|t| Timestamp::now() + t);
                self.inv.push(EntryKind::EventAwaited {
                    step,
                    name: name.to_owned(),
                    deadline,
                });
                self.flush().await?;
                deadline
            }
        };
        let lane = self
            .inv
            .actor
            .event_lane_in(name, self.io.store.partitions());
        let notify = self.io.hub.notifier(&lane);
        // The lane's wake-up is dropped when this wait ends, however it ends (a suspended wait
        // keeps nothing in memory).
        let _forget = Forget {
            hub: self.io.hub.clone(),
            lane: lane.clone(),
        };
        let cancel = self.inv.cancel.notify.clone();
        // Try to suspend at the first look that finds no event: a wait woken before its time,
        // or one whose cancellation was asked on this node.
        let mut try_now = self
            .woken_early(
                resumed_in,
                deadline.map_or(Duration::MAX, |d| d.saturating_since(Timestamp::now())),
            )
            .await;
        let mut waiting_since = tokio::time::Instant::now();
        let opts = LeaseOptions {
            visibility: self.io.config.visibility,
            max_deliveries: 1000,
            ..LeaseOptions::default()
        };
        loop {
            let notified = notify.notified();
            // As the actor's own mailbox (`activation.rs`): not by a node that lost the
            // partition before its keeper could say so, which would hide the event from the
            // wait on its new owner for a visibility.
            if !self.io.tenure.held() {
                return Err(self.interrupt(Interrupt::LeaseLost));
            }
            match self.io.store.lease(&lane, opts).await {
                Ok(Some(event)) => {
                    // The wait's span links to the trace of whoever delivered the event.
                    let span = tracing::Span::current();
                    if !span.is_disabled() {
                        let from = trace::parent(event.envelope.traceparent.as_deref());
                        let from = from.span().span_context().clone();
                        if from.is_valid() {
                            span.add_link(from);
                        }
                    }
                    let data = event.envelope.payload.clone();
                    self.inv.push(EntryKind::EventReceived {
                        step,
                        name: name.to_owned(),
                        data: data.clone(),
                        timed_out: false,
                        resumed_in,
                    });
                    // The event is consumed in the same write that journals it, and its key
                    // recorded, so that the same event delivered again is refused as a
                    // duplicate instead of satisfying the next wait (rule D6).
                    let received = json!({ "event": name, "received_by": self.inv.envelope.id });
                    let key = event.envelope.idempotency_key.clone();
                    let turn = Turn {
                        fence: Some(&self.io.lease),
                        send: &self.inv.outbox,
                        settle: Some(Settle::Ack(&event.receipt)),
                        record: key.as_ref().map(|k| Record {
                            actor: &lane,
                            key: k,
                            result: &received,
                            ttl: self.io.config.reply_ttl,
                        }),
                        ..Turn::append(&self.inv.actor, self.inv.next_seq, &self.inv.pending)
                    };
                    return match self.io.commit(turn).await {
                        Ok(c) => {
                            self.inv.next_seq = c.highest + 1;
                            self.inv.pending.clear();
                            self.inv.outbox.clear();
                            // Counted from here once the wait's end is durable (as in `sleep`).
                            self.resumed(resumed_in);
                            decode_event(name, data)
                        }
                        Err(e) => {
                            // As in `flush_resumed`.
                            if e.is_transient() {
                                self.resumed(resumed_in);
                            }
                            Err(self.interrupt(Interrupt::from_store(e)))
                        }
                    };
                }
                Ok(None) => {}
                Err(e) => return Err(self.interrupt(Interrupt::from_store(e))),
            }
            let now = Timestamp::now();
            if let Some(d) = deadline
                && now >= d
            {
                self.inv.push(EntryKind::EventReceived {
                    step,
                    name: name.to_owned(),
                    data: Value::Null,
                    timed_out: true,
                    resumed_in,
                });
                if resumed_in.is_some() {
                    // As in `sleep`: the wait's end is journaled at once when it began in an
                    // earlier delivery.
                    self.flush_resumed(resumed_in).await?;
                }
                return Err(StepError::TimedOut {
                    name: name.to_owned(),
                });
            }
            let suspend_after = self.io.config.suspend_after;
            let long = waiting_since.elapsed() >= suspend_after
                && deadline.is_none_or(|d| d.saturating_since(now) > suspend_after);
            if self.suspends() && (try_now || long) {
                // EventAwaited is journaled (above, or in the run that began the wait): the
                // replay continues the wait.
                match self.suspend(deadline, Some(&lane)).await? {
                    Refused::Cancelled => return Err(self.wait_cancelled(step, resumed_in).await),
                    // An event came since the lane was looked at (or one is out to a delivery
                    // that failed to settle it, back when its visibility runs out): look again
                    // after the usual pause, and try to suspend again only after waiting
                    // `suspend_after` more, so that a lane whose event stays out is not spun on.
                    Refused::EventWaiting => waiting_since = tokio::time::Instant::now(),
                }
            }
            if self.cancelled_before().await {
                // Suspending meets the mark (`Refused::Cancelled`).
                try_now = true;
                continue;
            }
            let mut wait = self.io.config.poll_interval.max(Duration::from_millis(10)) * 4;
            if let Some(d) = deadline {
                wait = wait.min(d.saturating_since(now) + Duration::from_millis(1));
            }
            let watch_cancel = self.suspends();
            try_now = self
                .keep_out(async {
                    tokio::select! {
                        biased;
                        _ = cancel.notified(), if watch_cancel => true,
                        _ = notified => false,
                        _ = tokio::time::sleep(wait) => false,
                    }
                })
                .await?;
        }
    }

    /// Sleeps `left` in memory, keeping the message out; true, at once, if this invocation's
    /// cancellation is asked on this node meanwhile (the caller then tries to suspend, which
    /// the store refuses for the cancellation). Not listened to once a wait was cancelled
    /// ([`suspends`](Self::suspends)).
    pub(super) async fn sleep_unless_cancelled(
        &mut self,
        left: Duration,
    ) -> Result<bool, StepError> {
        if self.cancelled_before().await {
            return Ok(true);
        }
        let watch_cancel = self.suspends();
        let cancel = self.inv.cancel.notify.clone();
        self.keep_out(async {
            tokio::select! {
                biased;
                _ = cancel.notified(), if watch_cancel => true,
                _ = tokio::time::sleep(left) => false,
            }
        })
        .await
    }

    /// Whether this message's cancellation was asked where no invocation of it could be told
    /// (it had not begun when a node marked it, on whichever node): looked up in the store
    /// once per delivery, at its first wait in memory (a wait that suspends meets the mark
    /// anyway). True also if the store could not say: the caller then tries to suspend.
    pub(super) async fn cancelled_before(&mut self) -> bool {
        if !self.suspends() || std::mem::replace(&mut self.inv.cancel_looked, true) {
            return false;
        }
        self.cancel_asked().await
    }

    /// Whether this invocation's waits suspend (and so see a cancellation): not once one of
    /// them was cancelled (`Invocation::cancelled`), nor with `Config::suspend_after` at
    /// `Duration::MAX` (suspension off).
    pub(super) fn suspends(&self) -> bool {
        !self.inv.cancelled && self.io.config.suspend_after != Duration::MAX
    }

    /// A wait that began in an earlier delivery and has more than [`WOKEN_EARLY`] left was
    /// woken before its time (by a cancellation, or a crash during it): it looks at the store's
    /// mark at once by trying to suspend, instead of waiting in memory first. Within
    /// [`LEASED_EARLY`] of its end it may instead have been handed out early on purpose
    /// (`LeaseOptions::early`), and suspending it again would only have it handed out again:
    /// there it is woken early only if the store says its cancellation was asked (a read).
    pub(super) async fn woken_early(&self, resumed_in: Option<u32>, left: Duration) -> bool {
        if resumed_in.is_none() || left <= WOKEN_EARLY || !self.suspends() {
            return false;
        }
        left > LEASED_EARLY || self.cancel_asked().await
    }

    /// True if this invocation's message is marked as to be cancelled in the store
    /// ([`Mailbox::cancel`](crate::store::Mailbox::cancel)), or if the store could not say: the
    /// caller then tries to suspend, which meets the store's failure as any write does.
    async fn cancel_asked(&self) -> bool {
        let position = self.inv.receipt.position;
        match self
            .io
            .store
            .messages(&self.inv.actor, position.checked_sub(1), 1)
            .await
        {
            Ok(listed) => listed
                .first()
                .is_some_and(|w| w.position == position && w.cancelling),
            Err(e) => {
                tracing::debug!(actor = %self.inv.actor, error = %e, "could not look for a cancellation; trying to suspend instead");
                true
            }
        }
    }
}

/// See [`Context::woken_early`]: a wait that comes back at its time (or a clock's skew past it)
/// has less than this left.
const WOKEN_EARLY: Duration = Duration::from_millis(100);

/// See [`Context::woken_early`]: a wait handed out early on purpose (`alarms::LEASE_EARLY`
/// before its end at most, by the store's clock) comes back with less than this left.
const LEASED_EARLY: Duration = super::alarms::LEASE_EARLY.saturating_add(WOKEN_EARLY);

/// The in-process wake-up of an invocation for its cancellation (see `Invocation::cancel`): a
/// [`Notify`](tokio::sync::Notify) in the hub under `ActorId::cancel_signal`, dropped from it
/// with the invocation.
pub(crate) struct CancelSignal {
    pub(super) notify: Arc<super::hub::Signal>,
    hub: Arc<Hub>,
    key: ActorId,
}

impl CancelSignal {
    pub(crate) fn new(hub: &Arc<Hub>, message: &MessageId) -> Self {
        let key = ActorId::cancel_signal(message);
        CancelSignal {
            notify: hub.notifier(&key),
            hub: hub.clone(),
            key,
        }
    }
}

impl Drop for CancelSignal {
    fn drop(&mut self) {
        self.hub.forget_if(&self.key, &self.notify);
    }
}

/// Drops a lane's wake-up from the hub when a wait for an event ends.
struct Forget {
    hub: Arc<Hub>,
    lane: ActorId,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.hub.forget(&self.lane);
    }
}

fn decode_event<T: DeserializeOwned>(name: &str, data: Value) -> Result<T, StepError> {
    serde_json::from_value(data)
        .map_err(|e| StepError::Invalid(format!("event {name} does not decode: {e}")))
}
