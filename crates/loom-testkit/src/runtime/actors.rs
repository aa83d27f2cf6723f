//! Actors the runtime cases drive, with a [`Probe`] to watch them from outside.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use loom_core::Timestamp;
use loom_core::runtime::{ActivityError, ActivityPolicy, Actor, Context, Rejected, StepError};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};

/// What the cases observe from outside the actors.
pub struct Probe {
    /// Runs of each activity (by name), counting re-runs after crashes.
    pub runs: Mutex<HashMap<String, u32>>,
    /// Activity keys handed out, in order.
    pub keys: Mutex<Vec<String>>,
    /// What each run of [`Step::Clock`] saw, in order, replays included.
    pub observed: Mutex<Vec<String>>,
    /// Handlers waiting at the gate take a permit; the case adds permits to let them go.
    pub gate: Semaphore,
    /// Signalled when a handler reaches the gate (or a holding activity starts).
    pub reached: Notify,
    in_flight: AtomicI64,
    /// The most handler invocations of one actor seen running at once.
    pub max_in_flight: AtomicI64,
    /// Set once the code is "fixed": [`Step::Broken`] panics until then.
    pub fixed: AtomicBool,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            runs: Mutex::default(),
            keys: Mutex::default(),
            observed: Mutex::default(),
            gate: Semaphore::new(0),
            reached: Notify::new(),
            in_flight: AtomicI64::new(0),
            max_in_flight: AtomicI64::new(0),
            fixed: AtomicBool::new(false),
        }
    }
}

impl Probe {
    /// How many times activity `name` ran.
    pub fn runs(&self, name: &str) -> u32 {
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// Lets `n` waiting handlers through the gate.
    pub fn open(&self, n: usize) {
        self.gate.add_permits(n);
    }

    pub(super) async fn hold(&self) {
        self.reached.notify_one();
        // The gate is never closed; a closed gate just lets everyone through.
        if let Ok(permit) = self.gate.acquire().await {
            permit.forget();
        }
    }
}

/// A bank account: the plain, no-durable-call actor.
pub struct Account {
    /// Shared with the case.
    pub probe: Arc<Probe>,
}

/// Account state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Balance {
    /// Cents.
    pub balance: i64,
    /// Deposits applied.
    pub deposits: u64,
    /// Filler set by [`AccountMsg::Grow`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub filler: String,
}

/// Account messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AccountMsg {
    /// Add.
    Deposit(i64),
    /// Take, or reject if it would go negative.
    Withdraw(i64),
    /// Read.
    Balance,
    /// Panic in the handler.
    Panic,
    /// Change the state, then wait at the probe's gate (not a durable call).
    Hold(i64),
    /// Change the state, then sleep (not a durable call) for this many ms.
    Slow(i64, u64),
    /// Change the state, then reject: the change must not stick.
    BadDeposit(i64),
    /// Grow the state by this many bytes (to go past the entry size limit).
    Grow(usize),
}

impl Actor for Account {
    const KIND: &'static str = "acct";
    type State = Balance;
    type Message = AccountMsg;
    type Reply = i64;

