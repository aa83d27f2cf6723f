//! The store traits on PostgreSQL: each operation is one function call or one query (see
//! `schema.sql`).

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
use serde_json::Value;
use sqlx::Row;

use crate::group::{AppendReq, TurnReq};
use crate::{BACKEND, PostgresStore, pe};

/// Entries per query while streaming a journal.
const READ_PAGE: i64 = 1024;

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

pub(crate) fn unexpected(what: impl Into<String>) -> StoreError {
    StoreError::storage(BACKEND, Unexpected(what.into()))
}

#[derive(Debug, thiserror::Error)]
#[error("unexpected reply from PostgreSQL: {0}")]
struct Unexpected(String);

fn parse_actor(s: &str, what: &str) -> StoreResult<ActorId> {
    s.parse().map_err(|e: loom_core::IdError| {
        StoreError::corrupt(what.to_owned(), CodecError::Body(e.to_string()))
    })
}

fn delivery(
    actor: &ActorId,
    frame: Vec<u8>,
    position: i64,
    deliveries: i32,
    last_error: Option<String>,
) -> StoreResult<Delivery> {
    Delivery::from_frame(
        actor.clone(),
        &frame,
        position as u64,
        i64::from(deliveries),
        last_error,
    )
}

/// Reads the (status, value) of a function that saves a snapshot: the value of `ok`, or why it
/// was refused.
fn snapshot_status(
    actor: &ActorId,
    seq: Seq,
    status: String,
    val: i64,
    function: &str,
) -> StoreResult<Seq> {
    let refused = |reason: String| StoreError::SnapshotRefused {
        actor: actor.clone(),
        seq,
        reason,
    };
    match status.as_str() {
        "ok" => Ok(val.max(0) as u64),
        "ahead" => Err(refused(format!("the journal's highest seq is {val}"))),
        "behind" => Err(refused(format!(
            "entries through {val} were trimmed, so replay from {seq} is impossible"
        ))),
        "deleted" => Err(refused(format!("the journal was deleted through {val}"))),
        other => Err(unexpected(format!("{function} returned {other}"))),
    }
}

fn reservation(
    actor: &ActorId,
    key: &IdempotencyKey,
    result: Option<Vec<u8>>,
    expires_at: i64,
) -> StoreResult<Reservation> {
    match result {
        // i64::MAX: held until its message is settled (see `enqueue_once` in schema_v3.sql).
        None if expires_at == i64::MAX => Ok(Reservation::Pending {
            expires_at: Timestamp::MAX,
        }),
        None => Ok(Reservation::Pending {
            expires_at: Timestamp::from_millis(expires_at.max(0) as u64),
        }),
        Some(json) => serde_json::from_slice(&json)
            .map(Reservation::Completed)
            .map_err(|e| {
                StoreError::corrupt(
                    format!("idempotency record {key} of {actor}"),
                    CodecError::Body(e.to_string()),
                )
            }),
    }
}

impl PostgresStore {
    /// A query text with the schema filled in. The schema is the only text ever put into a
    /// query (values are bound parameters), and it was checked at connect to be `[a-z0-9_]`.
    fn q(&self, sql: &str) -> sqlx::AssertSqlSafe<String> {
        sqlx::AssertSqlSafe(sql.replace("{s}", &self.schema))
    }

    /// A page of entries and the trim point, read by one statement (one snapshot of the data).
    async fn read_page(
        &self,
        actor: &ActorId,
        from: Seq,
        to: Seq,
        limit: usize,
    ) -> StoreResult<Page> {
        let rows = sqlx::query(self.q(
            "SELECT m.t, j.seq, j.frame FROM \
             (SELECT coalesce((SELECT trimmed FROM {s}.journal_meta WHERE actor = $1), 0) AS t) AS m \
             LEFT JOIN LATERAL (SELECT seq, frame FROM {s}.journal \
                WHERE actor = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq LIMIT $4) AS j ON true \
             ORDER BY j.seq",
        ))
        .bind(actor.as_str())
        .bind(int(from))
        .bind(int(to))
        .bind((limit as i64).min(READ_PAGE))
        .fetch_all(&self.pool)
        .await
        .map_err(pe)?;
        let trimmed_through = rows.first().map(|r| r.get::<i64, _>(0) as u64);
        let entries = rows
            .iter()
            .filter_map(|r| Some((r.get::<Option<i64>, _>(1)?, r.get::<Option<Vec<u8>>, _>(2)?)))
            .map(|(seq, frame)| {
                let seq = seq as u64;
                codec::decode_entry(seq, &frame)
                    .map_err(|e| StoreError::corrupt(format!("entry {seq} of {actor}"), e))
            })
            .collect::<StoreResult<Vec<Entry>>>()?;
        Ok(Page {
            entries,
            trimmed_through,
        })
    }

