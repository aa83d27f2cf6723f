//! [`Mailbox`]: durable per-actor queues of messages.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::codec;
use crate::envelope::Envelope;
use crate::error::{Limit, StoreError, StoreResult};
use crate::id::{ActorId, MessageId};
use crate::limits::MAX_MESSAGE_BYTES;
use crate::time::Timestamp;

/// The most [`LeaseOptions::early`] may be: a suspended message is handed out at most this long
/// before its time.
pub const MAX_EARLY: Duration = Duration::from_secs(60);

/// How to lease a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseOptions {
    /// How long the message stays invisible to other consumers unless acked or nacked.
    pub visibility: Duration,
    /// A message already handed out this many times without an ack goes to the dead letters at
    /// the next lease instead of being handed out again (this catches a message whose handler
    /// crashes its process every time). At least 1.
    pub max_deliveries: u32,
    /// A *suspended* message ([`Mailbox::suspend`], not woken or handed out since) whose delay
    /// ends within this much is handed out now, as if its time had come: its invocation then
    /// waits out what is left of its sleep in memory, so that its handler goes on at the
    /// moment itself rather than after a lease write made then. Any other delay (a
    /// [`nack`](Mailbox::nack)'s, a message's `deliver_at`) is kept to the letter. Zero (the
    /// default) hands out nothing early.
    ///
    /// ```
    /// use std::time::Duration;
    /// use loom_core::store::LeaseOptions;
    ///
    /// let warm = LeaseOptions { early: Duration::from_millis(300), ..LeaseOptions::default() };
    /// assert!(warm.validate().is_ok());
    /// assert_eq!(LeaseOptions::default().early, Duration::ZERO);
    /// ```
    pub early: Duration,
}

impl LeaseOptions {
    /// Refuses options no backend can honour: `max_deliveries` of 0, a zero visibility timeout,
    /// `early` over [`MAX_EARLY`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use loom_core::store::LeaseOptions;
    ///
    /// assert!(LeaseOptions::default().validate().is_ok());
    /// let none = LeaseOptions { max_deliveries: 0, ..LeaseOptions::default() };
    /// assert!(none.validate().is_err());
    /// let blink = LeaseOptions { visibility: Duration::ZERO, ..LeaseOptions::default() };
    /// assert!(blink.validate().is_err());
    /// let eager = LeaseOptions { early: Duration::from_secs(61), ..LeaseOptions::default() };
    /// assert!(eager.validate().is_err());
    /// ```
    pub fn validate(&self) -> StoreResult<()> {
        if self.max_deliveries == 0 {
            return Err(StoreError::InvalidRequest(
                "max_deliveries must be at least 1".into(),
            ));
        }
        if self.early > MAX_EARLY {
            return Err(StoreError::InvalidRequest(format!(
                "early must be at most {} s, not {} ms",
                MAX_EARLY.as_secs(),
                self.early.as_millis()
            )));
        }
        super::backend::check_ttl("visibility timeout", self.visibility)
    }
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            visibility: Duration::from_secs(30),
            max_deliveries: 10,
            early: Duration::ZERO,
        }
    }
}

/// Proof of a lease on one message; needed to ack, nack or dead-letter it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The recipient.
    pub actor: ActorId,
    /// The message's position in the actor's mailbox.
    pub position: u64,
    /// The message.
    pub message_id: MessageId,
    /// Which delivery this receipt is for; a receipt from an earlier delivery is stale.
    pub delivery: u32,
}

/// A message handed out by [`Mailbox::lease`].
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The message; its `attempt` is the number of earlier deliveries.
    pub envelope: Envelope,
    /// What acks it.
    pub receipt: Receipt,
    /// The error the previous delivery was nacked with, if any.
    pub last_error: Option<String>,
}

