//! One simulated run: the workloads (the bank, counters, the order saga, timers) on the real
//! runtime, on a [`SimStore`], under a fault schedule drawn from one seed; then the torture's
//! final check of the bank and each workload's own check.
//!
//! A run is a sequence of *rounds*. Each round starts its nodes (fresh [`Runtime`]s on the
//! same store, each on its own connection, as restarted processes would be), drives its share
//! of every workload through them, and ends them with a **crash** (every task dropped mid-way;
//! writes already sent to the store stay, as in a process killed by SIGKILL) or a **power
//! loss** (the crash, and every write not yet synced is gone). Meanwhile the store injects its faults (latency, transient errors, lost replies, a
//! full disk for a while). After the last round the faults stop, a last node starts, finishes
//! what the rounds left, and the checks prove the promises: [`check_bank`] (no acknowledged
//! transfer lost, the books balanced: no leg lost or applied twice, nothing parked, every
//! journal gapless), the [workloads](crate::workload)' checks (each counter's replies
//! linearizable against its journal; every order shipped or compensated, the outside world
//! agreeing; every timer fired once and none early), no handler refusal, no task panic; and
//! the store's audits (rule D1: no answered write lost to a power loss; rule D8: no turn
//! commits under a lost lease; rule D18: the relay moves no outbox row twice) saw nothing.
//!
//! Everything runs on one thread, on a current-thread tokio runtime with a paused clock, with
//! [`loom_core::seam`] switched to simulation: the run is a function of its [`Plan`], and two
//! runs of one plan produce the same trace hash.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loom_bench::bank::{Bank, BankError};
use loom_core::runtime::{Compaction, Retry, Runtime, RuntimeBuilder};
use loom_core::{Store, Timestamp, seam};
use loom_testkit::torture::{FinalReport, check_bank};
use serde::Serialize;

use crate::store::{Bugs, Faults, SimStats, SimStore};
use crate::workload::counter::Counters;
use crate::workload::saga::Orders;
use crate::workload::timer::Timers;
use crate::workload::{Errors, final_answer, paced, until_ok};

/// The simulated wall clock starts here (2026-01-01T00:00:00Z), whatever the seed.
const EPOCH: Timestamp = Timestamp::from_millis(1_767_225_600_000);

/// How long (simulated) the final check may take before the run counts as stuck. A healthy
/// run's final check takes a few simulated seconds (leases of the crashed nodes expire in 3).
const FINAL_LIMIT: Duration = Duration::from_secs(600);

/// How often (simulated) the final check looks for parked actors: a parked actor never
/// settles, so the run fails at once instead of waiting out [`FINAL_LIMIT`].
const PARKED_CHECK: Duration = Duration::from_secs(5);

/// The most a node's clock is off, either way, when [`Enabled::skew`] is on.
pub const MAX_SKEW: Duration = Duration::from_millis(200);

/// Which faults a run may inject; shrinking turns them off one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Enabled {
    /// Power losses: at the end of a round (else it ends in a crash), and sometimes under the
    /// running nodes.
    pub power_loss: bool,
    /// Request latency and fsync latency.
    pub latency: bool,
    /// Transient request failures.
    pub transient: bool,
    /// Replies lost after the write landed.
    pub lost_reply: bool,
    /// A full disk for part of a round.
    pub disk_full: bool,
    /// One snapshot damaged on disk (bit rot), at most once a run.
    pub rot: bool,
    /// A node's connection stalls, sometimes past its leases.
    pub stall: bool,
    /// One node crashes mid-round while the others go on.
    pub node_crash: bool,
    /// Each node's clock is off by up to [`MAX_SKEW`] either way (the store's is right).
    pub skew: bool,
}

impl Enabled {
    /// Every fault.
    pub const ALL: Enabled = Enabled {
        power_loss: true,
        latency: true,
        transient: true,
        lost_reply: true,
        disk_full: true,
        rot: true,
        stall: true,
        node_crash: true,
        skew: true,
    };
}

