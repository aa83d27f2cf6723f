//! The simulated store's own rules: its durability model (what a power loss keeps), its
//! injected faults, the determinism of its trace, and its partitions' outboxes and relays.

use std::time::Duration;

use loom_core::embedded::{OutboxState, check_outboxes};
use loom_core::partition::{MAX_PARTITIONS, partition_of};
use loom_core::store::backend::{Outgoing, Settle, Turn};
use loom_core::{
    ActorId, Entry, EntryKind, Envelope, JournalStore, LeaseOptions, Mailbox, MessageId, Seq,
    Store, StoreError,
};
use loom_sim::store::{
    Bugs, Faults, LAZY_SYNC, RELAY_BATCH, RELAY_TICK, RelayHold, SimFault, SimStore,
};
use serde_json::json;

fn id(key: &str) -> ActorId {
    ActorId::new("sim", key).expect("valid id")
}

fn entry(seq: Seq) -> Entry {
    Entry::new(seq, EntryKind::Completed { reply: json!(seq) })
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn slow_disk() -> Faults {
    Faults {
        latency: (Duration::ZERO, ms(3)),
        fsync: (ms(1), ms(5)),
        ..Faults::default()
    }
}

#[tokio::test(start_paused = true)]
async fn acknowledged_writes_survive_a_power_loss() {
    let store = SimStore::new(1, slow_disk());
    let mut tasks = Vec::new();
    for n in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let a = id(&format!("a{n}"));
            for seq in 1..=5 {
                store.append(&a, seq, &[entry(seq)]).await.expect("append");
            }
            store
                .enqueue(&Envelope::new(a, json!(n)), None)
                .await
                .expect("enqueue");
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    store.power_loss();
    for n in 0..20 {
        let a = id(&format!("a{n}"));
        assert_eq!(store.highest_seq(&a).await.unwrap(), 5, "{a}");
        assert_eq!(store.pending(&a).await.unwrap(), 1, "{a}");
    }
    let stats = store.stats();
    assert_eq!(stats.writes, 20 * 6);
    assert!(stats.syncs >= 1 && stats.syncs <= stats.writes, "{stats:?}");
    assert_eq!(stats.power_losses, 1);
}

/// Lets the spawned write run until it is applied and waits for its sync.
async fn applied(store: &SimStore) {
    for _ in 0..10 {
        if store.unsynced() == 1 {
            return;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(store.unsynced(), 1, "the write was not applied");
}

#[tokio::test(start_paused = true)]
async fn a_write_in_flight_at_a_power_loss_fails_and_is_gone() {
    let store = SimStore::new(
        2,
        Faults {
            fsync: (ms(10), ms(10)),
            ..Faults::default()
        },
    );
    let a = id("a");
    let writer = {
        let (store, a) = (store.clone(), a.clone());
        tokio::spawn(async move { store.append(&a, 1, &[entry(1)]).await })
    };
    // The write is applied (a request yields once even without latency) and waits for its
    // sync.
    applied(&store).await;
    store.power_loss();
    let err = writer.await.unwrap().unwrap_err();
    assert_eq!(SimFault::of(&err), Some(SimFault::PowerLoss), "{err:?}");
    assert_eq!(store.highest_seq(&a).await.unwrap(), 0);
    assert_eq!(store.unsynced(), 0);
    assert!(store.recent().iter().any(|l| l.ends_with("power-loss")));
}

#[tokio::test(start_paused = true)]
async fn one_sync_covers_every_write_applied_before_it() {
    let store = SimStore::new(
        3,
        Faults {
            fsync: (ms(10), ms(10)),
            ..Faults::default()
        },
    );
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.append(&id(&format!("g{n}")), 1, &[entry(1)]).await
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("append");
    }
    // All eight were applied before the first sync ended: that sync copied them all.
    assert_eq!(store.stats().syncs, 1);
}

#[tokio::test(start_paused = true)]
async fn a_read_returns_only_what_is_durable() {
    let store = SimStore::new(
        4,
        Faults {
            fsync: (ms(10), ms(10)),
            ..Faults::default()
        },
    );
    let a = id("a");
    let writer = {
        let (store, a) = (store.clone(), a.clone());
        tokio::spawn(async move { store.append(&a, 1, &[entry(1)]).await })
    };
    applied(&store).await;
    // The read sees the write before it is acknowledged, so it waits for its sync.
    assert_eq!(store.highest_seq(&a).await.unwrap(), 1);
    assert_eq!(store.unsynced(), 0);
    assert_eq!(writer.await.unwrap().unwrap(), 1);
    store.power_loss();
    assert_eq!(store.highest_seq(&a).await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_write_is_synced_by_the_next_request() {
    let store = SimStore::new(
        5,
        Faults {
            fsync: (ms(10), ms(10)),
            ..Faults::default()
        },
    );
    let a = id("a");
    let batch = [entry(1)];
    let write = store.append(&a, 1, &batch);
    // Applied, then given up on by its caller while waiting for the sync.
    assert!(
        tokio::time::timeout(ms(1), write).await.is_err(),
        "the write answered before its sync"
    );
    assert_eq!(store.unsynced(), 1);
    assert_eq!(store.highest_seq(&a).await.unwrap(), 1);
    assert_eq!(store.unsynced(), 0);
}

#[tokio::test(start_paused = true)]
async fn ack_before_fsync_loses_acknowledged_writes() {
    let store = SimStore::new(
        6,
        Faults {
            fsync: (ms(2), ms(2)),
            ..Faults::default()
        },
    );
    store.set_ack_before_fsync(true);
    let a = id("a");
    store.append(&a, 1, &[entry(1)]).await.unwrap();
    store.power_loss();
    assert_eq!(
        store.highest_seq(&a).await.unwrap(),
        0,
        "the bug did not lose it"
    );
    // A write once the last sync is `LAZY_SYNC` old syncs the ones before it, not itself.
    store.append(&a, 1, &[entry(1)]).await.unwrap();
    tokio::time::sleep(LAZY_SYNC).await;
    store.append(&a, 2, &[entry(2)]).await.unwrap();
    store.power_loss();
    assert_eq!(store.highest_seq(&a).await.unwrap(), 1);
    // Off again: acknowledged means durable.
    store.set_ack_before_fsync(false);
    store.append(&a, 2, &[entry(2)]).await.unwrap();
    store.power_loss();
    assert_eq!(store.highest_seq(&a).await.unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_transient_fault_writes_nothing() {
    let store = SimStore::new(
        7,
        Faults {
            transient: 1.0,
            ..Faults::default()
        },
    );
    let a = id("a");
    let err = store.append(&a, 1, &[entry(1)]).await.unwrap_err();
    assert_eq!(SimFault::of(&err), Some(SimFault::Transient), "{err:?}");
    assert!(err.is_transient());
    assert!(matches!(err, StoreError::Unavailable { .. }));
    assert!(store.highest_seq(&a).await.is_err(), "reads fail too");
    store.set_faults(Faults::default());
    assert_eq!(store.highest_seq(&a).await.unwrap(), 0);
    let stats = store.stats();
    assert_eq!((stats.transient, stats.writes), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn a_lost_reply_hides_a_write_that_landed() {
    let store = SimStore::new(
        8,
        Faults {
            lost_reply: 1.0,
            ..Faults::default()
        },
    );
    let a = id("a");
    let err = store.append(&a, 1, &[entry(1)]).await.unwrap_err();
    assert_eq!(SimFault::of(&err), Some(SimFault::LostReply), "{err:?}");
    // Reads answer; the write is there, and durable.
    assert_eq!(store.highest_seq(&a).await.unwrap(), 1);
    store.power_loss();
    assert_eq!(store.highest_seq(&a).await.unwrap(), 1);
    assert_eq!(store.stats().lost_reply, 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_disk_refuses_writes_and_serves_reads() {
    let store = SimStore::new(
        9,
        Faults {
            disk_full: true,
            ..Faults::default()
        },
    );
    let a = id("a");
    let err = store.append(&a, 1, &[entry(1)]).await.unwrap_err();
    assert_eq!(
        err.io_kind(),
        Some(std::io::ErrorKind::StorageFull),
        "{err:?}"
    );
    assert!(matches!(err, StoreError::Storage { .. }));
    assert!(
        store
            .enqueue(&Envelope::new(a.clone(), json!(1)), None)
            .await
            .is_err()
    );
    assert_eq!(store.highest_seq(&a).await.unwrap(), 0);
    // A lease of an empty mailbox only reads.
    assert!(
        store
            .lease(&a, LeaseOptions::default())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.stats().disk_full, 2);
    store.set_faults(Faults::default());
    store.append(&a, 1, &[entry(1)]).await.unwrap();
}

/// A workload of concurrent actors under every fault, retrying as the runtime would; returns
/// the store's trace and what it holds at the end.
fn run(seed: u64) -> (u64, u64, Vec<String>, Vec<Seq>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let store = SimStore::new(
            seed,
            Faults {
                latency: (Duration::ZERO, ms(5)),
                fsync: (ms(1), ms(4)),
                transient: 0.1,
                lost_reply: 0.1,
                disk_full: false,
            },
        );
        let mut tasks = Vec::new();
        for n in 0..6u128 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let a = id(&format!("w{n}"));
                let mut next = 1;
                while next <= 10 {
                    match store.append(&a, next, &[entry(next)]).await {
                        Ok(h) => next = h + 1,
                        // Maybe applied: ask where the journal is.
                        Err(e) if e.is_transient() => {
                            if let Ok(h) = store.highest_seq(&a).await {
                                next = h + 1;
                            }
                        }
                        Err(StoreError::Conflict { actual, .. }) => next = actual,
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
                // The id is the caller's, and in the trace: fixed, not drawn from the process.
                let msg = Envelope {
                    id: MessageId::from(uuid::Uuid::from_u128(n)),
                    ..Envelope::new(a.clone(), json!(n))
                };
                let _ = store.enqueue(&msg, None).await;
                let _ = store.lease(&a, LeaseOptions::default()).await;
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        store.power_loss();
        let mut highest = Vec::new();
        for n in 0..6 {
            let a = id(&format!("w{n}"));
            highest.push(loop {
                if let Ok(h) = store.highest_seq(&a).await {
                    break h;
                }
            });
        }
        (store.trace_hash(), store.events(), store.recent(), highest)
    })
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let first = run(42);
    let again = run(42);
    assert_eq!(first, again);
    assert_eq!(first.3, vec![10; 6], "an acknowledged append was lost");
    let other = run(43);
    assert_ne!(first.0, other.0, "another seed, yet the same trace");
}

// Partitions, outboxes and the relay (rule D18).

/// `count` actors `prefix-<i>` that live in partition `p` of `n`.
fn in_partition(prefix: &str, p: u32, n: u32, count: usize) -> Vec<ActorId> {
    (0..)
        .map(|i| id(&format!("{prefix}-{i}")))
        .filter(|a| partition_of(a, n) == p)
        .take(count)
        .collect()
}

/// The id [`send`] gives the message of `from`'s turn `next` to its `i`-th recipient: its own,
/// and fixed, not drawn from the process (the trace holds it).
fn msg_id(from: &ActorId, next: Seq, i: usize) -> MessageId {
    let h = from
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    MessageId::from(uuid::Uuid::from_u128(
        u128::from(h) << 64 | u128::from(next) << 16 | i as u128,
    ))
}

/// One turn of `from` at `next`, sending one message to each of `to`; returns them.
async fn send(
    store: &SimStore,
    from: &ActorId,
    next: Seq,
    to: &[ActorId],
) -> Result<Vec<Envelope>, StoreError> {
    let sent: Vec<Envelope> = to
        .iter()
        .enumerate()
        .map(|(i, t)| Envelope {
            id: msg_id(from, next, i),
            ..Envelope::new(t.clone(), json!({ "from": from.as_str(), "turn": next }))
        })
        .collect();
    let send: Vec<Outgoing> = sent
        .iter()
        .map(|e| Outgoing {
            envelope: e.clone(),
            deliver_at: None,
        })
        .collect();
    let entries = [entry(next)];
    store
        .commit_turn(Turn {
            send: &send,
            ..Turn::append(from, next, &entries)
        })
        .await?;
    Ok(sent)
}

/// What `actor`'s mailbox holds, in order (a read: it leases nothing).
async fn held(store: &SimStore, actor: &ActorId) -> Vec<Envelope> {
    store
        .messages(actor, None, 10_000)
        .await
        .expect("messages")
        .into_iter()
        .map(|w| w.envelope)
        .collect()
}

/// The outboxes' invariants hold (`loom journal verify`'s check).
async fn outboxes_are_sound(store: &SimStore) -> Vec<OutboxState> {
    let states = store.outbox_states().await.expect("outbox states");
    let wrong = check_outboxes(&states);
    assert!(wrong.is_empty(), "{wrong:?}");
    states
}

#[tokio::test(start_paused = true)]
async fn a_partition_count_is_checked_and_kept() {
    for bad in [0, MAX_PARTITIONS + 1] {
        let err = SimStore::new_partitioned(1, Faults::default(), bad).unwrap_err();
        assert!(matches!(err, StoreError::InvalidRequest(_)), "{err:?}");
    }
    let one = SimStore::new_partitioned(1, Faults::default(), 1).unwrap();
    assert_eq!(one.partitions(), 1);
    assert_eq!(SimStore::new(1, Faults::default()).partitions(), 1);
    assert!(
        one.arrivals().is_none(),
        "nothing fills a mailbox on its own"
    );
    let many = SimStore::new_partitioned(1, Faults::default(), MAX_PARTITIONS).unwrap();
    assert_eq!(many.partitions(), MAX_PARTITIONS);
    assert!(many.arrivals().is_some());
}

#[test]
fn several_partitions_need_a_runtime_for_their_relays() {
    let err = SimStore::new_partitioned(1, Faults::default(), 2).unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn a_turn_enqueues_in_its_partition_and_sends_the_rest_through_its_outbox() {
    let n = 3;
    let store = SimStore::new_partitioned(20, slow_disk(), n).unwrap();
    let mut arrivals = store.arrivals().expect("a feed of arrivals");
    let sender = &in_partition("s", 0, n, 1)[0];
    let near = in_partition("near", 0, n, 1);
    let far = in_partition("far", 2, n, 1);
    store.hold_relay(RelayHold::Stop);
    let sent = send(&store, sender, 1, &[near[0].clone(), far[0].clone()])
        .await
        .unwrap();
    // The same partition's message is there with the turn; the other waits in the outbox.
    assert_eq!(held(&store, &near[0]).await, vec![sent[0].clone()]);
    assert_eq!(store.pending(&far[0]).await.unwrap(), 0);
    let states = outboxes_are_sound(&store).await;
    assert_eq!((states[0].outbox_seq, states[0].pending), (1, 1));
    assert!(states[2].high_water.is_empty());
    // A client's enqueue is direct, to any partition.
    let direct = Envelope::new(far[0].clone(), json!("direct"));
    store.enqueue(&direct, None).await.unwrap();
    assert_eq!(store.pending(&far[0]).await.unwrap(), 1);
    // A turn may not settle a message of another partition.
    store.hold_relay(RelayHold::Run);
    let d = store
        .lease(&far[0], LeaseOptions::default())
        .await
        .unwrap()
        .expect("the direct message");
    let entries = [entry(2)];
    let err = store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&d.receipt)),
            ..Turn::append(sender, 2, &entries)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err:?}");
    store.ack(&d.receipt).await.unwrap();
    // The relay moves it, says so, and trims the outbox.
    let filled = arrivals.recv().await.expect("an arrival");
    assert_eq!(&*filled, &[far[0].clone()][..]);
    assert_eq!(held(&store, &far[0]).await, vec![sent[1].clone()]);
    tokio::time::sleep(ms(50)).await;
    let states = outboxes_are_sound(&store).await;
    assert_eq!((states[0].outbox_seq, states[0].pending), (1, 0));
    assert_eq!(states[2].high_water, vec![(0, 1)]);
    assert_eq!(store.relayed(), 1);
    let lines = store.recent();
    assert!(
        lines.iter().any(|l| l.contains(" relay 0->2 1 -> ok")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains(" relay-trim 0 1 -> ok")),
        "{lines:#?}"
    );
    assert!(store.violations().is_empty());
}

/// Three turns of a sender of partition 0, each sending to two actors of partition 1 and two
/// of partition 2; the relay moves them all, then stops before its trim, as if it crashed
/// there; then the power goes out, and the relay runs again. Returns the store and what each
/// target was sent.
async fn a_power_loss_between_a_move_and_its_trim(
    accept_duplicates: bool,
) -> (SimStore, Vec<(ActorId, Vec<Envelope>)>) {
    let n = 3;
    let store = SimStore::new_partitioned(21, slow_disk(), n).unwrap();
    store.set_bugs(Bugs {
        accept_duplicate_relay: accept_duplicates,
        ..Bugs::default()
    });
    let sender = &in_partition("s", 0, n, 1)[0];
    let mut targets = in_partition("t", 1, n, 2);
    targets.extend(in_partition("t", 2, n, 2));
    let mut sent: Vec<(ActorId, Vec<Envelope>)> =
        targets.iter().map(|t| (t.clone(), Vec::new())).collect();
    store.hold_relay(RelayHold::Stop);
    for turn in 1..=3 {
        let envelopes = send(&store, sender, turn, &targets).await.unwrap();
        for (i, e) in envelopes.into_iter().enumerate() {
            sent[i].1.push(e);
        }
    }
    // The move, and no trim.
    store.hold_relay(RelayHold::StopAfterMove);
    tokio::time::sleep(ms(100)).await;
    for (t, msgs) in &sent {
        assert_eq!(&held(&store, t).await, msgs, "{t}");
    }
    let states = outboxes_are_sound(&store).await;
    assert_eq!(
        (states[0].outbox_seq, states[0].pending),
        (12, 12),
        "trimmed"
    );
    assert_eq!(states[1].high_water.len(), 1);
    assert_eq!(states[2].high_water, vec![(0, 12)]);
    assert_eq!(store.relayed(), 12);
    // The moves were acknowledged, so durable: the power loss keeps them, and the outbox.
    store.power_loss();
    store.hold_relay(RelayHold::Run);
    tokio::time::sleep(ms(100)).await;
    (store, sent)
}

#[tokio::test(start_paused = true)]
async fn a_power_loss_between_move_and_trim_moves_again_and_enqueues_nothing_twice() {
    let (store, sent) = a_power_loss_between_a_move_and_its_trim(false).await;
    let lines = store.recent();
    assert!(
        lines
            .iter()
            .skip_while(|l| !l.ends_with("power-loss"))
            .any(|l| l.contains(" relay 0->")),
        "not moved again: {lines:#?}"
    );
    for (t, msgs) in &sent {
        assert_eq!(&held(&store, t).await, msgs, "{t}: not once each, in order");
    }
    let states = outboxes_are_sound(&store).await;
    assert_eq!(states[0].pending, 0, "not trimmed after the second move");
    assert_eq!(store.relayed(), 12);
    assert!(store.violations().is_empty(), "{:?}", store.violations());
}

#[tokio::test(start_paused = true)]
async fn accept_duplicate_relay_delivers_twice_and_the_audit_says_so() {
    let (store, sent) = a_power_loss_between_a_move_and_its_trim(true).await;
    for (t, msgs) in &sent {
        let twice: Vec<Envelope> = msgs.iter().chain(msgs).cloned().collect();
        assert_eq!(held(&store, t).await, twice, "{t}");
    }
    let violations = store.violations();
    assert_eq!(violations.len(), 12, "{violations:#?}");
    let (t, msgs) = &sent[0];
    let expected = format!("message {} to {t} moved twice by the relay", msgs[0].id);
    assert!(
        violations.iter().any(|v| v.starts_with(&expected)),
        "{violations:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_move_a_power_loss_took_back_is_moved_again_and_is_no_duplicate() {
    let n = 2;
    let store = SimStore::new_partitioned(
        22,
        Faults {
            fsync: (ms(10), ms(10)),
            ..Faults::default()
        },
        n,
    )
    .unwrap();
    // Even with the bug: what the power loss took back was never delivered.
    store.set_bugs(Bugs {
        accept_duplicate_relay: true,
        ..Bugs::default()
    });
    let sender = &in_partition("s", 0, n, 1)[0];
    let target = in_partition("t", 1, n, 1);
    store.hold_relay(RelayHold::Stop);
    let sent = send(&store, sender, 1, &target).await.unwrap();
    store.hold_relay(RelayHold::Run);
    // The move is applied and waits for its sync.
    let mut turns = 0;
    while store.unsynced() == 0 {
        assert!(turns < 1000, "the relay did not move");
        turns += 1;
        tokio::task::yield_now().await;
    }
    store.power_loss();
    tokio::time::sleep(ms(200)).await;
    assert_eq!(held(&store, &target[0]).await, sent);
    assert_eq!(store.relayed(), 1);
    assert!(store.violations().is_empty(), "{:?}", store.violations());
    assert_eq!(outboxes_are_sound(&store).await[0].pending, 0);
}

/// What [`relay_run`] ends with.
struct RelayRun {
    trace: u64,
    /// What each receiver holds, in order.
    holds: Vec<Vec<MessageId>>,
    /// What the senders' journals say was sent to each receiver.
    sent: Vec<Vec<MessageId>>,
    violations: Vec<String>,
    relayed: u64,
}

/// Senders in every partition send to receivers in every partition, under every fault and
/// power losses, retrying as the runtime would; then the faults stop and the relays catch up.
fn relay_run(seed: u64, accept_duplicates: bool) -> RelayRun {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let n = 3;
        let faults = Faults {
            latency: (Duration::ZERO, ms(3)),
            fsync: (ms(1), ms(3)),
            transient: 0.15,
            lost_reply: 0.15,
            disk_full: false,
        };
        let store = SimStore::new_partitioned(seed, faults, n).unwrap();
        store.set_bugs(Bugs {
            accept_duplicate_relay: accept_duplicates,
            ..Bugs::default()
        });
        let senders: Vec<ActorId> = (0..n).flat_map(|p| in_partition("s", p, n, 2)).collect();
        let receivers: Vec<ActorId> = (0..n).flat_map(|p| in_partition("r", p, n, 1)).collect();
        let outages = {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..4 {
                    tokio::time::sleep(ms(37)).await;
                    store.power_loss();
                }
            })
        };
        let mut tasks = Vec::new();
        for s in senders.clone() {
            let (store, receivers) = (store.clone(), receivers.clone());
            tasks.push(tokio::spawn(async move {
                let mut next = 1;
                while next <= 8 {
                    match send(&store, &s, next, &receivers).await {
                        Ok(_) => next += 1,
                        // Maybe committed: ask where the journal is.
                        Err(e) if e.is_transient() => {
                            if let Ok(h) = store.highest_seq(&s).await {
                                next = h + 1;
                            }
                        }
                        Err(StoreError::Conflict { actual, .. }) => next = actual,
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("sender");
        }
        outages.await.expect("outages");
        store.set_faults(Faults::default());
        tokio::time::sleep(ms(500)).await;
        let states = outboxes_are_sound(&store).await;
        assert!(states.iter().all(|s| s.pending == 0), "{states:?}");
        // Every turn a journal holds sent one message to each receiver.
        let mut sent = vec![Vec::new(); receivers.len()];
        for s in &senders {
            let highest = store.highest_seq(s).await.unwrap();
            assert_eq!(highest, 8, "{s}");
            for (r, to_r) in sent.iter_mut().enumerate() {
                to_r.extend((1..=highest).map(|turn| msg_id(s, turn, r)));
            }
        }
        let mut holds = Vec::new();
        for r in &receivers {
            holds.push(held(&store, r).await.into_iter().map(|e| e.id).collect());
        }
        RelayRun {
            trace: store.trace_hash(),
            holds,
            sent,
            violations: store.violations(),
            relayed: store.relayed(),
        }
    })
}

/// How many more copies than one of its messages the receivers hold (0 if each is there
/// exactly once); panics if one is missing, or one nobody sent is there.
fn extra_copies(run: &RelayRun) -> usize {
    let mut extra = 0;
    for (r, (held, sent)) in run.holds.iter().zip(&run.sent).enumerate() {
        for id in sent {
            let copies = held.iter().filter(|h| *h == id).count();
            assert!(copies >= 1, "message {id} to receiver {r} is missing");
            extra += copies - 1;
        }
        assert!(
            held.iter().all(|h| sent.contains(h)),
            "receiver {r} holds a message nobody sent"
        );
    }
    extra
}

#[test]
fn under_faults_and_power_losses_the_relay_delivers_exactly_once_and_replays() {
    let run = relay_run(30, false);
    assert_eq!(run.sent.iter().map(Vec::len).sum::<usize>(), 6 * 8 * 3);
    assert_eq!(extra_copies(&run), 0, "a message arrived twice");
    assert!(run.violations.is_empty(), "{:?}", run.violations);
    // The messages between partitions (two thirds of them) went through the relay.
    assert_eq!(run.relayed, 6 * 8 * 2);
    let again = relay_run(30, false);
    assert_eq!(
        (run.trace, &run.holds),
        (again.trace, &again.holds),
        "the same seed, another run"
    );
    assert_ne!(
        run.trace,
        relay_run(31, false).trace,
        "another seed, yet the same trace"
    );
}

#[test]
fn under_faults_accept_duplicate_relay_is_found_once_per_duplicate() {
    let run = relay_run(30, true);
    let extra = extra_copies(&run);
    assert!(extra > 0, "the bug did no harm in this run");
    assert_eq!(
        run.violations.len(),
        extra,
        "the audit must count each durable duplicate once: {:#?}",
        run.violations
    );
}

#[tokio::test(start_paused = true)]
async fn the_relays_end_with_the_last_handle() {
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    let store = SimStore::new_partitioned(23, Faults::default(), 4).unwrap();
    assert_eq!(tasks(), before + 4);
    let other = store.link();
    drop(store);
    tokio::time::sleep(RELAY_TICK * 3).await;
    assert_eq!(tasks(), before + 4, "a handle is left");
    drop(other);
    tokio::time::sleep(RELAY_TICK * 3).await;
    assert_eq!(tasks(), before, "the relays outlived their store");
}

#[tokio::test(start_paused = true)]
async fn more_than_a_batch_moves_batch_after_batch_in_order() {
    let n = 2;
    let store = SimStore::new_partitioned(24, slow_disk(), n).unwrap();
    let sender = &in_partition("s", 0, n, 1)[0];
    let target = in_partition("t", 1, n, 1);
    let per_turn = 200;
    let turns = (RELAY_BATCH / per_turn + 1) as Seq;
    store.hold_relay(RelayHold::Stop);
    let mut sent = Vec::new();
    for turn in 1..=turns {
        let to = vec![target[0].clone(); per_turn];
        sent.extend(send(&store, sender, turn, &to).await.unwrap());
    }
    assert!(sent.len() > RELAY_BATCH);
    store.hold_relay(RelayHold::Run);
    tokio::time::sleep(ms(200)).await;
    assert_eq!(held(&store, &target[0]).await, sent);
    let lines = store.recent();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!(" relay-trim 0 {} -> ok", sent.len()))),
        "{lines:#?}"
    );
    assert_eq!(outboxes_are_sound(&store).await[0].pending, 0);
    assert_eq!(store.relayed(), sent.len() as u64);
}
