//! [`Mailbox`] on Redis: a sorted set of due positions and a hash of frames per actor, dead letters in a stream; see `loom.lua`.

use loom_core::store::backend::check_ttl;
use std::time::Duration;

use async_trait::async_trait;
use loom_core::codec::{self, RecordType};
use loom_core::store::backend::{
    bury_corrupt, check_purge, dead_letter_envelope, interleave_partitions, prepare_message,
    prepare_suspend,
};
use loom_core::store::{
    Backlog, DeadLetter, Delivery, LeaseOptions, Mailbox, Receipt, Suspension, Waiting,
};
use loom_core::{ActorId, Envelope, MessageId, StoreError, StoreResult, Timestamp};
use redis::Value;

use crate::resp::*;
use crate::{RedisStore, re};

/// Mailboxes whose message count `mailboxes` reads in one round trip.
const COUNTS_PER_TRIP: usize = 512;

/// Most stream entries one call of the `messages` script reads: a page of a mailbox of millions
/// (whose lowest positions were handled, so that the page cannot be picked from its first
/// entries) is picked in several calls, each holding Redis's one thread for tens of
/// milliseconds, not one holding it for seconds.
const LIST_BUDGET: usize = 4_000;

/// How often a listing picks a page again (a delayed message it chose moved meanwhile) or tops
/// one up (messages it chose were settled meanwhile) before it picks the rest in one call.
const LIST_RESTARTS: u32 = 3;

/// One page as [`RedisStore::messages_page`] picked it.
struct Page {
    rows: Vec<Waiting>,
    /// The highest position it chose (of those it returns, and those settled meanwhile).
    last_chosen: u64,
    /// It chose as many as asked, in several calls (so a short `rows` is not the end).
    full: bool,
    /// A delayed message it chose was moved into the stream before its frame was read.
    moved: bool,
}

impl RedisStore {
    /// The `limit` lowest positions above `after` (`messages` in loom.lua): one call if the
    /// script picks the page within `budget` stream entries (0: whatever it reads), one
    /// snapshot as before; else several, their candidates merged here, and then the chosen
    /// with their frames (`messages_frames`), leaving out what was settled meanwhile.
    async fn messages_page(
        &self,
        actor: &ActorId,
        after: u64,
        limit: usize,
        budget: usize,
    ) -> StoreResult<Page> {
        let m = self.keys.mailbox(actor);
        let mut from = "-".to_owned();
        // The lowest `limit` positions found so far: (position, stream id or empty, due).
        let mut chosen: Vec<(u64, String, String)> = Vec::new();
        let last = after.saturating_add(limit as u64);
        let r = loop {
            let bound = if chosen.len() == limit {
                chosen.last().map_or(0, |c| c.0)
            } else {
                0
            };
            let inside = chosen.iter().filter(|c| c.0 <= last).count();
            let r = self
                .run(
                    &self.scripts.messages,
                    &[&m.mm, &m.mq, &m.md, &m.mdx],
                    vec![
                        after.to_string().into_bytes(),
                        limit.to_string().into_bytes(),
                        from.clone().into_bytes(),
                        budget.to_string().into_bytes(),
                        bound.to_string().into_bytes(),
                        inside.to_string().into_bytes(),
                    ],
                )
                .await?;
            let state = status(&r);
            if state == "done" {
                let rows = waiting_rows(actor, &r[1..])?;
                return Ok(Page {
                    last_chosen: rows.last().map_or(after, |w| w.position),
                    rows,
                    full: false,
                    moved: false,
                });
            }
            if !["more", "end", "full"].contains(&state.as_str()) {
                return Err(unexpected(format!("messages replied {state}")));
            }
            from = text(r.get(1)).ok_or_else(|| unexpected("messages cursor"))?;
            for c in r[3..].chunks(3) {
                chosen.push((
                    number(c.first(), "position")?,
                    text(c.get(1)).ok_or_else(|| unexpected("messages candidate's place"))?,
                    text(c.get(2)).ok_or_else(|| unexpected("messages candidate's due"))?,
                ));
            }
            // A delayed message read at the first call and moved into the stream since, read
            // there too: the stream's copy is the one whose frame is still there.
            chosen.sort_by_key(|c| (c.0, c.1.is_empty()));
            chosen.dedup_by_key(|c| c.0);
            chosen.truncate(limit);
            // The window filled by the script's count, which counts such a message's stream
            // copy again: gone on from unless the merged candidates fill it too.
            let filled = chosen.iter().filter(|c| c.0 <= last).count() >= limit;
            if state == "end" || (state == "full" && filled) {
                let mut args = Vec::new();
                for (pos, id, due) in &chosen {
                    args.extend([
                        pos.to_string().into_bytes(),
                        id.clone().into_bytes(),
                        due.clone().into_bytes(),
                    ]);
                }
                break self
                    .run(&self.scripts.messages_frames, &[&m.mm, &m.mq, &m.mdx], args)
                    .await?;
            }
        };
        let moved = text(r.first()).as_deref() == Some("moved");
        let rows = waiting_rows(actor, &r[1..])?;
        Ok(Page {
            rows,
            last_chosen: chosen.last().map_or(after, |c| c.0),
            full: chosen.len() == limit,
            moved,
        })
    }
}

