//! `loom-dev torture-nodes`: the bank on several node processes sharing one Redis or PostgreSQL
//! store, nodes killed with SIGKILL while it runs.
//!
//! This process starts a private server, `--nodes` node processes (`loom-dev node`, each
//! hosting the bank's kinds under a name of its own) and, in itself, a client-only runtime that
//! keeps `--concurrency` transfers in flight (each worker starts its next transfer once its
//! last one settled). Every few seconds it kills a node with SIGKILL (three times in four
//! one found running accounts, by their partitions' leases, else any) and starts it again under its name;
//! halfway through it adds one node more. Once the kills are done it waits for the nodes to
//! settle every transfer, checks that every node is listed live once (`Membership`: a
//! restarted node is refused its name until its dead predecessor's record runs out, then
//! joins), stops the nodes gracefully, and checks the books as `loom-dev torture`
//! does: nothing acknowledged lost, nothing applied twice, every journal gapless, nothing parked.
//!
//! A kill's *failover time* is how long after it every start then in flight was answered and
//! every account answered again (the client asks each account its balance every 100 ms). The
//! actors the killed node was running wait for their leases and in-flight messages to run out
//! (`lease_ttl`, `visibility`, both `--lease-ms` here) and for another node to take them; the
//! others answer in milliseconds. A kill after which everything answered within a quarter of
//! the lease ttl (less than any lease can have left) held nothing up: the killed node was
//! running none of those actors. It is counted apart, not as a failover.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use loom_bench::bank::{Account, AccountMsg, Bank, Transfer};
use loom_bench::report::percentile_ms;
use loom_cli::store::{Namespace, StoreUrl, open_or_create};
use loom_core::ActorId;
use loom_core::runtime::{Actor, Runtime};
use loom_core::store::Lease;
use loom_testkit::servers::{PostgresServer, RedisServer};
use loom_testkit::torture::{FinalReport, check_bank};
use serde::Serialize;

use crate::node::{Nodes, Spec, live_nodes, partition_owners};
use crate::output::{Failure, out};

/// Which server the nodes share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// A private redis-server (appendonly yes, appendfsync always).
    Redis,
    /// A private PostgreSQL cluster.
    Postgres,
    /// A private Redis Cluster of three primaries (the store cut into 32 partitions, or
    /// `--partitions`).
    RedisCluster,
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
    /// Transfers in flight at once (each worker starts its next once its last settled).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Cut the store into this many partitions (`?partitions=N`; PostgreSQL takes 32 only), so
    /// that transfers between accounts of different partitions go through the outboxes and
    /// the relay while nodes are killed; the outboxes are checked at the end.
    #[arg(long)]
    pub partitions: Option<u32>,
}

/// Failover times, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Failovers {
    /// Kills that held requests up (a start in flight, an account's answer).
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
    /// Transfers started.
    pub transfers: u32,
    /// Of them, acknowledged while the load ran (the others are started by the final check).
    pub acknowledged: usize,
    pub failover_ms: Failovers,
    /// Kills that held nothing up (the killed node was running none of the actors asked).
    pub idle_kills: usize,
    /// How long after a kill every account the killed node held had a new lease (its
    /// partition's, which its turns are fenced by), over the kills of a node holding accounts:
    /// the takeover alone, without the backlog that built up meanwhile.
    pub takeover_ms: Failovers,
    /// Accounts of a killed node still not taken over five lease ttls after the kill.
    pub not_taken_over: usize,
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
    /// (kind, partition)s checked at the end, once the nodes were all live again.
    pub partitions_checked: usize,
    /// Those not owned by the live node rendezvous hashing names (see `node::partition_owners`).
    pub partitions_misowned: Vec<String>,
    pub lost: usize,
    pub doubled: usize,
    /// The final check.
    pub last: FinalReport,
    /// The store's partitions, and what is wrong in their outboxes and high-water marks at the
    /// end (a store of one partition has none).
    pub partitions: u32,
    pub outbox_problems: Vec<String>,
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
            && self.not_taken_over == 0
            && self.partitions_checked > 0
            && self.partitions_misowned.is_empty()
            && self.outbox_problems.is_empty()
    }
}

/// One kill and its takeover.
struct Kill {
    at: Instant,
    node: String,
    /// Accounts the node held when it was killed.
    accounts: usize,
    /// When all of them had a new lease, after the kill.
    taken_over: Option<Duration>,
    /// How many did not within five lease ttls.
    not_taken_over: usize,
}

