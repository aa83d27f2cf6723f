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

/// Min, median and max of one scenario's runs (`loom bench --repeat N`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Scenario name.
    pub summary: String,
    /// How many runs.
    pub runs: usize,
    /// Operations per second: min, median, max.
    pub ops_per_s: [f64; 3],
    /// Ratio to the same-run baseline: min, median, max.
    pub ratio: [f64; 3],
    /// 99th percentile latency in ms: min, median, max.
    pub p99_ms: [f64; 3],
    /// CPU ms per 1000 operations where the scenario measures it: min, median, max.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ms_per_1000: Option<[f64; 3]>,
}

/// Min, median (the lower middle of an even count) and max.
pub fn spread(values: &mut [f64]) -> [f64; 3] {
    if values.is_empty() {
        return [0.0; 3];
    }
    values.sort_by(f64::total_cmp);
    [
        values[0],
        values[(values.len() - 1) / 2],
        values[values.len() - 1],
    ]
}

/// One [`Summary`] per scenario, in the order scenarios first appear in `ms`.
pub fn summaries(ms: &[Measurement]) -> Vec<Summary> {
    let mut names: Vec<&str> = Vec::new();
    for m in ms {
        if !names.contains(&m.scenario.as_str()) {
            names.push(&m.scenario);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let runs: Vec<&Measurement> = ms.iter().filter(|m| m.scenario == name).collect();
            let of = |f: &dyn Fn(&Measurement) -> f64| {
                spread(&mut runs.iter().map(|m| f(m)).collect::<Vec<_>>())
            };
            let cpu: Vec<f64> = runs
                .iter()
                .filter_map(|m| m.details.get("cpu_ms_per_1000_turns")?.as_f64())
                .collect();
            Summary {
                summary: name.to_owned(),
                runs: runs.len(),
                ops_per_s: of(&|m| m.ops_per_s),
                ratio: of(&|m| m.ratio),
                p99_ms: of(&|m| m.p99_ms),
                cpu_ms_per_1000: (cpu.len() == runs.len()).then(|| spread(&mut cpu.clone())),
            }
        })
        .collect()
}

/// Renders summaries as an aligned table: `min / median / max` in each cell.
pub fn summary_table(ss: &[Summary]) -> String {
    let three = |v: [f64; 3], digits: usize| {
        format!("{:.d$} / {:.d$} / {:.d$}", v[0], v[1], v[2], d = digits)
    };
    let mut rows = vec![[
        "SCENARIO".to_owned(),
        "RUNS".to_owned(),
        "OPS/S MIN / MEDIAN / MAX".to_owned(),
        "RATIO".to_owned(),
        "P99 MS".to_owned(),
        "CPU MS/1000".to_owned(),
    ]];
    for s in ss {
        rows.push([
            s.summary.clone(),
            s.runs.to_string(),
            three(s.ops_per_s, 0),
            three(s.ratio, 2),
            three(s.p99_ms, 2),
            s.cpu_ms_per_1000.map(|c| three(c, 0)).unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if c == 0 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_min_median_max() {
        assert_eq!(spread(&mut [3.0, 1.0, 2.0]), [1.0, 2.0, 3.0]);
        assert_eq!(spread(&mut [4.0, 1.0, 3.0, 2.0]), [1.0, 2.0, 4.0]);
        assert_eq!(spread(&mut []), [0.0; 3]);
    }

    #[test]
    fn summaries_group_runs_by_scenario_in_order() {
        let m = |name: &str, ops: f64| Measurement::new(name, "s", ops, 10.0, &mut []);
        let ms = [m("b", 1.0), m("a", 5.0), m("b", 3.0), m("b", 2.0)];
        let ss = summaries(&ms);
        assert_eq!(ss.len(), 2);
        assert_eq!((ss[0].summary.as_str(), ss[0].runs), ("b", 3));
        assert_eq!(ss[0].ops_per_s, [1.0, 2.0, 3.0]);
        assert_eq!(ss[0].ratio, [0.1, 0.2, 0.3]);
        assert_eq!(ss[1].ops_per_s, [5.0; 3]);
        assert!(ss[0].cpu_ms_per_1000.is_none());
        assert!(summary_table(&ss).contains("1 / 2 / 3"));
    }
}
