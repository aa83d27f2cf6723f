//! `loom-dev bench`: the benchmark scenarios, each against its same-run baseline.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use loom_bench::bank::Bank;
use loom_bench::baseline::{Baseline, Baselines, fsync};
use loom_bench::report::{
    Measurement, peak_rss_mb, percentile_ms, summaries, summary_table, table,
};
use loom_bench::scenarios::{self, Counter, Length, Stats};
use loom_core::runtime::Runtime;
use loom_core::{ActorId, SeqRange};
use serde_json::json;

use crate::output::{Failure, out};
use crate::store::{Namespace, Opened, StoreUrl, open_or_create};

/// Which scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// One actor, awaited appends one after another.
    AppendSeq,
    /// Many actors appending at once.
    AppendConcurrent,
    /// Activation time of an actor with a long history, with and without compaction.
    Recover,
    /// The bank workload, at full speed and at half of it.
    Bank,
    /// Every scenario above.
    All,
    /// Many actors in one long durable sleep each, woken over a window (`--actors`, default
    /// 100 000; `--window`, default 60 s): memory and store bytes per sleeper while they wait
    /// (suspended) and how late they wake, against the same sleepers held in memory (at most
    /// 5 000). Not part of `all`: it takes the window and more.
    Sleepers,
    /// What compressed frames save and cost on an actor with ~64 KiB of state: the codec's
    /// encode/decode time and bytes, compressed against plain JSON, and messages per second
    /// and bytes kept on the store (each part `--seconds`; not part of `all`).
    Compression,
    /// The engine bake-off: one partitioned bank turn's writes straight on redb with a redo log
    /// and on fjall, per partition count, against raw fdatasync (not part of `all`: it measures
    /// engines, not the store under test).
    Engines,
}

/// Settings from the command line.
pub struct Settings {
    pub store: Option<String>,
    pub actors: Option<usize>,
    pub entries: Option<u64>,
    pub payload: usize,
    pub json: bool,
    /// Measured time of the append scenarios when no count is given, and of each engine run.
    pub seconds: f64,
    /// Runs of the whole selection; with more than one, a min/median/max table follows.
    pub repeat: usize,
    /// Partition counts of the engine bake-off.
    pub partitions: Option<Vec<usize>>,
    /// The window of the sleepers' wake-ups, in seconds.
    pub window: f64,
    /// Seconds between the first sleeper's message and the window's start (default: 5, or
    /// half a millisecond per sleeper when more).
    pub lead: Option<f64>,
    /// Node process counts of the bank on a Redis or PostgreSQL store.
    pub nodes: Option<Vec<usize>>,
    /// The bank's second run at this many invocations/s instead of half its peak.
    pub rate: Option<f64>,
}

/// The baseline for a store: fdatasync on the same disk, or pipelined XADD on the same server.
fn baseline_for(url: &StoreUrl, scratch: &std::path::Path) -> Baseline {
    match url {
        StoreUrl::Embedded(dir, ..) => fsync(dir.clone()),
        StoreUrl::Memory => fsync(scratch.to_path_buf()),
        StoreUrl::Redis { url, prefix } => {
            // Parsed when the URL was: it is valid here.
            let url = loom_cli::store::url_partitions(url).map_or_else(|_| url.clone(), |(u, _)| u);
            xadd(url, format!("{prefix}:baseline"))
        }
        StoreUrl::Postgres { url, schema } => {
            // As for Redis.
            let url = loom_cli::store::url_partitions(url).map_or_else(|_| url.clone(), |(u, _)| u);
            insert(url, schema.clone())
        }
    }
}

/// Raw multi-row `INSERT`s of the same payload into a plain table in the store's schema on the
/// same server, one committed transaction (one WAL flush) per batch of `batch` rows.
fn insert(url: String, schema: String) -> Baseline {
    Arc::new(move |size, batch, rounds| {
        let (url, schema) = (url.clone(), schema.clone());
        Box::pin(async move {
            use sqlx::{AssertSqlSafe, Connection};
            let e = |e: sqlx::Error| e.to_string();
            let mut c = sqlx::PgConnection::connect(&url).await.map_err(e)?;
            // The store made the schema before any scenario asks for its baseline.
            let table = format!("{schema}.baseline_inserts");
            let create = format!(
                "CREATE TABLE {table} (id bigserial PRIMARY KEY, actor text NOT NULL, frame bytea NOT NULL)"
            );
            sqlx::raw_sql(AssertSqlSafe(create))
                .execute(&mut c)
                .await
                .map_err(e)?;
            // The batch's payloads go over the wire as the store's would: one array of them.
            let payloads = vec![vec![b'x'; size]; batch];
            let insert = format!(
                "INSERT INTO {table} (actor, frame) SELECT 'baseline', f FROM unnest($1::bytea[]) AS f"
            );
            let start = Instant::now();
            let mut outcome = Ok(());
            for _ in 0..rounds {
                outcome = sqlx::query(AssertSqlSafe(insert.clone()))
                    .bind(&payloads)
                    .execute(&mut c)
                    .await
                    .map(|_| ());
                if outcome.is_err() {
                    break;
                }
            }
            let ops = (rounds * batch) as f64 / start.elapsed().as_secs_f64();
            let drop = format!("DROP TABLE {table}");
            sqlx::raw_sql(AssertSqlSafe(drop))
                .execute(&mut c)
                .await
                .map_err(e)?;
            outcome.map_err(e)?;
            Ok(ops)
        })
    })
}

