//! [`JournalStore`] on Redis: a stream per actor, a meta hash, snapshots; see `loom.lua`.

use async_trait::async_trait;
use loom_core::codec::{self};
use loom_core::store::backend::{Page, paged_read, prepare_append, prepare_snapshot};
use loom_core::store::{EntryStream, JournalInfo, JournalStore, Lease, SeqRange};
use loom_core::{ActorId, Entry, Seq, Snapshot, StoreError, StoreResult};
use redis::Value;

use crate::resp::*;
use crate::{RedisStore, re};

/// Entries per `XRANGE` while streaming a journal.
pub(crate) const READ_PAGE: usize = 1024;

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
            cut_short: false,
        })
    }
}

/// Reads the reply of a script that saves a snapshot: `ok`, or why it was refused.
pub(crate) fn snapshot_reply(
    actor: &ActorId,
    seq: Seq,
    r: &[Value],
    script: &str,
) -> StoreResult<()> {
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

impl RedisStore {
    /// Runs a journal script fenced by `fence` (`fence_held` in `loom.lua`): the fence's lease
    /// key (and the actor's own, for a partition's fence) after `keys`, its owner and token
    /// after `args`. A fence no longer held is [`StoreError::LeaseLost`], nothing written.
    async fn run_fenced(
        &self,
        entry: &'static crate::Entry,
        actor: &ActorId,
        keys: &[&str],
        mut args: Vec<Vec<u8>>,
        fence: Option<&Lease>,
    ) -> StoreResult<Vec<Value>> {
        let (ls, own) = self.keys.fence(actor, fence)?;
        let mut keys = keys.to_vec();
        keys.push(&ls);
        keys.extend(own.as_deref());
        if let Some(l) = fence {
            args.push(s(&l.owner));
            args.push(s(l.token));
        }
        let r = self.run(entry, &keys, args).await?;
        if status(&r) == "lost" {
            return Err(StoreError::LeaseLost {
                actor: actor.clone(),
                token: fence.map_or(0, |l| l.token),
            });
        }
        Ok(r)
    }
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
                &[&k.j, &k.jm, &self.keys.actors_of(actor)],
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
        let args = vec![s(snapshot.seq), s(keep), frame];
        let keys = [k.j.as_str(), &k.jm, &k.sn, &k.sz];
        let r = self
            .run_fenced(&self.scripts.compact, actor, &keys, args, fence)
            .await?;
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

    async fn delete(&self, actor: &ActorId, fence: Option<&Lease>) -> StoreResult<()> {
        let k = self.keys.journal(actor);
        let keys = [k.j.as_str(), &k.jm, &k.sn, &k.sz];
        self.run_fenced(&self.scripts.delete, actor, &keys, Vec::new(), fence)
            .await?;
        Ok(())
    }

    async fn begin_at(&self, actor: &ActorId, through: Seq) -> StoreResult<()> {
        let k = self.keys.journal(actor);
        let r = self
            .run(
                &self.scripts.begin_at,
                &[&k.jm, &self.keys.actors_of(actor)],
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
        let sets: Vec<String> = (0..self.keys.partitions())
            .map(|p| self.keys.actors(p))
            .collect();
        self.listed(&sets, after, limit)
            .await?
            .into_iter()
            .map(|s| ActorId::from_stored(&s, "journal actor id"))
            .collect()
    }
}
