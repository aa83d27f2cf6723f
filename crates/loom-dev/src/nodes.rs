//! `loom-dev torture-nodes`: the bank on several node processes sharing one Redis or PostgreSQL
//! store, nodes killed with SIGKILL while it runs.
//!
//! This process starts a private server, `--nodes` node processes (`loom-dev torture-node`, each
//! hosting the bank's kinds under a name of its own) and, in itself, a client-only runtime that
//! keeps starting transfers. Every few seconds it kills a random node with SIGKILL and starts it
//! again under the same name; halfway through it adds one node more. Once the kills are done it
//! waits for the nodes to settle every transfer, checks that every node is listed live once
//! (`Membership`: a restarted node is refused its name until its dead predecessor's record runs
//! out, then joins), stops the nodes gracefully, and checks the books as `loom-dev torture`
//! does: nothing acknowledged lost, nothing applied twice, every journal gapless, nothing parked.
//!
//! A kill's *failover time* is how long after it every start then in flight was answered. The
//! starts whose transfers the killed node was running wait for those actors' leases and
//! messages to run out (`lease_ttl`, `visibility`, both `--lease-ms` here) and for another node
//! to take them; the others are answered in milliseconds. A kill after which every start in
//! flight was answered within a quarter of the lease ttl (less than any lease can have left)
//! held none of them up: the killed node was running none of those transfers. It is counted
//! apart, not as a failover.

use std::collections::BTreeSet;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loom_bench::bank::{Account, Bank, Transfer};
use loom_bench::report::percentile_ms;
use loom_cli::store::{Namespace, StoreUrl, open_or_create};
use loom_core::Store;
use loom_core::runtime::Runtime;
use loom_testkit::servers::{PostgresServer, RedisServer};
use loom_testkit::torture::{FinalReport, check_bank};
use serde::Serialize;

use crate::output::{Failure, out};

/// Which server the nodes share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// A private redis-server (appendonly yes, appendfsync always).
    Redis,
    /// A private PostgreSQL cluster.
    Postgres,
}

/// The shape of a run.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Plan {
    /// Node processes at the start; one more joins halfway through the kills.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// How many times a node is killed.
    #[arg(long, default_value_t = 10)]
    pub kills: u32,
    /// Seed of the kill schedule (printed at the start; pass it to reproduce the schedule).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Each node's lease ttl and message visibility, in milliseconds: how long a killed
    /// node's actors stay out of the others' reach.
    #[arg(long, default_value_t = 2000)]
    pub lease_ms: u64,
    /// Shortest wait before a kill, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub min_gap_ms: u64,
    /// Longest wait before a kill, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub max_gap_ms: u64,
    /// Accounts.
    #[arg(long, default_value_t = 20)]
    pub accounts: u32,
    /// Transfer starts in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
}

/// Failover times, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Failovers {
    /// Kills that held up starts in flight.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Longest.
    pub max: f64,
}

/// What a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub backend: String,
    pub seed: u64,
    /// Node names started over the run.
    pub nodes: usize,
    pub kills: u32,
    pub lease_ms: u64,
    /// Transfers started (each acknowledged).
    pub transfers: u32,
    pub failover_ms: Failovers,
    /// Kills that held up no start in flight (the killed node was running none of them).
    pub idle_kills: usize,
    /// Start latencies over the run, failovers included, in milliseconds.
    pub start_ms: Failovers,
    /// Starts that failed and were asked again.
    pub start_retries: u32,
    /// How long the nodes took to settle every transfer after the last kill.
    pub settle_ms: u64,
    /// The nodes listed live after settling.
    pub live_at_end: Vec<String>,
    /// Nodes that did not stop within 30 s of being asked to.
    pub not_stopped: Vec<String>,
    pub lost: usize,
    pub doubled: usize,
    /// The final check.
    pub last: FinalReport,
}

impl Report {
    fn ok(&self, expected: &[String]) -> bool {
        self.lost == 0
            && self.doubled == 0
            && self.last.lost.is_empty()
            && self.last.verify_error.is_none()
            && self.last.parked.is_empty()
            && self.last.journal_error.is_none()
            && self.live_at_end == expected
            && self.not_stopped.is_empty()
    }
}

