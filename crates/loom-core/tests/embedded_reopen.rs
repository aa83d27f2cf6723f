//! Reopening the embedded store after its process died releases what that process held.

use std::time::Duration;

use loom_core::store::Suspension;
use loom_core::{ActorId, EmbeddedStore, Envelope, LeaseManager, LeaseOptions, Mailbox};
use loom_testkit::runtime::Counter;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_releases_the_dead_holders_leases_and_leased_messages() {
    let dir = tempfile::tempdir().expect("temp dir");
    let id = ActorId::new("acct", "alice").expect("id");
    let long = LeaseOptions {
        visibility: Duration::from_secs(3600),
        max_deliveries: 10,
        ..LeaseOptions::default()
    };
    let (old_token, first_delivery) = {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let lease = store
            .acquire(&id, "dead-node", Duration::from_secs(3600))
            .await
            .expect("acquire");
        store
            .enqueue(&Envelope::new(id.clone(), json!(1)), None)
            .await
            .expect("enqueue");
        let d = store
            .lease(&id, long)
            .await
            .expect("lease")
            .expect("delivery");
        // The process "dies" here: nothing is released or acked.
        (lease.token, d.receipt)
    };
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    assert!(
        store.holder(&id).await.expect("holder").is_none(),
        "a dead process still holds the lease"
    );
    let lease = store
        .acquire(&id, "new-node", Duration::from_secs(60))
        .await
        .expect("acquire at once");
    assert!(
        lease.token > old_token,
        "fencing tokens must keep growing across the release"
    );
    let again = store
        .lease(&id, long)
        .await
        .expect("lease")
        .expect("the message is back at once");
    assert_eq!(again.receipt.delivery, first_delivery.delivery + 1);
    assert!(matches!(
        store.ack(&first_delivery).await,
        Err(loom_core::StoreError::StaleReceipt { .. })
    ));
    store.ack(&again.receipt).await.expect("ack");
}

/// `shutdown` and `kill` return only once the runtime has let go of the store, lease keeper
/// included: the directory opens again at once, with every step acknowledged before still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_opens_again_as_soon_as_shutdown_or_kill_returns() {
    let dir = tempfile::tempdir().expect("temp dir");
    for round in 0..30u64 {
        let rt = loom_core::runtime::Runtime::builder()
            .embedded(dir.path())
            .register::<Counter>()
            .start()
            .await
            .unwrap_or_else(|e| panic!("round {round}: the runtime did not start: {e}"));
        for i in 0..4 {
            let n = rt
                .actor::<Counter>(&format!("c{i}"))
                .unwrap()
                .ask(1)
                .await
                .expect("ask");
            assert_eq!(n, round + 1, "round {round}: actor c{i} lost a step");
        }
        if round % 2 == 0 {
            rt.shutdown().await;
        } else {
            rt.kill().await;
        }
        drop(rt);
        let store = EmbeddedStore::open(dir.path())
            .unwrap_or_else(|e| panic!("round {round}: the directory is still held: {e}"));
        drop(store);
    }
}

