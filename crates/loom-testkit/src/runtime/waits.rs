//! Runtime cases about durable waits: sleeps, delayed sends and events, live and across crashes.

use std::time::Duration;

use loom_core::{EntryKind, Timestamp};
use serde_json::json;

use super::common::{WAIT, acct, activity, finished, parked_keeping_its_message, replies, worker};
use super::{Account, AccountMsg, Harness, RuntimeCase, Step, Worker, eventually, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        durable_sleep_live,
        durable_sleep_replay_does_not_restart_the_clock,
        a_long_sleep_suspends_the_actor_until_it_ends,
        a_warmed_sleeper_takes_its_message_before_its_moment_and_wakes_no_earlier,
        a_node_full_of_idle_actors_still_warms_its_sleepers,
        a_crowd_of_sleepers_suspends_and_none_is_activated_again_for_nothing,
        a_failure_after_suspensions_is_retried_as_a_first_attempt,
        send_after_arrives_after_its_delay,
        wait_event_live,
        event_delivered_before_the_wait_is_kept,
        wait_event_times_out_with_an_error_the_handler_sees,
        wait_event_replay_after_a_crash,
        a_replay_that_panics_before_the_wait_it_resumes_parks_the_actor,
        messages_queue_behind_a_waiting_invocation,
        a_keyed_retry_into_a_full_mailbox_is_a_duplicate,
        an_ask_still_waiting_when_the_runtime_stops_names_its_key,
        a_durable_call_dropped_half_way_parks_the_actor,
        a_long_wait_for_an_event_suspends_until_the_event_arrives,
        a_store_failure_after_many_wakeups_of_a_wait_is_not_its_last_attempt,
        a_suspended_wait_times_out_no_earlier_than_its_deadline,
        a_suspended_wait_survives_a_crash_and_its_deadline_passing_meanwhile,
        an_event_arriving_as_the_wait_suspends_is_received_at_once,
    ]
}

async fn durable_sleep_live(h: &Harness) {
    let rt = h.runtime().await;
    let started = Timestamp::now();
    let reply = rt
        .actor::<Worker>("w")
        .unwrap()
        .ask(vec![Step::Sleep { ms: 200 }])
        .await
        .unwrap();
    assert_eq!(reply, vec!["slept 200"]);
    assert!(Timestamp::now().saturating_since(started) >= Duration::from_millis(200));
    let kinds = h.kinds(&worker("w")).await;
    assert!(
        kinds.contains(&"timer_started") && kinds.contains(&"timer_fired"),
        "{kinds:?}"
    );
    rt.shutdown().await;
}

