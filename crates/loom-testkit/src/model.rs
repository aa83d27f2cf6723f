//! A model-based test of [`JournalStore`](loom_core::JournalStore): random sequences of append, snapshot, trim, delete,
//! read and reopen, each checked against a plain in-memory model of the rules.
//!
//! After every operation the store must have answered as the model did (same success, same kind
//! of error) and must hold exactly what the model holds: highest seq, trim point, kept snapshots,
//! every entry.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::TryStreamExt;
use loom_core::{ActorId, Entry, EntryKind, Seq, SeqRange, Snapshot, Store, StoreError};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::json;

/// Opens a store; opening again gives the same data (after the previous handle was dropped).
pub trait Reopen: Send + Sync {
    /// Opens the store. The caller drops the previous handle first.
    fn open(&self) -> Arc<dyn Store>;
}

/// One step of a run.
#[derive(Debug, Clone)]
pub enum Op {
    /// Append `count` entries expecting next seq `highest + 1 + skew`.
    Append {
        /// Which of the three actors.
        actor: u8,
        /// How many entries.
        count: u8,
        /// How far from the right `expected_next`.
        skew: i8,
    },
    /// Save a snapshot at `highest + offset`, keeping `keep`.
    Snapshot {
        /// Which actor.
        actor: u8,
        /// Seq relative to highest.
        offset: i8,
        /// Snapshots to keep.
        keep: u8,
    },
    /// Trim through `oldest snapshot + offset` (or `highest + offset` without a snapshot).
    Trim {
        /// Which actor.
        actor: u8,
        /// Seq relative to the oldest snapshot.
        offset: i8,
    },
    /// Delete the journal.
    Delete {
        /// Which actor.
        actor: u8,
    },
    /// Read a range.
    Read {
        /// Which actor.
        actor: u8,
        /// First seq.
        from: u8,
        /// Last seq.
        to: u8,
        /// Most entries.
        max: u8,
    },
    /// Drop the store and open it again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let actor = 0u8..3;
    prop_oneof![
        6 => (actor.clone(), 0u8..6, prop_oneof![8 => Just(0i8), 1 => -3i8..3]).prop_map(|(actor, count, skew)| Op::Append { actor, count, skew }),
        3 => (actor.clone(), -6i8..2, 0u8..4).prop_map(|(actor, offset, keep)| Op::Snapshot { actor, offset, keep }),
        3 => (actor.clone(), -3i8..2).prop_map(|(actor, offset)| Op::Trim { actor, offset }),
        1 => actor.clone().prop_map(|actor| Op::Delete { actor }),
        2 => (actor, 0u8..40, 0u8..40, 0u8..20).prop_map(|(actor, from, to, max)| Op::Read { actor, from, to, max }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Default, Clone)]
struct Journal {
    highest: Seq,
    trimmed: Seq,
    /// The highest seq at the last delete: no snapshot at or below it is accepted.
    deleted: Seq,
    entries: BTreeMap<Seq, u64>,
    snapshots: BTreeMap<Seq, u64>,
}

fn actor(n: u8) -> ActorId {
    ActorId::new("model", format!("a{n}")).expect("valid id")
}

fn rel(base: Seq, offset: i8) -> Seq {
    base.saturating_add_signed(offset as i64)
}

/// The kind of an outcome, for comparing store and model.
fn kind<T>(r: &Result<T, StoreError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(StoreError::Conflict { .. }) => "conflict",
        Err(StoreError::TrimRefused { .. }) => "trim refused",
        Err(StoreError::SnapshotRefused { .. }) => "snapshot refused",
        Err(StoreError::InvalidRequest(_)) => "invalid request",
        Err(_) => "other error",
    }
}

struct Run {
    opener: Box<dyn Reopen>,
    store: Option<Arc<dyn Store>>,
    model: Vec<Journal>,
    counter: u64,
}

