//! The outbox relay of a PostgreSQL store of 32 partitions (rule D18 of RELIABILITY.md; the
//! design is DESIGN.md's "How a message travels", as on a partitioned embedded or Redis store).
//!
//! A turn writes only its actor's partition `p`: a message to an actor of the same partition it
//! enqueues itself, one to an actor of partition `q != p` it writes as a row of the `outbox`
//! table, part `p`, in the same transaction (`turn_relayed` in `schema_v12.sql`). The relay then
//! calls `relay(parts, limit)`, which, in one transaction, for each partition asked (under a
//! transaction-scoped advisory lock on it, so one move of an outbox at a time across every
//! process; a partition another relay is moving is skipped, and looked at again shortly):
//! deletes up to `limit` rows from the bottom, in seq order, and enqueues each into its
//! recipient's mailbox. The delete and the enqueue commit together, so a message is moved exactly
//! once, however many relays run and wherever one crashes; no high-water marks are needed.
//!
//! Every process with the store open runs a relay: one whose turn wrote an outbox moves it at
//! once, and every relay looks at every outbox every [`SWEEP`], so what a crashed process left is
//! moved by the others. Messages keep their ids, delays and frames; per (sender, receiver) pair
//! they arrive in the order sent (a sender's later turn draws a greater seq).
//!
//! Invariant (`loom journal verify`, [`PostgresStore::outbox_states`]): an outbox holds only
//! messages addressed to other partitions' actors.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loom_core::partition::partition_of;
use loom_core::store::backend::{OutboxState, RelayStatus};
use loom_core::{ActorId, StoreError, StoreResult};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::signals::Notifier;
use crate::{PostgresStore, pe};

/// Messages moved per partition per call.
pub(crate) const BATCH: i32 = 128;

/// How often every relay looks at every outbox (for what another process left).
pub(crate) const SWEEP: Duration = Duration::from_millis(500);

/// How long partitions held back wait before a sweep tries them again, at first; the wait
/// doubles each time they are held back again, up to [`BLOCKED_MAX`].
const BLOCKED_FIRST: Duration = Duration::from_millis(500);
const BLOCKED_MAX: Duration = Duration::from_secs(8);

/// One store's relay, shared by its clones; its task stops when the last clone is dropped.
pub(crate) struct Relay {
    inner: Arc<Inner>,
    _task: AbortOnDropHandle<()>,
}

struct Inner {
    pool: crate::sql::Bounded,
    relay: String,
    waiting: String,
    signals: Notifier,
    /// The actors whose mailboxes a move filled (`Mailbox::arrivals`).
    arrivals: broadcast::Sender<Arc<[ActorId]>>,
    /// Partitions whose outboxes this process wrote since the relay last looked.
    dirty: Mutex<BTreeSet<u32>>,
    wake: Notify,
    /// What its moves met (`Store::relay_failure`).
    status: RelayStatus,
}

impl Relay {
    /// Starts the relay of the store in `schema`.
    pub(crate) fn start(
        pool: crate::sql::Bounded,
        schema: &str,
        partitions: u32,
        signals: Notifier,
    ) -> Arc<Relay> {
        let (arrivals, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            pool,
            // The schema was checked at connect to be [a-z0-9_]: the only text put into these.
            relay: format!("SELECT part, actor, moved, due_now FROM {schema}.relay($1, $2)"),
            // One probe of the primary key per partition: a long outbox is not read through.
            waiting: format!(
                "SELECT p FROM generate_series(0, {last}) AS p \
                 WHERE (SELECT 1 FROM {schema}.outbox AS o WHERE o.part = p LIMIT 1) IS NOT NULL",
                last = partitions.saturating_sub(1)
            ),
            signals,
            arrivals,
            dirty: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
            status: RelayStatus::default(),
        });
        let task = AbortOnDropHandle::new(tokio::spawn(run(inner.clone())));
        Arc::new(Relay { inner, _task: task })
    }

    /// After a turn of partition `p` wrote its outbox and committed: moves it soon.
    pub(crate) fn pushed(&self, p: u32) {
        self.inner
            .dirty
            .lock()
            .expect("relay dirty set poisoned")
            .insert(p);
        self.inner.wake.notify_one();
    }

    /// Since when and why its moves fail, if they do.
    pub(crate) fn failure(&self) -> Option<loom_core::store::RelayFailure> {
        self.inner.status.failure()
    }

    /// The actors whose mailboxes this store's relay fills, batch by batch.
    pub(crate) fn arrivals(&self) -> broadcast::Receiver<Arc<[ActorId]>> {
        self.inner.arrivals.subscribe()
    }
}

