//! Appending through server faults, for the fault suites of the server backends (Redis,
//! PostgreSQL): writers that retry through outages, the check that nothing acknowledged was
//! lost, forked or changed, two nodes racing for one journal, and a turn whose next message
//! was damaged in the store. A backend's fault test supplies the store and the fault (a
//! SIGKILL, an immediate stop, bytes overwritten); the rest is here once.
//!
//! ```no_run
//! # async fn f(store: loom_core::EmbeddedStore, restart_the_server: impl Fn()) {
//! use loom_testkit::load::{Writers, check_acknowledged};
//!
//! let writers = Writers::spawn(store.clone(), 12);
//! restart_the_server();
//! let (acked, errors) = writers.stop().await;
//! assert!(errors > 0, "the fault interrupted no append");
//! check_acknowledged(&store, &acked).await;
//! # }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use loom_core::{ActorId, Entry, EntryKind, JournalStore, SeqRange, StoreError};
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The entry writer `actor` appends at `seq`: its content names both, so a check can tell an
/// entry that moved or changed.
pub fn entry(actor: u32, seq: u64) -> Entry {
    Entry::new(
        seq,
        EntryKind::Completed {
            reply: json!({ "actor": actor, "seq": seq }),
        },
    )
}

/// The actor writer `n` appends to.
pub fn actor(n: u32) -> ActorId {
    ActorId::new("fault", format!("a{n}")).expect("a valid id")
}

/// Writers appending to their own actors until stopped, each retrying an append that failed on
/// the connection with the same seq (a retry must never duplicate: a conflict one past it means
/// the failed try had run).
pub struct Writers {
    stop: Arc<Notify>,
    tasks: Vec<JoinHandle<(u64, u64)>>,
}

impl Writers {
    /// Starts `count` writers on `store`, writer `n` on [`actor`]`(n)`.
    pub fn spawn<S: JournalStore + Clone>(store: S, count: u32) -> Writers {
        let stop = Arc::new(Notify::new());
        let tasks = (0..count)
            .map(|n| tokio::spawn(write(store.clone(), n, stop.clone())))
            .collect();
        Writers { stop, tasks }
    }

    /// Stops the writers; returns each one's highest acknowledged seq and how many typed
    /// connection errors ([`StoreError::Unavailable`]) they met in all.
    pub async fn stop(self) -> (HashMap<u32, u64>, u64) {
        self.stop.notify_waiters();
        let mut acked = HashMap::new();
        let mut errors = 0;
        for (n, t) in self.tasks.into_iter().enumerate() {
            let (h, e) = t.await.expect("a writer panicked");
            acked.insert(n as u32, h);
            errors += e;
        }
        (acked, errors)
    }
}

async fn write<S: JournalStore>(store: S, n: u32, stop: Arc<Notify>) -> (u64, u64) {
    let a = actor(n);
    let (mut acked, mut unavailable, mut next) = (0, 0, 1);
    let stopped = stop.notified();
    tokio::pin!(stopped);
    loop {
        let batch = [entry(n, next)];
        tokio::select! {
            _ = &mut stopped => return (acked, unavailable),
            r = store.append(&a, next, &batch) => match r {
                Ok(h) => {
                    acked = h;
                    next = h + 1;
                }
                // The append may or may not have run before the connection broke: the retry
                // with the same seq finds out.
                Err(StoreError::Unavailable { .. }) => {
                    unavailable += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(StoreError::Conflict { actual, .. }) if actual == next + 1 => {
                    acked = next;
                    next += 1;
                }
                Err(e) => panic!("writer {n}: unexpected error {e:?}"),
            }
        }
    }
}

/// Every writer's journal holds at least what was acknowledged to it, gapless, each entry the
/// one written at its seq, and the store's highest seq agrees.
pub async fn check_acknowledged(store: &dyn JournalStore, acked: &HashMap<u32, u64>) {
    for (n, want) in acked {
        let a = actor(*n);
        let entries: Vec<Entry> = store
            .read(&a, SeqRange::all())
            .try_collect()
            .await
            .expect("read");
        assert!(
            entries.len() as u64 >= *want,
            "actor {n}: {want} acknowledged, {} survived",
            entries.len()
        );
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1, "actor {n}: gap or fork");
            assert_eq!(
                e.kind,
                entry(*n, e.seq).kind,
                "actor {n}: wrong entry at {}",
                e.seq
            );
        }
        assert_eq!(
            store.highest_seq(&a).await.expect("highest"),
            entries.len() as u64
        );
    }
}

/// Two nodes (two connections to one server) append to one actor, each reading the highest seq
/// and appending after it, until each has won 100 appends: no seq is acknowledged to both, and
/// the journal holds exactly the 200 winners, each as its winner wrote it.
pub async fn racing_nodes_never_fork_a_journal<S: JournalStore + Clone>(nodes: [S; 2]) {
    let a = actor(7);
    let mut tasks = Vec::new();
    for (node, store) in nodes.iter().enumerate() {
        let (store, a) = (store.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            while won.len() < 100 {
                let next = store.highest_seq(&a).await.expect("highest") + 1;
                let e = Entry::new(
                    next,
                    EntryKind::Completed {
                        reply: json!({ "node": node, "seq": next }),
                    },
                );
                match store.append(&a, next, &[e]).await {
                    Ok(_) => won.push(next),
                    Err(StoreError::Conflict { .. }) => {}
                    Err(e) => panic!("node {node}: {e:?}"),
                }
            }
            won
        }));
    }
    let mut owner = HashMap::new();
    for (node, t) in tasks.into_iter().enumerate() {
        for seq in t.await.expect("node") {
            assert!(
                owner.insert(seq, node).is_none(),
                "seq {seq} acknowledged to both nodes"
            );
        }
    }
    let entries: Vec<Entry> = nodes[0]
        .read(&a, SeqRange::all())
        .try_collect()
        .await
        .expect("read");
    assert_eq!(entries.len(), 200);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        assert_eq!(
            e.kind,
            EntryKind::Completed {
                reply: json!({ "node": owner[&e.seq], "seq": e.seq })
            }
        );
    }
}

