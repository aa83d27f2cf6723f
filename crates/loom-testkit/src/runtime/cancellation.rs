//! Runtime cases about cancellation (`ActorRef::cancel`): a cancelled wait ends with
//! `StepError::Cancelled`, on whichever node, across crashes, and racing the wait's own end.

use std::time::Duration;

use loom_core::runtime::{ActorRef, AskError, AskOptions, CancelTarget, Cancellation, cancel};
use loom_core::{EntryKind, IdempotencyKey};

use super::common::{WAIT, activity, failures, finished, worker};
use super::{Harness, RuntimeCase, Step, Worker, eventually, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        cancelling_a_suspended_sleep_ends_it_and_the_handler_compensates,
        a_cancellation_from_another_node_wakes_a_suspended_wait,
        a_cancellation_while_no_node_runs_is_seen_at_the_restart,
        a_cancelled_message_not_yet_begun_ends_at_its_first_wait,
        a_cancelled_message_not_yet_begun_ends_at_a_short_wait_in_memory,
        a_cancellation_ends_an_activitys_suspended_backoff,
        a_cancellation_racing_the_event_gives_one_outcome,
        a_wait_in_memory_is_cancelled_at_once_on_the_node_that_asked,
        a_cancellation_in_a_sleeps_last_moments_ends_it_or_the_next_wait,
    ]
}

fn sleep(ms: u64) -> Step {
    Step::Sleep { ms }
}

fn wait(name: &str) -> Step {
    Step::Wait {
        name: name.into(),
        timeout_ms: None,
    }
}

fn key(k: &str) -> IdempotencyKey {
    IdempotencyKey::new(k).expect("key")
}

const HOUR_MS: u64 = 3_600_000;

/// Asks `w` to run `steps` under idempotency key `k` (what a cancellation names), in the
/// background: the reply, once the invocation ends.
fn ask_keyed(
    w: &ActorRef<Worker>,
    k: &IdempotencyKey,
    steps: Vec<Step>,
) -> tokio::task::JoinHandle<Result<Vec<String>, AskError>> {
    let (w, k) = (w.clone(), k.clone());
    tokio::spawn(async move {
        let opts = AskOptions {
            idempotency_key: Some(k),
            timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        w.ask_with(steps, opts).await
    })
}

/// The reason of a cancelled ask, or a panic naming what came instead.
fn cancelled(r: Result<Vec<String>, AskError>) -> String {
    match r {
        Err(AskError::Cancelled(reason)) => reason,
        other => panic!("expected a cancellation, got {other:?}"),
    }
}

async fn wait_for_suspensions(rt: &loom_core::runtime::Runtime, n: u64) {
    eventually(WAIT, &format!("{n} suspensions"), || async {
        rt.metrics().suspensions >= n
    })
    .await;
}

/// An hour's sleep, suspended, is cancelled through `ActorRef::cancel_key`: the sleep returns
/// `Cancelled`, the handler runs its compensation (an activity, once), and its caller gets
/// `AskError::Cancelled`; the state is left as it was, the message behind runs next, and the
/// finished message can no longer be found to cancel. The compensation's own sleep, longer than
/// `suspend_after`, runs to its end instead of being cancelled in turn.
async fn cancelling_a_suspended_sleep_ends_it_and_the_handler_compensates(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.suspend_after = Duration::from_millis(100))
        .await;
    let w = rt.actor::<Worker>("w").unwrap();
    let id = worker("w");
    let k = key("checkout-1");
    let asked = ask_keyed(
        &w,
        &k,
        vec![
            activity("reserve"),
            sleep(HOUR_MS),
            sleep(300),
            activity("release"),
        ],
    );
    wait_for_suspensions(&rt, 1).await;
    w.send(vec![activity("later")]).await.unwrap();
    let found = w.cancel_key(&k).await.unwrap();
    assert!(matches!(found, Cancellation::Requested { .. }), "{found:?}");
    let reply = tokio::time::timeout(WAIT, asked)
        .await
        .expect("the cancellation did not wake the suspended sleep")
        .unwrap();
    assert_eq!(
        cancelled(reply),
        "reserve done; sleep 3600000: cancelled; slept 300; release done"
    );
    finished(h, &id, 2).await;
    assert_eq!(
        h.probe.runs("reserve"),
        1,
        "the replay ran an activity again"
    );
    assert_eq!(
        h.probe.runs("release"),
        1,
        "the compensation ran {} times",
        h.probe.runs("release")
    );
    assert_eq!(h.probe.runs("later"), 1);
    assert_eq!(
        h.count(&id, |k| matches!(k, EntryKind::WaitCancelled { .. }))
            .await,
        1
    );
    assert_eq!(
        h.count(&id, |k| matches!(k, EntryKind::StatePatched { .. }))
            .await,
        1,
        "the cancelled invocation changed the state (only the later one may)"
    );
    assert_eq!(w.cancel_key(&k).await.unwrap(), Cancellation::NotFound);
    // Asked again with the key: the recorded outcome, not a second run.
    let again = w
        .ask_with(
            vec![activity("reserve")],
            AskOptions {
                idempotency_key: Some(k),
                timeout: None,
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(again, Err(AskError::Cancelled(_))), "{again:?}");
    assert_eq!(h.probe.runs("reserve"), 1);
    rt.shutdown().await;
}

/// A cancellation asked by another process (straight on the store: no in-process wake-up)
/// wakes a wait for an event that is suspended, at once, not at a poll or a recheck.
async fn a_cancellation_from_another_node_wakes_a_suspended_wait(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.suspend_after = Duration::from_millis(100))
        .await;
    let w = rt.actor::<Worker>("w").unwrap();
    let id = worker("w");
    let message = w.send(vec![wait("approved")]).await.unwrap();
    wait_for_suspensions(&rt, 1).await;
    let found = cancel(&*h.store, &id, &CancelTarget::Message(message))
        .await
        .unwrap();
    assert_eq!(
        found,
        Cancellation::Requested {
            message,
            position: 1
        }
    );
    finished(h, &id, 1).await;
    let journal = h.journal(&id).await;
    assert!(
        journal.iter().any(|e| matches!(&e.kind, EntryKind::Failed { error, .. } if error == "event approved: cancelled")),
        "{journal:?}"
    );
    // The event that comes later finds no wait: it stays on the lane for the next one.
    w.deliver_event("approved", "too late").await.unwrap();
    assert_eq!(
        w.ask(vec![wait("approved")]).await.unwrap(),
        vec!["event approved: too late"]
    );
    rt.shutdown().await;
}

