//! Runtime cases about what happens to a message between `send` and its settlement, outside the
//! crash path: dead letters put back, keys held while their message waits, messages that kill
//! every attempt.

use std::sync::atomic::Ordering;
use std::time::Duration;

use loom_core::runtime::{AskOptions, SendOptions, Sent};
use loom_core::{EntryKind, IdempotencyKey, MessageId, Reservation};

use super::cases::{WAIT, acct, activity, finished, reached, replies, worker};
use super::{Account, AccountMsg, Harness, RuntimeCase, Step, Worker, eventually, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        requeued_dead_letter_runs_again_and_what_it_sent_stays_deduplicated,
        requeued_dead_letter_without_journaled_steps_runs_again,
        idempotency_key_is_held_while_its_message_waits,
        a_message_that_stops_every_attempt_is_given_up_and_its_key_settled,
    ]
}

/// The ids of the messages the actor's journal started invocations for, in order.
async fn invoked(h: &Harness, id: &loom_core::ActorId) -> Vec<MessageId> {
    h.journal(id)
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            EntryKind::Invoked { message_id, .. } => Some(message_id),
            _ => None,
        })
        .collect()
}

/// Waits for the one dead letter of the case and returns its id.
async fn one_dead_letter(h: &Harness) -> u64 {
    eventually(WAIT, "the message is dead-lettered", || async {
        h.store.dead_letters(None, 10).await.unwrap().len() == 1
    })
    .await;
    h.store.dead_letters(None, 10).await.unwrap()[0].id
}

/// A handler sends a deposit, runs an activity, then panics on every attempt: the message is
/// dead-lettered with the invocation closed. Once the code is fixed and the dead letter
/// requeued, the message runs again from the start (it must not be taken for a duplicate of
/// the failed run), its activity runs again with the same key, and the deposit it sends again
/// has the same id, so the receiver applies it once.
async fn requeued_dead_letter_runs_again_and_what_it_sent_stays_deduplicated(h: &Harness) {
    let w = worker("w");
    let rt = h.runtime().await;
    let script = vec![
        Step::Send {
            key: "bob".into(),
            amount: 5,
        },
        activity("a"),
        Step::Broken,
    ];
    rt.actor::<Worker>("w").send(script).await.unwrap();
    let dead = one_dead_letter(h).await;
    assert_eq!(
        h.probe.runs("a"),
        1,
        "a journaled activity ran again on retry"
    );
    finished(h, &w, 1).await;
    let kinds = h.kinds(&w).await;
    assert_eq!(kinds.last(), Some(&"failed"), "{kinds:?}");
    finished(h, &acct("bob"), 1).await;
    rt.shutdown().await;

    h.probe.fixed.store(true, Ordering::SeqCst);
    h.store.requeue_dead_letter(dead).await.unwrap();
    let rt = h.runtime().await;
    finished(h, &w, 2).await;
    let runs = invoked(h, &w).await;
    assert_eq!(runs.len(), 2, "the requeued message did not run again");
    assert_ne!(
        runs[0], runs[1],
        "the requeued run reused the failed run's id"
    );
    assert_eq!(
        replies(h, &w).await,
        vec![serde_json::json!(["sent 5 to bob", "a done", "fixed"])]
    );
    assert_eq!(h.probe.runs("a"), 2, "the activity did not run again");
    let keys = h.probe.keys.lock().unwrap().clone();
    assert_eq!(
        keys[0], keys[1],
        "the activity's key changed with the requeue"
    );
    assert!(h.store.dead_letters(None, 10).await.unwrap().is_empty());
    // The deposit was sent twice with one id: bob applied it once.
    assert_eq!(
        rt.actor::<Account>("bob")
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        5
    );
    rt.shutdown().await;
}