/// The messages of a `messages` or `messages_frames` reply: `cur`, then `[pos, frame, due,
/// cancelling]` per message.
fn waiting_rows(actor: &ActorId, r: &[Value]) -> StoreResult<Vec<Waiting>> {
    let current = number(r.first(), "current position")?;
    let mut out = Vec::new();
    for chunk in r[1..].chunks(4) {
        let position = number(chunk.first(), "position")?;
        let frame = bytes(chunk.get(1)).ok_or_else(|| unexpected("message without a frame"))?;
        let envelope: Envelope = codec::decode(RecordType::Message, &frame).map_err(|e| {
            StoreError::corrupt(
                format!("message at position {position} of {actor}'s mailbox"),
                e,
            )
        })?;
        let due = crate::resp::score(chunk.get(2), "due")?;
        out.push(Waiting {
            position,
            envelope,
            deliver_at: (due > 0).then(|| Timestamp::from_millis(due)),
            out: position == current,
            cancelling: text(chunk.get(3)).as_deref() == Some("1"),
        });
    }
    Ok(out)
}

/// Builds a delivery from a lease reply's `[frame, position, deliveries, error]`.
pub(crate) fn delivery(actor: &ActorId, r: &[Value]) -> StoreResult<Delivery> {
    let frame = bytes(r.first()).ok_or_else(|| unexpected("lease reply without a frame"))?;
    let position = number(r.get(1), "position")?;
    let deliveries = number(r.get(2), "deliveries")?;
    Delivery::from_frame(
        actor.clone(),
        &frame,
        position,
        i64::try_from(deliveries).unwrap_or(i64::MAX),
        text(r.get(3)),
    )
}

