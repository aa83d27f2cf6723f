//! [`JournalStore`] cases: the Akka persistence TCK's journal and snapshot rules, plus Loom's
//! conditional append, limits and concurrency rules.

use std::collections::HashSet;
use std::sync::Arc;

use futures::TryStreamExt;
use loom_core::limits::{MAX_BATCH_ENTRIES, MAX_ENTRY_BYTES, MAX_SNAPSHOT_BYTES};
use loom_core::{
    ActorId, Entry, EntryKind, IdError, IdempotencyKey, Limit, MessageId, Seq, SeqRange, Snapshot,
    Store, StoreError, Timestamp,
};
use serde_json::{Value, json};

use super::{Case, cases};

pub(super) fn cases() -> Vec<Case> {
    cases![
        unknown_actor_has_highest_zero_and_no_entries,
        every_entry_kind_round_trips,
        large_entries_and_snapshots_round_trip_compressed_or_not,
        replay_all,
        replay_from,
        replay_to,
        replay_from_to,
        replay_from_equal_to_to,
        replay_with_max,
        replay_from_to_max_combinations,
        replay_with_max_zero_returns_nothing,
        replay_from_greater_than_to_returns_nothing,
        replay_from_beyond_highest_returns_nothing,
        replay_to_beyond_highest_stops_at_highest,
        stale_expected_next_is_a_conflict_and_writes_nothing,
        expected_next_ahead_is_a_conflict_and_writes_nothing,
        first_append_must_expect_seq_one,
        batch_numbered_out_of_order_is_refused,
        batch_is_atomic_when_one_entry_is_too_large,
        empty_batch_checks_the_condition_and_writes_nothing,
        entry_at_the_size_limit_is_accepted_and_over_it_refused,
        entry_of_1_mib_round_trips,
        batch_over_the_entry_count_limit_is_refused,
        malformed_actor_ids_are_refused_with_typed_errors,
        highest_not_reset_by_trim,
        highest_not_reset_by_delete_and_seqs_never_reused,
        trimmed_range_is_not_replayed,
        read_across_the_trim_point,
        deleted_journal_is_not_replayed_and_its_snapshots_are_gone,
        trim_refused_without_snapshot,
        trim_refused_past_the_oldest_kept_snapshot,
        trim_to_the_oldest_snapshot_and_again_is_a_no_op,
        reads_stay_gapless_while_another_task_appends,
        eight_tasks_racing_on_one_actor_write_each_seq_once,
        concurrent_appends_to_many_actors_stay_isolated,
        list_actors_pages_in_id_order,
        long_journal_streams_in_order,
        info_reports_highest_trim_and_snapshots,
        no_snapshot_for_unknown_actor,
        load_latest_snapshot,
        snapshot_selection_by_seq,
        snapshot_at_existing_seq_overwrites,
        keep_k_keeps_the_newest_snapshots,
        snapshot_of_1_mib_is_accepted,
        snapshot_above_highest_is_refused,
        snapshot_below_trim_point_is_refused,
        snapshot_over_the_size_limit_is_refused,
        snapshot_keep_zero_is_refused,
        begin_at_starts_an_empty_journal_after_a_trim_point,
        begin_at_is_refused_on_a_journal_that_exists,
        strict_read_fails_when_its_start_was_trimmed,
        compact_saves_and_trims_in_one_write,
        compact_fenced_by_a_lost_lease_changes_nothing,
        delete_fenced_by_a_partition_lease_no_longer_held_deletes_nothing,
        no_snapshot_brings_a_deleted_journal_back,
    ]
}

fn id(key: &str) -> ActorId {
    ActorId::new("conf", key).expect("valid id")
}

fn entry(seq: Seq) -> Entry {
    Entry::new(
        seq,
        EntryKind::Completed {
            reply: json!({ "n": seq }),
        },
    )
}

fn entries(from: Seq, to: Seq) -> Vec<Entry> {
    (from..=to).map(entry).collect()
}

async fn fill(store: &dyn Store, actor: &ActorId, n: Seq) {
    store
        .append(actor, 1, &entries(1, n))
        .await
        .expect("fill journal");
}

async fn seqs(store: &dyn Store, actor: &ActorId, range: SeqRange) -> Vec<Seq> {
    let got: Vec<Entry> = store.read(actor, range).try_collect().await.expect("read");
    got.into_iter().map(|e| e.seq).collect()
}

async fn all_seqs(store: &dyn Store, actor: &ActorId) -> Vec<Seq> {
    seqs(store, actor, SeqRange::all()).await
}

/// Asserts that two values are equal without printing them (they may be megabytes).
fn assert_same<T: PartialEq>(got: &T, want: &T, what: &str) {
    assert!(
        got == want,
        "{what}: read back differs from what was written"
    );
}

fn span(from: Seq, to: Seq) -> Vec<Seq> {
    (from..=to).collect()
}

fn snap(seq: Seq) -> Snapshot {
    Snapshot::new(seq, json!({ "at": seq }))
}

