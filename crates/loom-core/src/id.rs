//! Identifiers: [`ActorId`] (`kind/key`), [`MessageId`], and the idempotency key.
//!
//! Every identifier is checked when it is built, so a value of these types is always valid:
//! stores never see a malformed id. Bad input is a typed [`IdError`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_IDEMPOTENCY_KEY_LEN, MAX_KEY_LEN, MAX_KIND_LEN};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The actor kind is empty.
    #[error("actor kind is empty")]
    EmptyKind,
    /// The actor key is empty.
    #[error("actor key is empty")]
    EmptyKey,
    /// The actor kind is longer than [`MAX_KIND_LEN`] bytes.
    #[error("actor kind is {len} bytes long; the limit is {limit}")]
    KindTooLong {
        /// Length in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The actor key is longer than [`MAX_KEY_LEN`] bytes.
    #[error("actor key is {len} bytes long; the limit is {limit}")]
    KeyTooLong {
        /// Length in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The kind holds a character outside `[A-Za-z0-9_.-]`.
    #[error("actor kind {kind:?} has the character {ch:?}; kinds use only A-Z a-z 0-9 _ . -")]
    BadKindChar {
        /// The offending kind.
        kind: String,
        /// The first character refused.
        ch: char,
    },
    /// The key holds a control character (or, for idempotency keys, whitespace).
    #[error("{what} {value:?} has the control or blank character {ch:?}")]
    BadChar {
        /// Which identifier.
        what: &'static str,
        /// The offending value.
        value: String,
        /// The first character refused.
        ch: char,
    },
    /// Kinds starting with `_` are reserved for Loom's own mailboxes.
    #[error("actor kind {0:?} starts with `_`, which is reserved for Loom")]
    ReservedKind(String),
    /// A `kind/key` string without a `/`.
    #[error("actor id {0:?} is not of the form kind/key")]
    MissingSlash(String),
    /// A message id that is not a UUID.
    #[error("message id {0:?} is not a UUID")]
    BadMessageId(String),
    /// An idempotency key that is empty.
    #[error("idempotency key is empty")]
    EmptyIdempotencyKey,
    /// An idempotency key longer than [`MAX_IDEMPOTENCY_KEY_LEN`] bytes.
    #[error("idempotency key is {len} bytes long; the limit is {limit}")]
    IdempotencyKeyTooLong {
        /// Length in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
}

/// The identity of one actor: its kind (the registered type) and its key, printed `kind/key`.
///
/// The kind is 1 to [`MAX_KIND_LEN`] bytes of `A-Z a-z 0-9 _ . -`; the key is 1 to
/// [`MAX_KEY_LEN`] bytes of UTF-8 without control characters (it may contain `/`).
///
/// ```
/// use loom_core::ActorId;
///
/// let alice = ActorId::new("account", "alice")?;
/// assert_eq!(alice.to_string(), "account/alice");
/// assert_eq!("account/alice".parse::<ActorId>()?, alice);
/// assert!(ActorId::new("account", "").is_err());
/// # Ok::<(), loom_core::IdError>(())
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ActorId {
    // `kind/key`, kept whole so that stores can use it as a key without formatting.
    full: String,
    slash: usize,
}

impl ActorId {
    /// Parses an id a store read back from its own data (a key, a column, a list). An id that
    /// does not parse there is damage, not bad input: [`StoreError::Corrupt`](crate::StoreError::Corrupt)
    /// naming `what`. Every backend reads the ids it stored as values through here (a Redis key
    /// name that is not a Loom id, met while scanning, is skipped instead).
    ///
    /// ```
    /// use loom_core::ActorId;
    ///
    /// assert_eq!(ActorId::from_stored("account/alice", "journal actor id")?.key(), "alice");
    /// let e = ActorId::from_stored("no-slash", "journal actor id").unwrap_err();
    /// assert!(e.to_string().contains("journal actor id"), "{e}");
    /// # Ok::<(), loom_core::StoreError>(())
    /// ```
    pub fn from_stored(s: &str, what: &str) -> crate::StoreResult<ActorId> {
        s.parse().map_err(|e: IdError| {
            crate::StoreError::corrupt(what, crate::codec::CodecError::Body(e.to_string()))
        })
    }

    /// Builds an id from its kind and key, checking both.
    pub fn new(kind: impl AsRef<str>, key: impl AsRef<str>) -> Result<Self, IdError> {
        let (kind, key) = (kind.as_ref(), key.as_ref());
        check_kind(kind)?;
        if kind.starts_with('_') {
            return Err(IdError::ReservedKind(kind.to_owned()));
        }
        check_key(key)?;
        Ok(Self::unchecked(kind, key))
    }

    fn unchecked(kind: &str, key: &str) -> Self {
        ActorId {
            full: format!("{kind}/{key}"),
            slash: kind.len(),
        }
    }

    /// The in-process wake-up key of the invocation of `message` for its cancellation (the
    /// runtime's hub; never stored).
    pub(crate) fn cancel_signal(message: &MessageId) -> ActorId {
        Self::unchecked("_cancel", &message.to_string())
    }

    /// The mailbox that carries events named `name` to this actor (see `Context::wait_event`).
    ///
    /// It is a *system* mailbox: its kind starts with `_`, and
    /// [`Mailbox::ready_actors`](crate::Mailbox::ready_actors) never lists it, because only the
    /// invocation waiting for the event reads it. Its key is derived from the actor and the name,
    /// so it is the same on every node.
    ///
    /// ```
    /// use loom_core::ActorId;
    ///
    /// let order = ActorId::new("order", "42")?;
    /// let lane = order.event_lane("approved");
    /// assert!(lane.is_system());
    /// assert_eq!(lane, order.event_lane("approved"));
    /// assert_ne!(lane, order.event_lane("rejected"));
    /// # Ok::<(), loom_core::IdError>(())
    /// ```
    pub fn event_lane(&self, name: &str) -> ActorId {
        let mut seed = Vec::with_capacity(self.full.len() + 1 + name.len());
        seed.extend_from_slice(self.full.as_bytes());
        seed.push(0);
        seed.extend_from_slice(name.as_bytes());
        let key = uuid::Uuid::new_v5(&LANE_NAMESPACE, &seed);
        Self::unchecked("_event", &key.to_string())
    }

    /// The event lane for `name` in a store of `partitions` partitions: in a store of several,
    /// the owner's placement hash leads the lane's key, so that the lane lives in its owner's
    /// partition (see [`crate::partition`]); in a store of one (every Redis and PostgreSQL
    /// store, and embedded stores created before partitions) it is [`event_lane`](Self::event_lane),
    /// as every earlier build named it. The runtime uses this.
    ///
    /// ```
    /// use loom_core::ActorId;
    /// use loom_core::partition::partition_of;
    ///
    /// let order = ActorId::new("order", "42")?;
    /// assert_eq!(order.event_lane_in("paid", 1), order.event_lane("paid"));
    /// let lane = order.event_lane_in("paid", 8);
    /// assert!(lane.is_system());
    /// assert_eq!(partition_of(&lane, 8), partition_of(&order, 8));
    /// # Ok::<(), loom_core::IdError>(())
    /// ```
    pub fn event_lane_in(&self, name: &str, partitions: u32) -> ActorId {
        let lane = self.event_lane(name);
        if partitions <= 1 {
            return lane;
        }
        Self::unchecked(
            "_event",
            &format!("{:016x}.{}", self.placement_hash(), lane.key()),
        )
    }

    /// This id as a store of `partitions` partitions names it, for a tool that copies messages
    /// between stores: an event lane is named differently in a store of one partition and in
    /// one of several ([`event_lane_in`](Self::event_lane_in)). A lane named for several loses
    /// its owner's hash in a store of one, and keeps it in any other of several; any other id
    /// is itself. `None` for a lane named for a store of one going to a store of several: its
    /// name does not carry its owner's hash, so it cannot be renamed.
    ///
    /// ```
    /// use loom_core::ActorId;
    ///
    /// let order = ActorId::new("order", "42")?;
    /// let lane = order.event_lane_in("paid", 8);
    /// assert_eq!(lane.renamed_for(1), Some(order.event_lane("paid")));
    /// assert_eq!(lane.renamed_for(3), Some(order.event_lane_in("paid", 3)));
    /// assert_eq!(order.event_lane("paid").renamed_for(1), Some(order.event_lane("paid")));
    /// assert_eq!(order.event_lane("paid").renamed_for(8), None);
    /// assert_eq!(order.renamed_for(8), Some(order.clone()));
    /// # Ok::<(), loom_core::IdError>(())
    /// ```
    pub fn renamed_for(&self, partitions: u32) -> Option<ActorId> {
        if self.kind() != "_event" {
            return Some(self.clone());
        }
        match self.key().split_once('.') {
            Some(_) if partitions > 1 => Some(self.clone()),
            Some((_, lane)) => Some(Self::unchecked("_event", lane)),
            None if partitions > 1 => None,
            None => Some(self.clone()),
        }
    }

    /// The hash that places this id in a partition ([`crate::partition::partition_of`]): FNV-1a
    /// of `kind/key`, except for an event lane of a partitioned store
    /// ([`event_lane_in`](Self::event_lane_in)), which carries its owner's hash in its key, and
    /// a [`partition_lease`](Self::partition_lease), whose hash is its partition: on a
    /// partitioned store the lease lives in the partition it owns, so a partition that fails
    /// takes no other partition's ownership with it.
    pub(crate) fn placement_hash(&self) -> u64 {
        if let Some((_, p)) = self.partition_lease_of() {
            return u64::from(p);
        }
        if self.kind() == "_event"
            && let Some(h) = self
                .key()
                .split_once('.')
                .and_then(|(h, _)| u64::from_str_radix(h, 16).ok())
        {
            return h;
        }
        crate::partition::fnv1a(self.full.as_bytes())
    }

    /// The lease a node holds while it owns partition `partition` of `kind` (see
    /// `runtime/ownership.rs` and [`crate::partition::owner_of`]): a system id, leased like an
    /// actor (one holder at a time, a fencing token that only grows), never sent to.
    /// [`partition_lease_of`](Self::partition_lease_of) reads it back.
    ///
    /// ```
    /// use loom_core::ActorId;
    ///
    /// let lease = ActorId::partition_lease("account", 7);
    /// assert!(lease.is_system());
    /// assert_eq!(lease.to_string(), "_partition/account.7");
    /// assert_eq!(lease.partition_lease_of(), Some(("account", 7)));
    /// // On a store of several partitions, it lives in the one it owns.
    /// assert_eq!(loom_core::partition::partition_of(&lease, 8), 7);
    /// assert_eq!(ActorId::new("account", "7")?.partition_lease_of(), None);
    /// # Ok::<(), loom_core::IdError>(())
    /// ```
    pub fn partition_lease(kind: &str, partition: u32) -> ActorId {
        Self::unchecked("_partition", &format!("{kind}.{partition}"))
    }

    /// The (kind, partition) of a [`partition_lease`](Self::partition_lease) id; `None` for any
    /// other id.
    pub fn partition_lease_of(&self) -> Option<(&str, u32)> {
        if self.kind() != "_partition" {
            return None;
        }
        let (kind, p) = self.key().rsplit_once('.')?;
        Some((kind, p.parse().ok()?))
    }

    /// True for Loom's own mailboxes (kinds starting with `_`).
    pub fn is_system(&self) -> bool {
        self.full.starts_with('_')
    }

    /// The actor kind, such as `account`.
    pub fn kind(&self) -> &str {
        &self.full[..self.slash]
    }

    /// The actor key, such as `alice`.
    pub fn key(&self) -> &str {
        &self.full[self.slash + 1..]
    }

    /// The id as `kind/key`.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

/// Namespace of event-lane ids (a fixed, random UUID).
const LANE_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6c6f_6f6d_2d65_7665_6e74_2d6c_616e_6531);

pub(crate) fn check_kind(kind: &str) -> Result<(), IdError> {
    if kind.is_empty() {
        return Err(IdError::EmptyKind);
    }
    if kind.len() > MAX_KIND_LEN {
        return Err(IdError::KindTooLong {
            len: kind.len(),
            limit: MAX_KIND_LEN,
        });
    }
    if let Some(ch) = kind
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(IdError::BadKindChar {
            kind: kind.to_owned(),
            ch,
        });
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), IdError> {
    if key.is_empty() {
        return Err(IdError::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(IdError::KeyTooLong {
            len: key.len(),
            limit: MAX_KEY_LEN,
        });
    }
    if let Some(ch) = key.chars().find(|c| c.is_control()) {
        return Err(IdError::BadChar {
            what: "actor key",
            value: key.to_owned(),
            ch,
        });
    }
    Ok(())
}

impl FromStr for ActorId {
    type Err = IdError;

    /// Parses `kind/key`. System ids (kind `_…`) parse too, so that stores and tools can read
    /// back every id they hold; [`ActorId::new`] is the constructor that refuses them.
    fn from_str(s: &str) -> Result<Self, IdError> {
        let (kind, key) = s
            .split_once('/')
            .ok_or_else(|| IdError::MissingSlash(s.to_owned()))?;
        check_kind(kind)?;
        check_key(key)?;
        Ok(Self::unchecked(kind, key))
    }
}

impl TryFrom<String> for ActorId {
    type Error = IdError;

    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<ActorId> for String {
    fn from(id: ActorId) -> String {
        id.full
    }
}

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ActorId({})", self.full)
    }
}

/// A message's unique id: a UUIDv7, so ids sort by creation time.
///
/// ```
/// use loom_core::MessageId;
///
/// let a = MessageId::new();
/// let b: MessageId = a.to_string().parse()?;
/// assert_eq!(a, b);
/// # Ok::<(), loom_core::IdError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(uuid::Uuid);

impl MessageId {
    /// A fresh UUIDv7.
    pub fn new() -> Self {
        MessageId(crate::seam::uuid_v7())
    }

    /// A message id derived from a name and a parent id: the same inputs always give the same id.
    ///
    /// The runtime uses this for messages sent from inside a handler, so that a replayed step
    /// produces the message id it produced the first time.
    pub fn derived(parent: &MessageId, name: &str) -> Self {
        MessageId(uuid::Uuid::new_v5(&parent.0, name.as_bytes()))
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> &uuid::Uuid {
        &self.0
    }
}

impl Default for MessageId {
    fn default() -> Self {
        MessageId::new()
    }
}

impl From<uuid::Uuid> for MessageId {
    fn from(u: uuid::Uuid) -> Self {
        MessageId(u)
    }
}

impl FromStr for MessageId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        uuid::Uuid::parse_str(s)
            .map(MessageId)
            .map_err(|_| IdError::BadMessageId(s.to_owned()))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

/// A caller-chosen key that makes a request idempotent: 1 to [`MAX_IDEMPOTENCY_KEY_LEN`] bytes,
/// no control characters and no whitespace.
///
/// ```
/// use loom_core::IdempotencyKey;
///
/// let k = IdempotencyKey::new("order-1234")?;
/// assert_eq!(k.as_str(), "order-1234");
/// assert!(IdempotencyKey::new("has space").is_err());
/// # Ok::<(), loom_core::IdError>(())
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Checks and wraps a key.
    pub fn new(key: impl Into<String>) -> Result<Self, IdError> {
        let key = key.into();
        if key.is_empty() {
            return Err(IdError::EmptyIdempotencyKey);
        }
        if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(IdError::IdempotencyKeyTooLong {
                len: key.len(),
                limit: MAX_IDEMPOTENCY_KEY_LEN,
            });
        }
        if let Some(ch) = key.chars().find(|c| c.is_control() || c.is_whitespace()) {
            return Err(IdError::BadChar {
                what: "idempotency key",
                value: key,
                ch,
            });
        }
        Ok(IdempotencyKey(key))
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = IdError;

    fn try_from(s: String) -> Result<Self, IdError> {
        IdempotencyKey::new(s)
    }
}

impl From<IdempotencyKey> for String {
    fn from(k: IdempotencyKey) -> String {
        k.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_at_the_edge() {
        assert_eq!(ActorId::new("", "a"), Err(IdError::EmptyKind));
        assert_eq!(ActorId::new("a", ""), Err(IdError::EmptyKey));
        assert!(matches!(
            ActorId::new("a b", "k"),
            Err(IdError::BadKindChar { ch: ' ', .. })
        ));
        assert!(matches!(
            ActorId::new("k", "a\nb"),
            Err(IdError::BadChar { ch: '\n', .. })
        ));
        assert!(matches!(
            ActorId::new("k".repeat(MAX_KIND_LEN + 1), "x"),
            Err(IdError::KindTooLong { .. })
        ));
        assert!(ActorId::new("k".repeat(MAX_KIND_LEN), "x".repeat(MAX_KEY_LEN)).is_ok());
        assert!(matches!(
            ActorId::new("k", "x".repeat(MAX_KEY_LEN + 1)),
            Err(IdError::KeyTooLong { .. })
        ));
        assert!(matches!(
            "nokey".parse::<ActorId>(),
            Err(IdError::MissingSlash(_))
        ));
        assert!(matches!(
            ActorId::new("_event", "x"),
            Err(IdError::ReservedKind(_))
        ));
    }

    #[test]
    fn keys_may_hold_slashes_and_unicode() {
        let id: ActorId = "order/2024/ünïcode".parse().unwrap();
        assert_eq!(id.kind(), "order");
        assert_eq!(id.key(), "2024/ünïcode");
    }

    #[test]
    fn serde_refuses_bad_ids() {
        let ok: ActorId = serde_json::from_str("\"a/b\"").unwrap();
        assert_eq!(ok.as_str(), "a/b");
        assert!(serde_json::from_str::<ActorId>("\"/b\"").is_err());
        assert!(serde_json::from_str::<IdempotencyKey>("\"\"").is_err());
    }

    #[test]
    fn derived_message_ids_are_stable() {
        let p = MessageId::new();
        assert_eq!(
            MessageId::derived(&p, "step-1"),
            MessageId::derived(&p, "step-1")
        );
        assert_ne!(
            MessageId::derived(&p, "step-1"),
            MessageId::derived(&p, "step-2")
        );
    }
}
