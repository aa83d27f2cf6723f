//! The store traits on Redis. Each operation is one script or one read command; see `loom.lua`.

use loom_core::store::check_ttl;
use std::time::Duration;

use async_trait::async_trait;
use loom_core::codec::{self, CodecError, RecordType};
use loom_core::store::{
    Committed, DeadLetter, Delivery, Enqueued, EntryStream, IdempotencyStore, JournalInfo,
    JournalStore, Lease, LeaseManager, LeaseOptions, Mailbox, Page, Park, Parking, Receipt,
    Reservation, SeqRange, Settle, Store, Turn, Waiting, check_owner, interleave, paged_read,
    prepare_append, prepare_message, prepare_result, prepare_snapshot,
};
use loom_core::{
    ActorId, Entry, Envelope, IdempotencyKey, Seq, Snapshot, StoreError, StoreResult, Timestamp,
};
use redis::Value;
use serde::Serialize;
use serde_json::Value as Json;

use crate::{BACKEND, RedisStore, Unexpected, re};

/// Entries per `XRANGE` while streaming a journal.
const READ_PAGE: usize = 1024;

fn unexpected(what: impl Into<String>) -> StoreError {
    StoreError::storage(BACKEND, Unexpected(what.into()))
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".to_owned()),
        _ => None,
    }
}

fn bytes(v: Option<&Value>) -> Option<Vec<u8>> {
    match v? {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

fn number(v: Option<&Value>, what: &str) -> StoreResult<u64> {
    text(v)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| unexpected(format!("{what} is not a number")))
}

fn status(r: &[Value]) -> String {
    text(r.first()).unwrap_or_default()
}

fn ttl(d: Duration) -> Vec<u8> {
    d.as_millis().max(1).to_string().into_bytes()
}

fn s(v: impl ToString) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// A stream entry's id and its fields.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Fields of a stream entry (`[id, [field, value, ...]]`).
fn entry_fields(v: &Value) -> Option<StreamEntry> {
    let Value::Array(parts) = v else { return None };
    let id = text(parts.first())?;
    let Value::Array(kv) = parts.get(1)? else {
        return None;
    };
    let mut out = Vec::new();
    for pair in kv.chunks(2) {
        out.push((text(pair.first())?, bytes(pair.get(1))?));
    }
    Some((id, out))
}

fn field<'a>(fields: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
}

impl RedisStore {
    /// A page of entries and, if `with_trim`, the trim point read in the same `MULTI`.
    async fn read_page(
        &self,
        actor: &ActorId,
        from: Seq,
        to: Seq,
        limit: usize,
        with_trim: bool,
    ) -> StoreResult<Page> {
        let k = self.keys.journal(actor);
        let mut conn = self.conn();
        let mut range = redis::cmd("XRANGE");
        range
            .arg(&k.j)
            .arg(format!("{from}-0"))
            .arg(format!("{to}-0"))
            .arg("COUNT")
            .arg(limit);
        let (v, trimmed_through) = if with_trim {
            let (t, v): (Option<u64>, Value) = redis::pipe()
                .atomic()
                .cmd("HGET")
                .arg(&k.jm)
                .arg("t")
                .add_command(range)
                .query_async(&mut conn)
                .await
                .map_err(re)?;
            (v, Some(t.unwrap_or(0)))
        } else {
            (range.query_async(&mut conn).await.map_err(re)?, None)
        };
        let Value::Array(items) = v else {
            return Err(unexpected("XRANGE reply"));
        };
        let mut out = Vec::with_capacity(items.len());
        for item in &items {
            let (id, fields) =
                entry_fields(item).ok_or_else(|| unexpected("journal entry shape"))?;
            let seq: Seq = id
                .strip_suffix("-0")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| unexpected(format!("journal entry id {id}")))?;
            let frame =
                field(&fields, "e").ok_or_else(|| unexpected("journal entry without a frame"))?;
            out.push(
                codec::decode_entry(seq, frame)
                    .map_err(|e| StoreError::corrupt(format!("entry {seq} of {actor}"), e))?,
            );
        }
        Ok(Page {
            entries: out,
            trimmed_through,
        })
    }

    fn mailbox_keys<'a>(&self, actor: &ActorId, global: &'a mut Vec<String>) -> &'a [String] {
        let m = self.keys.mailbox(actor);
        global.clear();
        global.extend([
            m.mm,
            m.mq,
            m.md,
            m.mdx,
            self.keys.ready(actor.kind()),
            self.keys.dead_letters(),
            self.keys.dead_letter_seq(),
        ]);
        global
    }

    async fn settle_op(
        &self,
        r: &Receipt,
        op: &str,
        ms: u64,
        text_arg: &str,
    ) -> StoreResult<Vec<Value>> {
        let mut keys = Vec::new();
        let keys: Vec<&str> = self
            .mailbox_keys(&r.actor, &mut keys)
            .iter()
            .map(String::as_str)
            .collect();
        let reply = self
            .run(
                &self.scripts.settle,
                &keys,
                vec![
                    s(r.actor.as_str()),
                    s(op),
                    s(r.position),
                    s(r.delivery),
                    s(r.message_id),
                    s(ms),
                    text_arg.as_bytes().to_vec(),
                ],
            )
            .await?;
        match status(&reply).as_str() {
            "ok" => Ok(reply),
            "stale" => Err(StoreError::StaleReceipt {
                actor: r.actor.clone(),
                message_id: r.message_id,
            }),
            other => Err(unexpected(format!("settle replied {other}"))),
        }
    }
}

