//! [`Mailbox`] cases: durable per-actor FIFO, leases with visibility timeouts, nacks, delays,
//! dead letters.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use loom_core::limits::MAX_MESSAGE_BYTES;
use loom_core::store::Suspension;
use loom_core::{
    ActorId, Enqueued, Envelope, IdempotencyKey, LeaseOptions, Limit, Receipt, Store, StoreError,
    Timestamp,
};
use serde_json::json;

use super::{Case, cases};

pub(super) fn cases() -> Vec<Case> {
    cases![
        enqueue_then_lease_in_fifo_order,
        mailboxes_lists_actors_whatever_their_idempotency_keys_hold,
        only_one_message_per_actor_is_out_at_a_time,
        ack_removes_the_message,
        expired_visibility_redelivers_with_a_higher_attempt,
        stale_receipt_is_refused_after_redelivery,
        nack_with_delay_keeps_the_head_and_the_order,
        delayed_message_waits_and_does_not_hold_up_others,
        due_messages_come_in_due_order_and_ties_in_the_order_sent,
        messages_due_centuries_ahead_or_never_wait_and_are_listed,
        dead_letter_after_max_deliveries_with_the_reason,
        explicit_dead_letter_keeps_the_reason,
        dead_letters_list_and_requeue,
        requeue_of_unknown_dead_letter_is_a_typed_error,
        purge_deletes_the_dead_letters_named_and_skips_the_rest,
        ready_actors_and_next_due_follow_the_mailboxes,
        mailboxes_are_isolated_per_actor,
        oversized_message_is_refused_and_nothing_enqueued,
        a_message_nested_too_deep_to_read_back_is_refused,
        pending_counts_every_waiting_message,
        positions_grow_and_are_never_reused,
        concurrent_leases_hand_a_message_out_once,
        bad_lease_options_are_refused,
        message_fields_round_trip,
        extend_keeps_a_message_out_longer,
        event_lanes_are_leased_directly_and_never_listed_as_ready,
        messages_lists_what_waits_and_mailboxes_lists_who_has_mail,
        messages_pages_in_position_order_whatever_order_they_are_handed_out,
        ready_actors_lists_only_the_kinds_asked_for,
        one_kinds_backlog_does_not_hide_another_kinds_ready_actors,
        ready_actors_in_looks_only_in_the_partitions_asked_for,
        backlog_counts_a_kinds_mailboxes_and_its_longest_wait,
        an_event_on_its_lane_wakes_a_suspended_message,
        suspending_is_refused_while_the_lane_holds_a_message,
        a_wake_up_leaves_a_message_handed_out_again_alone,
        suspend_refuses_a_stale_receipt_and_a_foreign_lane,
        a_suspended_sleep_is_woken_only_by_its_time_or_a_cancellation,
        cancel_wakes_a_message_suspended_on_a_lane_and_refuses_its_next_suspension,
        cancel_marks_a_waiting_message_which_keeps_the_mark_when_handed_out,
        cancel_of_a_message_not_in_the_mailbox_writes_nothing,
        cancel_leaves_a_message_that_is_out_out,
        a_suspended_message_goes_out_early_and_no_other_delay_does,
        a_suspended_message_buried_early_leaves_the_next_to_its_time,
    ]
}

fn id(key: &str) -> ActorId {
    ActorId::new("conf", key).expect("valid id")
}

fn msg(to: &ActorId, n: u64) -> Envelope {
    Envelope::new(to.clone(), json!({ "n": n }))
}

fn long() -> LeaseOptions {
    LeaseOptions {
        visibility: Duration::from_secs(60),
        max_deliveries: 5,
        ..LeaseOptions::default()
    }
}

fn short(max_deliveries: u32) -> LeaseOptions {
    LeaseOptions {
        visibility: Duration::from_millis(100),
        max_deliveries,
        ..LeaseOptions::default()
    }
}

/// Waits until a condition on time has surely passed (generous, so a slow machine stays green).
async fn wait_past(d: Duration) {
    tokio::time::sleep(d + Duration::from_millis(150)).await;
}

async fn take_and_ack(store: &dyn Store, actor: &ActorId) -> Option<u64> {
    let d = store.lease(actor, long()).await.unwrap()?;
    store.ack(&d.receipt).await.unwrap();
    d.envelope.payload["n"].as_u64()
}

async fn enqueue_then_lease_in_fifo_order(store: Arc<dyn Store>) {
    let a = id("a");
    for n in 0..20 {
        store.enqueue(&msg(&a, n), None).await.unwrap();
    }
    for n in 0..20 {
        assert_eq!(take_and_ack(&*store, &a).await, Some(n));
    }
    assert!(store.lease(&a, long()).await.unwrap().is_none());
}

async fn only_one_message_per_actor_is_out_at_a_time(store: Arc<dyn Store>) {
    let a = id("a");
    store.enqueue(&msg(&a, 0), None).await.unwrap();
    store.enqueue(&msg(&a, 1), None).await.unwrap();
    let first = store.lease(&a, long()).await.unwrap().expect("first");
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "second handed out while first is out"
    );
    store.ack(&first.receipt).await.unwrap();
    let second = store.lease(&a, long()).await.unwrap().expect("second");
    assert_eq!(second.envelope.payload["n"], 1);
}

async fn ack_removes_the_message(store: Arc<dyn Store>) {
    let a = id("a");
    store.enqueue(&msg(&a, 0), None).await.unwrap();
    let d = store.lease(&a, short(5)).await.unwrap().expect("delivery");
    store.ack(&d.receipt).await.unwrap();
    assert_eq!(store.pending(&a).await.unwrap(), 0);
    wait_past(Duration::from_millis(100)).await;
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "acked message came back"
    );
    let err = store.ack(&d.receipt).await.unwrap_err();
    assert!(matches!(err, StoreError::StaleReceipt { .. }), "{err:?}");
}

async fn expired_visibility_redelivers_with_a_higher_attempt(store: Arc<dyn Store>) {
    let a = id("a");
    let m = msg(&a, 7);
    store.enqueue(&m, None).await.unwrap();
    let first = store
        .lease(&a, short(5))
        .await
        .unwrap()
        .expect("first delivery");
    assert_eq!(first.envelope.attempt, 0);
    assert_eq!(first.receipt.delivery, 1);
    wait_past(Duration::from_millis(100)).await;
    let second = store.lease(&a, long()).await.unwrap().expect("redelivery");
    assert_eq!(second.envelope.id, m.id);
    assert_eq!(second.envelope.attempt, 1);
    assert_eq!(second.receipt.delivery, 2);
}

async fn stale_receipt_is_refused_after_redelivery(store: Arc<dyn Store>) {
    let a = id("a");
    store.enqueue(&msg(&a, 0), None).await.unwrap();
    let first = store.lease(&a, short(5)).await.unwrap().expect("first");
    wait_past(Duration::from_millis(100)).await;
    let second = store.lease(&a, long()).await.unwrap().expect("second");
    for r in [
        store.ack(&first.receipt).await,
        store.nack(&first.receipt, Duration::ZERO, "late").await,
        store.dead_letter(&first.receipt, "late").await.map(|_| ()),
    ] {
        assert!(matches!(r, Err(StoreError::StaleReceipt { .. })), "{r:?}");
    }
    store.ack(&second.receipt).await.unwrap();
    assert_eq!(store.pending(&a).await.unwrap(), 0);
}