    async fn handle(
        &self,
        state: &mut Balance,
        _ctx: &mut Context<'_>,
        msg: AccountMsg,
    ) -> Result<i64, Rejected> {
        let now = self.probe.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.probe.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let result = match msg {
            AccountMsg::Deposit(n) => {
                state.balance += n;
                state.deposits += 1;
                Ok(state.balance)
            }
            AccountMsg::Withdraw(n) if n > state.balance => Err(Rejected::new(format!(
                "insufficient funds: {} < {n}",
                state.balance
            ))),
            AccountMsg::Withdraw(n) => {
                state.balance -= n;
                Ok(state.balance)
            }
            AccountMsg::Balance => Ok(state.balance),
            AccountMsg::Panic => {
                self.probe.in_flight.fetch_sub(1, Ordering::SeqCst);
                panic!("the handler blew up");
            }
            AccountMsg::Hold(n) => {
                state.balance += n;
                self.probe.hold().await;
                Ok(state.balance)
            }
            AccountMsg::Slow(n, ms) => {
                state.balance += n;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(state.balance)
            }
            AccountMsg::Grow(n) => {
                state.filler.push_str(&"x".repeat(n));
                Ok(state.filler.len() as i64)
            }
            AccountMsg::BadDeposit(n) => {
                state.balance += n;
                state.deposits += 1;
                Err(Rejected::new("deposit refused after the state was changed"))
            }
        };
        self.probe.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

/// One durable call in a [`Worker`] script.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Step {
    /// `ctx.activity(name, …)`; it fails if `fail`, and waits at the gate while running if `hold`.
    Activity {
        /// Name.
        name: String,
        /// Return an error.
        fail: bool,
        /// Wait at the gate inside the activity.
        hold: bool,
    },
    /// `ctx.send::<Account>(key, Deposit(amount))`.
    Send {
        /// Account key.
        key: String,
        /// Amount.
        amount: i64,
    },
    /// `ctx.send_after::<Account>(key, Deposit(amount), delay)`.
    SendAfter {
        /// Account key.
        key: String,
        /// Amount.
        amount: i64,
        /// Delay in ms.
        ms: u64,
    },
    /// `ctx.spawn::<Account>(Deposit(amount))`.
    Spawn {
        /// Amount.
        amount: i64,
    },
    /// `ctx.finish()`: the actor is retired once the invocation completes and its grace passes.
    Finish,
    /// `ctx.sleep(ms)`.
    Sleep {
        /// Duration in ms.
        ms: u64,
    },
    /// `ctx.wait_event(name, timeout)`.
    Wait {
        /// Event name.
        name: String,
        /// Timeout in ms.
        timeout_ms: Option<u64>,
    },
    /// `ctx.now()`, `ctx.random_u64()` and `ctx.uuid()`; what they returned goes to the probe's
    /// `observed` list on every run, replays included.
    Clock,
    /// `ctx.activity_with(name, …)` under `ActivityPolicy::retry(attempts)` with a backoff of
    /// `backoff_ms` (doubling) and a time limit per attempt of `timeout_ms`. Attempts before
    /// `ok_at` fail (never succeeds if 0), retryably unless `terminal` (then with the value
    /// `{"attempt": n}`); the first `hang` attempts never end. Each attempt's start is in the
    /// probe's `observed` list as `name attempt n at <ms>`.
    Retried {
        /// Name.
        name: String,
        /// The attempt that succeeds (0: none).
        ok_at: u32,
        /// Attempts in all.
        attempts: u32,
        /// First backoff in ms.
        backoff_ms: u64,
        /// Time limit per attempt in ms.
        timeout_ms: Option<u64>,
        /// Attempts that hang.
        hang: u32,
        /// Fail terminally.
        terminal: bool,
    },
    /// Wait at the probe's gate (not a durable call: a place to crash).
    Gate,
    /// Panic, every time, until the probe says the code is fixed ([`Probe::fixed`]).
    Broken,
    /// `tokio::time::timeout(ms, ctx.wait_event(name, None))`: a durable call's future dropped
    /// half-way, which the runtime must catch (the call's own timeout is the right way).
    TimedWait {
        /// Event name.
        name: String,
        /// When the future is dropped, in ms.
        ms: u64,
    },
    /// An activity whose closure panics until the probe says the code is fixed
    /// ([`Probe::fixed`]): `ctx.activity(name, …)` (one attempt) if `once`, else under a
    /// policy of 1000 attempts 10–50 ms apart, each looking at the probe.
    PanickyActivity {
        /// Name.
        name: String,
        /// One attempt (`ctx.activity`).
        once: bool,
    },
    /// Not a durable call: a line of `bytes` x's, for a reply as large as a case needs.
    Pad {
        /// Its length.
        bytes: usize,
    },
    /// `ctx.activity(name, …)` whose input is a line of `bytes` x's, for an activity's start
    /// as large as a case needs; it returns `<name> took <bytes>`.
    PaddedActivity {
        /// Name.
        name: String,
        /// The input's length.
        bytes: usize,
    },
    /// Not a durable call: `<label> at <ms>` (the node's clock now) goes to the probe's
    /// `observed` list on every run, replays included.
    Mark {
        /// What to call this place.
        label: String,
    },
}

/// Runs scripts of durable calls; its state logs what each step returned.
pub struct Worker {
    /// Shared with the case.
    pub probe: Arc<Probe>,
    /// Prefix for activity names: a different prefix is "changed code" for replay.
    pub version: &'static str,
}

/// Worker state: a line per step, over all invocations.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Log {
    /// Lines.
    pub lines: Vec<String>,
}

impl Actor for Worker {
    const KIND: &'static str = "worker";
    type State = Log;
    type Message = Vec<Step>;
    type Reply = Vec<String>;

