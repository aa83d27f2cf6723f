//! The engine bake-off: the writes of one partitioned bank turn, straight on a storage engine,
//! with the same durability rule on each, so the choice of engine for the partitioned embedded
//! store rests on a measurement and not on a reputation.
//!
//! # The write pattern
//!
//! One *turn* of partition `w` (one account handling one message, as a partitioned store will
//! write it) reads the actor's highest seq and writes, in one atomic batch with the other turns
//! of its group commit:
//!
//! - `entries` journal entries under `(actor, seq)` and the actor's new highest seq;
//! - the ack of the message it handled (a delete from the partition's mailbox);
//! - its outgoing message, appended to the partition's outbox;
//! - its reply record (idempotency), and the delete of an expired one;
//! - the relay's share: one outbox entry moved into a mailbox (insert there, delete here).
//!
//! Every key inserted is deleted again later except journal entries and meta rows, as in a store
//! running for a long time: an LSM pays for tombstones, a B-tree for page rewrites.
//!
//! # The durability rule
//!
//! A batch counts only once `fdatasync` has returned on the file that makes it durable:
//!
//! - [`Engine::RedbRedo`]: the embedded store's scheme (`loom_core`'s `embedded/redo.rs`): the
//!   batch commits to redb with `Durability::None`, its writes are serialized into one
//!   checksummed record appended to the partition's own log file and `fdatasync`ed, outside
//!   redb's write lock; every 250 ms or 64 MiB of log a checkpoint commits redb with
//!   `Durability::Immediate` (under the write lock) and empties the log. Unlike the store, which
//!   commits the next batch while the log thread syncs, a writer here commits, writes and syncs
//!   one batch after the other, so the store can do better than this row. redb allows one write
//!   transaction at a time, so the partitions of one file take turns for it, and each writer
//!   checkpoints on its own timer (P checkpoints per period where a real shared design would do
//!   one). Shared by several partitions' logs, this variant is also **not crash-safe as
//!   written**: one partition's checkpoint makes the others' unlogged commits durable, which a
//!   replay of their logs would then undo in part. It measures what sharing one file could give
//!   at best; the store would need log sequence numbers across partitions to ship it.
//! - [`Engine::RedbRedoPerPartition`]: the same, with one redb file per partition, so that
//!   partitions share no lock at all (the engine instance is then per partition, not one), and
//!   each file's checkpoint covers only its own partition's log: crash-safe as the store is.
//! - [`Engine::Fjall`]: one fjall database (an LSM with its own journal), one keyspace per
//!   table; the batch is written to fjall's journal (`PersistMode::Buffer`, atomic) and then
//!   `Database::persist(PersistMode::SyncData)`. fjall has one journal per database and syncs
//!   it under the journal's lock, so partitions share that lock, fsync included.
//!
//! After each run the engine is closed (redb: a last durable commit; fjall: `SyncAll`), opened
//! again, and its journal entries counted: every counted turn's entries must be there. That
//! shows every counted write reached the engine; it does not by itself show each was durable
//! when counted (that is the rule above, and the crash tests of the store itself).
//!
//! CPU is the whole process's (`getrusage`) from open to close, the engines' background
//! threads included; fjall's flushes and compactions still queued at close are not run, so its
//! figure is, if anything, low.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use fjall::{KeyspaceCreateOptions, PersistMode};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::report::{Measurement, process_cpu};

/// The engine under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// redb with `Durability::None` commits and a redo log per partition (today's store).
    RedbRedo,
    /// fjall 3.x, one database, batches synced through its journal.
    Fjall,
    /// redb with a redo log, one redb file per partition (so partitions share no write lock;
    /// with one partition, the same as [`Engine::RedbRedo`]).
    RedbRedoPerPartition,
}

impl Engine {
    /// Both engines, in the order a run measures them.
    pub const ALL: [Engine; 3] = [
        Engine::RedbRedo,
        Engine::Fjall,
        Engine::RedbRedoPerPartition,
    ];

