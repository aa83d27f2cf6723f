//! The runtime suite (see `loom_testkit::runtime`) on the embedded store.

use loom_core::EmbeddedStore;
use loom_testkit::{Factory, Fixture};

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let factory = Factory::new(|| async {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = EmbeddedStore::open(dir.path()).expect("open embedded store");
        Fixture::new(store).with_guard(dir)
    });
    libtest_mimic::run(&args, loom_testkit::runtime::trials("embedded", &factory)).exit();
}