impl RedisStore {
    /// The ready actors of each kind's partitions in `wanted` (of
    /// the store's ownership partitions, `Keys::ownership`): one script call reads each partition's index, giving each
    /// its share of `limit` and what the others leave to those with more (`ready_actors` in
    /// `loom.lua`); the lists are then taken from in turn, partitions within a kind and kinds
    /// within the result.
    async fn ready_in(&self, wanted: &[(&str, &[u32])], limit: usize) -> StoreResult<Vec<ActorId>> {
        let mut keys = Vec::new();
        let mut args = vec![s(limit)];
        for (kind, parts) in wanted {
            if let Some(p) = parts.iter().find(|p| **p >= self.keys.ownership()) {
                return Err(StoreError::InvalidRequest(format!(
                    "partition {p} of {kind}: this Redis store's ready index has {} per kind",
                    self.keys.ownership()
                )));
            }
            keys.extend(parts.iter().map(|p| self.keys.ready_in(kind, *p)));
            args.push(s(parts.len()));
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let r = if self.conn.is_cluster() {
            // A script may read one slot: one call per index (each of one partition), all at
            // once, each up to the limit; the lists are interleaved below as one call's are.
            let calls = keys.iter().map(|k| {
                self.run(
                    &self.scripts.ready_actors,
                    std::slice::from_ref(k),
                    vec![s(limit), s(1)],
                )
            });
            let mut all = Vec::new();
            for reply in futures::future::join_all(calls).await {
                all.extend(reply?);
            }
            all
        } else {
            self.run(&self.scripts.ready_actors, &keys, args).await?
        };
        let mut per_key = Vec::with_capacity(keys.len());
        let mut rest = r.as_slice();
        while let Some((n, tail)) = rest.split_first() {
            let n = usize::try_from(number(Some(n), "ready count")?).unwrap_or(usize::MAX);
            let (list, tail) = tail.split_at(n.min(tail.len()));
            per_key.push(
                list.iter()
                    .map(|v| {
                        ActorId::from_stored(
                            &text(Some(v)).ok_or_else(|| unexpected("ready actor"))?,
                            "mailbox actor id",
                        )
                    })
                    .collect::<StoreResult<Vec<ActorId>>>()?,
            );
            rest = tail;
        }
        Ok(interleave_partitions(per_key, wanted, limit))
    }

    /// Rule D14 for a message leased to `actor` whose frame did not decode (`error`; `r` is the
    /// lease reply's `[frame, position, deliveries, ...]`): dead-lettered at once by its id, read
    /// from the meta's current message (`curmsg`). Whether to lease again (`bury_corrupt`).
    pub(crate) async fn bury_undecodable(
        &self,
        actor: &ActorId,
        r: &[Value],
        error: &StoreError,
    ) -> StoreResult<bool> {
        let position = number(r.get(1), "position")?;
        let deliveries = number(r.get(2), "deliveries")?;
        let (current, id): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(self.keys.mailbox(actor).mm)
            .arg("cur")
            .arg("curmsg")
            .query_async(&mut self.conn())
            .await
            .map_err(re)?;
        let id = id.filter(|_| current == Some(position));
        bury_corrupt(
            self,
            actor,
            position,
            i64::try_from(deliveries).unwrap_or(i64::MAX),
            id.as_deref(),
            error,
        )
        .await
    }

    pub(crate) fn mailbox_keys<'a>(
        &self,
        actor: &ActorId,
        global: &'a mut Vec<String>,
    ) -> &'a [String] {
        let m = self.keys.mailbox(actor);
        let dl = self.keys.dead_letters_of(actor);
        global.clear();
        global.extend([
            m.mm,
            m.mq,
            m.md,
            m.mdx,
            self.keys.ready(actor),
            dl.dl,
            dl.seq,
        ]);
        global
    }

    /// The `n, p` arguments the scripts number `actor`'s dead letters with (`dl_of` in
    /// `loom.lua`).
    pub(crate) fn dead_letter_args(&self, actor: &ActorId) -> [Vec<u8>; 2] {
        let dl = self.keys.dead_letters_of(actor);
        [s(dl.n), s(dl.p)]
    }

    /// `lane`: for `suspend` only, the lane suspended on.
    pub(crate) async fn settle_op(
        &self,
        r: &Receipt,
        op: &str,
        ms: u64,
        text_arg: &str,
        // For `suspend` only: its lane, if any.
        lane: Option<Option<&ActorId>>,
    ) -> StoreResult<Vec<Value>> {
        let mut keys = Vec::new();
        self.mailbox_keys(&r.actor, &mut keys);
        let mut args = vec![
            s(r.actor.as_str()),
            s(op),
            s(r.position),
            s(r.delivery),
            s(r.message_id),
            s(ms),
            text_arg.as_bytes().to_vec(),
        ];
        args.extend(self.dead_letter_args(&r.actor));
        match lane {
            Some(Some(lane)) => {
                keys.push(self.keys.mailbox(lane).mm);
                args.push(s(lane.as_str()));
            }
            Some(None) => args.push(s("")),
            None => {}
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let reply = self.run(&self.scripts.settle, &keys, args).await?;
        match status(&reply).as_str() {
            "ok" | "busy" | "cancelled" => Ok(reply),
            "stale" => Err(StoreError::StaleReceipt {
                actor: r.actor.clone(),
                message_id: r.message_id,
            }),
            other => Err(unexpected(format!("settle replied {other}"))),
        }
    }
}

