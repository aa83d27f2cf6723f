//! Runtime cases about the nodes sharing a store: each announces itself and the kinds it
//! hosts, leaves when it shuts down, is seen gone when it crashes, and a second process under a
//! live node's name is refused until the name is free.

use std::time::Duration;

use loom_core::partition::{owner_of, ownership_partitions, partition_of};
use loom_core::runtime::{NodeHealth, Runtime};
use loom_core::store::Roster;
use loom_core::{ActorId, Envelope};

use super::common::{WAIT, finished};
use loom_core::runtime::Actor;

use super::{Account, AccountMsg, Harness, RuntimeCase, eventually, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        nodes_announce_their_kinds_and_leave_when_they_shut_down,
        a_second_process_under_a_live_name_is_refused_until_it_is_free,
        a_client_gets_replies_another_node_records_without_polling,
        a_client_only_node_never_scans_for_ready_actors,
        nodes_divide_the_partitions_and_hand_them_off,
        another_nodes_backlog_hides_none_of_this_nodes_work,
        a_partition_whose_take_never_answers_is_taken_at_a_later_look,
        an_unbounded_shutdown_timeout_still_hands_every_partition_back,
        a_node_that_dies_while_the_roster_cannot_be_read_is_taken_over,
        a_process_superseded_under_its_name_stands_down,
        a_process_refused_its_name_owns_no_partition,
        a_node_cannot_take_a_partition_while_a_journal_of_it_is_deleted,
    ]
}

/// `loom journal delete` (`delete_journal`) while a node comes to take the actor's partition:
/// the node's take, between the tool's start and its delete, is refused, and once the tool is
/// done the node takes the partition and writes after the deleted journal. Before, the tool
/// looked at the partition's holder and then deleted under the actor's own lease, which fences
/// nothing of a node's reads: a node that took the partition in between and loaded the actor
/// before the delete wrote on top of the emptied journal a change of the deleted state.
async fn a_node_cannot_take_a_partition_while_a_journal_of_it_is_deleted(h: &Harness) {
    use loom_core::runtime::delete_journal;
    use loom_core::store::backend::Turn;
    use loom_core::{Entry, EntryKind, StoreError};
    let actor = ActorId::new(Account::KIND, "deleted-under-a-node").expect("id");
    let failed = |seq| {
        Entry::new(
            seq,
            EntryKind::Failed {
                error: "x".into(),
                dead_lettered: false,
            },
        )
    };
    h.store
        .append(&actor, 1, &[failed(1), failed(2)])
        .await
        .expect("append");
    let part = ActorId::partition_lease(
        actor.kind(),
        partition_of(&actor, ownership_partitions(h.store.partitions())),
    );
    let ttl = Duration::from_secs(5);
    let pause = h.faults.pause_next_delete();
    let store = h.store.clone();
    let tool = actor.clone();
    let deleting = tokio::spawn(async move { delete_journal(&*store, &tool, "loom-tool").await });
    pause.reached.notified().await;
    // The delete is about to reach the store: a node taking the partition now is refused.
    match h.store.acquire(&part, "node-coming", ttl).await {
        Err(StoreError::LeaseHeld { owner, .. }) => assert_eq!(owner, "loom-tool"),
        other => {
            panic!("a node took the partition while a journal of it was being deleted: {other:?}")
        }
    }
    pause.resume.notify_one();
    deleting
        .await
        .expect("the delete did not panic")
        .expect("deleted");
    // Released: the node takes it, finds the journal empty, and writes after its seqs.
    let lease = h
        .store
        .acquire(&part, "node-coming", ttl)
        .await
        .expect("the partition is free once the delete is done");
    let info = h.store.info(&actor).await.expect("info");
    assert_eq!((info.len(), info.highest), (0, 2), "{info:?}");
    let next = [failed(3)];
    h.store
        .commit_turn(Turn {
            fence: Some(&lease),
            ..Turn::append(&actor, 3, &next)
        })
        .await
        .expect("a turn after the deleted journal");
    h.store.release(&lease).await.expect("release");
}