async fn nack_with_delay_keeps_the_head_and_the_order(store: Arc<dyn Store>) {
    let a = id("a");
    store.enqueue(&msg(&a, 0), None).await.unwrap();
    store.enqueue(&msg(&a, 1), None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("first");
    store
        .nack(&d.receipt, Duration::from_millis(300), "try later")
        .await
        .unwrap();
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "a later message overtook a message waiting to be retried"
    );
    wait_past(Duration::from_millis(300)).await;
    let again = store.lease(&a, long()).await.unwrap().expect("retry");
    assert_eq!(again.envelope.payload["n"], 0);
    assert_eq!(again.envelope.attempt, 1);
    assert_eq!(again.last_error.as_deref(), Some("try later"));
    store.ack(&again.receipt).await.unwrap();
    assert_eq!(take_and_ack(&*store, &a).await, Some(1));
}

async fn delayed_message_waits_and_does_not_hold_up_others(store: Arc<dyn Store>) {
    let a = id("a");
    let later = Timestamp::now() + Duration::from_millis(400);
    store.enqueue(&msg(&a, 0), Some(later)).await.unwrap();
    store.enqueue(&msg(&a, 1), None).await.unwrap();
    assert_eq!(take_and_ack(&*store, &a).await, Some(1));
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "delayed message came early"
    );
    let due = store.next_due().await.unwrap().expect("a due time");
    assert!(
        due >= later,
        "next_due {due} is before the delivery time {later}"
    );
    wait_past(Duration::from_millis(400)).await;
    assert_eq!(take_and_ack(&*store, &a).await, Some(0));
}

/// A mailbox hands out in due order, and messages due at the same moment in the order they were
/// sent: 25 messages sent with one due time (past position 9, where Redis's sorted set, which
/// orders ties by the member's text, put 10 before 9), then one due before them, then, once all
/// are due, one sent without a delay, which comes last (Redis appended it to its stream ahead
/// of the delayed messages not yet moved there).
async fn due_messages_come_in_due_order_and_ties_in_the_order_sent(store: Arc<dyn Store>) {
    let a = id("a");
    let start = Timestamp::now();
    // Far enough ahead that the sends are done before either, on a loaded machine too.
    let (early, at) = (
        start + Duration::from_millis(2000),
        start + Duration::from_millis(2500),
    );
    for n in 0..25 {
        store.enqueue(&msg(&a, n), Some(at)).await.unwrap();
    }
    store.enqueue(&msg(&a, 1000), Some(early)).await.unwrap();
    let sent = Timestamp::now();
    if sent < early {
        assert!(
            store.lease(&a, long()).await.unwrap().is_none(),
            "a delayed message came early"
        );
    }
    wait_past(Duration::from_millis(2500)).await;
    store.enqueue(&msg(&a, 2000), None).await.unwrap();
    let mut got = Vec::new();
    while let Some(n) = take_and_ack(&*store, &a).await {
        got.push(n);
    }
    let expected: Vec<u64> = std::iter::once(1000)
        .chain(0..25)
        .chain(std::iter::once(2000))
        .collect();
    assert_eq!(
        got,
        expected,
        "sends done {}ms after the start",
        sent.as_millis() - start.as_millis()
    );
}

/// A due time as far ahead as a `Timestamp` goes (`Timestamp::MAX`, "never": what a delay too
/// long to add saturates to) and one a century ahead are kept to the millisecond: the message
/// waits, holds up nothing, and is listed and counted; a Redis score that large is a float in
/// exponent form, which every read of it must still parse.
async fn messages_due_centuries_ahead_or_never_wait_and_are_listed(store: Arc<dyn Store>) {
    let a = id("a");
    let century = Timestamp::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    store
        .enqueue(&msg(&a, 0), Some(Timestamp::MAX))
        .await
        .unwrap();
    // Alone in its mailbox, it is still a waiting message of the kind.
    assert_eq!(store.backlog(a.kind()).await.unwrap().mailboxes, 1);
    assert_eq!(
        store.mailboxes(None, 10).await.unwrap(),
        std::slice::from_ref(&a)
    );
    assert!(store.lease(&a, long()).await.unwrap().is_none());
    assert_eq!(
        store.next_due().await.unwrap(),
        Some(Timestamp::MAX),
        "a mailbox holding only a message due never is due never"
    );
    store.enqueue(&msg(&a, 1), Some(century)).await.unwrap();
    store.enqueue(&msg(&a, 2), None).await.unwrap();
    assert_eq!(take_and_ack(&*store, &a).await, Some(2));
    assert!(store.lease(&a, long()).await.unwrap().is_none());
    assert_eq!(store.pending(&a).await.unwrap(), 2);
    let waiting = store.messages(&a, None, 10).await.unwrap();
    let due: Vec<(u64, Option<Timestamp>)> = waiting
        .iter()
        .map(|w| (w.envelope.payload["n"].as_u64().unwrap(), w.deliver_at))
        .collect();
    assert_eq!(due, [(0, Some(Timestamp::MAX)), (1, Some(century))]);
    assert_eq!(
        store.mailboxes(None, 10).await.unwrap(),
        std::slice::from_ref(&a)
    );
    let next = store.next_due().await.unwrap().expect("a due time");
    assert_eq!(next, century, "the earlier of the two");
    let backlog = store.backlog(a.kind()).await.unwrap();
    assert_eq!(backlog.mailboxes, 1, "{backlog:?}");
}

async fn dead_letter_after_max_deliveries_with_the_reason(store: Arc<dyn Store>) {
    let a = id("a");
    let m = msg(&a, 0);
    store.enqueue(&m, None).await.unwrap();
    store.enqueue(&msg(&a, 1), None).await.unwrap();
    for attempt in 0..3 {
        let d = store.lease(&a, short(3)).await.unwrap().expect("delivery");
        assert_eq!(d.envelope.attempt, attempt);
        store
            .nack(&d.receipt, Duration::ZERO, &format!("failure {attempt}"))
            .await
            .unwrap();
    }
    // The fourth lease gives up on the message and moves on to the next one.
    let next = store
        .lease(&a, short(3))
        .await
        .unwrap()
        .expect("next message");
    assert_eq!(next.envelope.payload["n"], 1);
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id, m.id);
    assert_eq!(dead[0].deliveries, 3);
    assert!(
        dead[0].reason.contains("failure 2"),
        "reason: {}",
        dead[0].reason
    );
    // A message whose every lease ran out (its consumer died) is given up on too.
    let b = id("b");
    store.enqueue(&msg(&b, 0), None).await.unwrap();
    for _ in 0..2 {
        store.lease(&b, short(2)).await.unwrap().expect("delivery");
        wait_past(Duration::from_millis(100)).await;
    }
    assert!(store.lease(&b, short(2)).await.unwrap().is_none());
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(
        dead[1].reason.contains("never acked"),
        "reason: {}",
        dead[1].reason
    );
    assert_eq!(store.pending(&b).await.unwrap(), 0);
}

async fn explicit_dead_letter_keeps_the_reason(store: Arc<dyn Store>) {
    let a = id("a");
    let m = msg(&a, 0);
    store.enqueue(&m, None).await.unwrap();
    store.enqueue(&msg(&a, 1), None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    let dl = store
        .dead_letter(&d.receipt, "unknown actor kind `conf`")
        .await
        .unwrap();
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, dl);
    assert_eq!(dead[0].envelope, m);
    assert_eq!(dead[0].reason, "unknown actor kind `conf`");
    assert_eq!(take_and_ack(&*store, &a).await, Some(1));
}

