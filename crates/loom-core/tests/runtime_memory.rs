//! The runtime suite (see `loom_testkit::runtime`) on the in-memory store.

use loom_core::EmbeddedStore;
use loom_testkit::{Factory, Fixture};

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let factory = Factory::new(|| async {
        Fixture::new(EmbeddedStore::in_memory().expect("in-memory store"))
    });
    libtest_mimic::run(&args, loom_testkit::runtime::trials("memory", &factory)).exit();
}
