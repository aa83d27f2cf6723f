//! Orders of the `order_saga` example (the same actor, included from the example), and the
//! check that every order ends shipped or compensated with the outside world agreeing.
//!
//! Each order reserves stock and charges a card (activities against an in-process outside
//! world that deduplicates by activity key, as a payment API does by idempotency key), waits
//! for an `approved` event when it needs one, sleeps a durable cool-off and ships; a declined
//! card, a refusal or no approval in time makes it compensate (refund, release). The world
//! outlives every crash and power loss of the run, as the real outside world would.
//!
//! The check, after the final node has placed every order again with its idempotency key:
//! every order ended (never `New`); an order whose client got an answer still has that
//! status; and what each order did to the world matches its status: a shipped order took one
//! item and charged its amount, a cancelled one took and charged nothing (every compensation
//! ran exactly once; no activity applied twice).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loom_core::ActorId;
use loom_core::runtime::{Actor, AskOptions, Runtime, RuntimeBuilder};

use super::{key, paced, until_ok};

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
}

impl Orders {
    /// `orders` orders drawn from `seed`.
    pub fn new(seed: u64, orders: u32) -> Orders {
        Orders {
            orders,
            seed,
            world: Arc::default(),
            answered: Arc::default(),
        }
    }

    /// Registers the order on a node, against this run's world.
    pub fn register(&self, builder: RuntimeBuilder) -> RuntimeBuilder {
        builder.register_actor(Order {
            world: self.world.clone(),
        })
    }

    /// Order `i`: what it is placed with, and the approval delivered to it (when it needs
    /// one): `Some(verdict)` after a delay, or none at all.
    fn plan(&self, i: u32) -> (Place, Option<(bool, Duration)>) {
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
        (place, approval)
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
                let (place, approval) = this.plan(i);
                let order = rt.actor::<Order>(format!("o{i}"));
                let approve = async {
                    if let Some((verdict, after)) = approval {
                        tokio::time::sleep(after).await;
                        until_ok(|| order.deliver_event("approved", &verdict)).await;
                    }
                };
                let placed = until_ok(|| {
                    let opts = AskOptions {
                        idempotency_key: Some(key(format!("place-o{i}"))),
                        timeout: None,
                    };
                    order.ask_with(place.clone(), opts)
                });
                let (status, ()) = futures::future::join(placed, approve).await;
                this.answered().insert(i, status);
            }
        })
        .await;
    }

    /// Checks every order (see the [module docs](self)). Call after [`drive`](Self::drive)
    /// answered them all.
    pub async fn check(&self, rt: &Runtime) -> Result<(), String> {
        let answered = self.answered().clone();
        for i in 0..self.orders {
            let (place, _) = self.plan(i);
            let order = rt.actor::<Order>(format!("o{i}"));
            // A second `Place` only reads the status.
            let status = until_ok(|| order.ask(place.clone())).await;
            let id = ActorId::new(Order::KIND, format!("o{i}")).map_err(|e| e.to_string())?;
            if status == Status::New {
                return Err(format!("{id} never ended"));
            }
            if let Some(seen) = answered.get(&i)
                && *seen != status
            {
                return Err(format!("{id} answered {seen:?} but ended {status:?}"));
            }
            self.world.check(&id, &status, place.amount)?;
        }
        Ok(())
    }
}
