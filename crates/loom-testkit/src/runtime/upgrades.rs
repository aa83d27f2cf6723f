//! Runtime cases about safe code upgrades: an invocation half done under old code finishes on
//! the old code's path after a restart under new code (`ctx.patched`), state written under an
//! older schema version is upgraded once when new code loads it (from a snapshot and from
//! patches), a new actor's journal says its version, old code leaves newer state to new code,
//! and a failed upgrade parks the actor without journaling anything.

use std::sync::Arc;

use loom_core::runtime::{Actor, Compaction, Context, Rejected, compact_journal};
use loom_core::{ActorId, EntryKind};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::common::{WAIT, finished, parked_keeping_its_message, reached, replies};
use super::{Harness, Probe, RuntimeCase, eventually, runtime_cases};

pub(super) fn cases() -> Vec<RuntimeCase> {
    runtime_cases![
        an_invocation_half_done_under_old_code_finishes_on_the_old_path_after_an_upgrade,
        state_written_by_old_code_is_upgraded_once_when_new_code_loads_it,
        a_new_actor_journals_its_state_version_and_old_code_leaves_it_to_new_code,
        a_failed_upgrade_parks_the_actor_and_fixed_code_upgrades_it_after_unpark,
        an_activity_output_the_new_code_cannot_decode_parks_the_actor,
        an_unfinished_invocation_whose_message_the_new_code_cannot_decode_parks_the_actor,
        actors_old_code_declines_hide_no_later_ready_actor,
    ]
}

/// During a rollback, more actors of newer state than a scan reads (512) are ready, and old
/// code declines each: their messages stay in the store's ready index, oldest first. A message
/// that only the scan finds (one enqueued with a delay by another process: no wake-up, no
/// alarm here) for an actor old code can run still runs. Before, every scan read the same 512
/// declined actors, and the later one waited until newer code ran them.
async fn actors_old_code_declines_hide_no_later_ready_actor(h: &Harness) {
    use futures::future::join_all;
    use loom_core::{Entry, Envelope, MessageId, Timestamp};
    let go = serde_json::to_value(Msg::Go { gate: false }).unwrap();
    // Journals of version 2 written as v2 would, and a message for each, at once.
    let newer: Vec<ActorId> = (0..600).map(|i| upgrade(&format!("newer{i}"))).collect();
    join_all(newer.iter().map(|id| {
        let go = go.clone();
        async move {
            let entries = [
                Entry::new(
                    1,
                    EntryKind::Invoked {
                        message_id: MessageId::new(),
                        payload: go.clone(),
                        idempotency_key: None,
                        requeued_from: None,
                    },
                ),
                Entry::new(
                    2,
                    EntryKind::StateUpgraded {
                        from: 0,
                        to: 2,
                        state: json!({ "total": 1, "upgraded_from": null }),
                    },
                ),
                Entry::new(
                    3,
                    EntryKind::Completed {
                        reply: json!("a b d"),
                    },
                ),
            ];
            h.store.append(id, 1, &entries).await.expect("a v2 journal");
            h.store
                .enqueue(&Envelope::new(id.clone(), go), None)
                .await
                .expect("a message for it");
        }
    }))
    .await;
    let late = upgrade("late");
    h.store
        .enqueue(
            &Envelope::new(late.clone(), go),
            Some(Timestamp::now() + std::time::Duration::from_millis(1500)),
        )
        .await
        .expect("the delayed message");
    let rt = v1(h).await;
    finished(h, &late, 1).await;
    assert!(rt.metrics().declined >= 512, "{:?}", rt.metrics().declined);
    rt.shutdown().await;
}

/// What both versions of kind `upgrade` receive.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Msg {
    /// Run the activities, waiting at the probe's gate before the last if `gate`.
    Go { gate: bool },
    /// Reply with the state as JSON.
    Read,
}

/// Version 1: state `{count}`; `Go` runs activities a, b, (gate), d.
struct V1(Arc<Probe>);

