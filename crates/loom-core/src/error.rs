//! The typed errors every store returns.

use std::path::PathBuf;
use std::sync::Arc;

use crate::codec::CodecError;
use crate::entry::Seq;
use crate::id::{ActorId, IdError, MessageId};

/// Which limit an input broke; see [`crate::limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// [`crate::limits::MAX_ENTRY_BYTES`].
    EntryBytes,
    /// [`crate::limits::MAX_BATCH_ENTRIES`].
    BatchEntries,
    /// [`crate::limits::MAX_BATCH_BYTES`].
    BatchBytes,
    /// [`crate::limits::MAX_SNAPSHOT_BYTES`].
    SnapshotBytes,
    /// [`crate::limits::MAX_MESSAGE_BYTES`].
    MessageBytes,
    /// [`crate::limits::MAX_RESULT_BYTES`].
    ResultBytes,
    /// [`crate::limits::MAX_OWNER_LEN`].
    OwnerLen,
    /// The embedded store's redo log record (1 GiB): one write request's bytes, all included.
    RedoRecordBytes,
    /// [`crate::store::MAX_NODE_KINDS`]: the kinds one node announces.
    NodeKinds,
    /// [`crate::limits::MAX_JSON_DEPTH`]: how deep a record's JSON nests (the size is levels).
    JsonDepth,
}

