//! [`Config`] from a TOML file and `LOOM_*` environment variables, over the defaults.
//!
//! One table of settings ([`KEYS`]) serves both: a file's `lease_ttl = "10s"` or
//! `[retry] max_attempts = 8` and the environment's `LOOM_LEASE_TTL=10s` or
//! `LOOM_RETRY_MAX_ATTEMPTS=8` set the same field through the same parser, so they accept the
//! same values and fail with the same message. Durations are written as `humantime` reads them
//! (`250ms`, `10s`, `3days`); a setting that can be off takes `"none"`. An unknown key in a file
//! is an error (a typo would otherwise be ignored); the environment is read only for the keys
//! known here, so other `LOOM_*` variables (`LOOM_STORE`, `LOOM_TOKEN`) are left alone.

use std::path::Path;
use std::time::Duration;

use super::Config;

/// Why settings could not be loaded. Nothing is applied from a source that fails.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("could not read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{path} is not TOML: {error}")]
    Toml {
        /// The file.
        path: String,
        /// Why.
        error: String,
    },
    /// A key no setting has.
    #[error("{source_name}: unknown setting {key:?} (known: {known})")]
    Unknown {
        /// The file or `environment`.
        source_name: String,
        /// The key.
        key: String,
        /// The known keys.
        known: String,
    },
    /// A value the setting does not take.
    #[error("{source_name}: {key} = {value:?}: {why}")]
    Bad {
        /// The file or `environment`.
        source_name: String,
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What it takes.
        why: String,
    },
}

type Setter = fn(&mut Config, &str) -> Result<(), String>;

/// The longest duration a setting takes: a century. Longer ones overflow the clocks they are
/// added to; a setting that can be off takes `"none"` instead.
const LONGEST: Duration = Duration::from_secs(100 * 365 * 86_400);

/// The shortest lease ttl: a node renews its leases and heartbeats every third of it, and a
/// store's round trip must fit in that with room to spare.
const SHORTEST_LEASE: Duration = Duration::from_millis(100);
const TOO_SHORT_A_LEASE: &str = "shorter than 100ms: leases are renewed every third of their ttl, and a store's round trip must fit in that";

fn duration(v: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(v.trim())
        .map_err(|e| format!("not a duration ({e}); write e.g. 500ms, 10s, 2h"))?;
    if d > LONGEST {
        return Err("longer than a century".into());
    }
    Ok(d)
}

/// A duration a loop or a lease is timed by: zero would spin or lose every lease.
fn positive_duration(v: &str) -> Result<Duration, String> {
    let d = duration(v)?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

fn optional_duration(v: &str) -> Result<Option<Duration>, String> {
    if matches!(v.trim(), "none" | "never") {
        return Ok(None);
    }
    duration(v).map(Some)
}

/// A bound that `none` (or `never`) turns off and zero does not: for `retention.idle_after`,
/// zero would delete every actor's journal as it passivates.
fn optional_positive_duration(v: &str) -> Result<Option<Duration>, String> {
    match optional_duration(v)? {
        Some(d) if d.is_zero() => Err("must be more than zero (\"none\" turns it off)".into()),
        d => Ok(d),
    }
}

fn number<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.trim()
        .parse()
        .map_err(|_| "not a whole number in range".to_owned())
}

fn positive_number<T: std::str::FromStr + PartialEq + Default>(v: &str) -> Result<T, String> {
    let n: T = number(v)?;
    if n == T::default() {
        return Err("must be more than zero".into());
    }
    Ok(n)
}

/// A bound that can be off: `"none"`, or more than zero (a bound of zero is no setting anyone
/// means: a mailbox that takes nothing, a snapshot after every turn where `1` says so already).
fn optional_positive_number<T: std::str::FromStr + PartialEq + Default>(
    v: &str,
) -> Result<Option<T>, String> {
    if v.trim() == "none" {
        return Ok(None);
    }
    positive_number(v)
        .map(Some)
        .map_err(|e| format!("{e} (\"none\" turns it off)"))
}

