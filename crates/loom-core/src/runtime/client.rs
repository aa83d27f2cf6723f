//! [`ActorRef`]: how code outside actors talks to them.

use std::marker::PhantomData;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::envelope::Envelope;
use crate::error::StoreError;
use crate::id::{ActorId, IdError, IdempotencyKey, MessageId};
use crate::store::{Enqueued, Reservation};
use crate::time::Timestamp;

use super::Runtime;
use super::actor::{Actor, Rejected};
use super::hub::Hub;
use super::record::{Outcome, Recorded};
use super::trace;

/// Why a message could not be sent. Nothing was enqueued.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// An actor id is not valid. `Runtime::actor` refuses a bad key when the handle is made,
    /// so a handle never sends with one; this variant is for callers who make ids themselves
    /// and convert the [`IdError`] (`?` on a `Result<_, IdError>` in a function returning
    /// `SendError`).
    #[error(transparent)]
    InvalidId(#[from] IdError),
    /// The kind is neither registered with the runtime nor declared as hosted by other nodes
    /// ([`RuntimeBuilder::sends_to`](super::RuntimeBuilder::sends_to)).
    #[error(
        "actor kind {0:?} is not known to this runtime: register it to host it here, or declare it with sends_to if other nodes host it"
    )]
    UnknownKind(String),
    /// The message does not serialize to JSON.
    #[error("message does not encode: {0}")]
    Encode(String),
    /// The message (JSON given to [`AnyActorRef`]) does not decode as the kind's message type;
    /// nothing was sent.
    #[error("not a message of kind {kind:?}: {error}")]
    BadMessage {
        /// The actor kind.
        kind: String,
        /// Why it does not decode.
        error: String,
    },
    /// The actor's mailbox holds `Config::max_mailbox` messages already (backpressure); for
    /// an event, `Config::max_mailbox` events of its name wait for the actor.
    #[error("mailbox of {actor} is full ({pending} messages waiting)")]
    MailboxFull {
        /// The actor.
        actor: ActorId,
        /// How many messages wait.
        pending: u64,
    },
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runtime is shutting down.
    #[error("runtime is shut down")]
    Shutdown,
    /// A request past a limit other than the message's own: a delay over
    /// [`MAX_DELAY`](crate::limits::MAX_DELAY), an event name that is empty or over
    /// [`MAX_STEP_NAME_LEN`](crate::limits::MAX_STEP_NAME_LEN).
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Why `ask` did not return a reply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AskError {
    /// The message was not sent.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The handler rejected the message (state unchanged).
    #[error("rejected: {0}")]
    Rejected(Rejected),
    /// The message was given up on and dead-lettered.
    #[error("failed: {0}")]
    Failed(String),
    /// The invocation was cancelled ([`ActorRef::cancel`]) while it waited, and the handler
    /// ended it (passing [`StepError::Cancelled`](super::StepError::Cancelled) on); state
    /// unchanged, as for a rejection.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// No reply within the timeout. The message may still be processed (it waits for a host of
    /// its kind, say), or, when the store did not answer the send in time, may not have been
    /// stored: ask again with `key` (the caller's, or the one Loom made up for this ask) for
    /// its reply, which sends it at most once either way; a plain `ask` again sends another.
    #[error(
        "no reply within {after:?} (the message may still run: ask again with key {key} for its reply)"
    )]
    Timeout {
        /// How long the ask waited.
        after: Duration,
        /// The message's idempotency key.
        key: IdempotencyKey,
    },
    /// The reply does not decode as the actor's reply type.
    #[error("reply does not decode: {0}")]
    BadReply(String),
    /// The message was sent, but the store has kept failing since (failures a second or more
    /// apart, none succeeding between), so no reply can come now. The message stays in its
    /// mailbox and runs once the store works again: ask again with `key` (the caller's, or the
    /// one Loom made up for this ask) to get its reply without sending it twice.
    #[error(
        "the store is failing, so no reply can come now (ask again with key {key} for it): {error}"
    )]
    Store {
        /// The failure that began it (a full disk, say).
        error: StoreError,
        /// The message's idempotency key.
        key: IdempotencyKey,
    },
    /// The runtime stopped ([`Runtime::shutdown`](super::Runtime::shutdown) done, or
    /// [`kill`](super::Runtime::kill)) before the reply came. The message stays in its
    /// mailbox and runs wherever its kind is hosted: ask again with `key` (the caller's, or the
    /// one Loom made up for this ask), on a running node, for its reply without sending it
    /// twice.
    #[error(
        "the runtime stopped before the reply came (the message may still run: ask again with key {key} for its reply)"
    )]
    Stopped {
        /// The message's idempotency key.
        key: IdempotencyKey,
    },
}

