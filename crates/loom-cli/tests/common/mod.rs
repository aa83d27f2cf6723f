//! What the test files of the `loom` and `loom-dev` binaries share: running it, and reading what it prints.
// Each test file uses what it needs of these.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loom_core::runtime::{Compaction, Runtime};
use loom_core::{ActorId, EmbeddedStore, Envelope, LeaseOptions, Mailbox, Timestamp};
use loom_testkit::runtime::Counter;
use serde_json::{Value, json};

/// Runs `loom` with `args`: whether it succeeded, its stdout, its stderr. The environment's
/// `LOOM_STORE` and `LOOM_TOKEN` are not passed on: a test names what it uses.
pub fn loom(args: &[&str]) -> (bool, String, String) {
    // Set for the tests of the package that builds it: this file is shared by two.
    let Some(binary) = option_env!("CARGO_BIN_EXE_loom") else {
        panic!("no loom binary: only the tests of loom-cli run it");
    };
    run(binary, args, &[])
}

/// Runs `loom` with `args` and these environment variables set.
pub fn loom_with(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    // Set for the tests of the package that builds it: this file is shared by two.
    let Some(binary) = option_env!("CARGO_BIN_EXE_loom") else {
        panic!("no loom binary: only the tests of loom-cli run it");
    };
    run(binary, args, env)
}

/// Runs `loom-dev` with `args`, as [`loom`] runs `loom` (the tests of `crates/loom-dev` share
/// this file).
pub fn loom_dev(args: &[&str]) -> (bool, String, String) {
    // Set for the tests of the package that builds it: this file is shared by two.
    let Some(binary) = option_env!("CARGO_BIN_EXE_loom-dev") else {
        panic!("no loom-dev binary: only the tests of loom-dev run it");
    };
    run(binary, args, &[])
}

fn run(binary: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let (code, out, err) = run_code(binary, args, env);
    (code == Some(0), out, err)
}

/// Runs `loom` with `args`: its exit code (`None` if a signal ended it), stdout, stderr.
pub fn loom_code(args: &[&str]) -> (Option<i32>, String, String) {
    // Set for the tests of the package that builds it: this file is shared by two.
    let Some(binary) = option_env!("CARGO_BIN_EXE_loom") else {
        panic!("no loom binary: only the tests of loom-cli run it");
    };
    run_code(binary, args, &[])
}

fn run_code(binary: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(binary)
        .args(args)
        .env_remove("LOOM_STORE")
        .env_remove("LOOM_TOKEN")
        .env_remove("LOOM_URL")
        .envs(env.iter().copied())
        .output()
        .expect("run loom");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `loom` with `args`, which must succeed; its stdout.
pub fn ok(args: &[&str]) -> String {
    let (ok, out, err) = loom(args);
    assert!(ok, "loom {args:?} failed: {err}");
    out
}

/// One JSON value per line of `out`.
pub fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A store with compacted journals (snapshots, trim points), waiting messages (due and
/// delayed) and a dead letter.
pub fn seeded(dir: &Path) {
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let store = Arc::new(EmbeddedStore::open(dir).expect("open"));
        let loom = Runtime::builder()
            .store(store.clone())
            .register::<Counter>()
            .configure(|c| {
                c.compaction = Compaction {
                    every_entries: Some(20),
                    every_bytes: None,
                    keep: 2,
                }
            })
            .start()
            .await
            .expect("runtime");
        for k in ["a", "b", "c"] {
            let c = loom.actor::<Counter>(k).unwrap();
            for _ in 0..30 {
                c.send(1).await.expect("send");
            }
            assert_eq!(c.ask(0).await.expect("ask"), 30);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for k in ["a", "b", "c"] {
            let id = ActorId::new("counter", k).unwrap();
            while loom_core::JournalStore::info(&*store, &id)
                .await
                .unwrap()
                .trimmed_through
                == 0
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no compaction of {id}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        loom.shutdown().await;
        // Waiting messages, written after the runtime stopped so that they stay waiting.
        let inbox = ActorId::new("inbox", "x").unwrap();
        store
            .enqueue(&Envelope::new(inbox.clone(), json!("due")), None)
            .await
            .unwrap();
        let later = Envelope::new(inbox.clone(), json!("later"));
        store
            .enqueue(&later, Some(Timestamp::now() + Duration::from_secs(3600)))
            .await
            .unwrap();
        // Asked to be cancelled: copies keep the mark.
        assert!(store.cancel(&inbox, later.id).await.unwrap().is_some());
        let dead = ActorId::new("inbox", "dead").unwrap();
        dead_letter(&store, Envelope::new(dead, json!("poison")), "poison pill").await;
    });
}

/// Enqueues `message` and moves it to the dead letters with `reason`, as a node giving up on
/// it would.
pub async fn dead_letter(store: &EmbeddedStore, message: Envelope, reason: &str) {
    store.enqueue(&message, None).await.unwrap();
    let d = store
        .lease(&message.to, LeaseOptions::default())
        .await
        .unwrap()
        .expect("delivery");
    store.dead_letter(&d.receipt, reason).await.unwrap();
}

/// A free local port (released for the child that binds it next, or left closed).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A child process stopped when dropped (the test may fail before it stops it).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // Not panicking in a drop that may run while the test panics.
            if let Err(e) = self.0.kill().and_then(|()| self.0.wait().map(drop)) {
                eprintln!("could not stop a child process: {e}");
            }
        }
    }
}

/// `loom serve` on `store`; its process and the base URL it printed.
pub fn serve(store: &str, extra: &[&str], token: Option<&str>) -> (Proc, String) {
    // Set for the tests of the package that builds it: this file is shared by two.
    let Some(binary) = option_env!("CARGO_BIN_EXE_loom") else {
        panic!("no loom binary: only the tests of loom-cli run it");
    };
    let mut cmd = Command::new(binary);
    cmd.args(["serve", "--store", store, "--listen", "127.0.0.1:0"])
        .args(extra)
        .env_remove("LOOM_TOKEN")
        .env_remove("LOOM_STORE")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(t) = token {
        cmd.env("LOOM_TOKEN", t);
    }
    let mut child = cmd.spawn().expect("start loom serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read loom serve's first line");
    let base = line
        .strip_prefix("Loom Studio on ")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .trim_end_matches('/')
        .to_owned();
    (Proc(child), base)
}

pub fn stop(mut p: Proc) {
    let pid = p.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = p.0.try_wait().expect("wait") {
            assert!(s.success(), "loom serve exited with {s} on SIGINT");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "loom serve did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
