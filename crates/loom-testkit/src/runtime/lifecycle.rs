//! Runtime cases about an actor's life on a node: passivation, the bound on active actors, leases lost and renewed, one invocation at a time, shutdown, back-pressure.

use std::time::Duration;

use loom_core::runtime::{Actor, AskOptions, SendError, SendOptions};
use loom_core::{ActorId, EntryKind};
use serde_json::json;

use super::common::{WAIT, acct, reached};
use super::{Account, AccountMsg, Counter, Harness, RuntimeCase, eventually, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        passivation_and_reactivation,
        more_actors_than_max_active_keep_their_state,
        lost_lease_stops_writes,
        a_renewal_that_never_answers_stops_the_actor_when_its_lease_expires,
        idle_actors_take_no_leases_and_partition_leases_are_renewed_together,
        a_drained_actor_waits_for_a_wake_up_instead_of_asking_its_mailbox_again,
        a_wake_up_for_a_message_its_turn_took_costs_no_lease,
        an_ask_looks_for_its_reply_less_often_while_reply_signals_are_read,
        one_invocation_at_a_time_per_actor,
        many_actors_run_in_parallel,
        graceful_shutdown_drains_in_flight_invocations,
        a_busy_actor_stops_after_its_invocation_in_flight,
        active_actors_are_bounded,
        full_mailbox_pushes_back,
        a_client_sends_to_a_kind_hosted_elsewhere_whose_messages_wait_for_a_host,
    ]
}

/// A runtime that hosts no kind and declares the one it talks to (`sends_to`) sends, asks and
/// checks JSON for it; its messages wait, never run and never dead-lettered, until a node
/// hosting the kind starts, which runs each once; an undeclared kind is refused at once.
async fn a_client_sends_to_a_kind_hosted_elsewhere_whose_messages_wait_for_a_host(h: &Harness) {
    let client = h.client_with(|_| {}).await;
    assert!(client.kinds().is_empty(), "the client hosts nothing");
    match client.actor::<Counter>("c").unwrap().send(1).await {
        Err(SendError::UnknownKind(k)) => assert_eq!(k, "counter"),
        other => panic!("an undeclared kind was sent to: {other:?}"),
    }
    let a = client.actor::<Account>("routed").unwrap();
    a.send(AccountMsg::Deposit(3)).await.unwrap();
    let any = client.any_actor(Account::KIND, "routed").unwrap();
    assert!(matches!(
        any.send_json(json!("nonsense"), SendOptions::default())
            .await,
        Err(SendError::BadMessage { .. })
    ));
    // Events too: to a declared kind, queued; to an undeclared one, refused.
    a.deliver_event("audit", &json!({"n": 1})).await.unwrap();
    assert!(matches!(
        client
            .actor::<Counter>("c")
            .unwrap()
            .deliver_event("audit", &json!(1))
            .await,
        Err(SendError::UnknownKind(_))
    ));
    // No node hosts accounts: the message waits through many scans (the client's poll is
    // 20 ms), run by no one and dead-lettered by no one.
    let id = acct("routed");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.store.pending(&id).await.unwrap(), 1);
    assert_eq!(h.highest(&id).await, 0);
    assert!(h.store.dead_letters(None, 10).await.unwrap().is_empty());
    // A host comes: the waiting deposit runs once, and the client's ask is answered.
    let node = h.runtime().await;
    assert_eq!(a.ask(AccountMsg::Deposit(4)).await.unwrap(), 7);
    assert_eq!(client.metrics().invocations, 0, "the client ran an actor");
    assert_eq!(
        any.ask_json(json!({"Deposit": 0}), AskOptions::default())
            .await
            .unwrap(),
        json!(7)
    );
    client.shutdown().await;
    node.shutdown().await;
}