#[derive(Default, Serialize, Deserialize)]
struct CountV1 {
    count: u32,
}

/// Version 2: state `{total, upgraded_from}`; `Go` runs a, then c if patched, then b, (gate), d.
/// With `broken`, its upgrade gives a state it cannot read.
struct V2(Arc<Probe>, bool);

#[derive(Default, Serialize, Deserialize)]
struct CountV2 {
    total: u64,
    upgraded_from: Option<u32>,
}

async fn run(probe: &Arc<Probe>, ctx: &mut Context<'_>, name: &str) -> Result<(), Rejected> {
    let p = probe.clone();
    let n = name.to_owned();
    ctx.activity(name, &(), |_| async move {
        *p.runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(n)
            .or_default() += 1;
        Ok::<_, String>(())
    })
    .await?;
    Ok(())
}

impl Actor for V1 {
    const KIND: &'static str = "upgrade";
    type State = CountV1;
    type Message = Msg;
    type Reply = String;

    async fn handle(
        &self,
        state: &mut CountV1,
        ctx: &mut Context<'_>,
        msg: Msg,
    ) -> Result<String, Rejected> {
        let Msg::Go { gate } = msg else {
            return serde_json::to_string(state).map_err(|e| Rejected::new(e.to_string()));
        };
        run(&self.0, ctx, "a").await?;
        run(&self.0, ctx, "b").await?;
        if gate {
            self.0.hold().await;
        }
        run(&self.0, ctx, "d").await?;
        state.count += 1;
        Ok("a b d".into())
    }
}

impl Actor for V2 {
    const KIND: &'static str = "upgrade";
    const STATE_VERSION: u32 = 2;
    type State = CountV2;
    type Message = Msg;
    type Reply = String;

    fn upgrade_state(&self, from: u32, state: Value) -> Result<Value, String> {
        match (from, state["count"].as_u64()) {
            (1, Some(_)) if self.1 => Ok(json!({ "total": "many" })),
            (1, Some(count)) => Ok(json!({ "total": count, "upgraded_from": 1 })),
            _ => Err(format!("no upgrade from version {from}: {state}")),
        }
    }

    async fn handle(
        &self,
        state: &mut CountV2,
        ctx: &mut Context<'_>,
        msg: Msg,
    ) -> Result<String, Rejected> {
        let Msg::Go { gate } = msg else {
            return serde_json::to_string(state).map_err(|e| Rejected::new(e.to_string()));
        };
        let mut path = vec!["a"];
        run(&self.0, ctx, "a").await?;
        if ctx.patched("add-c")? {
            run(&self.0, ctx, "c").await?;
            path.push("c");
        }
        run(&self.0, ctx, "b").await?;
        if gate {
            self.0.hold().await;
        }
        run(&self.0, ctx, "d").await?;
        path.extend(["b", "d"]);
        state.total += 1;
        Ok(path.join(" "))
    }
}

/// Version 3: `Go` takes activity b's output as a number, where the versions before it
/// returned nothing, so their journals of `b` do not decode for it.
struct V3;

impl Actor for V3 {
    const KIND: &'static str = "upgrade";
    type State = CountV1;
    type Message = Msg;
    type Reply = String;

    async fn handle(
        &self,
        _state: &mut CountV1,
        ctx: &mut Context<'_>,
        msg: Msg,
    ) -> Result<String, Rejected> {
        let Msg::Go { .. } = msg else {
            return Ok(String::new());
        };
        ctx.activity("a", &(), |_| async { Ok::<_, String>(()) })
            .await?;
        let n: u64 = ctx
            .activity("b", &(), |_| async { Ok::<_, String>(7) })
            .await?;
        Ok(format!("b={n}"))
    }
}

/// What version 4 of kind `upgrade` receives: no message of the versions before it decodes
/// as one.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum MsgV4 {
    /// Start, with a count.
    Start { n: u32 },
}

/// Version 4: a new message type.
struct V4;