async fn dead_letters_list_and_requeue(store: Arc<dyn Store>) {
    let a = id("a");
    let mut ids = Vec::new();
    for n in 0..5 {
        store.enqueue(&msg(&a, n), None).await.unwrap();
        let d = store.lease(&a, long()).await.unwrap().expect("delivery");
        ids.push(
            store
                .dead_letter(&d.receipt, &format!("bad {n}"))
                .await
                .unwrap(),
        );
    }
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "dead-letter ids must grow: {ids:?}"
    );
    let first = store.dead_letters(None, 2).await.unwrap();
    let rest = store.dead_letters(Some(first[1].id), 10).await.unwrap();
    assert_eq!(first.len() + rest.len(), 5);
    assert_eq!(rest[0].reason, "bad 2");
    let buried = store
        .dead_letters(None, 10)
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.id == ids[3])
        .expect("dead letter 3");
    store.requeue_dead_letter(ids[3]).await.unwrap();
    assert_eq!(store.dead_letters(None, 10).await.unwrap().len(), 4);
    let back = store.lease(&a, long()).await.unwrap().expect("requeued");
    assert_eq!(back.envelope.payload["n"], 3);
    assert_eq!(back.envelope.attempt, 0);
    // A new delivery identity (so it is run, not taken for a duplicate), the same origin.
    assert_ne!(back.envelope.id, buried.envelope.id);
    assert_eq!(back.receipt.message_id, back.envelope.id);
    assert_eq!(back.envelope.origin(), buried.envelope.id);
    assert_eq!(back.envelope.requeued_from, Some(buried.envelope.id));
    store.ack(&back.receipt).await.unwrap();
    // Requeued twice, it keeps its first origin.
    let d = store.lease(&a, long()).await.unwrap();
    assert!(d.is_none());
    store.enqueue(&back.envelope, None).await.unwrap();
    let again = store.lease(&a, long()).await.unwrap().expect("delivery");
    let dl = store.dead_letter(&again.receipt, "again").await.unwrap();
    store.requeue_dead_letter(dl).await.unwrap();
    let twice = store
        .lease(&a, long())
        .await
        .unwrap()
        .expect("requeued twice");
    assert_eq!(twice.envelope.origin(), buried.envelope.id);
    assert_ne!(twice.envelope.id, back.envelope.id);
    store.ack(&twice.receipt).await.unwrap();
}

async fn purge_deletes_the_dead_letters_named_and_skips_the_rest(store: Arc<dyn Store>) {
    let (a, b) = (id("a"), id("b"));
    let mut ids = Vec::new();
    for n in 0..4 {
        let to = if n % 2 == 0 { &a } else { &b };
        store.enqueue(&msg(to, n), None).await.unwrap();
        let d = store.lease(to, long()).await.unwrap().expect("delivery");
        ids.push(store.dead_letter(&d.receipt, "bad").await.unwrap());
    }
    // Two of them, one twice, and an id that never was.
    let purged = store
        .purge_dead_letters(&[ids[0], ids[2], ids[2], 99_999])
        .await
        .unwrap();
    assert_eq!(purged, 2);
    let left: Vec<u64> = store
        .dead_letters(None, 10)
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left, vec![ids[1], ids[3]]);
    assert_eq!(store.purge_dead_letters(&[ids[0]]).await.unwrap(), 0);
    assert_eq!(store.purge_dead_letters(&[]).await.unwrap(), 0);
    assert!(matches!(
        store.requeue_dead_letter(ids[0]).await.unwrap_err(),
        StoreError::DeadLetterNotFound(_)
    ));
    // The mailboxes are untouched, and the kept dead letters still requeue.
    store.requeue_dead_letter(ids[3]).await.unwrap();
    assert!(store.lease(&b, long()).await.unwrap().is_some());
    let too_many = vec![1; loom_core::limits::MAX_PURGE_IDS + 1];
    assert!(matches!(
        store.purge_dead_letters(&too_many).await.unwrap_err(),
        StoreError::InvalidRequest(_)
    ));
}

async fn requeue_of_unknown_dead_letter_is_a_typed_error(store: Arc<dyn Store>) {
    let err = store.requeue_dead_letter(999).await.unwrap_err();
    assert!(
        matches!(err, StoreError::DeadLetterNotFound(999)),
        "{err:?}"
    );
}