/// A node's first take of a partition's lease never answers (its connection went silent): the
/// take is given up after a lease ttl and the partition taken at a later look. Before, the look
/// waited for that answer for ever, so the partition was never owned, and no later look took
/// or handed off anything.
async fn a_partition_whose_take_never_answers_is_taken_at_a_later_look(h: &Harness) {
    h.faults
        .hang_acquires
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let rt = h.runtime_with(|c| c.node = "silent-take".into()).await;
    let parts = ownership_partitions(h.store.partitions());
    eventually(
        WAIT,
        "the node owns every partition",
        split_as(rt.kinds(), parts, &["silent-take"], &[&rt]),
    )
    .await;
    assert_eq!(
        h.faults
            .hang_acquires
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no take was left unanswered"
    );
    rt.shutdown().await;
}

/// A `shutdown_timeout` of `Duration::MAX` (no bound on the drain) still hands every partition
/// back when the node stops. Before, the hand-off's deadline overflowed: it panicked, and the
/// partitions were left to run out as a crash leaves them.
async fn an_unbounded_shutdown_timeout_still_hands_every_partition_back(h: &Harness) {
    let rt = h
        .runtime_with(|c| {
            c.node = "unbounded".into();
            c.shutdown_timeout = Duration::MAX;
        })
        .await;
    let parts = ownership_partitions(h.store.partitions());
    let kinds = rt.kinds();
    eventually(
        WAIT,
        "the node owns every partition",
        split_as(kinds.clone(), parts, &["unbounded"], &[&rt]),
    )
    .await;
    let acct = rt.actor::<Account>("unbounded").unwrap();
    assert_eq!(acct.ask(AccountMsg::Deposit(1)).await.expect("deposit"), 1);
    rt.shutdown().await;
    for (kind, p) in partitions_won(&kinds, parts, &["unbounded"], "unbounded") {
        let lease = ActorId::partition_lease(&kind, p);
        assert_eq!(
            h.store.holder(&lease).await.expect("holder"),
            None,
            "{lease} released"
        );
    }
}

/// A node that crashes while no node can read the roster (its key's shard down on a Redis
/// Cluster, say) still has its partitions taken over once its leases run out: the roster a
/// node goes on with ages as the node's clock runs, so the dead node's record runs out in it
/// too. Before, the last roster read judged who is live at the moment of that read for ever:
/// the dead node kept winning its partitions in the others' view, and nobody took them.
async fn a_node_that_dies_while_the_roster_cannot_be_read_is_taken_over(h: &Harness) {
    let node = |name: &'static str| {
        move |c: &mut loom_core::runtime::Config| {
            c.node = name.into();
            c.lease_ttl = Duration::from_millis(1500);
        }
    };
    let a = h.runtime_with(node("blind-a")).await;
    let b = h.runtime_with(node("blind-b")).await;
    let kinds = a.kinds();
    let parts = ownership_partitions(h.store.partitions());
    eventually(
        WAIT,
        "a and b divide the partitions",
        split_as(kinds.clone(), parts, &["blind-a", "blind-b"], &[&a, &b]),
    )
    .await;
    h.faults
        .fail_members
        .store(true, std::sync::atomic::Ordering::SeqCst);
    b.kill().await;
    eventually(
        WAIT,
        "a takes b's partitions with the roster unreadable",
        split_as(kinds.clone(), parts, &["blind-a"], &[&a]),
    )
    .await;
    h.faults
        .fail_members
        .store(false, std::sync::atomic::Ordering::SeqCst);
    a.shutdown().await;
}

/// A process whose heartbeats stop landing (it cannot reach the store's membership record, or
/// it is paused) while it keeps its partitions' leases, and whose name a newer process takes
/// once its record has run out: when its heartbeats land again and are refused, it stands down,
/// handing every partition to the newer process and taking none. Before, it went on renewing
/// their leases, which bear the name the newer process bears too, so the name's member owned
/// nothing for as long as the superseded process lived.
async fn a_process_superseded_under_its_name_stands_down(h: &Harness) {
    refused_process_stands_down(h, "twice", true).await;
}

/// The same for a process whose heartbeats failed from its start, so that it never was a
/// member, while it took every partition nobody held: once refused, it stands down too. (The
/// first fix stood down only a process that had been a member.)
async fn a_process_refused_its_name_owns_no_partition(h: &Harness) {
    refused_process_stands_down(h, "twice-unjoined", false).await;
}

