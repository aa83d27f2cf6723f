//! What an operator does to actors from outside the runtime (`loom`), with the runtime's own
//! rules: dead-lettering the messages that wait in a mailbox.

use std::time::Duration;

use serde_json::Value;

use crate::error::StoreError;
use crate::id::{ActorId, IdempotencyKey, MessageId};
use crate::store::backend::{Record, Settle, Turn};
use crate::store::{LeaseOptions, Reservation, Store};

use super::record::{Outcome, Recorded};

/// Which invocation [`cancel`] is to cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelTarget {
    /// The invocation of this message (the id `ActorRef::send` returned).
    Message(MessageId),
    /// The invocation of the message sent with this idempotency key.
    Key(IdempotencyKey),
}

/// What [`cancel`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Cancellation {
    /// The message waits in the actor's mailbox (running, suspended, or not begun) and is now
    /// marked to be cancelled (marking it again changes nothing): its invocation ends with
    /// [`StepError::Cancelled`](super::StepError::Cancelled) at its next durable wait (a
    /// sleep, a wait for an event, an activity's backoff), at once if it is suspended in one.
    /// An invocation that waits no more finishes as it would have.
    Requested {
        /// The message.
        message: MessageId,
        /// Its position in the mailbox.
        position: u64,
    },
    /// No such message waits in the actor's mailbox: it finished (its outcome is what its
    /// caller got), was dead-lettered, or never came. Nothing was written.
    NotFound,
}

/// Asks that the invocation of `target` on `actor` be cancelled
/// ([`Mailbox::cancel`](crate::Mailbox::cancel)): what `ActorRef::cancel` and `loom cancel` do.
/// A key is looked up among the messages waiting in the mailbox (their envelopes carry it),
/// so it costs time in proportion to them, as the cancellation itself does.
pub async fn cancel(
    store: &dyn Store,
    actor: &ActorId,
    target: &CancelTarget,
) -> Result<Cancellation, StoreError> {
    let message = match target {
        CancelTarget::Message(id) => *id,
        CancelTarget::Key(key) => {
            let mut after = None;
            loop {
                let page = store.messages(actor, after, 256).await?;
                if let Some(w) = page
                    .iter()
                    .find(|w| w.envelope.idempotency_key.as_ref() == Some(key))
                {
                    break w.envelope.id;
                }
                match page.last() {
                    Some(w) => after = Some(w.position),
                    None => return Ok(Cancellation::NotFound),
                }
            }
        }
    };
    Ok(match store.cancel(actor, message).await? {
        Some(position) => Cancellation::Requested { message, position },
        None => Cancellation::NotFound,
    })
}

/// Why [`bury_mailbox`] did not (finish to) dead-letter an actor's messages.
#[derive(Debug, thiserror::Error)]
pub enum BuryError {
    /// The store failed or refused (a node holds the actor, say: it is running it).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The actor is parked: its mailbox is held; unpark it first (which lets its current message
    /// run), or fix and unpark it.
    #[error("{0} is parked; its mailbox is held until it is unparked")]
    Parked(ActorId),
}

/// Moves every message waiting in `actor`'s mailbox to the dead letters with `reason`, as the
/// runtime would give them up: each in one turn that dead-letters it and records the failure
/// under its idempotency key, if it has one (so a caller retrying gets the failure, not a
/// resend). For messages of a kind no node hosts, which the runtime leaves waiting.
///
/// Refused with [`StoreError::LeaseHeld`] naming the node while a node owns the actor's
/// partition (that node runs the actor's messages: stop it first). Then takes the actor's own
/// lease as `owner` ([`StoreError::LeaseHeld`] if another tool holds it) and fences every turn
/// with it: while it holds that lease no node writes for the actor (the store refuses writes
/// fenced by the partition's lease then, rule D8), so it never races a node that takes the
/// partition meanwhile. Returns how many
/// messages it moved. Only messages due now are moved: one sent with a delay stays until it is
/// due (run it again then). The failure is kept under the key for the default
/// [`Config::reply_ttl`](super::Config::reply_ttl).
pub async fn bury_mailbox(
    store: &dyn Store,
    actor: &ActorId,
    reason: &str,
    owner: &str,
) -> Result<u64, BuryError> {
    if store.parked(actor).await?.is_some() {
        return Err(BuryError::Parked(actor.clone()));
    }
    refuse_while_owned(store, actor).await?;
    let mut lease = store.acquire(actor, owner, TOOL_LEASE).await?;
    let result = bury_all(store, actor, reason, &mut lease, TOOL_LEASE).await;
    release_tool_lease(store, &lease).await;
    result
}

