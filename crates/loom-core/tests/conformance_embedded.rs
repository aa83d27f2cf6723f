//! The store conformance suite against the embedded backend, each case in its own directory.

use loom_core::EmbeddedStore;
use loom_testkit::{Factory, Fixture, conformance};

fn main() {
    conformance::run(
        "embedded",
        Factory::new(|| async {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = EmbeddedStore::open(dir.path()).expect("open embedded store");
            Fixture::new(store).with_guard(dir)
        }),
    );
}
