//! `loom-dev bench compression`, in a test binary of its own: its CPU and fsync load would
//! otherwise run beside the other bench tests (cargo runs one test binary at a time), where a
//! private Redis answering under `appendfsync always` on a busy disk is what they measure.

#[path = "../../loom-cli/tests/common/mod.rs"]
mod common;

use common::{json_lines, loom_dev as loom};

/// `loom-dev bench compression`, short: the codec's compressed snapshot is much smaller than its
/// JSON, and the ledger's kept records are stored compressed (the baseline's are not).
#[test]
fn compression_reports_bytes_saved_and_time_against_plain_json() {
    let (ok, out, err) = loom(&["bench", "compression", "--seconds", "0.2", "--json"]);
    assert!(ok, "loom-dev bench compression failed: {err}");
    let reports = json_lines(&out);
    let by = |name: &str| {
        reports
            .iter()
            .find(|r| r["scenario"] == name)
            .unwrap_or_else(|| panic!("no {name} report: {out}"))
    };
    let (codec, ledger) = (by("compression codec"), by("compression ledger"));
    assert!(codec["json_bytes"].as_u64().unwrap() > 60_000, "{codec}");
    assert!(codec["stored_of_json"].as_f64().unwrap() < 0.5, "{codec}");
    for k in [
        "encode_us_json",
        "encode_us_zstd",
        "decode_us_json",
        "decode_us_zstd",
    ] {
        let s = &codec[k];
        assert!(
            s["min"].as_f64().unwrap() <= s["median"].as_f64().unwrap()
                && s["median"].as_f64().unwrap() <= s["max"].as_f64().unwrap(),
            "{k}: {codec}"
        );
    }
    assert!(
        ledger["compressed_records"].as_u64().unwrap() > 0,
        "{ledger}"
    );
    assert_eq!(ledger["baseline_compressed_records"], 0, "{ledger}");
    assert!(ledger["stored_of_json"].as_f64().unwrap() < 0.5, "{ledger}");
    assert!(
        ledger["baseline_ops_per_s"].as_f64().unwrap() > 0.0,
        "{ledger}"
    );
}
