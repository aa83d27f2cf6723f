//! Reading a Prometheus text scrape (`/metrics`) in tests.

use std::collections::BTreeSet;

/// A series' name and its labels (`kind="counter"`, …) as written.
fn parts(series: &str) -> (&str, BTreeSet<&str>) {
    match series.split_once('{') {
        Some((name, labels)) => (name, labels.trim_end_matches('}').split(',').collect()),
        None => (series, BTreeSet::new()),
    }
}

/// The value of the first series in `scrape` named as `series` (`name` or
/// `name{label="v",…}`) that has at least its labels, in any order (a runtime's gauges carry
/// its `node` as well); one labelled `outcome` (a failed turn's latency) only if `series` names
/// its outcome. `None` if there is none.
///
/// ```
/// let scrape = "# TYPE up gauge\nup{node=\"a\",kind=\"k\"} 1\nturn_count{kind=\"k\",outcome=\"failed\"} 2\nturn_count{kind=\"k\"} 5\n";
/// assert_eq!(loom_testkit::scrape::value(scrape, r#"up{kind="k"}"#), Some(1.0));
/// assert_eq!(loom_testkit::scrape::value(scrape, r#"turn_count{kind="k"}"#), Some(5.0));
/// assert_eq!(loom_testkit::scrape::value(scrape, r#"turn_count{outcome="failed"}"#), Some(2.0));
/// assert_eq!(loom_testkit::scrape::value(scrape, "down"), None);
/// ```
pub fn value(scrape: &str, series: &str) -> Option<f64> {
    let (name, wanted) = parts(series);
    let outcome = |labels: &BTreeSet<&str>| labels.iter().any(|l| l.starts_with("outcome="));
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            let (n, labels) = parts(s);
            (n == name && labels.is_superset(&wanted) && outcome(&labels) == outcome(&wanted))
                .then(|| v.parse().ok())?
        })
}
