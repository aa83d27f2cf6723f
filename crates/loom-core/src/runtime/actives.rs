//! The actors active on one node, and making room for more when `Config::max_active` is reached.
//!
//! Invariants:
//! - `leaving` counts exactly the entries whose `evicted` flag is set: actors asked to passivate
//!   to make room, whose tasks have not ended yet. They still hold their entries, but
//!   room has already been made for them, so they do not count against the limit again.
//! - Eviction scans every entry (O(n)), so it asks a *batch* of the least recently used idle
//!   actors to passivate at once: 1/64 of the limit, at least one. At the limit the scan then
//!   runs once per batch of activations instead of once per activation (a workload touching
//!   more actors than the limit, like the bank benchmark, spent an eighth of its CPU here).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::id::ActorId;

/// What an active actor's task shares with the node; the task holds a clone.
#[derive(Clone)]
pub(super) struct Handle {
    /// Cancelled to ask the task to passivate.
    pub(super) stop: CancellationToken,
    /// True while the actor is in a turn (it is not evicted then).
    pub(super) busy: Arc<AtomicBool>,
    /// When it last finished a turn, or was activated.
    pub(super) last_used: Arc<Mutex<Instant>>,
}

/// An active actor, as the node sees it: its task's [`Handle`], and what only the node keeps.
pub(super) struct Active {
    pub(super) abort: Option<tokio::task::AbortHandle>,
    pub(super) handle: Handle,
    /// Asked to passivate to make room (see the module invariants).
    evicted: bool,
}

impl Active {
    pub(super) fn new(stop: CancellationToken) -> Active {
        Active {
            abort: None,
            handle: Handle {
                stop,
                busy: Arc::new(AtomicBool::new(false)),
                last_used: Arc::new(Mutex::new(Instant::now())),
            },
            evicted: false,
        }
    }
}

impl std::ops::Deref for Active {
    type Target = Handle;

    fn deref(&self) -> &Handle {
        &self.handle
    }
}

/// The active actors of a node.
#[derive(Default)]
pub(super) struct Actives {
    map: BTreeMap<ActorId, Active>,
    leaving: usize,
}

impl Actives {
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn contains(&self, id: &ActorId) -> bool {
        self.map.contains_key(id)
    }

