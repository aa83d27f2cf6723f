//! The runtime cases. Each is one promise of DESIGN.md, attacked.

use std::time::Duration;

use loom_core::runtime::{
    AskError, AskOptions, CompactError, Compaction, SendError, SendOptions, Sent, compact_journal,
};
use loom_core::{ActorId, EntryKind, Envelope, IdempotencyKey, Seq, Timestamp};
use serde_json::{Value, json};

use super::{
    Account, AccountMsg, Ghost, Harness, RuntimeCase, Step, Worker, eventually, runtime_cases,
};

pub(super) fn all() -> Vec<RuntimeCase> {
    runtime_cases![
        send_and_ask,
        state_survives_restart_and_patches_apply_once,
        state_survives_a_crash,
        rejected_turn_leaves_no_trace_in_the_state,
        redelivered_message_is_applied_once,
        repeated_idempotency_key_returns_the_recorded_reply,
        concurrent_asks_with_one_key_apply_once,
        ask_timeout_then_retry_with_the_key_gets_the_reply_once,
        activity_live_journals_start_and_result,
        activity_replay_returns_the_journaled_result_without_running,
        activity_interrupted_by_a_crash_runs_again_with_the_same_key,
        activity_failure_is_journaled_and_replayed,
        send_leaves_exactly_once,
        send_replay_does_not_send_again,
        spawn_replay_finds_the_same_child,
        durable_sleep_live,
        durable_sleep_replay_does_not_restart_the_clock,
        send_after_arrives_after_its_delay,
        wait_event_live,
        event_delivered_before_the_wait_is_kept,
        wait_event_times_out_with_an_error_the_handler_sees,
        wait_event_replay_after_a_crash,
        messages_queue_behind_a_waiting_invocation,
        nondeterminism_parks_the_actor_naming_both_steps,
        panicking_handler_fails_only_that_invocation,
        exhausted_retries_dead_letter_the_message_with_its_error,
        store_failures_are_retried_not_swallowed,
        malformed_payload_is_dead_lettered_and_the_journal_untouched,
        unknown_kind_is_a_typed_error_and_its_messages_wait,
        invalid_key_is_a_typed_error,
        compaction_snapshots_and_trims,
        compaction_racing_appends_loses_nothing,
        recovery_falls_back_to_an_older_snapshot_when_the_newest_is_corrupt,
        crash_between_snapshot_and_trim_is_harmless,
        recovery_racing_a_compaction_starts_over_from_the_new_snapshot,
        no_readable_snapshot_after_a_trim_parks_the_actor_and_says_why,
        oversized_input_through_the_runtime_is_a_typed_error_and_loses_nothing,
        passivation_and_reactivation,
        more_actors_than_max_active_keep_their_state,
        lost_lease_stops_writes,
        leases_of_many_idle_actors_are_renewed_together,
        one_invocation_at_a_time_per_actor,
        many_actors_run_in_parallel,
        graceful_shutdown_drains_in_flight_invocations,
        active_actors_are_bounded,
        full_mailbox_pushes_back,
        compact_journal_works_without_the_actors_code,
        compact_journal_keeps_what_an_unfinished_invocation_needs,
        first_state_change_replaces_the_whole_state,
        bank_keeps_its_books_through_random_store_faults,
    ]
}

pub(super) const WAIT: Duration = Duration::from_secs(20);

pub(super) fn acct(key: &str) -> ActorId {
    ActorId::new("acct", key).expect("id")
}

pub(super) fn worker(key: &str) -> ActorId {
    ActorId::new("worker", key).expect("id")
}

pub(super) fn activity(name: &str) -> Step {
    Step::Activity {
        name: name.into(),
        fail: false,
        hold: false,
    }
}

/// Waits until the actor's journal holds `n` `Completed` or `Failed` entries.
pub(super) async fn finished(h: &Harness, id: &ActorId, n: usize) {
    eventually(
        WAIT,
        &format!("{n} finished invocations of {id}"),
        || async {
            h.count(id, |k| {
                matches!(k, EntryKind::Completed { .. } | EntryKind::Failed { .. })
            })
            .await
                >= n
        },
    )
    .await;
}

/// The replies journaled by the actor's completed invocations.
pub(super) async fn replies(h: &Harness, id: &ActorId) -> Vec<Value> {
    h.journal(id)
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            EntryKind::Completed { reply } => Some(reply),
            _ => None,
        })
        .collect()
}

pub(super) async fn reached(h: &Harness) {
    tokio::time::timeout(WAIT, h.probe.reached.notified())
        .await
        .expect("a handler reached the gate");
}

async fn send_and_ask(h: &Harness) {
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice");
    a.send(AccountMsg::Deposit(100)).await.unwrap();
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 100);
    assert_eq!(
        h.kinds(&acct("alice")).await,
        vec![
            "invoked",
            "state_patched",
            "completed",
            "invoked",
            "completed"
        ]
    );
    rt.shutdown().await;
}

async fn state_survives_restart_and_patches_apply_once(h: &Harness) {
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice");
    for _ in 0..5 {
        a.send(AccountMsg::Deposit(10)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 50);
    rt.shutdown().await;
    let rt = h.runtime().await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        50
    );
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask(AccountMsg::Deposit(1))
            .await
            .unwrap(),
        51
    );
    rt.shutdown().await;
}

async fn state_survives_a_crash(h: &Harness) {
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice");
    assert_eq!(a.ask(AccountMsg::Deposit(7)).await.unwrap(), 7);
    a.send(AccountMsg::Deposit(3)).await.unwrap();
    rt.kill().await;
    let rt = h.runtime().await;
    // Acknowledged means durable: the second deposit was sent before the crash.
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        10
    );
    rt.shutdown().await;
}

