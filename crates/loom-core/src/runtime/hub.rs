//! In-process wake-ups: a message for an active actor, an event for a waiting invocation, a reply
//! for a local caller. Only an optimization: every waiter is also found by polling the store (an
//! active actor by the ready scan, which wakes it through here), so a wake-up that never comes
//! (the sender is on another node) only costs latency. An actor whose turn found its mailbox
//! empty waits for one before it looks again (`Next::Drained`), so a wake-up is kept for a
//! waiter that is not waiting yet: `Notify::notify_one` stores it. A stored wake-up may be for a
//! message the actor has already read (it came while the actor was busy, and the turn's own look
//! for the next message took that message), so each wake-up is also counted: an actor notes the
//! count before it reads its mailbox, and a wake-up counted before that is not a reason to read
//! it again ([`Signal::woken_since`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::{Notify, oneshot};

use crate::id::{ActorId, IdempotencyKey};

type Key = (ActorId, IdempotencyKey);

/// One waiter's wake-up: a [`Notify`] whose `notify_one` also counts.
#[derive(Default)]
pub(crate) struct Signal {
    notify: Notify,
    /// Wake-ups so far; raised before the `Notify` is, so a waiter woken sees its wake-up
    /// counted.
    count: AtomicU64,
}

impl Signal {
    /// Counts a wake-up and wakes the waiter (storing it if none waits).
    pub(crate) fn notify_one(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Completes at the next wake-up, or at once for one stored.
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// The wake-ups so far: taken before a read of what the waiter waits for, it tells later
    /// which wake-ups that read may have missed.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Completes once a wake-up counted after `seen` ([`count`](Self::count)) has come: one
    /// stored from before is taken and waited past, so it costs no read for nothing.
    pub(crate) async fn woken_since(&self, seen: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the count is read, so a wake-up between the two still wakes it.
            notified.as_mut().enable();
            if self.count() > seen {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Default)]
pub(crate) struct Hub {
    notifiers: Mutex<HashMap<ActorId, Arc<Signal>>>,
    replies: Mutex<HashMap<Key, Vec<oneshot::Sender<Value>>>>,
    /// True once a reply signal of the store has come, while they are read
    /// (`client::replies_from_other_nodes`): a signal then brings a waiting ask its reply at
    /// once, so the ask's own looks at the store are only the safety net, and it makes them
    /// less and less often.
    signalled: AtomicBool,
    /// Woken when signals may have been missed (read too slowly, or their stream ended): every
    /// waiting ask looks at the store soon (within `2 × poll_interval`).
    missed: Notify,
}

impl Hub {
    /// The wake-up for `id`, created if needed.
    pub(crate) fn notifier(&self, id: &ActorId) -> Arc<Signal> {
        let mut map = self.notifiers.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.clone()).or_default().clone()
    }

    /// Drops the wake-up for `id` (its actor passivated, its wait ended).
    pub(crate) fn forget(&self, id: &ActorId) {
        let mut map = self.notifiers.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id);
    }

