//! An order saga: activities, a durable timer, a wait for an approval event, and compensation.
//!
//! ```text
//! cargo run --release -p loom-core --example order_saga -- --data ./loom-data-saga
//! ```
//!
//! An order reserves stock and charges the card (activities, each journaled once); a large
//! order then waits for an `approved` event, for up to three days (`--approval-wait`); after a
//! durable cool-off timer it ships. When the card is declined, the approval is refused or it
//! never comes, or the customer withdraws the order while it waits (a cancellation by its
//! checkout's idempotency key), the saga compensates: it refunds what it charged and releases
//! what it reserved.
//! The payment and inventory systems here are in-process stand-ins that deduplicate by the
//! activity key Loom hands them, as a real payment API deduplicates by idempotency key.
//!
//! A wait of days holds nothing in memory: after a second it suspends (the order's actor is
//! passivated and its memory freed) and the approval's delivery, or the cancellation, wakes
//! it. The example shows the waiting orders suspended before an operator answers them. An order nobody answers is
//! placed too when the wait is short enough to watch it time out (at most a minute:
//! `--approval-wait 3s`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use loom_core::IdempotencyKey;
use loom_core::runtime::{AskOptions, Cancellation, Runtime};

mod actors;
use actors::{Order, Place, World};

#[derive(Parser)]
#[command(about = "An order saga on Loom")]
struct Args {
    /// Data directory of the embedded store.
    #[arg(long, default_value = "./loom-data-saga")]
    data: PathBuf,
    /// How long an order waits for its approval (`3d`, `90s`, `1500ms`).
    #[arg(long, default_value = "3d", value_parser = parse_wait)]
    approval_wait: Duration,
}

/// A wait of `<n>d`, `<n>h`, `<n>m`, `<n>s` or `<n>ms`.
fn parse_wait(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a wait such as 3d, 90s or 1500ms"))?;
    let unit_ms = match unit {
        "d" => 86_400_000,
        "h" => 3_600_000,
        "m" => 60_000,
        "s" => 1_000,
        "ms" => 1,
        _ => return Err(format!("{s:?}: the unit must be d, h, m, s or ms")),
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

fn main() -> std::process::ExitCode {
    // Loom's warnings (a store setting that cannot keep its promises, a store failure) go to
    // stderr, `RUST_LOG=info` or `debug` shows more; with `OTEL_EXPORTER_OTLP_ENDPOINT` set,
    // its spans go to that OpenTelemetry collector. Errors as sentences, with what to do when
    // Loom knows (a full disk, say).
    loom_telemetry::main_with("order_saga", || run().map_err(|e| loom_core::explain(&*e)))
}

#[tokio::main]
async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let world = Arc::new(World::default());
    let rt = Runtime::builder()
        .embedded(&args.data)
        .register_actor(Order {
            world: world.clone(),
            approval_wait: args.approval_wait,
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
            "refused",
            Place {
                amount: 250,
                needs_approval: true,
            },
        ),
        (
            "withdrawn",
            Place {
                amount: 150,
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
        (
            "unanswered",
            Place {
                amount: 200,
                needs_approval: true,
            },
        ),
    ];
    let watch_timeout = args.approval_wait <= Duration::from_secs(60);
    // A wait suspends once it has waited `suspend_after` in memory with longer than that left.
    let suspend_after = loom_core::runtime::Config::default().suspend_after;
    let suspends = args.approval_wait > suspend_after * 2 + Duration::from_millis(500);
    let mut asks = Vec::new();
    for (name, place) in orders {
        if name == "unanswered" && !watch_timeout {
            continue;
        }
        let order = rt.actor::<Order>(format!("{run}-{name}"))?;
        let amount = place.amount;
        // The checkout's key: a retried checkout is one order, and the customer can withdraw
        // it by the same key.
        let opts = AskOptions {
            idempotency_key: Some(IdempotencyKey::new(format!("checkout-{run}-{name}"))?),
            ..AskOptions::default()
        };
        asks.push((
            name,
            order.id().clone(),
            amount,
            tokio::spawn(async move { order.ask_with(place, opts).await }),
        ));
    }
    // The orders that wait for approval suspend after a second: none of them is in memory.
    if suspends {
        let waiting = if watch_timeout { 4 } else { 3 };
        let ids = ["approved", "refused", "withdrawn"].map(|name| {
            rt.actor::<Order>(format!("{run}-{name}"))
                .map(|o| o.id().clone())
        });
        let ids = ids.into_iter().collect::<Result<Vec<_>, _>>()?;
        let suspended = tokio::time::timeout(Duration::from_secs(30), async {
            while rt.metrics().suspensions < waiting || ids.iter().any(|id| rt.is_active(id)) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if suspended.is_err() {
            return Err("the orders waiting for approval did not suspend".into());
        }
        println!("{waiting} orders wait for approval, suspended: passivated, out of memory");
    }
    // An operator approves one order and refuses another; each delivery wakes its order.
    rt.actor::<Order>(format!("{run}-approved"))?
        .deliver_event("approved", &true)
        .await?;
    rt.actor::<Order>(format!("{run}-refused"))?
        .deliver_event("approved", &false)
        .await?;
    // The customer withdraws one (by its checkout's key): the cancellation ends its wait, and
    // it compensates. (Its checkout may still be on its way to the mailbox: look again.)
    let withdrawn = rt.actor::<Order>(format!("{run}-withdrawn"))?;
    let key = IdempotencyKey::new(format!("checkout-{run}-withdrawn"))?;
    let began = std::time::Instant::now();
    while withdrawn.cancel_key(&key).await? == Cancellation::NotFound {
        if began.elapsed() > Duration::from_secs(10) {
            return Err("the withdrawn order never waited in its mailbox".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
