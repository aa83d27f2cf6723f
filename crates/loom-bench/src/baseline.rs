//! The physical limit scenarios are compared with: writing and `fdatasync`-ing a plain file on
//! the same disk, with the same record size and batching as the store under test.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

/// A same-run baseline: given a record size, a batch size and a number of rounds, the physical
/// limit's records per second for the store under test.
pub type Baseline =
    Arc<dyn Fn(usize, usize, usize) -> BoxFuture<'static, Result<f64, String>> + Send + Sync>;

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