    async fn handle(
        &self,
        state: &mut Log,
        ctx: &mut Context<'_>,
        script: Vec<Step>,
    ) -> Result<Vec<String>, Rejected> {
        let mut out = Vec::new();
        // Set when a wait ends for a cancellation: the rest of the script runs (compensation),
        // and the invocation then ends as cancelled, its lines the reason.
        let mut cancelled = false;
        for step in script {
            let line = match step {
                Step::Activity { name, fail, hold } => {
                    let name = format!("{}{name}", self.version);
                    let probe = self.probe.clone();
                    let n2 = name.clone();
                    let r: Result<String, StepError> = ctx
                        .activity(&name, &fail, |key| async move {
                            *probe
                                .runs
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(n2.clone())
                                .or_default() += 1;
                            probe
                                .keys
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(key.to_string());
                            if hold {
                                probe.hold().await;
                            }
                            if fail {
                                Err(format!("{n2} failed"))
                            } else {
                                Ok(format!("{n2} done"))
                            }
                        })
                        .await;
                    match r {
                        Ok(v) => v,
                        Err(StepError::ActivityFailed { error, .. }) => format!("error: {error}"),
                        Err(e) => return Err(e.into()),
                    }
                }
                Step::Send { key, amount } => {
                    ctx.send::<Account>(&key, &AccountMsg::Deposit(amount))?;
                    format!("sent {amount} to {key}")
                }
                Step::SendAfter { key, amount, ms } => {
                    ctx.send_after::<Account>(
                        &key,
                        &AccountMsg::Deposit(amount),
                        Duration::from_millis(ms),
                    )?;
                    format!("scheduled {amount} to {key}")
                }
                Step::Spawn { amount } => {
                    let child = ctx.spawn::<Account>(&AccountMsg::Deposit(amount))?;
                    format!("spawned {child}")
                }
                Step::Finish => {
                    ctx.finish();
                    "finished".to_owned()
                }
                Step::Pad { bytes } => "x".repeat(bytes),
                Step::Mark { label } => {
                    let line = format!("{label} at {}", Timestamp::now().as_millis());
                    self.probe
                        .observed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(line);
                    label
                }
                Step::Sleep { ms } => match ctx.sleep(Duration::from_millis(ms)).await {
                    Ok(()) => format!("slept {ms}"),
                    Err(StepError::Cancelled) => {
                        cancelled = true;
                        format!("sleep {ms}: cancelled")
                    }
                    Err(e) => return Err(e.into()),
                },
                Step::TimedWait { name, ms } => {
                    let waited = tokio::time::timeout(
                        Duration::from_millis(ms),
                        ctx.wait_event::<String>(&name, None),
                    )
                    .await;
                    match waited {
                        Ok(Ok(data)) => format!("event {name}: {data}"),
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => format!("event {name}: gave up waiting"),
                    }
                }
                Step::Wait { name, timeout_ms } => {
                    match ctx
                        .wait_event::<String>(&name, timeout_ms.map(Duration::from_millis))
                        .await
                    {
                        Ok(data) => format!("event {name}: {data}"),
                        Err(StepError::TimedOut { .. }) => format!("event {name}: timed out"),
                        Err(StepError::Cancelled) => {
                            cancelled = true;
                            format!("event {name}: cancelled")
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Step::Clock => {
                    let line = format!(
                        "now {} random {} uuid {}",
                        ctx.now()?,
                        ctx.random_u64()?,
                        ctx.uuid()?
                    );
                    self.probe
                        .observed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(line.clone());
                    line
                }
                Step::Retried {
                    name,
                    ok_at,
                    attempts,
                    backoff_ms,
                    timeout_ms,
                    hang,
                    terminal,
                } => {
                    let mut policy = ActivityPolicy::retry(attempts).backoff(
                        Duration::from_millis(backoff_ms),
                        Duration::from_millis(backoff_ms * 4),
                    );
                    if let Some(ms) = timeout_ms {
                        policy = policy.timeout(Duration::from_millis(ms));
                    }
                    let probe = self.probe.clone();
                    let r: Result<String, StepError> = ctx
                        .activity_with(&name, &(), policy, |_key, attempt| {
                            let probe = probe.clone();
                            let name = name.clone();
                            async move {
                                *probe
                                    .runs
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .entry(name.clone())
                                    .or_default() += 1;
                                probe
                                    .observed
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(format!(
                                        "{name} attempt {attempt} at {}",
                                        Timestamp::now().as_millis()
                                    ));
                                if attempt <= hang {
                                    std::future::pending::<()>().await;
                                }
                                if attempt == ok_at {
                                    return Ok(format!("{name} done on attempt {attempt}"));
                                }
                                let e = format!("{name} attempt {attempt} failed");
                                Err(if terminal {
                                    ActivityError::terminal(e)
                                        .with_value(&serde_json::json!({ "attempt": attempt }))
                                } else {
                                    ActivityError::retryable(e)
                                })
                            }
                        })
                        .await;
                    match r {
                        Ok(v) => v,
                        Err(e @ StepError::ActivityFailed { .. }) if terminal => {
                            return Err(e.into());
                        }
                        Err(StepError::ActivityFailed { error, .. }) => format!("error: {error}"),
                        Err(e) => return Err(e.into()),
                    }
                }
                Step::Gate => {
                    self.probe.hold().await;
                    "passed the gate".to_owned()
                }
                Step::PanickyActivity { name, once } => {
                    let done = format!("{name} done");
                    let probe = self.probe.clone();
                    // Many quick attempts, each looking at the probe: a fix made meanwhile
                    // is what a later attempt runs.
                    let policy = if once {
                        loom_core::runtime::ActivityPolicy::ONCE
                    } else {
                        loom_core::runtime::ActivityPolicy::retry(1000)
                            .backoff(Duration::from_millis(10), Duration::from_millis(50))
                    };
                    let r: Result<String, StepError> = ctx
                        .activity_with(&name, &(), policy, |_, _| {
                            let fixed = probe.fixed.load(Ordering::SeqCst);
                            let done = done.clone();
                            async move {
                                assert!(fixed, "an activity blew up");
                                Ok(done)
                            }
                        })
                        .await;
                    r?
                }
                Step::PaddedActivity { name, bytes } => {
                    let input = "x".repeat(bytes);
                    let r: Result<String, StepError> = ctx
                        .activity(&name, &input, |_| async move {
                            Ok::<_, String>(format!("took {bytes}"))
                        })
                        .await;
                    format!("{name} {}", r?)
                }
                Step::Broken => {
                    if !self.probe.fixed.load(Ordering::SeqCst) {
                        panic!("a broken step");
                    }
                    "fixed".to_owned()
                }
            };
            out.push(line.clone());
            state.lines.push(line);
        }
        if cancelled {
            return Err(Rejected::cancelled(out.join("; ")));
        }
        Ok(out)
    }
}

/// An actor kind no runtime in the cases registers.
#[derive(Default)]
pub struct Ghost;

impl Actor for Ghost {
    const KIND: &'static str = "ghost";
    type State = ();
    type Message = ();
    type Reply = ();

    async fn handle(
        &self,
        _state: &mut (),
        _ctx: &mut Context<'_>,
        _msg: (),
    ) -> Result<(), Rejected> {
        Ok(())
    }
}

/// The smallest stateful actor: kind `counter`, state `u64`; a message adds to it and the reply
/// is the new total (so `ask(0)` reads it). For tests that need an actor, not a behaviour.
#[derive(Default)]
pub struct Counter;

impl Actor for Counter {
    const KIND: &'static str = "counter";
    type State = u64;
    type Message = u64;
    type Reply = u64;

    async fn handle(&self, n: &mut u64, _ctx: &mut Context<'_>, add: u64) -> Result<u64, Rejected> {
        *n += add;
        Ok(*n)
    }
}

/// A message whose own serde code panics on a marker, as a hand-written `Deserialize` can:
/// decoding [`Touchy::POISON_IN`] panics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TouchyWord(pub String);

impl<'de> Deserialize<'de> for TouchyWord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let word = String::deserialize(d)?;
        assert_ne!(word, Touchy::POISON_IN, "decoding the message blew up");
        Ok(TouchyWord(word))
    }
}

/// [`Touchy`]'s state, the last word it was sent, whose own serde code panics on markers:
/// encoding [`Touchy::POISON_STATE`] and decoding [`Touchy::POISON_RECOVERY`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TouchyState(pub String);

impl Serialize for TouchyState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        assert_ne!(self.0, Touchy::POISON_STATE, "encoding the state blew up");
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TouchyState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let word = String::deserialize(d)?;
        assert_ne!(word, Touchy::POISON_RECOVERY, "decoding the state blew up");
        Ok(TouchyState(word))
    }
}