/// Every setting a file or the environment can change: its key, and how it is set.
pub const KEYS: &[(&str, Setter)] = &[
    ("node", |c, v| {
        if v.trim().is_empty() {
            return Err("empty".into());
        }
        c.node = v.trim().to_owned();
        Ok(())
    }),
    ("lease_ttl", |c, v| {
        let d = positive_duration(v)?;
        if d < SHORTEST_LEASE {
            return Err(TOO_SHORT_A_LEASE.into());
        }
        c.lease_ttl = d;
        Ok(())
    }),
    ("visibility", |c, v| {
        c.visibility = positive_duration(v)?;
        Ok(())
    }),
    ("idle_timeout", |c, v| {
        c.idle_timeout = positive_duration(v)?;
        Ok(())
    }),
    ("max_active", |c, v| {
        c.max_active = positive_number(v)?;
        Ok(())
    }),
    ("poll_interval", |c, v| {
        c.poll_interval = positive_duration(v)?;
        Ok(())
    }),
    ("max_mailbox", |c, v| {
        c.max_mailbox = optional_positive_number(v)?;
        Ok(())
    }),
    ("reply_ttl", |c, v| {
        c.reply_ttl = positive_duration(v)?;
        Ok(())
    }),
    ("ask_timeout", |c, v| {
        c.ask_timeout = positive_duration(v)?;
        Ok(())
    }),
    ("shutdown_timeout", |c, v| {
        c.shutdown_timeout = duration(v)?;
        Ok(())
    }),
    ("suspend_after", |c, v| {
        // "never": every wait held in memory (`Duration::MAX`, as the field documents).
        c.suspend_after = optional_duration(v)?.unwrap_or(Duration::MAX);
        Ok(())
    }),
    ("event_recheck", |c, v| {
        c.event_recheck = positive_duration(v)?;
        Ok(())
    }),
    ("retry.initial", |c, v| {
        c.retry.initial = positive_duration(v)?;
        Ok(())
    }),
    ("retry.max", |c, v| {
        c.retry.max = positive_duration(v)?;
        Ok(())
    }),
    ("retry.max_attempts", |c, v| {
        c.retry.max_attempts = positive_number(v)?;
        Ok(())
    }),
    ("compaction.every_entries", |c, v| {
        c.compaction.every_entries = optional_positive_number(v)?;
        Ok(())
    }),
    ("compaction.every_bytes", |c, v| {
        c.compaction.every_bytes = optional_positive_number(v)?;
        Ok(())
    }),
    ("compaction.keep", |c, v| {
        c.compaction.keep = positive_number(v)?;
        Ok(())
    }),
    ("retention.finished_after", |c, v| {
        c.retention.finished_after = duration(v)?;
        Ok(())
    }),
    ("retention.idle_after", |c, v| {
        c.retention.idle_after = optional_positive_duration(v)?;
        Ok(())
    }),
];

fn known() -> String {
    KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
}

/// The environment variable of a key: `retry.max_attempts` → `LOOM_RETRY_MAX_ATTEMPTS`.
pub fn env_name(key: &str) -> String {
    format!("LOOM_{}", key.replace('.', "_").to_uppercase())
}

