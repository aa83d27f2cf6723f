//! [`Parking`] on Redis: parked actors in one hash; see `loom.lua`.

use async_trait::async_trait;
use loom_core::store::{Lease, Park, Parking};
use loom_core::{ActorId, StoreError, StoreResult};

use crate::resp::*;
use crate::{RedisStore, re};

#[async_trait]
impl Parking for RedisStore {
    async fn park(&self, actor: &ActorId, park: &Park, fence: Option<&Lease>) -> StoreResult<()> {
        let frame = park.encode()?;
        let (ls, own) = self.keys.fence(actor, fence)?;
        let m = self.keys.mailbox(actor);
        let mut args = vec![s(actor.as_str()), frame];
        if let Some(l) = fence {
            args.push(s(&l.owner));
            args.push(s(l.token));
        }
        let (pk, ready, parked) = (
            self.keys.park(actor),
            self.keys.ready(actor),
            self.keys.parked_of(actor),
        );
        let mut keys = vec![ls.as_str(), &pk, &m.mm, &ready, &parked];
        keys.extend(own.as_deref());
        let r = self.run(&self.scripts.park, &keys, args).await?;
        match status(&r).as_str() {
            "ok" => Ok(()),
            "lost" => Err(StoreError::LeaseLost {
                actor: actor.clone(),
                token: fence.map_or(0, |l| l.token),
            }),
            other => Err(unexpected(format!("park replied {other}"))),
        }
    }

    async fn unpark(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        let m = self.keys.mailbox(actor);
        let r = self
            .run(
                &self.scripts.unpark,
                &[
                    &self.keys.park(actor),
                    &m.mm,
                    &m.mq,
                    &m.md,
                    &m.mdx,
                    &self.keys.ready(actor),
                    &self.keys.parked_of(actor),
                ],
                vec![s(actor.as_str())],
            )
            .await?;
        match status(&r).as_str() {
            "none" => Ok(None),
            "ok" => {
                let frame = bytes(r.get(1)).ok_or_else(|| unexpected("unpark without a record"))?;
                let park = Park::decode(&frame)?;
                // Its mailbox is held no more.
                self.signals.wake([actor]);
                Ok(Some(park))
            }
            other => Err(unexpected(format!("unpark replied {other}"))),
        }
    }

    async fn parked(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        let mut conn = self.conn();
        let frame: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys.park(actor))
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        frame.as_deref().map(Park::decode).transpose()
    }

    async fn parked_actors(
        &self,
        after: Option<&ActorId>,
        limit: usize,
    ) -> StoreResult<Vec<(ActorId, Park)>> {
        let sets: Vec<String> = (0..self.keys.partitions())
            .map(|p| self.keys.parked(p))
            .collect();
        let ids = self.listed(&sets, after, limit).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let actor = ActorId::from_stored(&id, "parked actor id")?;
            // Unparked since it was listed: skip it.
            if let Some(p) = self.parked(&actor).await? {
                out.push((actor, p));
            }
        }
        Ok(out)
    }
}