/// How long the store must have been failing before a waiting `ask` gives up on its reply.
const FAILING_GIVES_UP_ASK: Duration = Duration::from_secs(1);

/// The longest an `ask` waits between its own looks at the store for its reply once the
/// store's reply signals come (one has, and they are read): each look waits twice as long as
/// the one before, from twice `Config::poll_interval`. A signal brings the reply at once; the
/// looks are the safety net for a signal lost with the subscription's connection, so this
/// (and one look's time) bounds what such a loss costs. Every waiting ask looks within
/// `2 × poll_interval` (at a random moment, so not all at once) when signals were read too
/// slowly to keep up, a signalled reply could not be read, or signals stop being read; and
/// after a look that failed. Without signals the looks stay at twice `poll_interval`.
const SIGNALLED_LOOK_AT_MOST: Duration = Duration::from_secs(1);

/// Most lookups of signalled replies in flight at once (see `replies_from_other_nodes`).
const REPLY_LOOKUPS: usize = 64;

/// Hands the replies other nodes record to the callers of this one waiting for them: for each
/// recorded result the store signals that a local `ask` waits for, one look at the record (at
/// most [`REPLY_LOOKUPS`] at once, so that one slow look holds up no other reply), and the
/// reply to the waiter. Runs while the runtime does, if the store signals at all.
pub(super) async fn replies_from_other_nodes(
    shared: std::sync::Arc<super::Shared>,
    mut completions: tokio::sync::broadcast::Receiver<crate::store::Completion>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let lookups = std::sync::Arc::new(tokio::sync::Semaphore::new(REPLY_LOOKUPS));
    // However this ends, the waiting asks go back to looking often.
    struct Reading<'a>(&'a Hub);
    impl Drop for Reading<'_> {
        fn drop(&mut self) {
            self.0.signals_read(false);
        }
    }
    let hub = shared.hub.clone();
    let _reading = Reading(&hub);
    loop {
        let c = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            c = completions.recv() => c,
        };
        let c = match c {
            // A signal came, so they do come (a subscription that never works leaves the asks
            // looking as often as without signals).
            Ok(c) => {
                if !hub.signalled() {
                    hub.signals_read(true);
                }
                c
            }
            // Missed some: every waiting ask looks soon.
            Err(RecvError::Lagged(n)) => {
                tracing::debug!(missed = n, "reply signals came faster than they were read");
                shared.hub.signals_missed();
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        // No one here waits; or the actor runs here, and its own turn hands the reply over
        // (a look now would only read it again).
        let runs_here = || {
            shared
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&c.actor)
        };
        if !shared.hub.is_waiting(&c.actor, &c.key) || runs_here() {
            continue;
        }
        let permit = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            p = lookups.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let s = shared.clone();
        shared.spawn(async move {
            match s.store.lookup(&c.actor, &c.key).await {
                Ok(Some(Reservation::Completed(v))) => s.hub.reply(&c.actor, &c.key, &v),
                Ok(_) => {}
                // The waiters look again themselves, now (and give up on a store that keeps
                // failing): the signal is used up.
                Err(e) => {
                    tracing::debug!(actor = %c.actor, error = %e, "could not read a signalled reply");
                    s.hub.signals_missed();
                }
            }
            drop(permit);
        });
    }
}

