//! Appends to 100 journals at once in an embedded store and shows group commit at work.
//!
//! ```text
//! cargo run --release -p loom-core --example quickstart -- [DIR]   # default ./loom-data
//! cargo run --release -p loom-cli -- journal ls --store ./loom-data
//! ```

use std::time::Instant;

use loom_core::{ActorId, EmbeddedStore, Entry, EntryKind, JournalStore};
use serde_json::json;

fn main() -> std::process::ExitCode {
    // Loom's warnings (a store setting that cannot keep its promises, a store failure) go to
    // stderr, `RUST_LOG=info` or `debug` shows more; with `OTEL_EXPORTER_OTLP_ENDPOINT` set,
    // its spans go to that OpenTelemetry collector. Errors as sentences, with what to do when
    // Loom knows (a full disk, say).
    loom_telemetry::main_with("quickstart", || run().map_err(|e| loom_core::explain(&*e)))
}

#[tokio::main]
async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "./loom-data".to_owned());
    let store = EmbeddedStore::open(&dir)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..100 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = ActorId::new("account", format!("user-{n}"))?;
            let mut next = store.highest_seq(&id).await? + 1;
            for _ in 0..20 {
                let e = Entry::new(
                    next,
                    EntryKind::Completed {
                        reply: json!({ "deposit": 10 }),
                    },
                );
                // Returns only once the entry is durable on disk.
                next = store.append(&id, next, &[e]).await? + 1;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for t in tasks {
        t.await?.map_err(|e| e.to_string())?;
    }
    let stats = store.writer_stats();
    println!(
        "appended 2000 durable entries to 100 journals in {:.0?} ({} commits, {:.1} appends per fsync) in {dir}",
        started.elapsed(),
        stats.commits,
        stats.requests as f64 / stats.commits.max(1) as f64
    );
    Ok(())
}
