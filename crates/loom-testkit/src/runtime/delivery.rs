//! Runtime cases about what happens to a message between `send` and its settlement, outside the
//! crash path: dead letters put back, keys held while their message waits, messages that kill
//! every attempt.

use std::sync::atomic::Ordering;
use std::time::Duration;

use loom_core::runtime::{ActorRef, AskOptions, SendOptions, Sent, bury_mailbox};
use loom_core::{EntryKind, IdempotencyKey, MessageId, Reservation};

use super::common::{WAIT, acct, activity, finished, reached, replies, worker};
use super::{Account, AccountMsg, Harness, RuntimeCase, Step, Worker, eventually, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        requeued_dead_letter_runs_again_and_what_it_sent_stays_deduplicated,
        requeued_dead_letter_without_journaled_steps_runs_again,
        a_requeued_dead_letter_sends_nothing_again_however_long_ago_it_sent,
        a_requeued_dead_letter_sends_nothing_again_after_a_compaction,
        a_message_buried_mid_run_and_requeued_sends_nothing_again,
        idempotency_key_is_held_while_its_message_waits,
        expired_replies_are_removed_from_the_store,
        a_write_too_large_to_make_fails_its_message_once,
        a_message_that_stops_every_attempt_is_given_up_and_its_key_settled,
        restarts_during_a_durable_wait_do_not_give_it_up,
        deliveries_after_a_durable_sleep_ends_count_again,
        messages_of_a_kind_no_node_hosts_wait_for_its_host,
        parked_actor_stays_parked_across_restarts_until_unparked,
        the_same_event_delivered_twice_is_received_once,
        purging_a_dead_letter_settles_a_key_still_held,
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
    rt.actor::<Worker>("w").unwrap().send(script).await.unwrap();
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
    // The requeued run journaled the deposit but did not send it again: bob applied it once.
    assert_eq!(
        rt.actor::<Account>("bob")
            .unwrap()
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        5
    );
    rt.shutdown().await;
}

/// As above, but the receivers of what the failed run sent (a deposit and a spawned child)
/// apply more messages between the failed run and the requeue than they remember ids of
/// (`replay::RECENT`, 128), so their own look cannot tell a message sent again from a new one:
/// the requeued run must not send them again at all.
async fn a_requeued_dead_letter_sends_nothing_again_however_long_ago_it_sent(h: &Harness) {
    requeued_after_its_receivers_moved_on(h, Compacted::Not).await;
}