/// A data file of layout 2 (one ready index for every kind) opens upgraded: its ready mailboxes
/// are found by their kind, and the file says layout 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_2_file_is_upgraded_and_its_ready_mailboxes_found_by_kind() {
    use loom_core::embedded::tables::{LAYOUT_VERSION, META, READY};
    use redb::{ReadableDatabase, ReadableTableMetadata};
    let dir = tempfile::tempdir().unwrap();
    {
        let db = redb::Database::create(dir.path().join(loom_core::embedded::DATA_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.insert("layout", 2).unwrap();
            let mut ready = txn.open_table(READY).unwrap();
            ready.insert((1000, "counter/c1"), ()).unwrap();
            ready.insert((2000, "gauge/g1"), ()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(
        store.ready_actors(&["counter"], 10).await.unwrap(),
        vec![ActorId::new("counter", "c1").unwrap()]
    );
    assert_eq!(
        store.ready_actors(&["gauge"], 10).await.unwrap(),
        vec![ActorId::new("gauge", "g1").unwrap()]
    );
    drop(store);
    let file = dir.path().join(loom_core::embedded::DATA_FILE);
    assert_eq!(layout_of(&file), LAYOUT_VERSION);
    let db = redb::Database::open(&file).unwrap();
    let txn = db.begin_read().unwrap();
    assert!(txn.open_table(READY).unwrap().is_empty().unwrap());
}

/// The layout a data file records.
fn layout_of(file: &std::path::Path) -> u64 {
    use redb::ReadableDatabase;
    let db = redb::Database::open(file).unwrap();
    db.begin_read()
        .unwrap()
        .open_table(loom_core::embedded::tables::META)
        .unwrap()
        .get("layout")
        .unwrap()
        .unwrap()
        .value()
}

/// A data file of a newer build's layout is refused as such, not as damage (whose advice is to
/// restore a backup), and left as it was (*before*: "corrupt record (store layout): record has
/// format version 6").
#[test]
fn a_file_of_a_newer_layout_is_refused_as_newer_and_left_alone() {
    use loom_core::embedded::tables::{LAYOUT_VERSION, META};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(loom_core::embedded::DATA_FILE);
    {
        let db = redb::Database::create(&file).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("layout", LAYOUT_VERSION + 1)
            .unwrap();
        txn.commit().unwrap();
    }
    let Err(e) = EmbeddedStore::open(dir.path()) else {
        panic!("a newer layout was opened");
    };
    assert!(
        matches!(&e, loom_core::StoreError::InvalidRequest(m) if m.contains("newer build")),
        "{e}"
    );
    assert_eq!(layout_of(&file), LAYOUT_VERSION + 1);
}

/// A message suspended on an event lane waits for its event, not for a consumer: reopening the
/// store leaves it suspended (the event wakes it), and a repartition, which renames the lanes,
/// hands it out again at the copy's first opening, so that its wait suspends again on the
/// lane's new name instead of waiting for an event that can no longer find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_wait_survives_a_reopen_and_a_repartition_renaming_its_lane() {
    use loom_core::{EmbeddedOptions, Enqueued, IdempotencyKey, Store};
    let dir = tempfile::tempdir().expect("temp dir");
    let a = ActorId::new("order", "a").expect("id");
    let long = LeaseOptions {
        visibility: Duration::from_secs(3600),
        max_deliveries: 10,
        ..LeaseOptions::default()
    };
    let hour = Duration::from_secs(3600);
    let deliver = async |store: &EmbeddedStore| {
        let lane = a.event_lane_in("approved", store.partitions());
        let key = IdempotencyKey::new("approval").unwrap();
        let env = Envelope::new(lane, json!(true));
        let r = store.enqueue_event(&env, &key, hour, &a).await.unwrap();
        assert!(matches!(r, Enqueued::New(_)), "{r:?}");
    };
    // Two stores of one partition, each with a's message suspended on its lane.
    let (reopened, moved) = (dir.path().join("reopened"), dir.path().join("moved"));
    for path in [&reopened, &moved] {
        let opts = EmbeddedOptions {
            partitions: Some(1),
            ..EmbeddedOptions::default()
        };
        let store = EmbeddedStore::open_with(path, opts).expect("open");
        store
            .enqueue(&Envelope::new(a.clone(), json!("place")), None)
            .await
            .unwrap();
        let d = store.lease(&a, long).await.unwrap().expect("delivery");
        let lane = a.event_lane_in("approved", 1);
        assert_eq!(
            store
                .suspend(&d.receipt, Some(&lane), hour, "w")
                .await
                .unwrap(),
            Suspension::Suspended
        );
    }
    {
        let store = EmbeddedStore::open(&reopened).expect("reopen");
        assert!(
            store.lease(&a, long).await.unwrap().is_none(),
            "reopening handed a suspended message out"
        );
        deliver(&store).await;
        assert!(
            store.lease(&a, long).await.unwrap().is_some(),
            "the event did not wake the wait after a reopen"
        );
    }
    let three = dir.path().join("three");
    EmbeddedStore::open(&moved)
        .expect("open")
        .copy_repartitioned(&three, 3)
        .await
        .expect("repartition");
    let store = EmbeddedStore::open(&three).expect("open the copy");
    assert_eq!(store.partitions(), 3);
    let d = store
        .lease(&a, long)
        .await
        .unwrap()
        .expect("the copy hands the suspended message out to suspend again");
    let lane = a.event_lane_in("approved", 3);
    assert_eq!(
        store
            .suspend(&d.receipt, Some(&lane), hour, "w")
            .await
            .unwrap(),
        Suspension::Suspended
    );
    assert!(store.lease(&a, long).await.unwrap().is_none());
    deliver(&store).await;
    assert!(
        store.lease(&a, long).await.unwrap().is_some(),
        "an event on the lane's new name did not wake the wait"
    );
}

/// A suspended sleep is left suspended by a reopen (only its time or a cancellation wakes it),
/// and a cancellation's mark survives a reopen and a repartition with its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_sleep_and_a_cancellation_survive_a_reopen_and_a_repartition() {
    use loom_core::EmbeddedOptions;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = ActorId::new("order", "a").expect("id");
    let long = LeaseOptions {
        visibility: Duration::from_secs(3600),
        max_deliveries: 10,
        ..LeaseOptions::default()
    };
    let hour = Duration::from_secs(3600);
    let (first, second) = (
        Envelope::new(a.clone(), json!("sleeps")),
        Envelope::new(a.clone(), json!("behind")),
    );
    let path = dir.path().join("store");
    {
        let opts = EmbeddedOptions {
            partitions: Some(1),
            ..EmbeddedOptions::default()
        };
        let store = EmbeddedStore::open_with(&path, opts).expect("open");
        store.enqueue(&first, None).await.unwrap();
        store.enqueue(&second, None).await.unwrap();
        let d = store.lease(&a, long).await.unwrap().expect("delivery");
        assert_eq!(
            store
                .suspend(&d.receipt, None, hour, "sleeping")
                .await
                .unwrap(),
            Suspension::Suspended
        );
        assert!(store.cancel(&a, second.id).await.unwrap().is_some());
    }
    {
        let store = EmbeddedStore::open(&path).expect("reopen");
        assert!(
            store.lease(&a, long).await.unwrap().is_none(),
            "reopening handed a suspended sleep out"
        );
        let listed = store.messages(&a, None, 10).await.unwrap();
        assert_eq!(
            listed.iter().map(|w| w.cancelling).collect::<Vec<_>>(),
            vec![false, true]
        );
    }
    let three = dir.path().join("three");
    EmbeddedStore::open(&path)
        .expect("open")
        .copy_repartitioned(&three, 3)
        .await
        .expect("repartition");
    let store = EmbeddedStore::open(&three).expect("open the copy");
    let d = store
        .lease(&a, long)
        .await
        .unwrap()
        .expect("handed out to suspend again");
    assert_eq!(d.envelope.id, first.id);
    store.ack(&d.receipt).await.unwrap();
    let d = store
        .lease(&a, long)
        .await
        .unwrap()
        .expect("the second message");
    assert_eq!(d.envelope.id, second.id);
    assert_eq!(
        store.suspend(&d.receipt, None, hour, "w").await.unwrap(),
        Suspension::Cancelled,
        "the cancellation was lost by the repartition"
    );
}

/// The process that held a data directory is gone once another opens it: its membership
/// record goes with its leases, so a restart under its name is a member at once, not refused
/// for a ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_opening_forgets_the_previous_process_membership() {
    use loom_core::store::Membership;
    let dir = tempfile::tempdir().expect("temp dir");
    let long = Duration::from_secs(3600);
    {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        store
            .heartbeat("web-1", 1, &["counter"], long)
            .await
            .expect("heartbeat");
        assert_eq!(store.members().await.unwrap().members.len(), 1);
    }
    let store = EmbeddedStore::open(dir.path()).expect("open again");
    assert!(store.members().await.unwrap().members.is_empty());
    let m = store
        .heartbeat("web-1", 2, &["counter"], long)
        .await
        .expect("the name is free");
    assert_eq!(m.incarnation, 2);
}