async fn durable_sleep_replay_does_not_restart_the_clock(h: &Harness) {
    let rt = h.runtime().await;
    rt.actor::<Worker>("w")
        .unwrap()
        .send(vec![Step::Sleep { ms: 4000 }])
        .await
        .unwrap();
    let w = worker("w");
    eventually(WAIT, "the timer is journaled", || async {
        h.count(&w, |k| matches!(k, EntryKind::TimerStarted { .. }))
            .await
            == 1
    })
    .await;
    let fire_at = h
        .journal(&w)
        .await
        .into_iter()
        .find_map(|e| match e.kind {
            EntryKind::TimerStarted { fire_at, .. } => Some(fire_at),
            _ => None,
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let rt = h.crash_and_resume(rt, 0).await;
    finished(h, &w, 1).await;
    let done = h
        .journal(&w)
        .await
        .into_iter()
        .find(|e| matches!(e.kind, EntryKind::Completed { .. }))
        .unwrap();
    assert!(
        done.at >= fire_at,
        "woke at {} before the timer's {fire_at}",
        done.at
    );
    // A restarted clock would wake 2 s (the time before the crash) after the journaled time.
    assert!(
        done.at.saturating_since(fire_at) < Duration::from_millis(1900),
        "woke at {}, long after the journaled {fire_at}: the sleep restarted",
        done.at
    );
    assert_eq!(
        h.count(&w, |k| matches!(k, EntryKind::TimerStarted { .. }))
            .await,
        1
    );
    rt.shutdown().await;
}

/// A sleep longer than `suspend_after` suspends: while it sleeps the actor is passivated and
/// holds no lease, later messages wait behind it, and the sleep ends on time (not before).
async fn a_long_sleep_suspends_the_actor_until_it_ends(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.suspend_after = Duration::from_millis(100))
        .await;
    let w = rt.actor::<Worker>("w").unwrap();
    let started = Timestamp::now();
    let asked = tokio::spawn({
        let w = w.clone();
        async move { w.ask(vec![Step::Sleep { ms: 1500 }]).await }
    });
    let id = worker("w");
    suspended_with_a_message_behind(h, &rt, &w).await;
    let reply = asked.await.unwrap().unwrap();
    assert_eq!(reply, vec!["slept 1500"]);
    assert!(
        Timestamp::now().saturating_since(started) >= Duration::from_millis(1500),
        "the suspended sleep ended early"
    );
    finished(h, &id, 2).await;
    assert_eq!(
        replies(h, &id).await,
        vec![json!(["slept 1500"]), json!(["later done"])]
    );
    assert_eq!(rt.metrics().suspensions, 1);
    rt.shutdown().await;
}

/// What the probe has seen so far (`Step::Mark` lines among them).
fn observed(h: &Harness) -> Vec<String> {
    h.probe
        .observed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// When each `Step::Mark { label }` in `seen` ran, in ms since the epoch, in order.
fn marks(seen: &[String], label: &str) -> Vec<u64> {
    seen.iter()
        .filter_map(|l| l.strip_prefix(&format!("{label} at ")))
        .map(|ms| ms.parse().expect("a time"))
        .collect()
}

/// A sleep that suspended is warmed shortly before its end and its actor leases the message
/// early (`LeaseOptions::early`): the replay runs before the sleep's end, waits out the rest in
/// memory, and the handler goes on no earlier than the end. Without the early lease no replay
/// can begin before the store makes the message visible at the end. Five sleepers, of which at
/// least one must be replayed early (a warm-up needs room and a moment on a loaded machine).
async fn a_warmed_sleeper_takes_its_message_before_its_moment_and_wakes_no_earlier(h: &Harness) {
    const SLEEPERS: usize = 5;
    const SLEEP_MS: u64 = 2_000;
    // The default `suspend_after` (1 s): the runtime leases 350 ms early at most.
    let rt = h.runtime().await;
    let asks = (0..SLEEPERS).map(|i| {
        let w = rt.actor::<Worker>(format!("warm-{i}")).unwrap();
        async move {
            w.ask(vec![
                Step::Mark {
                    label: format!("run {i}"),
                },
                Step::Sleep { ms: SLEEP_MS },
                Step::Mark {
                    label: format!("woke {i}"),
                },
            ])
            .await
        }
    });
    for (i, reply) in futures::future::join_all(asks)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            reply.expect("ask"),
            vec![
                format!("run {i}"),
                format!("slept {SLEEP_MS}"),
                format!("woke {i}")
            ]
        );
    }
    assert!(
        rt.metrics().suspensions >= SLEEPERS as u64,
        "every sleep suspended"
    );
    let seen = observed(h);
    let at = |label: &str| marks(&seen, label);
    let mut replayed_early = 0;
    for i in 0..SLEEPERS {
        let runs = at(&format!("run {i}"));
        let woke = at(&format!("woke {i}"));
        assert!(runs.len() >= 2 && woke.len() == 1, "sleeper {i}: {seen:?}");
        // The sleep began after the first run's mark: it ends no earlier than this.
        let end = runs[0] + SLEEP_MS;
        assert!(
            woke[0] >= end,
            "sleeper {i} went on {} ms before its sleep's end",
            end - woke[0]
        );
        if runs[runs.len() - 1] < end {
            replayed_early += 1;
        }
    }
    assert!(
        replayed_early >= 1,
        "no sleeper's message was taken before its moment: {seen:?}"
    );
    rt.shutdown().await;
}

