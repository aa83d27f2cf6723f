//! Partition cases: every actor lives in one partition; a message a turn sends to an actor of
//! another partition reaches it through the outbox and relay exactly once, with its id, delay
//! and key, in the order sent per (sender, receiver) pair. On a store of one partition every
//! send is direct, and the same cases hold.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use loom_core::partition::partition_of;
use loom_core::store::backend::{Outgoing, Settle, Turn};
use loom_core::{
    ActorId, Entry, EntryKind, Envelope, IdempotencyKey, LeaseOptions, MessageId, Store, Timestamp,
};
use serde_json::json;

use super::{Case, cases};

pub(super) fn cases() -> Vec<Case> {
    cases![
        every_actor_maps_to_one_partition_of_the_store,
        sends_across_partitions_arrive_once_in_order_with_ids_delays_and_keys,
        many_senders_in_many_partitions_deliver_exactly_once,
        a_sender_compacted_or_deleted_before_the_move_still_delivers_once,
        a_turn_settling_a_message_of_another_partition_is_refused,
    ]
}

/// How long a relayed message may take to arrive in a case.
const ARRIVAL: Duration = Duration::from_secs(20);

/// Waits until `actor`'s mailbox holds at least `n` messages (a relayed message arrives a
/// little after the turn that sent it); panics after [`ARRIVAL`].
pub async fn arrived(store: &dyn Store, actor: &ActorId, n: u64) {
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    loop {
        let pending = store.pending(actor).await.expect("pending");
        if pending >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{actor} holds {pending} of {n} messages after {ARRIVAL:?}: the relay did not move them"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn id(kind: &str, key: &str) -> ActorId {
    ActorId::new(kind, key).expect("valid id")
}

fn opts() -> LeaseOptions {
    LeaseOptions {
        visibility: Duration::from_secs(60),
        max_deliveries: 5,
        ..LeaseOptions::default()
    }
}

/// Actors with keys `prefix-0..`, at least `per` of them in every partition of `store`.
pub fn spread(store: &dyn Store, prefix: &str, per: usize) -> Vec<ActorId> {
    spread_in(store.partitions(), prefix, per)
}

/// Actors of kind `part` with keys `prefix-0..`, `per` of them in each of `n` partitions.
pub fn spread_in(n: u32, prefix: &str, per: usize) -> Vec<ActorId> {
    let mut counts = vec![0usize; n as usize];
    let mut out = Vec::new();
    let mut i = 0;
    while counts.iter().any(|c| *c < per) {
        let a = id("part", &format!("{prefix}-{i}"));
        let p = partition_of(&a, n) as usize;
        if counts[p] < per {
            counts[p] += 1;
            out.push(a);
        }
        i += 1;
    }
    out
}

/// One turn of `actor` (its entry `next`) sending `send`, settling nothing.
pub async fn send_turn(store: &dyn Store, actor: &ActorId, next: u64, send: &[Outgoing]) {
    let entry = [Entry::new(
        next,
        EntryKind::Completed { reply: json!(next) },
    )];
    store
        .commit_turn(Turn {
            send,
            ..Turn::append(actor, next, &entry)
        })
        .await
        .expect("turn");
}

/// Leases and acks every message `actor` has now, in order.
pub async fn drain(store: &dyn Store, actor: &ActorId) -> Vec<Envelope> {
    let mut out = Vec::new();
    while let Some(d) = store.lease(actor, opts()).await.expect("lease") {
        store.ack(&d.receipt).await.expect("ack");
        out.push(d.envelope);
    }
    out
}

/// The payloads of every message `actor` has now, in order, leased and acked ([`drain`]).
pub async fn drained_payloads(store: &dyn Store, actor: &ActorId) -> Vec<serde_json::Value> {
    drain(store, actor)
        .await
        .into_iter()
        .map(|e| e.payload)
        .collect()
}

/// What `receiver` got from each sender, drained ([`drain`]): the `round` of every message
/// whose payload is `{"from": sender, "round": n}`, per sender, in the order received (the
/// relay tests' senders number their rounds from 0, so exactly once and in order is
/// `0..rounds`).
pub async fn rounds_by_sender(store: &dyn Store, receiver: &ActorId) -> HashMap<String, Vec<u64>> {
    let mut by_sender: HashMap<String, Vec<u64>> = HashMap::new();
    for e in drain(store, receiver).await {
        let from = e.payload["from"].as_str().expect("a sender").to_owned();
        let round = e.payload["round"].as_u64().expect("a round");
        by_sender.entry(from).or_default().push(round);
    }
    by_sender
}

async fn every_actor_maps_to_one_partition_of_the_store(store: Arc<dyn Store>) {
    let n = store.partitions();
    assert!(n >= 1);
    for i in 0..500 {
        let a = id("part", &format!("m{i}"));
        let p = partition_of(&a, n);
        assert!(p < n);
        assert_eq!(
            partition_of(&a.event_lane_in("e", n), n),
            p,
            "a lane leaves its actor"
        );
    }
    // Every partition takes writes and serves reads on its own.
    for (i, a) in spread(&*store, "w", 1).iter().enumerate() {
        send_turn(&*store, a, 1, &[]).await;
        assert_eq!(store.highest_seq(a).await.unwrap(), 1, "actor {i}");
    }
    let listed = store.list_actors(None, 10_000).await.unwrap();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(
        listed, sorted,
        "the journals of all partitions list as one, in order"
    );
    assert!(listed.len() >= n as usize);
}

async fn sends_across_partitions_arrive_once_in_order_with_ids_delays_and_keys(
    store: Arc<dyn Store>,
) {
    let sender = id("part", "sender");
    let targets = spread(&*store, "t", 2);
    // The delayed messages go to a target of another partition than the sender's where there
    // is one, so that they pass through the outbox and the relay.
    let n = store.partitions();
    let last = targets
        .iter()
        .rev()
        .find(|t| partition_of(t, n) != partition_of(&sender, n))
        .unwrap_or(&targets[targets.len() - 1])
        .clone();
    let later = Timestamp::now() + Duration::from_millis(3000);
    let mut sent: HashMap<ActorId, Vec<Envelope>> = HashMap::new();
    let mut delayed: Vec<Envelope> = Vec::new();
    for round in 0..5u64 {
        let mut send = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let mut e = Envelope::new(t.clone(), json!({ "round": round, "i": i }));
            e.idempotency_key = Some(IdempotencyKey::new(format!("k-{round}-{i}")).unwrap());
            e.id = MessageId::derived(&MessageId::new(), "send");
            sent.entry(t.clone()).or_default().push(e.clone());
            send.push(Outgoing {
                envelope: e,
                deliver_at: None,
            });
        }
        if round == 0 {
            let e = Envelope::new(last.clone(), json!("later"));
            delayed.push(e.clone());
            send.push(Outgoing {
                envelope: e,
                deliver_at: Some(later),
            });
            // Due never (a delay too long to add saturates to it): it waits, as itself.
            send.push(Outgoing {
                envelope: Envelope::new(last.clone(), json!("never")),
                deliver_at: Some(Timestamp::MAX),
            });
        }
        send_turn(&*store, &sender, round + 1, &send).await;
    }
    // The target of the delayed message first, while it is not due yet (draining the others
    // first took longer than its delay on a store of 32 partitions, 64 targets, under load).
    arrived(&*store, &last, 7).await;
    let got = drain(&*store, &last).await;
    assert_eq!(
        &got, &sent[&last],
        "{last}: not the messages sent, once each, in order"
    );
    assert_eq!(
        store.pending(&last).await.unwrap(),
        2,
        "the delayed ones wait"
    );
    assert!(
        store.lease(&last, opts()).await.unwrap().is_none(),
        "a delayed message came early through the relay"
    );
    for t in targets.iter().filter(|t| **t != last) {
        arrived(&*store, t, 5).await;
        let got = drain(&*store, t).await;
        assert_eq!(
            &got, &sent[t],
            "{t}: not the messages sent, once each, in order"
        );
    }
    tokio::time::sleep(later.saturating_since(Timestamp::now()) + Duration::from_millis(100)).await;
    let got = store.lease(&last, opts()).await.unwrap().expect("due now");
    assert_eq!(got.envelope, delayed[0]);
    store.ack(&got.receipt).await.unwrap();
    let never = store.messages(&last, None, 10).await.unwrap();
    let never: Vec<_> = never
        .iter()
        .map(|w| (w.envelope.payload.clone(), w.deliver_at))
        .collect();
    assert_eq!(never, [(json!("never"), Some(Timestamp::MAX))]);
    // Nothing arrives a second time later.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for t in &targets {
        assert_eq!(
            store.pending(t).await.unwrap(),
            u64::from(*t == last),
            "{t} got a message twice"
        );
    }
}

