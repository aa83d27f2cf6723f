//! [`Store`] on Redis: a turn (entries, ack, sends, record) as one script; see `loom.lua`.

use loom_core::store::backend::{check_ttl, committed_next_past_corrupt, prepare_event};
use std::time::Duration;

use async_trait::async_trait;
use loom_core::store::backend::{
    Committed, Settle, Turn, prepare_append, prepare_message, prepare_result,
};
use loom_core::store::{Enqueued, Lease, Receipt, Retired, Store};
use loom_core::{ActorId, Envelope, IdempotencyKey, Seq, StoreError, StoreResult, Timestamp};
use redis::Value;
use serde::Serialize;

use crate::RedisStore;
use crate::idempotency::*;
use crate::mailbox::*;
use crate::resp::*;

/// The turn script's header (see `turn` in `loom.lua`).
#[derive(Serialize)]
struct TurnHeader<'a> {
    actor: &'a str,
    mbox: &'a str,
    expected: Seq,
    n: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Owner, token, and whether it is the actor's partition's lease (`Keys::fence`).
    fence: Option<(&'a str, String, bool)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    settle: Option<SettleHeader<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    record_ttl: Option<u64>,
    /// With a record: the channel and payload that signal it
    /// ([`IdempotencyStore::completions`](loom_core::IdempotencyStore::completions)).
    #[serde(skip_serializing_if = "Option::is_none")]
    done: Option<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<(u64, u32)>,
    /// How the partition numbers its dead letters (`dl_of` in `loom.lua`).
    dl: (u32, u32),
    out: Vec<OutHeader<'a>>,
}

#[derive(Serialize)]
struct SettleHeader<'a> {
    op: &'static str,
    pos: u64,
    dlv: u32,
    id: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'a str,
}

#[derive(Serialize)]
struct OutHeader<'a> {
    to: &'a str,
    id: String,
    due: u64,
    /// To an actor of another partition: through the outbox (`relay.rs`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    r: bool,
}

#[async_trait]
impl Store for RedisStore {
    fn partitions(&self) -> u32 {
        self.keys.partitions()
    }

    fn relay_failure(&self) -> Option<loom_core::store::RelayFailure> {
        self.relay.as_ref().and_then(|r| r.failure())
    }

    async fn relay_backlog(&self) -> StoreResult<Vec<loom_core::store::RelayBacklog>> {
        let n = self.keys.partitions();
        if n == 1 {
            // One partition: no outbox, nothing to relay.
            return Ok(Vec::new());
        }
        let all: Vec<u32> = (0..n).collect();
        let lens: Vec<u64> =
            crate::scan::each(&self.conn(), crate::relay::xlens(&self.keys, &all)).await?;
        Ok(lens
            .into_iter()
            .zip(0..)
            .map(|(waiting, partition)| loom_core::store::RelayBacklog { partition, waiting })
            .collect())
    }

