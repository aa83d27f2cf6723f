//! This node among the nodes sharing its store: a heartbeat every third of the lease ttl
//! announces its name, its incarnation and the kinds it hosts
//! ([`Membership::heartbeat`](crate::store::Membership::heartbeat)), so that every node and
//! `loom cluster status` see which processes run and which kinds have a live host. A graceful
//! shutdown leaves; a crash (or [`Runtime::kill`](super::Runtime::kill)) does not, and the
//! record runs out one lease ttl after its last beat.
//!
//! What a refused heartbeat means is in [`NodeHealth`](super::NodeHealth): the runtime owns no
//! partition meanwhile (it hands off those it holds, and takes none), beats on, and joins once
//! its name is its own.

use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use crate::error::{StoreError, StoreResult};
use crate::store::Member;

/// How soon a heartbeat that failed for the store's sake (not a refusal) is tried again.
const RETRY: Duration = Duration::from_millis(500);

/// The longest a shutdown waits to remove the node's record (before its drain): a store that
/// does not answer leaves the record to run out.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long after a refused heartbeat the name's record is sure to have run out, if its process
/// beats no more: the refusal's `remaining_ms` is counted from the store's reading of its clock,
/// a little before the answer arrives here.
const JOIN_MARGIN: Duration = Duration::from_millis(5);

/// When to beat again after a heartbeat that met `r`, beating every `every` (a third of the
/// ttl) otherwise: sooner after a failure, and after a refusal as soon as the record that
/// refused it runs out, if that comes first. A process restarted under a crashed one's name so
/// joins when the name is free, not up to a third of a ttl later: meanwhile the other nodes,
/// seeing the name gone, would take its partitions, only to hand them back once it joined.
fn next_beat(r: &StoreResult<Member>, every: Duration) -> Duration {
    match r {
        Ok(_) => every,
        Err(StoreError::NodeTaken { remaining_ms, .. }) => {
            every.min(Duration::from_millis(*remaining_ms) + JOIN_MARGIN)
        }
        Err(_) => every.min(RETRY),
    }
}

/// Beats until the runtime shuts down.
pub(super) async fn heartbeats(shared: Arc<Shared>) {
    let ttl = shared.config.lease_ttl;
    let every = ttl / 3;
    loop {
        let r = {
            let left = shared.left.lock().await;
            if *left || shared.shutdown.is_cancelled() {
                return;
            }
            shared
                .store
                .heartbeat(&shared.config.node, shared.incarnation, &shared.hosted, ttl)
                .await
        };
        shared.health.heartbeat(&r, ttl);
        if let Err(e) = &r
            && !matches!(e, StoreError::NodeTaken { .. })
        {
            tracing::warn!(error = %e, "heartbeat failed; trying again");
        }
        let next = next_beat(&r, every);
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// Removes this node's record at the start of a graceful shutdown (before the drain, so that
/// the other nodes take its partitions as it hands them off), so that other nodes see it gone
/// at once rather than a lease ttl later, after any heartbeat in flight and before none
/// (see `Shared::left`). A failure, or no answer within [`LEAVE_TIMEOUT`], is logged: the
/// record then runs out by itself.
pub(super) async fn leave(shared: &Shared) {
    let leaving = async {
        let mut left = shared.left.lock().await;
        *left = true;
        shared
            .store
            .leave(&shared.config.node, shared.incarnation)
            .await
    };
    match tokio::time::timeout(LEAVE_TIMEOUT, leaving).await {
        Ok(Ok(true)) => tracing::debug!(node = %shared.config.node, "left"),
        // Never recorded (refused, or stopped before the first beat), or taken over since.
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::warn!(
            error = %e,
            "could not remove this node's membership record; it runs out by itself"
        ),
        Err(_) => tracing::warn!(
            "the store did not answer the leave within {LEAVE_TIMEOUT:?}; this node's membership record runs out by itself"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(remaining_ms: u64) -> StoreResult<Member> {
        Err(StoreError::NodeTaken {
            node: "n".into(),
            incarnation: 1,
            remaining_ms,
        })
    }

    #[test]
    fn a_refused_heartbeat_is_sent_again_once_the_record_that_refused_it_runs_out() {
        let every = Duration::from_millis(500);
        // A crashed process's record with 120 ms left: beat just after it runs out, not a
        // third of a ttl later.
        assert_eq!(next_beat(&taken(120), every), Duration::from_millis(125));
        // A live process's record, beaten again before it runs out: the usual period.
        assert_eq!(next_beat(&taken(1_400), every), every);
        // A record run out by the time the store answered is not beaten against at once in a
        // loop: the margin is the least wait.
        assert_eq!(next_beat(&taken(0), every), JOIN_MARGIN);
        let failed: StoreResult<Member> = Err(StoreError::InvalidRequest("x".into()));
        assert_eq!(next_beat(&failed, every), RETRY);
        assert_eq!(
            next_beat(&failed, Duration::from_millis(100)),
            Duration::from_millis(100)
        );
    }
}