async fn many_senders_in_many_partitions_deliver_exactly_once(store: Arc<dyn Store>) {
    let senders = spread(&*store, "s", 3);
    let receivers = spread(&*store, "r", 2);
    let rounds = 8u64;
    let mut tasks = Vec::new();
    for s in senders.clone() {
        let store = store.clone();
        let receivers = receivers.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..rounds {
                let send: Vec<Outgoing> = receivers
                    .iter()
                    .map(|r| Outgoing {
                        envelope: Envelope::new(
                            r.clone(),
                            json!({ "from": s.as_str(), "round": round }),
                        ),
                        deliver_at: None,
                    })
                    .collect();
                send_turn(&*store, &s, round + 1, &send).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    let expected = senders.len() as u64 * rounds;
    for r in &receivers {
        arrived(&*store, r, expected).await;
        let got = drain(&*store, r).await;
        assert_eq!(got.len() as u64, expected, "{r}");
        // Per sender, in the order sent.
        let mut by_sender: HashMap<String, Vec<u64>> = HashMap::new();
        for e in &got {
            by_sender
                .entry(e.payload["from"].as_str().unwrap().to_owned())
                .or_default()
                .push(e.payload["round"].as_u64().unwrap());
        }
        for (s, rounds_seen) in by_sender {
            assert_eq!(rounds_seen, (0..rounds).collect::<Vec<_>>(), "{s} → {r}");
        }
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for r in &receivers {
        assert_eq!(
            store.pending(r).await.unwrap(),
            0,
            "{r} got a message twice"
        );
    }
}

async fn a_sender_compacted_or_deleted_before_the_move_still_delivers_once(store: Arc<dyn Store>) {
    let targets = spread(&*store, "c", 1);
    let senders = spread(&*store, "cs", 1);
    for s in &senders {
        let send: Vec<Outgoing> = targets
            .iter()
            .map(|t| Outgoing {
                envelope: Envelope::new(t.clone(), json!({ "from": s.as_str() })),
                deliver_at: None,
            })
            .collect();
        send_turn(&*store, s, 1, &send).await;
        // At once, before the relay may have moved anything: the sender's journal goes.
        store
            .compact(s, &loom_core::Snapshot::new(1, json!({})), 1, None)
            .await
            .expect("compact");
        store.delete(s, None).await.expect("delete");
    }
    for t in &targets {
        arrived(&*store, t, senders.len() as u64).await;
        assert_eq!(drain(&*store, t).await.len(), senders.len(), "{t}");
    }
    // A receiver settling in its own turn, with its own sends, is unaffected.
    let d = {
        let t = &targets[0];
        store
            .enqueue(&Envelope::new(t.clone(), json!("x")), None)
            .await
            .unwrap();
        store.lease(t, opts()).await.unwrap().expect("x")
    };
    let entry = [Entry::new(1, EntryKind::Completed { reply: json!(1) })];
    store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&d.receipt)),
            ..Turn::append(&targets[0], 1, &entry)
        })
        .await
        .unwrap();
    assert_eq!(store.pending(&targets[0]).await.unwrap(), 0);
}

