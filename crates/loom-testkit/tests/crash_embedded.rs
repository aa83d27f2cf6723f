//! Crash safety of the embedded store, with real processes.
//!
//! A child appends to many actors under load and reports every append whose future completed;
//! the test kills it with SIGKILL mid-load, reopens the directory, and checks that every reported
//! append is there, intact and gapless. Several rounds run on the same directory, so recovery of
//! a store that was itself recovered is crashed too.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use loom_core::{ActorId, EmbeddedStore, Entry, EntryKind, JournalStore, SeqRange, StoreError};
use serde_json::json;

const CHILD: &str = env!("CARGO_BIN_EXE_loom-append-child");
const ACTORS: u32 = 16;

/// Runs the child until it has reported at least `min_acks` appends, then kills it; returns the
/// highest acknowledged seq per actor.
fn run_and_kill(dir: &std::path::Path, min_acks: usize) -> HashMap<u32, u64> {
    let mut child = Command::new(CHILD)
        .args([
            "load",
            dir.to_str().expect("utf-8 path"),
            &ACTORS.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut acked: HashMap<u32, u64> = HashMap::new();
    let mut count = 0;
    let started = Instant::now();
    while count < min_acks {
        let line = lines
            .next()
            .expect("child ended before being killed")
            .expect("read child output");
        record(&mut acked, &line);
        count += 1;
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "child too slow"
        );
    }
    // SIGKILL: no destructor, no flush, no chance to finish a commit.
    child.kill().expect("kill child");
    // Lines the child wrote before it died were acknowledged too: read them all.
    for line in lines {
        match line {
            Ok(line) => record(&mut acked, &line),
            Err(_) => break,
        }
    }
    let status = child.wait().expect("wait for child");
    assert!(!status.success(), "child was not killed: {status:?}");
    acked
}

fn record(acked: &mut HashMap<u32, u64>, line: &str) {
    let mut parts = line.split_whitespace();
    // A torn last line (the kill landed mid-write) is not an acknowledgement.
    if let (Some("ack"), Some(n), Some(h), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
        && let (Ok(n), Ok(h)) = (n.parse::<u32>(), h.parse::<u64>())
    {
        let e = acked.entry(n).or_default();
        *e = (*e).max(h);
    }
}

async fn verify(dir: &std::path::Path, acked: &HashMap<u32, u64>) -> u64 {
    let store = EmbeddedStore::open(dir).expect("reopen after crash");
    let mut total = 0;
    for n in 0..ACTORS {
        let id = ActorId::new("crash", format!("a{n}")).expect("id");
        let highest = store.highest_seq(&id).await.expect("highest");
        let want = acked.get(&n).copied().unwrap_or(0);
        assert!(
            highest >= want,
            "actor {n}: acknowledged through {want} but only {highest} survived"
        );
        let entries: Vec<Entry> = store
            .read(&id, SeqRange::all())
            .try_collect()
            .await
            .expect("read");
        assert_eq!(entries.len() as u64, highest, "actor {n}: journal has gaps");
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1);
            assert_eq!(
                e.kind,
                EntryKind::Completed {
                    reply: json!({"actor": n, "seq": e.seq})
                }
            );
        }
        total += highest;
    }
    total
}

#[test]
fn embedded_store_keeps_every_acknowledged_append_across_sigkill() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut acked_total: HashMap<u32, u64> = HashMap::new();
    for round in 0..5 {
        // Kill at a different depth each round.
        let acked = run_and_kill(tmp.path(), 300 + round * 250);
        for (n, h) in acked {
            let e = acked_total.entry(n).or_default();
            *e = (*e).max(h);
        }
        let total = rt.block_on(verify(tmp.path(), &acked_total));
        let acked_sum: u64 = acked_total.values().sum();
        eprintln!("round {round}: {acked_sum} entries acknowledged in all, {total} on disk");
        assert!(total >= acked_sum);
    }
}

#[test]
fn second_process_on_the_same_directory_is_refused_naming_the_holder() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(CHILD)
        .args(["hold", tmp.path().to_str().expect("utf-8 path")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("child output").expect("read"), "ready");
    let err = EmbeddedStore::open(tmp.path()).expect_err("a second opener must be refused");
    match &err {
        StoreError::Locked { dir, holder } => {
            assert_eq!(dir, tmp.path());
            assert!(
                holder.contains(&format!("process {}", child.id())),
                "holder: {holder}"
            );
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&tmp.path().display().to_string()),
        "{message}"
    );
    child.kill().expect("kill holder");
    child.wait().expect("wait");
    // Once the holder is gone (even killed), the directory opens again.
    EmbeddedStore::open(tmp.path()).expect("open after the holder died");
}