/// An actor that keeps the last word it was sent and answers its length; its types' serde
/// code panics on markers ([`TouchyWord`], [`TouchyState`]).
#[derive(Default)]
pub struct Touchy;

impl Touchy {
    /// A message whose decoding panics.
    pub const POISON_IN: &'static str = "poison-in";
    /// A word whose encoding, as the state, panics.
    pub const POISON_STATE: &'static str = "poison-state";
    /// A word that encodes as the state, and whose decoding, when the actor recovers, panics.
    pub const POISON_RECOVERY: &'static str = "poison-recovery";
    /// A message the handler panics on before it makes its future.
    pub const POISON_SYNC: &'static str = "poison-sync";
}

impl Actor for Touchy {
    const KIND: &'static str = "touchy";
    type State = TouchyState;
    type Message = TouchyWord;
    type Reply = usize;

    // A plain `fn`, as a handler may be written: its code before the future runs when it is
    // called, not when the future is polled.
    fn handle(
        &self,
        state: &mut TouchyState,
        _ctx: &mut Context<'_>,
        msg: TouchyWord,
    ) -> impl std::future::Future<Output = Result<usize, Rejected>> + Send {
        assert_ne!(
            msg.0,
            Touchy::POISON_SYNC,
            "the handler blew up before its future"
        );
        async move {
            state.0 = msg.0;
            Ok(state.0.len())
        }
    }
}

