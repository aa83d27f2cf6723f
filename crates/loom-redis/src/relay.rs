//! The outbox relay of a Redis store of several partitions (rule D18 of RELIABILITY.md; the
//! design is DESIGN.md's "How a message travels", as on a partitioned embedded store).
//!
//! A turn writes only its actor's partition `p`: a message to an actor of the same partition it
//! enqueues itself, one to an actor of partition `q != p` it appends to `p`'s outbox
//! (`P:{_p.<p>}:ob`, a stream with ids `<outbox seq>-0`, numbered by `P:{_p.<p>}:obm`) in the
//! same script (`turn` and `ob_push` in `loom.lua`). The relay then, for each partition with
//! messages waiting:
//!
//! 1. reads the outbox from the bottom, [`BATCH`] at a time (what a script wrote is durable
//!    once it answered, under `appendfsync always`: nothing is moved ahead of its turn);
//! 2. for each target partition `q`, in seq order, one `relay_move` script in `q`: enqueues
//!    each message whose seq is above `q`'s high-water mark for `p` and raises the mark — so a
//!    move repeated after a crash, or made twice by two nodes' relays, enqueues nothing twice
//!    (the pass reads each target's mark once and sends only what is above it);
//! 3. trims `p`'s outbox through the last seq read (`XTRIM MINID`), which every target has now
//!    taken. A target whose move fails holds up only its own messages: the pass goes on with
//!    the others (and the pages after, skipping the failed target's), and trims only up to the
//!    first message the failed target has not taken. While it fails, the next passes read on
//!    from where the last one stopped (a backlog held up behind it is not read again at every
//!    pass), and try the failed target again (at the next pass, then every half [`SWEEP`])
//!    with the first page of its own messages; once it takes them, the next pass reads the
//!    outbox from its bottom again.
//!
//! Every process with the store open runs a relay: one that made a turn's outbox message moves
//! it at once, and every relay looks at every outbox every [`SWEEP`], so what a crashed
//! process left is moved by the others. Two relays moving one outbox at once are safe (each
//! move of `q` covers a run of seqs above its mark, and the mark skips what another already
//! moved), only wasted work. Messages keep their ids, delays and keys; per
//! (sender, receiver) pair they arrive in the order sent.
//!
//! Invariants: `hw(q)[p] <= obm(p).s` (a mark never passes what `p` numbered); an outbox holds
//! a gapless run of seqs ending at `obm(p).s`, addressed only to other partitions' actors; only
//! a relay trims it, from the bottom, through seqs every target has taken.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::conn::Conn;
use loom_core::partition::partition_of;
use loom_core::store::backend::RelayStatus;
use loom_core::{ActorId, StoreError, StoreResult};
use redis::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::keys::Keys;
use crate::resp::*;
use crate::signals::{AbortOnDrop, Signals};
use crate::{Scripts, re};

/// Outbox messages read per pass.
pub(crate) const BATCH: usize = 512;

/// Most bytes of message frames in one `relay_move` call (a target's share of a pass is cut
/// into several calls above it; messages are up to 1 MiB each).
const MOVE_BYTES: usize = 4 << 20;

/// How often every relay looks at every outbox (for what another process left).
pub(crate) const SWEEP: Duration = Duration::from_millis(500);

/// One store's relay, shared by its clones; its task stops when the last clone is dropped.
pub(crate) struct Relay {
    inner: Arc<Inner>,
    _task: AbortOnDrop,
}

struct Inner {
    conn: Conn,
    keys: Keys,
    scripts: &'static Scripts,
    signals: Arc<Signals>,
    /// Partitions whose outboxes this process wrote since the relay last looked.
    dirty: Mutex<BTreeSet<u32>>,
    wake: Notify,
    /// What its moves met (`Store::relay_failure`).
    status: RelayStatus,
    /// Per outbox whose moves to some target failed: where the next drain goes on from.
    behind: Mutex<BTreeMap<u32, Behind>>,
}