    /// Its name in a report.
    pub fn name(self) -> &'static str {
        match self {
            Engine::RedbRedo => "redb+redo",
            Engine::Fjall => "fjall",
            Engine::RedbRedoPerPartition => "redb+redo-file-per-partition",
        }
    }
}

/// The shape of the workload.
#[derive(Debug, Clone, Copy)]
pub struct Pattern {
    /// Writer threads, one per partition; each writes only its partition's keys.
    pub partitions: usize,
    /// Turns per atomic batch (one group commit).
    pub turns_per_batch: usize,
    /// Accounts per partition (turns go round-robin over them).
    pub accounts: usize,
    /// Journal entries one turn writes.
    pub entries: usize,
    /// Bytes of one journal entry.
    pub entry_bytes: usize,
    /// Bytes of one message (outbox and mailbox).
    pub message_bytes: usize,
    /// Bytes of one reply record.
    pub record_bytes: usize,
}

impl Default for Pattern {
    /// A bank account's turn: `Invoked`, `StatePatched`, `Completed`; a transfer message; a
    /// small reply.
    fn default() -> Self {
        Pattern {
            partitions: 1,
            turns_per_batch: 64,
            accounts: 1024,
            entries: 3,
            entry_bytes: 200,
            message_bytes: 300,
            record_bytes: 64,
        }
    }
}

impl Pattern {
    /// Key/value writes (inserts and deletes) one turn makes.
    pub fn writes_per_turn(&self) -> usize {
        // entries + meta + ack + outbox + record + expired record + relay (insert + delete)
        self.entries + 7
    }

    /// Bytes of keys and values one turn writes, about (what a raw log would hold).
    pub fn bytes_per_turn(&self) -> usize {
        self.entries * (self.entry_bytes + 24)
            + 2 * (self.message_bytes + 40)
            + self.record_bytes
            + 120
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The engine.
    pub engine: Engine,
    /// The pattern.
    pub pattern: Pattern,
    /// Turns made durable.
    pub turns: u64,
    /// Wall-clock time of the measured part.
    pub elapsed: Duration,
    /// CPU time of the whole process (every thread, the engine's background work included)
    /// from open to close.
    pub cpu: Duration,
    /// Latency of each batch, from its first write to its fsync returning.
    pub batch_latencies: Vec<Duration>,
    /// Bytes in the engine's directory when the run ended, before close.
    pub disk_bytes: u64,
    /// Journal entries found when the directory was opened again after the run.
    pub entries_after_reopen: u64,
}

impl Outcome {
    /// Turns per second.
    pub fn turns_per_s(&self) -> f64 {
        self.turns as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU milliseconds per 1000 turns.
    pub fn cpu_ms_per_1000(&self) -> f64 {
        self.cpu.as_secs_f64() * 1000.0 / (self.turns as f64 / 1000.0)
    }

    /// As a report row, against `baseline` turns per second (the raw fsync loop).
    pub fn measurement(&self, baseline: f64) -> Measurement {
        let p = self.pattern;
        let mut latencies = self.batch_latencies.clone();
        Measurement::new(
            &format!("engine-{}-p{}", self.engine.name(), p.partitions),
            "engine",
            self.turns_per_s(),
            baseline,
            &mut latencies,
        )
        .with("unit", "turns")
        .with("latency_of", "one batch: first write to fsync returned")
        .with("turns", self.turns)
        .with("seconds", self.elapsed.as_secs_f64())
        .with("partitions", p.partitions)
        .with("turns_per_batch", p.turns_per_batch)
        .with("writes_per_turn", p.writes_per_turn())
        .with(
            "cpu_ms_per_1000_turns",
            (self.cpu_ms_per_1000() * 10.0).round() / 10.0,
        )
        .with("disk_bytes", self.disk_bytes)
        .with(
            "baseline_is",
            "write + fdatasync of the same bytes per batch to a plain file, one file per partition",
        )
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file operation failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// redb failed.
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    /// fjall failed.
    #[error("fjall: {0}")]
    Fjall(#[from] fjall::Error),
    /// The data read back is not what was written.
    #[error("{0}")]
    Check(String),
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for EngineError {
            fn from(e: $t) -> Self {
                EngineError::Redb(e.into())
            }
        }
    )*};
}
redb_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// One write of a batch, whichever engine applies it.
enum Op {
    Put(Table, Vec<u8>, Vec<u8>),
    Del(Table, Vec<u8>),
}

#[derive(Clone, Copy)]
enum Table {
    Journal,
    Meta,
    Mailbox,
    Outbox,
    Records,
}

impl Table {
    const ALL: [Table; 5] = [
        Table::Journal,
        Table::Meta,
        Table::Mailbox,
        Table::Outbox,
        Table::Records,
    ];

