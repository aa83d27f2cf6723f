//! [`LeaseManager`] on redb.

use crate::store::backend::check_ttl;
use std::time::Duration;

use async_trait::async_trait;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use crate::codec::{self, RecordType};
use crate::error::{StoreError, StoreResult};
use crate::id::ActorId;
use crate::store::backend::{FenceOf, check_owner};
use crate::store::{Lease, LeaseManager};
use crate::time::Timestamp;

use super::EmbeddedStore;
use super::tables::{LEASES, Tx, se};

/// A lease row. Kept after release (`owner: None`) so that the token keeps growing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Row {
    pub(super) owner: Option<String>,
    pub(super) token: u64,
    pub(super) expires_at: Timestamp,
}

pub(super) fn get(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    actor: &ActorId,
) -> StoreResult<Option<Row>> {
    match table.get(actor.as_str()).map_err(se)? {
        None => Ok(None),
        Some(v) => codec::decode(RecordType::Lease, v.value())
            .map(Some)
            .map_err(|e| StoreError::corrupt(format!("lease of {actor}"), e)),
    }
}

fn put(tx: &mut Tx<'_>, actor: &ActorId, row: &Row) -> StoreResult<()> {
    let bytes = codec::encode(RecordType::Lease, row)
        .map_err(|e| StoreError::corrupt(format!("lease of {actor}"), e))?;
    let table = tx.leases.get()?;
    table.insert(actor.as_str(), bytes.as_slice()).map_err(se)?;
    Ok(())
}

pub(super) fn live(row: &Row, now: Timestamp) -> Option<&str> {
    row.owner.as_deref().filter(|_| row.expires_at > now)
}

/// Fails with [`StoreError::LeaseLost`] unless `fence` is live (same token, unexpired) and, for
/// a partition's lease, nobody holds `actor`'s own: the check every fenced write of `actor`
/// makes before it writes, after [`fence_of`](crate::store::backend::fence_of) said which
/// lease `fence` is (`of`). A partition's lease lives in the partition it owns, the actor's.
pub(super) fn check_fence(
    tx: &mut Tx<'_>,
    actor: &ActorId,
    fence: &Lease,
    of: FenceOf,
) -> StoreResult<()> {
    let now = Timestamp::now();
    let table = tx.leases.get()?;
    let row = get(&**table, &fence.actor)?;
    let mut held = row
        .as_ref()
        .is_some_and(|r| r.token == fence.token && live(r, now).is_some());
    if held && of == FenceOf::Partition {
        held = get(&**table, actor)?.is_none_or(|own| live(&own, now).is_none());
    }
    if !held {
        return Err(StoreError::LeaseLost {
            actor: fence.actor.clone(),
            token: fence.token,
        });
    }
    Ok(())
}

/// Extends `lease` to `now + ttl` if it is still the actor's live lease; writes nothing if not.
fn renew_in(tx: &mut Tx<'_>, lease: Lease, ttl: Duration, now: Timestamp) -> StoreResult<Lease> {
    let row = get(&**tx.leases.get()?, &lease.actor)?;
    match row {
        Some(row) if row.token == lease.token && live(&row, now).is_some() => {
            let row = Row {
                expires_at: now + ttl,
                ..row
            };
            put(tx, &lease.actor, &row)?;
            Ok(Lease {
                expires_at: row.expires_at,
                ..lease
            })
        }
        _ => Err(StoreError::LeaseLost {
            actor: lease.actor.clone(),
            token: lease.token,
        }),
    }
}