/// An entry whose encoded frame is exactly `size` bytes.
fn entry_of_size(seq: Seq, size: usize) -> Entry {
    let make = |pad: usize| {
        let mut e = Entry::new(
            seq,
            EntryKind::Completed {
                reply: Value::String("x".repeat(pad)),
            },
        );
        e.at = Timestamp::from_millis(1_700_000_000_000);
        e
    };
    // Sizes as limits count them: the frame with its body uncompressed (`codec`).
    let plain = |e: &Entry| {
        loom_core::codec::encode(loom_core::codec::RecordType::Entry, e)
            .expect("encode")
            .len()
    };
    let overhead = plain(&make(0));
    let e = make(size - overhead);
    assert_eq!(plain(&e), size);
    e
}

async fn unknown_actor_has_highest_zero_and_no_entries(store: Arc<dyn Store>) {
    let a = id("nobody");
    assert_eq!(store.highest_seq(&a).await.unwrap(), 0);
    assert!(all_seqs(&*store, &a).await.is_empty());
    let info = store.info(&a).await.unwrap();
    assert_eq!(
        (info.highest, info.trimmed_through, info.snapshots.len()),
        (0, 0, 0)
    );
}

async fn every_entry_kind_round_trips(store: Arc<dyn Store>) {
    let a = id("kinds");
    let mid = MessageId::new();
    let kinds = vec![
        EntryKind::Invoked {
            message_id: mid,
            payload: json!({"Deposit": 100, "nested": [1, {"a": null}], "unicode": "żółw 🐢"}),
            idempotency_key: Some(IdempotencyKey::new("k-1").unwrap()),
            requeued_from: None,
        },
        EntryKind::Invoked {
            message_id: MessageId::new(),
            payload: json!(null),
            idempotency_key: None,
            requeued_from: Some(mid),
        },
        EntryKind::StatePatched {
            patch: serde_json::from_value(
                json!([{"op": "replace", "path": "/balance", "value": 100}]),
            )
            .unwrap(),
        },
        EntryKind::StatePatched {
            patch: serde_json::from_value(
                json!([{"op": "replace", "path": "", "value": {"v": 2}}]),
            )
            .unwrap(),
        },
        EntryKind::StateUpgraded {
            from: 2,
            to: 3,
            state: json!({"v": 3, "note": "upgraded"}),
        },
        EntryKind::ActivityStarted {
            step: 1,
            name: "charge-card".into(),
            input: json!({"amount": 5}),
        },
        EntryKind::ActivityCompleted {
            step: 1,
            output: json!("receipt-1"),
        },
        EntryKind::ActivityAttemptFailed {
            step: 2,
            attempt: 1,
            error: "connection reset".into(),
            retry_at: Timestamp::from_millis(1_800_000_000_456),
        },
        EntryKind::ActivityRetried {
            step: 2,
            attempt: 2,
            resumed_in: Some(1),
        },
        EntryKind::ActivityFailed {
            step: 2,
            error: "card declined".into(),
            value: Some(json!({"code": 51})),
        },
        EntryKind::ActivityFailed {
            step: 9,
            error: "no value".into(),
            value: None,
        },
        EntryKind::MessageSent {
            step: 3,
            to: id("bob"),
            message_id: MessageId::derived(&mid, "3"),
        },
        EntryKind::ChildSpawned {
            step: 4,
            child: id("child"),
            input: json!([1, 2]),
        },
        EntryKind::TimerStarted {
            step: 5,
            fire_at: Timestamp::from_millis(1_800_000_000_123),
        },
        EntryKind::TimerFired {
            step: 5,
            resumed_in: Some(3),
        },
        EntryKind::EventAwaited {
            step: 6,
            name: "approved".into(),
            deadline: None,
        },
        EntryKind::EventReceived {
            step: 6,
            name: "approved".into(),
            data: json!({"by": "ops"}),
            timed_out: false,
            resumed_in: None,
        },
        EntryKind::EventAwaited {
            step: 7,
            name: "paid".into(),
            deadline: Some(Timestamp::from_millis(1_800_000_000_000)),
        },
        EntryKind::EventReceived {
            step: 7,
            name: "paid".into(),
            data: json!(null),
            timed_out: true,
            resumed_in: Some(2),
        },
        EntryKind::Recorded {
            step: 8,
            name: "uuid".into(),
            value: json!("3a051813-2711-45fb-a3ae-8ff1939d8a47"),
        },
        EntryKind::Completed { reply: json!(42) },
        EntryKind::Failed {
            error: "boom".into(),
            dead_lettered: true,
        },
    ];
    let written: Vec<Entry> = kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| Entry::new(i as Seq + 1, kind))
        .collect();
    let highest = store.append(&a, 1, &written).await.unwrap();
    assert_eq!(highest, written.len() as Seq);
    let read: Vec<Entry> = store.read(&a, SeqRange::all()).try_collect().await.unwrap();
    assert_eq!(read, written);
}