/// A turn writes only its actor's partition: settling a message of an actor of another is
/// refused, with nothing written. (On a store of one partition there is no other.)
async fn a_turn_settling_a_message_of_another_partition_is_refused(store: Arc<dyn Store>) {
    let n = store.partitions();
    if n == 1 {
        return;
    }
    let a = id("part", "settler");
    let b = (0..)
        .map(|i| id("part", &format!("other-{i}")))
        .find(|b| partition_of(b, n) != partition_of(&a, n))
        .expect("an actor of another partition");
    store
        .enqueue(&Envelope::new(b.clone(), json!("x")), None)
        .await
        .unwrap();
    let d = store.lease(&b, opts()).await.unwrap().expect("x");
    let entry = [Entry::new(1, EntryKind::Completed { reply: json!(1) })];
    let err = store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&d.receipt)),
            ..Turn::append(&a, 1, &entry)
        })
        .await
        .expect_err("a settle across partitions");
    assert!(
        matches!(err, loom_core::StoreError::InvalidRequest(_)),
        "{err}"
    );
    assert_eq!(store.highest_seq(&a).await.unwrap(), 0, "nothing written");
    assert_eq!(
        store.pending(&b).await.unwrap(),
        1,
        "the message is still out"
    );
    // Its own actor's turn settles it.
    store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&d.receipt)),
            ..Turn::append(&b, 1, &entry)
        })
        .await
        .unwrap();
    assert_eq!(store.pending(&b).await.unwrap(), 0);
}

