//! [`Alarms`]: when messages this node suspended come due, so that its dispatcher scans for
//! them at that moment instead of at its next poll.
//!
//! A suspended invocation's message becomes visible in the store at a known time (its sleep's
//! end, its wait's deadline). The dispatcher finds due messages by scanning the store's ready
//! index every `Config::poll_interval` (50 ms by default), which made a woken sleeper up to a
//! poll interval late. The node that suspends an invocation notes the time here; the dispatcher
//! also wakes at the earliest noted time and scans then. Only times are kept (8 bytes each, not
//! the actor), at most [`MAX_ALARMS`]; the poll stays the safety net (another node's
//! suspensions, alarms dropped over the bound, a clock that jumped).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::time::Timestamp;

/// Most alarms kept; later ones are dropped (their messages are found by the poll).
pub(crate) const MAX_ALARMS: usize = 1 << 20;

/// Alarms due within this much of each other ring once: one scan finds them all.
const COALESCE: Duration = Duration::from_millis(2);

/// The times at which messages this node suspended come due.
#[derive(Debug, Default)]
pub(crate) struct Alarms {
    heap: Mutex<BinaryHeap<Reverse<Instant>>>,
    /// Told when an alarm earlier than every other is set, so that the dispatcher's wait
    /// shortens.
    earlier: Notify,
}

impl Alarms {
    /// Notes that a message comes due at `at` (a store's wall-clock time).
    pub(crate) fn set(&self, at: Timestamp) {
        // A millisecond after: the store compares in whole milliseconds.
        let when =
            Instant::now() + at.saturating_since(Timestamp::now()) + Duration::from_millis(1);
        let mut heap = self.heap.lock().unwrap_or_else(|p| p.into_inner());
        if heap.len() >= MAX_ALARMS {
            return;
        }
        let first = heap.peek().is_none_or(|Reverse(t)| when < *t);
        heap.push(Reverse(when));
        drop(heap);
        if first {
            self.earlier.notify_one();
        }
    }

    /// Returns when the earliest alarm rings, having taken it and every other due by then (or
    /// within [`COALESCE`] of it); or when an earlier alarm is set (the caller then asks again).
    /// Never returns while there is no alarm, until one is set.
    pub(crate) async fn rung(&self) {
        let next = {
            let heap = self.heap.lock().unwrap_or_else(|p| p.into_inner());
            heap.peek().map(|Reverse(t)| *t)
        };
        let Some(at) = next else {
            self.earlier.notified().await;
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {
                let until = Instant::now() + COALESCE;
                let mut heap = self.heap.lock().unwrap_or_else(|p| p.into_inner());
                while heap.peek().is_some_and(|Reverse(t)| *t <= until) {
                    heap.pop();
                }
            }
            _ = self.earlier.notified() => {}
        }
    }

    /// How many alarms are set.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.heap.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rings_at_the_earliest_alarm_and_takes_those_due_with_it() {
        let alarms = Alarms::default();
        let now = Timestamp::now();
        alarms.set(now + Duration::from_millis(500));
        alarms.set(now + Duration::from_millis(100));
        alarms.set(now + Duration::from_millis(101));
        let began = Instant::now();
        alarms.rung().await; // the set of the 100 ms alarm shortened the wait: ask again
        alarms.rung().await;
        let waited = began.elapsed();
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_millis(150),
            "{waited:?}"
        );
        assert_eq!(alarms.len(), 1, "the 101 ms alarm rang with the 100 ms one");
        alarms.rung().await;
        assert!(began.elapsed() >= Duration::from_millis(500));
        assert_eq!(alarms.len(), 0);
    }
}