/// Entries and snapshots above `codec::COMPRESS_ABOVE` are stored compressed (a repetitive
/// document shrinks much, pseudo-random text little): a store gives back exactly what was
/// written, in entries read in a range and in snapshots loaded by seq.
async fn large_entries_and_snapshots_round_trip_compressed_or_not(store: Arc<dyn Store>) {
    let a = id("large");
    let rows: Vec<Value> = (0..3000)
        .map(
            |i| json!({"order": i, "customer": format!("customer-{}", i % 97), "paid": i % 3 == 0}),
        )
        .collect();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noise: String = (0..40_000)
        .map(|_| {
            // xorshift64: text with no repeats for zstd to find.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 90) as u8)
        })
        .collect();
    let entries = vec![
        Entry::new(1, EntryKind::Completed { reply: json!(rows) }),
        Entry::new(
            2,
            EntryKind::Completed {
                reply: json!(noise),
            },
        ),
        Entry::new(
            3,
            EntryKind::Completed {
                reply: json!("small"),
            },
        ),
    ];
    for e in &entries[..2] {
        let plain = loom_core::codec::encode(loom_core::codec::RecordType::Entry, e).unwrap();
        assert!(plain.len() > loom_core::codec::COMPRESS_ABOVE);
    }
    store.append(&a, 1, &entries).await.unwrap();
    let read: Vec<Entry> = store.read(&a, SeqRange::all()).try_collect().await.unwrap();
    assert_eq!(read, entries);
    let read: Vec<Entry> = store
        .read(&a, SeqRange::all().from(2).to(2))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(read, entries[1..2]);
    let snap = Snapshot::new(3, json!({"orders": rows, "noise": noise}));
    store.save_snapshot(&a, &snap, 2).await.unwrap();
    assert_eq!(store.load_snapshot(&a, 3).await.unwrap(), Some(snap));
}

async fn replay_all(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    assert_eq!(all_seqs(&*store, &a).await, span(1, 10));
}

async fn replay_from(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().from(4)).await,
        span(4, 10)
    );
}

async fn replay_to(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    assert_eq!(seqs(&*store, &a, SeqRange::all().to(3)).await, span(1, 3));
}

async fn replay_from_to(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().from(3).to(7)).await,
        span(3, 7)
    );
}

async fn replay_from_equal_to_to(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().from(5).to(5)).await,
        vec![5]
    );
}

async fn replay_with_max(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    assert_eq!(seqs(&*store, &a, SeqRange::all().max(3)).await, span(1, 3));
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().max(100)).await,
        span(1, 10)
    );
}

async fn replay_from_to_max_combinations(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().from(2).to(7).max(3)).await,
        span(2, 4)
    );
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().from(2).to(4).max(10)).await,
        span(2, 4)
    );
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().from(9).max(5)).await,
        span(9, 10)
    );
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().to(4).max(1)).await,
        vec![1]
    );
}

async fn replay_with_max_zero_returns_nothing(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    assert!(seqs(&*store, &a, SeqRange::all().max(0)).await.is_empty());
}

async fn replay_from_greater_than_to_returns_nothing(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    assert!(
        seqs(&*store, &a, SeqRange::all().from(6).to(5))
            .await
            .is_empty()
    );
}

async fn replay_from_beyond_highest_returns_nothing(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    assert!(seqs(&*store, &a, SeqRange::all().from(11)).await.is_empty());
}

async fn replay_to_beyond_highest_stops_at_highest(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().from(8).to(1000)).await,
        span(8, 10)
    );
}

async fn stale_expected_next_is_a_conflict_and_writes_nothing(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 5).await;
    let err = store.append(&a, 3, &entries(3, 4)).await.unwrap_err();
    match err {
        StoreError::Conflict {
            actor,
            expected,
            actual,
        } => {
            assert_eq!((actor, expected, actual), (a.clone(), 3, 6));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.highest_seq(&a).await.unwrap(), 5);
    let read: Vec<Entry> = store.read(&a, SeqRange::all()).try_collect().await.unwrap();
    assert_eq!(read.iter().map(|e| e.seq).collect::<Vec<_>>(), span(1, 5));
    assert_eq!(read[2].kind, entry(3).kind, "seq 3 was overwritten");
}

async fn expected_next_ahead_is_a_conflict_and_writes_nothing(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 5).await;
    let err = store.append(&a, 7, &entries(7, 7)).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 7,
                actual: 6,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(store.highest_seq(&a).await.unwrap(), 5);
    assert_eq!(all_seqs(&*store, &a).await, span(1, 5));
}

async fn first_append_must_expect_seq_one(store: Arc<dyn Store>) {
    let a = id("a");
    let err = store.append(&a, 2, &entries(2, 2)).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 2,
                actual: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(store.highest_seq(&a).await.unwrap(), 0);
    let err = store.append(&a, 0, &[]).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err:?}");
}

async fn batch_numbered_out_of_order_is_refused(store: Arc<dyn Store>) {
    let a = id("a");
    let batch = vec![entry(1), entry(3)];
    let err = store.append(&a, 1, &batch).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::BatchOutOfOrder {
                index: 1,
                found: 3,
                expected: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(store.highest_seq(&a).await.unwrap(), 0);
}

async fn batch_is_atomic_when_one_entry_is_too_large(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 2).await;
    let batch = vec![entry(3), entry_of_size(4, MAX_ENTRY_BYTES + 1), entry(5)];
    let err = store.append(&a, 3, &batch).await.unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { limit_kind: Limit::EntryBytes, size, limit, .. } if size == MAX_ENTRY_BYTES + 1 && limit == MAX_ENTRY_BYTES),
        "{err:?}"
    );
    assert_eq!(store.highest_seq(&a).await.unwrap(), 2);
    assert_eq!(all_seqs(&*store, &a).await, span(1, 2));
}

