//! The runtime's view of its store (rule D16): working, or failing since when and why, from what
//! its own requests met. Logged once when it changes; [`Runtime::health`](super::Runtime::health) shows
//! it; callers waiting in `ask` stop waiting for a store that keeps failing.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

use crate::error::StoreError;
use crate::store::RelayFailure;
use crate::time::Timestamp;

/// How the runtime's store is doing, as [`Runtime::health`](super::Runtime::health) reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StoreHealth {
    /// Its latest write succeeded (or none failed yet), and it is not failing in part.
    Healthy,
    /// It fails in part: some of its requests fail and others succeed (one partition's file,
    /// one Redis Cluster shard), or it came back from an outage with requests still failing
    /// around it. Shown from the first failure after a success until no failure has come
    /// for half again the retry policy's longest delay (`Config::retry.max`) and a lease ttl
    /// more (at most 10 minutes), so that a store failing in part does not alternate between
    /// healthy and failing with each request.
    /// Counted as healthy by [`Health::is_healthy`] (and `/health`): every node of a shared
    /// store sees the same, and taking them all out of a load balancer would turn a partial
    /// failure into a whole one.
    Degraded {
        /// When the failures began.
        since: Timestamp,
        /// The failure that began it.
        error: String,
        /// The latest failure.
        latest: String,
        /// How many failures the runtime's requests met since `since`.
        failures: u64,
        /// What to do about it, if there is something to say.
        hint: Option<String>,
        /// The latest write that succeeded.
        last_success: Timestamp,
    },
    /// Its requests have failed since `since`, and none succeeded after the latest failure
    /// (for a store that had been degraded: none since a failure a lease ttl ago, the time
    /// within which a node's own heartbeats come).
    Failing {
        /// When the failures began.
        since: Timestamp,
        /// The failure that began it.
        error: String,
        /// The latest failure (the same as `error` if only one came, or all alike).
        latest: String,
        /// How many failures the runtime's requests met since `since`.
        failures: u64,
        /// What to do about it, if there is something to say (a full disk, say).
        hint: Option<String>,
        /// The latest write that succeeded since `since`, if one did. `None`: nothing has
        /// succeeded since the failures began.
        last_success: Option<Timestamp>,
    },
}

/// Whether this node is a member of the nodes sharing its store
/// ([`Membership`](crate::store::Membership)): its heartbeats recorded, under its name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NodeHealth {
    /// No heartbeat recorded yet: just started, or the store fails (see [`Health::store`]).
    Joining,
    /// Its last heartbeat was recorded.
    Member {
        /// When this process first announced itself (the store's clock).
        joined_at: Timestamp,
    },
    /// Another live process announces this node's name, so this one's heartbeats are refused
    /// ([`StoreError::NodeTaken`]): two processes were given one name, or this one restarted
    /// under the name of one that crashed less than a lease ttl ago (it joins once that
    /// record runs out). It is not listed, and owns no partition meanwhile: partition leases
    /// bear node names, so a partition it held would be one the name's member could never
    /// take. It hands off those it holds and takes none until the name is its own; it can
    /// still send and ask, as a client-only runtime does.
    NameTaken {
        /// Since when its heartbeats are refused.
        since: Timestamp,
        /// The refusal.
        error: String,
        /// True if this process had been a member under the name, and another process took
        /// the name after its own record ran out (its heartbeats did not land for a lease ttl:
        /// a pause, or a store it could not reach): the name is the newer process's now.
        /// False for a process refused before any heartbeat of its own was recorded.
        superseded: bool,
    },
    /// The runtime is stopping or has stopped ([`Runtime::shutdown`](super::Runtime::shutdown)
    /// or [`kill`](super::Runtime::kill) was called): it takes no new message
    /// ([`SendError::Shutdown`](super::SendError::Shutdown)) and leaves the roster (a
    /// shutdown leaves it first; after a kill its record runs out), so a load balancer should
    /// send elsewhere.
    Stopping,
}

