//! Signals between the processes sharing a store, on PostgreSQL's `LISTEN`/`NOTIFY`, as
//! Redis's `signals.rs` sends them on pub/sub:
//!
//! - **Wake-ups** (`loom_wake_<schema>`, payload the sending store's origin): after a write that
//!   makes messages due now (an enqueue, a turn's sends, a requeue, an event), so that idle
//!   dispatchers of other processes look at once instead of at their next poll
//!   ([`Mailbox::wakeups`](loom_core::Mailbox::wakeups)).
//! - **Reply signals** (`loom_done_<schema>`, payload a [`Completion`]): after a recorded result,
//!   so that an `ask` waiting for it on any process looks it up at once
//!   ([`IdempotencyStore::completions`](loom_core::IdempotencyStore::completions)).
//!
//! [`listen`] receives them. [`Notifier`] sends this store's (`schema_v11.sql`): after the
//! transaction that warrants a signal has committed, many at once, in a transaction of their
//! own that does not wait for its WAL flush. A `NOTIFY` inside the writing transaction held a
//! database-wide lock across that transaction's commit and flush, which made every batch that
//! woke anyone commit one after another. Signals are hints: a lost one (the process stopped
//! between a commit and its signal, the server was unreachable) costs the receiver latency (a
//! wake-up: the owner's next ready scan; a reply: the waiting ask's next look, at most about a
//! second away), never a message.

use std::time::Duration;

use loom_core::store::Completion;
use loom_core::{StoreError, Timestamp};
use sqlx::PgPool;
use tokio::sync::mpsc;

use crate::pe;

/// How many reply signals a slow receiver may fall behind by before it misses some (and its
/// waiters fall back to their poll).
const SIGNALS_BUFFERED: usize = 4096;

/// What the listener passes on.
pub(crate) type Listened = (
    tokio::sync::watch::Receiver<u64>,
    tokio::sync::broadcast::Sender<loom_core::store::Completion>,
    tokio_util::task::AbortOnDropHandle<()>,
);

/// `LISTEN`s on the schema's wake-up channel (`schema_v2.sql` sends on it) and counts what
/// arrives, except what this store's own sessions sent (payload `origin`): its runtime woke
/// itself; and on its reply channel (`schema_v6.sql`), passing each recorded result on.
/// `pool` is the listener's own, of one connection, so that it takes nothing from the store's.
pub(crate) async fn listen(
    pool: &PgPool,
    schema: &str,
    origin: String,
) -> Result<Listened, StoreError> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool)
        .await
        .map_err(pe)?;
    let wake = format!("loom_wake_{schema}");
    let done = format!("loom_done_{schema}");
    listener
        .listen_all([wake.as_str(), done.as_str()])
        .await
        .map_err(pe)?;
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let (done_tx, _) = tokio::sync::broadcast::channel(SIGNALS_BUFFERED);
    let signals = done_tx.clone();
    let task = tokio::spawn(async move {
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) if n.channel() == done => {
                    if let Some(c) = loom_core::store::Completion::parse(n.payload()) {
                        // An error only says that no receiver is left, which is no fault.
                        let _no_receiver = signals.send(c);
                    }
                }
                Ok(Some(n)) if n.payload() == origin => {}
                // A notification; or `None`, the connection was lost (the next call reconnects
                // and listens again, and what was sent meanwhile is gone): look either way.
                Ok(_) => tx.send_modify(|n| *n += 1),
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL notifications: listening again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok((rx, done_tx, tokio_util::task::AbortOnDropHandle::new(task)))
}

/// One signal to send.
enum Signal {
    /// Messages are due now.
    Wake,
    /// A result was recorded.
    Done(Completion),
}

/// Sends this store's signals after their transactions committed, one transaction for all
/// that queued while the last was sent. When the last clone of the store is dropped, its task
/// sends what is still queued and ends (a process that exits first loses those: receivers
/// find what they announced at their next poll, as for a `loom` command on Redis).
#[derive(Clone)]
pub(crate) struct Notifier {
    tx: mpsc::UnboundedSender<Signal>,
}

impl Notifier {
    /// Starts the sender on `pool`; `origin` is the payload of this store's wake-ups.
    pub(crate) fn start(pool: crate::sql::Bounded, schema: &str, origin: String) -> Notifier {
        let (tx, mut rx) = mpsc::unbounded_channel::<Signal>();
        let wake = format!("loom_wake_{schema}");
        let done = format!("loom_done_{schema}");
        // Detached: it ends by itself once every sender is gone and the queue is sent.
        let _detached = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut woke = false;
                let mut payloads = Vec::new();
                let mut take = |s: Signal| match s {
                    Signal::Wake => woke = true,
                    Signal::Done(c) => payloads.push(c.payload()),
                };
                take(first);
                while let Ok(s) = rx.try_recv() {
                    take(s);
                }
                let mut channels = vec![done.clone(); payloads.len()];
                if woke {
                    channels.push(wake.clone());
                    payloads.push(origin.clone());
                }
                if let Err(e) = send(&pool, channels, payloads).await {
                    // A hint lost: receivers find what it announced at their next poll.
                    tracing::warn!(error = %e, "PostgreSQL signals not sent; receivers will poll");
                }
            }
        });
        Notifier { tx }
    }

    /// Messages were made due now by a transaction that has committed.
    pub(crate) fn wake(&self) {
        // An error only means the task is gone (its runtime shut down): nobody is left to
        // signal for from here.
        let _stopped = self.tx.send(Signal::Wake);
    }

    /// Messages due at `due` (`None`: at once) were enqueued by a transaction that has
    /// committed: a wake-up if any is due now, as the server decided (undelayed, or at a time
    /// already past).
    pub(crate) fn wake_if_due(&self, due: impl IntoIterator<Item = Option<Timestamp>>) {
        let now = Timestamp::now();
        if due.into_iter().any(|at| at.is_none_or(|t| t <= now)) {
            self.wake();
        }
    }

    /// A result was recorded by a transaction that has committed.
    pub(crate) fn done(&self, completion: Completion) {
        // As in `wake`.
        let _stopped = self.tx.send(Signal::Done(completion));
    }
}

/// One statement, so one transaction, of `NOTIFY`s. It writes nothing that needs to survive a
/// crash, so its commit does not wait for the WAL flush (`set_config(…, true)` lasts until the
/// end of the statement's transaction), and holds the notify lock only briefly.
async fn send(
    pool: &crate::sql::Bounded,
    channels: Vec<String>,
    payloads: Vec<String>,
) -> Result<(), StoreError> {
    sqlx::query(
        "SELECT pg_notify(u.c, u.p) \
         FROM (SELECT set_config('synchronous_commit', 'off', true)) AS s, \
              unnest($1::text[], $2::text[]) AS u(c, p)",
    )
    .bind(channels)
    .bind(payloads)
    .execute(pool)
    .await
    .map_err(pe)?;
    Ok(())
}