/// A cancellation asked while no node runs (the sleep suspended, then its node killed) is kept
/// in the store: the restarted node finds the message woken and ends the sleep as cancelled,
/// once.
async fn a_cancellation_while_no_node_runs_is_seen_at_the_restart(h: &Harness) {
    let quick = |c: &mut loom_core::runtime::Config| c.suspend_after = Duration::from_millis(100);
    let rt = h.runtime_with(quick).await;
    let id = worker("w");
    let message = rt
        .actor::<Worker>("w")
        .unwrap()
        .send(vec![sleep(HOUR_MS), activity("compensate")])
        .await
        .unwrap();
    wait_for_suspensions(&rt, 1).await;
    rt.kill().await;
    let found = cancel(&*h.store, &id, &CancelTarget::Message(message))
        .await
        .unwrap();
    assert!(matches!(found, Cancellation::Requested { .. }));
    let rt = h.runtime_with(quick).await;
    finished(h, &id, 1).await;
    assert_eq!(h.probe.runs("compensate"), 1);
    assert_eq!(
        h.count(&id, |k| matches!(k, EntryKind::WaitCancelled { .. }))
            .await,
        1
    );
    rt.shutdown().await;
}

/// A message cancelled while it waits behind another is marked; it begins when its turn comes,
/// and its first durable wait (a sleep of an hour) ends at once as cancelled.
async fn a_cancelled_message_not_yet_begun_ends_at_its_first_wait(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.suspend_after = Duration::from_millis(100))
        .await;
    let w = rt.actor::<Worker>("w").unwrap();
    let id = worker("w");
    w.send(vec![wait("go")]).await.unwrap();
    let behind = w
        .send(vec![activity("begun"), sleep(HOUR_MS)])
        .await
        .unwrap();
    wait_for_suspensions(&rt, 1).await;
    assert!(matches!(
        w.cancel(behind).await.unwrap(),
        Cancellation::Requested { .. }
    ));
    let listed = h.store.messages(&id, None, 10).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|m| (m.envelope.id == behind, m.cancelling))
            .collect::<Vec<_>>(),
        vec![(false, false), (true, true)],
        "only the message named is marked"
    );
    w.deliver_event("go", "now").await.unwrap();
    finished(h, &id, 2).await;
    assert_eq!(
        h.probe.runs("begun"),
        1,
        "a cancelled message runs up to its first wait"
    );
    assert_eq!(
        failures(h, &id).await,
        vec!["begun done; sleep 3600000: cancelled"]
    );
    rt.shutdown().await;
}

