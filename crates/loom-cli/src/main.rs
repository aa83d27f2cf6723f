//! `loom`: look into, check, repair and move Loom stores, and serve Loom Studio over them.
//! (Benchmarks and the torture are `loom-dev`.)

mod actors;
mod admin;
mod cluster;
mod journal;
mod remote;
mod serve;
mod source;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, Parser, Subcommand};
use loom_core::Seq;

use loom_cli::output::{self, Failure};
use loom_cli::store::{Namespace, StoreUrl, open_existing, open_or_create};
use source::Source;

/// Why `memory:` is no target: what is written there is gone when `loom` exits.
const MEMORY_TARGET: &str = "memory: is gone when loom exits, so nothing written there is kept; name a directory, a Redis or a PostgreSQL store";

#[derive(Parser)]
#[command(
    name = "loom",
    version,
    about = "Inspect, verify, repair and move Loom stores, and serve Loom Studio over them"
)]
struct Cli {
    #[command(flatten)]
    common: loom_cli::Common,
    #[command(subcommand)]
    command: Command,
}

/// The store option shared by the commands that work on one store.
#[derive(clap::Args, Clone)]
struct StoreArg {
    /// The store: `embedded:PATH`, a directory, `redis://host[:port]` (also `rediss://`,
    /// `redis+unix:///path`; `?partitions=N` cuts a new store into partitions, `?replicas=N`
    /// makes every write wait for N replicas),
    /// `redis+cluster://host:port,host:port/` (a Redis Cluster) or `postgres://user@host/db`
    /// (`?partitions=32` cuts a new store into the partitions nodes own).
    #[arg(
        long,
        global = true,
        env = "LOOM_STORE",
        hide_env_values = true,
        default_value = "./loom-data"
    )]
    store: String,
    /// A running application's admin API instead of its store: `http://127.0.0.1:8080` (the
    /// bank's `--listen`, `loom serve`). For a store the application holds (an embedded one
    /// is locked by it): journal ls/show/stats, mailbox ls/show/cancel, deadletters
    /// ls/requeue/purge, parked ls/unpark. A write sends `LOOM_TOKEN` as its bearer token.
    #[arg(long, global = true, env = "LOOM_URL", hide_env_values = true)]
    url: Option<String>,
}

