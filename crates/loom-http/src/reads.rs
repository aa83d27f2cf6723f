//! Store reads of `/metrics` run in the background, one at a time per gauge: a scrape waits
//! for a read within its bound and shows the latest one that ended otherwise, so that a read
//! slower than the bound (a kind's backlog walked over a million mailboxes) still ends and is
//! shown, and scrapes that come often do not each start one.
//!
//! Invariants kept here:
//! - at most one read per [`Background`] is under way at any time (`running`);
//! - a read that succeeded after [`REUSED_PAST`] or more is reused for four times as long as
//!   it took, so long reads of one gauge keep the store busy at most a fifth of the time,
//!   however often scrapes come (a quicker read is not reused: each scrape reads afresh);
//! - a value is shown only if the latest read ended with it: a read that failed shows nothing
//!   (NaN), never the older value, and nothing older than [`STALE_AFTER`] is shown;
//! - every read ends: one that panics, or takes over [`READ_LIMIT`], ends as a failure, so a
//!   hung connection cannot keep a gauge from ever being read again.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The oldest value a scrape shows while a newer read is under way: past it, NaN.
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(600);

/// How long a read must have taken to be reused by later scrapes.
pub(crate) const REUSED_PAST: Duration = Duration::from_secs(1);

/// How long a read may take before it is given up as failed.
pub(crate) const READ_LIMIT: Duration = Duration::from_secs(120);

/// A read that ended: its outcome, and when and after how long.
#[derive(Debug, Clone)]
pub(crate) struct Ended<T> {
    pub(crate) value: Result<T, String>,
    pub(crate) at: Instant,
    took: Duration,
}

impl<T> Ended<T> {
    /// True if a scrape may show this rather than start another read: it succeeded, took
    /// [`REUSED_PAST`] or more, and a fourth of the time since it ended is less than it took.
    fn fresh(&self) -> bool {
        let age = self.at.elapsed();
        self.value.is_ok()
            && self.took >= REUSED_PAST
            && age < self.took.saturating_mul(4)
            && age < STALE_AFTER
    }
}

#[derive(Debug)]
struct Slot<T> {
    latest: Option<Ended<T>>,
    /// How many reads have ended: a scrape takes a read that ended after it began by this.
    ended: u64,
    running: bool,
}

/// One gauge's reads; see the module's documentation.
#[derive(Debug)]
pub(crate) struct Background<T> {
    slot: Mutex<Slot<T>>,
    ended: Notify,
}

impl<T> Default for Background<T> {
    fn default() -> Self {
        Background {
            slot: Mutex::new(Slot {
                latest: None,
                ended: 0,
                running: false,
            }),
            ended: Notify::new(),
        }
    }
}

impl<T: Clone + Send + 'static> Background<T> {
    /// What a scrape ending by `deadline` shows: the latest read if it is fresh; otherwise
    /// the read `start` makes (unless one is under way already, which is waited for instead)
    /// once one of `permits` is free, if it ends by `deadline`; otherwise the latest read, if
    /// it succeeded within [`STALE_AFTER`] (a read under way still ends, in the background,
    /// for a later scrape). `None`: nothing to show (no read ended yet, or the latest failed).
    pub(crate) async fn read<F>(
        self: &Arc<Self>,
        deadline: Instant,
        permits: &Arc<tokio::sync::Semaphore>,
        start: impl FnOnce() -> F,
    ) -> Option<Ended<T>>
    where
        F: Future<Output = Result<T, String>> + Send + 'static,
    {
        let mut start = Some(start);
        let mut seen = None;
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before the slot is looked at: a read ending in between still wakes
            // us.
            ended.as_mut().enable();
            let begin = {
                let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
                let seen = *seen.get_or_insert(slot.ended);
                match slot.latest.as_ref() {
                    // What this scrape waited for, or fresh enough to show.
                    Some(latest) if slot.ended > seen || latest.fresh() => {
                        return Some(latest.clone());
                    }
                    _ => {}
                }
                let begin = !slot.running && start.is_some();
                slot.running |= begin;
                begin
            };
            // Begun outside the lock: the guard takes it when it ends the read, which may be
            // at once (a `start` that panics, a runtime shutting down that drops the task).
            if begin && let Some(start) = start.take() {
                let ending = Ending {
                    me: Arc::clone(self),
                    ended: None,
                };
                let read = start();
                spawn(ending, Arc::clone(permits), read);
            }
            // Late is not an error here: the read goes on for the next scrape, and this one
            // shows what the latest read found, if that may be shown.
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                break;
            }
        }
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let latest = slot.latest.as_ref()?;
        let shown = latest.value.is_ok() && latest.at.elapsed() < STALE_AFTER;
        shown.then(|| latest.clone())
    }
}

