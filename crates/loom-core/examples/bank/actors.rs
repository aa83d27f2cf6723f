//! The bank's actors: an account, and a transfer that moves money between two of them.
//!
//! Each transfer is an actor: it runs a fraud check (an activity, journaled), then sends a debit
//! to the source account; the account answers with `Debited` or `DebitRefused`; on `Debited` the
//! transfer sends a credit to the target account, which answers `Credited`. Every message between
//! actors leaves exactly once (its send is part of the sender's atomic turn) and is applied
//! exactly once (its ack is part of the receiver's atomic turn).
//!
//! This file is the bank example's (`cargo run -p loom-core --example bank`); `loom-bench`
//! includes it for its `bank` workload, `loom-dev bench bank` and `loom-dev torture`, so the actors the
//! benchmarks and the torture measure are the ones the example shows.

use loom_core::runtime::{Actor, Config, Context, Rejected};
use serde::{Deserialize, Serialize};

/// A bank account.
#[derive(Default)]
pub struct Account;

/// Its state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AccountState {
    opened: bool,
    balance: i64,
    debits: u64,
    credits: u64,
}

/// What an account receives.
#[derive(Debug, Serialize, Deserialize)]
pub enum AccountMsg {
    /// Open with an initial balance (once).
    Open(i64),
    /// Take `amount` for `transfer`, or refuse it.
    Debit {
        /// The transfer's key.
        transfer: String,
        /// Amount.
        amount: i64,
    },
    /// Add `amount` for `transfer`.
    Credit {
        /// The transfer's key.
        transfer: String,
        /// Amount.
        amount: i64,
    },
    /// Read.
    Balance,
}

/// An account as it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Balance.
    pub balance: i64,
    /// Debits applied.
    pub debits: u64,
    /// Credits applied.
    pub credits: u64,
}

impl Actor for Account {
    const KIND: &'static str = "account";
    type State = AccountState;
    type Message = AccountMsg;
    type Reply = Ledger;

    async fn handle(
        &self,
        s: &mut AccountState,
        ctx: &mut Context<'_>,
        msg: AccountMsg,
    ) -> Result<Ledger, Rejected> {
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
        Ok(Ledger {
            balance: s.balance,
            debits: s.debits,
            credits: s.credits,
        })
    }
}

/// A transfer between two accounts.
#[derive(Default)]
pub struct Transfer;

/// The bank's retention: a settled transfer finishes itself (`Context::finish`) and is retired
/// no sooner than its start's idempotency record expires (`Config::reply_ttl`), so that a
/// driver run again within that time (the example's restart after a kill) still finds each
/// transfer's status, and a start sent again is still deduplicated by its key. (After that, a
/// start sent again would begin the transfer afresh: a driver must not reuse transfer ids
/// then.)
pub fn retention(c: &mut Config) {
    c.retention.finished_after = c.retention.finished_after.max(c.reply_ttl);
}

/// Where a transfer is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    /// Not started.
    #[default]
    New,
    /// Waiting for the debit.
    Debiting,
    /// Waiting for the credit.
    Crediting,
    /// Both legs applied.
    Done,
    /// Refused (fraud check or funds); no leg applied.
    Refused,
}

impl Status {
    /// True once it will not change again.
    pub fn settled(self) -> bool {
        matches!(self, Status::Done | Status::Refused)
    }
}

/// A transfer's state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TransferState {
    status: Status,
    from: String,
    to: String,
    amount: i64,
}

/// What a transfer receives.
#[derive(Debug, Serialize, Deserialize)]
pub enum TransferMsg {
    /// Begin.
    Start {
        /// Source account key.
        from: String,
        /// Target account key.
        to: String,
        /// Amount.
        amount: i64,
    },
    /// The source account took the money.
    Debited,
    /// The source account refused.
    DebitRefused,
    /// The target account got the money.
    Credited,
    /// Read.
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
                    ctx.finish();
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
        if s.status.settled() {
            // Done: its journal can go once the grace passes (`Retention`); a `Status` read
            // changes no state, so it does not keep the transfer.
            ctx.finish();
        }
        Ok(s.status)
    }
}
