//! An order saga: activities, a durable timer, a wait for an approval event, and compensation.
//!
//! ```text
//! cargo run --release -p loom-core --example order_saga -- --data ./loom-data-saga
//! ```
//!
//! An order reserves stock and charges the card (activities, each journaled once); a large
//! order then waits for an `approved` event, at most a few seconds; after a durable cool-off
//! timer it ships. When the card is declined or the approval never comes, the saga compensates:
//! it refunds what it charged and releases what it reserved. The payment and inventory systems
//! here are in-process stand-ins that deduplicate by the activity key Loom hands them, as a real
//! payment API deduplicates by idempotency key.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use loom_core::runtime::{ActivityKey, Actor, Context, Rejected, Runtime, StepError};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(about = "An order saga on Loom")]
struct Args {
    /// Data directory of the embedded store.
    #[arg(long, default_value = "./loom-data-saga")]
    data: PathBuf,
}

/// The outside world: stock and card charges, keyed by idempotency key.
#[derive(Default)]
struct World {
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

    fn total(book: &Mutex<HashMap<String, i64>>) -> i64 {
        book.lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }
}

struct Order {
    world: Arc<World>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
enum Status {
    #[default]
    New,
    Shipped,
    Cancelled(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Place {
    amount: i64,
    needs_approval: bool,
}

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
                if order.amount > 500 {
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
                .wait_event::<bool>("approved", Some(Duration::from_secs(3)))
                .await
            {
                Ok(true) => None,
                Ok(false) => Some(("approval refused".to_owned(), true)),
                Err(StepError::TimedOut { .. }) => Some(("no approval in time".to_owned(), true)),
                Err(e) => return Err(e.into()),
            },
            Ok(()) => None,
        };
        if let Some((reason, refund)) = cancel {
            // Compensation, in reverse order; each step journaled like any other.
            if refund {
                let w = self.world.clone();
                ctx.activity("refund-card", &order.amount, |key| async move {
                    w.apply(&w.charges, &key, -order.amount);
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
            return Ok(status.clone());
        }
        // A durable cool-off: a restart continues it, it does not start it again.
        ctx.sleep(Duration::from_millis(500)).await?;
        ctx.activity("ship", &(), |_key| async { Ok::<_, String>(()) })
            .await?;
        *status = Status::Shipped;
        Ok(status.clone())
    }
}

fn main() -> std::process::ExitCode {
    // Loom's warnings (a store setting that cannot keep its promises, a store failure) go to
    // stderr; `RUST_LOG=info` or `debug` shows more.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Errors as sentences, with what to do when Loom knows (a full disk, say).
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", loom_core::explain(&*e));
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let world = Arc::new(World::default());
    let rt = Runtime::builder()
        .embedded(&args.data)
        .register_actor(Order {
            world: world.clone(),
        })
        .start()
        .await?;
    let run = format!("{:x}", loom_core::Timestamp::now().as_millis());
    let orders = [
        (
            "small",
            Place {
                amount: 40,
                needs_approval: false,
            },
        ),
        (
            "approved",
            Place {
                amount: 300,
                needs_approval: true,
            },
        ),
        (
            "unapproved",
            Place {
                amount: 250,
                needs_approval: true,
            },
        ),
        (
            "declined",
            Place {
                amount: 900,
                needs_approval: false,
            },
        ),
    ];
    let mut asks = Vec::new();
    for (name, place) in orders {
        let order = rt.actor::<Order>(format!("{run}-{name}"));
        asks.push((name, tokio::spawn(async move { order.ask(place).await })));
    }
    // An operator approves one order while it waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rt.actor::<Order>(format!("{run}-approved"))
        .deliver_event("approved", &true)
        .await?;
    for (name, ask) in asks {
        println!("{name:>10}: {:?}", ask.await??);
    }
    let (stock, charged) = (World::total(&world.stock), World::total(&world.charges));
    println!(
        "stock moved: {stock} (2 shipped orders took one item each), charged: {charged} (40 + 300)"
    );
    if (stock, charged) != (-2, 340) {
        return Err("compensation left the books unbalanced".into());
    }
    rt.shutdown().await;
    Ok(())
}
