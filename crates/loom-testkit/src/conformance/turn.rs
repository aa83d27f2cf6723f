//! [`Store::commit_turn`] cases: a turn's entries, ack, outgoing messages and recorded result are
//! one atomic write, refused as a whole when any of its conditions fails.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use loom_core::limits::MAX_MESSAGE_BYTES;
use loom_core::store::backend::{Outgoing, Record, Settle, Turn};
use loom_core::{
    ActorId, Enqueued, Entry, EntryKind, Envelope, IdempotencyKey, LeaseOptions, Limit, MessageId,
    Reservation, Retired, Seq, SeqRange, Snapshot, Store, StoreError, Timestamp,
};
use serde_json::json;

use super::{Case, cases};

pub(super) fn cases() -> Vec<Case> {
    cases![
        turn_appends_acks_sends_and_records_in_one_write,
        conflicting_turn_changes_nothing,
        turn_with_a_stale_receipt_changes_nothing,
        fenced_turn_after_the_lease_is_lost_changes_nothing,
        fenced_turn_with_the_lease_held_commits,
        writes_fenced_by_the_partitions_lease_commit_until_it_is_lost_or_the_own_lease_is_taken,
        a_fence_of_another_lease_than_the_actors_or_its_partitions_is_refused,
        turn_can_dead_letter_its_delivery,
        any_failure_text_is_taken_by_nacks_and_dead_letters,
        turn_sending_to_its_own_actor_keeps_the_mailbox_consistent,
        turn_without_entries_only_settles,
        turn_can_lease_the_next_message_in_the_same_write,
        turn_with_an_oversized_outgoing_message_changes_nothing,
        enqueue_once_enqueues_once_per_key,
        concurrent_enqueue_once_enqueues_one_message,
        enqueue_once_returns_the_recorded_result,
        enqueue_once_holds_its_key_until_a_turn_records_it,
        a_turn_records_only_for_its_actor_or_the_mailbox_it_settles,
        a_turn_and_a_plain_append_racing_on_fresh_actors_never_both_succeed,
        a_requeued_message_holds_its_key_again,
        retire_deletes_the_journal_keeps_its_seq_and_acks_the_message,
        retire_writes_nothing_when_the_actor_ran_has_mail_lost_its_lease_or_moved_on,
    ]
}

fn id(key: &str) -> ActorId {
    ActorId::new("conf", key).expect("valid id")
}

fn entries(from: Seq, to: Seq) -> Vec<Entry> {
    (from..=to)
        .map(|s| Entry::new(s, EntryKind::Completed { reply: json!(s) }))
        .collect()
}

fn long() -> LeaseOptions {
    LeaseOptions {
        visibility: Duration::from_secs(60),
        max_deliveries: 5,
        ..LeaseOptions::default()
    }
}

async fn journal(store: &dyn Store, a: &ActorId) -> Vec<Seq> {
    let got: Vec<Entry> = store
        .read(a, SeqRange::all())
        .try_collect()
        .await
        .expect("read");
    got.into_iter().map(|e| e.seq).collect()
}

async fn deliver(store: &dyn Store, a: &ActorId) -> loom_core::Delivery {
    store
        .enqueue(&Envelope::new(a.clone(), json!("in")), None)
        .await
        .expect("enqueue");
    store
        .lease(a, long())
        .await
        .expect("lease")
        .expect("a delivery")
}

async fn wait_past(d: Duration) {
    tokio::time::sleep(d + Duration::from_millis(150)).await;
}

async fn turn_appends_acks_sends_and_records_in_one_write(store: Arc<dyn Store>) {
    let (a, b, c) = (id("a"), id("b"), id("c"));
    let d = deliver(&*store, &a).await;
    let key = IdempotencyKey::new("req-1").unwrap();
    let later = Timestamp::now() + Duration::from_secs(3600);
    let send = vec![
        Outgoing {
            envelope: Envelope::new(b.clone(), json!("to b")),
            deliver_at: None,
        },
        Outgoing {
            envelope: Envelope::new(c.clone(), json!("to c, later")),
            deliver_at: Some(later),
        },
    ];
    let written = entries(1, 2);
    let result = json!({"reply": 7});
    let highest = store
        .commit_turn(Turn {
            actor: &a,
            expected_next: 1,
            entries: &written,
            fence: None,
            send: &send,
            settle: Some(Settle::Ack(&d.receipt)),
            record: Some(Record {
                actor: &a,
                key: &key,
                result: &result,
                ttl: Duration::from_secs(600),
            }),
            next: None,
        })
        .await
        .unwrap();
    assert_eq!(highest.highest, 2);
    assert!(highest.next.is_none());
    assert_eq!(journal(&*store, &a).await, vec![1, 2]);
    assert_eq!(
        store.pending(&a).await.unwrap(),
        0,
        "the delivery was not acked"
    );
    // In another partition, a sent message arrives through the relay, a little later.
    super::partitions::arrived(&*store, &b, 1).await;
    super::partitions::arrived(&*store, &c, 1).await;
    let to_b = store
        .lease(&b, long())
        .await
        .unwrap()
        .expect("message to b");
    assert_eq!(to_b.envelope, send[0].envelope);
    assert_eq!(store.pending(&c).await.unwrap(), 1);
    assert!(
        store.lease(&c, long()).await.unwrap().is_none(),
        "delayed message came early"
    );
    assert_eq!(
        store.lookup(&a, &key).await.unwrap(),
        Some(Reservation::Completed(result))
    );
}