async fn ready_actors_and_next_due_follow_the_mailboxes(store: Arc<dyn Store>) {
    assert!(store.ready_actors(&["conf"], 10).await.unwrap().is_empty());
    assert!(store.next_due().await.unwrap().is_none());
    let (a, b, c) = (id("a"), id("b"), id("c"));
    store.enqueue(&msg(&a, 0), None).await.unwrap();
    store.enqueue(&msg(&b, 0), None).await.unwrap();
    store
        .enqueue(
            &msg(&c, 0),
            Some(Timestamp::now() + Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    let ready: HashSet<ActorId> = store
        .ready_actors(&["conf"], 10)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(ready, HashSet::from([a.clone(), b.clone()]));
    assert_eq!(store.ready_actors(&["conf"], 1).await.unwrap().len(), 1);
    let d = store.lease(&a, long()).await.unwrap().expect("a");
    let ready: HashSet<ActorId> = store
        .ready_actors(&["conf"], 10)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        ready,
        HashSet::from([b.clone()]),
        "an actor whose message is out is not ready"
    );
    store.ack(&d.receipt).await.unwrap();
    take_and_ack(&*store, &b).await.expect("b");
    assert!(store.ready_actors(&["conf"], 10).await.unwrap().is_empty());
    let due = store.next_due().await.unwrap().expect("c is due later");
    assert!(due > Timestamp::now() + Duration::from_secs(3000));
}

async fn mailboxes_are_isolated_per_actor(store: Arc<dyn Store>) {
    let (a, b) = (id("a"), id("b"));
    store.enqueue(&msg(&a, 1), None).await.unwrap();
    store.enqueue(&msg(&b, 2), None).await.unwrap();
    let da = store.lease(&a, long()).await.unwrap().expect("a");
    // b is served while a's message is out.
    let db = store.lease(&b, long()).await.unwrap().expect("b");
    assert_eq!(da.envelope.payload["n"], 1);
    assert_eq!(db.envelope.payload["n"], 2);
    assert!(matches!(
        store
            .ack(&Receipt {
                actor: a.clone(),
                ..db.receipt.clone()
            })
            .await,
        Err(StoreError::StaleReceipt { .. })
    ));
    store.ack(&da.receipt).await.unwrap();
    store.ack(&db.receipt).await.unwrap();
}

async fn oversized_message_is_refused_and_nothing_enqueued(store: Arc<dyn Store>) {
    let a = id("a");
    let m = Envelope::new(a.clone(), json!("m".repeat(MAX_MESSAGE_BYTES)));
    let err = store.enqueue(&m, None).await.unwrap_err();
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
    assert_eq!(store.pending(&a).await.unwrap(), 0);
    let fits = Envelope::new(a.clone(), json!("m".repeat(MAX_MESSAGE_BYTES - 1024)));
    store.enqueue(&fits, None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    assert!(d.envelope == fits, "the large message came back different");
}

/// A stored record nests no deeper than `MAX_JSON_DEPTH` levels, short of the `READ_JSON_DEPTH`
/// serde_json reads back, and a message one less (the entry that invokes it nests its payload
/// one level deeper): a message nested deeper is refused when it is enqueued, with nothing
/// written, instead of being stored and then buried at its lease as a damaged frame. One just
/// within the limit comes back whole.
async fn a_message_nested_too_deep_to_read_back_is_refused(store: Arc<dyn Store>) {
    use loom_core::limits::MAX_JSON_DEPTH;
    let nested = |levels: usize| {
        let mut v = json!("deep");
        for _ in 0..levels {
            v = json!([v]);
        }
        v
    };
    let a = id("a");
    // The envelope nests its payload one level down, and the entry that invokes it two: a
    // message's envelope may nest `MAX_JSON_DEPTH - 1`.
    let deep = Envelope::new(a.clone(), nested(MAX_JSON_DEPTH - 1));
    match store.enqueue(&deep, None).await {
        Err(StoreError::TooLarge {
            limit_kind: Limit::JsonDepth,
            limit,
            size,
            ..
        }) => assert!(
            limit == MAX_JSON_DEPTH - 1 && size > limit,
            "{size} of {limit}"
        ),
        other => panic!("a message nested past the limit: {other:?}"),
    }
    assert_eq!(store.pending(&a).await.unwrap(), 0);
    let fits = Envelope::new(a.clone(), nested(MAX_JSON_DEPTH - 2));
    store.enqueue(&fits, None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    assert!(d.envelope == fits, "the deep message came back different");
}

async fn pending_counts_every_waiting_message(store: Arc<dyn Store>) {
    let a = id("a");
    assert_eq!(store.pending(&a).await.unwrap(), 0);
    for n in 0..3 {
        store.enqueue(&msg(&a, n), None).await.unwrap();
    }
    store
        .enqueue(
            &msg(&a, 3),
            Some(Timestamp::now() + Duration::from_secs(600)),
        )
        .await
        .unwrap();
    assert_eq!(store.pending(&a).await.unwrap(), 4);
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    assert_eq!(
        store.pending(&a).await.unwrap(),
        4,
        "a message out is still pending"
    );
    store.ack(&d.receipt).await.unwrap();
    assert_eq!(store.pending(&a).await.unwrap(), 3);
}

async fn positions_grow_and_are_never_reused(store: Arc<dyn Store>) {
    let a = id("a");
    let p1 = store.enqueue(&msg(&a, 0), None).await.unwrap();
    take_and_ack(&*store, &a).await.expect("first");
    let p2 = store.enqueue(&msg(&a, 1), None).await.unwrap();
    assert!(p2 > p1, "position {p2} reused or went back from {p1}");
    let d = store.lease(&a, long()).await.unwrap().expect("second");
    assert_eq!(d.receipt.position, p2);
}

async fn concurrent_leases_hand_a_message_out_once(store: Arc<dyn Store>) {
    let a = id("a");
    for n in 0..3 {
        store.enqueue(&msg(&a, n), None).await.unwrap();
    }
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            store.lease(&a, long()).await.unwrap()
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        if let Some(d) = t.await.unwrap() {
            got.push(d);
        }
    }
    assert_eq!(
        got.len(),
        1,
        "{} consumers got a message of one actor at once",
        got.len()
    );
    assert_eq!(got[0].envelope.payload["n"], 0);
}

async fn bad_lease_options_are_refused(store: Arc<dyn Store>) {
    let a = id("a");
    store.enqueue(&msg(&a, 0), None).await.unwrap();
    let zero_max = LeaseOptions {
        max_deliveries: 0,
        ..long()
    };
    assert!(matches!(
        store.lease(&a, zero_max).await,
        Err(StoreError::InvalidRequest(_))
    ));
    let zero_vis = LeaseOptions {
        visibility: Duration::ZERO,
        ..long()
    };
    assert!(matches!(
        store.lease(&a, zero_vis).await,
        Err(StoreError::InvalidRequest(_))
    ));
    let too_early = LeaseOptions {
        early: loom_core::store::MAX_EARLY + Duration::from_millis(1),
        ..long()
    };
    assert!(matches!(
        store.lease(&a, too_early).await,
        Err(StoreError::InvalidRequest(_))
    ));
    assert!(
        store.lease(&a, long()).await.unwrap().is_some(),
        "a refused lease consumed the message"
    );
}

async fn message_fields_round_trip(store: Arc<dyn Store>) {
    let a = id("a");
    let mut m = msg(&a, 0);
    m.idempotency_key = Some(loom_core::IdempotencyKey::new("idem-1").unwrap());
    m.reply_to = Some(id("caller"));
    m.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    store.enqueue(&m, None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    assert_eq!(d.envelope, m);
    assert_eq!(d.receipt.message_id, m.id);
    assert!(d.last_error.is_none());
}

async fn extend_keeps_a_message_out_longer(store: Arc<dyn Store>) {
    let a = id("a");
    store.enqueue(&msg(&a, 0), None).await.unwrap();
    let d = store.lease(&a, short(5)).await.unwrap().expect("delivery");
    store
        .extend(&d.receipt, Duration::from_secs(60))
        .await
        .unwrap();
    wait_past(Duration::from_millis(100)).await;
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "an extended lease ran out early"
    );
    store.ack(&d.receipt).await.unwrap();
    let stale = store.extend(&d.receipt, Duration::from_secs(60)).await;
    assert!(
        matches!(stale, Err(StoreError::StaleReceipt { .. })),
        "{stale:?}"
    );
}

async fn event_lanes_are_leased_directly_and_never_listed_as_ready(store: Arc<dyn Store>) {
    let a = id("a");
    let lane = a.event_lane_in("approved", store.partitions());
    assert!(lane.is_system());
    store
        .enqueue(&Envelope::new(lane.clone(), json!({"ok": true})), None)
        .await
        .unwrap();
    assert!(
        store.ready_actors(&["conf"], 10).await.unwrap().is_empty(),
        "an event lane was listed as ready"
    );
    let d = store.lease(&lane, long()).await.unwrap().expect("event");
    assert_eq!(d.envelope.payload, json!({"ok": true}));
    store.ack(&d.receipt).await.unwrap();
    assert_eq!(store.pending(&lane).await.unwrap(), 0);
}

/// Messages are listed by position, page after page of any size, whatever order they are
/// handed out in: a delayed message that came due goes out after those sent behind it (on
/// Redis it joins the stream at its end), and is still listed first.
async fn messages_pages_in_position_order_whatever_order_they_are_handed_out(
    store: Arc<dyn Store>,
) {
    let a = id("a");
    let soon = Timestamp::now() + Duration::from_millis(50);
    store.enqueue(&msg(&a, 0), Some(soon)).await.unwrap();
    for n in 1..=4 {
        store.enqueue(&msg(&a, n), None).await.unwrap();
    }
    let hour = Timestamp::now() + Duration::from_secs(3600);
    store.enqueue(&msg(&a, 5), Some(hour)).await.unwrap();
    wait_past(Duration::from_millis(100)).await;
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    let n_of = |w: &loom_core::store::Waiting| w.envelope.payload["n"].as_u64().unwrap();
    let all = store.messages(&a, None, 100).await.unwrap();
    assert_eq!(all.iter().map(n_of).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5]);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    let out: Vec<_> = all
        .iter()
        .filter(|w| w.out)
        .map(|w| w.envelope.id)
        .collect();
    assert_eq!(out, [d.envelope.id]);
    for limit in [1, 2, 4, 6] {
        let (mut after, mut seen) = (None, Vec::new());
        loop {
            let page = store.messages(&a, after, limit).await.unwrap();
            assert!(page.len() <= limit, "{} for a limit of {limit}", page.len());
            let Some(last) = page.last() else { break };
            after = Some(last.position);
            seen.extend(page.iter().map(n_of));
        }
        assert_eq!(seen, [0, 1, 2, 3, 4, 5], "pages of {limit}");
    }
    // From a message's position less one, a page of one is that message.
    for w in &all {
        let one = store.messages(&a, Some(w.position - 1), 1).await.unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].position, one[0].out), (w.position, w.out));
    }
}