/// The node processes.
struct Nodes {
    exe: std::path::PathBuf,
    store: String,
    lease_ms: u64,
    running: Vec<(String, Child)>,
}

impl Nodes {
    fn spawn(&self, name: &str) -> Child {
        let mut c = Command::new(&self.exe);
        c.args(["torture-node", "--store", &self.store, "--node", name])
            .args(["--redis-prefix", PREFIX, "--pg-schema", PREFIX])
            .args(["--lease-ms", &self.lease_ms.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // Killed peers are the point of the run: the warnings they cause (a lease taken over,
        // a name refused while its dead holder's record runs out) are not news. Errors still
        // show, and RUST_LOG, when set, wins.
        if std::env::var_os("RUST_LOG").is_none() {
            c.env("RUST_LOG", "error");
        }
        c.spawn().expect("spawn a torture node")
    }

    fn add(&mut self, name: String) {
        let child = self.spawn(&name);
        self.running.push((name, child));
    }

    /// SIGKILLs node `i` and starts it again under its name; returns when it was killed.
    fn kill_and_restart(&mut self, i: usize) -> (Instant, String) {
        let name = self.running[i].0.clone();
        let child = &mut self.running[i].1;
        let at = Instant::now();
        // SIGKILL: no destructor runs, nothing is released, the node does not leave.
        child.kill().expect("kill a node");
        child.wait().expect("reap a node");
        self.running[i].1 = self.spawn(&name);
        (at, name)
    }

    /// Closes every node's stdin, which makes it shut down gracefully, and waits up to 30 s
    /// for each; returns the names of those that did not stop (then killed).
    fn stop(mut self) -> Vec<String> {
        for (_, c) in &mut self.running {
            drop(c.stdin.take());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stuck = Vec::new();
        for (name, mut c) in self.running {
            loop {
                match c.try_wait().expect("poll a node") {
                    Some(status) if status.success() => break,
                    Some(status) => {
                        stuck.push(format!("{name} ({status})"));
                        break;
                    }
                    None if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    None => {
                        c.kill().expect("kill a stuck node");
                        c.wait().expect("reap a stuck node");
                        stuck.push(format!("{name} (did not stop)"));
                        break;
                    }
                }
            }
        }
        stuck
    }
}

/// The namespace (Redis key prefix, PostgreSQL schema) of a run on its private server.
const PREFIX: &str = "nodes";

fn node_name(i: usize) -> String {
    format!("node-{}", i + 1)
}

/// Runs the torture and prints its report; fails if a promise broke.
pub async fn run(backend: Backend, plan: Plan, json: bool) -> Result<(), Failure> {
    let seed = plan.seed.unwrap_or_else(|| fastrand::u64(..));
    if plan.nodes == 0 || plan.accounts < 2 || plan.concurrency == 0 {
        return Err(Failure(
            "--nodes and --concurrency must be at least 1, --accounts at least 2".into(),
        ));
    }
    if plan.min_gap_ms > plan.max_gap_ms {
        return Err(Failure("--min-gap-ms is more than --max-gap-ms".into()));
    }
    let (url, _server): (String, Box<dyn std::any::Any + Send>) = match backend {
        Backend::Redis => {
            let s = RedisServer::start();
            (s.url(), Box::new(s))
        }
        Backend::Postgres => {
            let s = PostgresServer::start();
            (s.url(), Box::new(s))
        }
    };
    eprintln!(
        "torture-nodes: {} nodes (and one more halfway), {} kills on {backend:?}, seed {seed} \
         (rerun with --seed {seed})",
        plan.nodes, plan.kills
    );
    // Created here, before any node opens it, so that the nodes do not race to create it.
    let opened = open_or_create(&StoreUrl::parse(&url, &Namespace::both(PREFIX))?).await?;
    let store = opened.store.clone();
    let lease = Duration::from_millis(plan.lease_ms);
    let mut nodes = Nodes {
        exe: std::env::current_exe()?,
        store: url,
        lease_ms: plan.lease_ms,
        running: Vec::new(),
    };
    for i in 0..plan.nodes {
        nodes.add(node_name(i));
    }
    let mut expected: Vec<String> = (0..=plan.nodes).map(node_name).collect();
    expected.push("driver".into());
    expected.sort();

    let client = Runtime::builder()
        .store(store.clone())
        .sends_to::<Account>()
        .sends_to::<Transfer>()
        .configure(|c| {
            c.node = "driver".into();
            c.lease_ttl = lease;
            c.ask_timeout = Duration::from_secs(120);
        })
        .start()
        .await?;
    let mut bank = Bank {
        accounts: plan.accounts,
        transfers: 0,
        concurrency: plan.concurrency,
        seed: 7,
        ..Bank::default()
    };
    while let Err(e) = bank.open_accounts(&client).await {
        eprintln!("torture-nodes: opening accounts failed ({e}); retrying");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The kills, on a thread of their own: a kill and a restart block for a moment.
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut kills = Vec::new();
            for k in 0..plan.kills {
                let gap = rng.u64(plan.min_gap_ms..=plan.max_gap_ms);
                std::thread::sleep(Duration::from_millis(gap));
                if k == plan.kills / 2 {
                    nodes.add(node_name(plan.nodes));
                }
                let i = rng.usize(..nodes.running.len());
                kills.push(nodes.kill_and_restart(i));
            }
            // Time for the last kill's failover before the load stops.
            std::thread::sleep(Duration::from_millis(plan.max_gap_ms));
            stop.store(true, Ordering::SeqCst);
            (nodes, kills)
        })
    };

    let next = AtomicU32::new(0);
    let retries = AtomicU32::new(0);
    let starts: Mutex<Vec<(Instant, Instant)>> = Mutex::default();
    futures::future::join_all((0..plan.concurrency).map(|_| async {
        while !stop.load(Ordering::SeqCst) {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let began = Instant::now();
            // A client retries until its request is acknowledged.
            // (A start fails while its answer waits past the ask timeout, or the store is
            // briefly unreachable; each failure is counted in the report.)
            while bank.start(&client, i).await.is_err() {
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            starts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((began, Instant::now()));
        }
    }))
    .await;
    let (nodes, kills) = tokio::task::spawn_blocking(move || killer.join())
        .await?
        .map_err(|_| Failure("the kill schedule panicked".into()))?;
    bank.transfers = next.load(Ordering::SeqCst);
    let starts = starts.into_inner().unwrap_or_else(|p| p.into_inner());

    let mut failovers = Vec::new();
    let mut idle_kills = 0;
    for (at, node) in &kills {
        let answered = starts
            .iter()
            .filter(|(began, ended)| began <= at && ended > at)
            .map(|(_, ended)| *ended - *at)
            .max()
            .unwrap_or_default();
        if answered < lease / 4 {
            eprintln!(
                "torture-nodes: {node} killed; it held up no start (all answered within {answered:?})"
            );
            idle_kills += 1;
        } else {
            eprintln!("torture-nodes: {node} killed; every start answered after {answered:?}");
            failovers.push(answered);
        }
    }
    let summary = |mut d: Vec<Duration>| {
        d.sort();
        Failovers {
            count: d.len(),
            p50: percentile_ms(&d, 0.5),
            p99: percentile_ms(&d, 0.99),
            max: percentile_ms(&d, 1.0),
        }
    };

    let settling = Instant::now();
    let settled = bank.settle(&client, Duration::from_secs(300), |_| {}).await;
    let settle_ms = settling.elapsed().as_millis() as u64;
    settled.map_err(|e| Failure(format!("the nodes did not settle the transfers: {e}")))?;
    let live_at_end = live_nodes(store.as_ref(), &expected, lease).await?;
    client.shutdown().await;
    let not_stopped = tokio::task::spawn_blocking(move || nodes.stop()).await?;

    // The final check runs here, on a node of its own, after the others stopped: it reads every
    // journal, and nothing may write meanwhile.
    let checker = Bank::register(Runtime::builder().store(store.clone()))
        .configure(|c| {
            c.node = "checker".into();
            c.lease_ttl = lease;
            c.ask_timeout = Duration::from_secs(120);
        })
        .start()
        .await?;
    let acked: BTreeSet<u32> = bank.ids().collect();
    let last = tokio::time::timeout(
        Duration::from_secs(600),
        check_bank(&checker, &bank, &acked),
    )
    .await
    .map_err(|_| Failure("the final check did not finish in 10 minutes".into()))??;

    let report = Report {
        backend: format!("{backend:?}").to_lowercase(),
        seed,
        nodes: plan.nodes + 1,
        kills: plan.kills,
        lease_ms: plan.lease_ms,
        transfers: bank.transfers,
        failover_ms: summary(failovers),
        idle_kills,
        start_ms: summary(starts.iter().map(|(b, e)| *e - *b).collect()),
        start_retries: retries.load(Ordering::Relaxed),
        settle_ms,
        live_at_end,
        not_stopped,
        lost: last.lost.len(),
        doubled: usize::from(last.verify_error.is_some()),
        last,
    };
    if json {
        out(serde_json::to_string(&report)?)?;
    } else {
        out(format_args!(
            "{} nodes, {} kills on {}: failover p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms \
             ({} kills held starts up, {} none; lease {} ms); start p50 {:.0} ms, p99 {:.0} ms; \
             transfers {}, lost {}, doubled {}; \
             settled in {} ms; live at the end: {}; journals gapless {}; parked {}",
            report.nodes,
            report.kills,
            report.backend,
            report.failover_ms.p50,
            report.failover_ms.p99,
            report.failover_ms.max,
            report.failover_ms.count,
            report.idle_kills,
            report.lease_ms,
            report.start_ms.p50,
            report.start_ms.p99,
            report.transfers,
            report.lost,
            report.doubled,
            report.settle_ms,
            report.live_at_end.join(", "),
            report.last.journals,
            report.last.parked.len(),
        ))?;
    }
    if !report.ok(&expected) {
        return Err(Failure(format!(
            "torture-nodes found broken promises (seed {seed}): lost {:?}, verification {:?}, \
             parked {:?}, journals {:?}, live at the end {:?} (expected {expected:?}), not \
             stopped {:?}",
            report.last.lost,
            report.last.verify_error,
            report.last.parked,
            report.last.journal_error,
            report.live_at_end,
            report.not_stopped,
        )));
    }
    Ok(())
}

/// The live nodes' names, sorted, once they are `expected` or after 10 lease ttls: a node
/// restarted under a killed one's name joins only once the dead record runs out.
async fn live_nodes(
    store: &dyn Store,
    expected: &[String],
    lease: Duration,
) -> Result<Vec<String>, Failure> {
    let deadline = Instant::now() + lease * 10;
    loop {
        let roster = store.members().await?;
        let mut live: Vec<String> = roster.live().map(|m| m.node.clone()).collect();
        live.sort();
        if live == expected || Instant::now() > deadline {
            return Ok(live);
        }
        tokio::time::sleep(lease / 10).await;
    }
}

/// `loom-dev torture-node`: hosts the bank's kinds on `url` as `node` until its stdin closes,
/// then shuts down gracefully.
pub async fn node(url: &StoreUrl, node: &str, lease_ms: u64) -> Result<(), Failure> {
    let opened = open_or_create(url).await?;
    let lease = Duration::from_millis(lease_ms);
    let rt = Bank::register(Runtime::builder().store(opened.store))
        .configure(|c| {
            c.node = node.to_owned();
            c.lease_ttl = lease;
            c.visibility = lease;
            c.ask_timeout = Duration::from_secs(120);
        })
        .start()
        .await?;
    // Blocks until the parent closes stdin (or dies); what is read is ignored.
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        std::io::stdin().read_to_end(&mut sink)
    })
    .await??;
    rt.shutdown().await;
    Ok(())
}