/// Everything a run depends on.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Plan {
    /// The seed: the fault schedule, the store's faults, every id and random draw.
    pub seed: u64,
    /// Rounds, each ended by a crash or a power loss of every node.
    pub rounds: u32,
    /// Nodes (runtimes on the same store, each on its own connection) in every round.
    pub nodes: u32,
    /// Partitions of the store: messages between actors of different partitions travel
    /// through the sender's outbox and the relay.
    pub partitions: u32,
    /// Accounts of the bank.
    pub accounts: u32,
    /// Transfers of the bank.
    pub transfers: u32,
    /// Calls to the counters (the linearizability workload).
    pub calls: u32,
    /// Orders of the saga workload.
    pub orders: u32,
    /// Timers of the timer workload.
    pub timers: u32,
    /// Faults that may be injected.
    pub faults: Enabled,
    /// Bugs switched on.
    pub bugs: Bugs,
}

impl Plan {
    /// The default plan for `seed`.
    pub fn new(seed: u64) -> Plan {
        Plan {
            seed,
            rounds: 4,
            nodes: 2,
            partitions: 2,
            accounts: 6,
            transfers: 60,
            calls: 40,
            orders: 8,
            timers: 12,
            faults: Enabled::ALL,
            bugs: Bugs::default(),
        }
    }
}

/// What a run did and found.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The plan it ran.
    pub plan: Plan,
    /// Hash of every store request (method, argument, simulated time, outcome), in order.
    pub trace: u64,
    /// Store requests made.
    pub events: u64,
    /// Simulated time the run took, in ms.
    pub simulated_ms: u64,
    /// Rounds ended by a crash.
    pub crashes: u32,
    /// Rounds ended by a power loss.
    pub power_losses: u32,
    /// Node connections stalled.
    pub stalls: u32,
    /// Single nodes crashed mid-round.
    pub node_crashes: u32,
    /// The largest clock skew of a node, in ms either way.
    pub largest_skew_ms: u64,
    /// Rounds that ended while transfers of their share were still unacknowledged.
    pub busy_kills: u32,
    /// Transfers acknowledged before a crash or power loss.
    pub acknowledged: usize,
    /// Counter calls, orders and timers acknowledged before a crash or power loss.
    pub workloads_acknowledged: (usize, usize, usize),
    /// What the store injected.
    pub stats: SimStats,
    /// The final check's report (absent if the run failed before it).
    pub report: Option<FinalReport>,
    /// Why the run failed, if it did.
    pub failure: Option<String>,
    /// Which checks failed (what shrinking keeps failing).
    pub failed: Vec<Check>,
    /// The store's last requests, when the run failed.
    pub recent: Vec<String>,
}

impl Outcome {
    /// True if every promise held.
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }

    /// The outcome of a run that panicked (its store and trace are gone with it).
    pub fn panicked(plan: Plan, message: String) -> Outcome {
        Outcome {
            failed: vec![Check::Panic],
            ..Outcome::refused(plan, format!("panicked: {message}"))
        }
    }

    /// The outcome of a run that could not run, or ended before it had a trace.
    pub fn refused(plan: Plan, failure: String) -> Outcome {
        Outcome {
            plan,
            trace: 0,
            events: 0,
            simulated_ms: 0,
            crashes: 0,
            power_losses: 0,
            stalls: 0,
            node_crashes: 0,
            largest_skew_ms: 0,
            busy_kills: 0,
            acknowledged: 0,
            workloads_acknowledged: (0, 0, 0),
            stats: SimStats::default(),
            report: None,
            failure: Some(failure),
            failed: vec![Check::Run],
            recent: Vec::new(),
        }
    }
}

/// A check a run can fail; a shrunk plan must fail one of the checks the original failed (a
/// smaller plan that fails differently is another bug, not a smaller instance of this one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Check {
    /// The run could not run (a bad plan, a node that never started, a check that could not
    /// read the store).
    Run,
    /// A task panicked.
    Panic,
    /// The final node did not finish within [`FINAL_LIMIT`].
    Stuck,
    /// An acknowledged transfer was lost.
    Lost,
    /// The bank's books do not balance.
    Books,
    /// An actor was parked.
    Parked,
    /// A journal has a gap, or the journals are too few.
    Journal,
    /// A handler refused a message (one applied twice).
    Refused,
    /// A counter's replies are not linearizable against its journal.
    Linearizable,
    /// An order did not end, or the world disagrees with its status.
    Saga,
    /// A timer did not fire exactly once, or fired early.
    Timers,
    /// A request of a workload was answered for good with an error (refused, failed, a reply
    /// that does not decode): in a healthy run every one succeeds.
    Answer,
    /// One of the store's audits (D1, D8, D18) saw a rule broken.
    Audit,
}