/// Options of [`ActorRef::send_with`].
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Sends at most once per key (within the reply TTL): a retry with the same key does not
    /// enqueue again.
    pub idempotency_key: Option<IdempotencyKey>,
    /// Delivers the message after this delay.
    pub delay: Option<Duration>,
    /// The caller's W3C trace context (an HTTP request's `traceparent`): the invocation that
    /// handles the message is a child of that span. Without it, the current `tracing` span is
    /// the parent when an OpenTelemetry layer records it; a malformed one is ignored the same
    /// way.
    pub traceparent: Option<String>,
}

/// Options of [`ActorRef::ask_with`].
#[derive(Debug, Clone, Default)]
pub struct AskOptions {
    /// A retry with the same key is not processed twice and gets the recorded reply.
    pub idempotency_key: Option<IdempotencyKey>,
    /// How long to wait (default `Config::ask_timeout`).
    pub timeout: Option<Duration>,
    /// The caller's W3C trace context (see [`SendOptions::traceparent`]).
    pub traceparent: Option<String>,
}

/// Options of [`ActorRef::deliver_event_with`].
#[derive(Debug, Clone, Default)]
pub struct EventOptions {
    /// The event's key: deliveries with one key are one event. `None` derives it from the data.
    pub key: Option<IdempotencyKey>,
    /// The caller's W3C trace context (see [`SendOptions::traceparent`]).
    pub traceparent: Option<String>,
}

/// What a send did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Enqueued durably, with this id.
    Enqueued(MessageId),
    /// A message with the same idempotency key was sent before; nothing was enqueued.
    Duplicate,
}

/// A handle to one actor known by its kind's name at run time (an HTTP ingress, a tool),
/// with messages, replies and event data as JSON values; cheap to clone. Made by
/// [`Runtime::any_actor`]. [`ActorRef`] is the typed handle, and does the same through this one.
///
/// A message is checked against the kind's message type before it is sent, so a body that
/// would never decode is refused at once ([`SendError::BadMessage`]) instead of reaching the
/// actor and being dead-lettered.
///
/// ```
/// use loom_core::runtime::{Actor, AskOptions, Context, Rejected, Runtime, SendError};
/// use serde_json::json;
///
/// struct Account;
/// impl Actor for Account {
///     const KIND: &'static str = "account";
///     type State = i64;
///     type Message = i64;
///     type Reply = i64;
///     async fn handle(&self, b: &mut i64, _: &mut Context<'_>, d: i64) -> Result<i64, Rejected> {
///         *b += d;
///         Ok(*b)
///     }
/// }
///
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let rt = Runtime::builder().memory().register_actor(Account).start().await?;
/// let alice = rt.any_actor("account", "alice")?;
/// assert_eq!(alice.ask_json(json!(5), AskOptions::default()).await?, json!(5));
/// let refused = alice.ask_json(json!("five"), AskOptions::default()).await;
/// assert!(matches!(refused, Err(loom_core::runtime::AskError::Send(SendError::BadMessage { .. }))));
/// assert!(matches!(rt.any_actor("nope", "x"), Err(SendError::UnknownKind(_))));
/// # rt.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AnyActorRef {
    rt: Runtime,
    id: ActorId,
}

impl std::fmt::Debug for AnyActorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnyActorRef").field("id", &self.id).finish()
    }
}

impl AnyActorRef {
    /// A handle to `id`, refused if its kind is neither registered with `rt` nor declared
    /// with `sends_to`.
    pub(crate) fn new(rt: Runtime, id: ActorId) -> Result<Self, SendError> {
        let r = AnyActorRef { rt, id };
        r.check_kind()?;
        Ok(r)
    }

    /// The actor's id.
    pub fn id(&self) -> &ActorId {
        &self.id
    }

    fn check_kind(&self) -> Result<(), SendError> {
        if self.rt.shared.known.contains_key(self.id.kind()) {
            Ok(())
        } else {
            Err(SendError::UnknownKind(self.id.kind().to_owned()))
        }
    }

    /// Refuses `msg` unless it decodes as the kind's message type.
    fn check_message(&self, msg: &Value) -> Result<(), SendError> {
        let kind = self
            .rt
            .shared
            .known
            .get(self.id.kind())
            .ok_or_else(|| SendError::UnknownKind(self.id.kind().to_owned()))?;
        kind.check_message(msg)
            .map_err(|error| SendError::BadMessage {
                kind: self.id.kind().to_owned(),
                error,
            })
    }