    async fn settle_op(&self, r: &Receipt, op: &str, delay: i64, text: &str) -> StoreResult<i64> {
        let row = sqlx::query(self.q("SELECT ok, val FROM {s}.settle($1, $2, $3, $4, $5, $6, $7)"))
            .bind(r.actor.as_str())
            .bind(op)
            .bind(int(r.position))
            .bind(i32::try_from(r.delivery).unwrap_or(i32::MAX))
            .bind(r.message_id.to_string())
            .bind(delay)
            .bind(text)
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        if !row.get::<bool, _>(0) {
            return Err(StoreError::StaleReceipt {
                actor: r.actor.clone(),
                message_id: r.message_id,
            });
        }
        Ok(row.get(1))
    }
}

#[async_trait]
impl JournalStore for PostgresStore {
    async fn append(
        &self,
        actor: &ActorId,
        expected_next: Seq,
        entries: &[Entry],
    ) -> StoreResult<Seq> {
        let frames = prepare_append(actor, expected_next, entries)?;
        let req = AppendReq {
            actor: actor.as_str().to_owned(),
            expected: int(expected_next),
            frames,
        };
        let bytes = req.bytes();
        match self.appends.submit(req, bytes).await? {
            (true, highest) => Ok(highest as u64),
            (false, next) => Err(StoreError::Conflict {
                actor: actor.clone(),
                expected: expected_next,
                actual: next as u64,
            }),
        }
    }

    fn read(&self, actor: &ActorId, range: SeqRange) -> EntryStream {
        let store = self.clone();
        let id = actor.clone();
        paged_read(
            actor.clone(),
            range,
            READ_PAGE as usize,
            // The trim point comes with every page (the same statement), asked for or not.
            move |from, to, limit, _with_trim| {
                let store = store.clone();
                let id = id.clone();
                async move { store.read_page(&id, from, to, limit).await }
            },
        )
    }

