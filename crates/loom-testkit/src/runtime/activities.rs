//! Runtime cases about durable activities: journaled live, replayed without running, run again after a crash with the same key, failures journaled.

use loom_core::EntryKind;
use serde_json::json;

use super::common::{activity, finished, reached, replies, worker};
use super::{Harness, RuntimeCase, Step, Worker, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        activity_live_journals_start_and_result,
        activity_replay_returns_the_journaled_result_without_running,
        activity_interrupted_by_a_crash_runs_again_with_the_same_key,
        activity_failure_is_journaled_and_replayed,
        clock_random_and_uuid_replay_what_the_first_run_saw,
    ]
}

async fn activity_live_journals_start_and_result(h: &Harness) {
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w").unwrap();
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
        .unwrap()
        .send(vec![activity("a"), Step::Gate])
        .await
        .unwrap();
    reached(h).await;
    let rt = h.crash_and_resume(rt, 1).await;
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
        .unwrap()
        .send(vec![Step::Activity {
            name: "charge".into(),
            fail: false,
            hold: true,
        }])
        .await
        .unwrap();
    reached(h).await;
    let rt = h.crash_and_resume(rt, 2).await;
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
    rt.actor::<Worker>("w").unwrap().send(script).await.unwrap();
    reached(h).await;
    let rt = h.crash_and_resume(rt, 1).await;
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

/// `ctx.now()`, `ctx.random_u64()` and `ctx.uuid()` are journaled on the first run: after a
/// crash the handler runs again and sees the same three values; another message draws new ones.
async fn clock_random_and_uuid_replay_what_the_first_run_saw(h: &Harness) {
    let rt = h.runtime().await;
    let w = worker("w");
    rt.actor::<Worker>("w")
        .unwrap()
        .send(vec![
            Step::Clock,
            Step::Activity {
                name: "a".into(),
                fail: false,
                hold: true,
            },
        ])
        .await
        .unwrap();
    reached(h).await;
    // Crashed inside the activity: the handler runs again from the start.
    let rt = h.crash_and_resume(rt, 1).await;
    finished(h, &w, 1).await;
    let seen = h
        .probe
        .observed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], seen[1], "the replay saw other values");
    assert_eq!(
        h.count(&w, |k| matches!(k, EntryKind::Recorded { .. }))
            .await,
        3
    );
    // A new message draws new values.
    let reply = rt
        .actor::<Worker>("w")
        .unwrap()
        .ask(vec![Step::Clock])
        .await
        .unwrap();
    let fresh = &reply[0];
    assert_ne!(fresh, &seen[0]);
    let field = |line: &str, name: &str| {
        line.split(' ')
            .skip_while(|w| *w != name)
            .nth(1)
            .map(str::to_owned)
    };
    assert_ne!(field(fresh, "random"), field(&seen[0], "random"));
    assert_ne!(field(fresh, "uuid"), field(&seen[0], "uuid"));
    rt.shutdown().await;
}