    async fn commit_turn(&self, turn: Turn<'_>) -> StoreResult<Committed> {
        turn.check()?;
        let frames = prepare_append(turn.actor, turn.expected_next, turn.entries)?;
        if let Some(opts) = &turn.next {
            opts.validate()?;
        }
        let mut out_frames = Vec::with_capacity(turn.send.len());
        for o in turn.send {
            out_frames.push(prepare_message(&o.envelope)?);
        }
        let mut record_value = None;
        if let Some(r) = &turn.record {
            check_ttl("idempotency ttl", r.ttl)?;
            let mut v = prepare_result(r.actor, r.key, r.result)?;
            v.insert(0, b'C');
            record_value = Some(v);
        }
        let (settle, settle_actor) = match turn.settle {
            Some(Settle::Ack(r)) => (
                Some(SettleHeader {
                    op: "ack",
                    pos: r.position,
                    dlv: r.delivery,
                    id: r.message_id.to_string(),
                    reason: "",
                }),
                Some(&r.actor),
            ),
            Some(Settle::DeadLetter(r, reason)) => (
                Some(SettleHeader {
                    op: "bury",
                    pos: r.position,
                    dlv: r.delivery,
                    id: r.message_id.to_string(),
                    reason,
                }),
                Some(&r.actor),
            ),
            None => (None, None),
        };
        // The turn settles a delivery of its own actor's mailbox, or of one of its event lanes:
        // of its own partition, whose keys alone it may touch.
        let mailbox_actor = settle_actor.unwrap_or(turn.actor);
        if self.keys.partition_of(mailbox_actor) != self.keys.partition_of(turn.actor) {
            return Err(StoreError::InvalidRequest(format!(
                "a turn of {} settles a message of {mailbox_actor}, which is in another partition",
                turn.actor
            )));
        }
        let clipped;
        let settle = match settle {
            Some(mut h) => {
                clipped = loom_core::limits::clip_reason(h.reason);
                h.reason = &clipped;
                Some(h)
            }
            None => None,
        };
        // A message to an actor of another partition goes through this one's outbox.
        let n = self.keys.partitions();
        let here = loom_core::partition::partition_of(turn.actor, n);
        // Which sends do, placed once (each is read three times below).
        let relayed: Vec<bool> = turn
            .send
            .iter()
            .map(|o| n > 1 && loom_core::partition::partition_of(&o.envelope.to, n) != here)
            .collect();
        // The turn's own partition's dead letters: its own mailbox's and its lanes'.
        let dl = self.keys.dead_letters_of(turn.actor);
        let header = TurnHeader {
            actor: turn.actor.as_str(),
            mbox: mailbox_actor.as_str(),
            expected: turn.expected_next,
            n: frames.len(),
            fence: turn.fence.map(|l| {
                let partition = l.actor != *turn.actor;
                (l.owner.as_str(), l.token.to_string(), partition)
            }),
            settle,
            record_ttl: turn.record.map(|r| r.ttl.as_millis().max(1) as u64),
            done: turn.record.map(|r| {
                let c = loom_core::store::Completion {
                    actor: r.actor.clone(),
                    key: r.key.clone(),
                };
                (self.keys.done(), c.payload())
            }),
            next: turn
                .next
                .map(|o| (o.visibility.as_millis().max(1) as u64, o.max_deliveries)),
            dl: (dl.n, dl.p),
            out: turn
                .send
                .iter()
                .zip(&relayed)
                .map(|(o, r)| OutHeader {
                    to: o.envelope.to.as_str(),
                    id: o.envelope.id.to_string(),
                    due: o.deliver_at.map_or(0, Timestamp::as_millis),
                    r: *r,
                })
                .collect(),
        };
        let jk = self.keys.journal(turn.actor);
        let own = self.keys.mailbox(turn.actor);
        let mk = self.keys.mailbox(mailbox_actor);
        let (ls, own_ls) = self.keys.fence(turn.actor, turn.fence)?;
        let idem = match &turn.record {
            Some(r) => self.keys.idempotency(r.actor, r.key),
            None => self.keys.idempotency(
                turn.actor,
                &IdempotencyKey::new("-").map_err(StoreError::from)?,
            ),
        };
        let mut keys: Vec<String> = vec![
            jk.j,
            jk.jm,
            self.keys.actors_of(turn.actor),
            dl.dl,
            dl.seq,
            ls,
            idem,
            own.mm,
            own.mq,
            own.md,
            own.mdx,
            self.keys.ready(turn.actor),
            mk.mm,
            mk.mq,
            mk.md,
            mk.mdx,
            self.keys.ready(mailbox_actor),
        ];
        let outbox = relayed.contains(&true);
        for (o, _) in turn.send.iter().zip(&relayed).filter(|(_, r)| !**r) {
            let m = self.keys.mailbox(&o.envelope.to);
            keys.extend([m.mm, m.mq, m.md, m.mdx, self.keys.ready(&o.envelope.to)]);
        }
        if outbox {
            let (ob, obm) = self.keys.outbox(here);
            keys.extend([ob, obm]);
        }
        keys.extend(own_ls);
        let header = serde_json::to_vec(&header)
            .map_err(|e| StoreError::InvalidRequest(format!("turn header: {e}")))?;
        let mut args = vec![header];
        args.extend(frames);
        args.extend(out_frames);
        args.extend(record_value);
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let r = self.run(&self.scripts.turn, &keys, args).await?;
        match status(&r).as_str() {
            "ok" => {
                // Committed: the wake-ups go whatever the rest of the reply says. Its own
                // mailbox the runtime wakes itself; other actors' owners may be other nodes.
                // What went to the outbox the relay wakes once it has moved it.
                if outbox && let Some(relay) = &self.relay {
                    relay.pushed(here);
                }
                self.signals.wake(
                    turn.send
                        .iter()
                        .zip(&relayed)
                        .filter(|(o, r)| {
                            o.deliver_at.is_none() && o.envelope.to != *turn.actor && !**r
                        })
                        .map(|(o, _)| &o.envelope.to)
                        .filter(|to| !to.is_system()),
                );
                let highest = number(r.get(1), "highest")?;
                // Committed: a next message that does not decode is not an error (D15); it
                // is buried and the mailbox leased again (D14).
                let next = (r.len() > 2).then(|| delivery(turn.actor, &r[2..]));
                let next = committed_next_past_corrupt(
                    self,
                    turn.actor,
                    next,
                    turn.next,
                    |e| async move { self.bury_undecodable(turn.actor, &r[2..], &e).await },
                )
                .await;
                Ok(Committed { highest, next })
            }
            "conflict" => Err(StoreError::Conflict {
                actor: turn.actor.clone(),
                expected: turn.expected_next,
                actual: number(r.get(1), "next seq")?,
            }),
            "lost" => Err(StoreError::LeaseLost {
                actor: turn.actor.clone(),
                token: turn.fence.map_or(0, |l| l.token),
            }),
            "stale" => {
                let r = match turn.settle {
                    Some(Settle::Ack(r) | Settle::DeadLetter(r, _)) => r,
                    None => return Err(unexpected("stale receipt without a receipt")),
                };
                Err(StoreError::StaleReceipt {
                    actor: r.actor.clone(),
                    message_id: r.message_id,
                })
            }
            other => Err(unexpected(format!("turn replied {other}"))),
        }
    }

