//! Wall-clock timestamps, in milliseconds since the Unix epoch.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time, in milliseconds since the Unix epoch (UTC).
///
/// ```
/// use std::time::Duration;
/// use loom_core::Timestamp;
///
/// let t = Timestamp::from_millis(1_700_000_000_000);
/// assert_eq!(t + Duration::from_secs(1), Timestamp::from_millis(1_700_000_001_000));
/// assert_eq!(t.to_string(), "2023-11-14T22:13:20.000Z");
/// assert_eq!(Timestamp::MAX.to_string(), "never");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The epoch.
    pub const ZERO: Timestamp = Timestamp(0);

    /// The end of time: a deadline that never comes (an idempotency reservation held until its
    /// message is settled, say). Printed `never`.
    pub const MAX: Timestamp = Timestamp(u64::MAX);

    /// Now, by this machine's clock (or the simulated one, see [`crate::seam`]).
    pub fn now() -> Self {
        if let Some(ms) = crate::seam::simulated_now_ms() {
            return Timestamp(ms);
        }
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            // A clock before 1970 is a broken machine; treat it as the epoch rather than panic.
            .unwrap_or(Duration::ZERO);
        Timestamp(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// From milliseconds since the epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// How long after `earlier` this is, or zero if it is not after it.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;

    fn add(self, d: Duration) -> Timestamp {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(ms))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Past what the calendar can print (year 10000 and on), only `MAX` is meaningful.
        match UNIX_EPOCH.checked_add(Duration::from_millis(self.0)) {
            Some(t) if self.0 < 253_402_300_800_000 => {
                write!(f, "{}", humantime::format_rfc3339_millis(t))
            }
            _ => f.write_str("never"),
        }
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({self})")
    }
}