impl Delivery {
    /// Builds a delivery from a leased message as a backend stores it: the encoded envelope,
    /// its position and its delivery count (this delivery included, so at least 1). Every
    /// backend goes through here, so a frame that does not decode or a count out of range is
    /// the same typed [`StoreError::Corrupt`] everywhere, naming the message.
    ///
    /// ```
    /// use loom_core::store::Delivery;
    /// use loom_core::{ActorId, Envelope, codec};
    ///
    /// let to = ActorId::new("account", "alice")?;
    /// let msg = Envelope::new(to.clone(), serde_json::json!({"Deposit": 5}));
    /// let frame = codec::encode(codec::RecordType::Message, &msg)?;
    /// let d = Delivery::from_frame(to.clone(), &frame, 7, 2, None)?;
    /// assert_eq!((d.envelope.attempt, d.receipt.delivery, d.receipt.position), (1, 2, 7));
    /// assert!(Delivery::from_frame(to, &frame, 7, 0, None).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_frame(
        actor: ActorId,
        frame: &[u8],
        position: u64,
        deliveries: i64,
        last_error: Option<String>,
    ) -> StoreResult<Delivery> {
        let what = || format!("message at position {position} of {actor}'s mailbox");
        let deliveries = u32::try_from(deliveries)
            .ok()
            .filter(|&d| d >= 1)
            .ok_or_else(|| {
                StoreError::corrupt(
                    what(),
                    codec::CodecError::Body(format!(
                        "a leased message with delivery count {deliveries}"
                    )),
                )
            })?;
        let mut envelope: Envelope = codec::decode(codec::RecordType::Message, frame)
            .map_err(|e| StoreError::corrupt(what(), e))?;
        envelope.attempt = deliveries - 1;
        let receipt = Receipt {
            actor,
            position,
            message_id: envelope.id,
            delivery: deliveries,
        };
        Ok(Delivery {
            envelope,
            receipt,
            last_error,
        })
    }
}

/// What waits in the mailboxes of one kind, as [`Mailbox::backlog`] counts it: the gauges an
/// operator watches (`loom_mailboxes_waiting`, `loom_mailboxes_ready`,
/// `loom_mailbox_wait_seconds`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Backlog {
    /// Mailboxes of the kind holding a message (due, delayed, out or suspended); parked ones
    /// and system mailboxes are not counted.
    pub mailboxes: u64,
    /// Of those, the ones with a message due now and none out: waiting for a node to run them.
    pub ready: u64,
    /// When the longest-waiting of the ready ones became ready; `None` if none is. A mailbox
    /// whose current message was settled is ready again from its next message's due time on
    /// the embedded store and PostgreSQL, and on Redis from the settlement (its stream does not
    /// keep due times) or an earlier due delayed message; more mail for a ready mailbox never
    /// makes it newer on any store.
    pub oldest_ready_at: Option<Timestamp>,
    /// The store's clock when it counted (the clock its ready times are on).
    pub at: Timestamp,
}

impl Backlog {
    /// How long the longest-waiting ready mailbox has waited, on the store's clock (so a node
    /// whose clock is off does not skew it); zero if none is ready.
    ///
    /// ```
    /// use std::time::Duration;
    /// use loom_core::Timestamp;
    /// use loom_core::store::Backlog;
    ///
    /// let b = Backlog {
    ///     mailboxes: 2,
    ///     ready: 1,
    ///     oldest_ready_at: Some(Timestamp::from_millis(1_000)),
    ///     at: Timestamp::from_millis(4_500),
    /// };
    /// assert_eq!(b.longest_wait(), Duration::from_millis(3_500));
    /// assert_eq!(Backlog::default().longest_wait(), Duration::ZERO);
    /// ```
    pub fn longest_wait(&self) -> Duration {
        self.oldest_ready_at
            .map_or(Duration::ZERO, |t| self.at.saturating_since(t))
    }