/// An idempotency key may hold what a backend's key names use (`}:mm`, `:ready:`, braces):
/// its record must not pass for a mailbox in a listing (on Redis such a record's key matched
/// the mailbox pattern, and every listing failed on it).
async fn mailboxes_lists_actors_whatever_their_idempotency_keys_hold(store: Arc<dyn Store>) {
    let a = ActorId::new("conf", "a").unwrap();
    for (i, key) in ["k}:mm", "x}:mq", "{y}:mm", "z:ready:conf", "}:mm"]
        .into_iter()
        .enumerate()
    {
        let key = IdempotencyKey::new(key).unwrap();
        let m = Envelope {
            idempotency_key: Some(key.clone()),
            ..Envelope::new(a.clone(), json!(i))
        };
        store
            .enqueue_once(&m, None, &key, Duration::from_secs(60))
            .await
            .unwrap();
    }
    assert_eq!(store.mailboxes(None, 10).await.unwrap(), vec![a.clone()]);
    assert_eq!(store.messages(&a, None, 10).await.unwrap().len(), 5);
    assert_eq!(store.ready_actors(&["conf"], 10).await.unwrap(), vec![a]);
}

async fn messages_lists_what_waits_and_mailboxes_lists_who_has_mail(store: Arc<dyn Store>) {
    let (a, b) = (id("a"), id("b"));
    let later = Timestamp::now() + Duration::from_secs(3600);
    let m0 = msg(&a, 0);
    let m1 = msg(&a, 1);
    let m2 = msg(&a, 2);
    store.enqueue(&m0, None).await.unwrap();
    store.enqueue(&m1, Some(later)).await.unwrap();
    store.enqueue(&m2, None).await.unwrap();
    store.enqueue(&msg(&b, 0), None).await.unwrap();
    let lane = a.event_lane_in("e", store.partitions());
    store
        .enqueue(&Envelope::new(lane.clone(), json!(1)), None)
        .await
        .unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    assert_eq!(d.envelope.id, m0.id);
    let waiting = store.messages(&a, None, 10).await.unwrap();
    assert_eq!(
        waiting.iter().map(|w| w.envelope.id).collect::<Vec<_>>(),
        vec![m0.id, m1.id, m2.id]
    );
    assert!(waiting[0].out && !waiting[1].out && !waiting[2].out);
    assert_eq!(
        waiting[1].deliver_at.map(|t| t.as_millis()),
        Some(later.as_millis())
    );
    assert!(waiting[0].deliver_at.is_none() && waiting[2].deliver_at.is_none());
    let rest = store
        .messages(&a, Some(waiting[0].position), 1)
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].envelope.id, m1.id);
    let mut boxes = store.mailboxes(None, 10).await.unwrap();
    boxes.sort();
    let mut want = vec![a.clone(), b.clone(), lane];
    want.sort();
    assert_eq!(boxes, want);
    store.ack(&d.receipt).await.unwrap();
    let db = store.lease(&b, long()).await.unwrap().expect("b");
    store.ack(&db.receipt).await.unwrap();
    assert!(
        !store.mailboxes(None, 10).await.unwrap().contains(&b),
        "an empty mailbox was listed"
    );
    let page = store.mailboxes(None, 1).await.unwrap();
    assert_eq!(page.len(), 1);
    let next = store.mailboxes(Some(&page[0]), 10).await.unwrap();
    assert!(!next.contains(&page[0]));
}