    pub(super) fn get_mut(&mut self, id: &ActorId) -> Option<&mut Active> {
        self.map.get_mut(id)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Active> {
        self.map.values()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&ActorId, &Active)> {
        self.map.iter()
    }

    pub(super) fn insert(&mut self, id: ActorId, a: Active) {
        if let Some(old) = self.map.insert(id, a) {
            self.forgot(&old);
        }
    }

    pub(super) fn remove(&mut self, id: &ActorId) {
        if let Some(old) = self.map.remove(id) {
            self.forgot(&old);
        }
    }

    fn forgot(&mut self, a: &Active) {
        if a.evicted {
            self.leaving -= 1;
        }
    }

    /// The actors in use and not leaving: in a turn (which [`make_room`](Self::make_room)
    /// never asks to leave), or activated or done with a turn within `recent` (it would ask
    /// them last).
    pub(super) fn in_use(&self, recent: Duration) -> usize {
        let since = Instant::now().checked_sub(recent);
        self.map
            .values()
            .filter(|a| {
                !a.evicted
                    && (a.busy.load(Ordering::Acquire)
                        || since.is_none_or(|since| {
                            *a.last_used.lock().unwrap_or_else(|p| p.into_inner()) >= since
                        }))
            })
            .count()
    }

    /// Before an activation: if the actors not already leaving fill `max_active`, asks the least
    /// recently used idle ones to passivate, a batch at a time. Returns how many were asked.
    pub(super) fn make_room(&mut self, max_active: usize) -> usize {
        if self.map.len() - self.leaving < max_active {
            return 0;
        }
        let batch = (max_active / 64).max(1);
        let mut idle: Vec<(Instant, &ActorId)> = self
            .map
            .iter()
            // One still waiting to look at its own lease may be chosen: it then drops out before
            // it starts (`ensure_active`), and a later scan finds its message again.
            .filter(|(_, a)| !a.evicted && !a.busy.load(Ordering::Acquire))
            .map(|(id, a)| (*a.last_used.lock().unwrap_or_else(|p| p.into_inner()), id))
            .collect();
        let n = batch.min(idle.len());
        if n == 0 {
            return 0;
        }
        if n < idle.len() {
            idle.select_nth_unstable_by_key(n - 1, |(t, _)| *t);
        }
        let victims: Vec<ActorId> = idle[..n].iter().map(|(_, id)| (*id).clone()).collect();
        for id in &victims {
            if let Some(a) = self.map.get_mut(id) {
                tracing::debug!(actor = %id, "passivating a least recently used actor to make room");
                a.evicted = true;
                a.stop.cancel();
            }
        }
        self.leaving += n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actives(n: usize) -> (Actives, Vec<ActorId>) {
        let mut set = Actives::default();
        let mut ids = Vec::new();
        for i in 0..n {
            let id = ActorId::new("t", format!("a{i}")).unwrap();
            set.insert(id.clone(), Active::new(CancellationToken::new()));
            ids.push(id);
        }
        (set, ids)
    }

    fn used_at(set: &Actives, id: &ActorId, t: Instant) {
        *set.map[id].last_used.lock().unwrap() = t;
    }

    #[test]
    fn below_the_limit_nobody_is_asked_to_leave() {
        let (mut set, _) = actives(3);
        assert_eq!(set.make_room(4), 0);
    }

    #[test]
    fn the_least_recently_used_idle_actors_leave_first_a_batch_at_a_time() {
        let (mut set, ids) = actives(256);
        let base = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            used_at(
                &set,
                id,
                base + std::time::Duration::from_secs(1000 - i as u64),
            );
        }
        // The oldest (the last inserted) is busy: it must be passed over.
        set.map[&ids[255]].busy.store(true, Ordering::Release);
        assert_eq!(set.make_room(256), 4);
        let stopped: Vec<usize> = (0..256)
            .filter(|&i| set.map[&ids[i]].stop.is_cancelled())
            .collect();
        assert_eq!(stopped, vec![251, 252, 253, 254]);
        // The four leaving no longer count: the next activations need no scan until the
        // room they made is used.
        assert_eq!(set.make_room(256), 0);
        for i in 0..4 {
            let id = ActorId::new("t", format!("new{i}")).unwrap();
            set.insert(id, Active::new(CancellationToken::new()));
        }
        assert_eq!(set.make_room(256), 4);
        // Once the leaving ones are gone, their room is counted once, not twice.
        for id in &ids[251..255] {
            set.remove(id);
        }
        assert_eq!(set.leaving, 4);
        assert_eq!(set.len(), 256);
    }

    /// What a warm ring may activate beside them: actors idle for longer than `recent` can
    /// make room; those in a turn or used since cannot.
    #[test]
    fn in_use_counts_actors_in_a_turn_or_used_lately_and_not_leaving() {
        let recent = std::time::Duration::from_secs(1);
        let (mut set, ids) = actives(5);
        assert_eq!(set.in_use(recent), 5, "just activated: all in use");
        let long_ago = Instant::now() - std::time::Duration::from_secs(10);
        for id in &ids {
            used_at(&set, id, long_ago);
        }
        assert_eq!(set.in_use(recent), 0, "idle this long, all can make room");
        set.map[&ids[0]].busy.store(true, Ordering::Release);
        set.map[&ids[1]].busy.store(true, Ordering::Release);
        used_at(&set, &ids[2], Instant::now());
        assert_eq!(set.in_use(recent), 3);
        set.map.get_mut(&ids[0]).unwrap().evicted = true;
        set.leaving += 1;
        assert_eq!(
            set.in_use(recent),
            2,
            "one already leaving is not counted again"
        );
    }

    #[test]
    fn when_every_actor_is_busy_nobody_is_evicted() {
        let (mut set, ids) = actives(2);
        for id in &ids {
            set.map[id].busy.store(true, Ordering::Release);
        }
        assert_eq!(set.make_room(2), 0);
        assert!(ids.iter().all(|id| !set.map[id].stop.is_cancelled()));
    }
}
