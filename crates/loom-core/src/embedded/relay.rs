//! The outbox relay: how a message reaches an actor of another partition (rule D18 of
//! RELIABILITY.md).
//!
//! A turn writes only its own partition. A message it sends to an actor of the same partition
//! is enqueued by the turn itself; one to an actor of partition `q != p` is appended to `p`'s
//! [`OUTBOX`] in the same write, numbered by `p`'s outbox seq. Partition `p`'s relay (one thread
//! per partition, while the store is open) then, in a loop:
//!
//! 1. reads the outbox from the bottom, only what is durable (a message is never delivered
//!    ahead of the turn that sent it: a crash could still take that turn back);
//! 2. for each target partition `q`, in one write of `q`: enqueues each message whose seq is
//!    above `q`'s [`HIGH_WATER`] mark for `p`, and raises the mark to the last one — so a move
//!    repeated after a crash, or twice, enqueues nothing twice, however many other messages
//!    arrived in between;
//! 3. trims `p`'s outbox through what every target has taken.
//!
//! A crash between 2 and 3 leaves messages in the outbox that `q` already has: the next move
//! skips them by the mark. Messages keep their ids, delays and keys; per (sender, receiver)
//! pair they arrive in the order sent (one outbox, read in order, one write per target).
//!
//! Invariants:
//! - `HIGH_WATER[q][p] <= "outbox_seq"` of `p`: a mark never passes what `p` has numbered
//!   (`loom journal verify` checks it).
//! - Outbox seqs of `p` are gapless from the first kept to `"outbox_seq"`; only the relay of
//!   `p` removes them, from the bottom, and only through seqs every target has taken.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::trace::TraceContextExt;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::{StoreError, StoreResult};
use crate::id::ActorId;
use crate::partition::partition_of;
use crate::store::backend::{OutboxState, Outgoing, RelayStatus};
use crate::time::Timestamp;

use super::reopen::Shared;
use super::tables::{HIGH_WATER, META, OUTBOX, Tx, se};
use super::{meta_counter, read_on, write_on};

/// Outbox messages moved per pass.
const BATCH: usize = 512;

/// `META` key of the last outbox seq given.
pub(super) const OUTBOX_SEQ: &str = "outbox_seq";

/// One outbox message, as the relay moves it.
#[derive(Debug, Clone)]
pub(super) struct Moving {
    pub(super) seq: u64,
    pub(super) to: String,
    pub(super) id: u128,
    pub(super) due: u64,
    pub(super) frame: Vec<u8>,
}

/// In a turn of its partition: appends `sent` (messages to actors of other partitions, with
/// their frames) to the outbox, numbered in order.
pub(super) fn push(tx: &mut Tx<'_>, sent: &[(&Outgoing, &[u8])]) -> StoreResult<()> {
    if sent.is_empty() {
        return Ok(());
    }
    let mut seq = meta_counter(&**tx.meta.get()?, OUTBOX_SEQ)?;
    let outbox = tx.outbox.get()?;
    for (o, frame) in sent {
        seq += 1;
        // u64::MAX is "due now" in an outbox row, so a due time of never (`Timestamp::MAX`,
        // which a delay too long to add saturates to) is kept one below it, and read back as
        // never by `deliver`.
        let due = o
            .deliver_at
            .map_or(u64::MAX, |t| t.as_millis().min(u64::MAX - 1));
        outbox
            .insert(
                seq,
                (
                    o.envelope.to.as_str(),
                    o.envelope.id.as_uuid().as_u128(),
                    due,
                    *frame,
                ),
            )
            .map_err(se)?;
    }
    tx.meta.get()?.insert(OUTBOX_SEQ, seq).map_err(se)?;
    Ok(())
}

/// Messages a relay hop's span links to, at most (a trace viewer shows a few; the SDK's own
/// default limit is 128).
const HOP_LINKS: usize = 64;

/// The span of one relay hop (`from`'s outbox to partition `to`), linked to the traces of the
/// messages it moves: one hop carries many messages, so it is no message's child. The frames
/// are decoded for their `traceparent` only when an OpenTelemetry layer records the span (a
/// span only logged has no use for links).
fn hop_span(from: u32, to: usize, moving: &[Moving]) -> tracing::Span {
    let span = tracing::info_span!("loom.relay", from, to, messages = moving.len());
    if !span.is_disabled() && span.context().span().span_context().is_valid() {
        for m in moving.iter().take(HOP_LINKS) {
            // A frame that does not decode is the receiver's to report (as corrupt); the hop
            // only loses a link.
            if let Ok(env) = crate::codec::decode::<crate::envelope::Envelope>(
                crate::codec::RecordType::Message,
                &m.frame,
            ) {
                let cx = crate::runtime::trace::parent(env.traceparent.as_deref());
                let linked = cx.span().span_context().clone();
                if linked.is_valid() {
                    span.add_link(linked);
                }
            }
        }
    }
    span
}