/// As above, with a first wait short enough to be waited in memory (under `suspend_after`),
/// where only a suspension attempt would meet the store's mark: the wait looks at the mark once
/// and ends as cancelled. Before, the cancellation was told to nobody (the message had not
/// begun on any node), and the sleep ran to its end.
async fn a_cancelled_message_not_yet_begun_ends_at_a_short_wait_in_memory(h: &Harness) {
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w").unwrap();
    let id = worker("w");
    w.send(vec![wait("go")]).await.unwrap();
    let behind = w.send(vec![sleep(300)]).await.unwrap();
    eventually(WAIT, "the first message waits", || async {
        h.count(&id, |k| matches!(k, EntryKind::EventAwaited { .. }))
            .await
            == 1
    })
    .await;
    assert!(matches!(
        w.cancel(behind).await.unwrap(),
        Cancellation::Requested { .. }
    ));
    w.deliver_event("go", "now").await.unwrap();
    finished(h, &id, 2).await;
    assert_eq!(failures(h, &id).await, vec!["sleep 300: cancelled"]);
    rt.shutdown().await;
}

/// An activity waiting out a long backoff between attempts is suspended; a cancellation ends
/// the backoff, and the activity returns `Cancelled` without another attempt.
async fn a_cancellation_ends_an_activitys_suspended_backoff(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.suspend_after = Duration::from_millis(100))
        .await;
    let w = rt.actor::<Worker>("w").unwrap();
    let id = worker("w");
    let flaky = Step::Retried {
        name: "flaky".into(),
        ok_at: 0,
        attempts: 5,
        backoff_ms: HOUR_MS,
        timeout_ms: None,
        hang: 0,
        terminal: false,
    };
    let message = w.send(vec![flaky]).await.unwrap();
    wait_for_suspensions(&rt, 1).await;
    assert_eq!(h.probe.runs("flaky"), 1);
    assert!(matches!(
        w.cancel(message).await.unwrap(),
        Cancellation::Requested { .. }
    ));
    finished(h, &id, 1).await;
    assert_eq!(
        h.probe.runs("flaky"),
        1,
        "the cancelled backoff ran another attempt"
    );
    assert_eq!(
        h.count(&id, |k| matches!(k, EntryKind::WaitCancelled { .. }))
            .await,
        1
    );
    rt.shutdown().await;
}

