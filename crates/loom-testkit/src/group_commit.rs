//! Group commit, for the server backends' tests (Redis, PostgreSQL): concurrent requests that
//! a backend sends together must each still be decided alone. A backend's test supplies the
//! store and counts what the batching saved (transactions, script calls); the loads and their
//! checks are here once.

use futures::TryStreamExt;
use loom_core::store::backend::{Outgoing, Turn};
use loom_core::{ActorId, Entry, EntryKind, Envelope, SeqRange, Store, StoreError};
use serde_json::json;

/// An entry at `seq`.
pub fn entry(seq: u64) -> Entry {
    Entry::new(
        seq,
        EntryKind::Completed {
            reply: json!({ "seq": seq }),
        },
    )
}

/// The actor `group/<key>`.
pub fn id(key: &str) -> ActorId {
    ActorId::new("group", key).expect("id")
}

/// 400 first appends to as many actors, and eight first appends racing on `group/shared`, all
/// at once: every one of the 400 succeeds, exactly one racer wins and the others conflict, and
/// the shared journal holds one entry. Returns how many appends it made (408).
pub async fn first_appends_at_once<S: Store + Clone + 'static>(store: &S) -> u64 {
    let spawn = |key: String| {
        let store = store.clone();
        tokio::spawn(async move { store.append(&id(&key), 1, &[entry(1)]).await })
    };
    let tasks: Vec<_> = (0..400).map(|n| spawn(format!("a{n}"))).collect();
    let racers: Vec<_> = (0..8).map(|_| spawn("shared".to_owned())).collect();
    for t in tasks {
        assert_eq!(t.await.expect("task").expect("append"), 1);
    }
    let mut won = 0;
    for t in racers {
        match t.await.expect("task") {
            Ok(1) => won += 1,
            Err(StoreError::Conflict { actual: 2, .. }) => {}
            other => panic!("a racing first append must win or conflict, got {other:?}"),
        }
    }
    assert_eq!(won, 1, "exactly one racing first append wins");
    let shared: Vec<Entry> = store
        .read(&id("shared"), SeqRange::all())
        .try_collect()
        .await
        .expect("read shared");
    assert_eq!(shared.len(), 1);
    408
}

/// 40 actors, 8 turns each, every turn sending to three others (in a different order each
/// time), spread over `nodes` (stores on one server): no turn fails, every journal has its 8
/// entries and every message waits in its mailbox. Returns how many turns it made (320).
pub async fn turns_sending_to_each_other<S: Store + Clone + 'static>(nodes: &[S]) -> u64 {
    let actors = 40;
    let turns_each = 8u64;
    let mut tasks = Vec::new();
    for a in 0..actors {
        let store = nodes[a % nodes.len()].clone();
        tasks.push(tokio::spawn(async move {
            let me = id(&format!("t{a}"));
            for seq in 1..=turns_each {
                let send: Vec<Outgoing> = [1, actors / 2, actors - 1]
                    .iter()
                    .map(|d| Outgoing {
                        envelope: Envelope::new(
                            id(&format!("t{}", (a + d * seq as usize) % actors)),
                            json!({ "from": a, "seq": seq }),
                        ),
                        deliver_at: None,
                    })
                    .collect();
                let entries = [entry(seq)];
                let turn = Turn {
                    send: &send,
                    ..Turn::append(&me, seq, &entries)
                };
                store
                    .commit_turn(turn)
                    .await
                    .map_err(|e| format!("t{a} turn {seq}: {e}"))?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await
            .expect("task")
            .expect("no turn may fail (a deadlock would)");
    }
    let turns = actors as u64 * turns_each;
    let mut waiting = 0;
    for a in 0..actors {
        let actor = id(&format!("t{a}"));
        waiting += nodes[0].pending(&actor).await.expect("pending");
        let last = &nodes[nodes.len() - 1];
        assert_eq!(last.highest_seq(&actor).await.expect("highest"), turns_each);
    }
    assert_eq!(waiting, turns * 3);
    turns
}