async fn empty_batch_checks_the_condition_and_writes_nothing(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 3).await;
    assert_eq!(store.append(&a, 4, &[]).await.unwrap(), 3);
    assert!(matches!(
        store.append(&a, 2, &[]).await.unwrap_err(),
        StoreError::Conflict { .. }
    ));
    assert_eq!(store.highest_seq(&a).await.unwrap(), 3);
}

async fn entry_at_the_size_limit_is_accepted_and_over_it_refused(store: Arc<dyn Store>) {
    let a = id("a");
    let at_limit = entry_of_size(1, MAX_ENTRY_BYTES);
    store
        .append(&a, 1, std::slice::from_ref(&at_limit))
        .await
        .unwrap();
    let err = store
        .append(&a, 2, &[entry_of_size(2, MAX_ENTRY_BYTES + 1)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TooLarge {
                limit_kind: Limit::EntryBytes,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(store.highest_seq(&a).await.unwrap(), 1);
    let read: Vec<Entry> = store.read(&a, SeqRange::all()).try_collect().await.unwrap();
    assert_same(&read, &vec![at_limit], "entry at the size limit");
}

async fn entry_of_1_mib_round_trips(store: Arc<dyn Store>) {
    let a = id("a");
    let written = vec![entry_of_size(1, 1024 * 1024), entry(2)];
    store.append(&a, 1, &written).await.unwrap();
    let read: Vec<Entry> = store.read(&a, SeqRange::all()).try_collect().await.unwrap();
    assert_same(&read, &written, "1 MiB entry");
}

async fn batch_over_the_entry_count_limit_is_refused(store: Arc<dyn Store>) {
    let a = id("a");
    let batch = entries(1, MAX_BATCH_ENTRIES as Seq + 1);
    let err = store.append(&a, 1, &batch).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TooLarge {
                limit_kind: Limit::BatchEntries,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(store.highest_seq(&a).await.unwrap(), 0);
}

async fn malformed_actor_ids_are_refused_with_typed_errors(store: Arc<dyn Store>) {
    // A store can only be handed a checked id: the malformed ones fail where they are built, with a
    // typed error, and the store is never touched.
    assert_eq!("/alice".parse::<ActorId>(), Err(IdError::EmptyKind));
    assert_eq!("account/".parse::<ActorId>(), Err(IdError::EmptyKey));
    assert!(matches!(
        "account".parse::<ActorId>(),
        Err(IdError::MissingSlash(_))
    ));
    assert!(matches!(
        "acc ount/x".parse::<ActorId>(),
        Err(IdError::BadKindChar { .. })
    ));
    assert!(matches!(
        format!("a/{}", "k".repeat(loom_core::limits::MAX_KEY_LEN + 1)).parse::<ActorId>(),
        Err(IdError::KeyTooLong { .. })
    ));
    let from_json = serde_json::from_value::<ActorId>(json!("no-slash"));
    assert!(from_json.is_err());
    let err: StoreError = IdError::EmptyKind.into();
    assert!(matches!(err, StoreError::InvalidId(IdError::EmptyKind)));
    assert!(store.list_actors(None, 10).await.unwrap().is_empty());
}

async fn highest_not_reset_by_trim(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    store.save_snapshot(&a, &snap(10), 2).await.unwrap();
    store.trim(&a, 10).await.unwrap();
    assert_eq!(store.highest_seq(&a).await.unwrap(), 10);
    assert!(all_seqs(&*store, &a).await.is_empty());
    store.append(&a, 11, &entries(11, 12)).await.unwrap();
    assert_eq!(all_seqs(&*store, &a).await, span(11, 12));
}

async fn highest_not_reset_by_delete_and_seqs_never_reused(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    store.delete(&a, None).await.unwrap();
    assert_eq!(store.highest_seq(&a).await.unwrap(), 10);
    assert!(matches!(
        store.append(&a, 1, &entries(1, 1)).await.unwrap_err(),
        StoreError::Conflict { actual: 11, .. }
    ));
    store.append(&a, 11, &entries(11, 11)).await.unwrap();
    assert_eq!(all_seqs(&*store, &a).await, vec![11]);
    store.delete(&a, None).await.unwrap();
    store.delete(&a, None).await.unwrap();
    assert_eq!(store.highest_seq(&a).await.unwrap(), 11);
}

async fn trimmed_range_is_not_replayed(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    store.save_snapshot(&a, &snap(4), 2).await.unwrap();
    store.trim(&a, 4).await.unwrap();
    assert_eq!(all_seqs(&*store, &a).await, span(5, 10));
    assert!(seqs(&*store, &a, SeqRange::all().to(4)).await.is_empty());
}

async fn read_across_the_trim_point(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    store.save_snapshot(&a, &snap(5), 2).await.unwrap();
    store.trim(&a, 5).await.unwrap();
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().from(3).to(8)).await,
        span(6, 8)
    );
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().from(2).max(2)).await,
        span(6, 7)
    );
}