/// The runtime's health; see [`Runtime::health`](super::Runtime::health).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    /// The store.
    pub store: StoreHealth,
    /// This node's membership.
    pub node: NodeHealth,
    /// The store's relay between partitions, in this process, if its moves fail (`None`
    /// while they succeed, or where there is no relay): messages to other partitions wait in
    /// their outboxes meanwhile. Not counted by [`is_healthy`](Self::is_healthy): every node
    /// relays every outbox, so a damaged outbox or a failing target partition shows on all of
    /// them at once, and no restart of a node mends it; watch it (and `loom_relay_waiting`)
    /// instead of restarting on it.
    pub relay: Option<RelayFailure>,
}

impl Health {
    /// True if the node can work: the store works (or is [`StoreHealth::Degraded`]), the
    /// node's name is its own, and it is not stopping. A failing relay ([`Health::relay`]) is
    /// shown, not counted.
    pub fn is_healthy(&self) -> bool {
        !matches!(self.store, StoreHealth::Failing { .. })
            && !matches!(
                self.node,
                NodeHealth::NameTaken { .. } | NodeHealth::Stopping
            )
    }
}

struct Failing {
    since: Timestamp,
    began: Instant,
    /// The failure that began it: the cause, usually (a full disk), where later ones may only
    /// be its echoes (a store reopening after it).
    first: StoreError,
    /// The latest failure, and when it came.
    last: StoreError,
    last_at: Instant,
    /// How many failures came since `began`.
    count: u64,
    /// The latest write that succeeded since `began`, if one did.
    ok_at: Option<(Instant, Timestamp)>,
    /// True once a failure came after a success of this episode: the store fails in part.
    partial: bool,
    /// The state last logged for it (see [`Observed::note`]).
    shown: State,
    /// The failures since the latest success: the first of them, when it came, and how many
    /// (what [`Observed::keeps_failing`] looks at). `None` right after a success.
    streak: Option<(StoreError, Instant, u64)>,
}

impl Failing {
    /// True if a write succeeded after the latest failure.
    fn succeeding(&self) -> bool {
        self.ok_at.is_some_and(|(at, _)| at >= self.last_at)
    }

    /// How the store shows: see [`StoreHealth`].
    fn state(&self, o: &Observed) -> State {
        if !self.succeeding() {
            // Nothing succeeded since the latest failure: failing, unless the store was
            // serving some requests and the latest success is recent (a degraded store's
            // failures come between its successes).
            let down = !self.partial
                || self
                    .streak
                    .as_ref()
                    .is_none_or(|(_, began, _)| began.elapsed() >= o.down_after);
            if down {
                return State::Failing;
            }
            return State::Degraded;
        }
        if self.partial && self.last_at.elapsed() < o.heal_after {
            State::Degraded
        } else {
            State::Healthy
        }
    }

    /// True if the episode is over: writes succeed and no failure came for `heal_after`.
    /// Until then it is remembered, shown healthy or not, so that a failure after a success
    /// (the store failing in part) is seen as such, not as a new failure each time.
    fn over(&self, heal_after: Duration) -> bool {
        self.succeeding() && self.last_at.elapsed() >= heal_after
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Healthy,
    Degraded,
    Failing,
}

/// What the runtime's requests met.
pub(crate) struct Observed {
    /// How long a store failing in part stays degraded after its latest failure: half again
    /// the retry policy's longest delay (retries come jittered up to that far apart), so that
    /// a partition retried at that delay does not flap.
    heal_after: Duration,
    /// How long a degraded store's failures must go on with no success before it is failing:
    /// the lease ttl, within which a node's heartbeats come.
    down_after: Duration,
    failing: Mutex<Option<Failing>>,
    node: Mutex<Option<NodeHealth>>,
    /// Since when heartbeats are refused, and whether that was logged as an error yet.
    refused: Mutex<Option<(Instant, bool)>>,
}

impl Default for Observed {
    fn default() -> Self {
        let c = crate::runtime::Config::default();
        Observed::new(&c.retry, c.lease_ttl)
    }
}

impl Observed {
    /// Nothing observed yet, for a runtime retrying with `retry` and renewing leases (and
    /// beating its heart) within `lease_ttl`.
    pub(crate) fn new(retry: &crate::runtime::Retry, lease_ttl: Duration) -> Self {
        Observed {
            // Retries at their cap come up to half again it apart, and a lease ttl more for
            // the failing attempt and its redelivery. Capped: a retry delay of hours would
            // keep a node degraded that long.
            heal_after: (retry.max.saturating_mul(3) / 2)
                .saturating_add(lease_ttl)
                .min(Duration::from_secs(600)),
            down_after: lease_ttl,
            failing: Mutex::default(),
            node: Mutex::default(),
            refused: Mutex::default(),
        }
    }

