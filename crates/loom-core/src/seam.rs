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

/// Milliseconds since the Unix epoch: simulated if the thread is, else `None`.
pub(crate) fn simulated_now_ms() -> Option<u64> {
    SIM.with(|s| {
        s.borrow().as_ref().map(|sim| {
            let elapsed = tokio::time::Instant::now().saturating_duration_since(sim.start);
            sim.epoch_ms
                .saturating_add(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        })
    })
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
