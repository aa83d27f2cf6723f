//! Timers: scheduled messages and durable sleeps, and the check that every timer fires exactly
//! once and none early.
//!
//! An [`Alarm`] actor takes two kinds of timer:
//! - [`AlarmMsg::Set`] schedules a [`AlarmMsg::Ring`] to itself `ms` later
//!   ([`Context::send_after`]); the ring records when it was handled;
//! - [`AlarmMsg::Nap`] sleeps `ms` inside the invocation ([`Context::sleep`]: a durable timer,
//!   continued, not restarted, after a crash) and records when it began and ended.
//!
//! The check: every timer set rings exactly once, never before its due time; every nap lasts
//! at least its `ms`; nothing rings that was not set. Exactly, although the nodes' clocks
//! disagree (a simulated skew), because each time is read on the clock the promise is made by:
//! - a nap's start and end come from [`Context::now`] (journaled, so a replay sees the first
//!   run's), on the clocks of the nodes that ran those steps: a sleep ends when the clock of the
//!   node that runs it reaches the journaled `fire_at` (its start plus `ms`), whichever node
//!   began it;
//! - a ring's due time is the setting node's clock plus `ms`, which is also when the store
//!   makes the scheduled message due (by its own clock); so the ring records the store's clock
//!   ([`seam::store_now`], through an activity, so that a replay reads the journaled value).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loom_core::runtime::{Actor, AskOptions, Context, Rejected, Runtime, RuntimeBuilder};
use loom_core::{Timestamp, seam};
use serde::{Deserialize, Serialize};

use super::{Errors, ask_until, key, paced, until_ok};

/// Actors the timers are spread over: several timers share an actor, so rings queue behind
/// naps and naps behind rings.
const ALARMS: u32 = 3;

/// How long (simulated) the check waits for the last rings.
const RING_WAIT: Duration = Duration::from_secs(120);

/// How long (simulated) the check waits after every timer rang once, for a second ring to show
/// (a ring delivered again after its visibility timeout, 5 s in a run).
const SECOND_RING: Duration = Duration::from_secs(10);

/// An actor holding timers.
#[derive(Default)]
pub struct Alarm;

/// What an alarm recorded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlarmState {
    /// Timer id → when its ring is due.
    pub set: BTreeMap<u32, Timestamp>,
    /// Timer id → when each of its rings was handled (exactly one, in a healthy run).
    pub rung: BTreeMap<u32, Vec<Timestamp>>,
    /// Timer id → (began, ended, ms asked for).
    pub naps: BTreeMap<u32, (Timestamp, Timestamp, u64)>,
}

/// What an alarm receives.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum AlarmMsg {
    /// Schedule timer `id` to ring in `ms`.
    Set {
        /// The timer.
        id: u32,
        /// Its delay.
        ms: u64,
    },
    /// Timer `id` rings (sent by `Set`, due at `due`).
    Ring {
        /// The timer.
        id: u32,
        /// When it was due.
        due: Timestamp,
    },
    /// Sleep `ms` as timer `id`.
    Nap {
        /// The timer.
        id: u32,
        /// How long.
        ms: u64,
    },
    /// Reply with the state.
    Report,
}

impl Actor for Alarm {
    const KIND: &'static str = "alarm";
    type State = AlarmState;
    type Message = AlarmMsg;
    type Reply = Option<AlarmState>;

    async fn handle(
        &self,
        state: &mut AlarmState,
        ctx: &mut Context<'_>,
        msg: AlarmMsg,
    ) -> Result<Option<AlarmState>, Rejected> {
        match msg {
            AlarmMsg::Set { id, ms } => {
                let due = ctx.now()? + Duration::from_millis(ms);
                let me = ctx.actor_id().key().to_owned();
                ctx.send_after::<Alarm>(
                    me,
                    &AlarmMsg::Ring { id, due },
                    Duration::from_millis(ms),
                )?;
                state.set.insert(id, due);
            }
            AlarmMsg::Ring { id, .. } => {
                // The store's clock: the one the scheduled message was due by.
                let now = ctx
                    .activity("store-clock", &id, |_| async {
                        Ok::<_, String>(seam::store_now())
                    })
                    .await?;
                state.rung.entry(id).or_default().push(now);
            }
            AlarmMsg::Nap { id, ms } => {
                let began = ctx.now()?;
                ctx.sleep(Duration::from_millis(ms)).await?;
                let ended = ctx.now()?;
                state.naps.insert(id, (began, ended, ms));
            }
            AlarmMsg::Report => return Ok(Some(state.clone())),
        }
        Ok(None)
    }
}

/// The timer workload of a run: `timers` timers (even ones `Set`, odd ones `Nap`) over
/// [`ALARMS`] actors.
#[derive(Clone)]
pub struct Timers {
    /// Timers.
    pub timers: u32,
    seed: u64,
    acked: Arc<Mutex<BTreeSet<u32>>>,
    errors: Errors,
}

impl Timers {
    /// `timers` timers drawn from `seed`.
    pub fn new(seed: u64, timers: u32) -> Timers {
        Timers {
            timers,
            seed,
            acked: Arc::default(),
            errors: Errors::default(),
        }
    }

    /// Registers the alarm on a node.
    pub fn register(builder: RuntimeBuilder) -> RuntimeBuilder {
        builder.register::<Alarm>()
    }

