//! `loom-dev bench` on each store, with small sizes: every scenario reports one JSON object with
//! its same-run baseline, and a run on a shared server leaves nothing behind.

#[path = "../../loom-cli/tests/common/mod.rs"]
mod common;

use common::{json_lines, loom_dev as loom};

use std::collections::BTreeSet;

use loom_testkit::servers::{PostgresServer, RedisServer};
use serde_json::Value;

/// The tests of this file run one at a time: each loads the machine (fsync loops, a bank, a
/// hundred thousand sleepers), and a private Redis under `appendfsync always` sharing the disk
/// and the two cores with another of them went past its 10 s response timeout in CI.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    // A test that failed while holding it poisons it; the next one runs all the same.
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs every scenario small on `store` (a fresh embedded store when `None`) and checks what
/// each reports; returns the reports by scenario.
fn bench_all(store: Option<&str>) -> Vec<Value> {
    let mut args = vec![
        "bench",
        "all",
        "--actors",
        "10",
        "--entries",
        "200",
        "--json",
    ];
    if let Some(s) = store {
        args.extend(["--store", s]);
    }
    let (ok, out, err) = loom(&args);
    assert!(ok, "loom-dev bench failed: {err}");
    let reports: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let scenarios: BTreeSet<&str> = reports
        .iter()
        .map(|r| r["scenario"].as_str().expect("scenario"))
        .collect();
    let expected: BTreeSet<&str> = [
        "append-seq",
        "append-concurrent",
        "recover",
        "recover-no-compaction",
        "bank",
        "bank-half-rate",
    ]
    .into();
    assert_eq!(scenarios, expected, "{out}");
    for r in &reports {
        let num = |k: &str| {
            r[k].as_f64()
                .unwrap_or_else(|| panic!("{} has no number {k}: {r}", r["scenario"]))
        };
        assert!(r["store"].is_string(), "{r}");
        assert!(num("ops_per_s") > 0.0, "{r}");
        assert!(num("p50_ms") > 0.0 && num("p99_ms") >= num("p50_ms"), "{r}");
        assert!(num("peak_rss_mb") > 0.0, "{r}");
        // `recover` has no baseline (it is compared with itself, with and without compaction).
        if r["scenario"] != "recover" {
            let (ops, base) = (num("ops_per_s"), num("baseline_ops_per_s"));
            assert!(base > 0.0, "no baseline: {r}");
            assert!((num("ratio") - ops / base).abs() < 1e-9, "{r}");
        }
    }
    reports
}

#[test]
fn every_scenario_reports_its_baseline_on_embedded_with_the_engine_alongside() {
    let _serial = serial();
    let reports = bench_all(None);
    // The bank says what an invocation costs in CPU and which thread was busiest.
    let bank = reports
        .iter()
        .find(|r| r["scenario"] == "bank")
        .expect("a bank report");
    assert!(
        bank["cpu_ms_per_1000_invocations"].as_f64().unwrap() > 0.0,
        "{bank}"
    );
    assert!(
        !bank["busiest_thread"].as_str().unwrap().is_empty(),
        "{bank}"
    );
    // CPU is counted in 10 ms ticks: a short run may show none on its busiest thread.
    assert!(
        bank["busiest_thread_utilization"].as_f64().unwrap() >= 0.0,
        "{bank}"
    );
    for r in reports.iter().filter(|r| {
        r["scenario"]
            .as_str()
            .is_some_and(|s| s.starts_with("append"))
    }) {
        let e = r["engine_baseline_ops_per_s"]
            .as_f64()
            .expect("engine baseline");
        assert!(e > 0.0, "{r}");
        let ratio = r["engine_ratio"].as_f64().expect("engine ratio");
        assert!(
            (ratio - r["ops_per_s"].as_f64().unwrap() / e).abs() < 1e-9,
            "{r}"
        );
    }
    bank_runs_once_per_partition_count_on_a_fresh_store_each();
}