impl Run {
    fn store(&self) -> &dyn Store {
        self.store.as_deref().expect("store is open")
    }

    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Append {
                actor: n,
                count,
                skew,
            } => {
                let a = actor(n);
                let m = &self.model[n as usize];
                let expected = rel(m.highest + 1, skew);
                let batch: Vec<(Seq, u64)> = (0..count as Seq)
                    .map(|i| {
                        self.counter += 1;
                        (expected + i, self.counter)
                    })
                    .collect();
                let entries: Vec<Entry> = batch
                    .iter()
                    .map(|(seq, v)| Entry::new(*seq, EntryKind::Completed { reply: json!(v) }))
                    .collect();
                let got = self.store().append(&a, expected, &entries).await;
                let m = &mut self.model[n as usize];
                let want = if expected == 0 {
                    "invalid request"
                } else if expected != m.highest + 1 {
                    "conflict"
                } else {
                    m.entries.extend(batch.iter().copied());
                    m.highest += count as Seq;
                    "ok"
                };
                prop_assert_eq!(kind(&got), want, "{:?} gave {:?}", op, got);
                if let Ok(h) = got {
                    prop_assert_eq!(h, m.highest);
                }
            }
            Op::Snapshot {
                actor: n,
                offset,
                keep,
            } => {
                let a = actor(n);
                let m = &mut self.model[n as usize];
                let seq = rel(m.highest, offset);
                self.counter += 1;
                let got = self
                    .store
                    .as_deref()
                    .expect("open")
                    .save_snapshot(&a, &Snapshot::new(seq, json!(self.counter)), keep as usize)
                    .await;
                let want = if keep == 0 {
                    "invalid request"
                } else if seq == 0 || seq > m.highest || seq < m.trimmed || seq <= m.deleted {
                    "snapshot refused"
                } else {
                    m.snapshots.insert(seq, self.counter);
                    while m.snapshots.len() > keep as usize {
                        m.snapshots.pop_first();
                    }
                    "ok"
                };
                prop_assert_eq!(kind(&got), want, "{:?} gave {:?}", op, got);
            }
            Op::Trim { actor: n, offset } => {
                let a = actor(n);
                let m = &mut self.model[n as usize];
                let oldest = m.snapshots.keys().next().copied();
                let through = rel(oldest.unwrap_or(m.highest), offset);
                let got = self.store.as_deref().expect("open").trim(&a, through).await;
                let want = match oldest {
                    Some(o) if through <= o => {
                        if through > m.trimmed {
                            m.trimmed = through;
                            m.entries.retain(|s, _| *s > through);
                        }
                        "ok"
                    }
                    _ => "trim refused",
                };
                prop_assert_eq!(kind(&got), want, "{:?} gave {:?}", op, got);
            }
            Op::Delete { actor: n } => {
                let got = self.store().delete(&actor(n), None).await;
                let m = &mut self.model[n as usize];
                m.entries.clear();
                m.snapshots.clear();
                m.trimmed = m.highest;
                m.deleted = m.highest;
                prop_assert_eq!(kind(&got), "ok", "{:?} gave {:?}", op, got);
            }
            Op::Read {
                actor: n,
                from,
                to,
                max,
            } => {
                let range = SeqRange::all()
                    .from(from as Seq)
                    .to(to as Seq)
                    .max(max as u64);
                let got: Vec<Entry> = self
                    .store()
                    .read(&actor(n), range)
                    .try_collect()
                    .await
                    .map_err(|e| TestCaseError::fail(format!("{op:?}: {e}")))?;
                let want: Vec<(Seq, u64)> = self.model[n as usize]
                    .entries
                    .range(from.max(1) as Seq..)
                    .filter(|(s, _)| **s <= to as Seq)
                    .take(max as usize)
                    .map(|(s, v)| (*s, *v))
                    .collect();
                prop_assert_eq!(values(&got), want, "{:?}", op);
            }
            Op::Reopen => {
                self.store = None;
                self.store = Some(self.opener.open());
            }
        }
        self.check().await
    }

    async fn check(&self) -> Result<(), TestCaseError> {
        for (n, m) in self.model.iter().enumerate() {
            let a = actor(n as u8);
            let info = self
                .store()
                .info(&a)
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(info.highest, m.highest, "highest of {}", a);
            prop_assert_eq!(info.trimmed_through, m.trimmed, "trim point of {}", a);
            prop_assert_eq!(
                &info.snapshots,
                &m.snapshots.keys().copied().collect::<Vec<_>>(),
                "snapshots of {}",
                a
            );
            let all: Vec<Entry> = self
                .store()
                .read(&a, SeqRange::all())
                .try_collect()
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(
                values(&all),
                m.entries.iter().map(|(s, v)| (*s, *v)).collect::<Vec<_>>(),
                "entries of {}",
                a
            );
            let latest = self
                .store()
                .load_snapshot(&a, Seq::MAX)
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(
                latest.map(|s| (s.seq, s.state)),
                m.snapshots.iter().next_back().map(|(s, v)| (*s, json!(v))),
                "latest snapshot of {}",
                a
            );
        }
        Ok(())
    }
}

fn values(entries: &[Entry]) -> Vec<(Seq, u64)> {
    entries
        .iter()
        .map(|e| match &e.kind {
            EntryKind::Completed { reply } => (e.seq, reply.as_u64().unwrap_or(u64::MAX)),
            _ => (e.seq, u64::MAX),
        })
        .collect()
}

/// Runs `cases` random operation sequences (override with `PROPTEST_CASES`), each on a fresh
/// store from `fresh`. Panics with the shrunk failing sequence if the store and the model
/// disagree.
pub fn check_journal_model(cases: u32, fresh: impl Fn() -> Box<dyn Reopen>) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        let opener = fresh();
        let store = opener.open();
        let mut run = Run {
            opener,
            store: Some(store),
            model: vec![Journal::default(); 3],
            counter: 0,
        };
        rt.block_on(async {
            for op in &ops {
                run.step(op).await?;
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("store and model disagree: {e}");
    }
}