    fn envelope(&self, payload: Value, traceparent: Option<&str>) -> Result<Envelope, SendError> {
        self.check_kind()?;
        let mut env = Envelope::new(self.id.clone(), payload);
        // The caller's span (a request's `traceparent`, or the current span): the actor's
        // work joins the caller's trace; a new trace otherwise.
        env.traceparent = Some(trace::outgoing(traceparent, None));
        Ok(env)
    }

    /// Sends `msg` (checked against the kind's message type) with options; returns once it is
    /// durably in the actor's mailbox, or a duplicate of a send with the same key was found.
    pub async fn send_json(&self, msg: Value, opts: SendOptions) -> Result<Sent, SendError> {
        self.check_message(&msg)?;
        self.send_value(msg, opts).await
    }

    pub(crate) async fn send_value(
        &self,
        msg: Value,
        opts: SendOptions,
    ) -> Result<Sent, SendError> {
        if let Some(d) = opts.delay {
            crate::limits::check_delay(d).map_err(SendError::Invalid)?;
        }
        let mut env = self.envelope(msg, opts.traceparent.as_deref())?;
        let deliver_at = opts.delay.map(|d| Timestamp::now() + d);
        match opts.idempotency_key {
            None => {
                let id = env.id;
                self.rt.enqueue(env, deliver_at).await?;
                Ok(Sent::Enqueued(id))
            }
            Some(key) => {
                env.idempotency_key = Some(key.clone());
                let id = env.id;
                match self.rt.enqueue_once(env, deliver_at, &key).await? {
                    Enqueued::New(_) => Ok(Sent::Enqueued(id)),
                    Enqueued::Duplicate(_) => Ok(Sent::Duplicate),
                }
            }
        }
    }

    /// Sends `msg` (checked against the kind's message type) and waits for the reply, as
    /// [`ActorRef::ask_with`] does; the reply is the handler's, as JSON.
    pub async fn ask_json(&self, msg: Value, opts: AskOptions) -> Result<Value, AskError> {
        self.check_message(&msg)?;
        outcome(self.ask_value(msg, opts).await?)
    }

