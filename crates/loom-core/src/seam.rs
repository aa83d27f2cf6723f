//! The one seam between the runtime and the world's nondeterminism: the wall clock, randomness
//! and ids. Everything in the runtime and the stores that reads the time or draws a random number
//! goes through here, so that a deterministic simulator (`loom-sim`) can run the production code
//! paths, not a copy of them.
//!
//! By default every function here is the real thing: the machine's clock, a thread-local
//! `fastrand` generator seeded by the OS, UUIDs from `getrandom`. [`simulate`] switches the
//! calling thread to simulation until the returned guard is dropped: the wall clock becomes a
//! fixed epoch plus tokio's clock (virtual under `tokio::time::pause`), and every random draw
//! comes from one generator seeded by the caller. Then a single-threaded tokio runtime with a
//! paused clock is fully deterministic: the same seed gives the same run.
//!
//! A simulated node may run on a **skewed clock** ([`skewed`]): a runtime started in a skewed
//! task keeps that skew ([`skew`]) for every task it spawns, so they read the simulated wall
//! clock plus the skew, as a machine whose clock runs ahead or behind; the simulated store
//! reads the unskewed one ([`store_now`]).
//!
//! The other sources of nondeterminism are kept out of the runtime's code paths by rule, not by
//! this module, and each is written down where it is kept:
//! - monotonic time is `tokio::time::Instant` (virtual when paused), never `std::time::Instant`;
//! - spawning is `tokio` tasks only (no OS threads, no `spawn_blocking`) in the runtime; the
//!   embedded store's writer, log and relay threads are outside the simulation, which runs the
//!   runtime on a simulated store instead;
//! - maps the runtime iterates are `BTreeMap`s (a `HashMap`'s order is random per process);
//! - every `tokio::select!` in the runtime is `biased` (an unbiased one polls its branches in a
//!   random order).
//!
//! ```
//! use loom_core::{Timestamp, seam};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let draw = || {
//!     let _sim = seam::simulate(7, Timestamp::from_millis(1_000));
//!     (seam::random_u64(), seam::uuid_v4(), Timestamp::now())
//! };
//! let (a, b) = (draw(), draw());
//! assert_eq!(a.0, b.0);                   // same seed, same numbers
//! assert_eq!(a.1, b.1);
//! assert!(a.2 >= Timestamp::from_millis(1_000)); // the simulated epoch
//! assert!(!seam::is_simulated());         // the guard is gone: real again
//! # }
//! ```

use std::cell::RefCell;
use std::future::Future;
use std::marker::PhantomData;

use crate::time::Timestamp;

/// The simulation installed on a thread.
struct Simulated {
    rng: fastrand::Rng,
    epoch_ms: u64,
    start: tokio::time::Instant,
}

thread_local! {
    static SIM: RefCell<Option<Simulated>> = const { RefCell::new(None) };
}

tokio::task_local! {
    /// How far (ms, either way) the clock of the simulated node running this task is off.
    static SKEW: i64;
}

/// Simulation on the current thread, until dropped (see [`simulate`]).
#[must_use = "the simulation ends when the guard is dropped"]
pub struct Simulation {
    previous: Option<Simulated>,
    // Bound to the thread it was installed on.
    _thread: PhantomData<*const ()>,
}

impl Drop for Simulation {
    fn drop(&mut self) {
        let previous = self.previous.take();
        SIM.with(|s| *s.borrow_mut() = previous);
    }
}

impl std::fmt::Debug for Simulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Simulation")
    }
}

/// Switches the current thread to simulation: [`Timestamp::now`] reads `epoch` plus the time
/// tokio's clock has moved since this call, and every random draw here comes from a generator
/// seeded with `seed`. Call it inside the tokio runtime the simulation runs on (so that the
/// clock read is that runtime's, paused or not). Nested calls stack; dropping the guard restores
/// what was there before.
pub fn simulate(seed: u64, epoch: Timestamp) -> Simulation {
    let sim = Simulated {
        rng: fastrand::Rng::with_seed(seed),
        epoch_ms: epoch.as_millis(),
        start: tokio::time::Instant::now(),
    };
    let previous = SIM.with(|s| s.borrow_mut().replace(sim));
    Simulation {
        previous,
        _thread: PhantomData,
    }
}

/// Whether the current thread runs a simulation.
pub fn is_simulated() -> bool {
    SIM.with(|s| s.borrow().is_some())
}

/// Milliseconds since the Unix epoch, by this task's clock (its node's [skew](skewed)
/// included): simulated if the thread is, else `None`.
pub(crate) fn simulated_now_ms() -> Option<u64> {
    let skew = SKEW.try_with(|s| *s).unwrap_or(0);
    unskewed_ms().map(|ms| ms.saturating_add_signed(skew))
}

