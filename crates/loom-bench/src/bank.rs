//! The bank workload: accounts and transfers, and the check that nothing was lost or doubled.
//!
//! Each transfer is an actor: it runs a fraud check (an activity, journaled), then sends a debit
//! to the source account; the account answers with `Debited` or `DebitRefused`; on `Debited` the
//! transfer sends a credit to the target account, which answers `Credited`. Every message between
//! actors leaves exactly once (its send is part of the sender's atomic turn) and is applied
//! exactly once (its ack is part of the receiver's atomic turn). Accounts and transfers are
//! submitted with idempotency keys, so a run that was killed and started again opens nothing
//! twice and starts no transfer twice.

use std::collections::HashMap;
use std::time::Duration;

// tokio's clock, so that a simulated run (virtual time, see `loom_core::seam`) settles by it.
use tokio::time::Instant;

use futures::StreamExt;
use loom_core::IdempotencyKey;
use loom_core::runtime::{AskError, AskOptions, Runtime, RuntimeBuilder, SendError, SendOptions};

#[path = "../../loom-core/examples/bank/actors.rs"]
mod actors;
pub use actors::*;

/// The size and shape of a bank run.
#[derive(Debug, Clone, Copy)]
pub struct Bank {
    /// Accounts (at least 2).
    pub accounts: u32,
    /// Transfers.
    pub transfers: u32,
    /// Opening balance of each account.
    pub initial: i64,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Seed of the transfer plan.
    pub seed: u64,
    /// Number of the first transfer (`t<first>` …), so that several runs on one store do not
    /// overlap.
    pub first: u32,
    /// Number of the first account (`a<first_account>` …), likewise.
    pub first_account: u32,
}

impl Default for Bank {
    fn default() -> Self {
        Bank {
            accounts: 100,
            transfers: 10_000,
            initial: 1_000,
            concurrency: 256,
            seed: 42,
            first: 0,
            first_account: 0,
        }
    }
}

/// Why a bank run failed.
#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// A send failed.
    #[error(transparent)]
    Send(#[from] SendError),
    /// An ask failed.
    #[error(transparent)]
    Ask(#[from] AskError),
    /// The books do not balance: something was lost or applied twice.
    #[error("verification failed: {0}")]
    Verify(String),
    /// Transfers did not settle in time.
    #[error("{0} transfers did not settle in time")]
    Unsettled(usize),
}

/// What a verified run found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// Transfers done.
    pub done: u32,
    /// Transfers refused.
    pub refused: u32,
    /// Total balance (equal to accounts × initial).
    pub total: i64,
}

impl Bank {
    /// Registers the bank's actor kinds, with its retention ([`retention`]: settled transfers
    /// are retired no sooner than their keys' records expire).
    pub fn register(builder: RuntimeBuilder) -> RuntimeBuilder {
        builder
            .register::<Account>()
            .register::<Transfer>()
            .configure(retention)
    }

    /// Transfer `i` of the plan: the same for a seed, so a restarted run submits the same ones.
    pub fn plan(&self, i: u32) -> (String, String, i64) {
        let mut rng = fastrand::Rng::with_seed(self.seed ^ (u64::from(i) << 20));
        let from = rng.u32(..self.accounts);
        let mut to = rng.u32(..self.accounts - 1);
        if to >= from {
            to += 1;
        }
        let base = self.first_account;
        (
            format!("a{}", base + from),
            format!("a{}", base + to),
            rng.i64(1..=300),
        )
    }

    /// The account numbers of this run.
    pub fn account_ids(&self) -> std::ops::Range<u32> {
        self.first_account..self.first_account + self.accounts
    }

    /// The transfer numbers of this run.
    pub fn ids(&self) -> std::ops::Range<u32> {
        self.first..self.first + self.transfers
    }

