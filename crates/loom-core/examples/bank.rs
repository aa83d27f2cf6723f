//! The bank: accounts and transfers on the embedded store, verified at the end.
//!
//! ```text
//! cargo run --release -p loom-core --example bank -- --accounts 100 --transfers 10000 --data ./loom-data
//! ```
//!
//! Each transfer is an actor: it runs a fraud check (an activity, journaled), then sends a debit to
//! the source account; the account answers with `Debited` or `DebitRefused`; on `Debited` the
//! transfer sends a credit to the target account, which answers `Credited`. Every message between
//! actors leaves exactly once (its send is part of the sender's atomic turn) and is applied exactly
//! once (its ack is part of the receiver's atomic turn).
//!
//! Kill it at any moment (Ctrl-C, `kill -9`) and start it again with the same `--data`: accounts
//! and transfers are submitted with idempotency keys, so nothing is opened or started twice, and
//! every transfer in flight resumes where its journal says. At the end it checks that the total
//! balance is conserved and that every transfer was applied exactly once to both accounts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use loom_core::IdempotencyKey;
use loom_core::runtime::{Actor, AskOptions, Context, Rejected, Runtime, SendOptions};
use serde::{Deserialize, Serialize};

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
    /// Transfers in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Data directory of the embedded store.
    #[arg(long, default_value = "./loom-data")]
    data: PathBuf,
    /// Seed of the transfer plan (same seed, same transfers).
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Default)]
struct Account;

#[derive(Debug, Default, Serialize, Deserialize)]
struct AccountState {
    opened: bool,
    balance: i64,
    debits: u64,
    credits: u64,
}

#[derive(Debug, Serialize, Deserialize)]
enum AccountMsg {
    Open(i64),
    Debit { transfer: String, amount: i64 },
    Credit { transfer: String, amount: i64 },
    Balance,
}

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    balance: i64,
    debits: u64,
    credits: u64,
}

impl Actor for Account {
    const KIND: &'static str = "account";
    type State = AccountState;
    type Message = AccountMsg;
    type Reply = Snapshot;

    async fn handle(
        &self,
        s: &mut AccountState,
        ctx: &mut Context<'_>,
        msg: AccountMsg,
    ) -> Result<Snapshot, Rejected> {
        match msg {
            AccountMsg::Open(amount) => {
                if s.opened {
                    return Err(Rejected::new("already open"));
                }
                s.opened = true;
                s.balance = amount;
            }
            AccountMsg::Debit { transfer, amount } => {
                if s.balance >= amount {
                    s.balance -= amount;
                    s.debits += 1;
                    ctx.send::<Transfer>(&transfer, &TransferMsg::Debited)?;
                } else {
                    ctx.send::<Transfer>(&transfer, &TransferMsg::DebitRefused)?;
                }
            }
            AccountMsg::Credit { transfer, amount } => {
                s.balance += amount;
                s.credits += 1;
                ctx.send::<Transfer>(&transfer, &TransferMsg::Credited)?;
            }
            AccountMsg::Balance => {}
        }
        Ok(Snapshot {
            balance: s.balance,
            debits: s.debits,
            credits: s.credits,
        })
    }
}

#[derive(Default)]
struct Transfer;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Status {
    #[default]
    New,
    Debiting,
    Crediting,
    Done,
    Refused,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TransferState {
    status: Status,
    from: String,
    to: String,
    amount: i64,
}

#[derive(Debug, Serialize, Deserialize)]
enum TransferMsg {
    Start {
        from: String,
        to: String,
        amount: i64,
    },
    Debited,
    DebitRefused,
    Credited,
    Status,
}

impl Actor for Transfer {
    const KIND: &'static str = "transfer";
    type State = TransferState;
    type Message = TransferMsg;
    type Reply = Status;

