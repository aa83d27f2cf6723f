//! [`Membership`] on Redis: one hash of every node's record; see `loom.lua` (the scripts
//! `heartbeat`, `leave` and `members`, which judge liveness on the server's clock).

use std::time::Duration;

use async_trait::async_trait;
use loom_core::store::backend::prepare_heartbeat;
use loom_core::store::{FORGET_AFTER_TTLS, Member, Membership, Roster};
use loom_core::{StoreError, StoreResult, Timestamp};

use crate::RedisStore;
use crate::resp::*;

/// A record as `heartbeat` writes it: `<incarnation>|<joined>|<beat>|<ttl>|<kinds>`.
fn parse(node: &str, record: &str) -> StoreResult<Member> {
    let bad = || unexpected(format!("member record of {node} is malformed: {record:?}"));
    let mut parts = record.splitn(5, '|');
    let mut next_num =
        || -> StoreResult<u64> { parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad) };
    let incarnation = next_num()?;
    let joined = next_num()?;
    let beat = next_num()?;
    let ttl = next_num()?;
    let kinds = parts.next().ok_or_else(bad)?;
    Ok(Member {
        node: node.to_owned(),
        incarnation,
        kinds: kinds
            .split(',')
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect(),
        joined_at: Timestamp::from_millis(joined),
        beat_at: Timestamp::from_millis(beat),
        ttl: Duration::from_millis(ttl),
    })
}

#[async_trait]
impl Membership for RedisStore {
    async fn heartbeat(
        &self,
        node: &str,
        incarnation: u64,
        kinds: &[&str],
        ttl: Duration,
    ) -> StoreResult<Member> {
        let (kinds, ttl) = prepare_heartbeat(node, kinds, ttl)?;
        let r = self
            .run(
                &self.scripts.heartbeat,
                &[&self.keys.members()],
                vec![
                    s(node),
                    s(incarnation),
                    s(ttl.as_millis()),
                    s(kinds.join(",")),
                    s(FORGET_AFTER_TTLS),
                ],
            )
            .await?;
        match status(&r).as_str() {
            "ok" => Ok(Member {
                node: node.to_owned(),
                incarnation,
                kinds,
                joined_at: Timestamp::from_millis(number(r.get(1), "joined")?),
                beat_at: Timestamp::from_millis(number(r.get(2), "beat")?),
                ttl,
            }),
            "taken" => Err(StoreError::NodeTaken {
                node: node.to_owned(),
                incarnation: number(r.get(1), "incarnation")?,
                remaining_ms: number(r.get(2), "remaining")?,
            }),
            other => Err(unexpected(format!("heartbeat replied {other}"))),
        }
    }

    async fn leave(&self, node: &str, incarnation: u64) -> StoreResult<bool> {
        let r = self
            .run(
                &self.scripts.leave,
                &[&self.keys.members()],
                vec![s(node), s(incarnation)],
            )
            .await?;
        match status(&r).as_str() {
            "ok" => Ok(number(r.get(1), "removed")? == 1),
            other => Err(unexpected(format!("leave replied {other}"))),
        }
    }

    async fn members(&self) -> StoreResult<Roster> {
        let r = self
            .run(&self.scripts.members, &[&self.keys.members()], vec![])
            .await?;
        let at = Timestamp::from_millis(number(r.first(), "now")?);
        let mut members = Vec::with_capacity(r.len() / 2);
        for pair in r[1..].chunks(2) {
            let (Some(node), Some(record)) = (text(pair.first()), text(pair.get(1))) else {
                return Err(unexpected("members replied an odd list"));
            };
            let m = parse(&node, &record)?;
            if m.forgotten_at() > at {
                members.push(m);
            }
        }
        members.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(Roster { at, members })
    }
}
