//! [`Alarms`]: when messages this node suspended come due, so that its dispatcher activates
//! their actors just before and hands them their messages at that moment, instead of finding
//! them at its next poll.
//!
//! A suspended invocation's message becomes visible in the store at a known time (its sleep's
//! end, its wait's deadline). The dispatcher finds due messages by scanning the store's ready
//! index every `Config::poll_interval` (50 ms by default), which made a woken sleeper up to a
//! poll interval late; and a sleeper found then still had to be activated (its state
//! recovered, its journal read) before its handler could go on. The node that suspends an invocation notes
//! here which actor comes due when. For a sleep, [`WARM_AHEAD`] before that moment the
//! dispatcher activates the actor ([`Ring::Warm`]): its state is recovered
//! while its message is not yet visible, so it waits idle; at the moment itself ([`Ring::Due`])
//! the dispatcher wakes it, and it leases its message at once. A wake-up is then one mailbox
//! lease and the replay of its invocation late, not an activation. A wait's deadline is not
//! warmed (its event usually comes first, and an actor activated for nothing would sit in
//! memory until idle): at its moment the dispatcher scans, as it does for a sleeper whose
//! warm-up did not happen (`max_active` full of actors in turns, more than one ring may start, or a
//! sleep suspended for less than the warm-up, whose activation was still leaving).
//!
//! The moment noted is the one the node asked the store for: the suspension's delay counted
//! from just before the call, as the embedded store counts it (a store with its own clock
//! counts from when its server ran the request, a little later: the dispatcher scans again
//! shortly after each due ring for those, `activation.rs`).
//!
//! Invariants: at most [`MAX_ALARMS`] alarms are kept, none further off than [`HORIZON`];
//! when full, a later alarm gives way to an earlier one; a ring starts at most the activations
//! it is given room for (`rung`), so a crowd due together is warmed in bounded batches and the
//! rest are found by scans, as before. An alarm only hurries what would happen anyway: an
//! actor activated early whose message is not there (its sleep cancelled, say) passivates when
//! idle, as any actor does; and the poll stays the safety net for whatever is not here (another
//! node's suspensions, alarms beyond the horizon or the bound, a clock that jumped, a warm
//! activation that failed, a message not visible yet when woken).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::id::ActorId;

/// Most alarms kept (an actor id each: a few MB at most).
pub(crate) const MAX_ALARMS: usize = 1 << 17;

/// Alarms further off than this are not kept: the poll finds their messages, and the bound
/// holds its room for the alarms that matter to lateness.
pub(crate) const HORIZON: Duration = Duration::from_secs(600);

/// How long before its message comes due an actor is activated: longer than an activation (a
/// lease write and a journal read) takes on a busy node, short enough that few actors are held
/// in memory for it (1 667 sleepers waking a second hold ~400 more).
pub(crate) const WARM_AHEAD: Duration = Duration::from_millis(250);

/// How long before its time an active actor leases its suspended message
/// ([`LeaseOptions::early`](crate::store::LeaseOptions::early)): longer than a warm ring looks
/// ahead ([`WARM_AHEAD`] + [`WARM_BATCH`]) with 50 ms to spare, so that an actor warmed for its
/// sleep takes its message as it activates and its replay waits out the rest of the sleep in
/// memory. Its handler then goes on at the moment itself after one write (the sleep's end,
/// journaled), where leasing the message at the moment cost a second one first.
pub(crate) const LEASE_EARLY: Duration = WARM_AHEAD
    .saturating_add(WARM_BATCH)
    .saturating_add(Duration::from_millis(50));

/// How early a node's leases take suspended messages ([`LeaseOptions::early`]) under
/// `Config::suspend_after`: [`LEASE_EARLY`], but at most half of `suspend_after`, so that a
/// replay whose clock is a little off the store's does not find more than `suspend_after` left
/// and suspend again at once; and none under 100 ms of `suspend_after`, where the margin would
/// be a few milliseconds of clock and rounding and the gain nothing.
///
/// [`LeaseOptions::early`]: crate::store::LeaseOptions::early
pub(crate) fn lease_early(suspend_after: Duration) -> Duration {
    if suspend_after < Duration::from_millis(100) {
        Duration::ZERO
    } else {
        LEASE_EARLY.min(suspend_after / 2)
    }
}