impl Actor for V4 {
    const KIND: &'static str = "upgrade";
    type State = CountV1;
    type Message = MsgV4;
    type Reply = String;

    async fn handle(
        &self,
        _state: &mut CountV1,
        _ctx: &mut Context<'_>,
        msg: MsgV4,
    ) -> Result<String, Rejected> {
        let MsgV4::Start { n } = msg;
        Ok(n.to_string())
    }
}

/// `upgrade/key` half done under version 1 and its process crashed: activities a and b
/// journaled, the invocation waiting at the gate before d (opened once for the next run).
async fn half_done_under_v1(h: &Harness, key: &str) -> ActorId {
    let rt = v1(h).await;
    rt.actor::<V1>(key)
        .unwrap()
        .send(Msg::Go { gate: true })
        .await
        .unwrap();
    reached(h).await;
    rt.kill().await;
    h.probe.open(1);
    upgrade(key)
}

fn upgrade(key: &str) -> ActorId {
    ActorId::new("upgrade", key).expect("id")
}

async fn v1(h: &Harness) -> loom_core::Runtime {
    v1_with(h, |_| {}).await
}

async fn v1_with(
    h: &Harness,
    f: impl FnOnce(&mut loom_core::runtime::Config),
) -> loom_core::Runtime {
    let p = h.probe.clone();
    h.runtime_registering(|b| b.register_actor(V1(p)), f).await
}

async fn v2(h: &Harness) -> loom_core::Runtime {
    v2_broken(h, false).await
}

async fn v2_broken(h: &Harness, broken: bool) -> loom_core::Runtime {
    let p = h.probe.clone();
    h.runtime_registering(|b| b.register_actor(V2(p, broken)), |_| {})
        .await
}

async fn read(rt: &loom_core::Runtime, actor: &str) -> Value {
    let r = rt.actor::<V2>(actor).unwrap().ask(Msg::Read).await.unwrap();
    serde_json::from_str(&r).unwrap()
}

async fn upgrades(h: &Harness, id: &ActorId) -> Vec<(u32, u32)> {
    h.journal(id)
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            EntryKind::StateUpgraded { from, to, .. } => Some((from, to)),
            _ => None,
        })
        .collect()
}

async fn an_invocation_half_done_under_old_code_finishes_on_the_old_path_after_an_upgrade(
    h: &Harness,
) {
    let id = upgrade("u");
    let rt = v1(h).await;
    let a = rt.actor::<V1>("u").unwrap();
    assert_eq!(a.ask(Msg::Go { gate: false }).await.unwrap(), "a b d");
    // Half done under v1: a and b journaled, waiting at the gate before d.
    a.send(Msg::Go { gate: true }).await.unwrap();
    reached(h).await;
    rt.kill().await;
    h.probe.open(1);
    let rt = v2(h).await;
    finished(h, &id, 2).await;
    // v2's replay skipped c (v1 journaled b at that step), replayed a and b, and ran d.
    assert_eq!(replies(h, &id).await[1], json!("a b d"));
    let runs = |n: &str| h.probe.runs(n);
    assert_eq!((runs("a"), runs("b"), runs("c"), runs("d")), (2, 2, 0, 2));
    assert_eq!(upgrades(h, &id).await, vec![(1, 2)]);
    assert_eq!(
        read(&rt, "u").await,
        json!({ "total": 2, "upgraded_from": 1 })
    );
    // New invocations take the new path, and keep it when replayed after a crash.
    let b = rt.actor::<V2>("u").unwrap();
    assert_eq!(b.ask(Msg::Go { gate: false }).await.unwrap(), "a c b d");
    b.send(Msg::Go { gate: true }).await.unwrap();
    reached(h).await;
    let rt = {
        rt.kill().await;
        h.probe.open(1);
        v2(h).await
    };
    finished(h, &id, 5).await;
    assert_eq!(replies(h, &id).await[4], json!("a c b d"));
    assert_eq!(
        runs("c"),
        2,
        "the patched branch's activity ran again on replay"
    );
    assert_eq!(read(&rt, "u").await["total"], json!(4));
    assert_eq!(upgrades(h, &id).await.len(), 1, "upgraded twice");
    rt.shutdown().await;
}