#[async_trait]
impl Mailbox for RedisStore {
    async fn enqueue(&self, msg: &Envelope, deliver_at: Option<Timestamp>) -> StoreResult<u64> {
        let frame = prepare_message(msg)?;
        let m = self.keys.mailbox(&msg.to);
        let due = deliver_at.map_or(0, Timestamp::as_millis);
        let r = self
            .run(
                &self.scripts.enqueue,
                &[&m.mm, &m.mq, &m.md, &m.mdx, &self.keys.ready(&msg.to)],
                vec![s(msg.to.as_str()), s(msg.id), frame, s(due)],
            )
            .await?;
        let position = number(r.get(1), "position")?;
        if deliver_at.is_none() {
            self.signals.wake([&msg.to]);
        }
        Ok(position)
    }

    async fn lease(&self, actor: &ActorId, opts: LeaseOptions) -> StoreResult<Option<Delivery>> {
        opts.validate()?;
        let mut keys = Vec::new();
        let keys: Vec<&str> = self
            .mailbox_keys(actor, &mut keys)
            .iter()
            .map(String::as_str)
            .collect();
        let args = {
            let mut args = vec![
                s(actor.as_str()),
                ttl(opts.visibility),
                s(opts.max_deliveries),
                s(opts.early.as_millis()),
            ];
            args.extend(self.dead_letter_args(actor));
            args
        };
        // Each pass hands out a message, or buries one whose frame does not decode (D14) and
        // leases again: one that cannot be buried is the error, so this ends.
        loop {
            let r = self.run(&self.scripts.lease, &keys, args.clone()).await?;
            match status(&r).as_str() {
                "none" => return Ok(None),
                "ok" => match delivery(actor, &r[1..]) {
                    Ok(d) => return Ok(Some(d)),
                    Err(e @ StoreError::Corrupt { .. }) => {
                        if !self.bury_undecodable(actor, &r[1..], &e).await? {
                            return Err(e);
                        }
                    }
                    Err(e) => return Err(e),
                },
                other => return Err(unexpected(format!("lease replied {other}"))),
            }
        }
    }

    async fn ack(&self, receipt: &Receipt) -> StoreResult<()> {
        self.settle_op(receipt, "ack", 0, "", None)
            .await
            .map(|_| ())
    }

    async fn nack(&self, receipt: &Receipt, delay: Duration, error: &str) -> StoreResult<()> {
        let error = loom_core::limits::clip_reason(error);
        self.settle_op(receipt, "nack", delay.as_millis() as u64, &error, None)
            .await
            .map(|_| ())
    }

    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> StoreResult<()> {
        check_ttl("visibility timeout", visibility)?;
        self.settle_op(receipt, "extend", visibility.as_millis() as u64, "", None)
            .await
            .map(|_| ())
    }

    async fn suspend(
        &self,
        receipt: &Receipt,
        lane: Option<&ActorId>,
        delay: Duration,
        reason: &str,
    ) -> StoreResult<Suspension> {
        let reason = prepare_suspend(receipt, lane, reason, loom_core::Store::partitions(self))?;
        let ms = delay.as_millis().min(u128::from(u64::MAX)) as u64;
        let r = self
            .settle_op(receipt, "suspend", ms, &reason, Some(lane))
            .await?;
        Ok(match status(&r).as_str() {
            "busy" => Suspension::EventWaiting,
            "cancelled" => Suspension::Cancelled,
            _ => Suspension::Suspended,
        })
    }