async fn passivation_and_reactivation(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.idle_timeout = Duration::from_millis(200))
        .await;
    let a = rt.actor::<Account>("alice").unwrap();
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
            let a = rt.actor::<Account>(&format!("many-{i}")).unwrap();
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
    let a = rt.actor::<Account>("alice").unwrap();
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
    // The runtime gives the lease up at its own deadline; the store's clock (PostgreSQL's) may
    // hold it a few milliseconds longer.
    let started = tokio::time::Instant::now();
    let intruder = loop {
        match h
            .store
            .acquire(&id, "intruder", Duration::from_secs(60))
            .await
        {
            Ok(l) => break l,
            Err(loom_core::StoreError::LeaseHeld { .. })
                if started.elapsed() < Duration::from_secs(2) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("the intruder could not take the lost lease: {e}"),
        }
    };
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

/// A node cut off from its store (a stalled connection, a network partition) stops its actors
/// when their leases expire, instead of running their handlers on until a renewal answers:
/// another node may own them by then.
async fn a_renewal_that_never_answers_stops_the_actor_when_its_lease_expires(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.lease_ttl = Duration::from_millis(600))
        .await;
    let a = rt.actor::<Account>("alice").unwrap();
    assert_eq!(a.ask(AccountMsg::Deposit(1)).await.unwrap(), 1);
    a.send(AccountMsg::Hold(10)).await.unwrap();
    reached(h).await;
    h.faults
        .hang_renewals
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let id = acct("alice");
    eventually(WAIT, "the actor stops when its lease expires", || async {
        rt.metrics().leases_lost == 1 && !rt.is_active(&id)
    })
    .await;
    h.faults
        .hang_renewals
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // The held message is redone under a new lease and applied once.
    h.probe.open(1);
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 11);
    rt.shutdown().await;
}

/// Rule D8: actors run under their partition's lease and take none of their own, so idle
/// actors cost no renewals; the node's partition leases are renewed together, with far fewer
/// calls than renewals, and given up at shutdown.
async fn idle_actors_take_no_leases_and_partition_leases_are_renewed_together(h: &Harness) {
    use loom_core::partition::{ownership_partitions, partition_of};
    let ttl = Duration::from_millis(600);
    let rt = h.runtime_with(|c| c.lease_ttl = ttl).await;
    let n = 40;
    for i in 0..n {
        let a = rt.actor::<Account>(format!("idle{i}")).unwrap();
        assert_eq!(a.ask(AccountMsg::Deposit(1)).await.unwrap(), 1);
    }
    let parts = ownership_partitions(h.store.partitions());
    let mut partitions = std::collections::BTreeMap::new();
    for i in 0..n {
        let id = acct(&format!("idle{i}"));
        assert!(
            h.store.holder(&id).await.unwrap().is_none(),
            "idle{i} took a lease of its own"
        );
        let part = ActorId::partition_lease(id.kind(), partition_of(&id, parts));
        let holder = h.store.holder(&part).await.unwrap();
        let token = holder.expect("the node holds its actors' partitions").token;
        partitions.insert(part, token);
    }
    let m = rt.metrics();
    assert_eq!(m.leases_held, m.partitions_owned, "{m:?}");
    let held = m.leases_held;
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
    let (calls, leases) = (count(&h.faults.renewal_calls), count(&h.faults.renewals));
    // Five ttls idle: without renewals every partition's lease would have run out.
    tokio::time::sleep(ttl * 5).await;
    for i in 0..n {
        assert!(
            rt.is_active(&acct(&format!("idle{i}"))),
            "idle{i} stopped while idle"
        );
    }
    for (part, token) in &partitions {
        let holder = h.store.holder(part).await.unwrap();
        assert_eq!(
            holder.map(|l| l.token),
            Some(*token),
            "{part}'s lease ran out"
        );
    }
    let calls = count(&h.faults.renewal_calls) - calls;
    let leases = count(&h.faults.renewals) - leases;
    assert!(
        leases >= 10 * partitions.len() as u64,
        "{leases} renewals of {} partition leases in five ttls",
        partitions.len()
    );
    // Together: a call renews at least half of the node's leases, on average.
    assert!(
        calls * held <= 2 * leases,
        "{calls} renewal calls for {leases} renewals of {held} leases: not renewed together"
    );
    assert_eq!(rt.metrics().leases_lost, 0);
    rt.shutdown().await;
    assert_eq!(rt.metrics().leases_held, 0);
    for part in partitions.keys() {
        assert!(h.store.holder(part).await.unwrap().is_none(), "{part} kept");
    }
}