/// A node whose `max_active` is full of idle actors still warms its sleepers ahead of their
/// moment: an activation ahead passivates an idle actor to make room, as any activation does.
/// It used to count every active actor against the room, so a node whose woken sleepers
/// stayed active until their idle timeout warmed none (45 % of `loom bench sleepers`' 100 000
/// were then woken cold, at their moment, tens of milliseconds late). The idle actors are
/// filled in more than `IN_USE` (1 s) before the warm-up, so none counts as just used. Three
/// sleepers, of which at least one must be replayed before its moment (a warm-up needs a
/// moment on a loaded machine).
async fn a_node_full_of_idle_actors_still_warms_its_sleepers(h: &Harness) {
    const FULL: usize = 4;
    const SLEEPERS: usize = 3;
    const SLEEP_MS: u64 = 3_000;
    let rt = h.runtime_with(|c| c.max_active = FULL).await;
    let asks: Vec<_> = (0..SLEEPERS)
        .map(|i| {
            let sleeper = rt.actor::<Worker>(format!("full-sleeper-{i}")).unwrap();
            tokio::spawn(async move {
                sleeper
                    .ask(vec![
                        Step::Mark {
                            label: format!("full {i}"),
                        },
                        Step::Sleep { ms: SLEEP_MS },
                    ])
                    .await
            })
        })
        .collect();
    eventually(WAIT, "the sleeps suspend", || async {
        rt.metrics().suspensions >= SLEEPERS as u64
            && (0..SLEEPERS).all(|i| !rt.is_active(&worker(&format!("full-sleeper-{i}"))))
    })
    .await;
    // Fill the node with idle actors while the sleepers are suspended.
    for i in 0..FULL {
        let idle = rt.actor::<Worker>(format!("idle-{i}")).unwrap();
        assert_eq!(idle.ask(vec![]).await.expect("ask"), Vec::<String>::new());
    }
    assert_eq!(rt.metrics().active, FULL as u64, "the node is full");
    for (i, ask) in asks.into_iter().enumerate() {
        assert_eq!(
            ask.await.expect("join").expect("ask"),
            vec![format!("full {i}"), format!("slept {SLEEP_MS}")]
        );
    }
    let seen = observed(h);
    let mut warmed = 0;
    for i in 0..SLEEPERS {
        let runs = marks(&seen, &format!("full {i}"));
        assert!(runs.len() >= 2, "sleeper {i}: {seen:?}");
        if runs[runs.len() - 1] < runs[0] + SLEEP_MS {
            warmed += 1;
        }
    }
    assert!(
        warmed >= 1,
        "no sleeper was warmed: every replay began after its moment ({seen:?})"
    );
    rt.shutdown().await;
}

/// A crowd of sleepers sent at once, while the ready scan runs every 20 ms: once every one has
/// suspended, none is in memory or holds a lease. A scan that listed a sleeper as ready while
/// it ran, or a send's wake that came after a scan had run its message, used to activate it
/// again after it suspended; it found nothing to do and stayed, lease held, until its idle
/// timeout (60 s). Three rounds, since each such race is a matter of timing.
async fn a_crowd_of_sleepers_suspends_and_none_is_activated_again_for_nothing(h: &Harness) {
    const CROWD: u64 = 150;
    let rt = h
        .runtime_with(|c| c.suspend_after = Duration::from_millis(50))
        .await;
    for round in 0..3u64 {
        let sends = (0..CROWD).map(|i| {
            let w = rt.actor::<Worker>(format!("crowd-{round}-{i}")).unwrap();
            async move { w.send(vec![Step::Sleep { ms: 300_000 }]).await }
        });
        for sent in futures::future::join_all(sends).await {
            sent.expect("send");
        }
        let suspended = CROWD * (round + 1);
        eventually(WAIT, "the crowd suspends", || async {
            rt.metrics().suspensions >= suspended
        })
        .await;
        // What is leaving memory has a moment to go; an actor activated again for nothing
        // would stay for its idle timeout.
        eventually(
            Duration::from_secs(2),
            "every suspended sleeper leaves memory",
            || async { rt.metrics().active == 0 },
        )
        .await;
        // And none comes back: ten more scans.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            rt.metrics().active,
            0,
            "a suspended sleeper was activated again"
        );
    }
    rt.shutdown().await;
}