    async fn cancel(&self, actor: &ActorId, message: MessageId) -> StoreResult<Option<u64>> {
        let m = self.keys.mailbox(actor);
        let r = self
            .run(
                &self.scripts.cancel,
                &[&m.mm, &m.mq, &m.md, &m.mdx, &self.keys.ready(actor)],
                vec![s(actor.as_str()), s(message)],
            )
            .await?;
        match status(&r).as_str() {
            "none" => Ok(None),
            // A suspended invocation it cancels becomes due: its node's scan finds it (a wake
            // would activate the actor even when the cancel made nothing due).
            "ok" => number(r.get(1), "position").map(Some),
            other => Err(unexpected(format!("cancel replied {other}"))),
        }
    }

    async fn dead_letter(&self, receipt: &Receipt, reason: &str) -> StoreResult<u64> {
        let reason = loom_core::limits::clip_reason(reason);
        let r = self.settle_op(receipt, "bury", 0, &reason, None).await?;
        number(r.get(1), "dead letter id")
    }

    fn arrivals(&self) -> Option<tokio::sync::broadcast::Receiver<std::sync::Arc<[ActorId]>>> {
        Some(self.signals.arrivals())
    }

    async fn ready_actors(&self, kinds: &[&str], limit: usize) -> StoreResult<Vec<ActorId>> {
        let all: Vec<u32> = (0..self.keys.ownership()).collect();
        let wanted: Vec<(&str, &[u32])> = kinds.iter().map(|k| (*k, all.as_slice())).collect();
        self.ready_in(&wanted, limit).await
    }

    async fn ready_actors_in(
        &self,
        wanted: &[(&str, &[u32])],
        of: u32,
        limit: usize,
    ) -> StoreResult<Vec<ActorId>> {
        if of != self.keys.ownership() {
            return Err(StoreError::InvalidRequest(format!(
                "this Redis store's ready index has {} partitions per kind, not {of}",
                self.keys.ownership()
            )));
        }
        self.ready_in(wanted, limit).await
    }

    async fn backlog(&self, kind: &str) -> StoreResult<Backlog> {
        let mut conn = self.conn();
        // Ready-at scores are the server's clock (the scripts' `now_ms`): so is "now" here.
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        let now = secs * 1000 + micros / 1000;
        let mut cmds = Vec::new();
        for p in 0..self.keys.ownership() {
            let key = self.keys.ready_in(kind, p);
            let mut card = redis::cmd("ZCARD");
            card.arg(&key);
            let mut count = redis::cmd("ZCOUNT");
            count.arg(&key).arg("-inf").arg(now);
            let mut first = redis::cmd("ZRANGE");
            first.arg(&key).arg(0).arg(0).arg("WITHSCORES");
            cmds.extend([card, count, first]);
        }
        let per_partition: Vec<(u64, u64, Vec<(String, f64)>)> =
            crate::scan::each::<Value>(&conn, cmds)
                .await?
                .chunks(3)
                .map(|c| {
                    redis::from_redis_value(Value::Array(c.to_vec()))
                        .map_err(|e| unexpected(format!("backlog reply: {e}")))
                })
                .collect::<StoreResult<_>>()?;
        let at = Timestamp::from_millis(now);
        Ok(per_partition.into_iter().fold(
            Backlog {
                at,
                ..Backlog::default()
            },
            |b, (mailboxes, ready, first)| {
                b.merge(Backlog {
                    mailboxes,
                    ready,
                    // The first is the longest-waiting; one not yet due waits for nothing.
                    oldest_ready_at: first
                        .first()
                        .map(|(_, t)| *t as u64)
                        .filter(|t| *t <= now)
                        .map(Timestamp::from_millis),
                    at,
                })
            },
        ))
    }