    async fn enqueue_once(
        &self,
        msg: &Envelope,
        deliver_at: Option<Timestamp>,
        key: &IdempotencyKey,
        ttl_: Duration,
    ) -> StoreResult<Enqueued> {
        check_ttl("idempotency ttl", ttl_)?;
        let frame = prepare_message(msg)?;
        let m = self.keys.mailbox(&msg.to);
        let idem = self.keys.idempotency(&msg.to, key);
        let due = deliver_at.map_or(0, Timestamp::as_millis);
        let r = self
            .run(
                &self.scripts.enqueue_once,
                &[
                    &m.mm,
                    &m.mq,
                    &m.md,
                    &m.mdx,
                    &self.keys.ready(&msg.to),
                    &idem,
                ],
                vec![s(msg.to.as_str()), s(msg.id), frame, s(due), ttl(ttl_)],
            )
            .await?;
        let enqueued = self.enqueued(msg, key, &r)?;
        if deliver_at.is_none() && matches!(enqueued, Enqueued::New(_)) {
            self.signals.wake([&msg.to]);
        }
        if let Enqueued::Duplicate(found) = &enqueued {
            self.replicated_as_read(found).await?;
        }
        Ok(enqueued)
    }

    async fn enqueue_event(
        &self,
        msg: &Envelope,
        key: &IdempotencyKey,
        ttl_: Duration,
        owner: &ActorId,
    ) -> StoreResult<Enqueued> {
        let frame = prepare_event(msg, ttl_, owner, self.partitions())?;
        let m = self.keys.mailbox(&msg.to);
        let o = self.keys.mailbox(owner);
        let idem = self.keys.idempotency(&msg.to, key);
        let r = self
            .run(
                &self.scripts.enqueue_event,
                &[
                    &m.mm,
                    &m.mq,
                    &m.md,
                    &m.mdx,
                    &self.keys.ready(&msg.to),
                    &idem,
                    &o.mm,
                    &self.keys.ready(owner),
                ],
                vec![
                    s(msg.to.as_str()),
                    s(msg.id),
                    frame,
                    s(0),
                    ttl(ttl_),
                    s(owner.as_str()),
                ],
            )
            .await?;
        let enqueued = self.enqueued(msg, key, &r)?;
        if matches!(enqueued, Enqueued::New(_)) {
            // The lane: an invocation waiting on it in memory, wherever it runs, is woken (a
            // lane is never activated). Not the owner: whether the event made a suspended
            // message due the script does not say, and a wake that finds nothing due would
            // activate the owner for nothing; its node's scan finds a suspended one.
            self.signals.wake([&msg.to]);
        }
        Ok(enqueued)
    }

    async fn retire(&self, receipt: &Receipt, fence: &Lease, highest: Seq) -> StoreResult<Retired> {
        let a = &receipt.actor;
        let (j, m) = (self.keys.journal(a), self.keys.mailbox(a));
        let (ls, own) = self.keys.fence(a, Some(fence))?;
        let ready = self.keys.ready(a);
        let mut keys = vec![
            j.j.as_str(),
            &j.jm,
            &j.sn,
            &j.sz,
            &ls,
            &m.mm,
            &m.mq,
            &m.md,
            &m.mdx,
            &ready,
        ];
        keys.extend(own.as_deref());
        let r = self
            .run(
                &self.scripts.retire,
                &keys,
                vec![
                    s(a.as_str()),
                    s(highest),
                    s(receipt.position),
                    s(receipt.delivery),
                    s(receipt.message_id),
                    s(&fence.owner),
                    s(fence.token),
                ],
            )
            .await?;
        let word = status(&r);
        loom_core::store::backend::retire_status(&word, receipt, fence)
            .unwrap_or_else(|| Err(unexpected(format!("retire replied {word}"))))
    }
}

impl RedisStore {
    /// Reads the reply of `enqueue_once` or `enqueue_event`.
    fn enqueued(&self, msg: &Envelope, key: &IdempotencyKey, r: &[Value]) -> StoreResult<Enqueued> {
        match status(r).as_str() {
            "ok" => Ok(Enqueued::New(number(r.get(1), "position")?)),
            "dup" => Ok(Enqueued::Duplicate(reservation(
                &msg.to,
                key,
                &bytes(r.get(1)).unwrap_or_default(),
                r.get(2),
            )?)),
            other => Err(unexpected(format!("enqueue_once replied {other}"))),
        }
    }
}