/// What a drain of an outbox leaves for the next while some of its targets' moves fail.
struct Behind {
    /// Each failed target, with the lowest seq of this outbox it has not taken.
    failed: BTreeMap<u32, u64>,
    /// The latest of their failures.
    failure: StoreError,
    /// The last seq read: the next drain reads on from just after it.
    read_to: u64,
    /// When the failed targets are tried again.
    probe_at: Instant,
}

/// One outbox message, as the relay moves it.
struct Moving {
    seq: u64,
    to: ActorId,
    id: Vec<u8>,
    due: Vec<u8>,
    frame: Vec<u8>,
}

impl Relay {
    /// Starts the relay of a store of `keys.partitions()` partitions.
    pub(crate) fn start(
        conn: Conn,
        keys: Keys,
        scripts: &'static Scripts,
        signals: Arc<Signals>,
    ) -> Arc<Relay> {
        let inner = Arc::new(Inner {
            conn,
            keys,
            scripts,
            signals,
            dirty: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
            status: RelayStatus::default(),
            behind: Mutex::new(BTreeMap::new()),
        });
        let task = tokio::spawn(run(inner.clone()));
        Arc::new(Relay {
            inner,
            _task: AbortOnDrop(task),
        })
    }

    /// Since when and why its moves fail, if they do.
    pub(crate) fn failure(&self) -> Option<loom_core::store::RelayFailure> {
        self.inner.status.failure()
    }

    /// After a turn of partition `p` wrote its outbox: moves it soon.
    pub(crate) fn pushed(&self, p: u32) {
        self.inner
            .dirty
            .lock()
            .expect("relay dirty set poisoned")
            .insert(p);
        self.inner.wake.notify_one();
    }
}

async fn run(inner: Arc<Inner>) {
    let all: Vec<u32> = (0..inner.keys.partitions()).collect();
    // The sweep keeps its pace however often pushes wake the loop in between: it goes first
    // when both are due, and a drain that pushes keep busy stops for it (`Inner::drain`).
    let mut next_sweep = Instant::now();
    loop {
        let swept = tokio::select! {
            biased;
            () = tokio::time::sleep_until(next_sweep) => true,
            () = inner.wake.notified() => false,
        };
        let mut parts = std::mem::take(&mut *inner.dirty.lock().expect("relay dirty set poisoned"));
        if swept {
            let looked = inner.waiting(&all).await;
            // After the look, however long it took: the drain gets its time.
            next_sweep = Instant::now() + SWEEP;
            match looked {
                Ok(Waiting {
                    waiting,
                    unread,
                    failure,
                }) => {
                    // An outbox that could not be read is failing, named (before the look
                    // settles the rest, so that the failure is not cleared and made anew at
                    // each sweep), and keeps what failed there.
                    if let Some(e) = failure {
                        tracing::warn!(error = %e, partitions = ?unread, "relay: could not read some outboxes' lengths; moving the others, trying again in {SWEEP:?}");
                        for p in &unread {
                            inner.status.failed(Some(*p), &e);
                        }
                    }
                    inner
                        .status
                        .looked(|p| waiting.contains(&p) || unread.contains(&p));
                    parts.extend(waiting);
                }
                // What was pushed (or left by a drain that stopped for this sweep) still
                // moves.
                Err(e) => {
                    tracing::warn!(error = %e, "relay: could not read the outboxes' lengths; trying again in {SWEEP:?}");
                    inner.status.failed(None, &e);
                }
            }
        }
        // Each partition's outbox on its own, all at once: one whose target's primary is slow
        // or down holds up only its own moves.
        let drained =
            futures::future::join_all(parts.iter().map(|p| inner.drain(*p, next_sweep))).await;
        for (p, result) in parts.iter().zip(drained) {
            match result {
                Ok(_) => inner.status.moved(*p),
                Err(e) => {
                    // The outbox keeps what was not moved: the next sweep moves it (and so
                    // does the next push to it; not sooner, so a target that keeps failing is
                    // not retried at every push of another partition).
                    tracing::warn!(partition = p, error = %e, "relay: could not move outbox messages; trying again in {SWEEP:?}");
                    inner.status.failed(Some(*p), &e);
                }
            }
        }
    }
}

