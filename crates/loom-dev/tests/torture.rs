//! `loom-dev torture`, the real binary, 20 SIGKILLs per backend (and crashes of the Redis and
//! PostgreSQL servers themselves): nothing acknowledged is lost,
//! nothing is applied twice, every journal is gapless, no actor is parked.

use std::process::Command;

fn torture(backend: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_loom-dev"))
        .args([
            "torture",
            "--backend",
            backend,
            "--kills",
            "20",
            "--transfers",
            "6000",
            "--json",
        ])
        .output()
        .expect("run loom-dev torture");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "torture on {backend} failed:\n{stdout}\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON report");
    eprintln!("{backend}: {report}");
    assert_eq!(report["lost"], 0);
    assert_eq!(report["doubled"], 0);
    assert!(
        report["kills"].as_u64().unwrap_or(0) >= 10,
        "too few rounds were killed mid-load: {report}"
    );
    assert!(report["acknowledged"].as_u64().unwrap_or(0) > 0);
}

#[test]
fn torture_embedded_20_kills() {
    torture("embedded");
}

#[test]
fn torture_redis_20_kills_and_server_kills() {
    torture("redis");
}

#[test]
fn torture_postgres_20_kills_and_server_crashes() {
    torture("postgres");
}