impl StoreArg {
    /// Picks between `--url` and `--store` when both have a value: a flag on the command line
    /// beats an environment variable (`LOOM_URL`, `LOOM_STORE`), and the store's default
    /// yields to a URL; both flags, or both variables, are refused.
    fn choose(
        &mut self,
        url: Option<ValueSource>,
        store: Option<ValueSource>,
    ) -> Result<(), Failure> {
        use ValueSource::{CommandLine, EnvVariable};
        // An empty LOOM_URL is no URL, as an empty LOOM_TOKEN is no token (an empty --url
        // typed on the command line is refused as not a URL).
        if url == Some(EnvVariable) && self.url.as_deref() == Some("") {
            self.url = None;
            return Ok(());
        }
        match (url, store) {
            (Some(CommandLine), Some(CommandLine)) => Err(Failure(
                "give --store or --url, not both: --url reaches a running application's admin API, --store opens the store itself".into(),
            )),
            (Some(EnvVariable), Some(EnvVariable)) => Err(Failure(
                "LOOM_URL and LOOM_STORE are both set\nwhat to do: unset one, or give --url or --store on the command line (it beats the environment)".into(),
            )),
            (Some(EnvVariable), Some(CommandLine)) => {
                self.url = None;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The admin API at `--url`, or else the store at `--store` (which must exist).
    async fn open(&self, ns: &Namespace) -> Result<Source, Failure> {
        match &self.url {
            Some(url) => Ok(Source::Remote(remote::Remote::new(url)?)),
            None => Ok(Source::Store(
                open_existing(&StoreUrl::parse(&self.store, ns)?).await?,
            )),
        }
    }

    /// The store at `--store`, for a command that works on the store itself only.
    fn store_url(&self, command: &str, ns: &Namespace) -> Result<StoreUrl, Failure> {
        if let Some(url) = &self.url {
            let shown = loom_cli::store::without_credentials(url);
            return Err(source::store_only(command, &shown));
        }
        StoreUrl::parse(&self.store, ns)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Journals: list, show, stats, verify, compact, delete.
    Journal {
        #[command(flatten)]
        store: StoreArg,
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// Dead letters: list, requeue.
    Deadletters {
        #[command(flatten)]
        store: StoreArg,
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Parked actors (stopped until their code is fixed): list, unpark.
    Parked {
        #[command(flatten)]
        store: StoreArg,
        #[command(subcommand)]
        command: ParkedCommand,
    },
    /// Mailboxes with waiting messages (of kinds no node hosts, say): list, show, cancel, bury.
    Mailbox {
        #[command(flatten)]
        store: StoreArg,
        #[command(subcommand)]
        command: MailboxCommand,
    },
    /// The nodes sharing a store: which are live, the kinds each hosts, and for each kind
    /// what waits, whether a live node hosts it, and which nodes own its partitions.
    Cluster {
        #[command(flatten)]
        store: StoreArg,
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// The embedded store itself: change its partition count.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// The embedded store's redo log: salvage one damaged in the middle, or gone.
    Redo {
        #[command(subcommand)]
        command: RedoCommand,
    },
    /// Writes every journal, snapshot and waiting message to a file (a versioned line format).
    /// Stop the runtimes using the store first: it copies a store at rest (a Redis or
    /// PostgreSQL store that lists live nodes is refused).
    Export {
        #[command(flatten)]
        store: StoreArg,
        /// The file to write (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Reads an export file into a store that holds none of its journals and no message in its
    /// mailboxes; checks the whole file first and writes nothing if anything is wrong with it.
    Import {
        #[command(flatten)]
        store: StoreArg,
        /// The export file.
        #[arg(long = "in")]
        input: PathBuf,
    },
    /// Serves the admin API (JSON) and Loom Studio, the web page that browses it, over a store:
    /// actors and their journals, the state at any seq, mailboxes, dead letters, parked
    /// actors; `/health` and `/metrics` (the store's gauges). Read only unless `--allow-writes`
    /// is given, and then a write needs the bearer token in `LOOM_TOKEN`. Runs until Ctrl-C.
    Serve {
        #[command(flatten)]
        store: StoreArg,
        /// The address to listen on (a public one only on a trusted network).
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: std::net::SocketAddr,
        /// Allow requeueing and purging dead letters, unparking actors and cancelling
        /// invocations (needs LOOM_TOKEN).
        #[arg(long)]
        allow_writes: bool,
        /// Longest a client may take to send a request's headers, or keep a connection idle,
        /// in milliseconds; its connection is closed after it.
        #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
        header_timeout_ms: u64,
        /// Most connections served at once (at most half the open-file limit, `ulimit -n`);
        /// more wait in the listen queue.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65_536))]
        max_connections: u64,
    },
    /// Copies every journal, snapshot and waiting message from one store to another, then
    /// verifies the copy. Stop the runtimes using the source first (a Redis or PostgreSQL
    /// source that lists live nodes is refused).
    Migrate {
        /// The source store.
        #[arg(long)]
        from: String,
        /// The target store (holding none of the source's journals, no message in its
        /// mailboxes).
        #[arg(long)]
        to: String,
    },
    /// Prints a completion script for a shell: `loom completions bash > /etc/bash_completion.d/loom`
    /// (also zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
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
    /// Counts per journal (or for one actor): entries kept, trim point, snapshots, messages waiting.
    Stats {
        /// Only this actor, as `kind/key`.
        actor: Option<String>,
        /// Also read every kept entry and snapshot and report their bytes: as JSON, and
        /// encoded as this build writes them (entries and snapshots over 4 KiB zstd-compressed
        /// when that is smaller). The second is an estimate of what they take stored: records
        /// written by a build before compression, or with it off, are stored as JSON.
        #[arg(long)]
        bytes: bool,
    },
    /// Reads every entry and snapshot and checks it (checksums, numbering, no gaps). Exits 1
    /// when it found damage, 2 when it found none but an error kept it from checking
    /// everything.
    Verify {
        /// Only this actor, as `kind/key`.
        actor: Option<String>,
    },
    /// Snapshots an actor's state (rebuilt from its journal, no code needed) and trims what the
    /// oldest kept snapshot covers.
    Compact {
        /// The actor, as `kind/key`.
        actor: String,
        /// Snapshots to keep.
        #[arg(long, default_value_t = 2)]
        keep: usize,
    },
    /// Deletes an actor's journal and snapshots (its seqs are never reused); refused while a
    /// node owns the actor's partition (stop it first).
    Delete {
        /// The actor, as `kind/key`.
        actor: String,
        /// Really delete.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Rewrites an embedded store with another partition count, offline (stop the app first):
    /// copies everything into a new store, compares, swaps it in, keeps the old one beside it
    /// as `DIR.before-repartition-<ms>`.
    Repartition {
        /// The data directory (`embedded:PATH` or a path).
        #[arg(long)]
        store: String,
        /// The new partition count (1 to 256).
        #[arg(long)]
        partitions: u32,
    },
}

#[derive(Subcommand)]
enum RedoCommand {
    /// Opens an embedded store refused for a redo log damaged in the middle, keeping the
    /// batches before the damage; the damaged bytes and all after them (acknowledged batches
    /// included) are moved to `loom.redo.damaged-<ms>`. Or one refused for a missing redo
    /// log, without what it held. Restore a backup instead if you can.
    Salvage {
        /// The data directory (`embedded:PATH` or a path).
        #[arg(long)]
        store: String,
        /// Really do it.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Nodes (live, or gone and not yet forgotten) with their kinds and last heartbeat; every
    /// kind a node announces or a mailbox holds, with its live hosts, its partitions' owners
    /// (each partition's with --json) and waiting mailboxes; the relay backlog of a partitioned
    /// store.
    Status {
        /// Also show this kind (repeatable), even if no node announces it.
        #[arg(long)]
        kind: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ParkedCommand {
    /// Every parked actor, with the reason, the message and step it stopped at, and when.
    Ls,
    /// Lets a parked actor run again: the message it stopped at runs again, its delivery count
    /// kept (fix the code first, or it parks again).
    Unpark {
        /// The actor, as `kind/key`.
        actor: String,
    },
}

#[derive(Subcommand)]
enum MailboxCommand {
    /// Actors with waiting messages: how many, and whether parked.
    Ls {
        /// Only actors of this kind.
        #[arg(long)]
        kind: Option<String>,
    },
    /// The messages waiting for one actor, in order: which is out (running or suspended),
    /// which are delayed, which are asked to be cancelled.
    Show {
        /// The actor, as `kind/key`.
        actor: String,
    },
    /// Asks that the invocation of a waiting message be cancelled: its next durable wait (a
    /// sleep, a wait for an event, an activity's backoff) ends with `StepError::Cancelled`, at
    /// once if it is suspended in one. On Redis and PostgreSQL it works while nodes run the
    /// actor (an embedded store is locked by the process that runs it).
    Cancel {
        /// The actor, as `kind/key`.
        actor: String,
        /// The message, by its id.
        #[arg(long, conflicts_with = "key", required_unless_present = "key")]
        message: Option<loom_core::MessageId>,
        /// The message, by the idempotency key it was sent with.
        #[arg(long)]
        key: Option<String>,
    },
    /// Moves the messages waiting (and due) for an actor to the dead letters, recording the
    /// failure for callers that retry with an idempotency key; refused while a node owns the
    /// actor's partition (that node runs its messages).
    Bury {
        /// The actor, as `kind/key`.
        actor: String,
        /// Why (kept with each dead letter).
        #[arg(
            long,
            default_value = "dead-lettered by an operator (loom mailbox bury)"
        )]
        reason: String,
        /// Really do it.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Dead letters, oldest first, with their reasons.
    Ls {
        /// Only those after this id.
        #[arg(long)]
        after: Option<u64>,
        /// At most this many (at least 1).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=i64::MAX as u64))]
        limit: u64,
    },
    /// Deletes dead letters for good: those given up on before `--before` (an RFC 3339 time in
    /// UTC, or an age such as `7d` or `36h` on this machine's clock), or all of them. A caller
    /// asking again with a purged message's idempotency key learns that it failed.
    Purge {
        /// Only those given up on before this: `2026-11-30T00:00:00Z` (UTC), or an age (`7d`).
        #[arg(long, conflicts_with = "id")]
        before: Option<String>,
        /// Only these (repeat the flag); also deletes one whose frame no longer decodes.
        #[arg(long)]
        id: Vec<u64>,
        /// Really delete.
        #[arg(long)]
        yes: bool,
    },
    /// Puts a dead letter back at the end of its mailbox. It runs again under a new id, from its
    /// first step; what its failed run sent is journaled again but not sent again.
    Requeue {
        /// Its id.
        id: u64,
    },
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let ns = cli.common.namespace();
    let url = |s: &str| StoreUrl::parse(s, &ns);
    let json = cli.common.json;
    match cli.command {
        Command::Journal { store, command } => {
            let source = store.open(&ns).await?;
            let s = &source;
            match command {
                JournalCommand::Ls => journal::ls(s, json).await,
                JournalCommand::Show { actor, from, to } => {
                    journal::show(s, &actor, from, to).await
                }
                JournalCommand::Stats { actor, bytes } => {
                    admin::stats(s, actor.as_deref(), bytes, json).await
                }
                JournalCommand::Verify { actor } => {
                    let opened = s.store("journal verify")?;
                    journal::verify(opened, actor.as_deref(), json).await
                }
                JournalCommand::Compact { actor, keep } => {
                    let store = &*s.store("journal compact")?.store;
                    admin::compact(store, &actor, keep, json).await
                }
                JournalCommand::Delete { actor, yes } => {
                    let store = &*s.store("journal delete")?.store;
                    admin::delete(store, &actor, yes, json).await
                }
            }
        }
        Command::Deadletters { store, command } => {
            let s = &store.open(&ns).await?;
            match command {
                DeadLetterCommand::Ls { after, limit } => {
                    // Parsed as at most u64::MAX: a usize on every platform Loom runs on.
                    admin::dead_letters(
                        s,
                        after,
                        usize::try_from(limit).unwrap_or(usize::MAX),
                        json,
                    )
                    .await
                }
                DeadLetterCommand::Requeue { id } => admin::requeue(s, id, json).await,
                DeadLetterCommand::Purge { before, id, yes } => {
                    admin::purge(s, before.as_deref(), &id, yes, json).await
                }
            }
        }
        Command::Parked { store, command } => {
            let s = &store.open(&ns).await?;
            match command {
                ParkedCommand::Ls => actors::parked(s, json).await,
                ParkedCommand::Unpark { actor } => actors::unpark(s, &actor, json).await,
            }
        }
        Command::Mailbox { store, command } => {
            let s = &store.open(&ns).await?;
            match command {
                MailboxCommand::Ls { kind } => actors::mailboxes(s, kind.as_deref(), json).await,
                MailboxCommand::Bury { actor, reason, yes } => {
                    let store = &*s.store("mailbox bury")?.store;
                    actors::bury(store, &actor, &reason, yes, json).await
                }
                MailboxCommand::Show { actor } => actors::show(s, &actor, json).await,
                MailboxCommand::Cancel {
                    actor,
                    message,
                    key,
                } => actors::cancel(s, &actor, message, key.as_deref(), json).await,
            }
        }
        Command::Cluster { store, command } => {
            let s = &store.open(&ns).await?;
            match command {
                ClusterCommand::Status { kind } => {
                    let store = &*s.store("cluster status")?.store;
                    cluster::status(store, &kind, json).await
                }
            }
        }
        Command::Store {
            command: StoreCommand::Repartition { store, partitions },
        } => match url(&store)? {
            StoreUrl::Embedded(dir, ..) => admin::repartition(&dir, partitions, json).await,
            _ => Err(Failure(
                "only an embedded store is repartitioned by loom (--store embedded:PATH); a Redis \
                 or PostgreSQL store keeps the partition count it was created with \
                 (`?partitions=N` in the URL of its first connect): to change it, `loom migrate` \
                 into a new store created with the count wanted, the app stopped"
                    .into(),
            )),
        },
        Command::Redo {
            command: RedoCommand::Salvage { store, yes },
        } => match url(&store)? {
            StoreUrl::Embedded(dir, ..) => admin::salvage_redo(&dir, yes, json),
            _ => Err(Failure(
                "only an embedded store has a redo log (--store embedded:PATH)".into(),
            )),
        },
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "loom", &mut script);
            output::out(String::from_utf8_lossy(&script).trim_end())
        }
        Command::Serve {
            store,
            listen,
            allow_writes,
            header_timeout_ms,
            max_connections,
        } => {
            let opened = open_existing(&store.store_url("serve", &ns)?).await?;
            let guards = loom_http::ServeOptions {
                header_timeout: std::time::Duration::from_millis(header_timeout_ms),
                // At most 65 536 by the argument's range.
                max_connections: max_connections as usize,
                ..loom_http::ServeOptions::default()
            };
            serve::serve(opened.store.clone(), listen, allow_writes, guards, json).await
        }
        Command::Export { store, out } => {
            let opened = open_existing(&store.store_url("export", &ns)?).await?;
            transfer::at_rest(&opened, "export").await?;
            transfer::export(&*opened.store, &out, json).await
        }
        Command::Import { store, input } => {
            let url = store.store_url("import", &ns)?;
            if url == StoreUrl::Memory {
                return Err(Failure(MEMORY_TARGET.into()));
            }
            // The file first: one refused creates no target store.
            let checked = transfer::Checked::file(&input)?;
            let opened = open_or_create(&url).await?;
            transfer::at_rest(&opened, "import").await?;
            transfer::import(&*opened.store, &url.label(), checked, json).await
        }
        Command::Migrate { from, to } => {
            let (from, to) = (url(&from)?, url(&to)?);
            if from == to {
                return Err(Failure("--from and --to are the same store".into()));
            }
            if to == StoreUrl::Memory {
                return Err(Failure(MEMORY_TARGET.into()));
            }
            let source = open_existing(&from).await?;
            transfer::at_rest(&source, "migrate").await?;
            let target = open_or_create(&to).await?;
            transfer::at_rest(&target, "migrate").await?;
            transfer::migrate(&*source.store, &*target.store, &to.label(), json).await
        }
    }
}

impl Command {
    /// The store option of a command that has one.
    fn store_arg_mut(&mut self) -> Option<&mut StoreArg> {
        match self {
            Command::Journal { store, .. }
            | Command::Deadletters { store, .. }
            | Command::Parked { store, .. }
            | Command::Mailbox { store, .. }
            | Command::Cluster { store, .. }
            | Command::Export { store, .. }
            | Command::Import { store, .. }
            | Command::Serve { store, .. } => Some(store),
            Command::Store { .. }
            | Command::Redo { .. }
            | Command::Migrate { .. }
            | Command::Completions { .. } => None,
        }
    }
}

/// Where the value of `id` came from (command line, environment, default), as the innermost
/// subcommand that has the argument saw it (a global option reaches every subcommand).
fn source_of(m: &ArgMatches, id: &str) -> Option<ValueSource> {
    let mut found = None;
    let mut m = Some(m);
    while let Some(here) = m {
        if let Ok(Some(_)) = here.try_get_raw(id) {
            found = here.value_source(id);
        }
        m = here.subcommand().map(|(_, sub)| sub);
    }
    found
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let json = cli.common.json;
    let chosen = match cli.command.store_arg_mut() {
        Some(s) => s.choose(source_of(&matches, "url"), source_of(&matches, "store")),
        None => Ok(()),
    };
    loom_cli::main_with("loom", json, async move {
        chosen?;
        run(cli).await
    })
}