/// Raw pipelined `XADD`s of the same payload on the same server: `batch` per round trip.
fn xadd(url: String, key: String) -> Baseline {
    Arc::new(move |size, batch, rounds| {
        let (url, key) = (url.clone(), key.clone());
        Box::pin(async move {
            // On a cluster: one key, so one primary's work (the pipeline goes to its slot's).
            if let Some(nodes) = loom_cli::store::redis_cluster_nodes(&url) {
                let c = redis::cluster::ClusterClient::new(nodes)
                    .map_err(|e| e.to_string())?
                    .get_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                return xadds(c, &key, size, batch, rounds).await;
            }
            let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
            let c = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            xadds(c, &key, size, batch, rounds).await
        })
    })
}

/// `rounds` pipelines of `batch` `XADD`s of `size` bytes to `key`; appends per second.
async fn xadds(
    mut c: impl redis::aio::ConnectionLike,
    key: &str,
    size: usize,
    batch: usize,
    rounds: usize,
) -> Result<f64, String> {
    let payload = vec![b'x'; size];
    let start = Instant::now();
    for _ in 0..rounds {
        let mut p = redis::pipe();
        for _ in 0..batch {
            p.cmd("XADD")
                .arg(key)
                .arg("*")
                .arg("e")
                .arg(&payload)
                .ignore();
        }
        let () = p.query_async(&mut c).await.map_err(|e| e.to_string())?;
    }
    let ops = (rounds * batch) as f64 / start.elapsed().as_secs_f64();
    let () = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut c)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ops)
}

