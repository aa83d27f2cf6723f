//! The physical limit scenarios are compared with: writing and `fdatasync`-ing a plain file on
//! the same disk, with the same record size and batching as the store under test.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use redb::ReadableTable;

/// A same-run baseline: given a record size, a batch size and a number of rounds, the physical
/// limit's records per second for the store under test.
pub type Baseline =
    Arc<dyn Fn(usize, usize, usize) -> BoxFuture<'static, Result<f64, String>> + Send + Sync>;

/// The references an append scenario is measured against: the physical limit, and for the
/// embedded store also its storage engine doing the same writes ([`redb_engine`]).
pub struct Baselines {
    /// The physical limit: [`fsync`], pipelined `XADD`, batched `INSERT`.
    pub raw: Baseline,
    /// The storage engine alone, where there is one to compare with.
    pub engine: Option<Baseline>,
}

/// The baseline of a store on local disk: [`fsync_loop`] in `dir`.
pub fn fsync(dir: PathBuf) -> Baseline {
    Arc::new(move |size, batch, rounds| {
        let dir = dir.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || fsync_loop(&dir, size, batch, rounds))
                .await
                .map_err(|e| e.to_string())?
                .map(|(ops, _)| ops)
                .map_err(|e| e.to_string())
        })
    })
}

/// Appends `rounds` batches of `batch` records of `size` bytes to a fresh file in `dir`, with one
/// `fdatasync` per batch. Returns records per second and the latency of each batch.
pub fn fsync_loop(
    dir: &Path,
    size: usize,
    batch: usize,
    rounds: usize,
) -> std::io::Result<(f64, Vec<Duration>)> {
    let path = dir.join(format!("baseline-{}.dat", std::process::id()));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let record = vec![b'x'; size.max(1)];
    let buf: Vec<u8> = record
        .iter()
        .copied()
        .cycle()
        .take(size.max(1) * batch.max(1))
        .collect();
    let mut latencies = Vec::with_capacity(rounds);
    let start = Instant::now();
    for _ in 0..rounds {
        let t = Instant::now();
        file.write_all(&buf)?;
        file.sync_data()?;
        latencies.push(t.elapsed());
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(((rounds * batch.max(1)) as f64 / elapsed, latencies))
}

/// The engine's own limit for the embedded store: the reads and writes one conditional append
/// needs (read the actor's highest seq, insert the entry under `(actor, seq)`, write the new
/// highest), done straight on a fresh redb file in `dir`, `batch` appends to distinct actors
/// per write transaction, each committed with `Durability::Immediate` (one fsync). This is the
/// engine making each batch durable itself; the store instead fsyncs a redo log record and
/// checkpoints redb now and then (see `loom_core`'s `embedded/redo.rs`), so it can beat this.
/// What is left between this and [`fsync`] is what redb's own durable commit costs.
pub fn redb_engine(dir: PathBuf) -> Baseline {
    Arc::new(move |size, batch, rounds| {
        let dir = dir.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || redb_loop(&dir, size, batch, rounds))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        })
    })
}

const ENGINE_JOURNAL: redb::TableDefinition<(&str, u64), &[u8]> =
    redb::TableDefinition::new("journal");
const ENGINE_HIGHEST: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("highest");

fn redb_loop(dir: &Path, size: usize, batch: usize, rounds: usize) -> Result<f64, redb::Error> {
    let path = dir.join(format!("engine-baseline-{}.redb", std::process::id()));
    let measured = redb_rounds(&path, size, batch, rounds);
    // Removed whether or not the rounds went through: the directory may be the user's store.
    let removed = std::fs::remove_file(&path);
    let ops = measured?;
    removed?;
    Ok(ops)
}

fn redb_rounds(path: &Path, size: usize, batch: usize, rounds: usize) -> Result<f64, redb::Error> {
    let db = redb::Database::create(path)?;
    let record = vec![b'x'; size.max(1)];
    let actors: Vec<String> = (0..batch.max(1))
        .map(|i| format!("bench/engine-{i}"))
        .collect();
    let start = Instant::now();
    for _ in 0..rounds {
        let mut txn = db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        {
            let mut journal = txn.open_table(ENGINE_JOURNAL)?;
            let mut highest = txn.open_table(ENGINE_HIGHEST)?;
            for a in &actors {
                let h = highest.get(a.as_str())?.map(|v| v.value()).unwrap_or(0);
                journal.insert((a.as_str(), h + 1), record.as_slice())?;
                highest.insert(a.as_str(), h + 1)?;
            }
        }
        txn.commit()?;
    }
    Ok((rounds * batch.max(1)) as f64 / start.elapsed().as_secs_f64())
}