    fn name(self) -> &'static str {
        match self {
            Table::Journal => "journal",
            Table::Meta => "meta",
            Table::Mailbox => "mailbox",
            Table::Outbox => "outbox",
            Table::Records => "records",
        }
    }

    fn redb(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        TableDefinition::new(self.name())
    }
}

/// The turns of one partition, generated the same way for both engines.
struct Turns {
    partition: u16,
    pattern: Pattern,
    next: u64,
    entry: Vec<u8>,
    message: Vec<u8>,
    record: Vec<u8>,
}

/// How far behind the turns the relay and the acks run, in turns.
const LAG: u64 = 256;
/// How long a reply record is kept, in turns.
const RECORDS_KEPT: u64 = 10_000;

impl Turns {
    fn new(partition: usize, pattern: Pattern) -> Self {
        Turns {
            partition: partition as u16,
            pattern,
            next: 0,
            entry: vec![b'e'; pattern.entry_bytes],
            message: vec![b'm'; pattern.message_bytes],
            record: vec![b'r'; pattern.record_bytes],
        }
    }

    fn actor(&self, n: u64) -> Vec<u8> {
        format!(
            "account/p{}-{}",
            self.partition,
            n % self.pattern.accounts as u64
        )
        .into_bytes()
    }

    /// The account that turn `n`'s outgoing message goes to (in the same partition: the
    /// relay's cross-partition hop costs the same writes).
    fn target(&self, n: u64) -> Vec<u8> {
        self.actor(n.wrapping_mul(7).wrapping_add(3))
    }

    fn journal_key(actor: &[u8], seq: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(actor.len() + 9);
        k.extend_from_slice(actor);
        k.push(0);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    fn mailbox_key(&self, actor: &[u8], n: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(actor.len() + 11);
        k.extend_from_slice(&self.partition.to_be_bytes());
        k.extend_from_slice(actor);
        k.push(0);
        k.extend_from_slice(&n.to_be_bytes());
        k
    }

    fn outbox_key(&self, n: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(10);
        k.extend_from_slice(&self.partition.to_be_bytes());
        k.extend_from_slice(&n.to_be_bytes());
        k
    }

    fn record_key(&self, n: u64) -> Vec<u8> {
        format!("transfer-p{}-{n}", self.partition).into_bytes()
    }

    /// The writes of the next turn, given the actor's highest seq as the engine reads it.
    fn turn(
        &mut self,
        highest: impl FnOnce(&[u8]) -> Result<u64, EngineError>,
    ) -> Result<Vec<Op>, EngineError> {
        let n = self.next;
        self.next += 1;
        let actor = self.actor(n);
        let h = highest(&actor)?;
        let mut ops = Vec::with_capacity(self.pattern.writes_per_turn());
        for s in 1..=self.pattern.entries as u64 {
            ops.push(Op::Put(
                Table::Journal,
                Self::journal_key(&actor, h + s),
                self.entry.clone(),
            ));
        }
        let top = h + self.pattern.entries as u64;
        ops.push(Op::Put(
            Table::Meta,
            actor.clone(),
            top.to_be_bytes().to_vec(),
        ));
        ops.push(Op::Put(
            Table::Outbox,
            self.outbox_key(n),
            self.message.clone(),
        ));
        ops.push(Op::Put(
            Table::Records,
            self.record_key(n),
            self.record.clone(),
        ));
        if let Some(old) = n.checked_sub(RECORDS_KEPT) {
            ops.push(Op::Del(Table::Records, self.record_key(old)));
        }
        // The relay moves an older outbox entry into its target's mailbox...
        if let Some(m) = n.checked_sub(LAG) {
            ops.push(Op::Del(Table::Outbox, self.outbox_key(m)));
            ops.push(Op::Put(
                Table::Mailbox,
                self.mailbox_key(&self.target(m), m),
                self.message.clone(),
            ));
        }
        // ...and this turn acks a message the relay delivered earlier.
        if let Some(m) = n.checked_sub(2 * LAG) {
            ops.push(Op::Del(
                Table::Mailbox,
                self.mailbox_key(&self.target(m), m),
            ));
        }
        Ok(ops)
    }
}

fn meta_value(v: Option<&[u8]>) -> Result<u64, EngineError> {
    match v {
        None => Ok(0),
        Some(b) => Ok(u64::from_be_bytes(b.try_into().map_err(|_| {
            EngineError::Check(format!("a meta value of {} bytes", b.len()))
        })?)),
    }
}

fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let md = e.metadata()?;
        total += if md.is_dir() {
            dir_bytes(&e.path())?
        } else {
            md.len()
        };
    }
    Ok(total)
}