async fn run(inner: Arc<Inner>) {
    // The sweep keeps its pace however often pushes wake the loop in between: it goes first
    // when both are due, and a drain that pushes keep busy stops for it (`Inner::drain`).
    let mut next_sweep = Instant::now();
    // Partitions held back (a recipient's row held past a call's lock timeout, or a move that
    // fails alone), each with when a sweep tries it again and how long it waited: the wait on
    // such a partition holds up every partition of its call, so it is paid seldom (from
    // BLOCKED_FIRST, doubling each time it is held back again, up to BLOCKED_MAX), not at
    // every push or sweep.
    let mut held: BTreeMap<i32, (Instant, Duration)> = BTreeMap::new();
    loop {
        let swept = tokio::select! {
            biased;
            () = tokio::time::sleep_until(next_sweep) => true,
            () = inner.wake.notified() => false,
        };
        let mut parts: BTreeSet<i32> =
            std::mem::take(&mut *inner.dirty.lock().expect("relay dirty set poisoned"))
                .into_iter()
                .map(|p| p as i32)
                .collect();
        // Held-back partitions tried again now: by a sweep whose look found what waits, once
        // their time has come (or comes before the next sweep would).
        let mut released = BTreeSet::new();
        if swept {
            match sqlx::query_scalar::<_, i32>(sqlx::AssertSqlSafe(inner.waiting.as_str()))
                .fetch_all(&inner.pool)
                .await
            {
                Ok(waiting) => {
                    inner.status.looked(|p| waiting.contains(&(p as i32)));
                    parts.extend(waiting);
                    let soon = Instant::now() + SWEEP / 2;
                    released = held
                        .iter()
                        .filter(|(_, (at, _))| *at <= soon)
                        .map(|(p, _)| *p)
                        .collect();
                }
                Err(e) => {
                    let e = pe(e);
                    tracing::warn!(error = %e, "relay: could not read which outboxes hold messages; trying again in {SWEEP:?}");
                    inner.status.failed(None, &e);
                }
            }
            // After the look, however long it took: the drain gets its time.
            next_sweep = Instant::now() + SWEEP;
        }
        let mut blocked: BTreeSet<i32> = held
            .keys()
            .filter(|p| !released.contains(p))
            .copied()
            .collect();
        inner.drain(parts, &mut blocked, next_sweep).await;
        let now = Instant::now();
        for p in released {
            match held.get(&p) {
                // Held back again when tried: it waits longer.
                Some((_, wait)) if blocked.contains(&p) => {
                    let wait = (*wait * 2).min(BLOCKED_MAX);
                    held.insert(p, (now + wait, wait));
                }
                // Moved, or emptied by another process meanwhile.
                _ => {
                    held.remove(&p);
                }
            }
        }
        for p in blocked {
            held.entry(p)
                .or_insert((now + BLOCKED_FIRST, BLOCKED_FIRST));
        }
    }
}

/// Why a call of `relay` failed, and whether for want of the server (a lost connection, no
/// connection in time, a server shutting down, or a server refusing Loom's login) rather than
/// something of its own transaction.
struct Failed {
    error: StoreError,
    unreachable: bool,
}

/// What one call of `relay` did.
#[derive(Default)]
struct Moved {
    /// Partitions that gave a full batch (and may hold more).
    full: BTreeSet<i32>,
    /// Partitions another relay was moving (its advisory lock was held).
    busy: BTreeSet<i32>,
    /// Partitions held back for a later sweep: a recipient's mailbox row was held past the
    /// call's `lock_timeout`.
    blocked: BTreeSet<i32>,
}