/// How long a tool's own lease on an actor ([`bury_mailbox`]) lasts; it
/// is released when the tool is done, and runs out by itself if the tool dies.
const TOOL_LEASE: Duration = Duration::from_secs(30);

/// How long [`delete_journal`] takes a partition's lease for: as long as a node's default
/// lease ttl, so that a tool that dies holding it keeps the partition's actors waiting no
/// longer than a node's crash would. Its fenced delete fails rather than outlast it.
const PARTITION_HOLD: Duration = Duration::from_secs(10);

/// Refused with [`StoreError::LeaseHeld`] naming the node while a node owns `actor`'s
/// partition: that node runs the actor, and may hold its state in memory.
async fn refuse_while_owned(store: &dyn Store, actor: &ActorId) -> Result<(), StoreError> {
    match store.holder(&partition_lease(store, actor)).await? {
        Some(node) => Err(StoreError::LeaseHeld {
            actor: actor.clone(),
            owner: node.owner,
            remaining_ms: node
                .expires_at
                .as_millis()
                .saturating_sub(crate::Timestamp::now().as_millis()),
            token: node.token,
        }),
        None => Ok(()),
    }
}

/// The lease of the partition `actor` runs in: the one its node holds.
fn partition_lease(store: &dyn Store, actor: &ActorId) -> ActorId {
    let parts = crate::partition::ownership_partitions(store.partitions());
    ActorId::partition_lease(actor.kind(), crate::partition::partition_of(actor, parts))
}

async fn release_tool_lease(store: &dyn Store, lease: &crate::store::Lease) {
    if let Err(e) = store.release(lease).await {
        let actor = &lease.actor;
        tracing::warn!(%actor, error = %e, "could not release the lease; it expires on its own");
    }
}

/// Deletes `actor`'s journal and snapshots ([`Journal::delete`](crate::Journal::delete): its
/// seqs stay used) as an operator does (`loom journal delete`), never under a node that runs
/// the actor: such a node holds the actor's state in memory, and its next turn would append to
/// the emptied journal a change of a state that no replay can rebuild.
///
/// It takes the lease of the actor's partition as `owner`, as a node taking the partition
/// would: refused with [`StoreError::LeaseHeld`] naming the node while a node owns it (stop
/// it first, or wait for the kind to have no host). While the tool holds it no node can take
/// the partition, and a node that ran the actor before holds a lease this take outdated, whose
/// writes the store refuses (rule D8): no node's turn lands on the emptied journal. The delete
/// is fenced by that lease, so one that reaches the store after the lease ran out (a stalled
/// connection) deletes nothing ([`StoreError::LeaseLost`]), and so is refused while another
/// tool holds the actor's own lease ([`bury_mailbox`] burying its messages). Then it releases
/// the lease.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use loom_core::runtime::delete_journal;
/// use loom_core::{ActorId, EmbeddedStore, Entry, EntryKind, JournalStore};
///
/// let store = EmbeddedStore::in_memory()?;
/// let actor = ActorId::new("acct", "alice")?;
/// let failed = EntryKind::Failed { error: "x".into(), dead_lettered: false };
/// store.append(&actor, 1, &[Entry::new(1, failed)]).await?;
/// // No node owns acct/alice's partition: the tool takes its lease and deletes.
/// delete_journal(&store, &actor, "loom-cli").await?;
/// let info = store.info(&actor).await?;
/// assert_eq!((info.len(), info.highest), (0, 1), "no entry left; its seqs stay used");
/// # Ok(())
/// # }
/// ```
pub async fn delete_journal(
    store: &dyn Store,
    actor: &ActorId,
    owner: &str,
) -> Result<(), StoreError> {
    // The partition's lease, not a look at who holds it: a look and a delete are two steps,
    // and a node taking the partition between them could load the actor before the delete and
    // write on top of it after. Taken, it keeps every node off the partition until released.
    let held = match store
        .acquire(&partition_lease(store, actor), owner, PARTITION_HOLD)
        .await
    {
        Ok(held) => held,
        // Said of the actor, as every refusal of a tool's is: the node named runs it.
        Err(StoreError::LeaseHeld {
            owner,
            remaining_ms,
            token,
            ..
        }) => {
            return Err(StoreError::LeaseHeld {
                actor: actor.clone(),
                owner,
                remaining_ms,
                token,
            });
        }
        Err(e) => return Err(e),
    };
    let result = store.delete(actor, Some(&held)).await;
    release_tool_lease(store, &held).await;
    result
}