    /// The backlog of two partitions together: counts added, the older wait kept, the later
    /// count's time.
    ///
    /// ```
    /// use loom_core::Timestamp;
    /// use loom_core::store::Backlog;
    ///
    /// let at = |ms| Some(Timestamp::from_millis(ms));
    /// let a = Backlog { mailboxes: 3, ready: 1, oldest_ready_at: at(50), at: Timestamp::from_millis(90) };
    /// let b = Backlog { mailboxes: 2, ready: 2, oldest_ready_at: at(20), at: Timestamp::from_millis(95) };
    /// let both = a.merge(b);
    /// assert_eq!((both.mailboxes, both.ready, both.oldest_ready_at), (5, 3, at(20)));
    /// assert_eq!(both.at, Timestamp::from_millis(95));
    /// ```
    pub fn merge(self, other: Backlog) -> Backlog {
        Backlog {
            mailboxes: self.mailboxes + other.mailboxes,
            ready: self.ready + other.ready,
            oldest_ready_at: match (self.oldest_ready_at, other.oldest_ready_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            at: self.at.max(other.at),
        }
    }
}

/// A message waiting in a mailbox, as [`Mailbox::messages`] lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Waiting {
    /// Its position.
    pub position: u64,
    /// The message.
    pub envelope: Envelope,
    /// When it becomes due, if that is still ahead.
    pub deliver_at: Option<Timestamp>,
    /// True if it is handed out now (or waiting out a nack delay).
    pub out: bool,
    /// True if its invocation was asked to be cancelled ([`Mailbox::cancel`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancelling: bool,
}

/// What [`Mailbox::suspend`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspension {
    /// The message is suspended.
    Suspended,
    /// Refused, nothing written: the lane holds a message already (the event to receive).
    EventWaiting,
    /// Refused, nothing written: the message's invocation was asked to be cancelled
    /// ([`Mailbox::cancel`]); the wait ends with the cancellation instead.
    Cancelled,
}

/// A message that will not be delivered again until it is requeued.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// Its id in the dead-letter list (grows).
    pub id: u64,
    /// The message.
    pub envelope: Envelope,
    /// Why it was given up on.
    pub reason: String,
    /// How many times it was delivered.
    pub deliveries: u32,
    /// When it was given up on.
    pub at: Timestamp,
}

