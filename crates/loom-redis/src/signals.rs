//! Redis pub/sub between the processes sharing a store, as PostgreSQL's `NOTIFY` is:
//!
//! - **Reply signals** (`<prefix>:done`): the turn script (and `complete`) publishes each
//!   recorded result, so that a node whose `ask` waits for it looks it up at once
//!   ([`IdempotencyStore::completions`](loom_core::IdempotencyStore::completions)).
//! - **Wake-ups** (`<prefix>:wake`): after a write that makes messages due now in actors'
//!   mailboxes (an enqueue, a turn's sends, a requeue, an unpark), the store publishes those
//!   actors, so that the node owning each runs it at once instead of at its next ready scan
//!   ([`Mailbox::arrivals`](loom_core::Mailbox::arrivals)); after an event, its lane (an
//!   invocation waiting on it in memory, on any node, is woken). One task per store batches
//!   what is waiting into one `PUBLISH` of `origin\nactor\nactor…`. A store skips its own:
//!   the runtime that made the write wakes what it sent itself, and a wake of every send
//!   coming back would cost each of them a second look at the store. So two runtimes sharing
//!   one store object (one process) do not wake each other this way; a process exiting right
//!   after a write (a `loom` command) may not get its wake-ups out; and what a delayed message
//!   or a cancel makes due is found by the owner's scan.
//!
//! A signal is a hint, not part of the write: one lost (the connection dropped, a full queue)
//! costs latency (the waiter's poll, the owner's scan), never a message or a reply. Both
//! subscriptions start at the first call that wants them, share one task per store and its
//! clones, and subscribe again a second after their connection is lost.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::conn::Conn;
use loom_core::ActorId;
use loom_core::store::Completion;
use tokio::sync::{broadcast, mpsc};

/// How many signals a slow receiver may fall behind by before it misses some (and falls back
/// to polling).
const SIGNALS_BUFFERED: usize = 4096;

/// Wake-ups waiting to be published; more are dropped (the owners' scans find them).
const WAKES_QUEUED: usize = 65_536;

/// Most actors in one wake-up message.
const WAKES_PER_MESSAGE: usize = 512;

/// A task aborted when this is dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The signals of one store (shared by its clones).
pub(crate) struct Signals {
    /// Where to subscribe: the primary, or a cluster's nodes (a cluster delivers a `PUBLISH`
    /// to every node's subscribers; the next node is tried when one cannot be reached).
    clients: Arc<[redis::Client]>,
    conn: Conn,
    /// This store among the processes publishing wake-ups: random, so that it skips its own.
    origin: String,
    done_channel: String,
    wake_channel: String,
    done: OnceLock<(broadcast::Sender<Completion>, AbortOnDrop)>,
    arrivals: OnceLock<(broadcast::Sender<Arc<[ActorId]>>, AbortOnDrop)>,
    publisher: OnceLock<(mpsc::Sender<ActorId>, AbortOnDrop)>,
}

impl Signals {
    /// The signals of the server `clients` connect to (`conn` publishes), on the channels
    /// given; nothing is subscribed or started yet.
    pub(crate) fn new(
        clients: Vec<redis::Client>,
        conn: Conn,
        done_channel: String,
        wake_channel: String,
    ) -> Self {
        Signals {
            clients: clients.into(),
            conn,
            origin: format!("{:016x}", loom_core::seam::random_u64()),
            done_channel,
            wake_channel,
            done: OnceLock::new(),
            arrivals: OnceLock::new(),
            publisher: OnceLock::new(),
        }
    }

    /// A receiver of the reply signals, subscribing if this is the first.
    pub(crate) fn completions(&self) -> broadcast::Receiver<Completion> {
        let (tx, _) = self.done.get_or_init(|| {
            let (tx, _) = broadcast::channel(SIGNALS_BUFFERED);
            let to = tx.clone();
            let task = tokio::spawn(listen(
                self.clients.clone(),
                self.done_channel.clone(),
                "reply signals",
                move |payload| {
                    if let Some(c) = Completion::parse(&String::from_utf8_lossy(payload)) {
                        // An error only says that no receiver is left, which is no fault.
                        let _no_receiver = to.send(c);
                    }
                },
            ));
            (tx, AbortOnDrop(task))
        });
        tx.subscribe()
    }