async fn rejected_turn_leaves_no_trace_in_the_state(h: &Harness) {
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice");
    a.send(AccountMsg::Deposit(10)).await.unwrap();
    match a.ask(AccountMsg::Withdraw(50)).await {
        Err(AskError::Rejected(r)) => assert!(r.reason().contains("insufficient funds"), "{r}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    match a.ask(AccountMsg::BadDeposit(1000)).await {
        Err(AskError::Rejected(_)) => {}
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(
        a.ask(AccountMsg::Deposit(1)).await.unwrap(),
        11,
        "a rejected turn changed the state"
    );
    let kinds = h.kinds(&acct("alice")).await;
    assert_eq!(kinds.iter().filter(|k| **k == "failed").count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == "state_patched").count(), 2);
    rt.shutdown().await;
    let rt = h.runtime().await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        11
    );
    rt.shutdown().await;
}

async fn redelivered_message_is_applied_once(h: &Harness) {
    let rt = h.runtime().await;
    let env = Envelope::new(
        acct("alice"),
        serde_json::to_value(AccountMsg::Deposit(10)).unwrap(),
    );
    // The same message twice, as a redelivery after a lost ack would bring it.
    h.store.enqueue(&env, None).await.unwrap();
    h.store.enqueue(&env, None).await.unwrap();
    let a = rt.actor::<Account>("alice");
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 10);
    let invoked = h
        .count(
            &acct("alice"),
            |k| matches!(k, EntryKind::Invoked { message_id, .. } if *message_id == env.id),
        )
        .await;
    assert_eq!(invoked, 1);
    rt.shutdown().await;
}

async fn repeated_idempotency_key_returns_the_recorded_reply(h: &Harness) {
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice");
    let key = IdempotencyKey::new("deposit-1").unwrap();
    let opts = || AskOptions {
        idempotency_key: Some(key.clone()),
        timeout: None,
    };
    assert_eq!(
        a.ask_with(AccountMsg::Deposit(10), opts()).await.unwrap(),
        10
    );
    assert_eq!(
        a.ask_with(AccountMsg::Deposit(10), opts()).await.unwrap(),
        10
    );
    let send = |k: &str| SendOptions {
        idempotency_key: Some(IdempotencyKey::new(k).unwrap()),
        delay: None,
    };
    assert!(matches!(
        a.send_with(AccountMsg::Deposit(5), send("s-1"))
            .await
            .unwrap(),
        Sent::Enqueued(_)
    ));
    assert_eq!(
        a.send_with(AccountMsg::Deposit(5), send("s-1"))
            .await
            .unwrap(),
        Sent::Duplicate
    );
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 15);
    rt.shutdown().await;
    // The recorded reply outlives the runtime.
    let rt = h.runtime().await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask_with(AccountMsg::Deposit(10), opts())
            .await
            .unwrap(),
        10
    );
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        15
    );
    rt.shutdown().await;
}

async fn concurrent_asks_with_one_key_apply_once(h: &Harness) {
    let rt = h.runtime().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let a = rt.actor::<Account>("alice");
        tasks.push(tokio::spawn(async move {
            a.ask_with(
                AccountMsg::Deposit(10),
                AskOptions {
                    idempotency_key: Some(IdempotencyKey::new("same").unwrap()),
                    timeout: None,
                },
            )
            .await
            .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 10);
    }
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        10
    );
    rt.shutdown().await;
}

async fn ask_timeout_then_retry_with_the_key_gets_the_reply_once(h: &Harness) {
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice");
    a.send(AccountMsg::Hold(0)).await.unwrap();
    reached(h).await;
    let opts = |timeout| AskOptions {
        idempotency_key: Some(IdempotencyKey::new("k").unwrap()),
        timeout,
    };
    let first = a
        .ask_with(
            AccountMsg::Deposit(5),
            opts(Some(Duration::from_millis(200))),
        )
        .await;
    assert!(matches!(first, Err(AskError::Timeout(_))), "{first:?}");
    h.probe.open(1);
    assert_eq!(
        a.ask_with(AccountMsg::Deposit(5), opts(None))
            .await
            .unwrap(),
        5
    );
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 5);
    rt.shutdown().await;
}

async fn activity_live_journals_start_and_result(h: &Harness) {
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w");
    assert_eq!(w.ask(vec![activity("a")]).await.unwrap(), vec!["a done"]);
    assert_eq!(h.probe.runs("a"), 1);
    assert_eq!(
        h.kinds(&worker("w")).await,
        vec![
            "invoked",
            "activity_started",
            "activity_completed",
            "state_patched",
            "completed"
        ]
    );
    let key = h.probe.keys.lock().unwrap().clone();
    let invoked = h.journal(&worker("w")).await[0].clone();
    let EntryKind::Invoked { message_id, .. } = invoked.kind else {
        panic!("first entry is not Invoked")
    };
    assert_eq!(key, vec![format!("worker/w/{message_id}/1")]);
    rt.shutdown().await;
}

async fn activity_replay_returns_the_journaled_result_without_running(h: &Harness) {
    let rt = h.runtime().await;
    rt.actor::<Worker>("w")
        .send(vec![activity("a"), Step::Gate])
        .await
        .unwrap();
    reached(h).await;
    rt.kill().await;
    h.probe.open(1);
    let rt = h.runtime().await;
    finished(h, &worker("w"), 1).await;
    assert_eq!(
        h.probe.runs("a"),
        1,
        "a completed activity ran again on replay"
    );
    assert_eq!(
        replies(h, &worker("w")).await,
        vec![json!(["a done", "passed the gate"])]
    );
    assert_eq!(
        h.count(&worker("w"), |k| matches!(
            k,
            EntryKind::ActivityStarted { .. }
        ))
        .await,
        1
    );
    rt.shutdown().await;
}

