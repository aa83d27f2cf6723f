//! Runtime cases about failures: non-determinism parks, panics and exhausted retries dead-letter, store failures are retried, bad input is a typed error.

use std::time::Duration;

use loom_core::runtime::{AskError, SendError, SendOptions};
use loom_core::{ActorId, EntryKind, Envelope};
use serde_json::json;

use super::common::{WAIT, acct, activity, reached, worker};
use super::{
    Account, AccountMsg, Ghost, Harness, RuntimeCase, Step, Touchy, TouchyWord, Worker, eventually,
    runtime_cases,
};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        nondeterminism_parks_the_actor_naming_both_steps,
        panicking_handler_fails_only_that_invocation,
        panicking_serde_code_fails_only_what_it_touches,
        a_panic_outside_the_handler_does_not_wedge_the_actor,
        exhausted_retries_dead_letter_the_message_with_its_error,
        store_failures_are_retried_not_swallowed,
        malformed_payload_is_dead_lettered_and_the_journal_untouched,
        unknown_kind_is_a_typed_error_and_its_messages_wait,
        invalid_key_is_a_typed_error,
    ]
}

async fn nondeterminism_parks_the_actor_naming_both_steps(h: &Harness) {
    let rt = h.runtime().await;
    rt.actor::<Worker>("w")
        .unwrap()
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
    let a = rt.actor::<Account>("alice").unwrap();
    let b = rt.actor::<Account>("bob").unwrap();
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

/// A message type's or a state's own serde code that panics (a hand-written impl) fails only
/// what it was decoding or encoding, as a panicking handler does: a message that does not
/// decode is dead-lettered at once, one whose state does not encode after its retries, each
/// with the panic, and the actor goes on with the next; so does a handler written as a plain
/// `fn` that panics before it makes its future; a JSON message is refused before it is sent
/// (`BadMessage`), not a panic of the sender's task; a state that does not decode when the
/// actor recovers parks it, naming the panic. (A panic while decoding a message once ended the
/// actor's task and left the actor active with no task: it took every wake-up and never ran
/// again on that node.)
async fn panicking_serde_code_fails_only_what_it_touches(h: &Harness) {
    let rt = h
        .runtime_registering(|b| b.register::<Touchy>(), |_| {})
        .await;
    let t = ActorId::new("touchy", "t").unwrap();
    // Straight into the mailbox: the runtime would encode them first.
    for word in [Touchy::POISON_IN, Touchy::POISON_STATE, Touchy::POISON_SYNC] {
        h.store
            .enqueue(&Envelope::new(t.clone(), json!(word)), None)
            .await
            .unwrap();
    }
    let touchy = rt.actor::<Touchy>("t").unwrap();
    // Sent as JSON (as the HTTP ingress sends), the message the runtime checks before it
    // sends is refused as bad, not a panic of the sender's task.
    match rt
        .any_actor(<Touchy as loom_core::runtime::Actor>::KIND, "t")
        .unwrap()
        .send_json(json!(Touchy::POISON_IN), SendOptions::default())
        .await
    {
        Err(SendError::BadMessage { error, .. }) => {
            assert!(error.contains("decoding the message blew up"), "{error}")
        }
        other => panic!("expected BadMessage, got {other:?}"),
    }
    assert_eq!(touchy.ask(TouchyWord("fine".into())).await.unwrap(), 4);
    let dead = h.store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    for (dl, what) in dead
        .iter()
        .zip(["decoding the message", "encoding the state"])
    {
        assert!(
            dl.reason.contains("its serde code panicked")
                && dl.reason.contains(&format!("{what} blew up")),
            "{}",
            dl.reason
        );
    }
    // A handler's own panic before its future is the handler's, as one inside it.
    assert!(
        dead[2].reason.contains("handler panicked")
            && dead[2]
                .reason
                .contains("the handler blew up before its future"),
        "{}",
        dead[2].reason
    );
    // A state that encodes, and panics when it is decoded again.
    let word = TouchyWord(Touchy::POISON_RECOVERY.into());
    assert_eq!(
        touchy.ask(word.clone()).await.unwrap(),
        Touchy::POISON_RECOVERY.len()
    );
    // Such a state, in memory, with a turn that fails: the state from before the turn does
    // not decode to be put back, so the actor cannot go on with what the handler left (a
    // later turn would journal it). It is reloaded from its journal, whose state does not
    // decode either: parked, the failed turn's message kept, not dead-lettered.
    let u = ActorId::new("touchy", "u").unwrap();
    let other = rt.actor::<Touchy>("u").unwrap();
    assert_eq!(
        other.ask(word).await.unwrap(),
        Touchy::POISON_RECOVERY.len()
    );
    other
        .send(TouchyWord(Touchy::POISON_SYNC.into()))
        .await
        .unwrap();
    eventually(
        WAIT,
        "the actor whose state cannot be put back is parked",
        || async { park_of(&rt, &u).await.is_some() },
    )
    .await;
    let park = park_of(&rt, &u).await.expect("parked");
    assert!(
        park.reason.contains("decoding the state blew up"),
        "{}",
        park.reason
    );
    assert_eq!(h.store.dead_letters(None, 10).await.unwrap().len(), 3);
    assert_eq!(h.store.pending(&u).await.unwrap(), 1, "the message is kept");
    rt.shutdown().await;
    let rt = h
        .runtime_registering(|b| b.register::<Touchy>(), |_| {})
        .await;
    rt.actor::<Touchy>("t")
        .unwrap()
        .send(TouchyWord("after".into()))
        .await
        .unwrap();
    eventually(WAIT, "the actor is parked", || async {
        park_of(&rt, &t).await.is_some()
    })
    .await;
    let park = park_of(&rt, &t).await.expect("parked");
    assert!(
        park.reason.contains("its serde code panicked")
            && park.reason.contains("decoding the state blew up"),
        "{}",
        park.reason
    );
    rt.shutdown().await;
}

/// A panic where no handler runs (here the store's mailbox lease, called by the actor's task)
/// ends that activation, which is looked at again after a while: the actor is not left active
/// without a task (deaf to every wake-up), and the message is answered once.
async fn a_panic_outside_the_handler_does_not_wedge_the_actor(h: &Harness) {
    use std::sync::atomic::Ordering::SeqCst;
    let rt = h.runtime().await;
    let alice = rt.actor::<Account>("alice").unwrap();
    assert_eq!(alice.ask(AccountMsg::Deposit(1)).await.unwrap(), 1);
    // Drained, the actor waits for a wake-up; the next message's lease panics.
    h.faults.panic_leases.store(1, SeqCst);
    assert_eq!(alice.ask(AccountMsg::Deposit(2)).await.unwrap(), 3);
    assert_eq!(h.faults.panic_leases.load(SeqCst), 0, "no lease panicked");
    assert_eq!(alice.ask(AccountMsg::Deposit(4)).await.unwrap(), 7);
    assert!(
        h.store.dead_letters(None, 10).await.unwrap().is_empty(),
        "a message was given up"
    );
    rt.shutdown().await;
}

/// `who`'s park, if it is parked.
async fn park_of(rt: &loom_core::Runtime, who: &ActorId) -> Option<loom_core::Park> {
    rt.parked()
        .await
        .unwrap()
        .into_iter()
        .find(|(id, _)| id == who)
        .map(|(_, park)| park)
}

async fn exhausted_retries_dead_letter_the_message_with_its_error(h: &Harness) {
    let rt = h.runtime().await;
    match rt
        .actor::<Account>("alice")
        .unwrap()
        .ask(AccountMsg::Panic)
        .await
    {
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
    // Counted just after the write that dead-lettered it; the ask may have read the recorded
    // failure (its own look at the store) in between.
    eventually(WAIT, "the dead letter is counted", || async {
        rt.metrics().dead_letters == 1
    })
    .await;
    rt.shutdown().await;
}

async fn store_failures_are_retried_not_swallowed(h: &Harness) {
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice").unwrap();
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
    let c = rt.actor::<Account>("carol").unwrap();
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
    match rt.actor::<Ghost>("x").unwrap().send(()).await {
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
    // Refused when the handle is made, before anything is sent.
    use loom_core::IdError;
    let long = "k".repeat(loom_core::limits::MAX_KEY_LEN + 1);
    assert!(matches!(rt.actor::<Account>(""), Err(IdError::EmptyKey)));
    assert!(matches!(
        rt.actor::<Account>(&long),
        Err(IdError::KeyTooLong { .. })
    ));
    assert!(matches!(
        rt.actor::<Account>("bad\nkey"),
        Err(IdError::BadChar { .. })
    ));
    assert_eq!(h.store.mailboxes(None, 10).await.unwrap(), vec![]);
    rt.shutdown().await;
}