/// What a sweep's look found: each outbox read on its own, so that one whose read fails (its
/// primary down on a cluster) holds up no other's moves.
struct Waiting {
    /// The partitions whose outboxes hold messages.
    waiting: Vec<u32>,
    /// Those whose outboxes could not be read, and the first failure.
    unread: Vec<u32>,
    failure: Option<StoreError>,
}

impl Inner {
    /// Which partitions of `of` have outboxes holding messages.
    async fn waiting(&self, of: &[u32]) -> StoreResult<Waiting> {
        let lens = crate::scan::each_settled::<u64>(&self.conn, xlens(&self.keys, of)).await?;
        let mut looked = Waiting {
            waiting: Vec::new(),
            unread: Vec::new(),
            failure: None,
        };
        for (p, len) in of.iter().zip(lens) {
            match len {
                Ok(0) => {}
                Ok(_) => looked.waiting.push(*p),
                Err(e) => {
                    looked.unread.push(*p);
                    looked.failure.get_or_insert(e);
                }
            }
        }
        Ok(looked)
    }

    /// Moves everything in partition `p`'s outbox, a pass of [`BATCH`] at a time. Once the
    /// sweep is due (`until`) it leaves the rest to it after the pass in hand (marking `p`
    /// dirty): turns filling the outbox as fast as passes empty it would otherwise keep it,
    /// and so the sweep and every other partition's pushes, waiting for as long as they came.
    ///
    /// A target whose moves fail (its primary down, say) holds up only its own messages: the
    /// pass goes on with the other targets' (and with the pages after, skipping the failed
    /// target's, whose order must hold), and the outbox is trimmed only up to where every
    /// message is moved. The first failure is returned once the pass ends. While a target
    /// fails, the next drains go on from where this one stopped reading ([`Behind`]), not
    /// from the bottom, so a backlog held up behind it is not read again at every drain; it
    /// is tried again with the first page of its own messages (at the next drain, then every
    /// half [`SWEEP`]), and once one such try moves them, the drain starts again from the
    /// bottom.
    async fn drain(&self, p: u32, until: Instant) -> StoreResult<()> {
        let (ob, _) = self.keys.outbox(p);
        let mut woken = BTreeSet::new();
        let held = self
            .behind
            .lock()
            .expect("relay behind poisoned")
            .remove(&p);
        let resumed = match held {
            Some(behind) => self.retry_failed(p, behind, &mut woken).await,
            None => None,
        };
        self.wake(std::mem::take(&mut woken));
        // Targets whose moves failed (in this drain, or in one before it that this one goes
        // on from), each with the lowest seq it has not taken, and the failure to report.
        // The last seq read (in this drain or the one it goes on from), and when the failed
        // targets are tried again.
        let (mut failed, mut failure, mut read_to, mut probe_at) = match resumed {
            Some(b) => (b.failed, Some(b.failure), Some(b.read_to), b.probe_at),
            None => (BTreeMap::new(), None, None, Instant::now()),
        };
        // Where the next page starts: after the last entry read.
        let mut from = read_to.map_or_else(|| "-".to_owned(), |r| format!("({r}-0"));
        // What to leave for the next drain, or `Ok` if every target took everything read.
        let finish = |failed: BTreeMap<u32, u64>,
                      failure: Option<StoreError>,
                      read_to: Option<u64>,
                      probe_at: Instant| {
            let (Some(failure), Some(read_to), false) = (failure, read_to, failed.is_empty())
            else {
                return Ok(());
            };
            self.behind.lock().expect("relay behind poisoned").insert(
                p,
                Behind {
                    failed,
                    failure: failure.clone(),
                    read_to,
                    probe_at,
                },
            );
            Err(failure)
        };
        // Each target's high-water mark for this outbox, read once per pass and raised by its
        // moves: what a target already holds (moved before a failure held up the trim) is not
        // sent to it again.
        let mut marks: BTreeMap<u32, u64> = BTreeMap::new();
        loop {
            let items = self.read_outbox(&ob, &from).await?;
            let Some(last) = items.last() else {
                return finish(failed, failure, read_to, probe_at);
            };
            let last = seq_of(
                &entry_fields(last)
                    .ok_or_else(|| unexpected("outbox entry"))?
                    .0,
            )?;
            read_to = Some(last);
            let mut per_target: BTreeMap<u32, Vec<Moving>> = BTreeMap::new();
            for item in &items {
                let m = moving(item)?;
                per_target
                    .entry(partition_of(&m.to, self.keys.partitions()))
                    .or_default()
                    .push(m);
            }
            for (q, messages) in &per_target {
                if failed.contains_key(q) {
                    continue;
                }
                let moved = async {
                    let mark = match marks.get(q) {
                        Some(m) => *m,
                        None => self.mark(p, *q).await?,
                    };
                    let due: Vec<&Moving> = messages.iter().filter(|m| m.seq > mark).collect();
                    self.move_into(p, *q, &due, &mut woken).await?;
                    StoreResult::Ok(due.last().map_or(mark, |m| m.seq))
                }
                .await;
                match moved {
                    Ok(mark) => {
                        marks.insert(*q, mark);
                    }
                    Err(e) => {
                        failure = Some(e);
                        failed.insert(*q, messages.first().map_or(last + 1, |m| m.seq));
                        // A failure that passes (a timeout, a redirection) is tried again
                        // by the next drain; one that stays, once per sweep after that.
                        probe_at = Instant::now();
                    }
                }
            }
            // What was moved is woken whether or not the rest went.
            self.wake(std::mem::take(&mut woken));
            // Everything up to `last` moved, or up to the first message a failed target did not
            // take (a move is made once however often it is tried, by the target's high-water
            // mark, so what a failed pass moved is no harm).
            let keep_from = failed.values().min().copied().unwrap_or(last + 1);
            let _: u64 = redis::cmd("XTRIM")
                .arg(&ob)
                .arg("MINID")
                .arg(format!("{keep_from}-0"))
                .query_async(&mut self.conn.clone())
                .await
                .map_err(re)?;
            from = format!("({last}-0");
            if items.len() < BATCH {
                return finish(failed, failure, read_to, probe_at);
            }
            if Instant::now() >= until {
                self.dirty
                    .lock()
                    .expect("relay dirty set poisoned")
                    .insert(p);
                return finish(failed, failure, read_to, probe_at);
            }
        }
    }