/// The bytes [`a_damaged_message_is_buried_at_once_and_the_next_one_runs`] has a damaged
/// message's frame overwritten with: no message frame decodes from them.
pub const GARBAGE: &[u8] = b"\x01garbage";

/// Rules D15 and D14 on a store whose client decodes what it hands out (Redis, PostgreSQL): a
/// turn that commits and leases, as its next message, one whose stored frame does not decode
/// reports success, its entries in the journal, and hands out the message behind the damaged
/// one, which goes at once (at its first delivery) to the dead letters with its raw bytes and
/// its id, listed; a lease that meets a damaged message does the same. Such a dead letter is
/// requeued as any other (a new message of its recipient, carrying the raw bytes, from the
/// damaged one's id) and purged as any other. `damage(actor,
/// position)` overwrites the frame of the waiting message at `position` of `actor`'s mailbox,
/// the last one, with [`GARBAGE`], in the backend's own storage (as a damaged disk or a bug
/// would).
pub async fn a_damaged_message_is_buried_at_once_and_the_next_one_runs<S, F, Fut>(
    store: &S,
    damage: F,
) where
    S: loom_core::Store,
    F: Fn(ActorId, u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use loom_core::store::backend::{Settle, Turn};
    use loom_core::{Envelope, LeaseOptions};
    let a = ActorId::new("fault", "damaged-next").expect("a valid id");
    let opts = LeaseOptions {
        visibility: Duration::from_secs(60),
        max_deliveries: 5,
        ..LeaseOptions::default()
    };
    let sent: Vec<Envelope> = (1..=5)
        .map(|n| Envelope::new(a.clone(), json!(n)))
        .collect();
    store.enqueue(&sent[0], None).await.expect("enqueue 1");
    let d = store
        .lease(&a, opts)
        .await
        .expect("lease")
        .expect("the first message");
    let position = store.enqueue(&sent[1], None).await.expect("enqueue 2");
    damage(a.clone(), position).await;
    store.enqueue(&sent[2], None).await.expect("enqueue 3");
    let one = [entry(0, 1)];
    let committed = store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&d.receipt)),
            next: Some(opts),
            ..Turn::append(&a, 1, &one)
        })
        .await
        .expect("a committed turn reports success, whatever its next message holds");
    assert_eq!(committed.highest, 1);
    assert_eq!(store.highest_seq(&a).await.expect("highest"), 1);
    let next = committed
        .next
        .expect("the message behind the damaged one is handed out");
    assert_eq!(
        (next.envelope.id, next.receipt.delivery),
        (sent[2].id, 1),
        "the third message runs next"
    );
    // A lease meets a damaged message the same way.
    let position = store.enqueue(&sent[3], None).await.expect("enqueue 4");
    damage(a.clone(), position).await;
    store.enqueue(&sent[4], None).await.expect("enqueue 5");
    store.ack(&next.receipt).await.expect("ack 3");
    let last = store
        .lease(&a, opts)
        .await
        .expect("a lease past a damaged message succeeds")
        .expect("the message behind the damaged one");
    assert_eq!(last.envelope.id, sent[4].id, "the fifth message runs next");
    store.ack(&last.receipt).await.expect("ack 5");
    assert_eq!(store.pending(&a).await.expect("pending"), 0);
    let dead = store
        .dead_letters(None, 10)
        .await
        .expect("dead letters list");
    let raw: String = GARBAGE.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (dl, msg) in dead.iter().zip([&sent[1], &sent[3]]) {
        assert!(
            dl.envelope.to == a
                && dl.envelope.id == msg.id
                && dl.envelope.payload == json!({ "corrupt_frame": raw })
                && dl.deliveries == 1
                && dl.reason.starts_with("corrupt frame: "),
            "{dead:?}"
        );
    }
    // Requeued, the first is a message its recipient can be handed (what it holds is for the
    // operator to judge); purged, the second is gone.
    store
        .requeue_dead_letter(dead[0].id)
        .await
        .expect("a damaged message's dead letter is requeued");
    let back = store
        .lease(&a, opts)
        .await
        .expect("lease")
        .expect("the requeued dead letter");
    assert!(
        back.envelope.payload == json!({ "corrupt_frame": raw })
            && back.envelope.origin() == sent[1].id
            && back.envelope.id != sent[1].id,
        "{back:?}"
    );
    store
        .ack(&back.receipt)
        .await
        .expect("ack the requeued one");
    assert_eq!(
        store
            .purge_dead_letters(&[dead[1].id])
            .await
            .expect("purge"),
        1
    );
    let left = store
        .dead_letters(None, 10)
        .await
        .expect("dead letters list");
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(store.pending(&a).await.expect("pending"), 0);
}
