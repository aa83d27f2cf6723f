//! The compression workload: what zstd frames (entries and snapshots over
//! [`codec::COMPRESS_ABOVE`]) save and cost on a state-heavy actor.
//!
//! Two measurements:
//! - **codec**: a ~64 KiB JSON state encoded and decoded as a snapshot frame, compressed (what
//!   Loom stores) against plain JSON (what it stored before), for a few seconds each, in rounds
//!   (min/median/max per round);
//! - **ledger**: an actor whose state is that document, each message changing one order (a
//!   small patch), snapshotting every 10 entries: messages per second on the store under test,
//!   and the bytes its journal and snapshots take as JSON and as stored.

use std::time::{Duration, Instant};

use loom_core::codec::{self, RecordType};
use loom_core::runtime::{Actor, Compaction, Context, Rejected, Runtime, journal_bytes};
use loom_core::{ActorId, Snapshot, Store};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::report::Measurement;

/// One order of the ledger's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Order {
    id: u32,
    customer: String,
    sku: String,
    cents: u64,
    status: String,
    note: String,
}

/// The ledger's state: `orders` orders, about 160 bytes of JSON each.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Book {
    orders: Vec<Order>,
}

impl Book {
    /// A book of `n` orders, made the same way every time.
    pub fn new(n: u32) -> Self {
        Book {
            orders: (0..n)
                .map(|i| Order {
                    id: i,
                    customer: format!("customer-{:05}", (i * 7919) % 20_000),
                    sku: format!(
                        "SKU-{:04}-{}",
                        (i * 31) % 1000,
                        ["S", "M", "L", "XL"][i as usize % 4]
                    ),
                    cents: u64::from((i * 104_729) % 100_000),
                    status: "placed".into(),
                    note: format!("deliver to door {} before {}:00", i % 40, 8 + i % 10),
                })
                .collect(),
        }
    }
}

/// The state-heavy actor: `(order, status)` sets one order's status (the book starts with
/// [`Ledger::orders`] orders on its first message).
pub struct Ledger {
    /// Orders in a fresh book.
    pub orders: u32,
}

impl Actor for Ledger {
    const KIND: &'static str = "ledger";
    type State = Book;
    type Message = (u32, String);
    type Reply = usize;

    async fn handle(
        &self,
        book: &mut Book,
        _ctx: &mut Context<'_>,
        (order, status): (u32, String),
    ) -> Result<usize, Rejected> {
        if book.orders.is_empty() {
            *book = Book::new(self.orders);
        }
        let n = book.orders.len();
        match book.orders.get_mut(order as usize % n.max(1)) {
            Some(o) => o.status = status,
            None => return Err(Rejected::new("empty book")),
        }
        Ok(n)
    }
}

/// How long and how big.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Orders in the state (500 make about 64 KiB of JSON).
    pub orders: u32,
    /// Seconds of each codec measurement and of the ledger run.
    pub seconds: f64,
}

/// Why the workload failed.
#[derive(Debug, thiserror::Error)]
pub enum CompressionError {
    /// The runtime or the store failed.
    #[error("{0}")]
    Failed(String),
}

fn failed(e: impl std::fmt::Display) -> CompressionError {
    CompressionError::Failed(e.to_string())
}

/// Rounds of `op` for `seconds`: the mean of each round in µs, sorted.
fn rounds(seconds: f64, mut op: impl FnMut()) -> Vec<f64> {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut out = Vec::new();
    while Instant::now() < until || out.len() < 3 {
        let t = Instant::now();
        for _ in 0..50 {
            op();
        }
        out.push(t.elapsed().as_secs_f64() * 1e6 / 50.0);
    }
    out.sort_by(f64::total_cmp);
    out
}

fn spread(r: &[f64]) -> serde_json::Value {
    json!({
        "min": r.first().copied().unwrap_or(0.0),
        "median": r.get(r.len() / 2).copied().unwrap_or(0.0),
        "max": r.last().copied().unwrap_or(0.0),
    })
}