async fn activity_interrupted_by_a_crash_runs_again_with_the_same_key(h: &Harness) {
    let rt = h.runtime().await;
    rt.actor::<Worker>("w")
        .send(vec![Step::Activity {
            name: "charge".into(),
            fail: false,
            hold: true,
        }])
        .await
        .unwrap();
    reached(h).await;
    rt.kill().await;
    h.probe.open(2);
    let rt = h.runtime().await;
    finished(h, &worker("w"), 1).await;
    assert_eq!(h.probe.runs("charge"), 2);
    let keys = h.probe.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1], "the re-run got another idempotency key");
    assert_eq!(
        h.count(&worker("w"), |k| matches!(
            k,
            EntryKind::ActivityStarted { .. }
        ))
        .await,
        1
    );
    assert_eq!(
        h.count(&worker("w"), |k| matches!(
            k,
            EntryKind::ActivityCompleted { .. }
        ))
        .await,
        1
    );
    rt.shutdown().await;
}

async fn activity_failure_is_journaled_and_replayed(h: &Harness) {
    let rt = h.runtime().await;
    let script = vec![
        Step::Activity {
            name: "a".into(),
            fail: true,
            hold: false,
        },
        Step::Gate,
    ];
    rt.actor::<Worker>("w").send(script).await.unwrap();
    reached(h).await;
    rt.kill().await;
    h.probe.open(1);
    let rt = h.runtime().await;
    finished(h, &worker("w"), 1).await;
    assert_eq!(h.probe.runs("a"), 1);
    assert_eq!(
        replies(h, &worker("w")).await,
        vec![json!(["error: a failed", "passed the gate"])]
    );
    assert_eq!(
        h.count(&worker("w"), |k| matches!(
            k,
            EntryKind::ActivityFailed { .. }
        ))
        .await,
        1
    );
    rt.shutdown().await;
}

async fn send_leaves_exactly_once(h: &Harness) {
    let rt = h.runtime().await;
    let script = vec![
        Step::Send {
            key: "bob".into(),
            amount: 5,
        },
        Step::Send {
            key: "bob".into(),
            amount: 7,
        },
    ];
    rt.actor::<Worker>("w").ask(script).await.unwrap();
    finished(h, &acct("bob"), 2).await;
    assert_eq!(
        rt.actor::<Account>("bob")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        12
    );
    assert_eq!(
        h.count(&worker("w"), |k| matches!(k, EntryKind::MessageSent { .. }))
            .await,
        2
    );
    rt.shutdown().await;
}

async fn send_replay_does_not_send_again(h: &Harness) {
    let rt = h.runtime().await;
    let script = vec![
        Step::Send {
            key: "bob".into(),
            amount: 5,
        },
        activity("a"),
        Step::Gate,
    ];
    rt.actor::<Worker>("w").send(script).await.unwrap();
    reached(h).await;
    rt.kill().await;
    h.probe.open(1);
    let rt = h.runtime().await;
    finished(h, &worker("w"), 1).await;
    assert_eq!(
        rt.actor::<Account>("bob")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        5
    );
    let deposits = h
        .count(&acct("bob"), |k| matches!(k, EntryKind::Invoked { .. }))
        .await;
    assert_eq!(deposits, 2, "bob got the deposit {} times", deposits - 1);
    rt.shutdown().await;
}

async fn spawn_replay_finds_the_same_child(h: &Harness) {
    let rt = h.runtime().await;
    rt.actor::<Worker>("w")
        .send(vec![Step::Spawn { amount: 5 }, activity("a"), Step::Gate])
        .await
        .unwrap();
    reached(h).await;
    rt.kill().await;
    h.probe.open(1);
    let rt = h.runtime().await;
    finished(h, &worker("w"), 1).await;
    let reply = replies(h, &worker("w")).await.remove(0);
    let line = reply[0].as_str().unwrap().to_owned();
    let child: ActorId = line.strip_prefix("spawned ").unwrap().parse().unwrap();
    assert_eq!(child.kind(), "acct");
    finished(h, &child, 1).await;
    assert_eq!(
        rt.actor::<Account>(child.key())
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        5
    );
    assert_eq!(
        h.count(&worker("w"), |k| matches!(
            k,
            EntryKind::ChildSpawned { .. }
        ))
        .await,
        1
    );
    rt.shutdown().await;
}

