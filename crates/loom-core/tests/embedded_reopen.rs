//! Reopening the embedded store after its process died releases what that process held.

use std::time::Duration;

use loom_core::{ActorId, EmbeddedStore, Envelope, LeaseManager, LeaseOptions, Mailbox};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_releases_the_dead_holders_leases_and_leased_messages() {
    let dir = tempfile::tempdir().expect("temp dir");
    let id = ActorId::new("acct", "alice").expect("id");
    let long = LeaseOptions {
        visibility: Duration::from_secs(3600),
        max_deliveries: 10,
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
