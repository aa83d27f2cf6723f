//! [`Membership`] on redb: one member frame per node in `MEMBERS`, in partition 0's file; the
//! rule of a heartbeat is [`beat`], shared with the simulated store.

use std::time::Duration;

use async_trait::async_trait;
use redb::ReadableTable;

use crate::error::StoreResult;
use crate::store::backend::{beat, prepare_heartbeat};
use crate::store::{Member, Membership, Roster};
use crate::time::Timestamp;

use super::EmbeddedStore;
use super::tables::{MEMBERS, Tx, se};

/// Removes every member record: at the first opening of a data directory, whose lock proves
/// that the process that wrote them is gone (one process at a time).
pub(super) fn forget_all(tx: &mut Tx<'_>) -> StoreResult<()> {
    let table = tx.members.get()?;
    let nodes: Vec<String> = table
        .iter()
        .map_err(se)?
        .map(|item| item.map(|(k, _)| k.value().to_owned()).map_err(se))
        .collect::<StoreResult<_>>()?;
    for n in nodes {
        table.remove(n.as_str()).map_err(se)?;
    }
    Ok(())
}

/// The partition whose file holds the members.
const HOME: u32 = 0;

#[async_trait]
impl Membership for EmbeddedStore {
    async fn heartbeat(
        &self,
        node: &str,
        incarnation: u64,
        kinds: &[&str],
        ttl: Duration,
    ) -> StoreResult<Member> {
        let (kinds, ttl) = prepare_heartbeat(node, kinds, ttl)?;
        let node = node.to_owned();
        self.write_in(HOME, move |tx| {
            let now = Timestamp::now();
            let table = tx.members.get()?;
            let mut existing = None;
            let mut forgotten = Vec::new();
            for item in table.iter().map_err(se)? {
                let (k, v) = item.map_err(se)?;
                let m = Member::decode(v.value())?;
                if k.value() == node {
                    existing = Some(m);
                } else if m.forgotten_at() <= now {
                    forgotten.push(k.value().to_owned());
                }
            }
            let member = beat(existing.as_ref(), &node, incarnation, kinds, ttl, now)?;
            let frame = member.encode()?;
            table.insert(node.as_str(), frame.as_slice()).map_err(se)?;
            for k in forgotten {
                table.remove(k.as_str()).map_err(se)?;
            }
            Ok(member)
        })
        .await
    }

    async fn leave(&self, node: &str, incarnation: u64) -> StoreResult<bool> {
        let node = node.to_owned();
        self.write_in(HOME, move |tx| {
            let table = tx.members.get()?;
            let ours = match table.get(node.as_str()).map_err(se)? {
                Some(v) => Member::decode(v.value())?.incarnation == incarnation,
                None => false,
            };
            if ours {
                table.remove(node.as_str()).map_err(se)?;
            }
            Ok(ours)
        })
        .await
    }

    async fn members(&self) -> StoreResult<Roster> {
        self.read_in(HOME, |txn| {
            let at = Timestamp::now();
            let table = txn.open_table(MEMBERS).map_err(se)?;
            let mut members = Vec::new();
            for item in table.iter().map_err(se)? {
                let (_, v) = item.map_err(se)?;
                let m = Member::decode(v.value())?;
                if m.forgotten_at() > at {
                    members.push(m);
                }
            }
            Ok(Roster { at, members })
        })
        .await
    }
}