/// In a write of the target partition: enqueues the messages of `source`'s outbox above the
/// high-water mark, raises the mark; returns the recipients of those it enqueued.
pub(super) fn deliver(
    tx: &mut Tx<'_>,
    source: u32,
    moving: &[Moving],
) -> StoreResult<Vec<ActorId>> {
    let mark = tx
        .high_water
        .get()?
        .get(source)
        .map_err(se)?
        .map_or(0, |v| v.value());
    let now = Timestamp::now().as_millis();
    let mut top = mark;
    let mut enqueued = Vec::new();
    for m in moving {
        if m.seq <= top {
            continue;
        }
        let to = ActorId::from_stored(&m.to, "outbox message recipient")?;
        let at = match m.due {
            u64::MAX => None,
            never if never == u64::MAX - 1 => Some(Timestamp::MAX),
            due => Some(Timestamp::from_millis(due)),
        };
        let id = crate::id::MessageId::from(uuid::Uuid::from_u128(m.id));
        tx.mailbox.get()?.enqueue(&to, id, &m.frame, at, now)?;
        top = m.seq;
        enqueued.push(to);
    }
    if top > mark {
        tx.high_water.get()?.insert(source, top).map_err(se)?;
    }
    Ok(enqueued)
}

/// At open, before the relays start: no partition's outbox seq may be below a mark another
/// partition holds for it (a salvaged redo log, a file restored from an older backup), or its
/// next messages would take numbers already taken and be skipped by that mark as moved. Raises
/// such a seq to the highest mark, and says so.
pub(super) fn reconcile(parts: &[&super::Inner]) -> StoreResult<()> {
    let mut marks = vec![0u64; parts.len()];
    for inner in parts {
        let txn = inner.db.begin_read().map_err(se)?;
        for item in txn.open_table(HIGH_WATER).map_err(se)?.iter().map_err(se)? {
            let (source, mark) = item.map_err(se)?;
            if let Some(m) = marks.get_mut(source.value() as usize) {
                *m = (*m).max(mark.value());
            }
        }
    }
    for (p, inner) in parts.iter().enumerate() {
        let txn = inner.db.begin_read().map_err(se)?;
        let seq = meta_counter(&txn.open_table(META).map_err(se)?, OUTBOX_SEQ)?;
        let mark = marks[p];
        if mark > seq {
            tracing::warn!(
                partition = p,
                outbox_seq = seq,
                high_water = mark,
                "a partition's outbox numbers were behind what other partitions have taken from it (a salvaged or restored file); they continue after the highest"
            );
            futures::executor::block_on(inner.writer.run(move |tx| {
                tx.meta.get()?.insert(OUTBOX_SEQ, mark).map_err(se)?;
                Ok(())
            }))?;
        }
    }
    Ok(())
}

/// Removes the outbox messages through `through`.
pub(super) fn trim(tx: &mut Tx<'_>, through: u64) -> StoreResult<()> {
    tx.outbox.get()?.remove_range(0, through).map_err(se)
}

/// Reads up to `limit` outbox messages after seq `after`.
pub(super) fn read_outbox(
    txn: &redb::ReadTransaction,
    after: u64,
    limit: usize,
) -> StoreResult<Vec<Moving>> {
    let outbox = txn.open_table(OUTBOX).map_err(se)?;
    let mut out = Vec::new();
    for item in outbox
        .range(after.saturating_add(1)..)
        .map_err(se)?
        .take(limit)
    {
        let (k, v) = item.map_err(se)?;
        let (to, id, due, frame) = v.value();
        out.push(Moving {
            seq: k.value(),
            to: to.to_owned(),
            id,
            due,
            frame: frame.to_vec(),
        });
    }
    Ok(out)
}

/// One partition's [`RelayBacklog`](crate::store::RelayBacklog): its outbox's length.
pub(super) fn backlog_of(
    txn: &redb::ReadTransaction,
    partition: u32,
) -> StoreResult<crate::store::RelayBacklog> {
    let outbox = txn.open_table(OUTBOX).map_err(se)?;
    Ok(crate::store::RelayBacklog {
        partition,
        waiting: outbox.len().map_err(se)?,
    })
}

