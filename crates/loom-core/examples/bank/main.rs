//! The bank: accounts and transfers on the embedded store, verified at the end.
//!
//! ```text
//! cargo run --release -p loom-core --example bank -- --accounts 100 --transfers 10000 --data ./loom-data
//! ```
//!
//! Each transfer is an actor: a fraud check (an activity, journaled once), a debit message to the
//! source account, a credit message to the target (the actors are in `actors.rs`, beside this
//! file; `loom-bench` drives them for the run and the check). Kill
//! it at any moment (Ctrl-C, `kill -9`) and start it again with the same `--data`: accounts and
//! transfers are submitted with idempotency keys, so nothing is opened or started twice, and every
//! transfer in flight resumes where its journal says. At the end it checks that the total balance
//! is conserved and that every transfer was applied exactly once to both accounts.
//!
//! With `--listen ADDR` it also serves its actors over HTTP (`loom-http`) while it runs and,
//! once verified, until Ctrl-C, so that anything that speaks HTTP can open accounts and start
//! transfers of its own (keep to accounts other than the run's `a0`…`aN`, which the check at
//! the end of a run again counts):
//!
//! ```text
//! curl http://ADDR/actors/account/alice/ask --json '{"Open": 100}'
//! curl http://ADDR/actors/account/bob/ask --json '{"Open": 0}'
//! curl http://ADDR/actors/transfer/web-1/ask -H 'Idempotency-Key: web-1' \
//!      --json '{"Start": {"from": "alice", "to": "bob", "amount": 30}}'
//! curl http://ADDR/actors/account/bob/ask --json '"Balance"'
//! curl http://ADDR/metrics        # Prometheus: turns, commits, activations per kind
//! ```

mod actors;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use loom_bench::bank::Bank;
use loom_core::StoreError;
use loom_core::runtime::{Config, Runtime, StartError};

