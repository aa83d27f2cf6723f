//! [`Membership`] for [`SimStore`]: one record per node; the rule of a heartbeat is
//! [`beat`], shared with the embedded store.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use loom_core::StoreResult;
use loom_core::store::backend::{beat, prepare_heartbeat};
use loom_core::store::{Member, Membership, Roster};

use super::SimStore;

/// Every node's last heartbeat, by name. Invariant: no record past its
/// [`Member::forgotten_at`] is listed; a heartbeat removes them.
#[derive(Debug, Clone, Default)]
pub(super) struct Members {
    by_node: BTreeMap<String, Member>,
}

#[async_trait]
impl Membership for SimStore {
    async fn heartbeat(
        &self,
        node: &str,
        incarnation: u64,
        kinds: &[&str],
        ttl: Duration,
    ) -> StoreResult<Member> {
        let (kinds, ttl) = prepare_heartbeat(node, kinds, ttl)?;
        let name = node.to_owned();
        self.update("heartbeat", node, move |d, now| {
            let member = beat(
                d.members.by_node.get(&name),
                &name,
                incarnation,
                kinds,
                ttl,
                now,
            )?;
            d.members
                .by_node
                .retain(|n, m| *n == name || m.forgotten_at() > now);
            d.members.by_node.insert(name, member.clone());
            Ok(member)
        })
        .await
    }

    async fn leave(&self, node: &str, incarnation: u64) -> StoreResult<bool> {
        let name = node.to_owned();
        self.update("leave", node, move |d, _| {
            let ours = d
                .members
                .by_node
                .get(&name)
                .is_some_and(|m| m.incarnation == incarnation);
            if ours {
                d.members.by_node.remove(&name);
            }
            Ok(ours)
        })
        .await
    }

    async fn members(&self) -> StoreResult<Roster> {
        self.query("members", "", |d, now| {
            Ok(Roster {
                at: now,
                members: d
                    .members
                    .by_node
                    .values()
                    .filter(|m| m.forgotten_at() > now)
                    .cloned()
                    .collect(),
            })
        })
        .await
    }
}
