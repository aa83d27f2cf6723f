//! Durable activities: [`Context::activity`] and [`Context::activity_with`], their retry and
//! timeout policy ([`ActivityPolicy`]) and their errors ([`ActivityError`]).
//!
//! An activity's step in the journal:
//!
//! ```text
//! activity_started (attempt 1 runs)
//! [activity_attempt_failed (attempt n, error, retry_at)  activity_retried (attempt n+1 runs)]*
//! activity_completed | activity_failed
//! ```
//!
//! Invariants kept here:
//! - an attempt runs only after the entry that starts it is durable (`activity_started` or
//!   `activity_retried`), so a crash during it is seen on replay and counted against the
//!   message (rule D17), and the attempt runs again with the same key;
//! - a failed attempt's next start (`retry_at`) is journaled before the backoff begins, so a
//!   restart keeps the schedule: it neither starts the backoff over nor runs early;
//! - a backoff longer than `Config::suspend_after` suspends the invocation like a long sleep.

use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::Instrument;

use crate::entry::EntryKind;
use crate::time::Timestamp;

use super::config::Retry;
use super::context::{ActivityKey, Context, Interrupt, StepError};

/// How an activity is retried and timed out ([`Context::activity_with`]).
///
/// `retry.max_attempts` counts every attempt (1: no retry; an attempt cut short by a crash
/// runs again under the same number, so `f` may see a number twice); before attempt `n + 1` the
/// activity waits [`Retry::delay`]`(n)`: `min(initial * 2^(n-1), max)` with jitter (a factor
/// in `[0.5, 1.5)`). Each attempt may be cut off after `attempt_timeout` (the attempt's future
/// is dropped, and the timeout counts as a retryable error). A panic in `f` or its future is a
/// retryable error too ("attempt N panicked: …") while attempts are left; out of the last
/// attempt it fails the whole message, as a panic in a handler does, instead of being recorded
/// as the step's failure. State the closure changed before it panicked stays changed for the
/// next attempt (it should change none: a replay does not run it).
///
/// ```
/// use std::time::Duration;
/// use loom_core::runtime::ActivityPolicy;
///
/// let p = ActivityPolicy::retry(5)
///     .backoff(Duration::from_millis(200), Duration::from_secs(60))
///     .timeout(Duration::from_secs(10));
/// assert_eq!(p.retry.max_attempts, 5);
/// assert_eq!(p.attempt_timeout, Some(Duration::from_secs(10)));
/// assert_eq!(ActivityPolicy::ONCE.retry.max_attempts, 1);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivityPolicy {
    /// Attempts and backoff.
    pub retry: Retry,
    /// Longest an attempt may run (`None`: no limit).
    pub attempt_timeout: Option<Duration>,
}

impl ActivityPolicy {
    /// One attempt, no time limit: the first error is final (what [`Context::activity`] does).
    pub const ONCE: ActivityPolicy = ActivityPolicy {
        retry: Retry {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            max_attempts: 1,
        },
        attempt_timeout: None,
    };

    /// Up to `max_attempts` attempts in all, with the default backoff (100 ms doubling to 30 s).
    pub fn retry(max_attempts: u32) -> Self {
        ActivityPolicy {
            retry: Retry {
                max_attempts: max_attempts.max(1),
                ..Retry::default()
            },
            attempt_timeout: None,
        }
    }

    /// The same with a backoff from `initial` doubling up to `max`.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.retry.initial = initial;
        self.retry.max = max.max(initial);
        self
    }

    /// The same with every attempt cut off after `limit`.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.attempt_timeout = Some(limit);
        self
    }
}

impl Default for ActivityPolicy {
    /// [`Retry::default`]: 5 attempts, 100 ms doubling to 30 s; no time limit.
    fn default() -> Self {
        ActivityPolicy {
            retry: Retry::default(),
            attempt_timeout: None,
        }
    }
}

/// Why an attempt of an activity failed, and whether to try again.
///
/// A [`retryable`](Self::retryable) error is retried while the policy allows; a
/// [`terminal`](Self::terminal) one ends the activity at once. Either may carry a typed value
/// ([`with_value`](Self::with_value)) that reaches the handler in
/// [`StepError::ActivityFailed`] and, through `?`, the caller in `AskError::Rejected`.
///
/// ```
/// use loom_core::runtime::ActivityError;
///
/// let e = ActivityError::terminal("card declined").with_value(&serde_json::json!({ "code": 51 }));
/// assert!(e.is_terminal());
/// assert_eq!(e.to_string(), "card declined");
/// assert!(!ActivityError::retryable("connection reset").is_terminal());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ActivityError {
    message: String,
    value: Option<Value>,
    terminal: bool,
}

