//! `loom-sim`: the real Loom runtime under seeded crashes, power losses and store faults, on a
//! simulated clock; every run replayable from its seed.
//!
//! ```text
//! loom-sim run --seed 42                 # one run; prints its trace hash and verdict
//! loom-sim explore --runs 500 --seconds 60   # many seeds; failing ones shrunk and printed
//! loom-sim explore --seconds 30 --bug ack-before-fsync   # prove a re-introduced bug is found
//! ```

use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use loom_sim::run::{Enabled, Outcome, Plan, run};
use loom_sim::store::Bugs;

#[derive(Parser)]
#[command(
    name = "loom-sim",
    version,
    about = "Deterministic simulation of the Loom runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one seed and prints its trace hash and what it found (the same seed always gives
    /// the same hash).
    Run {
        /// The seed.
        #[arg(long)]
        seed: u64,
        #[command(flatten)]
        shape: Shape,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Runs seeds one after another until `--runs` or `--seconds` is reached; prints every
    /// failing seed with the smallest plan that still fails one of its checks (faults dropped
    /// one by one, fewer nodes and rounds, each workload dropped or halved). Exits with failure
    /// if any seed failed.
    Explore {
        /// Most runs (default: no limit but time).
        #[arg(long)]
        runs: Option<u64>,
        /// Most wall-clock seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// First seed (default: drawn from the clock, and printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Stop at the first failing seed.
        #[arg(long)]
        first: bool,
        #[command(flatten)]
        shape: Shape,
    },
}

/// Faults a run may inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Fault {
    PowerLoss,
    Latency,
    Transient,
    LostReply,
    DiskFull,
    Rot,
    Stall,
    NodeCrash,
    /// Nodes' clocks off by up to 200 ms either way.
    Skew,
}

/// Bugs that can be switched back on, to show that the simulator finds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Bug {
    /// The store acknowledges a write before it is synced.
    AckBeforeFsync,
    /// Compaction trims through the snapshot it saves, past the oldest kept one.
    TrimPastOldestSnapshot,
    /// A turn commits without checking its fence.
    SkipFenceCheck,
    /// The relay enqueues outbox rows already moved (no high-water mark).
    AcceptDuplicateRelay,
    /// Scheduled messages are due in whole seconds, rounded down (timers fire early).
    TimersInWholeSeconds,
}

#[derive(clap::Args, Clone)]
struct Shape {
    /// Rounds, each ended by a crash or a power loss of every node [default: 4].
    #[arg(long)]
    rounds: Option<u32>,
    /// Nodes in every round (runtimes on the same store, each on its own connection)
    /// [default: 2].
    #[arg(long)]
    nodes: Option<u32>,
    /// Partitions of the store (messages between them go through the outbox and relay)
    /// [default: 2].
    #[arg(long)]
    partitions: Option<u32>,
    /// Accounts [default: 6].
    #[arg(long)]
    accounts: Option<u32>,
    /// Transfers (each round drives its share, as of every workload) [default: 60].
    #[arg(long)]
    transfers: Option<u32>,
    /// Calls to the counters, whose replies are checked for linearizability [default: 40].
    #[arg(long)]
    calls: Option<u32>,
    /// Orders of the saga [default: 8].
    #[arg(long)]
    orders: Option<u32>,
    /// Timers (scheduled messages and durable sleeps) [default: 12].
    #[arg(long)]
    timers: Option<u32>,
    /// Faults not to inject (comma-separated).
    #[arg(long, value_delimiter = ',')]
    without: Vec<Fault>,
    /// Bugs to switch on (comma-separated).
    #[arg(long, value_delimiter = ',')]
    bug: Vec<Bug>,
}

