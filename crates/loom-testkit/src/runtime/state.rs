//! Runtime cases about an actor's state: acknowledged changes survive restarts and crashes, rejected turns leave no trace, bad input is refused whole.

use loom_core::EntryKind;
use loom_core::runtime::{AskError, SendError};
use serde_json::{Value, json};

use super::common::{WAIT, acct, worker};
use super::{Account, AccountMsg, Harness, RuntimeCase, Step, Worker, eventually, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        send_and_ask,
        state_survives_restart_and_patches_apply_once,
        state_survives_a_crash,
        rejected_turn_leaves_no_trace_in_the_state,
        first_state_change_replaces_the_whole_state,
        oversized_input_through_the_runtime_is_a_typed_error_and_loses_nothing,
        a_value_json_cannot_hold_is_refused,
        a_state_nested_too_deep_to_snapshot_is_refused_once,
    ]
}

/// JSON has no NaN or infinity: serde_json encodes one as `null`, without an error. A state
/// holding one (an `f64`, or an `Option<f64>` of `Some(NaN)`) fails its message, once, naming
/// why, and the journal keeps the state before it; a message holding one is refused when it is
/// sent, by a client or by an actor, and so are an event's data. Before: the `f64` was
/// journaled as `null`, and the actor, which went on with NaN in memory, was parked at its next
/// recovery; `Some(NaN)` was read live and `None` after a restart, so a recovery took other
/// branches; and a message holding one was dead-lettered by its receiver as one that does not
/// decode.
async fn a_value_json_cannot_hold_is_refused(h: &Harness) {
    use super::{Gauge, GaugeMsg};
    let start = || h.runtime_registering(|b| b.register_actor(Gauge), |_| {});
    let rt = start().await;
    let g = rt.actor::<Gauge>("g").unwrap();
    let read = |rt: &loom_core::runtime::Runtime| {
        let g = rt.actor::<Gauge>("g").unwrap();
        async move { g.ask(GaugeMsg::Read).await.unwrap() }
    };
    let said = "holds a NaN or an infinity";
    g.ask(GaugeMsg::Mean { sum: 10, n: 4 }).await.unwrap();
    for (n, msg) in [
        GaugeMsg::Mean { sum: 0, n: 0 },
        GaugeMsg::Keep { sum: 0, n: 0 },
    ]
    .into_iter()
    .enumerate()
    {
        match g.ask(msg).await {
            Err(AskError::Failed(reason)) => assert!(reason.contains(said), "{reason}"),
            other => panic!("a NaN state was taken: {other:?}"),
        }
        // Given up at once: every attempt would compute it alike.
        eventually(WAIT, "the give-up counted", || async {
            rt.metrics().dead_letters == n as u64 + 1
        })
        .await;
    }
    let kept = "GaugeState { mean: 2.5, kept: None }";
    assert_eq!(read(&rt).await, kept);
    match g.send(GaugeMsg::Set(f64::NAN)).await {
        Err(SendError::Encode(reason)) => assert!(reason.contains(said), "{reason}"),
        other => panic!("a message holding a NaN was sent: {other:?}"),
    }
    match g.deliver_event("reading", &f64::INFINITY).await {
        Err(SendError::Encode(reason)) => assert!(reason.contains(said), "{reason}"),
        other => panic!("an event holding an infinity was delivered: {other:?}"),
    }
    let forward = GaugeMsg::Forward {
        to: "g".to_owned(),
        sum: 1,
        n: 0,
    };
    match g.ask(forward).await {
        Err(AskError::Rejected(r)) => assert!(r.reason().contains(said), "{r:?}"),
        other => panic!("an actor sent a message holding an infinity: {other:?}"),
    }
    assert_eq!(read(&rt).await, kept);
    rt.shutdown().await;
    let rt = start().await;
    assert_eq!(read(&rt).await, kept, "recovered otherwise than it ran");
    rt.shutdown().await;
}

/// A state that each turn nests a little deeper, at its innermost point, changes by shallow
/// patches, but its snapshot (and a whole-state entry) would nest it two levels down: the turn
/// that would take it past `MAX_JSON_DEPTH` fails its message once, naming why, and the actor
/// goes on from the state before. Before, the turn was journaled, and every snapshot after it
/// refused, so compaction failed for good and the journal was never trimmed.
async fn a_state_nested_too_deep_to_snapshot_is_refused_once(h: &Harness) {
    use super::Nest;
    use loom_core::limits::MAX_JSON_DEPTH;
    let start = || h.runtime_registering(|b| b.register_actor(Nest), |_| {});
    let rt = start().await;
    let n = rt.actor::<Nest>("n").unwrap();
    assert_eq!(n.ask(60).await.unwrap(), 60);
    let most = MAX_JSON_DEPTH - 2;
    assert_eq!(n.ask(most - 60).await.unwrap(), most);
    match n.ask(1).await {
        Err(AskError::Failed(reason)) => {
            assert!(
                reason.contains("its snapshot would nest deeper"),
                "{reason}"
            )
        }
        other => panic!("a state past the depth a snapshot may hold: {other:?}"),
    }
    eventually(WAIT, "the give-up counted", || async {
        rt.metrics().dead_letters == 1
    })
    .await;
    assert_eq!(n.ask(0).await.unwrap(), most, "the state before it");
    rt.shutdown().await;
    let rt = start().await;
    assert_eq!(rt.actor::<Nest>("n").unwrap().ask(0).await.unwrap(), most);
    rt.shutdown().await;
}