async fn deleted_journal_is_not_replayed_and_its_snapshots_are_gone(store: Arc<dyn Store>) {
    let a = id("a");
    let b = id("b");
    fill(&*store, &a, 5).await;
    fill(&*store, &b, 5).await;
    store.save_snapshot(&a, &snap(3), 2).await.unwrap();
    store.delete(&a, None).await.unwrap();
    assert!(all_seqs(&*store, &a).await.is_empty());
    assert!(store.load_snapshot(&a, Seq::MAX).await.unwrap().is_none());
    let info = store.info(&a).await.unwrap();
    assert_eq!((info.highest, info.trimmed_through), (5, 5));
    assert!(info.snapshots.is_empty());
    assert_eq!(
        all_seqs(&*store, &b).await,
        span(1, 5),
        "another actor was touched"
    );
}

async fn trim_refused_without_snapshot(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    let err = store.trim(&a, 5).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TrimRefused {
                through: 5,
                oldest_snapshot: None,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(all_seqs(&*store, &a).await, span(1, 10));
}

async fn trim_refused_past_the_oldest_kept_snapshot(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    store.save_snapshot(&a, &snap(4), 3).await.unwrap();
    store.save_snapshot(&a, &snap(8), 3).await.unwrap();
    let err = store.trim(&a, 5).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TrimRefused {
                through: 5,
                oldest_snapshot: Some(4),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(all_seqs(&*store, &a).await, span(1, 10));
}

async fn trim_to_the_oldest_snapshot_and_again_is_a_no_op(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    store.save_snapshot(&a, &snap(6), 2).await.unwrap();
    store.trim(&a, 6).await.unwrap();
    store.trim(&a, 6).await.unwrap();
    store.trim(&a, 2).await.unwrap();
    assert_eq!(all_seqs(&*store, &a).await, span(7, 10));
    assert_eq!(store.info(&a).await.unwrap().trimmed_through, 6);
}

async fn reads_stay_gapless_while_another_task_appends(store: Arc<dyn Store>) {
    let a = id("a");
    let total: Seq = 2000;
    let writer = {
        let store = store.clone();
        let a = a.clone();
        tokio::spawn(async move {
            let mut next = 1;
            while next <= total {
                let to = (next + 24).min(total);
                store
                    .append(&a, next, &entries(next, to))
                    .await
                    .expect("append");
                next = to + 1;
            }
        })
    };
    let mut reads = 0;
    loop {
        let got = all_seqs(&*store, &a).await;
        assert_eq!(
            got,
            span(1, got.len() as Seq),
            "a read saw a gap or disorder"
        );
        reads += 1;
        if got.len() as Seq == total {
            break;
        }
        tokio::task::yield_now().await;
    }
    writer.await.expect("writer");
    assert!(reads >= 1);
}

async fn eight_tasks_racing_on_one_actor_write_each_seq_once(store: Arc<dyn Store>) {
    let a = id("contended");
    let per_task = 25usize;
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let store = store.clone();
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            while won.len() < per_task {
                let next = store.highest_seq(&a).await.expect("highest") + 1;
                let mut e = entry(next);
                e.kind = EntryKind::Completed {
                    reply: json!({ "task": t, "i": won.len() }),
                };
                match store.append(&a, next, &[e]).await {
                    Ok(_) => won.push(next),
                    Err(StoreError::Conflict { .. }) => tokio::task::yield_now().await,
                    Err(other) => panic!("unexpected error {other:?}"),
                }
            }
            won
        }));
    }
    let mut claimed = HashSet::new();
    for t in tasks {
        for seq in t.await.expect("task") {
            assert!(
                claimed.insert(seq),
                "seq {seq} was acknowledged to two writers"
            );
        }
    }
    let total = 8 * per_task as Seq;
    assert_eq!(claimed.len() as Seq, total);
    let read: Vec<Entry> = store.read(&a, SeqRange::all()).try_collect().await.unwrap();
    assert_eq!(
        read.iter().map(|e| e.seq).collect::<Vec<_>>(),
        span(1, total)
    );
    let distinct: HashSet<String> = read
        .iter()
        .map(|e| match &e.kind {
            EntryKind::Completed { reply } => reply.to_string(),
            other => panic!("unexpected entry {other:?}"),
        })
        .collect();
    assert_eq!(distinct.len() as Seq, total, "an entry was written twice");
}