    /// A receiver of the actors other processes woke, subscribing if this is the first.
    pub(crate) fn arrivals(&self) -> broadcast::Receiver<Arc<[ActorId]>> {
        let (tx, _) = self.arrivals.get_or_init(|| {
            let (tx, _) = broadcast::channel(SIGNALS_BUFFERED);
            let to = tx.clone();
            let origin = self.origin.clone();
            let task = tokio::spawn(listen(
                self.clients.clone(),
                self.wake_channel.clone(),
                "wake-ups",
                move |payload| {
                    let text = String::from_utf8_lossy(payload);
                    let mut lines = text.split('\n');
                    if lines.next() == Some(origin.as_str()) {
                        return;
                    }
                    // What does not parse is not a Loom wake-up: nothing to wake.
                    let ids: Arc<[ActorId]> = lines.filter_map(|l| l.parse().ok()).collect();
                    if !ids.is_empty() {
                        // An error only says that no receiver is left, which is no fault.
                        let _no_receiver = to.send(ids);
                    }
                },
            ));
            (tx, AbortOnDrop(task))
        });
        tx.subscribe()
    }

    /// Hands `actors`, whose mailboxes this process's relay filled (`relay.rs`), to this
    /// process's own receivers of [`arrivals`](Self::arrivals), which skip its own wake-ups.
    pub(crate) fn arrived_here(&self, actors: Arc<[ActorId]>) {
        if let Some((tx, _)) = self.arrivals.get() {
            // An error only says that no receiver is left, which is no fault.
            let _no_receiver = tx.send(actors);
        }
    }

    /// Publishes, soon and batched with others, that `actors` have due messages.
    pub(crate) fn wake<'a>(&self, actors: impl IntoIterator<Item = &'a ActorId>) {
        let (tx, _) = self.publisher.get_or_init(|| {
            let (tx, rx) = mpsc::channel(WAKES_QUEUED);
            let task = tokio::spawn(publish(
                self.conn.clone(),
                self.wake_channel.clone(),
                self.origin.clone(),
                rx,
            ));
            (tx, AbortOnDrop(task))
        });
        for a in actors {
            if tx.try_send(a.clone()).is_err() {
                tracing::debug!(actor = %a, "too many wake-ups queued; its owner's scan finds it");
                return;
            }
        }
    }
}

/// Publishes the wake-ups queued in `rx`, as many as are waiting in each message.
async fn publish(mut conn: Conn, channel: String, origin: String, mut rx: mpsc::Receiver<ActorId>) {
    while let Some(first) = rx.recv().await {
        let mut payload = origin.clone();
        payload.push('\n');
        payload.push_str(first.as_str());
        let mut n = 1;
        while n < WAKES_PER_MESSAGE {
            match rx.try_recv() {
                Ok(a) => {
                    payload.push('\n');
                    payload.push_str(a.as_str());
                    n += 1;
                }
                Err(_) => break,
            }
        }
        let published: Result<u64, _> = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(payload)
            .query_async(&mut conn)
            .await;
        if let Err(e) = published {
            tracing::debug!(error = %e, actors = n, "could not publish wake-ups; the owners' scans find them");
        }
    }
}

/// Subscribes to `channel` and hands each message's payload to `each`; subscribes again a
/// second after the connection is lost (what was published meanwhile is gone), through the next
/// of `clients` (one of a cluster's nodes may be down).
async fn listen(
    clients: Arc<[redis::Client]>,
    channel: String,
    what: &'static str,
    each: impl Fn(&[u8]) + Send + 'static,
) {
    use futures::StreamExt;
    for client in clients.iter().cycle() {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                Ok(()) => {
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        each(msg.get_payload_bytes());
                    }
                    tracing::warn!("Redis {what}: the connection closed; subscribing again in 1 s");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Redis {what}: cannot subscribe; trying again in 1 s")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "Redis {what}: cannot connect; trying again in 1 s")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