/// Ends a read in its slot when dropped: as it ended, or as a failure if it never did (its
/// task cancelled by a runtime shutting down, or a `start` that panicked).
struct Ending<T> {
    me: Arc<Background<T>>,
    ended: Option<(Result<T, String>, Duration)>,
}

impl<T> Drop for Ending<T> {
    fn drop(&mut self) {
        let (value, took) = self.ended.take().unwrap_or_else(|| {
            (
                Err("the read was cancelled before it ended".into()),
                Duration::ZERO,
            )
        });
        let mut slot = self.me.slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.latest = Some(Ended {
            value,
            at: Instant::now(),
            took,
        });
        slot.ended += 1;
        slot.running = false;
        drop(slot);
        self.me.ended.notify_waiters();
    }
}

/// Runs `read` in the background, timed from when a permit is free, and records how it
/// ended in `ending`, whatever happens to it.
fn spawn<T, F>(ending: Ending<T>, permits: Arc<tokio::sync::Semaphore>, read: F)
where
    T: Send + 'static,
    F: Future<Output = Result<T, String>> + Send + 'static,
{
    use futures::FutureExt;
    tokio::spawn(async move {
        // Moved in whole (not its field alone): dropped with the task if it is cancelled.
        let mut ending = ending;
        // The semaphore is never closed: an error here cannot come.
        let _permit = permits.acquire_owned().await;
        let began = Instant::now();
        let value = match tokio::time::timeout(
            READ_LIMIT,
            std::panic::AssertUnwindSafe(read).catch_unwind(),
        )
        .await
        {
            Ok(Ok(value)) => value,
            Ok(Err(_)) => Err("the read panicked".into()),
            Err(_) => Err(format!("the read took over {READ_LIMIT:?}")),
        };
        ending.ended = Some((value, began.elapsed()));
        drop(ending);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn permits() -> Arc<tokio::sync::Semaphore> {
        Arc::new(tokio::sync::Semaphore::new(4))
    }

    fn counted(
        n: &Arc<AtomicU32>,
        took: Duration,
        value: Result<u32, String>,
    ) -> impl Future<Output = Result<u32, String>> + Send + 'static {
        let n = Arc::clone(n);
        async move {
            let i = n.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(took).await;
            value.map(|v| v + i)
        }
    }

    /// A read slower than the scrape's bound ends in the background and the next scrape shows
    /// it; scrapes meanwhile start no second read; a fresh read is reused.
    #[tokio::test(start_paused = true)]
    async fn a_slow_read_is_shown_by_a_later_scrape_and_never_doubled() {
        let reads = Arc::new(AtomicU32::new(0));
        let b = Arc::new(Background::<u32>::default());
        let bound = Duration::from_secs(2);
        let slow = Duration::from_secs(5);
        let first = b
            .read(Instant::now() + bound, &permits(), || {
                counted(&reads, slow, Ok(100))
            })
            .await;
        assert!(first.is_none(), "nothing ended yet: {first:?}");
        let second = b
            .read(Instant::now() + bound, &permits(), || {
                counted(&reads, slow, Ok(100))
            })
            .await;
        assert!(second.is_none());
        assert_eq!(reads.load(Ordering::SeqCst), 1, "one read under way");
        // The read ended (at 5 s): shown, and reused for four times what it took.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let third = b
            .read(Instant::now() + bound, &permits(), || {
                counted(&reads, slow, Ok(100))
            })
            .await
            .expect("the read ended");
        assert_eq!(third.value, Ok(101));
        tokio::time::sleep(Duration::from_secs(15)).await;
        let fourth = b
            .read(Instant::now() + bound, &permits(), || {
                counted(&reads, slow, Ok(100))
            })
            .await
            .expect("reused");
        assert_eq!((fourth.value, reads.load(Ordering::SeqCst)), (Ok(101), 1));
        // Past that, a new read starts; while it runs, the older value is shown.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let fifth = b
            .read(Instant::now() + bound, &permits(), || {
                counted(&reads, slow, Ok(100))
            })
            .await
            .expect("the older value meanwhile");
        assert_eq!((fifth.value, reads.load(Ordering::SeqCst)), (Ok(101), 2));
        tokio::time::sleep(slow).await;
        let sixth = b
            .read(Instant::now() + bound, &permits(), || {
                counted(&reads, slow, Ok(100))
            })
            .await
            .expect("the new read");
        assert_eq!(sixth.value, Ok(102));
    }

    /// A read that fails shows nothing, and is not reused: the next scrape reads again. A
    /// value older than STALE_AFTER is not shown while a read hangs.
    #[tokio::test(start_paused = true)]
    async fn a_failed_or_stale_read_shows_nothing() {
        let reads = Arc::new(AtomicU32::new(0));
        let b = Arc::new(Background::<u32>::default());
        let bound = Duration::from_secs(2);
        let quick = Duration::from_millis(10);
        let ok = b
            .read(Instant::now() + bound, &permits(), || {
                counted(&reads, quick, Ok(0))
            })
            .await
            .expect("read");
        assert_eq!(ok.value, Ok(1));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let failed = b
            .read(Instant::now() + bound, &permits(), || {
                counted(&reads, quick, Err("down".into()))
            })
            .await
            .expect("the failure ended on time");
        assert_eq!(failed.value, Err("down".to_owned()));
        // The next scrape reads again, at once.
        let again = b
            .read(Instant::now() + bound, &permits(), || {
                counted(&reads, quick, Ok(0))
            })
            .await
            .expect("read");
        assert_eq!((again.value, reads.load(Ordering::SeqCst)), (Ok(3), 3));
        // A read that hangs: the last value is shown meanwhile, until the read is given up
        // after READ_LIMIT as a failure; a scrape then reads again, and shows nothing while
        // that read has not ended.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let hang = STALE_AFTER * 2;
        let during = b
            .read(Instant::now() + bound, &permits(), || {
                counted(&reads, hang, Ok(0))
            })
            .await
            .expect("the last value");
        assert_eq!(during.value, Ok(3));
        tokio::time::sleep(READ_LIMIT).await;
        let given_up = b
            .read(Instant::now() + bound, &permits(), || {
                counted(&reads, hang, Ok(0))
            })
            .await;
        assert!(given_up.is_none(), "{given_up:?}");
        assert_eq!(
            reads.load(Ordering::SeqCst),
            5,
            "the hung read, and one more"
        );
    }

    /// A read that panics ends as a failure, and the next scrape reads again (*before* the
    /// guard: the gauge was never read again).
    #[tokio::test(start_paused = true)]
    async fn a_read_that_panics_ends_and_the_next_scrape_reads_again() {
        let b = Arc::new(Background::<u32>::default());
        let bound = Duration::from_secs(2);
        let panicked = b
            .read(Instant::now() + bound, &permits(), || async move {
                if bound > Duration::ZERO {
                    panic!("a bug under the read (an intentional panic)");
                }
                Ok(0)
            })
            .await
            .expect("ended");
        assert_eq!(panicked.value, Err("the read panicked".to_owned()));
        let again = b
            .read(Instant::now() + bound, &permits(), || async { Ok(7) })
            .await
            .expect("read");
        assert_eq!(again.value, Ok(7));
    }
}
