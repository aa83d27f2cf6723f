//! The store conformance suite against the embedded backend, each case in its own directory.

use loom_core::{EmbeddedOptions, EmbeddedStore};
use loom_testkit::{Factory, Fixture, conformance};

fn main() {
    conformance::run(
        "embedded",
        Factory::new(|| async {
            let dir = tempfile::tempdir().expect("temp dir");
            let options = EmbeddedOptions {
                partitions: Some(3),
                ..EmbeddedOptions::default()
            };
            // Three partitions: sends between actors go through the outbox and the relay.
            let store = EmbeddedStore::open_with(dir.path(), options).expect("open embedded store");
            Fixture::new(store).with_guard(dir)
        }),
    );
}