async fn requeued_dead_letter_without_journaled_steps_runs_again(h: &Harness) {
    let w = worker("w");
    let rt = h.runtime().await;
    let key = IdempotencyKey::new("req").unwrap();
    let ask = |rt: &loom_core::Runtime| {
        let (w, key) = (rt.actor::<Worker>("w"), key.clone());
        async move {
            w.ask_with(
                vec![Step::Broken],
                AskOptions {
                    idempotency_key: Some(key),
                    timeout: None,
                },
            )
            .await
        }
    };
    assert!(ask(&rt).await.is_err(), "a broken step succeeded");
    let dead = one_dead_letter(h).await;
    assert!(
        h.journal(&w).await.is_empty(),
        "a panic before any step wrote"
    );
    rt.shutdown().await;

    h.probe.fixed.store(true, Ordering::SeqCst);
    h.store.requeue_dead_letter(dead).await.unwrap();
    let rt = h.runtime().await;
    finished(h, &w, 1).await;
    assert_eq!(replies(h, &w).await, vec![serde_json::json!(["fixed"])]);
    // The caller's key now holds the new outcome.
    assert_eq!(ask(&rt).await.unwrap(), vec!["fixed"]);
    assert_eq!(invoked(h, &w).await.len(), 1);
    rt.shutdown().await;
}

/// A reservation must outlive its message's wait however long it is (here a delay longer than
/// the reply ttl): a client retry with the key is a duplicate, and the message applies once.
async fn idempotency_key_is_held_while_its_message_waits(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.reply_ttl = Duration::from_millis(500))
        .await;
    let a = rt.actor::<Account>("alice");
    let opts = || SendOptions {
        idempotency_key: Some(IdempotencyKey::new("K").unwrap()),
        delay: Some(Duration::from_secs(1)),
    };
    assert!(matches!(
        a.send_with(AccountMsg::Deposit(10), opts()).await.unwrap(),
        Sent::Enqueued(_)
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        a.send_with(AccountMsg::Deposit(10), opts()).await.unwrap(),
        Sent::Duplicate,
        "the key expired while its message waited"
    );
    finished(h, &acct("alice"), 1).await;
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 10);
    // Settled: the reply is kept for the ttl from the settlement, then the key is free.
    let key = IdempotencyKey::new("K").unwrap();
    assert!(matches!(
        h.store.lookup(&acct("alice"), &key).await.unwrap(),
        Some(Reservation::Completed(_))
    ));
    eventually(WAIT, "the recorded reply expires", || async {
        h.store
            .lookup(&acct("alice"), &key)
            .await
            .unwrap()
            .is_none()
    })
    .await;
    rt.shutdown().await;
}

/// A message whose every attempt is cut short (here the runtime is killed inside it, as a
/// crashing process would be) is given up once its attempts are used, through the runtime's own
/// failure turn: the invocation is closed and the caller's key holds the failure, instead of the
/// key staying reserved for a message buried by the store.
async fn a_message_that_stops_every_attempt_is_given_up_and_its_key_settled(h: &Harness) {
    let w = worker("w");
    let key = IdempotencyKey::new("doomed").unwrap();
    let send = SendOptions {
        idempotency_key: Some(key.clone()),
        delay: None,
    };
    let mut rt = h.runtime().await;
    rt.actor::<Worker>("w")
        .send_with(vec![activity("a"), Step::Gate], send)
        .await
        .unwrap();
    // Harness::config allows 3 attempts: each one stops at the gate and the process "dies".
    for _ in 0..3 {
        reached(h).await;
        rt.kill().await;
        rt = h.runtime().await;
    }
    let dead = one_dead_letter(h).await;
    let reason = h.store.dead_letters(None, 10).await.unwrap()[0]
        .reason
        .clone();
    assert!(
        reason.contains("gave up after 3 deliveries"),
        "{dead}: {reason}"
    );
    assert_eq!(h.kinds(&w).await.last(), Some(&"failed"));
    match h.store.lookup(&w, &key).await.unwrap() {
        Some(Reservation::Completed(v)) => {
            assert!(v.to_string().contains("gave up"), "{v}")
        }
        other => panic!("the key was not settled with the failure: {other:?}"),
    }
    assert_eq!(h.probe.runs("a"), 1);
    rt.shutdown().await;
}