async fn conflicting_turn_changes_nothing(store: Arc<dyn Store>) {
    let (a, b) = (id("a"), id("b"));
    store.append(&a, 1, &entries(1, 3)).await.unwrap();
    let d = deliver(&*store, &a).await;
    let key = IdempotencyKey::new("req").unwrap();
    let send = vec![Outgoing {
        envelope: Envelope::new(b.clone(), json!(1)),
        deliver_at: None,
    }];
    let err = store
        .commit_turn(Turn {
            actor: &a,
            expected_next: 2,
            entries: &entries(2, 2),
            fence: None,
            send: &send,
            settle: Some(Settle::Ack(&d.receipt)),
            record: Some(Record {
                actor: &a,
                key: &key,
                result: &json!(1),
                ttl: Duration::from_secs(60),
            }),
            next: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 2,
                actual: 4,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(journal(&*store, &a).await, vec![1, 2, 3]);
    assert_eq!(
        store.pending(&b).await.unwrap(),
        0,
        "an outgoing message left with a refused turn"
    );
    assert_eq!(store.lookup(&a, &key).await.unwrap(), None);
    store
        .ack(&d.receipt)
        .await
        .expect("the delivery is still out and ackable");
}

async fn turn_with_a_stale_receipt_changes_nothing(store: Arc<dyn Store>) {
    let (a, b) = (id("a"), id("b"));
    store
        .enqueue(&Envelope::new(a.clone(), json!(1)), None)
        .await
        .unwrap();
    let short = LeaseOptions {
        visibility: Duration::from_millis(100),
        max_deliveries: 5,
        ..LeaseOptions::default()
    };
    let first = store.lease(&a, short).await.unwrap().expect("first");
    wait_past(Duration::from_millis(100)).await;
    let _second = store.lease(&a, long()).await.unwrap().expect("second");
    let send = vec![Outgoing {
        envelope: Envelope::new(b.clone(), json!(1)),
        deliver_at: None,
    }];
    let err = store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&first.receipt)),
            send: &send,
            ..Turn::append(&a, 1, &entries(1, 1))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::StaleReceipt { .. }), "{err:?}");
    assert!(journal(&*store, &a).await.is_empty());
    assert_eq!(store.pending(&b).await.unwrap(), 0);
    assert_eq!(store.pending(&a).await.unwrap(), 1);
}

async fn fenced_turn_after_the_lease_is_lost_changes_nothing(store: Arc<dyn Store>) {
    let a = id("a");
    let old = store
        .acquire(&a, "node-1", Duration::from_millis(100))
        .await
        .unwrap();
    wait_past(Duration::from_millis(100)).await;
    let expired = store
        .commit_turn(Turn {
            fence: Some(&old),
            ..Turn::append(&a, 1, &entries(1, 1))
        })
        .await
        .unwrap_err();
    assert!(
        matches!(expired, StoreError::LeaseLost { .. }),
        "{expired:?}"
    );
    let _new = store
        .acquire(&a, "node-2", Duration::from_secs(60))
        .await
        .unwrap();
    let taken = store
        .commit_turn(Turn {
            fence: Some(&old),
            ..Turn::append(&a, 1, &entries(1, 1))
        })
        .await
        .unwrap_err();
    assert!(matches!(taken, StoreError::LeaseLost { .. }), "{taken:?}");
    assert!(
        journal(&*store, &a).await.is_empty(),
        "a fenced-off writer appended"
    );
}