impl Config {
    /// Checks a configuration built in code against the bounds that files and the environment
    /// are held to ([`apply`](Self::apply)): no duration longer than a century (longer ones
    /// overflow the clocks they are added to), none zero that times a loop or a lease, and no
    /// zero count where one is needed. [`RuntimeBuilder::start`](super::RuntimeBuilder::start)
    /// refuses a configuration that fails it, naming the setting. Three settings also take
    /// `Duration::MAX`, as their fields say: `shutdown_timeout` and `ask_timeout` (no bound)
    /// and `suspend_after` (never suspend).
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut c = loom_core::runtime::Config::default();
    /// assert!(c.check().is_ok());
    /// c.poll_interval = Duration::MAX;
    /// let e = c.check().unwrap_err();
    /// assert!(e.to_string().contains("poll_interval"), "{e}");
    /// ```
    pub fn check(&self) -> Result<(), ConfigError> {
        const CENTURY: &str = "longer than a century";
        const ZERO: &str = "must be more than zero";
        let bad = |key: &str, value: String, why: &str| ConfigError::Bad {
            source_name: "the configuration given in code".to_owned(),
            key: key.to_owned(),
            value,
            why: why.to_owned(),
        };
        // (key, value, may it be zero)
        let durations = [
            ("lease_ttl", self.lease_ttl, false),
            ("visibility", self.visibility, false),
            ("idle_timeout", self.idle_timeout, false),
            ("poll_interval", self.poll_interval, false),
            // Zero: every store refuses a record kept for no time, so no ask could be sent.
            ("reply_ttl", self.reply_ttl, false),
            ("event_recheck", self.event_recheck, false),
            ("retry.initial", self.retry.initial, false),
            ("retry.max", self.retry.max, false),
            (
                "retention.finished_after",
                self.retention.finished_after,
                true,
            ),
        ];
        let optional = [("retention.idle_after", self.retention.idle_after)];
        let unbounded = [
            ("shutdown_timeout", self.shutdown_timeout, true),
            ("ask_timeout", self.ask_timeout, false),
            ("suspend_after", self.suspend_after, true),
        ];
        for (key, d, zero) in durations {
            if d > LONGEST {
                return Err(bad(key, format!("{d:?}"), CENTURY));
            }
            if d.is_zero() && !zero {
                return Err(bad(key, format!("{d:?}"), ZERO));
            }
        }
        for (key, d) in optional {
            if let Some(d) = d.filter(|d| *d > LONGEST) {
                return Err(bad(key, format!("{d:?}"), CENTURY));
            }
            // Zero is not "off" (that is `None`): it would retire every actor as it passivates.
            if d.is_some_and(|d| d.is_zero()) {
                return Err(bad(
                    key,
                    "0ns".to_owned(),
                    "must be more than zero (None turns it off)",
                ));
            }
        }
        for (key, d, zero) in unbounded {
            if d > LONGEST && d != Duration::MAX {
                return Err(bad(
                    key,
                    format!("{d:?}"),
                    "longer than a century (Duration::MAX is taken: no bound)",
                ));
            }
            if d.is_zero() && !zero {
                return Err(bad(key, format!("{d:?}"), ZERO));
            }
        }
        if self.node.trim().is_empty() {
            return Err(bad("node", format!("{:?}", self.node), "empty"));
        }
        if !self.lease_ttl.is_zero() && self.lease_ttl < SHORTEST_LEASE {
            return Err(bad(
                "lease_ttl",
                format!("{:?}", self.lease_ttl),
                TOO_SHORT_A_LEASE,
            ));
        }
        let counts = [
            ("max_active", self.max_active as u64),
            ("retry.max_attempts", u64::from(self.retry.max_attempts)),
            ("compaction.keep", self.compaction.keep as u64),
        ];
        for (key, n) in counts {
            if n == 0 {
                return Err(bad(key, "0".to_owned(), ZERO));
            }
        }
        let bounds = [
            ("max_mailbox", self.max_mailbox),
            ("compaction.every_entries", self.compaction.every_entries),
            ("compaction.every_bytes", self.compaction.every_bytes),
        ];
        for (key, n) in bounds {
            if n == Some(0) {
                return Err(bad(
                    key,
                    "Some(0)".to_owned(),
                    "must be more than zero (None turns it off)",
                ));
            }
        }
        Ok(())
    }

