//! [`loom_core::Parking`] cases: a parked actor's mailbox is held on every node until it is
//! unparked, parking is fenced, and the records list in order.

use std::sync::Arc;
use std::time::Duration;

use loom_core::{ActorId, Envelope, LeaseOptions, Park, Store, StoreError};
use serde_json::json;

use super::{Case, cases};

pub(super) fn cases() -> Vec<Case> {
    cases![
        park_holds_the_mailbox_until_unpark,
        park_fenced_by_a_lost_lease_changes_nothing,
        parked_actors_list_in_id_order,
        unpark_of_an_actor_not_parked_is_none,
    ]
}

fn id(key: &str) -> ActorId {
    ActorId::new("conf", key).expect("valid id")
}

fn opts(visibility: Duration) -> LeaseOptions {
    LeaseOptions {
        visibility,
        max_deliveries: 5,
        ..LeaseOptions::default()
    }
}

fn record(reason: &str) -> Park {
    Park {
        message_id: Some(loom_core::MessageId::new()),
        step: Some(2),
        ..Park::new("node-a", reason)
    }
}

async fn park_holds_the_mailbox_until_unpark(store: Arc<dyn Store>) {
    let a = id("a");
    let first = Envelope::new(a.clone(), json!(1));
    store.enqueue(&first, None).await.unwrap();
    store
        .enqueue(&Envelope::new(a.clone(), json!(2)), None)
        .await
        .unwrap();
    let short = Duration::from_millis(200);
    // Out twice already (the attempts before the runtime gave up and parked it).
    store
        .lease(&a, opts(short))
        .await
        .unwrap()
        .expect("delivery");
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    let d = store.lease(&a, opts(short)).await.unwrap().expect("again");
    assert_eq!(d.envelope.attempt, 1);
    let lease = store
        .acquire(&a, "node-a", Duration::from_secs(60))
        .await
        .unwrap();
    let park = record("the code changed");
    store.park(&a, &park, Some(&lease)).await.unwrap();
    assert_eq!(store.parked(&a).await.unwrap(), Some(park.clone()));
    // Held: its visibility runs out, yet nothing is handed out, and it is not ready.
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    assert!(store.lease(&a, opts(short)).await.unwrap().is_none());
    assert!(store.ready_actors(&["conf"], 10).await.unwrap().is_empty());
    // New messages wait too.
    store
        .enqueue(&Envelope::new(a.clone(), json!(3)), None)
        .await
        .unwrap();
    assert!(store.ready_actors(&["conf"], 10).await.unwrap().is_empty());
    assert!(store.lease(&a, opts(short)).await.unwrap().is_none());
    assert_eq!(store.pending(&a).await.unwrap(), 3);
    // Unparked: the same message at once, then the others in order.
    assert_eq!(store.unpark(&a).await.unwrap(), Some(park));
    assert!(store.parked(&a).await.unwrap().is_none());
    assert_eq!(
        store.ready_actors(&["conf"], 10).await.unwrap(),
        vec![a.clone()]
    );
    let back = store
        .lease(&a, opts(Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("the held message");
    assert_eq!(back.envelope.id, first.id);
    // Its deliveries counted on, so that the receipt from before the park stays stale.
    assert_eq!(back.envelope.attempt, 2);
    assert_ne!(back.receipt, d.receipt);
    assert!(matches!(
        store.ack(&d.receipt).await,
        Err(StoreError::StaleReceipt { .. })
    ));
    store.ack(&back.receipt).await.unwrap();
    for n in [2, 3] {
        let d = store
            .lease(&a, opts(Duration::from_secs(60)))
            .await
            .unwrap()
            .expect("next");
        assert_eq!(d.envelope.payload, json!(n));
        store.ack(&d.receipt).await.unwrap();
    }
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
}

async fn park_fenced_by_a_lost_lease_changes_nothing(store: Arc<dyn Store>) {
    let a = id("a");
    store
        .enqueue(&Envelope::new(a.clone(), json!(1)), None)
        .await
        .unwrap();
    let old = store
        .acquire(&a, "old", Duration::from_millis(200))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    let _new = store
        .acquire(&a, "new", Duration::from_secs(60))
        .await
        .unwrap();
    let err = store
        .park(&a, &record("stale node"), Some(&old))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err:?}");
    assert!(store.parked(&a).await.unwrap().is_none());
    assert_eq!(
        store.ready_actors(&["conf"], 10).await.unwrap(),
        vec![a.clone()]
    );
    assert!(
        store
            .lease(&a, opts(Duration::from_secs(60)))
            .await
            .unwrap()
            .is_some()
    );
}

async fn parked_actors_list_in_id_order(store: Arc<dyn Store>) {
    for k in ["c", "a", "b", "d"] {
        store.park(&id(k), &record(k), None).await.unwrap();
    }
    store.unpark(&id("d")).await.unwrap();
    let all = store.parked_actors(None, 10).await.unwrap();
    let keys: Vec<&str> = all.iter().map(|(a, _)| a.key()).collect();
    assert_eq!(keys, vec!["a", "b", "c"]);
    assert_eq!(all[1].1.reason, "b");
    let page = store.parked_actors(Some(&id("a")), 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].0, id("b"));
}

async fn unpark_of_an_actor_not_parked_is_none(store: Arc<dyn Store>) {
    assert!(store.unpark(&id("nobody")).await.unwrap().is_none());
    assert!(store.parked(&id("nobody")).await.unwrap().is_none());
}