    async fn highest_seq(&self, actor: &ActorId) -> StoreResult<Seq> {
        let h: Option<i64> =
            sqlx::query_scalar(self.q("SELECT highest FROM {s}.journal_meta WHERE actor = $1"))
                .bind(actor.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(pe)?;
        Ok(h.unwrap_or(0) as u64)
    }

    async fn info(&self, actor: &ActorId) -> StoreResult<JournalInfo> {
        let row = sqlx::query(self.q(
            "SELECT coalesce(m.highest, 0), coalesce(m.trimmed, 0), \
             coalesce((SELECT array_agg(seq ORDER BY seq) FROM {s}.snapshots WHERE actor = $1), '{}') \
             FROM (SELECT 1) AS one LEFT JOIN {s}.journal_meta m ON m.actor = $1",
        ))
        .bind(actor.as_str())
        .fetch_one(&self.pool)
        .await
        .map_err(pe)?;
        let snapshots: Vec<i64> = row.get(2);
        Ok(JournalInfo {
            highest: row.get::<i64, _>(0) as u64,
            trimmed_through: row.get::<i64, _>(1) as u64,
            snapshots: snapshots.into_iter().map(|s| s as u64).collect(),
        })
    }

    async fn save_snapshot(
        &self,
        actor: &ActorId,
        snapshot: &Snapshot,
        keep: usize,
    ) -> StoreResult<()> {
        let frame = prepare_snapshot(actor, snapshot, keep)?;
        let row = sqlx::query(self.q("SELECT status, val FROM {s}.save_snapshot($1, $2, $3, $4)"))
            .bind(actor.as_str())
            .bind(int(snapshot.seq))
            .bind(i32::try_from(keep).unwrap_or(i32::MAX))
            .bind(frame)
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        snapshot_status(actor, snapshot.seq, row.get(0), row.get(1), "save_snapshot").map(|_| ())
    }

    async fn compact(
        &self,
        actor: &ActorId,
        snapshot: &Snapshot,
        keep: usize,
        fence: Option<&Lease>,
    ) -> StoreResult<Seq> {
        let frame = prepare_snapshot(actor, snapshot, keep)?;
        let row = sqlx::query(self.q("SELECT status, val FROM {s}.compact($1, $2, $3, $4, $5)"))
            .bind(actor.as_str())
            .bind(int(snapshot.seq))
            .bind(i32::try_from(keep).unwrap_or(i32::MAX))
            .bind(frame)
            .bind(fence.map(|l| int(l.token)))
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        let status: String = row.get(0);
        if status == "lost" {
            return Err(StoreError::LeaseLost {
                actor: actor.clone(),
                token: fence.map_or(0, |l| l.token),
            });
        }
        snapshot_status(actor, snapshot.seq, status, row.get(1), "compact")
    }

    async fn load_snapshot(
        &self,
        actor: &ActorId,
        at_or_below: Seq,
    ) -> StoreResult<Option<Snapshot>> {
        let row = sqlx::query(self.q(
            "SELECT seq, frame FROM {s}.snapshots WHERE actor = $1 AND seq <= $2 ORDER BY seq DESC LIMIT 1",
        ))
        .bind(actor.as_str())
        .bind(int(at_or_below))
        .fetch_optional(&self.pool)
        .await
        .map_err(pe)?;
        match row {
            None => Ok(None),
            Some(r) => {
                let seq = r.get::<i64, _>(0) as u64;
                let frame: Vec<u8> = r.get(1);
                codec::decode_snapshot(seq, &frame)
                    .map(Some)
                    .map_err(|e| StoreError::corrupt(format!("snapshot {seq} of {actor}"), e))
            }
        }
    }

    async fn trim(&self, actor: &ActorId, through: Seq) -> StoreResult<()> {
        let row = sqlx::query(self.q("SELECT ok, oldest FROM {s}.trim($1, $2)"))
            .bind(actor.as_str())
            .bind(int(through))
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        if row.get::<bool, _>(0) {
            return Ok(());
        }
        Err(StoreError::TrimRefused {
            actor: actor.clone(),
            through,
            oldest_snapshot: row.get::<Option<i64>, _>(1).map(|s| s as u64),
        })
    }

    async fn delete(&self, actor: &ActorId) -> StoreResult<()> {
        sqlx::query(self.q("SELECT {s}.delete($1)"))
            .bind(actor.as_str())
            .execute(&self.pool)
            .await
            .map_err(pe)?;
        Ok(())
    }

    async fn begin_at(&self, actor: &ActorId, through: Seq) -> StoreResult<()> {
        let row = sqlx::query(self.q("SELECT ok, val FROM {s}.begin_at($1, $2)"))
            .bind(actor.as_str())
            .bind(int(through))
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        if row.get::<bool, _>(0) {
            return Ok(());
        }
        Err(StoreError::Conflict {
            actor: actor.clone(),
            expected: 1,
            actual: row.get::<i64, _>(1) as u64,
        })
    }

    async fn list_actors(
        &self,
        after: Option<&ActorId>,
        limit: usize,
    ) -> StoreResult<Vec<ActorId>> {
        let ids: Vec<String> = sqlx::query_scalar(self.q(
            "SELECT actor FROM {s}.journal_meta WHERE actor COLLATE \"C\" > $1 ORDER BY actor COLLATE \"C\" LIMIT $2",
        ))
        .bind(after.map_or("", |a| a.as_str()))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(pe)?;
        ids.iter()
            .map(|s| parse_actor(s, "journal actor id"))
            .collect()
    }
}

#[async_trait]
impl Mailbox for PostgresStore {
    async fn enqueue(&self, msg: &Envelope, deliver_at: Option<Timestamp>) -> StoreResult<u64> {
        let frame = prepare_message(msg)?;
        let pos: i64 = sqlx::query_scalar(self.q("SELECT {s}.enqueue($1, $2, $3, $4)"))
            .bind(msg.to.as_str())
            .bind(msg.id.to_string())
            .bind(frame)
            .bind(deliver_at.map_or(0, |t| int(t.as_millis())))
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        Ok(pos as u64)
    }

