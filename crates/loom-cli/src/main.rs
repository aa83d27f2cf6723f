//! `loom`: look into Loom stores.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use futures::TryStreamExt;
use loom_core::{ActorId, EmbeddedStore, JournalStore, Seq, SeqRange, StoreError};

#[derive(Parser)]
#[command(name = "loom", version, about = "Inspect and verify Loom journals")]
struct Cli {
    /// The store: `embedded:PATH` or a directory path.
    #[arg(long, global = true, default_value = "./loom-data")]
    store: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Journals: list, show, verify.
    #[command(subcommand)]
    Journal(JournalCommand),
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

/// A failure to report to the user, with what to do about it.
struct Failure(String);

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure(e.to_string())
    }
}

/// Prints one line of output. A reader that went away (`loom … | head`) ends the program quietly
/// and successfully, as Unix tools do.
fn out(line: impl std::fmt::Display) -> Result<(), Failure> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Failure(format!("cannot write output: {e}"))),
    }
}

fn open(store: &str) -> Result<EmbeddedStore, Failure> {
    let path = PathBuf::from(store.strip_prefix("embedded:").unwrap_or(store));
    if store.contains("://") {
        return Err(Failure(format!(
            "store URL {store:?} is not supported by this build; use embedded:PATH or a directory"
        )));
    }
    if !path.exists() {
        return Err(Failure(format!(
            "no store at {}: the directory does not exist (pass --store DIR)",
            path.display()
        )));
    }
    Ok(EmbeddedStore::open_existing(&path)?)
}

fn parse_actor(s: &str) -> Result<ActorId, Failure> {
    s.parse()
        .map_err(|e| Failure(format!("bad actor id {s:?}: {e} (expected kind/key)")))
}

async fn all_actors(store: &EmbeddedStore) -> Result<Vec<ActorId>, Failure> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store.list_actors(after.as_ref(), 1000).await?;
        let Some(last) = page.last().cloned() else {
            break;
        };
        out.extend(page);
        after = Some(last);
    }
    Ok(out)
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let store = open(&cli.store)?;
    match cli.command {
        Command::Journal(JournalCommand::Ls) => {
            let actors = all_actors(&store).await?;
            let width = actors
                .iter()
                .map(|a| a.as_str().len())
                .max()
                .unwrap_or(5)
                .max(5);
            out(format_args!(
                "{:<width$}  {:>10}  {:>10}  {:>10}  SNAPSHOTS",
                "ACTOR", "HIGHEST", "TRIMMED", "ENTRIES"
            ))?;
            for a in actors {
                let info = store.info(&a).await?;
                let snaps: Vec<String> = info.snapshots.iter().map(|s| s.to_string()).collect();
                out(format_args!(
                    "{:<width$}  {:>10}  {:>10}  {:>10}  {}",
                    a.as_str(),
                    info.highest,
                    info.trimmed_through,
                    info.len(),
                    if snaps.is_empty() {
                        "-".to_owned()
                    } else {
                        snaps.join(",")
                    }
                ))?;
            }
        }
        Command::Journal(JournalCommand::Show { actor, from, to }) => {
            let a = parse_actor(&actor)?;
            let info = store.info(&a).await?;
            if info.highest == 0 {
                return Err(Failure(format!("no journal for {a} in this store")));
            }
            let mut entries = store.read(&a, SeqRange::all().from(from).to(to));
            while let Some(e) = entries.try_next().await? {
                out(serde_json::to_string(&e).map_err(|e| Failure(e.to_string()))?)?;
            }
        }
        Command::Journal(JournalCommand::Verify { actor }) => {
            let actors = match actor {
                Some(a) => vec![parse_actor(&a)?],
                None => all_actors(&store).await?,
            };
            let mut problems = 0;
            let mut checked = 0u64;
            for a in &actors {
                match verify_one(&store, a).await {
                    Ok(n) => checked += n,
                    Err(e) => {
                        problems += 1;
                        eprintln!("{a}: {e}");
                    }
                }
            }
            if problems > 0 {
                return Err(Failure(format!(
                    "{problems} of {} journals failed verification",
                    actors.len()
                )));
            }
            out(format_args!(
                "ok: {} journals, {checked} entries verified",
                actors.len()
            ))?;
        }
    }
    Ok(())
}

async fn verify_one(store: &EmbeddedStore, a: &ActorId) -> Result<u64, StoreError> {
    let info = store.info(a).await?;
    let mut entries = store.read(a, SeqRange::all());
    let mut expect = info.trimmed_through + 1;
    while let Some(e) = entries.try_next().await? {
        if e.seq != expect {
            return Err(StoreError::Gap {
                actor: a.clone(),
                expected: expect,
                found: e.seq,
            });
        }
        expect += 1;
    }
    if expect != info.highest + 1 {
        return Err(StoreError::Gap {
            actor: a.clone(),
            expected: expect,
            found: info.highest + 1,
        });
    }
    for s in &info.snapshots {
        store.load_snapshot(a, *s).await?;
    }
    Ok(info.len())
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
