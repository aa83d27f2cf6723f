//! # loom-bench
//!
//! Workloads and benchmark scenarios for Loom. Every scenario measures its baseline in the same
//! run, on the same machine and disk, and reports the ratio: machines are noisy, ratios less so.
//!
//! - [`bank`]: the bank workload (accounts, transfers, verification), used by the `bank` example,
//!   `loom-dev bench bank` and the torture harness;
//! - [`scenarios`]: `append-seq`, `append-concurrent`, `recover`, `bank`;
//! - [`baseline`]: the physical limits they are compared with (a raw write + fdatasync loop);
//! - [`engines`]: the engine bake-off (redb with a redo log against fjall, one bank turn's
//!   writes straight on each engine);
//! - [`compression`]: what zstd frames save and cost on a state-heavy actor;
//! - [`report`]: one [`report::Measurement`] per scenario, as a table or JSON.

pub mod bank;
pub mod baseline;
pub mod compression;
pub mod engines;
pub mod report;
pub mod scenarios;
pub mod sleepers;
