//! Runtime cases about durable activities: journaled live, replayed without running, run again after a crash with the same key, failures journaled.

use std::sync::Arc;
use std::time::Duration;

use loom_core::EntryKind;
use loom_core::runtime::{Actor, AskError, Context, Rejected};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::common::{WAIT, activity, finished, reached, replies, worker};
use super::{Harness, Probe, RuntimeCase, Step, Worker, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        activity_live_journals_start_and_result,
        activity_replay_returns_the_journaled_result_without_running,
        activity_interrupted_by_a_crash_runs_again_with_the_same_key,
        activity_failure_is_journaled_and_replayed,
        clock_random_and_uuid_replay_what_the_first_run_saw,
        an_activitys_output_is_what_its_journal_keeps_or_the_step_fails_once,
        a_panic_inside_an_activity_is_retried_not_parked,
    ]
}

/// A panic inside an activity's closure with attempts left is a failed attempt of the
/// activity, journaled and retried under its policy (1000 attempts, 10 ms backoff here), not a
/// failure of the whole message (*before*: the handler ran again under `Config::retry`, at the
/// same attempt, and the policy's count and backoff never applied). Out of its last attempt
/// (`ctx.activity` makes one) it fails the whole message, retried as any panic is, and is not
/// recorded as the step's failure, so the fixed code runs the activity. Neither parks (a review
/// once caught the open-step guard taking the panic for a durable call dropped half-way).
async fn a_panic_inside_an_activity_is_retried_not_parked(h: &Harness) {
    use std::sync::atomic::Ordering;
    // Retries enough that the fix below comes before the last, however slow the machine.
    let rt = h.runtime_with(|c| c.retry.max_attempts = 1000).await;
    let activity_failed = |actor: &'static str| async move {
        h.journal(&worker(actor))
            .await
            .iter()
            .filter(|e| matches!(&e.kind, EntryKind::ActivityAttemptFailed { error, .. } | EntryKind::ActivityFailed { error, .. } if error.contains("panicked: an activity blew up")))
            .count()
    };
    for once in [true, false] {
        let actor = if once { "once" } else { "policy" };
        h.probe.fixed.store(false, Ordering::SeqCst);
        let retried = rt.metrics().retries;
        let w = rt.actor::<Worker>(actor).unwrap();
        let asked = tokio::spawn(async move {
            w.ask(vec![Step::PanickyActivity {
                name: "boom".into(),
                once,
            }])
            .await
        });
        if once {
            super::eventually(WAIT, "the message is retried", || async {
                rt.metrics().retries >= retried + 2
            })
            .await;
            assert_eq!(activity_failed(actor).await, 0, "a panic was journaled");
        } else {
            super::eventually(WAIT, "the panicking attempts are journaled", || async {
                activity_failed(actor).await >= 2
            })
            .await;
            assert_eq!(rt.metrics().retries, retried, "the message was retried");
        }
        assert!(rt.parked().await.unwrap().is_empty(), "parked");
        h.probe.fixed.store(true, Ordering::SeqCst);
        let reply = tokio::time::timeout(WAIT, asked)
            .await
            .expect("no reply")
            .unwrap()
            .unwrap();
        assert_eq!(reply, vec!["boom done"], "{actor}");
    }
    rt.shutdown().await;
}

/// An activity's output with a field its JSON leaves out.
#[derive(Serialize, Deserialize)]
struct Receipt {
    id: u32,
    #[serde(skip_serializing, default)]
    local: u32,
}

/// What kind `outputs` is asked to do: each runs one activity whose output its journal entry
/// cannot keep as it is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum Output {
    /// A `Receipt` whose `local` is 7; the handler branches on it, then sleeps long enough to
    /// be suspended, so that the rest runs as a replay.
    Skipped,
    /// `f64::NAN`, which JSON writes as `null`.
    Nan,
    /// A string over the 4 MiB an entry holds.
    Huge,
}

struct Outputs(Arc<Probe>);

impl Outputs {
    fn ran(&self, name: &str) {
        *self
            .0
            .runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_default() += 1;
    }
}

impl Actor for Outputs {
    const KIND: &'static str = "outputs";
    type State = ();
    type Message = Output;
    type Reply = String;

    async fn handle(
        &self,
        _: &mut (),
        ctx: &mut Context<'_>,
        msg: Output,
    ) -> Result<String, Rejected> {
        match msg {
            Output::Skipped => {
                let r: Receipt = ctx
                    .activity("receipt", &(), |_| {
                        self.ran("receipt");
                        async { Ok::<_, String>(Receipt { id: 1, local: 7 }) }
                    })
                    .await?;
                if r.local == 7 {
                    ctx.activity("branch", &(), |_| {
                        self.ran("branch");
                        async { Ok::<_, String>(()) }
                    })
                    .await?;
                }
                ctx.sleep(Duration::from_millis(600)).await?;
                Ok(format!("{} {}", r.id, r.local))
            }
            Output::Nan => {
                let x: f64 = ctx
                    .activity("nan", &(), |_| {
                        self.ran("nan");
                        async { Ok::<_, String>(f64::NAN) }
                    })
                    .await?;
                Ok(x.to_string())
            }
            Output::Huge => {
                let s: String = ctx
                    .activity("huge", &(), |_| {
                        self.ran("huge");
                        async { Ok::<_, String>("x".repeat(5 << 20)) }
                    })
                    .await?;
                Ok(s.len().to_string())
            }
        }
    }
}

/// The handler gets an activity's output as its journal keeps it, so a replay goes the way the
/// live run went (*before*: live, the skipped field was 7 and the branch ran; the replay after
/// the suspension read 0, met the branch's step in the journal and parked the actor). An output
/// the journal cannot keep (a NaN, which decodes from nothing; more than an entry holds) fails
/// the step for good, once, in a small entry (*before*: the live run got the NaN, which no
/// replay could decode; the huge output's write was refused, the message retried and the
/// side effect run at each of its 3 attempts, then dead-lettered).
async fn an_activitys_output_is_what_its_journal_keeps_or_the_step_fails_once(h: &Harness) {
    let rt = h
        .runtime_registering(
            |b| b.register_actor(Outputs(h.probe.clone())),
            |c| c.suspend_after = Duration::from_millis(100),
        )
        .await;
    let ask = |key: &str, what: Output| {
        let r = rt.actor::<Outputs>(key).unwrap();
        async move {
            tokio::time::timeout(WAIT, r.ask(what))
                .await
                .expect("no answer")
        }
    };
    assert_eq!(ask("skipped", Output::Skipped).await.unwrap(), "1 0");
    assert_eq!((h.probe.runs("receipt"), h.probe.runs("branch")), (1, 0));
    for (key, what, name, says) in [
        ("nan", Output::Nan, "nan", "does not decode"),
        ("huge", Output::Huge, "huge", "cannot be journaled"),
    ] {
        match ask(key, what).await {
            Err(AskError::Rejected(r)) => assert!(r.to_string().contains(says), "{key}: {r}"),
            other => panic!("{key}: {other:?}"),
        }
        assert_eq!(h.probe.runs(name), 1, "{key}: the side effect ran again");
        let id = loom_core::ActorId::new("outputs", key).unwrap();
        assert!(
            h.kinds(&id).await.contains(&"activity_failed"),
            "{key}: {:?}",
            h.kinds(&id).await
        );
        // Asked again, the actor answers: it was not parked.
        assert!(
            matches!(ask(key, Output::Skipped).await, Ok(ref s) if s == "1 0"),
            "{key} cannot answer"
        );
    }
    assert!(rt.parked().await.unwrap().is_empty(), "an actor was parked");
    rt.shutdown().await;
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
