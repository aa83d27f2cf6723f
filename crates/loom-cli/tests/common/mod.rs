//! What the `loom` binary's test files share: running it, and reading what it prints.
// Each test file uses what it needs of these.
#![allow(dead_code)]

use std::process::Command;

use serde_json::Value;

/// Runs `loom` with `args`: whether it succeeded, its stdout, its stderr.
pub fn loom(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loom"))
        .args(args)
        .output()
        .expect("run loom");
    (
        out.status.success(),
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
