//! [`LeaseManager`] for [`SimStore`]: one lease row per actor, with fencing tokens.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use loom_core::store::backend::{FenceOf, check_owner, check_ttl};
use loom_core::{ActorId, Lease, LeaseManager, StoreError, StoreResult, Timestamp};

use super::SimStore;

/// An actor's lease row. Kept after release and expiry (`owner: None` once released), so that
/// the next token is always larger than every token given before.
#[derive(Debug, Clone)]
struct Row {
    owner: Option<String>,
    token: u64,
    expires_at: Timestamp,
}

impl Row {
    /// The holder, if the lease is held and unexpired at `now`.
    fn holder(&self, now: Timestamp) -> Option<&str> {
        self.owner.as_deref().filter(|_| self.expires_at > now)
    }

    /// True if `lease` is this row's live lease at `now` (same token, unexpired).
    fn is(&self, lease: &Lease, now: Timestamp) -> bool {
        self.token == lease.token && self.holder(now).is_some()
    }
}

/// Every lease row. Invariant: an actor's token only grows, across releases, expiries and
/// power losses (the row is never removed).
#[derive(Debug, Clone, Default)]
pub(super) struct Leases {
    by_actor: BTreeMap<ActorId, Row>,
}

fn lost(lease: &Lease) -> StoreError {
    StoreError::LeaseLost {
        actor: lease.actor.clone(),
        token: lease.token,
    }
}

impl Leases {
    /// Fails with [`StoreError::LeaseLost`] unless `fence` is live at `now` and, for a
    /// partition's lease (`of`, from `fence_of`), nobody holds `actor`'s own: the check every
    /// fenced write of `actor` makes before it writes (rule D8).
    pub(super) fn check_fence(
        &self,
        actor: &ActorId,
        fence: &Lease,
        of: FenceOf,
        now: Timestamp,
    ) -> StoreResult<()> {
        let held = self
            .by_actor
            .get(&fence.actor)
            .is_some_and(|row| row.is(fence, now));
        let own_free = of == FenceOf::Own
            || self
                .by_actor
                .get(actor)
                .is_none_or(|row| row.holder(now).is_none());
        if held && own_free {
            Ok(())
        } else {
            Err(lost(fence))
        }
    }

    fn acquire(
        &mut self,
        actor: &ActorId,
        owner: &str,
        ttl: Duration,
        now: Timestamp,
    ) -> StoreResult<Lease> {
        let previous = self.by_actor.get(actor);
        if let Some(row) = previous
            && let Some(holder) = row.holder(now)
        {
            return Err(StoreError::LeaseHeld {
                actor: actor.clone(),
                owner: holder.to_owned(),
                token: row.token,
                remaining_ms: u64::try_from(row.expires_at.saturating_since(now).as_millis())
                    .unwrap_or(u64::MAX),
            });
        }
        let row = Row {
            owner: Some(owner.to_owned()),
            token: previous.map_or(0, |r| r.token) + 1,
            expires_at: now + ttl,
        };
        let lease = Lease {
            actor: actor.clone(),
            owner: owner.to_owned(),
            token: row.token,
            expires_at: row.expires_at,
        };
        self.by_actor.insert(actor.clone(), row);
        Ok(lease)
    }

    /// Extends `lease` to `now + ttl` if it is still its actor's live lease; writes nothing if
    /// not.
    fn renew(&mut self, lease: &Lease, ttl: Duration, now: Timestamp) -> StoreResult<Lease> {
        match self.by_actor.get_mut(&lease.actor) {
            Some(row) if row.is(lease, now) => {
                row.expires_at = now + ttl;
                Ok(Lease {
                    expires_at: row.expires_at,
                    ..lease.clone()
                })
            }
            _ => Err(lost(lease)),
        }
    }

    /// Gives `lease` up if it is still its actor's live lease (keeping the token); returns
    /// whether it was.
    fn release(&mut self, lease: &Lease, now: Timestamp) -> bool {
        match self.by_actor.get_mut(&lease.actor) {
            Some(row) if row.is(lease, now) => {
                row.owner = None;
                row.expires_at = now;
                true
            }
            _ => false,
        }
    }

    fn holder(&self, actor: &ActorId, now: Timestamp) -> Option<Lease> {
        let row = self.by_actor.get(actor)?;
        row.holder(now).map(|owner| Lease {
            actor: actor.clone(),
            owner: owner.to_owned(),
            token: row.token,
            expires_at: row.expires_at,
        })
    }
}

#[async_trait]
impl LeaseManager for SimStore {
    async fn acquire(&self, actor: &ActorId, owner: &str, ttl: Duration) -> StoreResult<Lease> {
        check_owner(owner)?;
        check_ttl("lease ttl", ttl)?;
        let arg = format!("{actor} {owner}");
        let (actor, owner) = (actor.clone(), owner.to_owned());
        self.update("acquire", &arg, move |d, now| {
            d.leases.acquire(&actor, &owner, ttl, now)
        })
        .await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> StoreResult<Lease> {
        check_ttl("lease ttl", ttl)?;
        let arg = format!("{} {}", lease.actor, lease.token);
        let lease = lease.clone();
        self.update("renew", &arg, move |d, now| {
            d.leases.renew(&lease, ttl, now)
        })
        .await
    }

    async fn renew_many(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> StoreResult<Vec<StoreResult<Lease>>> {
        check_ttl("lease ttl", ttl)?;
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        // One write for all of them: a lost lease is its own slot's error and wrote nothing,
        // so the others still renew.
        let arg = leases.len().to_string();
        let leases = leases.to_vec();
        self.update("renew_many", &arg, move |d, now| {
            Ok(leases
                .iter()
                .map(|lease| d.leases.renew(lease, ttl, now))
                .collect())
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> StoreResult<bool> {
        let arg = format!("{} {}", lease.actor, lease.token);
        let lease = lease.clone();
        self.update("release", &arg, move |d, now| {
            Ok(d.leases.release(&lease, now))
        })
        .await
    }

    async fn holder(&self, actor: &ActorId) -> StoreResult<Option<Lease>> {
        self.query("holder", actor.as_str(), |d, now| {
            Ok(d.leases.holder(actor, now))
        })
        .await
    }
}
