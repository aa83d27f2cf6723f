//! Which partitions this node owns: of each kind it hosts, the partitions that rendezvous
//! hashing over the live nodes hosting that kind gives it ([`owner_of`]), each held by a
//! fenced partition lease ([`ActorId::partition_lease`]) that the lease keeper renews. A node
//! activates only actors of partitions it holds, and runs them under the partition's lease, so
//! nodes sharing a store work on disjoint actors and an activation writes no lease of its own.
//!
//! Invariants:
//! - **At most one owner per (kind, partition)**: ownership is the partition's lease, which one
//!   node holds at a time. Rosters read at different moments may disagree for a moment about
//!   who *should* own a partition; the lease decides who does. The partition's actors run under
//!   that lease: it fences each of their writes (rule D8), so an actor whose node lost the
//!   partition can write nothing more, and no actor takes a lease of its own.
//! - **Activation only under ownership**: `ensure_active` looks at [`Ownership::owns`] while
//!   it holds the active-actor lock, and a hand-off removes the partition from what is owned
//!   *before* it takes that lock to stop the partition's actors. So an actor is either seen
//!   and stopped by the hand-off, or never activated.
//! - **Hand-off**: a partition the roster now gives to another node stops being owned at once
//!   (nothing new starts), its active actors are asked to passivate (an invocation in flight
//!   finishes, still fenced by the partition's lease, renewed meanwhile), and once they are
//!   gone, or `shutdown_timeout` (at least a lease ttl) has
//!   passed, its lease is released, so the new owner takes it at its next look instead of a
//!   ttl later. A partition whose lease is lost (not renewed in time) stops being owned and its
//!   actors are asked to passivate; it is not taken again before the next look.
//! - **Takeover**: a node that crashes holds its partitions until their leases run out, one
//!   lease ttl after its last renewal, and its membership record runs out at about the same
//!   time; the other hosts look at the roster every [`tick`], so its partitions have new owners
//!   within about `lease_ttl + tick`. A look goes on with the last roster read while the store
//!   does not answer (before the first read: a roster of this node alone), so lost partitions
//!   are dropped and unheld ones taken whatever the roster read does.
//! - **Looks go on**: a look gives up a take that has not answered within a lease ttl (the
//!   partition is asked for again at a later look), so one request that never answers holds
//!   that look, and with it the takeover of other partitions and the hand-offs the look would
//!   start, at most a ttl, not for ever. A take given up may still have taken the lease: as
//!   with an answer lost, the partition then waits for that lease to run out, a ttl at most.
//! - **Stopping**: a graceful shutdown leaves the roster first (the others stop naming this
//!   node at once), then hands off each partition as soon as its own actors have drained. A
//!   shutdown that times out stops what is still running as `kill` does: the partitions still
//!   being handed off are left to run out, as a crash leaves them ([`release_all`] releases
//!   what a look took meanwhile). A restarted process after a crash
//!   waits for the dead one's partition leases to run out (a lease ttl): a crash cannot be
//!   told from a live process under the same name before.
//! - **One process per name**: leases bear node names, not incarnations, so a process whose
//!   heartbeats are refused (another live process holds its name: two given one name, or
//!   one superseded after its record ran out while it was paused or cut off) owns nothing
//!   while refused. It hands off what it holds and takes nothing; otherwise it would hold
//!   partitions that the name's member, whose takes find them held under its own name,
//!   could never take.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::leases::{Kept, Tenure};
use crate::error::StoreError;
use crate::id::ActorId;
use crate::partition::{owner_of, partition_of};
use crate::store::{Lease, Roster};

/// How often a node looks at the roster: an eighth of the lease ttl, at most half a second.
pub(super) fn tick(ttl: Duration) -> Duration {
    (ttl / 8).clamp(Duration::from_millis(10), Duration::from_millis(500))
}

/// How often a hand-off looks whether the partition's actors are gone.
const DRAIN_POLL: Duration = Duration::from_millis(10);

struct Held {
    lease: Lease,
    /// Cancelled by the lease keeper if the lease could not be renewed.
    lost: CancellationToken,
    /// Renewed while it lives; its tenure also says when the lease's deadline has passed
    /// before the keeper could say so.
    kept: Kept,
}

/// The partitions this node holds (see the module documentation).
pub(crate) struct Ownership {
    partitions: u32,
    held: Mutex<BTreeMap<&'static str, BTreeMap<u32, Held>>>,
}

