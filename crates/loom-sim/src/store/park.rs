//! [`Parking`] for [`SimStore`]: park records, honoured by the mailbox (`mailbox.rs`: a parked
//! actor's mailbox hands nothing out and is not listed as ready).

use std::collections::BTreeMap;
use std::ops::Bound;

use async_trait::async_trait;
use loom_core::{ActorId, Lease, Park, Parking, StoreResult};

use super::{Frame, SimStore};

/// Parked actors and their park frames ([`Park::encode`]). Invariant: while an actor is here,
/// its mailbox hands nothing out and is neither ready nor due (`mailbox.rs` asks
/// [`contains`](Self::contains) each time, so there is no index to keep in step).
#[derive(Debug, Clone, Default)]
pub(super) struct Parked {
    by_actor: BTreeMap<ActorId, Frame>,
}

impl Parked {
    /// True if `actor` is parked.
    pub(super) fn contains(&self, actor: &ActorId) -> bool {
        self.by_actor.contains_key(actor)
    }

    fn get(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        self.by_actor
            .get(actor)
            .map(|frame| Park::decode(frame))
            .transpose()
    }

    fn list(&self, after: Option<&ActorId>, limit: usize) -> StoreResult<Vec<(ActorId, Park)>> {
        let start = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.clone()));
        self.by_actor
            .range((start, Bound::Unbounded))
            .take(limit)
            .map(|(a, frame)| Ok((a.clone(), Park::decode(frame)?)))
            .collect()
    }
}

#[async_trait]
impl Parking for SimStore {
    async fn park(&self, actor: &ActorId, park: &Park, fence: Option<&Lease>) -> StoreResult<()> {
        let frame = Frame::from(park.encode()?);
        let of = fence
            .map(|f| loom_core::store::backend::fence_of(actor, f, self.inner.partitions))
            .transpose()?;
        let (id, fence) = (actor.clone(), fence.cloned());
        self.update("park", actor.as_str(), move |d, now| {
            if let (Some(fence), Some(of)) = (&fence, of) {
                d.leases.check_fence(&id, fence, of, now)?;
            }
            d.parked.by_actor.insert(id, frame);
            Ok(())
        })
        .await
    }

    async fn unpark(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        let id = actor.clone();
        self.update("unpark", actor.as_str(), move |d, now| {
            // Decoded before anything changes: a record that does not decode stays parked.
            let Some(park) = d.parked.get(&id)? else {
                return Ok(None);
            };
            d.parked.by_actor.remove(&id);
            d.mailboxes.release_current(&id, now);
            Ok(Some(park))
        })
        .await
    }

    async fn parked(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        self.query("parked", actor.as_str(), |d, _| d.parked.get(actor))
            .await
    }

    async fn parked_actors(
        &self,
        after: Option<&ActorId>,
        limit: usize,
    ) -> StoreResult<Vec<(ActorId, Park)>> {
        let arg = after.map_or("", |a| a.as_str());
        self.query("parked_actors", arg, |d, _| d.parked.list(after, limit))
            .await
    }
}
