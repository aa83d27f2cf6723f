//! What a scenario reports.

use std::collections::HashMap;
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
    status_mb("VmHWM:")
}

/// Resident memory of this process now (Linux `VmRSS`), in MB; 0 where unknown.
pub fn current_rss_mb() -> f64 {
    status_mb("VmRSS:")
}

/// A `kB` line of `/proc/self/status`, in MB; 0 where unknown.
fn status_mb(field: &str) -> f64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0.0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU time of this process so far, every thread included (`getrusage`).
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct it is given and reads nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is a valid `who`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// CPU time of each thread of this process so far, by thread id, with the thread's name
/// (Linux `/proc/self/task/*/stat`; empty elsewhere). Threads that ended are not listed.
pub fn thread_cpu() -> HashMap<u32, (String, Duration)> {
    let mut out = HashMap::new();
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        return out;
    }
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        // A thread may end between the listing and the read: skip it.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // `tid (name) state ...`: the name may hold spaces and parentheses, so split at the last
        // `)`; utime and stime are the 14th and 15th fields, the 12th and 13th after the name.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(u), Some(s)) = (tick(11), tick(12)) {
            let cpu = Duration::from_secs_f64((u + s) as f64 / ticks as f64);
            out.insert(tid, (name, cpu));
        }
    }
    out
}

/// The thread that used the most CPU between two [`thread_cpu`] readings: its name and its
/// share of `wall` (1.0 is one core all the time).
pub fn busiest_thread(
    before: &HashMap<u32, (String, Duration)>,
    after: &HashMap<u32, (String, Duration)>,
    wall: Duration,
) -> Option<(String, f64)> {
    after
        .iter()
        .map(|(tid, (name, cpu))| {
            let was = before.get(tid).map_or(Duration::ZERO, |(_, c)| *c);
            (name, cpu.saturating_sub(was))
        })
        .max_by_key(|(_, used)| *used)
        .map(|(name, used)| {
            (
                name.clone(),
                used.as_secs_f64() / wall.as_secs_f64().max(1e-9),
            )
        })
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

/// Min, median and max of one scenario's runs (`loom-dev bench --repeat N`).
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
                .filter_map(|m| {
                    m.details
                        .get("cpu_ms_per_1000_turns")
                        .or_else(|| m.details.get("cpu_ms_per_1000_invocations"))?
                        .as_f64()
                })
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

    /// A spinning thread's own reading grows by about the time it spun (other tests run at the
    /// same time, so only its own tid is looked at).
    #[test]
    fn a_threads_cpu_time_is_read_by_its_id() {
        let start = std::time::Instant::now();
        let spinner = std::thread::Builder::new()
            .name("bench-spinner".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() } as u32;
                let before = thread_cpu();
                let mut x = 0u64;
                while start.elapsed() < Duration::from_millis(400) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                // Read while this thread still runs: an ended thread is not listed.
                (x, tid, before, thread_cpu())
            })
            .unwrap();
        let (_, tid, before, after) = spinner.join().unwrap();
        let (name, cpu) = &after[&tid];
        assert_eq!(name, "bench-spinner");
        let used = cpu.saturating_sub(before.get(&tid).map_or(Duration::ZERO, |(_, c)| *c));
        // Spinning for 400 ms on a machine shared with other tests: at least some of it.
        assert!(used >= Duration::from_millis(50), "{used:?}");
        assert!(process_cpu() >= used);
    }

    #[test]
    fn the_busiest_thread_is_the_one_that_used_the_most_since_the_first_reading() {
        let at = |v: &[(u32, &str, u64)]| {
            v.iter()
                .map(|&(t, n, ms)| (t, (n.to_owned(), Duration::from_millis(ms))))
                .collect::<HashMap<_, _>>()
        };
        // `old` used the most in all, `new` the most between the readings; `gone` ended.
        let before = at(&[(1, "old", 5000), (2, "gone", 10)]);
        let after = at(&[(1, "old", 5100), (3, "new", 300)]);
        let (name, share) = busiest_thread(&before, &after, Duration::from_millis(600)).unwrap();
        assert_eq!(name, "new");
        assert!((share - 0.5).abs() < 1e-9);
        assert!(busiest_thread(&before, &HashMap::new(), Duration::from_secs(1)).is_none());
    }

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