/// Reads the reply of a script that saves a snapshot: `ok`, or why it was refused.
fn snapshot_reply(actor: &ActorId, seq: Seq, r: &[Value], script: &str) -> StoreResult<()> {
    let refused = |reason: String| StoreError::SnapshotRefused {
        actor: actor.clone(),
        seq,
        reason,
    };
    match status(r).as_str() {
        "ok" => Ok(()),
        "ahead" => Err(refused(format!(
            "the journal's highest seq is {}",
            number(r.get(1), "highest")?
        ))),
        "behind" => Err(refused(format!(
            "entries through {} were trimmed, so replay from {seq} is impossible",
            number(r.get(1), "trim point")?
        ))),
        "deleted" => Err(refused(format!(
            "the journal was deleted through {}",
            number(r.get(1), "deletion point")?
        ))),
        other => Err(unexpected(format!("{script} replied {other}"))),
    }
}

/// Builds a delivery from a lease reply's `[frame, position, deliveries, error]`.
fn delivery(actor: &ActorId, r: &[Value]) -> StoreResult<Delivery> {
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

#[async_trait]
impl JournalStore for RedisStore {
    async fn append(
        &self,
        actor: &ActorId,
        expected_next: Seq,
        entries: &[Entry],
    ) -> StoreResult<Seq> {
        let frames = prepare_append(actor, expected_next, entries)?;
        let k = self.keys.journal(actor);
        let mut args = vec![s(actor.as_str()), s(expected_next)];
        args.extend(frames);
        let r = self
            .run(
                &self.scripts.append,
                &[&k.j, &k.jm, &self.keys.actors()],
                args,
            )
            .await?;
        match status(&r).as_str() {
            "ok" => number(r.get(1), "highest"),
            "conflict" => Err(StoreError::Conflict {
                actor: actor.clone(),
                expected: expected_next,
                actual: number(r.get(1), "next seq")?,
            }),
            other => Err(unexpected(format!("append replied {other}"))),
        }
    }

    fn read(&self, actor: &ActorId, range: SeqRange) -> EntryStream {
        let store = self.clone();
        let id = actor.clone();
        paged_read(
            actor.clone(),
            range,
            READ_PAGE,
            move |from, to, limit, with_trim| {
                let store = store.clone();
                let id = id.clone();
                async move { store.read_page(&id, from, to, limit, with_trim).await }
            },
        )
    }

    async fn highest_seq(&self, actor: &ActorId) -> StoreResult<Seq> {
        let mut conn = self.conn();
        let h: Option<u64> = redis::cmd("HGET")
            .arg(self.keys.journal(actor).jm)
            .arg("h")
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        Ok(h.unwrap_or(0))
    }

    async fn info(&self, actor: &ActorId) -> StoreResult<JournalInfo> {
        let k = self.keys.journal(actor);
        let mut conn = self.conn();
        let (meta, snaps): ((Option<u64>, Option<u64>), Vec<u64>) = redis::pipe()
            .atomic()
            .cmd("HMGET")
            .arg(&k.jm)
            .arg("h")
            .arg("t")
            .cmd("ZRANGE")
            .arg(&k.sz)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        Ok(JournalInfo {
            highest: meta.0.unwrap_or(0),
            trimmed_through: meta.1.unwrap_or(0),
            snapshots: snaps,
        })
    }

    async fn save_snapshot(
        &self,
        actor: &ActorId,
        snapshot: &Snapshot,
        keep: usize,
    ) -> StoreResult<()> {
        let frame = prepare_snapshot(actor, snapshot, keep)?;
        let k = self.keys.journal(actor);
        let r = self
            .run(
                &self.scripts.save_snapshot,
                &[&k.jm, &k.sn, &k.sz],
                vec![s(snapshot.seq), s(keep), frame],
            )
            .await?;
        snapshot_reply(actor, snapshot.seq, &r, "save_snapshot").map(|_| ())
    }

    async fn compact(
        &self,
        actor: &ActorId,
        snapshot: &Snapshot,
        keep: usize,
        fence: Option<&Lease>,
    ) -> StoreResult<Seq> {
        let frame = prepare_snapshot(actor, snapshot, keep)?;
        let k = self.keys.journal(actor);
        let (ls, _) = self.keys.lease(actor);
        let mut args = vec![s(snapshot.seq), s(keep), frame];
        if let Some(l) = fence {
            args.push(s(&l.owner));
            args.push(s(l.token));
        }
        let r = self
            .run(
                &self.scripts.compact,
                &[&k.j, &k.jm, &k.sn, &k.sz, &ls],
                args,
            )
            .await?;
        if status(&r) == "lost" {
            return Err(StoreError::LeaseLost {
                actor: actor.clone(),
                token: fence.map_or(0, |l| l.token),
            });
        }
        snapshot_reply(actor, snapshot.seq, &r, "compact")
            .and_then(|()| number(r.get(1), "trim point"))
    }

    async fn load_snapshot(
        &self,
        actor: &ActorId,
        at_or_below: Seq,
    ) -> StoreResult<Option<Snapshot>> {
        let k = self.keys.journal(actor);
        let r = self
            .run(
                &self.scripts.load_snapshot,
                &[&k.sn, &k.sz],
                vec![s(at_or_below)],
            )
            .await?;
        match status(&r).as_str() {
            "none" => Ok(None),
            "ok" => {
                let seq = number(r.get(1), "snapshot seq")?;
                let frame =
                    bytes(r.get(2)).ok_or_else(|| unexpected("snapshot without a frame"))?;
                codec::decode_snapshot(seq, &frame)
                    .map(Some)
                    .map_err(|e| StoreError::corrupt(format!("snapshot {seq} of {actor}"), e))
            }
            other => Err(unexpected(format!("load_snapshot replied {other}"))),
        }
    }

    async fn trim(&self, actor: &ActorId, through: Seq) -> StoreResult<()> {
        let k = self.keys.journal(actor);
        let r = self
            .run(&self.scripts.trim, &[&k.j, &k.jm, &k.sz], vec![s(through)])
            .await?;
        match status(&r).as_str() {
            "ok" => Ok(()),
            "refused" => Err(StoreError::TrimRefused {
                actor: actor.clone(),
                through,
                oldest_snapshot: text(r.get(1)).and_then(|s| s.parse().ok()),
            }),
            other => Err(unexpected(format!("trim replied {other}"))),
        }
    }

    async fn delete(&self, actor: &ActorId) -> StoreResult<()> {
        let k = self.keys.journal(actor);
        self.run(&self.scripts.delete, &[&k.j, &k.jm, &k.sn, &k.sz], vec![])
            .await?;
        Ok(())
    }

    async fn begin_at(&self, actor: &ActorId, through: Seq) -> StoreResult<()> {
        let k = self.keys.journal(actor);
        let r = self
            .run(
                &self.scripts.begin_at,
                &[&k.jm, &self.keys.actors()],
                vec![s(actor.as_str()), s(through)],
            )
            .await?;
        match status(&r).as_str() {
            "ok" => Ok(()),
            "conflict" => Err(StoreError::Conflict {
                actor: actor.clone(),
                expected: 1,
                actual: number(r.get(1), "next seq")?,
            }),
            other => Err(unexpected(format!("begin_at replied {other}"))),
        }
    }

    async fn list_actors(
        &self,
        after: Option<&ActorId>,
        limit: usize,
    ) -> StoreResult<Vec<ActorId>> {
        let mut conn = self.conn();
        let min = match after {
            Some(a) => format!("({a}"),
            None => "-".to_owned(),
        };
        let ids: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(self.keys.actors())
            .arg(min)
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        ids.into_iter()
            .map(|s| {
                s.parse().map_err(|e: loom_core::IdError| {
                    StoreError::corrupt("journal actor id", CodecError::Body(e.to_string()))
                })
            })
            .collect()
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
                &[&m.mm, &m.mq, &m.md, &m.mdx, &self.keys.ready(msg.to.kind())],
                vec![s(msg.to.as_str()), s(msg.id), frame, s(due)],
            )
            .await?;
        number(r.get(1), "position")
    }

    async fn lease(&self, actor: &ActorId, opts: LeaseOptions) -> StoreResult<Option<Delivery>> {
        opts.validate()?;
        let mut keys = Vec::new();
        let keys: Vec<&str> = self
            .mailbox_keys(actor, &mut keys)
            .iter()
            .map(String::as_str)
            .collect();
        let r = self
            .run(
                &self.scripts.lease,
                &keys,
                vec![
                    s(actor.as_str()),
                    ttl(opts.visibility),
                    s(opts.max_deliveries),
                ],
            )
            .await?;
        match status(&r).as_str() {
            "none" => Ok(None),
            "ok" => delivery(actor, &r[1..]).map(Some),
            other => Err(unexpected(format!("lease replied {other}"))),
        }
    }

    async fn ack(&self, receipt: &Receipt) -> StoreResult<()> {
        self.settle_op(receipt, "ack", 0, "").await.map(|_| ())
    }

    async fn nack(&self, receipt: &Receipt, delay: Duration, error: &str) -> StoreResult<()> {
        let error = loom_core::limits::clip_reason(error);
        self.settle_op(receipt, "nack", delay.as_millis() as u64, &error)
            .await
            .map(|_| ())
    }

    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> StoreResult<()> {
        check_ttl("visibility timeout", visibility)?;
        self.settle_op(receipt, "extend", visibility.as_millis() as u64, "")
            .await
            .map(|_| ())
    }

    async fn dead_letter(&self, receipt: &Receipt, reason: &str) -> StoreResult<u64> {
        let reason = loom_core::limits::clip_reason(reason);
        let r = self.settle_op(receipt, "bury", 0, &reason).await?;
        number(r.get(1), "dead letter id")
    }

    async fn ready_actors(&self, kinds: &[&str], limit: usize) -> StoreResult<Vec<ActorId>> {
        if kinds.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = kinds.iter().map(|k| self.keys.ready(k)).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let r = self
            .run(&self.scripts.ready_actors, &keys, vec![s(limit)])
            .await?;
        let mut per_kind = Vec::with_capacity(kinds.len());
        let mut rest = r.as_slice();
        while let Some((n, tail)) = rest.split_first() {
            let n = usize::try_from(number(Some(n), "ready count")?).unwrap_or(usize::MAX);
            let (list, tail) = tail.split_at(n.min(tail.len()));
            per_kind.push(
                list.iter()
                    .map(|v| {
                        text(Some(v))
                            .ok_or_else(|| unexpected("ready actor"))?
                            .parse()
                            .map_err(|e: loom_core::IdError| {
                                StoreError::corrupt(
                                    "mailbox actor id",
                                    CodecError::Body(e.to_string()),
                                )
                            })
                    })
                    .collect::<StoreResult<Vec<ActorId>>>()?,
            );
            rest = tail;
        }
        Ok(interleave(per_kind, limit))
    }

    async fn next_due(&self) -> StoreResult<Option<Timestamp>> {
        let mut conn = self.conn();
        let mut cursor: u64 = 0;
        let mut earliest: Option<u64> = None;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(self.keys.ready_pattern())
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(re)?;
            for key in keys {
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
            if next == 0 {
                return Ok(earliest.map(Timestamp::from_millis));
            }
            cursor = next;
        }
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
        let m = self.keys.mailbox(actor);
        let r = self
            .run(
                &self.scripts.messages,
                &[&m.mm, &m.mq, &m.md, &m.mdx],
                vec![],
            )
            .await?;
        let current = number(r.first(), "current position")?;
        let mut out = Vec::new();
        for chunk in r[1..].chunks(3) {
            let position = number(chunk.first(), "position")?;
            if after.is_some_and(|a| position <= a) {
                continue;
            }
            let frame = bytes(chunk.get(1)).ok_or_else(|| unexpected("message without a frame"))?;
            let envelope: Envelope = codec::decode(RecordType::Message, &frame).map_err(|e| {
                StoreError::corrupt(
                    format!("message at position {position} of {actor}'s mailbox"),
                    e,
                )
            })?;
            let due = number(chunk.get(2), "due")?;
            out.push(Waiting {
                position,
                envelope,
                deliver_at: (due > 0).then(|| Timestamp::from_millis(due)),
                out: position == current,
            });
        }
        out.sort_by_key(|w| w.position);
        out.truncate(limit);
        Ok(out)
    }

    async fn mailboxes(&self, after: Option<&ActorId>, limit: usize) -> StoreResult<Vec<ActorId>> {
        let mut conn = self.conn();
        let pattern = self.keys.mailbox_pattern();
        let mut cursor: u64 = 0;
        let mut found = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(re)?;
            for k in keys {
                if let Some(actor) = self.keys.actor_of(&k) {
                    found.push((actor, k));
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        found.sort();
        let mut out = Vec::new();
        for (actor, key) in found {
            if after.is_some_and(|a| &actor <= a) {
                continue;
            }
            let n: Option<i64> = redis::cmd("HGET")
                .arg(&key)
                .arg("n")
                .query_async(&mut conn)
                .await
                .map_err(re)?;
            if n.unwrap_or(0) > 0 {
                out.push(actor);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn dead_letters(&self, after: Option<u64>, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        let mut conn = self.conn();
        let start = format!("{}-0", after.map_or(0, |a| a.saturating_add(1)));
        let v: Value = redis::cmd("XRANGE")
            .arg(self.keys.dead_letters())
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        let Value::Array(items) = v else {
            return Err(unexpected("XRANGE reply"));
        };
        items.iter().map(dead_letter).collect()
    }

    async fn requeue_dead_letter(&self, id: u64) -> StoreResult<u64> {
        let mut conn = self.conn();
        let v: Value = redis::cmd("XRANGE")
            .arg(self.keys.dead_letters())
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
        let mut keys = vec![
            self.keys.dead_letters(),
            m.mm,
            m.mq,
            m.md,
            m.mdx,
            self.keys.ready(back.to.kind()),
        ];
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
            "ok" => number(r.get(1), "position"),
            "missing" => Err(StoreError::DeadLetterNotFound(id)),
            other => Err(unexpected(format!("requeue replied {other}"))),
        }
    }
}

fn dead_letter(item: &Value) -> StoreResult<DeadLetter> {
    let (sid, fields) = entry_fields(item).ok_or_else(|| unexpected("dead letter shape"))?;
    let id: u64 = sid
        .strip_suffix("-0")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| unexpected(format!("dead letter id {sid}")))?;
    let get = |name: &str| {
        field(&fields, name).ok_or_else(|| unexpected(format!("dead letter {id} without {name}")))
    };
    let mut envelope: Envelope = codec::decode(RecordType::Message, get("env")?)
        .map_err(|e| StoreError::corrupt(format!("dead letter {id}"), e))?;
    envelope.attempt = 0;
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

#[async_trait]
impl LeaseManager for RedisStore {
    async fn acquire(&self, actor: &ActorId, owner: &str, ttl_: Duration) -> StoreResult<Lease> {
        check_owner(owner)?;
        check_ttl("lease ttl", ttl_)?;
        let (ls, lt) = self.keys.lease(actor);
        let r = self
            .run(
                &self.scripts.acquire,
                &[&ls, &lt],
                vec![s(owner), ttl(ttl_)],
            )
            .await?;
        match status(&r).as_str() {
            "ok" => Ok(Lease {
                actor: actor.clone(),
                owner: owner.to_owned(),
                token: number(r.get(1), "token")?,
                expires_at: Timestamp::from_millis(number(r.get(2), "expiry")?),
            }),
            "held" => Err(StoreError::LeaseHeld {
                actor: actor.clone(),
                owner: text(r.get(1)).unwrap_or_default(),
                token: number(r.get(2), "token")?,
                remaining_ms: text(r.get(3))
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(0)
                    .max(0) as u64,
            }),
            other => Err(unexpected(format!("acquire replied {other}"))),
        }
    }

    async fn renew(&self, lease: &Lease, ttl_: Duration) -> StoreResult<Lease> {
        check_ttl("lease ttl", ttl_)?;
        let (ls, _) = self.keys.lease(&lease.actor);
        let r = self
            .run(
                &self.scripts.lease_cas,
                &[&ls],
                vec![s(&lease.owner), s(lease.token), s("renew"), ttl(ttl_)],
            )
            .await?;
        match status(&r).as_str() {
            "ok" => Ok(Lease {
                expires_at: Timestamp::from_millis(number(r.get(1), "expiry")?),
                ..lease.clone()
            }),
            "lost" => Err(StoreError::LeaseLost {
                actor: lease.actor.clone(),
                token: lease.token,
            }),
            other => Err(unexpected(format!("renew replied {other}"))),
        }
    }

    async fn renew_many(
        &self,
        leases: &[Lease],
        ttl_: Duration,
    ) -> StoreResult<Vec<StoreResult<Lease>>> {
        check_ttl("lease ttl", ttl_)?;
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = leases.iter().map(|l| self.keys.lease(&l.actor).0).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut args = vec![ttl(ttl_)];
        for l in leases {
            args.push(s(&l.owner));
            args.push(s(l.token));
        }
        let r = self.run(&self.scripts.renew_many, &keys, args).await?;
        if r.len() != leases.len() {
            return Err(unexpected(format!(
                "renew_many replied {} results for {} leases",
                r.len(),
                leases.len()
            )));
        }
        leases
            .iter()
            .zip(&r)
            .map(|(l, v)| match text(Some(v)).as_deref() {
                Some("") => Ok(Err(StoreError::LeaseLost {
                    actor: l.actor.clone(),
                    token: l.token,
                })),
                _ => Ok(Ok(Lease {
                    expires_at: Timestamp::from_millis(number(Some(v), "expiry")?),
                    ..l.clone()
                })),
            })
            .collect()
    }

    async fn release(&self, lease: &Lease) -> StoreResult<bool> {
        let (ls, _) = self.keys.lease(&lease.actor);
        let r = self
            .run(
                &self.scripts.lease_cas,
                &[&ls],
                vec![s(&lease.owner), s(lease.token), s("release"), s(0)],
            )
            .await?;
        Ok(status(&r) == "ok")
    }

    async fn holder(&self, actor: &ActorId) -> StoreResult<Option<Lease>> {
        let (ls, _) = self.keys.lease(actor);
        let r = self.run(&self.scripts.holder, &[&ls], vec![]).await?;
        match status(&r).as_str() {
            "none" => Ok(None),
            "ok" => Ok(Some(Lease {
                actor: actor.clone(),
                owner: text(r.get(1)).unwrap_or_default(),
                token: number(r.get(2), "token")?,
                expires_at: Timestamp::from_millis(number(r.get(3), "expiry")?),
            })),
            other => Err(unexpected(format!("holder replied {other}"))),
        }
    }
}

/// Reads an idempotency record's value (`P` or `C<json>`) and its expiry as the scripts give it
/// (`record_expiry`: empty for a reservation held until its message is settled).
fn reservation(
    actor: &ActorId,
    key: &IdempotencyKey,
    value: &[u8],
    expiry: Option<&Value>,
) -> StoreResult<Reservation> {
    let expires_at = match text(expiry).as_deref() {
        Some("") => Timestamp::MAX,
        _ => Timestamp::from_millis(number(expiry, "expiry")?),
    };
    match value.split_first() {
        Some((b'P', _)) => Ok(Reservation::Pending { expires_at }),
        Some((b'C', json)) => serde_json::from_slice(json)
            .map(Reservation::Completed)
            .map_err(|e| {
                StoreError::corrupt(
                    format!("idempotency record {key} of {actor}"),
                    CodecError::Body(e.to_string()),
                )
            }),
        _ => Err(StoreError::corrupt(
            format!("idempotency record {key} of {actor}"),
            CodecError::Body("unknown record".into()),
        )),
    }
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    async fn reserve(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        ttl_: Duration,
    ) -> StoreResult<Reservation> {
        check_ttl("idempotency ttl", ttl_)?;
        let k = self.keys.idempotency(actor, key);
        let r = self
            .run(&self.scripts.reserve, &[&k], vec![ttl(ttl_)])
            .await?;
        match status(&r).as_str() {
            "ok" => Ok(Reservation::Reserved),
            "taken" => reservation(actor, key, &bytes(r.get(1)).unwrap_or_default(), r.get(2)),
            other => Err(unexpected(format!("reserve replied {other}"))),
        }
    }

    async fn complete(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        result: &Json,
        ttl_: Duration,
    ) -> StoreResult<()> {
        check_ttl("idempotency ttl", ttl_)?;
        let mut value = b"C".to_vec();
        value.extend(prepare_result(actor, key, result)?);
        let mut conn = self.conn();
        let _: () = redis::cmd("SET")
            .arg(self.keys.idempotency(actor, key))
            .arg(value)
            .arg("PX")
            .arg(ttl(ttl_))
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        Ok(())
    }

    async fn abandon(&self, actor: &ActorId, key: &IdempotencyKey) -> StoreResult<bool> {
        let k = self.keys.idempotency(actor, key);
        let r = self.run(&self.scripts.abandon, &[&k], vec![]).await?;
        Ok(text(r.get(1)).as_deref() == Some("1"))
    }

    async fn lookup(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
    ) -> StoreResult<Option<Reservation>> {
        let k = self.keys.idempotency(actor, key);
        let r = self.run(&self.scripts.lookup, &[&k], vec![]).await?;
        match status(&r).as_str() {
            "none" => Ok(None),
            "ok" => {
                reservation(actor, key, &bytes(r.get(1)).unwrap_or_default(), r.get(2)).map(Some)
            }
            other => Err(unexpected(format!("lookup replied {other}"))),
        }
    }

    /// Redis expires records by itself (each has a TTL), so there is never anything to purge.
    async fn purge_expired(&self, _limit: usize) -> StoreResult<u64> {
        Ok(0)
    }
}

/// The turn script's header (see `turn` in `loom.lua`).
#[derive(Serialize)]
struct TurnHeader<'a> {
    actor: &'a str,
    mbox: &'a str,
    expected: Seq,
    n: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    fence: Option<(&'a str, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    settle: Option<SettleHeader<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    record_ttl: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<(u64, u32)>,
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
}

#[async_trait]
impl Store for RedisStore {
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
        // The turn settles a delivery of its own actor's mailbox, or of one of its event lanes.
        let mailbox_actor = settle_actor.unwrap_or(turn.actor);
        let clipped;
        let settle = match settle {
            Some(mut h) => {
                clipped = loom_core::limits::clip_reason(h.reason);
                h.reason = &clipped;
                Some(h)
            }
            None => None,
        };
        let header = TurnHeader {
            actor: turn.actor.as_str(),
            mbox: mailbox_actor.as_str(),
            expected: turn.expected_next,
            n: frames.len(),
            fence: turn.fence.map(|l| (l.owner.as_str(), l.token.to_string())),
            settle,
            record_ttl: turn.record.map(|r| r.ttl.as_millis().max(1) as u64),
            next: turn
                .next
                .map(|o| (o.visibility.as_millis().max(1) as u64, o.max_deliveries)),
            out: turn
                .send
                .iter()
                .map(|o| OutHeader {
                    to: o.envelope.to.as_str(),
                    id: o.envelope.id.to_string(),
                    due: o.deliver_at.map_or(0, Timestamp::as_millis),
                })
                .collect(),
        };
        let jk = self.keys.journal(turn.actor);
        let own = self.keys.mailbox(turn.actor);
        let mk = self.keys.mailbox(mailbox_actor);
        let (ls, _) = self.keys.lease(turn.actor);
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
            self.keys.actors(),
            self.keys.dead_letters(),
            self.keys.dead_letter_seq(),
            ls,
            idem,
            own.mm,
            own.mq,
            own.md,
            own.mdx,
            self.keys.ready(turn.actor.kind()),
            mk.mm,
            mk.mq,
            mk.md,
            mk.mdx,
            self.keys.ready(mailbox_actor.kind()),
        ];
        for o in turn.send {
            let m = self.keys.mailbox(&o.envelope.to);
            keys.extend([
                m.mm,
                m.mq,
                m.md,
                m.mdx,
                self.keys.ready(o.envelope.to.kind()),
            ]);
        }
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
                let highest = number(r.get(1), "highest")?;
                let next = if r.len() > 2 {
                    Some(delivery(turn.actor, &r[2..])?)
                } else {
                    None
                };
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
                    &self.keys.ready(msg.to.kind()),
                    &idem,
                ],
                vec![s(msg.to.as_str()), s(msg.id), frame, s(due), ttl(ttl_)],
            )
            .await?;
        match status(&r).as_str() {
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

#[async_trait]
impl Parking for RedisStore {
    async fn park(&self, actor: &ActorId, park: &Park, fence: Option<&Lease>) -> StoreResult<()> {
        let frame = park.encode()?;
        let (ls, _) = self.keys.lease(actor);
        let m = self.keys.mailbox(actor);
        let mut args = vec![s(actor.as_str()), frame];
        if let Some(l) = fence {
            args.push(s(&l.owner));
            args.push(s(l.token));
        }
        let r = self
            .run(
                &self.scripts.park,
                &[
                    &ls,
                    &self.keys.park(actor),
                    &m.mm,
                    &self.keys.ready(actor.kind()),
                    &self.keys.parked(),
                ],
                args,
            )
            .await?;
        match status(&r).as_str() {
            "ok" => Ok(()),
            "lost" => Err(StoreError::LeaseLost {
                actor: actor.clone(),
                token: fence.map_or(0, |l| l.token),
            }),
            other => Err(unexpected(format!("park replied {other}"))),
        }
    }

    async fn unpark(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        let m = self.keys.mailbox(actor);
        let r = self
            .run(
                &self.scripts.unpark,
                &[
                    &self.keys.park(actor),
                    &m.mm,
                    &m.mq,
                    &m.md,
                    &m.mdx,
                    &self.keys.ready(actor.kind()),
                    &self.keys.parked(),
                ],
                vec![s(actor.as_str())],
            )
            .await?;
        match status(&r).as_str() {
            "none" => Ok(None),
            "ok" => {
                let frame = bytes(r.get(1)).ok_or_else(|| unexpected("unpark without a record"))?;
                Park::decode(&frame).map(Some)
            }
            other => Err(unexpected(format!("unpark replied {other}"))),
        }
    }

    async fn parked(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        let mut conn = self.conn();
        let frame: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys.park(actor))
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        frame.as_deref().map(Park::decode).transpose()
    }

    async fn parked_actors(
        &self,
        after: Option<&ActorId>,
        limit: usize,
    ) -> StoreResult<Vec<(ActorId, Park)>> {
        let mut conn = self.conn();
        let min = match after {
            Some(a) => format!("({a}"),
            None => "-".to_owned(),
        };
        let ids: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(self.keys.parked())
            .arg(min)
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(re)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let actor: ActorId = id.parse().map_err(|e: loom_core::IdError| {
                StoreError::corrupt("parked actor id", CodecError::Body(e.to_string()))
            })?;
            // Unparked since it was listed: skip it.
            if let Some(p) = self.parked(&actor).await? {
                out.push((actor, p));
            }
        }
        Ok(out)
    }
}