/// Buries `actor`'s due messages one by one under the tool's `lease` (taken for `ttl`), which it
/// renews every third of `ttl` as it goes: a mailbox of thousands takes longer than one ttl,
/// and a lease run out would fail the next burial half-way.
async fn bury_all(
    store: &dyn Store,
    actor: &ActorId,
    reason: &str,
    lease: &mut crate::store::Lease,
    ttl: Duration,
) -> Result<u64, BuryError> {
    let opts = LeaseOptions {
        visibility: Duration::from_secs(30),
        max_deliveries: u32::MAX,
        ..LeaseOptions::default()
    };
    let reply_ttl = super::Config::default().reply_ttl;
    let mut buried = 0;
    let mut renewed = std::time::Instant::now();
    loop {
        if renewed.elapsed() >= ttl / 3 {
            let asked = std::time::Instant::now();
            *lease = store.renew(lease, ttl).await?;
            renewed = asked;
        }
        let Some(d) = store.lease(actor, opts).await? else {
            break;
        };
        let recorded = Recorded {
            message_id: d.envelope.id,
            outcome: Outcome::Failed(reason.to_owned()),
        };
        let value = serde_json::to_value(&recorded).unwrap_or(Value::Null);
        let highest = store.highest_seq(actor).await?;
        let key = d.envelope.idempotency_key.clone();
        let turn = Turn {
            fence: Some(&*lease),
            settle: Some(Settle::DeadLetter(&d.receipt, reason)),
            record: key.as_ref().map(|k| Record {
                actor,
                key: k,
                result: &value,
                ttl: reply_ttl,
            }),
            ..Turn::append(actor, highest + 1, &[])
        };
        store.commit_turn(turn).await?;
        buried += 1;
    }
    Ok(buried)
}

/// Deletes the dead letters given up on before `before` (all of them if `None`), oldest first,
/// a page at a time ([`Mailbox::purge_dead_letters`](crate::Mailbox::purge_dead_letters));
/// returns how many. A caller asking again with a purged message's idempotency key learns that
/// it failed: a key the runtime settled keeps its recorded failure until it expires, and a key
/// still held (a message the store buried by itself, which only a requeue would have settled)
/// is settled first with the failure "purged", kept for `reply_ttl`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), loom_core::StoreError> {
/// use loom_core::runtime::purge_dead_letters;
/// use loom_core::{EmbeddedStore, Timestamp};
///
/// let store = EmbeddedStore::in_memory()?;
/// let week_ago = Timestamp::from_millis(Timestamp::now().as_millis() - 7 * 24 * 3600 * 1000);
/// let reply_ttl = std::time::Duration::from_secs(24 * 3600);
/// assert_eq!(purge_dead_letters(&store, Some(week_ago), reply_ttl).await?, 0);
/// # Ok(())
/// # }
/// ```
pub async fn purge_dead_letters(
    store: &dyn Store,
    before: Option<crate::Timestamp>,
    reply_ttl: Duration,
) -> Result<u64, StoreError> {
    let mut purged = 0;
    let mut after = None;
    loop {
        let page = store
            .dead_letters(after, crate::limits::MAX_PURGE_IDS)
            .await?;
        let Some(last) = page.last() else {
            return Ok(purged);
        };
        after = Some(last.id);
        let doomed: Vec<_> = page
            .iter()
            .filter(|d| before.is_none_or(|b| d.at < b))
            .collect();
        for d in &doomed {
            settle_purged(store, d, reply_ttl).await?;
        }
        let ids: Vec<u64> = doomed.iter().map(|d| d.id).collect();
        if !ids.is_empty() {
            purged += store.purge_dead_letters(&ids).await?;
        }
    }
}