async fn concurrent_appends_to_many_actors_stay_isolated(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for n in 0..40 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let a = id(&format!("many-{n}"));
            for seq in 1..=15 {
                let mut e = entry(seq);
                e.kind = EntryKind::Completed {
                    reply: json!({"actor": n, "seq": seq}),
                };
                store.append(&a, seq, &[e]).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    for n in 0..40 {
        let a = id(&format!("many-{n}"));
        let read: Vec<Entry> = store.read(&a, SeqRange::all()).try_collect().await.unwrap();
        assert_eq!(read.len(), 15);
        for e in read {
            assert_eq!(
                e.kind,
                EntryKind::Completed {
                    reply: json!({"actor": n, "seq": e.seq})
                }
            );
        }
    }
}

async fn list_actors_pages_in_id_order(store: Arc<dyn Store>) {
    let mut want: Vec<ActorId> = (0..25).map(|n| id(&format!("l{n:02}"))).collect();
    for a in &want {
        store.append(a, 1, &entries(1, 1)).await.unwrap();
    }
    want.sort();
    let mut got = Vec::new();
    let mut after: Option<ActorId> = None;
    loop {
        let page = store.list_actors(after.as_ref(), 10).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 10);
        after = page.last().cloned();
        got.extend(page);
    }
    assert_eq!(got, want);
}

async fn long_journal_streams_in_order(store: Arc<dyn Store>) {
    let a = id("long");
    let total: Seq = 20_000;
    let mut next = 1;
    while next <= total {
        let to = (next + 1999).min(total);
        store.append(&a, next, &entries(next, to)).await.unwrap();
        next = to + 1;
    }
    let mut stream = store.read(&a, SeqRange::all());
    let mut expect = 1;
    while let Some(e) = stream.try_next().await.unwrap() {
        assert_eq!(e.seq, expect);
        expect += 1;
    }
    assert_eq!(expect, total + 1);
}

async fn info_reports_highest_trim_and_snapshots(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 9).await;
    store.save_snapshot(&a, &snap(3), 2).await.unwrap();
    store.save_snapshot(&a, &snap(6), 2).await.unwrap();
    store.trim(&a, 3).await.unwrap();
    let info = store.info(&a).await.unwrap();
    assert_eq!(info.highest, 9);
    assert_eq!(info.trimmed_through, 3);
    assert_eq!(info.snapshots, vec![3, 6]);
    assert_eq!(info.len(), 6);
}

async fn no_snapshot_for_unknown_actor(store: Arc<dyn Store>) {
    assert!(
        store
            .load_snapshot(&id("nobody"), Seq::MAX)
            .await
            .unwrap()
            .is_none()
    );
}

async fn load_latest_snapshot(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    let s = Snapshot {
        seq: 7,
        state: json!({"balance": 70, "log": ["a", "b"]}),
        at: Timestamp::from_millis(1_700_000_000_007),
        format: 3,
    };
    store.save_snapshot(&a, &snap(5), 3).await.unwrap();
    store.save_snapshot(&a, &s, 3).await.unwrap();
    assert_eq!(store.load_snapshot(&a, Seq::MAX).await.unwrap(), Some(s));
}

async fn snapshot_selection_by_seq(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    for s in [3, 6, 9] {
        store.save_snapshot(&a, &snap(s), 5).await.unwrap();
    }
    let at = |n: Seq| {
        let store = store.clone();
        let a = a.clone();
        async move { store.load_snapshot(&a, n).await.unwrap().map(|s| s.seq) }
    };
    assert_eq!(at(2).await, None);
    assert_eq!(at(3).await, Some(3));
    assert_eq!(at(5).await, Some(3));
    assert_eq!(at(7).await, Some(6));
    assert_eq!(at(9).await, Some(9));
    assert_eq!(at(Seq::MAX).await, Some(9));
}

async fn snapshot_at_existing_seq_overwrites(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 5).await;
    store
        .save_snapshot(&a, &Snapshot::new(5, json!("old")), 2)
        .await
        .unwrap();
    store
        .save_snapshot(&a, &Snapshot::new(5, json!("new")), 2)
        .await
        .unwrap();
    let got = store.load_snapshot(&a, Seq::MAX).await.unwrap().unwrap();
    assert_eq!(got.state, json!("new"));
    assert_eq!(store.info(&a).await.unwrap().snapshots, vec![5]);
}

async fn keep_k_keeps_the_newest_snapshots(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    for s in [2, 4, 6, 8] {
        store.save_snapshot(&a, &snap(s), 2).await.unwrap();
    }
    assert_eq!(store.info(&a).await.unwrap().snapshots, vec![6, 8]);
    store.save_snapshot(&a, &snap(10), 1).await.unwrap();
    assert_eq!(store.info(&a).await.unwrap().snapshots, vec![10]);
    assert!(store.load_snapshot(&a, 9).await.unwrap().is_none());
}

async fn snapshot_of_1_mib_is_accepted(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 1).await;
    let s = Snapshot::new(1, json!({ "blob": "s".repeat(1024 * 1024) }));
    store.save_snapshot(&a, &s, 2).await.unwrap();
    assert_same(
        &store.load_snapshot(&a, Seq::MAX).await.unwrap(),
        &Some(s),
        "1 MiB snapshot",
    );
}

