//! [`LeaseManager`] on Redis: one fenced lease key per actor; see `loom.lua`.

use loom_core::store::backend::check_ttl;
use std::time::Duration;

use async_trait::async_trait;
use loom_core::store::backend::check_owner;
use loom_core::store::{Lease, LeaseManager};
use loom_core::{ActorId, StoreError, StoreResult, Timestamp};

use crate::RedisStore;
use crate::resp::*;

#[async_trait]
impl LeaseManager for RedisStore {
    async fn acquire(&self, actor: &ActorId, owner: &str, ttl_: Duration) -> StoreResult<Lease> {
        check_owner(owner)?;
        check_ttl("lease ttl", ttl_)?;
        let (ls, lt) = self.keys.lease(actor);
        let r = self
            .run(
                &self.scripts.acquire,
                &[&ls, &lt],
                vec![s(owner), ttl(ttl_)],
            )
            .await?;
        match status(&r).as_str() {
            "ok" => Ok(Lease {
                actor: actor.clone(),
                owner: owner.to_owned(),
                token: number(r.get(1), "token")?,
                expires_at: Timestamp::from_millis(number(r.get(2), "expiry")?),
            }),
            "held" => Err(StoreError::LeaseHeld {
                actor: actor.clone(),
                owner: text(r.get(1)).unwrap_or_default(),
                token: number(r.get(2), "token")?,
                remaining_ms: text(r.get(3))
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(0)
                    .max(0) as u64,
            }),
            other => Err(unexpected(format!("acquire replied {other}"))),
        }
    }

    async fn renew(&self, lease: &Lease, ttl_: Duration) -> StoreResult<Lease> {
        check_ttl("lease ttl", ttl_)?;
        let (ls, _) = self.keys.lease(&lease.actor);
        let r = self
            .run(
                &self.scripts.lease_cas,
                &[&ls],
                vec![s(&lease.owner), s(lease.token), s("renew"), ttl(ttl_)],
            )
            .await?;
        match status(&r).as_str() {
            "ok" => Ok(Lease {
                expires_at: Timestamp::from_millis(number(r.get(1), "expiry")?),
                ..lease.clone()
            }),
            "lost" => Err(StoreError::LeaseLost {
                actor: lease.actor.clone(),
                token: lease.token,
            }),
            other => Err(unexpected(format!("renew replied {other}"))),
        }
    }

    async fn renew_many(
        &self,
        leases: &[Lease],
        ttl_: Duration,
    ) -> StoreResult<Vec<StoreResult<Lease>>> {
        check_ttl("lease ttl", ttl_)?;
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = leases.iter().map(|l| self.keys.lease(&l.actor).0).collect();
        // One call for all on one primary; on a cluster one per slot, all at once.
        let cluster = self.conn.is_cluster();
        let mut groups: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
        for (i, k) in keys.iter().enumerate() {
            let tag = if cluster {
                crate::keys::hash_tag(k)
            } else {
                ""
            };
            groups.entry(tag).or_default().push(i);
        }
        let calls = groups.values().map(|at| {
            let keys: Vec<&str> = at.iter().map(|i| keys[*i].as_str()).collect();
            let mut args = vec![ttl(ttl_)];
            for i in at {
                args.push(s(&leases[*i].owner));
                args.push(s(leases[*i].token));
            }
            async move { self.run(&self.scripts.renew_many, &keys, args).await }
        });
        let replies = futures::future::join_all(calls).await;
        // Each slot's answer for its own leases: a primary that fails fails only its leases'
        // renewals (the keeper settles each lease on its own), not the others'.
        let mut r: Vec<StoreResult<redis::Value>> = (0..leases.len())
            .map(|_| Err(unexpected("a renewal without its reply")))
            .collect();
        for (at, reply) in groups.values().zip(replies) {
            match reply {
                Ok(reply) if reply.len() == at.len() => {
                    for (i, v) in at.iter().zip(reply) {
                        r[*i] = Ok(v);
                    }
                }
                Ok(reply) => {
                    return Err(unexpected(format!(
                        "renew_many replied {} results for {} leases",
                        reply.len(),
                        at.len()
                    )));
                }
                Err(e) => {
                    for i in at {
                        r[*i] = Err(e.clone());
                    }
                }
            }
        }
        leases
            .iter()
            .zip(r)
            .map(|(l, v)| {
                let v = match v {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(e)),
                };
                match text(Some(&v)).as_deref() {
                    Some("") => Ok(Err(StoreError::LeaseLost {
                        actor: l.actor.clone(),
                        token: l.token,
                    })),
                    _ => Ok(Ok(Lease {
                        expires_at: Timestamp::from_millis(number(Some(&v), "expiry")?),
                        ..l.clone()
                    })),
                }
            })
            .collect()
    }

    async fn release(&self, lease: &Lease) -> StoreResult<bool> {
        let (ls, _) = self.keys.lease(&lease.actor);
        let r = self
            .run(
                &self.scripts.lease_cas,
                &[&ls],
                vec![s(&lease.owner), s(lease.token), s("release"), s(0)],
            )
            .await?;
        Ok(status(&r) == "ok")
    }

    async fn holder(&self, actor: &ActorId) -> StoreResult<Option<Lease>> {
        let (ls, _) = self.keys.lease(actor);
        let r = self.run(&self.scripts.holder, &[&ls], vec![]).await?;
        match status(&r).as_str() {
            "none" => Ok(None),
            "ok" => Ok(Some(Lease {
                actor: actor.clone(),
                owner: text(r.get(1)).unwrap_or_default(),
                token: number(r.get(2), "token")?,
                expires_at: Timestamp::from_millis(number(r.get(3), "expiry")?),
            })),
            other => Err(unexpected(format!("holder replied {other}"))),
        }
    }
}
