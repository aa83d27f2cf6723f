//! [`LeaseManager`] cases: one holder at a time, fencing tokens that only grow.

use std::sync::Arc;
use std::time::Duration;

use loom_core::limits::MAX_OWNER_LEN;
use loom_core::{ActorId, Store, StoreError};

use super::{Case, cases};

pub(super) fn cases() -> Vec<Case> {
    cases![
        acquire_a_free_lease,
        acquire_of_a_held_lease_fails_naming_the_holder,
        fencing_tokens_only_grow,
        renew_extends_the_lease,
        renew_after_expiry_fails_even_if_nobody_took_it,
        renew_with_a_stale_token_fails_after_takeover,
        renew_many_renews_held_leases_and_reports_lost_ones_in_order,
        release_never_touches_another_holders_lease,
        concurrent_acquires_have_one_winner,
        bad_owner_names_are_refused,
        leases_are_per_actor,
    ]
}

fn id(key: &str) -> ActorId {
    ActorId::new("conf", key).expect("valid id")
}

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(100);

async fn wait_past(d: Duration) {
    tokio::time::sleep(d + Duration::from_millis(150)).await;
}

async fn acquire_a_free_lease(store: Arc<dyn Store>) {
    let a = id("a");
    assert!(store.holder(&a).await.unwrap().is_none());
    let l = store.acquire(&a, "node-1", LONG).await.unwrap();
    assert_eq!(l.actor, a);
    assert_eq!(l.owner, "node-1");
    assert!(l.token >= 1);
    assert_eq!(store.holder(&a).await.unwrap(), Some(l));
}