async fn ready_actors_lists_only_the_kinds_asked_for(store: Arc<dyn Store>) {
    let gauge = ActorId::new("gauge", "g").unwrap();
    let counter = ActorId::new("counter", "c").unwrap();
    store.enqueue(&msg(&gauge, 0), None).await.unwrap();
    store.enqueue(&msg(&counter, 0), None).await.unwrap();
    assert_eq!(
        store.ready_actors(&["gauge"], 10).await.unwrap(),
        vec![gauge.clone()]
    );
    assert_eq!(
        store.ready_actors(&["counter"], 10).await.unwrap(),
        vec![counter.clone()]
    );
    let both: HashSet<ActorId> = store
        .ready_actors(&["counter", "gauge"], 10)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(both, HashSet::from([gauge, counter]));
    assert!(
        store
            .ready_actors(&["nobody"], 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.ready_actors(&[], 10).await.unwrap().is_empty());
}

async fn one_kinds_backlog_does_not_hide_another_kinds_ready_actors(store: Arc<dyn Store>) {
    // Forty ready counters, older than the one ready gauge.
    for n in 0..40 {
        let c = ActorId::new("counter", format!("c{n}")).unwrap();
        store.enqueue(&msg(&c, 0), None).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let gauge = ActorId::new("gauge", "g").unwrap();
    store.enqueue(&msg(&gauge, 0), None).await.unwrap();
    let ready = store.ready_actors(&["counter", "gauge"], 10).await.unwrap();
    assert_eq!(ready.len(), 10);
    assert!(ready.contains(&gauge), "{ready:?}");
    assert_eq!(
        store.ready_actors(&["gauge"], 1).await.unwrap(),
        vec![gauge]
    );
}

/// `ready_actors_in` (a node's scan of the partitions it owns) lists the ready actors of the
/// partitions asked for and no others: a larger backlog of a partition not asked for hides none
/// of them, and among those asked for one partition's backlog hides no other's ready actor and
/// fills what the others leave.
async fn ready_actors_in_looks_only_in_the_partitions_asked_for(store: Arc<dyn Store>) {
    use loom_core::partition::{ownership_partitions, partition_of};
    let of = ownership_partitions(store.partitions());
    let mut by_part: std::collections::BTreeMap<u32, Vec<ActorId>> = Default::default();
    for n in 0..4000 {
        let a = id(&format!("p{n}"));
        by_part.entry(partition_of(&a, of)).or_default().push(a);
    }
    let mut parts = by_part.keys().copied();
    let (a, b, c) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let backlog_a: Vec<ActorId> = by_part[&a].iter().take(30).cloned().collect();
    let lone_b = by_part[&b][0].clone();
    let backlog_c: Vec<ActorId> = by_part[&c].iter().take(40).cloned().collect();
    assert_eq!(
        (backlog_a.len(), backlog_c.len()),
        (30, 40),
        "{of} partitions"
    );
    // Oldest first: the backlog not asked for, then the one asked for, then the lone actor.
    for x in backlog_c.iter().chain(&backlog_a) {
        store.enqueue(&msg(x, 0), None).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.enqueue(&msg(&lone_b, 0), None).await.unwrap();
    let gauge = (0..)
        .map(|n| ActorId::new("gauge", format!("g{n}")).unwrap())
        .find(|g| partition_of(g, of) == c)
        .unwrap();
    store.enqueue(&msg(&gauge, 0), None).await.unwrap();

    let ready = store
        .ready_actors_in(&[("conf", &[a, b])], of, 10)
        .await
        .unwrap();
    assert_eq!(ready.len(), 10, "{ready:?}");
    assert!(ready.contains(&lone_b), "{ready:?}");
    assert!(
        ready.iter().all(|x| x == &lone_b || backlog_a.contains(x)),
        "{ready:?}"
    );
    let only_a = store
        .ready_actors_in(&[("conf", &[a])], of, 10)
        .await
        .unwrap();
    assert_eq!(only_a.len(), 10, "a backlog fills the limit: {only_a:?}");
    assert!(only_a.iter().all(|x| backlog_a.contains(x)), "{only_a:?}");
    let only_c: HashSet<ActorId> = store
        .ready_actors_in(&[("conf", &[c])], of, 100)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(only_c, backlog_c.iter().cloned().collect::<HashSet<_>>());
    assert_eq!(
        store
            .ready_actors_in(&[("conf", &[a, b, c])], of, 1000)
            .await
            .unwrap()
            .len(),
        71
    );
    // Kinds are asked for with their own partitions, and none hides another's.
    let mixed = store
        .ready_actors_in(&[("conf", &[c]), ("gauge", &[c])], of, 5)
        .await
        .unwrap();
    assert_eq!(mixed.len(), 5);
    assert!(mixed.contains(&gauge), "{mixed:?}");
    assert!(
        store
            .ready_actors_in(&[("gauge", &[a, b])], of, 10)
            .await
            .unwrap()
            .iter()
            .all(|g| g != &gauge)
    );
    assert!(store.ready_actors_in(&[], of, 10).await.unwrap().is_empty());
}

/// `backlog` counts a kind's non-empty mailboxes (delayed and out ones included; parked ones,
/// event lanes and other kinds not), the ready ones, and since when the longest-ready waits.
async fn backlog_counts_a_kinds_mailboxes_and_its_longest_wait(store: Arc<dyn Store>) {
    let counts = |b: loom_core::store::Backlog| (b.mailboxes, b.ready, b.oldest_ready_at);
    let empty = store.backlog("gauge").await.unwrap();
    assert_eq!(counts(empty), (0, 0, None));
    assert_eq!(empty.longest_wait(), Duration::ZERO);
    let g = |k: &str| ActorId::new("gauge", k).unwrap();
    let (first, second, delayed, out, parked) = (g("1"), g("2"), g("3"), g("4"), g("5"));
    store.enqueue(&msg(&first, 0), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    for n in 0..2 {
        store.enqueue(&msg(&second, n), None).await.unwrap();
    }
    store
        .enqueue(&msg(&delayed, 0), Some(Timestamp::now() + HOUR))
        .await
        .unwrap();
    store.enqueue(&msg(&out, 0), None).await.unwrap();
    store.lease(&out, long()).await.unwrap().expect("delivery");
    store.enqueue(&msg(&parked, 0), None).await.unwrap();
    store
        .park(&parked, &loom_core::Park::new("node-a", "broken"), None)
        .await
        .unwrap();
    store
        .enqueue(&msg(&ActorId::new("counter", "c").unwrap(), 0), None)
        .await
        .unwrap();
    deliver(&*store, &first, "approved", 1).await;
    let b = store.backlog("gauge").await.unwrap();
    assert_eq!((b.mailboxes, b.ready), (4, 2), "{b:?}");
    let oldest = b.oldest_ready_at.expect("a ready mailbox");
    // On the store's clock: the first has waited at least since the second came.
    assert!(oldest <= b.at, "{b:?}");
    assert!(
        b.longest_wait() >= Duration::from_millis(20) && b.longest_wait() < Duration::from_secs(60),
        "{b:?}"
    );
    // More mail for a mailbox that is ready already does not make it newer: it has waited
    // since it became ready.
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.enqueue(&msg(&first, 1), None).await.unwrap();
    let again = store.backlog("gauge").await.unwrap();
    assert_eq!(counts(again), (4, 2, Some(oldest)), "{again:?} after {b:?}");
    assert!(
        again.longest_wait() > b.longest_wait(),
        "{again:?} after {b:?}"
    );
    // The longest-waiting one is handled (both its messages): the next one has waited less.
    for _ in 0..2 {
        let d = store
            .lease(&first, long())
            .await
            .unwrap()
            .expect("delivery");
        store.ack(&d.receipt).await.unwrap();
    }
    let after = store.backlog("gauge").await.unwrap();
    assert_eq!((after.mailboxes, after.ready), (3, 1), "{after:?}");
    assert!(
        after.oldest_ready_at.expect("a ready mailbox") > oldest,
        "{after:?} after {b:?}"
    );
    assert_eq!(store.backlog("counter").await.unwrap().ready, 1);
    assert_eq!(counts(store.backlog("nobody").await.unwrap()), (0, 0, None));
}

/// Delivers event `n` on `owner`'s lane `name`, as `ActorRef::deliver_event` does.
async fn deliver(store: &dyn Store, owner: &ActorId, name: &str, n: u64) -> Enqueued {
    let lane = owner.event_lane_in(name, store.partitions());
    let key = IdempotencyKey::new(format!("event-{name}-{n}")).unwrap();
    store
        .enqueue_event(
            &Envelope::new(lane, json!({ "n": n })),
            &key,
            Duration::from_secs(60),
            owner,
        )
        .await
        .unwrap()
}

const HOUR: Duration = Duration::from_secs(3600);

async fn an_event_on_its_lane_wakes_a_suspended_message(store: Arc<dyn Store>) {
    let (a, b) = (id("a"), id("b"));
    let lane = a.event_lane_in("approved", store.partitions());
    let m = msg(&a, 0);
    store.enqueue(&m, None).await.unwrap();
    store.enqueue(&msg(&a, 1), None).await.unwrap();
    store.enqueue(&msg(&b, 0), None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    let suspended = store
        .suspend(&d.receipt, Some(&lane), HOUR, "waiting for approved")
        .await
        .unwrap();
    assert_eq!(
        suspended,
        Suspension::Suspended,
        "an empty lane was refused"
    );
    assert!(store.lease(&a, long()).await.unwrap().is_none());
    assert_eq!(
        store.ready_actors(&["conf"], 10).await.unwrap(),
        vec![b.clone()]
    );
    // An event on another lane of a, and one of b's lanes, wake nothing.
    assert!(matches!(
        deliver(&*store, &a, "rejected", 1).await,
        Enqueued::New(_)
    ));
    assert!(matches!(
        deliver(&*store, &b, "approved", 2).await,
        Enqueued::New(_)
    ));
    assert!(store.lease(&a, long()).await.unwrap().is_none());
    assert!(matches!(
        deliver(&*store, &a, "approved", 3).await,
        Enqueued::New(_)
    ));
    let mut ready = store.ready_actors(&["conf"], 10).await.unwrap();
    ready.sort();
    assert_eq!(
        ready,
        vec![a.clone(), b.clone()],
        "the woken actor is listed as ready"
    );
    let again = store.lease(&a, long()).await.unwrap().expect("woken");
    assert_eq!(
        again.envelope.id, m.id,
        "the suspended message keeps its place"
    );
    assert_eq!(again.receipt.delivery, d.receipt.delivery + 1);
    let e = store
        .lease(&lane, long())
        .await
        .unwrap()
        .expect("the event");
    assert_eq!(e.envelope.payload, json!({ "n": 3 }));
    // A wake-up is used once: suspended again, the message waits for the next event.
    store.ack(&e.receipt).await.unwrap();
    assert_eq!(
        store
            .suspend(&again.receipt, Some(&lane), HOUR, "again")
            .await
            .unwrap(),
        Suspension::Suspended
    );
    assert!(matches!(
        deliver(&*store, &a, "approved", 3).await,
        Enqueued::Duplicate(_)
    ));
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "a duplicate event woke the message"
    );
    assert!(matches!(
        deliver(&*store, &a, "approved", 4).await,
        Enqueued::New(_)
    ));
    let third = store.lease(&a, long()).await.unwrap().expect("woken again");
    assert_eq!(third.envelope.id, m.id);
}

async fn suspending_is_refused_while_the_lane_holds_a_message(store: Arc<dyn Store>) {
    let a = id("a");
    let lane = a.event_lane_in("approved", store.partitions());
    store.enqueue(&msg(&a, 0), None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    deliver(&*store, &a, "approved", 1).await;
    assert_eq!(
        store
            .suspend(&d.receipt, Some(&lane), HOUR, "w")
            .await
            .unwrap(),
        Suspension::EventWaiting,
        "suspended although its event had arrived"
    );
    // Nothing was written: the delivery is still out, and still the caller's.
    assert!(store.lease(&a, long()).await.unwrap().is_none());
    store.ack(&d.receipt).await.unwrap();
    // An event that is out (leased by a waiter that has not settled it) counts as well.
    store.enqueue(&msg(&a, 1), None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    let _event = store
        .lease(&lane, long())
        .await
        .unwrap()
        .expect("the event");
    assert_eq!(
        store
            .suspend(&d.receipt, Some(&lane), HOUR, "w")
            .await
            .unwrap(),
        Suspension::EventWaiting
    );
}

async fn a_wake_up_leaves_a_message_handed_out_again_alone(store: Arc<dyn Store>) {
    let a = id("a");
    let lane = a.event_lane_in("approved", store.partitions());
    store.enqueue(&msg(&a, 0), None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    let delay = Duration::from_millis(100);
    assert_eq!(
        store
            .suspend(&d.receipt, Some(&lane), delay, "w")
            .await
            .unwrap(),
        Suspension::Suspended
    );
    wait_past(delay).await;
    // The suspension ran out (a timeout): the message is handed out again, for a minute.
    let again = store.lease(&a, long()).await.unwrap().expect("due again");
    deliver(&*store, &a, "approved", 1).await;
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "a late event made a message that is out visible"
    );
    store.ack(&again.receipt).await.unwrap();
    // A suspension that ended with an ack leaves no mark behind for the next message.
    store.enqueue(&msg(&a, 1), None).await.unwrap();
    let next = store.lease(&a, long()).await.unwrap().expect("next");
    store.nack(&next.receipt, HOUR, "backoff").await.unwrap();
    deliver(&*store, &a, "approved", 2).await;
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "an event woke a message that only nacked"
    );
}

async fn suspend_refuses_a_stale_receipt_and_a_foreign_lane(store: Arc<dyn Store>) {
    let (a, b) = (id("a"), id("b"));
    let lane = a.event_lane_in("approved", store.partitions());
    store.enqueue(&msg(&a, 0), None).await.unwrap();
    let d = store.lease(&a, short(5)).await.unwrap().expect("delivery");
    let not_a_lane = store.suspend(&d.receipt, Some(&b), HOUR, "w").await;
    assert!(
        matches!(not_a_lane, Err(StoreError::InvalidRequest(_))),
        "{not_a_lane:?}"
    );
    wait_past(Duration::from_millis(100)).await;
    let again = store.lease(&a, long()).await.unwrap().expect("redelivered");
    let stale = store.suspend(&d.receipt, Some(&lane), HOUR, "w").await;
    assert!(
        matches!(stale, Err(StoreError::StaleReceipt { .. })),
        "{stale:?}"
    );
    // The refused calls changed nothing: the current delivery is still out and acks.
    store.ack(&again.receipt).await.unwrap();
    let not_an_owner = store
        .enqueue_event(
            &Envelope::new(b.clone(), json!(1)),
            &IdempotencyKey::new("k").unwrap(),
            Duration::from_secs(60),
            &a,
        )
        .await;
    assert!(
        matches!(not_an_owner, Err(StoreError::InvalidRequest(_))),
        "{not_an_owner:?}"
    );
    assert_eq!(store.pending(&b).await.unwrap(), 0);
}

async fn a_suspended_sleep_is_woken_only_by_its_time_or_a_cancellation(store: Arc<dyn Store>) {
    let a = id("a");
    let m = msg(&a, 0);
    store.enqueue(&m, None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    assert_eq!(
        store
            .suspend(&d.receipt, None, HOUR, "sleeping")
            .await
            .unwrap(),
        Suspension::Suspended
    );
    assert!(store.lease(&a, long()).await.unwrap().is_none());
    // No lane: an event on any of a's lanes wakes nothing.
    deliver(&*store, &a, "approved", 1).await;
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "an event woke a sleep"
    );
    assert_eq!(
        store.cancel(&a, m.id).await.unwrap(),
        Some(d.receipt.position)
    );
    let woken = store
        .lease(&a, long())
        .await
        .unwrap()
        .expect("woken by the cancellation");
    assert_eq!(woken.envelope.id, m.id);
    assert_eq!(woken.receipt.delivery, d.receipt.delivery + 1);
    // A short sleep runs out on its own.
    store.ack(&woken.receipt).await.unwrap();
    store.enqueue(&msg(&a, 1), None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    let delay = Duration::from_millis(100);
    assert_eq!(
        store
            .suspend(&d.receipt, None, delay, "sleeping")
            .await
            .unwrap(),
        Suspension::Suspended
    );
    wait_past(delay).await;
    assert!(
        store.lease(&a, long()).await.unwrap().is_some(),
        "the sleep's time passed"
    );
}

async fn cancel_wakes_a_message_suspended_on_a_lane_and_refuses_its_next_suspension(
    store: Arc<dyn Store>,
) {
    let (a, b) = (id("a"), id("b"));
    let lane = a.event_lane_in("approved", store.partitions());
    let m = msg(&a, 0);
    store.enqueue(&m, None).await.unwrap();
    let behind = msg(&a, 1);
    store.enqueue(&behind, None).await.unwrap();
    store.enqueue(&msg(&b, 0), None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    assert_eq!(
        store
            .suspend(&d.receipt, Some(&lane), HOUR, "w")
            .await
            .unwrap(),
        Suspension::Suspended
    );
    assert_eq!(
        store.cancel(&a, m.id).await.unwrap(),
        Some(d.receipt.position)
    );
    let mut ready = store.ready_actors(&["conf"], 10).await.unwrap();
    ready.sort();
    assert_eq!(
        ready,
        vec![a.clone(), b.clone()],
        "the woken actor is listed as ready"
    );
    let again = store.lease(&a, long()).await.unwrap().expect("woken");
    assert_eq!(
        again.envelope.id, m.id,
        "the cancelled message keeps its place"
    );
    // Cancelled: a suspension is refused and writes nothing, even with an event waiting.
    deliver(&*store, &a, "approved", 1).await;
    for lane in [Some(&lane), None] {
        assert_eq!(
            store
                .suspend(&again.receipt, lane, HOUR, "w")
                .await
                .unwrap(),
            Suspension::Cancelled
        );
    }
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "still out"
    );
    let listed = store.messages(&a, None, 10).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|w| (w.envelope.id, w.cancelling))
            .collect::<Vec<_>>(),
        vec![(m.id, true), (behind.id, false)]
    );
    // A second cancellation changes nothing; the mark goes with the message.
    assert_eq!(
        store.cancel(&a, m.id).await.unwrap(),
        Some(d.receipt.position)
    );
    store.ack(&again.receipt).await.unwrap();
    assert_eq!(
        store.cancel(&a, m.id).await.unwrap(),
        None,
        "acked: not in the mailbox"
    );
    let next = store
        .lease(&a, long())
        .await
        .unwrap()
        .expect("the message behind");
    assert_eq!(next.envelope.id, behind.id);
    assert_eq!(
        store.suspend(&next.receipt, None, HOUR, "w").await.unwrap(),
        Suspension::Suspended,
        "the mark of the message before was left behind"
    );
}

async fn cancel_marks_a_waiting_message_which_keeps_the_mark_when_handed_out(
    store: Arc<dyn Store>,
) {
    let a = id("a");
    let first = msg(&a, 0);
    let (now, later) = (msg(&a, 1), msg(&a, 2));
    store.enqueue(&first, None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    store.enqueue(&now, None).await.unwrap();
    store
        .enqueue(&later, Some(Timestamp::now() + HOUR))
        .await
        .unwrap();
    // Cancelling queued messages neither wakes nor disturbs the one out.
    let p_now = store.cancel(&a, now.id).await.unwrap().expect("queued");
    let p_later = store.cancel(&a, later.id).await.unwrap().expect("delayed");
    assert!(p_now > d.receipt.position && p_later > p_now);
    assert!(store.lease(&a, long()).await.unwrap().is_none());
    assert_eq!(
        store.suspend(&d.receipt, None, HOUR, "w").await.unwrap(),
        Suspension::Suspended,
        "another message's cancellation refused this one's suspension"
    );
    let listed = store.messages(&a, None, 10).await.unwrap();
    assert_eq!(
        listed.iter().map(|w| w.cancelling).collect::<Vec<_>>(),
        vec![false, true, true]
    );
    // Woken by its own cancellation only; then the marked message comes with its mark.
    assert_eq!(
        store.cancel(&a, first.id).await.unwrap(),
        Some(d.receipt.position)
    );
    let again = store.lease(&a, long()).await.unwrap().expect("woken");
    store.ack(&again.receipt).await.unwrap();
    let marked = store
        .lease(&a, long())
        .await
        .unwrap()
        .expect("the cancelled one");
    assert_eq!(marked.envelope.id, now.id);
    assert_eq!(
        store
            .suspend(&marked.receipt, None, HOUR, "w")
            .await
            .unwrap(),
        Suspension::Cancelled
    );
    // Dead-lettered, it takes its mark along; requeued, it is a new message, unmarked.
    let dead = store
        .dead_letter(&marked.receipt, "given up")
        .await
        .unwrap();
    store.requeue_dead_letter(dead).await.unwrap();
    let listed = store.messages(&a, None, 10).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|w| (w.envelope.id == later.id, w.cancelling))
            .collect::<Vec<_>>(),
        vec![(true, true), (false, false)]
    );
}

async fn cancel_of_a_message_not_in_the_mailbox_writes_nothing(store: Arc<dyn Store>) {
    let (a, b) = (id("a"), id("b"));
    let m = msg(&a, 0);
    assert_eq!(
        store.cancel(&a, m.id).await.unwrap(),
        None,
        "an empty mailbox"
    );
    store.enqueue(&m, None).await.unwrap();
    assert_eq!(
        store.cancel(&b, m.id).await.unwrap(),
        None,
        "another actor's message"
    );
    assert_eq!(
        store.cancel(&a, msg(&a, 1).id).await.unwrap(),
        None,
        "an unknown id"
    );
    assert_eq!(store.pending(&b).await.unwrap(), 0);
    let listed = store.messages(&a, None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].cancelling);
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    assert_eq!(
        store.suspend(&d.receipt, None, HOUR, "w").await.unwrap(),
        Suspension::Suspended
    );
}

async fn cancel_leaves_a_message_that_is_out_out(store: Arc<dyn Store>) {
    let a = id("a");
    let m = msg(&a, 0);
    store.enqueue(&m, None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    // Out and not suspended: marked, and left out.
    assert_eq!(
        store.cancel(&a, m.id).await.unwrap(),
        Some(d.receipt.position)
    );
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "a cancellation made a message that is out visible"
    );
    store.ack(&d.receipt).await.unwrap();
    // Suspended, then handed out again when its time passed: the suspension's mark is stale,
    // and a cancellation leaves the new delivery out.
    let m = msg(&a, 1);
    store.enqueue(&m, None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    let delay = Duration::from_millis(100);
    assert_eq!(
        store.suspend(&d.receipt, None, delay, "w").await.unwrap(),
        Suspension::Suspended
    );
    wait_past(delay).await;
    let again = store.lease(&a, long()).await.unwrap().expect("due again");
    assert!(store.cancel(&a, m.id).await.unwrap().is_some());
    assert!(
        store.lease(&a, long()).await.unwrap().is_none(),
        "a stale suspension let a cancellation expose a message that is out"
    );
    assert_eq!(
        store
            .suspend(&again.receipt, None, HOUR, "w")
            .await
            .unwrap(),
        Suspension::Cancelled
    );
}

/// `LeaseOptions::early`: a suspended message goes out up to `early` before its time, and only a
/// suspended one: a nack's delay, a delayed message and a suspension woken and handed out again
/// are kept to the letter.
async fn a_suspended_message_goes_out_early_and_no_other_delay_does(store: Arc<dyn Store>) {
    let early = |ms| LeaseOptions {
        early: Duration::from_millis(ms),
        ..long()
    };
    let a = id("a");
    let m = msg(&a, 0);
    store.enqueue(&m, None).await.unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    let sleep = Duration::from_secs(20);
    assert_eq!(
        store
            .suspend(&d.receipt, None, sleep, "sleeping")
            .await
            .unwrap(),
        Suspension::Suspended
    );
    assert!(store.lease(&a, long()).await.unwrap().is_none());
    assert!(
        store.lease(&a, early(10_000)).await.unwrap().is_none(),
        "handed out more than `early` before its time"
    );
    let got = store
        .lease(&a, early(30_000))
        .await
        .unwrap()
        .expect("a suspended message due within `early` goes out");
    assert_eq!(got.envelope.id, m.id);
    assert_eq!(got.receipt.delivery, d.receipt.delivery + 1);
    assert!(
        store.lease(&a, early(30_000)).await.unwrap().is_none(),
        "one message out at a time"
    );

    // Handed out again, then given back with a plain delay: not early.
    store
        .nack(&got.receipt, sleep, "failed; retry later")
        .await
        .unwrap();
    assert!(
        store.lease(&a, early(30_000)).await.unwrap().is_none(),
        "a nack's delay was cut short"
    );

    // A message due later does not go out early either.
    let b = id("b");
    store
        .enqueue(&msg(&b, 1), Some(Timestamp::now() + sleep))
        .await
        .unwrap();
    assert!(
        store.lease(&b, early(30_000)).await.unwrap().is_none(),
        "a delayed message went out early"
    );

    // A suspension woken (cancelled) and handed out again is no longer suspended.
    let c = id("c");
    let mc = msg(&c, 2);
    store.enqueue(&mc, None).await.unwrap();
    let d = store.lease(&c, long()).await.unwrap().expect("delivery");
    assert_eq!(
        store
            .suspend(&d.receipt, None, sleep, "sleeping")
            .await
            .unwrap(),
        Suspension::Suspended
    );
    store.cancel(&c, mc.id).await.unwrap();
    let woken = store.lease(&c, long()).await.unwrap().expect("woken");
    store.nack(&woken.receipt, sleep, "again").await.unwrap();
    assert!(
        store.lease(&c, early(30_000)).await.unwrap().is_none(),
        "a stale suspension mark let a nack's delay be cut short"
    );
}

/// A suspended message taken early but at its delivery limit goes to the dead letters, and the
/// lease then hands out only what is due by the real clock: a delayed message due within
/// `early` waits for its time.
async fn a_suspended_message_buried_early_leaves_the_next_to_its_time(store: Arc<dyn Store>) {
    let a = id("a");
    let first = msg(&a, 0);
    store.enqueue(&first, None).await.unwrap();
    let later = Duration::from_secs(20);
    store
        .enqueue(&msg(&a, 1), Some(Timestamp::now() + later))
        .await
        .unwrap();
    let d = store.lease(&a, long()).await.unwrap().expect("delivery");
    assert_eq!(
        store
            .suspend(&d.receipt, None, later, "sleeping")
            .await
            .unwrap(),
        Suspension::Suspended
    );
    let at_limit = LeaseOptions {
        early: Duration::from_secs(30),
        max_deliveries: 1,
        ..long()
    };
    assert!(
        store.lease(&a, at_limit).await.unwrap().is_none(),
        "the delayed message went out before its time"
    );
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].envelope.id, first.id);
    assert_eq!(
        store.pending(&a).await.unwrap(),
        1,
        "the delayed message is kept"
    );
}
