//! [`loom_core::Membership`] cases: heartbeats record a node and its kinds on the store's
//! clock, a live name refuses a second process, gone nodes free their name and are forgotten,
//! and leaving touches only one's own record.

use std::sync::Arc;
use std::time::Duration;

use loom_core::store::{FORGET_AFTER_TTLS, MAX_NODE_KINDS};
use loom_core::{Store, StoreError, Timestamp};

use super::{Case, cases};

pub(super) fn cases() -> Vec<Case> {
    cases![
        heartbeat_records_the_node_and_its_kinds,
        a_live_name_refuses_another_incarnation,
        a_gone_name_is_free_and_later_forgotten,
        leave_removes_only_its_own_incarnation,
        members_list_in_name_order_on_the_store_clock,
        bad_heartbeats_are_refused_and_write_nothing,
        racing_first_heartbeats_let_one_incarnation_win,
    ]
}

const LONG: Duration = Duration::from_secs(30);

async fn heartbeat_records_the_node_and_its_kinds(store: Arc<dyn Store>) {
    assert!(store.members().await.unwrap().members.is_empty());
    let first = store
        .heartbeat("node-a", 7, &["order", "account", "order"], LONG)
        .await
        .unwrap();
    assert_eq!(first.node, "node-a");
    assert_eq!(first.incarnation, 7);
    assert_eq!(first.kinds, ["account", "order"], "sorted, no repeats");
    assert_eq!(first.joined_at, first.beat_at);
    assert_eq!(first.ttl, LONG);
    let roster = store.members().await.unwrap();
    assert_eq!(roster.members, std::slice::from_ref(&first));
    assert!(roster.at >= first.beat_at);
    assert_eq!(roster.hosts("account").count(), 1);
    assert_eq!(roster.hosts("ledger").count(), 0);

    // The same process beats again: a later beat, the same joining, the kinds it says now.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = store
        .heartbeat("node-a", 7, &["ledger"], LONG)
        .await
        .unwrap();
    assert_eq!(second.joined_at, first.joined_at);
    assert!(second.beat_at > first.beat_at, "{second:?} after {first:?}");
    assert_eq!(second.kinds, ["ledger"]);
    assert_eq!(store.members().await.unwrap().members, [second]);

    // A client-only node hosts nothing.
    let client = store.heartbeat("client", 8, &[], LONG).await.unwrap();
    assert!(client.kinds.is_empty());
    let roster = store.members().await.unwrap();
    assert_eq!(roster.live().count(), 2);
    assert_eq!(roster.members[0], client);
}

async fn a_live_name_refuses_another_incarnation(store: Arc<dyn Store>) {
    let first = store
        .heartbeat("web-1", 1, &["account"], LONG)
        .await
        .unwrap();
    match store.heartbeat("web-1", 2, &["order"], LONG).await {
        Err(StoreError::NodeTaken {
            node,
            incarnation,
            remaining_ms,
        }) => {
            assert_eq!((node.as_str(), incarnation), ("web-1", 1));
            assert!(
                remaining_ms > 0 && remaining_ms <= LONG.as_millis() as u64,
                "{remaining_ms}"
            );
        }
        other => panic!("a second process under a live name: {other:?}"),
    }
    // Nothing written: the first process's record, as it was.
    assert_eq!(
        store.members().await.unwrap().members,
        std::slice::from_ref(&first)
    );
    // An incarnation that is the first's in its low or high bits only is another one.
    let high = 1u64 << 63 | 1;
    assert!(matches!(
        store.heartbeat("web-1", high, &[], LONG).await,
        Err(StoreError::NodeTaken { .. })
    ));
    // The first goes on beating.
    store
        .heartbeat("web-1", 1, &["account"], LONG)
        .await
        .unwrap();
}

async fn a_gone_name_is_free_and_later_forgotten(store: Arc<dyn Store>) {
    let ttl = Duration::from_millis(100);
    let crashed = store.heartbeat("n", 1, &["account"], ttl).await.unwrap();
    // Wait out the ttl on the store's clock.
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let roster = store.members().await.unwrap();
    assert_eq!(
        roster.members,
        std::slice::from_ref(&crashed),
        "gone, still listed"
    );
    assert_eq!(roster.live().count(), 0);
    assert_eq!(roster.hosts("account").count(), 0);

    // A new process under the name joins afresh; an incarnation above i64::MAX round-trips.
    let inc = u64::MAX - 5;
    let restarted = store.heartbeat("n", inc, &["account"], LONG).await.unwrap();
    assert_eq!(restarted.incarnation, inc);
    assert!(restarted.joined_at > crashed.joined_at);
    assert_eq!(
        store.members().await.unwrap().members,
        std::slice::from_ref(&restarted)
    );

    // One that stops beating is listed as gone, then forgotten FORGET_AFTER_TTLS ttls after
    // its last beat; another's heartbeat deletes it.
    // Forgotten 2 s after its beat: listed as gone well before that on a slow machine.
    let short = Duration::from_millis(200);
    store.heartbeat("old", 3, &[], short).await.unwrap();
    tokio::time::sleep(short * 2).await;
    let roster = store.members().await.unwrap();
    assert_eq!(roster.members.len(), 2, "{roster:?}");
    assert!(!roster.members[1].is_live(roster.at));
    tokio::time::sleep(short * FORGET_AFTER_TTLS + Duration::from_millis(100)).await;
    let roster = store.members().await.unwrap();
    assert_eq!(
        roster.members,
        std::slice::from_ref(&restarted),
        "forgotten"
    );
    store.heartbeat("n", inc, &["account"], LONG).await.unwrap();
    // Once forgotten, its name is as new.
    let again = store.heartbeat("old", 4, &[], LONG).await.unwrap();
    assert_eq!(again.joined_at, again.beat_at);
}