pub async fn run(scenario: Scenario, s: Settings) -> Result<(), Failure> {
    // Without --store, a fresh directory that is removed afterwards.
    let tmp = tempfile::tempdir()?;
    // On Redis and PostgreSQL, a prefix or schema of its own, deleted afterwards: the benchmark
    // touches nothing else.
    let namespace = format!("loombench{:08x}", fastrand::u32(..));
    let url = match &s.store {
        Some(u) => StoreUrl::parse(u, &Namespace::both(&namespace))?,
        None => StoreUrl::Embedded(tmp.path().join("store"), None),
    };
    if let Some(counts) = &s.nodes {
        if scenario != Scenario::Bank {
            return Err(Failure("--nodes is for the bank scenario".into()));
        }
        if !matches!(url, StoreUrl::Redis { .. } | StoreUrl::Postgres { .. }) {
            return Err(Failure(
                "--nodes needs a store that several processes share: --store redis://… or postgres://…"
                    .into(),
            ));
        }
        if s.partitions.is_some() {
            return Err(Failure(
                "--nodes and --partitions do not go together: --partitions makes fresh embedded stores".into(),
            ));
        }
        if counts.is_empty() || counts.iter().any(|&n| n == 0 || n > 16) {
            return Err(Failure("--nodes takes counts from 1 to 16".into()));
        }
    }
    if let Some(rate) = s.rate {
        if !matches!(scenario, Scenario::Bank | Scenario::All) || s.nodes.is_some() {
            return Err(Failure(
                "--rate paces the bank's second run: for the bank scenario, without --nodes".into(),
            ));
        }
        if !(rate.is_finite() && rate > 0.0) {
            return Err(Failure(
                "--rate takes invocations per second above 0".into(),
            ));
        }
    }
    if let StoreUrl::Embedded(dir, ..) = &url {
        std::fs::create_dir_all(dir)?;
    }
    let label = url.label();
    let baseline = baseline_for(&url, tmp.path());
    let baselines = Baselines {
        raw: baseline.clone(),
        // The embedded store's engine, doing the same writes without Loom: how much of the gap
        // to the raw file is Loom's.
        engine: match &url {
            StoreUrl::Embedded(dir, ..) => Some(loom_bench::baseline::redb_engine(dir.clone())),
            _ => None,
        },
    };
    let all = scenario == Scenario::All;
    if s.repeat == 0 || !s.seconds.is_finite() || s.seconds <= 0.0 || s.seconds > 86_400.0 {
        return Err(Failure(
            "--repeat must be above 0 and --seconds from above 0 to 86400".into(),
        ));
    }
    let seconds = Duration::from_secs_f64(s.seconds);
    if s.partitions.iter().flatten().any(|&p| p == 0 || p > 64) {
        return Err(Failure("--partitions takes counts from 1 to 64".into()));
    }
    let mut results = Vec::new();
    let outcome = async {
        for _ in 0..s.repeat {
            if all || scenario == Scenario::AppendSeq {
                let opened = open_or_create(&url).await?;
                let length = s
                    .entries
                    .map_or(Length::Time(seconds), |n| Length::Count(n as usize));
                results.push(
                    scenarios::append_seq(
                        opened.store.clone(),
                        &label,
                        &baselines,
                        length,
                        s.payload,
                    )
                    .await?,
                );
            }
            if all || scenario == Scenario::AppendConcurrent {
                let opened = open_or_create(&url).await?;
                let actors = s.actors.unwrap_or(1000);
                let length = s
                    .entries
                    .map_or(Length::Time(seconds), |n| Length::Count(n as usize));
                results.push(
                    scenarios::append_concurrent(
                        opened.store.clone(),
                        &label,
                        &baselines,
                        actors,
                        length,
                        s.payload,
                        stats(&opened),
                    )
                    .await?,
                );
            }
            if all || scenario == Scenario::Recover {
                results.extend(recover(&url, &label, s.entries.unwrap_or(1_000_000)).await?);
            }
            // `bank --partitions 1,2` on an embedded store: a fresh store per count.
            let bank_stores: Vec<(StoreUrl, String)> = match (&url, &s.partitions) {
                (StoreUrl::Embedded(dir, _), Some(counts)) => counts
                    .iter()
                    .map(|&p| {
                        let at = dir.join(format!("bank-p{p}-{}", fastrand::u32(..)));
                        let u = StoreUrl::Embedded(at, Some(p as u32));
                        (u, format!("{label} P={p}"))
                    })
                    .collect(),
                _ => vec![(url.clone(), label.clone())],
            };
            if let (Some(counts), Some(store)) = (&s.nodes, &s.store) {
                results.extend(
                    crate::nodes::bench_bank(
                        store,
                        &namespace,
                        &label,
                        counts,
                        bank_shape(&s),
                        &baseline,
                    )
                    .await?,
                );
                continue;
            }
            for (url, label) in bank_stores
                .iter()
                .filter(|_| all || scenario == Scenario::Bank)
            {
                let opened = open_or_create(url).await?;
                let label = match &opened.embedded {
                    Some(e) if !label.contains("P=") => format!("{label} P={}", e.partitions()),
                    _ => label.clone(),
                };
                let cfg = bank_shape(&s);
                let rt = Bank::register(Runtime::builder().store(opened.store.clone()))
                    .configure(|c| c.ask_timeout = Duration::from_secs(600))
                    .start()
                    .await?;
                let mut runs =
                    scenarios::bank(&rt, &label, &baseline, cfg, stats(&opened), s.rate).await?;
                // With --partitions, each count is its own scenario in the summary.
                if s.partitions.is_some()
                    && let Some(e) = &opened.embedded
                {
                    for m in &mut runs {
                        m.scenario = format!("{} P={}", m.scenario, e.partitions());
                    }
                }
                results.extend(runs);
                rt.shutdown().await;
            }
            if scenario == Scenario::Sleepers {
                results.extend(
                    sleepers(&url, &label, s.actors.unwrap_or(100_000), s.window, s.lead).await?,
                );
            }
            if scenario == Scenario::Compression {
                use loom_bench::compression::{Shape, codec_costs, ledger};
                let shape = Shape {
                    orders: 500,
                    seconds: s.seconds,
                };
                let codec_label = label.clone();
                let codec = tokio::task::spawn_blocking(move || codec_costs(&codec_label, shape))
                    .await
                    .map_err(|e| Failure(format!("the codec measurement stopped: {e}")))?
                    .map_err(|e| Failure(e.to_string()))?;
                results.push(codec);
                let opened = open_or_create(&url).await?;
                results.push(
                    ledger(opened.store.clone(), &label, shape)
                        .await
                        .map_err(|e| Failure(e.to_string()))?,
                );
            }
            if scenario == Scenario::Engines {
                // On the store's disk when it has one, else in the scratch directory.
                let dir = match &url {
                    StoreUrl::Embedded(dir, ..) => dir.clone(),
                    _ => tmp.path().to_path_buf(),
                };
                let partitions = s.partitions.clone().unwrap_or_else(|| vec![1, 2]);
                let ms = tokio::task::spawn_blocking(move || {
                    loom_bench::engines::bakeoff(&dir, &partitions, seconds)
                })
                .await
                .map_err(|e| Failure(format!("the bake-off stopped: {e}")))?
                .map_err(|e| Failure(e.to_string()))?;
                results.extend(ms);
            }
        }
        Ok::<_, Failure>(())
    }
    .await;
    if matches!(url, StoreUrl::Redis { .. } | StoreUrl::Postgres { .. }) {
        open_or_create(&url).await?.destroy_namespace().await?;
    }
    outcome?;
    let summary = (s.repeat > 1).then(|| summaries(&results));
    if s.json {
        for m in &results {
            out(serde_json::to_string(m)?)?;
        }
        for m in summary.iter().flatten() {
            out(serde_json::to_string(m)?)?;
        }
    } else {
        out(table(&results).trim_end())?;
        if let Some(summary) = summary {
            out("")?;
            out(summary_table(&summary).trim_end())?;
        }
    }
    Ok(())
}