    /// Sends `msg` and waits for its recorded outcome.
    pub(crate) async fn ask_value(&self, msg: Value, opts: AskOptions) -> Result<Value, AskError> {
        let mut env = self.envelope(msg, opts.traceparent.as_deref())?;
        let key = match opts.idempotency_key {
            Some(k) => k,
            None => IdempotencyKey::new(format!("ask-{}", env.id)).map_err(SendError::from)?,
        };
        env.idempotency_key = Some(key.clone());
        let actor = env.to.clone();
        let timeout = opts.timeout.unwrap_or(self.rt.shared.config.ask_timeout);
        let started = tokio::time::Instant::now();
        // No deadline for a timeout too long to add (`Duration::MAX`: wait for ever).
        let deadline = started.checked_add(timeout);
        // The store calls too end at the deadline: a call the store leaves unanswered (a
        // stalled connection waits out its response timeout, or longer) does not outlast the
        // ask. The message may then have been enqueued or not: asking again with the key sends
        // it at most once either way.
        let timed_out = |key: &IdempotencyKey| AskError::Timeout {
            after: timeout,
            key: key.clone(),
        };
        let hub = self.rt.shared.hub.clone();
        // Dropped however the ask ends (its caller's future too), it leaves nothing in the hub.
        let mut local = hub.wait_reply(&actor, &key);
        let enqueued = within(deadline, self.rt.enqueue_once(env, None, &key))
            .await
            .ok_or_else(|| timed_out(&key))?;
        let recorded = match enqueued {
            Ok(Enqueued::Duplicate(Reservation::Completed(v))) => Some(v),
            Ok(_) => None,
            Err(e) => return Err(e.into()),
        };
        let value = match recorded {
            Some(v) => v,
            None => {
                // Since when the look for the reply has failed without a break.
                let mut lookups_failing: Option<tokio::time::Instant> = None;
                // With signals too: they may not come (a host of an earlier build, a lost
                // subscription), and then this look is what answers; but then less and less
                // often (see `SIGNALLED_LOOK_AT_MOST`).
                let every = self
                    .rt
                    .shared
                    .config
                    .poll_interval
                    .max(Duration::from_millis(5))
                    * 2;
                // The wait before the next look, and when that is.
                let mut poll = every;
                let mut look_at = started + poll;
                // Made once and again only after it fired, so that no word of missed signals
                // is lost while a look is out (tokio counts a `Notified` from when it is made).
                let mut missed = std::pin::pin!(hub.missed_signals());
                loop {
                    let left = timeout.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(timed_out(&key));
                    }
                    // A store that keeps failing cannot produce the reply: say so now instead
                    // of at the timeout.
                    if let Some(error) = self.rt.shared.health.keeps_failing(FAILING_GIVES_UP_ASK) {
                        return Err(AskError::Store { error, key });
                    }
                    tokio::select! {
                        biased;
                        // First: a reply the stopping runtime's drain recorded wins over the
                        // stop that follows it.
                        got = &mut local => match got {
                            Ok(v) => break v,
                            Err(_) => {
                                local = hub.wait_reply(&actor, &key);
                                continue;
                            }
                        },
                        _ = self.rt.shared.stopped.cancelled() => {
                            return Err(AskError::Stopped { key });
                        }
                        // Signals were missed: look soon (within `every`, at a random moment, so
                        // that the waiting asks do not all look at once), and often again.
                        _ = &mut missed => {
                            missed.set(hub.missed_signals());
                            poll = every;
                            let ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
                            let soon = tokio::time::Instant::now()
                                + Duration::from_millis(crate::seam::random_u64() % ms);
                            look_at = look_at.min(soon);
                            continue;
                        }
                        _ = tokio::time::sleep_until(deadline.map_or(look_at, |d| look_at.min(d))) => {}
                    }
                    poll = if hub.signalled() {
                        (poll * 2).min(SIGNALLED_LOOK_AT_MOST.max(every))
                    } else {
                        every
                    };
                    // The actor may run on another node: look at the recorded result. A read
                    // that fails is tried again at the next poll; one failing for longer ends
                    // the ask with the key to ask again with (the message is enqueued:
                    // `SendError::Store` would say it was not).
                    // The reply handed over here while the look is out wins over it (a look
                    // kept waiting by the store would otherwise end the ask in a timeout with
                    // its reply in hand).
                    let looked = tokio::select! {
                        biased;
                        got = &mut local => match got {
                            Ok(v) => break v,
                            Err(_) => {
                                local = hub.wait_reply(&actor, &key);
                                continue;
                            }
                        },
                        _ = self.rt.shared.stopped.cancelled() => {
                            return Err(AskError::Stopped { key });
                        }
                        looked = within(deadline, self.rt.shared.store.lookup(&actor, &key)) => {
                            looked.ok_or_else(|| timed_out(&key))?
                        }
                    };
                    match looked {
                        Ok(Some(Reservation::Completed(v))) => break v,
                        Ok(_) => lookups_failing = None,
                        Err(error) => {
                            // Signals likely failed with it: look often again.
                            poll = every;
                            let since =
                                *lookups_failing.get_or_insert_with(tokio::time::Instant::now);
                            if since.elapsed() >= FAILING_GIVES_UP_ASK {
                                return Err(AskError::Store { error, key });
                            }
                            tracing::debug!(actor = %actor, error = %error, "could not look for the reply; trying again");
                        }
                    }
                    look_at = tokio::time::Instant::now() + poll;
                }
            }
        };
        Ok(value)
    }

    /// [`ActorRef::cancel`].
    pub async fn cancel(&self, message: MessageId) -> Result<super::Cancellation, SendError> {
        self.cancel_target(super::CancelTarget::Message(message))
            .await
    }

    /// [`ActorRef::cancel_key`].
    pub async fn cancel_key(&self, key: &IdempotencyKey) -> Result<super::Cancellation, SendError> {
        self.cancel_target(super::CancelTarget::Key(key.clone()))
            .await
    }

    async fn cancel_target(
        &self,
        target: super::CancelTarget,
    ) -> Result<super::Cancellation, SendError> {
        let store = &*self.rt.shared.store;
        let found = super::admin::cancel(store, &self.id, &target).await?;
        if let super::Cancellation::Requested { message, .. } = found {
            // An invocation of this process sees it at its wait at once (or at its next wait);
            // one suspended was woken by the same write.
            self.rt.shared.hub.notify(&ActorId::cancel_signal(&message));
        }
        Ok(found)
    }

    /// [`ActorRef::deliver_event_with`]: the event `name` with `data` (any JSON), with options.
    pub async fn deliver_event_with<T: Serialize + ?Sized>(
        &self,
        name: &str,
        data: &T,
        opts: EventOptions,
    ) -> Result<Sent, SendError> {
        self.check_kind()?;
        // As `wait_event` refuses it: an event no wait could receive is not taken either.
        crate::limits::check_step_name("an event's", name).map_err(SendError::Invalid)?;
        let id = self.id.clone();
        let payload = serde_json::to_value(data).map_err(|e| SendError::Encode(e.to_string()))?;
        crate::finite::refuse_non_finite(data, &payload, "event's data")
            .map_err(SendError::Encode)?;
        let key = match opts.key {
            Some(k) => k,
            // The data's canonical JSON (object keys sorted) names it.
            None => IdempotencyKey::new(format!(
                "event-{}",
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, payload.to_string().as_bytes())
            ))?,
        };
        let lane = id.event_lane_in(name, self.rt.shared.store.partitions());
        let mut env = Envelope::new(lane.clone(), payload);
        env.traceparent = Some(trace::outgoing(opts.traceparent.as_deref(), None));
        env.idempotency_key = Some(key.clone());
        let message_id = env.id;
        // As a send: refused once the runtime shuts down, and over `max_mailbox` events of one
        // name waiting; and what the write did counts toward the store's health.
        // The lane is the store's; the caller knows the actor.
        let duplicate = self
            .rt
            .check_open_keyed(&lane, &key)
            .await
            .map_err(|e| match e {
                SendError::MailboxFull { pending, .. } => SendError::MailboxFull {
                    actor: id.clone(),
                    pending,
                },
                e => e,
            })?;
        if duplicate.is_some() {
            return Ok(Sent::Duplicate);
        }
        let r = self
            .rt
            .shared
            .store
            .enqueue_event(&env, &key, self.rt.shared.config.reply_ttl, &id)
            .await;
        self.rt.shared.health.write(&r);
        match r? {
            Enqueued::New(_) => {
                // A wait of this process gets it at once. A suspended one was made visible by
                // the same write, and the dispatchers find it at their next poll (or a store's
                // wake-up signal); activating the owner from here would cost a lease and a
                // replay for every event that wakes nothing.
                self.rt.shared.hub.notify(&lane);
                Ok(Sent::Enqueued(message_id))
            }
            Enqueued::Duplicate(_) => Ok(Sent::Duplicate),
        }
    }
}

