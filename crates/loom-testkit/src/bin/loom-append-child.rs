//! A child process for crash tests of the embedded store.
//!
//! `loom-append-child load DIR ACTORS` appends to ACTORS actors in DIR as fast as it can, and
//! after each append's future completes prints `ack <actor> <highest>` on stdout (flushed), so
//! that the parent knows exactly what was acknowledged when it kills this process.
//! Each entry's reply is `{"actor": n, "seq": seq}`, so the parent can check content too.
//!
//! `loom-append-child hold DIR` opens the store, prints `ready`, and waits to be killed.

use std::io::Write;
use std::sync::{Arc, Mutex};

use loom_core::{ActorId, EmbeddedStore, Entry, EntryKind, JournalStore};
use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match args.get(1).map(String::as_str) {
        Some("load") => {
            let dir = args.get(2).expect("DIR");
            let actors: u32 = args.get(3).and_then(|a| a.parse().ok()).expect("ACTORS");
            rt.block_on(load(dir, actors));
        }
        Some("hold") => {
            let dir = args.get(2).expect("DIR");
            let _store = EmbeddedStore::open(dir).expect("open store");
            println!("ready");
            std::io::stdout().flush().expect("flush stdout");
            loop {
                std::thread::park();
            }
        }
        _ => {
            eprintln!("usage: loom-append-child load DIR ACTORS | hold DIR");
            std::process::exit(2);
        }
    }
}

async fn load(dir: &str, actors: u32) {
    let store = EmbeddedStore::open(dir).expect("open store");
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let mut tasks = Vec::new();
    for n in 0..actors {
        let store = store.clone();
        let out = out.clone();
        tasks.push(tokio::spawn(async move {
            let id = ActorId::new("crash", format!("a{n}")).expect("id");
            let mut next = store.highest_seq(&id).await.expect("highest") + 1;
            loop {
                // Batches of 1 to 3 entries, so atomic multi-entry appends are crashed too.
                let len = 1 + (next % 3);
                let batch: Vec<Entry> = (next..next + len)
                    .map(|seq| {
                        Entry::new(
                            seq,
                            EntryKind::Completed {
                                reply: json!({"actor": n, "seq": seq}),
                            },
                        )
                    })
                    .collect();
                let highest = store.append(&id, next, &batch).await.expect("append");
                let mut out = out.lock().expect("stdout lock");
                writeln!(out, "ack {n} {highest}").expect("write stdout");
                out.flush().expect("flush stdout");
                next = highest + 1;
            }
        }));
    }
    // The writers run until the parent kills this process; one that panics ends it early.
    futures::future::try_join_all(tasks).await.expect("task");
}