pub(super) fn state_of(
    txn: &redb::ReadTransaction,
    partition: u32,
    partitions: u32,
) -> StoreResult<OutboxState> {
    let meta = txn.open_table(META).map_err(se)?;
    let outbox_seq = meta_counter(&meta, OUTBOX_SEQ)?;
    let outbox = txn.open_table(OUTBOX).map_err(se)?;
    let pending = outbox.len().map_err(se)?;
    let first_pending = outbox.first().map_err(se)?.map(|(k, _)| k.value());
    let mut misaddressed = 0;
    for item in outbox.iter().map_err(se)? {
        let (_, v) = item.map_err(se)?;
        match ActorId::from_stored(v.value().0, "outbox recipient") {
            Ok(to) if partition_of(&to, partitions) != partition => {}
            _ => misaddressed += 1,
        }
    }
    let mut misplaced = 0;
    let journals = txn.open_table(super::tables::JOURNAL_META).map_err(se)?;
    let mailboxes = txn.open_table(super::tables::MAILBOX_META).map_err(se)?;
    let mut placed = |key: &str| match ActorId::from_stored(key, "actor id") {
        Ok(a) if partition_of(&a, partitions) == partition => {}
        _ => misplaced += 1,
    };
    for item in journals.iter().map_err(se)? {
        placed(item.map_err(se)?.0.value());
    }
    for item in mailboxes.iter().map_err(se)? {
        placed(item.map_err(se)?.0.value());
    }
    let marks = txn.open_table(HIGH_WATER).map_err(se)?;
    let mut high_water = Vec::new();
    for item in marks.iter().map_err(se)? {
        let (k, v) = item.map_err(se)?;
        high_water.push((k.value(), v.value()));
    }
    Ok(OutboxState {
        partition,
        outbox_seq,
        pending,
        first_pending,
        high_water,
        misaddressed,
        misplaced,
        gapless: true,
    })
}

/// The relay threads of a store of several partitions; stops and joins them when dropped.
pub(super) struct Relays {
    stop: CancellationToken,
    wake: Vec<Arc<Notify>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Messages enqueued by the relays since the store opened.
    pub(super) delivered: Arc<AtomicU64>,
    /// The recipients of each move: [`Mailbox::arrivals`](crate::Mailbox::arrivals).
    pub(super) arrivals: tokio::sync::broadcast::Sender<Arc<[ActorId]>>,
    /// Test hooks: `hold` stops moves, `keep` stops trims (as a crash right after each move
    /// would). Set only through the `testing` feature's methods.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(super) hooks: Arc<Hooks>,
    /// What the relays' moves met (`Store::relay_failure`).
    pub(super) status: Arc<RelayStatus>,
}

/// What tests make the relays do (see `EmbeddedStore::hold_relays`).
#[derive(Default)]
pub(super) struct Hooks {
    pub(super) hold: AtomicBool,
    pub(super) keep: AtomicBool,
}

impl Relays {
    /// Starts one relay per partition (none for a store of one partition).
    pub(super) fn start(parts: &Arc<[Arc<Shared>]>) -> StoreResult<Relays> {
        let stop = CancellationToken::new();
        let delivered = Arc::new(AtomicU64::new(0));
        let hooks = Arc::new(Hooks::default());
        let status = Arc::new(RelayStatus::default());
        let (arrivals, _) = tokio::sync::broadcast::channel(1024);
        let mut relays = Relays {
            arrivals: arrivals.clone(),
            stop: stop.clone(),
            wake: Vec::new(),
            threads: Vec::new(),
            delivered: delivered.clone(),
            hooks: hooks.clone(),
            status: status.clone(),
        };
        if parts.len() <= 1 {
            return Ok(relays);
        }
        for p in 0..parts.len() {
            let wake = Arc::new(Notify::new());
            relays.wake.push(wake.clone());
            let relay = Relay {
                p: p as u32,
                parts: parts.clone(),
                stop: stop.clone(),
                wake,
                delivered: delivered.clone(),
                hooks: hooks.clone(),
                arrivals: arrivals.clone(),
                status: status.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("loom-embedded-relay-{p}"))
                .spawn(move || relay.run())
                .map_err(|e| StoreError::storage(super::tables::BACKEND, e))?;
            relays.threads.push(thread);
        }
        Ok(relays)
    }

    /// Tells partition `p`'s relay that its outbox has something new.
    pub(super) fn wake(&self, p: u32) {
        if let Some(w) = self.wake.get(p as usize) {
            w.notify_one();
        }
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("an embedded store relay thread panicked");
            }
        }
    }
}

/// One partition's relay.
struct Relay {
    p: u32,
    parts: Arc<[Arc<Shared>]>,
    stop: CancellationToken,
    wake: Arc<Notify>,
    delivered: Arc<AtomicU64>,
    hooks: Arc<Hooks>,
    arrivals: tokio::sync::broadcast::Sender<Arc<[ActorId]>>,
    status: Arc<RelayStatus>,
}