impl Inner {
    /// Moves everything in `parts`' outboxes, [`BATCH`] a partition per call, until each call
    /// leaves them empty, taking in what turns push meanwhile. A partition another relay is
    /// moving is looked at again shortly (what committed after that relay's read is this one's
    /// to move); one whose recipient's row is held elsewhere joins `blocked` and waits for a
    /// later sweep (`run`), as does a partition whose move fails alone; a call that cannot reach
    /// the server leaves everything for the next sweep or push. Once the sweep is due (`until`),
    /// it leaves what is left to it after the call in hand: turns pushing without a pause would
    /// otherwise keep it draining, and the sweep (what other processes left, the blocked
    /// partitions) waiting, for as long as they came.
    async fn drain(&self, mut parts: BTreeSet<i32>, blocked: &mut BTreeSet<i32>, until: Instant) {
        let mut busy_rounds = 0;
        // At least one call, however late: a sweep that took past `until` itself still moves.
        let mut first = true;
        loop {
            parts.retain(|p| !blocked.contains(p));
            if parts.is_empty() {
                return;
            }
            if !std::mem::take(&mut first) && Instant::now() >= until {
                // Moved by the sweep, which takes in the dirty set.
                self.dirty
                    .lock()
                    .expect("relay dirty set poisoned")
                    .extend(parts.iter().map(|p| *p as u32));
                return;
            }
            let moved = match self.call(&parts).await {
                Ok(m) => {
                    // Those another relay moves, or whose recipient's row is held, did not
                    // move here (and did not fail).
                    for p in parts
                        .iter()
                        .filter(|p| !m.busy.contains(p) && !m.blocked.contains(p))
                    {
                        self.status.moved(*p as u32);
                    }
                    m
                }
                // One call moves every partition asked in one transaction, so a row only one
                // of them cannot move (a recipient whose mailbox refuses it) fails them all:
                // each is tried alone, and only those that fail alone wait. Not when the
                // server could not be reached: each call would wait for it again.
                Err(f) if parts.len() > 1 && !f.unreachable => {
                    tracing::debug!(partitions = ?parts, error = %f.error, "relay: a move of several outboxes failed; moving each alone");
                    let (m, failed, unreachable) = self.alone(&parts).await;
                    // Tried again by a later sweep, not at every push meanwhile.
                    blocked.extend(failed);
                    blocked.extend(&m.blocked);
                    if unreachable {
                        return;
                    }
                    m
                }
                Err(f) => {
                    tracing::warn!(partitions = ?parts, error = %f.error, "relay: could not move outbox messages; they wait in the outbox and are tried again by a later push or sweep");
                    for p in &parts {
                        self.status.failed(Some(*p as u32), &f.error);
                    }
                    // A partition that failed alone waits for a later sweep, unless its failure
                    // passes (the server out of reach, a deadlock, a timeout): the next push or
                    // sweep tries again.
                    if !f.unreachable && !matches!(f.error, StoreError::Unavailable { .. }) {
                        blocked.extend(&parts);
                    }
                    return;
                }
            };
            if !moved.blocked.is_empty() {
                tracing::debug!(partitions = ?moved.blocked, "relay: a recipient's mailbox row is held elsewhere; its partition is tried again by a later sweep");
                blocked.extend(&moved.blocked);
            }
            parts = moved.full;
            parts.extend(
                std::mem::take(&mut *self.dirty.lock().expect("relay dirty set poisoned"))
                    .into_iter()
                    .map(|p| p as i32),
            );
            if !moved.busy.is_empty() {
                busy_rounds += 1;
                // Past a second the sweep looks again anyway.
                if busy_rounds <= 50 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    parts.extend(moved.busy);
                }
            }
        }
    }

    /// Moves each of `parts` by a call of its own, noting each one's success or failure; what
    /// they did together, the partitions whose own move failed, and whether the server could
    /// not be reached. Once it cannot, the rest are not tried (each would wait for it again):
    /// they count as failed, and the next push or sweep tries them.
    async fn alone(&self, parts: &BTreeSet<i32>) -> (Moved, BTreeSet<i32>, bool) {
        let mut all = Moved::default();
        let mut failed = BTreeSet::new();
        let mut unreachable: Option<StoreError> = None;
        for &p in parts {
            if let Some(e) = &unreachable {
                self.status.failed(Some(p as u32), e);
                continue;
            }
            match self.call(&BTreeSet::from([p])).await {
                Ok(m) => {
                    if !m.busy.contains(&p) && !m.blocked.contains(&p) {
                        self.status.moved(p as u32);
                    }
                    all.full.extend(m.full);
                    all.busy.extend(m.busy);
                    all.blocked.extend(m.blocked);
                }
                Err(f) => {
                    tracing::warn!(partition = p, error = %f.error, "relay: could not move an outbox's messages; they wait in the outbox and are tried again by a later push or sweep");
                    self.status.failed(Some(p as u32), &f.error);
                    if f.unreachable {
                        unreachable = Some(f.error);
                    } else if !matches!(f.error, StoreError::Unavailable { .. }) {
                        // A failure that passes (a deadlock, a timeout) is not held back.
                        failed.insert(p);
                    }
                }
            }
        }
        (all, failed, unreachable.is_some())
    }

    /// One call of `relay` for `parts`; once it has committed, wakes what it moved.
    async fn call(&self, parts: &BTreeSet<i32>) -> Result<Moved, Failed> {
        let asked: Vec<i32> = parts.iter().copied().collect();
        let rows: Vec<(i32, Option<String>, i32, bool)> =
            sqlx::query_as(sqlx::AssertSqlSafe(self.relay.as_str()))
                .bind(asked)
                .bind(BATCH)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| {
                    let unreachable = crate::unreachable(&e);
                    let error = pe(e);
                    Failed {
                        // A refused login refuses every call alike: not tried partition by
                        // partition (a login per partition, which lockout tools count).
                        unreachable: unreachable || matches!(error, StoreError::Denied { .. }),
                        error,
                    }
                })?;
        let mut counts: BTreeMap<i32, i64> = BTreeMap::new();
        let mut out = Moved::default();
        let mut woken = BTreeSet::new();
        let mut due_now = false;
        for (part, actor, n, due) in rows {
            let Some(actor) = actor else {
                if n < 0 {
                    out.blocked.insert(part);
                } else {
                    out.busy.insert(part);
                }
                continue;
            };
            *counts.entry(part).or_default() += i64::from(n);
            due_now |= due;
            match ActorId::from_stored(&actor, "relayed message recipient") {
                // An event lane is read by the invocation waiting on it, not activated.
                Ok(to) if !to.is_system() => {
                    woken.insert(to);
                }
                Ok(_) => {}
                // Moved all the same (the mailbox is keyed by the text); the ready scan finds
                // it if it is ever an actor.
                Err(e) => {
                    tracing::warn!(recipient = %actor, error = %e, "relay: moved a message to a recipient that does not parse")
                }
            }
        }
        // The call has committed: a message due now wakes the dispatchers of every process
        // (`signals.rs`), and this one's runtime hears whom it filled.
        if due_now {
            self.signals.wake();
        }
        if !woken.is_empty() {
            let woken: Vec<ActorId> = woken.into_iter().collect();
            // Nobody listening is fine: the ready scan finds them.
            let _unheard = self.arrivals.send(woken.into());
        }
        out.full = counts
            .into_iter()
            .filter(|(_, n)| *n >= i64::from(BATCH))
            .map(|(p, _)| p)
            .collect();
        Ok(out)
    }
}