    /// Opens every account, once (idempotent across restarts).
    pub async fn open_accounts(&self, rt: &Runtime) -> Result<(), BankError> {
        let results: Vec<Result<_, SendError>> = futures::stream::iter(self.account_ids())
            .map(|n| {
                let acct = rt.actor::<Account>(format!("a{n}"));
                let opts = SendOptions {
                    idempotency_key: Some(key(format!("open-a{n}"))),
                    delay: None,
                    ..Default::default()
                };
                let initial = self.initial;
                async move { acct?.send_with(AccountMsg::Open(initial), opts).await }
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        for r in results {
            r?;
        }
        Ok(())
    }

    /// Starts transfer `i` (idempotent across restarts) and waits for its first durable turn;
    /// returns how long that took.
    pub async fn start(&self, rt: &Runtime, i: u32) -> Result<Duration, BankError> {
        let (from, to, amount) = self.plan(i);
        let t0 = Instant::now();
        let opts = AskOptions {
            idempotency_key: Some(key(format!("start-t{i}"))),
            timeout: None,
            ..Default::default()
        };
        rt.actor::<Transfer>(format!("t{i}"))
            .map_err(SendError::from)?
            .ask_with(TransferMsg::Start { from, to, amount }, opts)
            .await?;
        Ok(t0.elapsed())
    }

    /// Asks transfer `i` where it is.
    pub async fn status(&self, rt: &Runtime, i: u32) -> Result<Status, AskError> {
        rt.actor::<Transfer>(format!("t{i}"))
            .map_err(SendError::from)?
            .ask(TransferMsg::Status)
            .await
    }

    /// Starts every transfer with `concurrency` in flight; `tick` is called after each. Returns
    /// each start's latency.
    pub async fn start_all(
        &self,
        rt: &Runtime,
        tick: impl Fn() + Clone,
    ) -> Result<Vec<Duration>, BankError> {
        let results: Vec<Result<Duration, BankError>> = futures::stream::iter(self.ids())
            .map(|i| {
                let tick = tick.clone();
                async move {
                    let r = self.start(rt, i).await;
                    tick();
                    r
                }
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Waits until every transfer is done or refused (at most `limit`); `progress` gets the count
    /// of settled ones. Status checks that fail are asked again, so a flaky store only slows it.
    pub async fn settle(
        &self,
        rt: &Runtime,
        limit: Duration,
        progress: impl Fn(u64),
    ) -> Result<HashMap<u32, Status>, BankError> {
        let mut statuses: HashMap<u32, Status> = HashMap::new();
        let deadline = Instant::now() + limit;
        loop {
            let pending: Vec<u32> = self
                .ids()
                .filter(|i| !statuses.get(i).is_some_and(|s| s.settled()))
                .collect();
            if pending.is_empty() {
                return Ok(statuses);
            }
            if Instant::now() > deadline {
                return Err(BankError::Unsettled(pending.len()));
            }
            let checked: Vec<Result<(u32, Status), AskError>> = futures::stream::iter(pending)
                .map(|i| async move { self.status(rt, i).await.map(|s| (i, s)) })
                .buffer_unordered(self.concurrency)
                .collect()
                .await;
            for r in checked {
                match r {
                    Ok((i, s)) => {
                        statuses.insert(i, s);
                    }
                    // A failed status check is not an answer: ask again next round, until the
                    // deadline (the store may be briefly unavailable).
                    Err(e) => tracing::debug!(error = %e, "status check failed; asking again"),
                }
            }
            progress(statuses.values().filter(|s| s.settled()).count() as u64);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Checks the books: total balance conserved, and each account holds exactly the debits and
    /// credits of the settled transfers (a leg lost or applied twice shows up here).
    pub async fn verify(
        &self,
        rt: &Runtime,
        statuses: &HashMap<u32, Status>,
    ) -> Result<Verified, BankError> {
        let mut expected: HashMap<String, Ledger> = self
            .account_ids()
            .map(|n| {
                (
                    format!("a{n}"),
                    Ledger {
                        balance: self.initial,
                        debits: 0,
                        credits: 0,
                    },
                )
            })
            .collect();
        let (mut done, mut refused) = (0, 0);
        for i in self.ids() {
            let (from, to, amount) = self.plan(i);
            match statuses.get(&i) {
                Some(Status::Done) => {
                    done += 1;
                    let f = expected
                        .get_mut(&from)
                        .ok_or_else(|| BankError::Verify(format!("unknown account {from}")))?;
                    f.balance -= amount;
                    f.debits += 1;
                    let t = expected
                        .get_mut(&to)
                        .ok_or_else(|| BankError::Verify(format!("unknown account {to}")))?;
                    t.balance += amount;
                    t.credits += 1;
                }
                Some(Status::Refused) => refused += 1,
                other => return Err(BankError::Verify(format!("transfer t{i} is {other:?}"))),
            }
        }
        let mut total = 0;
        for n in self.account_ids() {
            let name = format!("a{n}");
            let got = rt
                .actor::<Account>(&name)
                .map_err(SendError::from)?
                .ask(AccountMsg::Balance)
                .await?;
            if got != expected[&name] {
                return Err(BankError::Verify(format!(
                    "account {name} is {got:?}, expected {:?}",
                    expected[&name]
                )));
            }
            total += got.balance;
        }
        let want = i64::from(self.accounts) * self.initial;
        if total != want {
            return Err(BankError::Verify(format!(
                "total balance {total}, expected {want}"
            )));
        }
        Ok(Verified {
            done,
            refused,
            total,
        })
    }
}

fn key(s: String) -> IdempotencyKey {
    IdempotencyKey::new(s).expect("the bank's keys are valid idempotency keys")
}

#[cfg(test)]
mod tests {
    use super::*;
    use loom_core::ActorId;

    /// Settled transfers finish themselves: once their grace passes (here the start keys'
    /// records last a second, and `register` makes the grace no shorter), their journals are
    /// deleted while the accounts' stay and the books still balance.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settled_transfers_retire_and_the_accounts_keep_the_books() {
        let builder = Runtime::builder().memory().configure(|c| {
            c.reply_ttl = Duration::from_secs(1);
            c.retention.finished_after = Duration::from_millis(200);
        });
        let rt = Bank::register(builder).start().await.expect("runtime");
        let bank = Bank {
            accounts: 4,
            transfers: 20,
            concurrency: 8,
            ..Bank::default()
        };
        bank.open_accounts(&rt).await.expect("open");
        bank.start_all(&rt, || {}).await.expect("start");
        let statuses = bank
            .settle(&rt, Duration::from_secs(30), |_| {})
            .await
            .expect("settle");
        let verified = bank.verify(&rt, &statuses).await.expect("verify");
        let deadline = Instant::now() + Duration::from_secs(30);
        while rt.metrics().retired < 20 {
            assert!(
                Instant::now() < deadline,
                "{} retired",
                rt.metrics().retired
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let store = rt.store();
        for i in bank.ids() {
            let id = ActorId::new("transfer", format!("t{i}")).unwrap();
            let info = store.info(&id).await.unwrap();
            assert!(info.is_empty() && info.highest > 0, "t{i}: {info:?}");
        }
        for n in bank.account_ids() {
            let id = ActorId::new("account", format!("a{n}")).unwrap();
            assert!(
                !store.info(&id).await.unwrap().is_empty(),
                "a{n} was retired"
            );
        }
        assert_eq!(
            bank.verify(&rt, &statuses)
                .await
                .expect("verify again")
                .total,
            verified.total
        );
        rt.shutdown().await;
    }
}