async fn snapshot_above_highest_is_refused(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 3).await;
    let err = store.save_snapshot(&a, &snap(4), 2).await.unwrap_err();
    assert!(
        matches!(err, StoreError::SnapshotRefused { seq: 4, .. }),
        "{err:?}"
    );
    let err = store.save_snapshot(&a, &snap(0), 2).await.unwrap_err();
    assert!(
        matches!(err, StoreError::SnapshotRefused { seq: 0, .. }),
        "{err:?}"
    );
    assert!(store.info(&a).await.unwrap().snapshots.is_empty());
}

async fn snapshot_below_trim_point_is_refused(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    store.save_snapshot(&a, &snap(6), 2).await.unwrap();
    store.trim(&a, 6).await.unwrap();
    let err = store.save_snapshot(&a, &snap(5), 2).await.unwrap_err();
    assert!(
        matches!(err, StoreError::SnapshotRefused { seq: 5, .. }),
        "{err:?}"
    );
    store.save_snapshot(&a, &snap(6), 2).await.unwrap();
    assert_eq!(store.info(&a).await.unwrap().snapshots, vec![6]);
}

async fn snapshot_over_the_size_limit_is_refused(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 1).await;
    let s = Snapshot::new(1, json!("z".repeat(MAX_SNAPSHOT_BYTES)));
    let err = store.save_snapshot(&a, &s, 2).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TooLarge {
                limit_kind: Limit::SnapshotBytes,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(store.load_snapshot(&a, Seq::MAX).await.unwrap().is_none());
}

async fn snapshot_keep_zero_is_refused(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 1).await;
    let err = store.save_snapshot(&a, &snap(1), 0).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err:?}");
    assert!(store.info(&a).await.unwrap().snapshots.is_empty());
}

async fn begin_at_starts_an_empty_journal_after_a_trim_point(store: Arc<dyn Store>) {
    let a = id("copied");
    store.begin_at(&a, 40).await.unwrap();
    let info = store.info(&a).await.unwrap();
    assert_eq!((info.highest, info.trimmed_through), (40, 40));
    assert!(matches!(
        store.append(&a, 1, &entries(1, 1)).await,
        Err(StoreError::Conflict { actual: 41, .. })
    ));
    store.save_snapshot(&a, &snap(40), 2).await.unwrap();
    store.append(&a, 41, &entries(41, 45)).await.unwrap();
    assert_eq!(all_seqs(&*store, &a).await, span(41, 45));
    assert_eq!(
        store
            .load_snapshot(&a, Seq::MAX)
            .await
            .unwrap()
            .map(|s| s.seq),
        Some(40)
    );
    assert!(store.list_actors(None, 10).await.unwrap().contains(&a));
    store.begin_at(&id("empty"), 0).await.unwrap();
    assert_eq!(store.highest_seq(&id("empty")).await.unwrap(), 0);
}

async fn begin_at_is_refused_on_a_journal_that_exists(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 3).await;
    let err = store.begin_at(&a, 10).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 1,
                actual: 4,
                ..
            }
        ),
        "{err:?}"
    );
    let info = store.info(&a).await.unwrap();
    assert_eq!((info.highest, info.trimmed_through), (3, 0));
}

async fn strict_read_fails_when_its_start_was_trimmed(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    // Untrimmed: a strict read is a plain read.
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().strict()).await,
        span(1, 10)
    );
    store.save_snapshot(&a, &snap(5), 2).await.unwrap();
    store.trim(&a, 5).await.unwrap();
    // A reader whose state covers ..3 cannot go on from 6: it must be told, not given 6...
    let err = store
        .read(&a, SeqRange::all().from(3).strict())
        .try_collect::<Vec<Entry>>()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Gap {
                expected: 3,
                found: 6,
                ..
            }
        ),
        "{err:?}"
    );
    let err = store
        .read(&a, SeqRange::all().from(5).strict())
        .try_collect::<Vec<Entry>>()
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Gap { .. }), "{err:?}");
    // ...while a reader whose state covers ..5 (the snapshot) reads on.
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().from(6).strict()).await,
        span(6, 10)
    );
    assert!(
        seqs(&*store, &a, SeqRange::all().from(11).strict())
            .await
            .is_empty()
    );
    // A plain read still starts at the first kept entry.
    assert_eq!(
        seqs(&*store, &a, SeqRange::all().from(3)).await,
        span(6, 10)
    );
    // A deleted journal: nothing to read strictly from anywhere it held.
    store.delete(&a, None).await.unwrap();
    let err = store
        .read(&a, SeqRange::all().from(6).strict())
        .try_collect::<Vec<Entry>>()
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Gap { .. }), "{err:?}");
}