/// A warm ring also takes the actors due this much after the first it warms, so that a
/// crowd is activated in batches (their lease writes share group commits), not one by one.
const WARM_BATCH: Duration = Duration::from_millis(50);

/// How long a due ring waits after the first due alarm for the ones right behind it, so that a
/// crowd due over a few milliseconds is woken together.
const COALESCE: Duration = Duration::from_millis(2);

/// What a ring asks of the dispatcher.
#[derive(Debug, PartialEq)]
pub(crate) enum Ring {
    /// These sleepers' messages come due within [`WARM_AHEAD`]: activate them.
    Warm(Vec<ActorId>),
    /// These actors' messages are due: wake them.
    Due(Vec<ActorId>),
}

/// One noted alarm.
#[derive(Debug)]
struct Alarm {
    actor: ActorId,
    /// Whether to activate the actor ahead (a sleep), or only look at its moment (a wait).
    warm: bool,
}

#[derive(Debug, Default)]
struct Noted {
    /// By the millisecond their messages come due: alarms whose warm-up has not come yet.
    cold: BTreeMap<u64, Vec<Alarm>>,
    /// Alarms past their warm-up (activated ahead or not), waiting for their moment.
    warm: BTreeMap<u64, Vec<ActorId>>,
    /// Alarms in both.
    len: usize,
}

/// The moments at which messages this node suspended come due, and whose they are.
#[derive(Debug)]
pub(crate) struct Alarms {
    /// Times are milliseconds after this instant.
    base: Instant,
    noted: Mutex<Noted>,
    /// Told when an alarm earlier than every other is set, so that a waiting ring shortens.
    earlier: Notify,
}

impl Default for Alarms {
    fn default() -> Self {
        Alarms {
            base: Instant::now(),
            noted: Mutex::default(),
            earlier: Notify::new(),
        }
    }
}

/// Whole milliseconds as a `u64`, saturating.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Noted {
    /// When the next ring is due, in milliseconds after the base.
    fn next(&self) -> Option<u64> {
        let warm = self
            .cold
            .first_key_value()
            .map(|(&at, _)| at.saturating_sub(ms(WARM_AHEAD)));
        let due = self
            .warm
            .first_key_value()
            .map(|(&at, _)| at.saturating_add(ms(COALESCE)));
        match (warm, due) {
            (Some(w), Some(d)) => Some(w.min(d)),
            (w, d) => w.or(d),
        }
    }
}

impl Alarms {
    /// Notes that `actor`'s sleep ends `after` from now; ignored beyond [`HORIZON`].
    #[cfg(test)]
    fn set_after(&self, actor: &ActorId, after: Duration) {
        self.set_at(actor, Instant::now() + after, true);
    }

    /// Notes that `actor`'s message comes due at `at`, to be activated ahead if `warm` (a
    /// sleep); ignored beyond [`HORIZON`].
    pub(crate) fn set_at(&self, actor: &ActorId, at: Instant, warm: bool) {
        if at.saturating_duration_since(Instant::now()) > HORIZON {
            return;
        }
        // A millisecond after: the store compares whole milliseconds.
        let at = ms((at + Duration::from_millis(1)).saturating_duration_since(self.base));
        let mut noted = self.noted.lock().unwrap_or_else(|p| p.into_inner());
        if noted.len >= MAX_ALARMS {
            // Full: the latest not yet activated gives way, if it is later than this one.
            let Some(mut last) = noted.cold.last_entry() else {
                return;
            };
            if *last.key() <= at {
                return;
            }
            last.get_mut().pop();
            if last.get().is_empty() {
                last.remove();
            }
            noted.len -= 1;
        }
        let before = noted.next();
        noted.cold.entry(at).or_default().push(Alarm {
            actor: actor.clone(),
            warm,
        });
        noted.len += 1;
        let sooner = noted.next() != before;
        drop(noted);
        if sooner {
            self.earlier.notify_one();
        }
    }