impl Shape {
    fn plan(&self, seed: u64) -> Plan {
        let off = |f| self.without.contains(&f);
        let d = Plan::new(seed);
        Plan {
            seed,
            rounds: self.rounds.unwrap_or(d.rounds),
            nodes: self.nodes.unwrap_or(d.nodes).max(1),
            partitions: self.partitions.unwrap_or(d.partitions),
            accounts: self.accounts.unwrap_or(d.accounts).max(2),
            transfers: self.transfers.unwrap_or(d.transfers),
            calls: self.calls.unwrap_or(d.calls),
            orders: self.orders.unwrap_or(d.orders),
            timers: self.timers.unwrap_or(d.timers),
            faults: Enabled {
                power_loss: !off(Fault::PowerLoss),
                latency: !off(Fault::Latency),
                transient: !off(Fault::Transient),
                lost_reply: !off(Fault::LostReply),
                disk_full: !off(Fault::DiskFull),
                rot: !off(Fault::Rot),
                stall: !off(Fault::Stall),
                node_crash: !off(Fault::NodeCrash),
                skew: !off(Fault::Skew),
            },
            bugs: Bugs {
                ack_before_fsync: self.bug.contains(&Bug::AckBeforeFsync),
                trim_past_oldest_snapshot: self.bug.contains(&Bug::TrimPastOldestSnapshot),
                skip_fence_check: self.bug.contains(&Bug::SkipFenceCheck),
                accept_duplicate_relay: self.bug.contains(&Bug::AcceptDuplicateRelay),
                timers_in_whole_seconds: self.bug.contains(&Bug::TimersInWholeSeconds),
            },
        }
    }
}

/// Runs a plan; a panic anywhere in it is a failure of that run, not of the simulator.
fn guarded(plan: Plan) -> Outcome {
    match std::panic::catch_unwind(AssertUnwindSafe(|| run(plan))) {
        Ok(o) => o,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".into());
            Outcome::panicked(plan, msg)
        }
    }
}

/// The command line that replays `plan`.
fn command_line(plan: &Plan) -> String {
    let mut s = format!(
        "loom-sim run --seed {} --rounds {} --nodes {} --partitions {} --accounts {} --transfers {} \
         --calls {} --orders {} --timers {}",
        plan.seed,
        plan.rounds,
        plan.nodes,
        plan.partitions,
        plan.accounts,
        plan.transfers,
        plan.calls,
        plan.orders,
        plan.timers
    );
    let f = plan.faults;
    let off: Vec<&str> = [
        (f.power_loss, "power-loss"),
        (f.latency, "latency"),
        (f.transient, "transient"),
        (f.lost_reply, "lost-reply"),
        (f.disk_full, "disk-full"),
        (f.rot, "rot"),
        (f.stall, "stall"),
        (f.node_crash, "node-crash"),
        (f.skew, "skew"),
    ]
    .into_iter()
    .filter(|(on, _)| !on)
    .map(|(_, name)| name)
    .collect();
    if !off.is_empty() {
        s.push_str(&format!(" --without {}", off.join(",")));
    }
    let b = plan.bugs;
    let bugs: Vec<&str> = [
        (b.ack_before_fsync, "ack-before-fsync"),
        (b.trim_past_oldest_snapshot, "trim-past-oldest-snapshot"),
        (b.skip_fence_check, "skip-fence-check"),
        (b.accept_duplicate_relay, "accept-duplicate-relay"),
        (b.timers_in_whole_seconds, "timers-in-whole-seconds"),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .map(|(_, name)| name)
    .collect();
    if !bugs.is_empty() {
        s.push_str(&format!(" --bug {}", bugs.join(",")));
    }
    s
}

fn summary(o: &Outcome) -> String {
    let verdict = if o.ok() { "ok" } else { "FAILED" };
    let (done, refused) = o.report.as_ref().map_or((0, 0), |r| (r.done, r.refused));
    format!(
        "seed {}: {verdict}; trace {:016x} ({} requests, {:.1} s simulated); {} crashes, {} power \
         losses, {} stalls, {} node crashes, {} rounds ended under load; acknowledged in the \
         rounds: {} transfers ({done} done, {refused} refused in the end), {} counter calls, {} \
         orders, {} timers; injected {} transient errors, {} lost replies, {} full-disk refusals",
        o.plan.seed,
        o.trace,
        o.events,
        o.simulated_ms as f64 / 1000.0,
        o.crashes,
        o.power_losses,
        o.stalls,
        o.node_crashes,
        o.busy_kills,
        o.acknowledged,
        o.workloads_acknowledged.0,
        o.workloads_acknowledged.1,
        o.workloads_acknowledged.2,
        o.stats.transient,
        o.stats.lost_reply,
        o.stats.disk_full,
    )
}

/// Smaller plans that might still fail: each fault dropped, a node fewer, a round fewer, each
/// workload dropped or halved.
fn smaller(p: &Plan) -> Vec<Plan> {
    let mut out = Vec::new();
    let f = p.faults;
    for (on, off) in [
        (
            f.power_loss,
            Enabled {
                power_loss: false,
                ..f
            },
        ),
        (
            f.lost_reply,
            Enabled {
                lost_reply: false,
                ..f
            },
        ),
        (
            f.transient,
            Enabled {
                transient: false,
                ..f
            },
        ),
        (
            f.disk_full,
            Enabled {
                disk_full: false,
                ..f
            },
        ),
        (
            f.latency,
            Enabled {
                latency: false,
                ..f
            },
        ),
        (f.rot, Enabled { rot: false, ..f }),
        (f.skew, Enabled { skew: false, ..f }),
        (f.stall, Enabled { stall: false, ..f }),
        (
            f.node_crash,
            Enabled {
                node_crash: false,
                ..f
            },
        ),
    ] {
        if on {
            out.push(Plan { faults: off, ..*p });
        }
    }
    if p.nodes > 1 {
        out.push(Plan {
            nodes: p.nodes - 1,
            ..*p
        });
    }
    if p.rounds > 1 {
        out.push(Plan {
            rounds: p.rounds - 1,
            ..*p
        });
    }
    // A workload dropped whole, then halved.
    for (n, with) in [
        (
            p.calls,
            (|p, n| Plan { calls: n, ..p }) as fn(Plan, u32) -> Plan,
        ),
        (p.orders, |p, n| Plan { orders: n, ..p }),
        (p.timers, |p, n| Plan { timers: n, ..p }),
        (p.transfers, |p, n| Plan { transfers: n, ..p }),
    ] {
        if n > 0 {
            out.push(with(*p, 0));
        }
        if n > 1 {
            out.push(with(*p, n / 2));
        }
    }
    out
}

/// Greedily shrinks a failing plan: takes the first smaller plan that still fails one of the
/// checks the original failed (one that fails only differently is another bug), until none
/// does. Returns the smallest failing outcome found.
fn shrink(failing: Outcome) -> Outcome {
    let target = failing.failed.clone();
    let mut best = failing;
    'outer: loop {
        for p in smaller(&best.plan) {
            let o = guarded(p);
            if o.failed.iter().any(|c| target.contains(c)) {
                best = o;
                continue 'outer;
            }
        }
        return best;
    }
}