impl PostgresStore {
    /// What each partition's outbox holds, for
    /// [`check_outboxes`](loom_core::store::backend::check_outboxes) (`loom journal verify`)
    /// and tests; empty for a store of one partition. The seqs come from one sequence for the
    /// whole store and are not gapless (`gapless` is false; see `schema_v12.sql`), and no
    /// high-water marks exist: a move deletes what it enqueues in one transaction. `misplaced`
    /// is always 0: an actor's rows are keyed by the actor, so none can lie in another's
    /// partition.
    pub async fn outbox_states(&self) -> StoreResult<Vec<OutboxState>> {
        let n = self.partitions;
        if n == 1 {
            return Ok(Vec::new());
        }
        let last: i64 = sqlx::query_scalar(
            self.q("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {s}.outbox_seq"),
        )
        .fetch_one(&self.pool)
        .await
        .map_err(pe)?;
        let rows: Vec<(i32, i64, String)> =
            sqlx::query_as(self.q("SELECT part, seq, actor FROM {s}.outbox ORDER BY part, seq"))
                .fetch_all(&self.pool)
                .await
                .map_err(pe)?;
        let mut out: Vec<OutboxState> = (0..n)
            .map(|p| OutboxState {
                partition: p,
                outbox_seq: last.max(0) as u64,
                pending: 0,
                first_pending: None,
                high_water: Vec::new(),
                misaddressed: 0,
                misplaced: 0,
                gapless: false,
            })
            .collect();
        for (part, seq, actor) in rows {
            let Some(s) = usize::try_from(part).ok().and_then(|p| out.get_mut(p)) else {
                return Err(crate::sql::unexpected(format!(
                    "an outbox row of partition {part}, in a store of {n}"
                )));
            };
            s.pending += 1;
            s.first_pending.get_or_insert(seq.max(0) as u64);
            if actor
                .parse::<ActorId>()
                .map_or(true, |to| partition_of(&to, n) == s.partition)
            {
                s.misaddressed += 1;
            }
        }
        Ok(out)
    }

    /// Each partition's outbox depth ([`loom_core::Store::relay_backlog`]); empty for a store
    /// of one partition.
    pub(crate) async fn backlog_of_outboxes(
        &self,
    ) -> StoreResult<Vec<loom_core::store::RelayBacklog>> {
        if self.partitions == 1 {
            return Ok(Vec::new());
        }
        let counts: Vec<(i32, i64)> =
            sqlx::query_as(self.q("SELECT part, count(*) FROM {s}.outbox GROUP BY part"))
                .fetch_all(&self.pool)
                .await
                .map_err(pe)?;
        let counts: BTreeMap<i32, i64> = counts.into_iter().collect();
        Ok((0..self.partitions)
            .map(|p| loom_core::store::RelayBacklog {
                partition: p,
                waiting: counts.get(&(p as i32)).copied().unwrap_or(0).max(0) as u64,
            })
            .collect())
    }
}
