//! In-process wake-ups: a message for an active actor, an event for a waiting invocation, a reply
//! for a local caller. Only an optimization: every waiter is also found by polling the store (an
//! active actor by the ready scan, which wakes it through here), so a wake-up that never comes
//! (the sender is on another node) only costs latency. An actor whose turn found its mailbox
//! empty waits for one before it looks again (`Next::Drained`), so a wake-up is kept for a
//! waiter that is not waiting yet: `Notify::notify_one` stores it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::{Notify, oneshot};

use crate::id::{ActorId, IdempotencyKey};

type Key = (ActorId, IdempotencyKey);

#[derive(Default)]
pub(crate) struct Hub {
    notifiers: Mutex<HashMap<ActorId, Arc<Notify>>>,
    replies: Mutex<HashMap<Key, Vec<oneshot::Sender<Value>>>>,
}

impl Hub {
    /// The wake-up for `id`, created if needed.
    pub(crate) fn notifier(&self, id: &ActorId) -> Arc<Notify> {
        let mut map = self.notifiers.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.clone()).or_default().clone()
    }

    /// Drops the wake-up for `id` (its actor passivated, its wait ended).
    pub(crate) fn forget(&self, id: &ActorId) {
        let mut map = self.notifiers.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id);
    }

    /// Drops the wake-up for `id` if it is still `notify` (not one registered since).
    pub(crate) fn forget_if(&self, id: &ActorId, notify: &Arc<Notify>) {
        let mut map = self.notifiers.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(id).is_some_and(|n| Arc::ptr_eq(n, notify)) {
            map.remove(id);
        }
    }

    /// Wakes whoever waits on `id`; returns false if nobody in this process does.
    pub(crate) fn notify(&self, id: &ActorId) -> bool {
        let map = self.notifiers.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(id) {
            Some(n) => {
                n.notify_one();
                true
            }
            None => false,
        }
    }

    /// Registers a local caller waiting for the result recorded under `key`.
    pub(crate) fn wait_reply(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
    ) -> oneshot::Receiver<Value> {
        let (tx, rx) = oneshot::channel();
        let mut map = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((actor.clone(), key.clone()))
            .or_default()
            .push(tx);
        rx
    }

    /// Hands a recorded result to the local callers waiting for it.
    pub(crate) fn reply(&self, actor: &ActorId, key: &IdempotencyKey, value: &Value) {
        let waiting = {
            let mut map = self.replies.lock().unwrap_or_else(|p| p.into_inner());
            map.remove(&(actor.clone(), key.clone()))
        };
        for tx in waiting.into_iter().flatten() {
            // A caller that gave up waiting has dropped its receiver; nothing to deliver.
            let _ = tx.send(value.clone());
        }
    }

    /// True if a caller waits for the reply to `key` of `actor`.
    pub(crate) fn is_waiting(&self, actor: &ActorId, key: &IdempotencyKey) -> bool {
        let map = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        map.contains_key(&(actor.clone(), key.clone()))
    }

    /// Drops waiters that gave up on `key`.
    pub(crate) fn prune(&self, actor: &ActorId, key: &IdempotencyKey) {
        let mut map = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        let k = (actor.clone(), key.clone());
        if let Some(v) = map.get_mut(&k) {
            v.retain(|tx| !tx.is_closed());
            if v.is_empty() {
                map.remove(&k);
            }
        }
    }
}