/// The simulated wall clock without any node's skew, or `None` if the thread is not simulated.
fn unskewed_ms() -> Option<u64> {
    SIM.with(|s| {
        s.borrow().as_ref().map(|sim| {
            let elapsed = tokio::time::Instant::now().saturating_duration_since(sim.start);
            sim.epoch_ms
                .saturating_add(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        })
    })
}

/// The time by the store's clock: under simulation, the simulated wall clock without the
/// [skew](skewed) of the node whose task asks (a simulated store is one machine, whoever calls
/// it); else [`Timestamp::now`].
pub fn store_now() -> Timestamp {
    unskewed_ms().map_or_else(Timestamp::now, Timestamp::from_millis)
}

/// Runs `fut` with its wall clock `skew_ms` off the simulated one (ahead if positive): a
/// simulated node whose machine's clock is wrong. A runtime started in it runs every task it
/// spawns with the same skew. Outside a simulation the skew changes nothing: a real clock is
/// what it is.
///
/// ```
/// use loom_core::{Timestamp, seam};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let _sim = seam::simulate(1, Timestamp::from_millis(10_000));
/// let behind = seam::skewed(-250, async { Timestamp::now() }).await;
/// assert_eq!(behind, Timestamp::from_millis(9_750));
/// assert_eq!(seam::store_now(), Timestamp::from_millis(10_000));
/// # }
/// ```
pub fn skewed<F: Future>(skew_ms: i64, fut: F) -> impl Future<Output = F::Output> {
    SKEW.scope(skew_ms, fut)
}

/// The [skew](skewed) of the current task's clock, in ms (0 if it has none): what a runtime
/// keeps for the tasks it spawns.
pub fn skew() -> i64 {
    SKEW.try_with(|s| *s).unwrap_or(0)
}

fn with_rng<R>(sim: impl FnOnce(&mut fastrand::Rng) -> R, real: impl FnOnce() -> R) -> R {
    // The cell's borrow ends before `real` runs.
    let taken = SIM.with(|s| s.borrow_mut().as_mut().map(|state| sim(&mut state.rng)));
    match taken {
        Some(r) => r,
        None => real(),
    }
}

/// A random `u64`.
pub fn random_u64() -> u64 {
    with_rng(|r| r.u64(..), || fastrand::u64(..))
}

/// A random `u64` in `range`.
pub fn random_u64_in(range: std::ops::RangeFrom<u64>) -> u64 {
    with_rng(|r| r.u64(range.clone()), || fastrand::u64(range.clone()))
}

/// A random `u32`.
pub fn random_u32() -> u32 {
    with_rng(|r| r.u32(..), || fastrand::u32(..))
}

/// A random `f64` in `[0, 1)`.
pub fn random_f64() -> f64 {
    with_rng(|r| r.f64(), fastrand::f64)
}

/// A random (version 4) UUID.
pub fn uuid_v4() -> uuid::Uuid {
    with_rng(
        |r| uuid::Builder::from_random_bytes(r.u128(..).to_le_bytes()).into_uuid(),
        uuid::Uuid::new_v4,
    )
}

/// A time-ordered (version 7) UUID: [`Timestamp::now`] in its first 48 bits.
pub fn uuid_v7() -> uuid::Uuid {
    let simulated = SIM.with(|s| s.borrow().is_some());
    if !simulated {
        return uuid::Uuid::now_v7();
    }
    let ms = Timestamp::now().as_millis();
    let bytes = with_rng(|r| r.u128(..).to_le_bytes(), || [0; 16]);
    let mut random = [0u8; 10];
    random.copy_from_slice(&bytes[..10]);
    uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_simulated_clock_follows_tokios_paused_clock() {
        let _sim = simulate(1, Timestamp::from_millis(5_000));
        assert_eq!(Timestamp::now(), Timestamp::from_millis(5_000));
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        assert_eq!(Timestamp::now(), Timestamp::from_millis(8_000));
        let a = uuid_v7();
        assert_eq!(a.get_version_num(), 7);
        assert_eq!(uuid_v4().get_version_num(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_skewed_task_and_the_tasks_it_spawns_read_their_own_clock() {
        let _sim = simulate(1, Timestamp::from_millis(5_000));
        let (own, spawned) = skewed(300, async {
            let spawned = tokio::spawn(skewed(skew(), async { Timestamp::now() }));
            (Timestamp::now(), spawned.await.unwrap())
        })
        .await;
        assert_eq!(own, Timestamp::from_millis(5_300));
        assert_eq!(spawned, Timestamp::from_millis(5_300));
        // Not kept: by a plain spawn, and by the store's clock.
        let plain = skewed(300, async {
            tokio::spawn(async { Timestamp::now() }).await.unwrap()
        });
        assert_eq!(plain.await, Timestamp::from_millis(5_000));
        assert_eq!(
            skewed(300, async { store_now() }).await,
            Timestamp::from_millis(5_000)
        );
    }

    #[test]
    fn guards_nest_and_restore() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(!is_simulated());
            let outer = simulate(1, Timestamp::from_millis(1));
            let first = random_u64();
            {
                let _inner = simulate(2, Timestamp::from_millis(1));
                assert_ne!(random_u64(), first);
            }
            assert!(is_simulated());
            drop(outer);
            assert!(!is_simulated());
        });
    }
}