async fn durable_sleep_live(h: &Harness) {
    let rt = h.runtime().await;
    let started = Timestamp::now();
    let reply = rt
        .actor::<Worker>("w")
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
    rt.kill().await;
    let rt = h.runtime().await;
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

async fn send_after_arrives_after_its_delay(h: &Harness) {
    let rt = h.runtime().await;
    let script = vec![Step::SendAfter {
        key: "bob".into(),
        amount: 5,
        ms: 1500,
    }];
    rt.actor::<Worker>("w").ask(script).await.unwrap();
    let bob = rt.actor::<Account>("bob");
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
    let w = rt.actor::<Worker>("w");
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
    let w = rt.actor::<Worker>("w");
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
        .ask(vec![Step::Wait {
            name: "never".into(),
            timeout_ms: Some(300),
        }])
        .await
        .unwrap();
    assert_eq!(reply, vec!["event never: timed out"]);
    rt.shutdown().await;
}

async fn wait_event_replay_after_a_crash(h: &Harness) {
    let rt = h.runtime().await;
    rt.actor::<Worker>("w")
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
    rt.kill().await;
    let rt = h.runtime().await;
    rt.actor::<Worker>("w")
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
    let w = rt.actor::<Worker>("w");
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

async fn nondeterminism_parks_the_actor_naming_both_steps(h: &Harness) {
    let rt = h.runtime().await;
    rt.actor::<Worker>("w")
        .send(vec![activity("a"), Step::Gate])
        .await
        .unwrap();
    reached(h).await;
    rt.kill().await;
    let before = h.highest(&worker("w")).await;
    let rt = h.runtime_versioned("v2-", |_| {}).await;
    eventually(WAIT, "the actor is parked", || async {
        !rt.parked().await.unwrap().is_empty()
    })
    .await;
    let (id, park) = rt.parked().await.unwrap().remove(0);
    assert_eq!(id, worker("w"));
    let reason = park.reason;
    assert!(
        reason.contains("activity \"a\"") && reason.contains("activity \"v2-a\""),
        "{reason}"
    );
    assert_eq!(park.step, Some(1));
    assert_eq!(
        h.highest(&worker("w")).await,
        before,
        "a parked actor wrote to its journal"
    );
    h.probe.open(1);
    rt.shutdown().await;
}

async fn panicking_handler_fails_only_that_invocation(h: &Harness) {
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice");
    let b = rt.actor::<Account>("bob");
    a.send(AccountMsg::Panic).await.unwrap();
    a.send(AccountMsg::Deposit(5)).await.unwrap();
    b.send(AccountMsg::Deposit(7)).await.unwrap();
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 5);
    assert_eq!(b.ask(AccountMsg::Balance).await.unwrap(), 7);
    assert!(rt.metrics().retries >= 2, "{:?}", rt.metrics());
    let dead = h.store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("the handler blew up"),
        "{}",
        dead[0].reason
    );
    assert!(
        h.kinds(&acct("alice")).await.iter().all(|k| *k != "failed"),
        "a panic before any durable step touched the journal"
    );
    rt.shutdown().await;
}