/// A turn whose write looked for the actor's next message and found none leaves the actor
/// waiting for a wake-up rather than asking its mailbox again at once (a lease that would find
/// nothing: a store request per turn for nothing): twenty asks answered one after another make
/// (nearly) no lease that finds nothing, where asking again made one per ask, and each is still
/// answered, its send's wake-up coming through.
async fn a_drained_actor_waits_for_a_wake_up_instead_of_asking_its_mailbox_again(h: &Harness) {
    // Ready scans every 2 s, not 20 ms: a scan that finds the mailbox between an ask's
    // enqueue and its lease wakes the busy actor once more, and that wake-up's look finds
    // nothing, which is not what is counted here.
    let rt = h
        .runtime_with(|c| c.poll_interval = Duration::from_secs(2))
        .await;
    let a = rt.actor::<Account>("drained").unwrap();
    assert_eq!(a.ask(AccountMsg::Deposit(1)).await.unwrap(), 1);
    let count = || {
        h.faults
            .empty_leases
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = count();
    for balance in 2..=21 {
        assert_eq!(a.ask(AccountMsg::Deposit(1)).await.unwrap(), balance);
    }
    let empty = count() - before;
    assert!(
        empty < 5,
        "{empty} leases found nothing while 20 asks were answered one at a time"
    );
    rt.shutdown().await;
}

/// A message sent while its actor is busy wakes it; the turn that ends the busy spell takes
/// that message with its own look for the next one, and the wake-up it left is then no reason
/// to read the mailbox again once the actor has nothing to do. Ten rounds of a handler held at
/// the gate with a message sent behind it make (nearly) no lease that finds nothing, where each
/// round made one before wake-ups were counted (`Signal::woken_since`); both messages of every
/// round are answered, so no wake-up that mattered was passed over.
async fn a_wake_up_for_a_message_its_turn_took_costs_no_lease(h: &Harness) {
    use super::common::worker;
    use super::{Step, Worker};
    // Ready scans every 2 s, not 20 ms, as in the case above: a scan's own wake-up of a busy
    // actor is not what is counted here.
    let rt = h
        .runtime_with(|c| c.poll_interval = Duration::from_secs(2))
        .await;
    let w = rt.actor::<Worker>("busy").unwrap();
    assert_eq!(w.ask(vec![]).await.unwrap(), Vec::<String>::new());
    let count = || {
        h.faults
            .empty_leases
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = count();
    for round in 0..10 {
        let held = {
            let w = w.clone();
            tokio::spawn(async move { w.ask(vec![Step::Gate]).await })
        };
        reached(h).await;
        // Enqueued while the actor is busy at the gate: its wake-up is kept for the next wait.
        let behind = {
            let w = w.clone();
            tokio::spawn(async move { w.ask(vec![]).await })
        };
        eventually(WAIT, "the message behind waits in the mailbox", || async {
            h.store.pending(&worker("busy")).await.unwrap() == 2
        })
        .await;
        h.probe.open(1);
        assert_eq!(
            held.await.unwrap().unwrap(),
            vec!["passed the gate".to_owned()],
            "round {round}"
        );
        assert_eq!(behind.await.unwrap().unwrap(), Vec::<String>::new());
    }
    // Time for a lease a kept wake-up would cost after the last round.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let empty = count() - before;
    assert!(
        empty < 3,
        "{empty} leases found nothing in 10 rounds of a message sent to a busy actor"
    );
    rt.shutdown().await;
}

/// An `ask` looks at the store for its reply (the safety net for a reply recorded on another
/// node whose signal is lost) less and less often once the store's reply signals come, and
/// every `2 × poll_interval` on a store without them: under load every waiting ask's looks
/// were a store request each, a quarter of the bank's requests on Redis.
async fn an_ask_looks_for_its_reply_less_often_while_reply_signals_are_read(h: &Harness) {
    use std::sync::atomic::Ordering;
    // A reply that takes 2 s (the handler sleeps), asked for after a first ask whose reply
    // signal shows that signals come; the looks counted, and how long the ask took. Two
    // runtimes share the store, as two nodes do (an embedded store signals only then: one
    // runtime alone runs every actor it can ask).
    async fn looks(h: &Harness, actor: &str) -> (u64, Duration) {
        let rt = h.runtime().await;
        let other = h.runtime().await;
        let a = rt.actor::<Account>(actor).unwrap();
        // Time for the subscriptions to be made (lazily, by tasks of their own), then an ask
        // whose signal comes (with no timeout at all: `Duration::MAX`, which must not
        // overflow), and time for it to arrive.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let forever = AskOptions {
            timeout: Some(Duration::MAX),
            ..Default::default()
        };
        assert_eq!(
            a.ask_with(AccountMsg::Deposit(1), forever).await.unwrap(),
            1
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = h.faults.lookups.load(Ordering::SeqCst);
        let started = std::time::Instant::now();
        assert_eq!(a.ask(AccountMsg::Slow(1, 2000)).await.unwrap(), 2);
        let took = started.elapsed();
        let looks = h.faults.lookups.load(Ordering::SeqCst) - before;
        rt.shutdown().await;
        other.shutdown().await;
        (looks, took)
    }
    let (signalled, took_signalled) = looks(h, "looks-signalled").await;
    h.faults.no_signals.store(true, Ordering::SeqCst);
    let (polled, took_polled) = looks(h, "looks-polled").await;
    h.faults.no_signals.store(false, Ordering::SeqCst);
    // Signals read but never coming (a subscription that cannot work): looks as without.
    h.faults.silent_signals.store(true, Ordering::SeqCst);
    let (silent, took_silent) = looks(h, "looks-silent").await;
    h.faults.silent_signals.store(false, Ordering::SeqCst);
    assert!(
        u128::from(silent) * 200 >= took_silent.as_millis(),
        "{silent} looks in {took_silent:?} while signals are read but never come"
    );
    // Every 40 ms (and a look's time) without signals: 47–49 looks in 2 s, and at least one
    // in every 200 ms however slow the looks. With them: at 40, 120, 280, 600, 1240 and
    // 2240 ms, then every second.
    assert!(
        u128::from(polled) * 200 >= took_polled.as_millis(),
        "{polled} looks in {took_polled:?} without signals: the safety net is gone"
    );
    assert!(
        signalled <= 6 + took_signalled.as_secs(),
        "{signalled} looks in {took_signalled:?} while signals come ({polled} in \
         {took_polled:?} without)"
    );
}

async fn one_invocation_at_a_time_per_actor(h: &Harness) {
    let rt = h.runtime().await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let a = rt.actor::<Account>("alice").unwrap();
        tasks.push(tokio::spawn(async move {
            a.send(AccountMsg::Slow(1, 10)).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        rt.actor::<Account>("alice")
            .unwrap()
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
            .unwrap()
            .send(AccountMsg::Slow(n, 100))
            .await
            .unwrap();
    }
    for n in 0..30 {
        assert_eq!(
            rt.actor::<Account>(format!("a{n}"))
                .unwrap()
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

/// After a shutdown: the invocation that was in flight completed (dropped by none) and no other
/// ran, `pending` messages still wait, and the lease that fenced it (its partition's) is
/// released.
async fn stopped_after_one_invocation(h: &Harness, id: &ActorId, pending: u64) {
    assert_eq!(
        h.count(id, |k| matches!(k, EntryKind::Completed { .. }))
            .await,
        1,
        "the invocation in flight finished, and no other ran"
    );
    assert_eq!(h.store.pending(id).await.unwrap(), pending);
    use loom_core::partition::{ownership_partitions, partition_of};
    let p = partition_of(id, ownership_partitions(h.store.partitions()));
    let partition = ActorId::partition_lease(id.kind(), p);
    assert!(
        h.store.holder(&partition).await.unwrap().is_none(),
        "the partition's lease was not released"
    );
}

async fn graceful_shutdown_drains_in_flight_invocations(h: &Harness) {
    let rt = h.runtime().await;
    let id = acct("alice");
    rt.actor::<Account>("alice")
        .unwrap()
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
    assert!(rt.health().is_healthy(), "{:?}", rt.health());
    // While it drains, and after, the node says it is stopping (a load balancer reading
    // `/health` sends elsewhere): it takes no message from the moment the shutdown begins.
    let stopping = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.shutdown().await })
    };
    eventually(WAIT, "the shutdown begins", || async {
        rt.health().node == loom_core::runtime::NodeHealth::Stopping
    })
    .await;
    assert!(!rt.health().is_healthy());
    stopping.await.unwrap();
    assert_eq!(rt.health().node, loom_core::runtime::NodeHealth::Stopping);
    stopped_after_one_invocation(h, &id, 0).await;
    assert!(matches!(
        rt.actor::<Account>("alice")
            .unwrap()
            .send(AccountMsg::Balance)
            .await,
        Err(SendError::Shutdown)
    ));
    // An event too, as a send: nothing is written once the runtime stops.
    assert!(matches!(
        rt.actor::<Account>("alice")
            .unwrap()
            .deliver_event("late", &1)
            .await,
        Err(SendError::Shutdown)
    ));
}

/// An actor asked to stop (here by a shutdown; a partition hand-off and an eviction ask the
/// same way) finishes its invocation in flight and stops, even with messages waiting behind
/// it: its last turn does not lease the next one, as turns of a running actor do, so a mailbox
/// that never empties cannot keep it running. The messages wait for its next activation.
async fn a_busy_actor_stops_after_its_invocation_in_flight(h: &Harness) {
    let rt = h.runtime().await;
    let id = acct("busy");
    let a = rt.actor::<Account>("busy").unwrap();
    a.send(AccountMsg::Hold(1)).await.unwrap();
    reached(h).await;
    for _ in 0..20 {
        a.send(AccountMsg::Deposit(1)).await.unwrap();
    }
    let stopping = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.shutdown().await })
    };
    eventually(WAIT, "the shutdown has begun", || async {
        matches!(
            rt.actor::<Account>("other")
                .unwrap()
                .send(AccountMsg::Balance)
                .await,
            Err(SendError::Shutdown)
        )
    })
    .await;
    h.probe.open(1);
    stopping.await.expect("shutdown");
    stopped_after_one_invocation(h, &id, 20).await;
    // They run at the next start, once each.
    let rt = h.runtime().await;
    let a = rt.actor::<Account>("busy").unwrap();
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 21);
    rt.shutdown().await;
}

async fn active_actors_are_bounded(h: &Harness) {
    let rt = h.runtime_with(|c| c.max_active = 3).await;
    for n in 0..10 {
        assert_eq!(
            rt.actor::<Account>(format!("a{n}"))
                .unwrap()
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
    let a = rt.actor::<Account>("alice").unwrap();
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
    // Events that nothing waits for are kept: past `max_mailbox` of one name, refused too.
    let b = rt.actor::<Account>("bob").unwrap();
    for n in 0..3 {
        b.deliver_event("ping", &n).await.unwrap();
    }
    match b.deliver_event("ping", &3).await {
        Err(SendError::MailboxFull { actor, pending }) => {
            assert_eq!((actor, pending), (acct("bob"), 3))
        }
        other => panic!("expected MailboxFull for the fourth event, got {other:?}"),
    }
    b.deliver_event("other", &3).await.unwrap();
    rt.shutdown().await;
}