/// Durable per-actor FIFO queues.
///
/// Rules every backend keeps:
/// - [`enqueue`](Self::enqueue) returns only once the message is durable;
/// - per actor, messages are handed out in enqueue order among those that are due; a message
///   with `deliver_at` in the future is not due yet and does not hold up the others;
/// - at most one message per actor is out at a time: while the head is leased (or waiting out a
///   nack delay) [`lease`](Self::lease) returns `None` for that actor, so the order holds even
///   across retries;
/// - a lease that is neither acked nor nacked expires after its visibility timeout, and the
///   message is handed out again with a higher delivery count; the old receipt is then stale;
/// - a message delivered `max_deliveries` times without an ack, or dead-lettered explicitly,
///   moves to the dead-letter list with its reason; dead letters can be listed and requeued.
#[async_trait]
pub trait Mailbox: Send + Sync + 'static {
    /// Durably enqueues `msg` for `msg.to`, due now or at `deliver_at`. Returns its position in
    /// the actor's mailbox (positions grow and are never reused). A due time is kept to the
    /// millisecond up to 10^14 ms (the year 5138; Redis keeps it as a double, and its scripts
    /// write numbers to 14 digits), and [`Timestamp::MAX`] (never: a delay too long to add
    /// saturates to it) is listed back as itself ([`messages`](Self::messages)).
    async fn enqueue(&self, msg: &Envelope, deliver_at: Option<Timestamp>) -> StoreResult<u64>;

    /// Hands out the actor's next due message, if there is one and none is out.
    async fn lease(&self, actor: &ActorId, opts: LeaseOptions) -> StoreResult<Option<Delivery>>;

    /// Removes a delivered message. [`StoreError::StaleReceipt`] if the receipt is not the
    /// message's current delivery (or the message is gone).
    async fn ack(&self, receipt: &Receipt) -> StoreResult<()>;

    /// Gives a delivered message back, to be handed out again after `delay`, keeping its place at
    /// the head of the actor's queue; records `error` as the reason.
    async fn nack(&self, receipt: &Receipt, delay: Duration, error: &str) -> StoreResult<()>;

    /// Keeps a delivered message out for another `visibility` from now (for an invocation that
    /// takes long: a durable sleep, a wait for an event). [`StoreError::StaleReceipt`] if the
    /// receipt is no longer current.
    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> StoreResult<()>;

    /// Suspends a delivered message until `delay` passes or, with a `lane`, an event arrives
    /// on it, whichever comes first: as [`nack`](Self::nack) with `delay` and `reason`, and
    /// besides, the message is marked suspended (at its position and delivery count), so that
    /// the next event [`Store::enqueue_event`](crate::Store::enqueue_event) puts on `lane` for
    /// this actor, or a [`cancel`](Self::cancel) of it, makes it visible at once (a *wake-up*),
    /// if it has not been handed out again since. `lane` is one of the actor's event lanes
    /// ([`ActorId::event_lane_in`](crate::ActorId::event_lane_in)), so it lives in the actor's
    /// partition; `None` for a sleep, which only a cancellation wakes early.
    ///
    /// Refused, writing nothing (the delivery stays out), with
    /// [`Suspension::Cancelled`] if the message was asked to be cancelled, else with
    /// [`Suspension::EventWaiting`] if `lane` holds a message already (due or out): the waiter
    /// reads it instead of sleeping. The checks and the suspension are one atomic write, and so
    /// are an event's enqueue and its wake-up, and a cancellation's mark and its wake-up, so
    /// neither can slip between the waiter's last look and its suspension (no lost wake-up). A
    /// message suspends on one lane at a time: suspending it again replaces the lane.
    /// [`StoreError::StaleReceipt`] if the receipt is no longer current.
    ///
    /// `delay` counts from the call where the backend shares the caller's clock (the embedded
    /// store: a suspension queued behind other writes does not come back later for it), and
    /// from when the server runs the request where the clock is the server's (Redis,
    /// PostgreSQL: the message comes back later by the request's transit, never earlier).
    async fn suspend(
        &self,
        receipt: &Receipt,
        lane: Option<&ActorId>,
        delay: Duration,
        reason: &str,
    ) -> StoreResult<Suspension>;

    /// Asks that the invocation of message `message` in `actor`'s mailbox be cancelled: marks
    /// the message (the mark goes with it when it is acked or dead-lettered; marking it again
    /// changes nothing) and, if it is suspended ([`suspend`](Self::suspend)) and not handed out
    /// since, makes it visible at once. From then on, suspending it is refused with
    /// [`Suspension::Cancelled`]; [`messages`](Self::messages) shows it as `cancelling`. One
    /// atomic write. Returns the message's position; `None`, writing nothing, if no such
    /// message waits in the mailbox (it finished, was dead-lettered, or never came). Looks
    /// through the mailbox: it costs time in proportion to the messages waiting there.
    async fn cancel(&self, actor: &ActorId, message: MessageId) -> StoreResult<Option<u64>>;

    /// Moves a delivered message to the dead letters with `reason`; returns the dead letter's id.
    async fn dead_letter(&self, receipt: &Receipt, reason: &str) -> StoreResult<u64>;

    /// Actors of the given `kinds` whose mailbox has a message due now and none out, and that are
    /// not [parked](crate::store::Parking), at most `limit`: the actors a node hosting `kinds`
    /// should run. Within a kind, the longest-ready come first (a store that indexes them per
    /// partition: within each partition, taking from each partition in turn), and no kind's
    /// backlog hides another kind's ready actors (the result takes from each kind in turn). Mailboxes of other
    /// kinds are not looked at, however many wait. System mailboxes ([`ActorId::is_system`]) are
    /// never listed: only the invocation that waits on one reads it.
    async fn ready_actors(&self, kinds: &[&str], limit: usize) -> StoreResult<Vec<ActorId>>;

    /// [`ready_actors`](Self::ready_actors) of some partitions only: for each
    /// `(kind, partitions)` of `wanted`, the ready actors of `kind` whose
    /// [`partition_of`](crate::partition::partition_of) among `of` partitions is in
    /// `partitions`, at most `limit` in all. This is a node's scan of the partitions it owns
    /// (`runtime/ownership.rs`); `of` is
    /// [`ownership_partitions`](crate::partition::ownership_partitions) of the store's count.
    /// No backlog of a partition not asked for hides any of them, and within a kind no
    /// partition's backlog hides another's (the result takes from each in turn).
    ///
    /// The default reads each kind's whole index and keeps the partitions asked for: right,
    /// but its cost grows with the kinds' whole backlog, every scan. Stores that index
    /// ready actors per partition (Redis, PostgreSQL, an embedded store of several partitions)
    /// look only at those asked for.
    async fn ready_actors_in(
        &self,
        wanted: &[(&str, &[u32])],
        of: u32,
        limit: usize,
    ) -> StoreResult<Vec<ActorId>> {
        let kinds: Vec<&str> = wanted.iter().map(|(kind, _)| *kind).collect();
        let all = self.ready_actors(&kinds, usize::MAX).await?;
        Ok(keep_partitions(&all, wanted, of, limit))
    }

    /// The earliest time at which some message in any mailbox becomes due or visible again;
    /// `None` if every mailbox is empty.
    async fn next_due(&self) -> StoreResult<Option<Timestamp>>;

    /// What waits in the mailboxes of `kind`: the mailboxes [`ready_actors`](Self::ready_actors)
    /// would look at, how many of them are ready now, and since when the longest-waiting one is.
    /// Read from the same per-kind index as `ready_actors` (no message is read), so it costs one
    /// pass over that kind's non-empty mailboxes.
    async fn backlog(&self, kind: &str) -> StoreResult<Backlog>;

    /// A signal that another process may have enqueued a message due now, so that an idle
    /// dispatcher looks at once instead of at its next poll (PostgreSQL: `LISTEN`/`NOTIFY`).
    /// The value only counts signals; wait with `changed()`. `None`, the default, for stores
    /// that offer none: the runtime then finds such messages by polling
    /// [`ready_actors`](Self::ready_actors) every `poll_interval`. A signal may be spurious, or
    /// missed while the store reconnects; the poll stays as the safety net either way.
    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// The actors whose mailboxes the store itself filled (a partitioned store's relay moving
    /// messages between partitions), batch by batch as they arrive, so that the runtime wakes
    /// exactly them instead of scanning for ready actors. `None`, the default, for stores that
    /// fill no mailbox on their own. A receiver that falls behind gets
    /// `RecvError::Lagged` and should scan ([`ready_actors`](Self::ready_actors)) once.
    fn arrivals(&self) -> Option<tokio::sync::broadcast::Receiver<Arc<[ActorId]>>> {
        None
    }

    /// How many messages wait in the actor's mailbox (due or not, out or not).
    async fn pending(&self, actor: &ActorId) -> StoreResult<u64>;

    /// The actor's waiting messages with position greater than `after`, in position order, at
    /// most `limit` (for tools: inspecting, migrating).
    async fn messages(
        &self,
        actor: &ActorId,
        after: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<Waiting>>;

    /// Actors whose mailbox holds messages (system mailboxes included), in id order, after
    /// `after`, at most `limit`.
    async fn mailboxes(&self, after: Option<&ActorId>, limit: usize) -> StoreResult<Vec<ActorId>>;

    /// Dead letters with id greater than `after`, oldest first, at most `limit`.
    async fn dead_letters(&self, after: Option<u64>, limit: usize) -> StoreResult<Vec<DeadLetter>>;

    /// Puts a dead letter back at the end of its actor's mailbox as
    /// [`Envelope::requeued`] makes it (a new id, the same origin, no earlier attempts), and
    /// removes it from the dead letters, in one atomic write. If it carries an idempotency key,
    /// the key is held again for it (as by [`Store::enqueue_once`](crate::Store::enqueue_once)),
    /// replacing the failure recorded when it was given up: its caller gets the outcome of the
    /// requeued run. Returns its new position.
    async fn requeue_dead_letter(&self, id: u64) -> StoreResult<u64>;

    /// Deletes the dead letters with these ids; an id that is not (or no longer) a dead letter
    /// is skipped. Returns how many were deleted. Each deletion stands alone: a failure part
    /// way leaves some deleted and the rest kept, and purging the same ids again finishes the
    /// job. The ids only: a caller's idempotency key is left as it is
    /// ([`runtime::purge_dead_letters`](crate::runtime::purge_dead_letters) settles a key
    /// still held first).
    /// At most [`MAX_PURGE_IDS`](crate::limits::MAX_PURGE_IDS) ids per call.
    async fn purge_dead_letters(&self, ids: &[u64]) -> StoreResult<u64>;
}