    async fn lease(&self, actor: &ActorId, opts: LeaseOptions) -> StoreResult<Option<Delivery>> {
        opts.validate()?;
        let row = sqlx::query(self.q("SELECT frame, pos, dlv, err FROM {s}.lease($1, $2, $3)"))
            .bind(actor.as_str())
            .bind(ms(opts.visibility))
            .bind(i32::try_from(opts.max_deliveries).unwrap_or(i32::MAX))
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        match row.get::<Option<Vec<u8>>, _>(0) {
            None => Ok(None),
            Some(frame) => delivery(actor, frame, row.get(1), row.get(2), row.get(3)).map(Some),
        }
    }

    async fn ack(&self, receipt: &Receipt) -> StoreResult<()> {
        self.settle_op(receipt, "ack", 0, "").await.map(|_| ())
    }

    async fn nack(&self, receipt: &Receipt, delay: Duration, error: &str) -> StoreResult<()> {
        let error = loom_core::limits::clip_reason(error);
        self.settle_op(
            receipt,
            "nack",
            i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
            &error,
        )
        .await
        .map(|_| ())
    }

    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> StoreResult<()> {
        check_ttl("visibility timeout", visibility)?;
        self.settle_op(receipt, "extend", ms(visibility), "")
            .await
            .map(|_| ())
    }

    async fn dead_letter(&self, receipt: &Receipt, reason: &str) -> StoreResult<u64> {
        let reason = loom_core::limits::clip_reason(reason);
        self.settle_op(receipt, "bury", 0, &reason)
            .await
            .map(|id| id as u64)
    }

    async fn ready_actors(&self, kinds: &[&str], limit: usize) -> StoreResult<Vec<ActorId>> {
        if kinds.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64, String)> = sqlx::query_as(self.q(
            "SELECT k.i, m.actor FROM unnest($1::text[]) WITH ORDINALITY AS k(kind, i) \
             CROSS JOIN LATERAL (SELECT actor, ready_at FROM {s}.mailbox \
                WHERE split_part(actor, '/', 1) = k.kind AND ready_at <= (SELECT {s}.now_ms()) \
                ORDER BY ready_at LIMIT $2) AS m \
             ORDER BY k.i, m.ready_at",
        ))
        .bind(kinds)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(pe)?;
        let mut per_kind = vec![Vec::new(); kinds.len()];
        for (i, actor) in rows {
            let slot = usize::try_from(i - 1)
                .ok()
                .and_then(|i| per_kind.get_mut(i))
                .ok_or_else(|| unexpected(format!("ready_actors returned kind index {i}")))?;
            slot.push(parse_actor(&actor, "mailbox actor id")?);
        }
        Ok(interleave(per_kind, limit))
    }