/// [`Gauge`]'s state: the mean of its last reading, and the last mean it was asked to keep.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GaugeState {
    /// `sum / n` of the last [`GaugeMsg::Mean`].
    pub mean: f64,
    /// `sum / n` of the last [`GaugeMsg::Keep`].
    pub kept: Option<f64>,
}

/// What a [`Gauge`] is asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GaugeMsg {
    /// Sets `mean` to `sum / n` (NaN for 0 / 0).
    Mean {
        /// Sum.
        sum: i64,
        /// Count.
        n: i64,
    },
    /// Sets `kept` to `Some(sum / n)`.
    Keep {
        /// Sum.
        sum: i64,
        /// Count.
        n: i64,
    },
    /// Sets `mean` to the value.
    Set(f64),
    /// `ctx.send::<Gauge>(to, Set(sum / n))`.
    Forward {
        /// The recipient's key.
        to: String,
        /// Sum.
        sum: i64,
        /// Count.
        n: i64,
    },
    /// Reads the state.
    Read,
}

/// An actor whose state holds floats, which JSON cannot hold when they are not finite; it
/// answers its state as text (`Debug`), which a NaN does not spoil.
#[derive(Default)]
pub struct Gauge;

impl Actor for Gauge {
    const KIND: &'static str = "gauge";
    type State = GaugeState;
    type Message = GaugeMsg;
    type Reply = String;

    async fn handle(
        &self,
        state: &mut GaugeState,
        ctx: &mut Context<'_>,
        msg: GaugeMsg,
    ) -> Result<String, Rejected> {
        match msg {
            GaugeMsg::Mean { sum, n } => state.mean = sum as f64 / n as f64,
            GaugeMsg::Keep { sum, n } => state.kept = Some(sum as f64 / n as f64),
            GaugeMsg::Set(value) => state.mean = value,
            GaugeMsg::Forward { to, sum, n } => {
                ctx.send::<Gauge>(&to, &GaugeMsg::Set(sum as f64 / n as f64))?
            }
            GaugeMsg::Read => {}
        }
        Ok(format!("{state:?}"))
    }
}

/// An actor whose state is JSON that each message nests deeper: `Nest`'s message `k` puts `k`
/// more levels of arrays at its innermost point (so each change's patch is shallow, naming the
/// place in its path), and the reply is how deep it nests now.
#[derive(Default)]
pub struct Nest;

impl Actor for Nest {
    const KIND: &'static str = "nest";
    type State = serde_json::Value;
    type Message = usize;
    type Reply = usize;

    async fn handle(
        &self,
        state: &mut serde_json::Value,
        _ctx: &mut Context<'_>,
        more: usize,
    ) -> Result<usize, Rejected> {
        let mut deeper = serde_json::json!(0);
        for _ in 0..more {
            deeper = serde_json::json!([deeper]);
        }
        let mut depth = 0;
        let mut probe = &*state;
        while let Some(inner) = probe.as_array().and_then(|a| a.first()) {
            probe = inner;
            depth += 1;
        }
        let mut at = &mut *state;
        for _ in 0..depth {
            at = &mut at[0];
        }
        *at = deeper;
        Ok(depth + more)
    }
}
