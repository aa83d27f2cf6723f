//! Runtime cases about compaction and recovery: snapshots and trims, races with appends and recovery, corrupt or missing snapshots, compaction without the actor's code.

use loom_core::runtime::{CompactError, Compaction, compact_journal};
use loom_core::{EntryKind, Seq};
use serde_json::json;

use super::common::{WAIT, acct, activity, finished, reached, replies, worker};
use super::{Account, AccountMsg, Harness, RuntimeCase, Step, Worker, eventually, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        compaction_snapshots_and_trims,
        compaction_racing_appends_loses_nothing,
        recovery_falls_back_to_an_older_snapshot_when_the_newest_is_corrupt,
        crash_between_snapshot_and_trim_is_harmless,
        recovery_racing_a_compaction_starts_over_from_the_new_snapshot,
        no_readable_snapshot_after_a_trim_parks_the_actor_and_says_why,
        compact_journal_works_without_the_actors_code,
        compact_journal_keeps_what_an_unfinished_invocation_needs,
        large_state_stored_compressed_survives_a_crash,
    ]
}

fn every(n: u64) -> Compaction {
    Compaction {
        every_entries: Some(n),
        every_bytes: None,
        keep: 2,
    }
}

async fn compaction_snapshots_and_trims(h: &Harness) {
    let rt = h.runtime_with(|c| c.compaction = every(10)).await;
    let a = rt.actor::<Account>("alice").unwrap();
    for _ in 0..60 {
        a.send(AccountMsg::Deposit(1)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 60);
    let id = acct("alice");
    eventually(
        WAIT,
        "two snapshots kept and the journal trimmed",
        || async {
            let info = h.store.info(&id).await.unwrap();
            info.snapshots.len() == 2 && info.trimmed_through == info.snapshots[0]
        },
    )
    .await;
    let info = h.store.info(&id).await.unwrap();
    assert!(info.len() < 60, "the journal was not trimmed: {info:?}");
    rt.shutdown().await;
    let rt = h.runtime().await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .unwrap()
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        60
    );
    assert!(rt.metrics().replayed_entries < 60, "{:?}", rt.metrics());
    rt.shutdown().await;
}

async fn compaction_racing_appends_loses_nothing(h: &Harness) {
    let rt = h.runtime_with(|c| c.compaction = every(2)).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let a = rt.actor::<Account>("alice").unwrap();
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                a.send(AccountMsg::Deposit(1)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let a = rt.actor::<Account>("alice").unwrap();
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 200);
    assert!(rt.metrics().compactions > 0);
    let info = h.store.info(&acct("alice")).await.unwrap();
    assert!(
        info.snapshots
            .first()
            .is_none_or(|s| info.trimmed_through <= *s),
        "{info:?}"
    );
    rt.shutdown().await;
    let rt = h.runtime().await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .unwrap()
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        200
    );
    rt.shutdown().await;
}

/// Makes the newest kept snapshot of `id` read as corrupt, and starts a runtime that does not
/// compact; returns it and the journal's info before.
async fn newest_snapshot_corrupted(
    h: &Harness,
    id: &loom_core::ActorId,
) -> (loom_core::Runtime, loom_core::JournalInfo) {
    let info = h.store.info(id).await.unwrap();
    let newest: Seq = *info.snapshots.last().unwrap();
    h.faults.corrupt_snapshot(id, newest);
    let rt = h
        .runtime_with(|c| c.compaction = Compaction::DISABLED)
        .await;
    (rt, info)
}

async fn recovery_falls_back_to_an_older_snapshot_when_the_newest_is_corrupt(h: &Harness) {
    let rt = h.runtime_with(|c| c.compaction = every(10)).await;
    let a = rt.actor::<Account>("alice").unwrap();
    for _ in 0..50 {
        a.send(AccountMsg::Deposit(1)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 50);
    let id = acct("alice");
    eventually(WAIT, "two snapshots", || async {
        h.store.info(&id).await.unwrap().snapshots.len() == 2
    })
    .await;
    rt.shutdown().await;
    let (rt, _) = newest_snapshot_corrupted(h, &id).await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .unwrap()
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        50
    );
    assert_eq!(
        rt.metrics().corrupt_snapshots,
        1,
        "the fallback was not reported"
    );
    rt.shutdown().await;
    // A compaction now does not count the unreadable snapshot toward `keep`: it keeps the one
    // recovery used, so that the new one's corruption too leaves a snapshot to start from.
    // (Before: it kept the unreadable one and its own, deleted the readable one, and trimmed
    // through the unreadable one, so the actor could not be recovered.)
    // One compaction: the entries replayed are past `every(10)` already, so the first turn
    // starts it, and the next is 10 entries away.
    let rt = h.runtime_with(|c| c.compaction = every(10)).await;
    let a = rt.actor::<Account>("alice").unwrap();
    a.send(AccountMsg::Deposit(1)).await.unwrap();
    eventually(WAIT, "a compaction", || async {
        rt.metrics().compactions >= 1
    })
    .await;
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 51);
    assert_eq!(rt.metrics().compactions, 1);
    rt.shutdown().await;
    let (rt, info) = newest_snapshot_corrupted(h, &id).await;
    assert_eq!(
        tokio::time::timeout(
            WAIT,
            rt.actor::<Account>("alice")
                .unwrap()
                .ask(AccountMsg::Balance)
        )
        .await
        .expect("no answer: the actor could not be recovered")
        .unwrap(),
        51,
        "{info:?}"
    );
    rt.shutdown().await;
}