async fn refused_process_stands_down(h: &Harness, name: &'static str, joined_first: bool) {
    use std::sync::atomic::Ordering::SeqCst;
    let ttl = Duration::from_millis(1500);
    let named = move |c: &mut loom_core::runtime::Config| {
        c.node = name.into();
        c.lease_ttl = ttl;
    };
    // The old process's own view of the store, so that its heartbeats alone fail.
    let own = crate::faults::FaultyStore::new(h.store.clone());
    let faults = own.faults.clone();
    faults.fail_heartbeats.store(!joined_first, SeqCst);
    let old = h.runtime_on(std::sync::Arc::new(own), named).await;
    let kinds = old.kinds();
    let parts = ownership_partitions(h.store.partitions());
    let all = partitions_won(&kinds, parts, &[name], name);
    eventually(
        WAIT,
        "the old process owns every partition",
        split_as(kinds.clone(), parts, &[name], &[&old]),
    )
    .await;
    if joined_first {
        assert!(matches!(old.health().node, NodeHealth::Member { .. }));
    } else {
        assert!(matches!(old.health().node, NodeHealth::Joining));
    }
    faults.fail_heartbeats.store(true, SeqCst);
    let new = h.runtime_with(named).await;
    eventually(
        ttl * 4,
        "the newer process joins under the name",
        || async { matches!(new.health().node, NodeHealth::Member { .. }) },
    )
    .await;
    faults.fail_heartbeats.store(false, SeqCst);
    eventually(WAIT, "the old process is refused its name", || async {
        matches!(
            old.health().node,
            NodeHealth::NameTaken { superseded, .. } if superseded == joined_first
        )
    })
    .await;
    eventually(
        WAIT,
        "the newer process owns every partition, the old one none",
        || async { new.partitions_owned() == all && old.partitions_owned().is_empty() },
    )
    .await;
    let acct = new.actor::<Account>(format!("after-{name}")).unwrap();
    assert_eq!(acct.ask(AccountMsg::Deposit(5)).await.expect("deposit"), 5);
    // It stays down: looks later it still owns nothing.
    tokio::time::sleep(ttl).await;
    assert!(old.partitions_owned().is_empty());
    assert!(!old.health().is_healthy());
    old.shutdown().await;
    new.shutdown().await;
}

/// The (kind, partition)s rendezvous hashing gives `node` among `nodes`, all hosting `kinds`,
/// in the order [`Runtime::partitions_owned`] lists them: what each node owns once the
/// roster has settled.
///
/// ```
/// use loom_testkit::runtime::partitions_won;
///
/// let a = partitions_won(&["counter"], 32, &["a", "b"], "a");
/// let b = partitions_won(&["counter"], 32, &["a", "b"], "b");
/// assert_eq!(a.len() + b.len(), 32);
/// assert!(a.iter().all(|p| !b.contains(p)));
/// ```
pub fn partitions_won(
    kinds: &[&str],
    parts: u32,
    nodes: &[&str],
    node: &str,
) -> Vec<(String, u32)> {
    let mut won = Vec::new();
    for kind in kinds {
        for p in 0..parts {
            if owner_of(nodes.iter().copied(), kind, p) == Some(node) {
                won.push((kind.to_string(), p));
            }
        }
    }
    won.sort();
    won
}

