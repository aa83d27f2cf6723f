//! Runtime cases about activity policies: retries with backoff, attempts run out, terminal
//! errors with typed values reaching the caller, per-attempt time limits, and a retry schedule
//! that survives a crash.

use std::time::Duration;

use loom_core::runtime::{AskError, AskOptions};
use loom_core::{EntryKind, IdempotencyKey, Timestamp};
use serde_json::json;

use super::common::{WAIT, finished, reached, replies, worker};
use super::{Harness, RuntimeCase, Step, Worker, eventually, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        activity_retries_with_backoff_until_an_attempt_succeeds,
        activity_out_of_attempts_fails_with_its_last_error,
        activity_terminal_error_is_not_retried_and_reaches_the_caller_with_its_value,
        activity_attempt_past_its_time_limit_is_cut_off_and_retried,
        activity_backoff_survives_a_crash_and_keeps_its_schedule,
        activity_retried_across_many_suspensions_is_not_given_up,
    ]
}

fn retried(ok_at: u32, attempts: u32, backoff_ms: u64) -> Step {
    Step::Retried {
        name: "r".into(),
        ok_at,
        attempts,
        backoff_ms,
        timeout_ms: None,
        hang: 0,
        terminal: false,
    }
}

/// When each attempt of activity `r` started (ms), in order, from the probe.
fn starts(h: &Harness) -> Vec<(u32, u64)> {
    h.probe
        .observed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(|line| {
            let mut w = line.split(' ');
            (w.next()? == "r").then_some(())?;
            let attempt = w.nth(1)?.parse().ok()?;
            let at = w.nth(1)?.parse().ok()?;
            Some((attempt, at))
        })
        .collect()
}

/// The `retry_at` of each failed attempt in the journal of `worker/w`, by attempt.
async fn schedule(h: &Harness) -> Vec<(u32, Timestamp)> {
    h.journal(&worker("w"))
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            EntryKind::ActivityAttemptFailed {
                attempt, retry_at, ..
            } => Some((attempt, retry_at)),
            _ => None,
        })
        .collect()
}

async fn activity_retries_with_backoff_until_an_attempt_succeeds(h: &Harness) {
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w").unwrap();
    assert_eq!(
        w.ask(vec![retried(3, 5, 50)]).await.unwrap(),
        vec!["r done on attempt 3"]
    );
    assert_eq!(h.probe.runs("r"), 3);
    assert_eq!(
        h.kinds(&worker("w")).await,
        vec![
            "invoked",
            "activity_started",
            "activity_attempt_failed",
            "activity_retried",
            "activity_attempt_failed",
            "activity_retried",
            "activity_completed",
            "state_patched",
            "completed"
        ]
    );
    // Each retry waited for its journaled time, and the backoff grew from half the first delay.
    let starts = starts(h);
    let schedule = schedule(h).await;
    assert_eq!(starts.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3]);
    for (attempt, retry_at) in &schedule {
        let next = starts[*attempt as usize].1;
        assert!(
            next >= retry_at.as_millis(),
            "attempt {} started at {next}, before its time {retry_at}",
            attempt + 1
        );
    }
    assert!(
        starts[1].1 - starts[0].1 >= 25,
        "the first backoff was shorter than half its delay: {starts:?}"
    );
    // The delays double from 50 ms, with jitter in [0.5, 1.5): 25..75 ms, then 50..150 ms.
    let delays: Vec<u64> = h
        .journal(&worker("w"))
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            EntryKind::ActivityAttemptFailed { retry_at, .. } => {
                Some(retry_at.as_millis().saturating_sub(e.at.as_millis()))
            }
            _ => None,
        })
        .collect();
    assert!(
        (24..=76).contains(&delays[0]) && (49..=151).contains(&delays[1]),
        "{delays:?}"
    );
    rt.shutdown().await;
}

async fn activity_out_of_attempts_fails_with_its_last_error(h: &Harness) {
    let rt = h.runtime().await;
    rt.actor::<Worker>("w")
        .unwrap()
        .send(vec![retried(0, 3, 20), Step::Gate])
        .await
        .unwrap();
    reached(h).await;
    assert_eq!(h.probe.runs("r"), 3);
    // Crashed after the activity failed for good: the replay returns the journaled failure
    // without running an attempt.
    let rt = h.crash_and_resume(rt, 1).await;
    finished(h, &worker("w"), 1).await;
    assert_eq!(
        h.probe.runs("r"),
        3,
        "a failed activity ran again on replay"
    );
    let kinds = h.kinds(&worker("w")).await;
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "activity_attempt_failed")
            .count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(kinds.iter().filter(|k| **k == "activity_failed").count(), 1);
    assert_eq!(
        replies(h, &worker("w")).await,
        vec![json!([
            "error: r attempt 3 failed (attempt 3 of 3)",
            "passed the gate"
        ])]
    );
    rt.shutdown().await;
}