/// A handle to one actor (`A::KIND/key`); cheap to clone.
pub struct ActorRef<A: Actor> {
    any: AnyActorRef,
    _kind: PhantomData<fn() -> A>,
}

impl<A: Actor> Clone for ActorRef<A> {
    fn clone(&self) -> Self {
        ActorRef {
            any: self.any.clone(),
            _kind: PhantomData,
        }
    }
}

impl<A: Actor> ActorRef<A> {
    pub(crate) fn new(rt: Runtime, key: &str) -> Result<Self, IdError> {
        // The kind is checked at each send, as before: a handle may be made before the kind's
        // registration is known to matter (a client of a kind another node hosts).
        Ok(ActorRef {
            any: AnyActorRef {
                rt,
                id: ActorId::new(A::KIND, key)?,
            },
            _kind: PhantomData,
        })
    }

    /// The actor's id.
    pub fn id(&self) -> &ActorId {
        &self.any.id
    }

    /// The same actor's untyped handle.
    pub fn untyped(&self) -> &AnyActorRef {
        &self.any
    }

    /// `msg` as JSON, refused if it holds a NaN or an infinity, which JSON cannot hold: the
    /// actor would dead-letter it as a message that does not decode.
    fn encode(msg: &A::Message) -> Result<Value, SendError> {
        let v = serde_json::to_value(msg).map_err(|e| SendError::Encode(e.to_string()))?;
        crate::finite::refuse_non_finite(msg, &v, "message").map_err(SendError::Encode)?;
        Ok(v)
    }