    /// What a drain of `p` goes on from, given what the last one left (`behind`): the same, if
    /// its failed targets are not due to be tried again or fail again; `None` (from the
    /// bottom, every target tried) once one of them takes the first page of its messages, or
    /// has none left (another process's relay moved them).
    async fn retry_failed(
        &self,
        p: u32,
        mut behind: Behind,
        woken: &mut BTreeSet<ActorId>,
    ) -> Option<Behind> {
        if Instant::now() < behind.probe_at {
            return Some(behind);
        }
        // Half a sweep: the sweeps, which come a little more than one apart, each try again.
        behind.probe_at = Instant::now() + SWEEP / 2;
        let (ob, obm) = self.keys.outbox(p);
        // An outbox numbered below where the last drain read (the store deleted and made
        // again under this process): nothing of the old place holds.
        let numbered: Result<Option<u64>, _> = redis::cmd("HGET")
            .arg(&obm)
            .arg("s")
            .query_async(&mut self.conn.clone())
            .await;
        match numbered {
            Ok(Some(s)) if s >= behind.read_to => {}
            Ok(_) => return None,
            Err(e) => {
                behind.failure = re(e);
                return Some(behind);
            }
        }
        for (q, first) in &behind.failed {
            let tried = async {
                let items = self.read_outbox(&ob, &format!("{first}-0")).await?;
                let mut mine = Vec::new();
                for item in &items {
                    let m = moving(item)?;
                    if partition_of(&m.to, self.keys.partitions()) == *q {
                        mine.push(m);
                    }
                }
                let mark = self.mark(p, *q).await?;
                let due: Vec<&Moving> = mine.iter().filter(|m| m.seq > mark).collect();
                self.move_into(p, *q, &due, woken).await
            }
            .await;
            match tried {
                Ok(()) => return None,
                Err(e) => behind.failure = e,
            }
        }
        Some(behind)
    }