/// Checks the ids of a [`Mailbox::purge_dead_letters`] call; every backend calls it.
pub fn check_purge(ids: &[u64]) -> StoreResult<()> {
    if ids.len() > crate::limits::MAX_PURGE_IDS {
        return Err(StoreError::InvalidRequest(format!(
            "{} dead letters to purge in one call; at most {}",
            ids.len(),
            crate::limits::MAX_PURGE_IDS
        )));
    }
    Ok(())
}

/// Checks the lanes of a [`Mailbox::suspend`] or [`Store::enqueue_event`](crate::Store::enqueue_event)
/// call: `lane` must be an event lane ([`ActorId::event_lane_in`]) in `owner`'s partition of a
/// store of `partitions`, so that the wake-up and the event are one write; every backend calls it.
pub fn check_lane(lane: &ActorId, owner: &ActorId, partitions: u32) -> StoreResult<()> {
    use crate::partition::partition_of;
    if lane.kind() != "_event" || owner.is_system() {
        return Err(StoreError::InvalidRequest(format!(
            "{lane} is not an event lane of {owner}"
        )));
    }
    if partition_of(lane, partitions) != partition_of(owner, partitions) {
        return Err(StoreError::InvalidRequest(format!(
            "event lane {lane} is not in the partition of {owner}"
        )));
    }
    Ok(())
}

