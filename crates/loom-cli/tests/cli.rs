//! The real `loom` binary on real stores, including bad input.

mod common;

use common::loom;

use std::process::Command;

use loom_core::{ActorId, EmbeddedStore, Entry, EntryKind, JournalStore, Snapshot};
use loom_testkit::servers::RedisServer;
use serde_json::json;

fn seeded_store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let a = ActorId::new("account", "alice").expect("id");
        let entries: Vec<Entry> = (1..=5)
            .map(|s| Entry::new(s, EntryKind::Completed { reply: json!(s) }))
            .collect();
        store.append(&a, 1, &entries).await.expect("append");
        store
            .save_snapshot(&a, &Snapshot::new(3, json!({"b": 3})), 2)
            .await
            .expect("snapshot");
        store.trim(&a, 3).await.expect("trim");
    });
    dir
}

#[test]
fn ls_show_and_verify_a_real_store() {
    let dir = seeded_store();
    let store = dir.path().to_str().expect("utf-8");
    let (ok, out, err) = loom(&["journal", "ls", "--store", store]);
    assert!(ok, "{err}");
    assert!(out.contains("account/alice"), "{out}");
    let (ok, out, err) = loom(&[
        "journal",
        "show",
        "account/alice",
        "--store",
        &format!("embedded:{store}"),
    ]);
    assert!(ok, "{err}");
    let seqs: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json line")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    assert_eq!(seqs, vec![4, 5]);
    let (ok, out, err) = loom(&["journal", "verify", "--store", store]);
    assert!(ok, "{err}");
    assert!(out.contains("1 journals, 2 entries verified"), "{out}");
}

#[test]
fn bad_input_is_a_clear_error_and_a_failing_exit() {
    let dir = seeded_store();
    let store = dir.path().to_str().expect("utf-8");
    let missing = dir.path().join("nope");
    let (ok, _, err) = loom(&["journal", "ls", "--store", missing.to_str().expect("utf-8")]);
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!missing.exists(), "a missing store was created");
    let (ok, _, err) = loom(&["journal", "show", "not-an-id", "--store", store]);
    assert!(!ok);
    assert!(err.contains("expected kind/key"), "{err}");
    let (ok, _, err) = loom(&["journal", "show", "account/bob", "--store", store]);
    assert!(!ok);
    assert!(err.contains("no journal for account/bob"), "{err}");
    let (ok, _, err) = loom(&["journal", "ls", "--store", "redis://127.0.0.1:1"]);
    assert!(!ok);
    assert!(err.contains("redis store unavailable"), "{err}");
    let (ok, _, err) = loom(&["journal", "ls", "--store", "ftp://x"]);
    assert!(!ok);
    assert!(err.contains("not known"), "{err}");
}

/// `LOOM_STORE` names the store when `--store` does not; `--store` wins when both are given.
#[test]
fn the_store_comes_from_loom_store_when_not_given() {
    let dir = seeded_store();
    let store = dir.path().to_str().expect("utf-8");
    let run = |args: &[&str], env: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_loom"));
        cmd.args(args).env_remove("LOOM_STORE");
        if let Some(s) = env {
            cmd.env("LOOM_STORE", s);
        }
        let out = cmd.output().expect("run loom");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&["journal", "ls"], Some(store));
    assert!(ok, "{err}");
    assert!(out.contains("account/alice"), "{out}");
    let missing = dir.path().join("nope");
    let (ok, _, err) = run(
        &["journal", "ls", "--store", missing.to_str().expect("utf-8")],
        Some(store),
    );
    assert!(
        !ok && err.contains("does not exist"),
        "--store did not win: {err}"
    );
}