/// Nodes hosting the same kinds divide each kind's partitions as rendezvous hashing over the
/// live ones says, each holding the partitions' leases in the store, and an actor runs on its
/// partition's owner whichever node is asked. A node joining takes only the partitions it
/// wins, and the actors of those move to it with nothing lost or doubled; a graceful shutdown
/// hands its partitions back at once (well before its lease ttl); a crashed node's are taken
/// over once its leases run out.
async fn nodes_divide_the_partitions_and_hand_them_off(h: &Harness) {
    let short = Duration::from_millis(1500);
    let node = |name: &'static str, ttl: Duration| {
        move |c: &mut loom_core::runtime::Config| {
            c.node = name.into();
            c.lease_ttl = ttl;
        }
    };
    let a = h.runtime_with(node("part-a", short)).await;
    let b = h.runtime_with(node("part-b", short)).await;
    let mut kinds = a.kinds();
    kinds.sort();
    let parts = ownership_partitions(h.store.partitions());
    let split =
        |nodes: &[&'static str], rts: &[&Runtime]| split_as(kinds.clone(), parts, nodes, rts);
    eventually(
        WAIT,
        "a and b divide the partitions",
        split(&["part-a", "part-b"], &[&a, &b]),
    )
    .await;
    for (kind, p) in partitions_won(&kinds, parts, &["part-a", "part-b"], "part-a") {
        let holder = h
            .store
            .holder(&ActorId::partition_lease(&kind, p))
            .await
            .expect("holder")
            .expect("held");
        assert_eq!(holder.owner, "part-a", "{kind}.{p}");
    }

    // Every account runs on its partition's owner, whichever node was asked.
    let accounts: Vec<String> = (0..24).map(|i| format!("owned-{i}")).collect();
    let runs_on = |nodes: &[&str], key: &str| {
        let id = ActorId::new(Account::KIND, key).unwrap();
        owner_of(
            nodes.iter().copied(),
            Account::KIND,
            partition_of(&id, parts),
        )
        .unwrap()
        .to_owned()
    };
    for (i, key) in accounts.iter().enumerate() {
        let asked = if i % 2 == 0 { &a } else { &b };
        let acct = asked.actor::<Account>(key).unwrap();
        assert_eq!(acct.ask(AccountMsg::Deposit(1)).await.expect("deposit"), 1);
        let id = acct.id().clone();
        let (on, off) = if runs_on(&["part-a", "part-b"], key) == "part-a" {
            (&a, &b)
        } else {
            (&b, &a)
        };
        assert!(
            on.is_active(&id) && !off.is_active(&id),
            "{id} runs on its owner only"
        );
    }

    // A third joins (with a long lease ttl): it takes only what it wins.
    let before_a = a.partitions_owned();
    let before_b = b.partitions_owned();
    let c = h
        .runtime_with(node("part-c", Duration::from_secs(10)))
        .await;
    let three = ["part-a", "part-b", "part-c"];
    eventually(
        WAIT,
        "a, b and c divide the partitions",
        split(&three, &[&a, &b, &c]),
    )
    .await;
    assert!(!c.partitions_owned().is_empty());
    assert!(a.partitions_owned().iter().all(|p| before_a.contains(p)));
    assert!(b.partitions_owned().iter().all(|p| before_b.contains(p)));
    for key in &accounts {
        let acct = a.actor::<Account>(key).unwrap();
        assert_eq!(
            acct.ask(AccountMsg::Deposit(1)).await.expect("deposit"),
            2,
            "{key}"
        );
        if runs_on(&three, key) == "part-c" {
            assert!(c.is_active(acct.id()), "{key} moved to c");
            assert!(!a.is_active(acct.id()) && !b.is_active(acct.id()));
        }
    }

    // A graceful shutdown releases c's partitions: a and b have them back within a few looks,
    // long before c's 10 s leases could have run out.
    c.shutdown().await;
    eventually(
        Duration::from_secs(5),
        "c's partitions come back before its leases run out",
        split(&["part-a", "part-b"], &[&a, &b]),
    )
    .await;

    // A crash: b's partitions are taken over once its leases and its record run out.
    b.kill().await;
    eventually(WAIT, "a owns every partition", split(&["part-a"], &[&a])).await;
    for key in &accounts {
        let acct = a.actor::<Account>(key).unwrap();
        assert_eq!(
            acct.ask(AccountMsg::Deposit(1)).await.expect("deposit"),
            3,
            "{key}"
        );
    }
    a.shutdown().await;
    for kind in &kinds {
        for p in 0..parts {
            let lease = ActorId::partition_lease(kind, p);
            assert_eq!(
                h.store.holder(&lease).await.expect("holder"),
                None,
                "{lease} released"
            );
        }
    }
}