async fn leave_removes_only_its_own_incarnation(store: Arc<dyn Store>) {
    let m = store.heartbeat("n", 1, &["a"], LONG).await.unwrap();
    assert!(!store.leave("n", 2).await.unwrap(), "another incarnation's");
    assert_eq!(store.members().await.unwrap().members, [m]);
    assert!(!store.leave("other", 1).await.unwrap(), "no such node");
    assert!(store.leave("n", 1).await.unwrap());
    assert!(store.members().await.unwrap().members.is_empty());
    assert!(!store.leave("n", 1).await.unwrap(), "already gone");
    // Left: the name is free at once.
    store.heartbeat("n", 2, &[], LONG).await.unwrap();
}

async fn members_list_in_name_order_on_the_store_clock(store: Arc<dyn Store>) {
    // Names as a careful user might give them: separators the stores' records use, spaces,
    // non-ASCII.
    let names = ["b", "a|b", "a", "a,b", "né 1", "z:{x}"];
    for (i, n) in names.iter().enumerate() {
        store
            .heartbeat(n, i as u64, &["k1", "k-2.x_y"], LONG)
            .await
            .unwrap();
    }
    let before = Timestamp::now();
    let roster = store.members().await.unwrap();
    let listed: Vec<&str> = roster.members.iter().map(|m| m.node.as_str()).collect();
    let mut sorted = names.to_vec();
    sorted.sort();
    assert_eq!(listed, sorted, "byte order");
    for m in &roster.members {
        assert_eq!(m.kinds, ["k-2.x_y", "k1"]);
        let i = names.iter().position(|n| *n == m.node).unwrap();
        assert_eq!(m.incarnation, i as u64);
    }
    // The store's clock (a server on this machine): near this process's.
    let skew = roster.at.as_millis().abs_diff(before.as_millis());
    assert!(skew < 2_000, "store clock {} vs {before}", roster.at);
}

async fn bad_heartbeats_are_refused_and_write_nothing(store: Arc<dyn Store>) {
    let e = store.heartbeat("", 1, &[], LONG).await.unwrap_err();
    assert!(matches!(e, StoreError::InvalidRequest(_)), "{e:?}");
    let long = "n".repeat(loom_core::limits::MAX_OWNER_LEN + 1);
    let e = store.heartbeat(&long, 1, &[], LONG).await.unwrap_err();
    assert!(matches!(e, StoreError::TooLarge { .. }), "{e:?}");
    let e = store.heartbeat("n\n1", 1, &[], LONG).await.unwrap_err();
    assert!(matches!(e, StoreError::InvalidRequest(_)), "{e:?}");
    let e = store.heartbeat("n", 1, &["a/b"], LONG).await.unwrap_err();
    assert!(matches!(e, StoreError::InvalidId(_)), "{e:?}");
    let e = store.heartbeat("n", 1, &[""], LONG).await.unwrap_err();
    assert!(matches!(e, StoreError::InvalidId(_)), "{e:?}");
    let e = store
        .heartbeat("n", 1, &[], Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::InvalidRequest(_)), "{e:?}");
    let many: Vec<String> = (0..=MAX_NODE_KINDS).map(|i| format!("k{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let e = store.heartbeat("n", 1, &many, LONG).await.unwrap_err();
    assert!(
        matches!(e, StoreError::TooLarge { limit, .. } if limit == MAX_NODE_KINDS),
        "{e:?}"
    );
    assert!(store.members().await.unwrap().members.is_empty());
    // At the limit it is taken.
    let m = store
        .heartbeat("n", 1, &many[..MAX_NODE_KINDS], LONG)
        .await
        .unwrap();
    assert_eq!(m.kinds.len(), MAX_NODE_KINDS);
    assert_eq!(store.members().await.unwrap().members, [m]);
}

async fn racing_first_heartbeats_let_one_incarnation_win(store: Arc<dyn Store>) {
    for round in 0..5 {
        let node = format!("race-{round}");
        let tasks: Vec<_> = (1..=8u64)
            .map(|inc| {
                let (store, node) = (store.clone(), node.clone());
                tokio::spawn(async move { store.heartbeat(&node, inc, &[], LONG).await })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(m) => winners.push(m),
                Err(StoreError::NodeTaken { .. }) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let roster = store.members().await.unwrap();
        let listed: Vec<_> = roster.members.iter().filter(|m| m.node == node).collect();
        assert_eq!(listed, [&winners[0]]);
    }
}