async fn state_written_by_old_code_is_upgraded_once_when_new_code_loads_it(h: &Harness) {
    let id = upgrade("s");
    // v1 snapshots often, so that v2 loads a v1 snapshot and v1 patches after it.
    let rt = v1_with(h, |c| {
        c.compaction = Compaction {
            every_entries: Some(5),
            every_bytes: None,
            keep: 1,
        }
    })
    .await;
    let a = rt.actor::<V1>("s").unwrap();
    for _ in 0..4 {
        a.ask(Msg::Go { gate: false }).await.unwrap();
    }
    eventually(WAIT, "v1 took a snapshot", || async {
        !h.store.info(&id).await.unwrap().snapshots.is_empty()
    })
    .await;
    a.ask(Msg::Go { gate: false }).await.unwrap();
    rt.shutdown().await;
    let snapshot = *h.store.info(&id).await.unwrap().snapshots.last().unwrap();
    assert!(
        snapshot < h.highest(&id).await,
        "no v1 patches after the snapshot"
    );

    let rt = v2(h).await;
    assert_eq!(
        read(&rt, "s").await,
        json!({ "total": 5, "upgraded_from": 1 })
    );
    assert_eq!(rt.metrics().state_upgrades, 1);
    rt.actor::<V2>("s")
        .unwrap()
        .ask(Msg::Go { gate: false })
        .await
        .unwrap();
    rt.kill().await;
    // Replayed from the v1 snapshot, through the upgrade, then the v2 patch: no new upgrade.
    let rt = v2(h).await;
    assert_eq!(read(&rt, "s").await["total"], json!(6));
    assert_eq!(rt.metrics().state_upgrades, 0);
    assert_eq!(upgrades(h, &id).await, vec![(1, 2)]);
    rt.shutdown().await;
    // A snapshot taken now is at version 2, and loads under v2 without an upgrade.
    compact_journal(&*h.store, &id, 1).await.unwrap();
    let rt = v2(h).await;
    assert_eq!(read(&rt, "s").await["total"], json!(6));
    assert_eq!(rt.metrics().state_upgrades, 0);
    rt.shutdown().await;
}

async fn a_new_actor_journals_its_state_version_and_old_code_leaves_it_to_new_code(h: &Harness) {
    let id = upgrade("n");
    let rt = v2(h).await;
    let n = rt.actor::<V2>("n").unwrap();
    n.ask(Msg::Go { gate: false }).await.unwrap();
    n.ask(Msg::Go { gate: false }).await.unwrap();
    rt.kill().await;
    // The first state says its version; later changes are patches.
    assert_eq!(upgrades(h, &id).await, vec![(0, 2)]);
    assert_eq!(h.count(&id, |k| k.name() == "state_patched").await, 1);
    let rt = v2(h).await;
    assert_eq!(
        read(&rt, "n").await,
        json!({ "total": 2, "upgraded_from": null })
    );
    assert_eq!(rt.metrics().state_upgrades, 0, "a v2 journal was upgraded");
    rt.shutdown().await;
    // Old code cannot read newer state: it leaves the actor alone (not parked, nothing
    // written), and the message waits for new code.
    let before = h.highest(&id).await;
    let rt = v1(h).await;
    rt.actor::<V1>("n")
        .unwrap()
        .send(Msg::Go { gate: false })
        .await
        .unwrap();
    eventually(WAIT, "old code declined the actor", || async {
        rt.metrics().declined >= 1
    })
    .await;
    assert_eq!(rt.metrics().recoveries, 0);
    assert!(rt.parked().await.unwrap().is_empty(), "old code parked it");
    assert_eq!(
        h.highest(&id).await,
        before,
        "old code wrote to its journal"
    );
    rt.shutdown().await;
    let rt = v2(h).await;
    finished(h, &id, 3).await;
    assert_eq!(read(&rt, "n").await["total"], json!(3));
    rt.shutdown().await;
}