async fn fenced_turn_with_the_lease_held_commits(store: Arc<dyn Store>) {
    let a = id("a");
    let lease = store
        .acquire(&a, "node-1", Duration::from_secs(60))
        .await
        .unwrap();
    let h = store
        .commit_turn(Turn {
            fence: Some(&lease),
            ..Turn::append(&a, 1, &entries(1, 2))
        })
        .await
        .unwrap();
    assert_eq!(h.highest, 2);
}

/// The lease of the partition `a` is in, among those nodes own on `store`.
fn partition_lease(store: &dyn Store, a: &ActorId) -> ActorId {
    use loom_core::partition::{ownership_partitions, partition_of};
    let p = partition_of(a, ownership_partitions(store.partitions()));
    ActorId::partition_lease(a.kind(), p)
}

/// What a turn appending `seq`, a compaction (a snapshot at 1) and a park of `a`, each fenced
/// by `fence`, came to, in that order.
async fn fenced_writes(
    store: &dyn Store,
    a: &ActorId,
    seq: Seq,
    fence: &loom_core::Lease,
) -> [Result<(), StoreError>; 3] {
    let one = entries(seq, seq);
    let turn = store
        .commit_turn(Turn {
            fence: Some(fence),
            ..Turn::append(a, seq, &one)
        })
        .await;
    let compact = store
        .compact(a, &Snapshot::new(1, json!(1)), 1, Some(fence))
        .await;
    let park = store
        .park(a, &loom_core::Park::new("node-1", "why"), Some(fence))
        .await;
    [turn.map(drop), compact.map(drop), park]
}

/// Rule D8: a node runs a partition's actors under the partition's one lease. Its turns,
/// compactions and parks commit while that lease is held and nobody holds the actor's own; a
/// lease lost or taken over, or the actor's own lease taken (by a tool), refuses them with
/// nothing written, and leaves the partition's other actors alone.
async fn writes_fenced_by_the_partitions_lease_commit_until_it_is_lost_or_the_own_lease_is_taken(
    store: Arc<dyn Store>,
) {
    let a = id("a");
    let part = partition_lease(&*store, &a);
    // Other actors of the same partition.
    let mut same = (0..)
        .map(|i| id(&format!("b{i}")))
        .filter(|b| partition_lease(&*store, b) == part);
    let b = same.next().expect("some id shares a's partition");
    let crowd: Vec<ActorId> = same.by_ref().take(8).collect();
    let c = same.next().expect("some id shares a's partition");
    let lease = store
        .acquire(&part, "node-1", Duration::from_secs(60))
        .await
        .unwrap();
    let turn = |actor, seq, fence| Turn {
        fence: Some(fence),
        ..Turn::append(actor, seq, &[])
    };
    let one = entries(1, 1);
    for x in [&a, &b] {
        let h = store
            .commit_turn(Turn {
                entries: &one,
                ..turn(x, 1, &lease)
            })
            .await
            .unwrap();
        assert_eq!(h.highest, 1, "{x}");
    }
    // Many at once, as a node's actors commit (group commits batch them on some backends).
    let committed = futures::future::join_all(crowd.iter().map(|x| {
        store.commit_turn(Turn {
            entries: &one,
            ..turn(x, 1, &lease)
        })
    }))
    .await;
    for (x, h) in crowd.iter().zip(committed) {
        assert_eq!(h.unwrap().highest, 1, "{x}");
    }
    // A retirement under the partition's lease waits for the actor's own lease too.
    let d = deliver(&*store, &c).await;
    let tool = store
        .acquire(&c, "tool", Duration::from_secs(60))
        .await
        .unwrap();
    let refused = store.retire(&d.receipt, &lease, 0).await.unwrap_err();
    assert!(
        matches!(refused, StoreError::LeaseLost { .. }),
        "{refused:?}"
    );
    assert_eq!(store.pending(&c).await.unwrap(), 1);
    assert!(store.release(&tool).await.unwrap());
    assert_eq!(
        store.retire(&d.receipt, &lease, 0).await.unwrap(),
        Retired::Deleted
    );
    // A tool takes a's own lease: a's writes under the partition's lease are refused, b's not.
    let own = store
        .acquire(&a, "tool", Duration::from_secs(60))
        .await
        .unwrap();
    let two = entries(2, 2);
    for refused in fenced_writes(&*store, &a, 2, &lease).await {
        assert!(
            matches!(refused, Err(StoreError::LeaseLost { .. })),
            "{refused:?}"
        );
    }
    assert_eq!(journal(&*store, &a).await, vec![1]);
    assert!(store.load_snapshot(&a, 1).await.unwrap().is_none());
    assert!(store.parked(&a).await.unwrap().is_none());
    store
        .commit_turn(Turn {
            entries: &two,
            ..turn(&b, 2, &lease)
        })
        .await
        .unwrap();
    // Its own lease given back, a runs under the partition's again; the tool's fence works
    // meanwhile as any own lease does.
    assert!(store.release(&own).await.unwrap());
    store
        .commit_turn(Turn {
            entries: &two,
            ..turn(&a, 2, &lease)
        })
        .await
        .unwrap();
    assert_eq!(
        store
            .compact(&a, &Snapshot::new(2, json!(2)), 1, Some(&lease))
            .await
            .unwrap(),
        2
    );
    // The partition's lease given up and taken by another node: the old fence writes nothing.
    assert!(store.release(&lease).await.unwrap());
    let new = store
        .acquire(&part, "node-2", Duration::from_secs(60))
        .await
        .unwrap();
    let three = entries(3, 3);
    for x in [&a, &b] {
        let refused = store
            .commit_turn(Turn {
                entries: &three,
                ..turn(x, 3, &lease)
            })
            .await
            .unwrap_err();
        assert!(
            matches!(refused, StoreError::LeaseLost { .. }),
            "{x}: {refused:?}"
        );
        assert_eq!(store.highest_seq(x).await.unwrap(), 2, "{x}");
    }
    // Turns at once under the old fence and the new one (group commits batch them, and a batch
    // that read the partition's lease once for all its turns would still have to decide each
    // by its own fence): each is decided by its own.
    let mixed = futures::future::join_all(crowd.iter().enumerate().map(|(i, x)| {
        store.commit_turn(Turn {
            entries: &two,
            ..turn(x, 2, if i % 2 == 0 { &new } else { &lease })
        })
    }))
    .await;
    for (i, (x, r)) in crowd.iter().zip(mixed).enumerate() {
        if i % 2 == 0 {
            assert_eq!(r.unwrap().highest, 2, "{x} under the new fence");
        } else {
            assert!(
                matches!(r, Err(StoreError::LeaseLost { .. })),
                "{x} under the old fence: {r:?}"
            );
            assert_eq!(store.highest_seq(x).await.unwrap(), 1, "{x}");
        }
    }
}

