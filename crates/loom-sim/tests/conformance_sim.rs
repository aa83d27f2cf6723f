//! The store conformance suite against the simulated store, without faults, twice: `sim`, of
//! one partition, and `sim3`, of three, where sends between actors of different partitions go
//! through the outbox and the relay.

use libtest_mimic::Arguments;
use loom_sim::store::{Faults, SimStore};
use loom_testkit::{Factory, Fixture, conformance};

fn main() {
    let args = Arguments::from_args();
    let one = Factory::new(|| async { Fixture::new(SimStore::new(0, Faults::default())) });
    let three = Factory::new(|| async {
        // Created inside the case's runtime, which runs its relays.
        let store = SimStore::new_partitioned(0, Faults::default(), 3).expect("3 partitions");
        Fixture::new(store)
    });
    let mut trials = conformance::all("sim", &one);
    trials.extend(conformance::all("sim3", &three));
    libtest_mimic::run(&args, trials).exit()
}