    /// Applies `settings`, `(key, value)` pairs, over this configuration; `source_name` names
    /// where they came from in errors. All or nothing: on an error nothing is applied.
    pub fn apply<'a>(
        &mut self,
        source_name: &str,
        settings: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), ConfigError> {
        let mut next = self.clone();
        for (key, value) in settings {
            let Some((_, set)) = KEYS.iter().find(|(k, _)| *k == key) else {
                return Err(ConfigError::Unknown {
                    source_name: source_name.to_owned(),
                    key: key.to_owned(),
                    known: known(),
                });
            };
            set(&mut next, value).map_err(|why| ConfigError::Bad {
                source_name: source_name.to_owned(),
                key: key.to_owned(),
                value: value.to_owned(),
                why,
            })?;
        }
        *self = next;
        Ok(())
    }

    /// Applies TOML text over this configuration: top-level keys and the `[retry]`,
    /// `[compaction]` and `[retention]` tables (see [`KEYS`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use loom_core::runtime::Config;
    ///
    /// let mut c = Config::default();
    /// c.apply_toml("loom.toml", r#"
    ///     lease_ttl = "15s"
    ///     max_mailbox = "none"
    ///     [retry]
    ///     max_attempts = 8
    /// "#)?;
    /// assert_eq!(c.lease_ttl, Duration::from_secs(15));
    /// assert_eq!(c.max_mailbox, None);
    /// assert_eq!(c.retry.max_attempts, 8);
    /// assert!(c.apply_toml("loom.toml", "lease_tll = \"15s\"").is_err(), "a typo is an error");
    /// # Ok::<(), loom_core::runtime::ConfigError>(())
    /// ```
    pub fn apply_toml(&mut self, source_name: &str, text: &str) -> Result<(), ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Toml {
                path: source_name.to_owned(),
                error: e.to_string(),
            })?;
        let mut flat = Vec::new();
        flatten("", &table, &mut flat).map_err(|(key, why)| ConfigError::Bad {
            source_name: source_name.to_owned(),
            key,
            value: String::new(),
            why,
        })?;
        self.apply(
            source_name,
            flat.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    /// Applies the `LOOM_*` environment variables of the known keys (see [`env_name`]).
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        let mut next = self.clone();
        for (k, _) in KEYS {
            let name = env_name(k);
            let value = match std::env::var(&name) {
                Ok(v) => v,
                Err(std::env::VarError::NotPresent) => continue,
                Err(std::env::VarError::NotUnicode(v)) => {
                    return Err(ConfigError::Bad {
                        source_name: "environment".into(),
                        key: name,
                        value: v.to_string_lossy().into_owned(),
                        why: "not valid UTF-8".into(),
                    });
                }
            };
            // Errors name the variable the user set, not the key.
            next.apply("environment", [(*k, value.as_str())])
                .map_err(|e| match e {
                    ConfigError::Bad { value, why, .. } => ConfigError::Bad {
                        source_name: "environment".into(),
                        key: name.clone(),
                        value,
                        why,
                    },
                    other => other,
                })?;
        }
        *self = next;
        Ok(())
    }

    /// The defaults, then the TOML file at `path` if one is given, then the `LOOM_*`
    /// environment variables: what a deployed process reads at start.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        if let Some(p) = path {
            c.apply_file(p)?;
        }
        c.apply_env()?;
        Ok(c)
    }

    /// Applies the TOML file at `path` over this configuration ([`apply_toml`](Self::apply_toml)).
    pub fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        self.apply_toml(&path.display().to_string(), &text)
    }
}