async fn activity_terminal_error_is_not_retried_and_reaches_the_caller_with_its_value(h: &Harness) {
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w").unwrap();
    let script = vec![Step::Retried {
        name: "r".into(),
        ok_at: 0,
        attempts: 5,
        backoff_ms: 20,
        timeout_ms: None,
        hang: 0,
        terminal: true,
    }];
    let opts = || AskOptions {
        idempotency_key: Some(IdempotencyKey::new("terminal-1").unwrap()),
        timeout: None,
        ..Default::default()
    };
    let check = |r: Result<Vec<String>, AskError>| {
        let Err(AskError::Rejected(rejected)) = r else {
            panic!("not a rejection: {r:?}")
        };
        assert!(
            rejected.reason().contains("r attempt 1 failed"),
            "{rejected:?}"
        );
        assert_eq!(rejected.value(), Some(&json!({ "attempt": 1 })));
    };
    check(w.ask_with(script.clone(), opts()).await);
    assert_eq!(h.probe.runs("r"), 1, "a terminal error was retried");
    // Asked again with the same key: the recorded rejection, its value included.
    check(w.ask_with(script, opts()).await);
    assert_eq!(h.probe.runs("r"), 1);
    let failed: Vec<_> = h
        .journal(&worker("w"))
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            EntryKind::ActivityFailed { value, .. } => Some(value),
            _ => None,
        })
        .collect();
    assert_eq!(failed, vec![Some(json!({ "attempt": 1 }))]);
    assert_eq!(
        h.count(&worker("w"), |k| k.name() == "state_patched").await,
        0
    );
    rt.shutdown().await;
}

async fn activity_attempt_past_its_time_limit_is_cut_off_and_retried(h: &Harness) {
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w").unwrap();
    let script = vec![Step::Retried {
        name: "r".into(),
        ok_at: 2,
        attempts: 3,
        backoff_ms: 20,
        timeout_ms: Some(200),
        hang: 1,
        terminal: false,
    }];
    assert_eq!(w.ask(script).await.unwrap(), vec!["r done on attempt 2"]);
    assert_eq!(h.probe.runs("r"), 2);
    let errors: Vec<String> = h
        .journal(&worker("w"))
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            EntryKind::ActivityAttemptFailed { error, .. } => Some(error),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("timed out after 200ms"), "{errors:?}");
    rt.shutdown().await;
}

/// A backoff longer than `suspend_after` suspends the invocation; a crash meanwhile neither
/// starts the schedule over nor runs the next attempt early, and the failed attempt is not run
/// again.
async fn activity_backoff_survives_a_crash_and_keeps_its_schedule(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.suspend_after = Duration::from_millis(100))
        .await;
    rt.actor::<Worker>("w")
        .unwrap()
        .send(vec![retried(2, 3, 1500)])
        .await
        .unwrap();
    eventually(WAIT, "the backoff suspended the invocation", || async {
        rt.metrics().suspensions == 1
    })
    .await;
    let rt = h.crash_and_resume(rt, 0).await;
    finished(h, &worker("w"), 1).await;
    assert_eq!(
        replies(h, &worker("w")).await,
        vec![json!(["r done on attempt 2"])]
    );
    let starts = starts(h);
    assert_eq!(
        starts.iter().map(|s| s.0).collect::<Vec<_>>(),
        [1, 2],
        "an attempt ran again or was skipped"
    );
    let schedule = schedule(h).await;
    assert_eq!(schedule.len(), 1);
    assert!(
        starts[1].1 >= schedule[0].1.as_millis(),
        "attempt 2 started at {}, before its time {}",
        starts[1].1,
        schedule[0].1
    );
    let resumed = h
        .count(&worker("w"), |k| {
            matches!(
                k,
                EntryKind::ActivityRetried {
                    resumed_in: Some(_),
                    ..
                }
            )
        })
        .await;
    assert_eq!(
        resumed, 1,
        "the retry after the crash is not marked resumed"
    );
    rt.shutdown().await;
}

/// Every backoff suspends, so each retry runs in a new delivery of the message: more
/// deliveries than the runtime's own give-up allows, none of them a failed attempt of the
/// message (rule D17), so it is not given up.
async fn activity_retried_across_many_suspensions_is_not_given_up(h: &Harness) {
    let rt = h
        .runtime_with(|c| {
            c.suspend_after = Duration::from_millis(5);
            // Gives a message up after 3 deliveries that end without a word.
            c.retry.max_attempts = 1;
        })
        .await;
    let w = rt.actor::<Worker>("w").unwrap();
    assert_eq!(
        w.ask(vec![retried(6, 6, 40)]).await.unwrap(),
        vec!["r done on attempt 6"]
    );
    assert_eq!(h.probe.runs("r"), 6);
    assert_eq!(rt.metrics().suspensions, 5);
    assert_eq!(rt.metrics().dead_letters, 0);
    rt.shutdown().await;
}