#[test]
fn every_scenario_reports_its_baseline_on_redis_and_leaves_no_key() {
    let _serial = serial();
    let server = RedisServer::start();
    bench_all(Some(&server.url()));
    let client = redis::Client::open(server.url()).expect("client");
    let mut c = client.get_connection().expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).expect("KEYS");
    assert!(keys.is_empty(), "left behind: {keys:?}");
}

#[test]
fn every_scenario_reports_its_baseline_on_postgres_and_leaves_no_schema() {
    let _serial = serial();
    let server = PostgresServer::start();
    bench_all(Some(&server.url()));
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let left: Vec<String> = rt.block_on(async {
        let pool = sqlx::PgPool::connect(&server.url()).await.expect("connect");
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'loombench%'")
            .fetch_all(&pool)
            .await
            .expect("list schemas")
    });
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn bad_scenarios_and_unreachable_stores_fail_clearly() {
    let _serial = serial();
    let (ok, _, err) = loom(&["bench", "no-such-scenario"]);
    assert!(!ok);
    assert!(err.contains("no-such-scenario"), "{err}");
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-socket");
    let url = format!("redis+unix://{}", missing.display());
    let (ok, out, err) = loom(&["bench", "append-seq", "--store", &url]);
    assert!(!ok, "{out}");
    assert!(err.to_lowercase().contains("redis"), "{err}");
}

/// The engine bake-off through the real binary: each engine on each partition count, twice,
/// with its raw baseline, its CPU per 1000 turns, and a min / median / max summary per engine.
#[test]
fn the_engine_bakeoff_reports_each_engine_per_partition_count_with_a_summary() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let store = store.to_str().expect("utf-8 path");
    let (ok, out, err) = loom(&[
        "bench",
        "engines",
        "--store",
        store,
        "--seconds",
        "0.3",
        "--partitions",
        "1,2",
        "--repeat",
        "2",
        "--json",
    ]);
    assert!(ok, "loom-dev bench engines failed: {err}");
    let lines = json_lines(&out);
    let runs: Vec<&Value> = lines.iter().filter(|l| l["scenario"].is_string()).collect();
    let summaries: Vec<&Value> = lines.iter().filter(|l| l["summary"].is_string()).collect();
    let names: BTreeSet<&str> = runs
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = [
        "engine-redb+redo-p1",
        "engine-fjall-p1",
        "engine-redb+redo-p2",
        "engine-fjall-p2",
        "engine-redb+redo-file-per-partition-p2",
    ]
    .into();
    assert_eq!(names, expected, "{out}");
    assert_eq!(runs.len(), 10, "{out}");
    for r in &runs {
        assert!(r["ops_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["baseline_ops_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["cpu_ms_per_1000_turns"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["disk_bytes"].as_u64().unwrap() > 0, "{r}");
    }
    assert_eq!(summaries.len(), 5, "{out}");
    for s in &summaries {
        assert_eq!(s["runs"], 2, "{s}");
        let ops: Vec<f64> = s["ops_per_s"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(ops[0] <= ops[1] && ops[1] <= ops[2], "{s}");
        assert!(s["cpu_ms_per_1000"].is_array(), "{s}");
    }
    // The bake-off's directories and files are gone; the store directory is left as it was.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("store"))
        .expect("store dir")
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with("bakeoff"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Without `--entries`, the append scenarios run for `--seconds` of measured time.
#[test]
fn append_scenarios_run_for_the_measured_time_asked() {
    let _serial = serial();
    let (ok, out, err) = loom(&["bench", "append-seq", "--seconds", "0.5", "--json"]);
    assert!(ok, "{err}");
    let r = &json_lines(&out)[0];
    let seconds = r["seconds"].as_f64().expect("seconds");
    assert!(seconds >= 0.5, "{r}");
    assert!(r["appends"].as_u64().unwrap() > 1, "{r}");
    let (ok, _, err) = loom(&["bench", "engines", "--partitions", "0"]);
    assert!(!ok);
    assert!(err.contains("--partitions"), "{err}");
}

/// Repeated bank runs on one store each verify their own books (a repeat once reused the
/// accounts of the run before and failed its verification).
#[test]
fn repeated_bank_runs_on_one_store_each_verify() {
    let _serial = serial();
    let (ok, out, err) = loom(&[
        "bench",
        "bank",
        "--actors",
        "10",
        "--entries",
        "200",
        "--repeat",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let lines = json_lines(&out);
    let banks = lines.iter().filter(|l| l["scenario"] == "bank").count();
    assert_eq!(banks, 2, "{out}");
    assert!(lines.iter().any(|l| l["summary"] == "bank"), "{out}");
}

/// `--rate` paces the bank's second run at the invocations/s asked for (`bank-paced`), so that
/// builds of different peaks compare at one rate; a rate that is not a positive number, or one
/// for a scenario it does not pace, is refused before anything runs.
#[test]
fn the_banks_second_run_keeps_the_rate_asked_for() {
    let _serial = serial();
    let (ok, out, err) = loom(&[
        "bench",
        "bank",
        "--actors",
        "10",
        "--entries",
        "300",
        "--rate",
        "150",
        "--json",
    ]);
    assert!(ok, "{err}");
    let lines = json_lines(&out);
    let scenarios: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["scenario"].as_str())
        .collect();
    assert_eq!(scenarios, ["bank", "bank-paced"], "{out}");
    let paced = &lines[1];
    let rate = paced["ops_per_s"].as_f64().expect("ops_per_s");
    // The schedule is of transfers at 150 invocations/s over the first run's invocations per
    // transfer: what is reported is that rate back, and what the paced part made is near it
    // (unpaced, the same transfers run at thousands a second).
    assert!((rate - 150.0).abs() < 1.0, "{paced}");
    let achieved = paced["achieved_invocations_per_s"]
        .as_f64()
        .expect("achieved_invocations_per_s");
    assert!((100.0..200.0).contains(&achieved), "{paced}");
    assert!(
        paced["latency_of"].as_str().unwrap().contains("--rate"),
        "{paced}"
    );
    for (args, says) in [
        (&["bench", "bank", "--rate", "0"][..], "above 0"),
        (&["bench", "bank", "--rate", "NaN"][..], "above 0"),
        (&["bench", "append-seq", "--rate", "100"][..], "bank"),
    ] {
        let (ok, out, err) = loom(args);
        assert!(!ok, "{args:?}: {out}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// Called from the embedded test rather than run beside it: one bank process fewer at a time
/// for the Redis and PostgreSQL tests running in parallel on a 2-core machine.
fn bank_runs_once_per_partition_count_on_a_fresh_store_each() {
    let (ok, out, err) = loom(&[
        "bench",
        "bank",
        "--partitions",
        "1,2",
        "--actors",
        "10",
        "--entries",
        "200",
        "--json",
    ]);
    assert!(ok, "loom-dev bench bank --partitions failed: {err}");
    let scenarios: BTreeSet<String> = json_lines(&out)
        .iter()
        .filter_map(|r| r["scenario"].as_str().map(str::to_owned))
        .collect();
    for s in [
        "bank P=1",
        "bank-half-rate P=1",
        "bank P=2",
        "bank-half-rate P=2",
    ] {
        assert!(scenarios.contains(s), "{s} missing: {scenarios:?}");
    }
}

/// `loom-dev bench sleepers`, small: every sleeper suspends while it waits (none stays active),
/// none wakes early or is lost, and the in-memory baseline holds them all active instead.
///
/// This caught sleepers activated again for nothing after they suspended (a stale ready scan,
/// a late wake), holding their leases: `all_asleep` was false in about one run in four. The
/// lead (time to put every sleeper to sleep before the first wakes; 5 s by default) is given
/// a little more; the run looks as soon as all are asleep.
#[test]
fn sleepers_suspend_while_they_wait_and_all_wake() {
    let _serial = serial();
    let (ok, out, err) = loom(&[
        "bench", "sleepers", "--actors", "300", "--window", "2", "--lead", "8", "--json",
    ]);
    assert!(ok, "loom-dev bench sleepers failed: {err}");
    let reports = json_lines(&out);
    let by = |name: &str| {
        reports
            .iter()
            .find(|r| r["scenario"] == name)
            .unwrap_or_else(|| panic!("no {name} report: {out}"))
    };
    let (suspended, held) = (by("sleepers"), by("sleepers (in memory)"));
    assert_eq!(suspended["actors"], 300);
    assert_eq!(
        suspended["all_asleep"], true,
        "not all asleep in time: {suspended}"
    );
    assert_eq!(held["all_asleep"], true, "not all asleep in time: {held}");
    assert_eq!(suspended["suspensions"], 300, "{suspended}");
    assert!(
        suspended["active_while_waiting"].as_u64().unwrap() < 300,
        "the suspended sleepers stayed in memory: {suspended}"
    );
    assert_eq!(held["suspensions"], 0, "{held}");
    assert_eq!(held["active_while_waiting"], 300, "{held}");
    // Sleepers take no leases of their own, in memory or not: the node holds its partitions'.
    let leases = held["leases_held_while_waiting"].as_u64().unwrap();
    assert!((1..300).contains(&leases), "{held}");
    assert_eq!(
        suspended["leases_held_while_waiting"], leases,
        "{suspended}"
    );
    // Every wake-up is counted once, warmed ahead or found cold; the held ones are all warm
    // (their run never stopped).
    for r in [suspended, held] {
        let (warmed, cold) = (r["woken_warmed"].as_u64(), r["woken_cold"].as_u64());
        assert_eq!(warmed.zip(cold).map(|(w, c)| w + c), Some(300), "{r}");
    }
    assert_eq!(held["woken_cold"], 0, "{held}");
    for r in [suspended, held] {
        for k in [
            "p50_ms",
            "p99_ms",
            "p99_warmed_ms",
            "p99_cold_ms",
            "rss_per_sleeper_bytes",
            "store_bytes_per_sleeper",
        ] {
            assert!(r[k].as_f64().is_some(), "{} has no {k}: {r}", r["scenario"]);
        }
    }
    let (ok, _, err) = loom(&["bench", "sleepers", "--actors", "0"]);
    assert!(!ok && err.contains("--actors above 0"), "{err}");
}

/// `loom-dev bench bank --nodes 1,2` on a private Redis: one node process, then two, each run
/// verified (done + refused = transfers) and reported with its node count and baseline, the
/// nodes gone and no key left behind afterwards; on an embedded store `--nodes` is refused.
#[test]
fn bank_runs_on_one_then_two_node_processes_and_leaves_no_key() {
    let _serial = serial();
    let server = RedisServer::start();
    let url = server.url();
    let (ok, out, err) = loom(&[
        "bench",
        "bank",
        "--nodes",
        "1,2",
        "--store",
        &url,
        "--actors",
        "10",
        "--entries",
        "300",
        "--json",
    ]);
    assert!(ok, "loom-dev bench bank --nodes failed: {err}");
    let reports = json_lines(&out);
    let nodes: Vec<u64> = reports.iter().filter_map(|r| r["nodes"].as_u64()).collect();
    assert_eq!(nodes, [1, 2], "{out}");
    for r in &reports {
        assert_eq!(r["scenario"], format!("bank nodes={}", r["nodes"]), "{r}");
        let done = r["done"].as_u64().unwrap_or(0) + r["refused"].as_u64().unwrap_or(0);
        assert_eq!(done, 300, "every transfer settled: {r}");
        assert!(r["ops_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
        assert!(r["baseline_ops_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
    }
    let client = redis::Client::open(url).expect("client");
    let mut c = client.get_connection().expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).expect("KEYS");
    assert!(keys.is_empty(), "left behind: {keys:?}");

    let (ok, _, err) = loom(&["bench", "bank", "--nodes", "1,3"]);
    assert!(!ok);
    assert!(err.contains("--nodes needs a store"), "{err}");
}