async fn exhausted_retries_dead_letter_the_message_with_its_error(h: &Harness) {
    let rt = h.runtime().await;
    match rt.actor::<Account>("alice").ask(AccountMsg::Panic).await {
        Err(AskError::Failed(reason)) => {
            assert!(
                reason.contains("gave up after 3 attempts")
                    && reason.contains("the handler blew up"),
                "{reason}"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    let dead = h.store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.to, acct("alice"));
    assert!(
        dead[0].reason.contains("gave up after 3 attempts"),
        "{}",
        dead[0].reason
    );
    assert_eq!(rt.metrics().dead_letters, 1);
    rt.shutdown().await;
}

async fn store_failures_are_retried_not_swallowed(h: &Harness) {
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice");
    h.faults
        .fail_writes
        .store(2, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(a.ask(AccountMsg::Deposit(5)).await.unwrap(), 5);
    assert_eq!(
        a.ask(AccountMsg::Balance).await.unwrap(),
        5,
        "a retried turn was applied twice"
    );
    assert!(h.faults.injected.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert!(rt.metrics().retries >= 1);
    rt.shutdown().await;
}

async fn malformed_payload_is_dead_lettered_and_the_journal_untouched(h: &Harness) {
    let rt = h.runtime().await;
    let carol = acct("carol");
    h.store
        .enqueue(
            &Envelope::new(carol.clone(), json!({"NoSuchVariant": 1})),
            None,
        )
        .await
        .unwrap();
    let c = rt.actor::<Account>("carol");
    assert_eq!(c.ask(AccountMsg::Deposit(3)).await.unwrap(), 3);
    let dead = h.store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("malformed message"),
        "{}",
        dead[0].reason
    );
    assert_eq!(
        h.count(&carol, |k| matches!(k, EntryKind::Invoked { .. }))
            .await,
        1
    );
    rt.shutdown().await;
}

/// A kind this runtime does not host: sending through it is a typed error; a message that
/// arrives anyway (from a node that hosts the kind) is never touched here: it waits for a host.
async fn unknown_kind_is_a_typed_error_and_its_messages_wait(h: &Harness) {
    let rt = h.runtime().await;
    match rt.actor::<Ghost>("x").send(()).await {
        Err(SendError::UnknownKind(k)) => assert_eq!(k, "ghost"),
        other => panic!("expected UnknownKind, got {other:?}"),
    }
    let ghost = ActorId::new("ghost", "x").unwrap();
    h.store
        .enqueue(&Envelope::new(ghost.clone(), json!(null)), None)
        .await
        .unwrap();
    // Many polls later, it still waits, untouched.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.store.pending(&ghost).await.unwrap(), 1);
    let waiting = h.store.messages(&ghost, None, 10).await.unwrap();
    assert!(
        !waiting[0].out,
        "a runtime not hosting the kind leased its message"
    );
    assert!(h.store.dead_letters(None, 10).await.unwrap().is_empty());
    assert_eq!(h.highest(&ghost).await, 0);
    rt.shutdown().await;
}

async fn invalid_key_is_a_typed_error(h: &Harness) {
    let rt = h.runtime().await;
    assert!(matches!(
        rt.actor::<Account>("").send(AccountMsg::Balance).await,
        Err(SendError::InvalidId(_))
    ));
    assert!(matches!(
        rt.actor::<Account>("bad\nkey")
            .ask(AccountMsg::Balance)
            .await,
        Err(AskError::Send(SendError::InvalidId(_)))
    ));
    rt.shutdown().await;
}

fn every(n: u64) -> Compaction {
    Compaction {
        every_entries: Some(n),
        every_bytes: None,
        keep: 2,
    }
}

async fn compaction_snapshots_and_trims(h: &Harness) {
    let rt = h.runtime_with(|c| c.compaction = every(10)).await;
    let a = rt.actor::<Account>("alice");
    for _ in 0..60 {
        a.send(AccountMsg::Deposit(1)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 60);
    let id = acct("alice");
    eventually(
        WAIT,
        "two snapshots kept and the journal trimmed",
        || async {
            let info = h.store.info(&id).await.unwrap();
            info.snapshots.len() == 2 && info.trimmed_through == info.snapshots[0]
        },
    )
    .await;
    let info = h.store.info(&id).await.unwrap();
    assert!(info.len() < 60, "the journal was not trimmed: {info:?}");
    rt.shutdown().await;
    let rt = h.runtime().await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        60
    );
    assert!(rt.metrics().replayed_entries < 60, "{:?}", rt.metrics());
    rt.shutdown().await;
}

async fn compaction_racing_appends_loses_nothing(h: &Harness) {
    let rt = h.runtime_with(|c| c.compaction = every(2)).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let a = rt.actor::<Account>("alice");
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                a.send(AccountMsg::Deposit(1)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let a = rt.actor::<Account>("alice");
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 200);
    assert!(rt.metrics().compactions > 0);
    let info = h.store.info(&acct("alice")).await.unwrap();
    assert!(
        info.snapshots
            .first()
            .is_none_or(|s| info.trimmed_through <= *s),
        "{info:?}"
    );
    rt.shutdown().await;
    let rt = h.runtime().await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        200
    );
    rt.shutdown().await;
}

async fn recovery_falls_back_to_an_older_snapshot_when_the_newest_is_corrupt(h: &Harness) {
    let rt = h.runtime_with(|c| c.compaction = every(10)).await;
    let a = rt.actor::<Account>("alice");
    for _ in 0..50 {
        a.send(AccountMsg::Deposit(1)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 50);
    let id = acct("alice");
    eventually(WAIT, "two snapshots", || async {
        h.store.info(&id).await.unwrap().snapshots.len() == 2
    })
    .await;
    rt.shutdown().await;
    let info = h.store.info(&id).await.unwrap();
    let newest: Seq = *info.snapshots.last().unwrap();
    h.faults.corrupt_snapshot(&id, newest);
    let rt = h
        .runtime_with(|c| c.compaction = Compaction::DISABLED)
        .await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        50
    );
    assert_eq!(
        rt.metrics().corrupt_snapshots,
        1,
        "the fallback was not reported"
    );
    rt.shutdown().await;
}

async fn crash_between_snapshot_and_trim_is_harmless(h: &Harness) {
    let id = acct("alice");
    let rt = h.runtime_with(|c| c.compaction = every(10)).await;
    let a = rt.actor::<Account>("alice");
    // Every trim of the first compactions fails after its snapshot was saved.
    h.faults
        .fail_trims
        .store(1000, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..30 {
        a.send(AccountMsg::Deposit(1)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 30);
    eventually(WAIT, "snapshots saved, their trims failed", || async {
        rt.metrics().compaction_failures >= 2
    })
    .await;
    let info = h.store.info(&id).await.unwrap();
    assert!(!info.snapshots.is_empty(), "{info:?}");
    assert_eq!(info.trimmed_through, 0, "a failed trim trimmed: {info:?}");
    // As after a crash between the two: restart, state intact, and the next compaction trims.
    rt.kill().await;
    h.faults
        .fail_trims
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let rt = h.runtime_with(|c| c.compaction = every(10)).await;
    let a = rt.actor::<Account>("alice");
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 30);
    for _ in 0..20 {
        a.send(AccountMsg::Deposit(1)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 50);
    eventually(WAIT, "a later compaction trims", || async {
        let info = h.store.info(&id).await.unwrap();
        info.trimmed_through > 0 && info.trimmed_through <= info.snapshots[0]
    })
    .await;
    rt.shutdown().await;
    let rt = h.runtime().await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        50
    );
    rt.shutdown().await;
}

/// A runtime recovering an actor reads the journal from where its snapshot (or the start)
/// leaves off; a compaction elsewhere may trim in between (an older incarnation's, or
/// `loom journal compact`). The state's early field, set by the first message and never again,
/// would silently be lost if the recovery started at the first entry left.
async fn recovery_racing_a_compaction_starts_over_from_the_new_snapshot(h: &Harness) {
    let id = acct("alice");
    let rt = h
        .runtime_with(|c| c.compaction = Compaction::DISABLED)
        .await;
    let a = rt.actor::<Account>("alice");
    assert_eq!(a.ask(AccountMsg::Grow(3)).await.unwrap(), 3);
    for _ in 0..10 {
        a.send(AccountMsg::Deposit(1)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 10);
    rt.shutdown().await;

    // The next recovery looks at the journal (no snapshot), then waits before reading it...
    let pause = h.faults.pause_next_read();
    let rt = h
        .runtime_with(|c| c.compaction = Compaction::DISABLED)
        .await;
    let a = rt.actor::<Account>("alice");
    a.send(AccountMsg::Deposit(1)).await.unwrap();
    tokio::time::timeout(WAIT, pause.reached.notified())
        .await
        .expect("the recovery reads the journal");
    // ...while the journal is compacted: a snapshot at its end, everything before trimmed.
    let done = compact_journal(&*h.store, &id, 1).await.unwrap();
    assert_eq!(done.trimmed_through, h.highest(&id).await);
    pause.resume.notify_one();
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 11);
    assert_eq!(
        a.ask(AccountMsg::Grow(0)).await.unwrap(),
        3,
        "the recovery lost the state the trimmed entries held"
    );
    rt.shutdown().await;
}

async fn no_readable_snapshot_after_a_trim_parks_the_actor_and_says_why(h: &Harness) {
    let id = acct("alice");
    let rt = h.runtime_with(|c| c.compaction = every(10)).await;
    let a = rt.actor::<Account>("alice");
    for _ in 0..50 {
        a.send(AccountMsg::Deposit(1)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 50);
    eventually(WAIT, "two snapshots and a trim", || async {
        let info = h.store.info(&id).await.unwrap();
        info.snapshots.len() == 2 && info.trimmed_through > 0
    })
    .await;
    rt.shutdown().await;
    let info = h.store.info(&id).await.unwrap();
    for seq in &info.snapshots {
        h.faults.corrupt_snapshot(&id, *seq);
    }
    let before = h.highest(&id).await;
    let rt = h
        .runtime_with(|c| c.compaction = Compaction::DISABLED)
        .await;
    let a = rt.actor::<Account>("alice");
    // Replaying the untrimmed tail from zero would be silently wrong: the actor must stop.
    a.send(AccountMsg::Deposit(1)).await.unwrap();
    eventually(WAIT, "the actor is parked", || async {
        rt.parked().await.unwrap().iter().any(|(p, _)| *p == id)
    })
    .await;
    let reason = rt
        .parked()
        .await
        .unwrap()
        .into_iter()
        .find(|(p, _)| *p == id)
        .map(|(_, p)| p.reason)
        .expect("parked");
    assert!(
        reason.contains("no snapshot") && reason.contains("trimmed"),
        "{reason}"
    );
    assert_eq!(h.highest(&id).await, before, "a parked actor wrote");
    assert_eq!(
        h.store.pending(&id).await.unwrap(),
        1,
        "the message was lost"
    );
    rt.shutdown().await;
}

async fn oversized_input_through_the_runtime_is_a_typed_error_and_loses_nothing(h: &Harness) {
    use loom_core::StoreError;
    use loom_core::limits::{MAX_ENTRY_BYTES, MAX_MESSAGE_BYTES};
    let id = acct("alice");
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice");
    assert_eq!(a.ask(AccountMsg::Deposit(7)).await.unwrap(), 7);
    let before = h.highest(&id).await;
    // A message over the limit: refused at send, nothing enqueued.
    let big = "x".repeat(MAX_MESSAGE_BYTES);
    match rt
        .actor::<Worker>("w")
        .send(vec![Step::Send {
            key: big,
            amount: 1,
        }])
        .await
    {
        Err(SendError::Store(StoreError::TooLarge { .. })) => {}
        other => panic!("an oversized message must be a typed error, got {other:?}"),
    }
    assert_eq!(h.store.pending(&worker("w")).await.unwrap(), 0);
    // A turn whose state change is over the entry limit: the invocation fails, is retried,
    // then dead-lettered with the reason; the state and journal keep what came before.
    match a.ask(AccountMsg::Grow(MAX_ENTRY_BYTES + 1)).await {
        Err(AskError::Failed(reason)) => {
            assert!(
                reason.contains("too large") || reason.contains("limit"),
                "{reason}"
            )
        }
        other => panic!("an oversized state change must fail the invocation, got {other:?}"),
    }
    let dead = h.store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        h.highest(&id).await,
        before,
        "part of the oversized turn was written"
    );
    assert_eq!(a.ask(AccountMsg::Deposit(1)).await.unwrap(), 8);
    rt.shutdown().await;
    let rt = h.runtime().await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        8
    );
    rt.shutdown().await;
}

async fn passivation_and_reactivation(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.idle_timeout = Duration::from_millis(200))
        .await;
    let a = rt.actor::<Account>("alice");
    assert_eq!(a.ask(AccountMsg::Deposit(5)).await.unwrap(), 5);
    let id = acct("alice");
    eventually(WAIT, "the idle actor is passivated", || async {
        !rt.is_active(&id)
    })
    .await;
    assert_eq!(a.ask(AccountMsg::Deposit(1)).await.unwrap(), 6);
    assert!(rt.metrics().recoveries >= 2);
    rt.shutdown().await;
}

/// `max_active` is a bound on memory, not on correctness: with many more actors than it, the
/// least recently used are passivated to make room and come back with their state.
async fn more_actors_than_max_active_keep_their_state(h: &Harness) {
    const LIMIT: usize = 4;
    const ACTORS: i64 = 24;
    let rt = h.runtime_with(|c| c.max_active = LIMIT).await;
    for round in 1..=3i64 {
        for i in 0..ACTORS {
            let a = rt.actor::<Account>(&format!("many-{i}"));
            assert_eq!(
                a.ask(AccountMsg::Deposit(i + 1)).await.unwrap(),
                round * (i + 1),
                "actor {i} in round {round}"
            );
        }
    }
    eventually(WAIT, "evicted actors leave, down to the limit", || async {
        rt.metrics().active <= LIMIT as u64
    })
    .await;
    // Every actor was evicted and came back at least once per round after the first.
    assert!(
        rt.metrics().recoveries >= 2 * ACTORS as u64,
        "{:?}",
        rt.metrics()
    );
    rt.shutdown().await;
}

async fn lost_lease_stops_writes(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.lease_ttl = Duration::from_millis(600))
        .await;
    let a = rt.actor::<Account>("alice");
    assert_eq!(a.ask(AccountMsg::Deposit(1)).await.unwrap(), 1);
    a.send(AccountMsg::Hold(10)).await.unwrap();
    reached(h).await;
    h.faults
        .fail_renewals
        .store(true, std::sync::atomic::Ordering::SeqCst);
    eventually(WAIT, "the runtime notices the lost lease", || async {
        rt.metrics().leases_lost == 1
    })
    .await;
    let id = acct("alice");
    let intruder = h
        .store
        .acquire(&id, "intruder", Duration::from_secs(60))
        .await
        .unwrap();
    let before = h.highest(&id).await;
    h.probe.open(1);
    a.send(AccountMsg::Deposit(100)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        h.highest(&id).await,
        before,
        "an actor wrote after losing its lease"
    );
    assert!(!rt.is_active(&id));
    h.store.release(&intruder).await.unwrap();
    h.faults
        .fail_renewals
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // Once the lease is free again, the held message is redone and the deposit applied, once each.
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 111);
    rt.shutdown().await;
}