#[async_trait]
impl LeaseManager for EmbeddedStore {
    async fn acquire(&self, actor: &ActorId, owner: &str, ttl: Duration) -> StoreResult<Lease> {
        let p = self.part(actor);
        check_owner(owner)?;
        check_ttl("lease ttl", ttl)?;
        let (actor, owner) = (actor.clone(), owner.to_owned());
        self.write_in(p, move |tx| {
            let now = Timestamp::now();
            let old = get(&**tx.leases.get()?, &actor)?;
            if let Some(row) = &old
                && let Some(holder) = live(row, now)
            {
                return Err(StoreError::LeaseHeld {
                    actor: actor.clone(),
                    owner: holder.to_owned(),
                    token: row.token,
                    remaining_ms: row.expires_at.saturating_since(now).as_millis() as u64,
                });
            }
            let row = Row {
                owner: Some(owner.clone()),
                token: old.map_or(0, |r| r.token) + 1,
                expires_at: now + ttl,
            };
            put(tx, &actor, &row)?;
            Ok(Lease {
                actor,
                owner,
                token: row.token,
                expires_at: row.expires_at,
            })
        })
        .await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> StoreResult<Lease> {
        let p = self.part(&lease.actor);
        check_ttl("lease ttl", ttl)?;
        let lease = lease.clone();
        self.write_in(p, move |tx| renew_in(tx, lease, ttl, Timestamp::now()))
            .await
    }

    async fn renew_many(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> StoreResult<Vec<StoreResult<Lease>>> {
        check_ttl("lease ttl", ttl)?;
        let leases = leases.to_vec();
        // One write transaction for all of them. A lease that is lost (or whose row does not
        // decode) is its own slot's error and wrote nothing, so the others still commit; a
        // storage failure fails the whole batch (the writer aborts it).
        // Per partition, one write for all of that partition's leases; answers in the order
        // asked.
        let mut out: Vec<Option<StoreResult<Lease>>> = vec![None; leases.len()];
        for p in 0..self.partitions() {
            let mine: Vec<(usize, Lease)> = leases
                .iter()
                .enumerate()
                .filter(|(_, l)| self.part(&l.actor) == p)
                .map(|(i, l)| (i, l.clone()))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let slots: Vec<usize> = mine.iter().map(|(i, _)| *i).collect();
            let renewed = self
                .write_in(p, move |tx| {
                    let now = Timestamp::now();
                    let mut out = Vec::with_capacity(mine.len());
                    for (i, lease) in mine {
                        match renew_in(tx, lease, ttl, now) {
                            Err(e) if e.is_transient() => return Err(e),
                            r => out.push((i, r)),
                        }
                    }
                    Ok(out)
                })
                .await;
            match renewed {
                Ok(renewed) => {
                    for (i, r) in renewed {
                        out[i] = Some(r);
                    }
                }
                // One partition failing fails only its own leases' renewals: the others, in
                // healthy partitions, are renewed (and kept) all the same.
                Err(e) => {
                    for i in slots {
                        out[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or(Err(StoreError::Closed)))
            .collect())
    }

    async fn release(&self, lease: &Lease) -> StoreResult<bool> {
        let p = self.part(&lease.actor);
        let lease = lease.clone();
        self.write_in(p, move |tx| {
            let now = Timestamp::now();
            let row = get(&**tx.leases.get()?, &lease.actor)?;
            match row {
                Some(row) if row.token == lease.token && live(&row, now).is_some() => {
                    put(
                        tx,
                        &lease.actor,
                        &Row {
                            owner: None,
                            token: row.token,
                            expires_at: now,
                        },
                    )?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
        .await
    }

    async fn holder(&self, actor: &ActorId) -> StoreResult<Option<Lease>> {
        let p = self.part(actor);
        let actor = actor.clone();
        self.read_in(p, move |txn| {
            let now = Timestamp::now();
            let row = get(&txn.open_table(LEASES).map_err(se)?, &actor)?;
            Ok(row.and_then(|row| {
                live(&row, now).map(|owner| Lease {
                    actor: actor.clone(),
                    owner: owner.to_owned(),
                    token: row.token,
                    expires_at: row.expires_at,
                })
            }))
        })
        .await
    }
}

/// Releases every live lease (keeping its token); returns how many. For a store opened by a new
/// process: the previous holder is gone.
pub(super) fn release_all(tx: &mut Tx<'_>) -> StoreResult<u64> {
    let now = Timestamp::now();
    let table = tx.leases.get()?;
    let mut live_rows = Vec::new();
    for item in table.iter().map_err(se)? {
        let (k, v) = item.map_err(se)?;
        let actor = ActorId::from_stored(k.value(), "lease actor id")?;
        let row: Row = codec::decode(RecordType::Lease, v.value())
            .map_err(|e| StoreError::corrupt(format!("lease of {actor}"), e))?;
        if live(&row, now).is_some() {
            live_rows.push((actor, row.token));
        }
    }
    for (actor, token) in &live_rows {
        let row = Row {
            owner: None,
            token: *token,
            expires_at: now,
        };
        let bytes = codec::encode(RecordType::Lease, &row)
            .map_err(|e| StoreError::corrupt(format!("lease of {actor}"), e))?;
        table.insert(actor.as_str(), bytes.as_slice()).map_err(se)?;
    }
    Ok(live_rows.len() as u64)
}
