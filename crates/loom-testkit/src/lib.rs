//! # loom-testkit
//!
//! What proves a Loom store keeps its promises:
//! - [`conformance`]: the store conformance suite, one function per store trait, each returning
//!   named test cases for a backend; every backend runs the same list;
//! - [`Fixture`] and [`Factory`]: fresh, isolated stores for each case;
//! - [`load`]: writers through server faults and the checks after them, for the fault suites
//!   of the server backends;
//! - [`racing`]: two nodes racing for the same actors while one loses its leases, for the
//!   server backends.
//!
//! Backends use it from a test binary with `harness = false`:
//!
//! ```no_run
//! use loom_testkit::{conformance, Fixture, Factory};
//!
//! fn main() {
//!     let factory = Factory::new(|| async {
//!         Fixture::new(loom_core::EmbeddedStore::in_memory().expect("in-memory store"))
//!     });
//!     conformance::run("memory", factory);
//! }
//! ```

pub mod conformance;
pub mod examples;
pub mod faults;
mod fixture;
pub mod group_commit;
pub mod load;
pub mod model;
pub mod racing;
pub mod runtime;
pub mod scrape;
pub mod servers;
pub mod torture;

pub use fixture::{Factory, Fixture};
