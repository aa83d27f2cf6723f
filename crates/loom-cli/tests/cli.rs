//! The real `loom` binary on real stores, including bad input.

mod common;

use common::loom;

use loom_core::{ActorId, EmbeddedStore, Entry, EntryKind, JournalStore, Snapshot};
use serde_json::json;

fn seeded_store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let a = ActorId::new("account", "alice").expect("id");
        let entries: Vec<Entry> = (1..=5)
            .map(|s| Entry::new(s, EntryKind::Completed { reply: json!(s) }))
            .collect();
        store.append(&a, 1, &entries).await.expect("append");
        store
            .save_snapshot(&a, &Snapshot::new(3, json!({"b": 3})), 2)
            .await
            .expect("snapshot");
        store.trim(&a, 3).await.expect("trim");
    });
    dir
}

#[test]
fn ls_show_and_verify_a_real_store() {
    let dir = seeded_store();
    let store = dir.path().to_str().expect("utf-8");
    let (ok, out, err) = loom(&["journal", "ls", "--store", store]);
    assert!(ok, "{err}");
    assert!(out.contains("account/alice"), "{out}");
    let (ok, out, err) = loom(&[
        "journal",
        "show",
        "account/alice",
        "--store",
        &format!("embedded:{store}"),
    ]);
    assert!(ok, "{err}");
    let seqs: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json line")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    assert_eq!(seqs, vec![4, 5]);
    let (ok, out, err) = loom(&["journal", "verify", "--store", store]);
    assert!(ok, "{err}");
    assert!(out.contains("1 journals, 2 entries verified"), "{out}");
}

#[test]
fn bad_input_is_a_clear_error_and_a_failing_exit() {
    let dir = seeded_store();
    let store = dir.path().to_str().expect("utf-8");
    let missing = dir.path().join("nope");
    let (ok, _, err) = loom(&["journal", "ls", "--store", missing.to_str().expect("utf-8")]);
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!missing.exists(), "a missing store was created");
    let (ok, _, err) = loom(&["journal", "show", "not-an-id", "--store", store]);
    assert!(!ok);
    assert!(err.contains("expected kind/key"), "{err}");
    let (ok, _, err) = loom(&["journal", "show", "account/bob", "--store", store]);
    assert!(!ok);
    assert!(err.contains("no journal for account/bob"), "{err}");
    let (ok, _, err) = loom(&["journal", "ls", "--store", "redis://127.0.0.1:1"]);
    assert!(!ok);
    assert!(err.contains("redis store unavailable"), "{err}");
    let (ok, _, err) = loom(&["journal", "ls", "--store", "ftp://x"]);
    assert!(!ok);
    assert!(err.contains("not known"), "{err}");
}