/// A shared, cloneable cause (stores hand one failure to every caller of a group commit).
pub type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Everything a store operation can fail with.
///
/// Errors are values to act on: a [`StoreError::Conflict`] means "reload and retry", a
/// [`StoreError::Unavailable`] means "the store could not be reached; the operation may or may not
/// have happened, retry it", the others mean the request itself was refused and nothing was
/// written.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An identifier was malformed.
    #[error(transparent)]
    InvalidId(#[from] IdError),

    /// A conditional append's `expected_next` was not the journal's next seq; nothing was written.
    #[error(
        "append to {actor} expected next seq {expected}, but the journal's next seq is {actual}"
    )]
    Conflict {
        /// The journal.
        actor: ActorId,
        /// What the caller expected.
        expected: Seq,
        /// The journal's real next seq (highest + 1).
        actual: Seq,
    },

    /// An append whose entries are not numbered `expected_next, expected_next + 1, …`.
    #[error("append to {actor}: entry {index} of the batch has seq {found}, expected {expected}")]
    BatchOutOfOrder {
        /// The journal.
        actor: ActorId,
        /// Position in the batch.
        index: usize,
        /// Its seq.
        found: Seq,
        /// The seq it should have.
        expected: Seq,
    },

    /// An input over one of the limits in [`crate::limits`]; nothing was written.
    #[error("{what} is {size} over the limit of {limit} ({limit_kind:?})")]
    TooLarge {
        /// What was too large, such as `entry 12 of account/alice`.
        what: String,
        /// Its size (bytes, entries for a batch count, levels for [`Limit::JsonDepth`]).
        size: usize,
        /// The limit.
        limit: usize,
        /// Which limit.
        limit_kind: Limit,
    },

    /// A trim that would remove entries no kept snapshot covers; nothing was removed.
    #[error(
        "trim of {actor} through {through} refused: {}",
        match oldest_snapshot {
            None => "the actor has no snapshot".to_owned(),
            Some(s) => format!("the oldest kept snapshot is at {s}; a trim may not pass it"),
        }
    )]
    TrimRefused {
        /// The journal.
        actor: ActorId,
        /// The requested trim point.
        through: Seq,
        /// The oldest kept snapshot, if any.
        oldest_snapshot: Option<Seq>,
    },

    /// A snapshot at a seq the journal has not reached, or already trimmed past.
    #[error("snapshot of {actor} at seq {seq} refused: {reason}")]
    SnapshotRefused {
        /// The journal.
        actor: ActorId,
        /// The snapshot's seq.
        seq: Seq,
        /// Why.
        reason: String,
    },

    /// Entries vanished while a read was streaming them (a concurrent trim or delete): the
    /// stream stops rather than skip.
    #[error(
        "read of {actor} expected seq {expected} next but found {found}: entries were removed while reading"
    )]
    Gap {
        /// The journal.
        actor: ActorId,
        /// The seq the stream needed next.
        expected: Seq,
        /// The seq it found.
        found: Seq,
    },

    /// The server refused Loom's login, or a command its user may not run, or has no such
    /// database: a setting to fix (the URL's user or password, the user's grants), not a
    /// request to change. [Transient](Self::is_transient): a password rotated or a grant
    /// revoked under a running node comes right once it is fixed, so the runtime retries and
    /// holds its work meanwhile, and the HTTP ingress answers `503`, not the client's fault.
    /// A store's `connect` returns it at once.
    #[error("{backend} refused Loom: {message}")]
    Denied {
        /// Which backend.
        backend: &'static str,
        /// What the server said, and what to change.
        message: String,
    },

    /// A request that makes no sense, such as keeping zero snapshots.
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// Stored bytes failed their checks: corruption, or data from an unknown format.
    #[error("corrupt record ({what}): {source}")]
    Corrupt {
        /// Which record, such as `entry 12 of account/alice`.
        what: String,
        /// What is wrong with it.
        #[source]
        source: CodecError,
    },

    /// The actor's lease is held by someone else.
    #[error("lease on {actor} is held by {owner} (token {token}) for another {remaining_ms} ms")]
    LeaseHeld {
        /// The actor.
        actor: ActorId,
        /// The current holder.
        owner: String,
        /// The holder's fencing token.
        token: u64,
        /// How long the lease has left.
        remaining_ms: u64,
    },

    /// A lease that expired, or was taken over, or released: renewing it is refused.
    #[error("lease on {actor} with token {token} is no longer held")]
    LeaseLost {
        /// The actor.
        actor: ActorId,
        /// The token of the lost lease.
        token: u64,
    },

    /// A heartbeat under a node name that another process, alive, announces
    /// ([`Membership::heartbeat`](crate::store::Membership::heartbeat)): two processes were
    /// given one name. Nothing was written; the name is free once the other process leaves or
    /// its record runs out.
    #[error(
        "node name {node:?} is taken by another live process (incarnation {incarnation:016x}) for at least another {remaining_ms} ms"
    )]
    NodeTaken {
        /// The name.
        node: String,
        /// The incarnation announcing it.
        incarnation: u64,
        /// How long its record lasts unless it beats again.
        remaining_ms: u64,
    },

    /// A delivery receipt that is no longer valid (its visibility timeout ran out and the message
    /// was handed out again, or it was already acked).
    #[error("delivery of message {message_id} to {actor} is no longer leased by this receipt")]
    StaleReceipt {
        /// The recipient.
        actor: ActorId,
        /// The message.
        message_id: MessageId,
    },

    /// A dead letter that does not exist.
    #[error("no dead letter with id {0}")]
    DeadLetterNotFound(u64),

    /// Another process holds the data directory.
    #[error("data directory {} is in use by {holder}", dir.display())]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// Who holds it, as its lock file says.
        holder: String,
    },

    /// The store could not be reached, or the connection broke mid-request: the operation may or
    /// may not have taken effect, and is safe to retry (appends are conditional).
    #[error("{backend} store unavailable: {source}")]
    Unavailable {
        /// Which backend.
        backend: &'static str,
        /// The cause.
        #[source]
        source: Cause,
    },

    /// The storage engine failed (I/O error, full disk, failed commit). Nothing from the failed
    /// request was acknowledged.
    #[error("{backend} storage failed: {source}")]
    Storage {
        /// Which backend.
        backend: &'static str,
        /// The cause.
        #[source]
        source: Cause,
    },

    /// The store was closed.
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    /// Wraps a storage engine failure.
    pub fn storage(
        backend: &'static str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Storage {
            backend,
            source: Arc::new(e),
        }
    }

    /// Wraps a connection failure.
    pub fn unavailable(
        backend: &'static str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Unavailable {
            backend,
            source: Arc::new(e),
        }
    }

    /// Wraps a decoding failure of the record described by `what`.
    pub fn corrupt(what: impl Into<String>, source: CodecError) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            source,
        }
    }

    /// True for errors after which the same request may succeed if retried (the store was
    /// unreachable or failed); false for requests refused on their merits.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. } | StoreError::Storage { .. } | StoreError::Denied { .. }
        )
    }

    /// The kind of the I/O error at the root of this one, if there is one (`StorageFull` for a
    /// full disk, say), however deep it is in the chain of causes.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return Some(io.kind());
            }
            // A shared cause is an `Arc`, whose own `source` skips the error inside it.
            cause = match e.downcast_ref::<Cause>() {
                Some(shared) => Some(&**shared),
                None => e.source(),
            };
        }
        None
    }

    /// What a person can do about this error, in a sentence, where there is something to say.
    ///
    /// ```
    /// use loom_core::StoreError;
    ///
    /// let full = StoreError::storage("embedded", std::io::Error::from(std::io::ErrorKind::StorageFull));
    /// assert!(full.hint().unwrap().contains("is full: free space"));
    /// ```
    pub fn hint(&self) -> Option<&'static str> {
        if self.io_kind() == Some(std::io::ErrorKind::StorageFull) {
            return Some(
                "the disk holding the store is full: free space on it; Loom goes on by itself once writes succeed again, and nothing acknowledged was lost",
            );
        }
        match self {
            StoreError::Unavailable { .. } => Some(
                "the store cannot be reached: check the server and the network; Loom retries, and a request that failed this way may or may not have happened",
            ),
            StoreError::Storage { .. } => Some(
                "the store failed: Loom retries with backoff, and nothing acknowledged was lost; see the cause above",
            ),
            StoreError::Denied { .. } => Some(
                "the store refused Loom's login or a command: fix the user, password, database or grants in the store's URL or on the server; a running node retries meanwhile, and nothing acknowledged was lost",
            ),
            StoreError::Locked { .. } => Some(
                "another process has the data directory open: stop it, or use another directory",
            ),
            StoreError::NodeTaken { .. } => Some(
                "give each process its own node name (Config::node, or leave it to its default); `loom cluster status` lists the names in use",
            ),
            StoreError::Corrupt { .. } => Some(
                "stored data failed its checks: `loom journal verify` finds every damaged record; restore from a backup if it matters",
            ),
            _ => None,
        }
    }
}

/// Shorthand for store results.
pub type StoreResult<T> = Result<T, StoreError>;

/// An error as a person should read it: its message, and on the next line what to do about it
/// when Loom knows (a full disk, an unreachable server, another process holding the data
/// directory: see [`StoreError::hint`]), found anywhere in its chain of causes. For programs
/// that print errors (the `loom` tool, the examples); never a `Debug` dump.
///
/// ```
/// use loom_core::{StoreError, explain};
///
/// let e = StoreError::storage("embedded", std::io::Error::from(std::io::ErrorKind::StorageFull));
/// let text = explain(&e);
/// assert!(text.starts_with("embedded storage failed"));
/// assert!(text.contains("\nwhat to do: the disk holding the store is full"));
/// ```
pub fn explain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut hint = None;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(s) = c.downcast_ref::<StoreError>() {
            hint = hint.or(s.hint());
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::StorageFull
        {
            hint = StoreError::storage("", std::io::Error::from(io.kind())).hint();
        }
        cause = match c.downcast_ref::<Cause>() {
            Some(shared) => Some(&**shared),
            None => c.source(),
        };
    }
    match hint {
        Some(h) => format!("{e}\nwhat to do: {h}"),
        None => e.to_string(),
    }
}