    /// Up to [`BATCH`] entries of the outbox `ob` from `from` (an `XRANGE` bound) on.
    async fn read_outbox(&self, ob: &str, from: &str) -> StoreResult<Vec<Value>> {
        let read: Value = redis::cmd("XRANGE")
            .arg(ob)
            .arg(from)
            .arg("+")
            .arg("COUNT")
            .arg(BATCH)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(re)?;
        match read {
            Value::Array(items) => Ok(items),
            _ => Err(unexpected("outbox XRANGE reply")),
        }
    }

    /// Wakes the recipients of messages just moved.
    fn wake(&self, woken: BTreeSet<ActorId>) {
        if !woken.is_empty() {
            let woken: Vec<ActorId> = woken.into_iter().collect();
            self.signals.wake(&woken);
            self.signals.arrived_here(woken.into());
        }
    }

    /// Partition `q`'s high-water mark for the messages of `p`'s outbox: the highest seq it
    /// took (0 if none).
    async fn mark(&self, p: u32, q: u32) -> StoreResult<u64> {
        let mark: Option<u64> = redis::cmd("HGET")
            .arg(self.keys.high_water(q))
            .arg(p)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(re)?;
        Ok(mark.unwrap_or(0))
    }

    /// Enqueues `messages` (of source partition `p`, in seq order) into partition `q`, in calls
    /// of at most [`MOVE_BYTES`] of frames; adds the recipients made due to `woken`.
    async fn move_into(
        &self,
        p: u32,
        q: u32,
        messages: &[&Moving],
        woken: &mut BTreeSet<ActorId>,
    ) -> StoreResult<()> {
        let hw = self.keys.high_water(q);
        let mut rest = messages;
        while !rest.is_empty() {
            let mut bytes = 0;
            let n = rest
                .iter()
                .take_while(|m| {
                    bytes += m.frame.len();
                    bytes <= MOVE_BYTES
                })
                .count()
                .max(1);
            let (now, later) = rest.split_at(n);
            rest = later;
            let mut keys = vec![hw.clone()];
            let mut args = vec![s(p)];
            for m in now {
                let mb = self.keys.mailbox(&m.to);
                keys.extend([mb.mm, mb.mq, mb.md, mb.mdx, self.keys.ready(&m.to)]);
                args.extend([
                    s(m.seq),
                    s(m.to.as_str()),
                    m.id.clone(),
                    m.due.clone(),
                    m.frame.clone(),
                ]);
            }
            debug_assert!(crate::keys::one_slot(&keys), "a move into {q}: {keys:?}");
            let r = crate::group::array(
                crate::group::invoke(
                    &mut self.conn.clone(),
                    &self.scripts.relay_move.script,
                    &keys,
                    args,
                )
                .await?,
            )?;
            if status(&r) != "ok" {
                return Err(unexpected(format!("relay_move replied {}", status(&r))));
            }
            for v in r.iter().skip(2) {
                let to = text(Some(v)).ok_or_else(|| unexpected("relay_move recipient"))?;
                let to = ActorId::from_stored(&to, "relayed message recipient")?;
                // An event lane is read by the invocation waiting on it, not activated.
                if !to.is_system() {
                    woken.insert(to);
                }
            }
        }
        Ok(())
    }
}

/// `XLEN` of each of `partitions`' outboxes.
pub(crate) fn xlens(keys: &Keys, partitions: &[u32]) -> Vec<redis::Cmd> {
    partitions
        .iter()
        .map(|p| {
            let mut c = redis::cmd("XLEN");
            c.arg(keys.outbox(*p).0);
            c
        })
        .collect()
}

/// The outbox seq of an entry id `<seq>-0`.
fn seq_of(id: &str) -> StoreResult<u64> {
    id.strip_suffix("-0")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| unexpected(format!("outbox entry id {id}")))
}

