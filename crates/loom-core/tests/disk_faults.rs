//! Faults under the embedded store: a write, an fdatasync or a read that fails inside redb.
//!
//! The promise checked: a request whose commit failed is never acknowledged; what was
//! acknowledged survives; the store reports typed errors (no panic), and after a reopen the
//! journals are gapless and hold every acknowledged append.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use common::{check, entry, id, load};
use futures::TryStreamExt;
use loom_core::{EmbeddedOptions, EmbeddedStore, Entry, JournalStore, SeqRange, StoreError};
use loom_testkit::faults::FaultyDisk;

/// Runs load, injects a fault, runs load again; every failure must be a typed storage error.
async fn fault(arm: impl FnOnce(&loom_testkit::faults::DiskFaults)) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut acked = HashMap::new();
    {
        let disk =
            FaultyDisk::open(&dir.path().join(loom_core::embedded::DATA_FILE)).expect("open file");
        let faults = disk.faults.clone();
        let store = EmbeddedStore::on_backend(disk, EmbeddedOptions::default()).expect("store");
        assert!(load(&store, &mut acked, 5).await.is_empty());
        arm(&faults);
        let errors = load(&store, &mut acked, 5).await;
        assert!(
            faults.injected.load(Ordering::SeqCst) > 0,
            "the fault was never hit"
        );
        assert!(!errors.is_empty(), "a failed commit was acknowledged");
        for e in &errors {
            assert!(
                matches!(e, StoreError::Storage { .. } | StoreError::Conflict { .. }),
                "untyped failure: {e:?}"
            );
        }
    }
    check(dir.path(), &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fdatasync_is_never_acknowledged() {
    fault(|f| f.fail_syncs.store(1, Ordering::SeqCst)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_is_never_acknowledged() {
    fault(|f| f.fail_writes.store(1, Ordering::SeqCst)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_read_is_a_typed_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let disk =
        FaultyDisk::open(&dir.path().join(loom_core::embedded::DATA_FILE)).expect("open file");
    let faults = disk.faults.clone();
    // A tiny cache, so that reads go to the disk.
    let store = EmbeddedStore::on_backend(
        disk,
        EmbeddedOptions {
            cache_bytes: 0,
            ..EmbeddedOptions::default()
        },
    )
    .expect("store");
    let entries: Vec<Entry> = (1..=500).map(|s| entry(0, s)).collect();
    store.append(&id(0), 1, &entries).await.expect("append");
    faults.fail_reads.store(1000, Ordering::SeqCst);
    let read: Result<Vec<Entry>, _> = store.read(&id(0), SeqRange::all()).try_collect().await;
    match read {
        Err(StoreError::Storage { .. }) => {}
        Ok(v) => panic!("read {} entries through a failing disk", v.len()),
        Err(other) => panic!("untyped read failure: {other:?}"),
    }
    faults.fail_reads.store(0, Ordering::SeqCst);
}