    async fn next_due(&self) -> StoreResult<Option<Timestamp>> {
        let mut conn = self.conn();
        let mut earliest: Option<u64> = None;
        let keys = crate::scan::keys(&conn, &self.keys.ready_pattern()).await?;
        for key in keys.into_iter().filter(|k| self.keys.is_ready_index(k)) {
            let v: Vec<(String, f64)> = redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(0)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
                .map_err(re)?;
            if let Some((_, at)) = v.first() {
                let at = *at as u64;
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
            }
        }
        Ok(earliest.map(Timestamp::from_millis))
    }

    async fn pending(&self, actor: &ActorId) -> StoreResult<u64> {
        let mut conn = self.conn();
        let n: Option<i64> = redis::cmd("HGET")
            .arg(self.keys.mailbox(actor).mm)
            .arg("n")
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    async fn messages(
        &self,
        actor: &ActorId,
        after: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<Waiting>> {
        // Positions start at 1, so none is at or below 0.
        let (mut after, limit) = (after.unwrap_or(0), limit.min(u32::MAX as usize));
        let mut out = Vec::new();
        // Pages picked again or topped up: after LIST_RESTARTS, the rest is picked in one call
        // whatever it reads (one snapshot, as before calls were budgeted), so that an actor
        // settling its messages faster than a page of several calls is picked cannot keep the
        // listing going, nor a delayed message coming due be left out.
        let mut tries = 0;
        while out.len() < limit {
            let want = limit - out.len();
            let budget = if tries < LIST_RESTARTS {
                LIST_BUDGET
            } else {
                0
            };
            let page = self.messages_page(actor, after, want, budget).await?;
            // A delayed message chosen at the first call came due and moved into the stream
            // before its frame was fetched: the page is picked again.
            if page.moved {
                tries += 1;
                continue;
            }
            let (got, last) = (page.rows.len(), page.last_chosen);
            out.extend(page.rows);
            // A page short of what it chose (messages settled between its calls) goes on after
            // the last it chose; one that chose fewer than asked reached the end.
            if !page.full || got == want {
                break;
            }
            tries += 1;
            after = last;
        }
        Ok(out)
    }

    async fn mailboxes(&self, after: Option<&ActorId>, limit: usize) -> StoreResult<Vec<ActorId>> {
        let conn = self.conn();
        let mut found = Vec::new();
        for k in crate::scan::keys(&conn, &self.keys.mailbox_pattern()).await? {
            // The pattern also matches an idempotency record whose key ends in `}:mm`
            // (`…:{acct/alice}:i:k}:mm`): a mailbox's meta key is the one its actor names.
            if let Some(actor) = self.keys.actor_of(&k)
                && self.keys.mailbox(&actor).mm == k
            {
                found.push((actor, k));
            }
        }
        found.sort();
        found.retain(|(actor, _)| after.is_none_or(|a| actor > a));
        // Their message counts, a chunk of keys per round trip (one `HGET` each took a round
        // trip of its own: minutes for a store of a million mostly idle actors).
        let mut out = Vec::new();
        for chunk in found.chunks(COUNTS_PER_TRIP) {
            let cmds = chunk
                .iter()
                .map(|(_, key)| {
                    let mut c = redis::cmd("HGET");
                    c.arg(key).arg("n");
                    c
                })
                .collect();
            let counts: Vec<Option<i64>> = crate::scan::each(&conn, cmds).await?;
            for ((actor, _), n) in chunk.iter().zip(counts) {
                if n.unwrap_or(0) > 0 {
                    out.push(actor.clone());
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn dead_letters(&self, after: Option<u64>, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        // Each partition's stream, in id order; then the first `limit` of them all.
        let start = format!("{}-0", after.map_or(0, |a| a.saturating_add(1)));
        let cmds = (0..self.keys.partitions())
            .map(|p| {
                let mut c = redis::cmd("XRANGE");
                c.arg(self.keys.dead_letters(p))
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit);
                c
            })
            .collect();
        let per_partition: Vec<Value> = crate::scan::each(&self.conn(), cmds).await?;
        let mut out = Vec::new();
        for v in &per_partition {
            let Value::Array(items) = v else {
                return Err(unexpected("XRANGE reply"));
            };
            for item in items {
                out.push(dead_letter(item)?);
            }
        }
        out.sort_by_key(|d| d.id);
        out.truncate(limit);
        Ok(out)
    }

    async fn purge_dead_letters(&self, ids: &[u64]) -> StoreResult<u64> {
        check_purge(ids)?;
        if ids.is_empty() {
            return Ok(0);
        }
        // Dead letters are entries `id-0` of their partition's stream (the id says which): one
        // XDEL per partition deletes those there.
        let mut by_partition: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
        for id in ids {
            by_partition
                .entry(self.keys.partition_of_dead_letter(*id))
                .or_default()
                .push(*id);
        }
        let cmds = by_partition
            .iter()
            .map(|(p, ids)| {
                let mut c = redis::cmd("XDEL");
                c.arg(self.keys.dead_letters(*p));
                for id in ids {
                    c.arg(format!("{id}-0"));
                }
                c
            })
            .collect();
        let deleted: Vec<u64> = crate::scan::each(&self.conn(), cmds).await?;
        Ok(deleted.into_iter().sum())
    }

    async fn requeue_dead_letter(&self, id: u64) -> StoreResult<u64> {
        let mut conn = self.conn();
        let dl = self
            .keys
            .dead_letters(self.keys.partition_of_dead_letter(id));
        let v: Value = redis::cmd("XRANGE")
            .arg(&dl)
            .arg(format!("{id}-0"))
            .arg(format!("{id}-0"))
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        let Value::Array(items) = v else {
            return Err(unexpected("XRANGE reply"));
        };
        let Some(item) = items.first() else {
            return Err(StoreError::DeadLetterNotFound(id));
        };
        let back = dead_letter(item)?.envelope.requeued();
        let frame = prepare_message(&back)?;
        let m = self.keys.mailbox(&back.to);
        let mut keys = vec![dl, m.mm, m.mq, m.md, m.mdx, self.keys.ready(&back.to)];
        if let Some(key) = &back.idempotency_key {
            keys.push(self.keys.idempotency(&back.to, key));
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let r = self
            .run(
                &self.scripts.requeue,
                &keys,
                vec![s(id), s(back.to.as_str()), s(back.id), frame],
            )
            .await?;
        match status(&r).as_str() {
            "ok" => {
                let position = number(r.get(1), "position")?;
                self.signals.wake([&back.to]);
                Ok(position)
            }
            "missing" => Err(StoreError::DeadLetterNotFound(id)),
            other => Err(unexpected(format!("requeue replied {other}"))),
        }
    }
}

pub(crate) fn dead_letter(item: &Value) -> StoreResult<DeadLetter> {
    let (sid, fields) = entry_fields(item).ok_or_else(|| unexpected("dead letter shape"))?;
    let id: u64 = sid
        .strip_suffix("-0")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| unexpected(format!("dead letter id {sid}")))?;
    let get = |name: &str| {
        field(&fields, name).ok_or_else(|| unexpected(format!("dead letter {id} without {name}")))
    };
    let envelope = dead_letter_envelope(
        id,
        get("env")?,
        &String::from_utf8_lossy(get("actor")?),
        field(&fields, "id").map(String::from_utf8_lossy).as_deref(),
    )?;
    let num = |name: &str| -> StoreResult<u64> {
        std::str::from_utf8(get(name)?)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| unexpected(format!("dead letter {id} field {name}")))
    };
    Ok(DeadLetter {
        id,
        envelope,
        reason: String::from_utf8_lossy(get("reason")?).into_owned(),
        deliveries: u32::try_from(num("dlv")?).unwrap_or(u32::MAX),
        at: Timestamp::from_millis(num("at")?),
    })
}
