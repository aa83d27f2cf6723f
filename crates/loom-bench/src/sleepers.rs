//! The sleepers workload: many actors, each in one long durable sleep, woken at moments spread
//! uniformly over a window. What suspension (`Config::suspend_after`) saves and costs: memory
//! and store bytes per sleeper while they wait, and how late they wake.
//!
//! Each sleeper gets one message, "sleep until T"; its handler sleeps (`ctx.sleep`) until T and
//! records how late it woke. With suspension on (the default), a sleeper passivates while it
//! sleeps; the same run with suspension off (`suspend_after = Duration::MAX`, every sleeper held
//! in memory, at most `max_active` of them) is the baseline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use loom_core::runtime::{Actor, Context, Rejected, Runtime};
use loom_core::{Store, Timestamp};
use serde_json::json;
use tokio::time::Instant;

use crate::report::{Measurement, current_rss_mb, percentile_ms};

/// An actor that sleeps until the moment its message names, then records how late it woke.
pub struct Sleeper {
    /// Each sleeper's wake-up, in the order they woke.
    pub woke: Arc<Mutex<Vec<Wake>>>,
    /// Runs that reached the sleep (a suspended sleeper's replay reaches it again).
    pub asleep: Arc<AtomicUsize>,
}

impl Actor for Sleeper {
    const KIND: &'static str = "sleeper";
    type State = ();
    /// When to wake, in ms since the Unix epoch.
    type Message = u64;
    type Reply = ();

    async fn handle(
        &self,
        _state: &mut (),
        ctx: &mut Context<'_>,
        until: u64,
    ) -> Result<(), Rejected> {
        let due = Timestamp::from_millis(until);
        // When this run (the first, or a replay after the suspension) began: not journaled.
        let began = Timestamp::now();
        // Journaled: a replay after the suspension sleeps what is left of the same sleep.
        let left = due.saturating_since(ctx.now()?);
        self.asleep.fetch_add(1, Ordering::Relaxed);
        ctx.sleep(left).await?;
        let wake = Wake {
            late: Timestamp::now().saturating_since(due),
            began_late: began.saturating_since(due),
        };
        self.woke
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(wake);
        Ok(())
    }
}

/// One sleeper's wake-up.
#[derive(Debug, Clone, Copy)]
pub struct Wake {
    /// How late it woke: from its moment to its handler going on after the sleep.
    pub late: Duration,
    /// How late the run that woke began (zero if it began before the moment: the sleeper was
    /// warmed, activated ahead of its moment). Of a late wake-up, this much was spent before
    /// the handler ran at all (finding the message, activating, replaying); the rest after.
    pub began_late: Duration,
}

/// The shape of a sleepers run.
#[derive(Debug, Clone, Copy)]
pub struct Sleepers {
    /// Sleepers.
    pub actors: usize,
    /// The wake-ups are spread uniformly over this window.
    pub window: Duration,
    /// The window begins this long after the first message is sent, so that every sleeper is
    /// asleep (suspended) before the first wakes.
    pub lead: Duration,
    /// Suspend the sleepers (the default), or hold them in memory (the baseline).
    pub suspend: bool,
}

