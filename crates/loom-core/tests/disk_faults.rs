//! Faults under the embedded store: a write, an fdatasync or a read that fails inside redb.
//!
//! The promise checked: a request whose commit failed is never acknowledged; what was
//! acknowledged survives; the store reports typed errors (no panic), and after a reopen the
//! journals are gapless and hold every acknowledged append.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use futures::TryStreamExt;
use loom_core::{
    ActorId, EmbeddedOptions, EmbeddedStore, Entry, EntryKind, JournalStore, SeqRange, StoreError,
};
use loom_testkit::faults::FaultyDisk;
use serde_json::json;

fn id(n: u32) -> ActorId {
    ActorId::new("disk", format!("a{n}")).expect("id")
}

fn entry(n: u32, seq: u64) -> Entry {
    Entry::new(
        seq,
        EntryKind::Completed {
            reply: json!({ "actor": n, "seq": seq }),
        },
    )
}

/// Appends `rounds` times to 8 actors at once; returns what was acknowledged and the errors.
async fn load(
    store: &EmbeddedStore,
    acked: &mut HashMap<u32, u64>,
    rounds: u32,
) -> Vec<StoreError> {
    let mut errors = Vec::new();
    for _ in 0..rounds {
        let mut tasks = Vec::new();
        for n in 0..8 {
            let store = store.clone();
            let next = acked.get(&n).copied().unwrap_or(0) + 1;
            tasks.push(tokio::spawn(async move {
                (n, next, store.append(&id(n), next, &[entry(n, next)]).await)
            }));
        }
        for t in tasks {
            let (n, next, r) = t.await.expect("task");
            match r {
                Ok(h) => {
                    assert_eq!(h, next);
                    acked.insert(n, h);
                }
                Err(e) => errors.push(e),
            }
        }
    }
    errors
}

async fn check(dir: &std::path::Path, acked: &HashMap<u32, u64>) {
    let store = EmbeddedStore::open(dir).expect("reopen after the faults");
    for (n, want) in acked {
        let entries: Vec<Entry> = store
            .read(&id(*n), SeqRange::all())
            .try_collect()
            .await
            .expect("read");
        assert!(
            entries.len() as u64 >= *want,
            "actor {n}: acknowledged {want}, found {}",
            entries.len()
        );
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1, "actor {n}: gap");
            assert_eq!(e.kind, entry(*n, e.seq).kind);
        }
    }
}

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
    let store = EmbeddedStore::on_backend(disk, EmbeddedOptions { cache_bytes: 0 }).expect("store");
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
