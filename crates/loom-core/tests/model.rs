//! The journal model test (see `loom_testkit::model`) on the in-memory and embedded stores.

use std::path::PathBuf;
use std::sync::Arc;

use loom_core::{EmbeddedStore, Store};
use loom_testkit::model::{Reopen, check_journal_model};

struct Memory(Arc<dyn Store>);

impl Reopen for Memory {
    fn open(&self) -> Arc<dyn Store> {
        // Memory does not survive a real reopen; "reopening" hands back the same store.
        self.0.clone()
    }
}

struct Embedded {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Reopen for Embedded {
    fn open(&self) -> Arc<dyn Store> {
        Arc::new(EmbeddedStore::open(&self.dir).expect("open embedded store"))
    }
}

#[test]
fn journal_model_memory() {
    check_journal_model(256, || {
        Box::new(Memory(Arc::new(
            EmbeddedStore::in_memory().expect("memory"),
        )))
    });
}

#[test]
fn journal_model_embedded_with_reopen() {
    check_journal_model(64, || {
        let tmp = tempfile::tempdir().expect("temp dir");
        Box::new(Embedded {
            dir: tmp.path().to_path_buf(),
            _tmp: tmp,
        })
    });
}
