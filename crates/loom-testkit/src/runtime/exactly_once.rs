//! Runtime cases about exactly-once effects: redelivered messages, idempotency keys, outgoing messages and children across replays, the bank under random store faults.

use std::sync::atomic::Ordering;
use std::time::Duration;

use loom_core::runtime::{AskError, AskOptions, SendOptions, Sent};
use loom_core::{ActorId, EntryKind, Envelope, IdempotencyKey};

use super::common::{WAIT, acct, activity, finished, reached, replies, worker};
use super::{Account, AccountMsg, Harness, RuntimeCase, Step, Worker, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        redelivered_message_is_applied_once,
        repeated_idempotency_key_returns_the_recorded_reply,
        concurrent_asks_with_one_key_apply_once,
        ask_timeout_then_retry_with_the_key_gets_the_reply_once,
        send_leaves_exactly_once,
        send_replay_does_not_send_again,
        spawn_replay_finds_the_same_child,
        bank_keeps_its_books_through_random_store_faults,
    ]
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
    let a = rt.actor::<Account>("alice").unwrap();
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
    let a = rt.actor::<Account>("alice").unwrap();
    let key = IdempotencyKey::new("deposit-1").unwrap();
    let opts = || AskOptions {
        idempotency_key: Some(key.clone()),
        timeout: None,
        ..Default::default()
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
        ..Default::default()
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
            .unwrap()
            .ask_with(AccountMsg::Deposit(10), opts())
            .await
            .unwrap(),
        10
    );
    assert_eq!(
        rt.actor::<Account>("alice")
            .unwrap()
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
        let a = rt.actor::<Account>("alice").unwrap();
        tasks.push(tokio::spawn(async move {
            a.ask_with(
                AccountMsg::Deposit(10),
                AskOptions {
                    idempotency_key: Some(IdempotencyKey::new("same").unwrap()),
                    timeout: None,
                    ..Default::default()
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
            .unwrap()
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        10
    );
    rt.shutdown().await;
}

async fn ask_timeout_then_retry_with_the_key_gets_the_reply_once(h: &Harness) {
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("alice").unwrap();
    a.send(AccountMsg::Hold(0)).await.unwrap();
    reached(h).await;
    let opts = |timeout| AskOptions {
        idempotency_key: Some(IdempotencyKey::new("k").unwrap()),
        timeout,
        ..Default::default()
    };
    // A second: the timeout bounds the ask's send too, and the case needs it sent.
    let first = a
        .ask_with(AccountMsg::Deposit(5), opts(Some(Duration::from_secs(1))))
        .await;
    assert!(
        matches!(&first, Err(AskError::Timeout { key, .. }) if key.as_str() == "k"),
        "{first:?}"
    );
    assert!(
        matches!(
            h.store
                .lookup(&acct("alice"), &IdempotencyKey::new("k").unwrap())
                .await
                .unwrap(),
            Some(loom_core::Reservation::Pending { .. })
        ),
        "the timed-out ask's message was not stored"
    );
    // An ask without a key of its own is told the one Loom made up, and asking again with it
    // gets the reply of the first, which ran once (*before*: the error named no key, so a
    // retry could only send the message again).
    let made_up = match a
        .ask_with(
            AccountMsg::Deposit(1),
            AskOptions {
                timeout: Some(Duration::from_millis(200)),
                ..Default::default()
            },
        )
        .await
    {
        Err(AskError::Timeout { key, .. }) => key,
        other => panic!("{other:?}"),
    };
    // The timeout bounds the ask's looks for its reply too: one the store leaves unanswered
    // ends at the timeout (*before*: the ask waited on it for ever).
    h.faults.hang_lookups.store(true, Ordering::SeqCst);
    let hung = tokio::time::timeout(
        Duration::from_secs(20),
        a.ask_with(
            AccountMsg::Deposit(1),
            opts(Some(Duration::from_millis(500))),
        ),
    )
    .await
    .expect("an ask outlived its timeout by 20 s while its look for the reply hung");
    assert!(
        matches!(&hung, Err(AskError::Timeout { key, .. }) if key.as_str() == "k"),
        "{hung:?}"
    );
    // A reply handed over by this runtime while such a look is out wins over the look: the
    // held deposit runs once a look has started, and the ask has its reply (*before*: it
    // waited on the look until its timeout).
    let looks = h.faults.lookups.load(Ordering::SeqCst);
    let (answered, ()) = tokio::join!(
        a.ask_with(AccountMsg::Deposit(5), opts(Some(Duration::from_secs(10))),),
        async {
            while h.faults.lookups.load(Ordering::SeqCst) == looks {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            h.probe.open(1);
        }
    );
    assert_eq!(answered.unwrap(), 5);
    h.faults.hang_lookups.store(false, Ordering::SeqCst);
    assert_eq!(
        a.ask_with(AccountMsg::Deposit(5), opts(None))
            .await
            .unwrap(),
        5
    );
    let again = AskOptions {
        idempotency_key: Some(made_up),
        ..Default::default()
    };
    assert_eq!(a.ask_with(AccountMsg::Deposit(1), again).await.unwrap(), 6);
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 6);
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
    rt.actor::<Worker>("w").unwrap().ask(script).await.unwrap();
    finished(h, &acct("bob"), 2).await;
    assert_eq!(
        rt.actor::<Account>("bob")
            .unwrap()
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
    rt.actor::<Worker>("w").unwrap().send(script).await.unwrap();
    reached(h).await;
    let rt = h.crash_and_resume(rt, 1).await;
    finished(h, &worker("w"), 1).await;
    assert_eq!(
        rt.actor::<Account>("bob")
            .unwrap()
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
        .unwrap()
        .send(vec![Step::Spawn { amount: 5 }, activity("a"), Step::Gate])
        .await
        .unwrap();
    reached(h).await;
    let rt = h.crash_and_resume(rt, 1).await;
    finished(h, &worker("w"), 1).await;
    let reply = replies(h, &worker("w")).await.remove(0);
    let line = reply[0].as_str().unwrap().to_owned();
    let child: ActorId = line.strip_prefix("spawned ").unwrap().parse().unwrap();
    assert_eq!(child.kind(), "acct");
    finished(h, &child, 1).await;
    assert_eq!(
        rt.actor::<Account>(child.key())
            .unwrap()
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