async fn send_and_ask(h: &Harness) {
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice").unwrap();
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
    let a = rt.actor::<Account>("alice").unwrap();
    for _ in 0..5 {
        a.send(AccountMsg::Deposit(10)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 50);
    rt.shutdown().await;
    let rt = h.runtime().await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .unwrap()
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        50
    );
    assert_eq!(
        rt.actor::<Account>("alice")
            .unwrap()
            .ask(AccountMsg::Deposit(1))
            .await
            .unwrap(),
        51
    );
    rt.shutdown().await;
}

async fn state_survives_a_crash(h: &Harness) {
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice").unwrap();
    assert_eq!(a.ask(AccountMsg::Deposit(7)).await.unwrap(), 7);
    a.send(AccountMsg::Deposit(3)).await.unwrap();
    let rt = h.crash_and_resume(rt, 0).await;
    // Acknowledged means durable: the second deposit was sent before the crash.
    assert_eq!(
        rt.actor::<Account>("alice")
            .unwrap()
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        10
    );
    rt.shutdown().await;
}

async fn rejected_turn_leaves_no_trace_in_the_state(h: &Harness) {
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice").unwrap();
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
            .unwrap()
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        11
    );
    rt.shutdown().await;
}

async fn first_state_change_replaces_the_whole_state(h: &Harness) {
    let rt = h.runtime().await;
    rt.actor::<Account>("alice")
        .unwrap()
        .ask(AccountMsg::Deposit(5))
        .await
        .unwrap();
    rt.actor::<Account>("alice")
        .unwrap()
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

async fn oversized_input_through_the_runtime_is_a_typed_error_and_loses_nothing(h: &Harness) {
    use loom_core::StoreError;
    use loom_core::limits::{MAX_ENTRY_BYTES, MAX_MESSAGE_BYTES};
    let id = acct("alice");
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice").unwrap();
    assert_eq!(a.ask(AccountMsg::Deposit(7)).await.unwrap(), 7);
    let before = h.highest(&id).await;
    // An activity's or an awaited event's name over its limit: the step is refused when it is
    // taken, naming the limit (before: an event's name of a few MiB was journaled, and the
    // entry that receives the event, naming it, refused only when the event came).
    let long = "n".repeat(loom_core::limits::MAX_STEP_NAME_LEN + 1);
    for step in [
        Step::Activity {
            name: long.clone(),
            fail: false,
            hold: false,
        },
        Step::Wait {
            name: long.clone(),
            timeout_ms: Some(10),
        },
    ] {
        match rt.actor::<Worker>("named").unwrap().ask(vec![step]).await {
            Err(AskError::Rejected(r)) => {
                assert!(r.reason().contains("name is 1 to 1024 bytes"), "{r:?}")
            }
            other => panic!("a step named past the limit: {other:?}"),
        }
    }
    // A delay past a century (before: it saturated to "never", and the message held its place
    // in the mailbox, and its key, for good), and an event no wait could receive: refused
    // when sent, in a handler as by a client, nothing enqueued.
    let far = Step::SendAfter {
        key: "later".into(),
        amount: 1,
        ms: u64::MAX,
    };
    match rt.actor::<Worker>("named").unwrap().ask(vec![far]).await {
        Err(AskError::Rejected(r)) => assert!(r.reason().contains("delay is at most"), "{r:?}"),
        other => panic!("a delay past the limit in a handler: {other:?}"),
    }
    let opts = loom_core::runtime::SendOptions {
        delay: Some(loom_core::limits::MAX_DELAY + std::time::Duration::from_secs(1)),
        ..Default::default()
    };
    match a.send_with(AccountMsg::Deposit(1), opts).await {
        Err(SendError::Invalid(e)) => assert!(e.contains("delay is at most"), "{e}"),
        other => panic!("a delay past the limit: {other:?}"),
    }
    for name in [long.as_str(), ""] {
        match a.deliver_event(name, &1).await {
            Err(SendError::Invalid(e)) => assert!(e.contains("name is 1 to 1024 bytes"), "{e}"),
            other => panic!("an event named past the limit: {other:?}"),
        }
    }
    assert_eq!(h.store.pending(&acct("later")).await.unwrap(), 0);
    assert_eq!(h.store.pending(&id).await.unwrap(), 0);
    // A message over the limit: refused at send, nothing enqueued.
    let big = "x".repeat(MAX_MESSAGE_BYTES);
    match rt
        .actor::<Worker>("w")
        .unwrap()
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
    // A turn whose state change is over the entry limit: the invocation fails once (every
    // attempt would be refused alike) and is dead-lettered with the reason; the state and
    // journal keep what came before.
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
            .unwrap()
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        8
    );
    rt.shutdown().await;
}