    /// Sends `msg`; returns once it is durably in the actor's mailbox.
    pub async fn send(&self, msg: A::Message) -> Result<MessageId, SendError> {
        let env = self.any.envelope(Self::encode(&msg)?, None)?;
        let id = env.id;
        self.any.rt.enqueue(env, None).await?;
        Ok(id)
    }

    /// Sends `msg` with options (idempotency key, delay). A key is held until the message is
    /// settled, then its outcome kept for `Config::reply_ttl` (rule D7).
    pub async fn send_with(&self, msg: A::Message, opts: SendOptions) -> Result<Sent, SendError> {
        self.any.send_value(Self::encode(&msg)?, opts).await
    }

    /// Sends `msg` and waits for the reply (at most `Config::ask_timeout`).
    pub async fn ask(&self, msg: A::Message) -> Result<A::Reply, AskError> {
        self.ask_with(msg, AskOptions::default()).await
    }

    /// Sends `msg` and waits for the reply, with options. With an idempotency key, asking again
    /// after a timeout or a crash does not process the message twice: it waits for, or returns,
    /// the recorded reply.
    pub async fn ask_with(&self, msg: A::Message, opts: AskOptions) -> Result<A::Reply, AskError> {
        let value = outcome(self.any.ask_value(Self::encode(&msg)?, opts).await?)?;
        serde_json::from_value(value).map_err(|e| AskError::BadReply(e.to_string()))
    }