/// Suspensions are deliveries that only waited: a failure after several of them still gets
/// every retry (rule D17), instead of being taken for the last attempt.
async fn a_failure_after_suspensions_is_retried_as_a_first_attempt(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.suspend_after = Duration::from_millis(50))
        .await;
    let mut script = vec![Step::Sleep { ms: 200 }; 5];
    script.push(Step::Broken);
    let w = rt.actor::<Worker>("w").unwrap();
    let asked = tokio::spawn(async move { w.ask(script).await });
    eventually(WAIT, "the broken step fails and is retried", || async {
        rt.metrics().retries >= 1
    })
    .await;
    assert_eq!(rt.metrics().suspensions, 5);
    assert_eq!(
        rt.metrics().dead_letters,
        0,
        "the suspensions were counted as failed attempts"
    );
    h.probe
        .fixed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let reply = asked.await.unwrap().unwrap();
    assert_eq!(reply.last().map(String::as_str), Some("fixed"));
    rt.shutdown().await;
}

async fn send_after_arrives_after_its_delay(h: &Harness) {
    let rt = h.runtime().await;
    let script = vec![Step::SendAfter {
        key: "bob".into(),
        amount: 5,
        ms: 1500,
    }];
    rt.actor::<Worker>("w").unwrap().ask(script).await.unwrap();
    let bob = rt.actor::<Account>("bob").unwrap();
    assert_eq!(
        bob.ask(AccountMsg::Balance).await.unwrap(),
        0,
        "the scheduled message came early"
    );
    finished(h, &acct("bob"), 2).await;
    assert_eq!(bob.ask(AccountMsg::Balance).await.unwrap(), 5);
    rt.shutdown().await;
}

async fn wait_event_live(h: &Harness) {
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w").unwrap();
    w.send(vec![Step::Wait {
        name: "approved".into(),
        timeout_ms: None,
    }])
    .await
    .unwrap();
    eventually(WAIT, "the wait is journaled", || async {
        h.count(&worker("w"), |k| {
            matches!(k, EntryKind::EventAwaited { .. })
        })
        .await
            == 1
    })
    .await;
    w.deliver_event("approved", "by ops").await.unwrap();
    finished(h, &worker("w"), 1).await;
    assert_eq!(
        replies(h, &worker("w")).await,
        vec![json!(["event approved: by ops"])]
    );
    rt.shutdown().await;
}

async fn event_delivered_before_the_wait_is_kept(h: &Harness) {
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w").unwrap();
    w.deliver_event("approved", "early").await.unwrap();
    let reply = w
        .ask(vec![Step::Wait {
            name: "approved".into(),
            timeout_ms: Some(10_000),
        }])
        .await
        .unwrap();
    assert_eq!(reply, vec!["event approved: early"]);
    rt.shutdown().await;
}

async fn wait_event_times_out_with_an_error_the_handler_sees(h: &Harness) {
    let rt = h.runtime().await;
    let reply = rt
        .actor::<Worker>("w")
        .unwrap()
        .ask(vec![Step::Wait {
            name: "never".into(),
            timeout_ms: Some(300),
        }])
        .await
        .unwrap();
    assert_eq!(reply, vec!["event never: timed out"]);
    rt.shutdown().await;
}