async fn crash_between_snapshot_and_trim_is_harmless(h: &Harness) {
    let id = acct("alice");
    let rt = h.runtime_with(|c| c.compaction = every(10)).await;
    let a = rt.actor::<Account>("alice").unwrap();
    // Every trim of the first compactions fails after its snapshot was saved.
    h.faults
        .fail_trims
        .store(1000, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..30 {
        a.send(AccountMsg::Deposit(1)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 30);
    eventually(WAIT, "snapshots saved, their trims failed", || async {
        rt.metrics().compaction_failures >= 2
    })
    .await;
    let info = h.store.info(&id).await.unwrap();
    assert!(!info.snapshots.is_empty(), "{info:?}");
    assert_eq!(info.trimmed_through, 0, "a failed trim trimmed: {info:?}");
    // As after a crash between the two: restart, state intact, and the next compaction trims.
    rt.kill().await;
    h.faults
        .fail_trims
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let rt = h.runtime_with(|c| c.compaction = every(10)).await;
    let a = rt.actor::<Account>("alice").unwrap();
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 30);
    for _ in 0..20 {
        a.send(AccountMsg::Deposit(1)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 50);
    eventually(WAIT, "a later compaction trims", || async {
        let info = h.store.info(&id).await.unwrap();
        info.trimmed_through > 0 && info.trimmed_through <= info.snapshots[0]
    })
    .await;
    rt.shutdown().await;
    let rt = h.runtime().await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .unwrap()
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        50
    );
    rt.shutdown().await;
}

/// A runtime recovering an actor reads the journal from where its snapshot (or the start)
/// leaves off; a compaction elsewhere may trim in between (an older incarnation's, or
/// `loom journal compact`). The state's early field, set by the first message and never again,
/// would silently be lost if the recovery started at the first entry left.
async fn recovery_racing_a_compaction_starts_over_from_the_new_snapshot(h: &Harness) {
    let id = acct("alice");
    let rt = h
        .runtime_with(|c| c.compaction = Compaction::DISABLED)
        .await;
    let a = rt.actor::<Account>("alice").unwrap();
    assert_eq!(a.ask(AccountMsg::Grow(3)).await.unwrap(), 3);
    for _ in 0..10 {
        a.send(AccountMsg::Deposit(1)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 10);
    rt.shutdown().await;

    // The next recovery looks at the journal (no snapshot), then waits before reading it...
    let pause = h.faults.pause_next_read();
    let rt = h
        .runtime_with(|c| c.compaction = Compaction::DISABLED)
        .await;
    let a = rt.actor::<Account>("alice").unwrap();
    a.send(AccountMsg::Deposit(1)).await.unwrap();
    tokio::time::timeout(WAIT, pause.reached.notified())
        .await
        .expect("the recovery reads the journal");
    // ...while the journal is compacted: a snapshot at its end, everything before trimmed.
    let done = compact_journal(&*h.store, &id, 1).await.unwrap();
    assert_eq!(done.trimmed_through, h.highest(&id).await);
    pause.resume.notify_one();
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 11);
    assert_eq!(
        a.ask(AccountMsg::Grow(0)).await.unwrap(),
        3,
        "the recovery lost the state the trimmed entries held"
    );
    rt.shutdown().await;
}

async fn no_readable_snapshot_after_a_trim_parks_the_actor_and_says_why(h: &Harness) {
    let id = acct("alice");
    let rt = h.runtime_with(|c| c.compaction = every(10)).await;
    let a = rt.actor::<Account>("alice").unwrap();
    for _ in 0..50 {
        a.send(AccountMsg::Deposit(1)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 50);
    eventually(WAIT, "two snapshots and a trim", || async {
        let info = h.store.info(&id).await.unwrap();
        info.snapshots.len() == 2 && info.trimmed_through > 0
    })
    .await;
    rt.shutdown().await;
    let info = h.store.info(&id).await.unwrap();
    for seq in &info.snapshots {
        h.faults.corrupt_snapshot(&id, *seq);
    }
    let before = h.highest(&id).await;
    let rt = h
        .runtime_with(|c| c.compaction = Compaction::DISABLED)
        .await;
    let a = rt.actor::<Account>("alice").unwrap();
    // Replaying the untrimmed tail from zero would be silently wrong: the actor must stop.
    a.send(AccountMsg::Deposit(1)).await.unwrap();
    eventually(WAIT, "the actor is parked", || async {
        rt.parked().await.unwrap().iter().any(|(p, _)| *p == id)
    })
    .await;
    let reason = rt
        .parked()
        .await
        .unwrap()
        .into_iter()
        .find(|(p, _)| *p == id)
        .map(|(_, p)| p.reason)
        .expect("parked");
    assert!(
        reason.contains("no snapshot") && reason.contains("trimmed"),
        "{reason}"
    );
    assert_eq!(h.highest(&id).await, before, "a parked actor wrote");
    assert_eq!(
        h.store.pending(&id).await.unwrap(),
        1,
        "the message was lost"
    );
    rt.shutdown().await;
}

async fn compact_journal_works_without_the_actors_code(h: &Harness) {
    let rt = h
        .runtime_with(|c| c.compaction = Compaction::DISABLED)
        .await;
    let a = rt.actor::<Account>("alice").unwrap();
    for _ in 0..30 {
        a.send(AccountMsg::Deposit(2)).await.unwrap();
    }
    assert_eq!(a.ask(AccountMsg::Balance).await.unwrap(), 60);
    rt.shutdown().await;
    let id = acct("alice");
    let highest = h.highest(&id).await;
    let done = compact_journal(&*h.store, &id, 2).await.unwrap();
    assert_eq!(done.snapshot, highest);
    assert_eq!(done.trimmed_through, highest);
    assert!(matches!(
        compact_journal(&*h.store, &id, 2).await,
        Err(CompactError::Nothing(_))
    ));
    let rt = h.runtime().await;
    assert_eq!(
        rt.actor::<Account>("alice")
            .unwrap()
            .ask(AccountMsg::Balance)
            .await
            .unwrap(),
        60
    );
    assert_eq!(rt.metrics().replayed_entries, 0, "{:?}", rt.metrics());
    rt.shutdown().await;
}

async fn compact_journal_keeps_what_an_unfinished_invocation_needs(h: &Harness) {
    let rt = h.runtime().await;
    let w = rt.actor::<Worker>("w").unwrap();
    w.ask(vec![activity("first")]).await.unwrap();
    w.send(vec![activity("a"), Step::Gate]).await.unwrap();
    reached(h).await;
    rt.kill().await;
    let id = worker("w");
    let done = compact_journal(&*h.store, &id, 2).await.unwrap();
    let first_invocation_end = h
        .journal(&id)
        .await
        .iter()
        .find(|e| matches!(e.kind, EntryKind::Invoked { .. }))
        .map(|e| e.seq - 1)
        .unwrap();
    assert_eq!(
        done.snapshot, first_invocation_end,
        "the snapshot must not cut into the unfinished invocation"
    );
    h.probe.open(1);
    let rt = h.runtime().await;
    finished(h, &id, 1).await;
    assert_eq!(
        h.probe.runs("a"),
        1,
        "the unfinished invocation lost its journaled activity"
    );
    assert_eq!(
        replies(h, &id).await,
        vec![json!(["a done", "passed the gate"])]
    );
    rt.shutdown().await;
}

/// State far above `codec::COMPRESS_ABOVE`: its patches and snapshots are stored compressed,
/// and a crash after them recovers it exactly, from the snapshot and the patches after it.
async fn large_state_stored_compressed_survives_a_crash(h: &Harness) {
    let rt = h
        .runtime_with(|c| {
            c.compaction = Compaction {
                every_entries: None,
                every_bytes: Some(256 * 1024),
                keep: 1,
            }
        })
        .await;
    let a = rt.actor::<Account>("big").unwrap();
    for i in 1..=5 {
        assert_eq!(a.ask(AccountMsg::Grow(100_000)).await.unwrap(), i * 100_000);
    }
    eventually(WAIT, "a snapshot of the large state", || async {
        !h.store
            .info(&acct("big"))
            .await
            .unwrap()
            .snapshots
            .is_empty()
    })
    .await;
    a.ask(AccountMsg::Grow(7)).await.unwrap();
    let rt = h.crash_and_resume(rt, 0).await;
    assert_eq!(
        rt.actor::<Account>("big")
            .unwrap()
            .ask(AccountMsg::Grow(0))
            .await
            .unwrap(),
        500_007
    );
    rt.shutdown().await;
}