/// The same, with the worker's journal compacted by `compact_journal` (as `loom journal
/// compact` does) between the failure and the requeue, and then by the runtime itself: what
/// the failed run sent is then known only from the snapshot.
async fn a_requeued_dead_letter_sends_nothing_again_after_a_compaction(h: &Harness) {
    requeued_after_its_receivers_moved_on(h, Compacted::Offline).await;
    requeued_after_its_receivers_moved_on(h, Compacted::ByTheRuntime).await;
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Compacted {
    Not,
    Offline,
    ByTheRuntime,
}

/// How many messages the receivers apply between a failed run and its requeue: more than they
/// remember the ids of (`replay::RECENT`).
const LATER: i64 = 130;

/// A deposit a worker sends after what it sent a receiver before: once it is applied, so is
/// everything before it (one sender's messages to one receiver arrive in order, through a
/// partitioned store's relay too).
const MARK: i64 = 1000;

/// Waits until `account` applied the [`MARK`] deposit, then checks its balance.
async fn balance_after_the_mark(account: &ActorRef<Account>, expected: i64, what: &str) {
    eventually(WAIT, "the marking deposit is applied", || async {
        account.ask(AccountMsg::Balance).await.unwrap() >= MARK
    })
    .await;
    assert_eq!(
        account.ask(AccountMsg::Balance).await.unwrap(),
        expected + MARK,
        "{what}"
    );
}

/// Asks `LATER` deposits of 1 of each account, all at once.
async fn deposit_later(accounts: &[&ActorRef<Account>]) {
    futures::future::try_join_all(
        (0..LATER).flat_map(|_| accounts.iter().map(|a| a.ask(AccountMsg::Deposit(1)))),
    )
    .await
    .unwrap();
}

async fn requeued_after_its_receivers_moved_on(h: &Harness, compacted: Compacted) {
    // A worker and a receiver of its own per variant: two variants run on one store.
    let (key, to) = match compacted {
        Compacted::Not => ("w", "bob"),
        Compacted::Offline => ("w-offline", "bob-offline"),
        Compacted::ByTheRuntime => ("w-runtime", "bob-runtime"),
    };
    let w = worker(key);
    h.probe.fixed.store(false, Ordering::SeqCst);
    let rt = h
        .runtime_with(|c| {
            if compacted == Compacted::ByTheRuntime {
                c.compaction.every_entries = Some(1);
                c.compaction.keep = 1;
            }
        })
        .await;
    let worker_ref = rt.actor::<Worker>(key).unwrap();
    // A first invocation that changes the worker's state, so that there is a state to snapshot.
    worker_ref.ask(vec![activity("first")]).await.unwrap();
    let script = vec![
        Step::Send {
            key: to.into(),
            amount: 5,
        },
        Step::Spawn { amount: 7 },
        activity("a"),
        Step::Broken,
        // Reached by the fixed run only: once its receiver applied it, it applied whatever the
        // worker sent it before (one sender's messages to one receiver arrive in order, through
        // a partitioned store's relay too).
        Step::Send {
            key: to.into(),
            amount: MARK,
        },
    ];
    worker_ref.send(script).await.unwrap();
    let dead = one_dead_letter(h).await;
    let child = h
        .journal(&w)
        .await
        .into_iter()
        .find_map(|e| match e.kind {
            EntryKind::ChildSpawned { child, .. } => Some(child),
            _ => None,
        })
        .expect("the failed run spawned a child");
    let bob = rt.actor::<Account>(to).unwrap();
    let kid = rt.actor::<Account>(child.key()).unwrap();
    for (r, n) in [(&bob, 5), (&kid, 7)] {
        eventually(WAIT, "the failed run's sends are applied", || async {
            r.ask(AccountMsg::Balance).await.unwrap() == n
        })
        .await;
    }
    deposit_later(&[&bob, &kid]).await;
    if compacted == Compacted::ByTheRuntime {
        // Later invocations of the worker: the runtime compacts after each, from its memory.
        eventually(
            WAIT,
            "the runtime compacted the failed run away",
            || async {
                worker_ref.ask(vec![activity("later")]).await.unwrap();
                !h.journal(&w).await.iter().any(|e| {
                    matches!(
                        e.kind,
                        EntryKind::Failed { .. } | EntryKind::ChildSpawned { .. }
                    )
                })
            },
        )
        .await;
    }
    rt.shutdown().await;
    if compacted == Compacted::Offline {
        let done = loom_core::runtime::compact_journal(&*h.store, &w, 1)
            .await
            .unwrap();
        assert!(
            h.journal(&w).await.is_empty(),
            "the compaction at {} left entries of the failed run",
            done.snapshot
        );
    }

    h.probe.fixed.store(true, Ordering::SeqCst);
    h.store.requeue_dead_letter(dead).await.unwrap();
    let rt = h.runtime().await;
    balance_after_the_mark(
        &rt.actor::<Account>(to).unwrap(),
        5 + LATER,
        &format!("what the failed run sent to {to} was applied again ({compacted:?})"),
    )
    .await;
    assert!(
        replies(h, &w).await.contains(&serde_json::json!([
            format!("sent 5 to {to}"),
            format!("spawned {child}"),
            "a done",
            "fixed",
            format!("sent {MARK} to {to}")
        ])),
        "{:?}",
        replies(h, &w).await
    );
    // The same for the child, with a later message of the worker's to it as the marker.
    rt.actor::<Worker>(key)
        .unwrap()
        .ask(vec![Step::Send {
            key: child.key().into(),
            amount: MARK,
        }])
        .await
        .unwrap();
    balance_after_the_mark(
        &rt.actor::<Account>(child.key()).unwrap(),
        7 + LATER,
        &format!("the child the failed run spawned got its input again ({compacted:?})"),
    )
    .await;
    rt.shutdown().await;
}

/// The failed run's message is buried by a tool (`loom actors bury`) while its invocation is
/// still open in the journal (its process died at the gate), and then requeued: the runtime
/// closes the open invocation when the requeued message comes, and must note then, in memory,
/// what that invocation sent, since the requeued run starts right after.
async fn a_message_buried_mid_run_and_requeued_sends_nothing_again(h: &Harness) {
    let w = worker("w");
    let script = vec![
        Step::Send {
            key: "bob".into(),
            amount: 5,
        },
        activity("a"),
        Step::Gate,
        Step::Send {
            key: "bob".into(),
            amount: MARK,
        },
    ];
    let rt = h.runtime().await;
    rt.actor::<Worker>("w").unwrap().send(script).await.unwrap();
    reached(h).await;
    rt.kill().await;
    // Once the dead process's leases and its delivery's visibility ran out.
    let buried = std::sync::atomic::AtomicU64::new(0);
    eventually(WAIT, "the tool buries the message", || async {
        // Refused while the dead process's partition lease lasts; nothing to move while its
        // delivery is still out.
        if let Ok(n) = bury_mailbox(&*h.store, &w, "stuck", "tool").await {
            buried.fetch_add(n, Ordering::SeqCst);
        }
        buried.load(Ordering::SeqCst) == 1
    })
    .await;
    let dead = one_dead_letter(h).await;
    let kinds = h.kinds(&w).await;
    assert_eq!(kinds.first(), Some(&"invoked"), "{kinds:?}");
    assert!(
        !kinds.contains(&"failed"),
        "the buried run was closed before the requeue: {kinds:?}"
    );

    let rt = h.runtime().await;
    let bob = rt.actor::<Account>("bob").unwrap();
    eventually(WAIT, "the first deposit is applied", || async {
        bob.ask(AccountMsg::Balance).await.unwrap() == 5
    })
    .await;
    deposit_later(&[&bob]).await;
    h.probe.open(1);
    h.store.requeue_dead_letter(dead).await.unwrap();
    balance_after_the_mark(
        &bob,
        5 + LATER,
        "what the buried run sent was applied again",
    )
    .await;
    assert!(
        replies(h, &w).await.contains(&serde_json::json!([
            "sent 5 to bob",
            "a done",
            "passed the gate",
            format!("sent {MARK} to bob")
        ])),
        "{:?}",
        replies(h, &w).await
    );
    rt.shutdown().await;
}

async fn requeued_dead_letter_without_journaled_steps_runs_again(h: &Harness) {
    let w = worker("w");
    let rt = h.runtime().await;
    let key = IdempotencyKey::new("req").unwrap();
    let ask = |rt: &loom_core::Runtime| {
        let (w, key) = (rt.actor::<Worker>("w").unwrap(), key.clone());
        async move {
            w.ask_with(
                vec![Step::Broken],
                AskOptions {
                    idempotency_key: Some(key),
                    timeout: None,
                    ..Default::default()
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
    let a = rt.actor::<Account>("alice").unwrap();
    let opts = || SendOptions {
        idempotency_key: Some(IdempotencyKey::new("K").unwrap()),
        delay: Some(Duration::from_secs(1)),
        ..Default::default()
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

/// Every ask records its reply under a key (its own or one made up): once `reply_ttl` has run
/// out the runtime removes the record, so a store whose records do not expire by themselves
/// (embedded, PostgreSQL) does not keep a row per ask for ever. Before, nothing but a direct
/// call of `purge_expired` removed them, and the one below found all five.
async fn expired_replies_are_removed_from_the_store(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.reply_ttl = Duration::from_millis(300))
        .await;
    let a = rt.actor::<Account>("purged").unwrap();
    for _ in 0..5 {
        a.ask(AccountMsg::Deposit(1)).await.unwrap();
    }
    // Expired 0.3 s after each reply, and removed within the 0.15 s after that.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        h.store.purge_expired(1000).await.unwrap(),
        0,
        "expired records were left in the store"
    );
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 5);
    rt.shutdown().await;
}

/// A reply too large to record under its key (over `MAX_RESULT_BYTES` as recorded) fails its
/// message once: the store refuses every attempt's turn alike, and each attempt ran the handler
/// again. Before, the ask below ran it three times and was given up as a store failure. So does
/// a reply too large for the journal entry that holds it (over `MAX_ENTRY_BYTES`), which every
/// backend refuses before the record (before: run at every attempt, then dead-lettered as a
/// store failure). (Without a key a reply under 4 MiB completes. Not run here: a turn of two such
/// entries outlasts a loaded CI machine's Redis response timeout.) So does an activity whose
/// input is too large for the journal entry that starts it, a write before the turn that ends
/// the invocation (before: run at every attempt, then dead-lettered as a store failure).
async fn a_write_too_large_to_make_fails_its_message_once(h: &Harness) {
    use loom_core::limits::{MAX_ENTRY_BYTES, MAX_RESULT_BYTES};
    let rt = h.runtime().await;
    let pad = |bytes| Step::Pad { bytes };
    let activity = |bytes| Step::PaddedActivity {
        name: "upload".to_owned(),
        bytes,
    };
    for (n, (step, said)) in [
        (pad(MAX_RESULT_BYTES + 1000), "bytes as recorded"),
        (pad(MAX_ENTRY_BYTES + 1000), "over the limit of"),
        (activity(MAX_ENTRY_BYTES + 1000), "over the limit of"),
    ]
    .into_iter()
    .enumerate()
    {
        let label = format!("big{n}");
        let w = rt.actor::<Worker>(&label).unwrap();
        let script = vec![
            Step::Mark {
                label: label.clone(),
            },
            step,
        ];
        let runs = || {
            h.probe
                .observed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|l| l.starts_with(&format!("{label} at")))
                .count()
        };
        match w.ask(script).await {
            Err(loom_core::runtime::AskError::Failed(reason)) => {
                assert!(reason.contains(said), "{reason}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("case {n}: a reply or an activity's start over a limit was recorded"),
        }
        assert_eq!(
            runs(),
            1,
            "case {n}: the handler ran again for a write no attempt could make"
        );
        // Counted once the give-up's turn is through, which may come after the ask heard it.
        let dead = n as u64 + 1;
        eventually(WAIT, "the give-up counted", || async {
            rt.metrics().dead_letters == dead
        })
        .await;
    }
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
        ..Default::default()
    };
    let mut rt = h.runtime().await;
    rt.actor::<Worker>("w")
        .unwrap()
        .send_with(vec![activity("a"), Step::Gate], send)
        .await
        .unwrap();
    // Harness::config allows 3 attempts, and restarts two more: each delivery stops at the
    // gate and the process "dies".
    for _ in 0..5 {
        reached(h).await;
        rt = h.crash_and_resume(rt, 0).await;
    }
    let dead = one_dead_letter(h).await;
    let reason = h.store.dead_letters(None, 10).await.unwrap()[0]
        .reason
        .clone();
    assert!(
        reason.contains("gave up after 5 deliveries"),
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

/// Two nodes on one store: a node hosting `counter` sent it 200 messages due shortly and
/// stopped; another node, hosting other kinds, runs past their due time. It must not touch them
/// (they wait, visible, nothing dead-lettered), and 600 mailboxes of the unhosted kind must not
/// hide a hosted actor from its ready scan. When a counter host comes back, each of the 200
/// applies once.
async fn messages_of_a_kind_no_node_hosts_wait_for_its_host(h: &Harness) {
    use super::Counter;
    use loom_core::{ActorId, Envelope, Timestamp};
    let c1 = ActorId::new("counter", "c1").unwrap();
    // What the stopped counter node left: due in 300 ms (raw enqueues: that node is gone).
    let due = Timestamp::now() + Duration::from_millis(300);
    for _ in 0..200 {
        h.store
            .enqueue(&Envelope::new(c1.clone(), serde_json::json!(1)), Some(due))
            .await
            .unwrap();
    }
    for n in 0..600 {
        let other = ActorId::new("counter", format!("k{n}")).unwrap();
        h.store
            .enqueue(&Envelope::new(other, serde_json::json!(1)), None)
            .await
            .unwrap();
    }
    let other_node = h.runtime().await;
    // A hosted actor's message from another process: only the ready scan finds it.
    let alice = acct("alice");
    h.store
        .enqueue(
            &Envelope::new(
                alice.clone(),
                serde_json::to_value(AccountMsg::Deposit(5)).unwrap(),
            ),
            None,
        )
        .await
        .unwrap();
    finished(h, &alice, 1).await;
    eventually(WAIT, "the counter's messages are due", || async {
        Timestamp::now() > due + Duration::from_millis(300)
    })
    .await;
    assert_eq!(h.store.pending(&c1).await.unwrap(), 200);
    assert!(
        h.store.dead_letters(None, 10).await.unwrap().is_empty(),
        "a node dead-lettered messages of a kind it does not host"
    );
    assert_eq!(h.highest(&c1).await, 0);
    other_node.shutdown().await;

    let host = loom_core::Runtime::builder()
        .store(h.store.clone())
        .config(Harness::config())
        .register::<Counter>()
        .start()
        .await
        .expect("counter node");
    eventually(WAIT, "the counter applies its 200 messages", || async {
        h.store.pending(&c1).await.unwrap() == 0
    })
    .await;
    assert_eq!(
        host.actor::<Counter>("c1").unwrap().ask(0).await.unwrap(),
        200
    );
    assert!(h.store.dead_letters(None, 10).await.unwrap().is_empty());
    host.shutdown().await;
}

/// Non-determinism parks the actor in the store: eight restarts of the changed code later it is
/// still parked, its message neither run nor dead-lettered, its journal untouched. Unparked
/// under the fixed code, the invocation completes once, its journaled activity not run again.
async fn parked_actor_stays_parked_across_restarts_until_unparked(h: &Harness) {
    let w = worker("w");
    let rt = h.runtime().await;
    let sent = rt
        .actor::<Worker>("w")
        .unwrap()
        .send(vec![activity("a"), Step::Gate])
        .await
        .unwrap();
    reached(h).await;
    rt.kill().await;
    let before = h.highest(&w).await;
    for round in 0..8 {
        let rt = h.runtime_versioned("v2-", |_| {}).await;
        if round == 0 {
            eventually(WAIT, "the changed code parks the actor", || async {
                h.store.parked(&w).await.unwrap().is_some()
            })
            .await;
        } else {
            // Long enough for a redelivery (the visibility and the lease both ran out).
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let parked = rt.parked().await.unwrap();
        assert_eq!(parked.len(), 1, "round {round}: {parked:?}");
        assert_eq!(
            h.highest(&w).await,
            before,
            "round {round}: a parked actor wrote"
        );
        assert_eq!(h.probe.runs("v2-a"), 0);
        rt.kill().await;
    }
    let park = h.store.parked(&w).await.unwrap().expect("still parked");
    assert_eq!(park.message_id, Some(sent));
    assert_eq!(park.step, Some(1));
    assert!(park.reason.contains("v2-a"), "{}", park.reason);
    assert!(h.store.dead_letters(None, 10).await.unwrap().is_empty());
    assert_eq!(h.store.pending(&w).await.unwrap(), 1);

    // The code is fixed (the original version again), and the actor unparked.
    let rt = h.runtime().await;
    h.probe.open(1);
    assert!(rt.unpark(&w).await.unwrap());
    finished(h, &w, 1).await;
    assert_eq!(
        replies(h, &w).await,
        vec![serde_json::json!(["a done", "passed the gate"])]
    );
    assert_eq!(h.probe.runs("a"), 1, "the journaled activity ran again");
    assert!(rt.parked().await.unwrap().is_empty());
    rt.shutdown().await;
}

/// A webhook delivered twice: the first delivery satisfies a wait, the second is a duplicate
/// and must not satisfy the next wait. Two events with their own keys are two events, even
/// with equal data.
async fn the_same_event_delivered_twice_is_received_once(h: &Harness) {
    use loom_core::runtime::EventOptions;
    let w = worker("w");
    let rt = h.runtime().await;
    let wref = rt.actor::<Worker>("w").unwrap();
    let wait = |timeout_ms| Step::Wait {
        name: "approved".into(),
        timeout_ms,
    };
    wref.send(vec![wait(None), wait(Some(800))]).await.unwrap();
    assert!(matches!(
        wref.deliver_event("approved", "yes").await.unwrap(),
        Sent::Enqueued(_)
    ));
    assert_eq!(
        wref.deliver_event("approved", "yes").await.unwrap(),
        Sent::Duplicate
    );
    finished(h, &w, 1).await;
    assert_eq!(
        replies(h, &w).await,
        vec![serde_json::json!([
            "event approved: yes",
            "event approved: timed out"
        ])]
    );
    // Received: a late redelivery is still a duplicate (for the reply ttl).
    assert_eq!(
        wref.deliver_event("approved", "yes").await.unwrap(),
        Sent::Duplicate
    );
    let keyed = |k: &str| EventOptions {
        key: Some(IdempotencyKey::new(k).unwrap()),
        ..Default::default()
    };
    wref.send(vec![wait(None), wait(None)]).await.unwrap();
    for k in ["approval-1", "approval-2"] {
        assert!(matches!(
            wref.deliver_event_with("approved", "again", keyed(k))
                .await
                .unwrap(),
            Sent::Enqueued(_)
        ));
    }
    finished(h, &w, 2).await;
    assert_eq!(
        replies(h, &w).await[1],
        serde_json::json!(["event approved: again", "event approved: again"])
    );
    rt.shutdown().await;
}

/// An invocation waiting for an event lives through more restarts than a message may end
/// deliveries without a word: those restarts are no failure of the message, and the wait goes
/// on until its event comes.
async fn restarts_during_a_durable_wait_do_not_give_it_up(h: &Harness) {
    let w = worker("w");
    let mut rt = h.runtime().await;
    rt.actor::<Worker>("w")
        .unwrap()
        .send(vec![Step::Wait {
            name: "go".into(),
            timeout_ms: None,
        }])
        .await
        .unwrap();
    eventually(WAIT, "the wait is journaled", || async {
        h.count(&w, |k| matches!(k, EntryKind::EventAwaited { .. }))
            .await
            == 1
    })
    .await;
    // Eight restarts, each after the message came back to a new runtime (its lease and its
    // visibility ran out): more than give-up's five, and more than the store's own delivery
    // limit below it (seven), which the runtime lifts for a message in a durable wait.
    for _ in 0..8 {
        rt = h.crash_and_resume(rt, 0).await;
        tokio::time::sleep(Duration::from_millis(1600)).await;
    }
    assert!(h.store.dead_letters(None, 10).await.unwrap().is_empty());
    rt.actor::<Worker>("w")
        .unwrap()
        .deliver_event("go", "at last")
        .await
        .unwrap();
    finished(h, &w, 1).await;
    assert_eq!(
        replies(h, &w).await,
        vec![serde_json::json!(["event go: at last"])]
    );
    rt.shutdown().await;
}

/// A handler that stops its process after a durable sleep ends, every time: the deliveries
/// after the sleep's end count again (the one that saw it end, journaled at once, and those
/// after it), so the message is given up like any other instead of being redelivered forever
/// as one still sleeping.
async fn deliveries_after_a_durable_sleep_ends_count_again(h: &Harness) {
    let w = worker("w");
    let mut rt = h.runtime().await;
    rt.actor::<Worker>("w")
        .unwrap()
        .send(vec![Step::Sleep { ms: 200 }, Step::Gate])
        .await
        .unwrap();
    // The delivery that slept, the one that resumed past the sleep (exempt: the sleep's end
    // was not journaled yet), then five counted ones: the sixth is given up before it runs.
    for _ in 0..6 {
        reached(h).await;
        rt = h.crash_and_resume(rt, 0).await;
    }
    one_dead_letter(h).await;
    let reason = h.store.dead_letters(None, 10).await.unwrap()[0]
        .reason
        .clone();
    assert!(reason.contains("gave up after 5 deliveries"), "{reason}");
    assert_eq!(
        h.count(&w, |k| matches!(
            k,
            EntryKind::TimerFired {
                resumed_in: Some(1),
                ..
            }
        ))
        .await,
        1
    );
    rt.shutdown().await;
}

/// A message the store buried by itself (no turn recorded its failure) keeps its key held;
/// purging it settles the key with the failure, so a caller asking again learns it failed
/// instead of waiting forever.
async fn purging_a_dead_letter_settles_a_key_still_held(h: &Harness) {
    let a = acct("held");
    let key = IdempotencyKey::new("purged-1").unwrap();
    let mut env = loom_core::Envelope::new(a.clone(), serde_json::json!({ "Deposit": 5 }));
    env.idempotency_key = Some(key.clone());
    let week = Duration::from_secs(7 * 24 * 3600);
    h.store.enqueue_once(&env, None, &key, week).await.unwrap();
    let opts = loom_core::LeaseOptions {
        visibility: Duration::from_secs(30),
        max_deliveries: 10,
        ..loom_core::LeaseOptions::default()
    };
    let d = h.store.lease(&a, opts).await.unwrap().expect("delivery");
    h.store
        .dead_letter(&d.receipt, "buried by hand")
        .await
        .unwrap();
    assert!(matches!(
        h.store.lookup(&a, &key).await.unwrap(),
        Some(Reservation::Pending { .. })
    ));
    // Another buried message whose key a waiting message carries (the key taken again after
    // its record expired, say): that key is the waiting message's, and is left alone.
    let b = acct("taken");
    let taken = IdempotencyKey::new("taken-1").unwrap();
    let mut first = loom_core::Envelope::new(b.clone(), serde_json::json!({ "Deposit": 1 }));
    first.idempotency_key = Some(taken.clone());
    h.store
        .enqueue_once(&first, None, &taken, week)
        .await
        .unwrap();
    let d = h.store.lease(&b, opts).await.unwrap().expect("delivery");
    h.store
        .dead_letter(&d.receipt, "buried by hand")
        .await
        .unwrap();
    let mut second = loom_core::Envelope::new(b.clone(), serde_json::json!({ "Deposit": 2 }));
    second.idempotency_key = Some(taken.clone());
    h.store.enqueue(&second, None).await.unwrap();
    let purged = loom_core::runtime::purge_dead_letters(&*h.store, None, week)
        .await
        .unwrap();
    assert_eq!(purged, 2);
    assert!(h.store.dead_letters(None, 10).await.unwrap().is_empty());
    assert!(matches!(
        h.store.lookup(&b, &taken).await.unwrap(),
        Some(Reservation::Pending { .. })
    ));
    let rt = h.runtime().await;
    let asked = rt
        .actor::<Account>("held")
        .unwrap()
        .ask_with(
            AccountMsg::Deposit(5),
            AskOptions {
                idempotency_key: Some(key),
                timeout: Some(Duration::from_secs(5)),
                ..Default::default()
            },
        )
        .await;
    match asked {
        Err(loom_core::runtime::AskError::Failed(reason)) => {
            assert!(reason.contains("purged"), "{reason}")
        }
        other => panic!("not the recorded failure: {other:?}"),
    }
    rt.shutdown().await;
}
