//! `loom-dev`: Loom's benchmarks and its kill -9 torture, for developers and CI. Kept out of
//! the `loom` command so that the binary users run links neither the test kit nor the
//! benchmark workloads.

/// jemalloc, not the system's allocator: under load a node allocates and frees on every worker
/// thread, and glibc's malloc then took about 44% of its CPU (BENCHMARKS.md, "loom-dev on
/// jemalloc").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod bench;
mod node;
mod nodes;
mod torture;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use loom_cli::output::{self, Failure};
use loom_cli::store::{self, StoreUrl};

#[derive(Parser)]
#[command(
    name = "loom-dev",
    version,
    about = "Benchmark and torture Loom stores (for developers; users run `loom`)"
)]
struct Cli {
    #[command(flatten)]
    common: loom_cli::Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks, each measured against a same-run baseline.
    Bench {
        /// The scenario.
        #[arg(value_enum)]
        scenario: bench::Scenario,
        /// The store (default: a fresh temporary embedded store).
        #[arg(long)]
        store: Option<String>,
        /// Actors (append-concurrent) or accounts (bank).
        #[arg(long)]
        actors: Option<usize>,
        /// Appends (append-seq), appends per actor (append-concurrent), history length
        /// (recover) or transfers (bank).
        #[arg(long)]
        entries: Option<u64>,
        /// Bytes of payload per entry.
        #[arg(long, default_value_t = 256)]
        payload: usize,
        /// Seconds of measured time for the append scenarios (when --entries is not given)
        /// and for each engine of the bake-off.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Runs of the selected scenarios, one after another; with more than one, a table of
        /// min / median / max per scenario follows.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Partition counts: the engine bake-off measures each (default 1,2); `bank` on an
        /// embedded store runs once per count, each on a fresh store of that many partitions
        /// (default: one run on the store as it is, a new one getting the machine's cores).
        #[arg(long, value_delimiter = ',')]
        partitions: Option<Vec<usize>>,
        /// Seconds over which the sleepers' wake-ups are spread.
        #[arg(long, default_value_t = 60.0)]
        window: f64,
        /// Seconds from the first sleeper's message to the window's start, for putting every
        /// sleeper to sleep before the first wakes (default: 5, or 0.5 ms per sleeper if more).
        #[arg(long)]
        lead: Option<f64>,
        /// `bank` on a Redis or PostgreSQL store run by this many node processes (`1,3`: one
        /// node, then three), driven by a client in this process.
        #[arg(long, value_delimiter = ',')]
        nodes: Option<Vec<usize>>,
        /// `bank`'s second run at this many invocations/s instead of half the first run's
        /// peak, so that builds of different peaks compare at one rate (`bank-paced`).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// The bank, killed with SIGKILL at random moments and restarted, then checked: every
    /// acknowledged transfer applied exactly once, balances conserved, journals gapless.
    Torture {
        /// The store to torture.
        #[arg(long, value_enum, default_value = "embedded")]
        backend: torture::Backend,
        /// How many kills.
        #[arg(long, default_value_t = 20)]
        kills: u32,
        /// Seed of the kill schedule (printed at the start; pass it to reproduce a run).
        #[arg(long)]
        seed: Option<u64>,
        #[command(flatten)]
        shape: torture::Shape,
    },
    /// The bank on several node processes sharing a private Redis or PostgreSQL server, a
    /// random node killed with SIGKILL and restarted every few seconds and one more added
    /// halfway, then checked: failover times, nothing lost or applied twice, journals gapless,
    /// every node listed live once.
    TortureNodes {
        /// The server the nodes share.
        #[arg(long, value_enum, default_value = "redis")]
        backend: nodes::Backend,
        #[command(flatten)]
        plan: nodes::Plan,
    },
    /// Internal: one node process of `loom-dev torture-nodes` and `bench bank --nodes`; runs
    /// until its stdin closes.
    #[command(hide = true)]
    Node {
        #[arg(long)]
        store: String,
        #[arg(long)]
        node: String,
        #[arg(long)]
        lease_ms: u64,
    },
    /// Internal: one child of `loom-dev torture`.
    #[command(hide = true)]
    TortureChild {
        #[arg(long)]
        store: String,
        #[command(flatten)]
        shape: torture::Shape,
        /// Check instead of run: the file lists the acknowledged transfers.
        #[arg(long = "final")]
        final_check: Option<PathBuf>,
    },
    /// Internal: one activation run of `loom-dev bench recover`, in its own process.
    #[command(hide = true)]
    BenchChild {
        #[arg(long)]
        store: String,
        #[arg(long)]
        key: String,
        #[arg(long)]
        times: usize,
    },
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let ns = cli.common.namespace();
    let url = |s: &str| StoreUrl::parse(s, &ns);
    let json = cli.common.json;
    match cli.command {
        Command::Bench {
            scenario,
            store,
            actors,
            entries,
            payload,
            seconds,
            repeat,
            partitions,
            window,
            lead,
            nodes,
            rate,
        } => {
            let settings = bench::Settings {
                store,
                actors,
                entries,
                payload,
                json,
                seconds,
                repeat,
                partitions,
                window,
                lead,
                nodes,
                rate,
            };
            bench::run(scenario, settings).await
        }
        Command::Torture {
            backend,
            kills,
            seed,
            shape,
        } => {
            tokio::task::spawn_blocking(move || torture::run(backend, kills, seed, shape, json))
                .await?
        }
        Command::TortureNodes { backend, plan } => nodes::run(backend, plan, json).await,
        Command::Node {
            store,
            node,
            lease_ms,
        } => node::node(&url(&store)?, &node, lease_ms).await,
        Command::TortureChild {
            store,
            shape,
            final_check,
        } => torture::child(&url(&store)?, shape, final_check.as_deref()).await,
        Command::BenchChild { store, key, times } => bench::child(&url(&store)?, &key, times).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.common.json;
    loom_cli::main_with("loom-dev", json, run(cli))
}
