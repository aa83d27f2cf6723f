//! Group commit in the embedded store: concurrent appends from different actors share fsyncs,
//! and each caller still hears back only after its own entries are durable.

use loom_core::{ActorId, EmbeddedStore, Entry, EntryKind, JournalStore};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_from_many_actors_share_commits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let before = store.writer_stats();
    let mut tasks = Vec::new();
    for n in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = ActorId::new("gc", format!("a{n}")).expect("id");
            for seq in 1..=10 {
                let e = Entry::new(seq, EntryKind::Completed { reply: json!(seq) });
                store.append(&id, seq, &[e]).await.expect("append");
                // Acknowledged means readable by anyone from now on.
                assert!(store.highest_seq(&id).await.expect("highest") >= seq);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let after = store.writer_stats();
    let requests = after.requests - before.requests;
    let commits = after.commits - before.commits;
    assert_eq!(requests, 640);
    assert!(
        commits * 2 < requests,
        "{requests} appends took {commits} commits: concurrent appends are not sharing fsyncs"
    );
}