/// Code deployed while an invocation waits for an event panics on its replay's way to the
/// wait (here at once: the restart hands the waiting message out again). The same code ran
/// past that point when it recorded the steps, so the code changed: the actor is parked, its
/// journal and message kept, and fixed code resumes the invocation where it waited. Before,
/// the panic was retried as a fresh failure counted from the wait's first delivery, so after
/// a long wait (an hourly recheck is a delivery) the first panic gave the message up, and with
/// it every step the invocation had recorded; here, after three tries.
async fn a_replay_that_panics_before_the_wait_it_resumes_parks_the_actor(h: &Harness) {
    use std::sync::atomic::Ordering::SeqCst;
    let id = worker("replay-panics");
    h.probe.fixed.store(true, SeqCst);
    let rt = h.runtime().await;
    rt.actor::<Worker>("replay-panics")
        .unwrap()
        .send(vec![
            Step::Broken,
            Step::Wait {
                name: "go".into(),
                timeout_ms: None,
            },
        ])
        .await
        .unwrap();
    eventually(WAIT, "the wait is journaled", || async {
        h.count(&id, |k| matches!(k, EntryKind::EventAwaited { .. }))
            .await
            == 1
    })
    .await;
    rt.kill().await;
    // Code that panics before the wait.
    h.probe.fixed.store(false, SeqCst);
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("replay-panics").unwrap();
    w.deliver_event("go", "now").await.unwrap();
    parked_keeping_its_message(h, &rt, &id, "replayed").await;
    // Fixed code resumes it where it waited.
    h.probe.fixed.store(true, SeqCst);
    assert!(rt.unpark(&id).await.unwrap());
    finished(h, &id, 1).await;
    assert_eq!(
        replies(h, &id).await,
        vec![json!(["fixed", "event go: now"])]
    );
    rt.shutdown().await;
}

async fn wait_event_replay_after_a_crash(h: &Harness) {
    let rt = h.runtime().await;
    rt.actor::<Worker>("w")
        .unwrap()
        .send(vec![
            activity("before"),
            Step::Wait {
                name: "approved".into(),
                timeout_ms: None,
            },
        ])
        .await
        .unwrap();
    eventually(WAIT, "the wait is journaled", || async {
        h.count(&worker("w"), |k| {
            matches!(k, EntryKind::EventAwaited { .. })
        })
        .await
            == 1
    })
    .await;
    let rt = h.crash_and_resume(rt, 0).await;
    rt.actor::<Worker>("w")
        .unwrap()
        .deliver_event("approved", "after the crash")
        .await
        .unwrap();
    finished(h, &worker("w"), 1).await;
    assert_eq!(
        replies(h, &worker("w")).await,
        vec![json!(["before done", "event approved: after the crash"])]
    );
    assert_eq!(h.probe.runs("before"), 1);
    rt.shutdown().await;
}

async fn messages_queue_behind_a_waiting_invocation(h: &Harness) {
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w").unwrap();
    w.send(vec![Step::Wait {
        name: "go".into(),
        timeout_ms: None,
    }])
    .await
    .unwrap();
    w.send(vec![activity("later")]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        h.probe.runs("later"),
        0,
        "a message overtook an invocation waiting for an event"
    );
    w.deliver_event("go", "now").await.unwrap();
    finished(h, &worker("w"), 2).await;
    assert_eq!(
        replies(h, &worker("w")).await,
        vec![json!(["event go: now"]), json!(["later done"])]
    );
    rt.shutdown().await;
}

