//! The runtime suite (see `loom_testkit::runtime`) on the embedded store.

use loom_core::{EmbeddedOptions, EmbeddedStore};
use loom_testkit::{Factory, Fixture};

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let factory = Factory::new(|| async {
        let dir = tempfile::tempdir().expect("temp dir");
        // Three partitions: sends between actors go through the outbox and the relay.
        let options = EmbeddedOptions {
            partitions: Some(3),
            ..EmbeddedOptions::default()
        };
        let store = EmbeddedStore::open_with(dir.path(), options).expect("open embedded store");
        Fixture::new(store).with_guard(dir)
    });
    libtest_mimic::run(&args, loom_testkit::runtime::trials("embedded", &factory)).exit();
}