async fn leases_of_many_idle_actors_are_renewed_together(h: &Harness) {
    let ttl = Duration::from_millis(600);
    let rt = h.runtime_with(|c| c.lease_ttl = ttl).await;
    let n = 40;
    for i in 0..n {
        let a = rt.actor::<Account>(format!("idle{i}"));
        assert_eq!(a.ask(AccountMsg::Deposit(1)).await.unwrap(), 1);
    }
    let mut tokens = Vec::new();
    for i in 0..n {
        let holder = h.store.holder(&acct(&format!("idle{i}"))).await.unwrap();
        tokens.push(holder.expect("an active actor holds its lease").token);
    }
    assert_eq!(rt.metrics().leases_held, n as u64);
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
    let (calls, leases) = (count(&h.faults.renewal_calls), count(&h.faults.renewals));
    // Five ttls idle: without renewals every lease would have run out.
    tokio::time::sleep(ttl * 5).await;
    for (i, token) in tokens.iter().enumerate() {
        let id = acct(&format!("idle{i}"));
        assert!(rt.is_active(&id), "idle{i} lost its lease while idle");
        let holder = h.store.holder(&id).await.unwrap();
        assert_eq!(
            holder.map(|l| l.token),
            Some(*token),
            "idle{i}'s lease ran out"
        );
    }
    let calls = count(&h.faults.renewal_calls) - calls;
    let leases = count(&h.faults.renewals) - leases;
    assert!(
        leases >= 10 * n as u64,
        "{leases} renewals of {n} leases in five ttls"
    );
    assert!(
        calls * 10 <= leases,
        "{calls} renewal calls for {leases} renewals: leases are not renewed together"
    );
    assert_eq!(rt.metrics().leases_lost, 0);
    rt.shutdown().await;
    assert_eq!(rt.metrics().leases_held, 0);
    for i in 0..n {
        assert!(
            h.store
                .holder(&acct(&format!("idle{i}")))
                .await
                .unwrap()
                .is_none()
        );
    }
}

