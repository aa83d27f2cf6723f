//! What a scenario reports.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

/// One scenario's result. `ratio` is `ops_per_s / baseline_ops_per_s`.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// Scenario name, such as `append-seq`.
    pub scenario: String,
    /// The store, such as `embedded:/tmp/x`.
    pub store: String,
    /// Operations per second (what an operation is depends on the scenario; see `unit`).
    pub ops_per_s: f64,
    /// The same-run baseline, in the same unit.
    pub baseline_ops_per_s: f64,
    /// `ops_per_s / baseline_ops_per_s` (0 when there is no baseline).
    pub ratio: f64,
    /// Median latency of one operation, in ms.
    pub p50_ms: f64,
    /// 99th percentile latency, in ms.
    pub p99_ms: f64,
    /// Peak resident memory of the measuring process, in MB.
    pub peak_rss_mb: f64,
    /// Scenario-specific details (what an operation is, counts, settings).
    #[serde(flatten)]
    pub details: Map<String, Value>,
}

impl Measurement {
    /// A measurement with the ratio computed.
    pub fn new(
        scenario: &str,
        store: &str,
        ops_per_s: f64,
        baseline_ops_per_s: f64,
        latencies: &mut [Duration],
    ) -> Self {
        latencies.sort();
        Measurement {
            scenario: scenario.to_owned(),
            store: store.to_owned(),
            ops_per_s,
            baseline_ops_per_s,
            ratio: if baseline_ops_per_s > 0.0 {
                ops_per_s / baseline_ops_per_s
            } else {
                0.0
            },
            p50_ms: percentile_ms(latencies, 0.50),
            p99_ms: percentile_ms(latencies, 0.99),
            peak_rss_mb: peak_rss_mb(),
            details: Map::new(),
        }
    }

    /// Adds a detail.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }
}

/// The `p` quantile of sorted latencies, in ms.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Peak resident memory of this process (Linux `VmHWM`), in MB; 0 where unknown.
pub fn peak_rss_mb() -> f64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0.0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Renders measurements as an aligned table.
pub fn table(ms: &[Measurement]) -> String {
    let mut rows = vec![[
        "SCENARIO".to_owned(),
        "OPS/S".to_owned(),
        "BASELINE/S".to_owned(),
        "RATIO".to_owned(),
        "P50 MS".to_owned(),
        "P99 MS".to_owned(),
        "PEAK RSS MB".to_owned(),
        "UNIT".to_owned(),
    ]];
    for m in ms {
        rows.push([
            m.scenario.clone(),
            format!("{:.0}", m.ops_per_s),
            format!("{:.0}", m.baseline_ops_per_s),
            format!("{:.2}", m.ratio),
            format!("{:.3}", m.p50_ms),
            format!("{:.3}", m.p99_ms),
            format!("{:.1}", m.peak_rss_mb),
            m.details
                .get("unit")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if c == 0 || c == 7 {
                    format!("{v:<w$}", w = widths[c])
                } else {
                    format!("{v:>w$}", w = widths[c])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