/// The failures of a run, in the order they were found.
#[derive(Default)]
struct Failures(Vec<(Check, String)>);

impl Failures {
    fn add(&mut self, check: Check, why: String) {
        self.0.push((check, why));
    }

    fn any(&self) -> bool {
        !self.0.is_empty()
    }

    /// The failure text (`None` if the run kept every promise) and the failed checks.
    fn finish(self) -> (Option<String>, Vec<Check>) {
        if self.0.is_empty() {
            return (None, Vec::new());
        }
        let text = self
            .0
            .iter()
            .map(|(_, w)| w.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let mut checks: Vec<Check> = self.0.into_iter().map(|(c, _)| c).collect();
        checks.sort();
        checks.dedup();
        (Some(text), checks)
    }
}

/// Runs `plan` to the end on a fresh single-threaded runtime with a paused clock.
pub fn run(plan: Plan) -> Outcome {
    if plan.nodes == 0 || plan.accounts < 2 || plan.rounds == 0 {
        return Outcome::refused(
            plan,
            "a plan needs at least 1 node, 2 accounts and 1 round".into(),
        );
    }
    count_panics();
    PANICS.with(|p| p.set(0));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread tokio runtime");
    let mut outcome = rt.block_on(async move {
        let _sim = seam::simulate(plan.seed, EPOCH);
        world(plan).await
    });
    // Dropped here, so that a panic in a task cancelled by the drop is counted too.
    drop(rt);
    let panics = PANICS.with(|p| p.get());
    if panics > 0 {
        let p = format!("{panics} task(s) panicked (tokio kept going; see stderr)");
        outcome.failure = Some(match outcome.failure.take() {
            Some(f) => format!("{f}; {p}"),
            None => p,
        });
        outcome.failed.push(Check::Panic);
        outcome.failed.sort();
        outcome.failed.dedup();
    }
    outcome
}

thread_local! {
    /// Panics on this thread since the run began: tokio catches a panicking task's panic and
    /// goes on, so a run counts them itself.
    static PANICS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Installs (once per process) a panic hook that counts panics per thread, then does what the
/// previous hook did.
fn count_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| p.set(p.get() + 1));
            previous(info);
        }));
    });
}

/// The store's faults for a round, drawn from the schedule.
/// Every number is drawn whether its fault is on or not, so that turning one fault off (as
/// shrinking does) leaves the rest of the schedule as it was.
fn faults(plan: &Plan, rng: &mut fastrand::Rng) -> Faults {
    let on = plan.faults;
    let ms = Duration::from_millis;
    let latency = (ms(0), ms(rng.u64(1..=20)));
    let fsync = (ms(rng.u64(0..=1)), ms(rng.u64(2..=10)));
    let transient = rng.f64() * 0.03;
    let lost_reply = rng.f64() * 0.02;
    let none = (ms(0), ms(0));
    Faults {
        latency: if on.latency { latency } else { none },
        fsync: if on.latency { fsync } else { none },
        transient: if on.transient { transient } else { 0.0 },
        lost_reply: if on.lost_reply { lost_reply } else { 0.0 },
        disk_full: false,
    }
}

/// What a run drives: the bank and the other [workloads](crate::workload).
#[derive(Clone)]
struct Workloads {
    bank: Bank,
    /// The transfers acknowledged so far.
    acked: Arc<Mutex<BTreeSet<u32>>>,
    /// Transfers answered for good with an error.
    bank_errors: Errors,
    counters: Counters,
    orders: Orders,
    timers: Timers,
}