    async fn handle(
        &self,
        s: &mut TransferState,
        ctx: &mut Context<'_>,
        msg: TransferMsg,
    ) -> Result<Status, Rejected> {
        let me = ctx.actor_id().key().to_owned();
        match (s.status, msg) {
            (Status::New, TransferMsg::Start { from, to, amount }) => {
                // A side effect whose result is journaled: after a crash it is not run again.
                let cleared: bool = ctx
                    .activity("fraud-check", &(&from, &to, amount), |_key| async move {
                        Ok::<_, std::convert::Infallible>(amount <= 10_000)
                    })
                    .await?;
                if !cleared {
                    s.status = Status::Refused;
                    return Ok(s.status);
                }
                ctx.send::<Account>(
                    &from,
                    &AccountMsg::Debit {
                        transfer: me,
                        amount,
                    },
                )?;
                *s = TransferState {
                    status: Status::Debiting,
                    from,
                    to,
                    amount,
                };
            }
            (Status::Debiting, TransferMsg::Debited) => {
                ctx.send::<Account>(
                    &s.to,
                    &AccountMsg::Credit {
                        transfer: me,
                        amount: s.amount,
                    },
                )?;
                s.status = Status::Crediting;
            }
            (Status::Debiting, TransferMsg::DebitRefused) => s.status = Status::Refused,
            (Status::Crediting, TransferMsg::Credited) => s.status = Status::Done,
            (_, TransferMsg::Status) => {}
            (status, other) => return Err(Rejected::new(format!("{other:?} in state {status:?}"))),
        }
        Ok(s.status)
    }
}

/// The transfer plan: the same for a seed, so a restarted run submits the same transfers.
fn plan(i: u32, accounts: u32, seed: u64) -> (String, String, i64) {
    let mut rng = fastrand::Rng::with_seed(seed ^ (u64::from(i) << 20));
    let from = rng.u32(..accounts);
    let mut to = rng.u32(..accounts - 1);
    if to >= from {
        to += 1;
    }
    (format!("a{from}"), format!("a{to}"), rng.i64(1..=300))
}

/// Starts the runtime, waiting up to 10 s for a killed predecessor to finish dying (its last
/// thread may still be inside an fsync, holding the directory lock).
async fn start(args: &Args) -> Result<Runtime, loom_core::runtime::StartError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let started = Runtime::builder()
            .embedded(&args.data)
            .register::<Account>()
            .register::<Transfer>()
            .configure(|c| c.ask_timeout = Duration::from_secs(120))
            .start()
            .await;
        match started {
            Err(loom_core::runtime::StartError::Store(loom_core::StoreError::Locked {
                holder,
                ..
            })) if Instant::now() < deadline => {
                eprintln!("waiting for {holder} to release {}", args.data.display());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

fn key(s: String) -> IdempotencyKey {
    IdempotencyKey::new(s).expect("valid idempotency key")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.accounts < 2 {
        return Err("--accounts must be at least 2".into());
    }
    let rt = start(&args).await?;
    let started = Instant::now();
    let before = rt.metrics();

    // Open every account, once.
    futures::stream::iter(0..args.accounts)
        .map(|n| {
            let acct = rt.actor::<Account>(format!("a{n}"));
            let opts = SendOptions {
                idempotency_key: Some(key(format!("open-a{n}"))),
                delay: None,
            };
            async move { acct.send_with(AccountMsg::Open(args.initial), opts).await }
        })
        .buffer_unordered(args.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;

    // Start every transfer, once; each ask returns after the transfer's first durable turn.
    let bar = ProgressBar::new(u64::from(args.transfers));
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")?
            .progress_chars("=> "),
    );
    bar.set_message("started");
    let latencies: Vec<Duration> = futures::stream::iter(0..args.transfers)
        .map(|i| {
            let (from, to, amount) = plan(i, args.accounts, args.seed);
            let t = rt.actor::<Transfer>(format!("t{i}"));
            let bar = bar.clone();
            async move {
                let t0 = Instant::now();
                let opts = AskOptions {
                    idempotency_key: Some(key(format!("start-t{i}"))),
                    timeout: None,
                };
                let r = t
                    .ask_with(TransferMsg::Start { from, to, amount }, opts)
                    .await;
                bar.inc(1);
                r.map(|_| t0.elapsed())
            }
        })
        .buffer_unordered(args.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    bar.finish();

    // Wait until every transfer is done or refused.
    let done_bar = ProgressBar::new(u64::from(args.transfers));
    done_bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len}")?.progress_chars("=> "),
    );
    done_bar.set_message("settled");
    let mut statuses: HashMap<u32, Status> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let pending: Vec<u32> = (0..args.transfers)
            .filter(|i| !matches!(statuses.get(i), Some(Status::Done | Status::Refused)))
            .collect();
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{} transfers did not settle in 10 minutes", pending.len()).into());
        }
        let checked: Vec<(u32, Status)> = futures::stream::iter(pending)
            .map(|i| {
                let t = rt.actor::<Transfer>(format!("t{i}"));
                async move { t.ask(TransferMsg::Status).await.map(|s| (i, s)) }
            })
            .buffer_unordered(args.concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        for (i, s) in checked {
            statuses.insert(i, s);
        }
        done_bar.set_position(
            statuses
                .values()
                .filter(|s| matches!(s, Status::Done | Status::Refused))
                .count() as u64,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done_bar.finish();
    let elapsed = started.elapsed();
    let after = rt.metrics();

    // Verify: money is conserved, and each account saw exactly the legs of the settled transfers.
    let mut expected: HashMap<String, (i64, u64, u64)> = (0..args.accounts)
        .map(|n| (format!("a{n}"), (args.initial, 0, 0)))
        .collect();
    let (mut done, mut refused) = (0u32, 0u32);
    for i in 0..args.transfers {
        let (from, to, amount) = plan(i, args.accounts, args.seed);
        match statuses[&i] {
            Status::Done => {
                done += 1;
                let f = expected.get_mut(&from).ok_or("unknown account")?;
                f.0 -= amount;
                f.1 += 1;
                let t = expected.get_mut(&to).ok_or("unknown account")?;
                t.0 += amount;
                t.2 += 1;
            }
            Status::Refused => refused += 1,
            other => return Err(format!("transfer t{i} ended in {other:?}").into()),
        }
    }
    let mut total = 0i64;
    for n in 0..args.accounts {
        let name = format!("a{n}");
        let got = rt.actor::<Account>(&name).ask(AccountMsg::Balance).await?;
        let (balance, debits, credits) = expected[&name];
        if (got.balance, got.debits, got.credits) != (balance, debits, credits) {
            return Err(format!(
                "account {name}: balance {} with {} debits and {} credits, expected {balance} with {debits} and {credits}",
                got.balance, got.debits, got.credits
            )
            .into());
        }
        total += got.balance;
    }
    let want_total = i64::from(args.accounts) * args.initial;
    if total != want_total {
        return Err(format!("total balance {total}, expected {want_total}").into());
    }
    rt.shutdown().await;

    let mut sorted = latencies;
    sorted.sort();
    let invocations = after.invocations - before.invocations;
    println!(
        "verified: {} accounts, {} transfers ({done} done, {refused} refused); total balance {total} conserved; every transfer applied exactly once",
        args.accounts, args.transfers
    );
    println!(
        "throughput: {invocations} durable invocations in {:.2?} = {:.0} invocations/s ({:.0} transfers/s)",
        elapsed,
        invocations as f64 / elapsed.as_secs_f64(),
        f64::from(args.transfers) / elapsed.as_secs_f64()
    );
    println!(
        "latency of a transfer's first durable turn (ask): p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99),
        sorted.last().copied().unwrap_or_default()
    );
    Ok(())
}
