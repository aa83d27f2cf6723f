//! The embedded store's partitions and relay under the faults the conformance kit cannot
//! reach through the store contract: a move repeated after a crash between "enqueued there"
//! and "trimmed here", relays that stop while senders compact and delete, a store reopened in
//! between, and the partition count recorded in the files.

use std::time::Duration;

use loom_core::embedded::check_outboxes;
use loom_core::partition::partition_of;
use loom_core::store::backend::{Outgoing, Turn};
use loom_core::{
    ActorId, EmbeddedOptions, EmbeddedStore, Entry, EntryKind, Envelope, JournalStore,
    LeaseOptions, Mailbox, Snapshot, Store, StoreError,
};
use serde_json::json;

fn with(partitions: u32) -> EmbeddedOptions {
    EmbeddedOptions {
        partitions: Some(partitions),
        ..EmbeddedOptions::default()
    }
}

/// `n` actors of partition `p` (of `of`).
fn in_partition(prefix: &str, p: u32, of: u32, n: usize) -> Vec<ActorId> {
    (0..)
        .map(|i| ActorId::new("acct", format!("{prefix}{i}")).unwrap())
        .filter(|a| partition_of(a, of) == p)
        .take(n)
        .collect()
}

/// Every sender sends one message to every receiver in each of `rounds` turns.
async fn send_all(store: &EmbeddedStore, senders: &[ActorId], receivers: &[ActorId], rounds: u64) {
    for s in senders {
        let from = store.highest_seq(s).await.unwrap();
        for r in 0..rounds {
            let seq = from + r + 1;
            let send: Vec<Outgoing> = receivers
                .iter()
                .map(|to| Outgoing {
                    envelope: Envelope::new(to.clone(), json!({ "from": s.as_str(), "n": seq })),
                    deliver_at: None,
                })
                .collect();
            let entry = [Entry::new(seq, EntryKind::Completed { reply: json!(seq) })];
            store
                .commit_turn(Turn {
                    send: &send,
                    ..Turn::append(s, seq, &entry)
                })
                .await
                .unwrap();
        }
    }
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn pending(store: &EmbeddedStore, actors: &[ActorId]) -> Vec<u64> {
    let mut out = Vec::new();
    for a in actors {
        out.push(store.pending(a).await.unwrap());
    }
    out
}

async fn outbox_waiting(store: &EmbeddedStore) -> u64 {
    store
        .outbox_states()
        .await
        .unwrap()
        .iter()
        .map(|s| s.pending)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_repeated_after_a_crash_between_enqueue_and_trim_enqueues_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let senders = in_partition("s", 0, 2, 3);
    let receivers = in_partition("r", 1, 2, 4);
    {
        let store = EmbeddedStore::open_with(dir.path(), with(2)).unwrap();
        // Every move is followed by a "crash" before its trim: nothing is ever trimmed.
        store.keep_outboxes(true);
        send_all(&store, &senders, &receivers, 40).await;
        wait_for("all moved", async || {
            pending(&store, &receivers).await == vec![120; 4]
        })
        .await;
        assert_eq!(outbox_waiting(&store).await, 480, "trims were skipped");
    }
    // The next opening moves the whole outbox again: the marks refuse every message.
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(
        store.partitions(),
        2,
        "the count is the store's, not the machine's"
    );
    wait_for("the outbox trimmed", async || {
        outbox_waiting(&store).await == 0
    })
    .await;
    assert_eq!(
        pending(&store, &receivers).await,
        vec![120; 4],
        "a message came twice"
    );
    assert!(check_outboxes(&store.outbox_states().await.unwrap()).is_empty());
    // And the same again, moving twice within one opening: a duplicate move changes nothing.
    store.keep_outboxes(true);
    send_all(&store, &senders, &receivers, 5).await;
    wait_for("moved", async || {
        pending(&store, &receivers).await == vec![135; 4]
    })
    .await;
    store.keep_outboxes(false);
    drop(store);
    let store = EmbeddedStore::open(dir.path()).unwrap();
    wait_for("trimmed", async || outbox_waiting(&store).await == 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pending(&store, &receivers).await, vec![135; 4]);
    // Per sender, in the order sent.
    let opts = LeaseOptions {
        visibility: Duration::from_secs(60),
        max_deliveries: 5,
        ..LeaseOptions::default()
    };
    for r in &receivers {
        let mut last: std::collections::HashMap<String, u64> = Default::default();
        while let Some(d) = store.lease(r, opts).await.unwrap() {
            let from = d.envelope.payload["from"].as_str().unwrap().to_owned();
            let n = d.envelope.payload["n"].as_u64().unwrap();
            let before = last.insert(from, n).unwrap_or(0);
            assert!(n > before, "{r}: out of order");
            store.ack(&d.receipt).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_wait_in_the_outbox_while_relays_stop_and_survive_senders_compacted_deleted_and_a_reopen()
 {
    let dir = tempfile::tempdir().unwrap();
    let senders = in_partition("s", 2, 3, 2);
    let receivers: Vec<ActorId> = [0, 1]
        .iter()
        .flat_map(|&p| in_partition("r", p, 3, 2))
        .collect();
    {
        let store = EmbeddedStore::open_with(dir.path(), with(3)).unwrap();
        store.hold_relays(true);
        send_all(&store, &senders, &receivers, 10).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pending(&store, &receivers).await, vec![0; 4]);
        assert_eq!(outbox_waiting(&store).await, 80);
        // What `/metrics` shows as `loom_relay_waiting`: all of it in the senders' partition.
        let backlog = loom_core::Store::relay_backlog(&store).await.unwrap();
        let per: Vec<(u32, u64)> = backlog.iter().map(|b| (b.partition, b.waiting)).collect();
        assert_eq!(per, [(0, 0), (1, 0), (2, 80)]);
        // The senders' journals are compacted and deleted before anything moved.
        for s in &senders {
            store
                .compact(s, &Snapshot::new(10, json!({})), 1, None)
                .await
                .unwrap();
            store.delete(s, None).await.unwrap();
        }
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    wait_for("moved after the reopen", async || {
        pending(&store, &receivers).await == vec![20; 4]
    })
    .await;
    wait_for("trimmed", async || outbox_waiting(&store).await == 0).await;
    let backlog = loom_core::Store::relay_backlog(&store).await.unwrap();
    assert!(
        backlog.len() == 3 && backlog.iter().all(|b| b.waiting == 0),
        "{backlog:?}"
    );
    assert!(store.relayed() >= 80);
    assert!(check_outboxes(&store.outbox_states().await.unwrap()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_count_is_recorded_and_a_missing_partition_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(EmbeddedStore::open_with(dir.path(), with(3)).unwrap());
    for f in ["loom.redb", "loom-p1.redb", "loom-p2.redb", "loom-p1.redo"] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    match EmbeddedStore::open_with(dir.path(), with(2)) {
        Err(StoreError::InvalidRequest(m)) => {
            assert!(m.contains("has 3 partition(s)"), "{m}");
            assert!(m.contains("loom store repartition"), "{m}");
        }
        other => panic!("opened with another count: {other:?}"),
    }
    assert_eq!(EmbeddedStore::open(dir.path()).unwrap().partitions(), 3);
    std::fs::remove_file(dir.path().join("loom-p2.redb")).unwrap();
    match EmbeddedStore::open(dir.path()) {
        Err(StoreError::Corrupt { what, source }) => {
            assert!(what.contains("loom-p2.redb"), "{what}");
            assert!(source.to_string().contains("missing"), "{source}");
        }
        other => panic!("opened without a partition: {other:?}"),
    }
    assert!(matches!(
        EmbeddedStore::open_with(tempfile::tempdir().unwrap().path(), with(0)),
        Err(StoreError::InvalidRequest(_))
    ));
    // Partition 0's file lost while another partition holds actors: refused, not adopted into
    // a new, empty store.
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedStore::open_with(dir.path(), with(2)).unwrap();
        let a = in_partition("x", 1, 2, 1).remove(0);
        let e = [Entry::new(1, EntryKind::Completed { reply: json!(1) })];
        store.append(&a, 1, &e).await.unwrap();
    }
    std::fs::remove_file(dir.path().join("loom.redb")).unwrap();
    match EmbeddedStore::open(dir.path()) {
        Err(StoreError::Corrupt { source, .. }) => {
            assert!(
                source.to_string().contains("partition 0's file is missing"),
                "{source}"
            )
        }
        other => panic!("a store without partition 0 was opened: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_numbered_behind_a_mark_continues_after_it_instead_of_losing_sends() {
    let dir = tempfile::tempdir().unwrap();
    let senders = in_partition("s", 0, 2, 1);
    let receivers = in_partition("r", 1, 2, 1);
    {
        let store = EmbeddedStore::open_with(dir.path(), with(2)).unwrap();
        send_all(&store, &senders, &receivers, 5).await;
        wait_for("moved", async || {
            pending(&store, &receivers).await == vec![5]
        })
        .await;
        wait_for("trimmed", async || outbox_waiting(&store).await == 0).await;
    }
    // Partition 0's outbox numbers go back (as a salvaged redo log or an older backup of its
    // file would leave them), while partition 1 still holds the mark 5 for it.
    {
        let db = redb::Database::open(dir.path().join("loom.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(loom_core::embedded::tables::META)
            .unwrap()
            .insert("outbox_seq", 2)
            .unwrap();
        txn.commit().unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    send_all(&store, &senders, &receivers, 3).await;
    wait_for("the new sends arrive", async || {
        pending(&store, &receivers).await == vec![8]
    })
    .await;
    assert!(check_outboxes(&store.outbox_states().await.unwrap()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_a_partition_that_fails_and_reopens_wait_and_arrive_once_while_others_go_on() {
    use loom_testkit::faults::{DiskFaults, FaultyRedo};
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = tempfile::tempdir().unwrap();
    // Partition 1's redo log fails every write while `broken` is set, in this opening and in
    // every reopening the store tries; partition 0's never does.
    let broken = Arc::new(AtomicBool::new(false));
    let current: Arc<std::sync::Mutex<Option<Arc<DiskFaults>>>> = Arc::default();
    let (b, c) = (broken.clone(), current.clone());
    let store = EmbeddedStore::open_with_redo(dir.path(), with(2), move |f| {
        let path = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        let redo = FaultyRedo::new(f);
        if path.ends_with("loom-p1.redo") {
            if b.load(Ordering::SeqCst) {
                redo.faults.fail_writes.store(u32::MAX, Ordering::SeqCst);
            }
            *c.lock().unwrap() = Some(redo.faults.clone());
        }
        Box::new(redo)
    })
    .unwrap();
    let senders = in_partition("s", 0, 2, 2);
    let receivers = in_partition("r", 1, 2, 3);
    let neighbours = in_partition("n", 0, 2, 2);
    send_all(&store, &senders, &receivers, 3).await;
    wait_for("moved", async || {
        pending(&store, &receivers).await == vec![6; 3]
    })
    .await;

    // Partition 1 fails: its next write does.
    broken.store(true, Ordering::SeqCst);
    let faults = current.lock().unwrap().clone().unwrap();
    faults.fail_writes.store(u32::MAX, Ordering::SeqCst);
    let e = [Entry::new(1, EntryKind::Completed { reply: json!(1) })];
    assert!(store.append(&receivers[0], 1, &e).await.is_err());
    // Partition 0 goes on: its turns commit, sending to partition 1 and to its own actors.
    for round in 0..4u64 {
        for s in &senders {
            let seq = store.highest_seq(s).await.unwrap() + 1;
            let mut send: Vec<Outgoing> = receivers
                .iter()
                .chain(&neighbours)
                .map(|to| Outgoing {
                    envelope: Envelope::new(
                        to.clone(),
                        json!({ "from": s.as_str(), "n": seq, "round": round }),
                    ),
                    deliver_at: None,
                })
                .collect();
            send.truncate(5);
            let entry = [Entry::new(seq, EntryKind::Completed { reply: json!(seq) })];
            store
                .commit_turn(Turn {
                    send: &send,
                    ..Turn::append(s, seq, &entry)
                })
                .await
                .expect("a turn of a healthy partition");
        }
    }
    assert_eq!(
        pending(&store, &neighbours).await,
        vec![8; 2],
        "same-partition sends went on"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Nothing reached partition 1 meanwhile (it may be between reopenings, or reopened and
    // failing again at its next write).
    if let Ok(p) = store.pending(&receivers[0]).await {
        assert_eq!(p, 6, "a move into a failed partition was acknowledged");
    }
    // The store says so (rule D16: `Runtime::health` shows it), naming the partition whose
    // outbox cannot be moved (and maybe partition 1's own, which it cannot read while it
    // reopens).
    wait_for("the relay's failure shows", async || {
        store
            .relay_failure()
            .is_some_and(|f| f.partitions.contains(&0) && f.failures >= 1)
    })
    .await;

    // It recovers: the store reopens it by itself, and the relay moves what waited, once.
    broken.store(false, Ordering::SeqCst);
    faults.fail_writes.store(0, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(p) =
            futures::future::try_join_all(receivers.iter().map(|r| store.pending(r))).await
            && p == vec![14; 3]
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never arrived after the reopen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for("the relay's failure clears", async || {
        store.relay_failure().is_none()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pending(&store, &receivers).await,
        vec![14; 3],
        "a message came twice"
    );
}