/// The codec measurement (CPU only, no store).
pub fn codec_costs(label: &str, shape: Shape) -> Result<Measurement, CompressionError> {
    let state = serde_json::to_value(Book::new(shape.orders)).map_err(failed)?;
    let snap = Snapshot::new(1, json!({ "state": state, "recent": [] }));
    let plain = codec::encode(RecordType::Snapshot, &snap).map_err(failed)?;
    let packed = codec::encode_sized(RecordType::Snapshot, &snap, true).map_err(failed)?;
    let each = shape.seconds / 4.0;
    let enc_plain = rounds(each, || {
        std::hint::black_box(codec::encode(RecordType::Snapshot, &snap).ok());
    });
    let enc_zstd = rounds(each, || {
        std::hint::black_box(codec::encode_snapshot(&snap).ok());
    });
    let dec_plain = rounds(each, || {
        std::hint::black_box(codec::decode_snapshot(1, &plain).ok());
    });
    let dec_zstd = rounds(each, || {
        std::hint::black_box(codec::decode_snapshot(1, &packed.frame).ok());
    });
    let med = |r: &[f64]| r.get(r.len() / 2).copied().unwrap_or(0.0);
    let mut m = Measurement::new(
        "compression codec",
        label,
        1e6 / med(&enc_zstd),
        1e6 / med(&enc_plain),
        &mut [],
    );
    let details = json!({
        "unit": "snapshot encodes/s, compressed; baseline: the same as plain JSON",
        "json_bytes": packed.plain_len,
        "stored_bytes": packed.frame.len(),
        "stored_of_json": packed.frame.len() as f64 / packed.plain_len as f64,
        "encode_us_json": spread(&enc_plain),
        "encode_us_zstd": spread(&enc_zstd),
        "decode_us_json": spread(&dec_plain),
        "decode_us_zstd": spread(&dec_zstd),
    });
    if let serde_json::Value::Object(map) = details {
        m.details.extend(map);
    }
    Ok(m)
}

/// The ledger run on `store`, with compression off (the baseline) and then on: messages one
/// after another for `shape.seconds` each, to a fresh actor each.
pub async fn ledger(
    store: std::sync::Arc<dyn Store>,
    label: &str,
    shape: Shape,
) -> Result<Measurement, CompressionError> {
    /// Turns compression back on however the baseline run ends (a panic included).
    struct On;
    impl Drop for On {
        fn drop(&mut self) {
            codec::set_compression(true);
        }
    }
    let plain = {
        let _on = On;
        codec::set_compression(false);
        ledger_once(store.clone(), shape).await?
    };
    let mut packed = ledger_once(store, shape).await?;
    let mut m = Measurement::new(
        "compression ledger",
        label,
        packed.ops,
        plain.ops,
        &mut packed.latencies,
    );
    let details = json!({
        "unit": "messages/s to one actor with ~64 KiB of state, a snapshot every 10 entries; baseline: compression off",
        "messages": packed.latencies.len(),
        "compactions": packed.compactions,
        "kept_json_bytes": packed.json,
        "kept_stored_bytes": packed.stored,
        "stored_of_json": if packed.json > 0 { packed.stored as f64 / packed.json as f64 } else { 0.0 },
        "compressed_records": packed.compressed,
        "baseline_kept_stored_bytes": plain.stored,
        "baseline_compressed_records": plain.compressed,
    });
    if let serde_json::Value::Object(map) = details {
        m.details.extend(map);
    }
    Ok(m)
}

struct Run {
    ops: f64,
    latencies: Vec<Duration>,
    compactions: u64,
    json: u64,
    stored: u64,
    compressed: u64,
}

async fn ledger_once(
    store: std::sync::Arc<dyn Store>,
    shape: Shape,
) -> Result<Run, CompressionError> {
    let rt = Runtime::builder()
        .store(store.clone())
        .register_actor(Ledger {
            orders: shape.orders,
        })
        .configure(|c| {
            c.compaction = Compaction {
                every_entries: Some(10),
                every_bytes: None,
                keep: 2,
            }
        })
        .start()
        .await
        .map_err(failed)?;
    let key = format!("book-{:08x}", fastrand::u32(..));
    let actor = rt.actor::<Ledger>(&key).map_err(failed)?;
    let statuses = ["paid", "packed", "shipped", "delivered"];
    let until = Instant::now() + Duration::from_secs_f64(shape.seconds);
    let mut latencies = Vec::new();
    let began = Instant::now();
    let mut i = 0u32;
    while Instant::now() < until || latencies.len() < 20 {
        let t = Instant::now();
        let status = statuses[i as usize % 4].to_owned();
        actor.ask((i * 13, status)).await.map_err(failed)?;
        latencies.push(t.elapsed());
        i += 1;
    }
    let ops = latencies.len() as f64 / began.elapsed().as_secs_f64();
    let compactions = rt.metrics().compactions;
    rt.shutdown().await;
    let id = ActorId::new(Ledger::KIND, &key).map_err(failed)?;
    // Measured now, with compression as this run had it: what the run stored.
    let b = journal_bytes(&*store, &id).await.map_err(failed)?;
    let (json, stored, compressed) = (b.json, b.encoded, b.compressed_records);
    Ok(Run {
        ops,
        latencies,
        compactions,
        json,
        stored,
        compressed,
    })
}