/// Trims of an outbox are at most this often: the relay's cursor is in memory, so a trim only
/// frees space (and bounds what is moved again after a restart, skipped by the marks).
const TRIM_EVERY: Duration = Duration::from_millis(100);

/// How long the relay sleeps when it was not woken: messages left in the outbox by an earlier
/// opening (or a move that failed) are picked up at least this often.
const IDLE: Duration = Duration::from_secs(1);

impl Relay {
    fn run(self) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(partition = self.p, error = %e, "could not start the relay of an embedded store partition; its messages to other partitions wait in its outbox until the store is opened again");
                self.status.failed(Some(self.p), &e);
                return;
            }
        };
        rt.block_on(self.serve());
    }

    async fn serve(&self) {
        // Relayed through this seq (in memory: the marks make a repeat harmless).
        let mut after = 0;
        // Trimmed through this seq, and when.
        let (mut trimmed, mut trimmed_at) = (0, std::time::Instant::now());
        let mut backoff = Duration::from_millis(50);
        let mut failing = false;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            match self.pass(after).await {
                Ok(Some(through)) => {
                    after = through;
                    backoff = Duration::from_millis(50);
                    self.status.moved(self.p);
                    if failing {
                        failing = false;
                        tracing::info!(partition = self.p, "the relay moves messages again");
                    }
                    // Under load, trims at most every TRIM_EVERY.
                    if trimmed_at.elapsed() >= TRIM_EVERY {
                        trimmed = self.trim_through(after, trimmed).await;
                        trimmed_at = std::time::Instant::now();
                    }
                }
                Ok(None) => {
                    self.status.moved(self.p);
                    // Idle: trim what was moved, then wait.
                    trimmed = self.trim_through(after, trimmed).await;
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(IDLE) => {}
                    }
                }
                Err(e) => {
                    if !failing {
                        failing = true;
                        tracing::warn!(partition = self.p, error = %e, "the relay could not move messages to other partitions; they wait in the outbox and it tries again");
                    }
                    self.status.failed(Some(self.p), &e);
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Every target has what was moved through `moved`: the outbox lets it go. Returns what is
    /// trimmed now (`trimmed` if the trim failed: those messages are moved again later, if
    /// ever, and skipped by the marks).
    async fn trim_through(&self, moved: u64, trimmed: u64) -> u64 {
        if moved <= trimmed || self.hooks.keep.load(Ordering::Acquire) {
            return trimmed;
        }
        let source = &self.parts[self.p as usize];
        match write_on(source, move |tx| trim(tx, moved)).await {
            Ok(()) => moved,
            Err(e) => {
                tracing::warn!(partition = self.p, error = %e, "could not trim the outbox after a move; it is trimmed after the next one");
                trimmed
            }
        }
    }

    /// Moves one batch; returns the last seq moved, or `None` if the outbox had nothing after
    /// `after`.
    async fn pass(&self, after: u64) -> StoreResult<Option<u64>> {
        if self.hooks.hold.load(Ordering::Acquire) {
            return Ok(None);
        }
        let source = &self.parts[self.p as usize];
        let batch = read_on(source, move |txn| read_outbox(txn, after, BATCH)).await?;
        let Some(last) = batch.last().map(|m| m.seq) else {
            return Ok(None);
        };
        let n = self.parts.len() as u32;
        let mut by_target: Vec<Vec<Moving>> = vec![Vec::new(); n as usize];
        for m in batch {
            match ActorId::from_stored(&m.to, "outbox message recipient") {
                Ok(to) => by_target[partition_of(&to, n) as usize].push(m),
                // Damage: a turn only writes recipients it parsed. Kept from blocking the
                // outbox for good; `loom journal verify` counts such rows while they last.
                Err(e) => {
                    tracing::error!(partition = self.p, seq = m.seq, error = %e, "an outbox message with a damaged recipient is dropped")
                }
            }
        }
        // Every target is tried, so that one failed partition holds up only its own messages
        // in this batch; the batch is moved again (the marks skip what arrived) until all took it.
        let mut failed = None;
        for (q, moving) in by_target.into_iter().enumerate() {
            if moving.is_empty() {
                continue;
            }
            let p = self.p;
            let span = hop_span(p, q, &moving);
            match write_on(&self.parts[q], move |tx| deliver(tx, p, &moving))
                .instrument(span)
                .await
            {
                Ok(to) if !to.is_empty() => {
                    self.delivered.fetch_add(to.len() as u64, Ordering::Relaxed);
                    // No receiver (no runtime on this store) is fine: nobody is to be woken.
                    let _ = self.arrivals.send(to.into());
                }
                Ok(_) => {}
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(Some(last)),
        }
    }
}
