//! `loom`: look into, check and benchmark Loom stores.

mod bench;
mod journal;
mod output;
mod store;
mod torture;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use loom_core::Seq;

use output::Failure;
use store::{StoreUrl, open_existing};

#[derive(Parser)]
#[command(
    name = "loom",
    version,
    about = "Inspect, verify and benchmark Loom stores"
)]
struct Cli {
    /// Key prefix on a Redis store (the runtime's default is `loom`).
    #[arg(long, global = true, default_value = "loom")]
    redis_prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Journals: list, show, verify.
    Journal {
        /// The store: `embedded:PATH`, a directory, or `redis://host[:port]`.
        #[arg(long, global = true, default_value = "./loom-data")]
        store: String,
        #[command(subcommand)]
        command: JournalCommand,
    },
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
        /// One JSON object per scenario instead of a table.
        #[arg(long)]
        json: bool,
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
        /// One JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Internal: one child of `loom torture`.
    #[command(hide = true)]
    TortureChild {
        #[arg(long)]
        store: String,
        #[command(flatten)]
        shape: torture::Shape,
        /// Check instead of run: the file lists the acknowledged transfers.
        #[arg(long = "final")]
        final_check: Option<std::path::PathBuf>,
    },
    /// Internal: one activation run of `loom bench recover`, in its own process.
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

#[derive(Subcommand)]
enum JournalCommand {
    /// Every actor with a journal: highest seq, trim point, snapshots.
    Ls,
    /// The entries of one actor's journal, one JSON object per line.
    Show {
        /// The actor, as `kind/key`.
        actor: String,
        /// First seq to show.
        #[arg(long, default_value_t = 1)]
        from: Seq,
        /// Last seq to show.
        #[arg(long, default_value_t = Seq::MAX)]
        to: Seq,
    },
    /// Reads every entry and snapshot and checks it (checksums, numbering, no gaps).
    Verify {
        /// Only this actor, as `kind/key`.
        actor: Option<String>,
    },
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Journal { store, command } => {
            let opened = open_existing(&StoreUrl::parse(&store, &cli.redis_prefix)?).await?;
            let s = &*opened.store;
            match command {
                JournalCommand::Ls => journal::ls(s).await,
                JournalCommand::Show { actor, from, to } => {
                    journal::show(s, &actor, from, to).await
                }
                JournalCommand::Verify { actor } => journal::verify(s, actor.as_deref()).await,
            }
        }
        Command::Bench {
            scenario,
            store,
            actors,
            entries,
            payload,
            json,
        } => {
            let settings = bench::Settings {
                store,
                actors,
                entries,
                payload,
                json,
            };
            bench::run(scenario, settings).await
        }
        Command::Torture {
            backend,
            kills,
            seed,
            shape,
            json,
        } => {
            tokio::task::spawn_blocking(move || torture::run(backend, kills, seed, shape, json))
                .await?
        }
        Command::TortureChild {
            store,
            shape,
            final_check,
        } => {
            torture::child(
                &StoreUrl::parse(&store, &cli.redis_prefix)?,
                shape,
                final_check.as_deref(),
            )
            .await
        }
        Command::BenchChild { store, key, times } => {
            bench::child(&StoreUrl::parse(&store, &cli.redis_prefix)?, &key, times).await
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
