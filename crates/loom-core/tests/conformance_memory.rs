//! The store conformance suite against the in-memory backend.

use loom_core::EmbeddedStore;
use loom_testkit::{Factory, Fixture, conformance};

fn main() {
    conformance::run(
        "memory",
        Factory::new(|| async {
            Fixture::new(EmbeddedStore::in_memory().expect("in-memory store"))
        }),
    );
}
