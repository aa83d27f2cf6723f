//! [`IdempotencyStore`] cases: atomic reservation, recorded results, expiry.

use std::sync::Arc;
use std::time::Duration;

use loom_core::limits::MAX_RESULT_BYTES;
use loom_core::{ActorId, IdempotencyKey, Limit, Reservation, Store, StoreError};
use serde_json::json;

use super::{Case, cases};

pub(super) fn cases() -> Vec<Case> {
    cases![
        reserve_once_then_pending,
        concurrent_reservations_have_one_winner,
        completed_key_returns_its_result,
        expired_records_free_the_key,
        abandon_frees_a_pending_key_but_keeps_a_result,
        purge_removes_only_expired_records,
        oversized_result_is_refused,
        keys_are_scoped_by_actor,
    ]
}

fn id(key: &str) -> ActorId {
    ActorId::new("conf", key).expect("valid id")
}

fn key(k: &str) -> IdempotencyKey {
    IdempotencyKey::new(k).expect("valid key")
}

const LONG: Duration = Duration::from_secs(600);
const SHORT: Duration = Duration::from_millis(100);

async fn wait_past(d: Duration) {
    tokio::time::sleep(d + Duration::from_millis(150)).await;
}

async fn reserve_once_then_pending(store: Arc<dyn Store>) {
    let (a, k) = (id("a"), key("k1"));
    assert_eq!(store.lookup(&a, &k).await.unwrap(), None);
    assert_eq!(
        store.reserve(&a, &k, LONG).await.unwrap(),
        Reservation::Reserved
    );
    assert!(matches!(
        store.reserve(&a, &k, LONG).await.unwrap(),
        Reservation::Pending { .. }
    ));
    assert!(matches!(
        store.lookup(&a, &k).await.unwrap(),
        Some(Reservation::Pending { .. })
    ));
}

async fn concurrent_reservations_have_one_winner(store: Arc<dyn Store>) {
    let (a, k) = (id("a"), key("race"));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, a, k) = (store.clone(), a.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            store.reserve(&a, &k, LONG).await.unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        if t.await.unwrap() == Reservation::Reserved {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

async fn completed_key_returns_its_result(store: Arc<dyn Store>) {
    let (a, k) = (id("a"), key("k1"));
    store.reserve(&a, &k, LONG).await.unwrap();
    let result = json!({"reply": 100, "message_id": "m-1"});
    store.complete(&a, &k, &result, LONG).await.unwrap();
    assert_eq!(
        store.reserve(&a, &k, LONG).await.unwrap(),
        Reservation::Completed(result.clone())
    );
    assert_eq!(
        store.lookup(&a, &k).await.unwrap(),
        Some(Reservation::Completed(result))
    );
}

async fn expired_records_free_the_key(store: Arc<dyn Store>) {
    let (a, pending, done) = (id("a"), key("pending"), key("done"));
    store.reserve(&a, &pending, SHORT).await.unwrap();
    store.reserve(&a, &done, LONG).await.unwrap();
    store.complete(&a, &done, &json!(1), SHORT).await.unwrap();
    wait_past(SHORT).await;
    assert_eq!(store.lookup(&a, &pending).await.unwrap(), None);
    assert_eq!(store.lookup(&a, &done).await.unwrap(), None);
    assert_eq!(
        store.reserve(&a, &pending, LONG).await.unwrap(),
        Reservation::Reserved
    );
    assert_eq!(
        store.reserve(&a, &done, LONG).await.unwrap(),
        Reservation::Reserved
    );
}

async fn abandon_frees_a_pending_key_but_keeps_a_result(store: Arc<dyn Store>) {
    let (a, k, done) = (id("a"), key("k"), key("done"));
    store.reserve(&a, &k, LONG).await.unwrap();
    assert!(store.abandon(&a, &k).await.unwrap());
    assert!(!store.abandon(&a, &k).await.unwrap());
    assert_eq!(
        store.reserve(&a, &k, LONG).await.unwrap(),
        Reservation::Reserved
    );
    store.reserve(&a, &done, LONG).await.unwrap();
    store.complete(&a, &done, &json!("r"), LONG).await.unwrap();
    assert!(!store.abandon(&a, &done).await.unwrap());
    assert_eq!(
        store.lookup(&a, &done).await.unwrap(),
        Some(Reservation::Completed(json!("r")))
    );
}

async fn purge_removes_only_expired_records(store: Arc<dyn Store>) {
    let a = id("a");
    for n in 0..5 {
        store
            .reserve(&a, &key(&format!("short-{n}")), SHORT)
            .await
            .unwrap();
    }
    store.reserve(&a, &key("long"), LONG).await.unwrap();
    wait_past(SHORT).await;
    let mut purged = 0;
    loop {
        let n = store.purge_expired(2).await.unwrap();
        assert!(n <= 2, "purged {n} records with a limit of 2");
        if n == 0 {
            break;
        }
        purged += n;
    }
    // A backend that expires records by itself (Redis) has nothing left to purge.
    assert!(
        purged == 5 || purged == 0,
        "purged {purged} of 5 expired records"
    );
    for n in 0..5 {
        assert_eq!(
            store.lookup(&a, &key(&format!("short-{n}"))).await.unwrap(),
            None
        );
    }
    assert!(
        store.lookup(&a, &key("long")).await.unwrap().is_some(),
        "a live record was purged"
    );
}

async fn oversized_result_is_refused(store: Arc<dyn Store>) {
    let (a, k) = (id("a"), key("k"));
    store.reserve(&a, &k, LONG).await.unwrap();
    let big = json!("r".repeat(MAX_RESULT_BYTES));
    let err = store.complete(&a, &k, &big, LONG).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TooLarge {
                limit_kind: Limit::ResultBytes,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        store.lookup(&a, &k).await.unwrap(),
        Some(Reservation::Pending { .. })
    ));
    assert!(matches!(
        store.reserve(&a, &k, Duration::ZERO).await,
        Err(StoreError::InvalidRequest(_))
    ));
}

async fn keys_are_scoped_by_actor(store: Arc<dyn Store>) {
    let k = key("same");
    assert_eq!(
        store.reserve(&id("a"), &k, LONG).await.unwrap(),
        Reservation::Reserved
    );
    assert_eq!(
        store.reserve(&id("b"), &k, LONG).await.unwrap(),
        Reservation::Reserved
    );
}