impl ActivityError {
    /// An error worth another attempt (a timeout, a refused connection, a 503).
    pub fn retryable(error: impl Display) -> Self {
        ActivityError {
            message: error.to_string(),
            value: None,
            terminal: false,
        }
    }

    /// An error no retry will fix (a declined card, a 400): the activity fails now.
    pub fn terminal(error: impl Display) -> Self {
        ActivityError {
            message: error.to_string(),
            value: None,
            terminal: true,
        }
    }

    /// The same error with a typed value for the handler and its caller. A value that does not
    /// encode as JSON, or is larger than
    /// [`MAX_ERROR_VALUE_BYTES`](crate::limits::MAX_ERROR_VALUE_BYTES), is left out, and the
    /// message says why.
    pub fn with_value<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        match crate::limits::error_value(value) {
            Ok(v) => self.value = Some(v),
            Err(why) => self.message = format!("{} ({why})", self.message),
        }
        self
    }

    /// True if no retry is wanted.
    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    /// The error's text.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The typed value, as JSON, if any.
    pub fn value(&self) -> Option<&Value> {
        self.value.as_ref()
    }
}

impl Display for ActivityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ActivityError {}

impl Context<'_> {
    /// Runs a side effect once per journal: journals that it starts, runs `f`, and journals its
    /// result before the handler goes on. After a crash, a completed activity returns its
    /// journaled result without running again; one that started but never finished runs again
    /// with the same [`ActivityKey`] (at-least-once: the outside system dedupes with the key).
    ///
    /// `f`'s error is journaled as text and returned as [`StepError::ActivityFailed`], at once:
    /// for retries, a time limit or a typed error, use [`activity_with`](Self::activity_with).
    ///
    /// The output returned is the one the journal keeps: `f`'s value encoded to JSON and decoded
    /// back, as every replay returns it (a field its serialization skips comes back as its
    /// default). An output the journal cannot keep, one that does not encode to JSON or decode
    /// from it (`f64::NAN` becomes `null`) or over
    /// [`MAX_ENTRY_BYTES`](crate::limits::MAX_ENTRY_BYTES) encoded, fails the step for good
    /// with [`StepError::ActivityFailed`]: `f` ran, and is not run again.
    ///
    /// Here an invocation is cut short by a crash after its activity ran; the next process
    /// replays it, and the activity returns its journaled result instead of running again:
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use loom_core::runtime::{Actor, AskOptions, Context, Rejected, Runtime, SendOptions};
    /// use loom_core::IdempotencyKey;
    ///
    /// struct Mailer {
    ///     runs: Arc<AtomicU32>,
    ///     journaled: Arc<tokio::sync::Notify>,
    /// }
    ///
    /// impl Actor for Mailer {
    ///     const KIND: &'static str = "mailer";
    ///     type State = ();
    ///     type Message = String;
    ///     type Reply = String;
    ///
    ///     async fn handle(&self, _: &mut (), ctx: &mut Context<'_>, to: String) -> Result<String, Rejected> {
    ///         let (runs, address) = (self.runs.clone(), to.clone());
    ///         // Live: runs the closure and journals its result. Replay: returns the journaled
    ///         // result without running it again.
    ///         let receipt = ctx
    ///             .activity("send-mail", &to, |key| async move {
    ///                 // `key` is the same on every run of this step: pass it to the mail
    ///                 // service as its idempotency key.
    ///                 runs.fetch_add(1, Ordering::SeqCst);
    ///                 Ok::<_, String>(format!("queued for {address}"))
    ///             })
    ///             .await?;
    ///         self.journaled.notify_one(); // the activity's result is durable by now
    ///         ctx.wait_event::<()>("confirmed", None).await?; // the crash strikes while it waits
    ///         Ok(receipt)
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let runs = Arc::new(AtomicU32::new(0));
    /// let journaled = Arc::new(tokio::sync::Notify::new());
    /// let node = || {
    ///     let mailer = Mailer { runs: runs.clone(), journaled: journaled.clone() };
    ///     Runtime::builder().embedded(dir.path()).register_actor(mailer).start()
    /// };
    /// let key = IdempotencyKey::new("welcome-ada")?;
    /// let rt = node().await?;
    /// let opts = SendOptions { idempotency_key: Some(key.clone()), ..SendOptions::default() };
    /// rt.actor::<Mailer>("m")?.send_with("ada@example.com".to_owned(), opts).await?;
    /// tokio::time::timeout(std::time::Duration::from_secs(10), journaled.notified()).await?;
    /// rt.kill().await; // a crash: the invocation is half done, the process gone
    /// drop(rt);
    ///
    /// let rt = node().await?; // the invocation resumes by replay
    /// let mailer = rt.actor::<Mailer>("m")?;
    /// mailer.deliver_event("confirmed", &()).await?;
    /// let opts = AskOptions { idempotency_key: Some(key), ..AskOptions::default() };
    /// let receipt = mailer.ask_with("ada@example.com".to_owned(), opts).await?;
    /// assert_eq!(receipt, "queued for ada@example.com");
    /// assert_eq!(runs.load(Ordering::SeqCst), 1, "the replay did not send the mail again");
    /// # rt.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn activity<I, O, E, F, Fut>(
        &mut self,
        name: &str,
        input: &I,
        f: F,
    ) -> Result<O, StepError>
    where
        I: Serialize + ?Sized,
        O: Serialize + DeserializeOwned,
        E: Display,
        F: FnOnce(ActivityKey) -> Fut,
        Fut: Future<Output = Result<O, E>>,
    {
        let mut f = Some(f);
        self.activity_with(name, input, ActivityPolicy::ONCE, |key, attempt| {
            let f = f.take();
            async move {
                match f {
                    Some(f) => f(key).await.map_err(ActivityError::terminal),
                    // `ONCE` makes one attempt per run; a second call would be a bug here.
                    None => Err(ActivityError::terminal(format!(
                        "attempt {attempt} of a one-shot activity (a runtime bug)"
                    ))),
                }
            }
        })
        .await
    }

    /// Runs a side effect as [`activity`](Self::activity) does, retried by `policy`: a
    /// [retryable](ActivityError::retryable) error or a timed-out attempt is tried again after
    /// the policy's backoff, until an attempt succeeds, fails
    /// [terminally](ActivityError::terminal), or the attempts run out. `f` gets the activity's
    /// key (the same for every attempt) and the attempt's number (from 1).
    ///
    /// Every attempt's start and failure is journaled, and the next attempt's time with it: a
    /// crash mid-retry resumes the schedule where it was. A backoff longer than
    /// `Config::suspend_after` suspends the invocation as a long [`sleep`](Self::sleep) does.
    /// The final error, with its typed value, is [`StepError::ActivityFailed`]; `?` turns it
    /// into a rejection that carries the value to the caller. An attempt that succeeds with an
    /// output the journal cannot keep (see [`activity`](Self::activity)) ends the step too, as
    /// a failure, with no further attempt: its side effect happened.
    ///
    /// ```
    /// use std::time::Duration;
    /// use loom_core::runtime::{ActivityError, ActivityPolicy, Actor, Context, Rejected};
    ///
    /// struct Payments;
    ///
    /// impl Actor for Payments {
    ///     const KIND: &'static str = "payments";
    ///     type State = ();
    ///     type Message = u64;
    ///     type Reply = String;
    ///
    ///     async fn handle(&self, _: &mut (), ctx: &mut Context<'_>, cents: u64) -> Result<String, Rejected> {
    ///         let policy = ActivityPolicy::retry(5)
    ///             .backoff(Duration::from_millis(100), Duration::from_secs(10))
    ///             .timeout(Duration::from_secs(5));
    ///         let id = ctx
    ///             .activity_with("charge", &cents, policy, |key, attempt| async move {
    ///                 if cents > 1_000_000 {
    ///                     // No retry; the caller gets the value in `AskError::Rejected`.
    ///                     return Err(ActivityError::terminal("over the limit")
    ///                         .with_value(&serde_json::json!({ "limit": 1_000_000 })));
    ///                 }
    ///                 Ok(format!("charge {key} on attempt {attempt}"))
    ///             })
    ///             .await?;
    ///         Ok(id)
    ///     }
    /// }
    /// ```
    pub async fn activity_with<I, O, F, Fut>(
        &mut self,
        name: &str,
        input: &I,
        policy: ActivityPolicy,
        f: F,
    ) -> Result<O, StepError>
    where
        I: Serialize + ?Sized,
        O: Serialize + DeserializeOwned,
        F: FnMut(ActivityKey, u32) -> Fut,
        Fut: Future<Output = Result<O, ActivityError>>,
    {
        // The whole activity, every attempt and backoff in this run (a replay of a finished
        // one is a short span).
        let span = tracing::info_span!("loom.activity", otel.name = %format_args!("activity {name}"), activity = name);
        self.inv.opening = true;
        let r = self
            .activity_step(name, input, policy, f)
            .instrument(span)
            .await;
        self.step_ended();
        r
    }

    /// An activity that ran but whose output cannot be journaled (not encodable to JSON, not
    /// decodable from it, or too large for an entry) fails, for good, in a small entry: the
    /// side effect happened, and a step left open would run it again at every retry of the
    /// message.
    async fn output_refused(
        &mut self,
        name: &str,
        step: u32,
        attempt: u32,
        why: &str,
    ) -> StepError {
        let error = crate::limits::clip_reason(&format!(
            "activity {name} ran (attempt {attempt}), but {why}; it is not run again"
        ));
        tracing::warn!(activity = name, step, %error, "activity output refused");
        self.inv.push(EntryKind::ActivityFailed {
            step,
            error: error.clone(),
            value: None,
        });
        if let Err(e) = self.flush().await {
            return e;
        }
        StepError::ActivityFailed {
            name: name.to_owned(),
            error,
            value: None,
        }
    }

    /// [`Self::activity_with`], in its span.
    async fn activity_step<I, O, F, Fut>(
        &mut self,
        name: &str,
        input: &I,
        policy: ActivityPolicy,
        mut f: F,
    ) -> Result<O, StepError>
    where
        I: Serialize + ?Sized,
        O: Serialize + DeserializeOwned,
        F: FnMut(ActivityKey, u32) -> Fut,
        Fut: Future<Output = Result<O, ActivityError>>,
    {
        let max_attempts = policy.retry.max_attempts.max(1);
        let (step, recorded) = self.next_step("activity", name)?;
        // Where the journal left this step: the attempt to run and, if the last one failed,
        // when the next may start.
        let mut attempt = 1;
        let mut retry_at = None;
        let mut last_error = None;
        match &recorded {
            Some(r) => {
                for k in r.iter().skip(1) {
                    match k {
                        EntryKind::ActivityCompleted { output, .. } => {
                            // The live run returned this output decoded from its JSON (one
                            // that did not decode failed the step instead), so only changed
                            // code fails to decode it now: non-determinism, which parks the
                            // actor with its message kept, not a refusal of the message.
                            return serde_json::from_value(output.clone()).map_err(|e| {
                                let msg = format!(
                                    "the output of activity {name} journaled at step {step} does not decode as the code now running asks: {e}"
                                );
                                self.interrupt(Interrupt::NonDeterminism(step, msg))
                            });
                        }
                        EntryKind::ActivityFailed { error, value, .. } => {
                            return Err(StepError::ActivityFailed {
                                name: name.to_owned(),
                                error: error.clone(),
                                value: value.clone(),
                            });
                        }
                        EntryKind::ActivityAttemptFailed {
                            attempt: a,
                            retry_at: at,
                            error,
                            ..
                        } => {
                            attempt = a + 1;
                            retry_at = Some(*at);
                            last_error = Some(error.clone());
                        }
                        EntryKind::ActivityRetried { attempt: a, .. } => {
                            attempt = *a;
                            retry_at = None;
                        }
                        EntryKind::WaitCancelled { .. } => {
                            self.inv.cancelled = true;
                            return Err(StepError::Cancelled);
                        }
                        other => {
                            let msg = format!(
                                "step {step}: activity {name} is followed by {} in the journal",
                                other.name()
                            );
                            return Err(self.interrupt(Interrupt::NonDeterminism(step, msg)));
                        }
                    }
                }
            }
            None => {
                crate::limits::check_step_name("an activity's", name)
                    .map_err(StepError::Invalid)?;
                let input = serde_json::to_value(input).map_err(|e| {
                    StepError::Invalid(format!("input of activity {name} does not encode: {e}"))
                })?;
                self.inv.push(EntryKind::ActivityStarted {
                    step,
                    name: name.to_owned(),
                    input,
                });
                // An activity starts only after every entry before it is durable.
                self.flush().await?;
            }
        }
        if let Some(error) = last_error.filter(|_| retry_at.is_some() && attempt > max_attempts) {
            // The policy allows fewer attempts than when the backoff began (changed code): the
            // attempts are spent, so the activity fails without running again.
            let error = crate::limits::clip_reason(&format!(
                "{error} (attempt {} of {max_attempts})",
                attempt - 1
            ));
            self.inv.push(EntryKind::ActivityFailed {
                step,
                error: error.clone(),
                value: None,
            });
            self.flush().await?;
            return Err(StepError::ActivityFailed {
                name: name.to_owned(),
                error,
                value: None,
            });
        }
        // A backoff the journal began was begun by an earlier delivery.
        let mut resumed_in = retry_at.map(|_| self.inv.envelope.attempt);
        let key = ActivityKey(format!(
            "{}/{}/{step}",
            self.inv.actor,
            self.inv.envelope.origin()
        ));
        loop {
            if let Some(at) = retry_at.take() {
                let left = at.saturating_since(Timestamp::now());
                if self.suspends() && left > self.io.config.suspend_after
                    || self.woken_early(resumed_in, left).await
                {
                    // `retry_at` is journaled: the replay continues the backoff.
                    return Err(self.suspend_until(at, step, resumed_in).await);
                }
                // As in a sleep in memory: a cancellation asked in this process ends the
                // backoff at once.
                if self.sleep_unless_cancelled(left).await? {
                    return Err(self.suspend_until(at, step, resumed_in).await);
                }
                self.inv.push(EntryKind::ActivityRetried {
                    step,
                    attempt,
                    resumed_in,
                });
                // Durable before the attempt runs (see the module's invariants).
                self.flush_resumed(resumed_in.take()).await?;
            }
            tracing::debug!(activity = name, step, attempt, key = %key, "activity runs");
            // A panic in the closure (or in code it runs before its future) with attempts
            // left is a failed attempt, retried under the policy as an error is. Out of the
            // last attempt (the only one of `ctx.activity`) it goes on unwinding and fails the
            // whole message, as any panic does: a bug is not recorded as the step's failure,
            // so code fixed before the message is given up (or after, and its dead letter
            // requeued) runs the activity again.
            let run = async {
                let key = key.clone();
                match AssertUnwindSafe(async { f(key, attempt).await })
                    .catch_unwind()
                    .await
                {
                    Ok(r) => r,
                    Err(p) if attempt < max_attempts => Err(ActivityError::retryable(format!(
                        "attempt {attempt} panicked: {}",
                        super::cell::panic_message(&p)
                    ))),
                    Err(p) => std::panic::resume_unwind(p),
                }
            };
            let result = match policy.attempt_timeout {
                Some(limit) => match self.keep_out(tokio::time::timeout(limit, run)).await? {
                    Ok(r) => r,
                    Err(_) => Err(ActivityError::retryable(format!(
                        "attempt {attempt} timed out after {limit:?}"
                    ))),
                },
                None => self.keep_out(run).await?,
            };
            let e = match result {
                Ok(output) => {
                    let value = match serde_json::to_value(&output) {
                        Ok(value) => value,
                        Err(e) => {
                            let why = format!("its output does not encode to JSON ({e})");
                            return Err(self.output_refused(name, step, attempt, &why).await);
                        }
                    };
                    // The handler gets the output as a replay will: decoded from what is
                    // journaled (a NaN journals as null, a skipped field is left out), so the
                    // live run and its replays go the same way.
                    let kept = match O::deserialize(&value) {
                        Ok(kept) => kept,
                        Err(e) => {
                            let why = format!(
                                "its output does not decode from the JSON it encodes to ({e}), so a replay could not return it"
                            );
                            return Err(self.output_refused(name, step, attempt, &why).await);
                        }
                    };
                    self.inv.push(EntryKind::ActivityCompleted {
                        step,
                        output: value,
                    });
                    // Checked as the store will check it; refused, it is taken back and the
                    // step fails in its place.
                    let refused = self.inv.pending.last().and_then(|e| {
                        crate::store::backend::encode_entry(&self.inv.actor, e).err()
                    });
                    if let Some(e) = refused {
                        self.inv.unpush();
                        let why = format!("its output cannot be journaled: {e}");
                        return Err(self.output_refused(name, step, attempt, &why).await);
                    }
                    // Journaled before the handler goes on.
                    self.flush().await?;
                    return Ok(kept);
                }
                Err(e) => e,
            };
            if !e.is_terminal() && attempt < max_attempts {
                let error = crate::limits::clip_reason(e.message());
                let at = Timestamp::now() + policy.retry.delay(attempt);
                tracing::debug!(activity = name, step, attempt, %error, retry_at = %at, "activity attempt failed; retrying");
                self.inv.push(EntryKind::ActivityAttemptFailed {
                    step,
                    attempt,
                    error,
                    retry_at: at,
                });
                self.flush().await?;
                attempt += 1;
                retry_at = Some(at);
                continue;
            }
            let error = crate::limits::clip_reason(&if max_attempts > 1 && !e.is_terminal() {
                format!("{} (attempt {attempt} of {max_attempts})", e.message())
            } else {
                e.message().to_owned()
            });
            let value = e.value;
            self.inv.push(EntryKind::ActivityFailed {
                step,
                error: error.clone(),
                value: value.clone(),
            });
            self.flush().await?;
            return Err(StepError::ActivityFailed {
                name: name.to_owned(),
                error,
                value,
            });
        }
    }
}
