//! What the embedded store's fault suites (`disk_faults.rs`, `redo_log.rs`) share: eight actors
//! appending at once, and the check that every acknowledged append survived a reopen.

use std::collections::HashMap;

use futures::TryStreamExt;
use loom_core::{ActorId, EmbeddedStore, Entry, EntryKind, JournalStore, SeqRange, StoreError};
use serde_json::json;

/// Actor `n` of the suites.
pub fn id(n: u32) -> ActorId {
    ActorId::new("faults", format!("a{n}")).expect("id")
}

/// Entry `seq` of actor `n`: it names both, so a misplaced entry is caught.
pub fn entry(n: u32, seq: u64) -> Entry {
    Entry::new(
        seq,
        EntryKind::Completed {
            reply: json!({ "actor": n, "seq": seq }),
        },
    )
}

/// Appends `rounds` times to 8 actors at once; records what was acknowledged and returns the
/// errors.
pub async fn load(
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

/// Actor `n`'s journal, all of it.
pub async fn journal(store: &EmbeddedStore, n: u32) -> Vec<Entry> {
    store
        .read(&id(n), SeqRange::all())
        .try_collect()
        .await
        .expect("read")
}

/// Reopens `dir`: every acknowledged append is there, gapless and intact.
pub async fn check(dir: &std::path::Path, acked: &HashMap<u32, u64>) {
    let store = EmbeddedStore::open(dir).expect("reopen after the faults");
    for (n, want) in acked {
        let entries = journal(&store, *n).await;
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
