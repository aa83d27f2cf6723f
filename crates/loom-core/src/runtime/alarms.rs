//! [`Alarms`]: when messages this node suspended come due, so that its dispatcher scans for
//! them at that moment instead of at its next poll.
//!
//! A suspended invocation's message becomes visible in the store at a known time (its sleep's
//! end, its wait's deadline). The dispatcher finds due messages by scanning the store's ready
//! index every `Config::poll_interval` (50 ms by default), which made a woken sleeper up to a
//! poll interval late. The node that suspends an invocation notes the time here; the dispatcher
//! also wakes when a noted time has come and scans then.
//!
//! Invariants: only times are kept, counted per millisecond (`BTreeMap<ms, count>`: a crowd of
//! sleepers due together costs one entry), at most [`MAX_ALARMS`] distinct milliseconds, none
//! further off than [`HORIZON`]; when full, a later alarm gives way to an earlier one. The
//! poll stays the safety net for whatever is not here (another node's suspensions, alarms
//! beyond the horizon or the bound, a clock that jumped).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Most distinct milliseconds kept.
pub(crate) const MAX_ALARMS: usize = 1 << 16;

/// Alarms further off than this are not kept: the poll finds their messages, and the bound
/// holds its room for the alarms that matter to lateness.
pub(crate) const HORIZON: Duration = Duration::from_secs(600);

/// How long a ring waits after the first due alarm for the ones right behind it, so that a
/// crowd due over a few milliseconds is found by one scan.
const COALESCE: Duration = Duration::from_millis(2);

/// The times at which messages this node suspended come due.
#[derive(Debug)]
pub(crate) struct Alarms {
    /// Times are milliseconds after this instant.
    base: Instant,
    due: Mutex<BTreeMap<u64, u32>>,
    /// Told when an alarm earlier than every other is set, so that a waiting ring shortens.
    earlier: Notify,
}

impl Default for Alarms {
    fn default() -> Self {
        Alarms {
            base: Instant::now(),
            due: Mutex::default(),
            earlier: Notify::new(),
        }
    }
}

impl Alarms {
    /// Notes that a message comes due `after` from now; ignored beyond [`HORIZON`].
    pub(crate) fn set_after(&self, after: Duration) {
        if after > HORIZON {
            return;
        }
        // A millisecond after: the store compares whole milliseconds.
        let at = Instant::now() + after + Duration::from_millis(1);
        let ms =
            u64::try_from(at.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX);
        let mut due = self.due.lock().unwrap_or_else(|p| p.into_inner());
        if !due.contains_key(&ms) && due.len() >= MAX_ALARMS {
            match due.last_key_value() {
                Some((&last, _)) if last > ms => {
                    due.remove(&last);
                }
                _ => return,
            }
        }
        let first = due.first_key_value().is_none_or(|(&f, _)| ms < f);
        *due.entry(ms).or_default() += 1;
        drop(due);
        if first {
            self.earlier.notify_one();
        }
    }

    /// Returns once an alarm has come due, having taken every alarm due by then (waiting
    /// [`COALESCE`] after the first for those right behind it). Never returns while none is
    /// set. Safe to drop while waiting: nothing is taken until it returns.
    pub(crate) async fn rung(&self) {
        loop {
            let next = {
                let due = self.due.lock().unwrap_or_else(|p| p.into_inner());
                due.first_key_value().map(|(&ms, _)| ms)
            };
            let Some(ms) = next else {
                self.earlier.notified().await;
                continue;
            };
            let at = self.base + Duration::from_millis(ms) + COALESCE;
            tokio::select! {
                // Ordered, as every select of the runtime (see `seam`): a simulation replays.
                biased;
                _ = self.earlier.notified() => continue,
                _ = tokio::time::sleep_until(at) => {}
            }
            let now = u64::try_from(
                Instant::now()
                    .saturating_duration_since(self.base)
                    .as_millis(),
            )
            .unwrap_or(u64::MAX);
            let mut due = self.due.lock().unwrap_or_else(|p| p.into_inner());
            let later = due.split_off(&(now.saturating_add(1)));
            *due = later;
            return;
        }
    }

    /// How many distinct milliseconds have alarms.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.due.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rings_when_alarms_come_due_and_takes_only_those() {
        let alarms = Alarms::default();
        alarms.set_after(Duration::from_millis(500));
        alarms.set_after(Duration::from_millis(100));
        alarms.set_after(Duration::from_millis(101));
        alarms.set_after(Duration::from_millis(110));
        let began = Instant::now();
        alarms.rung().await;
        let waited = began.elapsed();
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_millis(110),
            "{waited:?}"
        );
        assert_eq!(
            alarms.len(),
            2,
            "the 100 and 101 ms alarms rang together, no later one"
        );
        alarms.rung().await;
        assert!(began.elapsed() >= Duration::from_millis(110));
        assert_eq!(alarms.len(), 1);
        alarms.rung().await;
        assert!(began.elapsed() >= Duration::from_millis(500));
        assert_eq!(alarms.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_earliest_when_full_and_nothing_beyond_the_horizon() {
        let alarms = Alarms::default();
        alarms.set_after(HORIZON + Duration::from_secs(1));
        assert_eq!(alarms.len(), 0, "an alarm beyond the horizon was kept");
        for i in 0..MAX_ALARMS as u64 {
            alarms.set_after(Duration::from_millis(1000 + i));
        }
        assert_eq!(alarms.len(), MAX_ALARMS);
        alarms.set_after(Duration::from_millis(10));
        assert_eq!(alarms.len(), MAX_ALARMS, "the bound held");
        let began = Instant::now();
        alarms.rung().await;
        assert!(
            began.elapsed() < Duration::from_millis(100),
            "the earlier alarm was dropped instead of the latest"
        );
    }
}