/// Runs `engine` on a fresh directory under `parent` for `seconds` of measured time, then
/// closes it, opens it again and counts the journal entries (every turn's must be there).
pub fn run(
    engine: Engine,
    parent: &Path,
    pattern: Pattern,
    seconds: Duration,
) -> Result<Outcome, EngineError> {
    let dir = tempfile_dir(parent, engine)?;
    let outcome = match engine {
        Engine::RedbRedo | Engine::RedbRedoPerPartition => redb_run(&dir, pattern, seconds, engine),
        Engine::Fjall => fjall_run(&dir, pattern, seconds),
    };
    let removed = std::fs::remove_dir_all(&dir);
    let outcome = outcome?;
    removed?;
    let expected = outcome.turns * pattern.entries as u64;
    if outcome.entries_after_reopen != expected {
        return Err(EngineError::Check(format!(
            "{}: {} journal entries after reopening, {expected} written",
            engine.name(),
            outcome.entries_after_reopen
        )));
    }
    Ok(outcome)
}

fn tempfile_dir(parent: &Path, engine: Engine) -> std::io::Result<std::path::PathBuf> {
    let dir = parent.join(format!(
        "bakeoff-{}-{}-{:08x}",
        engine.name().replace('+', "-"),
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// What each writer thread returns: turns made durable and batch latencies.
type Written = (u64, Vec<Duration>);

/// When the writers of a run stop: at the deadline, or as soon as one of them failed (so that
/// `run` never removes a directory a writer still uses).
#[derive(Clone)]
struct Until {
    deadline: Instant,
    failed: Arc<AtomicBool>,
}

impl Until {
    fn new(deadline: Instant) -> Until {
        Until {
            deadline,
            failed: Arc::default(),
        }
    }

    fn going(&self) -> bool {
        Instant::now() < self.deadline && !self.failed.load(Ordering::Relaxed)
    }

    /// Runs one writer, stopping the others if it fails.
    fn watch(&self, r: Result<Written, EngineError>) -> Result<Written, EngineError> {
        if r.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        r
    }
}

fn join_writers(
    handles: Vec<thread::JoinHandle<Result<Written, EngineError>>>,
) -> Result<Written, EngineError> {
    let mut turns = 0;
    let mut latencies = Vec::new();
    let mut first_error = None;
    // Every thread is joined before anything is returned: none outlives the run.
    for h in handles {
        match h.join() {
            Ok(Ok((t, l))) => {
                turns += t;
                latencies.extend(l);
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(EngineError::Check("a writer thread panicked".into()));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok((turns, latencies)),
    }
}

// ---- redb + redo log -------------------------------------------------------------------------

const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
const CHECKPOINT_LOG_BYTES: u64 = 64 << 20;

/// The log record of a batch: length, crc32, then each write as table, op, key, value.
fn redo_record(ops: &[Op], buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&[0; 8]);
    for op in ops {
        let (t, tag, k, v): (Table, u8, &[u8], &[u8]) = match op {
            Op::Put(t, k, v) => (*t, 1, k, v),
            Op::Del(t, k) => (*t, 2, k, &[]),
        };
        buf.push(t as u8);
        buf.push(tag);
        buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
        buf.extend_from_slice(k);
        buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        buf.extend_from_slice(v);
    }
    let len = (buf.len() - 8) as u32;
    let crc = crc32fast::hash(&buf[8..]);
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

fn redb_run(
    dir: &Path,
    pattern: Pattern,
    seconds: Duration,
    engine: Engine,
) -> Result<Outcome, EngineError> {
    let cpu0 = process_cpu();
    // One file that every partition's writer shares, or one file per partition.
    let files = match engine {
        Engine::RedbRedoPerPartition => pattern.partitions,
        _ => 1,
    };
    let path = |f: usize| dir.join(format!("loom-{f}.redb"));
    let mut dbs = Vec::with_capacity(files);
    for f in 0..files {
        let db = redb::Database::create(path(f))?;
        let txn = db.begin_write()?;
        for t in Table::ALL {
            txn.open_table(t.redb())?;
        }
        txn.commit()?;
        dbs.push(Arc::new(db));
    }
    let start = Instant::now();
    let until = Until::new(start + seconds);
    let handles: Vec<_> = (0..pattern.partitions)
        .map(|w| {
            let (db, until) = (dbs[w % files].clone(), until.clone());
            let log_path = dir.join(format!("loom.redo.{w}"));
            thread::spawn(move || until.watch(redb_writer(&db, &log_path, w, pattern, &until)))
        })
        .collect();
    let (turns, batch_latencies) = join_writers(handles)?;
    let elapsed = start.elapsed();
    let disk_bytes = dir_bytes(dir)?;
    for db in dbs {
        let db = Arc::try_unwrap(db)
            .map_err(|_| EngineError::Check("a writer kept the database".into()))?;
        // Close as the store does: one last durable commit, then the logs are not needed.
        let mut txn = db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        txn.commit()?;
    }
    let cpu = process_cpu().saturating_sub(cpu0);
    let mut entries_after_reopen = 0;
    for f in 0..files {
        let db = redb::Database::open(path(f))?;
        entries_after_reopen += db
            .begin_read()
            .map_err(redb::Error::from)?
            .open_table(Table::Journal.redb())?
            .len()?;
    }
    Ok(Outcome {
        engine,
        pattern,
        turns,
        elapsed,
        cpu,
        batch_latencies,
        disk_bytes,
        entries_after_reopen,
    })
}

fn redb_writer(
    db: &redb::Database,
    log_path: &Path,
    partition: usize,
    pattern: Pattern,
    until: &Until,
) -> Result<Written, EngineError> {
    let mut log: File = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    let mut log_bytes = 0u64;
    let mut last_checkpoint = Instant::now();
    let mut turns = Turns::new(partition, pattern);
    let mut record = Vec::new();
    let mut latencies = Vec::new();
    let mut done = 0u64;
    while until.going() {
        let t = Instant::now();
        let mut txn = db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        let mut batch = Vec::with_capacity(pattern.turns_per_batch * pattern.writes_per_turn());
        {
            let mut tables: Vec<_> = Table::ALL
                .iter()
                .map(|t| txn.open_table(t.redb()))
                .collect::<Result<_, _>>()?;
            for _ in 0..pattern.turns_per_batch {
                let ops = turns.turn(|actor| {
                    let v = tables[Table::Meta as usize].get(actor)?;
                    meta_value(v.as_ref().map(|v| v.value()))
                })?;
                for op in &ops {
                    match op {
                        Op::Put(t, k, v) => {
                            tables[*t as usize].insert(k.as_slice(), v.as_slice())?;
                        }
                        Op::Del(t, k) => {
                            tables[*t as usize].remove(k.as_slice())?;
                        }
                    }
                }
                batch.extend(ops);
            }
        }
        txn.commit()?;
        redo_record(&batch, &mut record);
        log.write_all(&record)?;
        log.sync_data()?;
        log_bytes += record.len() as u64;
        done += pattern.turns_per_batch as u64;
        // A checkpoint delays the requests behind it; it counts in the latency of the batch
        // that ran it.
        if last_checkpoint.elapsed() >= CHECKPOINT_EVERY || log_bytes >= CHECKPOINT_LOG_BYTES {
            // Everything this partition logged is in redb's committed state; make it durable
            // there, then the log is not needed.
            let mut txn = db.begin_write()?;
            txn.set_durability(redb::Durability::Immediate)?;
            txn.commit()?;
            log.set_len(0)?;
            log.sync_all()?;
            log_bytes = 0;
            last_checkpoint = Instant::now();
        }
        latencies.push(t.elapsed());
    }
    Ok((done, latencies))
}

// ---- fjall -----------------------------------------------------------------------------------

fn fjall_run(dir: &Path, pattern: Pattern, seconds: Duration) -> Result<Outcome, EngineError> {
    let cpu0 = process_cpu();
    let path = dir.join("fjall");
    let db = fjall::Database::builder(&path).open()?;
    let keyspaces: Vec<fjall::Keyspace> = Table::ALL
        .iter()
        .map(|t| db.keyspace(t.name(), KeyspaceCreateOptions::default))
        .collect::<Result<_, _>>()?;
    let keyspaces = Arc::new(keyspaces);
    let start = Instant::now();
    let until = Until::new(start + seconds);
    let handles: Vec<_> = (0..pattern.partitions)
        .map(|w| {
            let (db, keyspaces, until) = (db.clone(), keyspaces.clone(), until.clone());
            thread::spawn(move || until.watch(fjall_writer(&db, &keyspaces, w, pattern, &until)))
        })
        .collect();
    let (turns, batch_latencies) = join_writers(handles)?;
    let elapsed = start.elapsed();
    let disk_bytes = dir_bytes(dir)?;
    db.persist(PersistMode::SyncAll)?;
    drop(keyspaces);
    drop(db);
    let cpu = process_cpu().saturating_sub(cpu0);
    let db = fjall::Database::builder(&path).open()?;
    let journal = db.keyspace(Table::Journal.name(), KeyspaceCreateOptions::default)?;
    let entries_after_reopen = journal.len()? as u64;
    Ok(Outcome {
        engine: Engine::Fjall,
        pattern,
        turns,
        elapsed,
        cpu,
        batch_latencies,
        disk_bytes,
        entries_after_reopen,
    })
}

fn fjall_writer(
    db: &fjall::Database,
    keyspaces: &[fjall::Keyspace],
    partition: usize,
    pattern: Pattern,
    until: &Until,
) -> Result<Written, EngineError> {
    let mut turns = Turns::new(partition, pattern);
    let mut latencies = Vec::new();
    let mut done = 0u64;
    // Within a batch a turn must see the highest seq an earlier turn of the same batch wrote;
    // the accounts of one batch are distinct (turns go round-robin over more accounts than a
    // batch holds), so reading the committed value is enough.
    assert!(pattern.accounts >= pattern.turns_per_batch);
    while until.going() {
        let t = Instant::now();
        let mut batch = db.batch().durability(Some(PersistMode::Buffer));
        for _ in 0..pattern.turns_per_batch {
            let ops = turns.turn(|actor| {
                let v = keyspaces[Table::Meta as usize].get(actor)?;
                meta_value(v.as_deref())
            })?;
            for op in ops {
                match op {
                    Op::Put(t, k, v) => batch.insert(&keyspaces[t as usize], k, v),
                    Op::Del(t, k) => batch.remove(&keyspaces[t as usize], k),
                }
            }
        }
        batch.commit()?;
        db.persist(PersistMode::SyncData)?;
        latencies.push(t.elapsed());
        done += pattern.turns_per_batch as u64;
    }
    Ok((done, latencies))
}

// ---- the baseline ----------------------------------------------------------------------------

/// The raw limit for `pattern`: one writer thread per partition, each appending the bytes of
/// one batch of turns to its own file and `fdatasync`ing it, for `seconds`. Turns per second.
pub fn raw_fsync(parent: &Path, pattern: Pattern, seconds: Duration) -> std::io::Result<f64> {
    let deadline = Instant::now() + seconds;
    let start = Instant::now();
    let handles: Vec<_> = (0..pattern.partitions)
        .map(|w| {
            let path = parent.join(format!(
                "bakeoff-raw-{}-{w}-{:08x}.dat",
                std::process::id(),
                fastrand::u32(..)
            ));
            thread::spawn(move || -> std::io::Result<u64> {
                let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
                let buf = vec![b'x'; pattern.bytes_per_turn() * pattern.turns_per_batch];
                let mut batches = 0u64;
                let outcome: std::io::Result<()> = (|| {
                    while Instant::now() < deadline {
                        f.write_all(&buf)?;
                        f.sync_data()?;
                        batches += 1;
                    }
                    Ok(())
                })();
                let removed = std::fs::remove_file(&path);
                outcome?;
                removed?;
                Ok(batches * pattern.turns_per_batch as u64)
            })
        })
        .collect();
    let mut turns = 0;
    for h in handles {
        turns += h
            .join()
            .map_err(|_| std::io::Error::other("a baseline thread panicked"))??;
    }
    Ok(turns as f64 / start.elapsed().as_secs_f64())
}

/// The bake-off: for each partition count, the raw baseline and each engine, interleaved, each
/// for `seconds`. One [`Measurement`] per (engine, partitions).
pub fn bakeoff(
    parent: &Path,
    partitions: &[usize],
    seconds: Duration,
) -> Result<Vec<Measurement>, EngineError> {
    let mut out = Vec::new();
    for &p in partitions {
        let pattern = Pattern {
            partitions: p,
            ..Pattern::default()
        };
        let baseline = raw_fsync(parent, pattern, seconds)?;
        for engine in Engine::ALL {
            // With one partition a file per partition is the shared file: measured once.
            if p == 1 && engine == Engine::RedbRedoPerPartition {
                continue;
            }
            out.push(run(engine, parent, pattern, seconds)?.measurement(baseline));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both engines do the whole pattern and keep every turn's entries across a reopen (the
    /// check is inside `run`), on one partition and on two.
    #[test]
    fn both_engines_keep_every_turn() {
        let dir = tempfile::tempdir().unwrap();
        for p in [1, 2] {
            let pattern = Pattern {
                partitions: p,
                turns_per_batch: 16,
                accounts: 64,
                ..Pattern::default()
            };
            for engine in Engine::ALL {
                let o = run(engine, dir.path(), pattern, Duration::from_millis(300)).unwrap();
                assert!(
                    o.turns >= 16 * p as u64,
                    "{engine:?} p{p}: {} turns",
                    o.turns
                );
                assert_eq!(o.entries_after_reopen, o.turns * 3);
                let m = o.measurement(1.0);
                assert_eq!(m.scenario, format!("engine-{}-p{p}", engine.name()));
            }
        }
        // Nothing is left behind in the parent directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A turn's writes are what the module comment says, and the relay and acks touch only keys
    /// written before.
    #[test]
    fn a_turn_writes_the_pattern() {
        let pattern = Pattern::default();
        let mut turns = Turns::new(0, pattern);
        let first = turns.turn(|_| Ok(0)).unwrap();
        assert_eq!(first.len(), pattern.entries + 3);
        let mut put = std::collections::HashSet::new();
        let mut ops = first;
        for _ in 0..3 * LAG {
            for op in ops {
                match op {
                    Op::Put(t, k, _) => {
                        put.insert((t as u8, k));
                    }
                    Op::Del(t, k) => {
                        assert!(put.contains(&(t as u8, k)), "deleted a key never written")
                    }
                }
            }
            ops = turns.turn(|_| Ok(0)).unwrap();
        }
        let steady = turns.turn(|_| Ok(0)).unwrap();
        assert_eq!(
            steady.len(),
            pattern.writes_per_turn() - 1,
            "no record has expired yet"
        );
    }
}
