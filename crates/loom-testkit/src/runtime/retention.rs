//! Runtime cases about retention (`Context::finish`, `Config::retention`): an actor's journal
//! is deleted when it is done or idle, never while it has mail or ran since.

use std::time::Duration;

use loom_core::runtime::{Actor, AskOptions, Config, Context, Rejected};
use loom_core::{EntryKind, IdempotencyKey};
use serde_json::json;

use super::common::{WAIT, activity, finished, worker};
use super::{Harness, RuntimeCase, Step, Worker, eventually, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        a_finished_actor_is_retired_after_its_grace_and_starts_afresh,
        a_message_during_the_grace_or_waiting_then_keeps_a_finished_actor,
        an_idle_actor_is_retired_and_one_in_use_is_kept,
        a_first_state_after_finishing_keeps_the_actor_through_a_reload,
        a_finished_actor_only_read_is_retired_after_a_compaction_and_a_reload,
        a_finished_actor_kept_by_a_waiting_read_is_retired_after_it,
        finishing_reads_behind_a_waiting_message_leave_one_retirement,
    ]
}

fn quick(c: &mut Config) {
    c.retention.finished_after = Duration::from_millis(300);
}

/// A grace long enough for a case to act within it on a loaded machine.
fn slow(c: &mut Config) {
    c.retention.finished_after = Duration::from_secs(3);
}

/// True once the actor is retired: it had a journal, and neither an entry nor a snapshot of it
/// is left (a compaction can leave no entries, never no snapshot).
async fn retired(h: &Harness, id: &loom_core::ActorId) -> bool {
    let info = h.store.info(id).await.unwrap();
    info.highest > 0 && info.is_empty() && info.snapshots.is_empty()
}

/// A finished actor is retired once its grace passes: its entries and snapshots are gone, its
/// seq kept; its caller's idempotency record still answers; a later message starts it afresh
/// from its default state, at the next seq.
async fn a_finished_actor_is_retired_after_its_grace_and_starts_afresh(h: &Harness) {
    let rt = h.runtime_with(quick).await;
    let w = rt.actor::<Worker>("w").unwrap();
    let id = worker("w");
    let key = IdempotencyKey::new("once").unwrap();
    let opts = || AskOptions {
        idempotency_key: Some(key.clone()),
        timeout: None,
        ..Default::default()
    };
    let first = w
        .ask_with(vec![activity("a"), Step::Finish], opts())
        .await
        .unwrap();
    assert_eq!(first, vec!["a done", "finished"]);
    let before = h.store.info(&id).await.unwrap().highest;
    eventually(WAIT, "the finished actor is retired", || async {
        rt.metrics().retired == 1
    })
    .await;
    let info = h.store.info(&id).await.unwrap();
    assert_eq!(
        (info.highest, info.trimmed_through, info.snapshots.len()),
        (before, before, 0)
    );
    assert!(retired(h, &id).await, "entries or snapshots left behind");
    assert_eq!(h.store.pending(&id).await.unwrap(), 0);
    // The caller's key still holds its reply: asked again, nothing runs.
    assert_eq!(
        w.ask_with(vec![activity("a")], opts()).await.unwrap(),
        vec!["a done", "finished"]
    );
    assert_eq!(h.probe.runs("a"), 1);
    // A new message: a fresh actor (its state starts empty), numbered on from the old seq.
    assert_eq!(w.ask(vec![activity("b")]).await.unwrap(), vec!["b done"]);
    let journal = h.journal(&id).await;
    assert!(
        journal.first().is_some_and(|e| e.seq == before + 1),
        "{journal:?}"
    );
    let patch = journal
        .iter()
        .find_map(|e| match &e.kind {
            EntryKind::StatePatched { patch } => Some(serde_json::to_value(patch).unwrap()),
            _ => None,
        })
        .expect("a state patch");
    assert!(
        !patch.to_string().contains("a done"),
        "the new incarnation saw the old state: {patch}"
    );
    rt.shutdown().await;
}

