//! This node among the nodes sharing its store: a heartbeat every third of the lease ttl
//! announces its name, its incarnation and the kinds it hosts
//! ([`Membership::heartbeat`](crate::store::Membership::heartbeat)), so that every node and
//! `loom cluster status` see which processes run and which kinds have a live host. A graceful
//! shutdown leaves; a crash (or [`Runtime::kill`](super::Runtime::kill)) does not, and the
//! record runs out one lease ttl after its last beat.
//!
//! What a refused heartbeat means is in [`NodeHealth`](super::NodeHealth): the runtime goes on
//! running its actors (leases and fences keep them safe), beats on, and joins once its name
//! is its own.

use std::sync::Arc;
use std::time::Duration;

use super::Shared;

/// How soon a heartbeat that failed for the store's sake (not a refusal) is tried again.
const RETRY: Duration = Duration::from_millis(500);

/// The longest a shutdown waits to remove the node's record (before its drain): a store that
/// does not answer leaves the record to run out.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

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
        let next = match &r {
            Ok(_) | Err(crate::StoreError::NodeTaken { .. }) => every,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed; trying again");
                every.min(RETRY)
            }
        };
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