/// Deletes the dead letters with these ids (any number; an id that is not a dead letter is
/// skipped), settling a key still held as [`purge_dead_letters`] does for each that can be
/// read. One that cannot (a frame that does not decode, which makes listing fail on some
/// stores) is deleted all the same; its key, unreadable with it, is left as it is.
pub async fn purge_dead_letter_ids(
    store: &dyn Store,
    ids: &[u64],
    reply_ttl: Duration,
) -> Result<u64, StoreError> {
    for &id in ids {
        let one = store.dead_letters(id.checked_sub(1), 1).await;
        match one {
            Ok(page) => {
                if let Some(d) = page.first().filter(|d| d.id == id) {
                    settle_purged(store, d, reply_ttl).await?;
                }
            }
            Err(e @ StoreError::Corrupt { .. }) => {
                tracing::warn!(id, error = %e, "dead letter does not decode; deleting it without settling its key");
            }
            Err(e) => return Err(e),
        }
    }
    let mut purged = 0;
    for chunk in ids.chunks(crate::limits::MAX_PURGE_IDS) {
        purged += store.purge_dead_letters(chunk).await?;
    }
    Ok(purged)
}

/// Settles the idempotency key of a dead letter about to be purged, if it is still held.
async fn settle_purged(
    store: &dyn Store,
    d: &crate::store::DeadLetter,
    reply_ttl: Duration,
) -> Result<(), StoreError> {
    let (to, Some(key)) = (&d.envelope.to, &d.envelope.idempotency_key) else {
        return Ok(());
    };
    // A pending key does not say whose it is: after this dead letter's record expired, a new
    // message may have taken the key and wait in the mailbox. Its key is its own.
    let mut after = None;
    loop {
        let page = store.messages(to, after, 1000).await?;
        let Some(last) = page.last() else { break };
        if page
            .iter()
            .any(|w| w.envelope.idempotency_key.as_ref() == Some(key))
        {
            return Ok(());
        }
        after = Some(last.position);
    }
    if let Some(Reservation::Pending { .. }) = store.lookup(to, key).await? {
        let recorded = Recorded {
            message_id: d.envelope.id,
            outcome: Outcome::Failed(crate::limits::clip_reason(&format!(
                "purged from the dead letters, where it went: {}",
                d.reason
            ))),
        };
        let value = serde_json::to_value(&recorded).map_err(|e| {
            StoreError::InvalidRequest(format!("failure record does not encode: {e}"))
        })?;
        store.complete(to, key, &value, reply_ttl).await?;
    }
    Ok(())
}

/// What an actor's kept entries and snapshots take: as JSON frames, and encoded as this build
/// writes them now ([`codec::encode_sized`](crate::codec::encode_sized): compressed where that
/// is on and pays). The second is an estimate of what they take stored: a store keeps the
/// frames as they were written (plain by a build before compression, or with it off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct JournalBytes {
    /// Bytes as plain JSON frames.
    pub json: u64,
    /// Bytes as this build encodes them.
    pub encoded: u64,
    /// Records this build stores compressed.
    pub compressed_records: u64,
}