    async fn next_due(&self) -> StoreResult<Option<Timestamp>> {
        let at: Option<i64> = sqlx::query_scalar(self.q(
            "SELECT min(ready_at) FROM {s}.mailbox WHERE ready_at IS NOT NULL AND left(actor, 1) <> '_'",
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(pe)?;
        Ok(at.map(|t| Timestamp::from_millis(t.max(0) as u64)))
    }

    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.wakeups.clone()
    }

    async fn pending(&self, actor: &ActorId) -> StoreResult<u64> {
        let n: Option<i64> =
            sqlx::query_scalar(self.q("SELECT count FROM {s}.mailbox WHERE actor = $1"))
                .bind(actor.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(pe)?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    async fn messages(
        &self,
        actor: &ActorId,
        after: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<Waiting>> {
        let rows = sqlx::query(self.q(
            "SELECT m.position, m.frame, m.due_at, b.current = m.position, {s}.now_ms() \
             FROM {s}.messages m JOIN {s}.mailbox b ON b.actor = m.actor \
             WHERE m.actor = $1 AND m.position > $2 ORDER BY m.position LIMIT $3",
        ))
        .bind(actor.as_str())
        .bind(after.map_or(0, int))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(pe)?;
        rows.iter()
            .map(|r| {
                let position = r.get::<i64, _>(0) as u64;
                let frame: Vec<u8> = r.get(1);
                let due: i64 = r.get(2);
                let now: i64 = r.get(4);
                let envelope: Envelope =
                    codec::decode(RecordType::Message, &frame).map_err(|e| {
                        StoreError::corrupt(
                            format!("message at position {position} of {actor}'s mailbox"),
                            e,
                        )
                    })?;
                Ok(Waiting {
                    position,
                    envelope,
                    deliver_at: (due > now).then(|| Timestamp::from_millis(due as u64)),
                    out: r.get(3),
                })
            })
            .collect()
    }

    async fn mailboxes(&self, after: Option<&ActorId>, limit: usize) -> StoreResult<Vec<ActorId>> {
        let ids: Vec<String> = sqlx::query_scalar(self.q(
            "SELECT actor FROM {s}.mailbox WHERE count > 0 AND actor COLLATE \"C\" > $1 ORDER BY actor COLLATE \"C\" LIMIT $2",
        ))
        .bind(after.map_or("", |a| a.as_str()))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(pe)?;
        ids.iter()
            .map(|s| parse_actor(s, "mailbox actor id"))
            .collect()
    }

    async fn dead_letters(&self, after: Option<u64>, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        let rows = sqlx::query(self.q(
            "SELECT id, envelope, reason, deliveries, at FROM {s}.dead_letters WHERE id > $1 ORDER BY id LIMIT $2",
        ))
        .bind(after.map_or(0, int))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(pe)?;
        rows.iter()
            .map(|r| {
                let id = r.get::<i64, _>(0) as u64;
                let frame: Vec<u8> = r.get(1);
                let mut envelope: Envelope = codec::decode(RecordType::Message, &frame)
                    .map_err(|e| StoreError::corrupt(format!("dead letter {id}"), e))?;
                envelope.attempt = 0;
                Ok(DeadLetter {
                    id,
                    envelope,
                    reason: r.get(2),
                    deliveries: u32::try_from(r.get::<i32, _>(3)).unwrap_or(0),
                    at: Timestamp::from_millis(r.get::<i64, _>(4).max(0) as u64),
                })
            })
            .collect()
    }

    async fn requeue_dead_letter(&self, id: u64) -> StoreResult<u64> {
        let frame: Option<Vec<u8>> =
            sqlx::query_scalar(self.q("SELECT envelope FROM {s}.dead_letters WHERE id = $1"))
                .bind(int(id))
                .fetch_optional(&self.pool)
                .await
                .map_err(pe)?;
        let Some(frame) = frame else {
            return Err(StoreError::DeadLetterNotFound(id));
        };
        let dead: Envelope = codec::decode(RecordType::Message, &frame)
            .map_err(|e| StoreError::corrupt(format!("dead letter {id}"), e))?;
        let back = dead.requeued();
        let pos: i64 = sqlx::query_scalar(self.q("SELECT {s}.requeue_as($1, $2, $3, $4)"))
            .bind(int(id))
            .bind(back.id.to_string())
            .bind(prepare_message(&back)?)
            .bind(back.idempotency_key.as_ref().map(|k| k.as_str().to_owned()))
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        if pos == 0 {
            return Err(StoreError::DeadLetterNotFound(id));
        }
        Ok(pos as u64)
    }
}

#[async_trait]
impl LeaseManager for PostgresStore {
    async fn acquire(&self, actor: &ActorId, owner: &str, ttl: Duration) -> StoreResult<Lease> {
        check_owner(owner)?;
        check_ttl("lease ttl", ttl)?;
        let row = sqlx::query(
            self.q("SELECT ok, holder, tok, expires, {s}.now_ms() FROM {s}.acquire($1, $2, $3)"),
        )
        .bind(actor.as_str())
        .bind(owner)
        .bind(ms(ttl))
        .fetch_one(&self.pool)
        .await
        .map_err(pe)?;
        let token = row.get::<i64, _>(2) as u64;
        let expires = row.get::<i64, _>(3);
        if row.get::<bool, _>(0) {
            return Ok(Lease {
                actor: actor.clone(),
                owner: owner.to_owned(),
                token,
                expires_at: Timestamp::from_millis(expires.max(0) as u64),
            });
        }
        let now: i64 = row.get(4);
        Err(StoreError::LeaseHeld {
            actor: actor.clone(),
            owner: row.get(1),
            token,
            remaining_ms: (expires - now).max(0) as u64,
        })
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> StoreResult<Lease> {
        check_ttl("lease ttl", ttl)?;
        let at: Option<i64> =
            sqlx::query_scalar(self.q("SELECT {s}.lease_cas($1, $2, 'renew', $3)"))
                .bind(lease.actor.as_str())
                .bind(int(lease.token))
                .bind(ms(ttl))
                .fetch_one(&self.pool)
                .await
                .map_err(pe)?;
        match at {
            Some(at) => Ok(Lease {
                expires_at: Timestamp::from_millis(at.max(0) as u64),
                ..lease.clone()
            }),
            None => Err(StoreError::LeaseLost {
                actor: lease.actor.clone(),
                token: lease.token,
            }),
        }
    }

    async fn renew_many(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> StoreResult<Vec<StoreResult<Lease>>> {
        check_ttl("lease ttl", ttl)?;
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let actors: Vec<&str> = leases.iter().map(|l| l.actor.as_str()).collect();
        let tokens: Vec<i64> = leases.iter().map(|l| int(l.token)).collect();
        let rows: Vec<(i64, Option<i64>)> =
            sqlx::query_as(self.q("SELECT idx, expires FROM {s}.renew_many($1, $2, $3)"))
                .bind(actors)
                .bind(tokens)
                .bind(ms(ttl))
                .fetch_all(&self.pool)
                .await
                .map_err(pe)?;
        let mut out: Vec<Option<StoreResult<Lease>>> = vec![None; leases.len()];
        for (idx, expires) in rows {
            let i = usize::try_from(idx - 1)
                .ok()
                .filter(|i| *i < leases.len())
                .ok_or_else(|| unexpected(format!("renew_many returned index {idx}")))?;
            let l = &leases[i];
            out[i] = Some(match expires {
                Some(at) => Ok(Lease {
                    expires_at: Timestamp::from_millis(at.max(0) as u64),
                    ..l.clone()
                }),
                None => Err(StoreError::LeaseLost {
                    actor: l.actor.clone(),
                    token: l.token,
                }),
            });
        }
        out.into_iter()
            .map(|r| r.ok_or_else(|| unexpected("renew_many skipped a lease")))
            .collect()
    }

    async fn release(&self, lease: &Lease) -> StoreResult<bool> {
        let at: Option<i64> =
            sqlx::query_scalar(self.q("SELECT {s}.lease_cas($1, $2, 'release', 0)"))
                .bind(lease.actor.as_str())
                .bind(int(lease.token))
                .fetch_one(&self.pool)
                .await
                .map_err(pe)?;
        Ok(at.is_some())
    }

    async fn holder(&self, actor: &ActorId) -> StoreResult<Option<Lease>> {
        let row = sqlx::query(self.q(
            "SELECT owner, token, expires_at FROM {s}.leases WHERE actor = $1 AND owner IS NOT NULL AND expires_at > {s}.now_ms()",
        ))
        .bind(actor.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(pe)?;
        Ok(row.map(|r| Lease {
            actor: actor.clone(),
            owner: r.get(0),
            token: r.get::<i64, _>(1) as u64,
            expires_at: Timestamp::from_millis(r.get::<i64, _>(2).max(0) as u64),
        }))
    }
}

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn reserve(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        ttl: Duration,
    ) -> StoreResult<Reservation> {
        check_ttl("idempotency ttl", ttl)?;
        let row = sqlx::query(self.q("SELECT reserved, res, expires FROM {s}.reserve($1, $2, $3)"))
            .bind(actor.as_str())
            .bind(key.as_str())
            .bind(ms(ttl))
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        if row.get::<bool, _>(0) {
            return Ok(Reservation::Reserved);
        }
        reservation(actor, key, row.get(1), row.get(2))
    }

    async fn complete(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
        result: &Value,
        ttl: Duration,
    ) -> StoreResult<()> {
        check_ttl("idempotency ttl", ttl)?;
        let bytes = prepare_result(actor, key, result)?;
        sqlx::query(self.q("SELECT {s}.record($1, $2, $3, $4)"))
            .bind(actor.as_str())
            .bind(key.as_str())
            .bind(bytes)
            .bind(ms(ttl))
            .execute(&self.pool)
            .await
            .map_err(pe)?;
        Ok(())
    }

    async fn abandon(&self, actor: &ActorId, key: &IdempotencyKey) -> StoreResult<bool> {
        let done = sqlx::query(
            self.q("DELETE FROM {s}.idempotency WHERE actor = $1 AND key = $2 AND result IS NULL"),
        )
        .bind(actor.as_str())
        .bind(key.as_str())
        .execute(&self.pool)
        .await
        .map_err(pe)?;
        Ok(done.rows_affected() > 0)
    }

    async fn lookup(
        &self,
        actor: &ActorId,
        key: &IdempotencyKey,
    ) -> StoreResult<Option<Reservation>> {
        let row = sqlx::query(self.q(
            "SELECT result, expires_at FROM {s}.idempotency WHERE actor = $1 AND key = $2 AND expires_at > {s}.now_ms()",
        ))
        .bind(actor.as_str())
        .bind(key.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(pe)?;
        match row {
            None => Ok(None),
            Some(r) => reservation(actor, key, r.get(0), r.get(1)).map(Some),
        }
    }

    async fn purge_expired(&self, limit: usize) -> StoreResult<u64> {
        let done = sqlx::query(self.q("DELETE FROM {s}.idempotency WHERE (actor, key) IN \
             (SELECT actor, key FROM {s}.idempotency WHERE expires_at <= {s}.now_ms() LIMIT $1)"))
        .bind(limit as i64)
        .execute(&self.pool)
        .await
        .map_err(pe)?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn commit_turn(&self, turn: Turn<'_>) -> StoreResult<Committed> {
        turn.check()?;
        let frames = prepare_append(turn.actor, turn.expected_next, turn.entries)?;
        if let Some(opts) = &turn.next {
            opts.validate()?;
        }
        let mut out_actors = Vec::with_capacity(turn.send.len());
        let mut out_ids = Vec::with_capacity(turn.send.len());
        let mut out_frames = Vec::with_capacity(turn.send.len());
        let mut out_due = Vec::with_capacity(turn.send.len());
        for o in turn.send {
            out_frames.push(prepare_message(&o.envelope)?);
            out_actors.push(o.envelope.to.as_str().to_owned());
            out_ids.push(o.envelope.id.to_string());
            out_due.push(o.deliver_at.map_or(0, |t| int(t.as_millis())));
        }
        let mut record = None;
        if let Some(r) = &turn.record {
            check_ttl("idempotency ttl", r.ttl)?;
            record = Some((
                r.actor.as_str().to_owned(),
                r.key.as_str().to_owned(),
                prepare_result(r.actor, r.key, r.result)?,
                ms(r.ttl),
            ));
        }
        let (op, receipt, reason) = match turn.settle {
            Some(Settle::Ack(r)) => (Some("ack"), Some(r), String::new()),
            Some(Settle::DeadLetter(r, reason)) => (
                Some("bury"),
                Some(r),
                loom_core::limits::clip_reason(reason),
            ),
            None => (None, None, String::new()),
        };
        let (record_actor, record_key, record, record_ttl) = match record {
            Some((a, k, r, t)) => (Some(a), Some(k), Some(r), Some(t)),
            None => (None, None, None, None),
        };
        let req = TurnReq {
            actor: turn.actor.as_str().to_owned(),
            expected: int(turn.expected_next),
            frames,
            fence: turn.fence.map(|l| int(l.token)),
            out_actors,
            out_ids,
            out_frames,
            out_due,
            settle: op.map(str::to_owned),
            settle_actor: receipt.map(|r| r.actor.as_str().to_owned()),
            pos: receipt.map(|r| int(r.position)),
            dlv: receipt.map(|r| i32::try_from(r.delivery).unwrap_or(i32::MAX)),
            msg: receipt.map(|r| r.message_id.to_string()),
            reason,
            record_actor,
            record_key,
            record,
            record_ttl,
            next_vis: turn.next.map(|o| ms(o.visibility)),
            next_max: turn
                .next
                .map(|o| i32::try_from(o.max_deliveries).unwrap_or(i32::MAX)),
        };
        let bytes = req.bytes();
        let out = self.turns.submit(req, bytes).await?;
        let highest = || {
            out.highest
                .map(|h| h as u64)
                .ok_or_else(|| unexpected("turn gave no highest seq"))
        };
        match out.status.as_str() {
            "ok" => {
                let next = match out.nframe.clone() {
                    Some(frame) => Some(delivery(
                        turn.actor,
                        frame,
                        out.npos.unwrap_or(0),
                        out.ndlv.unwrap_or(0),
                        out.nerr.clone(),
                    )?),
                    None => None,
                };
                Ok(Committed {
                    highest: highest()?,
                    next,
                })
            }
            "conflict" => Err(StoreError::Conflict {
                actor: turn.actor.clone(),
                expected: turn.expected_next,
                actual: highest()?,
            }),
            "lost" => Err(StoreError::LeaseLost {
                actor: turn.actor.clone(),
                token: turn.fence.map_or(0, |l| l.token),
            }),
            "stale" => {
                let r = receipt.ok_or_else(|| unexpected("stale receipt without a receipt"))?;
                Err(StoreError::StaleReceipt {
                    actor: r.actor.clone(),
                    message_id: r.message_id,
                })
            }
            other => Err(unexpected(format!("turn returned {other}"))),
        }
    }

    async fn enqueue_once(
        &self,
        msg: &Envelope,
        deliver_at: Option<Timestamp>,
        key: &IdempotencyKey,
        ttl: Duration,
    ) -> StoreResult<Enqueued> {
        check_ttl("idempotency ttl", ttl)?;
        let frame = prepare_message(msg)?;
        let row = sqlx::query(
            self.q("SELECT new, pos, res, expires FROM {s}.enqueue_once($1, $2, $3, $4, $5, $6)"),
        )
        .bind(msg.to.as_str())
        .bind(msg.id.to_string())
        .bind(frame)
        .bind(deliver_at.map_or(0, |t| int(t.as_millis())))
        .bind(key.as_str())
        .bind(ms(ttl))
        .fetch_one(&self.pool)
        .await
        .map_err(pe)?;
        if row.get::<bool, _>(0) {
            return Ok(Enqueued::New(row.get::<i64, _>(1) as u64));
        }
        Ok(Enqueued::Duplicate(reservation(
            &msg.to,
            key,
            row.get(2),
            row.get(3),
        )?))
    }
}

#[async_trait]
impl Parking for PostgresStore {
    async fn park(&self, actor: &ActorId, park: &Park, fence: Option<&Lease>) -> StoreResult<()> {
        let status: String = sqlx::query_scalar(self.q("SELECT {s}.park($1, $2, $3)"))
            .bind(actor.as_str())
            .bind(park.encode()?)
            .bind(fence.map(|l| int(l.token)))
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        match status.as_str() {
            "ok" => Ok(()),
            "lost" => Err(StoreError::LeaseLost {
                actor: actor.clone(),
                token: fence.map_or(0, |l| l.token),
            }),
            other => Err(unexpected(format!("park returned {other}"))),
        }
    }

    async fn unpark(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        let frame: Option<Vec<u8>> = sqlx::query_scalar(self.q("SELECT {s}.unpark($1)"))
            .bind(actor.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        frame.as_deref().map(Park::decode).transpose()
    }

    async fn parked(&self, actor: &ActorId) -> StoreResult<Option<Park>> {
        let frame: Option<Vec<u8>> =
            sqlx::query_scalar(self.q("SELECT frame FROM {s}.parked WHERE actor = $1"))
                .bind(actor.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(pe)?;
        frame.as_deref().map(Park::decode).transpose()
    }

    async fn parked_actors(
        &self,
        after: Option<&ActorId>,
        limit: usize,
    ) -> StoreResult<Vec<(ActorId, Park)>> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(self.q(
            "SELECT actor, frame FROM {s}.parked WHERE actor COLLATE \"C\" > $1 ORDER BY actor COLLATE \"C\" LIMIT $2",
        ))
        .bind(after.map_or("", |a| a.as_str()))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(pe)?;
        rows.iter()
            .map(|(a, f)| Ok((parse_actor(a, "parked actor id")?, Park::decode(f)?)))
            .collect()
    }
}