/// Checks a [`Mailbox::suspend`] call and clips its reason; every backend calls it.
pub fn prepare_suspend(
    receipt: &Receipt,
    lane: Option<&ActorId>,
    reason: &str,
    partitions: u32,
) -> StoreResult<String> {
    if let Some(lane) = lane {
        check_lane(lane, &receipt.actor, partitions)?;
    }
    Ok(crate::limits::clip_reason(reason))
}

/// Checks a [`Store::enqueue_event`](crate::Store::enqueue_event) call and encodes the event;
/// every backend calls it.
pub fn prepare_event(
    msg: &Envelope,
    ttl: std::time::Duration,
    owner: &ActorId,
    partitions: u32,
) -> StoreResult<Vec<u8>> {
    crate::store::backend::check_ttl("idempotency ttl", ttl)?;
    check_lane(&msg.to, owner, partitions)?;
    prepare_message(msg)
}

/// The reason a message whose stored frame does not decode is dead-lettered with (rule D14), the
/// same on every store.
///
/// ```
/// use loom_core::StoreError;
/// use loom_core::store::backend::corrupt_frame_reason;
///
/// let e = StoreError::InvalidRequest("bad".into());
/// assert!(corrupt_frame_reason(&e).starts_with("corrupt frame: "));
/// ```
pub fn corrupt_frame_reason(error: &StoreError) -> String {
    crate::limits::clip_reason(&format!("corrupt frame: {error}"))
}