/// The bank of a run: `--actors` accounts (default 100), `--entries` transfers (default
/// 10 000), 512 in flight, a fresh seed, and fresh transfer and account numbers, so that a
/// repeat on the same store does not find the balances of the run before (its verification
/// counts from zero).
fn bank_shape(s: &Settings) -> Bank {
    Bank {
        accounts: s.actors.unwrap_or(100) as u32,
        transfers: s.entries.unwrap_or(10_000) as u32,
        concurrency: 512,
        seed: u64::from(fastrand::u32(..)),
        first: fastrand::u32(..1_000_000) * 1000,
        first_account: fastrand::u32(..1_000_000) * 1000,
        ..Bank::default()
    }
}

/// The sleepers scenario: the baseline held in memory (at most 5 000 of them), then suspended,
/// each on a fresh store where the store is a directory.
async fn sleepers(
    url: &StoreUrl,
    label: &str,
    actors: usize,
    window: f64,
    lead: Option<f64>,
) -> Result<Vec<Measurement>, Failure> {
    use loom_bench::sleepers::{Sleepers, run};
    if actors == 0 || !window.is_finite() || window <= 0.0 || window > 86_400.0 {
        return Err(Failure(
            "sleepers needs --actors above 0 and --window from above 0 to 86400".into(),
        ));
    }
    if lead.is_some_and(|l| !l.is_finite() || !(1.0..=3_600.0).contains(&l)) {
        return Err(Failure(
            "sleepers needs --lead from 1 to 3600 seconds".into(),
        ));
    }
    let mut out = Vec::new();
    // The baseline first: run second, it would reuse the memory the first run freed.
    for (suspend, n) in [(false, actors.min(5_000)), (true, actors)] {
        let url = match url {
            StoreUrl::Embedded(dir, p) => {
                StoreUrl::Embedded(dir.join(format!("sleepers-{}", fastrand::u32(..))), *p)
            }
            other => other.clone(),
        };
        let opened = open_or_create(&url).await?;
        let dir = match &url {
            StoreUrl::Embedded(dir, ..) => Some(dir.clone()),
            _ => None,
        };
        let shape = Sleepers {
            actors: n,
            window: Duration::from_secs_f64(window),
            // Time to send every message and put every sleeper to sleep before the first
            // wakes (setting one up takes a few store writes).
            lead: lead.map_or_else(
                || Duration::from_secs(5).max(Duration::from_millis(n as u64 / 2)),
                Duration::from_secs_f64,
            ),
            suspend,
        };
        let m = run(opened.store.clone(), label, shape, || {
            dir.as_deref().map(dir_bytes)
        })
        .await
        .map_err(|e| Failure(e.to_string()))?;
        out.push(m);
    }
    Ok(out)
}

/// Bytes of the files under `dir` (0 for what cannot be read).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn stats(opened: &Opened) -> Stats {
    let e = opened.embedded.clone()?;
    Some(Arc::new(move || {
        let s = e.writer_stats();
        (s.commits, s.requests)
    }))
}

/// What a `bench-child` run reports.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ChildReport {
    pub latencies_ms: Vec<f64>,
    pub first_ask_ms: Vec<f64>,
    pub peak_rss_mb: f64,
    pub read_entries_per_s: f64,
    pub entries: u64,
}