    /// Returns once an alarm rings: at most `room()` sleepers whose messages come due within
    /// [`WARM_AHEAD`] (and [`WARM_BATCH`] more), to activate (the others in that span are left
    /// to their moment), or else (waiting [`COALESCE`] after the first for those right behind
    /// it) every actor whose message is due. Never returns while none is set. Safe to drop
    /// while waiting: nothing is taken until it returns.
    /// `room` is asked when an alarm goes off, not before: the room of that moment.
    pub(crate) async fn rung(&self, room: impl Fn() -> usize) -> Ring {
        loop {
            let next = self.noted.lock().unwrap_or_else(|p| p.into_inner()).next();
            let Some(next) = next else {
                self.earlier.notified().await;
                continue;
            };
            tokio::select! {
                // Ordered, as every select of the runtime (see `seam`): a simulation replays.
                biased;
                _ = self.earlier.notified() => continue,
                _ = tokio::time::sleep_until(self.base + Duration::from_millis(next)) => {}
            }
            let now = ms(Instant::now().saturating_duration_since(self.base));
            // Before the lock: `room` may take others.
            let room = room();
            let mut noted = self.noted.lock().unwrap_or_else(|p| p.into_inner());
            let Noted { cold, warm, len } = &mut *noted;
            // Due first: a crowd to activate must not hold up the ones whose moment has come.
            if warm
                .first_key_value()
                .is_some_and(|(&at, _)| at.saturating_add(ms(COALESCE)) <= now)
            {
                let later = warm.split_off(&now.saturating_add(1));
                let due: Vec<ActorId> = std::mem::replace(warm, later)
                    .into_values()
                    .flatten()
                    .collect();
                *len -= due.len();
                return Ring::Due(due);
            }
            let horizon = now.saturating_add(ms(WARM_AHEAD + WARM_BATCH));
            if cold.first_key_value().is_some_and(|(&at, _)| at <= horizon) {
                let later = cold.split_off(&horizon.saturating_add(1));
                let mut ids = Vec::new();
                for (at, alarms) in std::mem::replace(cold, later) {
                    let due = warm.entry(at).or_default();
                    for Alarm { actor, warm } in alarms {
                        if warm && ids.len() < room {
                            ids.push(actor.clone());
                        }
                        due.push(actor);
                    }
                }
                if !ids.is_empty() {
                    return Ring::Warm(ids);
                }
            }
        }
    }