/// Sets the flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
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
    if plan.kills == 0 {
        return Err(Failure("--kills must be at least 1".into()));
    }
    if plan.min_gap_ms > plan.max_gap_ms {
        return Err(Failure("--min-gap-ms is more than --max-gap-ms".into()));
    }
    if plan.min_gap_ms < plan.lease_ms {
        return Err(Failure(
            "--min-gap-ms must be at least --lease-ms, so that each kill's failover is measured \
             before the next kill"
                .into(),
        ));
    }
    let (url, _server): (String, Box<dyn std::any::Any + Send>) = match backend {
        Backend::Redis => {
            let s = RedisServer::start();
            let url = with_partitions(s.url(), plan.partitions);
            (url, Box::new(s))
        }
        Backend::Postgres => {
            let s = PostgresServer::start();
            let url = with_partitions(s.url(), plan.partitions);
            (url, Box::new(s))
        }
        Backend::RedisCluster => {
            let c = loom_testkit::servers::RedisCluster::start();
            let url = with_partitions(c.url(), plan.partitions);
            (url, Box::new(c))
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
    let mut nodes = Nodes::new(Spec {
        store: url,
        namespace: PREFIX.into(),
        lease,
        // Killed peers are the point of the run: the warnings they cause (a lease taken
        // over, a name refused while its dead holder's record runs out) are not news.
        log: "error",
    })?;
    for i in 0..plan.nodes {
        nodes.add(&node_name(i))?;
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
        let stop = StopOnDrop(stop.clone());
        let (tokio, store) = (tokio::runtime::Handle::current(), store.clone());
        let accounts: Vec<ActorId> = bank
            .account_ids()
            .map(|n| ActorId::new(Account::KIND, format!("a{n}")))
            .collect::<Result<_, _>>()
            .map_err(|e| Failure(e.to_string()))?;
        // Each account's fence as the store has it, its partition's lease (rule D8; `None`
        // where it could not be read): each partition's read once.
        let parts = loom_core::partition::ownership_partitions(store.partitions());
        let fences: Vec<ActorId> = accounts
            .iter()
            .map(|a| {
                let p = loom_core::partition::partition_of(a, parts);
                ActorId::partition_lease(a.kind(), p)
            })
            .collect();
        let leases = move || -> Vec<Option<Lease>> {
            let mut read = std::collections::BTreeMap::new();
            fences
                .iter()
                .map(|f| {
                    read.entry(f)
                        .or_insert_with(|| match tokio.block_on(store.holder(f)) {
                            Ok(lease) => lease,
                            Err(e) => {
                                eprintln!("torture-nodes: {f}'s lease unread ({e})");
                                None
                            }
                        })
                        .clone()
                })
                .collect()
        };
        std::thread::spawn(move || {
            // Dropped at the end, or if this thread panics: the load stops either way.
            let _stop = stop;
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut kills = Vec::new();
            let schedule = (|| {
                let mut last = Instant::now();
                for k in 0..plan.kills {
                    let gap = Duration::from_millis(rng.u64(plan.min_gap_ms..=plan.max_gap_ms));
                    std::thread::sleep((last + gap).saturating_duration_since(Instant::now()));
                    if k == plan.kills / 2 {
                        nodes.add(&node_name(plan.nodes))?;
                    }
                    // Three kills in four hit a node that runs accounts, so that most kills
                    // have something to fail over; the fourth hits any node.
                    let before = leases();
                    let names = nodes.names();
                    let running: Vec<usize> = (0..names.len())
                        .filter(|&i| before.iter().flatten().any(|l| l.owner == names[i]))
                        .collect();
                    let i = if running.is_empty() || rng.u32(..4) == 0 {
                        rng.usize(..nodes.len())
                    } else {
                        running[rng.usize(..running.len())]
                    };
                    let (at, node) = nodes.kill_and_restart(i)?;
                    last = at;
                    // The killed node's accounts are taken over when each one's partition has a
                    // lease of a greater token (a later holder; the restarted node under the
                    // same name is one). Looked for every 20 ms, for up to five lease ttls.
                    let mut pending: Vec<(usize, u64)> = before
                        .iter()
                        .enumerate()
                        .filter_map(|(a, l)| {
                            l.as_ref().filter(|l| l.owner == node).map(|l| (a, l.token))
                        })
                        .collect();
                    let accounts = pending.len();
                    let limit = at + lease * 5;
                    while !pending.is_empty() && Instant::now() < limit {
                        std::thread::sleep(Duration::from_millis(20));
                        let now = leases();
                        pending
                            .retain(|&(a, token)| now[a].as_ref().is_none_or(|l| l.token <= token));
                    }
                    kills.push(Kill {
                        at,
                        node,
                        accounts,
                        taken_over: (accounts > 0 && pending.is_empty()).then(|| at.elapsed()),
                        not_taken_over: pending.len(),
                    });
                }
                // Time for the last kill's failover before the load stops.
                std::thread::sleep(Duration::from_millis(plan.max_gap_ms));
                Ok::<_, Failure>(())
            })();
            (nodes, kills, schedule)
        })
    };

    let next = AtomicU32::new(0);
    let retries = AtomicU32::new(0);
    // Every account is asked its balance every 100 ms: accounts live long on whichever node
    // took them, so these find out when each serves again after a kill. Each account's
    // probes, in the order sent: (sent, answered).
    let probing = futures::future::join_all(bank.account_ids().map(|n| {
        let (client, stop) = (&client, &stop);
        async move {
            let account = client.actor::<Account>(format!("a{n}"))?;
            let mut probes = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let sent = Instant::now();
                // A probe that fails (past the ask timeout) is not an answer; the next one
                // is sent as if it had come.
                if account.ask(AccountMsg::Balance).await.is_ok() {
                    probes.push((sent, Instant::now()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, Failure>(probes)
        }
    }));
    // Each worker's acknowledged starts: (transfer, sent, answered). A worker starts its next
    // transfer once the last one settled (a closed loop, as a client with `concurrency`
    // requests in flight has): a start is acknowledged at the transfer's first turn, long
    // before its legs run, and workers that started the next one at once would queue legs in
    // the accounts' mailboxes faster than the nodes drain them (on PostgreSQL, minutes of
    // backlog), so that a balance asked after a kill measured that queue, not the failover.
    let loading = futures::future::join_all((0..plan.concurrency).map(|_| async {
        let mut starts = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let sent = Instant::now();
            // A client retries until its request is acknowledged, or the load stops (then the
            // final check starts it, unacknowledged). A start fails while its answer waits
            // past the ask timeout or the store is briefly unreachable; each failure is
            // counted in the report.
            loop {
                if bank.start(&client, i).await.is_ok() {
                    starts.push((i, sent, Instant::now()));
                    break;
                }
                retries.fetch_add(1, Ordering::Relaxed);
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // A status asked past the ask timeout, or while the store is briefly unreachable,
            // is asked again; the final settle waits for whatever the load leaves unsettled.
            while !stop.load(Ordering::SeqCst) {
                if bank.status(&client, i).await.is_ok_and(|s| s.settled()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        starts
    }));
    let (probed, started) = futures::join!(probing, loading);
    let load_end = Instant::now();
    let (nodes, kills, schedule) = tokio::task::spawn_blocking(move || killer.join())
        .await?
        .map_err(|_| Failure("the kill schedule panicked".into()))?;
    if let Err(e) = schedule {
        let stuck = tokio::task::spawn_blocking(move || nodes.stop()).await?;
        return Err(Failure(format!(
            "{} (nodes that did not stop: {stuck:?})",
            e.0
        )));
    }
    let probes = probed.into_iter().collect::<Result<Vec<_>, _>>()?;
    let starts: Vec<(u32, Instant, Instant)> = started.into_iter().flatten().collect();
    bank.transfers = next.load(Ordering::SeqCst);

    let mut failovers = Vec::new();
    let mut idle_kills = 0;
    for kill in &kills {
        let (at, node) = (kill.at, &kill.node);
        // Every start in flight at the kill answered ...
        let started = starts
            .iter()
            .filter(|(_, sent, answered)| *sent <= at && *answered > at)
            .map(|(_, _, answered)| *answered - at)
            .max()
            // No start was in flight at the kill: none was held up.
            .unwrap_or_default();
        // ... and every account answered a probe sent after it (one in flight at the kill
        // may have been answered by the killed node; one sent after it cannot). An account
        // that never answered again is held up until the load stopped.
        let served = probes
            .iter()
            .map(|p| {
                let after = p.partition_point(|(sent, _)| *sent < at);
                p.get(after).map_or(load_end, |(_, answered)| *answered) - at
            })
            .max()
            // No account was probed (none opened): none was held up.
            .unwrap_or_default();
        let answered = started.max(served);
        if answered < lease / 4 {
            eprintln!(
                "torture-nodes: {node} killed; it held up nothing (all answered within {answered:?})"
            );
            idle_kills += 1;
        } else {
            eprintln!(
                "torture-nodes: {node} killed; its {} accounts taken over after {:?} ({} not); every start answered after {started:?}, every account after {served:?}",
                kill.accounts, kill.taken_over, kill.not_taken_over
            );
            failovers.push(answered);
        }
    }
    let takeovers: Vec<Duration> = kills.iter().filter_map(|k| k.taken_over).collect();
    let not_taken_over: usize = kills.iter().map(|k| k.not_taken_over).sum();
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
    // Generous: what the load left in flight settles in seconds, but a transfer whose leg was
    // held by a node killed last waits out the takeover first.
    let settled = bank
        .settle(&client, Duration::from_secs(1800), |_| {})
        .await;
    let settle_ms = settling.elapsed().as_millis() as u64;
    settled.map_err(|e| Failure(format!("the nodes did not settle the transfers: {e}")))?;
    // A node restarted under a killed one's name joins once the dead record runs out.
    let live_at_end = live_nodes(store.as_ref(), &expected, lease * 10).await?;
    // Then every partition of every kind has exactly one owner, the live node that wins it.
    let (partitions_checked, partitions_misowned) =
        partition_owners(store.as_ref(), lease * 10).await?;
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
    let acked: BTreeSet<u32> = starts.iter().map(|(i, ..)| *i).collect();
    let last = tokio::time::timeout(
        Duration::from_secs(600),
        check_bank(&checker, &bank, &acked),
    )
    .await
    .map_err(|_| Failure("the final check did not finish in 10 minutes".into()))??;
    // The relay's invariants, now that nothing writes (loom journal verify checks the same).
    let states = match (&opened.redis, &opened.postgres) {
        (Some(r), _) => r.outbox_states().await?,
        (None, Some(p)) => p.outbox_states().await?,
        (None, None) => Vec::new(),
    };
    let outbox_problems = loom_core::store::backend::check_outboxes(&states);

    let report = Report {
        backend: format!("{backend:?}").to_lowercase(),
        seed,
        nodes: plan.nodes + 1,
        kills: plan.kills,
        lease_ms: plan.lease_ms,
        transfers: bank.transfers,
        acknowledged: acked.len(),
        failover_ms: summary(failovers),
        takeover_ms: summary(takeovers),
        not_taken_over,
        idle_kills,
        start_ms: summary(
            starts
                .iter()
                .map(|(_, sent, answered)| *answered - *sent)
                .collect(),
        ),
        start_retries: retries.load(Ordering::Relaxed),
        settle_ms,
        live_at_end,
        not_stopped,
        partitions_checked,
        partitions_misowned,
        lost: last.lost.len(),
        doubled: usize::from(last.verify_error.is_some()),
        last,
        partitions: store.partitions(),
        outbox_problems,
    };
    if json {
        out(serde_json::to_string(&report)?)?;
    } else {
        out(format_args!(
            "{} nodes, {} kills on {}: takeover p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms \
             ({} kills of a node holding accounts, {} accounts not taken over); \
             failover p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms \
             ({} kills held requests up, {} none; lease {} ms); start p50 {:.0} ms, p99 {:.0} ms; \
             transfers {}, lost {}, doubled {}; \
             settled in {} ms; live at the end: {}; partitions owned by their winners {} of {}; \
             journals gapless {}; parked {}; {} store partitions, outbox problems {:?}",
            report.nodes,
            report.kills,
            report.backend,
            report.takeover_ms.p50,
            report.takeover_ms.p99,
            report.takeover_ms.max,
            report.takeover_ms.count,
            report.not_taken_over,
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
            report.partitions_checked - report.partitions_misowned.len(),
            report.partitions_checked,
            report.last.journals,
            report.last.parked.len(),
            report.partitions,
            report.outbox_problems,
        ))?;
    }
    if !report.ok(&expected) {
        return Err(Failure(format!(
            "torture-nodes found broken promises (seed {seed}): lost {:?}, verification {:?}, \
             parked {:?}, journals {:?}, live at the end {:?} (expected {expected:?}), not \
             stopped {:?}, partitions misowned {:?}, outbox problems {:?}",
            report.last.lost,
            report.last.verify_error,
            report.last.parked,
            report.last.journal_error,
            report.live_at_end,
            report.not_stopped,
            report.partitions_misowned,
            report.outbox_problems,
        )));
    }
    Ok(())
}

/// `loom-dev bench bank --nodes 1,3`: for each count, that many node processes on the store of
/// `url` (Redis or PostgreSQL; `namespace` is the run's key prefix or schema) run the bank that
/// a client-only runtime in this process drives, at full load; the invocations per second are
/// the nodes' own counts over the run (asked over their stdin before and after), measured
/// against `baseline` as the one-process bank is.
pub async fn bench_bank(
    url: &str,
    namespace: &str,
    label: &str,
    counts: &[usize],
    shape: Bank,
    baseline: &loom_bench::baseline::Baseline,
) -> Result<Vec<loom_bench::report::Measurement>, Failure> {
    let mut results = Vec::new();
    let opened = open_or_create(&StoreUrl::parse(url, &Namespace::both(namespace))?).await?;
    for (run, &n) in counts.iter().enumerate() {
        let mut nodes = Nodes::new(Spec {
            store: url.to_owned(),
            namespace: namespace.to_owned(),
            lease: Duration::from_secs(10),
            log: "warn",
        })?;
        let names: Vec<String> = (0..n).map(|i| format!("bench-node-{}", i + 1)).collect();
        for name in &names {
            nodes.add(name)?;
        }
        let measured = async {
            let driver = format!("bench-driver-{run}");
            let client = Runtime::builder()
                .store(opened.store.clone())
                .sends_to::<Account>()
                .sends_to::<Transfer>()
                .configure(|c| {
                    c.node = driver.clone();
                    c.ask_timeout = Duration::from_secs(600);
                })
                .start()
                .await?;
            // Every node up before the load starts, or the first ones would take it all.
            let mut expected = names.clone();
            expected.push(driver);
            expected.sort();
            let live =
                live_nodes(opened.store.as_ref(), &expected, Duration::from_secs(60)).await?;
            if live != expected {
                return Err(Failure(format!(
                    "the nodes did not all join within 60 s: live {live:?}, expected {expected:?}"
                )));
            }
            // Fresh transfers and accounts for every count: a run must not find the one before.
            let cfg = Bank {
                first: shape.first + run as u32 * shape.transfers,
                first_account: shape.first_account + run as u32 * shape.accounts,
                ..shape
            };
            cfg.open_accounts(&client).await?;
            let (inv0, cpu0) = tokio::task::block_in_place(|| nodes.metrics())?;
            let start = Instant::now();
            let mut latencies = cfg.start_all(&client, || {}).await?;
            let statuses = cfg
                .settle(&client, Duration::from_secs(1200), |_| {})
                .await?;
            let wall = start.elapsed().as_secs_f64();
            let (inv1, cpu1) = tokio::task::block_in_place(|| nodes.metrics())?;
            let verified = cfg.verify(&client, &statuses).await?;
            client.shutdown().await;
            let invocations = inv1.saturating_sub(inv0) as f64;
            let base = baseline(512, shape.concurrency, 500)
                .await
                .map_err(Failure)?;
            let cpu = cpu1.saturating_sub(cpu0).as_secs_f64() * 1000.0;
            Ok(loom_bench::report::Measurement::new(
                &format!("bank nodes={n}"),
                label,
                invocations / wall,
                base,
                &mut latencies,
            )
            .with("unit", "invocations")
            .with("nodes", n)
            .with("transfers", cfg.transfers)
            .with("transfers_per_s", (f64::from(cfg.transfers) / wall).round())
            .with("accounts", cfg.accounts)
            .with("done", verified.done)
            .with("refused", verified.refused)
            .with(
                "latency_of",
                "a transfer's first durable turn, at full load",
            )
            .with(
                "node_cpu_ms_per_1000_invocations",
                (cpu / (invocations / 1000.0).max(1e-9) * 10.0).round() / 10.0,
            ))
        }
        .await;
        let stuck = tokio::task::block_in_place(|| nodes.stop());
        let m = measured?;
        if !stuck.is_empty() {
            return Err(Failure(format!("nodes did not stop cleanly: {stuck:?}")));
        }
        results.push(m);
    }
    Ok(results)
}

/// `url` asking a new store for `partitions` (Loom's `?partitions=N`), after any query it has.
fn with_partitions(url: String, partitions: Option<u32>) -> String {
    match partitions {
        Some(n) if url.contains('?') => format!("{url}&partitions={n}"),
        Some(n) => format!("{url}?partitions={n}"),
        None => url,
    }
}