/// A fence must be the actor's own lease or its partition's: any other lease, however live,
/// fences nothing of the actor's, and the write is refused as invalid with nothing written.
async fn a_fence_of_another_lease_than_the_actors_or_its_partitions_is_refused(
    store: Arc<dyn Store>,
) {
    use loom_core::partition::ownership_partitions;
    let a = id("a");
    let part = partition_lease(&*store, &a);
    let (_, p) = part.partition_lease_of().unwrap();
    let n = ownership_partitions(store.partitions());
    let others = [
        id("b"),
        ActorId::partition_lease("conf", (p + 1) % n),
        ActorId::partition_lease("other", p),
    ];
    for other in others {
        let lease = store
            .acquire(&other, "node-1", Duration::from_secs(60))
            .await
            .unwrap();
        for refused in fenced_writes(&*store, &a, 1, &lease).await {
            assert!(
                matches!(refused, Err(StoreError::InvalidRequest(_))),
                "{other}: {refused:?}"
            );
        }
    }
    assert!(journal(&*store, &a).await.is_empty());
    assert!(store.parked(&a).await.unwrap().is_none());
}

async fn turn_can_dead_letter_its_delivery(store: Arc<dyn Store>) {
    let a = id("a");
    let d = deliver(&*store, &a).await;
    store
        .commit_turn(Turn {
            settle: Some(Settle::DeadLetter(
                &d.receipt,
                "handler failed 5 times: boom",
            )),
            ..Turn::append(&a, 1, &entries(1, 1))
        })
        .await
        .unwrap();
    assert_eq!(journal(&*store, &a).await, vec![1]);
    assert_eq!(store.pending(&a).await.unwrap(), 0);
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id, d.envelope.id);
    assert_eq!(dead[0].reason, "handler failed 5 times: boom");
}

