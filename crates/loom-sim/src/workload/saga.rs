//! Orders of the `order_saga` example (the same actor, included from the example), and the
//! check that every order ends shipped or compensated with the outside world agreeing.
//!
//! Each order reserves stock and charges a card (activities against an in-process outside
//! world that deduplicates by activity key, as a payment API does by idempotency key), waits
//! for an `approved` event when it needs one, sleeps a durable cool-off and ships; a declined
//! card, a refusal, no approval in time or its customer withdrawing it while it waits (a
//! cancellation by its key) makes it compensate (refund, release). The world
//! outlives every crash and power loss of the run, as the real outside world would.
//!
//! The check, after the final node has placed every order not answered yet (with its
//! idempotency key, so an order placed before is not placed twice): every order was answered,
//! and ended (never `New`); its journal's last reply is the status its client was answered;
//! and what each order did to the world matches its status: a shipped order took one item and
//! charged its amount, a cancelled one took and charged nothing (every compensation ran exactly
//! once; no activity applied twice).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loom_core::runtime::{Actor, AskOptions, Cancellation, Runtime, RuntimeBuilder};
use loom_core::{ActorId, EntryKind};

use super::{Errors, ask_until, key, paced, until_ok};
use crate::store::SimStore;

#[path = "../../../loom-core/examples/order_saga/actors.rs"]
mod actors;
pub use actors::{Order, Place, Status, World};

/// The saga workload of a run: `orders` orders, drawn from the seed, against one world.
#[derive(Clone)]
pub struct Orders {
    /// Orders placed.
    pub orders: u32,
    seed: u64,
    world: Arc<World>,
    answered: Arc<Mutex<BTreeMap<u32, Status>>>,
    errors: Errors,
}

impl Orders {
    /// `orders` orders drawn from `seed`.
    pub fn new(seed: u64, orders: u32) -> Orders {
        Orders {
            orders,
            seed,
            world: Arc::default(),
            answered: Arc::default(),
            errors: Errors::default(),
        }
    }

    /// Registers the order on a node, against this run's world.
    pub fn register(&self, builder: RuntimeBuilder) -> RuntimeBuilder {
        builder.register_actor(Order {
            world: self.world.clone(),
            // Approvals come within 4 s or never (`plan`): some waits time out.
            approval_wait: Duration::from_secs(3),
        })
    }

    /// Order `i`: what it is placed with, the approval delivered to it (when it needs one):
    /// `Some(verdict)` after a delay, or none at all, and when its customer withdraws it, if
    /// ever (a cancellation by its key, which finds it waiting, or finished, or not yet placed).
    fn plan(&self, i: u32) -> (Place, Option<(bool, Duration)>, Option<Duration>) {
        let mut rng = fastrand::Rng::with_seed(self.seed ^ 0x5a_9a ^ (u64::from(i) << 24));
        let place = Place {
            amount: rng.i64(1..=14) * 50,
            needs_approval: rng.bool(),
        };
        let verdict = match rng.u8(..3) {
            0 => None,
            v => Some(v == 1),
        };
        let after = Duration::from_millis(rng.u64(0..=4_000));
        let approval = if place.needs_approval {
            verdict.map(|v| (v, after))
        } else {
            None
        };
        // Drawn last, so that the draws above are those of runs from before withdrawals. Only
        // orders that wait for approval (up to 3 s) are withdrawn, within that wait.
        let withdraw = (rng.u8(..3) == 0 && place.needs_approval)
            .then(|| Duration::from_millis(rng.u64(0..=3_000)));
        (place, approval, withdraw)
    }

    fn answered(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Status>> {
        self.answered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Orders answered so far.
    pub fn acknowledged(&self) -> usize {
        self.answered().len()
    }

    /// Places every order below `upto` not answered yet, spread `over` the round, order `i`
    /// through node `i % nodes`, each retried with its key until answered; delivers each
    /// planned approval after its delay (again, if a crash may have taken it: a delivery is
    /// deduplicated by its data).
    pub async fn drive(self, nodes: Vec<Runtime>, upto: u32, over: Duration) {
        let pending: Vec<u32> = {
            let answered = self.answered();
            (0..upto.min(self.orders))
                .filter(|i| !answered.contains_key(i))
                .collect()
        };
        let this = &self;
        paced(pending, over, |i| {
            let rt = nodes[i as usize % nodes.len()].clone();
            async move {
                let (place, approval, withdraw) = this.plan(i);
                let order = match rt.actor::<Order>(format!("o{i}")) {
                    Ok(o) => o,
                    Err(e) => return this.errors.push(format!("order/o{i}: {e}")),
                };
                let approve = async {
                    if let Some((verdict, after)) = approval {
                        tokio::time::sleep(after).await;
                        until_ok(|| order.deliver_event("approved", &verdict)).await;
                    }
                };
                // Set once the order is answered: a withdrawal that finds nothing to cancel
                // looks again (the order may not be placed yet) until then.
                let done = std::sync::atomic::AtomicBool::new(false);
                let withdrawn = async {
                    if let Some(after) = withdraw {
                        tokio::time::sleep(after).await;
                        let k = key(format!("place-o{i}"));
                        while until_ok(|| order.cancel_key(&k)).await == Cancellation::NotFound
                            && !done.load(std::sync::atomic::Ordering::SeqCst)
                        {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                };
                let placed = async {
                    let r = ask_until(|| {
                        let opts = AskOptions {
                            idempotency_key: Some(key(format!("place-o{i}"))),
                            timeout: None,
                            ..Default::default()
                        };
                        order.ask_with(place.clone(), opts)
                    })
                    .await;
                    done.store(true, std::sync::atomic::Ordering::SeqCst);
                    r
                };
                match futures::future::join3(placed, approve, withdrawn).await {
                    (Ok(status), (), ()) => {
                        this.answered().insert(i, status);
                    }
                    (Err(e), (), ()) => this.errors.push(format!("order/o{i}: {e}")),
                }
            }
        })
        .await;
    }

    /// Checks every order (see the [module docs](self)), reading each one's journal from
    /// `store` (sending it nothing). Call after [`drive`](Self::drive) answered them all.
    pub fn check(&self, store: &SimStore) -> Result<(), String> {
        self.errors.check()?;
        let answered = self.answered().clone();
        for i in 0..self.orders {
            let (place, _, withdraw) = self.plan(i);
            let id = ActorId::new(Order::KIND, format!("o{i}")).map_err(|e| e.to_string())?;
            let Some(status) = answered.get(&i) else {
                return Err(format!("{id} was never answered"));
            };
            if *status == Status::New {
                return Err(format!("{id} answered New: it never ended"));
            }
            if withdraw.is_none()
                && *status == Status::Cancelled("withdrawn by the customer".to_owned())
            {
                return Err(format!(
                    "{id} was withdrawn, but its customer never withdrew it"
                ));
            }
            let last = store
                .history(&id)
                .map_err(|e| e.to_string())?
                .into_iter()
                .rev()
                .find_map(|e| match e.kind {
                    EntryKind::Completed { reply } => Some(reply),
                    _ => None,
                });
            let recorded: Option<Status> = last
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| format!("{id}: its journal's reply is not a status: {e}"))?;
            if recorded.as_ref() != Some(status) {
                return Err(format!(
                    "{id} was answered {status:?}, but its journal's last reply is {recorded:?}"
                ));
            }
            self.world.check(&id, status, place.amount)?;
        }
        Ok(())
    }
}