    /// Asks that the invocation of message `message` (the id [`send`](Self::send) returned) be
    /// cancelled. Cancellation is cooperative and durable: the message is marked in the store,
    /// and its invocation's next durable wait ([`Context::sleep`](super::Context::sleep),
    /// [`wait_event`](super::Context::wait_event), an activity's backoff) ends with
    /// [`StepError::Cancelled`](super::StepError::Cancelled), on whichever node runs it: at
    /// once if it is suspended in one (the mark wakes it) or waits in this process, else when
    /// it next tries to suspend (a wait for an event after `Config::suspend_after` in memory; a
    /// wait of at most `suspend_after` in memory on another node is not told; nor is a
    /// suspended sleep in its last moments, at most 450 ms, whose end is journaled as its actor
    /// takes it back: the next wait sees the cancellation). The handler
    /// passes it on with `?` (its caller gets [`AskError::Cancelled`], the state is left as it
    /// was) or compensates first. An invocation that waits no more, or a message not yet begun
    /// that never waits, finishes as it would have.
    ///
    /// [`Cancellation::NotFound`](super::Cancellation::NotFound) if the message no longer
    /// waits in the mailbox (it finished: its caller has its outcome).
    ///
    /// ```
    /// use loom_core::IdempotencyKey;
    /// use loom_core::runtime::{
    ///     Actor, AskError, AskOptions, Cancellation, Context, Rejected, Runtime, StepError,
    /// };
    ///
    /// struct Order;
    /// impl Actor for Order {
    ///     const KIND: &'static str = "order";
    ///     type State = Vec<String>;
    ///     type Message = ();
    ///     type Reply = String;
    ///     async fn handle(&self, log: &mut Vec<String>, ctx: &mut Context<'_>, _: ()) -> Result<String, Rejected> {
    ///         match ctx.wait_event::<bool>("approved", None).await {
    ///             Ok(_) => Ok("decided".into()),
    ///             Err(StepError::Cancelled) => {
    ///                 // Compensate (an activity, a message), then end as cancelled.
    ///                 Err(Rejected::cancelled("withdrawn by the customer"))
    ///             }
    ///             Err(e) => Err(e.into()),
    ///         }
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let rt = Runtime::builder().memory().register_actor(Order).start().await?;
    /// let order = rt.actor::<Order>("o-1")?;
    /// let key = IdempotencyKey::new("checkout-o-1")?;
    /// let opts = AskOptions { idempotency_key: Some(key.clone()), ..AskOptions::default() };
    /// let caller = tokio::spawn({
    ///     let order = order.clone();
    ///     async move { order.ask_with((), opts).await }
    /// });
    /// // The caller's message waits in the mailbox once its ask has sent it.
    /// while order.cancel_key(&key).await? == Cancellation::NotFound {
    ///     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    /// }
    /// let Err(AskError::Cancelled(reason)) = caller.await? else { panic!("not cancelled") };
    /// assert_eq!(reason, "withdrawn by the customer");
    /// // Finished now: nothing left to cancel.
    /// assert_eq!(order.cancel_key(&key).await?, Cancellation::NotFound);
    /// # rt.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn cancel(&self, message: MessageId) -> Result<super::Cancellation, SendError> {
        self.any.cancel(message).await
    }

    /// [`cancel`](Self::cancel)s the invocation of the message sent with idempotency key `key`
    /// (by `send_with` or `ask_with`), if it still waits in the mailbox.
    pub async fn cancel_key(&self, key: &IdempotencyKey) -> Result<super::Cancellation, SendError> {
        self.any.cancel_key(key).await
    }

    /// Delivers the event `name` with `data` to this actor: the invocation waiting for it in
    /// `Context::wait_event` resumes with it. An event delivered before anyone waits is kept.
    ///
    /// Events are deduplicated per actor and name by their key (see
    /// [`deliver_event_with`](Self::deliver_event_with)); here the key is derived from `data`:
    /// the same name and data delivered again (a webhook retried) is one event, and the second
    /// delivery is [`Sent::Duplicate`], until `Config::reply_ttl` after a wait received it. To
    /// deliver equal data twice as two events, give each its own key.
    pub async fn deliver_event<T: Serialize + ?Sized>(
        &self,
        name: &str,
        data: &T,
    ) -> Result<Sent, SendError> {
        self.any
            .deliver_event_with(name, data, EventOptions::default())
            .await
    }

    /// Delivers an event with options: its key (an id the sender gives it, a webhook's event id
    /// say). Two deliveries with one key are one event: the second is [`Sent::Duplicate`] and
    /// reaches no wait, while the first waits to be received or until `Config::reply_ttl` after
    /// a wait received it. As a send, it fails with [`SendError::Shutdown`] once the runtime
    /// shuts down and with [`SendError::MailboxFull`] when `Config::max_mailbox` events of this
    /// name wait for the actor.
    pub async fn deliver_event_with<T: Serialize + ?Sized>(
        &self,
        name: &str,
        data: &T,
        opts: EventOptions,
    ) -> Result<Sent, SendError> {
        self.any.deliver_event_with(name, data, opts).await
    }
}

/// The reply in a recorded outcome, or the error it records.
fn outcome(value: Value) -> Result<Value, AskError> {
    let recorded: Recorded =
        serde_json::from_value(value).map_err(|e| AskError::BadReply(e.to_string()))?;
    match recorded.outcome {
        Outcome::Ok(v) => Ok(v),
        Outcome::Rejected(r) => Err(AskError::Rejected(Rejected::new(r))),
        Outcome::RejectedWithValue { reason, value } => Err(AskError::Rejected(
            Rejected::new(reason).set_value(Some(value)),
        )),
        Outcome::Failed(f) => Err(AskError::Failed(f)),
        Outcome::Cancelled(reason) => Err(AskError::Cancelled(reason)),
    }
}

/// `f`'s output, unless `deadline` (`None`: never) comes first.
async fn within<T>(
    deadline: Option<tokio::time::Instant>,
    f: impl std::future::Future<Output = T>,
) -> Option<T> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f).await.ok(),
        None => Some(f.await),
    }
}