async fn turn_sending_to_its_own_actor_keeps_the_mailbox_consistent(store: Arc<dyn Store>) {
    let a = id("a");
    let d = deliver(&*store, &a).await;
    let to_self = Envelope::new(a.clone(), json!("again"));
    let send = vec![Outgoing {
        envelope: to_self.clone(),
        deliver_at: None,
    }];
    store
        .commit_turn(Turn {
            send: &send,
            settle: Some(Settle::Ack(&d.receipt)),
            ..Turn::append(&a, 1, &entries(1, 1))
        })
        .await
        .unwrap();
    assert_eq!(store.pending(&a).await.unwrap(), 1);
    assert_eq!(
        store.ready_actors(&["conf"], 10).await.unwrap(),
        vec![a.clone()]
    );
    let next = store
        .lease(&a, long())
        .await
        .unwrap()
        .expect("the message to itself");
    assert_eq!(next.envelope, to_self);
    store.ack(&next.receipt).await.unwrap();
    assert_eq!(store.pending(&a).await.unwrap(), 0);
    assert!(store.ready_actors(&["conf"], 10).await.unwrap().is_empty());
}

/// A handler's failure text reaches the store as it came: empty, or holding what its input held
/// (a NUL byte, which PostgreSQL's `text` refuses). A nack, a turn that buries and a plain
/// dead letter all take it; the text read back may be mended (a NUL replaced) but not lost.
async fn any_failure_text_is_taken_by_nacks_and_dead_letters(store: Arc<dyn Store>) {
    let a = id("a");
    let mut seq = 1;
    for reason in ["", "bad \0 cmd"] {
        for by_turn in [true, false] {
            let d = deliver(&*store, &a).await;
            store
                .nack(&d.receipt, Duration::ZERO, reason)
                .await
                .unwrap();
            let d = store
                .lease(&a, long())
                .await
                .unwrap()
                .expect("after the nack");
            // An empty error may come back as none.
            let last = d.last_error.clone().unwrap_or_default();
            assert!(
                last.starts_with(&reason[..reason.len().min(4)]) && last.len() >= reason.len(),
                "the nack's error came back as {last:?}"
            );
            if by_turn {
                store
                    .commit_turn(Turn {
                        settle: Some(Settle::DeadLetter(&d.receipt, reason)),
                        ..Turn::append(&a, seq, &entries(seq, seq))
                    })
                    .await
                    .unwrap();
                seq += 1;
            } else {
                store.dead_letter(&d.receipt, reason).await.unwrap();
            }
        }
    }
    let dead = store.dead_letters(None, 10).await.unwrap();
    let got: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(&got[..2], ["", ""]);
    for r in &got[2..] {
        assert!(r.starts_with("bad ") && r.ends_with(" cmd"), "{r:?}");
    }
    assert_eq!(store.pending(&a).await.unwrap(), 0);
}

async fn turn_without_entries_only_settles(store: Arc<dyn Store>) {
    let a = id("a");
    store.append(&a, 1, &entries(1, 2)).await.unwrap();
    let d = deliver(&*store, &a).await;
    let h = store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&d.receipt)),
            ..Turn::append(&a, 3, &[])
        })
        .await
        .unwrap();
    assert_eq!(h.highest, 2);
    assert_eq!(store.pending(&a).await.unwrap(), 0);
}

async fn turn_with_an_oversized_outgoing_message_changes_nothing(store: Arc<dyn Store>) {
    let (a, b) = (id("a"), id("b"));
    let d = deliver(&*store, &a).await;
    let send = vec![Outgoing {
        envelope: Envelope {
            id: MessageId::new(),
            ..Envelope::new(b.clone(), json!("x".repeat(MAX_MESSAGE_BYTES)))
        },
        deliver_at: None,
    }];
    let err = store
        .commit_turn(Turn {
            send: &send,
            settle: Some(Settle::Ack(&d.receipt)),
            ..Turn::append(&a, 1, &entries(1, 1))
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TooLarge {
                limit_kind: Limit::MessageBytes,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(journal(&*store, &a).await.is_empty());
    assert_eq!(store.pending(&a).await.unwrap(), 1);
    assert_eq!(store.pending(&b).await.unwrap(), 0);
}

async fn enqueue_once_enqueues_once_per_key(store: Arc<dyn Store>) {
    let a = id("a");
    let key = IdempotencyKey::new("client-retry").unwrap();
    let m1 = Envelope::new(a.clone(), json!(1));
    let m2 = Envelope::new(a.clone(), json!(2));
    let ttl = Duration::from_secs(600);
    assert!(matches!(
        store.enqueue_once(&m1, None, &key, ttl).await.unwrap(),
        Enqueued::New(_)
    ));
    let again = store.enqueue_once(&m2, None, &key, ttl).await.unwrap();
    assert!(
        matches!(again, Enqueued::Duplicate(Reservation::Pending { .. })),
        "{again:?}"
    );
    assert_eq!(store.pending(&a).await.unwrap(), 1);
    let other = IdempotencyKey::new("another").unwrap();
    assert!(matches!(
        store.enqueue_once(&m2, None, &other, ttl).await.unwrap(),
        Enqueued::New(_)
    ));
    assert_eq!(store.pending(&a).await.unwrap(), 2);
}

async fn concurrent_enqueue_once_enqueues_one_message(store: Arc<dyn Store>) {
    let a = id("a");
    let key = IdempotencyKey::new("same").unwrap();
    let mut tasks = Vec::new();
    for n in 0..8 {
        let (store, a, key) = (store.clone(), a.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            store
                .enqueue_once(
                    &Envelope::new(a, json!(n)),
                    None,
                    &key,
                    Duration::from_secs(600),
                )
                .await
                .unwrap()
        }));
    }
    let mut new = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Enqueued::New(_)) {
            new += 1;
        }
    }
    assert_eq!(new, 1);
    assert_eq!(store.pending(&a).await.unwrap(), 1);
}

