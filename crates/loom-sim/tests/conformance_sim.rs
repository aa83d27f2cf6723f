//! The store conformance suite against the simulated store, without faults.

use loom_sim::store::{Faults, SimStore};
use loom_testkit::{Factory, Fixture, conformance};

fn main() {
    conformance::run(
        "sim",
        Factory::new(|| async { Fixture::new(SimStore::new(0, Faults::default())) }),
    );
}