/// Why a sleepers run failed.
#[derive(Debug, thiserror::Error)]
pub enum SleepersError {
    /// A send failed.
    #[error(transparent)]
    Send(#[from] loom_core::runtime::SendError),
    /// The runtime did not start.
    #[error(transparent)]
    Start(#[from] loom_core::runtime::StartError),
    /// Not every sleeper woke in time.
    #[error("only {woke} of {actors} sleepers woke within {waited:?}")]
    Unwoken {
        /// Sleepers that woke.
        woke: usize,
        /// Sleepers.
        actors: usize,
        /// How long the run waited.
        waited: Duration,
    },
}

/// Runs the sleepers on `store` and measures them. `store_bytes` reads the store's size on
/// disk, where it has one. The measurement's operations are wake-ups per second over the
/// window; its latencies are how late each sleeper woke; its details hold memory and store
/// bytes per sleeper while they wait.
pub async fn run(
    store: Arc<dyn Store>,
    label: &str,
    shape: Sleepers,
    store_bytes: impl Fn() -> Option<u64>,
) -> Result<Measurement, SleepersError> {
    let woke: Arc<Mutex<Vec<Wake>>> = Arc::default();
    let asleep: Arc<AtomicUsize> = Arc::default();
    let rss_before = current_rss_mb();
    let bytes_before = store_bytes();
    let rt = Runtime::builder()
        .store(store)
        .register_actor(Sleeper {
            woke: woke.clone(),
            asleep: asleep.clone(),
        })
        .configure(|c| {
            if !shape.suspend {
                c.suspend_after = Duration::MAX;
            }
        })
        .start()
        .await?;
    let began = Instant::now();
    let start = Timestamp::now() + shape.lead;
    // The wait for every sleeper to be asleep gives up a little before the window: the runtime
    // warms sleepers (takes their leases) shortly before they come due, so a later look could
    // never see every lease released.
    let settle_by = Timestamp::now() + shape.lead.saturating_sub(Duration::from_millis(500));
    let window_ms = u64::try_from(shape.window.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let seed = u64::from(fastrand::u32(..));
    // A fresh set of keys per run, so that a second run on one store starts new sleepers.
    let run = fastrand::u32(..);
    let sends = futures::stream::iter(0..shape.actors)
        .map(|i| {
            let mut rng = fastrand::Rng::with_seed(seed ^ (i as u64));
            let until = start.as_millis() + rng.u64(..window_ms);
            let sleeper = rt.actor::<Sleeper>(format!("s{run:08x}-{i}"));
            async move { sleeper?.send(until).await }
        })
        .buffer_unordered(512)
        .collect::<Vec<_>>()
        .await;
    for s in sends {
        s?;
    }
    let sent_in = began.elapsed();
    // Measured while they wait: once every sleeper is asleep (suspended, or in its sleep in
    // memory), before the first wakes.
    let all_asleep = |rt: &Runtime| {
        if shape.suspend {
            // Suspended, and passivated: the actor leaves memory just after the suspension is
            // counted.
            let m = rt.metrics();
            m.suspensions >= shape.actors as u64 && m.active == 0
        } else {
            asleep.load(Ordering::Relaxed) >= shape.actors.min(rt.config().max_active)
        }
    };
    while !all_asleep(&rt) && Timestamp::now() < settle_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_asleep = all_asleep(&rt);
    let settled_in = began.elapsed();
    let waiting = rt.metrics();
    let rss_waiting = current_rss_mb();
    let bytes_waiting = store_bytes();
    let limit = shape.lead + shape.window + Duration::from_secs(120);
    loop {
        let n = woke.lock().unwrap_or_else(|p| p.into_inner()).len();
        if n >= shape.actors {
            break;
        }
        if began.elapsed() > limit {
            rt.shutdown().await;
            return Err(SleepersError::Unwoken {
                woke: n,
                actors: shape.actors,
                waited: began.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let suspensions = rt.metrics().suspensions;
    rt.shutdown().await;
    let wakes = woke.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut late: Vec<Duration> = wakes.iter().map(|w| w.late).collect();
    // Split by whether the run that woke began before its moment (warmed) or after it (cold):
    // where the slowest wake-ups lose their time.
    let (warmed, cold): (Vec<Wake>, Vec<Wake>) = wakes.iter().partition(|w| w.began_late.is_zero());
    let ms = |mut d: Vec<Duration>, q: f64| {
        d.sort();
        percentile_ms(&d, q)
    };
    let cold_late = || cold.iter().map(|w| w.late).collect::<Vec<_>>();
    let cold_began = || cold.iter().map(|w| w.began_late).collect::<Vec<_>>();
    let per = |mb: f64| mb * 1024.0 * 1024.0 / shape.actors.max(1) as f64;
    let wakeups_per_s = shape.actors as f64 / shape.window.as_secs_f64();
    let mut m = Measurement::new(
        if shape.suspend {
            "sleepers"
        } else {
            "sleepers (in memory)"
        },
        label,
        wakeups_per_s,
        0.0,
        &mut late,
    );
    let max_late_ms = late.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let details = json!({
        "unit": "wake-ups/s over the window; p50/p99: how late a sleeper woke",
        "actors": shape.actors,
        "window_s": shape.window.as_secs_f64(),
        "sent_in_s": sent_in.as_secs_f64(),
        "asleep_in_s": settled_in.as_secs_f64(),
        "suspensions": suspensions,
        // False if the window began before every sleeper was asleep: the figures below were
        // then read while some were still being set up.
        "all_asleep": all_asleep,
        "active_while_waiting": waiting.active,
        // Each renewed every third of the lease ttl: the node's partitions' (actors, sleeping
        // or not, take no leases of their own).
        "leases_held_while_waiting": waiting.leases_held,
        "rss_per_sleeper_bytes": per((rss_waiting - rss_before).max(0.0)),
        "store_bytes_per_sleeper": match (bytes_before, bytes_waiting) {
            (Some(b), Some(w)) => json!(w.saturating_sub(b) as f64 / shape.actors.max(1) as f64),
            _ => json!(null),
        },
        "max_late_ms": max_late_ms,
        "woken_warmed": warmed.len(),
        "p99_warmed_ms": ms(warmed.iter().map(|w| w.late).collect(), 0.99),
        "woken_cold": cold.len(),
        "p50_cold_ms": ms(cold_late(), 0.50),
        "p99_cold_ms": ms(cold_late(), 0.99),
        // Of a cold wake-up's lateness, how much passed before its run began.
        "p50_cold_began_late_ms": ms(cold_began(), 0.50),
        "p99_cold_began_late_ms": ms(cold_began(), 0.99),
    });
    if let serde_json::Value::Object(map) = details {
        m.details.extend(map);
    }
    Ok(m)
}