    /// A request failed with `e`: the store is failing if `e` is the store's failure (not a
    /// refusal of the request).
    pub(crate) fn failed(&self, e: &StoreError) {
        if !e.is_transient() {
            return;
        }
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        // A failure after the last episode was over begins a new one.
        self.forget_over(&mut failing);
        match &mut *failing {
            Some(f) => {
                let now = Instant::now();
                f.partial |= f.succeeding();
                f.last = e.clone();
                f.last_at = now;
                f.count += 1;
                match &mut f.streak {
                    Some((_, _, n)) => *n += 1,
                    None => f.streak = Some((e.clone(), now, 1)),
                }
                self.note(&mut failing);
            }
            None => {
                tracing::error!(error = %e, hint = e.hint().unwrap_or(""), "the store is failing; Loom retries, and `Runtime::health` shows it");
                let now = Instant::now();
                *failing = Some(Failing {
                    since: Timestamp::now(),
                    began: now,
                    first: e.clone(),
                    last: e.clone(),
                    last_at: now,
                    count: 1,
                    ok_at: None,
                    partial: false,
                    shown: State::Failing,
                    streak: Some((e.clone(), now, 1)),
                });
            }
        }
    }

    /// A write succeeded: the store works (healthy at once, unless it fails in part: see
    /// [`StoreHealth::Degraded`]).
    pub(crate) fn ok(&self) {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = &mut *failing {
            f.ok_at = Some((Instant::now(), Timestamp::now()));
            f.streak = None;
        }
        self.forget_over(&mut failing);
    }

    /// Logs the store's state when it changes within an episode: failing (again), degraded,
    /// or working again. (An episode's first failure is logged where it begins.)
    fn note(&self, failing: &mut Option<Failing>) {
        let Some(f) = failing else { return };
        let now = f.state(self);
        if now == f.shown {
            return;
        }
        f.shown = now;
        match now {
            State::Failing => {
                tracing::error!(error = %f.last, hint = f.last.hint().unwrap_or(""), "the store is failing: nothing it was asked has succeeded since; Loom retries, and `Runtime::health` shows it")
            }
            State::Degraded => {
                tracing::warn!(error = %f.last, "the store fails in part: some of its requests succeed, others fail; `Runtime::health` shows it degraded until none has failed for a while")
            }
            State::Healthy => {
                tracing::info!(after = ?f.began.elapsed(), failures = f.count, "the store works again")
            }
        }
    }

    /// Forgets an episode that is over (see [`Failing::over`]).
    fn forget_over(&self, failing: &mut Option<Failing>) {
        self.note(failing);
        if failing.as_ref().is_some_and(|f| f.over(self.heal_after)) {
            *failing = None;
        }
    }

    /// Notes the outcome of a heartbeat (also a write, for the store's health) sent with `ttl`.
    ///
    /// A refused name is first a warning: usually this process restarted under the name of one
    /// that crashed, and joins once that record runs out, within the ttl. Refusals that go on
    /// for two ttls mean another live process has the name, and that is logged as an error.
    pub(crate) fn heartbeat(&self, r: &Result<crate::store::Member, StoreError>, ttl: Duration) {
        let mut node = self.node.lock().unwrap_or_else(|p| p.into_inner());
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(m) => {
                *refused = None;
                if let Some(NodeHealth::NameTaken { .. }) = &*node {
                    tracing::info!(node = %m.node, "this node's name is its own again: it is a member");
                }
                *node = Some(NodeHealth::Member {
                    joined_at: m.joined_at,
                });
            }
            Err(e @ StoreError::NodeTaken { .. }) => {
                let was_member = matches!(&*node, Some(NodeHealth::Member { .. }));
                if !matches!(&*node, Some(NodeHealth::NameTaken { .. })) {
                    *node = Some(NodeHealth::NameTaken {
                        since: Timestamp::now(),
                        error: e.to_string(),
                        superseded: was_member,
                    });
                }
                match &mut *refused {
                    None if was_member => {
                        tracing::error!(error = %e, "this node's record ran out while its heartbeats did not land, and another process took its name: this one stands down, handing off its partitions and taking none until the name is its own again");
                        *refused = Some((Instant::now(), true));
                    }
                    None => {
                        tracing::warn!(error = %e, "this node's heartbeats are refused; it joins once the name's record runs out, unless another live process holds it");
                        *refused = Some((Instant::now(), false));
                    }
                    Some((since, logged)) if !*logged && since.elapsed() > ttl * 2 => {
                        tracing::error!(error = %e, hint = e.hint().unwrap_or(""), "this node's heartbeats are still refused, two lease ttls on: another live process has its name");
                        *logged = true;
                    }
                    Some(_) => {}
                }
            }
            Err(_) => {}
        }
        drop(refused);
        drop(node);
        // A recorded heartbeat is a write that worked (for a client-only or idle node, the
        // only one it makes, so the only thing that can end a failure it saw); a refused name
        // is a round trip that worked. Writes elsewhere that still fail mark the store failing
        // again at once.
        match r {
            Err(StoreError::NodeTaken { .. }) => self.ok(),
            r => self.write(r),
        }
    }