async fn one_invocation_at_a_time_per_actor(h: &Harness) {
    let rt = h.runtime().await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let a = rt.actor::<Account>("alice");
        tasks.push(tokio::spawn(async move {
            a.send(AccountMsg::Slow(1, 10)).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        20
    );
    assert_eq!(
        h.probe
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    rt.shutdown().await;
}

async fn many_actors_run_in_parallel(h: &Harness) {
    let rt = h.runtime().await;
    for n in 0..30 {
        rt.actor::<Account>(format!("a{n}"))
            .send(AccountMsg::Slow(n, 100))
            .await
            .unwrap();
    }
    for n in 0..30 {
        assert_eq!(
            rt.actor::<Account>(format!("a{n}"))
                .ask(AccountMsg::Balance)
                .await
                .unwrap(),
            n
        );
    }
    assert!(
        h.probe
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            > 1,
        "actors ran one at a time"
    );
    rt.shutdown().await;
}

async fn graceful_shutdown_drains_in_flight_invocations(h: &Harness) {
    let rt = h.runtime().await;
    let id = acct("alice");
    rt.actor::<Account>("alice")
        .send(AccountMsg::Slow(5, 400))
        .await
        .unwrap();
    eventually(WAIT, "the invocation is running", || async {
        h.probe
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1
    })
    .await;
    rt.shutdown().await;
    assert_eq!(
        h.count(&id, |k| matches!(k, EntryKind::Completed { .. }))
            .await,
        1,
        "shutdown dropped an in-flight invocation"
    );
    assert_eq!(h.store.pending(&id).await.unwrap(), 0);
    assert!(
        h.store.holder(&id).await.unwrap().is_none(),
        "the lease was not released"
    );
    assert!(matches!(
        rt.actor::<Account>("alice").send(AccountMsg::Balance).await,
        Err(SendError::Shutdown)
    ));
}

async fn active_actors_are_bounded(h: &Harness) {
    let rt = h.runtime_with(|c| c.max_active = 3).await;
    for n in 0..10 {
        assert_eq!(
            rt.actor::<Account>(format!("a{n}"))
                .ask(AccountMsg::Deposit(1))
                .await
                .unwrap(),
            1
        );
    }
    eventually(WAIT, "at most 4 actors active", || async {
        rt.metrics().active <= 4
    })
    .await;
    rt.shutdown().await;
}

async fn full_mailbox_pushes_back(h: &Harness) {
    let rt = h.runtime_with(|c| c.max_mailbox = Some(3)).await;
    let a = rt.actor::<Account>("alice");
    a.send(AccountMsg::Hold(1)).await.unwrap();
    reached(h).await;
    a.send(AccountMsg::Deposit(1)).await.unwrap();
    a.send(AccountMsg::Deposit(1)).await.unwrap();
    match a.send(AccountMsg::Deposit(1)).await {
        Err(SendError::MailboxFull { pending, .. }) => assert_eq!(pending, 3),
        other => panic!("expected MailboxFull, got {other:?}"),
    }
    h.probe.open(1);
    let id = acct("alice");
    eventually(WAIT, "the backlog drains", || async {
        h.store.pending(&id).await.unwrap() == 0
    })
    .await;
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 3);
    rt.shutdown().await;
}

async fn compact_journal_works_without_the_actors_code(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.compaction = Compaction::DISABLED)
        .await;
    let a = rt.actor::<Account>("alice");
    for _ in 0..30 {
        a.send(AccountMsg::Deposit(2)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 60);
    rt.shutdown().await;
    let id = acct("alice");
    let highest = h.highest(&id).await;
    let done = compact_journal(&*h.store, &id, 2).await.unwrap();
    assert_eq!(done.snapshot, highest);
    assert_eq!(done.trimmed_through, highest);
    assert!(matches!(
        compact_journal(&*h.store, &id, 2).await,
        Err(CompactError::Nothing(_))
    ));
    let rt = h.runtime().await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        60
    );
    assert_eq!(rt.metrics().replayed_entries, 0, "{:?}", rt.metrics());
    rt.shutdown().await;
}

async fn compact_journal_keeps_what_an_unfinished_invocation_needs(h: &Harness) {
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w");
    w.ask(vec![activity("first")]).await.unwrap();
    w.send(vec![activity("a"), Step::Gate]).await.unwrap();
    reached(h).await;
    rt.kill().await;
    let id = worker("w");
    let done = compact_journal(&*h.store, &id, 2).await.unwrap();
    let first_invocation_end = h
        .journal(&id)
        .await
        .iter()
        .find(|e| matches!(e.kind, EntryKind::Invoked { .. }))
        .map(|e| e.seq - 1)
        .unwrap();
    assert_eq!(
        done.snapshot, first_invocation_end,
        "the snapshot must not cut into the unfinished invocation"
    );
    h.probe.open(1);
    let rt = h.runtime().await;
    finished(h, &id, 1).await;
    assert_eq!(
        h.probe.runs("a"),
        1,
        "the unfinished invocation lost its journaled activity"
    );
    assert_eq!(
        replies(h, &id).await,
        vec![json!(["a done", "passed the gate"])]
    );
    rt.shutdown().await;
}

async fn first_state_change_replaces_the_whole_state(h: &Harness) {
    let rt = h.runtime().await;
    rt.actor::<Account>("alice")
        .ask(AccountMsg::Deposit(5))
        .await
        .unwrap();
    rt.actor::<Account>("alice")
        .ask(AccountMsg::Deposit(5))
        .await
        .unwrap();
    let patches: Vec<Value> = h
        .journal(&acct("alice"))
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            EntryKind::StatePatched { patch } => Some(serde_json::to_value(patch).unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(
        patches[0],
        json!([{"op": "replace", "path": "", "value": {"balance": 5, "deposits": 1}}])
    );
    assert_eq!(
        patches[1],
        json!([{"op": "replace", "path": "/balance", "value": 10}, {"op": "replace", "path": "/deposits", "value": 2}])
    );
    rt.shutdown().await;
}

async fn bank_keeps_its_books_through_random_store_faults(h: &Harness) {
    use loom_bench::bank::Bank;
    use std::sync::atomic::Ordering::SeqCst;
    let seed = fastrand::u64(..);
    eprintln!("random store faults with seed {seed}");
    h.faults.seed(seed);
    let mut config = Harness::config();
    // Enough attempts that a message is not given up on because of injected faults alone.
    config.retry.max_attempts = 12;
    let rt = Bank::register(loom_core::Runtime::builder().store(h.store.clone()))
        .config(config)
        .start()
        .await
        .expect("runtime");
    let bank = Bank {
        accounts: 8,
        transfers: 200,
        concurrency: 32,
        seed,
        ..Bank::default()
    };
    h.faults.refused_percent.store(5, SeqCst);
    h.faults.lost_reply_percent.store(5, SeqCst);
    // A client retries each request until it is acknowledged; idempotency keys make that safe.
    while bank.open_accounts(&rt).await.is_err() {}
    futures::StreamExt::for_each_concurrent(
        futures::stream::iter(bank.ids()),
        bank.concurrency,
        |i| {
            let (bank, rt) = (&bank, &rt);
            async move {
                let mut tries = 0;
                while let Err(e) = bank.start(rt, i).await {
                    tries += 1;
                    assert!(tries < 100, "transfer {i} never acknowledged: {e}");
                }
            }
        },
    )
    .await;
    let statuses = bank
        .settle(&rt, WAIT * 3, |_| {})
        .await
        .expect("every transfer settles");
    assert!(
        h.faults.injected.load(SeqCst) > 20,
        "too few faults were injected to prove anything"
    );
    h.faults.calm();
    let verified = bank
        .verify(&rt, &statuses)
        .await
        .expect("the books balance after random faults");
    assert_eq!(verified.done + verified.refused, bank.transfers);
    let parked = rt.parked().await.unwrap();
    assert!(parked.is_empty(), "{parked:?}");
    rt.shutdown().await;
}