/// A finished actor kept by a message waiting when its retirement came (sent with a delay past
/// the grace) is retired a grace later, once that message has run without changing the state.
/// Before, the retirement was dropped, and without idle retention the actor was kept for good.
async fn a_finished_actor_kept_by_a_waiting_read_is_retired_after_it(h: &Harness) {
    let rt = h.runtime_with(quick).await;
    let w = rt.actor::<Worker>("kept").unwrap();
    let id = worker("kept");
    w.ask(vec![activity("a"), Step::Finish]).await.unwrap();
    // Waiting when the retirement comes (after 300 ms), run at 900 ms.
    w.send_with(
        vec![],
        loom_core::runtime::SendOptions {
            delay: Some(Duration::from_millis(900)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    eventually(
        WAIT,
        "the actor is retired once the read has run",
        || async { retired(h, &id).await },
    )
    .await;
    // Counted once the store's answer is back, a moment after the store shows it.
    eventually(WAIT, "one retirement counted", || async {
        rt.metrics().retired == 1
    })
    .await;
    eventually(WAIT, "no retirement is left waiting", || async {
        h.store.pending(&id).await.unwrap() == 0
    })
    .await;
    rt.shutdown().await;
}

/// Two reads that each finish the actor (as the bank's transfer's status does), with a message
/// waiting, due after both retirements, the actor passivated meanwhile: the first leaves the
/// decision to the second, which is sent again to come a grace after the waiting message is
/// due, and that one retires the actor. Without the first rule each retirement sent itself
/// again while any message waited, and a status polled every few seconds piled them up by the
/// thousand; with a rule that looked only at the finishes the cell committed, a cell loaded
/// since sent each again too; with one that let only a newer finish's retirement decide, each
/// later finish left one more waiting behind a copy sent again.
async fn finishing_reads_behind_a_waiting_message_leave_one_retirement(h: &Harness) {
    // A grace of a second: the waiting message is sent well within it after the finishes.
    // Passivated long before the retirements come, so that each meets a cell that knows no
    // finish of its own.
    let rt = h
        .runtime_registering(
            |b| b.register_actor(Tally),
            |c| {
                c.retention.finished_after = Duration::from_secs(1);
                c.idle_timeout = Duration::from_millis(100);
            },
        )
        .await;
    let t = rt.actor::<Tally>("reads").unwrap();
    let id = loom_core::ActorId::new("tally", "reads").unwrap();
    assert_eq!(t.ask(Some(1)).await.unwrap(), 1);
    assert_eq!(t.ask(None).await.unwrap(), 1);
    assert_eq!(t.ask(None).await.unwrap(), 1);
    t.send_with(
        Some(0),
        loom_core::runtime::SendOptions {
            delay: Some(Duration::from_secs(8)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // Both retirements have come (a second after their finishes); the waiting message has not.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        h.store.pending(&id).await.unwrap(),
        2,
        "the waiting message and one retirement"
    );
    // A third finishing read, whose retirement comes while the one sent again waits: that
    // one decides (before: each such read left one more waiting until the message ran).
    assert_eq!(t.ask(None).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        h.store.pending(&id).await.unwrap(),
        2,
        "the waiting message and one retirement, after a third finish"
    );
    eventually(
        WAIT,
        "the actor is retired after the message ran",
        || async { retired(h, &id).await },
    )
    .await;
    eventually(WAIT, "nothing is left waiting", || async {
        h.store.pending(&id).await.unwrap() == 0
    })
    .await;
    rt.shutdown().await;
}

/// A message that changes the state during the grace keeps the finished actor (it ran since),
/// and so does one that waits when the retirement comes (a delayed message, due later); the
/// actor's state goes on. A read (no change of state) does not keep it.
async fn a_message_during_the_grace_or_waiting_then_keeps_a_finished_actor(h: &Harness) {
    let rt = h.runtime_with(slow).await;
    let read = rt.actor::<Worker>("read").unwrap();
    read.ask(vec![activity("r"), Step::Finish]).await.unwrap();
    read.ask(vec![]).await.unwrap();
    let (ran, waiting) = (
        rt.actor::<Worker>("ran").unwrap(),
        rt.actor::<Worker>("waiting").unwrap(),
    );
    ran.ask(vec![Step::Finish]).await.unwrap();
    ran.ask(vec![activity("again")]).await.unwrap();
    waiting.ask(vec![Step::Finish]).await.unwrap();
    waiting
        .send_with(
            vec![activity("later")],
            loom_core::runtime::SendOptions {
                delay: Some(Duration::from_secs(6)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // The retirements come (after 3 s): the read one goes, the other two are kept.
    eventually(WAIT, "the actor that was only read is retired", || async {
        retired(h, &worker("read")).await
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rt.metrics().retired,
        1,
        "an actor with mail, or that ran, was retired"
    );
    for id in [worker("ran"), worker("waiting")] {
        assert!(!retired(h, &id).await, "{id} lost its journal");
    }
    finished(h, &worker("waiting"), 2).await;
    assert_eq!(h.probe.runs("later"), 1);
    assert_eq!(rt.metrics().retired, 1);
    rt.shutdown().await;
}

/// A kind past state version 1: its first state is journaled whole, as an upgrade from 0.
struct Tally;

impl Actor for Tally {
    const KIND: &'static str = "tally";
    const STATE_VERSION: u32 = 2;
    type State = u64;
    /// `None` finishes; `Some(n)` adds n; both reply with the state.
    type Message = Option<u64>;
    type Reply = u64;

    async fn handle(
        &self,
        state: &mut u64,
        ctx: &mut Context<'_>,
        msg: Option<u64>,
    ) -> Result<u64, Rejected> {
        match msg {
            None => ctx.finish(),
            Some(n) => *state += n,
        }
        Ok(*state)
    }
}

/// A finished actor whose first state comes after the finish is kept when the retirement
/// finds it loaded again from its journal, not only while it stays in memory: that state is
/// a change (*before*: replayed, it was taken for an upgrade, and the journal was deleted).
async fn a_first_state_after_finishing_keeps_the_actor_through_a_reload(h: &Harness) {
    let rt = h
        .runtime_registering(
            |b| b.register_actor(Tally),
            |c| {
                slow(c);
                c.idle_timeout = Duration::from_millis(100);
            },
        )
        .await;
    let t = rt.actor::<Tally>("t").unwrap();
    assert_eq!(t.ask(None).await.unwrap(), 0);
    assert_eq!(t.ask(Some(5)).await.unwrap(), 5);
    let id = loom_core::ActorId::new("tally", "t").unwrap();
    assert!(
        h.journal(&id)
            .await
            .iter()
            .any(|e| matches!(e.kind, EntryKind::StateUpgraded { from: 0, .. })),
        "the first state is not journaled as an upgrade from 0: the case tests nothing"
    );
    // Passivated (idle) long before the retirement comes, 3 s after the finish; wait past it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(rt.metrics().retired, 0, "the changed actor was retired");
    assert!(!retired(h, &id).await, "its journal is gone");
    assert_eq!(t.ask(Some(0)).await.unwrap(), 5, "its state is lost");
    rt.shutdown().await;
}

/// A finished actor that was only read, then compacted past its finish and loaded again from
/// that snapshot, is still retired, and one whose state changed after the finish is still
/// kept: the snapshot says when the state last changed (*before*: a reload from a snapshot
/// took the snapshot's seq for a change, so the read actor was kept, and its journal with it,
/// for good: its retirement is sent once).
async fn a_finished_actor_only_read_is_retired_after_a_compaction_and_a_reload(h: &Harness) {
    let rt = h
        .runtime_with(|c| {
            slow(c);
            c.idle_timeout = Duration::from_millis(100);
            c.compaction.every_entries = Some(2);
        })
        .await;
    let (read, ran) = (
        rt.actor::<Worker>("read").unwrap(),
        rt.actor::<Worker>("ran").unwrap(),
    );
    let info = |id: loom_core::ActorId| async move { h.store.info(&id).await.unwrap() };
    read.ask(vec![activity("r"), Step::Finish]).await.unwrap();
    let read_finish = info(worker("read")).await.highest;
    ran.ask(vec![Step::Finish]).await.unwrap();
    let ran_finish = info(worker("ran")).await.highest;
    ran.ask(vec![activity("again")]).await.unwrap();
    // Reads until a snapshot is past the finish (each turn may start a compaction; one still
    // running when a turn ends is not started again by it).
    for (w, id, finish) in [
        (&read, worker("read"), read_finish),
        (&ran, worker("ran"), ran_finish),
    ] {
        let mut reads = 0;
        while info(id.clone())
            .await
            .snapshots
            .last()
            .is_none_or(|s| *s <= finish)
        {
            assert!(reads < 100, "{id}: no snapshot past its finish");
            w.ask(vec![]).await.unwrap();
            reads += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Both passivate (idle) long before their retirements come, 3 s after their finishes.
    eventually(WAIT, "the actor that was only read is retired", || async {
        retired(h, &worker("read")).await
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rt.metrics().retired, 1, "the changed actor was retired");
    assert!(
        !retired(h, &worker("ran")).await,
        "the changed actor's journal is gone"
    );
    rt.shutdown().await;
}

/// With an idle policy, an actor passivated for idleness is retired `idle_after` later; one
/// used again meanwhile is kept (and looked at again later).
async fn an_idle_actor_is_retired_and_one_in_use_is_kept(h: &Harness) {
    let rt = h
        .runtime_with(|c| {
            c.idle_timeout = Duration::from_millis(100);
            c.retention.idle_after = Some(Duration::from_millis(2500));
        })
        .await;
    let (idle, busy) = (
        rt.actor::<Worker>("idle").unwrap(),
        rt.actor::<Worker>("busy").unwrap(),
    );
    idle.ask(vec![activity("x")]).await.unwrap();
    busy.ask(vec![activity("y")]).await.unwrap();
    // `busy` is used every 250 ms for 4 s: each idle passivation is undone by the next use.
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        busy.ask(vec![activity("y")]).await.unwrap();
    }
    eventually(WAIT, "the idle actor is retired", || async {
        retired(h, &worker("idle")).await
    })
    .await;
    assert!(
        !retired(h, &worker("busy")).await,
        "an actor in use was retired"
    );
    assert_eq!(h.probe.runs("y"), 17);
    // Left alone, the busy one goes too.
    eventually(WAIT, "the other actor is retired once idle", || async {
        retired(h, &worker("busy")).await
    })
    .await;
    // The store shows the retirement a moment before the runtime counts it.
    eventually(WAIT, "both retirements are counted", || async {
        rt.metrics().retired == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rt.metrics().retired, 2, "an actor was retired twice");
    assert_eq!(json!(idle.ask(vec![]).await.unwrap()), json!([]));
    rt.shutdown().await;
}