/// A retry with the key of a message in a full mailbox, or of one whose reply is recorded, is a
/// duplicate, not `MailboxFull`: that error says nothing was sent, and a caller believing it
/// would send again under a new key. Before, both retries below were refused as a full mailbox.
async fn a_keyed_retry_into_a_full_mailbox_is_a_duplicate(h: &Harness) {
    use loom_core::runtime::{AskOptions, SendError, SendOptions, Sent};
    let rt = h.runtime_with(|c| c.max_mailbox = Some(1)).await;
    let w = rt.actor::<Worker>("w").unwrap();
    let key = loom_core::IdempotencyKey::new("K").unwrap();
    let keyed = || SendOptions {
        idempotency_key: Some(key.clone()),
        ..Default::default()
    };
    // It waits for an event, in the mailbox, which is then full.
    assert!(matches!(
        w.send_with(vec![wait_for("go", None)], keyed())
            .await
            .unwrap(),
        Sent::Enqueued(_)
    ));
    assert!(matches!(
        w.send(vec![activity("other")]).await,
        Err(SendError::MailboxFull { .. })
    ));
    assert_eq!(
        w.send_with(vec![wait_for("go", None)], keyed())
            .await
            .unwrap(),
        Sent::Duplicate
    );
    w.deliver_event("go", "now").await.unwrap();
    finished(h, &worker("w"), 1).await;
    // Full again; the first message's reply is recorded under its key.
    w.send(vec![wait_for("never", None)]).await.unwrap();
    let reply = w
        .ask_with(
            vec![wait_for("go", None)],
            AskOptions {
                idempotency_key: Some(key.clone()),
                ..Default::default()
            },
        )
        .await
        .expect("the recorded reply");
    assert_eq!(reply, vec!["event go: now"]);
    assert_eq!(h.probe.runs("other"), 0);
    rt.shutdown().await;
}

