//! [`Parking`] on redb: park records in `PARKED`, honoured by the mailbox (`mailbox.rs`: a
//! parked actor's mailbox hands nothing out and is not in the ready index).

use async_trait::async_trait;

use crate::error::StoreResult;
use crate::id::ActorId;
use crate::store::{Lease, Park, Parking};

use super::tables::{PARKED, se};
use super::{EmbeddedStore, lease, mailbox};

fn parse(actor: &str, bytes: &[u8]) -> StoreResult<(ActorId, Park)> {
    let id = ActorId::from_stored(actor, "parked actor id")?;
    Ok((id, Park::decode(bytes)?))
}

#[async_trait]
impl Parking for EmbeddedStore {
    async fn park(&self, actor: &ActorId, park: &Park, fence: Option<&Lease>) -> StoreResult<()> {
        let p = self.part(actor);
        let frame = park.encode()?;
        let of = fence
            .map(|f| crate::store::backend::fence_of(actor, f, self.partitions()))
            .transpose()?;
        let (actor, fence) = (actor.clone(), fence.cloned());
        self.write_in(p, move |tx| {
            if let (Some(fence), Some(of)) = (&fence, of) {
                lease::check_fence(tx, &actor, fence, of)?;
            }
            mailbox::park(tx, &actor, &frame)
        })
        .await
    }

    async fn unpark(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        let p = self.part(actor);
        let actor = actor.clone();
        let frame = self
            .write_in(p, move |tx| mailbox::unpark(tx, &actor))
            .await?;
        frame.as_deref().map(Park::decode).transpose()
    }

    async fn parked(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        let p = self.part(actor);
        let actor = actor.clone();
        self.read_in(p, move |txn| {
            let table = txn.open_table(PARKED).map_err(se)?;
            let frame = table.get(actor.as_str()).map_err(se)?;
            frame.map(|v| Park::decode(v.value())).transpose()
        })
        .await
    }

    async fn parked_actors(
        &self,
        after: Option<&ActorId>,
        limit: usize,
    ) -> StoreResult<Vec<(ActorId, Park)>> {
        let after = after.cloned();
        self.read_merged(
            limit,
            |a: &(ActorId, Park), b| a.0.cmp(&b.0),
            move |txn| {
                let table = txn.open_table(PARKED).map_err(se)?;
                let iter = match &after {
                    Some(a) => table.range::<&str>((
                        std::ops::Bound::Excluded(a.as_str()),
                        std::ops::Bound::Unbounded,
                    )),
                    None => table.range::<&str>(..),
                }
                .map_err(se)?;
                let mut out = Vec::new();
                for item in iter.take(limit) {
                    let (k, v) = item.map_err(se)?;
                    out.push(parse(k.value(), v.value())?);
                }
                Ok(out)
            },
        )
        .await
    }
}
