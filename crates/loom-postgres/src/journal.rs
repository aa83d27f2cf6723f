//! [`JournalStore`] on PostgreSQL: the journal, meta and snapshot tables (`schema.sql`).

use async_trait::async_trait;
use loom_core::codec::{self};
use loom_core::store::backend::{Page, paged_read, prepare_append, prepare_snapshot};
use loom_core::store::{EntryStream, JournalInfo, JournalStore, Lease, SeqRange};
use loom_core::{ActorId, Entry, Seq, Snapshot, StoreError, StoreResult};
use sqlx::Row;

use crate::group::AppendReq;
use crate::sql::*;
use crate::{PostgresStore, pe};

/// Entries per query while streaming a journal.
const READ_PAGE: i64 = 1024;

/// Reads the (status, value) of a function that saves a snapshot: the value of `ok`, or why it
/// was refused.
pub(crate) fn snapshot_status(
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

impl PostgresStore {
    /// A page of entries and the trim point, read by one statement (one snapshot of the data).
    pub(crate) async fn read_page(
        &self,
        actor: &ActorId,
        from: Seq,
        to: Seq,
        limit: usize,
    ) -> StoreResult<Page> {
        // The page ends after the entry that takes it past READ_PAGE_BYTES (`before`: the
        // frames' bytes ahead of each row; `octet_length` reads a stored value's size without
        // fetching it); `n`: the rows the page would hold without that bound.
        let rows = sqlx::query(self.q(
            "SELECT m.t, j.seq, j.frame, j.n FROM \
             (SELECT coalesce((SELECT trimmed FROM {s}.journal_meta WHERE actor = $1), 0) AS t) AS m \
             LEFT JOIN LATERAL (SELECT seq, frame, n FROM \
                (SELECT seq, frame, count(*) OVER () AS n, \
                   sum(octet_length(frame)) OVER (ORDER BY seq) - octet_length(frame) AS before \
                 FROM (SELECT seq, frame FROM {s}.journal \
                   WHERE actor = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq LIMIT $4) AS l) AS w \
                WHERE w.before < $5) AS j ON true \
             ORDER BY j.seq",
        ))
        .bind(actor.as_str())
        .bind(int(from))
        .bind(int(to))
        .bind((limit as i64).min(READ_PAGE))
        .bind(loom_core::store::backend::READ_PAGE_BYTES as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(pe)?;
        let trimmed_through = rows.first().map(|r| r.get::<i64, _>(0) as u64);
        let without_bound = rows
            .first()
            .and_then(|r| r.get::<Option<i64>, _>(3))
            .unwrap_or(0);
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
            cut_short: (entries.len() as i64) < without_bound,
            entries,
            trimmed_through,
        })
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
            .bind(fence.map(|l| fence_token(actor, l)).transpose()?)
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

    async fn delete(&self, actor: &ActorId, fence: Option<&Lease>) -> StoreResult<()> {
        let status: String = sqlx::query_scalar(self.q("SELECT {s}.delete($1, $2)"))
            .bind(actor.as_str())
            .bind(fence.map(|l| fence_token(actor, l)).transpose()?)
            .fetch_one(&self.pool)
            .await
            .map_err(pe)?;
        if status == "lost" {
            return Err(StoreError::LeaseLost {
                actor: actor.clone(),
                token: fence.map_or(0, |l| l.token),
            });
        }
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
