//! Runtime cases about the nodes sharing a store: each announces itself and the kinds it
//! hosts, leaves when it shuts down, is seen gone when it crashes, and a second process under a
//! live node's name is refused until the name is free.

use loom_core::runtime::{NodeHealth, Runtime};
use loom_core::store::Roster;

use super::common::WAIT;
use loom_core::runtime::Actor;

use super::{Account, AccountMsg, Harness, RuntimeCase, eventually, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        nodes_announce_their_kinds_and_leave_when_they_shut_down,
        a_second_process_under_a_live_name_is_refused_until_it_is_free,
        a_client_gets_replies_another_node_records_without_polling,
    ]
}

async fn roster(h: &Harness) -> Roster {
    h.store.members().await.expect("members")
}

fn live(roster: &Roster) -> Vec<(String, Vec<String>)> {
    roster
        .live()
        .map(|m| (m.node.clone(), m.kinds.clone()))
        .collect()
}

/// A hosting node and a client-only one are listed live with their kinds; a graceful shutdown
/// removes its node at once; a crash leaves its record to run out a lease ttl after its last
/// heartbeat, after which no live node hosts its kinds.
async fn nodes_announce_their_kinds_and_leave_when_they_shut_down(h: &Harness) {
    // Beats every 500 ms: no stall of a loaded machine makes a node look gone meanwhile.
    let ttl = std::time::Duration::from_millis(1500);
    let host = h
        .runtime_with(|c| {
            c.node = "host-a".into();
            c.lease_ttl = ttl;
        })
        .await;
    let client = Runtime::builder()
        .store(h.store.clone())
        .config(loom_core::runtime::Config {
            node: "client-b".into(),
            lease_ttl: ttl,
            ..Harness::config()
        })
        .sends_to::<Account>()
        .start()
        .await
        .expect("client starts");
    let mut hosted: Vec<String> = host.kinds().iter().map(|k| k.to_string()).collect();
    hosted.sort();
    eventually(WAIT, "both nodes are listed", || async {
        live(&roster(h).await)
            == [
                ("client-b".to_owned(), vec![]),
                ("host-a".to_owned(), hosted.clone()),
            ]
    })
    .await;
    assert!(
        roster(h)
            .await
            .hosts(Account::KIND)
            .any(|m| m.node == "host-a")
    );
    // The runtime learns its heartbeat was recorded just after the store shows it.
    eventually(WAIT, "the host knows it is a member", || async {
        matches!(host.health().node, NodeHealth::Member { .. })
    })
    .await;
    assert!(host.health().is_healthy());

    // Its heartbeats go on: after several lease ttls it is still live.
    tokio::time::sleep(ttl * 3).await;
    assert_eq!(live(&roster(h).await).len(), 2);

    // A graceful shutdown leaves at once.
    client.shutdown().await;
    let r = roster(h).await;
    assert_eq!(live(&r), [("host-a".to_owned(), hosted.clone())]);
    assert!(r.members.iter().all(|m| m.node != "client-b"), "{r:?}");

    // A crash leaves the record, which runs out a lease ttl after the last heartbeat.
    host.kill().await;
    let r = roster(h).await;
    assert!(r.members.iter().any(|m| m.node == "host-a"));
    eventually(ttl * 2, "the crashed node is seen gone", || async {
        roster(h).await.live().count() == 0
    })
    .await;
    let r = roster(h).await;
    assert_eq!(r.members.len(), 1, "gone, still listed: {r:?}");
    assert_eq!(r.hosts(Account::KIND).count(), 0);
}

/// Two processes given one node name: the second's heartbeats are refused (its health says
/// so, and it is not listed), the first's record stays as it was; once the first crashes and
/// its record runs out, the second joins.
async fn a_second_process_under_a_live_name_is_refused_until_it_is_free(h: &Harness) {
    let ttl = std::time::Duration::from_millis(1500);
    let named = |c: &mut loom_core::runtime::Config| {
        c.node = "web-1".into();
        c.lease_ttl = ttl;
    };
    let first = h.runtime_with(named).await;
    eventually(WAIT, "the first joins", || async {
        matches!(first.health().node, NodeHealth::Member { .. })
    })
    .await;
    let joined = roster(h).await.members[0].clone();
    let second = h.runtime_with(named).await;
    eventually(WAIT, "the second is refused", || async {
        matches!(second.health().node, NodeHealth::NameTaken { .. })
    })
    .await;
    assert!(!second.health().is_healthy());
    let r = roster(h).await;
    assert_eq!(r.members.len(), 1);
    assert_eq!(
        r.members[0].incarnation, joined.incarnation,
        "the first's record"
    );
    assert!(first.health().is_healthy());

    // The first crashes: within a lease ttl (and a heartbeat period) the second is a member.
    first.kill().await;
    eventually(
        ttl * 3,
        "the second joins once the name is free",
        || async { matches!(second.health().node, NodeHealth::Member { .. }) },
    )
    .await;
    assert!(second.health().is_healthy());
    let r = roster(h).await;
    assert_eq!(r.members.len(), 1);
    assert_ne!(r.members[0].incarnation, joined.incarnation);
    assert!(r.members[0].is_live(r.at));
    second.shutdown().await;
    assert!(roster(h).await.members.is_empty(), "left");
}

/// A client-only node's `ask` to an actor another node runs is answered when the reply is
/// recorded, by the store's signal (`IdempotencyStore::completions`), not at the client's next
/// look: with a poll of 20 s and a timeout of 5 s, an ask answered only by its look would take
/// the whole 5 s (its last look, at the deadline, finds the reply); five of them take a
/// fraction of one.
async fn a_client_gets_replies_another_node_records_without_polling(h: &Harness) {
    let host = h.runtime().await;
    let client = Runtime::builder()
        .store(h.store.clone())
        .config(loom_core::runtime::Config {
            poll_interval: std::time::Duration::from_secs(10),
            ask_timeout: std::time::Duration::from_secs(5),
            ..Harness::config()
        })
        .sends_to::<Account>()
        .start()
        .await
        .expect("client starts");
    let a = client.actor::<Account>("signalled").unwrap();
    let started = std::time::Instant::now();
    for i in 1..=5i64 {
        assert_eq!(
            a.ask(AccountMsg::Deposit(1))
                .await
                .expect("answered before the timeout"),
            i
        );
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "five asks took {:?}: answered by polling, not by the signal",
        started.elapsed()
    );
    assert_eq!(client.metrics().invocations, 0, "the client ran the actor");
    client.shutdown().await;
    host.shutdown().await;
}