    /// Notes the outcome of a write.
    pub(crate) fn write<T>(&self, r: &Result<T, StoreError>) {
        match r {
            Ok(_) => self.ok(),
            Err(e) => self.failed(e),
        }
    }

    /// The failure that began it, if the store keeps failing: failures came at least `span`
    /// apart with no success between (one failure, or a burst of them, is not enough: the
    /// store may work again with nothing asked of it since; and a store serving some requests
    /// between failures, failing in part, may serve the caller's).
    pub(crate) fn keeps_failing(&self, span: Duration) -> Option<StoreError> {
        let failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        failing.as_ref().and_then(|f| {
            let (first, began, n) = f.streak.as_ref()?;
            (*n >= 2 && f.last_at.duration_since(*began) >= span).then(|| first.clone())
        })
    }

    /// True while another live process holds this node's name (see
    /// [`NodeHealth::NameTaken`]): this one then owns no partition.
    pub(crate) fn name_taken(&self) -> bool {
        matches!(
            &*self.node.lock().unwrap_or_else(|p| p.into_inner()),
            Some(NodeHealth::NameTaken { .. })
        )
    }

    pub(crate) fn health(&self) -> Health {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        // An idle node's writes may all have come before the failure healed.
        self.forget_over(&mut failing);
        let node = self.node.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Health {
            relay: None,
            node: node.unwrap_or(NodeHealth::Joining),
            store: match failing.as_ref().map(|f| (f, f.state(self))) {
                Some((f, State::Failing)) => StoreHealth::Failing {
                    since: f.since,
                    error: f.first.to_string(),
                    latest: f.last.to_string(),
                    failures: f.count,
                    hint: f.first.hint().or(f.last.hint()).map(str::to_owned),
                    last_success: f.ok_at.map(|(_, at)| at),
                },
                Some((f, State::Degraded)) => StoreHealth::Degraded {
                    since: f.since,
                    error: f.first.to_string(),
                    latest: f.last.to_string(),
                    failures: f.count,
                    hint: f.first.hint().or(f.last.hint()).map(str::to_owned),
                    // Degraded only after a success.
                    last_success: f.ok_at.map_or(f.since, |(_, at)| at),
                },
                _ => StoreHealth::Healthy,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Retries capped at 20 s (so up to 30 s apart) and leases of 10 s: degraded for 40 s
    /// after the latest failure.
    const HEAL: Duration = Duration::from_secs(40);
    /// Leases of 10 s: a degraded store failing that long with no success is failing.
    const DOWN: Duration = Duration::from_secs(10);

    fn observed() -> Observed {
        let retry = crate::runtime::Retry {
            max: Duration::from_secs(20),
            ..crate::runtime::Retry::default()
        };
        Observed::new(&retry, DOWN)
    }

    /// A moment passes: a success and a failure never share an instant here.
    async fn tick() {
        tokio::time::advance(Duration::from_millis(1)).await;
    }

    fn down() -> StoreError {
        StoreError::unavailable("redis", std::io::Error::other("shard 2 is down"))
    }

    fn state(o: &Observed) -> &'static str {
        match o.health().store {
            StoreHealth::Healthy => "healthy",
            StoreHealth::Degraded { .. } => "degraded",
            StoreHealth::Failing { .. } => "failing",
        }
    }

    /// A store failing for one partition serves the others' writes between its failures: the
    /// health stays degraded (counted healthy, saying what fails and the latest success)
    /// instead of alternating between healthy and failing with each request; once the
    /// failures stop it heals HEAL after the latest. *Before*: healthy after every successful
    /// write, failing after every failure.
    #[tokio::test(start_paused = true)]
    async fn a_store_failing_in_part_is_degraded_until_failures_stop() {
        let o = observed();
        assert_eq!(state(&o), "healthy");
        // One failure, then a success: a blip, healthy at once.
        o.failed(&down());
        assert_eq!(state(&o), "failing");
        tick().await;
        o.ok();
        assert_eq!(state(&o), "healthy", "{:?}", o.health());
        // Failures with successes between them, the failures as far apart as retries at their
        // longest, the successes (heartbeats) a few seconds apart.
        for _ in 0..5 {
            tick().await;
            o.failed(&down());
            assert_eq!(state(&o), "degraded", "right after a failure");
            for _ in 0..8 {
                tokio::time::advance(Duration::from_secs(3)).await;
                o.ok();
                assert_eq!(state(&o), "degraded");
            }
        }
        assert!(o.health().is_healthy(), "degraded counts as healthy");
        match o.health().store {
            StoreHealth::Degraded {
                failures, error, ..
            } => assert_eq!((failures, error), (6, down().to_string())),
            other => panic!("{other:?}"),
        }
        // Asks see no streak of failures: each partition's own success came between.
        tick().await;
        o.failed(&down());
        assert!(o.keeps_failing(Duration::ZERO).is_none());
        // The failures stop; writes go on succeeding: healthy once HEAL has passed.
        tick().await;
        o.ok();
        tokio::time::advance(HEAL - Duration::from_millis(100)).await;
        o.ok();
        assert_eq!(state(&o), "degraded");
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(state(&o), "healthy", "read after HEAL, with no write since");
    }

    /// A store down (nothing succeeds) is failing however long ago its latest failure came,
    /// and healthy at its first success; one that was degraded is failing once nothing has
    /// succeeded for DOWN; a failure after an episode is over begins anew, and an ask's
    /// streak names its own first error.
    #[tokio::test(start_paused = true)]
    async fn a_store_down_is_failing_and_one_back_heals_at_once() {
        let o = observed();
        let other = StoreError::unavailable("redis", std::io::Error::other("connection reset"));
        o.failed(&down());
        tokio::time::advance(Duration::from_millis(300)).await;
        o.failed(&down());
        assert!(o.keeps_failing(Duration::from_millis(200)).is_some());
        tokio::time::advance(HEAL * 2).await;
        assert!(!o.health().is_healthy());
        match o.health().store {
            StoreHealth::Failing {
                last_success,
                failures,
                ..
            } => assert_eq!((last_success, failures), (None, 2)),
            other => panic!("{other:?}"),
        }
        o.ok();
        assert_eq!(state(&o), "healthy", "{:?}", o.health());
        // Degraded, then down: failing once no success came for DOWN.
        tokio::time::advance(HEAL).await;
        o.failed(&other);
        tick().await;
        o.ok();
        tick().await;
        o.failed(&down());
        assert_eq!(state(&o), "degraded");
        tokio::time::advance(DOWN / 2).await;
        o.failed(&down());
        assert_eq!(state(&o), "degraded");
        tokio::time::advance(DOWN / 2).await;
        assert_eq!(state(&o), "failing");
        match o.health().store {
            StoreHealth::Failing {
                error,
                last_success,
                ..
            } => assert!(error == other.to_string() && last_success.is_some()),
            other => panic!("{other:?}"),
        }
        let streak = o
            .keeps_failing(Duration::from_millis(200))
            .expect("a streak");
        assert_eq!(
            streak.to_string(),
            down().to_string(),
            "the streak's own first"
        );
        // Back: degraded (it had failed in part) until HEAL passes with no failure.
        tick().await;
        o.ok();
        assert_eq!(state(&o), "degraded");
        tokio::time::advance(HEAL).await;
        o.ok();
        assert_eq!(state(&o), "healthy");
    }
}