fn print_failure(o: &Outcome) {
    println!("  {}", o.failure.as_deref().unwrap_or("?"));
    if !o.recent.is_empty() {
        println!("  last store requests:");
        for line in &o.recent {
            println!("    {line}");
        }
    }
}

fn main() -> ExitCode {
    // Quiet unless RUST_LOG asks: a simulated run's warnings (a store that fails, a lease
    // lost) are the faults it injects, not news.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { seed, shape, json } => {
            let o = guarded(shape.plan(seed));
            if json {
                match serde_json::to_string_pretty(&o) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("loom-sim: could not print the outcome: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                println!("{}", summary(&o));
                if !o.ok() {
                    print_failure(&o);
                }
            }
            if o.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Explore {
            runs,
            seconds,
            seed,
            first,
            shape,
        } => {
            let start = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_secs())
            });
            println!("exploring from seed {start} for at most {seconds} s");
            let began = Instant::now();
            let budget = Duration::from_secs(seconds);
            let (mut ran, mut failed, mut requests, mut simulated_ms) = (0u64, 0u64, 0u64, 0u64);
            let mut seed = start;
            while began.elapsed() < budget && runs.is_none_or(|n| ran < n) {
                let o = guarded(shape.plan(seed));
                ran += 1;
                requests += o.events;
                simulated_ms += o.simulated_ms;
                if !o.ok() {
                    failed += 1;
                    println!("{}", summary(&o));
                    print_failure(&o);
                    let small = shrink(o);
                    println!(
                        "  smallest failing plan ({} requests): {}",
                        small.events,
                        command_line(&small.plan)
                    );
                    print_failure(&small);
                    if first {
                        break;
                    }
                }
                seed = seed.wrapping_add(1);
            }
            let secs = began.elapsed().as_secs_f64();
            println!(
                "{ran} runs ({:.1} runs/s, {:.0} simulated s, {requests} store requests) in {secs:.1} s: {failed} failed",
                ran as f64 / secs,
                simulated_ms as f64 / 1000.0,
            );
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
