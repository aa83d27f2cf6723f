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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use loom_core::runtime::Runtime;

mod actors;
use actors::{Order, Place, World};

#[derive(Parser)]
#[command(about = "An order saga on Loom")]
struct Args {
    /// Data directory of the embedded store.
    #[arg(long, default_value = "./loom-data-saga")]
    data: PathBuf,
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
        let amount = place.amount;
        asks.push((
            name,
            order.id()?.clone(),
            amount,
            tokio::spawn(async move { order.ask(place).await }),
        ));
    }
    // An operator approves one order while it waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rt.actor::<Order>(format!("{run}-approved"))
        .deliver_event("approved", &true)
        .await?;
    for (name, id, amount, ask) in asks {
        let status = ask.await??;
        println!("{name:>10}: {status:?}");
        world.check(&id, &status, amount)?;
    }
    let (stock, charged) = world.totals();
    println!(
        "stock moved: {stock} (2 shipped orders took one item each), charged: {charged} (40 + 300)"
    );
    if (stock, charged) != (-2, 340) {
        return Err("compensation left the books unbalanced".into());
    }
    rt.shutdown().await;
    Ok(())
}