impl Workloads {
    fn new(plan: &Plan) -> Workloads {
        Workloads {
            bank: Bank {
                accounts: plan.accounts,
                transfers: plan.transfers,
                initial: 1_000,
                concurrency: 8,
                seed: plan.seed,
                first: 0,
                first_account: 0,
            },
            acked: Arc::default(),
            bank_errors: Errors::default(),
            counters: Counters::new(plan.seed, 3, plan.calls),
            orders: Orders::new(plan.seed, plan.orders),
            timers: Timers::new(plan.seed, plan.timers),
        }
    }

    /// Every workload's actors, registered on a node.
    fn register(&self, builder: RuntimeBuilder) -> RuntimeBuilder {
        let builder = Timers::register(Counters::register(Bank::register(builder)));
        self.orders.register(builder)
    }

    /// Drives, through `nodes`, every item of every workload up to round `round`'s share of
    /// `rounds` (all of them in the last) not acknowledged yet, spread `over`. Returns when all
    /// are acknowledged (or never, if the task is dropped first).
    async fn drive(self, nodes: Vec<Runtime>, round: u32, rounds: u32, over: Duration) {
        let upto = |n: u32| share(n, round, rounds);
        let bank = drive_bank(
            nodes.clone(),
            self.bank,
            upto(self.bank.transfers),
            over,
            (self.acked.clone(), self.bank_errors.clone()),
        );
        let (calls, orders, timers) = (
            upto(self.counters.calls),
            upto(self.orders.orders),
            upto(self.timers.timers),
        );
        futures::future::join4(
            bank,
            self.counters.drive(nodes.clone(), calls, over),
            self.orders.drive(nodes.clone(), orders, over),
            self.timers.drive(nodes, timers, over),
        )
        .await;
    }

    /// True while transfers of round `round`'s share (of `rounds`) are unacknowledged.
    fn bank_busy(&self, round: u32, rounds: u32) -> bool {
        let upto = share(self.bank.transfers, round, rounds);
        let acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        (0..upto).any(|i| !acked.contains(&i))
    }

    /// Counter calls, orders and timers acknowledged so far.
    fn acknowledged(&self) -> (usize, usize, usize) {
        (
            self.counters.answered(),
            self.orders.acknowledged(),
            self.timers.acknowledged(),
        )
    }

    /// The final node's part: drives what the rounds left through `rt`, checks every
    /// workload, then the bank ([`check_bank`], which shuts `rt` down). Returns the bank's
    /// report (if its check could run) and every other check that failed.
    async fn finish(
        &self,
        rt: &Runtime,
        store: &SimStore,
    ) -> (Option<FinalReport>, Vec<(Check, String)>) {
        self.clone()
            .drive(vec![rt.clone()], 0, 1, Duration::ZERO)
            .await;
        let mut failed = Vec::new();
        if let Err(e) = self.bank_errors.check() {
            failed.push((Check::Answer, format!("bank: {e}")));
        }
        if let Err(e) = self.counters.check(store) {
            failed.push((Check::Linearizable, e));
        }
        if let Err(e) = self.orders.check(store) {
            failed.push((Check::Saga, e));
        }
        if let Err(e) = self.timers.check(rt).await {
            failed.push((Check::Timers, e));
        }
        let acked = self.acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // The accounts are not opened again: their openings were acknowledged in the first
        // round, and must have survived every fault since.
        match check_bank(rt, &self.bank, &acked).await {
            Ok(report) => (Some(report), failed),
            Err(e) => {
                failed.push((Check::Run, format!("the final check failed: {e}")));
                (None, failed)
            }
        }
    }
}

/// The items of `n` that round `round` of `rounds` drives: `0..share`. Each round drives its
/// own slice (and what earlier rounds left), so that its crash or power loss lands under load,
/// not on work already done; the last drives them all.
fn share(n: u32, round: u32, rounds: u32) -> u32 {
    n.div_ceil(rounds).saturating_mul(round + 1).min(n)
}