async fn recover(url: &StoreUrl, label: &str, entries: u64) -> Result<Vec<Measurement>, Failure> {
    if *url == StoreUrl::Memory {
        return Err(Failure(
            "recover measures a store opened again by another process; memory: cannot be".into(),
        ));
    }
    let tag = fastrand::u32(..);
    let (plain, compacted) = (
        format!("plain-{entries}-{tag:x}"),
        format!("compacted-{entries}-{tag:x}"),
    );
    {
        let opened = open_or_create(url).await?;
        let bar = ProgressBar::new(2 * entries);
        bar.set_style(
            ProgressStyle::with_template("building history [{bar:40}] {pos}/{len} entries")?
                .progress_chars("=> "),
        );
        let chunk = 100_000;
        for key in [&plain, &compacted] {
            let mut left = entries;
            while left > 0 {
                let n = left.min(chunk);
                scenarios::build_history(&*opened.store, key, n).await?;
                left -= n;
                bar.inc(n);
            }
        }
        bar.finish_and_clear();
        // As compaction would leave it: a snapshot, then a tail of fewer than 100 entries.
        scenarios::compact(&*opened.store, &compacted).await?;
        scenarios::build_history(&*opened.store, &compacted, 60).await?;
    }
    let child = |key: &str, times: usize| -> Result<ChildReport, Failure> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("bench-child");
        match url {
            StoreUrl::Embedded(dir, ..) => cmd.arg("--store").arg(dir),
            StoreUrl::Redis { url, prefix } => cmd
                .arg("--store")
                .arg(url)
                .arg("--redis-prefix")
                .arg(prefix),
            StoreUrl::Postgres { url, schema } => {
                cmd.arg("--store").arg(url).arg("--pg-schema").arg(schema)
            }
            StoreUrl::Memory => unreachable!("refused above"),
        };
        let output = cmd
            .args(["--key", key, "--times", &times.to_string()])
            .output()?;
        if !output.status.success() {
            return Err(Failure(format!(
                "recover child failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    };
    let cold = child(&plain, 3)?;
    let warm = child(&compacted, 200)?;
    let ms = |v: &[f64]| -> Vec<Duration> {
        v.iter()
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
            .collect()
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let replay_rate = cold.entries as f64 / (mean(&cold.latencies_ms) / 1000.0);
    let mut without = Measurement::new(
        "recover-no-compaction",
        label,
        replay_rate,
        cold.read_entries_per_s,
        &mut ms(&cold.latencies_ms),
    )
    .with("unit", "entries replayed")
    .with("latency_of", "activation: lease, whole journal streamed")
    .with("history_entries", cold.entries)
    .with("activations", cold.latencies_ms.len())
    .with(
        "baseline_is",
        "the store streaming and decoding the same entries, without the runtime",
    );
    without.peak_rss_mb = cold.peak_rss_mb;
    let mut first = ms(&warm.first_ask_ms);
    first.sort();
    let mut with = Measurement::new(
        "recover",
        label,
        1000.0 / mean(&warm.latencies_ms),
        0.0,
        &mut ms(&warm.latencies_ms),
    )
    .with("unit", "activations")
    .with(
        "latency_of",
        "activation: lease, newest snapshot, journal tail",
    )
    .with("first_ask_p50_ms", percentile_ms(&first, 0.5))
    .with("first_ask_p99_ms", percentile_ms(&first, 0.99))
    .with("history_entries", entries + 60)
    .with("kept_entries", warm.entries)
    .with("activations", warm.latencies_ms.len());
    with.peak_rss_mb = warm.peak_rss_mb;
    Ok(vec![with, without])
}

/// `loom-dev bench-child`: activates one counter `times` times in this fresh process and reports.
pub async fn child(url: &StoreUrl, key: &str, times: usize) -> Result<(), Failure> {
    let opened = open_or_create(url).await?;
    let latencies = scenarios::activations(opened.store.clone(), key, times).await?;
    let id = ActorId::new(<Counter as loom_core::Actor>::KIND, key)?;
    let info = opened.store.info(&id).await?;
    let start = Instant::now();
    let mut n = 0u64;
    let mut entries = opened.store.read(&id, SeqRange::all());
    while entries.try_next().await?.is_some() {
        n += 1;
    }
    let report = ChildReport {
        latencies_ms: latencies
            .iter()
            .map(|a| a.activation.as_secs_f64() * 1000.0)
            .collect(),
        first_ask_ms: latencies
            .iter()
            .map(|a| a.first_ask.as_secs_f64() * 1000.0)
            .collect(),
        peak_rss_mb: peak_rss_mb(),
        read_entries_per_s: n as f64 / start.elapsed().as_secs_f64(),
        entries: info.len(),
    };
    out(json!(report))
}
