//! The simulated store's own rules: its durability model (what a power loss keeps), its
//! injected faults, and the determinism of its trace.

use std::time::Duration;

use loom_core::{
    ActorId, Entry, EntryKind, Envelope, JournalStore, LeaseOptions, Mailbox, MessageId, Seq,
    StoreError,
};
use loom_sim::store::{Faults, LAZY_SYNC, SimFault, SimStore};
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
    // The write is applied and waits for its sync.
    tokio::task::yield_now().await;
    assert_eq!(store.unsynced(), 1);
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
    tokio::task::yield_now().await;
    assert_eq!(store.unsynced(), 1);
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