    /// Timer `i`: its actor's key and its message.
    fn plan(&self, i: u32) -> (String, AlarmMsg) {
        let mut rng = fastrand::Rng::with_seed(self.seed ^ 0x71_3e ^ (u64::from(i) << 24));
        let actor = format!("al{}", i % ALARMS);
        let msg = if i.is_multiple_of(2) {
            AlarmMsg::Set {
                id: i,
                ms: rng.u64(50..=4_000),
            }
        } else {
            AlarmMsg::Nap {
                id: i,
                ms: rng.u64(50..=2_000),
            }
        };
        (actor, msg)
    }

    fn acked(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        self.acked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Timers acknowledged so far.
    pub fn acknowledged(&self) -> usize {
        self.acked().len()
    }

    /// Starts every timer below `upto` not acknowledged yet, spread `over` the round, timer
    /// `i` through node `i % nodes`, each retried with its key until acknowledged.
    pub async fn drive(self, nodes: Vec<Runtime>, upto: u32, over: Duration) {
        let pending: Vec<u32> = {
            let acked = self.acked();
            (0..upto.min(self.timers))
                .filter(|i| !acked.contains(i))
                .collect()
        };
        let this = &self;
        paced(pending, over, |i| {
            let rt = nodes[i as usize % nodes.len()].clone();
            async move {
                let (actor, msg) = this.plan(i);
                let alarm = match rt.actor::<Alarm>(&actor) {
                    Ok(a) => a,
                    Err(e) => return this.errors.push(format!("alarm/{actor}: {e}")),
                };
                let answered = ask_until(|| {
                    let opts = AskOptions {
                        idempotency_key: Some(key(format!("timer-{i}"))),
                        timeout: None,
                        ..Default::default()
                    };
                    alarm.ask_with(msg, opts)
                })
                .await;
                if let Err(e) = answered {
                    this.errors.push(format!("timer {i}: {e}"));
                }
                this.acked().insert(i);
            }
        })
        .await;
    }

    /// Every alarm's state.
    async fn states(&self, rt: &Runtime) -> Result<BTreeMap<String, AlarmState>, String> {
        let mut states = BTreeMap::new();
        for a in 0..ALARMS.min(self.timers) {
            let actor = rt
                .actor::<Alarm>(format!("al{a}"))
                .map_err(|e| e.to_string())?;
            let state = until_ok(|| actor.ask(AlarmMsg::Report))
                .await
                .ok_or_else(|| format!("alarm/al{a} answered a report with nothing"))?;
            states.insert(format!("al{a}"), state);
        }
        Ok(states)
    }

    /// Waits (up to [`RING_WAIT`]) until every timer set has rung, and [`SECOND_RING`] more,
    /// then checks every timer: each set one rang exactly once, not before its due time; each
    /// nap lasted its `ms`; nothing rang that was not set (see the [module docs](self) for the
    /// clocks). Call after [`drive`](Self::drive) acknowledged them all.
    pub async fn check(&self, rt: &Runtime) -> Result<(), String> {
        self.errors.check()?;
        let waited = tokio::time::Instant::now();
        loop {
            let waiting = self
                .states(rt)
                .await?
                .values()
                .any(|s| s.set.keys().any(|id| !s.rung.contains_key(id)));
            if !waiting || waited.elapsed() > RING_WAIT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(SECOND_RING).await;
        let states = self.states(rt).await?;
        for i in 0..self.timers {
            let (actor, msg) = self.plan(i);
            let s = &states[&actor];
            match msg {
                AlarmMsg::Set { id, ms } => {
                    let Some(due) = s.set.get(&id) else {
                        return Err(format!(
                            "timer {id} (alarm/{actor}) was acknowledged but never set"
                        ));
                    };
                    match s.rung.get(&id).map(Vec::as_slice) {
                        None | Some([]) => {
                            return Err(format!(
                                "timer {id} (alarm/{actor}, {ms} ms, due {due}) never rang within {} s",
                                RING_WAIT.as_secs()
                            ));
                        }
                        Some([at]) if at < due => {
                            return Err(format!(
                                "timer {id} (alarm/{actor}) rang at {at}, before it was due at {due}"
                            ));
                        }
                        Some([_]) => {}
                        Some(many) => {
                            return Err(format!(
                                "timer {id} (alarm/{actor}) rang {} times: {many:?}",
                                many.len()
                            ));
                        }
                    }
                }
                AlarmMsg::Nap { id, ms } => {
                    let Some((began, ended, _)) = s.naps.get(&id) else {
                        return Err(format!(
                            "nap {id} (alarm/{actor}) was acknowledged but never taken"
                        ));
                    };
                    if *ended < *began + Duration::from_millis(ms) {
                        return Err(format!(
                            "nap {id} (alarm/{actor}) of {ms} ms began at {began} and ended early, at {ended}"
                        ));
                    }
                }
                AlarmMsg::Ring { .. } | AlarmMsg::Report => {}
            }
        }
        for (actor, s) in &states {
            if let Some(id) = s.rung.keys().find(|id| !s.set.contains_key(id)) {
                return Err(format!(
                    "timer {id} rang at alarm/{actor} but was never set there"
                ));
            }
        }
        Ok(())
    }
}