async fn compact_saves_and_trims_in_one_write(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 10).await;
    assert_eq!(store.compact(&a, &snap(4), 2, None).await.unwrap(), 4);
    let info = store.info(&a).await.unwrap();
    assert_eq!((info.snapshots.clone(), info.trimmed_through), (vec![4], 4));
    // Keeping two: the trim stops at the older kept snapshot.
    assert_eq!(store.compact(&a, &snap(8), 2, None).await.unwrap(), 4);
    assert_eq!(store.compact(&a, &snap(10), 2, None).await.unwrap(), 8);
    let info = store.info(&a).await.unwrap();
    assert_eq!((info.snapshots, info.trimmed_through), (vec![8, 10], 8));
    assert_eq!(all_seqs(&*store, &a).await, span(9, 10));
    assert_eq!(
        store
            .load_snapshot(&a, Seq::MAX)
            .await
            .unwrap()
            .map(|s| s.seq),
        Some(10)
    );
    // Refused as save_snapshot would be, and then nothing changes.
    let err = store.compact(&a, &snap(11), 2, None).await.unwrap_err();
    assert!(matches!(err, StoreError::SnapshotRefused { .. }), "{err:?}");
    let err = store.compact(&a, &snap(3), 2, None).await.unwrap_err();
    assert!(matches!(err, StoreError::SnapshotRefused { .. }), "{err:?}");
    let info = store.info(&a).await.unwrap();
    assert_eq!((info.snapshots, info.trimmed_through), (vec![8, 10], 8));
}

async fn compact_fenced_by_a_lost_lease_changes_nothing(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 6).await;
    let ttl = std::time::Duration::from_millis(300);
    let old = store.acquire(&a, "old-node", ttl).await.unwrap();
    // Held: the compaction goes through.
    assert_eq!(store.compact(&a, &snap(2), 1, Some(&old)).await.unwrap(), 2);
    tokio::time::sleep(ttl + std::time::Duration::from_millis(150)).await;
    // Expired: refused, even with nobody else holding it.
    let err = store
        .compact(&a, &snap(4), 1, Some(&old))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err:?}");
    // Taken over: refused.
    let new = store
        .acquire(&a, "new-node", std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let err = store
        .compact(&a, &snap(6), 1, Some(&old))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err:?}");
    let info = store.info(&a).await.unwrap();
    assert_eq!((info.snapshots, info.trimmed_through), (vec![2], 2));
    assert_eq!(store.compact(&a, &snap(6), 1, Some(&new)).await.unwrap(), 6);
}

/// `loom journal delete` deletes under the lease of the actor's partition: held, the journal
/// goes; run out, taken by a node, or with another tool holding the actor's own lease, nothing
/// is deleted (rule D11). Before, the delete took no fence: one that reached the store late
/// emptied a journal a node had loaded meanwhile.
async fn delete_fenced_by_a_partition_lease_no_longer_held_deletes_nothing(store: Arc<dyn Store>) {
    use loom_core::partition::{ownership_partitions, partition_of};
    use std::time::Duration;
    let (a, b) = (id("a"), id("b"));
    fill(&*store, &a, 3).await;
    fill(&*store, &b, 3).await;
    let parts = ownership_partitions(store.partitions());
    let part = |x: &ActorId| ActorId::partition_lease(x.kind(), partition_of(x, parts));
    let (ttl, long) = (Duration::from_millis(300), Duration::from_secs(60));
    // Held: deleted.
    let held = store.acquire(&part(&b), "tool", long).await.unwrap();
    store.delete(&b, Some(&held)).await.unwrap();
    assert!(all_seqs(&*store, &b).await.is_empty());
    store.release(&held).await.unwrap();
    // Held, but another tool holds the actor's own lease: refused.
    let held = store.acquire(&part(&a), "tool", long).await.unwrap();
    let other = store.acquire(&a, "other-tool", long).await.unwrap();
    let err = store.delete(&a, Some(&held)).await.unwrap_err();
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err:?}");
    store.release(&other).await.unwrap();
    store.release(&held).await.unwrap();
    // Run out, with nobody else holding it: refused.
    let old = store.acquire(&part(&a), "tool", ttl).await.unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(150)).await;
    let err = store.delete(&a, Some(&old)).await.unwrap_err();
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err:?}");
    // Taken by a node since: refused.
    let node = store.acquire(&part(&a), "node", long).await.unwrap();
    let err = store.delete(&a, Some(&old)).await.unwrap_err();
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err:?}");
    assert_eq!(all_seqs(&*store, &a).await, span(1, 3));
    store.release(&node).await.unwrap();
}

async fn no_snapshot_brings_a_deleted_journal_back(store: Arc<dyn Store>) {
    let a = id("a");
    fill(&*store, &a, 5).await;
    store.save_snapshot(&a, &snap(3), 2).await.unwrap();
    store.delete(&a, None).await.unwrap();
    // A compaction that read the journal before the delete finishes after it: refused, at the
    // deletion point and below.
    for seq in [3, 5] {
        let err = store.save_snapshot(&a, &snap(seq), 2).await.unwrap_err();
        assert!(matches!(err, StoreError::SnapshotRefused { .. }), "{err:?}");
        let err = store.compact(&a, &snap(seq), 2, None).await.unwrap_err();
        assert!(matches!(err, StoreError::SnapshotRefused { .. }), "{err:?}");
    }
    assert!(store.load_snapshot(&a, Seq::MAX).await.unwrap().is_none());
    assert!(store.info(&a).await.unwrap().snapshots.is_empty());
    // The journal lives on above it.
    store.append(&a, 6, &[entry(6)]).await.unwrap();
    store.save_snapshot(&a, &snap(6), 2).await.unwrap();
    assert_eq!(store.info(&a).await.unwrap().snapshots, vec![6]);
}