/// Rule D14 where the client decodes what the store hands out (Redis, PostgreSQL): the message
/// `mailbox` leased to `actor` at `position`, for its `deliveries`-th delivery, did not decode
/// (`error`), so it is dead-lettered at once, raw, as the embedded store does, rather than handed
/// out again at every visibility until its delivery limit while the rest of its mailbox waits.
/// `message_id` is the id the store keeps beside the frame of the message current at `position`
/// (`None` when none is current there any more). Returns whether to lease again: true once the
/// message is buried, or was settled by someone else meanwhile (no message current there, or
/// the receipt stale); false when the stored id does not parse, so it cannot be buried by it.
///
/// ```
/// # async fn f() -> Result<(), loom_core::StoreError> {
/// use loom_core::store::backend::bury_corrupt;
/// use loom_core::{ActorId, EmbeddedStore, StoreError};
///
/// let store = EmbeddedStore::in_memory()?;
/// let a = ActorId::new("order", "o-1")?;
/// let e = StoreError::InvalidRequest("a damaged frame".into());
/// // Nothing is current at position 1 any more: lease again.
/// assert!(bury_corrupt(&store, &a, 1, 1, None, &e).await?);
/// // An id that does not parse cannot bury it.
/// assert!(!bury_corrupt(&store, &a, 1, 1, Some("not an id"), &e).await?);
/// # Ok(()) }
/// ```
pub async fn bury_corrupt<M: Mailbox + ?Sized>(
    mailbox: &M,
    actor: &ActorId,
    position: u64,
    deliveries: i64,
    message_id: Option<&str>,
    error: &StoreError,
) -> StoreResult<bool> {
    let Some(message_id) = message_id else {
        return Ok(true);
    };
    let (Ok(message_id), Ok(delivery)) =
        (message_id.parse::<MessageId>(), u32::try_from(deliveries))
    else {
        tracing::error!(%actor, position, error = %error, message_id, deliveries, "a stored message does not decode, and its stored id or delivery count cannot name it to bury it");
        return Ok(false);
    };
    tracing::error!(%actor, position, error = %error, "a stored message does not decode; it goes to the dead letters");
    let receipt = Receipt {
        actor: actor.clone(),
        position,
        message_id,
        delivery,
    };
    match mailbox
        .dead_letter(&receipt, &corrupt_frame_reason(error))
        .await
    {
        Ok(_) | Err(StoreError::StaleReceipt { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}

/// The envelope of dead letter `id` from the frame its store kept, `attempt` reset (a requeued
/// message starts again). A frame that does not decode (a damaged message that its store
/// dead-lettered raw, rule D14) gives an envelope to `actor` (as the store recorded it) whose
/// payload carries the raw bytes, hex, under `corrupt_frame`, as the embedded store buries one,
/// with `message_id` if the store kept it (else an id made from `id`, the same at every
/// reading): one damaged dead letter then neither hides the others from a listing nor keeps it
/// from being inspected, requeued or purged.
///
/// ```
/// use loom_core::store::backend::dead_letter_envelope;
/// use loom_core::{ActorId, Envelope};
///
/// let to = ActorId::new("order", "o-1")?;
/// let frame = loom_core::store::backend::prepare_message(&Envelope::new(to.clone(), serde_json::json!(5)))?;
/// assert_eq!(dead_letter_envelope(1, &frame, "order/o-1", None)?.payload, serde_json::json!(5));
/// let raw = dead_letter_envelope(2, b"\x01junk", "order/o-1", None)?;
/// assert_eq!((&raw.to, &raw.payload), (&to, &serde_json::json!({ "corrupt_frame": "016a756e6b" })));
/// assert_eq!(raw.id, dead_letter_envelope(2, b"\x01junk", "order/o-1", None)?.id, "the same id every time");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn dead_letter_envelope(
    id: u64,
    frame: &[u8],
    actor: &str,
    message_id: Option<&str>,
) -> StoreResult<Envelope> {
    match codec::decode::<Envelope>(codec::RecordType::Message, frame) {
        Ok(mut envelope) => {
            envelope.attempt = 0;
            Ok(envelope)
        }
        Err(e) => {
            let what = format!("dead letter {id}");
            let to: ActorId = actor.parse().map_err(|_| StoreError::corrupt(&what, e))?;
            let raw: String = frame.iter().map(|b| format!("{b:02x}")).collect();
            let kept = message_id.and_then(|m| m.parse::<MessageId>().ok());
            Ok(Envelope {
                id: kept.unwrap_or_else(|| MessageId::from(uuid::Uuid::from_u128(u128::from(id)))),
                ..Envelope::new(to, serde_json::json!({ "corrupt_frame": raw }))
            })
        }
    }
}

/// Checks a message for [`Mailbox::enqueue`] and encodes the envelope; every backend calls it.
pub fn prepare_message(msg: &Envelope) -> StoreResult<Vec<u8>> {
    let bytes = codec::encode(codec::RecordType::Message, msg)
        .map_err(|e| StoreError::InvalidRequest(format!("message {}: {e}", msg.id)))?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(StoreError::TooLarge {
            what: format!("message {} to {}", msg.id, msg.to),
            size: bytes.len(),
            limit: MAX_MESSAGE_BYTES,
            limit_kind: Limit::MessageBytes,
        });
    }
    // One level less: the entry that invokes it nests its payload one level deeper.
    codec::check_depth(
        &bytes[codec::HEADER_LEN..],
        crate::limits::MAX_JSON_DEPTH - 1,
        || format!("message {} to {}", msg.id, msg.to),
    )?;
    Ok(bytes)
}

/// What [`Mailbox::ready_actors_in`] returns, from `all` the ready actors of its kinds (in
/// ready order): those of the partitions in `wanted`, each kind's in turn until `limit`.
pub fn keep_partitions(
    all: &[ActorId],
    wanted: &[(&str, &[u32])],
    of: u32,
    limit: usize,
) -> Vec<ActorId> {
    // Each id's partition is computed once, and each list stops at `limit`. A (kind,
    // partition) asked for twice gets its list once, in its first place.
    let mut slot = std::collections::HashMap::new();
    let mut order = Vec::new();
    for (kind, parts) in wanted {
        for p in *parts {
            let next = slot.len();
            order.push(*slot.entry((*kind, *p)).or_insert(next));
        }
    }
    let mut lists: Vec<Vec<ActorId>> = vec![Vec::new(); slot.len()];
    for id in all {
        let key = (id.kind(), crate::partition::partition_of(id, of));
        if let Some(list) = slot.get(&key).map(|i| &mut lists[*i])
            && list.len() < limit
        {
            list.push(id.clone());
        }
    }
    let mut taken = vec![false; lists.len()];
    let per_partition = order
        .into_iter()
        .map(|i| {
            if std::mem::replace(&mut taken[i], true) {
                Vec::new()
            } else {
                std::mem::take(&mut lists[i])
            }
        })
        .collect();
    interleave_partitions(per_partition, wanted, limit)
}

/// What [`Mailbox::ready_actors_in`] returns from one list per (kind, partition) of `wanted`,
/// in its order (each in ready order): each kind's partitions taken from in turn, then the
/// kinds in turn, until `limit`.
pub fn interleave_partitions(
    per_partition: Vec<Vec<ActorId>>,
    wanted: &[(&str, &[u32])],
    limit: usize,
) -> Vec<ActorId> {
    let mut lists = per_partition.into_iter();
    let per_kind = wanted
        .iter()
        .map(|(_, parts)| interleave(lists.by_ref().take(parts.len()).collect(), limit))
        .collect();
    interleave(per_kind, limit)
}

/// Takes from each kind's list in turn until `limit`: what [`Mailbox::ready_actors`] returns from
/// per-kind lists (each in ready order), so that no kind's backlog hides another's.
pub fn interleave(per_kind: Vec<Vec<ActorId>>, limit: usize) -> Vec<ActorId> {
    let mut lists: Vec<std::vec::IntoIter<ActorId>> =
        per_kind.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::new();
    while out.len() < limit {
        let before = out.len();
        for list in &mut lists {
            if out.len() >= limit {
                break;
            }
            if let Some(a) = list.next() {
                out.push(a);
            }
        }
        if out.len() == before {
            break;
        }
    }
    out
}