/// The event and the cancellation arrive together, again and again, for waits suspended (a
/// runtime that suspends after 50 ms) and waits in memory (one that suspends after a minute):
/// each invocation ends one way only, its caller's outcome is the journal's, and a
/// cancellation that found nothing means the event won.
async fn a_cancellation_racing_the_event_gives_one_outcome(h: &Harness) {
    let (mut received, mut cancelled_n) = (0, 0);
    for (suspended, suspend_after) in [(true, 50), (false, 60_000)] {
        let rt = h
            .runtime_with(|c| c.suspend_after = Duration::from_millis(suspend_after))
            .await;
        for i in 0..4u64 {
            let name = format!("r{suspended}{i}");
            let w = rt.actor::<Worker>(&name).unwrap();
            let id = worker(&name);
            let k = key(&format!("race-{suspended}-{i}"));
            let before = rt.metrics().suspensions;
            let asked = ask_keyed(&w, &k, vec![wait("go")]);
            if suspended {
                wait_for_suspensions(&rt, before + 1).await;
            } else {
                eventually(WAIT, "the wait is journaled", || async {
                    h.count(&id, |k| matches!(k, EntryKind::EventAwaited { .. }))
                        .await
                        == 1
                })
                .await;
            }
            let (event, found) = tokio::join!(w.deliver_event("go", "now"), w.cancel_key(&k));
            event.unwrap();
            let found = found.unwrap();
            let reply = tokio::time::timeout(WAIT, asked).await.unwrap().unwrap();
            finished(h, &id, 1).await;
            let ends = h
                .count(&id, |k| {
                    matches!(
                        k,
                        EntryKind::EventReceived { .. } | EntryKind::WaitCancelled { .. }
                    )
                })
                .await;
            assert_eq!(ends, 1, "{name}: the wait ended {ends} times");
            match reply {
                Ok(lines) => {
                    assert_eq!(lines, vec!["event go: now"]);
                    assert_eq!(
                        h.count(&id, |k| matches!(k, EntryKind::Completed { .. }))
                            .await,
                        1
                    );
                    received += 1;
                }
                Err(AskError::Cancelled(_)) => {
                    assert!(
                        matches!(found, Cancellation::Requested { .. }),
                        "{name}: cancelled, yet the cancellation found nothing"
                    );
                    assert_eq!(
                        h.count(&id, |k| matches!(k, EntryKind::Failed { .. }))
                            .await,
                        1
                    );
                    cancelled_n += 1;
                }
                Err(e) => panic!("{name}: {e}"),
            }
        }
        if !suspended {
            assert_eq!(rt.metrics().suspensions, 0, "a wait in memory suspended");
        }
        rt.shutdown().await;
    }
    assert_eq!(received + cancelled_n, 8);
}

/// A wait in memory (suspension after a minute) on the node that asked is cancelled at once,
/// not when it would have suspended.
async fn a_wait_in_memory_is_cancelled_at_once_on_the_node_that_asked(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.suspend_after = Duration::from_secs(60))
        .await;
    let w = rt.actor::<Worker>("w").unwrap();
    let id = worker("w");
    let message = w
        .send(vec![wait("approved"), activity("undo")])
        .await
        .unwrap();
    eventually(WAIT, "the wait is journaled", || async {
        h.count(&id, |k| matches!(k, EntryKind::EventAwaited { .. }))
            .await
            == 1
    })
    .await;
    assert!(matches!(
        w.cancel(message).await.unwrap(),
        Cancellation::Requested { .. }
    ));
    finished(h, &id, 1).await;
    assert_eq!(h.probe.runs("undo"), 1);
    assert_eq!(
        h.count(&id, |k| matches!(k, EntryKind::WaitCancelled { .. }))
            .await,
        1
    );
    rt.shutdown().await;
}

/// A cancellation asked in a suspended sleep's last moments is not lost. The sleep's actor takes
/// it back up to 350 ms early (`LeaseOptions::early`) and journals its end then, waiting out the
/// rest in memory: a cancellation that comes first ends the sleep; one that comes after the
/// end is journaled ends the invocation's next wait instead. Which of the two happens is a
/// matter of timing; that one of them does is the point.
async fn a_cancellation_in_a_sleeps_last_moments_ends_it_or_the_next_wait(h: &Harness) {
    // The default `suspend_after` (1 s): a sleep of 2 s suspends and is taken back early.
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w").unwrap();
    let k = key("late-cancel");
    let began = tokio::time::Instant::now();
    let asked = ask_keyed(&w, &k, vec![sleep(2_000), sleep(300)]);
    wait_for_suspensions(&rt, 1).await;
    // Into the sleep's last moments: its end journaled by now, or about to be.
    tokio::time::sleep_until(began + Duration::from_millis(1_850)).await;
    let found = w.cancel_key(&k).await.unwrap();
    assert!(matches!(found, Cancellation::Requested { .. }), "{found:?}");
    let reply = cancelled(
        tokio::time::timeout(WAIT, asked)
            .await
            .expect("the invocation did not end")
            .unwrap(),
    );
    assert!(
        reply == "sleep 2000: cancelled; slept 300" || reply == "slept 2000; sleep 300: cancelled",
        "the cancellation was lost or ended both waits: {reply}"
    );
    rt.shutdown().await;
}