    /// How many actors are noted.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.noted.lock().unwrap_or_else(|p| p.into_inner()).len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(key: &str) -> ActorId {
        ActorId::new("sleeper", key).unwrap()
    }

    fn ids(keys: &[&str]) -> Vec<ActorId> {
        keys.iter().map(|k| a(k)).collect()
    }

    #[test]
    fn leases_early_by_at_most_half_of_suspend_after_and_not_at_all_when_it_is_short() {
        let ms = Duration::from_millis;
        assert_eq!(lease_early(Duration::from_secs(1)), LEASE_EARLY);
        assert!(
            LEASE_EARLY > WARM_AHEAD + WARM_BATCH,
            "a warmed actor's lease takes its message"
        );
        assert_eq!(lease_early(ms(400)), ms(200));
        assert_eq!(lease_early(ms(100)), ms(50));
        assert_eq!(lease_early(ms(99)), Duration::ZERO);
        assert_eq!(lease_early(Duration::ZERO), Duration::ZERO);
        assert_eq!(lease_early(Duration::MAX), LEASE_EARLY);
    }

    #[tokio::test(start_paused = true)]
    async fn warms_ahead_then_rings_when_due_taking_only_those() {
        let alarms = Alarms::default();
        alarms.set_after(&a("late"), Duration::from_millis(2000));
        alarms.set_after(&a("first"), Duration::from_millis(1000));
        alarms.set_after(&a("second"), Duration::from_millis(1001));
        alarms.set_after(&a("third"), Duration::from_millis(1010));
        let began = Instant::now();
        let ring = alarms.rung(|| usize::MAX).await;
        let waited = began.elapsed();
        assert_eq!(ring, Ring::Warm(ids(&["first", "second", "third"])));
        assert!(
            waited >= Duration::from_millis(1000) - WARM_AHEAD
                && waited < Duration::from_millis(1000) - WARM_AHEAD + Duration::from_millis(5),
            "{waited:?}"
        );
        assert_eq!(alarms.len(), 4, "warmed actors stay noted until due");
        assert_eq!(
            alarms.rung(|| usize::MAX).await,
            Ring::Due(ids(&["first", "second"]))
        );
        let waited = began.elapsed();
        assert!(
            waited >= Duration::from_millis(1000) && waited < Duration::from_millis(1010),
            "{waited:?}"
        );
        assert_eq!(alarms.rung(|| usize::MAX).await, Ring::Due(ids(&["third"])));
        assert!(began.elapsed() >= Duration::from_millis(1010));
        assert_eq!(alarms.rung(|| usize::MAX).await, Ring::Warm(ids(&["late"])));
        assert_eq!(alarms.rung(|| usize::MAX).await, Ring::Due(ids(&["late"])));
        assert!(began.elapsed() >= Duration::from_millis(2000));
        assert_eq!(alarms.len(), 0);
    }

    /// A message due sooner than [`WARM_AHEAD`] is warmed at once and rung when due.
    #[tokio::test(start_paused = true)]
    async fn an_alarm_sooner_than_the_warm_up_warms_at_once() {
        let alarms = Alarms::default();
        alarms.set_after(&a("soon"), Duration::from_millis(50));
        let began = Instant::now();
        assert_eq!(alarms.rung(|| usize::MAX).await, Ring::Warm(ids(&["soon"])));
        assert!(began.elapsed() < Duration::from_millis(5));
        assert_eq!(alarms.rung(|| usize::MAX).await, Ring::Due(ids(&["soon"])));
        assert!(began.elapsed() >= Duration::from_millis(50));
    }

    /// A ring starts no more activations than it has room for, and none for a wait's deadline;
    /// every actor is still rung at its moment.
    #[tokio::test(start_paused = true)]
    async fn a_ring_warms_only_sleepers_and_no_more_than_it_has_room_for() {
        let alarms = Alarms::default();
        let at = Instant::now() + Duration::from_secs(1);
        alarms.set_at(&a("wait"), at, false);
        for k in ["s1", "s2", "s3"] {
            alarms.set_at(&a(k), at, true);
        }
        assert_eq!(alarms.rung(|| 2).await, Ring::Warm(ids(&["s1", "s2"])));
        // s3 found no room: it is not offered again, but rung with the others.
        assert_eq!(
            alarms.rung(|| 2).await,
            Ring::Due(ids(&["wait", "s1", "s2", "s3"]))
        );
        assert!(Instant::now() >= at);
        alarms.set_at(&a("crowd"), Instant::now() + Duration::from_secs(1), true);
        let began = Instant::now();
        assert_eq!(alarms.rung(|| 0).await, Ring::Due(ids(&["crowd"])));
        assert!(
            began.elapsed() >= Duration::from_secs(1),
            "no room: rung only when due"
        );
    }

    /// An alarm set while a ring waits for a later one shortens the wait.
    #[tokio::test(start_paused = true)]
    async fn an_earlier_alarm_shortens_a_waiting_ring() {
        let alarms = std::sync::Arc::new(Alarms::default());
        alarms.set_after(&a("later"), Duration::from_secs(10));
        let waiting = tokio::spawn({
            let alarms = alarms.clone();
            async move { alarms.rung(|| usize::MAX).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        alarms.set_after(&a("sooner"), Duration::from_secs(1));
        let began = Instant::now();
        assert_eq!(waiting.await.unwrap(), Ring::Warm(ids(&["sooner"])));
        assert!(began.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_earliest_when_full_and_nothing_beyond_the_horizon() {
        let alarms = Alarms::default();
        alarms.set_after(&a("beyond"), HORIZON + Duration::from_secs(1));
        assert_eq!(alarms.len(), 0, "an alarm beyond the horizon was kept");
        for i in 0..MAX_ALARMS as u64 {
            alarms.set_after(&a(&format!("s{i}")), Duration::from_millis(1000 + i / 4));
        }
        assert_eq!(alarms.len(), MAX_ALARMS);
        alarms.set_after(&a("dropped"), Duration::from_secs(500));
        alarms.set_after(&a("early"), Duration::from_millis(300));
        assert_eq!(alarms.len(), MAX_ALARMS, "the bound held");
        let began = Instant::now();
        assert_eq!(
            alarms.rung(|| usize::MAX).await,
            Ring::Warm(ids(&["early"]))
        );
        assert!(
            began.elapsed() < Duration::from_millis(100),
            "the earlier alarm was dropped instead of the latest"
        );
    }
}