/// An upgrade whose state the code cannot read parks the actor and journals nothing; fixed
/// code, once the actor is unparked, upgrades it from the old state.
/// An activity's journaled output that the code now running cannot decode (its type changed)
/// is changed code, as a journal of other steps is: the actor is parked and its message kept
/// for fixed code. Before, the replay made it an ordinary rejection: the message was acked and
/// its invocation closed as refused, after its side effects had run.
async fn an_activity_output_the_new_code_cannot_decode_parks_the_actor(h: &Harness) {
    let id = half_done_under_v1(h, "t").await;
    let rt = h
        .runtime_registering(|b| b.register_actor(V3), |_| {})
        .await;
    eventually(WAIT, "the actor is parked", || async {
        !rt.parked().await.unwrap().is_empty()
    })
    .await;
    let (parked, park) = rt.parked().await.unwrap().remove(0);
    assert_eq!(parked, id);
    assert!(park.reason.contains("does not decode"), "{}", park.reason);
    assert_eq!(
        h.count(&id, |k| matches!(
            k,
            EntryKind::Completed { .. } | EntryKind::Failed { .. }
        ))
        .await,
        0,
        "the invocation was closed"
    );
    assert_eq!(h.store.pending(&id).await.unwrap(), 1);
    rt.shutdown().await;
}

/// An invocation half done under old code, whose message the new code's message type does not
/// read: the actor is parked, its journal and message kept, and code that reads the message
/// finishes the invocation after an unpark. Before, the message was dead-lettered as malformed
/// input, and the steps the invocation had recorded were lost with it.
async fn an_unfinished_invocation_whose_message_the_new_code_cannot_decode_parks_the_actor(
    h: &Harness,
) {
    let id = half_done_under_v1(h, "m").await;
    let rt = h
        .runtime_registering(|b| b.register_actor(V4), |_| {})
        .await;
    parked_keeping_its_message(h, &rt, &id, "no longer decodes").await;
    rt.shutdown().await;
    let rt = v1(h).await;
    assert!(rt.unpark(&id).await.unwrap());
    finished(h, &id, 1).await;
    assert_eq!(replies(h, &id).await, vec![json!("a b d")]);
    let runs = |n: &str| h.probe.runs(n);
    assert_eq!(
        (runs("a"), runs("b"), runs("d")),
        (1, 1, 1),
        "recorded steps ran again"
    );
    rt.shutdown().await;
}

async fn a_failed_upgrade_parks_the_actor_and_fixed_code_upgrades_it_after_unpark(h: &Harness) {
    let id = upgrade("f");
    let rt = v1(h).await;
    rt.actor::<V1>("f")
        .unwrap()
        .ask(Msg::Go { gate: false })
        .await
        .unwrap();
    rt.shutdown().await;
    let before = h.highest(&id).await;
    let rt = v2_broken(h, true).await;
    rt.actor::<V2>("f")
        .unwrap()
        .send(Msg::Go { gate: false })
        .await
        .unwrap();
    eventually(WAIT, "the actor is parked", || async {
        !rt.parked().await.unwrap().is_empty()
    })
    .await;
    let (_, park) = rt.parked().await.unwrap().remove(0);
    assert!(
        park.reason
            .contains("upgrading its state from version 1 to 2 failed")
            && park.reason.contains("does not decode"),
        "{}",
        park.reason
    );
    assert_eq!(
        h.highest(&id).await,
        before,
        "the bad upgrade was journaled"
    );
    rt.shutdown().await;
    let rt = v2(h).await;
    assert!(rt.unpark(&id).await.unwrap());
    finished(h, &id, 2).await;
    assert_eq!(
        read(&rt, "f").await,
        json!({ "total": 2, "upgraded_from": 1 })
    );
    assert_eq!(upgrades(h, &id).await, vec![(1, 2)]);
    rt.shutdown().await;
}