/// A node's ready scan looks only in the partitions it owns: a backlog of ready actors in the
/// partitions of another live node (one that runs nothing, as a stalled node would), many times
/// the scan's size and older than anything else, hides none of this node's work. Before the
/// ready index was per partition, the scan read the kind's whole index oldest first and kept
/// its own: a backlog of more than 8192 hid them until it shrank.
async fn another_nodes_backlog_hides_none_of_this_nodes_work(h: &Harness) {
    let parts = ownership_partitions(h.store.partitions());
    let nodes = ["scan-ghost", "scan-real"];
    // The ghost: live in the roster, hosting accounts, and running nothing.
    h.store
        .heartbeat("scan-ghost", 7, &[Account::KIND], Duration::from_secs(120))
        .await
        .expect("the ghost's heartbeat");
    let real = h.runtime_with(|c| c.node = "scan-real".into()).await;
    let mine = partitions_won(&[Account::KIND], parts, &nodes, "scan-real");
    assert!(!mine.is_empty() && mine.len() < parts as usize);
    eventually(WAIT, "the real node owns what it wins", || async {
        let owned: Vec<(String, u32)> = real
            .partitions_owned()
            .into_iter()
            .filter(|(kind, _)| kind == Account::KIND)
            .collect();
        owned == mine
    })
    .await;
    let owner = |id: &ActorId| owner_of(nodes, Account::KIND, partition_of(id, parts)).unwrap();
    let deposit = |id: &ActorId| {
        Envelope::new(
            id.clone(),
            serde_json::to_value(AccountMsg::Deposit(1)).unwrap(),
        )
    };
    let stalled: Vec<ActorId> = (0..)
        .map(|n| ActorId::new(Account::KIND, format!("stalled-{n}")).unwrap())
        .filter(|id| owner(id) == "scan-ghost")
        .take(9000)
        .collect();
    for chunk in stalled.chunks(256) {
        let messages: Vec<Envelope> = chunk.iter().map(deposit).collect();
        for r in futures::future::join_all(messages.iter().map(|m| h.store.enqueue(m, None))).await
        {
            r.expect("enqueue");
        }
    }
    // A message to an actor this node owns, from another process (only the scan finds it).
    let own = (0..)
        .map(|n| ActorId::new(Account::KIND, format!("own-{n}")).unwrap())
        .find(|id| owner(id) == "scan-real")
        .unwrap();
    h.store.enqueue(&deposit(&own), None).await.unwrap();
    finished(h, &own, 1).await;
    assert_eq!(
        h.store.pending(&stalled[0]).await.unwrap(),
        1,
        "the ghost's actors are left to it"
    );
    real.shutdown().await;
}

/// A check for [`eventually`]: each of `rts` (named `nodes`) owns exactly what it wins.
fn split_as(
    kinds: Vec<&'static str>,
    parts: u32,
    nodes: &[&'static str],
    rts: &[&Runtime],
) -> impl FnMut() -> std::future::Ready<bool> + use<> {
    let nodes = nodes.to_vec();
    let rts: Vec<Runtime> = rts.iter().map(|rt| (*rt).clone()).collect();
    move || {
        std::future::ready(
            nodes
                .iter()
                .zip(&rts)
                .all(|(n, rt)| rt.partitions_owned() == partitions_won(&kinds, parts, &nodes, n)),
        )
    }
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
    let client = h
        .client_with(|c| {
            c.node = "client-b".into();
            c.lease_ttl = ttl;
        })
        .await;
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

/// A node hosting no kind has no actor to run, so it never asks the store for ready actors
/// (it asked every `poll_interval`: on an embedded store a read of every partition each time).
async fn a_client_only_node_never_scans_for_ready_actors(h: &Harness) {
    use std::sync::atomic::Ordering;
    let client = h.client_with(|_| {}).await;
    let before = h.faults.ready_scans.load(Ordering::SeqCst);
    // Twenty-five polls' time (20 ms each), and a send, which wakes no one here.
    client
        .actor::<Account>("unscanned")
        .unwrap()
        .send(AccountMsg::Deposit(1))
        .await
        .expect("sent");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let scans = h.faults.ready_scans.load(Ordering::SeqCst) - before;
    assert_eq!(scans, 0, "a client-only node scanned for ready actors");
    client.shutdown().await;
}

/// A client-only node's `ask` to an actor another node runs is answered when the reply is
/// recorded, by the store's signal (`IdempotencyStore::completions`), not at the client's next
/// look: with a poll of 20 s and a timeout of 5 s, an ask answered only by its look would take
/// the whole 5 s (its last look, at the deadline, finds the reply); five of them take a
/// fraction of one.
async fn a_client_gets_replies_another_node_records_without_polling(h: &Harness) {
    let host = h.runtime().await;
    let client = h
        .client_with(|c| {
            c.poll_interval = std::time::Duration::from_secs(10);
            c.ask_timeout = std::time::Duration::from_secs(5);
        })
        .await;
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
