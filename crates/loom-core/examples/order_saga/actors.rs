//! The order saga's actor: activities, a durable timer, a wait for an approval event, and
//! compensation.
//!
//! This file is the `order_saga` example's; `loom-sim` includes it for its saga workload, so
//! the saga the simulator puts under crashes and power loss is the one the example shows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loom_core::ActorId;
use loom_core::runtime::{ActivityKey, Actor, Context, Rejected, StepError};
use serde::{Deserialize, Serialize};

/// The outside world: stock and card charges, keyed by idempotency key.
#[derive(Default)]
pub struct World {
    stock: Mutex<HashMap<String, i64>>,
    charges: Mutex<HashMap<String, i64>>,
}

impl World {
    fn apply(&self, book: &Mutex<HashMap<String, i64>>, key: &ActivityKey, amount: i64) {
        // Same key, same effect: a retried activity does not charge twice.
        book.lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_insert(amount);
    }

    /// Stock moved (negative: items taken) and money charged, over every order.
    pub fn totals(&self) -> (i64, i64) {
        (Self::sum(&self.stock, ""), Self::sum(&self.charges, ""))
    }

    /// Stock moved and money charged by one order's activities (their keys begin with the
    /// order's actor id).
    pub fn of(&self, order: &ActorId) -> (i64, i64) {
        let prefix = format!("{order}/");
        (
            Self::sum(&self.stock, &prefix),
            Self::sum(&self.charges, &prefix),
        )
    }

    /// Checks that what `order` did to the world matches its `status`: a shipped order took
    /// one item and charged its `amount`; a cancelled one (compensated) took and charged
    /// nothing; a new one did nothing yet.
    pub fn check(&self, order: &ActorId, status: &Status, amount: i64) -> Result<(), String> {
        let expected = match status {
            Status::Shipped => (-1, amount),
            Status::New | Status::Cancelled(_) => (0, 0),
        };
        let (stock, charged) = self.of(order);
        if (stock, charged) != expected {
            return Err(format!(
                "{order} is {status:?} but moved {stock} item(s) and charged {charged} (expected {} and {})",
                expected.0, expected.1
            ));
        }
        Ok(())
    }

    fn sum(book: &Mutex<HashMap<String, i64>>, prefix: &str) -> i64 {
        book.lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| *v)
            .sum()
    }
}

/// An order: the saga.
pub struct Order {
    /// The systems its activities call.
    pub world: Arc<World>,
    /// How long an order waits for its approval (three days in the example, by default). The
    /// wait does not hold the order in memory: after `Config::suspend_after` (1 s) it suspends,
    /// its actor passivated, and the approval's delivery (or the deadline) wakes it, on
    /// whichever node.
    pub approval_wait: Duration,
}

/// Where an order is.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub enum Status {
    /// Not placed yet.
    #[default]
    New,
    /// Charged and shipped.
    Shipped,
    /// Compensated: nothing charged, nothing taken; why.
    Cancelled(String),
}

/// Places the order (a second `Place` only reads its status).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Place {
    /// What it costs; above [`DECLINED_ABOVE`] the card is declined.
    pub amount: i64,
    /// Whether it waits for an `approved` event (`true` approves, `false` refuses), at most
    /// [`Order::approval_wait`].
    pub needs_approval: bool,
}

/// The card declines charges above this amount.
pub const DECLINED_ABOVE: i64 = 500;

impl Actor for Order {
    const KIND: &'static str = "order";
    type State = Status;
    type Message = Place;
    type Reply = Status;

    async fn handle(
        &self,
        status: &mut Status,
        ctx: &mut Context<'_>,
        order: Place,
    ) -> Result<Status, Rejected> {
        if *status != Status::New {
            return Ok(status.clone());
        }
        let w = self.world.clone();
        ctx.activity("reserve-stock", &1, |key| async move {
            w.apply(&w.stock, &key, -1);
            Ok::<_, String>(())
        })
        .await?;
        let w = self.world.clone();
        let charged = ctx
            .activity("charge-card", &order.amount, |key| async move {
                if order.amount > DECLINED_ABOVE {
                    return Err("card declined".to_owned());
                }
                w.apply(&w.charges, &key, order.amount);
                Ok(())
            })
            .await;
        let cancel = match charged {
            Err(StepError::ActivityFailed { error, .. }) => Some((error, false)),
            Err(e) => return Err(e.into()),
            Ok(()) if order.needs_approval => match ctx
                .wait_event::<bool>("approved", Some(self.approval_wait))
                .await
            {
                Ok(true) => None,
                Ok(false) => Some(("approval refused".to_owned(), true)),
                Err(StepError::TimedOut { .. }) => Some(("no approval in time".to_owned(), true)),
                // The customer withdrew the order (`ActorRef::cancel_key`) while it waited.
                Err(StepError::Cancelled) => Some(("withdrawn by the customer".to_owned(), true)),
                Err(e) => return Err(e.into()),
            },
            Ok(()) => None,
        };
        if let Some((reason, refund)) = cancel {
            return self.compensate(status, ctx, &order, reason, refund).await;
        }
        // A durable cool-off: a restart continues it, it does not start it again. The customer
        // may still withdraw the order here.
        match ctx.sleep(Duration::from_millis(500)).await {
            Ok(()) => {}
            Err(StepError::Cancelled) => {
                let reason = "withdrawn by the customer".to_owned();
                return self.compensate(status, ctx, &order, reason, true).await;
            }
            Err(e) => return Err(e.into()),
        }
        ctx.activity("ship", &(), |_key| async { Ok::<_, String>(()) })
            .await?;
        *status = Status::Shipped;
        Ok(status.clone())
    }
}

impl Order {
    /// Undoes what the order did, in reverse order (each step journaled like any other), and
    /// ends it cancelled with `reason`.
    async fn compensate(
        &self,
        status: &mut Status,
        ctx: &mut Context<'_>,
        order: &Place,
        reason: String,
        refund: bool,
    ) -> Result<Status, Rejected> {
        if refund {
            let (w, amount) = (self.world.clone(), order.amount);
            ctx.activity("refund-card", &amount, |key| async move {
                w.apply(&w.charges, &key, -amount);
                Ok::<_, String>(())
            })
            .await?;
        }
        let w = self.world.clone();
        ctx.activity("release-stock", &1, |key| async move {
            w.apply(&w.stock, &key, 1);
            Ok::<_, String>(())
        })
        .await?;
        *status = Status::Cancelled(reason);
        Ok(status.clone())
    }
}