/// An ask still waiting when its runtime has stopped ends then, naming the key to ask again
/// with on a running node, instead of at its timeout (an HTTP ask of a node being deployed
/// otherwise outlived the node's grace period, and its client never learned the key). Asked
/// again with the key on the next runtime, it gets the reply, the message run once.
async fn an_ask_still_waiting_when_the_runtime_stops_names_its_key(h: &Harness) {
    use loom_core::runtime::{AskError, AskOptions};
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w").unwrap();
    let asked = tokio::spawn({
        let w = w.clone();
        async move {
            w.ask_with(
                vec![activity("before"), wait_for("go", None)],
                AskOptions {
                    timeout: Some(Duration::from_secs(120)),
                    ..Default::default()
                },
            )
            .await
        }
    });
    eventually(WAIT, "the activity ran", || async {
        h.probe.runs("before") == 1
    })
    .await;
    rt.shutdown().await;
    let key = match tokio::time::timeout(Duration::from_secs(5), asked)
        .await
        .expect("the ask outlived its runtime")
        .unwrap()
    {
        Err(AskError::Stopped { key }) => key,
        other => panic!("{other:?}"),
    };
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w").unwrap();
    w.deliver_event("go", "after").await.unwrap();
    let reply = w
        .ask_with(
            vec![activity("before"), wait_for("go", None)],
            AskOptions {
                idempotency_key: Some(key),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(reply, vec!["before done", "event go: after"]);
    assert_eq!(h.probe.runs("before"), 1);
    rt.shutdown().await;
}

/// A durable call whose future is dropped half-way (a `tokio::time::timeout` around a wait for
/// an event) has journaled a wait a replay cannot repeat: the live run went on past it, a
/// replay would wait there again, or take an event the live run never saw. The runtime stops
/// at the next durable call, or at the handler's end, and parks the actor. Before, both runs
/// below completed, and a replay after a crash would have diverged.
async fn a_durable_call_dropped_half_way_parks_the_actor(h: &Harness) {
    let rt = h.runtime().await;
    for (key, script) in [
        (
            "then-sleeps",
            vec![
                Step::TimedWait {
                    name: "go".into(),
                    ms: 100,
                },
                Step::Sleep { ms: 10 },
            ],
        ),
        (
            "ends",
            vec![Step::TimedWait {
                name: "go".into(),
                ms: 100,
            }],
        ),
    ] {
        rt.actor::<Worker>(key).unwrap().send(script).await.unwrap();
    }
    eventually(WAIT, "both are parked", || async {
        rt.parked().await.unwrap().len() == 2
    })
    .await;
    for (_, park) in rt.parked().await.unwrap() {
        assert!(
            park.reason.contains("was dropped before it ended"),
            "{}",
            park.reason
        );
        assert_eq!(park.step, Some(1));
    }
    assert!(replies(h, &worker("ends")).await.is_empty());
    rt.shutdown().await;
}

fn wait_for(name: &str, timeout_ms: Option<u64>) -> Step {
    Step::Wait {
        name: name.into(),
        timeout_ms,
    }
}

/// A wait for an event that has gone `suspend_after` without it suspends: the actor is
/// passivated and holds no lease, later messages wait behind it, and the event's delivery wakes
/// it (at once, not at a poll or a timeout) to finish the invocation.
async fn a_long_wait_for_an_event_suspends_until_the_event_arrives(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.suspend_after = Duration::from_millis(100))
        .await;
    let w = rt.actor::<Worker>("w").unwrap();
    let asked = tokio::spawn({
        let w = w.clone();
        async move {
            w.ask(vec![activity("before"), wait_for("approved", None)])
                .await
        }
    });
    let id = worker("w");
    suspended_with_a_message_behind(h, &rt, &w).await;
    assert_eq!(
        h.count(&id, |k| matches!(k, EntryKind::EventReceived { .. }))
            .await,
        0,
        "the wait ended with no event"
    );
    w.deliver_event("approved", "by ops").await.unwrap();
    let reply = tokio::time::timeout(WAIT, asked)
        .await
        .expect("the event did not wake the suspended wait")
        .unwrap()
        .unwrap();
    assert_eq!(reply, vec!["before done", "event approved: by ops"]);
    finished(h, &id, 2).await;
    assert_eq!(
        replies(h, &id).await,
        vec![
            json!(["before done", "event approved: by ops"]),
            json!(["later done"])
        ]
    );
    assert_eq!(
        h.probe.runs("before"),
        1,
        "the replay ran an activity again"
    );
    assert_eq!(rt.metrics().suspensions, 1);
    assert_eq!(
        h.count(&id, |k| matches!(k, EntryKind::EventAwaited { .. }))
            .await,
        1
    );
    rt.shutdown().await;
}

/// A suspended wait for an event is woken every `event_recheck` to look for it, each time a
/// delivery that only waits (rule D17). A store failure while such a delivery resumes the wait
/// does not give it up: before, the wake-ups were counted as attempts, and one failed lease of
/// the event's lane after six of them (three more than the attempts allowed) gave the workflow
/// up ("gave up after 7 attempts").
async fn a_store_failure_after_many_wakeups_of_a_wait_is_not_its_last_attempt(h: &Harness) {
    let rt = h
        .runtime_with(|c| {
            c.suspend_after = Duration::from_millis(50);
            c.event_recheck = Duration::from_millis(100);
        })
        .await;
    let w = rt.actor::<Worker>("w").unwrap();
    let asked = tokio::spawn({
        let w = w.clone();
        async move { w.ask(vec![wait_for("approved", None)]).await }
    });
    let wakeups = u64::from(rt.config().retry.max_attempts) + 3;
    eventually(WAIT, "the wait is woken and suspended again", || async {
        rt.metrics().suspensions >= wakeups
    })
    .await;
    h.faults
        .fail_lane_leases
        .store(1, std::sync::atomic::Ordering::SeqCst);
    eventually(WAIT, "a wake-up meets the failure", || async {
        h.faults
            .fail_lane_leases
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
    })
    .await;
    w.deliver_event("approved", "late").await.unwrap();
    let reply = tokio::time::timeout(WAIT, asked)
        .await
        .expect("the event did not end the wait")
        .unwrap()
        .expect("the workflow was given up");
    assert_eq!(reply, vec!["event approved: late"]);
    assert_eq!(rt.metrics().dead_letters, 0);
    rt.shutdown().await;
}

async fn a_suspended_wait_times_out_no_earlier_than_its_deadline(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.suspend_after = Duration::from_millis(100))
        .await;
    let started = Timestamp::now();
    let reply = rt
        .actor::<Worker>("w")
        .unwrap()
        .ask(vec![wait_for("never", Some(1500))])
        .await
        .unwrap();
    assert_eq!(reply, vec!["event never: timed out"]);
    assert!(
        Timestamp::now().saturating_since(started) >= Duration::from_millis(1500),
        "the suspended wait timed out early"
    );
    assert_eq!(rt.metrics().suspensions, 1);
    assert_eq!(rt.metrics().dead_letters, 0);
    rt.shutdown().await;
}