async fn enqueue_once_returns_the_recorded_result(store: Arc<dyn Store>) {
    let a = id("a");
    let key = IdempotencyKey::new("k").unwrap();
    let ttl = Duration::from_secs(600);
    store
        .enqueue_once(&Envelope::new(a.clone(), json!(1)), None, &key, ttl)
        .await
        .unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&d.receipt)),
            record: Some(Record {
                actor: &a,
                key: &key,
                result: &json!({"reply": 1}),
                ttl,
            }),
            ..Turn::append(&a, 1, &entries(1, 1))
        })
        .await
        .unwrap();
    let again = store
        .enqueue_once(&Envelope::new(a.clone(), json!(1)), None, &key, ttl)
        .await
        .unwrap();
    assert_eq!(
        again,
        Enqueued::Duplicate(Reservation::Completed(json!({"reply": 1})))
    );
    assert_eq!(store.pending(&a).await.unwrap(), 0);
}

async fn turn_can_lease_the_next_message_in_the_same_write(store: Arc<dyn Store>) {
    let a = id("a");
    let first = deliver(&*store, &a).await;
    let second = Envelope::new(a.clone(), json!("second"));
    store.enqueue(&second, None).await.unwrap();
    let c = store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&first.receipt)),
            next: Some(long()),
            ..Turn::append(&a, 1, &entries(1, 1))
        })
        .await
        .unwrap();
    let next = c.next.expect("the next message");
    assert_eq!(next.envelope, second);
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "the next message was not leased by the turn"
    );
    let c = store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&next.receipt)),
            next: Some(long()),
            ..Turn::append(&a, 2, &entries(2, 2))
        })
        .await
        .unwrap();
    assert!(c.next.is_none());
    assert_eq!(store.pending(&a).await.unwrap(), 0);
}

async fn enqueue_once_holds_its_key_until_a_turn_records_it(store: Arc<dyn Store>) {
    let a = id("a");
    let key = IdempotencyKey::new("held").unwrap();
    let short = Duration::from_millis(300);
    let first = Envelope::new(a.clone(), json!(1));
    store.enqueue_once(&first, None, &key, short).await.unwrap();
    // Long past the ttl, the message still waits: a retry must not enqueue it again.
    wait_past(short * 2).await;
    let again = store
        .enqueue_once(&Envelope::new(a.clone(), json!(2)), None, &key, short)
        .await
        .unwrap();
    assert_eq!(
        again,
        Enqueued::Duplicate(Reservation::Pending {
            expires_at: Timestamp::MAX
        }),
        "a reservation expired while its message waited"
    );
    assert_eq!(
        store.lookup(&a, &key).await.unwrap(),
        Some(Reservation::Pending {
            expires_at: Timestamp::MAX
        })
    );
    assert_eq!(store.pending(&a).await.unwrap(), 1);
    // The turn that settles the message records the result: kept for its ttl from then.
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    assert_eq!(d.envelope.id, first.id);
    store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&d.receipt)),
            record: Some(Record {
                actor: &a,
                key: &key,
                result: &json!("done"),
                ttl: short,
            }),
            ..Turn::append(&a, 1, &entries(1, 1))
        })
        .await
        .unwrap();
    assert_eq!(
        store
            .enqueue_once(&Envelope::new(a.clone(), json!(3)), None, &key, short)
            .await
            .unwrap(),
        Enqueued::Duplicate(Reservation::Completed(json!("done")))
    );
    wait_past(short).await;
    assert!(store.lookup(&a, &key).await.unwrap().is_none());
    assert!(matches!(
        store
            .enqueue_once(&Envelope::new(a.clone(), json!(4)), None, &key, short)
            .await
            .unwrap(),
        Enqueued::New(_)
    ));
}