#[derive(Parser)]
#[command(about = "Durable bank transfers on Loom, verified")]
struct Args {
    /// Number of accounts.
    #[arg(long, default_value_t = 100)]
    accounts: u32,
    /// Number of transfers.
    #[arg(long, default_value_t = 10_000)]
    transfers: u32,
    /// Opening balance of every account.
    #[arg(long, default_value_t = 1_000)]
    initial: i64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Data directory of the embedded store.
    #[arg(long, default_value = "./loom-data")]
    data: PathBuf,
    /// Seed of the transfer plan (same seed, same transfers).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Serve the accounts and transfers over HTTP on this address (`127.0.0.1:8080`; port 0
    /// picks a free one), and keep serving after the check until Ctrl-C. With `LOOM_TOKEN`
    /// set, requests to the actors must carry it as a bearer token (`/metrics` and `/health`
    /// are open). On a loopback address Loom Studio and the admin API are served at `/` too
    /// (reads open, writes with the token).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Runtime settings from a TOML file (`lease_ttl = "15s"`, `[retry] max_attempts = 8`; see
    /// `loom_core::runtime::CONFIG_KEYS`); `LOOM_*` environment variables (`LOOM_LEASE_TTL`)
    /// override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Starts the runtime, waiting up to 10 s for a killed predecessor to finish dying (its last
/// thread may still be inside an fsync, holding the directory lock).
async fn start(data: &PathBuf, config: &Config) -> Result<Runtime, StartError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The actors of `actors.rs`; loom-bench's `Bank` drives them by kind and message (the
        // same file, so the same kinds and messages) and checks the books at the end.
        let started = Runtime::builder()
            .embedded(data)
            .register::<actors::Account>()
            .register::<actors::Transfer>()
            .config(config.clone())
            .start()
            .await;
        match started {
            Err(StartError::Store(StoreError::Locked { holder, .. }))
                if Instant::now() < deadline =>
            {
                eprintln!("waiting for {holder} to release {}", data.display());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

fn bar(len: u32, msg: &'static str) -> Result<ProgressBar, Box<dyn std::error::Error>> {
    let bar = ProgressBar::new(u64::from(len));
    bar.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")?
            .progress_chars("=> "),
    );
    bar.set_message(msg);
    Ok(bar)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

fn main() -> std::process::ExitCode {
    // Loom's warnings (a store setting that cannot keep its promises, a store failure) go to
    // stderr, `RUST_LOG=info` or `debug` shows more; with `OTEL_EXPORTER_OTLP_ENDPOINT` set,
    // its spans go to that OpenTelemetry collector. Errors as sentences, with what to do when
    // Loom knows (a full disk, say).
    loom_telemetry::main_with("bank", || run().map_err(|e| loom_core::explain(&*e)))
}

#[tokio::main]
async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.accounts < 2 {
        return Err("--accounts must be at least 2".into());
    }
    let bank = Bank {
        accounts: args.accounts,
        transfers: args.transfers,
        initial: args.initial,
        concurrency: args.concurrency,
        seed: args.seed,
        first: 0,
        first_account: 0,
    };
    // Installed before the runtime starts, so that it counts from the first turn.
    let prometheus = match args.listen {
        Some(_) => Some(loom_http::install_prometheus()?),
        None => None,
    };
    // The bank's settings, then the file's, then the environment's; the retention rule last,
    // as it depends on `reply_ttl`.
    let mut config = Config {
        ask_timeout: Duration::from_secs(120),
        ..Config::default()
    };
    if let Some(path) = &args.config {
        config.apply_file(path)?;
    }
    config.apply_env()?;
    let asked = config.retention.finished_after;
    actors::retention(&mut config);
    // Said only when a file or the environment set it: the default is raised every time.
    if config.retention.finished_after != asked
        && asked != Config::default().retention.finished_after
    {
        eprintln!(
            "note: retention.finished_after raised from {asked:?} to {:?}: a finished transfer is kept as long as its start's idempotency record (reply_ttl)",
            config.retention.finished_after
        );
    }
    let rt = start(&args.data, &config).await?;
    let server = match (args.listen, prometheus) {
        (Some(addr), Some(prometheus)) => Some(serve(&rt, addr, prometheus).await?),
        _ => None,
    };
    let started = Instant::now();
    let before = rt.metrics();
    bank.open_accounts(&rt).await?;
    let starting = bar(args.transfers, "started")?;
    let progress = starting.clone();
    let mut latencies = bank.start_all(&rt, move || progress.inc(1)).await?;
    starting.finish();
    let settling = bar(args.transfers, "settled")?;
    let statuses = bank
        .settle(&rt, Duration::from_secs(600), |n| settling.set_position(n))
        .await?;
    settling.finish();
    let elapsed = started.elapsed();
    let invocations = rt.metrics().invocations - before.invocations;
    let v = bank.verify(&rt, &statuses).await?;
    if server.is_none() {
        rt.shutdown().await;
    }
    latencies.sort();
    println!(
        "verified: {} accounts, {} transfers ({} done, {} refused); total balance {} conserved; every transfer applied exactly once",
        args.accounts, args.transfers, v.done, v.refused, v.total
    );
    println!(
        "throughput: {invocations} durable invocations in {elapsed:.2?} = {:.0} invocations/s ({:.0} transfers/s)",
        invocations as f64 / elapsed.as_secs_f64(),
        f64::from(args.transfers) / elapsed.as_secs_f64()
    );
    println!(
        "latency of a transfer's first durable turn: p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    if let Some(server) = server {
        // Listening for Ctrl-C from before the line that says so, so that a Ctrl-C right after
        // it stops the bank cleanly instead of killing it.
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        println!("serving until Ctrl-C");
        tokio::select! {
            _ = interrupt.recv() => {}
            ended = server => ended?,
        }
        rt.shutdown().await;
    }
    Ok(())
}

/// Serves the runtime's actors over HTTP on `addr`, with `/metrics` and `/health`, and, on a
/// loopback address, the admin API with Loom Studio at `/` (its live counters from
/// `/metrics`); says where on stdout.
async fn serve(
    rt: &Runtime,
    addr: SocketAddr,
    prometheus: loom_http::PrometheusHandle,
) -> Result<tokio::task::JoinHandle<()>, Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    println!("listening on http://{bound}");
    // With `LOOM_TOKEN` set, every request to the actors must carry `Authorization: Bearer
    // $LOOM_TOKEN` (`/metrics` and `/health` are open, for the monitoring).
    let token = match std::env::var("LOOM_TOKEN") {
        Ok(t) if t.is_empty() || t.trim() != t || !t.bytes().all(|b| b.is_ascii_graphic()) => {
            return Err("LOOM_TOKEN must be visible ASCII with no spaces".into());
        }
        Ok(t) => Some(t),
        Err(std::env::VarError::NotPresent) => None,
        Err(e @ std::env::VarError::NotUnicode(_)) => return Err(format!("LOOM_TOKEN: {e}").into()),
    };
    // The admin API and Studio over the bank's own store (locked by this process, so `loom
    // serve` cannot open it while the bank runs), only on a loopback address: its reads are
    // open (every account's state), so they are served to this machine alone, and only under
    // its own host names; writes (requeue, unpark) need the same token as the actors.
    let admin = bound.ip().is_loopback().then(|| {
        loom_http::admin(
            rt.store().clone(),
            loom_http::AdminOptions {
                allow_writes: token.is_some(),
                token: token.clone(),
                hosts: loom_http::AdminOptions::hosts_for(bound),
            },
        )
    });
    if admin.is_none() {
        eprintln!(
            "note: Loom Studio and the admin API are served on a loopback address only (they let whoever reaches them read every actor); not on {bound}"
        );
    }
    // The actors under this machine's own names only, on a loopback address: a page whose
    // name is rebound here (DNS rebinding) cannot reach them through a visitor's browser.
    let hosts = loom_http::AdminOptions::hosts_for(bound);
    let opts = loom_http::Options {
        token,
        hosts: hosts.clone(),
        ..loom_http::Options::default()
    };
    let monitor = loom_http::only_hosts(loom_http::monitor(rt.clone(), prometheus), hosts);
    let mut app = loom_http::router(rt.clone(), opts).merge(monitor);
    if let Some(admin) = admin {
        app = app.merge(admin);
    }
    // Headers within 30 s, at most 1 024 connections; until the process ends (Ctrl-C above).
    let guards = loom_http::ServeOptions::default();
    Ok(tokio::spawn(loom_http::serve(
        listener,
        app,
        guards,
        std::future::pending(),
    )))
}
