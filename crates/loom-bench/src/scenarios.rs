//! The benchmark scenarios. Each returns [`Measurement`]s with its same-run baseline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use loom_core::codec;
use loom_core::runtime::{Actor, Compaction, Context, Rejected, Runtime, compact_journal};
use loom_core::{ActorId, Entry, EntryKind, MessageId, Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::bank::{Bank, BankError};
use crate::baseline::{Baseline, Baselines};
use crate::report::{Measurement, busiest_thread, process_cpu, thread_cpu};

/// Why a scenario failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The baseline could not run.
    #[error("baseline: {0}")]
    Io(#[from] std::io::Error),
    /// The bank workload failed.
    #[error(transparent)]
    Bank(#[from] BankError),
    /// Something else.
    #[error("{0}")]
    Other(String),
}

/// Group-commit counters of the store under test, if it has them: `(commits, requests)`.
pub type Stats = Option<Arc<dyn Fn() -> (u64, u64) + Send + Sync>>;

fn entry(seq: u64, payload: usize) -> Entry {
    Entry::new(
        seq,
        EntryKind::Completed {
            reply: Value::String("p".repeat(payload)),
        },
    )
}

fn bench_actor(scenario: &str, n: usize) -> ActorId {
    ActorId::new("bench", format!("{scenario}-{n}-{:08x}", fastrand::u32(..)))
        .expect("bench ids are valid")
}

/// How long a scenario runs: a number of operations, or until a measured time has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// This many operations (per actor, where there are several).
    Count(usize),
    /// Until this much time has passed (each actor finishes the operation it is in).
    Time(Duration),
}

impl Length {
    /// Whether operation `done + 1`, started at `now`, is still part of the run.
    fn goes_on(self, done: usize, start: Instant) -> bool {
        match self {
            Length::Count(n) => done < n,
            Length::Time(t) => start.elapsed() < t,
        }
    }
}

/// `append-seq`: one actor, awaited appends one after another for `length`, against a raw
/// write + fdatasync per record on a file in `dir` (and, with `baselines.engine`, against the
/// storage engine doing the same writes, see [`crate::baseline::redb_engine`]).
pub async fn append_seq(
    store: Arc<dyn Store>,
    label: &str,
    baselines: &Baselines,
    length: Length,
    payload: usize,
) -> Result<Measurement, BenchError> {
    let id = bench_actor("seq", 0);
    let mut latencies = Vec::new();
    let start = Instant::now();
    while length.goes_on(latencies.len(), start) {
        let seq = latencies.len() as u64 + 1;
        let t = Instant::now();
        store.append(&id, seq, &[entry(seq, payload)]).await?;
        latencies.push(t.elapsed());
    }
    let n = latencies.len();
    let seconds = start.elapsed().as_secs_f64();
    let ops = n as f64 / seconds;
    let size = codec::encode_entry(&entry(1, payload))
        .map_err(|e| BenchError::Other(e.to_string()))?
        .len();
    let rounds = n.min(2000);
    let baseline = (baselines.raw)(size, 1, rounds)
        .await
        .map_err(BenchError::Other)?;
    let m = Measurement::new("append-seq", label, ops, baseline, &mut latencies)
        .with("unit", "appends")
        .with("appends", n)
        .with("seconds", seconds)
        .with("entry_bytes", size);
    with_engine(m, baselines.engine.as_ref(), ops, size, 1, rounds).await
}

/// Adds the engine baseline, when there is one, as `engine_baseline_ops_per_s` and
/// `engine_ratio`.
async fn with_engine(
    m: Measurement,
    engine: Option<&Baseline>,
    ops: f64,
    size: usize,
    batch: usize,
    rounds: usize,
) -> Result<Measurement, BenchError> {
    let Some(engine) = engine else {
        return Ok(m);
    };
    let e = engine(size, batch, rounds)
        .await
        .map_err(BenchError::Other)?;
    Ok(m.with("engine_baseline_ops_per_s", e)
        .with("engine_ratio", ops / e)
        .with(
            "engine_baseline_is",
            "the same reads and writes straight on a redb file, one Immediate commit per batch",
        ))
}

/// `append-concurrent`: `actors` actors each appending entries one after another for `length`,
/// all at once; against the raw fsync loop with the same batch size the store achieved (its
/// average group-commit batch), or one record per fsync when the store does not say.
pub async fn append_concurrent(
    store: Arc<dyn Store>,
    label: &str,
    baselines: &Baselines,
    actors: usize,
    length: Length,
    payload: usize,
    stats: Stats,
) -> Result<Measurement, BenchError> {
    let before = stats.as_ref().map(|s| s());
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(actors);
    for n in 0..actors {
        let store = store.clone();
        let id = bench_actor("conc", n);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while length.goes_on(latencies.len(), start) {
                let seq = latencies.len() as u64 + 1;
                let t = Instant::now();
                store.append(&id, seq, &[entry(seq, payload)]).await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, StoreError>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.map_err(|e| BenchError::Other(e.to_string()))??);
    }
    let total = latencies.len();
    let seconds = start.elapsed().as_secs_f64();
    let ops = total as f64 / seconds;
    let batch = match (before, stats.as_ref().map(|s| s())) {
        (Some((c0, r0)), Some((c1, r1))) if c1 > c0 => {
            ((r1 - r0) as f64 / (c1 - c0) as f64).round().max(1.0) as usize
        }
        // A store that does not say: as many records per round trip as requests in flight.
        _ => actors,
    };
    let size = codec::encode_entry(&entry(1, payload))
        .map_err(|e| BenchError::Other(e.to_string()))?
        .len();
    let rounds = (total / batch).clamp(50, 2000);
    let baseline = (baselines.raw)(size, batch, rounds)
        .await
        .map_err(BenchError::Other)?;
    let m = Measurement::new("append-concurrent", label, ops, baseline, &mut latencies)
        .with("unit", "appends")
        .with("actors", actors)
        .with("appends", total)
        .with("seconds", seconds)
        .with("entry_bytes", size)
        .with("avg_batch", batch);
    with_engine(m, baselines.engine.as_ref(), ops, size, batch, rounds).await
}

/// The actor of the `recover` scenario: a counter.
#[derive(Default)]
pub struct Counter;

/// Counter messages.
#[derive(Debug, Serialize, Deserialize)]
pub enum CounterMsg {
    /// Add.
    Add(u64),
    /// Read.
    Get,
}

impl Actor for Counter {
    const KIND: &'static str = "counter";
    type State = u64;
    type Message = CounterMsg;
    type Reply = u64;

    async fn handle(
        &self,
        n: &mut u64,
        _ctx: &mut Context<'_>,
        msg: CounterMsg,
    ) -> Result<u64, Rejected> {
        if let CounterMsg::Add(k) = msg {
            *n += k;
        }
        Ok(*n)
    }
}

/// Writes a history of about `entries` entries for counter `key`, shaped as the runtime writes it
/// (`Invoked`, `StatePatched`, `Completed` per message), in large batches; returns the count.
pub async fn build_history(store: &dyn Store, key: &str, entries: u64) -> Result<u64, BenchError> {
    let id = ActorId::new(Counter::KIND, key).map_err(|e| BenchError::Other(e.to_string()))?;
    let invocations = (entries / 3).max(1);
    let mut seq = store.highest_seq(&id).await? + 1;
    let mut batch = Vec::with_capacity(3000);
    for i in 1..=invocations {
        let patch = if i == 1 {
            json!([{ "op": "replace", "path": "", "value": 1 }])
        } else {
            json!([{ "op": "replace", "path": "", "value": i }])
        };
        let patch = serde_json::from_value(patch).map_err(|e| BenchError::Other(e.to_string()))?;
        for kind in [
            EntryKind::Invoked {
                message_id: MessageId::new(),
                payload: json!({ "Add": 1 }),
                idempotency_key: None,
                requeued_from: None,
            },
            EntryKind::StatePatched { patch },
            EntryKind::Completed { reply: json!(i) },
        ] {
            batch.push(Entry::new(seq + batch.len() as u64, kind));
        }
        if batch.len() >= 3000 || i == invocations {
            store.append(&id, seq, &batch).await?;
            seq += batch.len() as u64;
            batch.clear();
        }
    }
    Ok(invocations * 3)
}

/// One activation: how long the actor took to become ready (lease, snapshot, tail), and how long
/// the first request to it took end to end (enqueue, activation, invocation, reply).
#[derive(Debug, Clone, Copy)]
pub struct Activation {
    /// Lease + snapshot + tail.
    pub activation: Duration,
    /// The first `ask`, end to end.
    pub first_ask: Duration,
}

/// Activates counter `key` `times` times, each on a fresh runtime (so each is a full recovery:
/// lease, snapshot, tail).
pub async fn activations(
    store: Arc<dyn Store>,
    key: &str,
    times: usize,
) -> Result<Vec<Activation>, BenchError> {
    let mut out = Vec::with_capacity(times);
    for _ in 0..times {
        let rt = Runtime::builder()
            .store(store.clone())
            .register::<Counter>()
            .configure(|c| {
                c.compaction = Compaction::DISABLED;
                c.ask_timeout = Duration::from_secs(600);
            })
            .start()
            .await
            .map_err(|e| BenchError::Other(e.to_string()))?;
        let t = Instant::now();
        rt.actor::<Counter>(key)
            .map_err(|e| BenchError::Other(e.to_string()))?
            .ask(CounterMsg::Get)
            .await
            .map_err(|e| BenchError::Other(e.to_string()))?;
        let first_ask = t.elapsed();
        out.push(Activation {
            activation: Duration::from_micros(rt.metrics().activation_micros),
            first_ask,
        });
        rt.shutdown().await;
    }
    Ok(out)
}

/// Compacts counter `key`'s journal as the runtime's compaction would, leaving a short tail.
pub async fn compact(store: &dyn Store, key: &str) -> Result<(), BenchError> {
    let id = ActorId::new(Counter::KIND, key).map_err(|e| BenchError::Other(e.to_string()))?;
    compact_journal(store, &id, 2)
        .await
        .map_err(|e| BenchError::Other(e.to_string()))?;
    Ok(())
}

/// `bank`: the bank workload at full speed (throughput), then again at half that rate, or at
/// `paced` invocations/s if given (latency: at one rate, builds of different peaks compare),
/// against the raw fsync loop's records per second with the store's batching.
pub async fn bank(
    rt: &Runtime,
    label: &str,
    baseline: &Baseline,
    cfg: Bank,
    stats: Stats,
    paced: Option<f64>,
) -> Result<Vec<Measurement>, BenchError> {
    if let Some(r) = paced
        && !(r.is_finite() && r > 0.0)
    {
        return Err(BenchError::Other(format!(
            "a paced rate must be above 0 invocations/s, not {r}"
        )));
    }
    cfg.open_accounts(rt).await?;
    let before = rt.metrics();
    let gc0 = stats.as_ref().map(|s| s());
    let (cpu0, threads0) = (process_cpu(), thread_cpu());
    let start = Instant::now();
    let mut latencies = cfg.start_all(rt, || {}).await?;
    let statuses = cfg.settle(rt, Duration::from_secs(1200), |_| {}).await?;
    let wall = start.elapsed();
    let elapsed = wall.as_secs_f64();
    let (cpu, busiest) = (
        process_cpu().saturating_sub(cpu0),
        busiest_thread(&threads0, &thread_cpu(), wall),
    );
    let after = rt.metrics();
    let verified = cfg.verify(rt, &statuses).await?;
    let invocations = (after.invocations - before.invocations) as f64;
    let peak = invocations / elapsed;
    let gc1 = stats.as_ref().map(|s| s());
    let batch = match (gc0, gc1) {
        (Some((c0, r0)), Some((c1, r1))) if c1 > c0 => {
            ((r1 - r0) as f64 / (c1 - c0) as f64).round().max(1.0) as usize
        }
        // A store that does not say: as many records per round trip as requests in flight.
        _ => cfg.concurrency,
    };
    let writes_per_invocation = match (gc0, gc1) {
        (Some((_, r0)), Some((_, r1))) if invocations > 0.0 => (r1 - r0) as f64 / invocations,
        _ => 0.0,
    };
    let baseline = baseline(512, batch, 500).await.map_err(BenchError::Other)?;
    let full = Measurement::new("bank", label, peak, baseline, &mut latencies)
        .with("unit", "invocations")
        .with("transfers", cfg.transfers)
        .with("accounts", cfg.accounts)
        .with("done", verified.done)
        .with("refused", verified.refused)
        .with(
            "latency_of",
            "a transfer's first durable turn, at full load",
        )
        .with("avg_batch", batch)
        .with(
            "store_writes_per_invocation",
            (writes_per_invocation * 100.0).round() / 100.0,
        )
        .with(
            "cpu_ms_per_1000_invocations",
            (cpu.as_secs_f64() * 1000.0 / (invocations / 1000.0).max(1e-9) * 10.0).round() / 10.0,
        )
        .with(
            "busiest_thread",
            busiest.as_ref().map_or(String::new(), |(n, _)| n.clone()),
        )
        .with(
            "busiest_thread_utilization",
            busiest.map_or(0.0, |(_, u)| (u * 100.0).round() / 100.0),
        );

    // Half of the peak rate (or the rate asked for): transfers submitted on a fixed schedule.
    let per_transfer = invocations / f64::from(cfg.transfers);
    // Half the peak is kept to at least one transfer a second; a rate asked for is kept as asked.
    let rate = match paced {
        Some(r) => r / per_transfer,
        None => (peak / 2.0 / per_transfer).max(1.0),
    };
    let half = Bank {
        first: cfg.first + cfg.transfers,
        first_account: cfg.first_account + cfg.accounts,
        ..cfg
    };
    half.open_accounts(rt).await?;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let before = rt.metrics().invocations;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(half.transfers as usize);
    for (k, i) in half.ids().enumerate() {
        let due = start + interval.mul_f64(k as f64);
        tokio::time::sleep_until(due.into()).await;
        let rt = rt.clone();
        tasks.push(tokio::spawn(async move { half.start(&rt, i).await }));
    }
    let mut half_latencies = Vec::with_capacity(tasks.len());
    for t in tasks {
        half_latencies.push(t.await.map_err(|e| BenchError::Other(e.to_string()))??);
    }
    let statuses = half.settle(rt, Duration::from_secs(1200), |_| {}).await?;
    // What the paced part made, over its submissions and the settling after them.
    let achieved = (rt.metrics().invocations - before) as f64 / start.elapsed().as_secs_f64();
    half.verify(rt, &statuses).await?;
    let at_half = Measurement::new(
        if paced.is_some() {
            "bank-paced"
        } else {
            "bank-half-rate"
        },
        label,
        rate * per_transfer,
        baseline,
        &mut half_latencies,
    )
    .with("unit", "invocations")
    .with("transfers", half.transfers)
    .with("achieved_invocations_per_s", achieved.round())
    .with(
        "latency_of",
        if paced.is_some() {
            "a transfer's first durable turn, at the rate asked for (--rate)"
        } else {
            "a transfer's first durable turn, at half the peak rate"
        },
    );
    Ok(vec![full, at_half])
}
