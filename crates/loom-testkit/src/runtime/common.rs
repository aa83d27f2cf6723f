//! What the runtime cases share: ids, steps, and waiting for what the test actors report.

use std::time::Duration;

use loom_core::{ActorId, EntryKind};
use serde_json::Value;

use super::{Harness, Step, eventually};

pub(super) const WAIT: Duration = Duration::from_secs(20);

pub(super) fn acct(key: &str) -> ActorId {
    ActorId::new("acct", key).expect("id")
}

pub(super) fn worker(key: &str) -> ActorId {
    ActorId::new("worker", key).expect("id")
}

pub(super) fn activity(name: &str) -> Step {
    Step::Activity {
        name: name.into(),
        fail: false,
        hold: false,
    }
}

/// Waits until the actor's journal holds `n` `Completed` or `Failed` entries.
pub(super) async fn finished(h: &Harness, id: &ActorId, n: usize) {
    eventually(
        WAIT,
        &format!("{n} finished invocations of {id}"),
        || async {
            h.count(id, |k| {
                matches!(k, EntryKind::Completed { .. } | EntryKind::Failed { .. })
            })
            .await
                >= n
        },
    )
    .await;
}

/// The replies journaled by the actor's completed invocations.
pub(super) async fn replies(h: &Harness, id: &ActorId) -> Vec<Value> {
    h.journal(id)
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            EntryKind::Completed { reply } => Some(reply),
            _ => None,
        })
        .collect()
}

/// The errors journaled by the actor's failed invocations.
pub(super) async fn failures(h: &Harness, id: &ActorId) -> Vec<String> {
    h.journal(id)
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            EntryKind::Failed { error, .. } => Some(error),
            _ => None,
        })
        .collect()
}

pub(super) async fn reached(h: &Harness) {
    tokio::time::timeout(WAIT, h.probe.reached.notified())
        .await
        .expect("a handler reached the gate");
}

/// Waits until `rt` lists `id` parked, with a reason containing `why`, and checks that its
/// message is kept: still waiting in its mailbox, and nothing dead-lettered.
pub(super) async fn parked_keeping_its_message(
    h: &Harness,
    rt: &loom_core::Runtime,
    id: &ActorId,
    why: &str,
) {
    eventually(WAIT, "the actor is parked", || async {
        !rt.parked().await.unwrap().is_empty()
    })
    .await;
    let (parked, park) = rt.parked().await.unwrap().remove(0);
    assert_eq!(&parked, id);
    assert!(park.reason.contains(why), "{}", park.reason);
    assert_eq!(h.store.pending(id).await.unwrap(), 1, "the message is kept");
    assert!(h.store.dead_letters(None, 10).await.unwrap().is_empty());
}