async fn acquire_of_a_held_lease_fails_naming_the_holder(store: Arc<dyn Store>) {
    let a = id("a");
    let l = store.acquire(&a, "node-1", LONG).await.unwrap();
    let err = store.acquire(&a, "node-2", LONG).await.unwrap_err();
    match err {
        StoreError::LeaseHeld { owner, token, .. } => {
            assert_eq!(owner, "node-1");
            assert_eq!(token, l.token);
        }
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    let again = store.acquire(&a, "node-1", LONG).await;
    assert!(
        matches!(again, Err(StoreError::LeaseHeld { .. })),
        "a held lease was handed out twice"
    );
}

async fn fencing_tokens_only_grow(store: Arc<dyn Store>) {
    let a = id("a");
    let t1 = store.acquire(&a, "n1", LONG).await.unwrap();
    assert!(store.release(&t1).await.unwrap());
    let t2 = store.acquire(&a, "n2", SHORT).await.unwrap();
    wait_past(SHORT).await;
    let t3 = store.acquire(&a, "n3", LONG).await.unwrap();
    assert!(
        t1.token < t2.token && t2.token < t3.token,
        "{} {} {}",
        t1.token,
        t2.token,
        t3.token
    );
}

async fn renew_extends_the_lease(store: Arc<dyn Store>) {
    let a = id("a");
    let l = store
        .acquire(&a, "n1", Duration::from_millis(400))
        .await
        .unwrap();
    let renewed = store.renew(&l, LONG).await.unwrap();
    assert_eq!(renewed.token, l.token);
    assert!(renewed.expires_at > l.expires_at);
    wait_past(Duration::from_millis(400)).await;
    assert_eq!(
        store.holder(&a).await.unwrap().map(|h| h.token),
        Some(l.token)
    );
    assert!(matches!(
        store.acquire(&a, "n2", LONG).await,
        Err(StoreError::LeaseHeld { .. })
    ));
}

async fn renew_after_expiry_fails_even_if_nobody_took_it(store: Arc<dyn Store>) {
    let a = id("a");
    let l = store.acquire(&a, "n1", SHORT).await.unwrap();
    wait_past(SHORT).await;
    let err = store.renew(&l, LONG).await.unwrap_err();
    assert!(
        matches!(err, StoreError::LeaseLost { token, .. } if token == l.token),
        "{err:?}"
    );
    assert!(store.holder(&a).await.unwrap().is_none());
}

async fn renew_with_a_stale_token_fails_after_takeover(store: Arc<dyn Store>) {
    let a = id("a");
    let old = store.acquire(&a, "n1", SHORT).await.unwrap();
    wait_past(SHORT).await;
    let new = store.acquire(&a, "n2", LONG).await.unwrap();
    assert!(matches!(
        store.renew(&old, LONG).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert_eq!(store.holder(&a).await.unwrap(), Some(new));
}

async fn renew_many_renews_held_leases_and_reports_lost_ones_in_order(store: Arc<dyn Store>) {
    assert!(store.renew_many(&[], LONG).await.unwrap().is_empty());
    // Held, expired, taken over, released, held: in an order that is not the actors' order.
    let (e, b, c, d, a) = (id("e"), id("b"), id("c"), id("d"), id("a"));
    // The held leases have a ttl no loaded machine runs out before the renewal (500 ms once
    // did, in CI: the writes between took longer), and far below the renewal's.
    let held_ttl = Duration::from_secs(10);
    let held_e = store.acquire(&e, "n1", held_ttl).await.unwrap();
    let expired = store.acquire(&b, "n1", SHORT).await.unwrap();
    let stale = store.acquire(&c, "n1", SHORT).await.unwrap();
    let released = store.acquire(&d, "n1", LONG).await.unwrap();
    let held_a = store.acquire(&a, "n1", held_ttl).await.unwrap();
    wait_past(SHORT).await;
    let taker = store.acquire(&c, "n2", LONG).await.unwrap();
    assert!(store.release(&released).await.unwrap());
    let asked = [held_e.clone(), expired, stale, released, held_a.clone()];
    let out = store.renew_many(&asked, LONG).await.unwrap();
    assert_eq!(out.len(), asked.len());
    for (i, (r, l)) in out.iter().zip(&asked).enumerate() {
        match (i, r) {
            (0 | 4, Ok(renewed)) => {
                assert_eq!((&renewed.actor, renewed.token), (&l.actor, l.token));
                assert!(renewed.expires_at > l.expires_at, "slot {i} not extended");
            }
            (1..=3, Err(StoreError::LeaseLost { actor, token })) => {
                assert_eq!((actor, *token), (&l.actor, l.token), "slot {i}");
            }
            _ => panic!("slot {i}: unexpected {r:?}"),
        }
    }
    // The renewals took effect in the store: the leases it holds run out past their first ttl
    // (the renewal's 60 s, against 10 s).
    for held in [&held_e, &held_a] {
        let now = store
            .holder(&held.actor)
            .await
            .unwrap()
            .expect("still held");
        assert_eq!(now.token, held.token);
        assert!(
            now.expires_at > held.expires_at + Duration::from_secs(30),
            "{now:?} was not renewed (first {held:?})"
        );
    }
    // Nothing else changed.
    assert_eq!(store.holder(&c).await.unwrap(), Some(taker));
    assert!(store.holder(&b).await.unwrap().is_none());
    assert!(store.holder(&d).await.unwrap().is_none());
    assert!(matches!(
        store.renew_many(&[held_a], Duration::ZERO).await,
        Err(StoreError::InvalidRequest(_))
    ));
}

async fn release_never_touches_another_holders_lease(store: Arc<dyn Store>) {
    let a = id("a");
    let old = store.acquire(&a, "n1", SHORT).await.unwrap();
    wait_past(SHORT).await;
    let new = store.acquire(&a, "n2", LONG).await.unwrap();
    assert!(
        !store.release(&old).await.unwrap(),
        "a stale lease was released"
    );
    assert_eq!(store.holder(&a).await.unwrap(), Some(new.clone()));
    assert!(store.release(&new).await.unwrap());
    assert!(store.holder(&a).await.unwrap().is_none());
    assert!(!store.release(&new).await.unwrap(), "released twice");
}

async fn concurrent_acquires_have_one_winner(store: Arc<dyn Store>) {
    let a = id("a");
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = store.clone();
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            store.acquire(&a, &format!("node-{n}"), LONG).await
        }));
    }
    let mut winners = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => winners += 1,
            Err(StoreError::LeaseHeld { .. }) => {}
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(winners, 1);
}

async fn bad_owner_names_are_refused(store: Arc<dyn Store>) {
    let a = id("a");
    assert!(matches!(
        store.acquire(&a, "", LONG).await,
        Err(StoreError::InvalidRequest(_))
    ));
    assert!(matches!(
        store
            .acquire(&a, &"o".repeat(MAX_OWNER_LEN + 1), LONG)
            .await,
        Err(StoreError::TooLarge { .. })
    ));
    assert!(matches!(
        store.acquire(&a, "n1", Duration::ZERO).await,
        Err(StoreError::InvalidRequest(_))
    ));
    assert!(store.holder(&a).await.unwrap().is_none());
}

async fn leases_are_per_actor(store: Arc<dyn Store>) {
    let la = store.acquire(&id("a"), "n1", LONG).await.unwrap();
    let lb = store.acquire(&id("b"), "n2", LONG).await.unwrap();
    assert_eq!(store.holder(&id("a")).await.unwrap(), Some(la));
    assert_eq!(store.holder(&id("b")).await.unwrap(), Some(lb));
}
