//! `loom-sim` as a user runs it: the same seed prints the same trace hash, the CI budget of
//! seeds passes, and a bug put back is reported with a command that replays it.

use std::process::{Command, Output};

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loom-sim"))
        .args(args)
        .output()
        .expect("run loom-sim")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn run_prints_the_same_trace_hash_for_the_same_seed() {
    let (a, b) = (sim(&["run", "--seed", "7"]), sim(&["run", "--seed", "7"]));
    assert!(
        a.status.success(),
        "{}{}",
        stdout(&a),
        String::from_utf8_lossy(&a.stderr)
    );
    assert!(
        stdout(&a).starts_with("seed 7: ok; trace "),
        "{}",
        stdout(&a)
    );
    assert_eq!(stdout(&a), stdout(&b));
    let json = sim(&["run", "--seed", "7", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON outcome");
    let hash = format!("{:016x}", v["trace"].as_u64().expect("trace"));
    assert!(stdout(&a).contains(&hash), "{hash} not in {}", stdout(&a));
}

/// The fixed budget CI spends on exploration at every submission: seeds 1..=`SIM_RUNS`
/// (default 300, about a minute of a debug build on 2 cores), the same on every machine,
/// so that a failure here is replayed by the command it prints. The time limit is only a cap.
#[test]
fn the_ci_budget_of_seeds_keeps_every_promise() {
    let runs = std::env::var("SIM_RUNS").unwrap_or_else(|_| "300".into());
    let o = sim(&[
        "explore",
        "--runs",
        &runs,
        "--seconds",
        "900",
        "--seed",
        "1",
    ]);
    let out = stdout(&o);
    println!("{out}");
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(" runs (") && out.contains(": 0 failed"),
        "{out}"
    );
}

#[test]
fn a_bug_put_back_is_reported_with_its_seed_and_the_smallest_plan_that_replays_it() {
    let o = sim(&[
        "explore",
        "--seconds",
        "300",
        "--seed",
        "1",
        "--first",
        "--bug",
        "ack-before-fsync",
    ]);
    let out = stdout(&o);
    assert!(!o.status.success(), "the bug was not found:\n{out}");
    assert!(out.contains("FAILED") && out.contains("lost"), "{out}");
    let replay = out
        .lines()
        .find_map(|l| l.split("smallest failing plan").nth(1))
        .and_then(|l| l.split(": ").nth(1))
        .unwrap_or_else(|| panic!("no smallest plan in:\n{out}"));
    let args: Vec<&str> = replay.split_whitespace().skip(1).collect();
    assert!(args.contains(&"--bug"), "{replay}");
    let again = sim(&args);
    assert!(
        !again.status.success() && stdout(&again).contains("FAILED"),
        "`{replay}` did not fail again:\n{}",
        stdout(&again)
    );
}