fn moving(item: &Value) -> StoreResult<Moving> {
    let (id, fields) = entry_fields(item).ok_or_else(|| unexpected("outbox entry shape"))?;
    let get = |name: &str| {
        field(&fields, name)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| unexpected(format!("outbox entry {id} without {name}")))
    };
    let to = String::from_utf8_lossy(&get("to")?).into_owned();
    Ok(Moving {
        seq: seq_of(&id)?,
        to: ActorId::from_stored(&to, "outbox recipient")?,
        id: get("id")?,
        due: get("due")?,
        frame: get("m")?,
    })
}

impl crate::RedisStore {
    /// What each partition's outbox and high-water marks hold, for
    /// [`check_outboxes`](loom_core::store::backend::check_outboxes) (`loom journal verify`)
    /// and tests; empty for a store of one partition. `misplaced` is always 0: an actor's keys
    /// are named by the actor, so none can lie in another's partition.
    pub async fn outbox_states(&self) -> StoreResult<Vec<loom_core::store::backend::OutboxState>> {
        let n = self.keys.partitions();
        if n == 1 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn();
        // Every mark before any outbox seq: a mark read earlier is at most the seq it covers
        // then, and seqs only grow, so a store in use reads consistent.
        let cmds = (0..n)
            .map(|p| {
                let mut c = redis::cmd("HGETALL");
                c.arg(self.keys.high_water(p));
                c
            })
            .collect();
        let all_marks: Vec<Vec<(u32, u64)>> = crate::scan::each(&conn, cmds).await?;
        let mut out = Vec::with_capacity(n as usize);
        for (p, marks) in (0..n).zip(all_marks) {
            let (ob, obm) = self.keys.outbox(p);
            // The counts in one MULTI, so that a turn writing meanwhile cannot make a gap
            // appear between them.
            let (outbox_seq, pending, bottom): (Option<u64>, u64, Value) = redis::pipe()
                .atomic()
                .cmd("HGET")
                .arg(&obm)
                .arg("s")
                .cmd("XLEN")
                .arg(&ob)
                .cmd("XRANGE")
                .arg(&ob)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
                .map_err(re)?;
            let first = match &bottom {
                Value::Array(items) => match items.first() {
                    Some(e) => Some(seq_of(
                        &entry_fields(e)
                            .ok_or_else(|| unexpected("outbox entry shape"))?
                            .0,
                    )?),
                    None => None,
                },
                _ => return Err(unexpected("outbox XRANGE reply")),
            };
            // The outbox from the bottom, a page at a time: whom each message is for.
            let mut misaddressed = 0u64;
            let mut from = "-".to_owned();
            loop {
                let page: Value = redis::cmd("XRANGE")
                    .arg(&ob)
                    .arg(&from)
                    .arg("+")
                    .arg("COUNT")
                    .arg(BATCH)
                    .query_async(&mut conn)
                    .await
                    .map_err(re)?;
                let Value::Array(items) = page else {
                    return Err(unexpected("outbox XRANGE reply"));
                };
                for item in &items {
                    let (id, fields) =
                        entry_fields(item).ok_or_else(|| unexpected("outbox entry shape"))?;
                    let seq = seq_of(&id)?;
                    let to = field(&fields, "to")
                        .and_then(|t| std::str::from_utf8(t).ok())
                        .and_then(|t| t.parse::<ActorId>().ok());
                    if to.is_none_or(|to| partition_of(&to, n) == p) {
                        misaddressed += 1;
                    }
                    from = format!("{}-0", seq + 1);
                }
                if items.len() < BATCH {
                    break;
                }
            }
            let mut high_water = marks;
            high_water.sort_unstable();
            out.push(loom_core::store::backend::OutboxState {
                partition: p,
                outbox_seq: outbox_seq.unwrap_or(0),
                pending,
                first_pending: first,
                high_water,
                misaddressed,
                misplaced: 0,
                gapless: true,
            });
        }
        Ok(out)
    }
}
