//! [`LeaseManager`]: who may run an actor, with fencing tokens.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Limit, StoreError, StoreResult};
use crate::id::ActorId;
use crate::limits::MAX_OWNER_LEN;
use crate::time::Timestamp;

/// A held lease on one actor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The actor.
    pub actor: ActorId,
    /// Who holds it (a node name, unique per process).
    pub owner: String,
    /// The fencing token: it grows with every acquisition of this actor's lease, by anyone.
    pub token: u64,
    /// When it runs out unless renewed.
    pub expires_at: Timestamp,
}

/// Leases with fencing tokens: at most one holder per actor at a time.
///
/// Rules every backend keeps:
/// - [`acquire`](Self::acquire) succeeds only if nobody holds an unexpired lease on the actor;
///   it gives a token greater than every token given for that actor before, even after
///   releases, expiries and restarts;
/// - [`renew`](Self::renew) succeeds only for the current, unexpired lease (same token);
///   after expiry it fails even if nobody else took the lease;
/// - [`release`](Self::release) never touches a lease other than the one given.
#[async_trait]
pub trait LeaseManager: Send + Sync + 'static {
    /// Takes the actor's lease for `ttl`, or fails with [`StoreError::LeaseHeld`].
    async fn acquire(&self, actor: &ActorId, owner: &str, ttl: Duration) -> StoreResult<Lease>;

    /// Extends a held lease to `ttl` from now, or fails with [`StoreError::LeaseLost`].
    async fn renew(&self, lease: &Lease, ttl: Duration) -> StoreResult<Lease>;

    /// Renews many leases at once, with the rules of [`renew`](Self::renew): one result per
    /// lease, in order, [`StoreError::LeaseLost`] in the slot of a lease no longer held. A node
    /// renews all its actors' leases with one call, so backends make it one round trip and one
    /// durable write; this default renews them one by one. An `Err` for the whole call says
    /// nothing about which leases were renewed: the caller tries again while they last.
    async fn renew_many(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> StoreResult<Vec<StoreResult<Lease>>> {
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            match self.renew(lease, ttl).await {
                Err(e) if !matches!(e, StoreError::LeaseLost { .. }) => return Err(e),
                r => out.push(r),
            }
        }
        Ok(out)
    }

    /// Gives a lease up. Returns false if it was no longer held (expired or taken over), in
    /// which case nothing changed.
    async fn release(&self, lease: &Lease) -> StoreResult<bool>;

    /// The actor's current unexpired lease, if any.
    async fn holder(&self, actor: &ActorId) -> StoreResult<Option<Lease>>;
}

/// Checks an owner name (a node's: non-empty, bounded, no control characters, which stores
/// use to separate fields); every backend calls it.
pub fn check_owner(owner: &str) -> StoreResult<()> {
    if owner.is_empty() {
        return Err(StoreError::InvalidRequest("lease owner is empty".into()));
    }
    if let Some(ch) = owner.chars().find(|c| c.is_control()) {
        return Err(StoreError::InvalidRequest(format!(
            "node name {owner:?} has the control character {ch:?}"
        )));
    }
    if owner.len() > MAX_OWNER_LEN {
        return Err(StoreError::TooLarge {
            what: "lease owner".into(),
            size: owner.len(),
            limit: MAX_OWNER_LEN,
            limit_kind: Limit::OwnerLen,
        });
    }
    Ok(())
}

/// Which lease a fenced write of an actor is fenced by (rule D8 of RELIABILITY.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceOf {
    /// The actor's own lease ([`LeaseManager::acquire`] on the actor).
    Own,
    /// The lease of the partition the actor is in ([`ActorId::partition_lease`]): a node that
    /// owns a partition runs its actors under that one lease. Such a write is also refused
    /// while anyone holds the actor's own lease, so an actor's own lease, taken by a tool,
    /// pauses it on every node.
    Partition,
}

/// Checks that `fence` may fence a write of `actor` on a store of `store_partitions`
/// partitions ([`Store::partitions`](crate::Store::partitions)): the actor's own lease, or the
/// lease of its partition among the partitions nodes own
/// ([`ownership_partitions`](crate::partition::ownership_partitions)). Any other lease is
/// [`StoreError::InvalidRequest`], with nothing written. Every backend calls it before a fenced
/// write, then checks that the lease it names is live with the fence's token.
///
/// ```
/// use std::time::Duration;
/// use loom_core::{ActorId, Lease, Timestamp};
/// use loom_core::partition::{SHARED_STORE_PARTITIONS, partition_of};
/// use loom_core::store::backend::{FenceOf, fence_of};
///
/// let alice = ActorId::new("account", "alice")?;
/// let lease = |of: ActorId| Lease { actor: of, owner: "n1".into(), token: 1, expires_at: Timestamp::now() + Duration::from_secs(5) };
/// assert_eq!(fence_of(&alice, &lease(alice.clone()), 1).unwrap(), FenceOf::Own);
/// let p = partition_of(&alice, SHARED_STORE_PARTITIONS);
/// let part = ActorId::partition_lease("account", p);
/// assert_eq!(fence_of(&alice, &lease(part), 1).unwrap(), FenceOf::Partition);
/// // Another partition's lease, or another actor's, fences nothing of alice's.
/// let other = ActorId::partition_lease("account", (p + 1) % SHARED_STORE_PARTITIONS);
/// assert!(fence_of(&alice, &lease(other), 1).is_err());
/// assert!(fence_of(&alice, &lease(ActorId::new("account", "bob")?), 1).is_err());
/// # Ok::<(), loom_core::IdError>(())
/// ```
pub fn fence_of(actor: &ActorId, fence: &Lease, store_partitions: u32) -> StoreResult<FenceOf> {
    if fence.actor == *actor {
        return Ok(FenceOf::Own);
    }
    let partitions = crate::partition::ownership_partitions(store_partitions);
    let p = crate::partition::partition_of(actor, partitions);
    if fence.actor.partition_lease_of() == Some((actor.kind(), p)) {
        return Ok(FenceOf::Partition);
    }
    Err(StoreError::InvalidRequest(format!(
        "the lease of {} cannot fence a write of {actor}: only its own lease or {}'s can",
        fence.actor,
        ActorId::partition_lease(actor.kind(), p)
    )))
}