impl Ownership {
    pub(super) fn new(partitions: u32) -> Ownership {
        Ownership {
            partitions,
            held: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, BTreeMap<u32, Held>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True if this node holds the partition of `id`'s kind that `id` is in.
    pub(super) fn owns(&self, id: &ActorId) -> bool {
        self.with_held(id, |_| ()).is_some()
    }

    /// While this node holds the partition `id` is in: that partition's lease, which fences
    /// every write of `id` (rule D8), and its [`Tenure`], which says when it is lost.
    pub(super) fn fence(&self, id: &ActorId) -> Option<(Lease, Tenure)> {
        self.with_held(id, |h| (h.lease.clone(), h.kept.tenure().clone()))
    }

    /// `f` of the partition `id` is in, if this node holds it (its lease not lost, nor past
    /// its deadline: a process paused past its ttl wakes holding nothing, before its keeper
    /// runs to say so).
    fn with_held<T>(&self, id: &ActorId, f: impl FnOnce(&Held) -> T) -> Option<T> {
        let p = partition_of(id, self.partitions);
        self.lock()
            .get(id.kind())
            .and_then(|parts| parts.get(&p))
            .filter(|h| h.kept.tenure().held())
            .map(f)
    }

    /// How many partitions each kind is cut into.
    pub(super) fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Where this node's ready scan looks: `None` if it holds every partition of each of
    /// `kinds` (then it looks at the kinds' whole indexes), else each kind with the
    /// partitions of it held now (kinds with none left out: maybe an empty list).
    pub(super) fn scope(&self, kinds: &[&'static str]) -> Option<Vec<(&'static str, Vec<u32>)>> {
        let held = self.lock();
        let scope: Vec<(&'static str, Vec<u32>)> = kinds
            .iter()
            .map(|kind| {
                let parts = held.get(kind).map_or_else(Vec::new, |parts| {
                    parts
                        .iter()
                        .filter(|(_, h)| h.kept.tenure().held())
                        .map(|(p, _)| *p)
                        .collect()
                });
                (*kind, parts)
            })
            .collect();
        if scope
            .iter()
            .all(|(_, parts)| parts.len() == self.partitions as usize)
        {
            return None;
        }
        Some(
            scope
                .into_iter()
                .filter(|(_, parts)| !parts.is_empty())
                .collect(),
        )
    }

    /// How many partitions are held now (for metrics: no list built).
    pub(super) fn count(&self) -> usize {
        self.lock()
            .values()
            .flat_map(BTreeMap::values)
            .filter(|h| h.kept.tenure().held())
            .count()
    }

    /// The (kind, partition)s held now, sorted.
    pub(super) fn owned(&self) -> Vec<(String, u32)> {
        self.lock()
            .iter()
            .flat_map(|(kind, parts)| {
                parts
                    .iter()
                    .filter(|(_, h)| h.kept.tenure().held())
                    .map(|(p, _)| (kind.to_string(), *p))
            })
            .collect()
    }

    fn take(&self, kind: &str, p: u32) -> Option<Held> {
        let mut held = self.lock();
        let parts = held.get_mut(kind)?;
        parts.remove(&p)
    }
}

/// Looks at the roster every [`tick`] and takes, keeps and hands off partitions, until the
/// runtime stops. Runs on nodes that host at least one kind.
pub(super) async fn own_partitions(shared: Arc<Shared>) {
    let every = tick(shared.config.lease_ttl);
    // The last roster read, the store's clock when it was read, and when that was on this
    // node's: a look goes on with it while the store does not answer, so that lost partitions
    // are still dropped and unheld ones still taken (the leases decide). Its clock runs on
    // meanwhile, so that a node whose heartbeats stopped meanwhile runs out of it too, as it
    // would have in a roster read now; a roster that judged the nodes at its read's moment for
    // ever kept a node that died meanwhile winning its partitions, which nobody then took.
    let mut last: Option<(Roster, crate::Timestamp, Instant)> = None;
    loop {
        if shared.shutdown.is_cancelled() {
            break;
        }
        match shared.store.members().await {
            Ok(roster) => {
                let at = roster.at;
                last = Some((roster, at, Instant::now()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the roster; deciding by the last one read, aged since")
            }
        }
        // Before the first read succeeds: a roster of no one, in which this node wins all.
        let (roster, read_at, read) = last.get_or_insert_with(|| {
            let none = Roster {
                at: crate::Timestamp::from_millis(0),
                members: Vec::new(),
            };
            (none, crate::Timestamp::from_millis(0), Instant::now())
        });
        roster.at = *read_at + read.elapsed();
        look(&shared, roster).await;
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    // Stopping: each partition is released as soon as its actors have drained, not once all
    // have, so that a long invocation holds up only its own partition.
    let all: Vec<(&'static str, u32, Held)> = {
        let mut held = shared.ownership.lock();
        std::mem::take(&mut *held)
            .into_iter()
            .flat_map(|(kind, parts)| parts.into_iter().map(move |(p, h)| (kind, p, h)))
            .collect()
    };
    futures::future::join_all(
        all.into_iter()
            .map(|(kind, p, h)| hand_off(&shared, kind, p, h)),
    )
    .await;
}

/// One look: drops lost partitions, takes those this node now wins, hands off those it no
/// longer wins.
async fn look(shared: &Arc<Shared>, roster: &Roster) {
    let own = &shared.ownership;
    let me = shared.config.node.as_str();
    // While another live process holds its name, this one wins nothing: every partition it
    // holds goes to the name's member (which cannot take them while this one renews their
    // leases, which bear the same name), and it takes none while the name is not its own.
    let refused = shared.health.name_taken();
    let mut lost = Vec::new();
    let mut want = Vec::new();
    let mut give = Vec::new();
    {
        let mut held = own.lock();
        for kind in &shared.hosted {
            // This node counts itself a host even before its first heartbeat lands: the others
            // do not know it yet and keep their partitions, so it only takes what nobody
            // holds.
            let mut hosts: Vec<&str> = roster.hosts(kind).map(|m| m.node.as_str()).collect();
            if !hosts.contains(&me) {
                hosts.push(me);
            }
            let parts = held.entry(*kind).or_default();
            parts.retain(|p, h| {
                if h.lost.is_cancelled() {
                    lost.push((*kind, *p));
                    false
                } else {
                    true
                }
            });
            for p in 0..own.partitions {
                let mine = !refused && owner_of(hosts.iter().copied(), kind, p) == Some(me);
                match (mine, parts.contains_key(&p)) {
                    // A partition lost in this look is taken again at the next, once its
                    // actors have had a tick to stop.
                    (true, false) if lost.contains(&(*kind, p)) => {}
                    (true, false) => want.push((*kind, p)),
                    (false, true) => give.push((*kind, p)),
                    _ => {}
                }
            }
        }
    }
    for (kind, p) in lost {
        tracing::warn!(
            kind,
            partition = p,
            "lost a partition's lease; its actors stop"
        );
        stop_partition(shared, kind, p);
    }
    if !want.is_empty() {
        take(shared, want).await;
    }
    for (kind, p) in give {
        if let Some(h) = own.take(kind, p) {
            tracing::info!(
                kind,
                partition = p,
                "handing a partition off to the node that now wins it"
            );
            let me = shared.clone();
            shared.spawn(async move { hand_off(&me, kind, p, h).await });
        }
    }
}

/// Takes the leases of `want`, all at once (a store's group commit makes them one write). Each
/// lease goes to the keeper as soon as its own answer comes: one slow to answer (a lease held
/// by a busy node) does not hold up the renewals of the others, whose ttl runs from when they
/// were asked for.
async fn take(shared: &Arc<Shared>, want: Vec<(&'static str, u32)>) {
    let node = shared.config.node.as_str();
    let ttl = shared.config.lease_ttl;
    let mut tries: futures::stream::FuturesUnordered<_> = want
        .into_iter()
        .map(|(kind, p)| async move {
            let sent = Instant::now();
            // Bounded: an acquire that never answers (a connection gone silent, which a
            // PostgreSQL pool may wait on until the kernel gives up) would hold this look, and
            // every later one, so that no partition was taken or handed off meanwhile.
            let r = tokio::time::timeout(
                ttl,
                shared
                    .store
                    .acquire(&ActorId::partition_lease(kind, p), node, ttl),
            )
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::unavailable(
                    "partition lease",
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no answer within the lease ttl",
                    ),
                ))
            });
            (kind, p, sent, r)
        })
        .collect();
    let mut took = 0;
    while let Some((kind, p, sent, r)) = futures::StreamExt::next(&mut tries).await {
        match r {
            // Taken while the runtime began to stop: given back at once (the stop has already
            // handed off what was held).
            Ok(lease) if shared.shutdown.is_cancelled() => {
                if let Err(e) = shared.store.release(&lease).await {
                    tracing::warn!(partition = %lease.actor, error = %e, "could not release a partition's lease; it runs out by itself");
                }
            }
            Ok(lease) => {
                let lost = CancellationToken::new();
                let kept = shared.keeper.keep(lease.clone(), sent, lost.clone());
                shared
                    .ownership
                    .lock()
                    .entry(kind)
                    .or_default()
                    .insert(p, Held { lease, lost, kept });
                took += 1;
            }
            // Under this node's name: a take whose answer was lost or came too late, or an
            // earlier process of this name. Owners are names, so this one cannot be told from
            // that one: it is taken once it runs out.
            Err(StoreError::LeaseHeld { owner, .. }) if owner == node => {
                tracing::debug!(
                    kind,
                    partition = p,
                    "a partition's lease is held under this node's name (a take whose answer was lost, or an earlier process of this name); it is taken once it runs out"
                );
            }
            // Its owner has not let go yet (handing off, or crashed and not yet run out).
            Err(StoreError::LeaseHeld { .. }) => {}
            Err(e) => {
                shared.health.failed(&e);
                tracing::warn!(kind, partition = p, error = %e, "could not take a partition's lease; trying again");
            }
        }
    }
    if took > 0 {
        tracing::debug!(partitions = took, "took partitions");
        // Their ready actors are found by a scan now, not at the next poll.
        shared.wake.notify_one();
    }
}

/// Asks every active actor of (kind, p) to passivate; returns them.
fn stop_partition(shared: &Shared, kind: &str, p: u32) -> Vec<ActorId> {
    let parts = shared.ownership.partitions;
    let active = shared.active.lock().unwrap_or_else(|e| e.into_inner());
    active
        .iter()
        .filter(|(id, _)| id.kind() == kind && partition_of(id, parts) == p)
        .map(|(id, a)| {
            a.stop.cancel();
            id.clone()
        })
        .collect()
}

/// Hands (kind, p), no longer owned here, to whoever wins it: stops its actors, waits until
/// they are gone, keeping the lease that fences them renewed meanwhile, and releases it. The
/// wait is bounded as a shutdown's is (`shutdown_timeout`, at least a lease ttl): an invocation
/// in flight finishes, and the new owner takes the partition after it.
async fn hand_off(shared: &Arc<Shared>, kind: &'static str, p: u32, held: Held) {
    let stopping = stop_partition(shared, kind, p);
    let deadline = super::after(shared.config.shutdown_timeout.max(shared.config.lease_ttl));
    loop {
        let gone = {
            let active = shared.active.lock().unwrap_or_else(|e| e.into_inner());
            !stopping.iter().any(|id| active.contains(id))
        };
        if gone || held.lost.is_cancelled() {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                kind,
                partition = p,
                "a partition's actors did not stop within the shutdown timeout; releasing it anyway (they stop: its lease fenced their writes)"
            );
            break;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    release(shared, held).await;
}

async fn release(shared: &Shared, held: Held) {
    let Held { lease, lost, kept } = held;
    // No renewal after this point: one racing the release would only fail.
    drop(kept);
    if lost.is_cancelled() {
        return;
    }
    // An actor of the partition still running (a hand-off that waited out its bound for it)
    // stops now, before the lease that fences its writes is given up.
    lost.cancel();
    match shared.store.release(&lease).await {
        Ok(_) => {}
        Err(e) => tracing::warn!(
            partition = %lease.actor,
            error = %e,
            "could not release a partition's lease; it runs out by itself"
        ),
    }
}

/// Forgets every partition this node holds without releasing it, as a crash would (for
/// `Runtime::kill`): their leases run out.
pub(super) fn forget_all(shared: &Shared) {
    shared.ownership.lock().clear();
}

/// Releases every partition this node holds; for the end of a graceful shutdown, once its
/// actors have drained.
pub(super) async fn release_all(shared: &Shared) {
    let all: Vec<Held> = {
        let mut held = shared.ownership.lock();
        std::mem::take(&mut *held)
            .into_values()
            .flat_map(BTreeMap::into_values)
            .collect()
    };
    futures::future::join_all(all.into_iter().map(|h| release(shared, h))).await;
}