/// With `--json`, a failure is one JSON object on stderr (`error`, `hint`: what to do
/// when Loom knows, else null, and `damage`: false but for damage a check found), and the exit
/// is still a failure: 2, for an error.
#[test]
fn a_json_command_fails_with_a_json_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope");
    let parse = |err: &str| -> serde_json::Value {
        serde_json::from_str(err.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {err}"))
    };
    let (code, out, err) = common::loom_code(&[
        "journal",
        "ls",
        "--json",
        "--store",
        missing.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(out.is_empty(), "{out}");
    let v = parse(&err);
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not exist")),
        "{v}"
    );
    assert_eq!(v["hint"], serde_json::Value::Null, "{v}");
    assert_eq!(v["damage"], false, "{v}");
    let (ok, _, err) = loom(&["journal", "ls", "--store", "redis://127.0.0.1:1", "--json"]);
    assert!(!ok);
    let v = parse(&err);
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("unavailable")),
        "{v}"
    );
    // A flag only before `--`: there it is a value.
    let (ok, _, err) = loom(&[
        "journal",
        "ls",
        "--store",
        "redis://127.0.0.1:1",
        "--",
        "--json",
    ]);
    assert!(!ok && err.starts_with("error: "), "{err}");
}

#[test]
fn completions_are_printed_for_a_shell() {
    let (ok, out, err) = loom(&["completions", "bash"]);
    assert!(ok, "{err}");
    assert!(out.contains("_loom") && out.contains("journal"), "{out}");
    let (ok, _, err) = loom(&["completions", "tcsh"]);
    assert!(!ok && err.contains("invalid value"), "{err}");
}

/// A store whose settings cannot keep Loom's promises is reported where a user sees it: on the
/// `loom` command's stderr, by default, with no RUST_LOG set.
#[test]
fn loom_shows_the_stores_warnings_by_default() {
    let server = RedisServer::start_with(&["--appendfsync", "everysec"]);
    // A store to look at (`journal ls` creates none): made by a first connect, as a node's.
    tokio::runtime::Runtime::new()
        .expect("tokio")
        .block_on(loom_redis::RedisStore::connect(&server.url()))
        .expect("create the store");
    let run = |rust_log: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loom"));
        cmd.args(["journal", "ls", "--store", &server.url()]);
        match rust_log {
            Some(v) => cmd.env("RUST_LOG", v),
            None => cmd.env_remove("RUST_LOG"),
        };
        let out = cmd.output().expect("run loom");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(None);
    assert!(
        err.contains("WARN") && err.contains("appendfsync is \"everysec\""),
        "{err}"
    );
    // Quieter when asked; a filter for one target keeps the others' warnings; a filter that
    // does not parse is said, and the default kept.
    assert!(!run(Some("error")).contains("appendfsync"));
    assert!(run(Some("loom_core=debug")).contains("appendfsync"));
    let err = run(Some("=bad=filter["));
    assert!(
        err.contains("RUST_LOG") && err.contains("appendfsync"),
        "{err}"
    );
}

/// `?replicas=N` on a Redis URL: `loom migrate` into a primary with a replica writes through
/// `WAIT`s and the replica holds the copy; a primary without replicas refuses the write with an
/// error that says so, instead of acknowledging what a failover would lose.
#[test]
fn a_redis_url_can_make_every_write_wait_for_replicas() {
    let dir = seeded_store();
    let source = dir.path().to_str().expect("utf-8");
    let (primary, replica) = RedisServer::start_with_replica();
    let to = format!("{}?replicas=1", primary.url());
    let (ok, out, err) = loom(&["migrate", "--from", source, "--to", &to]);
    assert!(ok, "{out}\n{err}");
    let (ok, out, err) = loom(&["journal", "ls", "--store", &replica.url()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("account/alice"),
        "the replica lacks the copy: {out}"
    );

    let alone = RedisServer::start();
    let to = format!("{}?replicas=1", alone.url());
    let (ok, out, err) = loom(&["migrate", "--from", source, "--to", &to]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("0 of the 1 replicas asked acknowledged"),
        "{err}"
    );
    let (ok, _, err) = loom(&[
        "journal",
        "ls",
        "--store",
        &format!("{}?replicas=0", alone.url()),
    ]);
    assert!(!ok && err.contains("replicas=0"), "{err}");
}