/// A crash while a wait is suspended loses nothing: an event delivered after the restart wakes
/// one wait, and a wait whose deadline passed while no node ran wakes at the restart and times
/// out.
async fn a_suspended_wait_survives_a_crash_and_its_deadline_passing_meanwhile(h: &Harness) {
    let quick = |c: &mut loom_core::runtime::Config| c.suspend_after = Duration::from_millis(100);
    let rt = h.runtime_with(quick).await;
    let (a, b) = (worker("a"), worker("b"));
    rt.actor::<Worker>("a")
        .unwrap()
        .send(vec![wait_for("approved", None)])
        .await
        .unwrap();
    rt.actor::<Worker>("b")
        .unwrap()
        .send(vec![wait_for("never", Some(1200))])
        .await
        .unwrap();
    eventually(WAIT, "both waits suspend", || async {
        rt.metrics().suspensions == 2
    })
    .await;
    rt.kill().await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let rt = h.runtime_with(quick).await;
    finished(h, &b, 1).await;
    assert_eq!(
        replies(h, &b).await,
        vec![json!(["event never: timed out"])]
    );
    rt.actor::<Worker>("a")
        .unwrap()
        .deliver_event("approved", "after the crash")
        .await
        .unwrap();
    finished(h, &a, 1).await;
    assert_eq!(
        replies(h, &a).await,
        vec![json!(["event approved: after the crash"])]
    );
    for id in [&a, &b] {
        assert_eq!(
            h.count(id, |k| matches!(k, EntryKind::EventReceived { .. }))
                .await,
            1,
            "{id}"
        );
    }
    rt.shutdown().await;
}

/// The event lands between the wait's last look at its lane and its suspension: the store
/// refuses the suspension (the lane holds the event), and the invocation receives the event at
/// once, not when its delivery's visibility (here 30 s) runs out.
async fn an_event_arriving_as_the_wait_suspends_is_received_at_once(h: &Harness) {
    let rt = h
        .runtime_with(|c| {
            c.suspend_after = Duration::from_millis(100);
            c.visibility = Duration::from_secs(30);
        })
        .await;
    let pause = h.faults.pause_next_suspend();
    let w = rt.actor::<Worker>("w").unwrap();
    let asked = tokio::spawn({
        let w = w.clone();
        async move { w.ask(vec![wait_for("approved", None)]).await }
    });
    tokio::time::timeout(WAIT, pause.reached.notified())
        .await
        .expect("the wait did not try to suspend");
    w.deliver_event("approved", "just in time").await.unwrap();
    pause.resume.notify_one();
    let reply = tokio::time::timeout(Duration::from_secs(10), asked)
        .await
        .expect("the event that refused the suspension waited for the delivery's visibility")
        .unwrap()
        .unwrap();
    assert_eq!(reply, vec!["event approved: just in time"]);
    assert_eq!(rt.metrics().suspensions, 0, "suspended beside its event");
    rt.shutdown().await;
}

/// Waits for `w`'s invocation to suspend (the actor passivated), and sends it a message
/// (`later`) that must wait behind the suspended invocation.
async fn suspended_with_a_message_behind(
    h: &Harness,
    rt: &loom_core::runtime::Runtime,
    w: &loom_core::runtime::ActorRef<Worker>,
) {
    let id = w.id().clone();
    eventually(WAIT, "the invocation suspends", || async {
        rt.metrics().suspensions == 1 && !rt.is_active(&id)
    })
    .await;
    w.send(vec![activity("later")]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.probe.runs("later"),
        0,
        "a message overtook a suspended invocation"
    );
}