/// Rule D16 for the relay: while the store's relay cannot move a partition's outbox,
/// [`Runtime::health`](loom_core::Runtime::health) shows it failing, naming that partition, and
/// the message waits in the outbox; once it can, the message arrives and the health is clear.
/// `break_moves(p)` makes the moves of partition `p`'s outbox fail (in the backend's own way:
/// damage, a broken function), `repair()` undoes it. The store must have several partitions.
pub async fn a_relay_that_cannot_move_shows_in_the_runtimes_health<B, BF, R, RF>(
    store: Arc<dyn Store>,
    break_moves: B,
    repair: R,
) where
    B: FnOnce(u32) -> BF,
    BF: std::future::Future<Output = ()>,
    R: FnOnce() -> RF,
    RF: std::future::Future<Output = ()>,
{
    let n = store.partitions();
    assert!(n > 1, "a store of one partition has no relay");
    let rt = loom_core::Runtime::builder()
        .store(store.clone())
        .start()
        .await
        .expect("runtime");
    assert_eq!(rt.health().relay, None);
    let a = id("relay-health", "a");
    let pa = partition_of(&a, n);
    let b = (0..)
        .map(|i| id("relay-health", &format!("b{i}")))
        .find(|b| partition_of(b, n) != pa)
        .expect("an actor of another partition");
    break_moves(pa).await;
    send_turn(
        &*store,
        &a,
        1,
        &[Outgoing {
            envelope: Envelope::new(b.clone(), json!("held")),
            deliver_at: None,
        }],
    )
    .await;
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    let failure = loop {
        if let Some(f) = rt.health().relay {
            break f;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay's failure never showed in the health"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(failure.partitions, [pa], "{failure:?}");
    assert!(
        failure.failures >= 1 && !failure.error.is_empty(),
        "{failure:?}"
    );
    // Shown, not counted: the node itself works.
    assert!(rt.health().is_healthy(), "{:?}", rt.health());
    assert_eq!(
        store.pending(&b).await.expect("pending"),
        0,
        "nothing moved"
    );
    repair().await;
    arrived(&*store, &b, 1).await;
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    while rt.health().relay.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay moves again, but its health says {:?}",
            rt.health().relay
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rt.health().is_healthy(), "{:?}", rt.health());
    assert_eq!(drained_payloads(&*store, &b).await, [json!("held")]);
    rt.shutdown().await;
}