async fn a_turn_records_only_for_its_actor_or_the_mailbox_it_settles(store: Arc<dyn Store>) {
    let (a, b) = (id("a"), id("b"));
    let key = IdempotencyKey::new("k").unwrap();
    let result = json!("r");
    let record = |actor| Record {
        actor,
        key: &key,
        result: &result,
        ttl: Duration::from_secs(60),
    };
    // Another actor's key: refused, nothing written.
    let err = store
        .commit_turn(Turn {
            record: Some(record(&b)),
            ..Turn::append(&a, 1, &entries(1, 1))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err:?}");
    assert!(journal(&*store, &a).await.is_empty());
    assert!(store.lookup(&b, &key).await.unwrap().is_none());
    // The mailbox it settles (an event lane): allowed.
    let lane = a.event_lane_in("approved", store.partitions());
    store
        .enqueue_once(
            &Envelope::new(lane.clone(), json!("yes")),
            None,
            &key,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let event = store
        .lease(&lane, long())
        .await
        .unwrap()
        .expect("the event");
    store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&event.receipt)),
            record: Some(record(&lane)),
            ..Turn::append(&a, 1, &entries(1, 1))
        })
        .await
        .unwrap();
    assert_eq!(
        store.lookup(&lane, &key).await.unwrap(),
        Some(Reservation::Completed(json!("r")))
    );
    assert_eq!(store.pending(&lane).await.unwrap(), 0);
}

async fn a_turn_and_a_plain_append_racing_on_fresh_actors_never_both_succeed(
    store: Arc<dyn Store>,
) {
    for round in 0..60 {
        let a = id(&format!("race-{round}"));
        let (s1, s2, a1, a2) = (store.clone(), store.clone(), a.clone(), a.clone());
        let plain = tokio::spawn(async move { s1.append(&a1, 1, &entries(1, 1)).await });
        let turn = tokio::spawn(async move {
            let mine = entries(1, 2);
            s2.commit_turn(Turn::append(&a2, 1, &mine)).await
        });
        let (plain, turn) = (plain.await.unwrap(), turn.await.unwrap());
        match (&plain, &turn) {
            (Ok(_), Err(StoreError::Conflict { .. })) => {
                assert_eq!(journal(&*store, &a).await, vec![1], "round {round}");
            }
            (Err(StoreError::Conflict { .. }), Ok(c)) => {
                assert_eq!(c.highest, 2, "round {round}");
                assert_eq!(journal(&*store, &a).await, vec![1, 2], "round {round}");
            }
            other => panic!(
                "round {round}: the append and the turn both wrote seq 1, or failed: {other:?}"
            ),
        }
        assert_eq!(
            store.highest_seq(&a).await.unwrap(),
            journal(&*store, &a).await.len() as Seq,
            "round {round}"
        );
    }
}

/// A message given up on has its key recorded with the failure; requeued, it runs again, so its
/// key is held again for it (a retry is a duplicate, never a second copy) until its new run
/// records the outcome.
async fn a_requeued_message_holds_its_key_again(store: Arc<dyn Store>) {
    let a = id("a");
    let key = IdempotencyKey::new("req").unwrap();
    let ttl = Duration::from_secs(60);
    let m = Envelope {
        idempotency_key: Some(key.clone()),
        ..Envelope::new(a.clone(), json!("work"))
    };
    store.enqueue_once(&m, None, &key, ttl).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    let failed = json!("failed");
    store
        .commit_turn(Turn {
            settle: Some(Settle::DeadLetter(&d.receipt, "broken")),
            record: Some(Record {
                actor: &a,
                key: &key,
                result: &failed,
                ttl,
            }),
            ..Turn::append(&a, 1, &[])
        })
        .await
        .unwrap();
    assert_eq!(
        store.lookup(&a, &key).await.unwrap(),
        Some(Reservation::Completed(failed))
    );
    let dead = store.dead_letters(None, 10).await.unwrap();
    store.requeue_dead_letter(dead[0].id).await.unwrap();
    assert_eq!(
        store.lookup(&a, &key).await.unwrap(),
        Some(Reservation::Pending {
            expires_at: Timestamp::MAX
        })
    );
    let retry = Envelope {
        idempotency_key: Some(key.clone()),
        ..Envelope::new(a.clone(), json!("work"))
    };
    assert!(matches!(
        store.enqueue_once(&retry, None, &key, ttl).await.unwrap(),
        Enqueued::Duplicate(Reservation::Pending { .. })
    ));
    assert_eq!(store.pending(&a).await.unwrap(), 1);
    let d = store
        .lease(&a, long())
        .await
        .unwrap()
        .expect("the requeued run");
    assert_eq!(d.envelope.idempotency_key, Some(key.clone()));
    let done = json!("done");
    store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&d.receipt)),
            record: Some(Record {
                actor: &a,
                key: &key,
                result: &done,
                ttl,
            }),
            ..Turn::append(&a, 1, &entries(1, 1))
        })
        .await
        .unwrap();
    assert_eq!(
        store.lookup(&a, &key).await.unwrap(),
        Some(Reservation::Completed(done))
    );
}