    /// Drops the wake-up for `id` if it is still `notify` (not one registered since).
    pub(crate) fn forget_if(&self, id: &ActorId, notify: &Arc<Signal>) {
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

    /// Registers a local caller waiting for the result recorded under `key`. The wait leaves
    /// nothing behind when it is dropped, however the caller ends: answered, given up, or its
    /// own future dropped (an HTTP client gone, a `select!` or a timeout around the ask).
    pub(crate) fn wait_reply(self: &Arc<Self>, actor: &ActorId, key: &IdempotencyKey) -> ReplyWait {
        let (tx, rx) = oneshot::channel();
        let mut map = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        let k = (actor.clone(), key.clone());
        map.entry(k.clone()).or_default().push(tx);
        ReplyWait {
            rx: Some(rx),
            hub: self.clone(),
            key: k,
        }
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

    /// Says whether the store's reply signals come (one came) and are read; when they stop
    /// being read, every waiting ask looks soon (see [`missed_signals`](Self::missed_signals)).
    pub(crate) fn signals_read(&self, on: bool) {
        if self.signalled.swap(on, Ordering::AcqRel) && !on {
            self.missed.notify_waiters();
        }
    }

    /// True while the store's reply signals come and are read.
    pub(crate) fn signalled(&self) -> bool {
        self.signalled.load(Ordering::Acquire)
    }

    /// Says that some reply signals were missed: every waiting ask looks soon.
    pub(crate) fn signals_missed(&self) {
        self.missed.notify_waiters();
    }

    /// Completes when signals may have been missed ([`signals_missed`](Self::signals_missed),
    /// or their reading stopped) after this was called.
    pub(crate) fn missed_signals(&self) -> tokio::sync::futures::Notified<'_> {
        self.missed.notified()
    }

    /// True if a caller waits for the reply to `key` of `actor`.
    pub(crate) fn is_waiting(&self, actor: &ActorId, key: &IdempotencyKey) -> bool {
        let map = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        map.contains_key(&(actor.clone(), key.clone()))
    }

    /// Drops the waiters of `key` that gave up (their receivers are gone).
    fn prune(&self, k: &Key) {
        let mut map = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = map.get_mut(k) {
            v.retain(|tx| !tx.is_closed());
            if v.is_empty() {
                map.remove(k);
            }
        }
    }

    /// How many results local callers wait for.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.replies.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A local caller's wait for a recorded result ([`Hub::wait_reply`]): a future of the result,
/// which takes its sender out of the hub when dropped. (An `Err` says the hub dropped the
/// sender unanswered; wait again.)
pub(crate) struct ReplyWait {
    // `Some` until dropped: the receiver goes first, so that the prune sees it gone.
    rx: Option<oneshot::Receiver<Value>>,
    hub: Arc<Hub>,
    key: Key,
}

impl std::future::Future for ReplyWait {
    type Output = Result<Value, oneshot::error::RecvError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.rx.as_mut() {
            Some(rx) => std::pin::Pin::new(rx).poll(cx),
            // Never polled after it is dropped.
            None => std::task::Poll::Pending,
        }
    }
}

impl Drop for ReplyWait {
    fn drop(&mut self) {
        drop(self.rx.take());
        self.hub.prune(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait dropped before its answer (its caller's future dropped) leaves no sender behind,
    /// while another caller's wait for the same result is kept; an answered one leaves none.
    #[tokio::test]
    async fn a_wait_dropped_unanswered_leaves_nothing_behind() {
        let hub = Arc::new(Hub::default());
        let actor = ActorId::new("order", "1").unwrap();
        let key = IdempotencyKey::new("k").unwrap();
        let gone = hub.wait_reply(&actor, &key);
        let kept = hub.wait_reply(&actor, &key);
        // The caller's future dropped mid-wait, as an HTTP handler is when its client leaves.
        let caller = tokio::spawn(gone);
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        assert_eq!(hub.waiting(), 1, "the other caller still waits");
        hub.reply(&actor, &key, &serde_json::json!(7));
        assert_eq!(kept.await.unwrap(), serde_json::json!(7));
        assert_eq!(hub.waiting(), 0);
        for i in 0..100 {
            let key = IdempotencyKey::new(format!("k{i}")).unwrap();
            let wait = hub.wait_reply(&actor, &key);
            assert!(
                tokio::time::timeout(std::time::Duration::from_millis(1), wait)
                    .await
                    .is_err()
            );
        }
        assert_eq!(hub.waiting(), 0, "timed-out waits were left behind");
    }

    /// Waiting asks (which look for their replies rarely while signals are read) hear when
    /// signals were missed or stop being read, and only then.
    #[tokio::test]
    async fn waiting_asks_hear_when_signals_were_missed_or_stopped() {
        use std::time::Duration;
        let hub = Hub::default();
        assert!(!hub.signalled());
        hub.signals_read(true);
        assert!(hub.signalled());
        let quiet = hub.missed_signals();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), quiet)
                .await
                .is_err(),
            "told of missed signals when none were"
        );
        // Created before, awaited after: still told.
        let missed = hub.missed_signals();
        hub.signals_missed();
        tokio::time::timeout(Duration::from_secs(1), missed)
            .await
            .expect("told of missed signals");
        let stopped = hub.missed_signals();
        hub.signals_read(false);
        assert!(!hub.signalled());
        tokio::time::timeout(Duration::from_secs(1), stopped)
            .await
            .expect("told that signals stopped");
    }
}
