//! `loom-dev torture`: the bank, killed with SIGKILL again and again, then checked (see
//! `loom_testkit::torture`).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use loom_bench::bank::Bank;
use loom_core::StoreError;
use loom_core::runtime::{Runtime, StartError};
use loom_testkit::servers::{PostgresServer, RedisServer};
use loom_testkit::torture::{self, Target, Torture};

use crate::output::{Failure, out};
use crate::store::{StoreUrl, open_or_create};

/// Which backend to torture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The embedded store, in a fresh directory.
    Embedded,
    /// A private redis-server (appendonly yes, appendfsync always), itself killed in some rounds.
    Redis,
    /// A private PostgreSQL cluster, itself stopped with `pg_ctl stop -m immediate` (no
    /// checkpoint, as a crash) in some rounds.
    Postgres,
}

/// The private server a run tortures alongside the runtime.
enum Server {
    Redis(RedisServer),
    Postgres(PostgresServer),
}

impl Server {
    fn restart(&mut self) {
        match self {
            Server::Redis(s) => s.restart(),
            Server::Postgres(s) => s.restart(),
        }
    }
}

/// The bank's shape in a torture run.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Shape {
    /// Accounts.
    #[arg(long, default_value_t = 20)]
    pub accounts: u32,
    /// Transfers.
    #[arg(long, default_value_t = 2000)]
    pub transfers: u32,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seed of the transfer plan.
    #[arg(long, default_value_t = 7)]
    pub plan: u64,
}

impl Shape {
    fn bank(&self) -> Bank {
        Bank {
            accounts: self.accounts,
            transfers: self.transfers,
            concurrency: self.concurrency,
            seed: self.plan,
            ..Bank::default()
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--accounts".into(),
            self.accounts.to_string(),
            "--transfers".into(),
            self.transfers.to_string(),
            "--concurrency".into(),
            self.concurrency.to_string(),
            "--plan".into(),
            self.plan.to_string(),
        ]
    }
}

struct Children {
    exe: PathBuf,
    store: String,
    prefix: String,
    shape: Shape,
    server: Option<Server>,
    server_kill_percent: u32,
}

impl Children {
    fn base(&self) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("torture-child")
            .arg("--store")
            .arg(&self.store)
            .arg("--redis-prefix")
            .arg(&self.prefix)
            .arg("--pg-schema")
            .arg(&self.prefix);
        c.args(self.shape.args());
        c
    }
}

impl Target for Children {
    fn child(&mut self) -> Command {
        self.base()
    }

    fn final_child(&mut self, acked: &Path) -> Command {
        let mut c = self.base();
        c.arg("--final").arg(acked);
        c
    }

    fn after_kill(&mut self, dice: u32) -> bool {
        match &mut self.server {
            Some(s) if dice < self.server_kill_percent => {
                s.restart();
                true
            }
            _ => false,
        }
    }
}

pub fn run(
    backend: Backend,
    kills: u32,
    seed: Option<u64>,
    shape: Shape,
    json: bool,
) -> Result<(), Failure> {
    let seed = seed.unwrap_or_else(|| fastrand::u64(..));
    let scratch = tempfile::tempdir()?;
    let (store, server) = match backend {
        Backend::Embedded => (
            // Two partitions whatever the machine: transfers and their accounts sit in
            // different partitions, so every kill also lands in the middle of relay moves.
            format!(
                "embedded:{}?partitions=2",
                scratch.path().join("store").display()
            ),
            None,
        ),
        Backend::Redis => {
            let s = RedisServer::start();
            (s.url(), Some(Server::Redis(s)))
        }
        Backend::Postgres => {
            let s = PostgresServer::start();
            (s.url(), Some(Server::Postgres(s)))
        }
    };
    let mut children = Children {
        exe: std::env::current_exe()?,
        store,
        prefix: "torture".into(),
        shape,
        server,
        server_kill_percent: 30,
    };
    eprintln!("torture: {kills} kills on {backend:?}, seed {seed} (rerun with --seed {seed})");
    let cfg = Torture {
        kills,
        seed,
        min_run: Duration::from_millis(300),
        max_run: Duration::from_millis(1500),
    };
    let report = torture::run(&mut children, cfg, scratch.path());
    if json {
        out(serde_json::to_string(&report)?)?;
    } else {
        out(format_args!(
            "kills {} (and {} server kills), {} rounds finished early; transfers acknowledged {}, lost {}, doubled {}; \
             final: {} done, {} refused, {} journals gapless; parked {}",
            report.kills,
            report.server_kills,
            report.finished_early,
            report.acknowledged,
            report.lost,
            report.doubled,
            report.last.done,
            report.last.refused,
            report.last.journals,
            report.last.parked.len()
        ))?;
    }
    if !report.ok() {
        return Err(Failure(format!(
            "torture found broken promises (seed {seed}): lost {:?}, verification {:?}, parked {:?}, journals {:?}",
            report.last.lost,
            report.last.verify_error,
            report.last.parked,
            report.last.journal_error
        )));
    }
    Ok(())
}

/// Starts a runtime on `url`, waiting up to 10 s for a killed predecessor to release it.
async fn start(url: &StoreUrl) -> Result<Runtime, Failure> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let opened = match open_or_create(url).await {
            Ok(o) => o,
            Err(f) if Instant::now() < deadline => {
                eprintln!("torture child: waiting for the store: {}", f.0);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(f) => return Err(f),
        };
        let started = Bank::register(Runtime::builder().store(opened.store))
            .configure(|c| {
                c.ask_timeout = Duration::from_secs(120);
                c.lease_ttl = Duration::from_secs(3);
                c.visibility = Duration::from_secs(5);
            })
            .start()
            .await;
        match started {
            Err(StartError::Store(StoreError::Locked { .. })) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// `loom-dev torture-child`: the bank, printing `ack <n>` per acknowledged start; with `--final`,
/// the check.
pub async fn child(url: &StoreUrl, shape: Shape, acked: Option<&Path>) -> Result<(), Failure> {
    let rt = start(url).await?;
    let bank = shape.bank();
    let retry = |what: &'static str| async move {
        eprintln!("torture child: {what} failed; retrying");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    while let Err(e) = bank.open_accounts(&rt).await {
        eprintln!("{e}");
        retry("opening accounts").await;
    }
    let Some(acked) = acked else {
        let stdout = Arc::new(Mutex::new(std::io::stdout()));
        futures::stream::iter(bank.ids())
            .for_each_concurrent(bank.concurrency, |i| {
                let (rt, stdout) = (&rt, stdout.clone());
                async move {
                    // A client retries until its request is acknowledged.
                    while bank.start(rt, i).await.is_err() {
                        retry("a start").await;
                    }
                    let mut o = stdout.lock().unwrap_or_else(|p| p.into_inner());
                    // The parent reads acks from this pipe; if it is gone, so are we.
                    let _ = writeln!(o, "ack {i}").and_then(|()| o.flush());
                }
            })
            .await;
        // Everything started: keep settling until killed (or done).
        while bank
            .settle(&rt, Duration::from_secs(600), |_| {})
            .await
            .is_err()
        {
            retry("settling").await;
        }
        rt.shutdown().await;
        return Ok(());
    };
    let listed: BTreeSet<u32> = std::fs::read_to_string(acked)?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let report = torture::check_bank(&rt, &bank, &listed).await?;
    out(format_args!("report {}", serde_json::to_string(&report)?))
}