async fn retire_deletes_the_journal_keeps_its_seq_and_acks_the_message(store: Arc<dyn Store>) {
    let a = id("a");
    store.append(&a, 1, &entries(1, 3)).await.unwrap();
    store
        .save_snapshot(&a, &Snapshot::new(2, json!({ "n": 2 })), 2)
        .await
        .unwrap();
    let retire = Envelope::new(a.clone(), json!("retire"));
    store.enqueue(&retire, None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    let lease = store
        .acquire(&a, "node-1", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        store.retire(&d.receipt, &lease, 3).await.unwrap(),
        Retired::Deleted
    );
    let info = store.info(&a).await.unwrap();
    assert_eq!(
        (info.highest, info.trimmed_through, info.snapshots.len()),
        (3, 3, 0),
        "the journal's seq is kept, its entries and snapshots gone"
    );
    assert!(journal(&*store, &a).await.is_empty());
    assert!(store.load_snapshot(&a, 2).await.unwrap().is_none());
    assert_eq!(
        store.pending(&a).await.unwrap(),
        0,
        "the message was not acked"
    );
    // A later incarnation goes on at the next seq.
    assert!(matches!(
        store.append(&a, 1, &entries(1, 1)).await,
        Err(StoreError::Conflict { .. })
    ));
    store.append(&a, 4, &entries(4, 4)).await.unwrap();
    assert_eq!(journal(&*store, &a).await, vec![4]);
}

async fn retire_writes_nothing_when_the_actor_ran_has_mail_lost_its_lease_or_moved_on(
    store: Arc<dyn Store>,
) {
    let a = id("a");
    store.append(&a, 1, &entries(1, 3)).await.unwrap();
    store
        .enqueue(&Envelope::new(a.clone(), json!("retire")), None)
        .await
        .unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    let lease = store
        .acquire(&a, "node-1", Duration::from_secs(60))
        .await
        .unwrap();
    // The actor ran since the retirement was decided.
    assert_eq!(
        store.retire(&d.receipt, &lease, 2).await.unwrap(),
        Retired::Moved
    );
    // A message waits behind (here a delayed one: it counts as well).
    let later = Envelope::new(a.clone(), json!("later"));
    store
        .enqueue(&later, Some(Timestamp::now() + Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(
        store.retire(&d.receipt, &lease, 3).await.unwrap(),
        Retired::Busy
    );
    // A fence that is not the actor's lease.
    let forged = loom_core::Lease {
        token: lease.token + 1,
        ..lease.clone()
    };
    assert!(matches!(
        store.retire(&d.receipt, &forged, 3).await,
        Err(StoreError::LeaseLost { .. })
    ));
    // Nothing was written by any of them.
    assert_eq!(journal(&*store, &a).await, vec![1, 2, 3]);
    assert_eq!(store.pending(&a).await.unwrap(), 2);
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "still out"
    );
    // A receipt of an earlier delivery.
    let b = id("b");
    store.append(&b, 1, &entries(1, 1)).await.unwrap();
    store
        .enqueue(&Envelope::new(b.clone(), json!("retire")), None)
        .await
        .unwrap();
    let short = LeaseOptions {
        visibility: Duration::from_millis(50),
        max_deliveries: 5,
        ..LeaseOptions::default()
    };
    let first = store.lease(&b, short).await.unwrap().expect("delivery");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let again = store.lease(&b, long()).await.unwrap().expect("redelivered");
    let lease_b = store
        .acquire(&b, "node-1", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(
        store.retire(&first.receipt, &lease_b, 1).await,
        Err(StoreError::StaleReceipt { .. })
    ));
    assert_eq!(journal(&*store, &b).await, vec![1]);
    assert_eq!(
        store.retire(&again.receipt, &lease_b, 1).await.unwrap(),
        Retired::Deleted
    );
}
