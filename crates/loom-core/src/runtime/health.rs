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
    /// Its last write succeeded (or none failed yet).
    Healthy,
    /// Its requests have failed since `since`, and no write succeeded after.
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
    /// True if the node can work: the store works, the node's name is its own, and it is not
    /// stopping. A failing relay ([`Health::relay`]) is shown, not counted.
    pub fn is_healthy(&self) -> bool {
        self.store == StoreHealth::Healthy
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
}

/// What the runtime's requests met.
#[derive(Default)]
pub(crate) struct Observed {
    failing: Mutex<Option<Failing>>,
    node: Mutex<Option<NodeHealth>>,
    /// Since when heartbeats are refused, and whether that was logged as an error yet.
    refused: Mutex<Option<(Instant, bool)>>,
}

impl Observed {
    /// A request failed with `e`: the store is failing if `e` is the store's failure (not a
    /// refusal of the request).
    pub(crate) fn failed(&self, e: &StoreError) {
        if !e.is_transient() {
            return;
        }
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *failing {
            Some(f) => {
                f.last = e.clone();
                f.last_at = Instant::now();
                f.count += 1;
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
                });
            }
        }
    }

    /// A write succeeded: the store works.
    pub(crate) fn ok(&self) {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = failing.take() {
            tracing::info!(after = ?f.began.elapsed(), "the store works again");
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
    /// store may work again with nothing asked of it since).
    pub(crate) fn keeps_failing(&self, span: Duration) -> Option<StoreError> {
        let failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        failing
            .as_ref()
            .filter(|f| f.count >= 2 && f.last_at.duration_since(f.began) >= span)
            .map(|f| f.first.clone())
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
        let failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        let node = self.node.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Health {
            relay: None,
            node: node.unwrap_or(NodeHealth::Joining),
            store: match &*failing {
                None => StoreHealth::Healthy,
                Some(f) => StoreHealth::Failing {
                    since: f.since,
                    error: f.first.to_string(),
                    latest: f.last.to_string(),
                    failures: f.count,
                    hint: f.first.hint().or(f.last.hint()).map(str::to_owned),
                },
            },
        }
    }
}