/// A node: a runtime on the shared store, tuned for short simulated rounds.
async fn start_node(store: &SimStore, name: String, work: &Workloads) -> Result<Runtime, String> {
    let mut last = String::new();
    // A start reads the store; under injected failures it may take a few tries.
    for _ in 0..100 {
        let started = work
            .register(Runtime::builder().store(Arc::new(store.clone()) as Arc<dyn Store>))
            .configure(|c| {
                c.node = name.clone();
                c.lease_ttl = Duration::from_secs(3);
                c.visibility = Duration::from_secs(5);
                c.ask_timeout = Duration::from_secs(20);
                c.shutdown_timeout = Duration::from_secs(5);
                c.retry = Retry {
                    initial: Duration::from_millis(20),
                    max: Duration::from_secs(2),
                    max_attempts: 8,
                };
                // Small, so that every run snapshots and trims many times.
                c.compaction = Compaction {
                    every_entries: Some(6),
                    every_bytes: None,
                    keep: 2,
                };
            })
            .start()
            .await;
        match started {
            Ok(rt) => return Ok(rt),
            Err(e) => {
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Err(format!("node {name} could not start: {last}"))
}

/// Something that happens to a round, at a moment drawn from the schedule.
enum Event {
    /// The disk fills (true) or is freed (false).
    DiskFull(bool),
    /// Node `n`'s connection to the store stalls for a while.
    Stall(usize, Duration),
    /// Node `n` crashes (the others take its actors over once its leases expire).
    Crash(usize),
    /// The store loses power under the running nodes (a server restarted, an embedded store
    /// reopened after a failure): what was not synced is gone, requests in flight fail.
    PowerLoss,
}

/// Starts every transfer below `upto` not yet acknowledged, one after another spread `over` the
/// round, retrying each until it is acknowledged; records the acknowledged ones (and those
/// answered for good with an error, not retried). Transfer `i` is asked through node
/// `i % nodes`. Runs until each is answered or the task is dropped.
async fn drive_bank(
    nodes: Vec<Runtime>,
    bank: Bank,
    upto: u32,
    over: Duration,
    (acked, errors): (Arc<Mutex<BTreeSet<u32>>>, Errors),
) {
    let pending: Vec<u32> = {
        let a = acked.lock().unwrap_or_else(|p| p.into_inner());
        bank.ids().filter(|i| *i < upto && !a.contains(i)).collect()
    };
    paced(pending, over, |i| {
        let (rt, acked, errors) = (
            nodes[i as usize % nodes.len()].clone(),
            acked.clone(),
            errors.clone(),
        );
        async move {
            loop {
                match bank.start(&rt, i).await {
                    Ok(_) => {
                        acked.lock().unwrap_or_else(|p| p.into_inner()).insert(i);
                        break;
                    }
                    Err(BankError::Ask(e)) if final_answer(&e) => {
                        errors.push(format!("transfer t{i}: {e}"));
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
    })
    .await;
}

async fn world(plan: Plan) -> Outcome {
    let began = tokio::time::Instant::now();
    let mut rng = fastrand::Rng::with_seed(plan.seed ^ 0x005e_ed0f_100a);
    let store = match SimStore::new_partitioned(plan.seed, faults(&plan, &mut rng), plan.partitions)
    {
        Ok(s) => s,
        Err(e) => return Outcome::refused(plan, e.to_string()),
    };
    store.set_bugs(plan.bugs);
    let mut rotten = false;
    let work = Workloads::new(&plan);
    let (mut crashes, mut power_losses, mut stalls) = (0, 0, 0);
    let (mut node_crashes, mut busy_kills, mut rejections) = (0, 0, 0);
    let mut largest_skew_ms = 0;
    // Drawn apart from the schedule, so that turning skew off leaves the rest as it was.
    let mut skews = fastrand::Rng::with_seed(plan.seed ^ 0x05ce_3000);
    let mut failures = Failures::default();
    for round in 0..plan.rounds {
        let round_faults = faults(&plan, &mut rng);
        store.set_faults(round_faults);
        let mut nodes = Vec::new();
        let most = i64::try_from(MAX_SKEW.as_millis()).unwrap_or(i64::MAX);
        for n in 0..plan.nodes {
            let link = store.link();
            let skew = skews.i64(-most..=most);
            let skew = if plan.faults.skew { skew } else { 0 };
            largest_skew_ms = largest_skew_ms.max(skew.unsigned_abs());
            // The node's runtime keeps the skew it was started with for all its tasks.
            let node = seam::skewed(skew, start_node(&link, format!("node-{round}-{n}"), &work));
            match node.await {
                Ok(rt) => nodes.push((rt, link)),
                Err(e) => {
                    failures.add(Check::Run, e);
                    break;
                }
            }
        }
        if failures.any() {
            break;
        }
        if round == 0 {
            // The accounts are opened (and acknowledged) before the first fault: a power loss
            // that took an opening back shows in the books.
            until_ok(|| work.bank.open_accounts(&nodes[0].0)).await;
        }
        let clients: Vec<Runtime> = nodes.iter().map(|(rt, _)| rt.clone()).collect();
        // What happens to the round, drawn whether each fault is on or not (see `faults`).
        let mut run_for = Duration::from_millis(rng.u64(100..=2_000));
        let driver = tokio::spawn(work.clone().drive(clients, round, plan.rounds, run_for));
        let (fill, fill_at, fill_lasts) = (
            rng.u8(0..4) == 0,
            run_for.mul_f64(rng.f64()),
            Duration::from_millis(rng.u64(50..=1_000)),
        );
        let (stall, stall_node, stall_at, stall_lasts) = (
            rng.u8(0..2) == 0,
            rng.usize(..nodes.len()),
            run_for.mul_f64(rng.f64()),
            // Longer than the lease (3 s) and the message visibility (5 s), sometimes.
            Duration::from_millis(rng.u64(2_000..=8_000)),
        );
        let (crash, crash_node, crash_at) = (
            rng.u8(0..4) == 0,
            rng.usize(..nodes.len()),
            run_for.mul_f64(rng.f64()),
        );
        let (mid_power, mid_power_at) = (rng.u8(0..6) == 0, run_for.mul_f64(rng.f64()));
        let mut events = Vec::new();
        if plan.faults.node_crash && crash && nodes.len() > 1 {
            events.push((crash_at, Event::Crash(crash_node)));
        }
        if plan.faults.power_loss && mid_power {
            events.push((mid_power_at, Event::PowerLoss));
        }
        if plan.faults.disk_full && fill {
            events.push((fill_at, Event::DiskFull(true)));
            events.push((fill_at + fill_lasts, Event::DiskFull(false)));
        }
        if plan.faults.stall && stall {
            events.push((stall_at, Event::Stall(stall_node, stall_lasts)));
            // Long enough for the others to take its actors over, and for what it sent
            // during the stall to arrive after.
            run_for = run_for.max(stall_at + stall_lasts + Duration::from_secs(2));
        }
        events.sort_by_key(|(at, _)| *at);
        let mut dead = Vec::new();
        let began = tokio::time::Instant::now();
        for (at, event) in events {
            tokio::time::sleep_until(began + at).await;
            match event {
                Event::DiskFull(full) => store.set_faults(Faults {
                    disk_full: full,
                    ..round_faults
                }),
                Event::Stall(n, d) => {
                    nodes[n].1.stall(d);
                    stalls += 1;
                }
                Event::Crash(n) => {
                    if !dead.contains(&n) {
                        kill(&nodes[n], &mut rejections).await;
                        dead.push(n);
                        node_crashes += 1;
                    }
                }
                Event::PowerLoss => {
                    store.power_loss();
                    power_losses += 1;
                }
            }
        }
        tokio::time::sleep_until(began + run_for).await;
        if work.bank_busy(round, plan.rounds) {
            busy_kills += 1;
        }
        driver.abort();
        match driver.await {
            Err(e) if e.is_panic() => {
                failures.add(Check::Panic, format!("the client panicked: {e}"))
            }
            // Cancelled on purpose (a killed process's client goes with it), or done.
            _ => {}
        }
        for (n, node) in nodes.iter().enumerate() {
            if !dead.contains(&n) {
                kill(node, &mut rejections).await;
            }
        }
        drop(nodes);
        let (power, rot) = (rng.u8(0..3) == 0, rng.u8(0..2) == 0);
        if plan.faults.power_loss && power {
            store.power_loss();
            power_losses += 1;
        } else {
            store.crash();
            crashes += 1;
        }
        if plan.faults.rot && !rotten && rot {
            // At most once: with two snapshots of one actor rotten, nothing could recover it.
            rotten = store.rot_a_snapshot().is_some();
        }
    }
    // What the rounds got acknowledged (the final node then drives the rest).
    let acknowledged = (
        work.acked.lock().unwrap_or_else(|p| p.into_inner()).len(),
        work.acknowledged(),
    );
    let mut report = None;
    if !failures.any() {
        store.set_faults(Faults::default());
        match start_node(&store, "node-final".into(), &work).await {
            Err(e) => failures.add(Check::Run, e),
            Ok(rt) => {
                let checked = tokio::select! {
                    biased;
                    r = tokio::time::timeout(FINAL_LIMIT, work.finish(&rt, &store)) => r,
                    parked = parked(&rt) => {
                        rt.kill().await;
                        Ok((Some(FinalReport { parked, ..FinalReport::default() }), Vec::new()))
                    }
                };
                match checked {
                    Err(_) => {
                        failures.add(
                            Check::Stuck,
                            format!(
                                "the final check did not finish within {} s of simulated time",
                                FINAL_LIMIT.as_secs()
                            ),
                        );
                        rt.kill().await;
                    }
                    Ok((r, failed)) => {
                        for (check, why) in failed {
                            failures.add(check, why);
                        }
                        match r {
                            Some(r) => {
                                broken(&r, &mut failures);
                                report = Some(r);
                            }
                            // The bank's check could not run to its shutdown.
                            None => rt.kill().await,
                        }
                    }
                }
                rejections += rt.metrics().rejections;
                if rejections > 0 && !failures.any() {
                    // The workloads' handlers refuse only what should never reach them: the
                    // bank's Start, Debited or Credited applied a second time (rule D6), or an
                    // account opened twice (the others refuse nothing).
                    failures.add(
                        Check::Refused,
                        format!(
                            "{rejections} message(s) refused by a handler: a message was applied twice"
                        ),
                    );
                }
            }
        }
    }
    let violations = store.violations();
    if !violations.is_empty() {
        failures.add(
            Check::Audit,
            format!(
                "the store's audit saw a rule broken: {}",
                violations.join("; ")
            ),
        );
    }
    let (failure, failed) = failures.finish();
    let recent = if failure.is_some() {
        store.recent()
    } else {
        Vec::new()
    };
    Outcome {
        plan,
        trace: store.trace_hash(),
        events: store.events(),
        simulated_ms: u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
        crashes,
        power_losses,
        stalls,
        node_crashes,
        largest_skew_ms,
        busy_kills,
        acknowledged: acknowledged.0,
        workloads_acknowledged: acknowledged.1,
        stats: store.stats(),
        report,
        failure,
        failed,
        recent,
    }
}

/// Returns the parked actors once there are any (never, in a healthy run).
async fn parked(rt: &Runtime) -> Vec<String> {
    loop {
        tokio::time::sleep(PARKED_CHECK).await;
        if let Ok(p) = rt.parked().await
            && !p.is_empty()
        {
            return p
                .into_iter()
                .map(|(a, p)| format!("{a}: {}", p.reason))
                .collect();
        }
    }
}

/// Crashes a node: its connection is cut first (nothing it sent that has not arrived yet will),
/// then every task of its runtime is dropped. Adds what its handlers refused to `rejections`.
async fn kill((rt, link): &(Runtime, SimStore), rejections: &mut u64) {
    link.sever();
    *rejections += rt.metrics().rejections;
    rt.kill().await;
}

/// Records what the final report says is broken, if anything.
fn broken(r: &FinalReport, failures: &mut Failures) {
    if !r.lost.is_empty() {
        failures.add(
            Check::Lost,
            format!("acknowledged transfers lost: {:?}", r.lost),
        );
    }
    if let Some(v) = &r.verify_error {
        failures.add(Check::Books, format!("the books do not balance: {v}"));
    }
    if !r.parked.is_empty() {
        failures.add(Check::Parked, format!("actors parked: {:?}", r.parked));
    }
    if let Some(j) = &r.journal_error {
        failures.add(Check::Journal, format!("a journal is broken: {j}"));
    }
}