/// `table` as `(dotted key, value)` pairs, strings unquoted and other values as TOML writes
/// them (so `max_attempts = 8` and `max_attempts = "8"` read alike).
fn flatten(
    prefix: &str,
    table: &toml::Table,
    out: &mut Vec<(String, String)>,
) -> Result<(), (String, String)> {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out)?,
            toml::Value::String(s) => out.push((key, s.clone())),
            toml::Value::Integer(n) => out.push((key, n.to_string())),
            other => {
                return Err((
                    key,
                    format!(
                        "a {}: expected a string or a whole number",
                        other.type_str()
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_set_by_a_file_and_by_the_environment_names() {
        let mut c = Config::default();
        c.apply_toml(
            "t.toml",
            r#"
            node = "n1"
            lease_ttl = "12s"
            visibility = "40s"
            idle_timeout = "2m"
            max_active = 7
            poll_interval = "20ms"
            max_mailbox = 9
            reply_ttl = "2h"
            ask_timeout = "5s"
            shutdown_timeout = "6s"
            suspend_after = "3s"
            event_recheck = "1h"
            [retry]
            initial = "10ms"
            max = "1s"
            max_attempts = 3
            [compaction]
            every_entries = "none"
            every_bytes = 4096
            keep = 3
            [retention]
            finished_after = "10m"
            idle_after = "30days"
            "#,
        )
        .expect("apply");
        let s = Duration::from_secs;
        let expected = Config {
            node: "n1".into(),
            lease_ttl: s(12),
            visibility: s(40),
            idle_timeout: s(120),
            max_active: 7,
            poll_interval: Duration::from_millis(20),
            max_mailbox: Some(9),
            reply_ttl: s(7200),
            ask_timeout: s(5),
            shutdown_timeout: s(6),
            suspend_after: s(3),
            event_recheck: s(3600),
            retry: super::super::Retry {
                initial: Duration::from_millis(10),
                max: s(1),
                max_attempts: 3,
            },
            compaction: super::super::Compaction {
                every_entries: None,
                every_bytes: Some(4096),
                keep: 3,
            },
            retention: super::super::Retention {
                finished_after: s(600),
                idle_after: Some(s(30 * 86_400)),
            },
        };
        assert_eq!(
            format!("{c:?}"),
            format!("{expected:?}"),
            "every field, as set"
        );
        c.apply("t", [("suspend_after", "never")]).expect("never");
        assert_eq!(c.suspend_after, Duration::MAX);
        assert_eq!(env_name("retry.max_attempts"), "LOOM_RETRY_MAX_ATTEMPTS");
        assert_eq!(env_name("lease_ttl"), "LOOM_LEASE_TTL");
    }

    #[test]
    fn a_bad_value_or_key_applies_nothing_and_says_which() {
        let mut c = Config::default();
        let before = format!("{c:?}");
        let e = c
            .apply(
                "env",
                [("lease_ttl", "20s"), ("retry.max_attempts", "many")],
            )
            .expect_err("refused");
        assert!(e.to_string().contains("retry.max_attempts"), "{e}");
        assert_eq!(format!("{c:?}"), before, "a refused source applied a part");
        let e = c.apply("env", [("leas_ttl", "20s")]).expect_err("refused");
        assert!(e.to_string().contains("known: node, lease_ttl"), "{e}");
        let e = c
            .apply_toml("t.toml", "lease_ttl = [")
            .expect_err("refused");
        assert!(matches!(e, ConfigError::Toml { .. }), "{e}");
        let e = c.apply("env", [("lease_ttl", "ten")]).expect_err("refused");
        assert!(e.to_string().contains("not a duration"), "{e}");
        for (key, value) in [
            ("poll_interval", "0s"),
            ("lease_ttl", "0ms"),
            ("max_active", "0"),
            ("retry.max_attempts", "0"),
            ("lease_ttl", "500years"),
            ("reply_ttl", "0s"),
            ("lease_ttl", "1ms"),
            ("max_mailbox", "0"),
            ("compaction.every_entries", "0"),
            ("compaction.every_bytes", "0"),
            ("retention.idle_after", "0s"),
        ] {
            let e = c.apply("env", [(key, value)]).expect_err(value);
            assert!(e.to_string().contains(key), "{e}");
        }
        // Zero is not "off" for the retention of idle actors (it would delete every actor's
        // journal as it passivates): the error says what is.
        let e = c
            .apply("env", [("retention.idle_after", "0")])
            .expect_err("zero");
        assert!(e.to_string().contains("\"none\" turns it off"), "{e}");
        for text in ["node = [\"a\"]", "lease_ttl = 1.5", "node = true"] {
            let e = c.apply_toml("t.toml", text).expect_err(text);
            assert!(
                e.to_string()
                    .contains("expected a string or a whole number"),
                "{e}"
            );
        }
        assert_eq!(format!("{c:?}"), before, "a refused source applied a part");
    }

    /// A configuration built in code is held to the bounds a file is: every out-of-bounds value
    /// is refused naming its setting, `Duration::MAX` only where it means "no bound", and a
    /// runtime does not start on one (before, `poll_interval = Duration::MAX` started, and
    /// its dispatcher panicked adding it to the clock).
    #[tokio::test]
    async fn a_configuration_in_code_is_held_to_the_bounds_of_a_file() {
        use super::super::Runtime;
        type Set = fn(&mut Config);
        let refused: [(&str, Set); 19] = [
            ("node", |c| c.node = " ".to_owned()),
            ("poll_interval", |c| c.poll_interval = Duration::MAX),
            ("poll_interval", |c| c.poll_interval = Duration::ZERO),
            ("lease_ttl", |c| {
                c.lease_ttl = LONGEST + Duration::from_secs(1)
            }),
            ("visibility", |c| c.visibility = Duration::MAX),
            ("idle_timeout", |c| c.idle_timeout = Duration::MAX),
            ("reply_ttl", |c| c.reply_ttl = Duration::MAX),
            ("reply_ttl", |c| c.reply_ttl = Duration::ZERO),
            ("lease_ttl", |c| c.lease_ttl = Duration::from_millis(1)),
            ("max_mailbox", |c| c.max_mailbox = Some(0)),
            ("compaction.every_entries", |c| {
                c.compaction.every_entries = Some(0)
            }),
            ("compaction.every_bytes", |c| {
                c.compaction.every_bytes = Some(0)
            }),
            ("retry.max", |c| c.retry.max = Duration::MAX),
            ("retention.idle_after", |c| {
                c.retention.idle_after = Some(Duration::MAX)
            }),
            // Zero would retire every actor as it passivates; `None` is off.
            ("retention.idle_after", |c| {
                c.retention.idle_after = Some(Duration::ZERO)
            }),
            ("shutdown_timeout", |c| c.shutdown_timeout = LONGEST * 2),
            ("ask_timeout", |c| c.ask_timeout = Duration::ZERO),
            ("max_active", |c| c.max_active = 0),
            ("compaction.keep", |c| c.compaction.keep = 0),
        ];
        for (key, set) in refused {
            let mut c = Config::default();
            set(&mut c);
            let e = c.check().expect_err(key);
            assert!(e.to_string().contains(key), "{key}: {e}");
            let started = Runtime::builder().memory().config(c).start().await;
            assert!(
                matches!(started, Err(super::super::StartError::Config(_))),
                "{key}: a runtime started"
            );
        }
        let c = Config {
            shutdown_timeout: Duration::MAX,
            ask_timeout: Duration::MAX,
            suspend_after: Duration::MAX,
            ..Config::default()
        };
        c.check().expect("no bound where the field takes one");
        // What a file may say, code may too: the longest of every duration, and zero or "none"
        // wherever a file takes them.
        for (value, least) in [("36500days", 10), ("0s", 3), ("none", 4)] {
            let mut c = Config::default();
            let every: Vec<(&str, &str)> = KEYS
                .iter()
                .filter(|(k, _)| {
                    let mut probe = Config::default();
                    *k != "node" && probe.apply("probe", [(*k, value)]).is_ok()
                })
                .map(|(k, _)| (*k, value))
                .collect();
            assert!(every.len() >= least, "{value}: {every:?}");
            c.apply("env", every).expect(value);
            c.check().expect("what a file may set passes");
        }
    }
}