impl JournalBytes {
    /// Both counts added.
    pub fn sum(self, o: JournalBytes) -> JournalBytes {
        JournalBytes {
            json: self.json + o.json,
            encoded: self.encoded + o.encoded,
            compressed_records: self.compressed_records + o.compressed_records,
        }
    }
}

/// Reads every kept entry and snapshot of `actor` and measures it ([`JournalBytes`]).
pub async fn journal_bytes(store: &dyn Store, actor: &ActorId) -> Result<JournalBytes, StoreError> {
    use crate::codec::{self, RecordType};
    use futures::TryStreamExt;
    let mut b = JournalBytes::default();
    let mut add = |e: codec::Encoded| {
        b.json += e.plain_len as u64;
        b.encoded += e.frame.len() as u64;
        b.compressed_records += u64::from(e.is_compressed());
    };
    let encode_err = |e: codec::CodecError| StoreError::InvalidRequest(e.to_string());
    let mut entries = store.read(actor, crate::store::SeqRange::all());
    while let Some(e) = entries.try_next().await? {
        add(codec::encode_sized(RecordType::Entry, &e, true).map_err(encode_err)?);
    }
    for seq in store.info(actor).await?.snapshots {
        if let Some(s) = store.load_snapshot(actor, seq).await? {
            add(codec::encode_sized(RecordType::Snapshot, &s, true).map_err(encode_err)?);
        }
    }
    Ok(b)
}

/// The store's parked actors counted per kind, paged through. Each parked actor's messages
/// wait for `loom parked unpark`, out of every kind's backlog: `loom cluster status` and the
/// `loom_parked_actors` gauge show these counts beside it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use loom_core::{ActorId, EmbeddedStore, Park, Parking};
/// let store = EmbeddedStore::in_memory()?;
/// let a = ActorId::new("account", "alice")?;
/// store.park(&a, &Park::new("node-a", "a bug"), None).await?;
/// let counts = loom_core::runtime::parked_per_kind(&store).await?;
/// assert_eq!(counts.get("account"), Some(&1));
/// # Ok(()) }
/// ```
pub async fn parked_per_kind(
    store: &dyn Store,
) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
    const PAGE: usize = 1000;
    let mut counts = std::collections::BTreeMap::new();
    let mut after: Option<ActorId> = None;
    loop {
        let page = store.parked_actors(after.as_ref(), PAGE).await?;
        for (a, _) in &page {
            *counts.entry(a.kind().to_owned()).or_default() += 1;
        }
        match page.last() {
            Some((a, _)) if page.len() == PAGE => after = Some(a.clone()),
            _ => return Ok(counts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LeaseManager;
    use crate::{EmbeddedStore, Envelope, Mailbox};

    /// A burial that outlasts its tool lease's ttl renews the lease as it goes: thousands of
    /// messages under a lease of 300 ms, all buried. Before, the first burial after the lease
    /// ran out failed with `LeaseLost` half-way (as `loom mailbox bury` of a mailbox of
    /// thousands did after its 30 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burial_longer_than_its_lease_renews_the_lease() {
        let store = EmbeddedStore::in_memory().expect("store");
        let a = ActorId::new("acct", "long").expect("id");
        let n = 4000u64;
        for i in 0..n {
            store
                .enqueue(&Envelope::new(a.clone(), serde_json::json!(i)), None)
                .await
                .expect("enqueue");
        }
        let ttl = Duration::from_millis(300);
        let start = std::time::Instant::now();
        let mut lease = store.acquire(&a, "tool", ttl).await.expect("lease");
        let buried = bury_all(&store, &a, "test", &mut lease, ttl)
            .await
            .expect("bury");
        assert_eq!(buried, n);
        assert_eq!(store.pending(&a).await.expect("pending"), 0);
        // Else the case proves nothing: the lease had to outlive its first ttl several times.
        assert!(
            start.elapsed() > ttl * 3,
            "{n} burials took {:?}",
            start.elapsed()
        );
    }
}
